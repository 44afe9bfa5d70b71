"""Thin-plate splines against SciPy's RBF interpolator and their knots (stf_pipeline.kernels.tps)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.interpolate import RBFInterpolator

from stf_pipeline.kernels.tps import local_tps, local_tps_jax, tps_matrix


def test_tps_interpolates_its_knots_and_reproduces_planes():
    rng = np.random.default_rng(0)
    knots = rng.uniform(-3, 3, (15, 2))
    np.testing.assert_allclose(tps_matrix(knots, knots), np.eye(15), atol=1e-9)
    targets = rng.uniform(-3, 3, (40, 2))
    plane = 0.3 + 0.2 * knots[:, 0] - 0.7 * knots[:, 1]
    np.testing.assert_allclose(
        tps_matrix(knots, targets) @ plane, 0.3 + 0.2 * targets[:, 0] - 0.7 * targets[:, 1], atol=1e-9
    )
    values = rng.normal(size=15)
    want = RBFInterpolator(knots, values, kernel="thin_plate_spline", degree=1)(targets)
    np.testing.assert_allclose(tps_matrix(knots, targets) @ values, want, atol=1e-9)


def test_local_tps_passes_through_cell_centres():
    rng = np.random.default_rng(1)
    cells = rng.uniform(0, 1, (2, 6, 7))
    cells[:, 2, 3] = np.nan  # a missing knot changes the pattern around it
    fine = local_tps(cells, 5, 2, (30, 35))
    centre = fine[:, 2::5, 2::5]  # odd factor: the middle fine pixel sits on the cell centre
    ok = np.isfinite(cells).all(axis=0)
    np.testing.assert_allclose(centre[:, ok], cells[:, ok], atol=1e-9)


@pytest.mark.parametrize(("factor", "radius", "shape"), [(3, 2, (20, 17)), (4, 1, (16, 16))])
def test_local_tps_jax_matches_numpy_with_missing_and_collinear_knots(factor, radius, shape):
    import jax

    rng = np.random.default_rng(factor)
    hc, wc = -(-shape[0] // factor), -(-shape[1] // factor)
    cells = rng.normal(size=(2, hc, wc))
    cells[:, :, 2] = np.nan  # a missing column: windows of collinear knots at the edge
    cells[0, 3:5, 3:5] = np.nan  # missing in one band only
    cells[:, 1:, 3:] = np.nan  # the lower right without knots; (0, 3+) keeps a row of knots
    want = local_tps(cells, factor, radius, shape)
    with jax.enable_x64(True):
        got = np.asarray(jax.jit(local_tps_jax, static_argnums=(1, 2, 3))(cells, factor, radius, shape))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(want).any() and np.isfinite(want).any()
    np.testing.assert_allclose(got, want, atol=1e-10, equal_nan=True)
