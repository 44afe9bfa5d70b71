"""Scene statistics (stf_pipeline.kernels.stats): the per-plane std against NumPy's float64 nanstd."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from stf_pipeline.kernels.stats import LANES, plane_std


@settings(max_examples=40, deadline=None)
@given(
    st.integers(0, 3 * LANES + 5),
    st.integers(1, 3),
    st.floats(0.0, 1.0),
    st.integers(0, 2**31 - 1),
)
def test_plane_std_is_float64_nanstd(width: int, planes: int, nan_fraction: float, seed: int) -> None:
    # widths around multiples of LANES exercise the interleaved partial sums and their tail
    rng = np.random.default_rng(seed)
    a = rng.normal(0.3, 0.1, (planes, 2, width)).astype(np.float32)
    a[rng.random(a.shape) < nan_fraction] = np.nan
    expected = np.array([np.nan if np.isnan(p).all() else np.nanstd(p.astype(np.float64)) for p in a])
    np.testing.assert_allclose(plane_std(a), expected, rtol=1e-10, atol=1e-15, equal_nan=True)


def test_plane_std_reads_a_strided_view_like_a_copy() -> None:
    a = np.random.default_rng(1).random((4, 3, 37, 41), dtype=np.float32)
    view = a[::2]  # the pairs' dates picked out of a cube's time axis
    np.testing.assert_array_equal(plane_std(view), plane_std(np.ascontiguousarray(view)))
    np.testing.assert_allclose(plane_std(view), np.std(view.astype(np.float64), axis=(-2, -1)), rtol=1e-10)
