import numpy as np
import pytest

import stf_pipeline as stf
from stf_pipeline.exceptions import CubeError
from stf_pipeline.synthetic import hash_uniform, synthetic_scene, value_noise
from stf_pipeline.testing import raise_if_dask_computes


def test_same_seed_same_cube_whatever_the_chunking():
    a = stf.synthetic_scene(120, 100, n_times=3, seed=4, chunks=512)
    b = stf.synthetic_scene(120, 100, n_times=3, seed=4, chunks=35)
    for name in ("fine", "coarse", "fine_truth"):
        np.testing.assert_array_equal(a[name].values, b[name].values)


def test_other_seed_other_cube():
    a = stf.synthetic_scene(60, 60, n_times=2, seed=0)
    b = stf.synthetic_scene(60, 60, n_times=2, seed=1)
    assert not np.allclose(a.fine_truth.values, b.fine_truth.values)


def test_huge_scene_is_lazy_and_one_chunk_is_small():
    with raise_if_dask_computes():
        cube = stf.synthetic_scene(10_000, 10_000, n_times=4, seed=0)
        assert cube.fine.shape == (4, 6, 10_000, 10_000)
    block = cube.coarse.data.blocks[1, 0, 3, 5]
    assert block.nbytes == 6 * 512 * 512 * 4  # one chunk: 6 MB
    values = block.compute()
    assert np.isfinite(values).all()


def test_contract_and_observation_pattern():
    cube = stf.synthetic_scene(80, 80, n_times=7, seed=0)
    stf.validate_cube(cube)
    assert cube.rio.crs.to_epsg() == 32755
    assert cube.attrs["coarse_factor"] == 20
    np.testing.assert_array_equal(cube.fine_valid.values, [1, 0, 0, 1, 0, 0, 1])
    fine = cube.fine.values
    assert np.isnan(fine[1]).all() and np.isfinite(fine[0]).all()
    np.testing.assert_array_equal(fine[3], cube.fine_truth.values[3])
    assert (np.diff(cube.y.values) == -25).all() and (np.diff(cube.x.values) == 25).all()


def test_reflectance_range_and_coarse_is_block_constant():
    cube = stf.synthetic_scene(100, 100, n_times=2, seed=2, coarse_factor=20)
    truth, coarse = cube.fine_truth.values, cube.coarse.values
    assert 0 <= truth.min() and truth.max() <= 1 and 0 <= coarse.min() and coarse.max() <= 1
    blocks = coarse.reshape(2, 6, 5, 20, 5, 20)
    assert np.ptp(blocks, axis=(3, 5)).max() == 0


def test_coarse_differs_from_fine_by_more_than_aggregation():
    """Sensor bias: the coarse image is not just the block mean of the fine one."""
    cube = stf.synthetic_scene(200, 200, n_times=3, seed=0)
    truth, coarse = cube.fine_truth.values.astype(np.float64), cube.coarse.values.astype(np.float64)
    block_mean = truth.reshape(3, 6, 10, 20, 10, 20).mean(axis=(3, 5))
    coarse_block = coarse[..., ::20, ::20]
    bias = np.abs(coarse_block - block_mean).mean(axis=(2, 3))
    assert bias.min() > 0.002
    corr = np.corrcoef(block_mean[1, 3].ravel(), coarse_block[1, 3].ravel())[0, 1]
    assert corr > 0.8


def test_flood_appears_and_recedes():
    cube = stf.synthetic_scene(240, 240, n_times=14, seed=0)
    nir = cube.fine_truth.sel(band="nir").values
    water = (nir < 0.06).mean(axis=(1, 2))
    peak = int(np.argmax(water))
    assert 6 <= peak <= 8
    assert water[peak] > 3 * water[0] and water[-1] < water[peak] / 3


def test_hash_and_noise_are_pure_functions():
    rows = np.arange(50)[:, None]
    cols = np.arange(40)[None, :]
    np.testing.assert_array_equal(hash_uniform(3, rows, cols)[10:20, 5:9], hash_uniform(3, rows[10:20], cols[:, 5:9]))
    noise = value_noise(1, rows.astype(float), cols.astype(float), 8.0)
    assert 0 <= noise.min() and noise.max() < 1
    assert np.abs(np.diff(noise, axis=0)).max() < 0.3  # smooth


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bands": ("red", "nir")}, "prefix"),
        ({"fine_times": [0, 99]}, "fine_times"),
        ({"height": 0}, "height"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(CubeError, match=match):
        stf.synthetic_scene(**{"n_times": 3, **kwargs})


def test_coarse_bias_changes_only_the_coarse_sensor():
    """Stronger leakage, gains, atmosphere and PSF: the fine images stay the same, the coarse ones
    move away from the fine block means; all-default keys reproduce the default scene."""
    from stf_pipeline.synthetic import COARSE_BIAS

    base = synthetic_scene(80, 80, n_times=2, seed=4).load()
    same = synthetic_scene(80, 80, n_times=2, seed=4, coarse_bias=dict(COARSE_BIAS)).load()
    np.testing.assert_array_equal(same.coarse.values, base.coarse.values)
    strong = synthetic_scene(
        80, 80, n_times=2, seed=4, coarse_bias={"leak": 0.1, "gain_spread": 0.3, "atmosphere": 0.03}
    ).load()
    np.testing.assert_array_equal(strong.fine_truth.values, base.fine_truth.values)
    blocks = base.fine_truth.coarsen(y=20, x=20).mean().values
    error = lambda cube: np.abs(cube.coarse.values[..., ::20, ::20] - blocks).mean()  # noqa: E731
    assert error(strong) > 1.5 * error(base)
    with pytest.raises(CubeError, match=r"coarse_bias keys \['gain'\] are unknown"):
        synthetic_scene(40, 40, n_times=1, coarse_bias={"gain": 1.0})
