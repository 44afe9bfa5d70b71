"""STAC in: a local static catalog of small COGs (tests/data/make_products.py) read by stf.from_stac.

The same files read by stf.ingest are the independent reference: both paths must give the same cube.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import stf_pipeline as stf
from stf_pipeline.exceptions import CatalogError
from stf_pipeline.testing import raise_if_dask_computes

pytest.importorskip("odc.stac")  # the `stac` extra (part of `dev`, so CI runs these tests)

pytestmark = [
    pytest.mark.filterwarnings("ignore::PendingDeprecationWarning"),
    # odc-loader reprojects through an in-memory GDAL dataset that it leaves without a transform
    pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning"),
    pytest.mark.filterwarnings("ignore:The 'shapely.ops.transform:DeprecationWarning"),  # inside odc-geo
]


def _maker():
    spec = importlib.util.spec_from_file_location("make_products", Path(__file__).parent / "data" / "make_products.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MAKER = _maker()


@pytest.fixture
def catalog(tmp_path):
    MAKER.write_products(tmp_path)
    return tmp_path, MAKER.write_stac(tmp_path)


def _from_files(folder, **kwargs):
    return stf.ingest(
        str(folder / "L*_SR_B*.TIF"),
        str(folder / "MOD09GA*.tif"),
        fine_sensor="landsat_c2_l2",
        coarse_sensor="mod09ga",
        **kwargs,
    )


def test_from_stac_is_lazy_and_equals_the_files_cube(catalog):
    folder, collections = catalog
    with raise_if_dask_computes(max_computes=1):  # the one pass that checks the value ranges
        cube = stf.from_stac(
            collections["fine"],
            collections["coarse"],
            fine_sensor="landsat_c2_l2",
            coarse_sensor="mod09ga",
            chunks={"y": 48, "x": 48},
        )
        assert cube["fine"].chunks == ((1, 1, 1), (6,), (48, 16), (48, 32))
        pred = stf.fuse(cube, "2020-06-09", method="delta")
    reference = _from_files(folder, chunks=None)
    assert cube.rio.crs == reference.rio.crs and cube.rio.transform() == reference.rio.transform()
    assert cube.attrs["coarse_factor"] == reference.attrs["coarse_factor"] == 15
    c = cube.compute()
    for name in ("fine", "coarse"):
        np.testing.assert_array_equal(c[name].values, reference[name].values)
    for name in ("time", "band", "y", "x", "fine_valid", "coarse_valid"):
        np.testing.assert_array_equal(c[name].values, reference[name].values)
    xr.testing.assert_allclose(pred.compute(), stf.fuse(reference, "2020-06-09", method="delta").compute())


def test_items_as_a_list_and_a_bbox_crop(catalog):
    import pystac

    folder, collections = catalog
    fine = list(pystac.read_file(str(collections["fine"])).get_items())
    coarse = list(pystac.read_file(str(collections["coarse"])).get_items())
    reference = _from_files(folder, chunks=None)
    # a lon/lat box inside the fine area: the cube is the reference's pixels that the box touches
    from pyproj import Transformer

    x0, y0, x1, y1 = reference.rio.bounds()
    to_lonlat = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)
    west, south = to_lonlat.transform(x0 + 0.25 * (x1 - x0), y0 + 0.25 * (y1 - y0))
    east, north = to_lonlat.transform(x0 + 0.75 * (x1 - x0), y0 + 0.75 * (y1 - y0))
    cube = stf.from_stac(
        fine, coarse, fine_sensor="landsat_c2_l2", coarse_sensor="mod09ga", bbox=(west, south, east, north), chunks=None
    )
    assert 0 < cube.sizes["x"] < reference.sizes["x"] and 0 < cube.sizes["y"] < reference.sizes["y"]
    part = reference.sel(x=cube["x"].values, y=cube["y"].values)
    np.testing.assert_array_equal(cube["fine"].values, part["fine"].values)
    np.testing.assert_array_equal(cube["coarse"].values, part["coarse"].values)


def test_error_item_without_the_asked_band(tmp_path):
    MAKER.write_products(tmp_path)
    product = MAKER.LANDSAT["2020-06-01"][0]
    collections = MAKER.write_stac(tmp_path, drop=(product, "red"))
    with pytest.raises(
        CatalogError,
        match=rf"STAC item '{product}' has no asset for band 'red' \('SR_B4'\); its "
        r"assets are \[.*\]; map it with asset_keys",
    ):
        stf.from_stac(collections["fine"], collections["coarse"], fine_sensor="landsat_c2_l2", coarse_sensor="mod09ga")
    cube = stf.from_stac(
        collections["fine"],
        collections["coarse"],
        fine_sensor="landsat_c2_l2",
        coarse_sensor="mod09ga",
        bands=["nir", "swir1"],
        chunks=None,
    )
    assert cube["band"].values.tolist() == ["nir", "swir1"]


def test_error_missing_quality_band_and_no_items(tmp_path):
    MAKER.write_products(tmp_path)
    collections = MAKER.write_stac(tmp_path, drop=("MOD09GA.A2020161.h19v05.061", "state_1km"))
    with pytest.raises(
        CatalogError,
        match=r"STAC item 'MOD09GA.A2020161.h19v05.061' has no asset for the quality band "
        r"of 'blue' \('state_1km'\).*mask=False",
    ):
        stf.from_stac(collections["fine"], collections["coarse"], fine_sensor="landsat_c2_l2", coarse_sensor="mod09ga")
    with pytest.raises(CatalogError, match=r"no coarse STAC items given"):
        stf.from_stac(collections["fine"], [], fine_sensor="landsat_c2_l2", coarse_sensor="mod09ga")


def test_error_coarse_items_not_covering_the_fine_area(catalog):
    import pystac

    _, collections = catalog
    coarse = list(pystac.read_file(str(collections["coarse"])).get_items())
    west, south, east, north = coarse[1].bbox
    # the second date's tile now reaches only the western half of its former footprint
    half = [[west, south], [(west + east) / 2, south], [(west + east) / 2, north], [west, north], [west, south]]
    coarse[1].geometry = {"type": "Polygon", "coordinates": [half]}
    with pytest.raises(
        CatalogError,
        match=r"coarse STAC items \['MOD09GA.A2020161.h19v05.061'\] of 2020-06-09 do not "
        r"cover the fine area .*add the neighbouring tiles",
    ):
        stf.from_stac(collections["fine"], coarse, fine_sensor="landsat_c2_l2", coarse_sensor="mod09ga")
