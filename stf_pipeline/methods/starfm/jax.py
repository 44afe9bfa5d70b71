"""STARFM as one jitted whole-block program on JAX's default device (backends ``jax`` and ``pallas``).

The preparation, the window sums and the prediction stay on the device; the window sums are
the XLA driver's (:func:`stf_pipeline.kernels.similar.window_sums`, backend ``jax``) or the
Pallas kernel's (:mod:`stf_pipeline.methods.starfm.pallas`, backend ``pallas``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from stf_pipeline.kernels.device import to_host
from stf_pipeline.kernels.pallas import Layout
from stf_pipeline.kernels.similar import device_block, window_sums
from stf_pipeline.methods.starfm.core import either_body, finish, prepare_arrays, scene_constants, strict_body
from stf_pipeline.methods.starfm.pallas import pallas_sums
from stf_pipeline.methods.starfm.params import StarfmParams


@functools.lru_cache(maxsize=16)
def _jax_program(params: StarfmParams, tile: int, pallas: bool, layout: Layout | None = None) -> Any:
    """The jitted whole-block STARFM (preparation, window sums, prediction) for ``params``:
    the window sums by the XLA driver or (``pallas``) the Pallas kernel in ``layout``."""
    import jax
    import jax.numpy as jnp

    body = strict_body if params.filtering == "strict" else either_body

    def run(fine: Any, coarse: Any, coarse_target: Any, threshold: Any) -> Any:
        centre, neighbour = prepare_arrays(jnp, fine, coarse, coarse_target, params)
        if pallas:
            total, weighted = pallas_sums(centre, neighbour, threshold, params, layout)
        else:
            constants = {"threshold": threshold, "inverse_radius": np.float32(1.0 / params.window_radius)}
            specs = [((fine.shape[1],), np.float32)] * 2
            total, weighted = window_sums(
                body, centre, neighbour, constants, radius=params.window_radius, accumulators=specs, tile=tile
            )
        return finish(jnp, total, weighted, fine, coarse_target, neighbour, params)

    return jax.jit(run)


def on_device(
    fine: np.ndarray,
    coarse: np.ndarray,
    coarse_target: np.ndarray,
    *,
    params: StarfmParams,
    model: object | None = None,
    pallas: bool,
    layout: Layout | None = None,
) -> np.ndarray:
    """STARFM of one block on JAX's default device (float32): the window sums as ``lax.fori_loop``
    over offsets in tiles (:func:`stf_pipeline.kernels.similar.window_sums`), or (``pallas``) by the
    Pallas kernel of :mod:`stf_pipeline.methods.starfm.pallas` (fastest on GPUs, interpreted on CPUs)
    in ``layout`` (default: its ``LAYOUT``; ``stf bench layouts`` times others)."""
    constants = scene_constants(fine, params)
    inputs, tile = device_block((fine, coarse, coarse_target), params.tile)
    program = _jax_program(dataclasses.replace(params, class_std=None), tile, pallas, layout)
    ny, nx = np.shape(coarse_target)[-2:]
    return to_host(program(*inputs, constants["threshold"])[:, :ny, :nx])


#: STARFM of one block, backend ``jax`` (any JAX device).
starfm_jax = functools.partial(on_device, pallas=False)
#: STARFM of one block, backend ``pallas`` (GPUs).
starfm_pallas = functools.partial(on_device, pallas=True)
