"""Fusion tasks: which date to predict and which fine+coarse pair dates to predict it from."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, TypeAlias

import numpy as np
import pandas as pd
import xarray as xr

from stf_pipeline._dask import is_dask_array
from stf_pipeline.exceptions import TaskError

DateLike: TypeAlias = str | np.datetime64 | pd.Timestamp | Any


def to_datetime64(value: DateLike) -> np.datetime64:
    """Parse an ISO string, ``numpy.datetime64``, ``pandas.Timestamp`` or ``datetime`` to ``datetime64[ns]``."""
    try:
        return pd.Timestamp(value).to_datetime64().astype("datetime64[ns]")
    except (ValueError, TypeError) as err:
        raise TaskError(f"cannot read {value!r} as a date; use an ISO string such as '2001-07-11'.") from err


def iso_date(date: Any) -> str:
    """``YYYY-MM-DD`` of a ``numpy.datetime64`` (or anything ``numpy.datetime64`` reads)."""
    return str(np.datetime_as_string(np.datetime64(date, "ns"), unit="D"))


@dataclasses.dataclass(frozen=True)
class Task:
    """A fusion task: predict the fine image at ``target`` from the fine+coarse ``pairs``.

    Attributes
    ----------
    target : numpy.datetime64
    pairs : tuple of numpy.datetime64
        Chronological pair dates.
    """

    target: np.datetime64
    pairs: tuple[np.datetime64, ...]

    def to_attrs(self) -> dict[str, Any]:
        """ISO strings for provenance attrs."""
        return {"target": iso_date(self.target), "pairs": [iso_date(p) for p in self.pairs]}


def valid_fraction(cube: xr.Dataset, variable: str) -> np.ndarray:
    """Fraction of valid (non-NaN) pixels of ``variable`` per date.

    For a Dask-backed cube, uses the per-date coordinate ``{variable}_valid`` when the cube
    carries one (written by :func:`stf_pipeline.synthetic_scene`, ingestion and
    :func:`stf_pipeline.write_cube`), so that resolving a task on a large lazy cube reads
    nothing; otherwise computes it (in memory: cheap; lazy without the coord: one pass).
    """
    coord = f"{variable}_valid"
    if coord in cube.coords and is_dask_array(cube[variable].data):
        # the coord is metadata-sized; .chunk() may have made it a Dask array
        values = cube[coord].data
        if is_dask_array(values):
            values = values.compute(scheduler="sync")
        return np.asarray(values, dtype=float)
    return np.asarray(cube[variable].notnull().mean(("band", "y", "x")).values, dtype=float)


#: side of the grid of pixels :func:`has_valid` looks at first on an in-memory image
SAMPLE_GRID = 64


def has_valid(cube: xr.Dataset, variable: str, *, skip: int | None = None) -> np.ndarray:
    """Whether each date of ``variable`` has a valid (non-NaN) pixel, ``bool`` per date.

    What task resolution asks, at less cost than :func:`valid_fraction` on an in-memory cube: a
    sparse grid of about ``SAMPLE_GRID`` x ``SAMPLE_GRID`` pixels of every date first, the whole
    image only for a date with no valid pixel on that grid (all NaN, or valid only between
    its points): every ``stf.fuse`` resolves its task, and a pass over the whole in-memory
    scene was a measurable share of a steady fusion (``docs/benchmarks.md``,
    ``fsdaf-host-2026-12-07``). A Dask-backed cube asks :func:`valid_fraction`, which reads its
    ``{variable}_valid`` coord when it has one. The date at index ``skip``, one the caller does not
    need (the target's fine image, all NaN where it is to be predicted), is not scanned beyond
    the grid: its entry is only the grid's answer.
    """
    array = cube[variable]
    if is_dask_array(array.data):
        return valid_fraction(cube, variable) > 0
    array = array.transpose("time", ...)
    values = array.values  # in memory: a view, read through NumPy (xarray's own ops cost more here)
    grid = tuple(slice(None, None, max(1, array.sizes[d] // SAMPLE_GRID)) if d in ("y", "x") else slice(None)
                 for d in array.dims[1:])
    found = ~np.isnan(values[(slice(None), *grid)]).reshape(len(values), -1).all(axis=1)
    for t in np.flatnonzero(~found):  # one date at a time: a view of an in-memory array, not a copy
        if t != skip:
            found[t] = not np.isnan(values[t]).all()
    return found


def resolve_task(
    cube: xr.Dataset,
    target: DateLike,
    *,
    pairs: Sequence[DateLike] | None = None,
    n_pairs: tuple[int, int] = (1, 2),
) -> Task:
    """Resolve a target date and its pair dates in ``cube``.

    By default the pairs are the nearest date with fine data before the target and the nearest
    after it; a method taking one pair gets the nearest before (or, if there is none, after).

    Parameters
    ----------
    cube : xarray.Dataset
    target : date-like
        Must be a date of the cube with coarse data.
    pairs : sequence of date-like, optional
        Explicit pair dates (each must have fine and coarse data).
    n_pairs : (int, int)
        Minimum and maximum number of pairs the method accepts.

    Raises
    ------
    TaskError
        If a date is not in the cube, has no usable data, or too few pairs exist.
    """
    times = cube["time"].values.astype("datetime64[ns]")
    target64 = to_datetime64(target)
    if target64 not in times:
        raise TaskError(
            f"target date {iso_date(target64)} is not in the cube; its dates are "
            f"{[iso_date(t) for t in times]}."
        )
    t_index = int(np.flatnonzero(times == target64)[0])
    coarse_ok = has_valid(cube, "coarse")
    fine_ok = has_valid(cube, "fine", skip=t_index)  # the target's fine image is never a pair's
    if not coarse_ok[t_index]:
        raise TaskError(
            f"the coarse image at target date {iso_date(target64)} is all NaN; "
            "a fusion needs the coarse observation of the target date: choose another target."
        )
    lo, hi = n_pairs
    if pairs is None:
        before = [i for i in range(t_index) if fine_ok[i] and coarse_ok[i]]
        after = [i for i in range(t_index + 1, times.size) if fine_ok[i] and coarse_ok[i]]
        if hi == 1:
            chosen = before[-1:] or after[:1]
        else:
            chosen = before[-1:] + after[:1]
        if len(chosen) < lo:
            have = [iso_date(times[i]) for i in before + after]
            raise TaskError(
                f"method needs {lo} pair date(s) around {iso_date(target64)} (one before and one after), "
                f"but the dates with both fine and coarse data are {have}; pass pairs=[...] explicitly "
                "or choose another target."
            )
        return Task(target=target64, pairs=tuple(times[i] for i in chosen))
    pair64 = sorted({to_datetime64(p) for p in pairs})
    if not lo <= len(pair64) <= hi:
        raise TaskError(f"method takes {lo} to {hi} pair date(s), got {len(pair64)}: {[iso_date(p) for p in pair64]}.")
    for p in pair64:
        if p == target64:
            raise TaskError(f"pair date {iso_date(p)} is the target date; pairs must be other dates.")
        if p not in times:
            raise TaskError(
                f"pair date {iso_date(p)} is not in the cube; its dates are {[iso_date(t) for t in times]}."
            )
        i = int(np.flatnonzero(times == p)[0])
        if not fine_ok[i]:
            raise TaskError(
                f"the fine image at pair date {iso_date(p)} is all NaN; choose a date with a fine observation."
            )
        if not coarse_ok[i]:
            raise TaskError(
                f"the coarse image at pair date {iso_date(p)} is all NaN; choose a date with a coarse observation."
            )
    return Task(target=target64, pairs=tuple(pair64))
