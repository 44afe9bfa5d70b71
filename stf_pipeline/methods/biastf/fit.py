"""BiaSTF's training: ``G`` (stage 1) then ``B`` (stage 2) on the ordered pairs of the training dates,
validated on held-out dates, then refitted on all of them."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from stf_pipeline.exceptions import TaskError
from stf_pipeline.methods.biastf.config import BiaSTFConfig
from stf_pipeline.methods.biastf.networks import Statistics, b_batch, fit_statistics, g_batch, make_networks

log = logging.getLogger("stf_pipeline.methods.biastf")


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

    from stf_pipeline.nn import PatchSampler, checkpoint_store, create_train_state
    from stf_pipeline.nn import fit as fit_stage

    n_bands = int(cube.sizes["band"])
    g_model, b_model = make_networks(cfg, n_bands, cfg.train_dtype)
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
        items = training_items(n, cfg.same_date_pairs)
        n_frozen = len(items) + len(val_items) * bool(held)
        frozen = name == "B" and fixed != 0 and tc.preload and _frozen_g_fits(cube, cfg, n_frozen)
        # training items index the first len(times) of these dates, validation items all of them
        per_item = (
            _frozen_g(cube, cfg, stats, g_model, params["G"], [*times, *held], items, val_items if held else [])
            if frozen else (None, None)
        )
        sampler = PatchSampler(
            cube, times, items=items, seed=tc.seed, augment=tc.augment, per_item=per_item[0], **common
        )
        val = PatchSampler(
            cube, [*times, *held], items=val_items, seed=tc.seed + 7919, per_item=per_item[1], **common
        ) if held else None
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


def _base_for_units(cube: xr.Dataset, cfg: BiaSTFConfig) -> BiaSTFConfig:
    """``cfg``, with ``G``'s base ``dC`` instead of the modulated change where the cube's images are
    not reflectance (their ``units`` attribute): a ratio of coarse values means a change of cover
    only on a scale whose zero is no signal, and a linearly mapped temperature is not one."""
    units = {str(cube[name].attrs.get("units", "reflectance")) for name in ("fine", "coarse")}
    if cfg.g_base != "modulated" or units == {"reflectance"}:
        return cfg
    log.warning(
        "biastf: the images are in %s, not reflectance; G's base is dC instead of the modulated change, "
        "which needs a ratio scale (recorded in the model's config).",
        " and ".join(sorted(units)),
    )
    return dataclasses.replace(cfg, g_base="change")


def coarse_interpolation_factor(cube: xr.Dataset, cfg: BiaSTFConfig, times: Sequence[Any]) -> int:
    """The coarse factor at which the networks see ``cube``'s coarse images interpolated, 0 for as given.

    Non-zero with ``coarse_interpolation="cubic"`` where the first training date's coarse image is
    nearest-resampled on cells of ``coarse_factor`` pixels from the scene's origin (in a window
    of ``SAMPLE_SIDE`` pixels, :func:`constant_cells`): coarse images resampled smoothly, or on
    cells the origin does not start, are used as given.
    """
    from stf_pipeline.cube import SAMPLE_SIDE

    factor = int(cube.attrs.get("coarse_factor") or 0)
    if cfg.coarse_interpolation == "none" or factor < 2:
        return 0
    window = {dim: slice(0, SAMPLE_SIDE) for dim in ("y", "x")}
    if constant_cells(np.asarray(cube["coarse"].sel(time=times[0]).isel(window).values), factor):
        return factor
    log.info("biastf: the coarse images are not constant on cells of coarse_factor = %d pixels from the origin; "
             "the networks see them as given (coarse_interpolation has nothing to interpolate)", factor)
    return 0


#: share of a window's complete cells that must be constant for :func:`constant_cells`
CONSTANT_CELLS = 0.95


def constant_cells(window: np.ndarray, factor: int) -> bool:
    """Whether ``window`` ``(..., y, x)``, cut into cells of ``factor`` pixels from its origin, is
    constant on at least ``CONSTANT_CELLS`` of its complete cells with data (a nearest-resampled
    image on that grid; NaN pixels are left out of a cell).

    >>> constant_cells(np.repeat(np.eye(3), 4, axis=0).repeat(4, axis=1), 4)
    True
    >>> constant_cells(np.repeat(np.eye(3), 4, axis=0).repeat(4, axis=1)[1:, 1:], 4)
    False
    """
    h, w = (n // factor * factor for n in window.shape[-2:])
    cells = window[..., :h, :w].reshape(*window.shape[:-2], h // factor, factor, w // factor, factor)
    finite = np.isfinite(cells)
    high = np.where(finite, cells, -np.inf).max(axis=(-3, -1))
    low = np.where(finite, cells, np.inf).min(axis=(-3, -1))
    filled = finite.any(axis=(-3, -1))
    return bool(filled.any()) and float(np.mean(high[filled] == low[filled])) >= CONSTANT_CELLS


def with_interpolated_coarse(cube: xr.Dataset, times: Sequence[Any], factor: int) -> xr.Dataset:
    """``cube`` on ``times`` (each once) with its coarse images interpolated between the native pixels' centres
    (what the networks see, date by date: :func:`~stf_pipeline.kernels.interpolate.cubic_between_centres`)."""
    import jax.numpy as jnp

    from stf_pipeline.kernels.interpolate import cubic_between_centres

    dates = cube.sel(time=list(dict.fromkeys(times)))
    coarse = dates["coarse"].astype("float32")
    smooth = np.stack([
        np.asarray(cubic_between_centres(jnp.asarray(coarse.isel(time=i).values), factor))
        for i in range(coarse.sizes["time"])
    ])
    return dates.assign(coarse=coarse.copy(data=smooth))


def _frozen_g_fits(cube: xr.Dataset, cfg: BiaSTFConfig, n_items: int) -> bool:
    """Whether stage 2 takes ``G``'s output from :func:`frozen_g_outputs` (``cfg.frozen_g`` and
    the outputs of ``n_items`` pairs fit in ``FROZEN_G_BYTES``)."""
    from stf_pipeline.methods.biastf.networks import FROZEN_G_BYTES

    size = 4 * n_items * int(cube.sizes["band"]) * int(cube.sizes["y"]) * int(cube.sizes["x"])
    if cfg.frozen_g and size > FROZEN_G_BYTES:
        log.info("biastf: G's outputs would take %.1f GiB; stage 2 runs G on every batch", size / 2**30)
    return cfg.frozen_g and size <= FROZEN_G_BYTES


def _frozen_g(
    cube: xr.Dataset, cfg: BiaSTFConfig, stats: Statistics, g_model: Any, g_params: Any, times: Sequence[Any],
    *item_sets: Sequence[tuple[int, int]],
) -> tuple[dict[str, Any] | None, ...]:
    """``PatchSampler``'s ``per_item`` for each of ``item_sets`` (pairs of positions in ``times``):
    the frozen ``G``'s output, from one read of the dates; ``None`` for an empty set."""
    from stf_pipeline.methods.biastf.networks import frozen_g_outputs

    dates = {"time": list(times)}
    fine = cube["fine"].sel(dates).values.astype(np.float32)
    coarse = cube["coarse"].sel(dates).values.astype(np.float32)
    return tuple(
        {"change_pred": frozen_g_outputs(g_model, g_params, fine, coarse, items, cfg, stats)} if items else None
        for items in item_sets
    )


def training_items(n: int, same_date_pairs: bool = False) -> tuple[tuple[int, int], ...]:
    """The ``(i, j)`` items BiaSTF trains on: the ordered pairs of ``n`` dates, and with
    ``same_date_pairs`` also ``(i, i)``, whose coarse change and fine change are both zero.

    >>> training_items(2, same_date_pairs=True)
    ((0, 1), (1, 0), (0, 0), (1, 1))
    """
    from stf_pipeline.nn import ordered_pairs

    return ordered_pairs(n) + (tuple((i, i) for i in range(n)) if same_date_pairs else ())


#: side of the centre crop of the scene on which :func:`validated_shrink` fits its factors (bounds
#: its memory on large scenes; a factor per band needs far fewer pixels)
SHRINK_CROP = 1024


def validated_shrink(
    cube: xr.Dataset,
    params: Mapping[str, Any],
    cfg: BiaSTFConfig,
    stats: Statistics,
    times: Sequence[Any],
    held: Sequence[Any],
    *,
    interpolate: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-band factors in [0, 1] on the learned correction, fitted on the held-out dates.

    The transitional prediction from training date ``j`` to held-out date ``v`` is
    ``F(j) + base + s trust (G + B - base)`` (:func:`~stf_pipeline.methods.biastf.kernel.trust_in_change`).
    With ``r = F(v) - F(j) - base`` and ``l = trust (G + B - base)`` over the valid pixels of
    every pair ``(j, v)``, ``s = sum(r l) / sum(l l)`` (least squares), clipped to [0, 1]: a
    correction that overshoots on unseen dates is damped towards ``F(j) + base``, one that helps
    is kept. The pixels are the scene's centre ``SHRINK_CROP`` square (starting on a native
    pixel's edge for ``interpolate``, the factor of :func:`coarse_interpolation_factor`). ``s = 1`` where no
    valid pixel has a correction.

    Returns ``s`` ``(band,)`` and, from the same pixels, the factors of the two parts apart
    ``(2, band)``: ``s_g`` on ``trust (G - base)`` and ``s_b`` on ``trust B``, the least squares in
    the box [0, 1]² (:func:`box_least_squares`).
    """
    import json

    from stf_pipeline.methods.biastf.kernel import predictor
    from stf_pipeline.methods.biastf.params import BiaSTFParams, default_window

    n_bands = int(cube.sizes["band"])
    fusion = BiaSTFParams()  # the default self-ensemble; the transitional predictions do not depend on f
    predict = predictor(
        json.dumps(cfg.to_dict(), sort_keys=True), n_bands, "float32", default_window(cube.attrs.get("coarse_factor")),
        fusion.eps, fusion.weights, self_ensemble=fusion.self_ensemble, interpolate=interpolate,
    )
    step = max(interpolate, 1)  # an interpolating predictor's block starts on a native pixel's edge
    start = {dim: max((int(cube.sizes[dim]) - SHRINK_CROP) // 2, 0) // step * step for dim in ("y", "x")}
    crop = {dim: slice(first, first + SHRINK_CROP) for dim, first in start.items()}
    fine = cube["fine"].isel(crop).astype("float32")
    coarse = cube["coarse"].isel(crop).astype("float32")
    ones, zeros = np.ones(n_bands, np.float32), np.zeros(n_bands, np.float32)
    variants = {  # G - base and B on, B off, both off
        "full": {**params, "shrink": ones, "shrink_b": ones},
        "g": {**params, "shrink": ones, "shrink_b": zeros},
        "none": {**params, "shrink": zeros, "shrink_b": zeros},
    }
    arrays = stats.arrays()
    gram, cross = np.zeros((n_bands, 2, 2)), np.zeros((n_bands, 2))  # over (l_g, l_b); l = l_g + l_b
    for v in held:
        truth, target = fine.sel(time=v).values, coarse.sel(time=v).values
        for j in times:
            pair = (fine.sel(time=j).values[None], coarse.sel(time=j).values[None], target)
            out = {k: np.asarray(predict(p, arrays, *pair)[1][0], np.float64) for k, p in variants.items()}
            parts = np.stack([out["g"] - out["none"], out["full"] - out["g"]])
            residual = truth - out["none"]
            ok = np.isfinite(parts).all(axis=0) & np.isfinite(residual)
            parts, residual = np.where(ok, parts, 0.0), np.where(ok, residual, 0.0)
            gram += np.einsum("pbyx,qbyx->bpq", parts, parts)
            cross += np.einsum("pbyx,byx->bp", parts, residual)
    den, num = gram.sum(axis=(1, 2)), cross.sum(axis=1)  # sum(l l) and sum(r l) of the whole l = l_g + l_b
    whole = np.where(den > 0, np.clip(num / np.where(den > 0, den, 1.0), 0.0, 1.0), 1.0)
    split = np.stack([box_least_squares(gram[b], cross[b]) for b in range(n_bands)], axis=1)
    return whole.astype(np.float32), split.astype(np.float32)


def box_least_squares(gram: np.ndarray, cross: np.ndarray) -> np.ndarray:
    """The ``s`` in [0, 1]² that minimises ``s' gram s - 2 s' cross`` (``gram`` 2 x 2, positive
    semi-definite): the unconstrained solution if it lies in the box, else the best point on the
    box's edges (each edge a clipped one-dimensional least squares). A part that no pixel has
    (zero diagonal) gets 1, as :func:`validated_shrink` gives a correction that is nowhere."""

    def objective(s: np.ndarray) -> float:
        return float(s @ gram @ s - 2 * s @ cross)

    diag = np.diag(gram)
    if not np.all(diag > 0):  # a part that is nowhere: its factor 1, the other's a 1-D fit (PSD: no coupling)
        return np.where(diag > 0, np.clip(cross / np.where(diag > 0, diag, 1.0), 0.0, 1.0), 1.0)
    candidates = []
    if np.linalg.det(gram) > 1e-12 * max(np.trace(gram) ** 2, 1e-300):
        free = np.linalg.solve(gram, cross)
        if np.all((free >= 0) & (free <= 1)):
            return free
    for fixed in (0, 1):
        for edge in (0.0, 1.0):
            other = 1 - fixed
            value = (cross[other] - gram[other, fixed] * edge) / gram[other, other]
            s = np.empty(2)
            s[fixed], s[other] = edge, np.clip(value, 0.0, 1.0)
            candidates.append(s)
    return min(candidates, key=objective)


def _member_config(cfg: BiaSTFConfig, member: int) -> BiaSTFConfig:
    """Member ``member``'s configuration: both stages' seeds offset by ``1000 x member``."""
    return dataclasses.replace(
        cfg,
        stage1=dataclasses.replace(cfg.stage1, seed=cfg.stage1.seed + 1000 * member),
        stage2=dataclasses.replace(cfg.stage2, seed=cfg.stage2.seed + 1000 * member),
    )


def stack_members(members: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The members' ``{"G": ..., "B": ...}`` parameters stacked along a leading member axis."""
    import jax

    return jax.tree_util.tree_map(lambda *leaves: np.stack(leaves), *[dict(p) for p in members])


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
        Checkpoints (``stage1/``, ``stage2/``, and ``stage1_refit/``, ``stage2_refit/``; with
        several ``members``, suffixed ``_m0``, ``_m1``, ...; a rerun resumes, also after Ctrl-C),
        ``history.json``, ``loss_curves.png`` and the final ``model/``.
    val_times : sequence of date-like, optional
        Held-out dates with fine images: validation pairs predict each of them from each training
        date and back; they choose the best step and stop the training. Default: one training
        date is held out per member (:func:`stf_pipeline.nn.holdout_split`; with two training
        dates there is no validation, one member, and a warning says so), and with ``refit`` the
        networks are then trained again on all dates for the best step counts.

    Returns
    -------
    FittedModel
        ``extra`` records the validation (``"validation"``, per member under ``"members"``), the
        number of ``members`` (their parameters stacked on a leading axis when more than one),
        the statistics, ``change_limit``.
    """
    from stf_pipeline.nn import FittedModel, holdout_split, save_history
    from stf_pipeline.task import iso_date, to_datetime64

    cfg = _base_for_units(cube, BiaSTFConfig.resolve(config))
    times = sorted({to_datetime64(t) for t in train_times})
    if len(times) < 2:
        raise TaskError(
            "biastf learns from ordered pairs of training dates and needs at least two, "
            f"got {[iso_date(t) for t in times]}; "
            "pass train_times with two or more dates that have fine and coarse images."
        )
    if val_times:
        given = sorted({to_datetime64(t) for t in val_times} - set(times))
        splits, mode = [(times, given)] * cfg.members, "val_times"
    else:
        splits = [holdout_split(times, name="biastf", fold=m, folds=cfg.members) for m in range(cfg.members)]
        mode = "held-out training date" if splits[0][1] else "none (too few training dates)"
        if not splits[0][1]:
            log.warning(
                "biastf: no validation, so %s; pass val_times, or config={'unvalidated_steps': N} to train anyway.",
                f"{cfg.unvalidated_steps} unvalidated steps per stage" if cfg.unvalidated_steps else
                "the networks stay zero and the prediction is F(j) + G's base fused by f (the documented fallback)",
            )
            splits = splits[:1]  # nothing validates: one member, the zero networks (or unvalidated steps)
    bands = [str(b) for b in cube["band"].values.tolist()]
    factor = cube.attrs.get("coarse_factor")
    directory = None if workdir is None else Path(workdir)
    interpolate = coarse_interpolation_factor(cube, cfg, times)
    held_out = sorted({t for _, held in splits for t in held})
    seen = with_interpolated_coarse(cube, [*times, *held_out], interpolate) if interpolate else cube
    stats = fit_statistics(seen, times, factor, normalise=cfg.normalise)
    refit = bool(cfg.refit and splits[0][1] and not val_times)
    members, history = [], {}
    records: list[dict[str, Any]] = []  # one per member: its dates, steps, seeds and shrink
    for m, (fit_times, held) in enumerate(splits):
        member = _member_config(cfg, m)
        suffix = f"_m{m}" if len(splits) > 1 else ""
        if len(splits) > 1:
            log.info("biastf: member %d of %d, validated on %s", m + 1, len(splits), [iso_date(t) for t in held])
        fingerprint = {
            "method": "biastf",
            "config": {**cfg.to_dict(), "stage1": None, "stage2": None},
            "bands": bands,
            "coarse_factor": factor,
            "train_times": [iso_date(t) for t in fit_times],
            "val_times": [iso_date(t) for t in held],
        }
        params, more, results = _fit_stages(
            seen, member, fit_times, held, stats, steps=None, workdir=directory, fingerprint=fingerprint,
            suffix=suffix,
        )
        history.update(more)
        best = [r.best_step for r in results]
        shrink, parts = (
            validated_shrink(cube, params, member, stats, fit_times, held, interpolate=interpolate)
            if cfg.shrink and held else (None, None)
        )
        if refit:
            log.info("biastf: refitting on all %d training dates for %s steps (the validated best)", len(times), best)
            refit_print = {**fingerprint, "train_times": [iso_date(t) for t in times], "val_times": [], "steps": best}
            params, more, _ = _fit_stages(
                seen, member, times, [], stats, steps=best, workdir=directory, fingerprint=refit_print,
                suffix=f"{suffix}_refit",
            )
            history.update(more)
        if shrink is not None:
            params = {**params, "shrink": shrink}
        members.append(params)
        records.append({
            "val_times": [iso_date(t) for t in held],
            "fit_times": [iso_date(t) for t in fit_times],
            "best_steps": best,
            "stop_reasons": [r.stop_reason for r in results],
            "seeds": [member.stage1.seed, member.stage2.seed],
            "shrink": None if shrink is None else [round(float(v), 4) for v in shrink],
            "shrink_parts": None if parts is None else np.round(parts.astype(float), 4).tolist(),
        })
    held_all = sorted({t for r in records for t in r["val_times"]})
    validation = {"mode": mode, **records[0], "val_times": held_all, "refit": refit, "members": records}
    model_out = FittedModel(
        method="biastf",
        config=cfg.to_dict(),
        params=members[0] if len(members) == 1 else stack_members(members),
        bands=tuple(bands),
        coarse_factor=None if factor is None else int(factor),
        train_times=tuple(iso_date(t) for t in times),
        history=history,
        extra={
            "val_times": held_all,
            "validation": validation,
            "members": len(members),
            "statistics": stats.to_dict(),
            "change_limit": list(stats.limit),
            "coarse_interpolated": bool(interpolate),
        },
    )
    if directory is not None:
        save_history({k: v for k, v in history.items() if v}, directory)
        model_out.save(directory / "model", overwrite=True)
    return model_out
