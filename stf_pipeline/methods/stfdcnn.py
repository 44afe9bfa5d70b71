"""``stfdcnn``: spatiotemporal fusion with two deep CNNs (Song et al., IEEE JSTARS 2018, 11:821-829).

STFDCNN bridges the coarse and fine resolutions in two learned steps through an intermediate
**low-spatial-resolution (LSR)** fine image, the fine image averaged over ``r x r`` fine pixels:

1. the **non-linear mapping (NLM) CNN** maps the coarse image, averaged over the same ``r x r``
   blocks, to the LSR fine image (the sensor difference: spectral response, atmosphere, PSF);
2. the **super-resolution (SR) CNN** maps the LSR fine image, interpolated (Keys cubic) onto the
   fine grid, to the fine image (the lost spatial detail).

Both are five-layer residual CNNs (:mod:`stf_pipeline.nn.stfdcnn_modules`), trained stage by
stage on the training dates (:func:`fit`) with BiaSTF's machinery: one training date held out
for validation, early stopping, refit on all dates, augmentation, a time limit.

Prediction, for the target ``t`` and the pairs ``k`` before and after, at both levels in turn:
transitional images ``T_j`` (``NLM(C_j)``, then ``SR(up(L_j))``); each pair predicts by
high-pass modulation of its known image ``L_k``::

    P_k = T_t + (T_t / T_k) * (L_k - T_k)

and the two predictions are weighted by ``1 / (local mean |T_t - T_k| + eps)``. The exact
equations are our reading of the paper's abstract; the choices that could not be confirmed (layer
sizes, ``r``, the weight window, the ratio guards ``min_reflectance`` and ``max_gain``) are
parameters, listed with their reasons in ``docs/methods/stfdcnn.md``.

Missing data: a pixel whose receptive field holds NaN gets no prediction from that pair (the
other takes over); NaN where no pair predicts.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr

from stf_pipeline.cube import validate_cube
from stf_pipeline.exceptions import ConfigError, MethodError, ModelError, TaskError
from stf_pipeline.methods._base import MethodContext, MethodSpec
from stf_pipeline.nn.stfdcnn_modules import CNNConfig, ResidualCNN
from stf_pipeline.task import iso_date, to_datetime64, valid_fraction

#: inference compute dtype -> JAX matmul/convolution precision
COMPUTE_DTYPES: dict[str, str] = {"float32": "highest", "tensorfloat32": "tensorfloat32", "bfloat16": "default"}
PRESETS: tuple[str, ...] = ("paper", "tiny")


def default_lsr_factor(coarse_factor: int) -> int:
    """The divisor of ``coarse_factor`` closest to its square root (the smaller one on a tie).

    >>> default_lsr_factor(16), default_lsr_factor(20), default_lsr_factor(8)
    (4, 4, 2)
    """
    root = math.sqrt(coarse_factor)
    divisors = [d for d in range(1, coarse_factor + 1) if coarse_factor % d == 0]
    return min(divisors, key=lambda d: (abs(d - root), d))


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What a trained STFDCNN model is made of (stored with its checkpoint).

    Attributes
    ----------
    bands : tuple of str
        Band names, in the order the networks see them.
    lsr_factor : int
        Fine pixels per LSR pixel side (``r``).
    coarse_factor : int
        The cube's ``coarse_factor`` at training time.
    nlm, sr : CNNConfig
        The two networks.
    """

    bands: tuple[str, ...]
    lsr_factor: int
    coarse_factor: int
    nlm: CNNConfig = CNNConfig()
    sr: CNNConfig = CNNConfig()

    def __post_init__(self) -> None:
        object.__setattr__(self, "bands", tuple(str(b) for b in self.bands))
        if self.lsr_factor < 1 or self.coarse_factor % self.lsr_factor:
            raise MethodError(
                f"stfdcnn: lsr_factor must be a positive divisor of coarse_factor {self.coarse_factor}, "
                f"got {self.lsr_factor}; use e.g. {default_lsr_factor(self.coarse_factor)}."
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "bands": list(self.bands),
            "lsr_factor": self.lsr_factor,
            "coarse_factor": self.coarse_factor,
            "nlm": self.nlm.to_dict(),
            "sr": self.sr.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Architecture:
        """Inverse of :meth:`to_dict`."""
        return cls(
            bands=tuple(data["bands"]),
            lsr_factor=int(data["lsr_factor"]),
            coarse_factor=int(data["coarse_factor"]),
            nlm=CNNConfig.from_dict(data["nlm"]),
            sr=CNNConfig.from_dict(data["sr"]),
        )


@dataclasses.dataclass(frozen=True)
class STFDCNNParams:
    """Prediction parameters of STFDCNN (the networks themselves come with the model).

    Attributes
    ----------
    weight_window : int, default 3
        Odd side of the local window (in pixels of each level: LSR pixels, then fine pixels)
        over which the mean transitional change ``|T_t - T_k|`` that weights pair ``k`` is taken.
    eps : float, default 1e-4
        Added to the mean change before inverting (reflectance units).
    min_reflectance : float, default 0.01
        Floor of both terms of the modulation ratio ``T_t / T_k`` (guards reflectance near 0
        and negative CNN outputs).
    max_gain : float, default 4.0
        The modulation ratio is clipped to ``[1 / max_gain, max_gain]``.
    compute_dtype : {"float32", "tensorfloat32", "bfloat16"}, default "float32"
        Arithmetic of the convolutions and the interpolation at inference. ``"float32"`` is exact
        single precision everywhere, so a chunked result equals the unchunked one to ~1e-6;
        on GPUs ``"tensorfloat32"`` (tensor cores, 10-bit mantissa: ~2e-3 reflectance apart, also
        between chunkings) and ``"bfloat16"`` are faster. On CPUs the first two are the same.
    halo : int, optional
        Context pixels per side the engine gives each chunk. Default: the model's receptive
        field (:func:`required_halo`), filled in by ``stf.fuse``; a smaller value raises
        :class:`~stf_pipeline.ModelError`.
    """

    weight_window: int = 3
    eps: float = 1e-4
    min_reflectance: float = 0.01
    max_gain: float = 4.0
    compute_dtype: str = "float32"
    halo: int | None = None

    def __post_init__(self) -> None:
        if self.weight_window < 1 or self.weight_window % 2 == 0:
            raise MethodError(
                f"stfdcnn: weight_window must be a positive odd number of pixels, got {self.weight_window}."
            )
        if not self.eps > 0:
            raise MethodError(f"stfdcnn: eps must be > 0, got {self.eps}.")
        if not self.min_reflectance > 0:
            raise MethodError(f"stfdcnn: min_reflectance must be > 0, got {self.min_reflectance}.")
        if not self.max_gain >= 1:
            raise MethodError(f"stfdcnn: max_gain must be >= 1, got {self.max_gain}.")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise MethodError(
                f"stfdcnn: compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, got {self.compute_dtype!r}."
            )
        if self.halo is not None and self.halo < 0:
            raise MethodError(f"stfdcnn: halo must be >= 0 pixels, got {self.halo}.")


def required_halo(arch: Architecture, params: STFDCNNParams) -> int:
    """Fine pixels of context one output pixel depends on.

    Fine level: weight window + SR receptive field; then, on the LSR grid (``r`` fine pixels
    each): the cubic interpolation's support (2), the weight window, the NLM receptive field and
    one pixel for the LSR block an output pixel sits in.
    """
    rho = params.weight_window // 2
    r = arch.lsr_factor
    return rho + arch.sr.receptive_radius + r * (2 + rho + arch.nlm.receptive_radius + 1)


# --------------------------------------------------------------------------- array helpers (JAX)
def block_mean(x: jax.Array, r: int) -> jax.Array:
    """NaN-aware mean over ``r x r`` blocks of the last two axes (a partial last block averages
    what it holds); NaN where a block holds no valid value."""
    if r == 1:
        return x
    *lead, h, w = x.shape
    hb, wb = -(-h // r), -(-w // r)
    pad = [(0, 0)] * len(lead) + [(0, hb * r - h), (0, wb * r - w)]
    x = jnp.pad(x, pad, constant_values=jnp.nan).reshape(*lead, hb, r, wb, r)
    valid = jnp.isfinite(x)
    total = jnp.where(valid, x, 0.0).sum(axis=(-3, -1))
    count = valid.sum(axis=(-3, -1))
    return jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.nan)


def upsample(x: jax.Array, r: int, shape: tuple[int, int]) -> jax.Array:
    """Cubic interpolation of an LSR image onto the fine grid, cropped to ``shape``."""
    if r == 1:
        return x[..., : shape[0], : shape[1]]
    *lead, h, w = x.shape
    up = jax.image.resize(x, (*lead, h * r, w * r), method="cubic")
    return up[..., : shape[0], : shape[1]]


def _window(x: jax.Array, radius: int, op: str) -> jax.Array:
    """Sum (``op="sum"``, outside = 0) or minimum (``op="min"``, outside = 1) over a
    ``(2 radius + 1)^2`` window of the last two axes."""
    if radius == 0:
        return x
    dims = (1,) * (x.ndim - 2) + (2 * radius + 1, 2 * radius + 1)
    pad = [(0, 0)] * (x.ndim - 2) + [(radius, radius), (radius, radius)]
    if op == "sum":
        return jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, (1,) * x.ndim, pad)
    return jax.lax.reduce_window(x, 1.0, jax.lax.min, dims, (1,) * x.ndim, pad)


def erode(valid: jax.Array, radius: int) -> jax.Array:
    """True where every pixel within ``radius`` is valid (outside the array counts as valid)."""
    return _window(valid.astype(jnp.float32), radius, "min") > 0.5


def run_cnn(
    params: Any, config: CNNConfig, images: jax.Array, *, dtype: Any = jnp.float32
) -> jax.Array:
    """Apply a :class:`ResidualCNN` to ``(n, band, y, x)`` images; NaN must already be filled."""
    n_bands = images.shape[1]
    x = jnp.transpose(images, (0, 2, 3, 1))[..., None]
    out = ResidualCNN(n_bands=n_bands, config=config, dtype=dtype).apply({"params": params}, x)
    return jnp.transpose(out, (0, 3, 1, 2))


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


def _all_bands_finite(x: jax.Array) -> jax.Array:
    """``(..., band, y, x) -> (..., y, x)``: every band finite."""
    return jnp.isfinite(x).all(axis=-3)


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
    shape = fine.shape[-2:]
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


# --------------------------------------------------------------------------- the method
def _prepare(params: STFDCNNParams, context: MethodContext, model: Any | None = None) -> STFDCNNParams:
    """Fill ``halo`` with the receptive field of the model's networks (unless given or no model yet)."""
    if context.coarse_factor is None:
        raise MethodError(
            "stfdcnn works on LSR pixels nested in native coarse pixels: the cube needs the attr "
            "'coarse_factor' (e.g. cube.attrs['coarse_factor'] = 16 for 480 m MODIS on 30 m Landsat)."
        )
    if params.halo is not None or model is None:
        return params
    arch, _, _ = _unpack(model)
    return dataclasses.replace(params, halo=required_halo(arch, params))


def _halo(params: STFDCNNParams, context: MethodContext) -> int:
    """``params.halo``; before a model is known (planning chunks), that of the default networks."""
    if params.halo is not None:
        return params.halo
    factor = context.coarse_factor or 1
    default = Architecture(bands=(), lsr_factor=default_lsr_factor(factor), coarse_factor=factor)
    return required_halo(default, params)


def _unpack(model: Any) -> tuple[Architecture, Any, Any]:
    """The architecture and the two networks' parameters of a trained STFDCNN model."""
    method = getattr(model, "method", None)
    if method != "stfdcnn":
        found = method if method is not None else type(model).__name__
        raise ModelError(
            f"stfdcnn needs a model trained with method='stfdcnn', got a model of {found!r}; "
            "train one with stf.train(cube, method='stfdcnn', train_times=[...])."
        )
    return Architecture.from_dict(model.config["architecture"]), model.params["nlm"], model.params["sr"]


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
    return np.asarray(out, dtype=np.float32)


# --------------------------------------------------------------------------- training batches
def _to_network_layout(images: jax.Array) -> jax.Array:
    """``(batch, band, y, x) -> (batch, y, x, band, 1)``."""
    return jnp.transpose(images, (0, 2, 3, 1))[..., None]


def _targets_and_mask(target: jax.Array, input_ok: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Targets ``(batch, band, y, x)`` in network layout and the loss mask: target observed and
    input valid (``input_ok``: ``(batch, y, x)``)."""
    targets = jnp.transpose(target, (0, 2, 3, 1))
    mask = jnp.isfinite(targets) & input_ok[..., None]
    return jnp.nan_to_num(targets), mask


@dataclasses.dataclass(frozen=True)
class NLMBatch:
    """``make_batch`` of stage 1: coarse -> LSR fine, both averaged over ``r x r`` fine pixels.

    Crops are ``{"fine", "coarse": (batch, 1, band, p, p)}`` with ``p`` a multiple of ``r`` and
    origins aligned to ``r``. The loss ignores pixels whose receptive field (``radius`` LSR
    pixels) holds a missing coarse value.
    """

    lsr_factor: int
    radius: int

    def __call__(self, crops: dict[str, jax.Array], aux: Any) -> Any:
        from stf_pipeline.nn.sampler import Batch

        coarse = block_mean(crops["coarse"][:, 0], self.lsr_factor)
        fine = block_mean(crops["fine"][:, 0], self.lsr_factor)
        ok = erode(_all_bands_finite(coarse), self.radius)
        targets, mask = _targets_and_mask(fine, ok)
        return Batch(inputs=_to_network_layout(jnp.nan_to_num(coarse)), targets=targets, mask=mask)


@dataclasses.dataclass(frozen=True)
class SRBatch:
    """``make_batch`` of stage 2: LSR fine interpolated onto the fine grid -> fine.

    The loss ignores pixels whose receptive field (``radius`` fine pixels, plus the cubic
    interpolation's support) holds a missing LSR value.
    """

    lsr_factor: int
    radius: int

    def __call__(self, crops: dict[str, jax.Array], aux: Any) -> Any:
        from stf_pipeline.nn.sampler import Batch

        r = self.lsr_factor
        fine = crops["fine"][:, 0]
        shape = fine.shape[-2:]
        lsr = block_mean(fine, r)
        up_ok = jnp.repeat(jnp.repeat(erode(_all_bands_finite(lsr), 2), r, axis=-2), r, axis=-1)
        ok = erode(up_ok[..., : shape[0], : shape[1]], self.radius)
        targets, mask = _targets_and_mask(fine, ok)
        inputs = upsample(jnp.nan_to_num(lsr), r, shape)
        return Batch(inputs=_to_network_layout(inputs), targets=targets, mask=mask)


# --------------------------------------------------------------------------- training
@dataclasses.dataclass(frozen=True)
class STFDCNNConfig:
    """How to build and train STFDCNN.

    Attributes
    ----------
    lsr_factor : int, optional
        Fine pixels per LSR pixel side; a divisor of the cube's ``coarse_factor``. Default:
        :func:`default_lsr_factor` (4 for 16, 4 for 20).
    nlm, sr : CNNConfig
        The non-linear mapping and super-resolution networks (five layers each).
    train : TrainConfig
        Optimisation settings of each stage (the same for both; ``patch_size`` in fine pixels,
        a multiple of ``lsr_factor``). Default: BiaSTF's training settings
        (:data:`stf_pipeline.methods.biastf.TRAINING`: held-out date, early stopping,
        augmentation, time limit), so that STFDCNN gets the budget rule BiaSTF gets.
    refit : bool, default True
        With an automatically held-out validation date: after the validated run, refit both
        networks on all training dates for the best run's number of steps (as BiaSTF).
    loss : {"l2", "l1"}, default "l2"
        The paper's loss is the mean squared error.
    """

    lsr_factor: int | None = None
    nlm: CNNConfig = CNNConfig()
    sr: CNNConfig = CNNConfig()
    train: Any = None
    loss: str = "l2"
    refit: bool = True

    def __post_init__(self) -> None:
        from stf_pipeline.nn.train import LOSSES, TrainConfig

        if self.train is None:
            from stf_pipeline.methods.biastf import TRAINING

            object.__setattr__(self, "train", TrainConfig(**TRAINING))
        if not isinstance(self.train, TrainConfig):
            raise ConfigError(f"stfdcnn: train must be a TrainConfig or a mapping, got {type(self.train).__name__}.")
        if self.lsr_factor is not None and (isinstance(self.lsr_factor, bool) or int(self.lsr_factor) < 1):
            raise ConfigError(f"stfdcnn: lsr_factor must be a positive int, got {self.lsr_factor!r}.")
        if self.loss not in LOSSES:
            raise ConfigError(f"stfdcnn: loss must be one of {LOSSES}, got {self.loss!r}.")

    @classmethod
    def preset(cls, name: str) -> STFDCNNConfig:
        """``"paper"``: five-layer networks, 64 maps, the shared training defaults (BiaSTF's budget).
        ``"tiny"``: 16 maps and BiaSTF's ``"tiny"`` training settings (150 steps of 8 patches of
        32 x 32 per stage): trains for real on a CPU in seconds."""
        if name == "paper":
            return cls()
        if name == "tiny":
            from stf_pipeline.nn.train import TrainConfig

            small = CNNConfig(widths=(16, 16, 16, 16))
            train = TrainConfig(
                steps=150, batch_size=8, patch_size=32, learning_rate=2e-3, warmup_steps=10, eval_every=50,
                eval_batches=2, patience=0, checkpoint_every=150, log_every=10, progress=False,
            )
            return cls(nlm=small, sr=small, train=train, refit=False)
        raise ConfigError(f"stfdcnn: unknown config preset {name!r}; choose one of {PRESETS}.")

    @classmethod
    def resolve(cls, config: Any) -> STFDCNNConfig:
        """A config from a dataclass, a preset name, None (``"paper"``) or a mapping.

        A mapping may name a ``preset`` to start from and override any field; ``nlm``, ``sr``
        and ``train`` may be mappings that override the preset's values. Unknown keys raise
        :class:`~stf_pipeline.ConfigError`.
        """
        from stf_pipeline.nn.train import TrainConfig

        if isinstance(config, cls):
            return config
        if config is None or isinstance(config, str):
            return cls.preset(config or "paper")
        if not isinstance(config, Mapping):
            raise ConfigError(
                f"stfdcnn: config must be an STFDCNNConfig, a mapping or a preset name {PRESETS}, "
                f"got {type(config).__name__}."
            )
        values = dict(config)
        base = cls.preset(values.pop("preset", "paper"))
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ConfigError(f"stfdcnn: unknown config key(s) {unknown}; valid keys are {sorted(valid | {'preset'})}.")
        for name in ("nlm", "sr"):
            if isinstance(values.get(name), Mapping):
                values[name] = _cnn_config_from_mapping({**getattr(base, name).to_dict(), **values[name]})
        if isinstance(values.get("train"), Mapping):
            values["train"] = TrainConfig.from_dict({**dataclasses.asdict(base.train), **values["train"]})
        return dataclasses.replace(base, **values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (stored in the model and the checkpoint fingerprints)."""
        return {
            "lsr_factor": self.lsr_factor,
            "nlm": self.nlm.to_dict(),
            "sr": self.sr.to_dict(),
            "train": dataclasses.asdict(self.train),
            "loss": self.loss,
            "refit": self.refit,
        }


def _cnn_config_from_mapping(values: Mapping[str, Any]) -> CNNConfig:
    valid = {f.name for f in dataclasses.fields(CNNConfig)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ConfigError(f"stfdcnn: unknown network key(s) {unknown}; valid keys are {sorted(valid)}.")
    return CNNConfig(**dict(values))


def _check_dates(cube: xr.Dataset, times: Sequence[Any], what: str) -> list[np.datetime64]:
    """Dates of ``cube`` with a fine and a coarse image (raise naming the bad ones)."""
    all_times = cube["time"].values.astype("datetime64[ns]")
    dates = [to_datetime64(t) for t in times]
    missing = [iso_date(t) for t in dates if t not in all_times]
    if missing:
        raise TaskError(f"stfdcnn: {what} {missing} are not dates of the cube; its dates are {[iso_date(t) for t in all_times]}.")
    if len(set(dates)) != len(dates):
        raise TaskError(f"stfdcnn: {what} hold duplicates: {[iso_date(t) for t in dates]}; list each date once.")
    index = [int(np.flatnonzero(all_times == t)[0]) for t in dates]
    for name in ("fine", "coarse"):
        valid = valid_fraction(cube, name)[index]
        empty = [iso_date(t) for t, v in zip(dates, valid, strict=True) if not v > 0]
        if empty:
            raise TaskError(
                f"stfdcnn: {what} {empty} have no {name} image (all NaN); STFDCNN learns from dates with both a "
                "fine and a coarse image: drop these dates."
            )
    return dates


def fit(
    cube: xr.Dataset,
    *,
    train_times: Sequence[Any],
    config: Any = None,
    workdir: str | os.PathLike[str] | None = None,
    val_times: Sequence[Any] | None = None,
) -> Any:
    """Train STFDCNN's two networks on ``cube``, stage by stage.

    Stage 1 (``"nlm"``) fits the NLM CNN on (coarse, fine) of every training date, both averaged
    to the LSR grid; stage 2 (``"sr"``) fits the SR CNN on (cubic-interpolated LSR fine, fine).
    Patches, masked loss (NaN ignored), Adam, validation on ``val_times`` with early stopping,
    resumable checkpoints in ``workdir/nlm`` and ``workdir/sr``, and loss curves
    (``workdir/history.json``, ``workdir/loss_curves.png``) come from :mod:`stf_pipeline.nn`; the
    model is also saved to ``workdir/model``.

    Parameters
    ----------
    cube : xarray.Dataset
        A cube with the attr ``coarse_factor``.
    train_times : sequence of date-like
        At least two dates with both fine and coarse images.
    config : STFDCNNConfig, mapping, "paper", "tiny" or None
    workdir : path-like, optional
        Checkpoints and loss history; rerunning with the same workdir resumes.
    val_times : sequence of date-like, optional
        Held-out dates for the validation loss and early stopping. Default: one training date
        is held out (:func:`stf_pipeline.nn.holdout_split`; none with two dates, with a
        warning), and with ``refit`` both networks are refitted on all dates for the best
        step counts.

    Returns
    -------
    FittedModel
        ``method="stfdcnn"``, networks ``"nlm"`` and ``"sr"``, histories ``"stage1_nlm"`` and
        ``"stage2_sr"`` (residual RMSE per step, as BiaSTF's, for loss-curve figures).

    Raises
    ------
    CubeError, TaskError, ConfigError, ModelError
        No ``coarse_factor``; too few or unusable dates; a bad configuration; a checkpoint in
        ``workdir`` of another model.
    """
    from stf_pipeline.nn import FittedModel, holdout_split, save_history
    from stf_pipeline.nn.train import NO_VALIDATION_STEPS

    validate_cube(cube, require_coarse_factor=True)
    cfg = STFDCNNConfig.resolve(config)
    dates = _check_dates(cube, train_times, "training dates")
    if len(dates) < 2:
        raise TaskError(
            f"stfdcnn: got {len(dates)} training date(s), it needs at least 2 dates with fine and coarse images "
            "(the networks learn a mapping that must hold across dates); pass more train_times."
        )
    val_dates = _check_dates(cube, val_times, "validation dates") if val_times else []
    shared = sorted(iso_date(t) for t in set(val_dates) & set(dates))
    if shared:
        raise TaskError(
            f"stfdcnn: validation dates {shared} are also training dates; validation needs held-out dates: "
            "remove them from one of the two lists."
        )
    auto = not val_times
    fit_dates = dates
    if auto:
        fit_dates, val_dates = holdout_split(dates, name="stfdcnn")
        if not val_dates:
            log = logging.getLogger(__name__)
            log.warning("stfdcnn: no validation: %d steps per stage at most.", NO_VALIDATION_STEPS)
    coarse_factor = int(cube.attrs["coarse_factor"])
    r = int(cfg.lsr_factor) if cfg.lsr_factor is not None else default_lsr_factor(coarse_factor)
    bands = tuple(str(b) for b in cube["band"].values.tolist())
    try:
        arch = Architecture(bands=bands, lsr_factor=r, coarse_factor=coarse_factor, nlm=cfg.nlm, sr=cfg.sr)
    except MethodError as err:
        raise ConfigError(str(err)) from None
    train = cfg.train
    side = min(int(cube.sizes["y"]), int(cube.sizes["x"])) // r * r
    if train.patch_size > side:
        train = dataclasses.replace(train, patch_size=side)
    if train.patch_size % r:
        raise ConfigError(
            f"stfdcnn: patch_size {train.patch_size} must be a multiple of lsr_factor {r} (patches hold whole "
            f"LSR pixels); use e.g. {max(r, train.patch_size // r * r)}."
        )
    workdir = None if workdir is None else Path(workdir)
    settings = cfg.to_dict()
    settings["train"].pop("progress")  # showing a progress bar or not does not change the model
    fingerprint = {
        "method": "stfdcnn", "architecture": arch.to_dict(), "config": settings,
        "train_times": [iso_date(t) for t in fit_dates], "val_times": [iso_date(t) for t in val_dates],
    }
    params, history, results = _fit_stages(cube, arch, cfg, train, fit_dates, val_dates, None, workdir, fingerprint)
    best = [res.best_step for res in results]
    refit = bool(cfg.refit and auto and val_dates)
    if refit:
        refit_print = {**fingerprint, "train_times": [iso_date(t) for t in dates], "val_times": [], "steps": best}
        params, more, _ = _fit_stages(cube, arch, cfg, train, dates, [], best, workdir, refit_print, suffix="_refit")
        history.update(more)
    validation = {
        "mode": "val_times" if not auto else "held-out training date" if val_dates else "none (too few training dates)",
        "val_times": [iso_date(t) for t in val_dates], "fit_times": [iso_date(t) for t in fit_dates], "best_steps": best,
        "stop_reasons": [res.stop_reason for res in results], "refit": refit,
    }
    model = FittedModel(
        method="stfdcnn",
        config={"architecture": arch.to_dict(), "training": cfg.to_dict()},
        params=params,
        bands=bands,
        coarse_factor=coarse_factor,
        train_times=tuple(iso_date(t) for t in dates),
        history=history,
        extra={"val_times": [iso_date(t) for t in val_dates], "validation": validation},
    )
    if workdir is not None:
        save_history({k: v for k, v in history.items() if v}, workdir)
        model.save(workdir / "model", overwrite=True)
    return model


def _fit_stages(
    cube: xr.Dataset,
    arch: Architecture,
    cfg: STFDCNNConfig,
    train: Any,
    dates: Sequence[Any],
    val_dates: Sequence[Any],
    steps: Sequence[int] | None,
    workdir: Path | None,
    fingerprint: Mapping[str, Any],
    *,
    suffix: str = "",
) -> tuple[dict[str, Any], dict[str, Any], list[Any]]:
    """Train the NLM then the SR network on ``dates``, validated on ``val_dates``; ``steps``: run
    exactly that many steps per stage without validation (the refit)."""
    from stf_pipeline.nn import PatchSampler, checkpoint_store, create_train_state
    from stf_pipeline.nn import fit as fit_stage
    from stf_pipeline.nn.train import NO_VALIDATION_STEPS

    r = arch.lsr_factor
    stages = (
        ("nlm", arch.nlm, NLMBatch(r, arch.nlm.receptive_radius), ("fine", "coarse"), train.patch_size // r),
        ("sr", arch.sr, SRBatch(r, arch.sr.receptive_radius), ("fine",), train.patch_size),
    )
    keys = jax.random.split(jax.random.key(train.seed), len(stages))
    params: dict[str, Any] = {}
    history: dict[str, Any] = {}
    results = []
    for number, (key, (name, net_cfg, make_batch, variables, size)) in enumerate(zip(keys, stages, strict=True)):
        stage_train = dataclasses.replace(train, seed=train.seed + number)  # independent patch draws per stage
        if steps is not None:
            stage_train = dataclasses.replace(stage_train, steps=max(int(steps[number]), 1), patience=0)
        elif not val_dates:
            stage_train = dataclasses.replace(stage_train, steps=min(stage_train.steps, NO_VALIDATION_STEPS))
        samplers = [
            PatchSampler(
                cube, times, items=[(i,) for i in range(len(times))], patch_size=train.patch_size,
                batch_size=train.batch_size, seed=seed, align=r, variables=variables, preload=train.preload,
                augment=augment,
            )
            if times else None
            for times, seed, augment in (
                (dates, stage_train.seed, train.augment), (val_dates, stage_train.seed + 1000, False)
            )
        ]
        network = ResidualCNN(n_bands=len(arch.bands), config=net_cfg)
        sample = jnp.zeros((1, size, size, len(arch.bands), 1))
        state = create_train_state(key, stage_train, network, sample, loss=cfg.loss)
        label = f"stage{number + 1}_{name}{suffix}"
        if steps is not None and steps[number] == 0:  # the validated run kept the initial network
            params[name], history[label] = jax.device_get(state.params), {}
            continue
        directory = None if workdir is None else workdir / f"{name}{suffix}"
        stage_print = {**fingerprint, "stage": name, "steps": stage_train.steps}
        with checkpoint_store(directory, fingerprint=stage_print) as store:
            result = fit_stage(
                state, samplers[0], make_batch, config=stage_train, val_sampler=samplers[1], checkpoints=store,
                name=f"stfdcnn {name}{suffix}",
            )
        params[name] = jax.device_get(result.params)
        history[label] = {**result.history, "best_step": result.best_step, "stop_reason": result.stop_reason}
        results.append(result)
    return params, history, results


METHOD = MethodSpec(
    name="stfdcnn",
    params_type=STFDCNNParams,
    kernels={"jax": stfdcnn_kernel},
    halo=_halo,
    n_pairs=(2, 2),
    coarse_aligned=True,
    learned=True,
    fit=fit,
    prepare=_prepare,
)
