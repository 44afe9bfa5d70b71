"""Neural-network machinery shared by the learned methods (BiaSTF, STFDCNN).

- :mod:`~stf_pipeline.nn.modules`: :class:`ConvStack` and :class:`BandNet` (per-band or multiband).
- :mod:`~stf_pipeline.nn.sampler`: :class:`PatchSampler` (seeded random patches over items of
  dates), :class:`Batch`, :func:`ordered_pairs`.
- :mod:`~stf_pipeline.nn.train`: :class:`TrainConfig`, :class:`TrainState`, :func:`create_train_state`,
  :func:`averaged_params`, pure jitted :func:`train_step` / :func:`eval_step`, the loop :func:`fit`,
  :func:`holdout_split`.
- :mod:`~stf_pipeline.nn.checkpoint`: :class:`CheckpointStore` (Orbax, resumable, fingerprinted).
- :mod:`~stf_pipeline.nn.model`: :class:`FittedModel` (save/load, cube checks).

Importing this package imports JAX and Flax.
"""

from stf_pipeline.nn.checkpoint import CheckpointStore, checkpoint_store
from stf_pipeline.nn.model import FORMAT_VERSION, FittedModel
from stf_pipeline.nn.modules import BandNet, ConvStack, receptive_radius
from stf_pipeline.nn.sampler import Batch, PatchSampler, ordered_pairs
from stf_pipeline.nn.train import (
    FitResult,
    TrainConfig,
    TrainState,
    averaged_params,
    create_train_state,
    eval_step,
    fit,
    holdout_split,
    make_optimizer,
    make_schedule,
    masked_metrics,
    save_history,
    train_step,
)

__all__ = [
    "FORMAT_VERSION",
    "Batch",
    "BandNet",
    "CheckpointStore",
    "checkpoint_store",
    "ConvStack",
    "FitResult",
    "FittedModel",
    "PatchSampler",
    "TrainConfig",
    "TrainState",
    "averaged_params",
    "create_train_state",
    "eval_step",
    "fit",
    "holdout_split",
    "make_optimizer",
    "make_schedule",
    "masked_metrics",
    "ordered_pairs",
    "receptive_radius",
    "save_history",
    "train_step",
]
