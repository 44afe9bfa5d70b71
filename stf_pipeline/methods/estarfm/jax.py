"""ESTARFM as jitted whole-block programs on JAX's default device (backends ``jax`` and ``pallas``).

The preparation and the window sums run in one float32 program, the sums by the XLA driver
(:func:`stf_pipeline.kernels.similar.window_sums`, backend ``jax``) or the Pallas kernel
(:mod:`stf_pipeline.methods.estarfm.pallas`, backend ``pallas``); the prediction from the sums
runs on the device in float64 (:func:`predict_xp`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from stf_pipeline.kernels.device import to_host
from stf_pipeline.kernels.pallas import Layout
from stf_pipeline.kernels.similar import device_block, window_sums
from stf_pipeline.kernels.window import box_sum_jax
from stf_pipeline.methods.estarfm.core import (
    CHANGE_EPS,
    FILLS,
    accumulators,
    body,
    f_table,
    prepare_arrays,
    scene_constants,
)
from stf_pipeline.methods.estarfm.pallas import pallas_sums
from stf_pipeline.methods.estarfm.params import EstarfmParams


@functools.lru_cache(maxsize=16)
def _jax_program(radius: int, tile: int, pallas: bool, layout: Layout | None = None) -> Any:
    """The jitted whole-block preparation and window sums of ESTARFM (float32): by the XLA
    driver or (``pallas``) the Pallas kernel in ``layout``; also the valid mask, for the prediction."""
    import jax
    import jax.numpy as jnp

    def run(fine: Any, coarse: Any, coarse_target: Any, threshold: Any) -> tuple[list[Any], Any]:
        centre, neighbour, valid = prepare_arrays(jnp, fine, coarse, coarse_target)
        if pallas:
            return pallas_sums(neighbour, threshold, radius, layout), valid
        constants = {"threshold": threshold, "inverse_radius": np.float32(1.0 / radius)}
        sums = window_sums(
            body,
            centre,
            neighbour,
            constants,
            radius=radius,
            accumulators=accumulators(fine.shape[1], np.float32),
            tile=tile,
            fills=FILLS,
        )
        return sums, valid

    return jax.jit(run)


def predict_xp(
    xp: Any,
    sums: list[Any],
    fine: Any,
    change_sum: Any,
    n_valid: Any,
    valid: Any,
    table: np.ndarray,
    params: EstarfmParams,
) -> Any:
    """ESTARFM's per-pixel prediction from the window sums as whole-array float64 operations
    (``jax.numpy`` on the device; the formulas of the compiled host prediction,
    :func:`stf_pipeline.methods.estarfm.numba.estarfm_finish`)."""
    count, total, *rest = (a.astype(np.float64) for a in sums)
    wchange1, wchange2, wfine1, wfine2, sx, sd, sy, sxx, syy, sxy = rest
    f1, f2 = fine[0].astype(np.float64), fine[1].astype(np.float64)
    eps = CHANGE_EPS
    # temporal weights from the window means over the valid pixels
    d1, d2 = change_sum[0] / n_valid, change_sum[1] / n_valid
    inv1, inv2 = 1.0 / (xp.abs(d1) + eps), 1.0 / (xp.abs(d2) + eps)
    t1, t2 = inv1 / (inv1 + inv2), inv2 / (inv1 + inv2)
    # too few similar pixels: the window-mean coarse changes
    g1, g2 = d1 + eps, d2 + eps
    u1, u2 = 1.0 / xp.abs(g1), 1.0 / xp.abs(g2)
    few = u1 / (u1 + u2) * (f1 + g1) + u2 / (u1 + u2) * (f2 + g2)
    # conversion coefficient: regression of fine on coarse, similar pixels of both dates
    n = 2.0 * count
    cxx, cyy, cxy = sxx - sx * sx / n, syy - sy * sy / n, sxy - sx * sy / n
    slope = cxy / cxx
    r2 = cxy * cxy / (cxx * cyy)
    fstat = xp.where(r2 < 1.0, r2 * (n - 2.0) / (1.0 - r2), np.inf)
    critical = xp.asarray(table)[xp.clip(n, 0, table.size - 1).astype(np.int32)]
    significant = (cxx > 0) & (cyy > 0) & (fstat >= critical)
    changed = xp.abs(sd) / count >= params.min_coarse_change
    keep = changed & significant & (slope > 0) & (slope <= params.max_conversion)
    conversion = xp.where(keep, slope, 1.0)
    pred = t1 * (f1 + conversion * wchange1 / total) + t2 * (f2 + conversion * wchange2 / total)
    lo, hi = params.value_range
    pred = xp.where((pred <= lo) | (pred >= hi), (t1 * wfine1 + t2 * wfine2) / total, pred)
    pred = xp.where(count < params.min_similar, few, pred)
    return xp.where(valid, pred, np.nan).astype(np.float32)


@functools.lru_cache(maxsize=16)
def _predict_program(params: EstarfmParams) -> Any:
    """Jitted device prediction from the sums (float64: call it under ``jax.enable_x64``)."""
    import jax

    radius = params.half_window
    table = f_table(2 * (2 * radius + 1) ** 2, params.significance)

    def run(sums: list[Any], valid: Any, fine: Any, coarse: Any, coarse_target: Any) -> Any:
        import jax.numpy as jnp

        c, t = coarse.astype(np.float64), coarse_target.astype(np.float64)
        n_valid = box_sum_jax(valid.astype(np.float64), radius)
        change_sum = box_sum_jax(jnp.where(valid, t[None] - c, 0.0), radius)
        return predict_xp(jnp, sums, fine, change_sum, n_valid, valid, table, params)

    return jax.jit(run)


def on_device(
    fine: np.ndarray,
    coarse: np.ndarray,
    coarse_target: np.ndarray,
    *,
    params: EstarfmParams,
    model: object | None = None,
    pallas: bool,
    layout: Layout | None = None,
) -> np.ndarray:
    """ESTARFM of one block on JAX's default device: float32 window sums as ``lax.fori_loop`` over
    offsets in tiles, or (``pallas``) by the Pallas kernel in ``layout`` (default: its ``LAYOUT``;
    fastest on GPUs, interpreted on CPUs); the float64 prediction on the device."""
    import jax

    constants = scene_constants(fine, params)
    inputs, tile = device_block((fine, coarse, coarse_target), params.tile)
    sums, valid = _jax_program(params.half_window, tile, pallas, layout)(*inputs, constants["threshold"])
    ny, nx = np.shape(coarse_target)[-2:]
    with jax.enable_x64(True):
        out = _predict_program(dataclasses.replace(params, class_std=None))(sums, valid, *inputs)
        return to_host(out[:, :ny, :nx])


#: ESTARFM of one block, backend ``jax`` (any JAX device).
estarfm_jax = functools.partial(on_device, pallas=False)
#: ESTARFM of one block, backend ``pallas`` (GPUs).
estarfm_pallas = functools.partial(on_device, pallas=True)
