"""Window sums, maxima and minima against brute force, NumPy/Numba and JAX (stf_pipeline.kernels.window);
the JAX form of a block against the whole array."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 1000), ny=st.integers(1, 9), nx=st.integers(1, 9), radius=st.integers(1, 4))
def test_box_sum_matches_brute_force(seed, ny, nx, radius):
    from stf_pipeline.kernels.window import box_sum, box_sum_jax

    a = np.random.default_rng(seed).random((2, ny, nx))
    want = np.zeros_like(a)
    for y in range(ny):
        for x in range(nx):
            window = a[:, max(0, y - radius) : y + radius + 1, max(0, x - radius) : x + radius + 1]
            want[:, y, x] = window.sum(axis=(1, 2))
    np.testing.assert_allclose(box_sum(a, radius), want, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(box_sum_jax(a.astype(np.float32), radius)), want, rtol=1e-5)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 1000), ny=st.integers(1, 12), nx=st.integers(1, 12), radius=st.integers(0, 20))
def test_window_reduce_jax_matches_brute_force_max_and_min(seed, ny, nx, radius):
    import jax
    import jax.numpy as jnp

    from stf_pipeline.kernels.window import window_reduce_jax

    a = np.random.default_rng(seed).normal(size=(2, ny, nx)).astype(np.float32)
    for computation, fill, reduce in ((jax.lax.max, -np.inf, np.max), (jax.lax.min, np.inf, np.min)):
        want = np.empty_like(a)
        for y in range(ny):
            for x in range(nx):
                window = a[:, max(0, y - radius) : y + radius + 1, max(0, x - radius) : x + radius + 1]
                want[:, y, x] = reduce(window, axis=(1, 2))
        got = np.asarray(window_reduce_jax(jnp.asarray(a), radius, computation, fill))
        np.testing.assert_array_equal(got, want)  # max and min are exact


def test_box_sum_jax_of_a_block_equals_the_whole_array_bitwise():
    from stf_pipeline.kernels.window import box_sum_jax

    a = np.random.default_rng(4).random((3, 90, 80)).astype(np.float32)
    for radius in (1, 10, 30):
        whole = np.asarray(box_sum_jax(a, radius))
        y0, y1, x0, x1 = 35, 52, 31, 47
        block = np.asarray(box_sum_jax(a[:, y0 - radius : y1 + radius, x0 - radius : x1 + radius], radius))
        np.testing.assert_array_equal(block[:, radius:-radius, radius:-radius], whole[:, y0:y1, x0:x1])
