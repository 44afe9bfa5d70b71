"""Thin-plate splines against SciPy's RBF interpolator and their knots (stf_pipeline.kernels.tps)."""

from __future__ import annotations

import numpy as np
from scipy.interpolate import RBFInterpolator

from stf_pipeline.kernels.tps import local_tps, tps_matrix


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
