"""FSDAF steps (b) and (c): class fractions of the native coarse cells and the constrained
unmixing of the coarse change into a change per class (paper Eq. 3-4)."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from stf_pipeline.kernels.lstsq import box_lstsq
from stf_pipeline.kernels.window import box_sum
from stf_pipeline.methods.fsdaf import numba as numba_kernels
from stf_pipeline.methods.fsdaf.params import CHANGE_PERCENTILES, MIN_FRACTION, RIDGE


def to_cells(a: np.ndarray, factor: int, fill: float) -> np.ndarray:
    """Pad the last two axes to multiples of ``factor`` and split into ``(..., hc, f, wc, f)``."""
    h, w = a.shape[-2:]
    hc, wc = -(-h // factor), -(-w // factor)
    pad = [(0, 0)] * (a.ndim - 2) + [(0, hc * factor - h), (0, wc * factor - w)]
    a = np.pad(a, pad, constant_values=fill)
    return a.reshape(*a.shape[:-2], hc, factor, wc, factor)


def cell_mean(a: np.ndarray, factor: int) -> np.ndarray:
    """Mean of the finite values of each cell on the last two axes; NaN for empty cells (compiled)."""
    return numba_kernels.cell_mean(a, factor)


def class_fractions(labels: np.ndarray, n_classes: int, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of each class among the classified fine pixels of each cell.

    Returns
    -------
    fractions : ndarray ``(class, hc, wc)`` float64
        Sums to 1 over classes in every cell with a classified pixel; NaN in cells without.
    complete : ndarray ``(hc, wc)`` bool
        Every fine pixel of the cell (inside the image) is classified: only these cells may be
        used for unmixing (IDL drops cells whose fractions do not sum to 1).
    """
    cells = to_cells(labels, factor, -2)  # -2 = outside the image
    onehot = cells[None] == np.arange(n_classes)[:, None, None, None, None]
    counts = onehot.sum(axis=(-3, -1)).astype(np.float64)
    classified = counts.sum(axis=0)
    complete = ((cells >= 0) | (cells == -2)).all(axis=(-3, -1)) & (classified > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        fractions = np.where(classified > 0, counts / classified, np.nan)
    return fractions, complete


def offset_rank(radius: int) -> np.ndarray:
    """Rank of each window offset by distance to the centre, then scan order (purity tie-break)."""
    dy, dx = np.meshgrid(np.arange(-radius, radius + 1), np.arange(-radius, radius + 1), indexing="ij")
    order = np.lexsort((np.arange(dy.size), (dy * dy + dx * dx).ravel()))
    rank = np.empty(dy.size, dtype=np.int64)
    rank[order] = np.arange(dy.size)
    return rank


def _windows(a: np.ndarray, radius: int, fill: Any) -> np.ndarray:
    """``(..., hc, wc) -> (..., hc, wc, (2r+1)²)`` windows around every cell, ``fill`` outside."""
    side = 2 * radius + 1
    pad = [(0, 0)] * (a.ndim - 2) + [(radius, radius), (radius, radius)]
    padded = np.pad(a, pad, constant_values=fill)
    view = np.lib.stride_tricks.sliding_window_view(padded, (side, side), axis=(-2, -1))
    return view.reshape(*a.shape, side * side)


def window_stats(values: np.ndarray, radius: int, ddof: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Count, mean and standard deviation of finite values in the ``(2r+1)²`` cell window."""
    valid = np.isfinite(values)
    x = np.where(valid, values, 0.0)
    count = box_sum(valid.astype(np.float64), radius)
    total = box_sum(x, radius)
    square = box_sum(x * x, radius)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
        var = (square - count * mean * mean) / (count - ddof)
    return count, mean, np.sqrt(np.maximum(var, 0.0))


def window_extreme(values: np.ndarray, radius: int, *, minimum: bool) -> np.ndarray:
    """Min (or max) of finite values over the ``(2r+1)²`` window on the last two axes."""
    fill = np.inf if minimum else -np.inf
    x = np.where(np.isfinite(values), values, fill)
    size = [1] * (x.ndim - 2) + [2 * radius + 1, 2 * radius + 1]
    func = ndimage.minimum_filter if minimum else ndimage.maximum_filter
    return func(x, size=size, mode="constant", cval=fill)


def change_bounds(coarse_change: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Bounds of the class change per band and cell: window ``min - std`` and ``max + std``."""
    _, _, std = window_stats(coarse_change, radius)
    std = np.nan_to_num(std)
    low = window_extreme(coarse_change, radius, minimum=True) - std
    high = window_extreme(coarse_change, radius, minimum=False) + std
    return low, high


def unmix_change(
    fractions: np.ndarray,
    coarse_change: np.ndarray,
    usable: np.ndarray,
    *,
    radius: int,
    n_pure: int,
    batch_cells: int = 128,
) -> np.ndarray:
    """Per-class change of every cell by constrained unmixing of the coarse change around it.

    For cell ``i`` and band ``b``: in the window of ``radius`` cells around ``i``, take for
    each class ``c`` the (at most) ``n_pure`` usable cells with the largest fraction of ``c``
    among those with fraction > ``MIN_FRACTION`` (ties: nearer to ``i`` first, then scan order);
    keep those whose coarse change lies between the values at positions ``floor(0.1 n)`` and
    ``floor(0.9 n)`` of their sorted changes; stack the kept rows of all classes into
    ``X g = y`` and solve ``min |X g - y|² + RIDGE |g - m|²`` with ``g`` in :func:`change_bounds`
    (``m``: window mean change).

    Parameters
    ----------
    fractions : ndarray ``(class, hc, wc)``
    coarse_change : ndarray ``(band, hc, wc)``
        Native coarse change ``C(t) - C(t1)``.
    usable : ndarray ``(hc, wc)`` bool
        Complete cells with a finite change in every band.
    radius, n_pure : int
    batch_cells : int, default 128
        Cells solved per batch (bounds memory).

    Returns
    -------
    ndarray ``(band, class, hc, wc)`` float64
    """
    n_classes, hc, wc = fractions.shape
    nb = coarse_change.shape[0]
    side2 = (2 * radius + 1) ** 2
    n_cells = hc * wc
    frac = np.where(usable, np.nan_to_num(fractions), 0.0)
    frac_w = _windows(frac, radius, 0.0).reshape(n_classes, n_cells, side2)
    use_w = _windows(usable, radius, False).reshape(n_cells, side2)
    dc = np.where(usable, coarse_change, 0.0)
    dc_w = _windows(dc, radius, 0.0).reshape(nb, n_cells, side2)
    low, high = change_bounds(np.where(np.isfinite(coarse_change), coarse_change, np.nan), radius)
    _, mean, _ = window_stats(np.where(np.isfinite(coarse_change), coarse_change, np.nan), radius)
    low, high, mean = (v.reshape(nb, n_cells) for v in (low, high, mean))
    mean = np.nan_to_num(mean)
    scale = np.int64(1) << 31
    quantised = np.rint(frac_w * scale).astype(np.int64)
    rank = offset_rank(radius)
    invalid = np.iinfo(np.int64).max
    keys = np.where(use_w[None] & (frac_w > MIN_FRACTION), (scale - quantised) * side2 + rank, invalid)
    n_keep = min(n_pure, side2)
    change = np.empty((nb, n_classes, n_cells))
    lo_q, hi_q = CHANGE_PERCENTILES
    for start in range(0, n_cells, batch_cells):
        sl = slice(start, min(start + batch_cells, n_cells))
        key = keys[:, sl]  # (class, cells, side2)
        if n_keep < side2:
            idx = np.argpartition(key, n_keep - 1, axis=-1)[..., :n_keep]
        else:
            idx = np.broadcast_to(np.arange(side2), key.shape).copy()
        valid = np.take_along_axis(key, idx, axis=-1) < invalid  # (class, cells, P)
        rows = np.take_along_axis(frac_w[:, sl][None], idx[:, None], axis=-1)  # (class, feat, cells, P)
        rows = rows.transpose(2, 0, 3, 1).reshape(-1, n_classes * n_keep, n_classes)  # (cells, R, feat)
        y = np.take_along_axis(dc_w[:, sl][:, None], idx[None], axis=-1)  # (band, class, cells, P)
        n = valid.sum(axis=-1)  # (class, cells)
        ordered = np.sort(np.where(valid[None], y, np.inf), axis=-1)
        lo_i = np.clip(np.floor(lo_q * n + 1e-9).astype(np.int64), 0, np.maximum(n - 1, 0))
        hi_i = np.clip(np.floor(hi_q * n + 1e-9).astype(np.int64), 0, np.maximum(n - 1, 0))
        lo_v = np.take_along_axis(ordered, np.broadcast_to(lo_i[None, ..., None], (nb, *lo_i.shape, 1)), axis=-1)
        hi_v = np.take_along_axis(ordered, np.broadcast_to(hi_i[None, ..., None], (nb, *hi_i.shape, 1)), axis=-1)
        keep = valid[None] & (y >= lo_v) & (y <= hi_v)  # (band, class, cells, P)
        keep = keep.transpose(0, 2, 1, 3).reshape(nb, -1, n_classes * n_keep).astype(np.float64)
        y = y.transpose(0, 2, 1, 3).reshape(nb, -1, n_classes * n_keep)
        weighted = rows[None] * keep[..., None]  # (band, cells, R, feat)
        gram = np.swapaxes(weighted, -1, -2) @ rows[None]  # (band, cells, feat, feat)
        rhs = np.einsum("bcrk,bcr->bck", weighted, y)
        gram = gram + RIDGE * np.eye(n_classes)
        rhs = rhs + RIDGE * mean[:, sl, None]
        change[:, :, sl] = box_lstsq(gram, rhs, low[:, sl], high[:, sl]).transpose(0, 2, 1)
    return change.reshape(nb, n_classes, hc, wc)
