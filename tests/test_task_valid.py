"""``has_valid`` against the whole-image count it replaces, on random NaN patterns."""

import numpy as np
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

from stf_pipeline.task import has_valid, valid_fraction


def _cube(valid: np.ndarray) -> xr.Dataset:
    values = np.where(valid, 0.25, np.nan).astype(np.float32)
    return xr.Dataset({"fine": (("time", "band", "y", "x"), values)})


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(1, 300), st.integers(1, 300)),
    density=st.sampled_from([0.0, 1e-4, 0.01, 0.5, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_has_valid_equals_a_positive_valid_fraction(shape, density, seed):
    valid = np.random.default_rng(seed).random(shape) < density
    cube = _cube(valid)
    np.testing.assert_array_equal(has_valid(cube, "fine"), valid_fraction(cube, "fine") > 0)


def test_a_single_valid_pixel_between_the_sample_grid_counts():
    valid = np.zeros((2, 2, 640, 640), bool)
    valid[1, 1, 5, 7] = True  # off the grid of every 10th pixel
    cube = _cube(valid)
    np.testing.assert_array_equal(has_valid(cube, "fine"), [False, True])
    np.testing.assert_array_equal(has_valid(cube.chunk({"y": 128}), "fine"), [False, True])


def test_a_skipped_date_is_decided_by_the_grid_alone_and_the_others_in_full():
    valid = np.zeros((3, 1, 640, 640), bool)
    valid[0, 0, 5, 7] = True  # off the grid: found only by a whole-image scan
    valid[2, 0, 5, 7] = True
    cube = _cube(valid)
    np.testing.assert_array_equal(has_valid(cube, "fine", skip=0), [False, False, True])
    np.testing.assert_array_equal(has_valid(cube, "fine", skip=1), [True, False, True])
