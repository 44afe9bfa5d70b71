"""``stf.fuse_series``: fuse every coarse-only date of a cube into a resumable Zarr cube.

The output store is created first, from a lazy template (``to_zarr(compute=False)``: metadata,
coordinates and the per-date ``source`` variable, no chunk data), then filled region by region:
one region is one Zarr chunk ``(date, all bands, y block, x block)`` of one variable. Each region
task writes its chunk and then records itself under ``<store>/.stf_progress/``. A run that is
killed at any moment and started again with the same request skips the recorded regions and
rewrites the others (a region write is idempotent), so it ends with exactly the store an
uninterrupted run writes. Only when every region is recorded is the store marked complete
(attr ``stf_series_complete``) and the record removed.

Layout of the fused cube (the cube contract, DESIGN.md §1):

- ``time``: the dates with a fine observation plus the fused targets, in order;
- ``fine``: the observed fine image, or the fused prediction at the targets;
- ``coarse``: the input coarse image at every date (and ``fine_truth`` when the input has it);
- ``source`` ``(time,)``: ``"observed"`` or ``"fused"``;
- attrs: the input attrs plus ``stf_method``, ``stf_params`` (JSON), ``stf_tasks`` (JSON
  ``{target: [pairs]}``), ``stf_pipeline_version``, ``stf_series_request`` (a digest of the
  request, to refuse resuming a different one) and ``stf_series_complete``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dask
import dask.array as da
from dask.base import tokenize
import numpy as np
import xarray as xr

from stf_pipeline._atomic import atomic_directory, remove_directory
from stf_pipeline.cube import STORE_MARKER, STORE_VERSION, ZARR_FORMAT, validate_cube, with_valid_fractions
from stf_pipeline.exceptions import StoreError, TaskError
from stf_pipeline.fusion import fuse, method_context
from stf_pipeline.methods import get_method, params_to_attrs
from stf_pipeline.task import DateLike, Task, resolve_task, to_datetime64, valid_fraction

#: sub-directory of the store holding one empty file per written region while a run is open
PROGRESS_DIR = ".stf_progress"
#: sub-directory of the store where learned methods train (``stf.train(..., workdir=...)``)
TRAIN_DIR = ".stf_train"
COMPLETE_ATTR = "stf_series_complete"
REQUEST_ATTR = "stf_series_request"
DEFAULT_CHUNK = 512
#: side of the corner of every lazy input image hashed to fingerprint the data of a request
SAMPLE = 256
#: variables copied from the input cube at every output date (when present)
_COPIED = ("coarse", "fine_truth")


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything a series run writes, fixed before any work starts."""

    times: np.ndarray  # output dates, datetime64[ns]
    source: np.ndarray  # "observed" / "fused" per output date
    tasks: tuple[Task, ...]  # one per fused date
    chunks: tuple[int, int]  # store chunk (y, x)
    variables: tuple[str, ...]


def fuse_series(
    cube: xr.Dataset,
    *,
    method: str,
    out: str | os.PathLike[str],
    targets: Sequence[DateLike] | None = None,
    model: Any | None = None,
    pairs: Sequence[DateLike] | Mapping[Any, Sequence[DateLike]] | None = None,
    overwrite: bool = False,
    chunks: tuple[int, int] | None = None,
    progress: bool = True,
    train_options: Mapping[str, Any] | None = None,
    **params: Any,
) -> xr.Dataset:
    """Fuse every coarse-only date of ``cube`` (or ``targets``) into a fused cube store at ``out``.

    Runs on the current Dask scheduler (a ``distributed.Client`` when one is active, see
    :func:`stf_pipeline.cluster.start_cluster`). Calling it again with the same request after an
    interruption resumes: regions already written are not recomputed.

    Parameters
    ----------
    cube : xarray.Dataset
        Input cube (NumPy- or Dask-backed).
    method : str
        Registered method name (``delta``, ``starfm``, ``estarfm``, ``fsdaf``, ``stfdcnn``, ``biastf``).
    out : path-like
        Output Zarr store (a directory, ``*.zarr``).
    targets : sequence of date-like, optional
        Dates to fuse; default every date with coarse data and no fine data.
    model : FittedModel, optional
        Trained model for learned methods. If omitted for a learned method, the model is trained
        with ``stf.train(cube, method=method, workdir=<out>/.stf_train, **train_options)``, so a
        resumed run reuses (or resumes) that training.
    pairs : sequence of date-like, or mapping target -> sequence, optional
        Pair dates for every target, or per target; default the nearest pairs of each target.
    overwrite : bool, default False
        Replace an existing stf_pipeline store that holds a different request (another method,
        parameters, targets, chunks or input). A store of the same request is always resumed
        (or, when complete, returned as it is); a path that is not a stf_pipeline store is never
        overwritten.
    chunks : (int, int), optional
        Spatial chunk of the store and of the computation; default the cube's chunks, or 512.
        Rounded up to a multiple of ``coarse_factor`` for coarse-aligned methods.
    progress : bool, default True
        Show a progress bar (``distributed.progress`` under a client, Dask's bar otherwise).
    train_options : mapping, optional
        Keyword arguments for ``stf.train`` when the model is trained here; ``train_times``
        default to the cube's ``stf_train_times`` attr, else every date with fine data.
    **params
        Method parameters.

    Returns
    -------
    xarray.Dataset
        The complete fused cube, opened lazily from ``out``.

    Raises
    ------
    TaskError
        No target date, a target with all-NaN coarse data, or a target without pairs
        (raised before anything is written).
    StoreError
        ``out`` exists and is not a stf_pipeline store, or holds a different request and
        ``overwrite`` is False.
    MethodError
        Unknown method or parameters.

    Examples
    --------
    >>> fused = stf.fuse_series(cube, method="delta", out="fused.zarr")  # doctest: +SKIP
    >>> fused.source.values  # doctest: +SKIP
    array(['observed', 'fused', 'fused', 'observed'], dtype='<U8')
    """
    from stf_pipeline import __version__

    validate_cube(cube)
    spec = get_method(method)
    context = method_context(cube)
    p = spec.make_params(**params)
    if spec.prepare is not None:
        p = spec.prepare(p, context)
    cube = with_valid_fractions(cube)  # once, so resolving each target does not reread a lazy cube
    plan = _plan(cube, spec=spec, params=p, context=context, targets=targets, pairs=pairs, chunks=chunks)
    path = Path(out)
    if spec.learned and model is None:
        train_options = _default_train_options(cube, train_options)
    request = _request(cube, plan, method=spec.name, params=p, train_options=train_options, model=model)
    digest = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()
    attrs = {
        **{k: v for k, v in cube.attrs.items() if not k.startswith("stf_series")},
        STORE_MARKER: STORE_VERSION,
        "stf_method": spec.name,
        "stf_params": json.dumps(params_to_attrs(p), sort_keys=True),
        "stf_tasks": json.dumps(request["tasks"]),
        "stf_pipeline_version": __version__,
        REQUEST_ATTR: digest,
        COMPLETE_ATTR: False,
    }
    state = _store_state(path, digest, overwrite=overwrite)
    if state == "complete":
        _finalize(path)
        return xr.open_zarr(path, consolidated=True, decode_coords="all")
    if state == "new":
        _create_store(cube, plan, path, attrs)
    if spec.learned and model is None:
        from stf_pipeline.training import train

        model = train(cube, method=spec.name, workdir=path / TRAIN_DIR, **dict(train_options or {}))
    writes = _region_writes(cube, plan, path, digest, method=spec.name, model=model, params=params)
    _compute(writes, progress=progress)
    missing = _expected_regions(plan, cube) - _done_regions(path)
    if missing:
        raise StoreError(
            f"{len(missing)} region(s) of {path} were not recorded as written (e.g. {sorted(missing)[0]}); "
            "run stf.fuse_series again with the same arguments to resume."
        )
    _zarr_group(path, mode="r+").attrs[COMPLETE_ATTR] = True
    _finalize(path)
    return xr.open_zarr(path, consolidated=True, decode_coords="all")


def _zarr_group(path: Path, *, mode: str = "r") -> Any:
    """Open the root group of a store without consolidated metadata (the attrs as on disk)."""
    import zarr

    return zarr.open_group(str(path), mode=mode, use_consolidated=False, zarr_format=ZARR_FORMAT)


def _plan(
    cube: xr.Dataset,
    *,
    spec: Any,
    params: Any,
    context: Any,
    targets: Sequence[DateLike] | None,
    pairs: Sequence[DateLike] | Mapping[Any, Sequence[DateLike]] | None,
    chunks: tuple[int, int] | None,
) -> _Plan:
    times = cube["time"].values.astype("datetime64[ns]")
    fine_ok = valid_fraction(cube, "fine") > 0
    coarse_ok = valid_fraction(cube, "coarse") > 0
    if targets is None:
        chosen = times[coarse_ok & ~fine_ok]
        if chosen.size == 0:
            raise TaskError(
                "the cube has no coarse-only date to fuse (every date with coarse data also has fine data); "
                "pass targets=[...] to fuse chosen dates."
            )
    else:
        chosen = np.unique(np.asarray([to_datetime64(t) for t in targets], dtype="datetime64[ns]"))
        if chosen.size == 0:
            raise TaskError("targets is empty; pass at least one date, or targets=None for every coarse-only date.")
    per_target: Mapping[np.datetime64, Sequence[DateLike] | None]
    if isinstance(pairs, Mapping):
        per_target = {to_datetime64(k): v for k, v in pairs.items()}
        unknown = sorted(_iso(t) for t in set(per_target) - set(chosen))
        if unknown:
            raise TaskError(f"pairs given for {unknown}, which are not targets; give pairs only for target dates.")
    else:
        per_target = {t: pairs for t in chosen}
    tasks = tuple(resolve_task(cube, t, pairs=per_target.get(t), n_pairs=spec.n_pairs) for t in chosen)
    observed = times[fine_ok & ~np.isin(times, chosen)]
    out_times = np.sort(np.concatenate([observed, chosen]))
    source = np.where(np.isin(out_times, chosen), "fused", "observed")
    halo = int(spec.halo(params, context))
    align = context.coarse_factor if spec.coarse_aligned and context.coarse_factor else 1
    if chunks is None:
        data = cube["fine"].data
        chunks = (data.chunks[2][0], data.chunks[3][0]) if isinstance(data, da.Array) else (DEFAULT_CHUNK,) * 2
    size = tuple(min(_round_up(max(int(c), halo, 1), align), int(n)) for c, n in zip(chunks, cube["fine"].shape[2:]))
    variables = ("fine", *[v for v in _COPIED if v in cube.data_vars])
    return _Plan(times=out_times, source=source, tasks=tasks, chunks=size, variables=variables)  # type: ignore[arg-type]


def _default_train_options(cube: xr.Dataset, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``train_times`` default to the cube's ``stf_train_times`` attr, else every date with fine data."""
    options = dict(options or {})
    if "train_times" not in options:
        listed = [str(t) for t in cube.attrs.get("stf_train_times") or []]
        fine_ok = valid_fraction(cube, "fine") > 0
        options["train_times"] = listed or [_iso(t) for t in cube["time"].values[fine_ok]]
    return options


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _iso(t: np.datetime64) -> str:
    return str(np.datetime_as_string(t, unit="D"))


def _request(
    cube: xr.Dataset, plan: _Plan, *, method: str, params: Any, train_options: Any, model: Any
) -> dict[str, Any]:
    """What defines the store's content: the same request resumes, another one is refused."""
    grid = hashlib.sha256()
    for dim in ("y", "x"):
        grid.update(np.ascontiguousarray(cube[dim].values, dtype=np.float64).tobytes())
    return {
        "method": method,
        "params": params_to_attrs(params),
        "tasks": {_iso(t.target): [_iso(p) for p in t.pairs] for t in plan.tasks},
        "times": [_iso(t) for t in plan.times],
        "bands": [str(b) for b in cube["band"].values],
        "shape": [int(s) for s in cube["fine"].shape],
        "grid": grid.hexdigest(),
        "chunks": list(plan.chunks),
        "variables": list(plan.variables),
        "train_options": json.loads(json.dumps(dict(train_options or {}), default=str)),
        "model": None if model is None else type(model).__name__,
        "data": _data_token(cube, plan),
    }


def _data_token(cube: xr.Dataset, plan: _Plan) -> str:
    """Fingerprint of the input data: a hash of the top-left ``SAMPLE x SAMPLE`` pixels of every
    image (for a lazy cube, one chunk read per date and variable). The same data, in memory or
    rewritten to a new store, is the same request and resumes; another scene on the same grid
    and dates is not. A change confined to the rest of the scene is not detected."""
    corners = [cube[v].data[..., :SAMPLE, :SAMPLE] for v in ("fine", *plan.variables[1:])]
    if any(isinstance(a, da.Array) for a in corners):
        corners = list(dask.compute(*corners))
    return tokenize(*(np.ascontiguousarray(a, dtype=np.float32) for a in corners))


def _store_state(path: Path, digest: str, *, overwrite: bool) -> str:
    """``"new"`` (create it), ``"resume"`` or ``"complete"``; refuse anything that is not ours."""
    if not path.exists() and not path.is_symlink():
        return "new"
    try:
        attrs = _zarr_group(path).attrs.asdict()
    except Exception:  # not a Zarr group at all
        attrs = None
    if attrs is None or STORE_MARKER not in attrs:
        raise StoreError(
            f"{path} exists and is not a stf_pipeline store; refusing to touch it. "
            "Choose another out= path or remove it yourself."
        )
    if attrs.get(REQUEST_ATTR) == digest:
        return "complete" if attrs.get(COMPLETE_ATTR) else "resume"
    if not overwrite:
        raise StoreError(
            f"{path} holds another fused series or cube (method {attrs.get('stf_method')!r}, tasks "
            f"{attrs.get('stf_tasks')}); pass overwrite=True to replace it, or choose another out= path."
        )
    remove_directory(path)
    return "new"


def _template(cube: xr.Dataset, plan: _Plan, attrs: Mapping[str, Any]) -> xr.Dataset:
    sub = cube.sel(time=plan.times)
    n_bands, height, width = (int(s) for s in cube["fine"].shape[1:])
    chunk = (1, n_bands, *plan.chunks)
    data_vars = {}
    for name in plan.variables:
        lazy = da.zeros((plan.times.size, n_bands, height, width), chunks=chunk, dtype=np.float32)
        var_attrs = {k: v for k, v in cube[name].attrs.items()}
        data_vars[name] = xr.Variable(("time", "band", "y", "x"), lazy, attrs=var_attrs)
    data_vars["source"] = xr.Variable(
        ("time",), plan.source.astype("<U8"), attrs={"description": "observed: fine observation; fused: prediction"}
    )
    coords = {name: coord.variable for name, coord in sub.coords.items() if not name.endswith("_valid")}
    coords["coarse_valid"] = xr.Variable(("time",), valid_fraction(sub, "coarse"))
    return xr.Dataset(data_vars, coords=coords, attrs=dict(attrs))


def _create_store(cube: xr.Dataset, plan: _Plan, path: Path, attrs: Mapping[str, Any]) -> None:
    """Write the template's metadata into a temporary store, then rename it into place."""
    template = _template(cube, plan, attrs)
    for var in template.variables.values():
        var.encoding = {}
    chunk = (1, template.sizes["band"], *plan.chunks)
    encoding = {name: {"chunks": chunk, "dtype": "float32"} for name in plan.variables}
    with atomic_directory(path) as tmp:
        template.to_zarr(tmp, mode="w", compute=False, consolidated=True, zarr_format=ZARR_FORMAT, encoding=encoding)
        (tmp / PROGRESS_DIR).mkdir()


def _region_name(var: str, t: int, iy: int, ix: int) -> str:
    return f"{var}.{t}.{iy}.{ix}"


def _blocks(length: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, length)) for start in range(0, length, size)]


def _expected_regions(plan: _Plan, cube: xr.Dataset) -> set[str]:
    ny = len(_blocks(cube.sizes["y"], plan.chunks[0]))
    nx = len(_blocks(cube.sizes["x"], plan.chunks[1]))
    return {
        _region_name(v, t, iy, ix)
        for v in plan.variables
        for t in range(plan.times.size)
        for iy in range(ny)
        for ix in range(nx)
    }


def _done_regions(path: Path) -> set[str]:
    progress = path / PROGRESS_DIR
    return set(os.listdir(progress)) if progress.is_dir() else set()


def _write_region(block: np.ndarray, store: str, var: str, t: int, iy: int, ix: int, ys: slice, xs: slice) -> None:
    """Write one chunk, then record it (the record exists only once the chunk is on disk).

    All-NaN chunks are written too: a cube store holds every chunk, so a missing chunk file
    always means damage (see :func:`stf_pipeline.open_cube`).
    """
    import zarr

    array = zarr.open_array(f"{store}/{var}", mode="r+", zarr_format=ZARR_FORMAT)
    array = array.with_config({"write_empty_chunks": True})
    array[t, :, ys, xs] = np.asarray(block, dtype=np.float32)
    Path(store, PROGRESS_DIR, _region_name(var, t, iy, ix)).touch()


def _source_array(
    cube: xr.Dataset, plan: _Plan, var: str, t_index: int, *, method: str, model: Any, params: Mapping[str, Any]
) -> da.Array:
    """The lazy ``(band, y, x)`` image stored at output date ``t_index`` of ``var``."""
    date = plan.times[t_index]
    if var == "fine" and plan.source[t_index] == "fused":
        task = next(t for t in plan.tasks if t.target == date)
        data = fuse(
            cube, date, method=method, pairs=list(task.pairs), model=model, chunks=plan.chunks, **params
        ).data
    else:
        data = cube[var].sel(time=date).data
    chunk = (data.shape[0], *plan.chunks)
    data = data.rechunk(chunk) if isinstance(data, da.Array) else da.from_array(data, chunks=chunk)
    return data.astype(np.float32)


def _region_writes(
    cube: xr.Dataset, plan: _Plan, path: Path, digest: str, *, method: str, model: Any, params: Mapping[str, Any]
) -> list[Any]:
    """One delayed write per region not yet recorded (recorded ones are not even computed)."""
    done = _done_regions(path)
    token = tokenize(str(path.resolve()), digest)
    height, width = cube.sizes["y"], cube.sizes["x"]
    yblocks, xblocks = _blocks(height, plan.chunks[0]), _blocks(width, plan.chunks[1])
    writes = []
    for var in plan.variables:
        for t in range(plan.times.size):
            todo = [
                (iy, ix)
                for iy in range(len(yblocks))
                for ix in range(len(xblocks))
                if _region_name(var, t, iy, ix) not in done
            ]
            if not todo:
                continue
            blocks = _source_array(cube, plan, var, t, method=method, model=model, params=params).to_delayed()
            for iy, ix in todo:
                writes.append(
                    dask.delayed(_write_region)(
                        blocks[0, iy, ix], str(path), var, t, iy, ix, yblocks[iy], xblocks[ix],
                        dask_key_name=f"stf-write-{token}-{_region_name(var, t, iy, ix)}",
                    )
                )
    return writes


def _compute(writes: list[Any], *, progress: bool) -> None:
    if not writes:
        return
    client = _current_client()
    if client is not None:
        futures = client.compute(writes)
        if progress:
            from distributed import progress as show_progress

            show_progress(futures)
        client.gather(futures)
        return
    if progress:
        from dask.diagnostics import ProgressBar

        # on a terminal the bar redraws in place; in a log file each redraw is text, so redraw rarely
        with ProgressBar(dt=0.1 if sys.stdout.isatty() else 15.0):
            dask.compute(*writes)
    else:
        dask.compute(*writes)


def _current_client() -> Any | None:
    try:
        from distributed import default_client
    except ImportError:  # pragma: no cover - distributed is a dependency
        return None
    try:
        return default_client()
    except ValueError:
        return None


def _finalize(path: Path) -> None:
    """Drop the progress record of a store marked complete and consolidate its metadata.

    Idempotent: a run killed half-way through it is finished by the next call.
    """
    import zarr

    progress = path / PROGRESS_DIR
    if progress.exists():
        shutil.rmtree(progress)
    with warnings.catch_warnings():
        # the training folder of a learned method lives in the store on purpose (resumed and replaced with it)
        warnings.filterwarnings("ignore", message=f"Object at {re.escape(TRAIN_DIR)} is not recognized")
        zarr.consolidate_metadata(str(path), zarr_format=ZARR_FORMAT)
