"""Scene-wide statistics shared by methods: per-plane standard deviations, quiet NaN reductions.

STARFM and ESTARFM both set their similarity thresholds from the standard deviation of each
fine band over the whole scene (``class_std``), computed once so that every block uses the same
value. :func:`class_std_summary` is the reduction (NumPy now, or a lazy Dask reduction) and
:func:`with_class_std` puts its result into the parameters; the engine
(:func:`stf_pipeline.parallel.fill_statistics`) joins the two, lazily for Dask input.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator
from typing import Any, TypeVar

import numba
import numpy as np

from stf_pipeline._dask import is_dask_array
from stf_pipeline.exceptions import MethodError
from stf_pipeline.kernels.pool import map_cores
from stf_pipeline.kernels.similar import check_window

P = TypeVar("P")


@contextlib.contextmanager
def quiet_nan() -> Iterator[None]:
    """Silence NumPy's all-NaN-slice warnings: an all-NaN statistic is NaN on purpose."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


#: independent partial sums per pass of :func:`_plane_std`: one running sum waits on the
#: previous addition, eight interleaved ones keep the core's adders busy (docs/benchmarks.md)
LANES = 8


@numba.njit(nogil=True, cache=True)
def _plane_std(values: np.ndarray) -> float:  # pragma: no cover - compiled
    # population std of the non-NaN values of one flattened plane, float64, two passes (NaN if
    # none); each pass sums LANES interleaved partial sums, then the tail, then the partials
    n = values.size
    body = n - n % LANES
    totals = np.zeros(LANES)
    counts = np.zeros(LANES)
    for i in range(0, body, LANES):
        for j in range(LANES):
            v = values[i + j]
            if not np.isnan(v):
                totals[j] += v
                counts[j] += 1.0
    for i in range(body, n):
        v = values[i]
        if not np.isnan(v):
            totals[0] += v
            counts[0] += 1.0
    count = counts.sum()
    if count == 0:
        return np.nan
    mean = totals.sum() / count
    squares = np.zeros(LANES)
    for i in range(0, body, LANES):
        for j in range(LANES):
            v = values[i + j]
            if not np.isnan(v):
                squares[j] += (v - mean) * (v - mean)
    for i in range(body, n):
        v = values[i]
        if not np.isnan(v):
            squares[0] += (v - mean) * (v - mean)
    return np.sqrt(squares.sum() / count)


def plane_std(a: np.ndarray) -> np.ndarray:
    """Population standard deviation over the last two axes, NaN excluded (float64, two passes).

    The planes are shared over the cores; NaN for an all-NaN plane. Each plane goes to the
    compiled kernel as one contiguous float32 vector: a view strided along the leading axes (the
    pairs' dates, :func:`stf_pipeline.fusion.at_times`) is read in place, not copied, and the
    kernel has one signature whatever the input's layout (so the background warm-up compiles the
    one a fusion uses).
    """
    a = np.asarray(a)
    planes = [np.ascontiguousarray(a[index], dtype=np.float32).reshape(-1) for index in np.ndindex(a.shape[:-2])]
    return np.array(map_cores(_plane_std, planes), dtype=np.float64).reshape(a.shape[:-2])


def scene_std(fine: np.ndarray) -> tuple[tuple[float, ...], ...]:
    """Population standard deviation of each ``(pair, band)`` of ``fine``, NaN excluded."""
    return tuple(tuple(float(v) for v in row) for row in plane_std(fine))


def class_std_summary(fine: Any) -> Any:
    """Standard deviation of each ``(pair, band)`` plane of ``fine``: :func:`plane_std` for NumPy,
    a lazy ``dask.array.nanstd`` (float64) for Dask (imported only then: a Dask array exists only once
    ``dask.array`` is)."""
    if is_dask_array(fine):
        import dask.array as da

        with quiet_nan():
            return da.nanstd(fine.astype(np.float64), axis=(-2, -1))
    return plane_std(fine)


def with_class_std(params: P, std: Any, method: str) -> P:
    """``params`` with ``class_std`` set from a ``(pair, band)`` array of standard deviations.

    Raises
    ------
    MethodError
        If a pair's fine image is all NaN in some band (its std is NaN).
    """
    rows = tuple(tuple(float(v) for v in row) for row in np.asarray(std, dtype=np.float64))
    for k, row in enumerate(rows):
        if not all(np.isfinite(row)):
            raise MethodError(
                f"{method}: the fine image of pair {k} is all NaN in some band (std {row}); "
                "choose pair dates with fine observations."
            )
    return dataclasses.replace(params, class_std=rows)  # type: ignore[type-var]


@dataclasses.dataclass(frozen=True)
class ClassStd:
    """The two halves of ``MethodSpec.statistics`` for a method whose parameters hold a search
    window (``window_radius``) and the scene std of each fine band (``class_std``)."""

    method: str

    def summarize(self, fine: Any, coarse: Any, coarse_target: Any, params: Any) -> tuple[Any, ...] | None:
        """Checks the window against the scene; the scene std of each fine band unless ``class_std``
        is given (:func:`class_std_summary`)."""
        check_window(params.window_radius, tuple(fine.shape[-2:]), self.method)
        return None if params.class_std is not None else (class_std_summary(fine),)

    def fit(self, params: P, std: Any) -> P:
        """``params`` with ``class_std`` set (:func:`with_class_std`)."""
        return with_class_std(params, std, self.method)
