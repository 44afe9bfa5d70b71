"""BiaSTF's inference: the forward pass of ``G`` then ``B``, the fade of the learned part beyond the
training changes, the fusion ``f`` of the two directions, and the engine kernel."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import weakref
from typing import Any

import numpy as np

from stf_pipeline.exceptions import MethodError
from stf_pipeline.kernels.device import to_device, to_host
from stf_pipeline.kernels.interpolate import cubic_between_centres
from stf_pipeline.kernels.padding import crop_block, extent_mask, masked_convolutions
from stf_pipeline.kernels.window import box_sum_jax
from stf_pipeline.methods.biastf.config import NET_RADIUS, BiaSTFConfig
from stf_pipeline.methods.biastf.networks import (
    Statistics,
    _apply_b,
    _apply_g,
    _base,
    _channels_last,
    _mixes_bands,
    _pair_images,
    _valid_within,
    make_networks,
)
from stf_pipeline.methods.biastf.params import FUSION_WEIGHTS, BiaSTFParams

log = logging.getLogger("stf_pipeline.methods.biastf")


def _local_mean(values: Any, ok: Any, radius: int) -> tuple[Any, Any]:
    """Mean of ``values`` over the valid (``ok``) pixels of the ``(2 radius + 1)²`` window, and the
    number of them, on the last two axes."""
    import jax.numpy as jnp

    count = box_sum_jax(ok.astype(jnp.float32), radius)
    return box_sum_jax(jnp.where(ok, values, 0.0), radius) / jnp.maximum(count, 1.0), count


def fuse_directions(
    pred: Any,
    coarse_target: Any,
    *,
    window: int,
    eps: float,
    weights: str = "similarity",
    coarse: Any = None,
    power: float = 1.0,
    spread_window: int | None = None,
) -> Any:
    """Fusion ``f``: weight the transitional predictions ``(n, band, y, x)`` per pixel and band.

    ``weights="similarity"``: ``S = |mean over window of (pred - C(k))|`` (valid pixels only),
    weight ``1 / (S + eps) ** power``; ``"change"``: ``S = mean over window of |C(k) - C(j)|``
    (valid pixels only; needs ``coarse`` ``(n, band, y, x)``, the pair dates' coarse images), weight
    ``1 / (S + eps) ** power``; ``"variance"``: that ``S`` and the standard deviation ``V`` of
    ``C(k) - C(j)`` over ``spread_window`` (odd, default ``window``), weight
    ``1 / ((S + eps)² + V²) ** power``: the inverse of a direction's expected squared error, which
    grows with the size of the coarse change and with how much it varies between neighbouring
    coarse pixels (a sign of how much it varies within one). The weights are normalised per
    pixel over the valid directions; NaN where no direction predicts.
    """
    import jax.numpy as jnp

    valid = jnp.isfinite(pred)
    if weights in ("change", "variance"):
        if coarse is None:
            raise MethodError(f"biastf: fusion weights {weights!r} need the pair dates' coarse images; pass coarse=.")
        change = coarse_target[None] - coarse
        ok = jnp.isfinite(change)
        score, count = _local_mean(jnp.abs(change), ok, window // 2)
        valid = valid & (count > 0)
        if weights == "variance":
            radius = (window if spread_window is None else spread_window) // 2
            (mean, square), _ = _local_mean(jnp.stack([change, change * change]), ok[None], radius)
            spread = jnp.maximum(square - mean * mean, 0.0)  # V², the local variance of the change
    elif weights == "similarity":
        mean, count = _local_mean(pred - coarse_target[None], valid, window // 2)
        score = jnp.abs(mean)
    else:
        raise MethodError(f"biastf: weights must be one of {FUSION_WEIGHTS}, got {weights!r}.")
    inverse = ((score + eps) ** 2 + spread) ** -power if weights == "variance" else (score + eps) ** -power
    weight = jnp.where(valid, inverse, 0.0)
    total = weight.sum(axis=0)
    fused = (weight * jnp.where(valid, pred, 0.0)).sum(axis=0) / jnp.where(total > 0, total, 1.0)
    return jnp.where(total > 0, fused, jnp.nan)


#: the learned corrections fade out between ``L`` and ``(1 + CHANGE_FADE) L`` of ``|dC|``
CHANGE_FADE = 0.25

def trust_in_change(change: Any, limit: Any) -> Any:
    """Weight of the learned corrections given the coarse change ``(n, y, x, band)`` and the
    per-band limit ``L`` ``(band,)``: 1 up to ``L``, linearly down to 0 at ``(1 + CHANGE_FADE) L``."""
    import jax.numpy as jnp

    excess = jnp.abs(change) - limit
    fade = jnp.clip(1.0 - excess / (CHANGE_FADE * limit), 0.0, 1.0)
    return jnp.where(excess <= 0, 1.0, fade)  # an infinite limit (no guard) never fades


def _orient(a: Any, turn: int, flip: bool, axes: tuple[int, int], *, back: bool = False) -> Any:
    """``a`` flipped along ``axes[1]`` (if ``flip``) then turned ``turn`` quarter turns in the
    plane ``axes``; ``back=True`` undoes it."""
    import jax.numpy as jnp

    if back:
        a = jnp.rot90(a, -turn, axes)
        return jnp.flip(a, axes[1]) if flip else a
    return jnp.rot90(jnp.flip(a, axes[1]) if flip else a, turn, axes)


def orientations(count: int) -> tuple[tuple[int, bool], ...]:
    """``(turn, flip)`` of the geometric self-ensemble: the identity (1), the flips (4: no
    transposition, so a block keeps its shape), or the whole dihedral group (8)."""
    if count == 4:
        return ((0, False), (0, True), (2, False), (2, True))
    return tuple((turn, flip) for flip in (False, True) for turn in range(4))[:count]


def _forward(
    config: BiaSTFConfig,
    g_model: Any,
    b_model: Any,
    params: Any,
    stats: Any,
    fine: Any,
    coarse: Any,
    coarse_target: Any,
    *,
    window: int,
    eps: float,
    weights: str,
    members: int = 1,
    inside: Any = None,
    power: float = 1.0,
    self_ensemble: int = 1,
    spread_window: int | None = None,
    interpolate: int = 0,
) -> tuple[Any, Any, Any, Any]:
    """Traced body of the predictor: fused ``(band, y, x)``, transitional ``(pair, band, y, x)``,
    the number of valid pixels beyond the limit ``L`` (where the learned part fades) and the number
    of valid transitional pixels in the block (inside its real extent), counted on the device so the
    transitional images need not leave it.

    With ``members > 1`` the parameters are stacked on a leading member axis and the learned
    part is the mean of the members' ``G + B - base``. A member's ``"shrink"`` (per band, fitted
    on held-out dates: :func:`~stf_pipeline.methods.biastf.fit.validated_shrink`) scales its
    learned part, or only ``G - base`` where a ``"shrink_b"`` scales ``B``; models without them
    apply the networks in full. ``inside`` ``(y, x)``, for a block
    padded with NaN beyond its real extent: the networks' convolutions are zeroed outside it and
    the padding counts as "outside the image" (valid) for the receptive-field test, so the real
    pixels get the numbers of the unpadded block. With ``interpolate`` (the coarse factor of a
    model trained with ``coarse_interpolation="cubic"`` on blockwise constant images) the networks
    and the base see the coarse images interpolated between the native pixels' centres
    (:func:`~stf_pipeline.kernels.interpolate.cubic_between_centres`; the block starts on a
    native pixel's edge), ``f`` the images as given. ``self_ensemble`` orientations of the block
    (:func:`orientations`) each get their correction, mapped back and averaged."""
    import jax
    import jax.numpy as jnp

    seen_coarse, seen_target = (
        (cubic_between_centres(coarse, interpolate), cubic_between_centres(coarse_target, interpolate))
        if interpolate else (coarse, coarse_target)
    )
    target = jnp.broadcast_to(seen_target[None], seen_coarse.shape)
    images, valid = _pair_images(fine, target, seen_coarse, _mixes_bands(config))
    change = jnp.nan_to_num(_channels_last(images["coarse_change"]))
    base = _base(images, config.g_base, stats)

    def oriented(member: Any, turn: int, flip: bool) -> Any:  # G and B of one orientation, mapped back
        seen = {name: _orient(a, turn, flip, (2, 3)) for name, a in images.items()}
        mask = None if inside is None else _orient(inside, turn, flip, (0, 1))
        with masked_convolutions(mask) if mask is not None else contextlib.nullcontext():
            g = _apply_g(g_model, member["G"], seen, config, stats)
            b = _apply_b(b_model, member["B"], {**seen, "change_pred": jnp.transpose(g, (0, 3, 1, 2))}, config, stats)
        return jnp.stack([_orient(part, turn, flip, (1, 2), back=True) for part in (g, b)])

    def correction(member: Any) -> Any:  # the member's shrunk G - base and B, (n, y, x, band)
        views = orientations(self_ensemble)
        g, b = sum(oriented(member, turn, flip) for turn, flip in views) / len(views)
        shrink = member.get("shrink", 1.0)
        return (g - base) * shrink + b * member.get("shrink_b", shrink)

    # members one after the other: memory of one member's activations, one compiled body
    learned = jax.lax.map(correction, params).mean(axis=0) if members > 1 else correction(params)
    trust = trust_in_change(change, stats["limit"])
    transitional = fine + jnp.transpose(base + trust * learned, (0, 3, 1, 2))
    ok = _valid_within(valid if inside is None else valid | ~inside, 2 * NET_RADIUS) & valid
    transitional = jnp.where(ok, transitional, jnp.nan)
    fused = fuse_directions(
        transitional, coarse_target, window=window, eps=eps, weights=weights, coarse=coarse, power=power,
        spread_window=spread_window,
    )
    beyond = jnp.sum(ok & (jnp.transpose(trust, (0, 3, 1, 2)) < 1))
    predicted = jnp.isfinite(transitional) if inside is None else jnp.isfinite(transitional) & inside
    return fused, transitional, beyond, jnp.sum(predicted)


@functools.lru_cache(maxsize=8)
def predictor(
    config_json: str,
    n_bands: int,
    dtype: str,
    window: int,
    eps: float,
    weights: str,
    members: int = 1,
    power: float = 1.0,
    self_ensemble: int = 1,
    spread_window: int | None = None,
    interpolate: int = 0,
) -> Any:
    """Jitted ``(params, stats, fine, coarse, coarse_target, inside=None) -> (fused, transitional, beyond,
    predicted)`` (:func:`_forward`)."""
    import jax

    config = BiaSTFConfig.resolve(json.loads(config_json))
    g_model, b_model = make_networks(config, n_bands, dtype)
    precision = "highest" if dtype == "float32" else "default"

    @jax.jit
    def predict(
        params: Any, stats: Any, fine: Any, coarse: Any, coarse_target: Any, inside: Any = None
    ) -> tuple[Any, Any, Any, Any]:
        with jax.default_matmul_precision(precision):
            return _forward(
                config, g_model, b_model, params, stats, fine, coarse, coarse_target,
                window=window, eps=eps, weights=weights, members=members, inside=inside, power=power,
                self_ensemble=self_ensemble, spread_window=spread_window, interpolate=interpolate,
            )

    return predict


#: models already warned about changes beyond their training range (one warning per model)
_WARNED: weakref.WeakSet = weakref.WeakSet()
#: what the prediction falls back to beyond ``L``, per ``g_base`` (named in the warning)
FALLBACKS = {"change": "dC", "linear": "A dC", "modulated": "the modulated change (C(k) + g (F(j) - C(j)) - F(j))"}
#: share of a block's valid pixels beyond ``L`` above which that is logged as a warning
BEYOND_WARNING = 0.01


def interpolation_factor(model: Any) -> int:
    """The coarse factor at which ``model``'s networks see the coarse images interpolated (its
    ``extra["coarse_interpolated"]``), 0 where they see them as given."""
    return int(model.coarse_factor or 0) if model.extra.get("coarse_interpolated") else 0


def predict_block(
    fine: np.ndarray,
    coarse: np.ndarray,
    coarse_target: np.ndarray,
    *,
    params: BiaSTFParams,
    model: Any,
    pad_to: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Fused ``(band, y, x)`` and transitional ``(pair, band, y, x)`` predictions of one block.

    With ``pad_to`` ``(y, x)`` the block is padded to that shape with NaN, predicted with the
    padding masked (see :func:`_forward`) and cropped back: blocks of every size up to ``pad_to``
    share one compiled program, with the numbers of the unpadded block.

    Where the coarse change goes beyond the training pairs' (more than ``BEYOND_WARNING`` of the
    block's valid pixels), a warning names the documented fallback, once per model.
    """
    fused, transitional = _on_device(fine, coarse, coarse_target, params=params, model=model, pad_to=pad_to)
    extent = fine.shape[-2:]
    fused, transitional = (
        np.ascontiguousarray(crop_block(to_host(a), extent), dtype=np.float32) for a in (fused, transitional)
    )
    return fused, transitional


def _on_device(
    fine: np.ndarray,
    coarse: np.ndarray,
    coarse_target: np.ndarray,
    *,
    params: BiaSTFParams,
    model: Any,
    pad_to: tuple[int, int] | None,
) -> tuple[Any, Any]:
    """:func:`predict_block` with its two results left on JAX's device, padded to ``pad_to`` where
    given: the engine's kernel copies back only the fused image, not the pairs' transitional ones,
    and the caller crops on the host (a view) where slicing on the device would compile a program
    for every block extent."""
    if model is None or getattr(model, "method", None) != "biastf":
        raise MethodError(
            "biastf needs a model trained with stf.train(cube, method='biastf', ...), "
            f"got {getattr(model, 'method', type(model).__name__)!r}."
        )
    window, spread = params.windows(model.coarse_factor)
    if fine.shape[1] != len(model.bands):
        raise MethodError(f"biastf: the model has {len(model.bands)} bands, the block has {fine.shape[1]}.")
    predict = predictor(
        json.dumps(model.config, sort_keys=True),
        len(model.bands),
        params.dtype,
        window,
        float(params.eps),
        params.weights,
        int(model.extra.get("members", 1)),
        params.power,
        int(params.self_ensemble),
        spread,
        interpolation_factor(model),
    )
    stats = Statistics.from_model(model)
    if params.extrapolate:
        stats = dataclasses.replace(stats, limit=(np.inf,) * len(model.bands))
    extent = fine.shape[-2:]
    # padded on the device where pad_to is given; full blocks too then run the masked program (one
    # program per scene); a strided view of the cube goes over date by date
    inputs = to_device((fine, coarse, coarse_target), shape=pad_to)
    inside = () if pad_to is None else (extent_mask(pad_to, extent),)
    fused, transitional, beyond, predicted = predict(model.params, stats.arrays(), *inputs, *inside)
    share = int(beyond) / max(int(predicted), 1)
    if share > BEYOND_WARNING and model not in _WARNED:
        _WARNED.add(model)
        log.warning(
            "biastf: the coarse change exceeds the training pairs' range (L = %s) on %.0f %% of the predicted pixels; "
            "there the learned correction fades out and the prediction falls back to F(j) + %s. "
            "Train with dates that span such changes, or pass extrapolate=True to apply the networks anyway.",
            [round(v, 4) for v in stats.limit], 100 * share,
            FALLBACKS[BiaSTFConfig.resolve(model.config).g_base],
        )
    return fused, transitional


def biastf_kernel(
    fine: np.ndarray,
    coarse: np.ndarray,
    coarse_target: np.ndarray,
    *,
    params: BiaSTFParams,
    model: Any = None,
    pad_to: tuple[int, int] | None = None,
) -> np.ndarray:
    """Engine kernel: forward pass of ``G`` then ``B`` for both pairs, then the fusion ``f``; a
    block smaller than ``pad_to`` is padded to it (``block_padding="kernel"``) and its prediction
    returned padded: the engine crops every kernel's output to the block's extent."""
    fused, _ = _on_device(fine, coarse, coarse_target, params=params, model=model, pad_to=pad_to)
    return to_host(fused).astype(np.float32, copy=False)
