"""Native coarse pixels (*cells* of ``factor x factor`` fine pixels from the array's origin) of
JAX arrays on the fine grid: cut into cells, back to the grid, the mean of each cell."""

from __future__ import annotations

from typing import Any


def to_cells(a: Any, factor: int, fill: Any) -> Any:
    """``(..., y, x) -> (..., hc, f, wc, f)``, the last cells completed with ``fill`` (the JAX form
    of :func:`stf_pipeline.methods.fsdaf.unmix.to_cells`)."""
    import jax.numpy as jnp

    h, w = a.shape[-2:]
    hc, wc = -(-h // factor), -(-w // factor)
    pad = [(0, 0)] * (a.ndim - 2) + [(0, hc * factor - h), (0, wc * factor - w)]
    a = jnp.pad(a, pad, constant_values=fill)
    return a.reshape(*a.shape[:-2], hc, factor, wc, factor)


def from_cells(a: Any, shape: tuple[int, int]) -> Any:
    """``(..., hc, f, wc, f)`` back to the fine grid, cropped to ``shape``."""
    hc, f, wc = a.shape[-4:-1]
    return a.reshape(*a.shape[:-4], hc * f, wc * f)[..., : shape[0], : shape[1]]


def cell_mean(a: Any, factor: int) -> Any:
    """Mean of the finite values of each cell on the last two axes ``(..., hc, wc)``; NaN for empty cells."""
    import jax.numpy as jnp

    cells = to_cells(a, factor, jnp.nan)
    valid = jnp.isfinite(cells)
    total = jnp.where(valid, cells, 0.0).sum(axis=(-3, -1))
    count = valid.sum(axis=(-3, -1))
    return jnp.where(count > 0, total / count, jnp.nan)
