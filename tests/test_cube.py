import numpy as np
import pandas as pd
import pytest
import xarray as xr

import stf_pipeline as stf
from stf_pipeline.cube import STORE_MARKER
from stf_pipeline.exceptions import CubeError, StoreError


def _independent_cube() -> xr.Dataset:
    """A cube built with plain xarray + rioxarray, not with stf_pipeline helpers."""
    import rioxarray  # noqa: F401

    rng = np.random.default_rng(1)
    shape = (2, 3, 30, 20)
    ds = xr.Dataset(
        {
            "fine": (("time", "band", "y", "x"), rng.random(shape, dtype=np.float32)),
            "coarse": (("time", "band", "y", "x"), rng.random(shape, dtype=np.float32)),
            "qa": (("time", "y", "x"), rng.integers(0, 3, (2, 30, 20)).astype("uint8")),
        },
        coords={
            "time": pd.to_datetime(["2001-05-24", "2001-08-12"]),
            "band": ["green", "red", "nir"],
            "y": 4_000_000.0 - 30.0 * np.arange(30),
            "x": 300_000.0 + 30.0 * np.arange(20),
        },
        attrs={"coarse_factor": 16, "site": "test"},
    )
    ds["fine"].values[0, :, 3, 4] = np.nan
    return ds.rio.write_crs("EPSG:32612")


def test_independent_cube_round_trips_bit_for_bit(tmp_path):
    cube = _independent_cube()
    stf.validate_cube(cube)
    path = stf.write_cube(cube, tmp_path / "c.zarr", chunks={"y": 16, "x": 16})
    back = stf.open_cube(path)
    for name in ("fine", "coarse", "qa"):
        np.testing.assert_array_equal(back[name].values, cube[name].values)
        assert back[name].dtype == cube[name].dtype
    for dim in ("time", "y", "x"):
        np.testing.assert_array_equal(back[dim].values, cube[dim].values)
    assert list(back.band.values) == ["green", "red", "nir"]
    assert back.rio.crs.to_epsg() == 32612
    assert back.attrs["site"] == "test" and back.attrs["coarse_factor"] == 16
    assert back.fine.data.chunksize == (1, 3, 16, 16)


def test_write_refuses_existing_and_foreign_paths(tmp_path):
    cube = _independent_cube()
    path = stf.write_cube(cube, tmp_path / "c.zarr")
    with pytest.raises(StoreError, match="already exists"):
        stf.write_cube(cube, path)
    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "data.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not a stf_pipeline cube"):
        stf.write_cube(cube, foreign, overwrite=True)
    assert (foreign / "data.txt").read_text() == "keep me"


def test_overwrite_replaces_and_failed_write_keeps_old(tmp_path):
    cube = _independent_cube()
    path = stf.write_cube(cube, tmp_path / "c.zarr")
    changed = cube.assign(fine=cube.fine + np.float32(1))
    stf.write_cube(changed, path, overwrite=True)
    np.testing.assert_array_equal(stf.open_cube(path).fine.values, changed.fine.values)
    with pytest.raises(CubeError):
        stf.write_cube(cube.assign(fine=cube.fine.astype("float64")), path, overwrite=True)
    assert stf.open_cube(path).attrs[STORE_MARKER] == 1
    # no temporary leftovers; the empty lock file stays (deleting a lock file races with its next taker)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".c.zarr.stf-lock", "c.zarr"]
    assert (tmp_path / ".c.zarr.stf-lock").stat().st_size == 0


def test_open_missing_and_corrupt_stores(tmp_path):
    with pytest.raises(CubeError, match="no cube store"):
        stf.open_cube(tmp_path / "nope.zarr")
    path = stf.write_cube(_independent_cube(), tmp_path / "c.zarr")
    (path / "zarr.json").write_text("{ not json")
    with pytest.raises(CubeError, match="truncated or corrupt"):
        stf.open_cube(path)


def _break(cube, how):
    if how == "no_fine":
        return cube.drop_vars("fine"), "no data variable 'fine'"
    if how == "dims":
        return cube.assign(fine=cube.fine.transpose("band", "time", "y", "x")), "transpose"
    if how == "dtype":
        return cube.assign(fine=cube.fine.astype("float64")), "float32"
    if how == "grid":
        coarse = cube.coarse.rename(y="yc", x="xc")
        return cube.drop_vars("coarse").assign(coarse=coarse), "transpose"
    if how == "time_order":
        return cube.assign_coords(time=cube.time.values[::-1]), "strictly increasing"
    if how == "duplicate_time":
        return cube.assign_coords(time=[cube.time.values[0]] * 2), "duplicate"
    if how == "band_names":
        return cube.assign_coords(band=[1, 2, 3]), "band names"
    if how == "coarse_factor":
        return cube.assign_attrs(coarse_factor=2.5), "positive int"
    if how == "time_dtype":
        return cube.assign_coords(time=[1, 2]), "datetime64"
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    ["no_fine", "dims", "dtype", "grid", "time_order", "duplicate_time", "band_names", "coarse_factor", "time_dtype"],
)
def test_validate_names_problem_and_fix(how):
    broken, match = _break(_independent_cube(), how)
    with pytest.raises(CubeError, match=match):
        stf.validate_cube(broken)


def test_require_coarse_factor():
    cube = _independent_cube()
    del cube.attrs["coarse_factor"]
    stf.validate_cube(cube)
    with pytest.raises(CubeError, match="coarse_factor"):
        stf.validate_cube(cube, require_coarse_factor=True)


def test_accessor_binds_library_functions(small_cube):
    assert small_cube.stf.validate() is small_cube
    pred = small_cube.stf.fuse(small_cube.time.values[1], method="delta")
    np.testing.assert_array_equal(pred.values, stf.fuse(small_cube, small_cube.time.values[1], method="delta").values)


def test_open_store_with_a_missing_chunk(tmp_path):
    cube = _independent_cube()
    cube["fine"][:] = np.nan  # all-NaN chunks are still written, so absence means damage
    path = stf.write_cube(cube, tmp_path / "c.zarr", chunks={"y": 16, "x": 16})
    stf.open_cube(path)
    chunk = path / "fine" / "c" / "1" / "0" / "1" / "0"
    # a temporary file left by a killed chunk write does not count as the chunk
    chunk.rename(chunk.with_name("0.3f2a9c1d.partial"))
    expected = r"truncated: variable 'fine' has 7 of 8 chunk files \(missing fine/c/1/0/1/0\)"
    with pytest.raises(CubeError, match=expected):
        stf.open_cube(path)


def test_open_unfinished_series_says_how_to_resume(tmp_path):
    cube = _independent_cube()
    path = stf.write_cube(cube.assign_attrs(stf_series_complete=False), tmp_path / "s.zarr")
    with pytest.raises(CubeError, match="rerun stf.fuse_series with the same arguments"):
        stf.open_cube(path)


def _zarr_attrs(path, name):
    """The attributes of array ``name`` as written in the store's ``zarr.json``."""
    import json

    return json.loads((path / name / "zarr.json").read_text())["attributes"]


def test_stores_are_cf_georeferenced(tmp_path):
    cube = _independent_cube()
    path = stf.write_cube(cube, tmp_path / "c.zarr", chunks={"y": 16, "x": 16})
    for name in ("fine", "coarse", "qa"):
        assert _zarr_attrs(path, name)["grid_mapping"] == "spatial_ref"
    for dim, axis in (("x", "X"), ("y", "Y")):
        attrs = _zarr_attrs(path, dim)
        assert attrs["standard_name"] == f"projection_{dim}_coordinate"
        assert attrs["units"] == "metre" and attrs["axis"] == axis
        assert "_FillValue" not in attrs
    opened = xr.open_zarr(path)
    assert opened.fine.attrs["grid_mapping"] == "spatial_ref"
    assert opened.fine.rio.crs.to_epsg() == 32612 and opened.rio.crs.to_epsg() == 32612
    assert opened.fine.rio.transform() == cube.fine.rio.transform()
    # a geographic CRS: longitude/latitude; no CRS: nothing claimed
    geo = cube.assign_coords(y=40.0 - 0.001 * np.arange(30), x=10.0 + 0.001 * np.arange(20)).rio.write_crs(4326)
    path = stf.write_cube(geo, tmp_path / "g.zarr")
    assert _zarr_attrs(path, "x")["standard_name"] == "longitude"
    assert _zarr_attrs(path, "y")["units"] == "degrees_north"
    path = stf.write_cube(cube.drop_vars("spatial_ref"), tmp_path / "n.zarr")
    assert "grid_mapping" not in _zarr_attrs(path, "fine") and "standard_name" not in _zarr_attrs(path, "x")
