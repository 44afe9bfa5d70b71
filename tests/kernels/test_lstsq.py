"""Batched box-constrained least squares against SciPy BVLS (stf_pipeline.kernels.lstsq)."""

from __future__ import annotations

import jax
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import lsq_linear

from stf_pipeline.kernels.lstsq import box_lstsq, box_lstsq_jax


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(0, 10_000))
def test_box_lstsq_matches_scipy_bvls(k, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(3, 4 * k + 2, k))
    y = rng.normal(size=(3, 4 * k + 2)) * 3
    lo, hi = -0.3 * np.ones(3), 0.4 * np.ones(3)
    got = box_lstsq(np.swapaxes(x, 1, 2) @ x, np.einsum("nrk,nr->nk", x, y), lo, hi)
    for n in range(3):
        want = lsq_linear(x[n], y[n], bounds=(lo[n], hi[n]), method="bvls", tol=1e-14).x
        np.testing.assert_allclose(got[n], want, atol=1e-8)
    assert (got >= -0.3 - 1e-12).all() and (got <= 0.4 + 1e-12).all()


def test_box_lstsq_equal_bounds_pin_and_empty_bounds_give_nan():
    gram = np.repeat(np.eye(2)[None], 2, axis=0)
    got = box_lstsq(gram, np.ones((2, 2)), np.array([0.3, np.inf]), np.array([0.3, -np.inf]))
    np.testing.assert_array_equal(got[0], [0.3, 0.3])
    assert np.isnan(got[1]).all()


_box_lstsq_jit = jax.jit(box_lstsq_jax, static_argnames="max_steps")


def _box_lstsq_x64(gram, rhs, lo, hi, max_steps=None):
    with jax.enable_x64(True):
        return np.asarray(_box_lstsq_jit(gram, rhs, lo, hi, max_steps=max_steps))


@settings(max_examples=12, deadline=None)
@given(st.sampled_from([(1, None), (4, None), (4, 0), (6, 0)]), st.integers(0, 10_000))
def test_box_lstsq_jax_matches_numpy_also_through_the_fallback(k_steps, seed):
    # max_steps=0 leaves every problem unsettled: the primal active-set fallback solves them all
    k, max_steps = k_steps
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(40, 4 * k + 2, k))
    y = rng.normal(size=(40, 4 * k + 2)) * 3
    gram = np.swapaxes(x, 1, 2) @ x + 1e-6 * np.eye(k)
    rhs = np.einsum("nrk,nr->nk", x, y)
    lo, hi = rng.uniform(-0.5, 0.0, 40), rng.uniform(0.0, 0.5, 40)
    lo[:3], hi[:3] = 0.5, -0.5  # lower > upper (no data): NaN
    want = box_lstsq(gram, rhs, lo, hi)
    got = _box_lstsq_x64(gram, rhs, lo, hi, max_steps)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, atol=1e-8, equal_nan=True)
