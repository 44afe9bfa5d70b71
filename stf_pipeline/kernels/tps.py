"""Thin-plate splines (Duchon 1977; Bookstein 1989): exact interpolation of scattered knots.

``f(q) = a0 + a1 y + a2 x + sum_i w_i phi(|q - p_i|)`` with ``phi(r) = r² log r`` and the side
conditions ``sum w = sum w y = sum w x = 0``; ``f`` passes through every knot and minimises the
bending energy. Because ``f`` is linear in the knot values, :func:`tps_matrix` returns the matrix
that maps knot values to values at target points, which is what :func:`local_tps` applies.

:func:`local_tps` interpolates a coarse grid onto the fine pixels of every cell with a spline fitted
to the cells within ``radius`` of that cell (overlapping support). Each cell only reads its own
neighbourhood, so the result for a cell is the same in any block that holds the whole
neighbourhood: chunked equals unchunked once the halo covers ``radius`` cells. :func:`local_tps_jax`
is the same interpolation traced for a JAX device (one spline system per cell).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stf_pipeline.kernels.window import window_index


def _phi(r: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(r > 0, r * r * np.log(np.where(r > 0, r, 1.0)), 0.0)


def tps_matrix(knots: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Matrix ``E`` with ``f(targets) = E @ values`` for the spline through ``(knots, values)``.

    Parameters
    ----------
    knots : ndarray ``(n, 2)``
        Knot coordinates ``(y, x)``.
    targets : ndarray ``(m, 2)``
        Where to evaluate the spline.

    Returns
    -------
    ndarray ``(m, n)`` float64
        With fewer than three non-collinear knots no spline exists; then every target gets the
        mean of the knot values (a constant).
    """
    p = np.asarray(knots, dtype=np.float64)
    q = np.asarray(targets, dtype=np.float64)
    n = p.shape[0]
    poly = np.hstack([np.ones((n, 1)), p])
    if n < 3 or np.linalg.matrix_rank(poly) < 3:
        return np.full((q.shape[0], n), 1.0 / max(n, 1))
    system = np.zeros((n + 3, n + 3))
    system[:n, :n] = _phi(np.sqrt(((p[:, None, :] - p[None, :, :]) ** 2).sum(-1)))
    system[:n, n:] = poly
    system[n:, :n] = poly.T
    rhs = np.vstack([np.eye(n), np.zeros((3, n))])
    coef = np.linalg.solve(system, rhs)  # (n + 3, n): spline coefficients per unit knot value
    basis = np.hstack([_phi(np.sqrt(((q[:, None, :] - p[None, :, :]) ** 2).sum(-1))), np.ones((q.shape[0], 1)), q])
    return basis @ coef


def _fine_offsets(factor: int) -> np.ndarray:
    """Fine pixel centres inside a cell, in cell units relative to the cell centre, ``(factor², 2)``."""
    t = (np.arange(factor) + 0.5) / factor - 0.5
    yy, xx = np.meshgrid(t, t, indexing="ij")
    return np.stack([yy.ravel(), xx.ravel()], axis=1)


def local_tps(cells: np.ndarray, factor: int, radius: int, shape: tuple[int, int]) -> np.ndarray:
    """Thin-plate-spline interpolation of a coarse grid onto the fine grid, one local fit per cell.

    Knots are the centres of the cells within ``radius`` cells (a ``(2r+1)²`` square, truncated
    at the array edge) whose value is finite in every band; the spline is evaluated at the
    ``factor × factor`` fine pixel centres of the middle cell. Cells sharing a knot pattern share
    one matrix (:func:`tps_matrix`), so the cost is one small matrix product per cell.

    Parameters
    ----------
    cells : ndarray ``(band, hc, wc)``
        Coarse values (NaN = missing).
    factor : int
        Fine pixels per cell side.
    radius : int
        Neighbourhood radius in cells.
    shape : (int, int)
        Fine output shape; at most ``(hc * factor, wc * factor)`` (the grid is cropped to it).

    Returns
    -------
    ndarray ``(band, *shape)`` float64
        NaN in cells without any valid knot.
    """
    nb, hc, wc = cells.shape
    side = 2 * radius + 1
    valid_cell = np.isfinite(cells).all(axis=0)
    values = np.pad(np.where(valid_cell, cells, 0.0), ((0, 0), (radius, radius), (radius, radius)))
    mask = np.pad(valid_cell, radius, constant_values=False)
    win_vals = np.lib.stride_tricks.sliding_window_view(values, (side, side), axis=(1, 2))
    win_vals = win_vals.reshape(nb, hc * wc, side * side)
    win_mask = np.lib.stride_tricks.sliding_window_view(mask, (side, side)).reshape(hc * wc, side * side)
    dy, dx = np.meshgrid(np.arange(-radius, radius + 1), np.arange(-radius, radius + 1), indexing="ij")
    knots = np.stack([dy.ravel(), dx.ravel()], axis=1).astype(np.float64)
    targets = _fine_offsets(factor)
    patterns, inverse = np.unique(np.packbits(win_mask, axis=1), axis=0, return_inverse=True)
    inverse = inverse.ravel()
    out = np.full((nb, hc * wc, factor * factor), np.nan)
    for index, packed in enumerate(patterns):
        keep = np.unpackbits(packed, count=side * side).astype(bool)
        members = np.flatnonzero(inverse == index)
        if not keep.any():
            continue
        matrix = tps_matrix(knots[keep], targets)  # (factor², n_valid)
        out[:, members, :] = win_vals[:, members][:, :, keep] @ matrix.T
    grid = out.reshape(nb, hc, wc, factor, factor).transpose(0, 1, 3, 2, 4).reshape(nb, hc * factor, wc * factor)
    return grid[:, : shape[0], : shape[1]]


def local_tps_jax(cells: Any, factor: int, radius: int, shape: tuple[int, int]) -> Any:
    """:func:`local_tps` for JAX arrays (traceable; float64 under ``jax.enable_x64``).

    Every cell solves its own spline system: the ``(2r+1)²`` knots of its window, those without a
    value in every band turned into identity rows (weight 0), so the solution is the spline
    through the valid knots only; the spline is then evaluated at the fine pixel centres of the
    cell, the same basis for every cell. A window of fewer than three valid knots, or of collinear
    ones (the determinant of the knots' exact integer moment matrix is 0), gives the mean of its
    valid knot values, as :func:`tps_matrix`. Equal to :func:`local_tps` to rounding (one solve
    per cell and band values rather than a matrix per knot pattern).

    Parameters
    ----------
    cells : jax.Array ``(band, hc, wc)``
    factor, radius : int
    shape : (int, int)

    Returns
    -------
    jax.Array ``(band, *shape)``
        NaN in cells without any valid knot.
    """
    import jax.numpy as jnp

    nb, hc, wc = cells.shape
    side = 2 * radius + 1
    n = side * side
    valid_cell = jnp.isfinite(cells).all(axis=0)
    values = jnp.pad(jnp.where(valid_cell, cells, 0.0), ((0, 0), (radius, radius), (radius, radius)))
    mask = jnp.pad(valid_cell, radius, constant_values=False)
    iy, ix = window_index((hc, wc), radius)
    win_vals = values[:, iy, ix]  # (band, hc, wc, n)
    win_mask = mask[iy, ix]
    dy, dx = np.meshgrid(np.arange(-radius, radius + 1), np.arange(-radius, radius + 1), indexing="ij")
    knots = np.stack([dy.ravel(), dx.ravel()], axis=1).astype(np.float64)
    poly = np.hstack([np.ones((n, 1)), knots])  # (n, 3)
    kernel = _phi(np.sqrt(((knots[:, None, :] - knots[None, :, :]) ** 2).sum(-1)))
    m = win_mask.astype(cells.dtype)  # (hc, wc, n)
    pair = m[..., :, None] * m[..., None, :]
    top = jnp.concatenate(
        [kernel * pair + jnp.eye(n) * (1.0 - m[..., None]), poly * m[..., None]], axis=-1
    )  # (hc, wc, n, n + 3)
    bottom = jnp.concatenate([jnp.swapaxes(poly * m[..., None], -1, -2), jnp.zeros((hc, wc, 3, 3))], axis=-1)
    system = jnp.concatenate([top, bottom], axis=-2)  # (hc, wc, n + 3, n + 3)
    count = m.sum(axis=-1)
    moments = jnp.einsum("hwk,ki,kj->hwij", m, poly, poly)  # exact: small integers
    m00, m01, m02, m11, m12, m22 = (moments[..., i, j] for i, j in ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)))
    det = m00 * (m11 * m22 - m12 * m12) - m01 * (m01 * m22 - m12 * m02) + m02 * (m01 * m12 - m11 * m02)
    spline = (count >= 3) & (det > 0.5)
    system = jnp.where(spline[..., None, None], system, jnp.eye(n + 3))
    rhs = jnp.concatenate([jnp.moveaxis(win_vals, 0, -1), jnp.zeros((hc, wc, 3, nb))], axis=-2)  # (hc, wc, n + 3, band)
    coef = jnp.linalg.solve(system, rhs)
    targets = _fine_offsets(factor)
    basis = np.hstack(
        [_phi(np.sqrt(((targets[:, None, :] - knots[None, :, :]) ** 2).sum(-1))), np.ones((len(targets), 1)), targets]
    )  # (factor², n + 3)
    fitted = jnp.einsum("tk,hwkb->bhwt", basis, coef)
    mean = win_vals.sum(axis=-1) / count  # (band, hc, wc)
    out = jnp.where(spline[None, ..., None], fitted, mean[..., None])
    out = jnp.where(count[None, ..., None] > 0, out, jnp.nan)
    grid = out.reshape(nb, hc, wc, factor, factor).transpose(0, 1, 3, 2, 4).reshape(nb, hc * factor, wc * factor)
    return grid[:, : shape[0], : shape[1]]
