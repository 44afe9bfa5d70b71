"""NaN-aware moving-window sums and means on the last two axes, for NumPy and for JAX.

:func:`box_sum` adds, per pixel, the window's values in a fixed order (window rows, then
columns, in offset order) and nothing outside the array, so a pixel's sum does not depend on
the block it sits in: a chunked result equals the unchunked one bitwise. :func:`box_sum_jax` is
the traceable JAX form (separable sums of doubling windows, with the same property);
:func:`window_index` gathers every window of a padded array at once.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def _box_sum_3d(a: np.ndarray, radius: int, out: np.ndarray) -> None:  # pragma: no cover - compiled
    # a, out: (n, y, x) float64; out = sums over the (2r+1)² window, nothing added outside a
    n, h, w = a.shape
    column = np.empty((h, w), dtype=np.float64)
    for k in range(n):
        # along y: whole rows, offsets in order
        column[:, :] = 0.0
        for y in range(h):
            target = column[y]
            for yy in range(max(0, y - radius), min(h, y + radius + 1)):
                source = a[k, yy]
                for i in range(w):
                    target[i] += source[i]
        # along x: shifted row slices, offsets in order
        out[k] = 0.0
        for y in range(h):
            target = out[k, y]
            source = column[y]
            for dx in range(-radius, radius + 1):
                x0 = max(0, -dx)
                x1 = min(w, w - dx)
                if x0 >= x1:
                    continue
                t = target[x0:x1]
                q = source[x0 + dx : x1 + dx]
                for i in range(x1 - x0):
                    t[i] += q[i]


def box_sum(a: np.ndarray, radius: int) -> np.ndarray:
    """Sum over a ``(2r+1)²`` window on the last two axes (float64); nothing is added outside ``a``.

    Compiled (Numba). Per pixel, the terms are added in a fixed order (window rows, then
    columns, in offset order), so a pixel's sum does not depend on the block it sits in.
    """
    a = np.asarray(a, dtype=np.float64)
    flat = np.ascontiguousarray(a.reshape((-1, *a.shape[-2:])))
    out = np.empty_like(flat)
    _box_sum_3d(flat, int(radius), out)
    return out.reshape(a.shape)


def window_reduce_jax(a: Any, radius: int, computation: Any, init: float) -> Any:
    """``computation`` (``jax.lax.add``, ``max``, ``min``) over a ``(2r+1)²`` window on the last two
    axes of a JAX array, as two 1-D passes of :func:`_window_reduce_1d` (about ``2 log2(2r + 1)``
    operations a pixel, not ``(2r + 1)²``); outside the array counts as ``init``. Traceable."""
    for axis in (a.ndim - 2, a.ndim - 1):
        a = _window_reduce_1d(a, radius, computation, init, axis)
    return a


def _window_reduce_1d(a: Any, radius: int, computation: Any, init: float, axis: int) -> Any:
    """``computation`` over the ``2r + 1`` values centred on each element along ``axis`` (outside
    the array ``init``), by doubling: windows of 1, 2, 4, ... values, each two of the previous
    side by side, then the window's length composed from its binary digits, longest first.

    Every element's result combines the same values in the same order wherever the array starts,
    so a block's result equals the whole array's wherever the block holds the window; a direct
    sliding sum costs ``2r + 1`` operations an element, this one about ``2 log2(2r + 1)``.
    """
    import jax
    import jax.numpy as jnp

    n, width = a.shape[axis], 2 * radius + 1
    pad = [(0, 0, 0)] * a.ndim
    pad[axis] = (radius, radius, 0)
    spans = [jax.lax.pad(a, jnp.asarray(init, a.dtype), pad)]  # spans[k][i]: the 2**k values from i
    while 2 ** len(spans) <= width:
        last, half = spans[-1], 2 ** (len(spans) - 1)
        size = last.shape[axis] - half
        spans.append(
            computation(
                jax.lax.slice_in_dim(last, 0, size, axis=axis), jax.lax.slice_in_dim(last, half, half + size, axis=axis)
            )
        )
    out, start = None, 0
    for k in reversed(range(len(spans))):
        if width & (1 << k):
            part = jax.lax.slice_in_dim(spans[k], start, start + n, axis=axis)
            out = part if out is None else computation(out, part)
            start += 1 << k
    return out


def box_sum_jax(a: Any, radius: int) -> Any:
    """:func:`box_sum` for JAX arrays (traceable): separable sums (:func:`window_reduce_jax`),
    outside the array zero."""
    import jax

    return window_reduce_jax(a, radius, jax.lax.add, 0.0)


def window_index(shape: tuple[int, int], radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(iy, ix)`` into an array padded by ``radius`` on its last two axes that give the
    ``(2r+1)²`` window of every element of ``shape``, offsets in row-major order: ``padded[..., iy, ix]``
    is ``(..., *shape, (2r+1)²)`` (one gather rather than a slice per offset)."""
    side = 2 * radius + 1
    offsets = np.arange(side * side)
    iy = np.arange(shape[0])[:, None, None] + (offsets // side)[None, None, :]
    ix = np.arange(shape[1])[None, :, None] + (offsets % side)[None, None, :]
    return iy, ix


def nanmean_window(a: np.ndarray, radius: int) -> np.ndarray:
    """Mean of the valid (non-NaN) values in a ``(2r+1)²`` window on the last two axes.

    NaN where the window holds no valid value. Accumulates in float64.
    """
    valid = np.isfinite(a)
    total = box_sum(np.where(valid, a, 0.0), radius)
    count = box_sum(valid, radius)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)
