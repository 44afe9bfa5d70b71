"""Coarse images on the fine grid, interpolated between the centres of their native pixels.

A coarse image resampled onto the fine grid by nearest neighbour is constant over each native
pixel (a *cell* of ``factor x factor`` fine pixels): a change that varies smoothly inside a coarse
pixel (a flood front that follows the terrain, a phenology gradient) shows as steps at the cell
edges. :func:`cubic_between_centres` replaces the cells by Keys' cubic convolution (Keys 1981,
``a = -0.5``) of the cell values, sampled at every fine pixel: the interpolant passes through each
cell's value at its centre and is smooth across cell edges. It is local (four cells per axis), so a
pixel's value depends only on the cells within two of its own, and where that support reaches a
missing cell or beyond the array the pixel keeps its cell's value: the result of a block equals
that of the whole scene wherever the block's halo holds those cells, and a missing coarse pixel
removes exactly the fine pixels it removed before.

Keys, R. (1981). Cubic convolution interpolation for digital image processing. IEEE Transactions
on Acoustics, Speech, and Signal Processing 29(6), 1153-1160.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stf_pipeline.kernels.cells import cell_mean

#: Keys' free parameter (``-0.5``: third-order accurate; what ``jax.image.resize`` uses for "cubic")
KEYS_A = -0.5
#: cells each side of a pixel's own that its interpolated value reads
SUPPORT_CELLS = 2


def keys_weights(factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Per fine offset ``o`` in a cell, the cell shift of its first support cell and its four weights.

    Fine pixel ``o`` of cell ``i`` sits at ``t = (o + 0.5) / factor - 0.5`` cells from the cell's
    centre; its support is cells ``i + floor(t) - 1 ... i + floor(t) + 2`` with Keys' weights of
    their distances. Returns ``shift`` ``(factor,)`` int and ``weights`` ``(factor, 4)`` float64
    (each row sums to 1).
    """
    t = (np.arange(factor) + 0.5) / factor - 0.5
    base = np.floor(t)
    u = t - base
    distance = np.abs(u[:, None] - np.arange(-1, 3)[None, :])  # to cells base - 1 ... base + 2
    a = KEYS_A
    near = ((a + 2) * distance - (a + 3)) * distance**2 + 1
    far = ((a * distance - 5 * a) * distance + 8 * a) * distance - 4 * a
    weights = np.where(distance <= 1, near, np.where(distance < 2, far, 0.0))
    return base.astype(np.int64) - 1, weights


def _along(cells: Any, factor: int, axis: int) -> Any:
    """Interpolate ``cells`` along ``axis`` (-1 or -2) onto ``factor`` samples per cell; NaN where
    the support holds a missing cell or leaves the array."""
    import jax.numpy as jnp

    shift, weights = keys_weights(factor)
    cells = jnp.moveaxis(cells, axis, -1)
    n = cells.shape[-1]
    padded = jnp.pad(cells, [(0, 0)] * (cells.ndim - 1) + [(SUPPORT_CELLS, SUPPORT_CELLS)], constant_values=jnp.nan)
    samples = []
    for o in range(factor):
        start = SUPPORT_CELLS + int(shift[o])
        taps = [padded[..., start + k : start + k + n] for k in range(4)]
        samples.append(sum(float(weights[o, k]) * taps[k] for k in range(4)))
    out = jnp.stack(samples, axis=-1).reshape(*cells.shape[:-1], n * factor)
    return jnp.moveaxis(out, -1, axis)


def cubic_between_centres(a: Any, factor: int) -> Any:
    """``a`` ``(..., y, x)``, constant over cells of ``factor`` pixels from its origin, interpolated
    between the cell centres (see module docstring); same shape and dtype.

    A pixel whose support (``SUPPORT_CELLS`` cells each side, along each axis) holds a missing
    cell or leaves the array keeps its value in ``a``; NaN stays NaN.
    """
    import jax.numpy as jnp

    if factor < 2:
        return a
    cells = cell_mean(a, factor)
    smooth = _along(_along(cells, factor, -2), factor, -1)[..., : a.shape[-2], : a.shape[-1]].astype(a.dtype)
    return jnp.where(jnp.isfinite(smooth) & jnp.isfinite(a), smooth, a)
