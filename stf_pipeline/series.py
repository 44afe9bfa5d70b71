"""``stf.fuse_series``: fuse every coarse-only date of a cube into a resumable Zarr cube.

The output store is created first, from a lazy template (``to_zarr(compute=False)``: metadata,
coordinates and the per-date provenance, no chunk data), then filled region by region: one
region is one Zarr chunk ``(date, all bands, y block, x block)`` of one variable. Each region
task writes its chunk and then records itself under ``<store>/.stf_progress/``. A run that is
killed at any moment and started again with the same request skips the recorded regions and
rewrites the others (a region write is idempotent), so it ends with exactly the store an
uninterrupted run writes. Only when every region is recorded is the store marked complete
(attr ``stf_series_complete``) and the record removed.

What keeps it from losing or mixing data (see :mod:`stf_pipeline.store`): the whole call holds
the store's writer lock; it refuses to write over a store its input is read from; the request
(``stf_series_request``) is a digest of the full content of every input image it reads (hashed
chunk by chunk), the method and all parameters, the dates, the layout and the model's weights,
and a resumed or rerun call must match it part by part (``stf_series_parts``), else it is told
what changed. Regions are computed in batches of one date and one tile of a few compute
blocks per worker (:func:`tile_blocks`), each fused from its own window of the input, so memory
depends on the chunk size and the worker count, not the scene.

Layout of the fused cube (the cube contract, DESIGN.md §1, without ``coarse`` unless kept):

- ``time``: the dates with a fine observation plus the fused targets, in order;
- ``fine``: the observed fine image, or the fused prediction at the targets;
- ``coarse``, ``fine_truth``: only when asked for (``keep=``);
- provenance ``(time,)``: ``source`` (``"observed"`` or ``"fused"``), ``fusion_method``,
  ``fusion_pairs`` (ISO dates joined by ``,``) and ``model_digest`` (empty for observed dates);
- coords: ``y``/``x``, the CRS (``spatial_ref``), ``coarse_valid``;
- attrs: the input attrs plus ``stf_method``, ``stf_params`` (JSON), ``stf_tasks`` (JSON
  ``{target: [pairs]}``), ``stf_pipeline_version``, ``stf_series_request``,
  ``stf_series_parts`` and ``stf_series_complete``.

A learned method without a ``model`` is trained first into ``model_dir`` (default
``<out>.model`` beside the store: checkpoints, ``model/``, ``history.json``,
``loss_curves.png``), which a resumed run reuses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import dask
import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize

from stf_pipeline._atomic import atomic_directory
from stf_pipeline.cube import (
    DIMS,
    STORE_MARKER,
    STORE_VERSION,
    ZARR_FORMAT,
    cf_georeferenced,
    chunk_encoding,
    coord_encoding,
    open_store,
    quiet_zarr,
    remove_litter,
    resolve_store_path,
    strings_as_objects,
    validate_cube,
    with_valid_fractions,
)
from stf_pipeline.exceptions import CubeError, StoreError, TaskError
from stf_pipeline.fusion import FusionCall, method_context, prepare_fusion, require_coarse
from stf_pipeline.methods import get_method, params_to_attrs
from stf_pipeline.parallel import plan_chunks
from stf_pipeline.progress import DaskProgress, Progress
from stf_pipeline.store import (
    DirectCodec,
    WriterLock,
    check_not_an_input,
    checked_reader,
    chunk_key,
    content_digest,
    input_stores,
    model_digest,
    new_generation,
    recorded_digests,
    remove_partial_files,
)
from stf_pipeline.task import DateLike, Task, has_valid, iso_date, resolve_task, to_datetime64, valid_fraction

logger = logging.getLogger("stf_pipeline")

#: sub-directory of the store holding one empty file per written region while a run is open
PROGRESS_DIR = ".stf_progress"
COMPLETE_ATTR = "stf_series_complete"
REQUEST_ATTR = "stf_series_request"
PARTS_ATTR = "stf_series_parts"
#: file in ``model_dir`` naming the training request its model belongs to
MODEL_REQUEST_FILE = ".stf_train_request"
DEFAULT_CHUNK = 512
#: compute blocks per worker in one tile (a batch computed before the next one is built)
BLOCKS_PER_WORKER = 2
#: fused dates with the same pairs in one batch: the pairs' images of a tile are read once for them
DATES_PER_BATCH = 4
#: variables of the input cube a fused store may keep besides ``fine``
KEEPABLE = ("coarse", "fine_truth")
#: what each part of the request means, for the message when one changed
_PART_NAMES = {
    "data": "input data",
    "params": "method or parameters",
    "model": "model",
    "dates": "targets, pairs or dates",
    "layout": "bands, grid, chunks or kept variables",
}


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
    keep: Sequence[str] = (),
    model_dir: str | os.PathLike[str] | None = None,
    train_options: Mapping[str, Any] | None = None,
    **params: Any,
) -> xr.Dataset:
    """Fuse every coarse-only date of ``cube`` (or ``targets``) into a fused cube store at ``out``.

    Runs on the current Dask scheduler (a ``distributed.Client`` when one is active, see
    :func:`stf_pipeline.cluster.start_cluster`). Calling it again with the same request after an
    interruption resumes: regions already written are not recomputed; on a complete store it
    only checks the request and returns the store ("reusing").

    Parameters
    ----------
    cube : xarray.Dataset
        Input cube (NumPy- or Dask-backed). It must not be read from ``out``.
    method : str
        Registered method name (``delta``, ``starfm``, ``estarfm``, ``fsdaf``, ``stfdcnn``, ``biastf``).
    out : path-like
        Output Zarr store (a directory, ``*.zarr``).
    targets : sequence of date-like, optional
        Dates to fuse; default every date with coarse data and no fine data.
    model : FittedModel, optional
        Trained model for learned methods. If omitted for a learned method, the model is trained
        with ``stf.train(cube, method=method, workdir=model_dir, **train_options)``, so a
        resumed run reuses (or resumes) that training.
    pairs : sequence of date-like, or mapping target -> sequence, optional
        Pair dates for every target, or per target; default the nearest pairs of each target.
    overwrite : bool, default False
        Replace an existing stf_pipeline store (and the trained model in ``model_dir``) that holds
        a different request. A store of the same request is always resumed (or, when complete,
        returned as it is); a path that is not a stf_pipeline store is never overwritten.
    chunks : (int, int), optional
        Spatial chunk of the store and of the computation; default the cube's chunks, or 512.
        Rounded up to a multiple of ``coarse_factor`` for coarse-aligned methods.
    progress : bool, default True
        Show progress: a bar in a terminal or Jupyter, periodic log lines elsewhere
        (:class:`stf_pipeline.progress.Progress`).
    keep : sequence of {"coarse", "fine_truth"}, default ()
        Input variables to copy into the store at every output date besides ``fine``.
    model_dir : path-like, optional
        Where a learned method's model is trained: checkpoints, ``model/`` and
        ``loss_curves.png``. Default ``<out>.model`` beside the store (``.zarr`` replaced).
    train_options : mapping, optional
        Keyword arguments for ``stf.train`` when the model is trained here; ``train_times``
        default to the cube's ``stf_train_times`` attr, else every date with fine data.
    **params
        Method parameters, and ``backend=`` as for :func:`stf_pipeline.fuse`. The backend is part
        of the request: resuming with another backend is refused ("method or parameters
        changed"); ``"auto"`` is the same request as the backend it resolves to.

    Returns
    -------
    xarray.Dataset
        The complete fused cube, opened lazily from ``out`` with checked reads. Its
        ``encoding["stf_action"]`` says what this call did: ``"fused"``, ``"resumed"`` or
        ``"reused"``.

    Raises
    ------
    TaskError
        No target date, a target with all-NaN coarse data, or a target without pairs
        (raised before anything is written).
    CubeError
        The cube breaks the contract (values included, on a sample), has no ``coarse`` (a fused
        store), or ``keep`` names a variable it does not have.
    StoreError
        ``out`` exists and is not a stf_pipeline store, holds a different request (the message
        says what changed) and ``overwrite`` is False, is being written by another process, or
        is a store the cube is read from.
    MethodError
        Unknown method or parameters.

    Examples
    --------
    >>> fused = stf.fuse_series(cube, method="delta", out="fused.zarr")  # doctest: +SKIP
    >>> fused.source.values  # doctest: +SKIP
    array(['observed', 'fused', 'fused', 'observed'], dtype=object)
    """
    from stf_pipeline import __version__

    validate_cube(cube, check_values=True)
    require_coarse(cube, what="stf.fuse_series")
    spec = get_method(method)
    context = method_context(cube)
    # the backend ``auto`` resolves to is what fuses, so it is what the request records
    params = {**params, "backend": spec.resolve_backend(str(params.get("backend", "auto")))}
    p = spec.make_params(**{name: value for name, value in params.items() if name != "backend"})
    if spec.prepare is not None:
        p = spec.prepare(p, context)
    keep = _check_keep(cube, keep)
    path = resolve_store_path(out)
    model_path = Path(model_dir) if model_dir is not None else default_model_dir(path)
    sources = input_stores(cube)
    check_not_an_input(path, sources, what="fuse_series")
    if spec.learned and model is None:
        check_not_an_input(model_path, sources, what="fuse_series (training)")
    cube = with_valid_fractions(cube)  # once, so resolving each target does not reread a lazy cube
    plan = _plan(cube, spec=spec, params=p, context=context, targets=targets, pairs=pairs, chunks=chunks, keep=keep)
    if spec.learned and model is None:
        train_options = _default_train_options(cube, train_options)
    with WriterLock(path, action="fuse_series"):
        remove_litter(path)
        start = time.perf_counter()
        data = _data_digest(cube, plan)
        logger.debug("fingerprint of the input data: %.2f s", time.perf_counter() - start)
        parts = _request_parts(
            cube, plan, method=spec.name, params=p, backend=params["backend"], train_options=train_options,
            model=model, data=data,
        )
        digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
        state = _store_state(path, digest, parts, overwrite=overwrite)
        if state == "complete":
            logger.info("reusing %s (complete, same request)", path)
            _finalize(path)
            return _opened(path, "reused")
        if spec.learned and model is None:
            model = _train_here(cube, spec.name, model_path, train_options or {}, data=data, overwrite=overwrite)
        digest_of_model = "" if model is None else model_digest(model)
        if state == "new":
            attrs = {
                **{k: v for k, v in cube.attrs.items() if not k.startswith("stf_series")},
                STORE_MARKER: STORE_VERSION,
                "stf_method": spec.name,
                "stf_params": json.dumps(params_to_attrs(p), sort_keys=True),
                "stf_tasks": json.dumps({iso_date(t.target): [iso_date(q) for q in t.pairs] for t in plan.tasks}),
                "stf_pipeline_version": __version__,
                REQUEST_ATTR: digest,
                PARTS_ATTR: json.dumps(parts, sort_keys=True),
                COMPLETE_ATTR: False,
            }
            _create_store(cube, plan, path, attrs, method=spec.name, model_digest=digest_of_model)
        else:
            _check_model_provenance(path, digest_of_model)
        writes, total = _region_writes(cube, plan, path, digest, method=spec.name, model=model, params=params)
        action = "fused" if state == "new" else "resumed"
        if state == "resume":
            logger.info("resuming %s: %d of %d regions left", path, total, len(_expected_regions(plan, cube)))
        else:
            logger.info("fusing with %s -> %s (%d regions)", spec.name, path, total)
        _compute(writes, total=total, progress=progress, desc=f"fuse_series {spec.name} -> {path.name}")
        missing = _expected_regions(plan, cube) - _done_regions(path)
        if missing:
            raise StoreError(
                f"{len(missing)} region(s) of {path} were not recorded as written (e.g. {sorted(missing)[0]}); "
                "run stf.fuse_series again with the same arguments to resume."
            )
        remove_partial_files(path)  # of chunk writes on a worker killed mid-run (its task ran again elsewhere)
        _zarr_group(path, mode="r+").attrs[COMPLETE_ATTR] = True
        _finalize(path)
    return _opened(path, action)


def _opened(path: Path, action: str) -> xr.Dataset:
    fused = open_store(path)
    fused.encoding["stf_action"] = action
    return fused


def _check_keep(cube: xr.Dataset, keep: Sequence[str]) -> tuple[str, ...]:
    if isinstance(keep, str):
        keep = (keep,)
    keep = tuple(dict.fromkeys(str(k) for k in keep))
    for name in keep:
        if name not in KEEPABLE:
            raise CubeError(f"keep={keep!r}: {name!r} cannot be kept; choose from {KEEPABLE} (fine is always stored).")
        if name not in cube.data_vars:
            raise CubeError(
                f"keep={keep!r}: the cube has no data variable {name!r}; keep only variables the cube has "
                f"({sorted(str(v) for v in cube.data_vars if v in KEEPABLE)})."
            )
    return keep


def default_model_dir(path: Path) -> Path:
    """Where ``fuse_series`` trains a learned method's model for the store ``path``: ``<out>.model`` beside it."""
    return path.with_suffix(".model") if path.suffix else path.with_name(path.name + ".model")


def _train_here(
    cube: xr.Dataset, method: str, model_dir: Path, options: Mapping[str, Any], *, data: str, overwrite: bool
) -> Any:
    """Train (or resume training, or reuse) the model of ``method`` in ``model_dir``, under its lock.

    ``model_dir`` records the training request (data, method, options); another request's
    model directory is replaced only with ``overwrite``.
    """
    from stf_pipeline.training import train

    request = hashlib.sha256(
        json.dumps({"method": method, "data": data, "options": json.loads(json.dumps(dict(options), default=str))},
                   sort_keys=True).encode()
    ).hexdigest()
    model_dir = resolve_store_path(model_dir)
    with WriterLock(model_dir, action="stf.train"):
        remove_litter(model_dir)
        marker = model_dir / MODEL_REQUEST_FILE
        if model_dir.exists():
            recorded = marker.read_text().strip() if marker.is_file() else None
            if recorded is None:
                raise StoreError(
                    f"{model_dir} exists and is not a model directory of stf.fuse_series; refusing to train into "
                    "it. Pass model_dir= another path, or remove it yourself."
                )
            if recorded != request:
                if not overwrite:
                    raise StoreError(
                        f"{model_dir} holds a model trained for another request (other data, method or "
                        "train_options); pass overwrite=True (--overwrite) to retrain it, or model_dir= another path."
                    )
                shutil.rmtree(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(request)
        logger.info("training %s in %s", method, model_dir)
        return train(cube, method=method, workdir=model_dir, **dict(options))


def _check_model_provenance(path: Path, digest_of_model: str) -> None:
    """A resumed run must predict with the model the store was started with."""
    recorded = {str(v) for v in np.asarray(_zarr_group(path)["model_digest"][:]).tolist()} - {""}
    if recorded and recorded != {digest_of_model}:
        raise StoreError(
            f"{path} was started with another model (weights digest {sorted(recorded)[0][:12]}..., now "
            f"{digest_of_model[:12]}...); resuming would mix the two. Pass overwrite=True (--overwrite) to start "
            "again, or choose another out= path."
        )


def _zarr_group(path: Path, *, mode: Literal["r", "r+"] = "r") -> Any:
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
    keep: tuple[str, ...],
) -> _Plan:
    times = cube["time"].values.astype("datetime64[ns]")
    fine_ok = has_valid(cube, "fine")
    coarse_ok = has_valid(cube, "coarse")
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
        unknown = sorted(iso_date(t) for t in set(per_target) - set(chosen))
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
    shape = cube["fine"].shape[2:]
    size = tuple(min(_round_up(max(int(c), halo, 1), align), int(n)) for c, n in zip(chunks, shape, strict=True))
    return _Plan(times=out_times, source=source, tasks=tasks, chunks=size, variables=("fine", *keep))  # type: ignore[arg-type]


def _default_train_options(cube: xr.Dataset, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``train_times`` default to the cube's ``stf_train_times`` attr, else every date with fine data."""
    options = dict(options or {})
    if "train_times" not in options:
        listed = [str(t) for t in cube.attrs.get("stf_train_times") or []]
        fine_ok = has_valid(cube, "fine")
        options["train_times"] = listed or [iso_date(t) for t in cube["time"].values[fine_ok]]
    return options


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _inputs(cube: xr.Dataset, plan: _Plan) -> dict[str, Any]:
    """Every input image the store's content depends on, as ``{"var@date": (band, y, x) array}``."""
    return {label: cube[name].sel(time=t).data for label, (name, t) in _input_images(plan).items()}


def _input_images(plan: _Plan) -> dict[str, tuple[str, np.datetime64]]:
    """The images of :func:`_inputs`: ``{"var@date": (variable, date)}``."""
    needed: dict[str, set[np.datetime64]] = {"fine": set(), "coarse": set()}
    for t, kind in zip(plan.times, plan.source, strict=True):
        if kind == "observed":
            needed["fine"].add(t)
    for task in plan.tasks:
        needed["coarse"].add(task.target)
        needed["fine"].update(task.pairs)
        needed["coarse"].update(task.pairs)
    for name in plan.variables[1:]:
        needed.setdefault(name, set()).update(plan.times)
    return {f"{name}@{iso_date(t)}": (name, t) for name, dates in needed.items() for t in sorted(dates)}


def _data_digest(cube: xr.Dataset, plan: _Plan) -> str:
    """Digest of the full content of every input image the output depends on (see
    :func:`stf_pipeline.store.content_digest`): the same values, in memory or in any store and
    chunking, are the same data; a change of any pixel is another. Images of a cube store read
    as stored, in chunks of the plan's, take the digests the store recorded for their chunks
    (:func:`_recorded_inputs`) instead of being read."""
    blocks = (cube.sizes["band"], *plan.chunks)
    return content_digest(_inputs(cube, plan), blocks, known=_recorded_inputs(cube, plan, blocks))


def _recorded_inputs(cube: xr.Dataset, plan: _Plan, blocks: tuple[int, ...]) -> dict[str, list[bytes]]:
    """Block digests of the input images (:func:`_input_images`) that a cube store recorded when
    it was written (:func:`stf_pipeline.store.recorded_digests`): those whose variable is read
    exactly as stored (:func:`~stf_pipeline.store.checked_reader`), one chunk per date holding all
    bands and the plan's spatial chunks, so that each block of the digest is one stored chunk."""
    known: dict[str, list[bytes]] = {}
    position = {date: i for i, date in enumerate(cube["time"].values.astype("datetime64[ns]"))}
    for label, (name, date) in _input_images(plan).items():
        variable = cube[name]
        reader = checked_reader(variable.data)
        if reader is None or variable.dims != DIMS or reader.chunks != (1, *blocks):
            continue
        t = position[date]
        ny, nx = (-(-variable.sizes[dim] // size) for dim, size in zip(("y", "x"), blocks[1:], strict=True))
        keys = [chunk_key((t, 0, iy, ix)) for iy in range(ny) for ix in range(nx)]
        digests = recorded_digests(reader, keys)
        if digests is not None:
            known[label] = digests
    return known


def _request_parts(
    cube: xr.Dataset, plan: _Plan, *, method: str, params: Any, backend: str, train_options: Any, model: Any,
    data: str,
) -> dict[str, str]:
    """What defines the store's content, by part: the same request resumes, another one is refused
    with the parts that differ named. ``backend`` is the resolved one (never ``"auto"``): backends
    agree only to a tolerance, so a store is resumed only by the backend that began it, and
    ``"auto"`` is the same request as the backend it resolves to on this machine."""
    grid = hashlib.sha256()
    for dim in ("y", "x"):
        grid.update(np.ascontiguousarray(cube[dim].values, dtype=np.float64).tobytes())

    def digest(value: Any) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()

    return {
        "data": data,
        "params": digest(
            {"method": method, "params": params_to_attrs(params), "backend": backend,
             "train_options": json.loads(json.dumps(dict(train_options or {}), default=str))}
        ),
        "model": "" if model is None else model_digest(model),
        "dates": digest(
            {"tasks": {iso_date(t.target): [iso_date(p) for p in t.pairs] for t in plan.tasks},
             "times": [iso_date(t) for t in plan.times]}
        ),
        "layout": digest(
            {"bands": [str(b) for b in cube["band"].values], "shape": [int(s) for s in cube["fine"].shape],
             "grid": grid.hexdigest(), "chunks": list(plan.chunks), "variables": list(plan.variables)}
        ),
    }


def _store_state(path: Path, digest: str, parts: Mapping[str, str], *, overwrite: bool) -> str:
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
        try:
            recorded = json.loads(attrs.get(PARTS_ATTR) or "{}")
        except ValueError:
            recorded = {}
        changed = [_PART_NAMES[k] for k in _PART_NAMES if recorded and recorded.get(k) != parts.get(k)]
        what = f"the {', the '.join(changed)} changed" if changed else "it was written by another request or tool"
        raise StoreError(
            f"{path} holds another fused series or cube (method {attrs.get('stf_method')!r}): {what}. "
            "Pass overwrite=True (--overwrite) to replace it, or choose another out= path."
        )
    return "new"


def _template(cube: xr.Dataset, plan: _Plan, attrs: Mapping[str, Any], *, method: str, model_digest: str) -> xr.Dataset:
    sub = cube.sel(time=plan.times)
    n_bands, height, width = (int(s) for s in cube["fine"].shape[1:])
    chunk = (1, n_bands, *plan.chunks)
    data_vars = {}
    for name in plan.variables:
        lazy = da.zeros((plan.times.size, n_bands, height, width), chunks=chunk, dtype=np.float32)
        var_attrs = {k: v for k, v in cube[name].attrs.items()}
        data_vars[name] = xr.Variable(("time", "band", "y", "x"), lazy, attrs=var_attrs)
    fused = plan.source == "fused"
    pairs = {t.target: ",".join(iso_date(p) for p in t.pairs) for t in plan.tasks}
    provenance = {
        "source": (plan.source, "observed: fine observation; fused: prediction"),
        "fusion_method": (np.where(fused, method, ""), "method that fused the date (empty: observed)"),
        "fusion_pairs": (
            np.asarray([pairs.get(t, "") for t in plan.times]), "pair dates of the fusion (ISO, comma-separated)"
        ),
        "model_digest": (np.where(fused, model_digest, ""), "SHA-256 of the trained model's weights (learned methods)"),
    }
    for name, (values, description) in provenance.items():
        data_vars[name] = xr.Variable(("time",), np.asarray(values, dtype=object), attrs={"description": description})
    coords = {name: coord.variable for name, coord in sub.coords.items() if not str(name).endswith("_valid")}
    coords["coarse_valid"] = xr.Variable(("time",), valid_fraction(sub, "coarse"))
    return strings_as_objects(xr.Dataset(data_vars, coords=coords, attrs=dict(attrs)))


def _create_store(
    cube: xr.Dataset, plan: _Plan, path: Path, attrs: Mapping[str, Any], *, method: str, model_digest: str
) -> None:
    """Write the template's metadata into a temporary store, then swap it into place."""
    template = cf_georeferenced(_template(cube, plan, attrs, method=method, model_digest=model_digest))
    chunk = (1, template.sizes["band"], *plan.chunks)
    encoding = coord_encoding() | {name: {**chunk_encoding(chunk), "dtype": "float32"} for name in plan.variables}
    with atomic_directory(path) as tmp, quiet_zarr():
        template.to_zarr(tmp, mode="w", compute=False, consolidated=True, zarr_format=ZARR_FORMAT, encoding=encoding)
        (tmp / PROGRESS_DIR).mkdir()
        new_generation(tmp, attrs[REQUEST_ATTR])


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

    values = np.asarray(block, dtype=np.float32)
    codec = DirectCodec.of(Path(store), var)
    index = (t, 0, iy, ix)
    if codec is not None and len(codec.shape) == 4 and codec.extent(index) == (
        slice(t, t + 1), slice(0, values.shape[0]), ys, xs
    ):  # the region is one whole chunk: encoded here, not through Zarr's event loop
        codec.write(codec.path(Path(store), var, index), values[None])
    else:
        array = zarr.open_array(f"{store}/{var}", mode="r+", zarr_format=ZARR_FORMAT)
        array = array.with_config({"write_empty_chunks": True})
        array[t, :, ys, xs] = values
    Path(store, PROGRESS_DIR, _region_name(var, t, iy, ix)).touch()


@dataclasses.dataclass(frozen=True)
class _Span:
    """One axis of a tile: pixels ``start:stop``, the scene's compute blocks in it, its store regions."""

    start: int
    stop: int
    blocks: tuple[int, ...]
    regions: range


def _spans(blocks: tuple[int, ...], store_chunk: int, per_tile: int) -> list[_Span]:
    """Cut one axis into tiles of ``per_tile`` compute blocks (the scene's, so a tile edge is a block edge)."""
    edges = np.cumsum((0, *blocks))
    spans = []
    for k in range(0, len(blocks), per_tile):
        start, stop = int(edges[k]), int(edges[min(k + per_tile, len(blocks))])
        spans.append(_Span(start, stop, blocks[k : k + per_tile], range(start // store_chunk, -(-stop // store_chunk))))
    return spans


def _window(span: _Span, length: int, halo: int) -> tuple[slice, tuple[int, ...], int]:
    """The input pixels a tile reads along one axis, their blocks and the tile's offset in them.

    The tile's own compute blocks plus one strip of ``halo`` pixels each side (none at the scene
    edge): each block of the tile then sees the same extended input as in the whole scene.
    """
    before = min(halo, span.start)
    after = min(halo, length - span.stop)
    blocks = ((before,) if before else ()) + span.blocks + ((after,) if after else ())
    return slice(span.start - before, span.stop + after), blocks, before


def tile_blocks() -> int:
    """Side, in compute blocks, of the tiles ``fuse_series`` computes one after the other.

    About ``BLOCKS_PER_WORKER`` blocks per worker thread of the active scheduler (the threads of
    a distributed client's workers, else Dask's ``num_workers``, else the CPU count, as Dask's
    threaded scheduler uses), at least 2 x 2: enough to keep every worker busy while only one
    tile's blocks and halo strips are in memory.
    """
    client = _current_client()
    if client is not None:
        workers = sum(client.nthreads().values())
    elif dask.config.get("scheduler", None) in ("sync", "synchronous", "single-threaded"):
        workers = 1
    else:
        workers = int(dask.config.get("num_workers", None) or os.cpu_count() or 1)
    return max(2, math.ceil(math.sqrt(BLOCKS_PER_WORKER * max(workers, 1))))


def _region_writes(
    cube: xr.Dataset, plan: _Plan, path: Path, digest: str, *, method: str, model: Any, params: Mapping[str, Any]
) -> tuple[list[Callable[[], list[Any]]], int]:
    """Builders of the batches of delayed region writes not yet recorded (recorded ones are not
    even computed), and the number of those writes.

    One batch is one variable in one tile of ``tile_blocks()`` squared compute blocks of the
    scene, for one date or (fused dates) up to ``DATES_PER_BATCH`` dates fused from the same pairs
    (:func:`_date_batches`), whose graphs share the reads of the pairs' images: each is read and
    decompressed once for them, not once per date. Its graph is built only when it is computed,
    from the tile's window of the input (the tile and, for a fused date, a strip of one halo each
    side), and it is computed before the next one is built: memory is bounded by one tile's blocks
    (its pairs and the dates of one batch) and the thin halo strips around it, not by the scene.
    A fused date's scene-wide statistics are computed once, before its first batch, so every tile
    uses the statistics of the whole scene; dates fused from the same pairs share them where the
    method's statistics do not read the target (``SceneStatistics.uses_target``).
    """
    done = _done_regions(path)
    token = tokenize(str(path.resolve()), digest)
    shape = (cube.sizes["y"], cube.sizes["x"])
    calls: dict[int, FusionCall] = {}
    by_pairs: dict[tuple[Any, ...], tuple[str, Any]] = {}  # pairs -> (token of params, params with statistics)

    def call_of(t: int) -> FusionCall:
        task = next(task for task in plan.tasks if task.target == plan.times[t])
        return prepare_fusion(cube, task.target, method=method, pairs=list(task.pairs), model=model, **params)

    def with_statistics(call: FusionCall) -> FusionCall:
        """``call`` with the scene statistics of its pairs: computed, or those of an earlier date
        with the same pairs and parameters where the statistics do not read the target."""
        statistics = call.spec.statistics
        if statistics is None or statistics.uses_target:
            return call.with_scene_statistics(cube)
        key, token = tuple(call.task.pairs), tokenize(call.params)
        if key not in by_pairs or by_pairs[key][0] != token:
            by_pairs[key] = (token, call.with_scene_statistics(cube).params)
        return dataclasses.replace(call, params=by_pairs[key][1], statistics_filled=True)

    first = next((call_of(t) for t in range(plan.times.size) if plan.source[t] == "fused"), None)
    halo, align = (first.halo, first.align) if first is not None else (0, 1)
    compute_blocks = plan_chunks(shape, plan.chunks, halo=halo, align=align)
    per_tile = (tile_blocks(),) * 2
    yspans, xspans = (_spans(compute_blocks[i], plan.chunks[i], per_tile[i]) for i in range(2))
    # an axis held in one block needs no halo (as in map_overlapping)
    halos = tuple(halo if len(blocks) > 1 else 0 for blocks in compute_blocks)

    def batch(var: str, t: int, yspan: _Span, xspan: _Span, regions: list[tuple[int, int]]) -> list[Any]:
        if var == "fine" and plan.source[t] == "fused":
            if t not in calls:
                calls[t] = with_statistics(call_of(t))
            ys, yblocks, top = _window(yspan, shape[0], halos[0])
            xs, xblocks, left = _window(xspan, shape[1], halos[1])
            window = calls[t].run(cube.isel(y=ys, x=xs), block_chunks=(yblocks, xblocks))
            data = window[:, top : top + yspan.stop - yspan.start, left : left + xspan.stop - xspan.start]
        else:
            image = cube[var].sel(time=plan.times[t]).data
            data = image[:, yspan.start : yspan.stop, xspan.start : xspan.stop]
        chunk = (data.shape[0], *plan.chunks)
        data = data.rechunk(chunk) if isinstance(data, da.Array) else da.from_array(data, chunks=chunk)
        blocks = data.astype(np.float32).to_delayed(optimize_graph=False)  # keys shared by a batch's dates
        return [
            dask.delayed(_write_region)(
                blocks[0, iy - yspan.regions.start, ix - xspan.regions.start], str(path), var, t, iy, ix,
                slice(iy * plan.chunks[0], min((iy + 1) * plan.chunks[0], shape[0])),
                slice(ix * plan.chunks[1], min((ix + 1) * plan.chunks[1], shape[1])),
                dask_key_name=f"stf-write-{token}-{_region_name(var, t, iy, ix)}",
            )
            for iy, ix in regions
        ]

    def dates_batch(var: str, todo: dict[int, list[tuple[int, int]]], yspan: _Span, xspan: _Span) -> list[Any]:
        return [write for t, regions in todo.items() for write in batch(var, t, yspan, xspan, regions)]

    batches: list[Callable[[], list[Any]]] = []
    total = 0
    for var in plan.variables:
        for dates in _date_batches(plan, fused=var == "fine"):
            for yspan in yspans:
                for xspan in xspans:
                    todo = {
                        t: regions
                        for t in dates
                        if (
                            regions := [
                                (iy, ix)
                                for iy in yspan.regions
                                for ix in xspan.regions
                                if _region_name(var, t, iy, ix) not in done
                            ]
                        )
                    }
                    if todo:
                        batches.append(functools.partial(dates_batch, var, todo, yspan, xspan))
                        total += sum(map(len, todo.values()))
    return batches, total


def _date_batches(plan: _Plan, *, fused: bool) -> list[tuple[int, ...]]:
    """The output dates (indices) of a variable's batches, in date order of their first date.

    Where ``fused``, dates fused from the same pairs go together, ``DATES_PER_BATCH`` at most;
    every other date (observed, or a kept variable's copy) is a batch of its own.
    """
    pairs = {task.target: task.pairs for task in plan.tasks}
    groups: dict[Any, list[int]] = {}
    for t, date in enumerate(plan.times):
        key = pairs[date] if fused and plan.source[t] == "fused" else t
        groups.setdefault(key, []).append(t)
    size = DATES_PER_BATCH
    return [tuple(dates[i : i + size]) for dates in groups.values() for i in range(0, len(dates), size)]


def _compute(batches: list[Callable[[], list[Any]]], *, total: int, progress: bool, desc: str) -> None:
    """Build and compute the batches one after the other, on the active client or the local scheduler."""
    if not batches:
        return
    client = _current_client()
    with Progress(total, desc=desc, unit="region", enabled=progress) as bar:
        if client is not None:
            from distributed import as_completed

            for build in batches:
                futures = client.compute(build())
                for _ in as_completed(futures):
                    bar.update(1)
                client.gather(futures)
            return
        with DaskProgress(bar, "stf-write-") if progress else contextlib.nullcontext():
            for build in batches:
                dask.compute(*build())
                _return_freed_memory()


def _return_freed_memory() -> None:
    """Give the memory freed by a batch back to the OS (a no-op off glibc).

    glibc keeps freed chunk-sized arrays in its heaps, so without it the resident size creeps
    up with the number of batches, i.e. with the scene. Called once per batch, it costs nothing
    measurable (a fixed trim threshold would return every freed array at once, and refaulting
    them made the computation several times slower).
    """
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("c")
        try:
            _LIBC = ctypes.CDLL(name) if name else False
        except OSError:  # pragma: no cover - no C library to load
            _LIBC = False
    if _LIBC and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


_LIBC: Any = None


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
    with quiet_zarr():
        zarr.consolidate_metadata(str(path), zarr_format=ZARR_FORMAT)
