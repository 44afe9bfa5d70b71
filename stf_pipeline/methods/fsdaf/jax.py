"""FSDAF on an accelerator with JAX: every step of a block in one jitted program.

:func:`fsdaf_block` moves a block's three images to JAX's default device once, runs steps (a)-(g)
and IDL's final range fix there (:func:`fsdaf_steps`, one compiled program per block shape and
settings) and brings the float32 prediction back once. Each step is the JAX form of the NumPy/Numba
step of the reference backend, with the same rules in the same order:

* steps (a)-(f) and the range fix run in float64 (under ``jax.enable_x64``), as the reference:
  nearest-centre labels, the purity keys of the unmixing (int64) and its percentile filter are
  selections that float32 rounding would change, and the unmixing systems are ill-conditioned
  (ridge ``1e-6``). They agree with the reference to float64 rounding (sums in another order,
  multiply-adds XLA may fuse);
* step (g), :func:`blend_traced`, works in float32 as before: float32 ranking keys built with the
  same operations in the same band order as the Numba kernel, the ``k`` smallest chosen by
  ``jax.lax.top_k`` (the lower index first among equal values, so ties go to the earlier offset in
  scan order, as on the CPU), weighted by ``1 / ((1 + d / r)(1 + S))`` in float32 (float64 on the
  CPU: the two agree to float32 rounding). Work goes in strips of rows of one height (the last
  padded) mapped by ``lax.map``: the keys of a strip are ``strip · width · (2r+1)²`` float32
  values, built one window row per step of a ``fori_loop``.

Nothing leaves the device between the two transfers: the rare least-squares problems whose active
set does not settle are finished there too (:func:`stf_pipeline.kernels.lstsq.box_lstsq_jax`).
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Any

import numpy as np

from stf_pipeline.kernels.cells import cell_mean, from_cells, to_cells
from stf_pipeline.kernels.classify import nearest_centre_jax
from stf_pipeline.kernels.device import to_host
from stf_pipeline.kernels.lstsq import box_lstsq_jax
from stf_pipeline.kernels.tps import local_tps_jax
from stf_pipeline.kernels.window import box_sum_jax, window_index, window_reduce_jax
from stf_pipeline.methods.fsdaf.params import (
    CHANGE_PERCENTILES,
    MAX_RESIDUAL_WEIGHT,
    MIN_FRACTION,
    RESIDUAL_EPS,
    RIDGE,
)
from stf_pipeline.methods.fsdaf.unmix import offset_rank

# ----- cells and windows ------------------------------------------------------------------


def class_fractions(labels: Any, n_classes: int, factor: int) -> tuple[Any, Any]:
    """:func:`stf_pipeline.methods.fsdaf.unmix.class_fractions`: fractions ``(class, hc, wc)``
    (NaN in cells without a classified pixel) and the complete cells ``(hc, wc)``."""
    import jax.numpy as jnp

    cells = to_cells(labels, factor, -2)  # -2 = outside the image
    counts = jnp.stack([(cells == c).sum(axis=(-3, -1)) for c in range(n_classes)]).astype(jnp.float64)
    classified = counts.sum(axis=0)
    complete = ((cells >= 0) | (cells == -2)).all(axis=(-3, -1)) & (classified > 0)
    fractions = jnp.where(classified > 0, counts / jnp.where(classified > 0, classified, 1.0), jnp.nan)
    return fractions, complete


def _windows(a: Any, radius: int, fill: Any) -> Any:
    """``(..., hc, wc) -> (..., hc, wc, (2r+1)²)`` windows around every cell, ``fill`` outside."""
    import jax.numpy as jnp

    pad = [(0, 0)] * (a.ndim - 2) + [(radius, radius), (radius, radius)]
    iy, ix = window_index(a.shape[-2:], radius)
    return jnp.pad(a, pad, constant_values=fill)[..., iy, ix]


def window_extreme(values: Any, radius: int, *, minimum: bool) -> Any:
    """Min (or max) of the finite values over the ``(2r+1)²`` window on the last two axes."""
    import jax.numpy as jnp
    from jax import lax

    fill = jnp.inf if minimum else -jnp.inf
    x = jnp.where(jnp.isfinite(values), values, fill)
    return window_reduce_jax(x, radius, lax.min if minimum else lax.max, fill)


def window_stats(values: Any, radius: int) -> tuple[Any, Any, Any]:
    """Count, mean and sample standard deviation of the finite values in the cell window."""
    import jax.numpy as jnp

    valid = jnp.isfinite(values)
    x = jnp.where(valid, values, 0.0)
    count = box_sum_jax(valid.astype(x.dtype), radius)
    total = box_sum_jax(x, radius)
    square = box_sum_jax(x * x, radius)
    mean = total / count
    return count, mean, _sample_std(count, mean, square)


def _sample_std(count: Any, mean: Any, square: Any) -> Any:
    """``sqrt(max((Σx² - n·mean²) / (n - 1), 0))``; NaN for fewer than two values, as in NumPy
    (where the numerator of one value is exactly 0: XLA may contract it into a fused multiply-add)."""
    import jax.numpy as jnp

    var = jnp.where(count > 1, (square - count * mean * mean) / (count - 1), jnp.nan)
    return jnp.sqrt(jnp.maximum(var, 0.0))


# ----- (c) constrained unmixing -----------------------------------------------------------


def change_bounds(coarse_change: Any, radius: int) -> tuple[Any, Any]:
    """Bounds of the class change per band and cell: window ``min - std`` and ``max + std``."""
    import jax.numpy as jnp

    std = jnp.nan_to_num(window_stats(coarse_change, radius)[2])
    low = window_extreme(coarse_change, radius, minimum=True) - std
    high = window_extreme(coarse_change, radius, minimum=False) + std
    return low, high


def _purest(fractions_w: Any, usable_w: Any, radius: int, n_pure: int) -> tuple[Any, Any]:
    """Window offsets of each class's (at most) ``n_pure`` purest usable cells and whether each is one.

    The int64 keys of :func:`stf_pipeline.methods.fsdaf.unmix.unmix_change` (fraction quantised
    to 2⁻³¹, descending, then the offset's distance rank); unique, so the chosen set is that of
    the reference. Returns the offsets ``(class, hc, wc, P)`` and their validity.
    """
    import jax.numpy as jnp
    from jax import lax

    side2 = fractions_w.shape[-1]
    scale = np.int64(1) << 31
    quantised = jnp.rint(fractions_w * scale).astype(jnp.int64)
    invalid = np.iinfo(np.int64).max
    rank = jnp.asarray(offset_rank(radius))
    usable = usable_w[None] & (fractions_w > MIN_FRACTION)
    keys = jnp.where(usable, (scale - quantised) * side2 + rank, invalid)
    n_keep = min(n_pure, side2)
    neg, index = lax.top_k(-keys, n_keep)
    return index, -neg < invalid


def unmix_change(fractions: Any, coarse_change: Any, usable: Any, *, radius: int, n_pure: int) -> Any:
    """:func:`stf_pipeline.methods.fsdaf.unmix.unmix_change` for JAX arrays, every cell at once.

    The same rows (each class's purest cells of the window, those within the 10th-90th
    percentile values of their coarse change), the same ridge and bounds, solved by
    :func:`stf_pipeline.kernels.lstsq.box_lstsq_jax`.

    Returns
    -------
    jax.Array ``(band, class, hc, wc)``
    """
    import jax.numpy as jnp

    n_classes = fractions.shape[0]
    frac_w = _windows(jnp.where(usable, jnp.nan_to_num(fractions), 0.0), radius, 0.0)  # (class, hc, wc, side2)
    use_w = _windows(usable, radius, False)
    dc_w = _windows(jnp.where(usable, coarse_change, 0.0), radius, 0.0)  # (band, hc, wc, side2)
    low, high = change_bounds(coarse_change, radius)
    mean = jnp.nan_to_num(window_stats(coarse_change, radius)[1])
    index, valid = _purest(frac_w, use_w, radius, n_pure)  # (class, hc, wc, P)
    rows = jnp.take_along_axis(frac_w[:, None], index[None], axis=-1)  # (feature, class, hc, wc, P)
    y = jnp.take_along_axis(dc_w[:, None], index[None], axis=-1)  # (band, class, hc, wc, P)
    n = valid.sum(axis=-1)
    ordered = jnp.sort(jnp.where(valid[None], y, jnp.inf), axis=-1)
    lo_q, hi_q = CHANGE_PERCENTILES
    top = jnp.maximum(n - 1, 0)
    lo_i = jnp.clip(jnp.floor(lo_q * n + 1e-9).astype(jnp.int64), 0, top)
    hi_i = jnp.clip(jnp.floor(hi_q * n + 1e-9).astype(jnp.int64), 0, top)
    lo_v = jnp.take_along_axis(ordered, jnp.broadcast_to(lo_i[None, ..., None], (*y.shape[:-1], 1)), axis=-1)
    hi_v = jnp.take_along_axis(ordered, jnp.broadcast_to(hi_i[None, ..., None], (*y.shape[:-1], 1)), axis=-1)
    keep = (valid[None] & (y >= lo_v) & (y <= hi_v)).astype(y.dtype)  # (band, class, hc, wc, P)
    gram = jnp.einsum("bchwp,kchwp,lchwp->bhwkl", keep, rows, rows) + RIDGE * jnp.eye(n_classes)
    rhs = jnp.einsum("bchwp,kchwp->bhwk", keep * y, rows) + RIDGE * mean[..., None]
    return jnp.moveaxis(box_lstsq_jax(gram, rhs, low, high), -1, 1)


# ----- (d) temporal prediction and residuals, (f) residual distribution --------------------


def temporal_prediction(fine: Any, labels: Any, change: Any, factor: int) -> Any:
    """``F1 + Δf[class]`` using the change of each pixel's own cell; NaN for unclassified pixels."""
    import jax.numpy as jnp

    nb, n_classes, hc, wc = change.shape
    h, w = labels.shape
    cy = (jnp.arange(h) // factor)[:, None]
    cx = (jnp.arange(w) // factor)[None, :]
    flat = (jnp.maximum(labels, 0) * hc + cy) * wc + cx
    own = change.reshape(nb, n_classes * hc * wc)[:, flat]
    return jnp.where(labels >= 0, fine + own, jnp.nan)


def residuals(coarse_change: Any, fractions: Any, change: Any) -> Any:
    """Coarse residual ``R = ΔC - Σ_c f_c Δf_c`` per band and cell (paper Eq. 6-8)."""
    import jax.numpy as jnp

    return coarse_change - jnp.einsum("khw,bkhw->bhw", jnp.nan_to_num(fractions), change)


def heterogeneity(labels: Any, n_classes: int, radius: int) -> Any:
    """Homogeneity index: share of the window (truncated at the edges) in the pixel's own class,
    0 if unclassified; exact counts as :func:`stf_pipeline.methods.fsdaf.residual.heterogeneity`."""
    import jax.numpy as jnp

    h, w = labels.shape
    rows, cols = jnp.arange(h), jnp.arange(w)
    # pixels of each window inside the image, from its extent (a window sum of ones would be
    # constant-folded by XLA, slowly)
    height = jnp.minimum(rows + radius + 1, h) - jnp.maximum(rows - radius, 0)
    width = jnp.minimum(cols + radius + 1, w) - jnp.maximum(cols - radius, 0)
    area = (height[:, None] * width[None, :]).astype(jnp.float64)
    same = jnp.zeros(labels.shape, jnp.float64)
    for c in range(n_classes):
        is_c = labels == c
        same = jnp.where(is_c, box_sum_jax(is_c.astype(jnp.float64), radius), same)
    return same / area


def distribute_residual(
    residual: Any, tps: Any, temporal: Any, het: Any, factor: int, *, low: Any, high: Any, base: Any
) -> Any:
    """``clip(F_TP + W·R, low, high) - base``: the bounded form of
    :func:`stf_pipeline.methods.fsdaf.residual.distribute_residual`, every cell at once.

    Parameters
    ----------
    residual, low, high : jax.Array ``(band, hc, wc)``
    tps, temporal, base : jax.Array ``(band, y, x)``
    het : jax.Array ``(y, x)``
    factor : int
    """
    import jax.numpy as jnp

    shape = tps.shape[1:]
    tp = to_cells(temporal, factor, jnp.nan)
    e = to_cells(tps, factor, jnp.nan) - tp
    hi = to_cells(het, factor, jnp.nan)[None]
    r = residual[:, :, None, :, None]
    e = jnp.where(r <= 0.0, jnp.where(e > 0.0, 0.0, e), jnp.where(e < 0.0, 0.0, e))  # keep the sign of r
    weight = jnp.abs(e) * hi + jnp.abs(r) * (1.0 - hi) + RESIDUAL_EPS
    finite = jnp.isfinite(weight)
    count = finite.sum(axis=(-3, -1), keepdims=True)

    def mean(x: Any) -> Any:
        return jnp.where(finite, x, 0.0).sum(axis=(-3, -1), keepdims=True) / count

    weight = weight / mean(weight)
    weight = jnp.where(weight > MAX_RESIDUAL_WEIGHT, mean(weight), weight)
    value = tp + weight / mean(weight) * r
    value = jnp.where(value < low[:, :, None, :, None], low[:, :, None, :, None], value)  # NaN stays NaN
    value = jnp.where(value > high[:, :, None, :, None], high[:, :, None, :, None], value)
    return from_cells(value, shape) - base


def _cell_extremes(a: Any, factor: int, mask: Any | None = None) -> tuple[Any, Any]:
    """Min and max of the finite values (where ``mask``) of each cell; ``±inf`` where none."""
    import jax.numpy as jnp

    cells = to_cells(a, factor, jnp.nan)
    ok = jnp.isfinite(cells) if mask is None else jnp.isfinite(cells) & to_cells(mask, factor, False)
    low = jnp.where(ok, cells, jnp.inf).min(axis=(-3, -1))
    high = jnp.where(ok, cells, -jnp.inf).max(axis=(-3, -1))
    return low, high


def allowed_range(
    coarse_target: Any, fine: Any, labels: Any, change: Any, factor: int, radius: int,
    valid_range: tuple[float, float],
) -> tuple[Any, Any]:
    """:func:`stf_pipeline.methods.fsdaf.residual.allowed_range` for JAX arrays."""
    import jax.numpy as jnp

    c_low, c_high = _cell_extremes(coarse_target, factor)
    c_min = window_extreme(c_low, radius, minimum=True)
    c_max = window_extreme(c_high, radius, minimum=False)
    t_min = jnp.full(c_min.shape, jnp.inf)
    t_max = jnp.full(c_max.shape, -jnp.inf)
    for c in range(change.shape[1]):
        f_low, f_high = _cell_extremes(fine, factor, labels == c)
        t_min = jnp.fmin(t_min, window_extreme(f_low, radius, minimum=True) + change[:, c])
        t_max = jnp.fmax(t_max, window_extreme(f_high, radius, minimum=False) + change[:, c])
    low = jnp.maximum(jnp.fmin(c_min, t_min), valid_range[0])
    high = jnp.minimum(jnp.fmax(c_max, t_max), valid_range[1])
    return low, high


def similarity_threshold(fine: Any, labels: Any, n_classes: int, factor: int, radius: int) -> Any:
    """:func:`stf_pipeline.methods.fsdaf.residual.similarity_threshold` for JAX arrays:
    ``2 · std(F1) / n`` per band and cell over the cell window."""
    import jax.numpy as jnp

    cells = to_cells(fine, factor, jnp.nan)
    valid = jnp.isfinite(cells)
    x = jnp.where(valid, cells, 0.0)
    count = box_sum_jax(valid.sum(axis=(-3, -1)).astype(x.dtype), radius)
    total = box_sum_jax(x.sum(axis=(-3, -1)), radius)
    square = box_sum_jax((x * x).sum(axis=(-3, -1)), radius)
    std = _sample_std(count, total / count, square)
    lab_cells = to_cells(labels, factor, -1)
    present = jnp.zeros(std.shape[1:], x.dtype)
    for c in range(n_classes):
        has = (lab_cells == c).any(axis=(-3, -1)).astype(x.dtype)
        present = present + (box_sum_jax(has, radius) > 0)
    return 2.0 * std / jnp.maximum(present, 1.0)


def range_fix(pred: Any, f1: Any, c1: Any, c2: Any, valid_range: tuple[float, float]) -> Any:
    """IDL's last correction: outside ``valid_range``, use ``F1 + C(t) - C(t1)``, clipped to it."""
    import jax.numpy as jnp

    lo, hi = valid_range
    fallback = jnp.clip(f1 + c2 - c1, lo, hi)
    return jnp.where((pred < lo) | (pred > hi), fallback, pred)


# ----- (g) similar pixels -----------------------------------------------------------------


def _strip(fine_pad: Any, change_pad: Any, use_pad: Any, threshold: Any, rank: Any, y0: Any, *, radius: int,
           k: int) -> Any:
    """Weighted change of the ``k`` most similar pixels of the ``strip`` rows from ``y0``, float32.

    ``fine_pad``, ``change_pad``: ``(band, H + 2r, W + 2r)`` float32, NaN outside; ``use_pad``:
    ``(H + 2r, W + 2r)``; ``threshold``: ``(band, strip, W)`` of this strip; ``rank``:
    ``(side, side)`` float32.
    """
    import jax.numpy as jnp
    from jax import lax

    side = 2 * radius + 1
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
    dist = jnp.sqrt(((dy - radius) ** 2 + (dx - radius) ** 2).astype(jnp.float32)) / jnp.float32(radius)
    neighbour = slab[:, yy, xx]  # (band, rows, W, k)
    c = centre[..., None]
    spectral = (jnp.abs(neighbour - c) / (c + jnp.float32(1e-8))).sum(axis=0)
    weight = jnp.where(chosen, jnp.float32(1.0) / ((jnp.float32(1.0) + dist) * (jnp.float32(1.0) + spectral)),
                       jnp.float32(0.0))
    total = weight.sum(axis=-1)
    changes = lax.dynamic_slice(change_pad, (0, y0, 0), change_pad.shape[:1] + slab.shape[1:])[:, yy, xx]
    est = (weight * jnp.where(chosen, changes, jnp.float32(0.0))).sum(axis=-1) / total
    finite = jnp.isfinite(centre).all(axis=0)
    return jnp.where((total > 0) & finite, est, jnp.float32(jnp.nan))


def blend_traced(fine: Any, change: Any, threshold: Any, use: Any, rank: Any, *, radius: int, k: int,
                 max_keys: int = 1 << 28) -> Any:
    """Weighted change of the ``k`` most similar pixels, ``(band, y, x)`` float32 (traceable).

    Same arguments as :func:`stf_pipeline.methods.fsdaf.numba.blend`; ``max_keys`` bounds the
    keys of one strip (strip height = ``max_keys / (width · (2r+1)²)`` rows, 1 GiB of float32
    keys by default).
    """
    import jax.numpy as jnp
    from jax import lax

    nb, h, w = fine.shape
    side = 2 * radius + 1
    rows = int(max(1, min(h, max_keys // (w * side * side))))
    n_strips = -(-h // rows)
    extra = n_strips * rows - h  # pad the bottom so every strip has the same shape
    pad = ((0, 0), (radius, radius + extra), (radius, radius))
    fine_pad = jnp.pad(fine.astype(jnp.float32), pad, constant_values=jnp.nan)
    change_pad = jnp.pad(change.astype(jnp.float32), pad, constant_values=jnp.nan)
    use_pad = jnp.pad(use, pad[1:], constant_values=False)
    thr = jnp.pad(threshold.astype(jnp.float32), ((0, 0), (0, extra), (0, 0)), constant_values=jnp.nan)
    rank32 = rank.astype(jnp.float32)

    def one(y0: Any) -> Any:
        strip = lax.dynamic_slice_in_dim(thr, y0, rows, axis=1)
        return _strip(fine_pad, change_pad, use_pad, strip, rank32, y0, radius=radius, k=min(k, side * side))

    parts = lax.map(one, jnp.arange(n_strips) * rows)  # (strip, band, rows, W)
    return jnp.moveaxis(parts, 0, 1).reshape(nb, n_strips * rows, w)[:, :h]


@functools.lru_cache(maxsize=16)
def _blend_program(radius: int, k: int, max_keys: int) -> Any:
    import jax

    return jax.jit(functools.partial(blend_traced, radius=radius, k=k, max_keys=max_keys))


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
    """:func:`blend_traced` from and to the host, ``(band, y, x)`` float64: the arguments of
    :func:`stf_pipeline.methods.fsdaf.numba.blend`, cast to float32 before they move."""
    args = (fine.astype(np.float32), change.astype(np.float32), threshold.astype(np.float32), use,
            rank.astype(np.float32))
    return np.asarray(_blend_program(radius, k, max_keys)(*args), dtype=np.float64)


# ----- the whole block --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockSettings:
    """The static settings of one compiled FSDAF program (:func:`fsdaf_block`).

    Attributes
    ----------
    factor, n_classes, unmix_radius, n_pure, tps_radius, half_window, n_similar : int
        As :class:`stf_pipeline.methods.fsdaf.FSDAFParams` (``n_classes``: the classes in use).
    valid_range : (float, float)
    labels_given : bool
        The block's labels come from the host (a class map) rather than nearest centres.
    max_keys : int, default ``2**28``
        Ranking keys of one strip of step (g) (:func:`blend_traced`).
    """

    factor: int
    n_classes: int
    unmix_radius: int
    n_pure: int
    tps_radius: int
    half_window: int
    n_similar: int
    valid_range: tuple[float, float]
    labels_given: bool
    max_keys: int = 1 << 28


def fsdaf_steps(fine: Any, coarse: Any, coarse_target: Any, classes: Any, clip: Any, rank: Any, *,
                settings: BlockSettings) -> Any:
    """FSDAF of one block, steps (a)-(g) and the range fix, traceable (float64 under ``jax.enable_x64``).

    Parameters
    ----------
    fine, coarse, coarse_target : jax.Array ``(band, y, x)``
        The pair's fine and coarse images and the target coarse image.
    classes : jax.Array
        Class centres ``(class, band)``, or with ``settings.labels_given`` the labels ``(y, x)``
        int32 of :func:`stf_pipeline.methods.fsdaf.classify` (``-1`` unknown).
    clip : jax.Array ``(2, band)``
        Lower and upper clip of the fine image (noise clip within the valid range).
    rank : jax.Array ``(2w+1, 2w+1)``
        Distance factor of the ranking key of step (g) per window offset.
    settings : BlockSettings

    Returns
    -------
    jax.Array ``(band, y, x)`` float32
    """
    import jax.numpy as jnp

    s = settings
    f1, c1, c2 = (jnp.asarray(a, jnp.float64) for a in (fine, coarse, coarse_target))
    labels = classes if s.labels_given else nearest_centre_jax(f1, classes)
    f1c = jnp.where(jnp.isfinite(f1), jnp.clip(f1, clip[0][:, None, None], clip[1][:, None, None]), jnp.nan)
    fractions, complete = class_fractions(labels, s.n_classes, s.factor)
    c2_cells = cell_mean(c2, s.factor)
    dc = c2_cells - cell_mean(c1, s.factor)
    usable = complete & jnp.isfinite(dc).all(axis=0)
    change = unmix_change(fractions, dc, usable, radius=s.unmix_radius, n_pure=s.n_pure)
    temporal = temporal_prediction(f1c, labels, change, s.factor)
    residual = residuals(dc, fractions, change)
    h, w = labels.shape
    tps = local_tps_jax(c2_cells, s.factor, s.tps_radius, (h, w))
    het = heterogeneity(labels, s.n_classes, s.half_window)
    low, high = allowed_range(c2, f1c, labels, change, s.factor, s.unmix_radius, s.valid_range)
    pixel_change = distribute_residual(residual, tps, temporal, het, s.factor, low=low, high=high, base=f1c)
    cells = similarity_threshold(f1, labels, s.n_classes, s.factor, s.unmix_radius)
    threshold = jnp.repeat(jnp.repeat(cells, s.factor, axis=1), s.factor, axis=2)[:, :h, :w]
    use = jnp.isfinite(f1).all(axis=0) & jnp.isfinite(pixel_change).all(axis=0)
    side = 2 * s.half_window + 1
    k = min(s.n_similar, side * side)
    blended = f1 + blend_traced(f1, pixel_change, threshold, use, rank, radius=s.half_window, k=k,
                                max_keys=s.max_keys)
    return range_fix(blended, f1, c1, c2, s.valid_range).astype(jnp.float32)


#: One block's program runs at a time in a process: XLA's CPU client deadlocked when two threads ran
#: it at once (jax 0.10.2, a batched LAPACK solve after fusions, 2 cores); a GPU runs them in turn anyway.
_RUNNING = threading.Lock()


@functools.lru_cache(maxsize=16)
def _program(settings: BlockSettings) -> Any:
    import jax

    return jax.jit(functools.partial(fsdaf_steps, settings=settings))


def fsdaf_block(fine: np.ndarray, coarse: np.ndarray, coarse_target: np.ndarray, classes: np.ndarray,
                clip: np.ndarray, rank: np.ndarray, *, settings: BlockSettings) -> np.ndarray:
    """FSDAF of one block on JAX's default device: :func:`fsdaf_steps` in one compiled program per
    block shape and ``settings``, one block at a time in a process; the inputs move to the device
    once (as given: float32 from the engine), the float32 prediction comes back once.

    Parameters are those of :func:`fsdaf_steps`, as NumPy arrays.

    Returns
    -------
    ndarray ``(band, y, x)`` float32
    """
    import jax

    with _RUNNING, jax.enable_x64(True):
        return to_host(_program(settings)(fine, coarse, coarse_target, classes, clip, rank))
