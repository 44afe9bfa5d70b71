"""NaN-aware moving-window statistics shared by the kernels.

Sums are separable direct loops over offsets, so each output pixel adds the same values in the
same order whatever block it sits in: a chunked run equals the unchunked one bitwise.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _shift_sum(a: np.ndarray, radius: int, axis: int) -> np.ndarray:
    """Sum of ``a`` over ``[-radius, radius]`` along ``axis``, zero outside the array."""
    n = a.shape[axis]
    out = np.zeros_like(a)
    for offset in range(-min(radius, n - 1), min(radius, n - 1) + 1):
        src = [slice(None)] * a.ndim
        dst = [slice(None)] * a.ndim
        if offset >= 0:
            src[axis], dst[axis] = slice(offset, n), slice(0, n - offset)
        else:
            src[axis], dst[axis] = slice(0, n + offset), slice(-offset, n)
        out[tuple(dst)] += a[tuple(src)]
    return out


def box_sum(a: np.ndarray, radius: int) -> np.ndarray:
    """Sum over a ``(2r+1)²`` window on the last two axes, treating outside as zero."""
    if radius == 0:
        return a.copy()
    return _shift_sum(_shift_sum(a, radius, a.ndim - 2), radius, a.ndim - 1)


def box_sum_jax(a: Any, radius: int) -> Any:
    """:func:`box_sum` for JAX arrays (traceable): separable ``lax.reduce_window`` sums, outside
    the array zero."""
    import jax

    dims = (1,) * (a.ndim - 2) + (2 * radius + 1, 1)
    pad = ((0, 0),) * (a.ndim - 2) + ((radius, radius), (0, 0))
    a = jax.lax.reduce_window(a, 0.0, jax.lax.add, dims, (1,) * a.ndim, pad)
    dims = (1,) * (a.ndim - 2) + (1, 2 * radius + 1)
    pad = ((0, 0),) * (a.ndim - 2) + ((0, 0), (radius, radius))
    return jax.lax.reduce_window(a, 0.0, jax.lax.add, dims, (1,) * a.ndim, pad)


def nanmean_window(a: np.ndarray, radius: int) -> np.ndarray:
    """Mean of the valid (non-NaN) values in a ``(2r+1)²`` window on the last two axes.

    NaN where the window holds no valid value. Accumulates in float64.
    """
    valid = np.isfinite(a)
    total = box_sum(np.where(valid, a, 0.0).astype(np.float64), radius)
    count = box_sum(valid.astype(np.float64), radius)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)
