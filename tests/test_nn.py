"""The shared learned-method machinery: networks, sampler, training step, checkpoints, models."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stf_pipeline.exceptions import ConfigError, ModelError
from stf_pipeline.nn import (
    BandNet,
    Batch,
    CheckpointStore,
    FittedModel,
    PatchSampler,
    TrainConfig,
    averaged_params,
    create_train_state,
    eval_step,
    fit,
    holdout_split,
    make_schedule,
    masked_metrics,
    ordered_pairs,
    receptive_radius,
    train_step,
)
from stf_pipeline.nn.sampler import dihedral
from stf_pipeline.testing import random_cube

CFG = TrainConfig(
    steps=12, batch_size=4, patch_size=16, learning_rate=3e-3, warmup_steps=2, eval_every=4, eval_batches=2,
    checkpoint_every=4, log_every=2, progress=False,
)


def _net(n_bands: int = 2, multiband: bool = True) -> BandNet:
    return BandNet(n_bands, (4, 4, 4), (7, 5, 3, 3), multiband=multiband)


def change_batch(crops, aux):
    """A pair batch: inputs (coarse change, known fine), target the fine change."""
    fine, coarse = crops["fine"], crops["coarse"]
    x = jnp.stack([coarse[:, 0] - coarse[:, 1], fine[:, 1]], axis=-1).transpose(0, 2, 3, 1, 4)
    target = (fine[:, 0] - fine[:, 1]).transpose(0, 2, 3, 1)
    return Batch(jnp.nan_to_num(x), target, jnp.isfinite(target) & jnp.isfinite(x).all(-1))


def _fixed_batch(seed: int = 0, n: int = 4, size: int = 12) -> Batch:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, size, size, 2, 2)).astype(np.float32)
    target = (0.5 * x[..., 0] - 0.2 * x[..., 1]).astype(np.float32)
    return Batch(jnp.asarray(x), jnp.asarray(target), jnp.ones(target.shape, bool))


def test_receptive_radius():
    assert receptive_radius((7, 5, 3, 3)) == 7
    assert receptive_radius((9, 1, 5)) == 6


@pytest.mark.parametrize("multiband", [False, True])
def test_bandnet_shapes_and_per_band_independence(multiband):
    net = _net(2, multiband)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 10, 11, 2, 2)), jnp.float32)
    params = net.init(jax.random.key(0), x)["params"]
    y = net.apply({"params": params}, x)
    assert y.shape == (2, 10, 11, 2) and y.dtype == jnp.float32
    changed = net.apply({"params": params}, x.at[:, :, :, 1].add(1.0))
    # per band: band 0 sees only band 0's inputs; multiband: every band sees all inputs
    assert np.array_equal(np.asarray(changed[..., 0]), np.asarray(y[..., 0])) is (not multiband)
    if not multiband:  # one independent set of weights per band (stacked on a leading axis)
        kernel = params["bands"]["net"]["conv1"]["kernel"]
        assert kernel.shape == (2, 7, 7, 2, 4) and not np.allclose(kernel[0], kernel[1])


def test_receptive_field_of_bandnet_is_7():
    net = _net(1)
    x = jnp.zeros((1, 31, 31, 1, 2))
    params = net.init(jax.random.key(1), x)["params"]
    base = net.apply({"params": params}, x)
    moved = net.apply({"params": params}, x.at[0, 15, 15, 0, 0].set(1.0))
    reach = np.argwhere(np.abs(np.asarray(moved - base))[0, :, :, 0] > 0)
    assert reach.min() == 15 - 7 and reach.max() == 15 + 7


def test_masked_metrics_against_numpy():
    rng = np.random.default_rng(3)
    pred, target = rng.normal(size=(2, 5, 6, 2))
    mask = rng.random((5, 6, 2)) > 0.4
    target_nan = np.where(mask, target, np.nan)
    got = masked_metrics(jnp.asarray(pred), jnp.asarray(target_nan), jnp.asarray(mask), "l1")
    diff = (pred - target)[mask]
    np.testing.assert_allclose(got["loss"], np.abs(diff).mean(), rtol=1e-6)
    np.testing.assert_allclose(got["rmse"], np.sqrt((diff**2).mean()), rtol=1e-6)
    l2 = masked_metrics(jnp.asarray(pred), jnp.asarray(target_nan), jnp.asarray(mask), "l2")
    np.testing.assert_allclose(l2["loss"], (diff**2).mean(), rtol=1e-6)


def test_schedule_warmup_then_cosine():
    sched = make_schedule(TrainConfig(steps=100, learning_rate=1e-3, warmup_steps=10, final_lr_fraction=0.1))
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(10)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(sched(100)), 1e-4, rtol=1e-5)
    const = make_schedule(TrainConfig(steps=100, schedule="constant", warmup_steps=0, learning_rate=2e-3))
    assert float(const(0)) == float(const(77)) == pytest.approx(2e-3)


def test_train_step_decreases_loss_on_a_fixed_batch():
    batch = _fixed_batch()
    state = create_train_state(jax.random.key(0), TrainConfig(learning_rate=3e-3, warmup_steps=0), _net(), batch.inputs)
    first = float(eval_step(state, batch)["loss"])
    for _ in range(30):
        state, metrics = train_step(state, batch)
    assert int(state.step) == 30
    assert float(eval_step(state, batch)["loss"]) < 0.5 * first
    assert set(metrics) == {"loss", "mae", "rmse", "valid"}


def test_moving_average_of_the_iterates_validates_and_is_kept(cube, tmp_path):
    """``ema_decay``: the average follows e_t = d e_(t-1) + (1 - d) p_t from e_0 = p_0 (checked in float64
    against the iterates of the same run without it, which it does not change), validation scores it,
    the kept best parameters are it, and a resumed run restores it."""
    batch, decay = _fixed_batch(), 0.9
    plain = create_train_state(jax.random.key(0), TrainConfig(warmup_steps=0), _net(), batch.inputs)
    averaged = create_train_state(jax.random.key(0), TrainConfig(warmup_steps=0, ema_decay=decay), _net(), batch.inputs)
    expected = jax.tree_util.tree_map(lambda p: np.asarray(p, np.float64), plain.params)
    for _ in range(6):
        plain, _ = train_step(plain, batch)
        averaged, _ = train_step(averaged, batch)
        expected = jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * np.asarray(p), expected, plain.params)
    assert _same(averaged.params, plain.params)  # the average does not steer the optimisation
    for got, want in zip(jax.tree_util.tree_leaves(averaged_params(averaged)), jax.tree_util.tree_leaves(expected),
                         strict=True):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)
    assert not _same(averaged_params(averaged), averaged.params)
    swapped = averaged.replace(params=averaged.ema_params, ema_decay=0.0)
    assert float(eval_step(averaged, batch)["loss"]) == float(eval_step(swapped, batch)["loss"])

    config = dataclasses.replace(CFG, ema_decay=decay)
    sampler = PatchSampler(cube, cube.time.values[:3], items=ordered_pairs(3), patch_size=16, batch_size=4)
    state = create_train_state(jax.random.key(0), config, _net(), jnp.zeros((1, 16, 16, 2, 2)))
    full = fit(state, sampler, change_batch, config=config, val_sampler=sampler)
    best = full.history["val_step"][int(np.argmin(full.history["val_loss"]))]
    at_best = fit(state, sampler, change_batch, config=dataclasses.replace(config, steps=best, patience=0))
    assert _same(full.params, averaged_params(at_best.state)) and _same(at_best.params, averaged_params(at_best.state))

    class Killed(Exception):
        pass

    store = CheckpointStore(tmp_path / "ema", fingerprint={"method": "test"})
    with pytest.raises(Killed):
        fit(state, sampler, change_batch, config=config, val_sampler=sampler, checkpoints=store,
            on_step=_raise_at(6, Killed))
    resumed = fit(state, sampler, change_batch, config=config, val_sampler=sampler, checkpoints=store)
    store.close()
    assert _same(resumed.state.ema_params, full.state.ema_params) and _same(resumed.params, full.params)


def test_masked_pixels_affect_neither_loss_nor_gradient():
    batch = _fixed_batch(1)
    mask = np.ones(batch.mask.shape, bool)
    mask[0] = False  # a NaN-only patch
    mask[1, :3] = False
    targets = np.asarray(batch.targets).copy()
    with_nan = Batch(batch.inputs, jnp.asarray(np.where(mask, targets, np.nan)), jnp.asarray(mask))
    with_junk = Batch(batch.inputs, jnp.asarray(np.where(mask, targets, 1e6)), jnp.asarray(mask))
    without = Batch(batch.inputs[1:], batch.targets[1:], jnp.asarray(mask[1:]))  # NaN-only patch dropped
    state = create_train_state(jax.random.key(0), TrainConfig(warmup_steps=0), _net(), batch.inputs)

    def grads(b):
        def loss(params):
            pred = state.apply_fn({"params": params}, b.inputs)
            return masked_metrics(pred, b.targets, b.mask, "l2")["loss"]

        return jax.value_and_grad(loss)(state.params)

    (l_nan, g_nan), (l_junk, g_junk), (l_without, g_without) = grads(with_nan), grads(with_junk), grads(without)
    assert np.isfinite(l_nan) and l_nan == l_junk
    np.testing.assert_allclose(l_nan, l_without, rtol=1e-6)
    for a, b, c in zip(
        jax.tree_util.tree_leaves(g_nan),
        jax.tree_util.tree_leaves(g_junk),
        jax.tree_util.tree_leaves(g_without),
        strict=True,
    ):
        assert np.all(np.isfinite(a))
        np.testing.assert_array_equal(a, b)
        # a batch without the NaN-only patch sums in another order: float32 rounding of the leaf's
        # largest gradients (a few ulps), which a near-zero element cannot meet relatively
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6 * float(np.abs(c).max()))


@pytest.fixture(scope="module")
def cube():
    return random_cube(n_times=4, height=32, width=36, bands=("red", "nir"), coarse_factor=4, seed=5)


def test_sampler_is_seeded_lazy_equals_preloaded(cube):
    items = ordered_pairs(4)
    assert len(items) == 12 and all(i != j for i, j in items)
    kw = {"items": items, "patch_size": 16, "batch_size": 5, "seed": 3, "align": 4}
    pre = PatchSampler(cube, cube.time.values, **kw)
    lazy = PatchSampler(cube.chunk({"y": 10, "x": 10}), cube.time.values, preload=False, **kw)
    a, b = pre.crops(7), lazy.crops(7)
    assert a["fine"].shape == (5, 2, 2, 16, 16)
    for name in ("fine", "coarse"):
        np.testing.assert_array_equal(a[name], b[name])
    items7, y0, x0 = pre.draw(7)
    assert np.all(y0 % 4 == 0) and np.all(x0 % 4 == 0) and np.all(y0 <= 32 - 16) and np.all(x0 <= 36 - 16)
    i, j = items7[0]
    np.testing.assert_array_equal(a["fine"][0, 1], cube.fine.values[j, :, y0[0] : y0[0] + 16, x0[0] : x0[0] + 16])
    assert not np.array_equal(pre.crops(8)["fine"], a["fine"])
    other = PatchSampler(cube, cube.time.values, **{**kw, "seed": 4})
    assert not np.array_equal(other.crops(7)["fine"], a["fine"])


def test_per_item_images_are_cropped_with_their_item_lazy_or_preloaded_and_augmented_alike(cube):
    """An image per item (here the item's second date's fine image plus 10 x the item's index)
    comes out cropped where that item's dates are, and under augmentation transformed alike."""
    items = ordered_pairs(4)
    fine = cube.fine.values
    per_item = {"mine": np.stack([fine[j] + 10.0 * k for k, (_, j) in enumerate(items)])}
    kw = {"items": items, "patch_size": 16, "batch_size": 7, "seed": 1, "per_item": per_item}
    for sampler in (
        PatchSampler(cube, cube.time.values, **kw),
        PatchSampler(cube.chunk({"y": 10, "x": 10}), cube.time.values, preload=False, **kw),
        PatchSampler(cube, cube.time.values, augment=True, **kw),
    ):
        crops = sampler.crops(5)
        assert crops["mine"].shape == (7, 1, 2, 16, 16)
        which = np.array([items.index(tuple(item)) for item in sampler.draw(5)[0]])
        offset = 10.0 * which[:, None, None, None]
        np.testing.assert_allclose(crops["mine"][:, 0], crops["fine"][:, 1] + offset, rtol=1e-6)
    with pytest.raises(ConfigError, match="per_item 'mine' must be"):
        PatchSampler(cube, cube.time.values, items=items, patch_size=8, batch_size=2, per_item={"mine": fine})


def test_sampler_errors(cube):
    times = cube.time.values
    with pytest.raises(ConfigError, match="patch size of 40 is greater than the scene"):
        PatchSampler(cube, times, items=ordered_pairs(4), patch_size=40, batch_size=2)
    with pytest.raises(ConfigError, match="no items"):
        PatchSampler(cube, times[:1], items=ordered_pairs(1), patch_size=8, batch_size=2)
    nan_cube = cube.copy(deep=True)
    nan_cube["fine"][1] = np.nan
    with pytest.raises(ConfigError, match="all NaN"):
        PatchSampler(nan_cube, times, items=ordered_pairs(4), patch_size=8, batch_size=2)
    with pytest.raises(ConfigError, match="not in the cube"):
        PatchSampler(cube, ["1999-01-01", times[0]], items=ordered_pairs(2), patch_size=8, batch_size=2)


def _run(cube, workdir=None, *, seed=0, on_step=None, fingerprint=None):
    config = TrainConfig(**{**CFG.__dict__, "seed": seed})
    sampler = PatchSampler(cube, cube.time.values[:3], items=ordered_pairs(3), patch_size=16, batch_size=4, seed=seed)
    val = PatchSampler(cube, cube.time.values, items=[(3, 0), (3, 1)], patch_size=16, batch_size=4, seed=seed + 1)
    state = create_train_state(jax.random.key(seed), config, _net(), jnp.zeros((1, 16, 16, 2, 2)), loss="l1")
    store = None if workdir is None else CheckpointStore(workdir, fingerprint=fingerprint or {"method": "test"})
    try:
        return fit(state, sampler, change_batch, config=config, val_sampler=val, checkpoints=store, on_step=on_step)
    finally:
        if store is not None:
            store.close()


def _same(a, b):
    return all(
        np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=False)
    )


def test_fit_is_deterministic_validates_and_resumes_after_a_kill(cube, tmp_path):
    full = _run(cube)
    assert int(full.state.step) == 12 and full.history["step"] == list(range(1, 13))
    assert full.history["val_step"] == [4, 8, 12] and len(full.history["val_loss"]) == 3
    assert _same(full.state.params, _run(cube).state.params)  # same seed, same result
    assert not _same(full.state.params, _run(cube, seed=1).state.params)

    class Killed(Exception):
        pass

    with pytest.raises(Killed):
        _run(cube, tmp_path / "ckpt", on_step=_raise_at(6, Killed))
    assert CheckpointStore(tmp_path / "ckpt", fingerprint={"method": "test"}).latest_step() == 4
    resumed = _run(cube, tmp_path / "ckpt")
    assert int(resumed.state.step) == 12
    assert _same(resumed.state.params, full.state.params)
    assert _same(resumed.state.opt_state, full.state.opt_state)
    assert _same(resumed.params, full.params)
    assert resumed.history == full.history
    with pytest.raises(ModelError, match="belongs to another model"):
        _run(cube, tmp_path / "ckpt", fingerprint={"method": "other"})


def test_early_stopping_keeps_best_params(cube):
    config = TrainConfig(**{**CFG.__dict__, "steps": 40, "patience": 1, "min_delta": 0.9, "validate_initial": True})
    sampler = PatchSampler(cube, cube.time.values[:3], items=ordered_pairs(3), patch_size=16, batch_size=4)
    state = create_train_state(jax.random.key(0), config, _net(), jnp.zeros((1, 16, 16, 2, 2)))
    result = fit(state, sampler, change_batch, config=config, val_sampler=sampler)
    assert result.stopped_early and int(result.state.step) == 8  # step 4 beats the initial loss by 90%, step 8 does not
    assert result.history["val_step"] == [0, 4, 8]
    assert _same(result.params, jax.device_get(_params_at(4, config, sampler, state)))
    stalled = dataclasses.replace(config, learning_rate=1e-9, min_delta=0.01)  # training cannot beat the start
    state = create_train_state(jax.random.key(0), stalled, _net(), jnp.zeros((1, 16, 16, 2, 2)))
    result = fit(state, sampler, change_batch, config=stalled, val_sampler=sampler)
    assert result.stopped_early and result.history["val_step"] == [0, 4]
    # the initial ones are kept
    assert _same(result.params, state.params) and not _same(result.state.params, state.params)


def _params_at(steps, config, sampler, state):
    return fit(state, sampler, change_batch, config=dataclasses.replace(config, steps=steps, patience=0)).params


def test_fitted_model_round_trip_and_checks(cube, tmp_path):
    net = _net()
    params = net.init(jax.random.key(0), jnp.zeros((1, 8, 8, 2, 2)))["params"]
    model = FittedModel(
        "biastf", {"filters": [4, 4, 4]}, {"G": params}, ("red", "nir"), 4, ("2020-03-01",), {"s": {"loss": [1.0]}}
    )
    path = model.save(tmp_path / "m")
    loaded = FittedModel.load(path)
    assert loaded.method == "biastf" and loaded.bands == ("red", "nir") and loaded.coarse_factor == 4
    assert loaded.config == model.config and loaded.history == model.history
    assert _same(loaded.params, model.params)
    loaded.check_cube(cube)
    with pytest.raises(ModelError, match=r"trained on bands \['red', 'nir'\]"):
        loaded.check_cube(cube.sel(band=["nir", "red"]))
    other = cube.copy()
    other.attrs["coarse_factor"] = 8
    with pytest.raises(ModelError, match="coarse_factor=4"):
        loaded.check_cube(other)
    with pytest.raises(ModelError, match="already exists"):
        model.save(path)
    model.save(path, overwrite=True)
    with pytest.raises(ModelError, match="no saved model"):
        FittedModel.load(tmp_path / "nothing")
    meta = (path / "model.json").read_text().replace('"stf_pipeline_model": 1', '"stf_pipeline_model": 99')
    (path / "model.json").write_text(meta)
    with pytest.raises(ModelError, match="format version 99"):
        FittedModel.load(path)


def test_train_config_validation():
    with pytest.raises(ConfigError, match="steps must be a positive int"):
        TrainConfig(steps=0)
    with pytest.raises(ConfigError, match="schedule must be one of"):
        TrainConfig(schedule="linear")
    with pytest.raises(ConfigError, match=r"ema_decay must be in \[0, 1\)"):
        TrainConfig(ema_decay=1.0)
    with pytest.raises(ConfigError, match=r"unknown train config key\(s\) \['stpes'\]"):
        TrainConfig.from_dict({"stpes": 3})
    with pytest.raises(ConfigError, match="loss must be one of"):
        create_train_state(jax.random.key(0), CFG, _net(), jnp.zeros((1, 8, 8, 2, 2)), loss="huber")


def test_bandnet_bfloat16_close_to_float32():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 12, 12, 2, 2)), jnp.float32)
    params = _net().init(jax.random.key(0), x)["params"]
    f32 = _net().apply({"params": params}, x)
    bf16_net = functools.partial(BandNet, 2, (4, 4, 4), (7, 5, 3, 3), multiband=True, dtype=jnp.bfloat16)()
    bf16 = bf16_net.apply({"params": params}, x)
    assert bf16.dtype == jnp.float32
    np.testing.assert_allclose(bf16, f32, atol=0.05 * float(jnp.abs(f32).max()))


def test_dihedral_by_hand():
    a = jnp.asarray([[[1.0, 2.0], [3.0, 4.0]]])  # (batch 1, 2, 2)
    ops = {
        (0, 0, 0): [[1, 2], [3, 4]],
        (1, 0, 0): [[3, 4], [1, 2]],  # rows flipped
        (0, 1, 0): [[2, 1], [4, 3]],  # columns flipped
        (0, 0, 1): [[1, 3], [2, 4]],  # transposed
        (1, 1, 1): [[4, 2], [3, 1]],  # flips then transpose: rotation by 180 deg, transposed
    }
    for op, expected in ops.items():
        got = dihedral({"a": a}, jnp.asarray([op], bool))["a"]
        np.testing.assert_array_equal(got[0], np.asarray(expected, np.float32))


def test_augmentation_keeps_every_image_of_an_item_aligned(cube):
    kw = {"items": ordered_pairs(4), "patch_size": 16, "batch_size": 6, "seed": 2}
    plain = PatchSampler(cube, cube.time.values, **kw).crops(3)
    augmented = PatchSampler(cube, cube.time.values, augment=True, **kw)
    crops, ops = augmented.crops(3), augmented.symmetries(3)
    assert ops.any() and not np.array_equal(crops["fine"], plain["fine"])
    for name in ("fine", "coarse"):  # one symmetry per item, the same for both dates and both variables
        np.testing.assert_array_equal(crops[name], dihedral({"x": plain[name]}, jnp.asarray(ops))["x"])
    batch, reference = change_batch(crops, None), change_batch(plain, None)  # derived inputs, target, mask
    for field in ("targets", "mask"):
        ref = jnp.moveaxis(getattr(reference, field), -1, 1)  # (batch, band, y, x)
        np.testing.assert_array_equal(
            jnp.moveaxis(getattr(batch, field), -1, 1), dihedral({"x": ref}, jnp.asarray(ops))["x"]
        )
    ref = jnp.moveaxis(reference.inputs, (3, 4), (1, 2))
    np.testing.assert_array_equal(
        jnp.moveaxis(batch.inputs, (3, 4), (1, 2)), dihedral({"x": ref}, jnp.asarray(ops))["x"]
    )


def _raise_at(step, error):
    """An ``on_step`` callback of :func:`_run` that raises ``error`` at training step ``step``."""

    def on_step(current, state):
        if current == step:
            raise error

    return on_step


def test_ctrl_c_writes_a_checkpoint_and_a_rerun_resumes(cube, tmp_path):
    full = _run(cube)
    with pytest.raises(KeyboardInterrupt):
        _run(cube, tmp_path / "ckpt", on_step=_raise_at(6, KeyboardInterrupt))
    # not the last periodic one (4)
    assert CheckpointStore(tmp_path / "ckpt", fingerprint={"method": "test"}).latest_step() == 6
    resumed = _run(cube, tmp_path / "ckpt")
    assert int(resumed.state.step) == 12 and resumed.history == full.history
    assert _same(resumed.state.params, full.state.params) and _same(resumed.params, full.params)


def test_time_limit_stops_and_keeps_the_best(cube):
    config = TrainConfig(**{**CFG.__dict__, "steps": 1000, "max_minutes": 1e-9, "validate_initial": True})
    sampler = PatchSampler(cube, cube.time.values[:3], items=ordered_pairs(3), patch_size=16, batch_size=4)
    state = create_train_state(jax.random.key(0), config, _net(), jnp.zeros((1, 16, 16, 2, 2)))
    result = fit(state, sampler, change_batch, config=config, val_sampler=sampler)
    assert result.stop_reason == "time limit" and result.stopped_early and int(result.state.step) == 1
    assert result.history["val_step"] == [0, 1] and result.best_step in (0, 1)
    with pytest.raises(ConfigError, match="max_minutes"):
        TrainConfig(max_minutes=0)
    with pytest.raises(ConfigError, match="weight_decay"):
        TrainConfig(weight_decay=-1.0)


def test_weight_decay_shrinks_the_parameters_more():
    batch = _fixed_batch()
    plain = create_train_state(jax.random.key(0), TrainConfig(warmup_steps=0), _net(), batch.inputs)
    decayed = create_train_state(jax.random.key(0), TrainConfig(warmup_steps=0, weight_decay=0.5), _net(), batch.inputs)
    for _ in range(5):
        plain, _ = train_step(plain, batch)
        decayed, _ = train_step(decayed, batch)
    norm = lambda p: sum(float(jnp.sum(x**2)) for x in jax.tree_util.tree_leaves(p))  # noqa: E731
    assert norm(decayed.params) < norm(plain.params)


def test_holdout_split_keeps_the_ends_and_warns_with_two_dates(caplog):
    times = np.datetime64("2020-01-01") + np.array([0, 10, 20, 30, 100]) * np.timedelta64(1, "D")
    fit_on, held = holdout_split(list(times), name="m")
    assert held == [times[3]] and fit_on == [times[0], times[1], times[2], times[4]]  # day 30 is nearest day 50
    assert holdout_split(list(times[:3]), name="m") == ([times[0], times[2]], [times[1]])
    with caplog.at_level("WARNING"):
        fit_on, held = holdout_split(list(times[:2]), name="m")
    assert held == [] and fit_on == list(times[:2])
    assert "too few to hold one out for validation" in caplog.text and "Pass val_times" in caplog.text


def test_holdout_split_folds_hold_out_distinct_dates_spread_over_the_span():
    """Fold m of 3 holds out the interior date nearest (m + 1) / 4 of the span; folds=1 is the
    middle date; more folds than interior dates share dates."""
    times = list(np.datetime64("2020-01-01") + np.array([0, 10, 20, 30, 40, 50, 60, 80]) * np.timedelta64(1, "D"))
    held = [holdout_split(times, name="m", fold=f, folds=3)[1][0] for f in range(3)]
    assert held == [times[2], times[4], times[6]]  # day 20 (1/4 of 80), 40, 60
    assert holdout_split(times, name="m")[1] == [times[4]]
    fit_on, out = holdout_split(times, name="m", fold=1, folds=3)
    assert out == [times[4]] and fit_on == times[:4] + times[5:]
    few = [holdout_split(times[:4], name="m", fold=f, folds=3)[1][0] for f in range(3)]
    assert set(few) == {times[1], times[2]}
