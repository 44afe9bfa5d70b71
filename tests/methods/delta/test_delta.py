import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import stf_pipeline as stf
from stf_pipeline.exceptions import MethodError, TaskError
from stf_pipeline.methods.delta import DeltaParams, delta_kernel
from stf_pipeline.testing import assert_chunked_equals_unchunked, random_cube


def _reference(fine, coarse, target, window, eps):
    """Per-pixel float64 loop: fine + coarse change, inverse local mean |coarse change| weights."""
    p, b, h, w = fine.shape
    r = window // 2
    out = np.full((b, h, w), np.nan)
    for k in range(b):
        for i in range(h):
            for j in range(w):
                num = den = 0.0
                for q in range(p):
                    pred = fine[q, k, i, j] + target[k, i, j] - coarse[q, k, i, j]
                    win = np.abs(target[k, max(i - r, 0) : i + r + 1, max(j - r, 0) : j + r + 1]
                                 - coarse[q, k, max(i - r, 0) : i + r + 1, max(j - r, 0) : j + r + 1])
                    win = win[np.isfinite(win)]
                    if not np.isfinite(pred) or win.size == 0:
                        continue
                    weight = 1.0 / (win.mean() + eps)
                    num += weight * pred
                    den += weight
                if den > 0:
                    out[k, i, j] = num / den
    return out


@settings(max_examples=25, deadline=None)
@given(
    h=st.integers(1, 9), w=st.integers(1, 9), window=st.sampled_from([1, 3, 5]),
    nan_frac=st.floats(0, 0.4), seed=st.integers(0, 1000),
)
def test_kernel_matches_reference(h, w, window, nan_frac, seed):
    rng = np.random.default_rng(seed)
    fine = rng.random((2, 2, h, w)).astype(np.float32)
    coarse = rng.random((2, 2, h, w)).astype(np.float32)
    target = rng.random((2, h, w)).astype(np.float32)
    fine[rng.random(fine.shape) < nan_frac] = np.nan
    coarse[rng.random(coarse.shape) < nan_frac] = np.nan
    got = delta_kernel(fine, coarse, target, params=DeltaParams(window=window))
    want = _reference(fine.astype(float), coarse.astype(float), target.astype(float), window, 1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_one_pair_is_fine_plus_coarse_change(small_cube):
    pred = stf.fuse(small_cube, small_cube.time.values[2], method="delta", pairs=[small_cube.time.values[0]])
    want = small_cube.fine[0] + small_cube.coarse[2] - small_cube.coarse[0]
    np.testing.assert_allclose(pred.values, want.values, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("date", ["2020-03-17", np.datetime64("2020-03-17"), pd.Timestamp("2020-03-17")])
def test_dates_in_any_form(small_cube, date):
    pred = stf.fuse(small_cube, date, method="delta")
    assert pred.attrs["target"] == "2020-03-17"
    assert pred.attrs["pairs"] == ["2020-03-01", "2020-04-02"]
    assert pred.rio.crs.to_epsg() == 32633


def test_errors(small_cube):
    with pytest.raises(MethodError, match="unknown method 'nope'"):
        stf.fuse(small_cube, "2020-03-17", method="nope")
    with pytest.raises(MethodError, match="unknown parameter"):
        stf.fuse(small_cube, "2020-03-17", method="delta", widow=3)
    with pytest.raises(MethodError, match="odd"):
        stf.fuse(small_cube, "2020-03-17", method="delta", window=4)
    with pytest.raises(TaskError, match="not in the cube"):
        stf.fuse(small_cube, "2021-01-01", method="delta")
    cube = small_cube.copy(deep=True)
    cube["coarse"][1] = np.nan
    with pytest.raises(TaskError, match="coarse image at target date 2020-03-17 is all NaN"):
        stf.fuse(cube, "2020-03-17", method="delta")
    cube = small_cube.copy(deep=True)
    cube["fine"][0] = np.nan
    with pytest.raises(TaskError, match="fine image at pair date 2020-03-01 is all NaN"):
        stf.fuse(cube, "2020-03-17", method="delta", pairs=["2020-03-01"])


def test_window_larger_than_scene_and_chunks():
    cube = random_cube(n_times=3, height=44, width=45, coarse_factor=16, seed=5)
    target = cube.time.values[1]
    eager = stf.fuse(cube, target, method="delta", window=101)
    lazy = stf.fuse(cube.chunk(time=1, y=20, x=45), target, method="delta", window=101)
    assert_chunked_equals_unchunked(eager, lazy)
