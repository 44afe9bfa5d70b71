"""FSDAF's device path (backend ``jax``): every JAX step against its NumPy/Numba step, and the whole
block against the ``numba`` backend, on CPU-JAX.

Steps (a)-(f) run in float64 on the device as in the reference, so they agree to float64 rounding
(sums in another order; XLA may divide by a reciprocal or fuse a multiply-add, 1 ulp): labels and
extremes exactly, the rest within 1e-10. The whole block differs from ``numba`` by step (g)'s
float32 weights (float64 on the CPU, the same chosen pixels), a few float32 ulp of the
reflectance: asserted within 2e-6, the tolerance the reference test allows the ``jax`` backend.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fsdaf import _params, _scene

from stf_pipeline.kernels.classify import kmeans
from stf_pipeline.methods import fsdaf
from stf_pipeline.methods.fsdaf import core, residual, unmix
from stf_pipeline.methods.fsdaf import jax as fsdaf_jax
from stf_pipeline.methods.fsdaf import numba as fsdaf_numba


@functools.lru_cache(maxsize=None)
def _jit(fn, **static):
    return jax.jit(functools.partial(fn, **static))


def _device(fn, *args, **static):
    """``fn(*args, **static)`` jitted under float64, back as NumPy (a tuple stays a tuple)."""
    with jax.enable_x64(True):
        out = _jit(fn, **static)(*args)
        return tuple(np.asarray(o) for o in out) if isinstance(out, tuple) else np.asarray(out)


def _steps(seed: int = 1, clouds: bool = True, factor: int = 6, gaps: bool = True):
    """The reference's intermediate values of one block (class change, residuals, ...)."""
    f1, c1, c2, _, _ = _scene(seed=seed, clouds=clouds)
    if gaps:
        c2[:, 12:18, 18:24] = np.nan
        c1[:, 0:6, 0:6] = np.nan
    flat = f1.reshape(3, -1).T
    p = _params(factor, kmeans(flat[np.isfinite(flat).all(1)], 3))
    labels = core.classify(f1, p)
    f1c = np.where(np.isfinite(f1), core._clip_fine(f1, p), np.nan)
    fractions, complete = unmix.class_fractions(labels, 3, factor)
    dc = unmix.cell_mean(c2, factor) - unmix.cell_mean(c1, factor)
    usable = complete & np.isfinite(dc).all(axis=0)
    change = unmix.unmix_change(fractions, dc, usable, radius=p.unmix_radius, n_pure=p.n_pure)
    return dict(f1=f1, c1=c1, c2=c2, p=p, labels=labels, f1c=f1c, fractions=fractions, complete=complete, dc=dc,
                usable=usable, change=change)


def _bounded_distribution(resid, tps, temporal, het, low, high, base, *, factor):
    return fsdaf_jax.distribute_residual(resid, tps, temporal, het, factor, low=low, high=high, base=base)


# ----- (b) fractions and cell means --------------------------------------------------------


@settings(max_examples=12, deadline=None)
@given(st.sampled_from([(3, 1), (4, 3), (2, 5)]), st.integers(0, 10_000))
def test_fractions_and_cell_means_equal_the_reference(classes_factor, seed):
    n_classes, factor = classes_factor
    rng = np.random.default_rng(seed)
    labels = rng.integers(-1, n_classes, size=(13, 11)).astype(np.int32)
    labels[:factor, :factor] = np.maximum(labels[:factor, :factor], 0)  # one complete cell
    values = rng.normal(size=(2, 13, 11))
    values[0, rng.random((13, 11)) < 0.3] = np.nan
    values[1, :factor, :factor] = np.nan  # an empty cell
    frac, complete = _device(fsdaf_jax.class_fractions, labels, n_classes=n_classes, factor=factor)
    want_frac, want_complete = unmix.class_fractions(labels, n_classes, factor)
    np.testing.assert_allclose(frac, want_frac, rtol=1e-15)  # XLA may divide by a reciprocal: 1 ulp
    np.testing.assert_array_equal(complete, want_complete)
    means = _device(fsdaf_jax.cell_mean, values, factor=factor)
    np.testing.assert_allclose(means, unmix.cell_mean(values, factor), rtol=1e-13, equal_nan=True)
    assert np.isnan(means[1, 0, 0])


# ----- (c) constrained unmixing ------------------------------------------------------------


@pytest.mark.parametrize("n_pure", [4, 10, 40])  # 40 > the 25 cells of the window: every usable cell
def test_unmixing_equals_the_reference_with_unusable_cells(n_pure):
    rng = np.random.default_rng(n_pure)
    n_classes, nb, hc, wc = 3, 2, 7, 9
    frac = rng.dirichlet(np.full(n_classes, 0.4), size=(hc, wc)).transpose(2, 0, 1)
    frac[:, 2, 2] = np.nan  # a cell without classified pixels
    truth = rng.normal(0, 0.05, (nb, n_classes))
    dc = np.einsum("khw,bk->bhw", np.nan_to_num(frac), truth) + rng.normal(0, 0.01, (nb, hc, wc))
    dc[:, 5, 6] = np.nan  # missing coarse change
    usable = np.isfinite(frac).all(axis=0) & np.isfinite(dc).all(axis=0)
    usable[0, :3] = False  # incomplete cells
    want = unmix.unmix_change(frac, dc, usable, radius=2, n_pure=n_pure)
    got = _device(fsdaf_jax.unmix_change, frac, dc, usable, radius=2, n_pure=n_pure)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10, equal_nan=True)


def test_change_bounds_equal_the_reference():
    rng = np.random.default_rng(3)
    dc = rng.normal(size=(2, 6, 8))
    dc[:, :3, :3] = np.nan  # windows of one value (std NaN -> 0) and of none (empty bounds)
    dc[:, 0, 0] = 0.1
    got = _device(fsdaf_jax.change_bounds, dc, radius=1)
    for g, w in zip(got, unmix.change_bounds(dc, 1), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-13)


# ----- (d)-(f) -----------------------------------------------------------------------------


def test_temporal_residual_homogeneity_range_and_threshold_equal_the_reference():
    s = _steps()
    p, factor, labels = s["p"], s["p"].coarse_factor, s["labels"]
    temporal = _device(fsdaf_jax.temporal_prediction, s["f1c"], labels, s["change"], factor=factor)
    np.testing.assert_array_equal(temporal, residual.temporal_prediction(s["f1c"], labels, s["change"], factor))
    np.testing.assert_allclose(
        _device(fsdaf_jax.residuals, s["dc"], s["fractions"], s["change"]),
        residual.residuals(s["dc"], s["fractions"], s["change"]), rtol=0, atol=1e-15, equal_nan=True,
    )
    het = _device(fsdaf_jax.heterogeneity, labels, n_classes=3, radius=p.half_window)
    np.testing.assert_allclose(het, residual.heterogeneity(labels, p.half_window), rtol=1e-15)
    low, high = _device(fsdaf_jax.allowed_range, s["c2"], s["f1c"], labels, s["change"], factor=factor,
                        radius=p.unmix_radius, valid_range=p.valid_range)
    want_low, want_high = residual.allowed_range(s["c2"], s["f1c"], labels, s["change"], factor, p.unmix_radius,
                                                 p.valid_range)
    np.testing.assert_array_equal(low, want_low)
    np.testing.assert_array_equal(high, want_high)
    thr = _device(fsdaf_jax.similarity_threshold, s["f1"], labels, n_classes=3, factor=factor, radius=p.unmix_radius)
    want = residual.similarity_threshold(s["f1"], labels, 3, factor, p.unmix_radius)
    np.testing.assert_allclose(thr, want, rtol=1e-12, equal_nan=True)


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 10_000))
def test_bounded_residual_distribution_equals_the_reference(seed):
    # partial cells at the block edge (20 x 15 pixels in 6 x 6 cells), NaN pixels, a NaN residual
    rng = np.random.default_rng(seed)
    factor, h, w = 6, 20, 15
    resid = rng.normal(0, 0.05, (2, 4, 3))
    resid[1, 0, 0] = np.nan
    tps, temporal, base = (rng.uniform(0, 0.5, (2, h, w)) for _ in range(3))
    temporal[:, 3:5, 7] = np.nan
    het = rng.uniform(0, 1, (h, w))
    het[:2, :3] = 1.0  # large weights: some pass the cap of 10
    low, high = rng.uniform(0.0, 0.2, (2, 4, 3)), rng.uniform(0.3, 0.5, (2, 4, 3))
    got = _device(_bounded_distribution, resid, tps, temporal, het, low, high, base, factor=factor)
    want = residual.distribute_residual(resid, tps, temporal, het, factor, bounds=(low, high, base))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12, equal_nan=True)


def test_range_fix_equals_the_reference():
    rng = np.random.default_rng(0)
    pred, f1, c1, c2 = (rng.uniform(-0.2, 1.2, (2, 5, 6)) for _ in range(4))
    got = _device(fsdaf_jax.range_fix, pred, f1, c1, c2, valid_range=(0.0, 1.0))
    np.testing.assert_array_equal(got, core._range_fix(pred, f1, c1, c2, (0.0, 1.0)))


# ----- (g) similar pixels, traced ----------------------------------------------------------


@pytest.mark.parametrize("max_keys", [1 << 28, 40 * 13 * 13 * 7])  # one strip; strips of 7 rows, the last padded
def test_traced_blend_equals_the_numba_scan_in_strips(max_keys):
    f1, *_ = _scene(seed=5, h=40, w=52, clouds=True)
    rng = np.random.default_rng(1)
    change = rng.normal(0, 0.05, f1.shape)
    threshold = np.broadcast_to(np.array([0.05, 0.08, 0.2])[:, None, None], f1.shape)
    use = np.isfinite(f1).all(axis=0) & np.isfinite(change).all(axis=0)
    rank = core._rank_factor(6)
    got = fsdaf_jax.blend(f1, change, threshold, use, rank, radius=6, k=12, max_keys=max_keys)
    want = fsdaf_numba.blend(f1, change, threshold, use, rank, radius=6, k=12)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, equal_nan=True)


# ----- the whole block ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("clouds", "gaps", "factor"), [(True, True, 6), (False, True, 2), (True, False, 5)],
)
def test_device_block_matches_numba(clouds, gaps, factor):
    s = _steps(clouds=clouds, gaps=gaps, factor=factor)
    p = dataclasses.replace(s["p"], half_window=3 if factor == 2 else 5,
                            fine_clip=((0.06, 0.5), (0.05, 0.52), (0.07, 0.49)))
    args = (s["f1"][None].astype(np.float32), s["c1"][None].astype(np.float32), s["c2"].astype(np.float32))
    got = fsdaf.fsdaf_jax(*args, params=p)
    want = fsdaf.fsdaf_numba(*args, params=p)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6, equal_nan=True)


def test_device_block_with_a_class_map_matches_numba():
    f1, c1, c2, _, cls = _scene(seed=4, clouds=True)
    cmap = (cls * 10 + 5).astype(np.float32)
    cmap[0, :4] = np.nan  # unclassified pixels: incomplete cells
    p = dataclasses.replace(_params(6, np.zeros((3, 3))), centres=None, class_map="classes",
                            class_values=(5.0, 15.0, 25.0))
    kw = {"params": p, "extra": {"classes": cmap}}
    got = fsdaf.fsdaf_jax(f1[None], c1[None], c2, **kw)
    want = fsdaf.fsdaf_numba(f1[None], c1[None], c2, **kw)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6, equal_nan=True)
