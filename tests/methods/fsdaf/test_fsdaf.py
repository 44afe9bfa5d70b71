"""FSDAF: every step against hand computations or SciPy, the kernel against the float64 reference,
chunked == unchunked through the engine, laziness, errors, and (slow) the authors' sample data."""

from __future__ import annotations

import dataclasses
import pathlib

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_fsdaf import reference_fsdaf

import stf_pipeline as stf
from stf_pipeline.exceptions import MethodError
from stf_pipeline.kernels.classify import kmeans
from stf_pipeline.methods import MethodContext, fsdaf
from stf_pipeline.methods.fsdaf import core, residual, unmix
from stf_pipeline.methods.fsdaf import numba as fsdaf_numba
from stf_pipeline.parallel import fill_statistics
from stf_pipeline.testing import raise_if_dask_computes, random_cube

LGC = pathlib.Path("/work/shared/data/real/zhu_fsdaf_lgc")


def _scene(seed: int = 1, h: int = 36, w: int = 44, nb: int = 3, factor: int = 6, clouds: bool = False):
    """Three spectral classes in patches, class-wise change plus a land-cover change patch."""
    rng = np.random.default_rng(seed)
    cls = np.add.outer(np.arange(h) // 7, np.arange(w) // 9) % 3
    f1 = rng.uniform(0.0, 0.2, (nb, h, w)) + 0.15 * cls[None] + 0.05
    f2 = f1 + 0.05 * cls[None] - 0.03 + rng.normal(0, 0.01, f1.shape)
    f2[:, 5:15, 20:30] += 0.2
    block = lambda a: np.repeat(np.repeat(unmix.cell_mean(a, factor), factor, 1), factor, 2)[:, :h, :w]  # noqa: E731
    c1, c2 = block(f1), block(f2)
    if clouds:
        f1[:, 20:24, 3:9] = np.nan
    return f1, c1, c2, f2, cls


def _params(factor: int, centres: np.ndarray, **kw) -> fsdaf.FSDAFParams:
    base = dict(coarse_factor=factor, n_classes=len(centres), unmix_radius=2, tps_radius=2, half_window=5,
                n_pure=10, n_similar=8, centres=tuple(map(tuple, centres)))
    base.update(kw)
    return fsdaf.FSDAFParams(**base)


# ----- (a) classes -------------------------------------------------------------------------


def test_isodata_classifier_fits_centres_within_bounds_and_rejects_bad_settings():
    f1, c1, c2, _, _ = _scene(seed=6)
    p = fsdaf.FSDAFParams(coarse_factor=6, classifier="isodata", n_classes=2, max_classes=4, unmix_radius=2,
                          half_window=5, n_similar=8, n_pure=10)
    fitted = fsdaf.METHOD.statistics(f1[None], c1[None], c2, p)
    assert 2 <= len(fitted.centres) <= 4
    assert np.isfinite(fsdaf.fsdaf_kernel(f1[None], c1[None], c2, params=fitted)).all()
    with pytest.raises(MethodError, match="classifier"):
        fsdaf.FSDAFParams(classifier="svm")
    with pytest.raises(MethodError, match="max_classes"):
        fsdaf.FSDAFParams(classifier="isodata", n_classes=5, max_classes=4)


# ----- (b) fractions -------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 5), st.integers(1, 7), st.integers(3, 30), st.integers(3, 30), st.integers(0, 10_000))
def test_fractions_sum_to_one(n_classes, factor, h, w, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(-1, n_classes, size=(h, w)).astype(np.int32)
    frac, complete = unmix.class_fractions(labels, n_classes, factor)
    has = ~np.isnan(frac[0])
    np.testing.assert_allclose(frac[:, has].sum(axis=0), 1.0, atol=1e-12)
    # hand count for the first cell
    cell = labels[:factor, :factor]
    if (cell >= 0).any():
        np.testing.assert_allclose(frac[:, 0, 0], [(cell == c).sum() / (cell >= 0).sum() for c in range(n_classes)])
    assert complete[0, 0] == (cell >= 0).all()


# ----- (c) constrained unmixing ------------------------------------------------------------


def test_unmixing_recovers_a_known_class_change_exactly():
    rng = np.random.default_rng(0)
    n_classes, nb, hc, wc = 4, 3, 9, 11
    frac = rng.dirichlet(np.full(n_classes, 0.3), size=(hc, wc)).transpose(2, 0, 1)
    frac[:, 4, 3:3 + n_classes] = np.eye(n_classes)  # one pure cell per class: the bounds hold the truth
    truth = rng.normal(0, 0.05, (nb, n_classes))
    dc = np.einsum("khw,bk->bhw", frac, truth)
    change = unmix.unmix_change(frac, dc, np.ones((hc, wc), bool), radius=hc + wc, n_pure=12)
    np.testing.assert_allclose(change, np.broadcast_to(truth[:, :, None, None], change.shape), atol=1e-6)
    np.testing.assert_allclose(residual.residuals(dc, frac, change), 0.0, atol=1e-6)


def test_change_bounds_are_window_range_plus_std():
    dc = np.arange(25, dtype=float).reshape(1, 5, 5)
    low, high = unmix.change_bounds(dc, 1)
    win = dc[0, 1:4, 1:4]
    assert low[0, 2, 2] == pytest.approx(win.min() - win.std(ddof=1))
    assert high[0, 2, 2] == pytest.approx(win.max() + win.std(ddof=1))


# ----- (e) thin-plate spline ---------------------------------------------------------------


# ----- (f) homogeneity and residual distribution -------------------------------------------


def test_heterogeneity_by_hand():
    labels = np.array([[0, 0, 1], [0, 1, 1], [2, 1, 1]])
    het = residual.heterogeneity(labels, 1)
    assert het[1, 1] == pytest.approx(5 / 9)  # class 1 in the full 3x3 window
    assert het[0, 0] == pytest.approx(3 / 4)  # corner window 2x2: three 0s
    assert het[2, 0] == pytest.approx(1 / 4)


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 6), st.integers(0, 10_000))
def test_residual_distribution_conserves_each_cell_residual(factor, seed):
    rng = np.random.default_rng(seed)
    h, w = 3 * factor, 2 * factor
    resid = rng.normal(0, 0.05, (2, 3, 2))
    tps = rng.uniform(0, 0.5, (2, h, w))
    temporal = rng.uniform(0, 0.5, (2, h, w))
    het = rng.uniform(0, 1, (h, w))
    change = residual.distribute_residual(resid, tps, temporal, het, factor)
    np.testing.assert_allclose(unmix.cell_mean(change, factor), resid, atol=1e-12)


# ----- (g) similar pixels ------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["numba", "jax"])
def test_similar_pixel_ties_go_to_the_earlier_offset_in_scan_order(backend):
    # identical spectra: the key depends on distance only; k = 4 takes the pixel itself (d = 0) and
    # three of its four equal neighbours at d = 1, the first three in row-major order: up, left, right
    rng = np.random.default_rng(0)
    fine = np.full((2, 9, 10), 0.3)
    change = rng.normal(0, 0.1, fine.shape)
    got = fsdaf.similar_pixel_blend(fine, change, np.ones_like(fine), half_window=2, n_similar=4, backend=backend)
    c = change[:, 2:-2, 2:-2]
    up, left, right = change[:, 1:-3, 2:-2], change[:, 2:-2, 1:-3], change[:, 2:-2, 3:-1]
    near = 1.0 / (1.0 + 0.5)  # weight 1 / ((1 + d / w)(1 + S)) with d / w = 1/2, S = 0
    want = (c + near * (up + left + right)) / (1.0 + 3 * near)
    np.testing.assert_allclose(got[:, 2:-2, 2:-2], want, rtol=1e-6)


def test_similar_pixel_backends_choose_the_same_pixels_and_threads_do_not_matter():
    f1, *_ = _scene(seed=5, h=40, w=52, clouds=True)
    rng = np.random.default_rng(1)
    change = rng.normal(0, 0.05, f1.shape)
    change[:, 30:33, 40:44] = np.nan
    threshold = np.broadcast_to(np.array([0.05, 0.08, 0.2])[:, None, None], f1.shape)
    kw = {"half_window": 6, "n_similar": 12}
    compiled = fsdaf.similar_pixel_blend(f1, change, threshold, backend="numba", **kw)
    jitted = fsdaf.similar_pixel_blend(f1, change, threshold, backend="jax", **kw)
    np.testing.assert_array_equal(np.isnan(compiled), np.isnan(f1).any(axis=0)[None].repeat(3, 0))
    np.testing.assert_allclose(jitted, compiled, rtol=0, atol=1e-6, equal_nan=True)
    use = np.isfinite(f1).all(axis=0) & np.isfinite(change).all(axis=0)
    one_thread = fsdaf_numba.blend(f1, change, threshold, use, core._rank_factor(6), radius=6, k=12, threaded=False)
    np.testing.assert_array_equal(one_thread, compiled)


# ----- the whole kernel --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("clouds", "gaps", "factor", "backend"),
    [(False, False, 6, "numba"), (True, False, 6, "numba"), (False, True, 2, "numba"), (True, False, 6, "jax")],
)
def test_kernel_matches_float64_reference(clouds, gaps, factor, backend):
    f1, c1, c2, _, _ = _scene(clouds=clouds)
    if gaps:  # missing coarse data, one window without any coarse change
        c2[:, 12:18, 18:24] = np.nan
        c1[:, 0:6, 0:6] = np.nan
    centres = kmeans(f1.reshape(3, -1).T[np.isfinite(f1.reshape(3, -1).T).all(1)], 3)
    p = _params(
        factor, centres, half_window=3 if factor == 2 else 5, fine_clip=((0.06, 0.5), (0.05, 0.52), (0.07, 0.49))
    )
    got = fsdaf.METHOD.kernel_for(backend)(f1[None], c1[None], c2, params=p)
    want = reference_fsdaf(f1, c1, c2, centres=centres, factor=factor, half_window=p.half_window, n_similar=8,
                           n_pure=10, unmix_radius=2, tps_radius=2, fine_clip=p.fine_clip)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, atol=2e-6, equal_nan=True)


def test_kernel_with_class_map_matches_reference():
    f1, c1, c2, _, cls = _scene(seed=4)
    cmap = (cls * 10 + 5).astype(np.float32)  # arbitrary class values
    p = dataclasses.replace(_params(6, np.zeros((3, 3))), centres=None, class_map="classes",
                            class_values=(5.0, 15.0, 25.0))
    got = fsdaf.fsdaf_kernel(f1[None], c1[None], c2, params=p, extra={"classes": cmap})
    want = reference_fsdaf(f1, c1, c2, labels=cls, n_classes=3, factor=6, half_window=5, n_similar=8, n_pure=10,
                           unmix_radius=2, tps_radius=2)
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_kernel_beats_fine_plus_coarse_change_on_class_change():
    f1, c1, c2, f2, _ = _scene(seed=2, h=60, w=66)
    centres = kmeans(f1.reshape(3, -1).T, 3)
    got = fsdaf.fsdaf_kernel(f1[None], c1[None], c2, params=_params(6, centres))
    rmse = lambda a: np.sqrt(np.mean((a - f2) ** 2))  # noqa: E731
    assert rmse(got) < rmse(f1 + c2 - c1)


def _cube_with_classes(seed: int = 0) -> xr.Dataset:
    cube = random_cube(n_times=3, height=48, width=56, bands=("red", "nir", "swir1"), coarse_factor=8, seed=seed)
    cube["classes"] = (("y", "x"), (np.add.outer(np.arange(48) // 10, np.arange(56) // 12) % 3).astype(np.float32))
    return cube


def test_fuse_is_lazy_and_runs_with_explicit_centres():
    cube = _cube_with_classes().chunk({"y": 24, "x": 24})
    centres = ((0.2, 0.2, 0.2), (0.3, 0.3, 0.3), (0.4, 0.4, 0.4))
    with raise_if_dask_computes():
        pred = stf.fuse(cube, cube.time.values[1], method="fsdaf", centres=centres, half_window=4, unmix_radius=2)
    assert pred.dims == ("band", "y", "x") and pred.dtype == np.float32
    eager = stf.fuse(cube.load(), cube.time.values[1], method="fsdaf", centres=centres, half_window=4, unmix_radius=2)
    np.testing.assert_allclose(pred.compute().values, eager.values, atol=1e-6)
    assert np.isfinite(eager.values).all()


def test_statistics_fit_centres_and_clip_lazily_and_deterministically():
    cube = _cube_with_classes()
    fine = cube.fine.isel(time=[0]).values
    p = fsdaf.prepare(fsdaf.FSDAFParams(n_classes=3), MethodContext(coarse_factor=8, pixel_size=30.0, n_bands=3))
    filled = fsdaf.METHOD.statistics(fine, None, None, p)
    assert len(filled.centres) == 3 and len(filled.fine_clip) == 3
    assert filled == fsdaf.METHOD.statistics(fine, None, None, p)
    with raise_if_dask_computes():
        lazy = fill_statistics(fsdaf.METHOD.statistics, da.from_array(fine, chunks=(1, 3, 24, 24)), None, None, p)
    assert lazy.compute() == filled
    with_map = fsdaf.METHOD.statistics(fine, None, None, dataclasses.replace(p, class_map="classes"))
    assert with_map.centres is None and with_map.fine_clip == filled.fine_clip
    assert core.extra_vars(with_map) == ("classes",) and core.extra_vars(p) == ()


def test_fuse_with_a_class_map_from_the_cube():
    cube = _cube_with_classes()
    cube["classes"] = cube["classes"] + 1  # ids 1..3, 0 would be "unclassified"
    kw = dict(method="fsdaf", class_map="classes", class_values=(1, 2, 3), half_window=4, unmix_radius=2)
    eager = stf.fuse(cube, cube.time.values[1], **kw)
    lazy = stf.fuse(cube.chunk({"y": 16, "x": 24}), cube.time.values[1], **kw)
    np.testing.assert_allclose(lazy.values, eager.values, atol=1e-6)
    with pytest.raises(MethodError, match="class_values"):
        _ = stf.fuse(cube, cube.time.values[1], method="fsdaf", class_map="classes", n_classes=3).values


def test_bad_inputs_give_clear_errors():
    cube = _cube_with_classes()
    with pytest.raises(MethodError, match="coarse_factor"):
        fsdaf.prepare(fsdaf.FSDAFParams(), MethodContext(coarse_factor=None, pixel_size=30.0, n_bands=3))
    with pytest.raises(MethodError, match="coarse_factor"):
        stf.fuse(cube.drop_attrs(), cube.time.values[1], method="fsdaf")
    with pytest.raises(MethodError, match="42 coarse pixels"):
        stf.fuse(cube, cube.time.values[1], method="fsdaf", n_classes=50)
    with pytest.raises(MethodError, match="nope"):
        stf.fuse(cube, cube.time.values[1], method="fsdaf", class_map="nope")
    p = fsdaf.FSDAFParams(coarse_factor=8, class_map="classes")
    with pytest.raises(MethodError, match="shape"):
        fsdaf.fsdaf_kernel(np.zeros((1, 1, 8, 8)), np.zeros((1, 1, 8, 8)), np.zeros((1, 8, 8)), params=p,
                           extra={"classes": np.zeros((4, 8))})
    with pytest.raises(MethodError, match="half_window"):
        fsdaf.FSDAFParams(half_window=0)
    with pytest.raises(MethodError, match="centres"):
        fsdaf.fsdaf_kernel(np.zeros((1, 1, 8, 8)), np.zeros((1, 1, 8, 8)), np.zeros((1, 8, 8)),
                           params=fsdaf.FSDAFParams(coarse_factor=8))


# ----- real data (slow) --------------------------------------------------------------------


def _lgc():
    cube, task = stf.open_catalog("zhu_fsdaf_lgc")
    cmap = np.fromfile(LGC / "Landsat20041126_SVM_classification", np.uint8).reshape(480, 480)
    cube["classes"] = (("y", "x"), cmap.astype(np.float32))
    return cube.load(), task


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kwargs", "limit"),
    [
        ({}, 0.0201),
        ({"class_map": "classes", "class_values": (1, 2, 3, 4)}, 0.0197),
        ({"classifier": "isodata"}, 0.0204),  # measured 0.02030 (authors' code with ENVI ISODATA: 0.02011)
    ],
)
def test_lgc_accuracy_beats_the_authors_code_and_delta(kwargs, limit):
    cube, task = _lgc()
    pred = stf.fuse(cube, task.target, method="fsdaf", **kwargs).values
    f1 = cube.fine.sel(time=task.pairs[0]).values[None]
    c1 = cube.coarse.sel(time=task.pairs[0]).values[None]
    c2 = cube.coarse.sel(time=task.target).values
    truth = cube.fine_truth.sel(time=task.target).values
    rmse = np.sqrt(np.mean((pred - truth) ** 2, axis=(1, 2))).mean()
    delta = np.sqrt(np.mean((f1[0] + c2 - c1[0] - truth) ** 2, axis=(1, 2))).mean()
    copy = np.sqrt(np.mean((f1[0] - truth) ** 2, axis=(1, 2))).mean()
    assert rmse <= limit and rmse < delta and rmse < copy


@pytest.mark.slow
def test_synthetic_flood_beats_starfm_and_delta():
    cube = stf.synthetic_scene(480, 480, 10, 0, fine_times=[0, 3, 9]).load()
    pair, target = cube.time.values[3], cube.time.values[5]  # flood peak at date 4.95
    truth = cube.fine_truth.sel(time=target)
    rmse = {m: float(stf.evaluate(stf.fuse(cube, target, method=m, pairs=[pair]), truth)["rmse"].mean())
            for m in ("delta", "starfm", "fsdaf")}
    assert rmse["fsdaf"] < rmse["starfm"] and rmse["fsdaf"] < rmse["delta"]
