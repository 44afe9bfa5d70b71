"""``stf.fuse``: predict the fine image at one target date with any registered method."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from typing import Any

import xarray as xr

from stf_pipeline._dask import is_dask_array
from stf_pipeline.cube import pixel_size, validate_cube
from stf_pipeline.exceptions import CubeError, MethodError
from stf_pipeline.methods import MethodContext, MethodSpec, get_method, params_to_attrs
from stf_pipeline.methods._base import PADDED_BACKENDS, device_kind
from stf_pipeline.parallel import (
    default_device_block_pixels,
    device_block_pixels,
    device_chunks,
    fill_statistics,
    map_on_device,
    map_overlapping,
    tasks_run_here,
)
from stf_pipeline.task import DateLike, Task, resolve_task


def method_context(cube: xr.Dataset) -> MethodContext:
    """The cube facts a method may size itself by."""
    factor = cube.attrs.get("coarse_factor")
    return MethodContext(
        coarse_factor=int(factor) if factor is not None else None,
        pixel_size=pixel_size(cube),
        n_bands=int(cube.sizes["band"]),
    )


def require_coarse(cube: xr.Dataset, *, what: str) -> None:
    """Refuse a cube without ``coarse``: fusion reads it at the target and pair dates.

    :func:`stf_pipeline.validate_cube` accepts a fused store without it (``fuse_series`` keeps
    ``coarse`` only when asked to), so ``what`` (the caller, e.g. ``"stf.fuse"``) checks here.

    Raises
    ------
    CubeError
        Naming the missing variable and how to get a cube that has it.
    """
    if "coarse" in cube.data_vars:
        return
    raise CubeError(
        f"{what} needs the data variable 'coarse', which this cube lacks (found "
        f"{sorted(map(str, cube.data_vars))}); this looks like a fused store: fuse from the input cube, "
        "or write the fused store with keep=('coarse',)."
    )


def fuse(
    cube: xr.Dataset,
    target: DateLike,
    *,
    method: str | MethodSpec[Any],
    pairs: Sequence[DateLike] | None = None,
    model: Any | None = None,
    chunks: tuple[int, int] | None = None,
    backend: str = "auto",
    **params: Any,
) -> xr.DataArray:
    """Predict the fine image of ``cube`` at ``target`` with ``method``.

    Lazy for a Dask-backed cube (the method's kernel is mapped over overlapping chunks; nothing
    is computed until ``.compute()``/``.to_zarr()``), eager for a NumPy-backed one. Both give
    the same numbers.

    Parameters
    ----------
    cube : xarray.Dataset
        A cube (see :func:`stf_pipeline.validate_cube`).
    target : str, numpy.datetime64 or pandas.Timestamp
        Date to predict; its coarse image must be present.
    method : str or MethodSpec
        Registered method name (``delta``, ``starfm``, ``estarfm``, ``fsdaf``, ``stfdcnn``,
        ``biastf``: :func:`stf_pipeline.available_methods`), or a :class:`MethodSpec` not in the
        registry (e.g. one under development).
    pairs : sequence of date-like, optional
        Fine+coarse pair dates; default the nearest before and after the target (one for
        one-pair methods).
    model : FittedModel, optional
        Trained model, required by learned methods (``stf.train``).
    chunks : (int, int), optional
        Spatial chunk size for the computation; default the cube's chunks, except for a jitted
        kernel on this process's GPU: there a scene that fits the device (up to
        ``STF_DEVICE_BLOCK_PIXELS`` pixels where that is set) runs as one block assembled on it, for
        a kernel that takes device arrays (:func:`stf_pipeline.parallel.map_on_device`), and where
        ``STF_DEVICE_BLOCK_PIXELS`` is set the cube's chunks are otherwise merged into blocks of up
        to that many pixels (:func:`stf_pipeline.parallel.device_chunks`).
    backend : {"auto", "numpy", "numba", "jax", "pallas"}, default "auto"
        Implementation of the method's kernel, among those it declares (``MethodSpec.kernels``;
        ``stf.get_method(name).backends``): ``numpy``, whole-array NumPy (the reference);
        ``numba``, compiled for the CPU cores; ``jax``, a jitted XLA program on JAX's default
        device; ``pallas``, Pallas (Triton) kernels for GPUs (interpreted, slowly, on a CPU).
        ``auto`` takes the method's choice for JAX's default device (``MethodSpec.auto``, e.g.
        ``numba`` on a CPU and ``pallas`` on a GPU for STARFM). All backends give the numbers of
        the reference to float32 rounding; the chosen one is recorded in the ``backend`` attr.
    **params
        Method parameters (see the method's parameter dataclass).

    Returns
    -------
    xarray.DataArray
        ``(band, y, x)`` float32 named ``fine``, with the cube's coords and CRS, a scalar ``time``
        coord and provenance attrs (method, parameters, pairs, package version).

    Raises
    ------
    MethodError, TaskError, CubeError

    Examples
    --------
    >>> pred = stf.fuse(cube, "2001-07-11", method="estarfm")  # doctest: +SKIP
    """
    from stf_pipeline import __version__

    call = prepare_fusion(cube, target, method=method, pairs=pairs, model=model, backend=backend, **params)
    result = call.run(cube, chunks=chunks)
    out = _wrap(result, cube, call.task)
    out.attrs.update(
        {
            "method": call.spec.name,
            "backend": call.backend,
            "stf_params": json.dumps(params_to_attrs(call.params)),
            "target": call.task.to_attrs()["target"],
            "pairs": call.task.to_attrs()["pairs"],
            "stf_pipeline_version": __version__,
            "units": "reflectance",
        }
    )
    if call.context.coarse_factor is not None:
        out.attrs["coarse_factor"] = call.context.coarse_factor
    return out


@dataclasses.dataclass(frozen=True)
class FusionCall:
    """One checked :func:`fuse` request, ready to run on the cube or on windows of it.

    Attributes
    ----------
    spec : MethodSpec
        The method.
    backend : str
        The resolved kernel backend.
    params : object
        The method's parameters after ``prepare`` (scene statistics not yet filled in, unless
        :meth:`with_scene_statistics` returned this call).
    task : Task
        Target and pair dates.
    context : MethodContext
        Facts of the whole cube.
    model : FittedModel or None
        The trained model of a learned method.
    statistics_filled : bool
        Whether ``params`` already hold the scene-wide statistics (then :meth:`run` does not
        reduce its input again, so a window of the scene is fused with the statistics of the
        whole scene).
    """

    spec: MethodSpec[Any]
    backend: str
    params: Any
    task: Task
    context: MethodContext
    model: Any | None = None
    statistics_filled: bool = False

    @property
    def halo(self) -> int:
        """Context pixels each side of a block, rounded up to :attr:`align` (as :func:`map_overlapping` does)."""
        halo = int(self.spec.halo(self.params, self.context))
        return -(-halo // self.align) * self.align

    @property
    def align(self) -> int:
        """Blocks start on multiples of this (the coarse factor for coarse-aligned methods)."""
        factor = self.context.coarse_factor
        return factor if self.spec.coarse_aligned and factor else 1

    def _on_local_gpu(self) -> bool:
        """Whether the kernel is a jitted program on the one GPU of this process (Dask's local
        scheduler, not a cluster of workers): where the scene may run as one block on the device
        (:func:`~stf_pipeline.parallel.map_on_device`) or in blocks larger than the cube's chunks
        (:func:`~stf_pipeline.parallel.device_chunks`)."""
        return (
            self.spec.resolve_backend(self.backend) in PADDED_BACKENDS
            and device_kind() == "gpu"
            and tasks_run_here()
        )

    def inputs(self, cube: xr.Dataset) -> tuple[Any, Any, Any]:
        """The pair fine and coarse images ``(pair, band, y, x)`` and the target's coarse image ``(band, y, x)``."""
        pair_times = list(self.task.pairs)
        return (
            at_times(cube["fine"], pair_times),
            at_times(cube["coarse"], pair_times),
            cube["coarse"].sel(time=self.task.target).data,
        )

    def with_scene_statistics(self, cube: xr.Dataset) -> FusionCall:
        """This call with the method's scene-wide statistics of ``cube`` computed now (once).

        Lets a caller fuse the scene window by window (:meth:`run` on parts of ``cube``, chunked)
        with the statistics of the whole scene, so the windows give exactly the numbers of one
        chunked call: NumPy inputs are reduced as the Dask arrays a chunked :meth:`run` makes of them.
        """
        if self.statistics_filled or self.spec.statistics is None:
            return dataclasses.replace(self, statistics_filled=True)
        import dask.array as da
        from dask.delayed import Delayed

        fine, coarse, coarse_target = (da.asarray(a) for a in self.inputs(cube))
        filled = fill_statistics(self.spec.statistics, fine, coarse, coarse_target, self.params)
        if isinstance(filled, Delayed):
            filled = filled.compute()
        return dataclasses.replace(self, params=filled, statistics_filled=True)

    def run(
        self,
        cube: xr.Dataset,
        *,
        chunks: tuple[int, int] | None = None,
        block_chunks: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
    ) -> Any:
        """The prediction ``(band, y, x)`` on ``cube``'s grid: lazy for Dask input, NumPy otherwise.

        ``chunks`` and ``block_chunks`` are passed to :func:`stf_pipeline.parallel.map_overlapping`;
        with neither, on this process's GPU, a scene that fits runs as one block assembled on the
        device (:func:`stf_pipeline.parallel.map_on_device`; see :func:`fuse`).
        A window's ``block_chunks`` hold halo-wide strips beside full blocks: padding those to one
        shape would compute each strip as a full block, so windows run unpadded (a few shapes per
        scene, each compiled once).
        """
        fine, coarse, coarse_target = self.inputs(cube)
        extra = _extra_inputs(cube, self.spec, self.params)  # before statistics: those may be delayed
        lazy = is_dask_array(fine) or chunks is not None or block_chunks is not None
        if lazy:
            import dask.array as da

            fine, coarse, coarse_target = (da.asarray(a) for a in (fine, coarse, coarse_target))
            extra = {name: da.asarray(values) for name, values in extra.items()}
        params = self.params
        if not self.statistics_filled:
            params = fill_statistics(self.spec.statistics, fine, coarse, coarse_target, params)
        kernel_kwargs: dict[str, Any] = {"params": params}
        if self.spec.learned:
            kernel_kwargs["model"] = self.model
            if lazy:
                # one task holds the model, so it is shipped once per worker, not inside every block task
                # (on a cluster: scattered once, not inside the graph of each call)
                from stf_pipeline.cluster import shared

                kernel_kwargs["model"] = shared(self.model)
        padding = "none" if block_chunks is not None else self.spec.padding_for(self.backend)
        kernel = self.spec.kernel_for(self.backend)
        stored = None  # the cube's chunks, when the blocks are merged ones
        asked = device_block_pixels() if lazy and chunks is None and block_chunks is None else 0
        whole_scene = asked != 0 and self.spec.resolve_backend(self.backend) in self.spec.device_inputs
        if (whole_scene or asked) and self._on_local_gpu():
            budget = default_device_block_pixels() if asked is None else asked
            if whole_scene and math.prod(fine.shape[-2:]) <= budget:
                return map_on_device(
                    kernel, fine, coarse, coarse_target, extra=extra, out_chunks=fine.chunks[-2:],
                    halo=self.halo, align=self.align, **kernel_kwargs,
                )
            if asked:
                nominal = device_chunks(fine.shape[-2:], (fine.chunks[-2][0], fine.chunks[-1][0]), asked)
                if nominal != (fine.chunks[-2][0], fine.chunks[-1][0]):
                    chunks, stored = nominal, (fine.chunks[-2], fine.chunks[-1])
        result = map_overlapping(
            kernel, fine, coarse, coarse_target, halo=self.halo, align=self.align,
            chunks=chunks, block_chunks=block_chunks, extra=extra, padding=padding, **kernel_kwargs,
        )
        if stored is not None:
            # the result in the cube's chunks again: writing it runs one task per stored chunk
            # (compressing in parallel), lined up with the input store's chunks
            result = result.rechunk({1: stored[0], 2: stored[1]})
        return result


def prepare_fusion(
    cube: xr.Dataset,
    target: DateLike,
    *,
    method: str | MethodSpec[Any],
    pairs: Sequence[DateLike] | None = None,
    model: Any | None = None,
    backend: str = "auto",
    **params: Any,
) -> FusionCall:
    """Check a :func:`fuse` request against ``cube`` and resolve it (arguments as for :func:`fuse`).

    Raises
    ------
    MethodError, TaskError, CubeError
    """
    validate_cube(cube)
    require_coarse(cube, what="stf.fuse")
    spec = method if isinstance(method, MethodSpec) else get_method(method)
    context = method_context(cube)
    p = spec.make_params(**params)
    chosen = spec.resolve_backend(backend)
    if spec.learned and model is None:
        raise MethodError(
            f"method {spec.name!r} is learned: train it first, model = stf.train(cube, method={spec.name!r}, "
            "train_times=[...]), then pass model=model."
        )
    if spec.prepare is not None:
        p = spec.prepare(p, context, model=model)
    if spec.coarse_aligned and context.coarse_factor is None:
        validate_cube(cube, require_coarse_factor=True)
    task = resolve_task(cube, target, pairs=pairs, n_pairs=spec.n_pairs)
    if spec.learned:
        check_cube = getattr(model, "check_cube", None)
        if check_cube is not None:
            check_cube(cube)
    return FusionCall(spec=spec, backend=chosen, params=p, task=task, context=context, model=model)


def at_times(array: xr.DataArray, times: Sequence[Any]) -> Any:
    """``array``'s data at ``times`` (a NumPy or Dask array, ``time`` still first).

    By position: a view where the dates are evenly spaced in the cube (one or two pairs always
    are: a strided slice along ``time``), else :func:`numpy.take` (or Dask's indexing). A view
    spares a copy of the pairs' images on every fusion (0.10-0.13 s for two 2000² × 6 pairs on
    the GPU host; the device kernels send its dates as they lie, :func:`stf_pipeline.kernels.
    device.to_device`). xarray's ``sel`` with a list indexes an in-memory array orthogonally on
    every axis, 10-20 times slower than one ``take`` along ``time`` (``docs/benchmarks.md``,
    STARFM and ESTARFM). A date missing from the cube raises :class:`CubeError` naming it.
    """
    import numpy as np
    import pandas as pd

    index = array.get_index("time").get_indexer(pd.Index(list(times)))
    if (index < 0).any():
        missing = [str(t) for t, i in zip(times, index, strict=True) if i < 0]
        raise CubeError(f"{array.name}: no image at {missing}; pick dates from the cube's time coordinate.")
    axis = array.get_axis_num("time")
    data = array.data
    before = (slice(None),) * axis
    steps = np.diff(index)
    if len(index) == 1 or (steps[0] > 0 and (steps == steps[0]).all()):
        step = int(steps[0]) if len(index) > 1 else 1
        return data[(*before, slice(int(index[0]), int(index[-1]) + 1, step))]
    if isinstance(data, np.ndarray):
        return np.take(data, index, axis=axis)
    return data[(*before, index)]


def _extra_inputs(cube: xr.Dataset, spec: MethodSpec[Any], params: Any) -> dict[str, Any]:
    """Per-pixel ``(y, x)`` cube variables the method asks for (``MethodSpec.extra_vars``)."""
    if spec.extra_vars is None:
        return {}
    extra = {}
    for name in spec.extra_vars(params):
        if name not in cube.variables:
            raise MethodError(
                f"method {spec.name!r} needs the cube variable {name!r}, which the cube lacks "
                f"(it has {sorted(map(str, cube.data_vars))}); add it as a (y, x) variable."
            )
        var = cube[name]
        if tuple(var.dims) != ("y", "x"):
            raise MethodError(
                f"cube variable {name!r} has dims {tuple(var.dims)}, but method {spec.name!r} needs it on the "
                "fine grid with dims ('y', 'x'); squeeze or transpose it."
            )
        extra[name] = var.data
    return extra


def _wrap(data: Any, cube: xr.Dataset, task: Task) -> xr.DataArray:
    template = cube["coarse"].sel(time=task.target)
    coords = {name: coord for name, coord in template.coords.items()}
    out = xr.DataArray(data, dims=("band", "y", "x"), coords=coords, name="fine")
    if "grid_mapping" in cube["fine"].attrs:
        out.attrs["grid_mapping"] = cube["fine"].attrs["grid_mapping"]
    return out
