"""``biastf``: sensor-bias-driven spatio-temporal fusion (Li et al., Sci China Inf Sci 2020, 63:140302).

The model (Eqs. 11-13): for the target date ``k`` and the pair dates ``k-1`` and ``k+1``::

    F^(j,k) = F(j) + G(dC(k, j)) + B(k, j)        for j in {k-1, k+1}
    F(k)    = f(F^(k-1,k), F^(k+1,k))

``G`` turns the coarse change ``dC(k, j) = C(k) - C(j)`` (on the fine grid) into the fine change,
``B`` is the bias between the sensors' changes that ``G`` leaves, and ``f`` fuses the two
transitional predictions.

Networks (Table 1)
    Each of ``G`` and ``B`` is Conv 7x7xn1 -> 5x5xn2 -> 3x3xn3 (ReLU, stride 1, 'same' padding)
    -> 3x3x1, ``n1 = n2 = n3 = 128``. The last layer has one output, so by default there is one
    ``G`` and one ``B`` network per band, as in the paper; ``multiband=True`` uses one network per
    role with one output per band (ours: faster, and it sees all bands).
Inputs (the paper does not list them; our choice, configurable)
    ``G``: the coarse change ``dC(i, j)``, the known fine image ``F(j)`` and both coarse images
    ``C(j)`` (``coarse_known``) and ``C(i)`` (``coarse_target``) (``g_inputs``). ``B``: the same
    plus ``G``'s output (``b_inputs``): the bias depends on the predicted change. With ``C(j)``
    next to ``F(j)`` a network sees the two sensors over the same scene on the same date, i.e.
    the sensor bias itself; with only ``dC`` and ``F(j)`` it cannot. Measured (H100, synthetic
    CIA-like split, multiband 128-filter networks, squared-error losses, 1000 steps per stage,
    mean RMSE over the 7 targets): ``delta`` 0.00999, ``G``/``B`` on (``dC``, ``F(j)``) 0.01379 (3 of 7 dates better
    than ``delta``), on all four inputs 0.00861 (7 of 7 better).
    ``G`` learns a correction of the coarse change, ``G(dC) = dC + net(...)`` (residual learning,
    as STFDCNN does; ``g_residual=False`` gives the plain mapping): an untrained or unsure network
    then falls back on the coarse change, and changes unlike any between training dates (a flood)
    still come through. The loss is Eq. 16 either way.
Training (Eqs. 16-18)
    Samples are **all ordered pairs (i, j), i != j, of the training dates** (both directions, as
    prediction uses k-1 -> k and k+1 -> k), cut into random patches (128 x 128 in the paper).
    Stage 1 trains ``G`` on the target ``dF(i, j) = F(i) - F(j)``; stage 2 freezes ``G`` and trains
    ``B`` on ``B(i, j) = dF(i, j) - G(dC(i, j))``. The paper names the two subproblems' losses
    "l1" (Eq. 16) and "l2" (Eq. 17) and writes each as a squared Frobenius norm. Both stages
    default to the mean **absolute** error (``g_loss``, ``b_loss``; ``"l2"`` is the squared
    error), which we measured better on both synthetic splits (H100, 128 filters, 300 steps per
    stage, batch 64, 128 x 128 patches; mean RMSE over the targets, ``delta``: CIA 0.00999, LGC
    0.01535): per-band networks with l1/l1 CIA 0.0093 (7 of 7 dates better than ``delta``), LGC
    0.0144 (4-5 of 6, two seeds); l1/l2 CIA 0.0099 (3 of 7), LGC 0.0145; l2/l2 (500 steps)
    CIA 0.0102 (3 of 7), LGC 0.0146. Multiband, three seeds: l1/l1 CIA 0.0080-0.0085 (7 of 7),
    LGC 0.0147-0.0149 (3-4 of 6); l2/l2 CIA 0.0086-0.0088, LGC 0.0150-0.0160 (2-4 of 6).
    Adam (Optax), NaN pixels masked out of both losses: a pixel counts only when every input is
    valid within the networks' receptive field.
Fusion ``f`` (Eq. 13; ``weights``: the paper does not define its similarity measure)
    ``"similarity"`` (Section 3's wording: weights from each transitional prediction's
    similarity to ``C(k)``): for each direction, the mean of ``F^(j,k) - C(k)`` over a
    ``window x window`` neighbourhood (``window`` = ``coarse_factor`` rounded up to odd: the
    prediction aggregated to the coarse scale, compared with the coarse target) gives
    ``S_j = |mean|``. ``"change"`` (default; the temporal weight of STFDCNN and ESTARFM, which
    the paper names as strategies for ``f`` under Eq. 2): ``S_j`` = the mean of
    ``|C(k) - C(j)|`` over the window, so the date with less coarse change counts more. The
    weights are ``1 / (S_j + eps)`` normalised per pixel and band (``eps = 1e-3`` reflectance).
    Why ``"change"`` is the default: for ``F(j) + dC(k, j)`` (an untrained ``G``, and most of
    what a trained one predicts) ``F^(j,k) - C(k) = F(j) - C(j)`` does not depend on ``k``, so
    ``"similarity"`` carries no temporal information; with a sensor bias (gain/offset between
    sensors) it collapses to near-equal weights. On the synthetic demo scene this cost
    ``"similarity"`` up to 2x the RMSE of ``delta`` (e.g. 0.0125 vs 0.0057 untrained on
    2004-08-06), while ``"change"`` reproduces ``delta`` exactly for the untrained model.

Changes unlike any seen in training (``extrapolate=False``, the default)
    Networks extrapolate badly: on the synthetic LGC-like split, the flood date's coarse change
    lies outside every training pair's range on 35-53 % of the NIR/SWIR pixels, and there the
    learned corrections made BiaSTF worse than ``F(j) + dC``. So training records, per band, the
    99.5th percentile ``L`` of ``|dC|`` over the training pairs (``model.extra["change_limit"]``),
    and where ``|dC(k, j)| > L`` the learned part ``G + B - dC`` fades out linearly, reaching 0 at
    ``1.25 L``: the prediction falls back to ``F(j) + dC`` (as ESTARFM falls back when its
    conversion coefficient is out of range). The fade is per pixel and band, so chunking does
    not change it. With the default losses (H100, 300 steps per stage, mean RMSE over the
    6 LGC-like targets), multiband networks with the fade 0.0147-0.0149, without it 0.0147-0.0162
    (three seeds); per-band 0.0144 with it, 0.0142 without (one seed). On the CIA-like split it
    moves the mean RMSE by 1e-5 at most.

Inference runs through the engine: the kernel is the jitted forward pass of ``G`` then ``B`` for
both directions plus ``f``; its halo is the receptive field of ``G`` then ``B`` (7 + 7 pixels)
plus half the fusion window. A pixel whose receptive field holds NaN gets no prediction from that
direction (the other takes over); NaN where neither predicts. ``dtype="bfloat16"`` runs the
networks in bfloat16 and ``"float32"`` at full float32 precision (parameters and fusion stay float32);
the default ``"tensorfloat32"`` runs float32 at the device's default precision: TF32 tensor cores on
NVIDIA GPUs, plain float32 on CPUs. Measured on an H100 (per-band paper networks, 1000 x 1000 x 6):
TF32 is 9x faster than full float32 (0.75 s vs 6.75 s) and chunked equals unchunked to 1.6e-6; it
is 4e-5 reflectance from full float32 for a trained model, 3.8e-4 for the benchmark's random
networks (bfloat16: 0.52 s, chunked 5.2e-5 apart, 3.8e-4 and 3.1e-3 from float32).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from stf_pipeline.exceptions import ConfigError, MethodError, TaskError
from stf_pipeline.methods._base import MethodContext, MethodSpec
from stf_pipeline.methods._window import box_sum_jax

#: Table 1 kernel sides (fixed: the halo depends on them).
TABLE1_KERNELS: tuple[int, int, int, int] = (7, 5, 3, 3)
#: receptive radius of one Table 1 network
NET_RADIUS = 7
G_INPUTS: tuple[str, ...] = ("coarse_change", "fine_known", "coarse_known", "coarse_target")
B_INPUTS: tuple[str, ...] = (*G_INPUTS, "change_pred")
DTYPES: tuple[str, ...] = ("float32", "tensorfloat32", "bfloat16")
FUSION_WEIGHTS: tuple[str, ...] = ("change", "similarity")
TRAIN_DTYPES: tuple[str, ...] = ("float32", "bfloat16")
PRESETS: tuple[str, ...] = ("paper", "tiny")


def _train_config(values: Mapping[str, Any] | Any) -> Any:
    from stf_pipeline.nn.train import TrainConfig

    return values if isinstance(values, TrainConfig) else TrainConfig.from_dict(values)


@dataclasses.dataclass(frozen=True)
class BiaSTFConfig:
    """Architecture and training of BiaSTF.

    Attributes
    ----------
    filters : (int, int, int), default (128, 128, 128)
        ``n1, n2, n3`` of Table 1.
    multiband : bool, default False
        One network per role for all bands (True) instead of one per band (the paper).
    g_inputs, b_inputs : tuple of str
        Input images of ``G`` and ``B`` per band (see module docstring); default: all four images,
        and for ``B`` also ``"change_pred"`` (``G``'s output).
    g_loss, b_loss : {"l1", "l2"}, default "l1"
        Loss of each stage: absolute error (measured better, module docstring) or squared error
        (Eqs. 16-17).
    g_residual : bool, default True
        ``G(dC) = dC + net(...)`` (True) or ``net(...)`` (False).
    train_dtype : {"float32", "bfloat16"}, default "float32"
        Computation dtype of the networks while training (parameters stay float32); float32
        convolutions run at the device's default precision (TF32 on recent NVIDIA GPUs).
    stage1, stage2 : TrainConfig
        Optimisation of ``G`` and of ``B`` (stage 2's seed is offset so its patches differ).
        Both presets validate before the first step (``validate_initial``): with ``val_times``,
        the zero-initialised networks (fine + coarse change) are kept unless training beats them.
    """

    filters: tuple[int, int, int] = (128, 128, 128)
    multiband: bool = False
    g_inputs: tuple[str, ...] = G_INPUTS
    b_inputs: tuple[str, ...] = B_INPUTS
    g_loss: str = "l1"
    b_loss: str = "l1"
    g_residual: bool = True
    train_dtype: str = "float32"
    stage1: Any = None
    stage2: Any = None

    def __post_init__(self) -> None:
        from stf_pipeline.nn.train import TrainConfig

        object.__setattr__(self, "filters", tuple(int(f) for f in self.filters))
        object.__setattr__(self, "g_inputs", tuple(self.g_inputs))
        object.__setattr__(self, "b_inputs", tuple(self.b_inputs))
        for name in ("stage1", "stage2"):
            value = getattr(self, name)
            object.__setattr__(self, name, TrainConfig(validate_initial=True) if value is None else _train_config(value))
        if len(self.filters) != 3 or min(self.filters) < 1:
            raise ConfigError(f"biastf: filters must be three positive ints (n1, n2, n3), got {self.filters}.")
        for name, allowed in (("g_inputs", G_INPUTS), ("b_inputs", B_INPUTS)):
            value = getattr(self, name)
            bad = [v for v in value if v not in allowed]
            if not value or bad or len(set(value)) != len(value):
                raise ConfigError(f"biastf: {name} must be distinct names from {allowed}, got {list(value)}.")
        for name in ("g_loss", "b_loss"):
            if getattr(self, name) not in ("l1", "l2"):
                raise ConfigError(f"biastf: {name} must be 'l1' or 'l2', got {getattr(self, name)!r}.")
        if self.train_dtype not in TRAIN_DTYPES:
            raise ConfigError(f"biastf: train_dtype must be one of {TRAIN_DTYPES}, got {self.train_dtype!r}.")

    @classmethod
    def preset(cls, name: str) -> BiaSTFConfig:
        """``"paper"``: the paper's networks and 128 x 128 patches. ``"tiny"``: multiband networks
        of 16 filters, 32 x 32 patches, 150 steps per stage: trains for real on a CPU in seconds
        (tests, demo)."""
        if name == "paper":
            return cls()
        if name == "tiny":
            tiny = {
                "steps": 150,
                "batch_size": 8,
                "patch_size": 32,
                "learning_rate": 2e-3,
                "warmup_steps": 10,
                "eval_every": 50,
                "eval_batches": 2,
                "patience": 0,
                "validate_initial": True,
                "checkpoint_every": 150,
                "log_every": 10,
                "progress": False,
            }
            return cls(filters=(16, 16, 16), multiband=True, stage1=tiny, stage2={**tiny, "seed": 1})
        raise ConfigError(f"biastf: unknown config preset {name!r}; choose one of {PRESETS}.")

    @classmethod
    def resolve(cls, config: BiaSTFConfig | Mapping[str, Any] | str | None) -> BiaSTFConfig:
        """Config from a dataclass, a preset name, None (paper) or a mapping.

        A mapping may name a ``preset`` to start from, override any field, give ``train``
        (optimisation settings for both stages) and ``stage1``/``stage2`` (per stage, on top).
        Unknown keys raise :class:`ConfigError`.
        """
        if isinstance(config, cls):
            return config
        if config is None or isinstance(config, str):
            return cls.preset(config or "paper")
        if not isinstance(config, Mapping):
            raise ConfigError(
                f"biastf: config must be a BiaSTFConfig, a mapping or a preset name {PRESETS}, got {type(config).__name__}."
            )
        values = dict(config)
        base = cls.preset(values.pop("preset", "paper"))
        common = dict(values.pop("train", {}) or {})
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ConfigError(f"biastf: unknown config key(s) {unknown}; valid keys are {sorted(valid | {'preset', 'train'})}.")
        for stage in ("stage1", "stage2"):
            merged = {**dataclasses.asdict(getattr(base, stage)), **common, **dict(values.pop(stage, {}) or {})}
            values[stage] = _train_config(merged)
        return dataclasses.replace(base, **values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (``resolve`` reads it back)."""
        out = dataclasses.asdict(self)
        return json.loads(json.dumps(out))


@dataclasses.dataclass(frozen=True)
class BiaSTFParams:
    """Inference parameters of ``biastf`` (the networks come from the fitted model).

    Attributes
    ----------
    window : int, optional
        Odd side (fine pixels) of the neighbourhood over which each transitional prediction is
        compared with the target coarse image; default ``coarse_factor`` rounded up to odd (15 when
        the cube has no ``coarse_factor``).
    eps : float, default 1e-3
        Added to the mean absolute difference before inverting (reflectance units).
    weights : {"change", "similarity"}, default "change"
        What the fusion ``f`` weights each direction by (module docstring): the local mean
        absolute coarse change ``|C(k) - C(j)|`` or the prediction's local mean difference with
        ``C(k)`` (the paper's wording, degenerate under a sensor bias).
    dtype : {"tensorfloat32", "float32", "bfloat16"}, default "tensorfloat32"
        Computation of the networks: float32 at the device's default precision (TF32 tensor cores
        on NVIDIA GPUs, 4e-5 to 4e-4 off full float32; plain float32 on CPUs), float32 at full precision
        (9x slower on an H100), or bfloat16 (fastest, up to 3e-3 off).
    extrapolate : bool, default False
        Apply the networks' corrections also where the coarse change is beyond the range seen in
        training; by default they fade out there (module docstring).
    """

    window: int | None = None
    eps: float = 1e-3
    weights: str = "change"
    dtype: str = "tensorfloat32"
    extrapolate: bool = False

    def __post_init__(self) -> None:
        if self.window is not None and (self.window < 1 or self.window % 2 == 0):
            raise MethodError(f"biastf: window must be a positive odd number of pixels, got {self.window}.")
        if not self.eps > 0:
            raise MethodError(f"biastf: eps must be > 0, got {self.eps}.")
        if self.weights not in FUSION_WEIGHTS:
            raise MethodError(f"biastf: weights must be one of {FUSION_WEIGHTS}, got {self.weights!r}.")
        if self.dtype not in DTYPES:
            raise MethodError(f"biastf: dtype must be one of {DTYPES}, got {self.dtype!r}.")


def _prepare(params: BiaSTFParams, context: MethodContext, model: Any = None) -> BiaSTFParams:
    if params.window is not None:
        return params
    factor = context.coarse_factor or 15
    return dataclasses.replace(params, window=factor if factor % 2 else factor + 1)


def _halo(params: BiaSTFParams, context: MethodContext) -> int:
    window = _prepare(params, context).window
    return 2 * NET_RADIUS + int(window) // 2


# --------------------------------------------------------------------------- JAX parts
def _features(names: Sequence[str], images: Mapping[str, Any]) -> Any:
    """Stack named ``(n, band, y, x)`` images into ``(n, y, x, band, channel)``, NaN -> 0."""
    import jax.numpy as jnp

    stacked = jnp.stack([images[name] for name in names], axis=-1)
    return jnp.nan_to_num(jnp.transpose(stacked, (0, 2, 3, 1, 4)), nan=0.0, posinf=0.0, neginf=0.0)


def _valid_within(valid: Any, radius: int) -> Any:
    """True where ``valid`` holds at every pixel within ``radius`` (``(..., y, x)``); outside counts as valid."""
    import jax

    invalid = (~valid).astype("float32")
    dims = (1,) * (valid.ndim - 2) + (2 * radius + 1, 2 * radius + 1)
    pad = ((0, 0),) * (valid.ndim - 2) + ((radius, radius), (radius, radius))
    return jax.lax.reduce_window(invalid, 0.0, jax.lax.max, dims, (1,) * valid.ndim, pad) == 0


def _pair_images(fine_j: Any, coarse_i: Any, coarse_j: Any) -> tuple[dict[str, Any], Any]:
    """Named inputs for predicting date i from date j, and where they are all valid (``(n, band, y, x)``)."""
    import jax.numpy as jnp

    images = {
        "coarse_change": coarse_i - coarse_j,
        "fine_known": fine_j,
        "coarse_known": coarse_j,
        "coarse_target": coarse_i,
    }
    valid = jnp.isfinite(fine_j) & jnp.isfinite(coarse_j) & jnp.isfinite(coarse_i)
    return images, valid


def _networks(config: BiaSTFConfig, n_bands: int, dtype: str) -> tuple[Any, Any]:
    import jax.numpy as jnp

    from stf_pipeline.nn.modules import BandNet

    kw = {
        "n_bands": n_bands,
        "hidden": config.filters,
        "kernel_sizes": TABLE1_KERNELS,
        "multiband": config.multiband,
        "zero_last": True,  # untrained G adds nothing to the coarse change, untrained B no bias
    }
    jdtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32  # tensorfloat32: float32 at default precision
    return BandNet(**kw, dtype=jdtype), BandNet(**kw, dtype=jdtype)


def _channels_last(a: Any) -> Any:
    """``(n, band, y, x) -> (n, y, x, band)``."""
    import jax.numpy as jnp

    return jnp.transpose(a, (0, 2, 3, 1))


def _g_base(images: Mapping[str, Any], config: BiaSTFConfig) -> Any:
    """What ``G``'s network output is added to: the coarse change (``g_residual``) or 0, ``(n, y, x, band)``."""
    import jax.numpy as jnp

    change = _channels_last(images["coarse_change"])
    return jnp.nan_to_num(change) if config.g_residual else jnp.zeros_like(change)


def g_batch(crops: Mapping[str, Any], aux: Any, *, config: BiaSTFConfig) -> Any:
    """Stage-1 batch: inputs ``g_inputs`` of ``(i, j)``, target ``dF(i, j)`` (less ``dC`` with ``g_residual``)."""
    import jax.numpy as jnp

    from stf_pipeline.nn.sampler import Batch

    fine, coarse = crops["fine"], crops["coarse"]
    images, valid = _pair_images(fine[:, 1], coarse[:, 0], coarse[:, 1])
    target = fine[:, 0] - fine[:, 1]
    if config.g_residual:
        target = target - images["coarse_change"]
    mask = _valid_within(valid, NET_RADIUS) & jnp.isfinite(target)
    return Batch(_features(config.g_inputs, images), jnp.transpose(target, (0, 2, 3, 1)), jnp.transpose(mask, (0, 2, 3, 1)))


def b_batch(crops: Mapping[str, Any], aux: Any, *, config: BiaSTFConfig, g_model: Any) -> Any:
    """Stage-2 batch: inputs ``b_inputs`` (with the frozen ``G``'s output), target ``dF - G(dC)``."""
    import jax.numpy as jnp

    from stf_pipeline.nn.sampler import Batch

    fine, coarse = crops["fine"], crops["coarse"]
    images, valid = _pair_images(fine[:, 1], coarse[:, 0], coarse[:, 1])
    g = _g_base(images, config) + g_model.apply({"params": aux}, _features(config.g_inputs, images))  # (n, y, x, band)
    images["change_pred"] = jnp.transpose(g, (0, 3, 1, 2))
    target = jnp.transpose(fine[:, 0] - fine[:, 1], (0, 2, 3, 1)) - g
    mask = _valid_within(valid, 2 * NET_RADIUS) & jnp.isfinite(target.transpose(0, 3, 1, 2))
    return Batch(_features(config.b_inputs, images), target, jnp.transpose(mask, (0, 2, 3, 1)))


def fuse_directions(
    pred: Any, coarse_target: Any, *, window: int, eps: float, weights: str = "similarity", coarse: Any = None
) -> Any:
    """Fusion ``f``: weight the transitional predictions ``(n, band, y, x)`` per pixel and band.

    ``weights="similarity"``: ``S = |mean over window of (pred - C(k))|`` (valid pixels only);
    ``"change"``: ``S = mean over window of |C(k) - C(j)|`` (valid pixels only; needs ``coarse``
    ``(n, band, y, x)``, the pair dates' coarse images). Weight ``1 / (S + eps)`` where the
    prediction is valid, normalised per pixel; NaN where no direction predicts.
    """
    import jax.numpy as jnp

    valid = jnp.isfinite(pred)
    if weights == "change":
        if coarse is None:
            raise MethodError("biastf: fusion weights 'change' need the pair dates' coarse images; pass coarse=.")
        diff = jnp.abs(coarse_target[None] - coarse)
        ok = jnp.isfinite(diff)
        count = box_sum_jax(ok.astype(jnp.float32), window // 2)
        score = box_sum_jax(jnp.where(ok, diff, 0.0), window // 2) / jnp.maximum(count, 1.0)
        valid = valid & (count > 0)
    elif weights == "similarity":
        diff = jnp.where(valid, pred - coarse_target[None], 0.0)
        count = box_sum_jax(valid.astype(jnp.float32), window // 2)
        score = jnp.abs(box_sum_jax(diff, window // 2) / jnp.maximum(count, 1.0))
    else:
        raise MethodError(f"biastf: weights must be one of {FUSION_WEIGHTS}, got {weights!r}.")
    weight = jnp.where(valid, 1.0 / (score + eps), 0.0)
    total = weight.sum(axis=0)
    fused = (weight * jnp.where(valid, pred, 0.0)).sum(axis=0) / jnp.where(total > 0, total, 1.0)
    return jnp.where(total > 0, fused, jnp.nan)


#: the learned corrections fade out between ``L`` and ``(1 + CHANGE_FADE) L`` of ``|dC|``
CHANGE_FADE = 0.25
#: percentile of the training pairs' ``|dC|`` (per band) taken as the limit ``L``
CHANGE_PERCENTILE = 99.5


def trust_in_change(change: Any, limit: Any) -> Any:
    """Weight of the learned corrections given the coarse change ``(n, y, x, band)`` and the
    per-band limit ``L`` ``(band,)``: 1 up to ``L``, linearly down to 0 at ``(1 + CHANGE_FADE) L``."""
    import jax.numpy as jnp

    excess = jnp.abs(change) - limit
    fade = jnp.clip(1.0 - excess / (CHANGE_FADE * limit), 0.0, 1.0)
    return jnp.where(excess <= 0, 1.0, fade)  # an infinite limit (no guard) never fades


def change_limit(coarse: np.ndarray) -> list[float]:
    """Per-band ``L``: the ``CHANGE_PERCENTILE`` of ``|C(i) - C(j)|`` over all pairs of ``coarse`` ``(time, band, y, x)``."""
    n = coarse.shape[0]
    changes = np.stack([np.abs(coarse[i] - coarse[j]) for i in range(n) for j in range(i + 1, n)])
    return [float(v) for v in np.nanpercentile(changes, CHANGE_PERCENTILE, axis=(0, 2, 3))]


def _forward(
    config: BiaSTFConfig,
    g_model: Any,
    b_model: Any,
    params: Any,
    fine: Any,
    coarse: Any,
    coarse_target: Any,
    limit: Any,
    *,
    window: int,
    eps: float,
    weights: str,
) -> tuple[Any, Any]:
    """Traced body of the predictor: fused ``(band, y, x)`` and transitional ``(pair, band, y, x)``."""
    import jax.numpy as jnp

    target = jnp.broadcast_to(coarse_target[None], coarse.shape)
    images, valid = _pair_images(fine, target, coarse)
    g = _g_base(images, config) + g_model.apply({"params": params["G"]}, _features(config.g_inputs, images))
    images["change_pred"] = jnp.transpose(g, (0, 3, 1, 2))
    b = b_model.apply({"params": params["B"]}, _features(config.b_inputs, images))
    change = jnp.nan_to_num(_channels_last(images["coarse_change"]))
    learned = trust_in_change(change, limit) * (g + b - change)
    transitional = fine + jnp.transpose(change + learned, (0, 3, 1, 2))
    transitional = jnp.where(_valid_within(valid, 2 * NET_RADIUS) & valid, transitional, jnp.nan)
    fused = fuse_directions(transitional, coarse_target, window=window, eps=eps, weights=weights, coarse=coarse)
    return fused, transitional


@functools.lru_cache(maxsize=8)
def _predictor(config_json: str, n_bands: int, dtype: str, window: int, eps: float, weights: str) -> Any:
    """Jitted ``(params, fine, coarse, coarse_target, limit) -> fused (band, y, x)`` and the transitional predictions."""
    import jax

    config = BiaSTFConfig.resolve(json.loads(config_json))
    g_model, b_model = _networks(config, n_bands, dtype)
    precision = "highest" if dtype == "float32" else "default"

    @jax.jit
    def predict(params: Any, fine: Any, coarse: Any, coarse_target: Any, limit: Any) -> tuple[Any, Any]:
        with jax.default_matmul_precision(precision):
            return _forward(
                config, g_model, b_model, params, fine, coarse, coarse_target, limit, window=window, eps=eps, weights=weights
            )

    return predict


def predict_block(
    fine: np.ndarray,
    coarse: np.ndarray,
    coarse_target: np.ndarray,
    *,
    params: BiaSTFParams,
    model: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Fused ``(band, y, x)`` and transitional ``(pair, band, y, x)`` predictions of one block."""
    if model is None or getattr(model, "method", None) != "biastf":
        raise MethodError(
            "biastf needs a model trained with stf.train(cube, method='biastf', ...), "
            f"got {getattr(model, 'method', type(model).__name__)!r}."
        )
    if params.window is None:
        params = _prepare(params, MethodContext(model.coarse_factor, 1.0, len(model.bands)))
    if fine.shape[1] != len(model.bands):
        raise MethodError(f"biastf: the model has {len(model.bands)} bands, the block has {fine.shape[1]}.")
    predict = _predictor(
        json.dumps(model.config, sort_keys=True), len(model.bands), params.dtype, int(params.window), float(params.eps), params.weights
    )
    limit = model.extra.get("change_limit")
    if params.extrapolate or limit is None:
        limit = [np.inf] * len(model.bands)
    fused, transitional = predict(model.params, fine, coarse, coarse_target, np.asarray(limit, np.float32))
    return np.asarray(fused, dtype=np.float32), np.asarray(transitional, dtype=np.float32)


def biastf_kernel(
    fine: np.ndarray,
    coarse: np.ndarray,
    coarse_target: np.ndarray,
    *,
    params: BiaSTFParams,
    model: Any = None,
) -> np.ndarray:
    """Engine kernel: forward pass of ``G`` then ``B`` for both pairs, then the fusion ``f``."""
    return predict_block(fine, coarse, coarse_target, params=params, model=model)[0]


# --------------------------------------------------------------------------- training
def _coarse_sample(cube: xr.Dataset, times: Sequence[Any], factor: int | None) -> np.ndarray:
    """The training dates' coarse images, one pixel per coarse pixel (``coarse_factor`` stride)."""
    step = max(int(factor or 1), 1)
    return cube["coarse"].sel(time=list(times)).isel(y=slice(step // 2, None, step), x=slice(step // 2, None, step)).values


def fit(
    cube: xr.Dataset,
    *,
    train_times: Sequence[Any],
    config: BiaSTFConfig | Mapping[str, Any] | str | None = None,
    workdir: str | os.PathLike[str] | None = None,
    val_times: Sequence[Any] | None = None,
) -> Any:
    """Train ``G`` (stage 1) then ``B`` (stage 2) on all ordered pairs of ``train_times``.

    Parameters
    ----------
    cube : xarray.Dataset
        Only ``train_times`` and ``val_times`` are read (once, unless ``preload=False``).
    train_times : sequence of date-like
        At least two dates with fine and coarse images.
    config : BiaSTFConfig, mapping, preset name or None
        See :meth:`BiaSTFConfig.resolve`; default the paper's.
    workdir : path-like, optional
        Checkpoints (``stage1/``, ``stage2/``; a rerun resumes), ``history.json``,
        ``loss_curves.png`` and the final ``model/``.
    val_times : sequence of date-like, optional
        Held-out dates with fine images: validation pairs predict each of them from each training
        date; used for early stopping (the best parameters are kept).

    Returns
    -------
    FittedModel
    """
    import jax
    import jax.numpy as jnp

    from stf_pipeline.nn import FittedModel, PatchSampler, create_train_state, ordered_pairs, save_history
    from stf_pipeline.nn import checkpoint_store
    from stf_pipeline.nn import fit as fit_stage
    from stf_pipeline.task import _iso, to_datetime64

    cfg = BiaSTFConfig.resolve(config)
    times = sorted({to_datetime64(t) for t in train_times})
    if len(times) < 2:
        raise TaskError(
            f"biastf learns from ordered pairs of training dates and needs at least two, got {[_iso(t) for t in times]}; "
            "pass train_times with two or more dates that have fine and coarse images."
        )
    held = sorted({to_datetime64(t) for t in (val_times or ())} - set(times))
    bands = [str(b) for b in cube["band"].values.tolist()]
    factor = cube.attrs.get("coarse_factor")
    n = len(times)
    fingerprint = {
        "method": "biastf",
        "config": cfg.to_dict(),
        "bands": bands,
        "coarse_factor": factor,
        "train_times": [_iso(t) for t in times],
        "val_times": [_iso(t) for t in held],
    }
    g_model, b_model = _networks(cfg, len(bands), cfg.train_dtype)
    val_items = [(n + v, j) for v in range(len(held)) for j in range(n)]
    history: dict[str, Any] = {}
    params: dict[str, Any] = {}
    stages = (
        ("G", cfg.stage1, g_model, cfg.g_inputs, cfg.g_loss, functools.partial(g_batch, config=cfg)),
        ("B", cfg.stage2, b_model, cfg.b_inputs, cfg.b_loss, functools.partial(b_batch, config=cfg, g_model=g_model)),
    )
    for stage, (name, tc, model, inputs, loss, make_batch) in enumerate(stages, start=1):
        common = {"patch_size": tc.patch_size, "batch_size": tc.batch_size, "preload": tc.preload}
        sampler = PatchSampler(cube, times, items=ordered_pairs(n), seed=tc.seed, **common)
        val = PatchSampler(cube, [*times, *held], items=val_items, seed=tc.seed + 7919, **common) if held else None
        sample = jnp.zeros((1, tc.patch_size, tc.patch_size, len(bands), len(inputs)), jnp.float32)
        state = create_train_state(jax.random.key(tc.seed), tc, model, sample, loss=loss)
        directory = Path(workdir) / f"stage{stage}" if workdir is not None else None
        with checkpoint_store(directory, fingerprint={**fingerprint, "stage": name}) as store:
            result = fit_stage(
                state,
                sampler,
                make_batch,
                config=tc,
                aux=params.get("G"),
                val_sampler=val,
                checkpoints=store,
                name=f"biastf stage {stage} ({name})",
            )
        params[name] = jax.device_get(result.params)
        history[f"stage{stage}_{name}"] = result.history
    model_out = FittedModel(
        method="biastf",
        config=cfg.to_dict(),
        params=params,
        bands=tuple(bands),
        coarse_factor=None if factor is None else int(factor),
        train_times=tuple(_iso(t) for t in times),
        history=history,
        extra={"val_times": [_iso(t) for t in held], "change_limit": change_limit(_coarse_sample(cube, times, factor))},
    )
    if workdir is not None:
        save_history(history, workdir)
        model_out.save(Path(workdir) / "model", overwrite=True)
    return model_out


METHOD = MethodSpec(
    name="biastf",
    params_type=BiaSTFParams,
    kernel=biastf_kernel,
    halo=_halo,
    n_pairs=(2, 2),
    learned=True,
    fit=fit,
    prepare=_prepare,
)
