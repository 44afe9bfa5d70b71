"""``biastf``: sensor-bias-driven spatio-temporal fusion (Li et al., Sci China Inf Sci 2020, 63:140302).

The model (Eqs. 11-13), for the target date ``k`` and the pair dates ``j`` in ``{k-1, k+1}``::

    F^(j,k) = F(j) + G(dC(k, j)) + B(k, j),        F(k) = f(F^(k-1,k), F^(k+1,k))

``dC(k, j) = C(k) - C(j)`` is the coarse change on the fine grid. ``G`` turns it into the fine
change, ``B`` is the bias between the sensors' changes that ``G`` leaves, ``f`` fuses the two
transitional predictions.

- **Networks** (Table 1): ``G`` and ``B`` are Conv 7x7 -> 5x5 -> 3x3 (ReLU, 'same') -> 3x3,
  with ``filters`` ``(n1, n2, n3)``. They are one network per band (``multiband=False``, the
  paper) or one network for all bands (``multiband=True``).
- **G's base** (``g_base``): ``G = base + net``, with ``base = dC`` (default) or ``A dC``
  (``"linear"``: ``A``, bands x bands, a least-squares fine/coarse conversion of the changes
  at the coarse scale over the training pairs). Inputs are ``dC, F(j), C(j), C(k)``, and for
  ``B`` also ``G``'s output; each is normalised per band with constants recorded in the model
  (``normalise``).
- **Training** (Eqs. 16-18) runs on all ordered pairs of the training dates. Stage 1 fits ``G``
  to ``dF``; stage 2 fits ``B`` to ``dF - G``. The loss is the mean absolute error (``"l2"``:
  Eq. 16-17's squared error). Unless ``val_times`` are given, one training date is held out
  (:func:`stf_pipeline.nn.holdout_split`). Training stops when the held-out date stops
  improving, and the best step is kept. Both networks are then refitted on all dates for
  that many steps (``refit``). With nothing to validate on, the networks stay zero
  (``unvalidated_steps``).
- **Beyond the training changes**: where ``|dC|`` exceeds ``L`` (the 99.5th percentile of the
  training pairs' ``|dC|``, per band), the learned part ``G + B - base`` fades linearly to 0 at
  ``1.25 L``. There the prediction falls back to ``F(j) + base``.
- **Fusion f** (``weights``): ``"change"`` (default) weights each direction by ``1 / (S + eps)``
  with ``S`` the local mean ``|C(k) - C(j)|``. ``"similarity"`` uses ``S = |local mean of
  F^(j,k) - C(k)|``, the paper's wording.
- **Inference** runs through the engine. The halo is ``2 x 7`` pixels (G then B) plus half the
  fusion window, so chunked equals unchunked. A pixel with NaN in its receptive field gets no
  prediction from that direction.

Measurements behind every default (hardware, commands, numbers) are in ``docs/methods/biastf.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from stf_pipeline.exceptions import ConfigError, MethodError, TaskError
from stf_pipeline.kernels.window import box_sum_jax
from stf_pipeline.methods._base import MethodContext, MethodSpec

log = logging.getLogger(__name__)

#: Table 1 kernel sides (fixed: the halo depends on them).
TABLE1_KERNELS: tuple[int, int, int, int] = (7, 5, 3, 3)
#: receptive radius of one Table 1 network
NET_RADIUS = 7
G_INPUTS: tuple[str, ...] = ("coarse_change", "fine_known", "coarse_known", "coarse_target")
B_INPUTS: tuple[str, ...] = (*G_INPUTS, "change_pred")
DTYPES: tuple[str, ...] = ("float32", "tensorfloat32", "bfloat16")
FUSION_WEIGHTS: tuple[str, ...] = ("change", "similarity")
TRAIN_DTYPES: tuple[str, ...] = ("float32", "bfloat16")
G_BASES: tuple[str, ...] = ("linear", "change")
PRESETS: tuple[str, ...] = ("auto", "gpu", "cpu", "paper", "tiny")
#: training settings of every preset but "tiny": validation on held-out dates (the initial,
#: zero-correction networks compete), early stopping, augmentation
TRAINING: dict[str, Any] = {
    "validate_initial": True,
    "eval_every": 100,
    "eval_batches": 8,
    "patience": 5,
    "augment": True,
    "checkpoint_every": 500,
    "max_minutes": 3.0,
}


def _train_config(values: Mapping[str, Any] | Any) -> Any:
    from stf_pipeline.nn.train import TrainConfig

    return values if isinstance(values, TrainConfig) else TrainConfig.from_dict(values)


def cpu_training(available_bytes: int | None = None, *, filters: int = 32) -> dict[str, Any]:
    """Training settings that fit a CPU: patch and batch sized to ``available_bytes`` (default: the
    machine's memory; not the free memory, which changes between runs: a rerun must pick the same
    settings to resume from its checkpoints).

    The activations of one ``p x p`` patch through ``G`` or ``B`` (three hidden layers of
    ``filters`` maps, forward and backward, float32, 6 bands) take about
    ``p^2 x 3 x filters x 4 bytes x 4``; the batch is sized to a tenth of the available memory,
    between 4 and 32 patches of 64 x 64 (48 x 48 under 4 GiB). ``max_minutes`` caps each training.
    """
    import psutil

    available = psutil.virtual_memory().total if available_bytes is None else int(available_bytes)
    patch = 64 if available >= 4 * 2**30 else 48
    per_patch = patch * patch * 3 * filters * 4 * 4
    batch = int(np.clip(0.1 * available // per_patch, 4, 32))
    return {**TRAINING, "batch_size": batch, "patch_size": patch, "max_minutes": 5.0, "progress": True}


@dataclasses.dataclass(frozen=True)
class BiaSTFConfig:
    """Architecture and training of BiaSTF.

    Attributes
    ----------
    filters : (int, int, int), default (128, 128, 128)
        ``n1, n2, n3`` of Table 1.
    multiband : bool, default True
        One network per role for all bands (True) instead of one per band (the paper's, preset
        ``"paper"``).
    g_inputs, b_inputs : tuple of str
        Input images of ``G`` and ``B`` per band (see module docstring); default: all four images,
        and for ``B`` also ``"change_pred"`` (``G``'s output).
    g_loss, b_loss : {"l1", "l2"}, default "l1"
        Loss of each stage: absolute error (measured better, module docstring) or squared error
        (Eqs. 16-17).
    g_residual : bool, default True
        ``G(dC) = base + net(...)`` (True) or ``net(...)`` (False).
    g_base : {"change", "linear"}, default "change"
        ``base = dC``, or ``A dC`` with the fitted conversion ``A`` (bands x bands; measured
        worse, ``docs/methods/biastf.md``).
    normalise : bool, default True
        Per-band input and target scaling with constants from the training dates, recorded in
        the model (``model.extra["statistics"]``).
    refit : bool, default True
        With automatically held-out validation dates: after the validated run, refit both
        networks on all training dates for the best run's number of steps.
    unvalidated_steps : int, default 0
        Steps per stage when nothing validates (two training dates, no ``val_times``). 0 keeps
        the zero-initialised networks: the prediction is ``F(j) + dC`` fused by ``f``, because
        an unvalidated correction made both two-date real sets worse (``docs/methods/biastf.md``).
    train_dtype : {"float32", "bfloat16"}, default "float32"
        Computation dtype of the networks while training (parameters stay float32); float32
        convolutions run at the device's default precision (TF32 on recent NVIDIA GPUs).
    stage1, stage2 : TrainConfig
        Optimisation of ``G`` and of ``B`` (stage 2's seed is offset so its patches differ).
        The presets validate before the first step (``validate_initial``): the zero-initialised
        networks (fine + converted coarse change) are kept unless training beats them.
    """

    filters: tuple[int, int, int] = (128, 128, 128)
    multiband: bool = True
    g_inputs: tuple[str, ...] = G_INPUTS
    b_inputs: tuple[str, ...] = B_INPUTS
    g_loss: str = "l1"
    b_loss: str = "l1"
    g_residual: bool = True
    g_base: str = "change"
    normalise: bool = True
    refit: bool = True
    unvalidated_steps: int = 0
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
            default = TrainConfig(**TRAINING, seed=0 if name == "stage1" else 1)
            object.__setattr__(self, name, default if value is None else _train_config(value))
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
        steps = self.unvalidated_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ConfigError(f"biastf: unvalidated_steps must be an int >= 0, got {self.unvalidated_steps!r}.")
        if self.g_base not in G_BASES:
            raise ConfigError(f"biastf: g_base must be one of {G_BASES}, got {self.g_base!r}.")
        if self.train_dtype not in TRAIN_DTYPES:
            raise ConfigError(f"biastf: train_dtype must be one of {TRAIN_DTYPES}, got {self.train_dtype!r}.")

    @classmethod
    def preset(cls, name: str) -> BiaSTFConfig:
        """A named configuration.

        ``"auto"`` (what ``config=None`` gives): ``"gpu"`` when JAX has an accelerator, else
        ``"cpu"``. ``"gpu"``: multiband 128-filter networks, 128 x 128 patches, batch 64.
        ``"cpu"``: multiband 32-filter networks, patch and batch sized to the memory
        (:func:`cpu_training`), 5 minutes per training at most. ``"paper"``: the paper's per-band
        128-filter networks. All of these train until the held-out date stops improving
        (:data:`TRAINING`). ``"tiny"``: 16 filters, 32 x 32 patches, 150 steps per stage, no
        early stopping: trains for real on a CPU in seconds (tests, demo).
        """
        if name == "auto":
            import jax

            return cls.preset("gpu" if jax.default_backend() != "cpu" else "cpu")
        if name == "gpu":
            return cls()
        if name == "paper":
            return cls(multiband=False)
        if name == "cpu":
            train = cpu_training()
            return cls(filters=(32, 32, 32), stage1=train, stage2={**train, "seed": 1})
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
            return cls(filters=(16, 16, 16), refit=False, stage1=tiny, stage2={**tiny, "seed": 1})
        raise ConfigError(f"biastf: unknown config preset {name!r}; choose one of {PRESETS}.")

    @classmethod
    def resolve(cls, config: BiaSTFConfig | Mapping[str, Any] | str | None) -> BiaSTFConfig:
        """Config from a dataclass, a preset name, None (``"auto"``) or a mapping.

        A mapping may name a ``preset`` to start from, override any field, give ``train``
        (optimisation settings for both stages) and ``stage1``/``stage2`` (per stage, on top).
        Unknown keys raise :class:`ConfigError`.
        """
        if isinstance(config, cls):
            return config
        if config is None or isinstance(config, str):
            return cls.preset(config or "auto")
        if not isinstance(config, Mapping):
            raise ConfigError(
                f"biastf: config must be a BiaSTFConfig, a mapping or a preset name {PRESETS}, got {type(config).__name__}."
            )
        values = dict(config)
        base = cls.preset(values.pop("preset", "auto"))
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


@dataclasses.dataclass(frozen=True)
class Statistics:
    """Per-band constants fitted on the training dates and recorded in the model.

    Attributes
    ----------
    mean, scale : tuple of float
        Mean and standard deviation of the fine reflectance: ``F(j)``, ``C(j)`` and ``C(k)`` enter
        the networks as ``(x - mean) / scale``.
    change : tuple of float
        Standard deviation of the coarse change ``dC`` over the training pairs: ``dC``, ``G``'s
        output and both stages' targets are divided by it.
    conversion : tuple of tuple of float
        ``A`` (bands x bands): ``G``'s base ``A dC`` (``g_base="linear"``).
    limit : tuple of float
        ``L``, where the learned part starts to fade (:func:`trust_in_change`).
    """

    mean: tuple[float, ...]
    scale: tuple[float, ...]
    change: tuple[float, ...]
    conversion: tuple[tuple[float, ...], ...]
    limit: tuple[float, ...]

    @classmethod
    def identity(cls, n_bands: int) -> Statistics:
        """No normalisation, ``A = I``, no limit (models saved before these were recorded)."""
        eye = tuple(map(tuple, np.eye(n_bands).tolist()))
        return cls((0.0,) * n_bands, (1.0,) * n_bands, (1.0,) * n_bands, eye, (np.inf,) * n_bands)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (lists), as stored in ``model.extra["statistics"]``."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_model(cls, model: Any) -> Statistics:
        """The model's statistics; a model without them predicts as before they existed."""
        n = len(model.bands)
        saved = model.extra.get("statistics")
        out = cls.identity(n)
        if saved is not None:
            out = cls(**{k: tuple(tuple(r) for r in v) if k == "conversion" else tuple(v) for k, v in saved.items()})
        elif model.extra.get("change_limit") is not None:
            out = dataclasses.replace(out, limit=tuple(model.extra["change_limit"]))
        return out

    def arrays(self) -> dict[str, Any]:
        """float32 NumPy arrays (traced arguments of the jitted predictor)."""
        return {k: np.asarray(v, np.float32) for k, v in dataclasses.asdict(self).items()}


#: ridge weight (relative to the mean diagonal of dC'dC) pulling the conversion ``A`` towards ``I``
CONVERSION_RIDGE = 1e-3


def fit_statistics(cube: xr.Dataset, times: Sequence[Any], factor: int | None, *, normalise: bool = True) -> Statistics:
    """:class:`Statistics` of ``times``: per-band moments, ``A`` and ``L``.

    ``A`` is the least-squares fit of the fine change averaged over each native coarse pixel to
    the coarse change there, over every pair of ``times``: ``dF_blocks ~ A dC`` (no intercept,
    ridge ``CONVERSION_RIDGE`` towards the identity). It undoes what is linear in the sensors'
    difference (gain, cross-band leakage) and holds for changes of any size.
    """
    step = max(int(factor or 1), 1)
    sel = cube.sel(time=list(times))
    coarse = _coarse_sample(cube, times, factor).astype(np.float64)  # (t, band, cy, cx)
    fine = sel["fine"].coarsen(y=step, x=step, boundary="trim").mean().values.astype(np.float64)
    fine_px = sel["fine"].isel(y=slice(step // 2, None, step), x=slice(step // 2, None, step)).values.astype(np.float64)
    n_bands = coarse.shape[1]
    limit = change_limit(coarse)
    cy, cx = min(fine.shape[2], coarse.shape[2]), min(fine.shape[3], coarse.shape[3])
    pairs = [(i, j) for i in range(len(times)) for j in range(i + 1, len(times))]
    dc = np.concatenate([(coarse[i] - coarse[j])[:, :cy, :cx].reshape(n_bands, -1) for i, j in pairs], axis=1)
    df = np.concatenate([(fine[i] - fine[j])[:, :cy, :cx].reshape(n_bands, -1) for i, j in pairs], axis=1)
    ok = np.isfinite(dc).all(0) & np.isfinite(df).all(0)
    x, y = dc[:, ok].T, df[:, ok].T  # (samples, band)
    conversion = np.eye(n_bands)
    if len(x) > 4 * n_bands:
        gram = x.T @ x
        ridge = CONVERSION_RIDGE * np.trace(gram) / n_bands
        conversion = np.eye(n_bands) + np.linalg.solve(gram + ridge * np.eye(n_bands), x.T @ (y - x)).T
    if not normalise:
        identity = Statistics.identity(n_bands)
        return dataclasses.replace(identity, conversion=tuple(map(tuple, conversion.tolist())), limit=tuple(limit))
    mean = np.nanmean(fine_px, axis=(0, 2, 3))
    scale = np.nanstd(fine_px, axis=(0, 2, 3))
    change = np.nanstd(dc, axis=1) if dc.size else np.ones(n_bands)
    floor = 1e-4  # reflectance: a constant band must not divide by zero
    return Statistics(
        mean=tuple(np.nan_to_num(mean).tolist()),
        scale=tuple(np.maximum(np.nan_to_num(scale), floor).tolist()),
        change=tuple(np.maximum(np.nan_to_num(change), floor).tolist()),
        conversion=tuple(map(tuple, conversion.tolist())),
        limit=tuple(limit),
    )


# --------------------------------------------------------------------------- JAX parts
def _per_band(values: Any) -> Any:
    """``(band,)`` constants shaped to broadcast over ``(n, band, y, x)``."""
    import jax.numpy as jnp

    return jnp.asarray(values, jnp.float32)[:, None, None]


def _features(names: Sequence[str], images: Mapping[str, Any], stats: Any) -> Any:
    """Normalised named ``(n, band, y, x)`` images stacked into ``(n, y, x, band, channel)``, NaN -> 0."""
    import jax.numpy as jnp

    mean, scale, change = _per_band(stats["mean"]), _per_band(stats["scale"]), _per_band(stats["change"])
    scaled = {
        "coarse_change": lambda a: a / change,
        "change_pred": lambda a: a / change,
        "fine_known": lambda a: (a - mean) / scale,
        "coarse_known": lambda a: (a - mean) / scale,
        "coarse_target": lambda a: (a - mean) / scale,
    }
    stacked = jnp.stack([scaled[name](images[name]) for name in names], axis=-1)
    return jnp.nan_to_num(jnp.transpose(stacked, (0, 2, 3, 1, 4)), nan=0.0, posinf=0.0, neginf=0.0)


def _valid_within(valid: Any, radius: int) -> Any:
    """True where ``valid`` holds at every pixel within ``radius`` (``(..., y, x)``); outside counts as valid."""
    import jax

    invalid = (~valid).astype("float32")
    dims = (1,) * (valid.ndim - 2) + (2 * radius + 1, 2 * radius + 1)
    pad = ((0, 0),) * (valid.ndim - 2) + ((radius, radius), (radius, radius))
    return jax.lax.reduce_window(invalid, 0.0, jax.lax.max, dims, (1,) * valid.ndim, pad) == 0


def _pair_images(fine_j: Any, coarse_i: Any, coarse_j: Any, mix_bands: bool) -> tuple[dict[str, Any], Any]:
    """Named inputs for predicting date i from date j, and where they are all valid (``(n, band, y, x)``).

    With ``mix_bands`` (a conversion across bands) a pixel needs the coarse change of every band.
    """
    import jax.numpy as jnp

    images = {
        "coarse_change": coarse_i - coarse_j,
        "fine_known": fine_j,
        "coarse_known": coarse_j,
        "coarse_target": coarse_i,
    }
    valid = jnp.isfinite(fine_j) & jnp.isfinite(coarse_j) & jnp.isfinite(coarse_i)
    if mix_bands:
        valid = valid & jnp.isfinite(images["coarse_change"]).all(axis=1, keepdims=True)
    return images, valid


def _networks(config: BiaSTFConfig, n_bands: int, dtype: str) -> tuple[Any, Any]:
    import jax.numpy as jnp

    from stf_pipeline.nn.modules import BandNet

    kw = {
        "n_bands": n_bands,
        "hidden": config.filters,
        "kernel_sizes": TABLE1_KERNELS,
        "multiband": config.multiband,
        "zero_last": True,  # untrained G adds nothing to its base, untrained B no bias
    }
    jdtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32  # tensorfloat32: float32 at default precision
    return BandNet(**kw, dtype=jdtype), BandNet(**kw, dtype=jdtype)


def _channels_last(a: Any) -> Any:
    """``(n, band, y, x) -> (n, y, x, band)``."""
    import jax.numpy as jnp

    return jnp.transpose(a, (0, 2, 3, 1))


def _converted(images: Mapping[str, Any], stats: Any) -> Any:
    """``A dC`` ``(n, y, x, band)`` (NaN -> 0)."""
    import jax.numpy as jnp

    change = jnp.nan_to_num(_channels_last(images["coarse_change"]))
    return jnp.einsum("nyxb,ab->nyxa", change, jnp.asarray(stats["conversion"], jnp.float32))


def _g_base(images: Mapping[str, Any], config: BiaSTFConfig, stats: Any) -> Any:
    """What ``G``'s network output is added to, ``(n, y, x, band)``: ``A dC``, ``dC`` or 0."""
    import jax.numpy as jnp

    if not config.g_residual:
        return jnp.zeros_like(_channels_last(images["coarse_change"]))
    if config.g_base == "linear":
        return _converted(images, stats)
    return jnp.nan_to_num(_channels_last(images["coarse_change"]))


def _apply_g(g_model: Any, params: Any, images: Mapping[str, Any], config: BiaSTFConfig, stats: Any) -> Any:
    """``G = base + change_scale x net(normalised inputs)``, ``(n, y, x, band)``."""
    import jax.numpy as jnp

    net = g_model.apply({"params": params}, _features(config.g_inputs, images, stats))
    return _g_base(images, config, stats) + net * jnp.asarray(stats["change"], jnp.float32)


def _apply_b(b_model: Any, params: Any, images: Mapping[str, Any], config: BiaSTFConfig, stats: Any) -> Any:
    """``B = change_scale x net(normalised inputs)``, ``(n, y, x, band)``."""
    import jax.numpy as jnp

    net = b_model.apply({"params": params}, _features(config.b_inputs, images, stats))
    return net * jnp.asarray(stats["change"], jnp.float32)


def _mixes_bands(config: BiaSTFConfig) -> bool:
    return config.g_residual and config.g_base == "linear"


def g_batch(crops: Mapping[str, Any], aux: Any, *, config: BiaSTFConfig, stats: Statistics) -> Any:
    """Stage-1 batch: inputs ``g_inputs`` of ``(i, j)``, target ``(dF(i, j) - base) / change``."""
    import jax.numpy as jnp

    from stf_pipeline.nn.sampler import Batch

    fine, coarse = crops["fine"], crops["coarse"]
    s = stats.arrays()
    images, valid = _pair_images(fine[:, 1], coarse[:, 0], coarse[:, 1], _mixes_bands(config))
    target = (_channels_last(fine[:, 0] - fine[:, 1]) - _g_base(images, config, s)) / jnp.asarray(s["change"])
    mask = _channels_last(_valid_within(valid, NET_RADIUS)) & jnp.isfinite(target)
    return Batch(_features(config.g_inputs, images, s), jnp.nan_to_num(target), mask)


def b_batch(crops: Mapping[str, Any], aux: Any, *, config: BiaSTFConfig, stats: Statistics, g_model: Any) -> Any:
    """Stage-2 batch: inputs ``b_inputs`` (with the frozen ``G``'s output), target ``(dF - G) / change``."""
    import jax.numpy as jnp

    from stf_pipeline.nn.sampler import Batch

    fine, coarse = crops["fine"], crops["coarse"]
    s = stats.arrays()
    images, valid = _pair_images(fine[:, 1], coarse[:, 0], coarse[:, 1], _mixes_bands(config))
    g = _apply_g(g_model, aux, images, config, s)
    images["change_pred"] = jnp.transpose(g, (0, 3, 1, 2))
    target = (_channels_last(fine[:, 0] - fine[:, 1]) - g) / jnp.asarray(s["change"])
    mask = _channels_last(_valid_within(valid, 2 * NET_RADIUS)) & jnp.isfinite(target)
    return Batch(_features(config.b_inputs, images, s), jnp.nan_to_num(target), mask)


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
    stats: Any,
    fine: Any,
    coarse: Any,
    coarse_target: Any,
    *,
    window: int,
    eps: float,
    weights: str,
) -> tuple[Any, Any, Any]:
    """Traced body of the predictor: fused ``(band, y, x)``, transitional ``(pair, band, y, x)`` and
    the number of valid pixels beyond the limit ``L`` (where the learned part fades)."""
    import jax.numpy as jnp

    target = jnp.broadcast_to(coarse_target[None], coarse.shape)
    images, valid = _pair_images(fine, target, coarse, _mixes_bands(config))
    g = _apply_g(g_model, params["G"], images, config, stats)
    images["change_pred"] = jnp.transpose(g, (0, 3, 1, 2))
    b = _apply_b(b_model, params["B"], images, config, stats)
    change = jnp.nan_to_num(_channels_last(images["coarse_change"]))
    base = _converted(images, stats) if config.g_base == "linear" else change
    trust = trust_in_change(change, stats["limit"])
    transitional = fine + jnp.transpose(base + trust * (g + b - base), (0, 3, 1, 2))
    ok = _valid_within(valid, 2 * NET_RADIUS) & valid
    transitional = jnp.where(ok, transitional, jnp.nan)
    fused = fuse_directions(transitional, coarse_target, window=window, eps=eps, weights=weights, coarse=coarse)
    beyond = jnp.sum(ok & (jnp.transpose(trust, (0, 3, 1, 2)) < 1))
    return fused, transitional, beyond


@functools.lru_cache(maxsize=8)
def _predictor(config_json: str, n_bands: int, dtype: str, window: int, eps: float, weights: str) -> Any:
    """Jitted ``(params, stats, fine, coarse, coarse_target) -> (fused, transitional, beyond)``."""
    import jax

    config = BiaSTFConfig.resolve(json.loads(config_json))
    g_model, b_model = _networks(config, n_bands, dtype)
    precision = "highest" if dtype == "float32" else "default"

    @jax.jit
    def predict(params: Any, stats: Any, fine: Any, coarse: Any, coarse_target: Any) -> tuple[Any, Any, Any]:
        with jax.default_matmul_precision(precision):
            return _forward(
                config, g_model, b_model, params, stats, fine, coarse, coarse_target,
                window=window, eps=eps, weights=weights,
            )

    return predict


#: models already warned about changes beyond their training range (one warning per model)
_WARNED: weakref.WeakSet = weakref.WeakSet()
#: share of a block's valid pixels beyond ``L`` above which that is logged as a warning
BEYOND_WARNING = 0.01


def predict_block(
    fine: np.ndarray,
    coarse: np.ndarray,
    coarse_target: np.ndarray,
    *,
    params: BiaSTFParams,
    model: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Fused ``(band, y, x)`` and transitional ``(pair, band, y, x)`` predictions of one block.

    Where the coarse change goes beyond the training pairs' (more than ``BEYOND_WARNING`` of the
    block's valid pixels), a warning names the documented fallback, once per model.
    """
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
    stats = Statistics.from_model(model)
    if params.extrapolate:
        stats = dataclasses.replace(stats, limit=(np.inf,) * len(model.bands))
    fused, transitional, beyond = predict(model.params, stats.arrays(), fine, coarse, coarse_target)
    transitional = np.asarray(transitional, dtype=np.float32)
    share = int(beyond) / max(int(np.isfinite(transitional).sum()), 1)
    if share > BEYOND_WARNING and model not in _WARNED:
        _WARNED.add(model)
        log.warning(
            "biastf: the coarse change exceeds the training pairs' range (L = %s) on %.0f %% of the predicted pixels; "
            "there the learned correction fades out and the prediction falls back to F(j) + %s. "
            "Train with dates that span such changes, or pass extrapolate=True to apply the networks anyway.",
            [round(v, 4) for v in stats.limit], 100 * share,
            "A dC" if BiaSTFConfig.resolve(model.config).g_base == "linear" else "dC",
        )
    return np.asarray(fused, dtype=np.float32), transitional


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


def _fit_stages(
    cube: xr.Dataset,
    cfg: BiaSTFConfig,
    times: Sequence[Any],
    held: Sequence[Any],
    stats: Statistics,
    *,
    steps: Sequence[int] | None,
    workdir: Path | None,
    fingerprint: Mapping[str, Any],
    suffix: str = "",
) -> tuple[dict[str, Any], dict[str, Any], list[Any]]:
    """Train ``G`` then ``B`` on the ordered pairs of ``times``, validated on ``held``.

    ``steps``: run exactly this many steps per stage, without validation (the refit). Returns the
    parameters, the histories and the :class:`~stf_pipeline.nn.FitResult` of each stage.
    """
    import jax
    import jax.numpy as jnp

    from stf_pipeline.nn import PatchSampler, checkpoint_store, create_train_state, ordered_pairs
    from stf_pipeline.nn import fit as fit_stage

    n_bands = int(cube.sizes["band"])
    g_model, b_model = _networks(cfg, n_bands, cfg.train_dtype)
    n = len(times)
    val_items = [item for v in range(len(held)) for j in range(n) for item in ((n + v, j), (j, n + v))]
    side = min(int(cube.sizes["y"]), int(cube.sizes["x"]))
    params: dict[str, Any] = {}
    history: dict[str, Any] = {}
    results = []
    stages = (
        ("G", cfg.stage1, g_model, cfg.g_inputs, cfg.g_loss, functools.partial(g_batch, config=cfg, stats=stats)),
        ("B", cfg.stage2, b_model, cfg.b_inputs, cfg.b_loss,
         functools.partial(b_batch, config=cfg, stats=stats, g_model=g_model)),
    )
    for stage, (name, tc, model, inputs, loss, make_batch) in enumerate(stages, start=1):
        if tc.patch_size > side:
            log.info("biastf: patch_size %d is larger than the scene; using %d", tc.patch_size, side)
            tc = dataclasses.replace(tc, patch_size=side)
        fixed = steps[stage - 1] if steps is not None else (None if held else cfg.unvalidated_steps)
        if fixed is not None:
            tc = dataclasses.replace(tc, steps=max(int(fixed), 1), patience=0)
        common = {"patch_size": tc.patch_size, "batch_size": tc.batch_size, "preload": tc.preload}
        sampler = PatchSampler(cube, times, items=ordered_pairs(n), seed=tc.seed, augment=tc.augment, **common)
        val = PatchSampler(cube, [*times, *held], items=val_items, seed=tc.seed + 7919, **common) if held else None
        sample = jnp.zeros((1, tc.patch_size, tc.patch_size, n_bands, len(inputs)), jnp.float32)
        state = create_train_state(jax.random.key(tc.seed), tc, model, sample, loss=loss)
        key = f"stage{stage}_{name}{suffix}"
        if fixed == 0:  # the validated run kept the initial (zero) network, or nothing validates
            params[name], history[key] = jax.device_get(state.params), {}
            continue
        directory = workdir / f"stage{stage}{suffix}" if workdir is not None else None
        settings = dataclasses.asdict(dataclasses.replace(tc, progress=False))  # a progress bar changes no model
        stage_print = {**fingerprint, "stage": name, "train": settings}
        with checkpoint_store(directory, fingerprint=stage_print) as store:
            result = fit_stage(
                state, sampler, make_batch, config=tc, aux=params.get("G"), val_sampler=val, checkpoints=store,
                name=f"biastf stage {stage} ({name}{suffix})",
            )
        params[name] = jax.device_get(result.params)
        history[key] = {**result.history, "best_step": result.best_step, "stop_reason": result.stop_reason}
        results.append(result)
    return params, history, results


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
        See :meth:`BiaSTFConfig.resolve`; default ``"auto"`` (sized to the device).
    workdir : path-like, optional
        Checkpoints (``stage1/``, ``stage2/``, and ``stage1_refit/``, ``stage2_refit/``; a rerun
        resumes, also after Ctrl-C), ``history.json``, ``loss_curves.png`` and the final ``model/``.
    val_times : sequence of date-like, optional
        Held-out dates with fine images: validation pairs predict each of them from each training
        date and back; they choose the best step and stop the training. Default: one training
        date is held out (:func:`stf_pipeline.nn.holdout_split`; with two training dates there
        is no validation, and a warning says so), and with ``refit`` the networks are then
        trained again on all dates for the best step counts.

    Returns
    -------
    FittedModel
        ``extra`` records the validation (``"validation"``), the statistics, ``change_limit``.
    """
    from stf_pipeline.nn import FittedModel, holdout_split, save_history
    from stf_pipeline.task import iso_date, to_datetime64

    cfg = BiaSTFConfig.resolve(config)
    times = sorted({to_datetime64(t) for t in train_times})
    if len(times) < 2:
        raise TaskError(
            f"biastf learns from ordered pairs of training dates and needs at least two, got {[iso_date(t) for t in times]}; "
            "pass train_times with two or more dates that have fine and coarse images."
        )
    if val_times:
        held = sorted({to_datetime64(t) for t in val_times} - set(times))
        fit_times, mode = times, "val_times"
    else:
        fit_times, held = holdout_split(times, name="biastf")
        mode = "held-out training date" if held else "none (too few training dates)"
        if not held:
            log.warning(
                "biastf: no validation, so %s; pass val_times, or config={'unvalidated_steps': N} to train anyway.",
                f"{cfg.unvalidated_steps} unvalidated steps per stage" if cfg.unvalidated_steps else
                "the networks stay zero and the prediction is F(j) + dC fused by f (the documented fallback)",
            )
    bands = [str(b) for b in cube["band"].values.tolist()]
    factor = cube.attrs.get("coarse_factor")
    fingerprint = {
        "method": "biastf",
        "config": {**cfg.to_dict(), "stage1": None, "stage2": None},
        "bands": bands,
        "coarse_factor": factor,
        "train_times": [iso_date(t) for t in fit_times],
        "val_times": [iso_date(t) for t in held],
    }
    directory = None if workdir is None else Path(workdir)
    stats = fit_statistics(cube, fit_times, factor, normalise=cfg.normalise)
    params, history, results = _fit_stages(
        cube, cfg, fit_times, held, stats, steps=None, workdir=directory, fingerprint=fingerprint
    )
    best = [r.best_step for r in results]
    refit = bool(cfg.refit and held and not val_times)
    if refit:
        log.info("biastf: refitting on all %d training dates for %s steps (the validated best)", len(times), best)
        stats = fit_statistics(cube, times, factor, normalise=cfg.normalise)
        refit_print = {**fingerprint, "train_times": [iso_date(t) for t in times], "val_times": [], "steps": best}
        params, more, _ = _fit_stages(
            cube, cfg, times, [], stats, steps=best, workdir=directory, fingerprint=refit_print, suffix="_refit"
        )
        history.update(more)
    validation = {
        "mode": mode,
        "val_times": [iso_date(t) for t in held],
        "fit_times": [iso_date(t) for t in fit_times],
        "best_steps": best,
        "stop_reasons": [r.stop_reason for r in results],
        "refit": refit,
    }
    model_out = FittedModel(
        method="biastf",
        config=cfg.to_dict(),
        params=params,
        bands=tuple(bands),
        coarse_factor=None if factor is None else int(factor),
        train_times=tuple(iso_date(t) for t in times),
        history=history,
        extra={
            "val_times": [iso_date(t) for t in held],
            "validation": validation,
            "statistics": stats.to_dict(),
            "change_limit": list(stats.limit),
        },
    )
    if workdir is not None:
        save_history({k: v for k, v in history.items() if v}, workdir)
        model_out.save(Path(workdir) / "model", overwrite=True)
    return model_out


METHOD = MethodSpec(
    name="biastf",
    params_type=BiaSTFParams,
    kernels={"jax": biastf_kernel},
    halo=_halo,
    n_pairs=(2, 2),
    learned=True,
    fit=fit,
    prepare=_prepare,
)
