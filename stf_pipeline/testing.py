"""Reusable checks and tiny fixtures for tests of stf_pipeline and of code built on it.

:func:`check_method` is the conformance suite every registered method passes for every backend
it declares (``tests/methods/test_conformance.py``); run it on a new method before registering it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr

from stf_pipeline.cube import make_cube
from stf_pipeline.methods._base import MethodContext, MethodSpec

BANDS6: tuple[str, ...] = ("blue", "green", "red", "nir", "swir1", "swir2")


class DaskComputeError(RuntimeError):
    """Raised by :func:`raise_if_dask_computes` when something computes."""


@contextlib.contextmanager
def raise_if_dask_computes(max_computes: int = 0) -> Iterator[None]:
    """Fail if Dask computes more than ``max_computes`` times inside the block.

    Building a lazy graph must not compute; wrap graph-building code in this guard.
    """
    count = 0

    def scheduler(dsk, keys, **kwargs):  # noqa: ANN001
        nonlocal count
        count += 1
        if count > max_computes:
            raise DaskComputeError(f"Too many computes: {count} > {max_computes}; something was computed eagerly.")
        return dask.get(dsk, keys, **kwargs)

    with dask.config.set(scheduler=scheduler):
        yield


def random_cube(
    *,
    n_times: int = 3,
    height: int = 40,
    width: int = 48,
    bands: Sequence[str] = ("red", "nir"),
    coarse_factor: int = 8,
    seed: int = 0,
    pixel_size: float = 30.0,
) -> xr.Dataset:
    """A small seeded NumPy-backed cube with real coordinates and a UTM CRS.

    Fine is smooth random texture plus a per-date offset; coarse is the fine image block-averaged
    by ``coarse_factor``, with a gain and offset, put back on the fine grid.
    """
    rng = np.random.default_rng(seed)
    shape = (n_times, len(bands), height, width)
    base = rng.uniform(0.05, 0.45, size=(1, len(bands), height, width))
    drift = rng.uniform(-0.05, 0.05, size=(n_times, len(bands), 1, 1))
    fine = np.clip(base + drift + rng.normal(0, 0.01, size=shape), 0, 1)
    hb, wb = -(-height // coarse_factor), -(-width // coarse_factor)
    pad = np.pad(fine, ((0, 0), (0, 0), (0, hb * coarse_factor - height), (0, wb * coarse_factor - width)), mode="edge")
    blocks = pad.reshape(n_times, len(bands), hb, coarse_factor, wb, coarse_factor).mean(axis=(3, 5))
    coarse = np.repeat(np.repeat(blocks, coarse_factor, axis=2), coarse_factor, axis=3)[..., :height, :width]
    coarse = 0.95 * coarse + 0.01
    times = np.datetime64("2020-03-01") + np.arange(n_times) * np.timedelta64(16, "D")
    y = 5_000_000.0 - (np.arange(height) + 0.5) * pixel_size
    x = 500_000.0 + (np.arange(width) + 0.5) * pixel_size
    return make_cube(
        fine.astype(np.float32),
        coarse.astype(np.float32),
        time=list(times),
        band=list(bands),
        y=y,
        x=x,
        crs="EPSG:32633",
        coarse_factor=coarse_factor,
    )


def series_cube(
    *, n_times: int = 4, height: int = 32, width: int = 40, missing: Sequence[int] = (1, 2), seed: int = 0,
    offset: float = 0.0,
) -> xr.Dataset:
    """:func:`random_cube` with the fine images of dates ``missing`` all NaN: a series whose
    coarse-only dates are the targets (``fuse_series``, stores). ``offset`` is added to the fine
    images (the same grid with other values, e.g. a changed input on resume)."""
    cube = random_cube(n_times=n_times, height=height, width=width, seed=seed)
    fine = cube["fine"].values.copy() + np.float32(offset)
    fine[list(missing)] = np.nan
    return make_cube(
        fine, cube["coarse"].values, time=cube.time.values, band=cube.band.values, y=cube.y.values,
        x=cube.x.values, crs="EPSG:32633", coarse_factor=cube.attrs["coarse_factor"],
    )


def tree_bytes(path: str | os.PathLike[str]) -> dict[str, bytes]:
    """``{relative path: content}`` of every file under ``path``: asserts that a store is unchanged."""
    root = Path(path)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_chunked_equals_unchunked(
    unchunked: xr.DataArray, chunked: xr.DataArray, *, rtol: float = 0.0, atol: float = 0.0
) -> None:
    """Assert a chunked (Dask) result equals the unchunked one (bitwise by default), NaNs included."""
    a = np.asarray(unchunked.values)
    b = np.asarray(chunked.compute().values)
    if rtol == 0 and atol == 0:
        np.testing.assert_array_equal(a, b)
    else:
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, equal_nan=True)


@dataclasses.dataclass(frozen=True)
class _WiderHalo:
    """A method's halo plus ``extra`` pixels (picklable, for :func:`check_method`)."""

    halo: Any
    extra: int

    def __call__(self, params: Any, context: MethodContext) -> int:
        return int(self.halo(params, context)) + self.extra


def _with_holes(cube: xr.Dataset, seed: int) -> xr.Dataset:
    """``cube`` with a 5x7 hole in every fine image, a 4x4 hole in every coarse image and a few
    missing pixels in the coarse target (time index 1), at seeded places."""
    rng = np.random.default_rng(seed)
    fine = cube["fine"].values.copy()
    coarse = cube["coarse"].values.copy()
    ny, nx = fine.shape[-2:]
    y0, x0 = int(rng.integers(0, ny - 5)), int(rng.integers(0, nx - 7))
    fine[..., y0 : y0 + 5, x0 : x0 + 7] = np.nan
    y0, x0 = int(rng.integers(0, ny - 4)), int(rng.integers(0, nx - 4))
    coarse[..., y0 : y0 + 4, x0 : x0 + 4] = np.nan
    coarse[1, :, rng.integers(0, ny, 3), rng.integers(0, nx, 3)] = np.nan
    return cube.assign(fine=(cube["fine"].dims, fine), coarse=(cube["coarse"].dims, coarse))


def _far_from_missing(cube: xr.Dataset, times: Sequence[Any], halo: int) -> np.ndarray:
    """``(y, x)`` pixels more than ``halo`` pixels from any missing input at ``times``."""
    from scipy import ndimage

    missing = np.zeros(cube["fine"].shape[-2:], dtype=bool)
    for name in ("fine", "coarse"):
        missing |= cube[name].sel(time=list(times)).isnull().any(("time", "band")).values
    return ~ndimage.binary_dilation(missing, structure=np.ones((2 * halo + 1, 2 * halo + 1), bool))


def _assert_close(got: np.ndarray, want: np.ndarray, rtol: float, atol: float, what: str) -> None:
    if rtol == 0 and atol == 0:
        np.testing.assert_array_equal(got, want, err_msg=what)
    else:
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, equal_nan=True, err_msg=what)


@dataclasses.dataclass(frozen=True, eq=False)
class _ShapeRecorder:
    """A kernel that records the ``(y, x)`` shape of every block it is handed (``pad_to`` when given)."""

    kernel: Any
    seen: list[tuple[int, int]] = dataclasses.field(default_factory=list)

    def __call__(self, fine: np.ndarray, coarse: np.ndarray, coarse_target: np.ndarray, **kwargs: Any) -> np.ndarray:
        self.seen.append(tuple(kwargs.get("pad_to") or fine.shape[-2:]))
        return self.kernel(fine, coarse, coarse_target, **kwargs)


def _check_one_shape(
    spec: MethodSpec[Any],
    backend: str,
    holes: xr.Dataset,
    target: Any,
    kwargs: Mapping[str, Any],
    eager: np.ndarray,
    rtol: float,
    atol: float,
) -> None:
    """Check 4 of :func:`check_method`: ragged edge blocks reach the kernel padded to one shape."""
    from stf_pipeline.fusion import fuse
    from stf_pipeline.parallel import plan_chunks

    chosen = spec.resolve_backend(backend)
    recorder = _ShapeRecorder(spec.kernels[chosen])
    recording = dataclasses.replace(spec, kernels={**spec.kernels, chosen: recorder}, kernel=None)
    ny, nx = holes.sizes["y"], holes.sizes["x"]
    ragged = (-(-3 * ny // 5), -(-3 * nx // 5))
    ychunks, xchunks = plan_chunks((ny, nx), ragged, halo=0)
    assert ychunks[-1] < ychunks[0] and xchunks[-1] < xchunks[0], "the ragged chunks end in a short chunk"
    ragged_cube = holes.chunk({"time": 1, "y": ragged[0], "x": ragged[1]})
    out = fuse(ragged_cube, target, **{**kwargs, "method": recording, "chunks": ragged})
    _assert_close(out.values, eager, rtol, atol, f"{spec.name}/{backend}: padded ragged blocks != unchunked")
    assert len(recorder.seen) > 1, f"{spec.name}/{backend}: the ragged run needs several blocks; pass a larger cube"
    assert len(set(recorder.seen)) == 1, (
        f"{spec.name}/{backend}: block_padding={spec.block_padding!r} handed the kernel blocks of several shapes "
        f"{sorted(set(recorder.seen))}; one jitted program per scene needs one"
    )


def check_method(
    method: str | MethodSpec[Any],
    backend: str = "auto",
    *,
    cube: xr.Dataset | None = None,
    params: Mapping[str, Any] | None = None,
    model: Any | None = None,
    chunks: tuple[int, int] = (16, 16),
    rtol: float = 0.0,
    atol: float = 0.0,
    reference_rtol: float = 0.0,
    reference_atol: float = 1e-5,
    seed: int = 0,
) -> None:
    """Check that a method's ``backend`` honours the engine's contract (:mod:`stf_pipeline.methods._base`).

    Through :func:`stf_pipeline.fuse`, at the second date of ``cube``:

    1. *lazy*: fusing a Dask-backed cube computes nothing (:func:`raise_if_dask_computes`);
    2. *chunked == unchunked*: with NaN holes in the inputs (a hole in every fine and every coarse
       image, missing pixels in the target's coarse image), the chunked result equals the
       whole-scene one (to ``rtol``/``atol``; bitwise by default) and the kernel does not fail; the
       output is float32 with no infinities, NaN only where the method leaves a pixel undefined,
       which must lie within the halo of a missing input;
    3. *halo large enough*: a chunked run with the halo widened by two coarse pixels (or 2 pixels)
       gives the same numbers;
    4. *one shape per scene*: for a backend the engine pads (``MethodSpec.padding_for``), a chunked
       run whose last chunks are short (3/5 of the scene per chunk) hands the kernel blocks of one
       shape (``pad_to`` of one value, for ``block_padding="kernel"``) and gives the unchunked numbers;
    5. *backend == reference*: on the cube without holes, the backend matches the method's
       reference backend (``MethodSpec.reference``) to ``reference_rtol``/``reference_atol``.

    Parameters
    ----------
    method : str or MethodSpec
        A registered name or a spec not (yet) in the registry.
    backend : str, default "auto"
        One of the method's backends (``MethodSpec.backends``) or ``auto``.
    cube : xarray.Dataset, optional
        NumPy-backed cube, default :func:`random_cube` (3 dates, 2 bands, 40x48, coarse factor 8).
        Pick it, ``params`` and ``chunks`` so that the scene holds several chunks beyond the halo.
    params : mapping, optional
        Method parameters (keyword arguments of :func:`stf_pipeline.fuse`).
    model : FittedModel, optional
        For learned methods.
    chunks : (int, int), default (16, 16)
        Nominal chunk size of the chunked runs.
    rtol, atol : float
        Tolerance of chunked against unchunked (and of the widened halo).
    reference_rtol, reference_atol : float
        Tolerance of ``backend`` against the reference backend.
    seed : int
        Seed of the scattered holes.

    Raises
    ------
    AssertionError
        Naming the check that failed.
    """
    from stf_pipeline.fusion import fuse, method_context
    from stf_pipeline.methods import get_method

    spec = method if isinstance(method, MethodSpec) else get_method(method)
    cube = random_cube() if cube is None else cube
    target = cube["time"].values[1]
    kwargs: dict[str, Any] = {"method": spec, "backend": backend, "model": model, **dict(params or {})}
    holes = _with_holes(cube, seed)
    lazy_cube = holes.chunk({"time": 1, "y": chunks[0], "x": chunks[1]})
    # the chunks named, so that a GPU does not merge them into one block (fusion.FusionCall._on_local_gpu)
    chunked = {**kwargs, "chunks": chunks}

    with raise_if_dask_computes():
        lazy = fuse(lazy_cube, target, **chunked)
    assert isinstance(lazy.data, da.Array), f"{spec.name}/{backend}: fusing a Dask-backed cube did not stay lazy"
    blocks = lazy.data.numblocks[1] * lazy.data.numblocks[2]
    assert blocks > 1, f"{spec.name}/{backend}: the check needs several chunks; pass a larger cube or smaller chunks"

    out = fuse(holes, target, **kwargs)
    eager = out.values
    assert eager.dtype == np.float32, f"{spec.name}/{backend}: output dtype {eager.dtype}, not float32"
    assert not np.isinf(eager).any(), f"{spec.name}/{backend}: infinite values from NaN inputs"
    context = method_context(cube)
    prepared = spec.make_params(**dict(params or {}))
    prepared = spec.prepare(prepared, context, model=model) if spec.prepare is not None else prepared
    halo = int(spec.halo(prepared, context))
    far = _far_from_missing(holes, [*out.attrs["pairs"], out.attrs["target"]], halo)
    assert np.isfinite(eager[:, far]).all(), f"{spec.name}/{backend}: NaN beyond the halo of every missing input"
    _assert_close(lazy.values, eager, rtol, atol, f"{spec.name}/{backend}: chunked != unchunked")

    align = int(cube.attrs.get("coarse_factor") or 1) if spec.coarse_aligned else 1
    wider = dataclasses.replace(spec, halo=_WiderHalo(spec.halo, 2 * align if align > 1 else 2))
    widened = fuse(lazy_cube, target, **{**chunked, "method": wider}).values
    _assert_close(widened, eager, rtol, atol, f"{spec.name}/{backend}: a wider halo changes the result")

    if spec.padding_for(backend) != "none":
        _check_one_shape(spec, backend, holes, target, kwargs, eager, rtol, atol)

    if spec.resolve_backend(backend) != spec.reference:
        got = fuse(cube, target, **kwargs).values
        want = fuse(cube, target, **{**kwargs, "backend": spec.reference}).values
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{spec.name}/{backend}: NaN pattern")
        np.testing.assert_allclose(
            got, want, rtol=reference_rtol, atol=reference_atol, equal_nan=True,
            err_msg=f"{spec.name}/{backend} != {spec.reference} (the reference)",
        )
