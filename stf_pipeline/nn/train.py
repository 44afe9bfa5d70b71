"""Training as pure functions over explicit state (Flax ``TrainState`` + Optax).

The pieces, generic over the network and the loss:

- :class:`TrainConfig`: optimiser, schedule, steps, patches, validation, early stopping,
  checkpoints; frozen and validated.
- :func:`make_optimizer`: ``optax.chain(clip_by_global_norm, adam(warmup + cosine schedule))``
  (AdamW with ``weight_decay``).
- :func:`create_train_state`: initialise a Flax module into a :class:`TrainState`.
- :func:`train_step` / :func:`eval_step`: pure, jitted, masked ``l1``/``l2`` losses.
- :func:`fit`: the loop: seeded batches from a :class:`~stf_pipeline.nn.sampler.PatchSampler`,
  built by a method's ``make_batch(crops, aux) -> Batch`` (fused into the jitted step), validation
  on held-out batches (optionally also before the first step), early stopping (the best parameters
  are kept), a wall-time limit, Orbax checkpoints that resume after a kill (Ctrl-C writes one
  before it stops), live progress showing the loss (:mod:`stf_pipeline.progress`), and a loss
  history (for loss-curve figures).
- :func:`holdout_split`: which training dates to hold out for validation when none are given.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state

from stf_pipeline.exceptions import ConfigError
from stf_pipeline.nn.sampler import Batch, PatchSampler

log = logging.getLogger(__name__)

LOSSES: tuple[str, ...] = ("l1", "l2")
#: steps per stage when there is nothing to validate on (two training dates, no val_times)
NO_VALIDATION_STEPS = 500
SCHEDULES: tuple[str, ...] = ("cosine", "constant")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train one network (one stage).

    Attributes
    ----------
    steps : int, default 20000
        Maximum optimiser steps (early stopping may end sooner).
    batch_size : int, default 64
        Patches per step.
    patch_size : int, default 128
        Patch side in fine pixels (the paper's 128 x 128).
    learning_rate : float, default 1e-3
        Peak Adam learning rate.
    schedule : {"cosine", "constant"}, default "cosine"
        After ``warmup_steps`` of linear warm-up: cosine decay to ``final_lr_fraction`` of the
        peak over the remaining steps, or constant.
    warmup_steps : int, default 100
    final_lr_fraction : float, default 0.01
    grad_clip : float, default 1.0
        Global gradient-norm clip (``0`` disables it).
    eval_every : int, default 250
        Steps between validations (and early-stopping checks).
    eval_batches : int, default 8
        Fixed validation batches (drawn once from the validation sampler).
    patience : int, default 8
        Stop after this many validations without an improvement of at least ``min_delta``
        (relative); ``0`` disables early stopping.
    min_delta : float, default 1e-3
    validate_initial : bool, default False
        Also validate before the first step, so the initial parameters compete for "best": a
        network initialised to a sound baseline (BiaSTF's zero last layers: fine + coarse
        change) is kept when training never beats it on the held-out dates.
    checkpoint_every : int, default 1000
        Steps between checkpoints (when a checkpoint directory is given); one is also written at
        the end.
    log_every : int, default 25
        Steps between loss readings (progress bar and history); reading forces a device sync.
    seed : int, default 0
        Seeds the parameter initialisation and the patch draws.
    progress : bool, default True
        Show live progress with the loss (:class:`stf_pipeline.progress.Progress`).
    preload : bool, default True
        Read training dates into device memory once (see :class:`PatchSampler`).
    max_minutes : float, optional
        Wall-time limit of this training (stage); it stops after the step that passes it, keeping
        the best parameters, as early stopping does. None: no limit.
    weight_decay : float, default 0.0
        Decoupled weight decay (AdamW) per step, relative to the learning rate.
    augment : bool, default False
        Random flips and 90-degree rotations of the training patches (the same for every image of
        one item, so inputs, target and mask stay aligned; see :class:`PatchSampler`).
    ema_decay : float, default 0.0
        Polyak averaging: validation, the kept best parameters and the returned ones use an
        exponential moving average of the iterates, ``ema <- d ema + (1 - d) params`` after every
        step, starting from the initial parameters (:func:`averaged_params`). An average over the
        last ``1 / (1 - d)`` steps smooths the noise of single iterates at a high learning rate,
        so that early stopping compares smoother candidates. ``0`` disables it.
    """

    steps: int = 20000
    batch_size: int = 64
    patch_size: int = 128
    learning_rate: float = 1e-3
    schedule: str = "cosine"
    warmup_steps: int = 100
    final_lr_fraction: float = 0.01
    grad_clip: float = 1.0
    eval_every: int = 250
    eval_batches: int = 8
    patience: int = 8
    min_delta: float = 1e-3
    validate_initial: bool = False
    checkpoint_every: int = 1000
    log_every: int = 25
    seed: int = 0
    progress: bool = True
    preload: bool = True
    max_minutes: float | None = None
    weight_decay: float = 0.0
    augment: bool = False
    ema_decay: float = 0.0

    def __post_init__(self) -> None:
        for name in (
            "steps", "batch_size", "patch_size", "eval_every", "eval_batches", "checkpoint_every", "log_every"
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"train config: {name} must be a positive int, got {value!r}.")
        for name in ("warmup_steps", "patience"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train config: {name} must be >= 0, got {getattr(self, name)!r}.")
        if not self.learning_rate > 0:
            raise ConfigError(f"train config: learning_rate must be > 0, got {self.learning_rate!r}.")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"train config: schedule must be one of {SCHEDULES}, got {self.schedule!r}.")
        if not 0 <= self.final_lr_fraction <= 1:
            raise ConfigError(f"train config: final_lr_fraction must be in [0, 1], got {self.final_lr_fraction!r}.")
        if self.grad_clip < 0 or self.min_delta < 0 or self.weight_decay < 0:
            raise ConfigError("train config: grad_clip, min_delta and weight_decay must be >= 0.")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"train config: ema_decay must be in [0, 1), got {self.ema_decay!r}.")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ConfigError(f"train config: max_minutes must be > 0 or None (no limit), got {self.max_minutes!r}.")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Build from a mapping, rejecting unknown keys with the valid ones listed."""
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ConfigError(f"unknown train config key(s) {unknown}; valid keys are {sorted(valid)}.")
        return cls(**dict(values))


def make_schedule(config: TrainConfig) -> optax.Schedule:
    """Linear warm-up then cosine decay (or constant), from :class:`TrainConfig`."""
    warmup = min(config.warmup_steps, max(config.steps - 1, 0))
    if config.schedule == "constant":
        if warmup == 0:
            return optax.constant_schedule(config.learning_rate)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, config.learning_rate, warmup), optax.constant_schedule(config.learning_rate)],
            [warmup],
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else config.learning_rate,
        peak_value=config.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(config.steps, warmup + 1),
        end_value=config.learning_rate * config.final_lr_fraction,
    )


@functools.lru_cache(maxsize=32)
def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """``optax.chain(clip_by_global_norm, adam(schedule))`` (the paper trains with Adam; AdamW when
    ``weight_decay`` > 0).

    Cached per (frozen, hashable) config: the optimiser is static metadata of the
    :class:`TrainState`, so an equal object lets a second training reuse the compiled steps.
    """
    parts = [optax.clip_by_global_norm(config.grad_clip)] if config.grad_clip > 0 else []
    schedule = make_schedule(config)
    adam = optax.adamw(schedule, weight_decay=config.weight_decay) if config.weight_decay > 0 else optax.adam(schedule)
    return optax.chain(*parts, adam)


class TrainState(train_state.TrainState):
    """Flax ``TrainState`` that also names its loss (``"l1"`` or ``"l2"``), so steps stay pure, and
    carries the moving average of the parameters (``ema_params``, with ``ema_decay`` > 0)."""

    loss: str = struct.field(pytree_node=False, default="l2")
    ema_decay: float = struct.field(pytree_node=False, default=0.0)
    ema_params: Any = None


def averaged_params(state: TrainState) -> Any:
    """The parameters that validate and predict: the moving average when ``state.ema_decay`` > 0,
    else the current iterate."""
    return state.ema_params if state.ema_decay > 0 else state.params


@functools.partial(jax.jit, static_argnames=("model",))
def _init(model: nn.Module, rng: jax.Array, sample_input: jax.Array) -> Any:
    """Jitted ``model.init``, compiled once per (module configuration, input shape)."""
    return model.init(rng, sample_input)


def create_train_state(
    rng: jax.Array,
    config: TrainConfig,
    model: nn.Module,
    sample_input: jax.Array,
    *,
    loss: str = "l2",
) -> TrainState:
    """Initialise ``model`` on ``sample_input`` and wrap it with the optimiser of ``config``.

    Parameters
    ----------
    rng : jax.Array
        PRNG key for the parameter initialisation.
    config : TrainConfig
    model : flax.linen.Module
    sample_input : array
        An input of the right shape (batch and spatial sizes do not matter for convolutions).
    loss : {"l1", "l2"}, default "l2"
    """
    if loss not in LOSSES:
        raise ConfigError(f"loss must be one of {LOSSES}, got {loss!r}.")
    params = _init(model, rng, jnp.asarray(sample_input))["params"]
    return TrainState.create(
        apply_fn=model.apply, params=params, tx=make_optimizer(config), loss=loss, ema_decay=config.ema_decay,
        ema_params=params if config.ema_decay > 0 else None,
    )


def masked_metrics(pred: jax.Array, target: jax.Array, mask: jax.Array, loss: str) -> dict[str, jax.Array]:
    """Masked ``l1`` (mean absolute) or ``l2`` (mean squared) loss plus ``mae``, ``rmse``, ``valid``.

    Only pixels where ``mask`` is True count; NaN elsewhere in ``target`` does not reach the loss
    or its gradient. A batch without any valid pixel has loss 0 and zero gradient.
    """
    m = mask.astype(jnp.float32)
    count = jnp.maximum(m.sum(), 1.0)
    diff = jnp.where(mask, pred - jnp.where(mask, target, 0.0), 0.0)
    mae = jnp.abs(diff).sum() / count
    mse = jnp.square(diff).sum() / count
    return {
        "loss": mae if loss == "l1" else mse,
        "mae": mae,
        "rmse": jnp.sqrt(mse),
        "valid": m.mean(),
    }


@jax.jit
def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step on ``batch``; pure: returns the new state and the batch metrics."""

    def loss_fn(params: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        pred = state.apply_fn({"params": params}, batch.inputs)
        metrics = masked_metrics(pred, batch.targets, batch.mask, state.loss)
        return metrics["loss"], metrics

    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
    new = state.apply_gradients(grads=grads)
    if state.ema_decay > 0:
        d = state.ema_decay
        average = jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * p, state.ema_params, new.params)
        new = new.replace(ema_params=average)
    return new, metrics


@jax.jit
def eval_step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
    """Metrics of :func:`averaged_params` on ``batch`` (no update)."""
    pred = state.apply_fn({"params": averaged_params(state)}, batch.inputs)
    return masked_metrics(pred, batch.targets, batch.mask, state.loss)


MakeBatch = Callable[[dict[str, jax.Array], Any], Batch]


@functools.partial(jax.jit, static_argnames=("make_batch",))
def sample_step(
    state: TrainState, crops: dict[str, jax.Array], aux: Any, *, make_batch: MakeBatch
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One jitted training step on sampled crops: :func:`train_step` on ``make_batch(crops, aux)``.

    Building the batch inside the jitted step lets XLA fuse the crop-to-batch transform with the
    forward pass; :func:`fit` calls it once per step.

    Parameters
    ----------
    state : TrainState
        The model and optimiser state.
    crops : dict of str to jax.Array
        Crops of the training images, as :meth:`PatchSampler.crops` returns them.
    aux : Any
        Whatever ``make_batch`` needs besides the crops (statistics, a frozen network's parameters).
    make_batch : callable
        ``(crops, aux) -> Batch``; static under ``jax.jit``, so pass the same object every step.

    Returns
    -------
    tuple
        The new state and the step's metrics.
    """
    return train_step(state, make_batch(crops, aux))


@functools.partial(jax.jit, static_argnames=("make_batch",))
def _sample_eval(
    state: TrainState, crops: dict[str, jax.Array], aux: Any, *, make_batch: MakeBatch
) -> dict[str, jax.Array]:
    return eval_step(state, make_batch(crops, aux))


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes
    ----------
    state : TrainState
        Final state (last step run).
    params : pytree
        Best parameters by validation loss (the final ones without validation); the moving
        average with ``ema_decay`` > 0 (:func:`averaged_params`).
    history : dict
        ``{"step", "loss", "rmse", "mae"}`` training readings and ``{"val_step", "val_loss",
        "val_rmse"}`` validation readings, lists of numbers.
    stopped_early : bool
        Stopped by early stopping or the time limit (not by ``steps``).
    best_step : int
        Step of ``params`` (0: the initial parameters won validation; the last step without
        validation).
    stop_reason : str
        ``"steps"``, ``"early stopping"`` or ``"time limit"``.
    """

    state: TrainState
    params: Any
    history: dict[str, list[float]]
    stopped_early: bool
    best_step: int = 0
    stop_reason: str = "steps"


def _empty_history() -> dict[str, list[float]]:
    return {k: [] for k in ("step", "loss", "rmse", "mae", "val_step", "val_loss", "val_rmse")}


def fit(
    state: TrainState,
    sampler: PatchSampler,
    make_batch: MakeBatch,
    *,
    config: TrainConfig,
    aux: Any = None,
    val_sampler: PatchSampler | None = None,
    checkpoints: Any | None = None,
    name: str = "train",
    on_step: Callable[[int, TrainState], None] | None = None,
) -> FitResult:
    """Train ``state`` on batches ``make_batch(sampler.crops(step), aux)``.

    The budget: ``config.steps`` at most, fewer when validation stops improving
    (``patience``) or when ``config.max_minutes`` have passed. Ctrl-C (``KeyboardInterrupt``)
    writes a checkpoint of the current step and the best parameters before it propagates, so
    a rerun with the same ``checkpoints`` resumes there.

    Parameters
    ----------
    state : TrainState
        From :func:`create_train_state`.
    sampler : PatchSampler
        Training patches; batch ``s`` depends only on the sampler's seed and ``s``.
    make_batch : callable
        ``make_batch(crops, aux) -> Batch``: pure JAX, jitted together with the step (a
        module-level function, so that it is hashable and compiled once).
    config : TrainConfig
    aux : pytree, optional
        Extra arrays ``make_batch`` needs (e.g. frozen parameters of an earlier network).
    val_sampler : PatchSampler, optional
        Held-out patches (``config.eval_batches`` fixed batches) for validation and early stopping.
    checkpoints : CheckpointStore, optional
        Where to save and resume (:class:`stf_pipeline.nn.checkpoint.CheckpointStore`). If it holds
        a checkpoint, training resumes from it.
    name : str
        Label of the progress bar.
    on_step : callable, optional
        ``on_step(step, state)`` after every step (e.g. custom logging).

    Returns
    -------
    FitResult
    """
    from stf_pipeline.progress import Progress

    history = _empty_history()
    best_params, best_val, bad, best_step = state.params, math.inf, 0, 0
    reason = "steps"
    if checkpoints is not None and checkpoints.latest_step() is not None:
        restored, meta = checkpoints.restore({"state": state, "best_params": state.params})
        state, best_params = restored["state"], restored["best_params"]
        history = {k: list(v) for k, v in meta["history"].items()}
        best_val, bad, best_step = float(meta["best_val"]), int(meta["bad"]), int(meta.get("best_step", 0))
        reason = str(meta.get("stop_reason", "early stopping" if meta["stopped_early"] else "steps"))
        log.info("%s: resuming from the checkpoint at step %d in %s", name, int(state.step), checkpoints.directory)
    val_batches = (
        [val_sampler.crops(i) for i in range(config.eval_batches)] if val_sampler is not None else []
    )

    def validate(step: int) -> float:
        values = jax.device_get([_sample_eval(state, c, aux, make_batch=make_batch) for c in val_batches])
        val_loss = float(np.mean([v["loss"] for v in values]))
        history["val_step"].append(step)
        history["val_loss"].append(val_loss)
        history["val_rmse"].append(float(np.sqrt(np.mean([v["rmse"] ** 2 for v in values]))))
        return val_loss

    if config.validate_initial and val_batches and int(state.step) == 0 and not history["val_step"]:
        best_val = validate(0)

    def save(step: int) -> None:
        if checkpoints is not None:
            meta = {
                "history": history, "best_val": best_val, "bad": bad, "best_step": best_step,
                "stopped_early": reason != "steps", "stop_reason": reason,
            }
            checkpoints.save(step, {"state": state, "best_params": best_params}, meta)

    def flush() -> None:
        fetched = jax.device_get([m for _, m in pending])
        for (s, _), m in zip(pending, fetched, strict=True):
            history["step"].append(s)
            for key in ("loss", "rmse", "mae"):
                history[key].append(float(m[key]))
        pending.clear()

    start = int(state.step)
    deadline = None if config.max_minutes is None else time.monotonic() + 60.0 * config.max_minutes
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    bar = Progress(config.steps, desc=name, unit="step", initial=start, enabled=config.progress)
    step = start
    try:
        while step < config.steps and reason == "steps":
            state, metrics = sample_step(state, sampler.crops(step), aux, make_batch=make_batch)
            step += 1
            pending.append((step, metrics))
            if on_step is not None:
                on_step(step, state)
            out_of_time = deadline is not None and time.monotonic() > deadline
            if step % config.log_every == 0 or step == config.steps or out_of_time:
                flush()
                bar.set_postfix(loss=f"{history['loss'][-1]:.3g}", rmse=f"{history['rmse'][-1]:.3g}")
                bar.update(step - bar.n)
            if val_batches and (step % config.eval_every == 0 or step == config.steps or out_of_time):
                val_loss = validate(step)
                if val_loss < best_val * (1 - config.min_delta):
                    best_val, bad, best_params, best_step = val_loss, 0, averaged_params(state), step
                else:
                    bad += 1
                    if config.patience > 0 and bad >= config.patience:
                        reason = "early stopping"
            if out_of_time and reason == "steps":
                reason = "time limit"
                log.warning("%s: stopped at step %d: the time limit (max_minutes=%g)", name, step, config.max_minutes)
            if step % config.checkpoint_every == 0 or step == config.steps or reason != "steps":
                save(step)
    except KeyboardInterrupt:
        pending[:] = [(s, m) for s, m in pending if s <= int(state.step)]
        flush()
        save(int(state.step))
        kept = "checkpoint written: rerun with the same workdir to resume" if checkpoints is not None else "no workdir"
        log.warning("%s: interrupted at step %d; %s", name, step, kept)
        raise
    finally:
        bar.close()
    if not val_batches:
        best_params, best_step = averaged_params(state), int(state.step)
    if reason == "early stopping":
        log.info("%s: early stopping at step %d, best validation at step %d", name, step, best_step)
    return FitResult(
        state=state, params=best_params, history=history, stopped_early=reason != "steps", best_step=best_step,
        stop_reason=reason,
    )


def holdout_split(
    times: Sequence[Any], *, name: str, fold: int = 0, folds: int = 1
) -> tuple[list[Any], list[Any]]:
    """Split sorted training ``times`` into (dates to fit on, held-out validation dates).

    With three or more dates, one date is held out: an interior date (never the first or the
    last, so the fitted dates still span the series). ``fold`` of ``folds`` holds out the
    interior date nearest ``(fold + 1) / (folds + 1)`` of the time span (one fold: the middle),
    so that the folds of an ensemble validate on dates spread over the series; with fewer
    interior dates than folds, folds share dates. With fewer than three dates there is nothing
    to spare: all dates are fitted, none validates, and a warning says so; what the methods
    then do is theirs (BiaSTF keeps its zero networks, STFDCNN trains ``NO_VALIDATION_STEPS``
    steps per stage).
    """
    times = list(times)
    if len(times) < 3:
        log.warning(
            "%s: %d training date(s): too few to hold one out for validation, so nothing can tell a useful "
            "correction from overfitting (see the method's documentation for its fallback). Pass val_times, or three "
            "or more train_times.",
            name, len(times),
        )
        return times, []
    values = np.asarray(times, dtype="datetime64[ns]").astype(np.int64).astype(np.float64)
    inner = list(range(1, len(times) - 1))
    quantiles = [(f + 1) / (folds + 1) for f in range(folds)]
    chosen: list[int] = []
    for q in quantiles:  # distinct dates while there are enough, nearest the quantile first
        point = values[0] + q * (values[-1] - values[0])
        spare = [i for i in inner if i not in chosen] or inner
        chosen.append(min(spare, key=lambda i: (abs(values[i] - point), i)))
    held = chosen[fold % folds]
    return [t for i, t in enumerate(times) if i != held], [times[held]]


def save_history(history: Mapping[str, Mapping[str, list[float]]], directory: str | Path) -> Path:
    """Write per-stage loss histories to ``history.json`` and a loss-curve figure ``loss_curves.png``.

    The figure plots the training RMSE of every stage against the global step (stages one after
    the other), with validation RMSE dashed: for BiaSTF, the residual dropping below the stage-1
    plateau once the bias network trains (the paper's Figure 4).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "history.json").write_text(json.dumps(history, indent=1))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    offset = 0
    for stage, h in history.items():
        steps = np.asarray(h["step"], dtype=float) + offset
        ax.plot(steps, h["rmse"], label=f"{stage} (train)")
        if h.get("val_step"):
            ax.plot(np.asarray(h["val_step"], dtype=float) + offset, h["val_rmse"], "--", label=f"{stage} (validation)")
        offset = int(steps.max()) if steps.size else offset
    ax.set_xlabel("step")
    ax.set_ylabel("residual RMSE (reflectance)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    path = directory / "loss_curves.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
