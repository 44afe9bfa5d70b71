"""STFDCNN's prediction of one block: the two levels (NLM, then SR) and the high-pass modulation
and weighting of the pairs at each; the engine kernel."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from stf_pipeline.exceptions import ModelError
from stf_pipeline.kernels.device import to_host
from stf_pipeline.methods.stfdcnn.config import Architecture
from stf_pipeline.methods.stfdcnn.networks import _all_bands_finite, _window, block_mean, erode, run_cnn, upsample
from stf_pipeline.methods.stfdcnn.params import COMPUTE_DTYPES, STFDCNNParams, _unpack, required_halo


def modulate_and_weight(
    target: jax.Array,
    transitional: jax.Array,
    known: jax.Array,
    valid: jax.Array,
    params: STFDCNNParams,
) -> tuple[jax.Array, jax.Array]:
    """High-pass modulation of each pair's known image, weighted by the transitional change.

    Parameters
    ----------
    target : ``(band, y, x)``
        Transitional image at the target date ``T_t``.
    transitional : ``(pair, band, y, x)``
        Transitional images at the pair dates ``T_k``.
    known : ``(pair, band, y, x)``
        Known images at the pair dates ``L_k`` (finite where ``valid``).
    valid : ``(pair, y, x)`` bool
        Where pair ``k`` can predict.

    Returns
    -------
    prediction ``(band, y, x)`` (NaN where no pair is valid), valid ``(y, x)`` bool
    """
    floor = params.min_reflectance
    gain = jnp.maximum(target[None], floor) / jnp.maximum(transitional, floor)
    gain = jnp.clip(gain, 1.0 / params.max_gain, params.max_gain)
    predictions = target[None] + gain * (known - transitional)
    mask = jnp.broadcast_to(valid[:, None], predictions.shape).astype(jnp.float32)
    radius = params.weight_window // 2
    change = jnp.abs(target[None] - transitional) * mask
    mean_change = _window(change, radius, "sum") / jnp.maximum(_window(mask, radius, "sum"), 1.0)
    weights = mask / (mean_change + params.eps)
    total = weights.sum(axis=0)
    fused = (weights * jnp.where(mask > 0, predictions, 0.0)).sum(axis=0) / jnp.maximum(total, 1e-30)
    any_valid = valid.any(axis=0)
    return jnp.where(any_valid[None], fused, jnp.nan), any_valid


@functools.partial(jax.jit, static_argnames=("arch", "params"))
def predict_block(
    nlm_params: Any,
    sr_params: Any,
    fine: jax.Array,
    coarse: jax.Array,
    coarse_target: jax.Array,
    *,
    arch: Architecture,
    params: STFDCNNParams,
) -> jax.Array:
    """The STFDCNN prediction of one block (see module docstring); pure and jitted.

    ``fine``/``coarse`` are ``(pair, band, y, x)``, ``coarse_target`` ``(band, y, x)``; the block
    must start on a multiple of ``arch.lsr_factor`` (the engine aligns blocks to ``coarse_factor``).
    """
    with jax.default_matmul_precision(COMPUTE_DTYPES[params.compute_dtype]):
        return _predict(nlm_params, sr_params, fine, coarse, coarse_target, arch=arch, params=params)


def _predict(
    nlm_params: Any,
    sr_params: Any,
    fine: jax.Array,
    coarse: jax.Array,
    coarse_target: jax.Array,
    *,
    arch: Architecture,
    params: STFDCNNParams,
) -> jax.Array:
    """Body of :func:`predict_block`, traced under the precision of ``params.compute_dtype``."""
    r = arch.lsr_factor
    shape = (fine.shape[-2], fine.shape[-1])
    dtype = jnp.bfloat16 if params.compute_dtype == "bfloat16" else jnp.float32
    n_pairs = fine.shape[0]

    # LSR level: transitional images from the NLM CNN, modulation of the pairs' LSR fine images.
    coarse_lsr = block_mean(jnp.concatenate([coarse, coarse_target[None]], axis=0), r)
    fine_lsr = block_mean(fine, r)
    coarse_ok = erode(_all_bands_finite(coarse_lsr), arch.nlm.receptive_radius)
    trans_lsr = run_cnn(nlm_params, arch.nlm, jnp.nan_to_num(coarse_lsr), dtype=dtype)
    fine_lsr_ok = _all_bands_finite(fine_lsr)
    valid_lsr = coarse_ok[:n_pairs] & coarse_ok[n_pairs][None] & fine_lsr_ok
    target_lsr, target_lsr_ok = modulate_and_weight(
        trans_lsr[n_pairs], trans_lsr[:n_pairs], jnp.nan_to_num(fine_lsr), valid_lsr, params
    )

    # Fine level: transitional images from the SR CNN, modulation of the pairs' fine images.
    lsr_images = jnp.concatenate([fine_lsr, target_lsr[None]], axis=0)
    lsr_ok = jnp.concatenate([fine_lsr_ok, target_lsr_ok[None]], axis=0)
    up_ok = jnp.repeat(jnp.repeat(erode(lsr_ok, 2), r, axis=-2), r, axis=-1)[..., : shape[0], : shape[1]]
    sr_input = upsample(jnp.nan_to_num(lsr_images), r, shape)
    trans = run_cnn(sr_params, arch.sr, sr_input, dtype=dtype)
    trans_ok = erode(up_ok, arch.sr.receptive_radius)
    valid = trans_ok[:n_pairs] & trans_ok[n_pairs][None] & _all_bands_finite(fine)
    prediction, _ = modulate_and_weight(trans[n_pairs], trans[:n_pairs], jnp.nan_to_num(fine), valid, params)
    return prediction


def stfdcnn_kernel(
    fine: np.ndarray,
    coarse: np.ndarray,
    coarse_target: np.ndarray,
    *,
    params: STFDCNNParams,
    model: Any | None = None,
) -> np.ndarray:
    """Two-level STFDCNN prediction of one block (see module docstring)."""
    arch, nlm_params, sr_params = _unpack(model)
    if fine.shape[1] != len(arch.bands):
        raise ModelError(
            f"stfdcnn model was trained on {len(arch.bands)} bands {list(arch.bands)}, the cube block has "
            f"{fine.shape[1]}; fuse a cube with the same bands or train a new model."
        )
    needed = required_halo(arch, params)
    if params.halo is not None and params.halo < needed:
        raise ModelError(
            f"this stfdcnn model's networks need a halo of {needed} pixels, got halo={params.halo}; "
            f"pass halo={needed} or more, or leave it unset (stf.fuse sizes it from the model)."
        )
    out = predict_block(
        nlm_params,
        sr_params,
        jnp.asarray(fine),
        jnp.asarray(coarse),
        jnp.asarray(coarse_target),
        arch=arch,
        params=params,
    )
    return to_host(out).astype(np.float32, copy=False)
