"""FSDAF's similar-pixel step (g) with JAX, for accelerators.

The same rule as the Numba CPU kernel (:mod:`stf_pipeline.methods.fsdaf.numba`): float32
ranking keys ``(S + 1e-5)(10 + d / r)`` of every window offset, built with the same operations
in the same band order, the ``k`` smallest chosen by ``jax.lax.top_k`` (which puts the lower index
first among equal values, so ties go to the earlier offset in scan order, as on the CPU), then
weighted by ``1 / ((1 + d / r)(1 + S))``. Weights are float32 here (float64 on the CPU): the two
agree to float32 rounding.

Work goes in strips of ``strip`` rows (all strips padded to the same height so one compiled
program serves a block): the keys of a strip are ``strip · width · (2r+1)²`` float32 values, built
one window row per step of a ``fori_loop``.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np


@functools.lru_cache(maxsize=16)
def _strip_fn(radius: int, k: int) -> Any:
    import jax
    import jax.numpy as jnp
    from jax import lax

    side = 2 * radius + 1

    def run(fine_pad: Any, change_pad: Any, use_pad: Any, threshold: Any, rank: Any, y0: Any) -> Any:
        # fine_pad, change_pad: (band, H + 2r, W + 2r), NaN outside; use_pad: (H + 2r, W + 2r);
        # threshold: (band, strip, W) of this strip; rank: (side, side) float32; y0: first row
        nb, rows, w = threshold.shape
        centre = lax.dynamic_slice(fine_pad, (0, y0 + radius, radius), (nb, rows, w))
        inv = jnp.float32(1.0) / (centre + jnp.float32(1e-8))
        slab = lax.dynamic_slice(fine_pad, (0, y0, 0), (nb, rows + 2 * radius, w + 2 * radius))
        use_slab = lax.dynamic_slice(use_pad, (y0, 0), (rows + 2 * radius, w + 2 * radius))

        def window_row(dy: Any, keys: Any) -> Any:
            band_rows = lax.dynamic_slice_in_dim(slab, dy, rows, axis=1)  # (band, rows, W + 2r)
            use_rows = lax.dynamic_slice_in_dim(use_slab, dy, rows, axis=0)
            row_keys = []
            for dx in range(side):
                passed = use_rows[:, dx : dx + w]
                spectral = jnp.zeros((rows, w), jnp.float32)
                for b in range(nb):
                    d = jnp.abs(band_rows[b, :, dx : dx + w] - centre[b])
                    passed = passed & (d < threshold[b])
                    spectral = spectral + d * inv[b]
                if dx == radius:  # the pixel itself is a candidate whatever the threshold
                    passed = jnp.where(dy == radius, use_rows[:, dx : dx + w], passed)
                key = (spectral + jnp.float32(1e-5)) * rank[dy, dx]
                row_keys.append(jnp.where(passed, key, jnp.inf))
            return lax.dynamic_update_slice_in_dim(keys, jnp.stack(row_keys, axis=-1)[:, :, None], dy, axis=2)

        keys = lax.fori_loop(0, side, window_row, jnp.full((rows, w, side, side), jnp.inf, jnp.float32))
        neg, index = lax.top_k(-keys.reshape(rows, w, side * side), k)
        chosen = jnp.isfinite(neg)
        dy = index // side
        dx = index % side
        yy = jnp.arange(rows)[:, None, None] + dy  # rows of the slab
        xx = jnp.arange(w)[None, :, None] + dx
        dist = jnp.sqrt(((dy - radius) ** 2 + (dx - radius) ** 2).astype(jnp.float32)) / radius
        neighbour = slab[:, yy, xx]  # (band, rows, W, k)
        c = centre[..., None]
        spectral = (jnp.abs(neighbour - c) / (c + jnp.float32(1e-8))).sum(axis=0)
        weight = jnp.where(chosen, 1.0 / ((1.0 + dist) * (1.0 + spectral)), 0.0)
        total = weight.sum(axis=-1)
        changes = lax.dynamic_slice(change_pad, (0, y0, 0), change_pad.shape[:1] + slab.shape[1:])[:, yy, xx]
        est = (weight * jnp.where(chosen, changes, 0.0)).sum(axis=-1) / total
        finite = jnp.isfinite(centre).all(axis=0)
        return jnp.where((total > 0) & finite, est, jnp.nan)

    return jax.jit(run)


def blend(
    fine: np.ndarray,
    change: np.ndarray,
    threshold: np.ndarray,
    use: np.ndarray,
    rank: np.ndarray,
    *,
    radius: int,
    k: int,
    max_keys: int = 1 << 28,
) -> np.ndarray:
    """Weighted change of the ``k`` most similar pixels, ``(band, y, x)`` float64.

    Same arguments as :func:`stf_pipeline.methods.fsdaf.numba.blend`; ``max_keys`` bounds the
    keys of one strip (strip height = ``max_keys / (width · (2r+1)²)`` rows, 1 GiB of float32 keys
    by default).
    """
    import jax.numpy as jnp

    h, w = fine.shape[1:]
    side = 2 * radius + 1
    rows = int(max(1, min(h, max_keys // (w * side * side))))
    n_strips = -(-h // rows)
    extra = n_strips * rows - h  # pad the bottom so every strip has the same shape
    pad = ((0, 0), (radius, radius + extra), (radius, radius))
    fine_pad = jnp.asarray(np.pad(fine.astype(np.float32), pad, constant_values=np.nan))
    change_pad = jnp.asarray(np.pad(change.astype(np.float32), pad, constant_values=np.nan))
    use_pad = jnp.asarray(np.pad(use, pad[1:], constant_values=False))
    thr = jnp.asarray(np.pad(threshold.astype(np.float32), ((0, 0), (0, extra), (0, 0)), constant_values=np.nan))
    rank_j = jnp.asarray(rank, dtype=jnp.float32)
    fn = _strip_fn(radius, min(k, side * side))
    parts = [fn(fine_pad, change_pad, use_pad, thr[:, y0 : y0 + rows], rank_j, y0) for y0 in range(0, h, rows)]
    out = np.asarray(jnp.concatenate(parts, axis=1), dtype=np.float64)
    return out[:, :h]
