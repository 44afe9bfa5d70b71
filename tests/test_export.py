"""Results out: fused images as COGs (pred.stf.to_geotiff, stf.export, `stf export`), read back with rasterio."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import rioxarray  # noqa: F401
import xarray as xr

import stf_pipeline as stf
from stf_pipeline.cli import EXIT_ERROR, main
from stf_pipeline.exceptions import StoreError
from stf_pipeline.testing import random_cube

pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")

TARGET = "2020-01-02"


@pytest.fixture(scope="module")
def cube():
    """A georeferenced random cube (UTM 33N, 30 m) of 3 dates whose middle one is coarse-only."""
    c = random_cube(n_times=3, bands=("red", "nir", "swir1"), height=300, width=260, seed=4)
    c = c.assign_coords(time=np.array(["2020-01-01", TARGET, "2020-01-03"], "datetime64[ns]"))
    fine = c["fine"].values.copy()
    fine[1] = np.nan
    fine[0, :, 5:9, 7:12] = np.nan  # a masked cloud
    return c.assign(fine=(c["fine"].dims, fine))


def _cog_layout(path):
    """GDAL's own view of the file: LAYOUT=COG, tiles, overviews; and rio-cogeo's validation."""
    from rio_cogeo.cogeo import cog_validate

    with rasterio.open(path) as src:
        structure = src.tags(ns="IMAGE_STRUCTURE")
        return structure.get("LAYOUT"), src.block_shapes[0], src.overviews(1), cog_validate(str(path))


def test_to_geotiff_float32_reads_back_equal(cube, tmp_path):
    pred = stf.fuse(cube, TARGET, method="delta").compute()
    path = pred.stf.to_geotiff(tmp_path / "pred.tif")
    with rasterio.open(path) as src:
        assert src.crs == cube.rio.crs and src.transform == cube.rio.transform()
        assert src.descriptions == ("red", "nir", "swir1") and src.dtypes[0] == "float32"
        assert np.isnan(src.nodata) and src.count == 3
        np.testing.assert_array_equal(src.read(), pred.values)
        assert src.tags()["method"] == "delta" and src.tags()["target"] == TARGET
    layout, blocks, overviews, (valid, errors, _) = _cog_layout(path)
    assert (layout, blocks, overviews, valid, errors) == ("COG", (512, 512), [], True, [])


def test_to_geotiff_int16_with_scale_and_overviews(cube, tmp_path):
    image = cube["fine"].sel(time="2020-01-01")
    big = xr.concat([image] * 4, dim="x").assign_coords(x=cube["x"].values[0] + 30.0 * np.arange(4 * cube.sizes["x"]))
    path = stf.export(
        xr.Dataset({"fine": big.expand_dims(time=image["time"].values[None])}).rio.write_crs(cube.rio.crs),
        tmp_path,
        dtype="int16",
        prefix="scene",
        blocksize=256,
    )[0]
    assert path.name == "scene_2020-01-01.tif"
    expected = np.round(big.values.astype(np.float64) * 1e4)
    expected[np.isnan(expected)] = -32768
    with rasterio.open(path) as src:
        assert src.nodata == -32768 and src.scales == (1e-4,) * 3 and src.offsets == (0.0,) * 3
        np.testing.assert_array_equal(src.read(), expected.astype(np.int16))
        assert src.transform == big.rio.write_crs(cube.rio.crs).rio.transform()
    back = rioxarray.open_rasterio(path, mask_and_scale=True)
    np.testing.assert_allclose(back.values, big.values, atol=0.5e-4)
    layout, blocks, overviews, (valid, errors, _) = _cog_layout(path)
    # GDAL halves the 300 x 1040 image until it fits one 256-pixel tile: 520, 260, 130 pixels wide
    assert (layout, blocks, overviews, valid, errors) == ("COG", (256, 256), [2, 4, 8], True, [])


def test_stf_export_a_fused_store(cube, tmp_path, capsys):
    fused_path = tmp_path / "fused.zarr"
    stf.fuse_series(cube, method="delta", out=fused_path, progress=False)
    fused = xr.open_zarr(fused_path)
    assert fused.rio.crs == cube.rio.crs  # the fused store stays georeferenced for rioxarray
    out = tmp_path / "cogs"
    assert main(["export", str(fused_path), "-o", str(out)]) == 0
    assert capsys.readouterr().out.split() == [str(out / f"fused_{TARGET}.tif")]  # the fused dates by default
    with rasterio.open(out / f"fused_{TARGET}.tif") as src:
        np.testing.assert_array_equal(src.read(), fused["fine"].sel(time=TARGET).values)
        assert src.descriptions == ("red", "nir", "swir1") and src.crs == cube.rio.crs
        assert src.tags()["stf_method"] == "delta" and src.tags()["date"] == TARGET
    assert main(["export", str(fused_path), "-o", str(out), "--dates", "all"]) == EXIT_ERROR
    assert "already exist; pass --overwrite or another folder" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [f"fused_{TARGET}.tif"]  # nothing written, no temp files
    assert main(["export", str(fused_path), "-o", str(out), "--dates", "all", "--overwrite", "--dtype", "int16"]) == 0
    assert len(list(out.iterdir())) == 3


def test_export_errors(cube, tmp_path):
    pred = stf.fuse(cube, TARGET, method="delta")
    with pytest.raises(StoreError, match=r"dtype 'uint8' is not one of \['float32', 'int16'\]"):
        stf.export(cube, tmp_path, dtype="uint8")
    with pytest.raises(StoreError, match=r"2020-02-01 is not a date of the store"):
        stf.export(cube, tmp_path, dates=["2020-02-01"])
    with pytest.raises(StoreError, match=r"to_geotiff writes one date, got 3; select one with .sel\(time=...\)"):
        cube["fine"].stf.to_geotiff(tmp_path / "x.tif")
    with pytest.raises(StoreError, match=r"the image has no CRS.*rio.write_crs"):
        pred.drop_vars("spatial_ref").stf.to_geotiff(tmp_path / "x.tif")
    assert not list(tmp_path.iterdir())


def test_an_image_without_georeferencing_is_written_on_the_transform_of_its_coords(tmp_path):
    # such an image (a fusion of a cube without CRS) is written without rioxarray: the transform computed
    # from its coords is the one rioxarray's rio.transform(recalc=True) gives
    from stf_pipeline._export import _transform_from_coords

    y = 4_100_000.0 - (np.arange(5) + 0.5) * 0.3
    x = 512_345.6 + (np.arange(7) + 0.5) * 0.3
    image = xr.DataArray(
        np.arange(70, dtype=np.float32).reshape(2, 5, 7) / 100,
        dims=("band", "y", "x"),
        coords={"band": ["red", "nir"], "y": y, "x": x},
    )
    assert _transform_from_coords(image) == image.rio.transform(recalc=True)
    path = image.stf.to_geotiff(tmp_path / "plain.tif", crs="EPSG:32633")
    with rasterio.open(path) as src:
        assert src.transform == image.rio.transform(recalc=True) and src.crs.to_epsg() == 32633
        np.testing.assert_array_equal(src.read(), image.values)
