"""Window sums against brute force, NumPy/Numba and JAX (stf_pipeline.kernels.window)."""

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
