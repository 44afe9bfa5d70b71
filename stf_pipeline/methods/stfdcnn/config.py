"""What STFDCNN is made of and how it is trained: the LSR factor, :class:`Architecture` (stored with
a model) and :class:`STFDCNNConfig` with its presets."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from stf_pipeline.exceptions import ConfigError, MethodError
from stf_pipeline.nn.stfdcnn_modules import CNNConfig

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
        (:data:`stf_pipeline.methods._training.TRAINING`: held-out date, early stopping,
        augmentation, 600 steps and a time limit), so that STFDCNN gets the budget rule BiaSTF gets.
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
            from stf_pipeline.methods._training import TRAINING

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
