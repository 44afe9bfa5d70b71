"""BiaSTF's architecture and training configuration: :class:`BiaSTFConfig`, its presets and the
training settings sized to a CPU."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from stf_pipeline.exceptions import ConfigError
from stf_pipeline.methods._training import TRAINING

#: Table 1 kernel sides (fixed: the halo depends on them).
TABLE1_KERNELS: tuple[int, int, int, int] = (7, 5, 3, 3)
#: receptive radius of one Table 1 network
NET_RADIUS = 7
G_INPUTS: tuple[str, ...] = ("coarse_change", "fine_known", "coarse_known", "coarse_target")
B_INPUTS: tuple[str, ...] = (*G_INPUTS, "change_pred")
TRAIN_DTYPES: tuple[str, ...] = ("float32", "bfloat16")
G_BASES: tuple[str, ...] = ("modulated", "change", "linear")
PRESETS: tuple[str, ...] = ("auto", "gpu", "cpu", "paper", "tiny")
COARSE_INTERPOLATIONS: tuple[str, ...] = ("none", "cubic")


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
    g_base : {"modulated", "change", "linear"}, default "modulated"
        ``base = dC``; the modulated change ``C(k) + g (F(j) - C(j)) - F(j)``, ``g`` the coarse
        ratio ``C(k) / C(j)`` where the coarse reflectance falls (at most 1: the known image's
        detail shrinks with a darkening cover, is never amplified); or ``A dC`` with the fitted
        conversion ``A`` (bands x bands; measured worse). The base is also what the prediction
        falls back to beyond the training changes (``docs/methods/biastf.md``). Training on
        images that are not reflectance (``units``) replaces ``"modulated"`` by ``"change"``.
    coarse_interpolation : {"cubic", "none"}, default "cubic"
        How the networks and ``G``'s base see coarse images that are nearest-resampled onto the
        fine grid (constant on cells of ``coarse_factor`` pixels from the origin): interpolated
        between the native pixels' centres by Keys' cubic convolution (``"cubic"``,
        :func:`stf_pipeline.kernels.interpolate.cubic_between_centres`), so that a change that
        varies within a coarse pixel (a flood front, a phenology gradient) varies there too (the
        networks' receptive field, 15 pixels, is smaller than a coarse pixel); or as the blocks
        (``"none"``, the ``"paper"`` preset). Measured better on every study scene
        (``docs/methods/biastf.md``). Coarse images that are not constant on that grid (resampled
        smoothly already) are used as given; the model records which (``extra``). ``f`` always
        weighs the directions on the coarse images as given.
    normalise : bool, default True
        Per-band input and target scaling with constants from the training dates, recorded in
        the model (``model.extra["statistics"]``).
    refit : bool, default True
        With automatically held-out validation dates: after the validated run, refit both
        networks on all training dates for the best run's number of steps (per member).
    unvalidated_steps : int, default 0
        Steps per stage when nothing validates (two training dates, no ``val_times``). 0 keeps
        the zero-initialised networks: the prediction is ``F(j) + dC`` fused by ``f``, because
        an unvalidated correction made both two-date real sets worse (``docs/methods/biastf.md``).
    shrink : bool, default True
        Scale each band's learned correction ``G + B - base`` by a factor in [0, 1] fitted by
        least squares on the held-out dates (:func:`~stf_pipeline.methods.biastf.fit.validated_shrink`),
        so that a correction that does not carry to unseen dates is damped towards ``F(j) + base``
        (``docs/methods/biastf.md``). Needs validation dates; without them the factor is 1.
    same_date_pairs : bool, default False
        Also train on each training date against itself (``dC = 0``, ``dF = 0``), so the
        networks learn that no change needs no correction; aimed at targets a short time from a
        training date that only pairs with distant dates (``docs/methods/biastf.md``).
    members : int, default 1
        Networks trained per role and averaged (a cross-validated ensemble): member ``m`` holds
        out its own training date for validation (:func:`stf_pipeline.nn.holdout_split` with
        ``fold=m``) and its own seeds (``seed + 1000 m``), and the model predicts with the mean of
        the members' corrections ``G + B - base``. The ``"gpu"`` preset trains two: the mean
        of two refitted members was more accurate than its members on every study run
        (``docs/methods/biastf.md``), for twice the training time.
    frozen_g : bool, default True
        Stage 2 crops ``G``'s output from one pass of the frozen ``G`` over the scene per
        training pair (:func:`~stf_pipeline.methods.biastf.networks.frozen_g_outputs`) instead of
        running ``G`` on every batch, where the dates are preloaded (``preload``, a scene held in
        memory) and the outputs fit in ``FROZEN_G_BYTES``: faster, and ``B``
        learns from ``G``'s output as inference computes it (each patch with its surroundings).
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
    g_base: str = "modulated"
    coarse_interpolation: str = "cubic"
    normalise: bool = True
    refit: bool = True
    unvalidated_steps: int = 0
    shrink: bool = True
    same_date_pairs: bool = False
    members: int = 1
    frozen_g: bool = True
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
        if isinstance(self.members, bool) or not isinstance(self.members, int) or self.members < 1:
            raise ConfigError(f"biastf: members must be an int >= 1, got {self.members!r}.")
        if self.g_base not in G_BASES:
            raise ConfigError(f"biastf: g_base must be one of {G_BASES}, got {self.g_base!r}.")
        if self.coarse_interpolation not in COARSE_INTERPOLATIONS:
            raise ConfigError(
                f"biastf: coarse_interpolation must be one of {COARSE_INTERPOLATIONS}, "
                f"got {self.coarse_interpolation!r}."
            )
        if self.train_dtype not in TRAIN_DTYPES:
            raise ConfigError(f"biastf: train_dtype must be one of {TRAIN_DTYPES}, got {self.train_dtype!r}.")

    @classmethod
    def preset(cls, name: str) -> BiaSTFConfig:
        """A named configuration.

        ``"auto"`` (what ``config=None`` gives): ``"gpu"`` when JAX has an accelerator, else
        ``"cpu"``. ``"gpu"``: two members of multiband 128-filter networks, 128 x 128
        patches, batch 64.
        ``"cpu"``: multiband 32-filter networks, patch and batch sized to the memory
        (:func:`cpu_training`), 5 minutes per training at most. ``"paper"``: the paper's per-band
        128-filter networks with ``G``'s base ``dC`` and the coarse images as given. All of these
        train until the held-out date stops improving, at
        most 600 steps per stage (:data:`TRAINING`). ``"tiny"``: 16 filters, 32 x 32 patches, 150 steps per stage, no
        early stopping: trains for real on a CPU in seconds (tests, demo).
        """
        if name == "auto":
            import jax

            return cls.preset("gpu" if jax.default_backend() != "cpu" else "cpu")
        if name == "gpu":
            return cls(members=2)
        if name == "paper":
            return cls(multiband=False, g_base="change", coarse_interpolation="none")
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
                f"biastf: config must be a BiaSTFConfig, a mapping or a preset name {PRESETS}, "
                f"got {type(config).__name__}."
            )
        values = dict(config)
        base = cls.preset(values.pop("preset", "auto"))
        common = dict(values.pop("train", {}) or {})
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ConfigError(
                f"biastf: unknown config key(s) {unknown}; valid keys are {sorted(valid | {'preset', 'train'})}."
            )
        for stage in ("stage1", "stage2"):
            merged = {**dataclasses.asdict(getattr(base, stage)), **common, **dict(values.pop(stage, {}) or {})}
            values[stage] = _train_config(merged)
        return dataclasses.replace(base, **values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (``resolve`` reads it back)."""
        out = dataclasses.asdict(self)
        return json.loads(json.dumps(out))


__all__ = [
    "B_INPUTS", "COARSE_INTERPOLATIONS", "G_BASES", "G_INPUTS", "NET_RADIUS", "PRESETS", "TABLE1_KERNELS", "TRAINING",
    "TRAIN_DTYPES",
    "BiaSTFConfig", "cpu_training",
]
