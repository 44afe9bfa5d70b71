"""FSDAF steps (d) and (f): the temporal prediction, its coarse residual, the homogeneity index
and the residual distribution, clamped to the allowed range (paper Eq. 5-8, 14-20)."""

from __future__ import annotations

import numpy as np

from stf_pipeline.kernels.window import box_sum
from stf_pipeline.methods.fsdaf import numba as numba_kernels
from stf_pipeline.methods.fsdaf.params import MAX_RESIDUAL_WEIGHT, RESIDUAL_EPS
from stf_pipeline.methods.fsdaf.unmix import to_cells, window_extreme


def temporal_prediction(fine: np.ndarray, labels: np.ndarray, change: np.ndarray, factor: int) -> np.ndarray:
    """``F1 + Δf[class]`` using the change of each pixel's own cell; NaN for unclassified pixels."""
    return numba_kernels.temporal(fine, labels, change, factor)


def residuals(coarse_change: np.ndarray, fractions: np.ndarray, change: np.ndarray) -> np.ndarray:
    """Coarse residual ``R = ΔC - Σ_c f_c Δf_c`` per band and cell (paper Eq. 6-8)."""
    return coarse_change - np.einsum("khw,bkhw->bhw", np.nan_to_num(fractions), change)


def heterogeneity(labels: np.ndarray, radius: int) -> np.ndarray:
    """Homogeneity index (paper Eq. 16): share of the window's pixels in the pixel's own class.

    The window is ``(2r+1)²`` truncated at the image edge (denominator: its pixels inside the
    image, as in the IDL code); unclassified pixels get 0. Exact integer counts from an integral
    image per class, compiled (:func:`stf_pipeline.methods.fsdaf.numba.homogeneity`).
    """
    return numba_kernels.homogeneity(labels, radius)


def distribute_residual(
    residual: np.ndarray,
    tps: np.ndarray,
    temporal: np.ndarray,
    het: np.ndarray,
    factor: int,
    *,
    bounds: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Spread each cell's residual over its fine pixels (paper Eq. 14-20, IDL weights).

    ``E_ho = F_TPS - F_TP`` keeps only the sign of ``R`` (other values set to 0),
    ``W = |E_ho|·HI + |R|·(1 - HI) + eps``, normalised to mean 1 over the cell's pixels, weights
    above 10 reset to the mean, normalised again; the pixel change is ``W · R``. Means are over
    the cell's pixels with a finite ``W``. With ``bounds=(low, high, base)`` (the allowed range
    per band and cell, and a per-pixel base) returns ``clip(F_TP + W·R, low, high) - base``.
    Compiled, one cell at a time, cell rows over the CPU cores
    (:func:`stf_pipeline.methods.fsdaf.numba.distribute`).
    """
    return numba_kernels.distribute(
        residual, tps, temporal, het, factor, eps=RESIDUAL_EPS, cap=MAX_RESIDUAL_WEIGHT, bounds=bounds
    )


def allowed_range(
    coarse_target: np.ndarray,
    fine: np.ndarray,
    labels: np.ndarray,
    change: np.ndarray,
    factor: int,
    radius: int,
    valid_range: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray]:
    """Allowed value range at the target date per band and cell.

    The IDL code bounds the prediction by the range of the target coarse image and of the
    temporal prediction over its processing block, within ``valid_range``. Here the window is the
    ``radius``-cell window of the cell, and the temporal prediction over it uses the cell's own
    class changes: ``min(min C(t), min_c (min F1[class c] + Δf_c))`` and likewise for the max.
    """
    n_classes = change.shape[1]
    c_low, c_high = numba_kernels.cell_extremes(coarse_target, np.zeros(labels.shape, dtype=np.int64), 1, factor)
    f_low, f_high = numba_kernels.cell_extremes(fine, labels, n_classes, factor)  # (class, band, hc, wc)
    c_min = window_extreme(c_low[0], radius, minimum=True)
    c_max = window_extreme(c_high[0], radius, minimum=False)
    t_min = np.full(c_min.shape, np.inf)
    t_max = np.full(c_max.shape, -np.inf)
    for c in range(n_classes):
        t_min = np.fmin(t_min, window_extreme(f_low[c], radius, minimum=True) + change[:, c])
        t_max = np.fmax(t_max, window_extreme(f_high[c], radius, minimum=False) + change[:, c])
    low = np.maximum(np.fmin(c_min, t_min), valid_range[0])
    high = np.minimum(np.fmax(c_max, t_max), valid_range[1])
    return low, high


def similarity_threshold(fine: np.ndarray, labels: np.ndarray, n_classes: int, factor: int, radius: int) -> np.ndarray:
    """Per band and cell: ``2 · std(F1) / n`` over the cell window (IDL ``similar_th``).

    ``std`` (sample standard deviation) of the fine pixels and ``n`` the number of classes
    present, both over the ``radius``-cell window of the cell.
    """
    cells = to_cells(np.asarray(fine, dtype=np.float64), factor, np.nan)
    valid = np.isfinite(cells)
    x = np.where(valid, cells, 0.0)
    count = box_sum(valid.sum(axis=(-3, -1)).astype(np.float64), radius)
    total = box_sum(x.sum(axis=(-3, -1)), radius)
    square = box_sum((x * x).sum(axis=(-3, -1)), radius)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
        std = np.sqrt(np.maximum((square - count * mean * mean) / (count - 1), 0.0))
    lab_cells = to_cells(labels, factor, -1)
    present = np.zeros(std.shape[1:])
    for c in range(n_classes):
        has = (lab_cells == c).any(axis=(-3, -1)).astype(np.float64)
        present += box_sum(has, radius) > 0
    return 2.0 * std / np.maximum(present, 1.0)
