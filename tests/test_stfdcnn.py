"""STFDCNN: networks, fusion model against float64 NumPy references, training, chunking, errors."""

from __future__ import annotations

import dataclasses
import warnings

import dask.array as da
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.measure import block_reduce

import stf_pipeline as stf
from stf_pipeline.exceptions import ConfigError, CubeError, MethodError, ModelError, TaskError
from stf_pipeline.methods import stfdcnn
from stf_pipeline.nn import FittedModel
from stf_pipeline.nn.stfdcnn_modules import CNNConfig, ResidualCNN
from stf_pipeline.parallel import map_overlapping
from stf_pipeline.testing import assert_chunked_equals_unchunked, raise_if_dask_computes, random_cube

#: chunked == unchunked tolerance (reflectance): XLA may sum a convolution in another order for
#: another block shape, so results agree to float32 rounding, not bitwise.
CHUNK_ATOL = 1e-5

TINY_NET = CNNConfig(widths=(4, 4, 4, 4))


def _tiny_config(steps: int = 20, **train: object) -> dict:
    values = {
        "steps": steps, "batch_size": 4, "patch_size": 16, "learning_rate": 3e-3, "warmup_steps": 2,
        "eval_every": 10, "eval_batches": 1, "log_every": 5, "checkpoint_every": 10, "progress": False, **train,
    }
    return {"nlm": TINY_NET.to_dict(), "sr": TINY_NET.to_dict(), "train": values}


@pytest.fixture(scope="module")
def cube():
    """4 dates, 2 bands, 64 x 64, coarse_factor 8 (LSR factor 2)."""
    return random_cube(n_times=4, height=64, width=64, coarse_factor=8, seed=3)


TRAIN = {"train_times": [0, 1, 3], "val_times": [2]}


def _train(cube, workdir=None, **overrides):
    dates = {k: cube.time.values[v] for k, v in {**TRAIN, **overrides}.items()}
    return stf.train(cube, method="stfdcnn", config=_tiny_config(), workdir=workdir, **dates)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("stfdcnn") / "run"


@pytest.fixture(scope="module")
def model(cube, workdir):
    return _train(cube, workdir)


def _identity_model(bands: tuple[str, ...], *, lsr_factor: int, coarse_factor: int) -> FittedModel:
    """A model whose residual networks output their input (last layer zero)."""
    arch = stfdcnn.Architecture(
        bands=bands, lsr_factor=lsr_factor, coarse_factor=coarse_factor, nlm=TINY_NET, sr=TINY_NET
    )
    params = {}
    for i, name in enumerate(("nlm", "sr")):
        init = jax.jit(ResidualCNN(len(bands), TINY_NET).init)
        p = init(jax.random.key(i), jnp.zeros((1, 8, 8, len(bands), 1)))["params"]
        p = jax.tree_util.tree_map(np.asarray, p)
        p["net"]["conv5"] = jax.tree_util.tree_map(np.zeros_like, p["net"]["conv5"])
        params[name] = p
    return FittedModel(
        method="stfdcnn",
        config={"architecture": arch.to_dict()},
        params=params,
        bands=bands,
        coarse_factor=coarse_factor,
    )


# --------------------------------------------------------------------------- float64 references
def _keys(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    return np.where(
        x <= 1, (a + 2) * x**3 - (a + 3) * x**2 + 1, np.where(x < 2, a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a, 0.0)
    )


def _cubic_matrix(n: int, r: int) -> np.ndarray:
    """Keys cubic interpolation of ``n`` samples onto ``n r`` pixel centres, weights renormalised at the edges."""
    m = np.zeros((n * r, n))
    for o in range(n * r):
        u = (o + 0.5) / r - 0.5
        for k in range(int(np.floor(u)) - 1, int(np.floor(u)) + 3):
            if 0 <= k < n:
                m[o, k] = _keys(np.array(u - k))
        m[o] /= m[o].sum()
    return m


def _ref_block_mean(x: np.ndarray, r: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return block_reduce(x.astype(np.float64), (1,) * (x.ndim - 2) + (r, r), func=np.nanmean, cval=np.nan)


def _ref_upsample(x: np.ndarray, r: int, shape: tuple[int, int]) -> np.ndarray:
    my, mx = _cubic_matrix(x.shape[-2], r), _cubic_matrix(x.shape[-1], r)
    return np.einsum("oi,...ij,pj->...op", my, x, mx)[..., : shape[0], : shape[1]]


def _ref_fusion(target, trans, known, valid, params: stfdcnn.STFDCNNParams) -> np.ndarray:
    """High-pass modulation + inverse-change weights, pixel by pixel in float64."""
    n_pairs, n_bands, h, w = trans.shape
    rad = params.weight_window // 2
    out = np.full((n_bands, h, w), np.nan)
    for b in range(n_bands):
        for i in range(h):
            for j in range(w):
                num = den = 0.0
                for k in range(n_pairs):
                    if not valid[k, i, j]:
                        continue
                    t, tk = max(target[b, i, j], params.min_reflectance), max(trans[k, b, i, j], params.min_reflectance)
                    gain = min(max(t / tk, 1 / params.max_gain), params.max_gain)
                    pred = target[b, i, j] + gain * (known[k, b, i, j] - trans[k, b, i, j])
                    ys, xs = slice(max(i - rad, 0), i + rad + 1), slice(max(j - rad, 0), j + rad + 1)
                    ok = valid[k, ys, xs]
                    change = np.abs(target[b, ys, xs] - trans[k, b, ys, xs])[ok].mean()
                    weight = 1 / (change + params.eps)
                    num, den = num + weight * pred, den + weight
                if den > 0:
                    out[b, i, j] = num / den
    return out


# --------------------------------------------------------------------------- networks
def test_default_lsr_factor_splits_the_gap_evenly():
    assert [stfdcnn.default_lsr_factor(f) for f in (1, 2, 8, 16, 20, 25, 30)] == [1, 1, 2, 4, 4, 5, 5]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kernel_sizes": (3, 4, 3)},
        {"kernel_sizes": (3, 3), "widths": (8, 8)},
        {"widths": (8, 0, 8, 8)},
        {"kernel_sizes": ()},
    ],
)
def test_cnn_config_rejects_bad_shapes(kwargs):
    with pytest.raises(ConfigError):
        CNNConfig(**kwargs)


def test_residual_cnn_is_five_layers_and_learns_the_residual():
    net = ResidualCNN(3, CNNConfig())
    x = jnp.asarray(np.random.default_rng(0).random((2, 12, 12, 3, 1)), jnp.float32)
    params = jax.jit(net.init)(jax.random.key(0), x)["params"]
    assert sorted(params["net"]) == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    assert params["net"]["conv1"]["kernel"].shape == (3, 3, 3, 64)
    zeroed = jax.tree_util.tree_map(lambda a: a, params)
    zeroed["net"]["conv5"] = jax.tree_util.tree_map(jnp.zeros_like, params["net"]["conv5"])
    np.testing.assert_array_equal(net.apply({"params": zeroed}, x), x[..., 0])


def test_receptive_radius_bounds_the_influence_of_a_pixel():
    cfg = CNNConfig(kernel_sizes=(5, 3, 3, 1, 3), widths=(4, 4, 4, 4))
    net = ResidualCNN(1, cfg)
    x = jnp.zeros((1, 31, 31, 1, 1))
    params = jax.jit(net.init)(jax.random.key(1), x)["params"]
    apply = jax.jit(lambda v: net.apply({"params": params}, v))
    diff = np.abs(np.asarray(apply(x.at[0, 15, 15, 0, 0].set(1.0)) - apply(x)))[0, :, :, 0]
    ys, xs = np.nonzero(diff > 0)
    assert cfg.receptive_radius == 5
    assert max(np.abs(ys - 15).max(), np.abs(xs - 15).max()) == cfg.receptive_radius


# --------------------------------------------------------------------------- fusion model vs references
def test_block_mean_and_upsample_match_references():
    rng = np.random.default_rng(0)
    x = rng.random((2, 3, 13, 11)).astype(np.float32)
    x[0, 1, :4, :3] = np.nan  # a fully missing block and a partial one
    np.testing.assert_allclose(stfdcnn.block_mean(jnp.asarray(x), 4), _ref_block_mean(x, 4), rtol=1e-6, equal_nan=True)
    lsr = rng.random((2, 4, 3)).astype(np.float32)
    np.testing.assert_allclose(
        stfdcnn.upsample(jnp.asarray(lsr), 4, (13, 11)), _ref_upsample(lsr, 4, (13, 11)), atol=1e-6
    )


def test_high_pass_modulation_by_hand():
    """T_t = 0.2, T_1 = 0.1, L_1 = 0.15: gain 2, prediction 0.2 + 2 * 0.05 = 0.3 (one pair)."""
    p = stfdcnn.STFDCNNParams(weight_window=1)
    target = jnp.full((1, 2, 2), 0.2)
    pred, ok = stfdcnn.modulate_and_weight(
        target, jnp.full((1, 1, 2, 2), 0.1), jnp.full((1, 1, 2, 2), 0.15), jnp.ones((1, 2, 2), bool), p
    )
    np.testing.assert_allclose(pred, 0.3, rtol=1e-6)
    assert bool(ok.all())


def test_modulation_and_weights_match_reference():
    rng = np.random.default_rng(1)
    target = rng.uniform(0.0, 0.5, (2, 9, 10))
    trans = rng.uniform(-0.02, 0.5, (2, 2, 9, 10))
    known = rng.uniform(0.0, 0.5, (2, 2, 9, 10))
    valid = rng.random((2, 9, 10)) > 0.2
    valid[:, 0, 0] = False
    p = stfdcnn.STFDCNNParams(weight_window=3, max_gain=3.0)
    got, ok = stfdcnn.modulate_and_weight(
        *(jnp.asarray(a, jnp.float32) for a in (target, trans, known)), jnp.asarray(valid), p
    )
    np.testing.assert_allclose(
        np.asarray(got), _ref_fusion(target, trans, known, valid, p), rtol=1e-5, atol=1e-6, equal_nan=True
    )
    np.testing.assert_array_equal(np.asarray(ok), valid.any(axis=0))


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    window=st.sampled_from([1, 3, 5]),
)
def test_fusion_is_a_convex_combination_and_exact_without_detail(seed, window):
    rng = np.random.default_rng(seed)
    target = rng.uniform(0.01, 0.6, (1, 6, 7)).astype(np.float32)
    trans = rng.uniform(0.01, 0.6, (2, 1, 6, 7)).astype(np.float32)
    known = rng.uniform(0.0, 0.6, (2, 1, 6, 7)).astype(np.float32)
    valid = jnp.ones((2, 6, 7), bool)
    p = stfdcnn.STFDCNNParams(weight_window=window)
    fused, _ = stfdcnn.modulate_and_weight(jnp.asarray(target), jnp.asarray(trans), jnp.asarray(known), valid, p)
    gain = np.clip(np.maximum(target, 0.01) / np.maximum(trans, 0.01), 1 / p.max_gain, p.max_gain)
    preds = target + gain * (known - trans)
    assert np.all(np.asarray(fused) >= preds.min(axis=0) - 1e-5)
    assert np.all(np.asarray(fused) <= preds.max(axis=0) + 1e-5)
    # Known images equal to their transitional images carry no detail: the target's transitional image comes out.
    same, _ = stfdcnn.modulate_and_weight(jnp.asarray(target), jnp.asarray(trans), jnp.asarray(trans), valid, p)
    np.testing.assert_allclose(np.asarray(same), target, rtol=1e-6)


def test_prediction_with_identity_networks_matches_reference():
    """Identity CNNs make STFDCNN analytic: block means, modulation, cubic interpolation, modulation."""
    cube = random_cube(n_times=3, height=24, width=20, coarse_factor=4, seed=5)
    model = _identity_model(("red", "nir"), lsr_factor=2, coarse_factor=4)
    p = stfdcnn.STFDCNNParams(weight_window=3)
    fine, coarse, ct = cube.fine.values[[0, 2]], cube.coarse.values[[0, 2]], cube.coarse.values[1]
    got = stfdcnn.stfdcnn_kernel(fine, coarse, ct, params=p, model=model)

    r = 2
    fine_lsr = _ref_block_mean(fine, r)
    coarse_lsr = _ref_block_mean(np.concatenate([coarse, ct[None]]), r)
    ones = np.ones((2,) + fine_lsr.shape[-2:], bool)
    target_lsr = _ref_fusion(coarse_lsr[2], coarse_lsr[:2], fine_lsr, ones, p)
    up = _ref_upsample(np.concatenate([fine_lsr, target_lsr[None]]), r, fine.shape[-2:])
    expected = _ref_fusion(up[2], up[:2], fine.astype(np.float64), np.ones((2,) + fine.shape[-2:], bool), p)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- missing data and chunking
def test_missing_pixels_fall_back_to_the_other_pair(cube, model):
    p = stfdcnn.STFDCNNParams()
    fine, coarse, ct = cube.fine.values[[0, 3]], cube.coarse.values[[0, 3]], cube.coarse.values[2]
    clean = stfdcnn.stfdcnn_kernel(fine, coarse, ct, params=p, model=model)
    cloudy = fine.copy()
    cloudy[0, :, 20:28, 20:28] = np.nan
    one = stfdcnn.stfdcnn_kernel(cloudy, coarse, ct, params=p, model=model)
    assert np.isfinite(one).all()
    halo = stfdcnn.required_halo(stfdcnn.Architecture(("red", "nir"), 2, 8, TINY_NET, TINY_NET), p)
    far = np.ones(one.shape[-2:], bool)
    far[max(20 - halo, 0) : 28 + halo, max(20 - halo, 0) : 28 + halo] = False
    np.testing.assert_array_equal(one[:, far], clean[:, far])
    cloudy[1, :, 20:28, 20:28] = np.nan
    both = stfdcnn.stfdcnn_kernel(cloudy, coarse, ct, params=p, model=model)
    assert np.isnan(both[:, 20:28, 20:28]).all()


def test_fuse_is_lazy_and_chunked_equals_unchunked(cube, model):
    target = cube.time.values[2]
    unchunked = stf.fuse(cube, target, method="stfdcnn", model=model)
    lazy = cube.chunk({"time": 1, "band": -1, "y": 16, "x": 24})
    with raise_if_dask_computes():
        chunked = stf.fuse(lazy, target, method="stfdcnn", model=model, chunks=(16, 24))
    assert isinstance(chunked.data, da.Array)
    assert_chunked_equals_unchunked(unchunked, chunked, atol=CHUNK_ATOL)
    assert np.isfinite(unchunked.values).all()


def test_one_scene_block_on_a_local_gpu_gives_the_unchunked_numbers(cube, model, monkeypatch):
    # the engine's GPU path (the chunks sent to the device as read, one block, no halo), here on the CPU
    from stf_pipeline import fusion

    target = cube.time.values[2]
    unchunked = stf.fuse(cube, target, method="stfdcnn", model=model)
    monkeypatch.setattr(fusion, "device_kind", lambda: "gpu")
    monkeypatch.setenv("STF_DEVICE_BLOCK_PIXELS", str(cube.sizes["y"] * cube.sizes["x"]))
    lazy = stf.fuse(cube.chunk({"time": 1, "band": -1, "y": 16, "x": 24}), target, method="stfdcnn", model=model)
    assert any("_apply_scene_block" in str(key) for key in lazy.data.dask)  # the one-block path
    assert lazy.data.chunks[1:] == cube.chunk({"y": 16, "x": 24})["fine"].data.chunks[-2:]
    np.testing.assert_array_equal(lazy.values, unchunked.values)  # the same program on the same block


def test_fuse_series_equals_fuse(cube, model, tmp_path):
    """Series planning knows no model yet (default-network halo); each region still uses the model's."""
    holed = cube.assign(fine=cube.fine.where(cube.time != cube.time[2]))
    holed = holed.assign_coords(fine_valid=("time", [1.0, 1.0, 0.0, 1.0]))
    fused = stf.fuse_series(
        holed, method="stfdcnn", model=model, out=tmp_path / "fused.zarr", progress=False, chunks=(32, 32)
    )
    single = stf.fuse(holed, cube.time.values[2], method="stfdcnn", model=model)
    np.testing.assert_allclose(fused.fine.isel(time=2).values, single.values, atol=CHUNK_ATOL)


def test_chunked_equals_unchunked_with_clouds_and_odd_sizes():
    cube = random_cube(n_times=3, height=45, width=37, coarse_factor=4, seed=2)
    fine = cube.fine.values.copy()
    fine[0, :, 5:15, 10:30] = np.nan
    cube = cube.assign(fine=(cube.fine.dims, fine))
    model = _identity_model(("red", "nir"), lsr_factor=2, coarse_factor=4)
    p = stfdcnn.STFDCNNParams()
    args = (fine[[0, 2]], cube.coarse.values[[0, 2]], cube.coarse.values[1])
    whole = stfdcnn.stfdcnn_kernel(*args, params=p, model=model)
    chunks = (
        da.from_array(args[0], chunks=(2, 2, 12, 8)),
        da.from_array(args[1], chunks=(2, 2, 12, 8)),
        da.from_array(args[2], chunks=(2, 12, 8)),
    )
    halo = stfdcnn.required_halo(stfdcnn.Architecture(("red", "nir"), 2, 4, TINY_NET, TINY_NET), p)
    mapped = map_overlapping(stfdcnn.stfdcnn_kernel, *chunks, halo=halo, align=4, params=p, model=model)
    np.testing.assert_allclose(mapped.compute(), whole, atol=CHUNK_ATOL, equal_nan=True)


# --------------------------------------------------------------------------- training
def test_training_learns_and_records_both_stages(cube, model):
    assert model.method == "stfdcnn" and sorted(model.params) == ["nlm", "sr"]
    assert sorted(model.history) == ["stage1_nlm", "stage2_sr"]
    for h in model.history.values():
        assert h["step"][-1] == 20
        # the initial networks compete (default)
        assert h["val_step"] == [0, 10, 20] and np.isfinite(h["val_rmse"]).all()
    nlm = model.history["stage1_nlm"]["loss"]
    assert np.mean(nlm[-5:]) < np.mean(nlm[:5])
    assert model.config["architecture"]["lsr_factor"] == 2
    assert model.extra["validation"]["mode"] == "val_times" and not model.extra["validation"]["refit"]


def test_default_training_holds_out_a_date_and_refits(cube):
    """No val_times: one training date validates (the interior one nearest the middle), and the
    networks are refitted on all dates for the validated best step counts."""
    model = stf.train(cube, method="stfdcnn", config=_tiny_config(steps=10, eval_every=5))
    validation = model.extra["validation"]
    assert validation["mode"] == "held-out training date" and validation["val_times"] == [str(cube.time.values[1])[:10]]
    assert len(model.train_times) == 4 and validation["refit"] and len(validation["best_steps"]) == 2
    for name, best in zip(("nlm", "sr"), validation["best_steps"], strict=True):
        refit = model.history[f"stage{1 if name == 'nlm' else 2}_{name}_refit"]
        assert refit == {} if best == 0 else refit["step"][-1] == best


def test_training_is_deterministic_and_resumes(cube, model, workdir):
    again = _train(cube)
    resumed = _train(cube, workdir)  # every stage restored from its last checkpoint
    for other in (again, resumed, stf.load_model(workdir / "model")):
        jax.tree_util.tree_map(np.testing.assert_array_equal, model.params, other.params)
    assert (workdir / "loss_curves.png").is_file() and (workdir / "history.json").is_file()
    with pytest.raises(ModelError, match="another model"):
        _train(cube, workdir, train_times=[0, 1])


def test_saved_model_predicts_the_same(cube, model, tmp_path):
    loaded = stf.load_model(model.save(tmp_path / "stfdcnn.model"))
    target = cube.time.values[2]
    np.testing.assert_array_equal(
        stf.fuse(cube, target, method="stfdcnn", model=model).values,
        stf.fuse(cube, target, method="stfdcnn", model=loaded).values,
    )


# --------------------------------------------------------------------------- bad input
def test_too_few_or_unusable_training_dates(cube):
    with pytest.raises(TaskError, match="at least 2"):
        stf.train(cube, method="stfdcnn", train_times=cube.time.values[:1], config="tiny")
    with pytest.raises(TaskError, match="not dates of the cube"):
        stf.train(cube, method="stfdcnn", train_times=["2020-03-01", "1999-01-01"], config="tiny")
    with pytest.raises(TaskError, match="held-out"):
        stf.train(
            cube, method="stfdcnn", train_times=cube.time.values[:2], val_times=cube.time.values[1:3], config="tiny"
        )
    holes = cube.assign(fine=cube.fine.where(cube.time != cube.time[1]))
    holes = holes.assign_coords(fine_valid=("time", [1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(TaskError, match="no fine image"):
        stf.train(holes, method="stfdcnn", train_times=cube.time.values[:2], config="tiny")


def test_bad_configs(cube):
    times = cube.time.values[:2]
    with pytest.raises(ConfigError, match="unknown config key"):
        stf.train(cube, method="stfdcnn", train_times=times, config={"layers": 5})
    with pytest.raises(ConfigError, match="multiple of lsr_factor"):
        stf.train(cube, method="stfdcnn", train_times=times, config={"train": {"patch_size": 15}})
    with pytest.raises(ConfigError, match="divisor"):
        stf.train(cube, method="stfdcnn", train_times=times, config={"lsr_factor": 3})
    with pytest.raises(ConfigError, match="preset"):
        stf.train(cube, method="stfdcnn", train_times=times, config="huge")
    no_factor = cube.copy()
    no_factor.attrs = {}
    with pytest.raises(CubeError, match="coarse_factor"):
        stf.train(no_factor, method="stfdcnn", train_times=times, config="tiny")
    with pytest.raises(MethodError, match="weight_window"):
        stfdcnn.STFDCNNParams(weight_window=2)
    with pytest.raises(MethodError, match="compute_dtype"):
        stfdcnn.STFDCNNParams(compute_dtype="float16")


def test_model_of_other_bands_or_method_is_refused(cube, model):
    target = cube.time.values[2]
    with pytest.raises(ModelError, match="bands"):
        stf.fuse(cube.sel(band=["nir"]), target, method="stfdcnn", model=model)
    other = dataclasses.replace(model, method="biastf")
    with pytest.raises(ModelError, match="method='stfdcnn'"):
        stfdcnn.stfdcnn_kernel(
            cube.fine.values[[0, 3]],
            cube.coarse.values[[0, 3]],
            cube.coarse.values[2],
            params=stfdcnn.STFDCNNParams(),
            model=other,
        )
    with pytest.raises(MethodError, match="learned"):
        stf.fuse(cube, target, method="stfdcnn")


def test_halo_too_small_for_the_model_is_refused(cube, model):
    with pytest.raises(ModelError, match="halo"):
        stf.fuse(cube, cube.time.values[2], method="stfdcnn", model=model, halo=4)


# --------------------------------------------------------------------------- synthetic protocol (slow)
@pytest.mark.slow
@pytest.mark.parametrize("flood", [False, True], ids=["cia-like", "lgc-like"])
def test_tiny_model_on_the_synthetic_scene_is_as_good_as_the_naive_baseline(flood):
    """With BiaSTF's "tiny" budget on a 240 x 240 scene, STFDCNN is within 10 % of ``delta``.

    Measured on a CPU (seed 0): CIA-like 0.0156 vs 0.0160, LGC-like 0.0284 vs 0.0282.
    """
    cube = stf.synthetic_scene(height=240, width=240, n_times=8, seed=0, fine_times=[0, 2, 4, 5, 7], flood=flood)
    cube = cube.compute()
    times = cube.time.values
    target, pairs = times[3], [times[2], times[4]]
    truth = cube.fine_truth.sel(time=target).values
    model = stf.train(cube, method="stfdcnn", train_times=times[[0, 2, 4, 7]], val_times=[times[5]], config="tiny")
    assert model.history["stage2_sr"]["val_rmse"][-1] < model.history["stage2_sr"]["val_rmse"][0]

    def rmse(method: str, **kwargs: object) -> float:
        pred = stf.fuse(cube, target, method=method, pairs=pairs, **kwargs).values
        return float(np.sqrt(np.nanmean((pred - truth) ** 2)))

    assert rmse("stfdcnn", model=model) < 1.1 * rmse("delta")
