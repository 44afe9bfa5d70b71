"""STFDCNN's training: the NLM then the SR network, stage by stage, validated on held-out dates and
refitted on all of them."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr

from stf_pipeline.cube import validate_cube
from stf_pipeline.exceptions import ConfigError, MethodError, TaskError
from stf_pipeline.methods.stfdcnn.config import Architecture, STFDCNNConfig, default_lsr_factor
from stf_pipeline.methods.stfdcnn.networks import NLMBatch, SRBatch
from stf_pipeline.nn.stfdcnn_modules import CNNConfig, ResidualCNN
from stf_pipeline.task import iso_date, to_datetime64, valid_fraction


def _check_dates(cube: xr.Dataset, times: Sequence[Any], what: str) -> list[np.datetime64]:
    """Dates of ``cube`` with a fine and a coarse image (raise naming the bad ones)."""
    all_times = cube["time"].values.astype("datetime64[ns]")
    dates = [to_datetime64(t) for t in times]
    missing = [iso_date(t) for t in dates if t not in all_times]
    if missing:
        known = [iso_date(t) for t in all_times]
        raise TaskError(f"stfdcnn: {what} {missing} are not dates of the cube; its dates are {known}.")
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
            log = logging.getLogger("stf_pipeline.methods.stfdcnn")
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
        "val_times": [iso_date(t) for t in val_dates],
        "fit_times": [iso_date(t) for t in fit_dates],
        "best_steps": best,
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
    stages: tuple[tuple[str, CNNConfig, NLMBatch | SRBatch, tuple[str, ...], int], ...] = (
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
        sampler = functools.partial(
            PatchSampler, cube, patch_size=train.patch_size, batch_size=train.batch_size, align=r,
            variables=variables, preload=train.preload,
        )
        train_sampler = sampler(dates, items=[(i,) for i in range(len(dates))], seed=stage_train.seed,
                                augment=train.augment)
        val_sampler = (
            sampler(val_dates, items=[(i,) for i in range(len(val_dates))], seed=stage_train.seed + 1000,
                    augment=False)
            if val_dates else None
        )
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
                state, train_sampler, make_batch, config=stage_train, val_sampler=val_sampler, checkpoints=store,
                name=f"stfdcnn {name}{suffix}",
            )
        params[name] = jax.device_get(result.params)
        history[label] = {**result.history, "best_step": result.best_step, "stop_reason": result.stop_reason}
        results.append(result)
    return params, history, results
