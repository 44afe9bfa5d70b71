"""A fusion of an in-memory cube runs its kernel on views of the cube's arrays (no copy): the
cube must come back unchanged, NaN included."""

import numpy as np
import pytest

import stf_pipeline as stf


@pytest.mark.parametrize("method", ["delta", "starfm", "estarfm", "fsdaf"])
def test_fuse_leaves_an_in_memory_cube_unchanged(method):
    cube = stf.synthetic_scene(80, 80, n_times=3, seed=0, fine_times=[0, 2]).load()
    cube["fine"] = cube["fine"].astype(np.float32)
    cube["coarse"] = cube["coarse"].astype(np.float32)
    cube["fine"][0, 0, :7, :5] = np.nan  # a gap the kernels must not fill in place
    before = cube.copy(deep=True)
    t = cube.time.values
    pred = stf.fuse(cube, t[1], method=method, pairs=[t[0], t[2]] if method == "estarfm" else [t[0]])
    assert np.isfinite(pred.values).any()
    np.testing.assert_array_equal(cube["fine"].values, before["fine"].values)
    np.testing.assert_array_equal(cube["coarse"].values, before["coarse"].values)


def test_two_adjacent_pairs_fuse_on_a_view_and_leave_the_cube_unchanged():
    # two consecutive pair dates reach the kernel as one view of the cube (fusion.at_times)
    from stf_pipeline.fusion import at_times

    cube = stf.synthetic_scene(80, 80, n_times=3, seed=0, fine_times=[0, 1, 2]).load()
    cube["fine"] = cube["fine"].astype(np.float32)
    cube["coarse"] = cube["coarse"].astype(np.float32)
    cube["fine"][1, 0, :7, :5] = np.nan
    t = cube.time.values
    assert np.shares_memory(at_times(cube["fine"], [t[0], t[1]]), cube["fine"].values)
    before = cube.copy(deep=True)
    pred = stf.fuse(cube, t[2], method="starfm", pairs=[t[0], t[1]])
    assert np.isfinite(pred.values).any()
    np.testing.assert_array_equal(cube["fine"].values, before["fine"].values)
    np.testing.assert_array_equal(cube["coarse"].values, before["coarse"].values)
