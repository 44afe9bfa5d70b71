"""Ingestion of GeoTIFF/ENVI files: scale, nodata, band mapping, coarse -> fine grid, dates, errors.

Every file is written here with rasterio or NumPy (independently of the code under test) and
every expected value is computed from the raw arrays.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.transform import from_origin

import stf_pipeline as stf
from stf_pipeline._ingest import ingest
from stf_pipeline.exceptions import CatalogError
from stf_pipeline.sensors import SENSORS, DatePattern, Sensor, get_sensor
from stf_pipeline.testing import raise_if_dask_computes

BANDS6 = ("blue", "green", "red", "nir", "swir1", "swir2")
FINE = Sensor("tm", BANDS6, scale=1e-4, nodata=-9999)
COARSE = SENSORS[
    "mod09ga"
].without_mask()  # 7-band files in MODIS band order: red, nir, blue, green, nir2, swir1, swir2
X0, Y0, RES = 500_000.0, 4_000_000.0, 30.0

pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # affine's `*` inside rasterio


def write_tif(path, data, *, res=RES, crs="EPSG:32633", x0=X0, y0=Y0, nodata=None):
    data = np.asarray(data)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=data.shape[1],
        width=data.shape[2],
        count=data.shape[0],
        dtype=data.dtype,
        crs=crs,
        transform=from_origin(x0, y0, res, res),
        nodata=nodata,
    ) as dst:
        dst.write(data)
    return path


def write_envi(path, data):
    """ENVI BSQ int16 without georeferencing."""
    data = np.asarray(data, dtype="<i2")
    data.tofile(path)
    path.with_name(path.name + ".hdr").write_text(
        f"ENVI\nsamples = {data.shape[2]}\nlines = {data.shape[1]}\nbands = {data.shape[0]}\n"
        "header offset = 0\nfile type = ENVI Standard\ndata type = 2\ninterleave = bsq\nbyte order = 0\n"
    )
    return path


@pytest.fixture
def scene(tmp_path):
    """Two fine dates (32x48, 6 bands, x1e4, nodata -9999) and three native 480 m MODIS images (2x3, 7 bands)."""
    rng = np.random.default_rng(1)
    fine = rng.integers(100, 5000, size=(2, 6, 32, 48)).astype(np.int16)
    fine[0, :, 3, 5] = -9999
    coarse = rng.integers(100, 5000, size=(3, 7, 2, 3)).astype(np.int16)
    coarse[2, :, 1, 2] = -28672
    files = {
        "fine": {
            d: write_tif(tmp_path / f"LT05_{d}.tif", fine[i], nodata=-9999)
            for i, d in enumerate(["2001137", "2001201"])
        },
        "coarse": {
            d: write_tif(tmp_path / f"MOD09GA_{d}.tif", coarse[i], res=480.0, nodata=-28672)
            for i, d in enumerate(["2001137", "2001169", "2001201"])
        },
    }
    return fine, coarse, files


def _by_date(paths):
    return {np.datetime64("2001-01-01") + np.timedelta64(int(d[4:]) - 1, "D"): p for d, p in paths.items()}


def test_geotiff_scale_nodata_bands_and_nearest_upsampling(scene, backend):
    fine, coarse, files = scene
    cube = ingest(
        _by_date(files["fine"]),
        _by_date(files["coarse"]),
        bands=["red", "nir"],
        fine_sensor=FINE,
        coarse_sensor=COARSE,
        coarse_factor=16,
        chunks={"y": 16, "x": 16} if backend == "dask" else None,
    )
    assert cube.attrs["coarse_factor"] == 16
    assert cube.rio.crs.to_epsg() == 32633
    np.testing.assert_array_equal(cube["x"].values, X0 + (np.arange(48) + 0.5) * RES)
    np.testing.assert_array_equal(cube["y"].values, Y0 - (np.arange(32) + 0.5) * RES)
    assert [str(t)[:10] for t in cube["time"].values] == ["2001-05-17", "2001-06-18", "2001-07-20"]
    c = cube.compute()
    # fine: red, nir are file bands 3, 4 (0-based 2, 3); x1e-4; nodata -> NaN; no fine on the middle date
    expected = (fine[:, [2, 3]].astype(np.float64) * 1e-4).astype(np.float32)
    expected[0, :, 3, 5] = np.nan
    np.testing.assert_array_equal(c["fine"].values[[0, 2]], expected)
    assert np.isnan(c["fine"].values[1]).all()
    # coarse: MODIS red, nir are bands 1, 2; every 480 m pixel covers 16x16 fine pixels
    native = (coarse[:, [0, 1]].astype(np.float64) * 1e-4).astype(np.float32)
    native[2, :, 1, 2] = np.nan
    np.testing.assert_array_equal(c["coarse"].values, native.repeat(16, axis=2).repeat(16, axis=3))
    np.testing.assert_allclose(c["fine_valid"].values, [1 - 1 / (32 * 48), 0.0, 1.0])
    np.testing.assert_allclose(c["coarse_valid"].values, [1.0, 1.0, 5 / 6])
    assert c["fine"].dtype == np.float32 and c["fine"].attrs["units"] == "reflectance"


def test_bilinear_upsampling_is_linear_between_coarse_centres(tmp_path):
    """A coarse field linear in x is reproduced exactly by bilinear resampling between the centres."""
    ramp = np.tile(np.arange(4, dtype=np.float32)[None, None, :] * 0.1 + 0.1, (1, 2, 1))  # 1 band, 2x4 coarse
    fine = np.full((1, 32, 64), 0.2, np.float32)
    cube = ingest(
        {"2020-01-01": write_tif(tmp_path / "f.tif", fine)},
        {"2020-01-01": write_tif(tmp_path / "c.tif", ramp, res=480.0)},
        bands=["nir"],
        fine_sensor=Sensor("f", ("nir",)),
        coarse_sensor=Sensor("c", ("nir",)),
        resampling="bilinear",
        chunks=None,
    )
    x = cube["x"].values
    centres = X0 + 240.0 + 480.0 * np.arange(4)
    inside = (x > centres[0]) & (x < centres[-1])
    expected = 0.1 + 0.1 * (x[inside] - centres[0]) / 480.0
    np.testing.assert_allclose(cube["coarse"].values[0, 0, 10, inside], expected, atol=1e-6)


def test_a_source_finer_than_the_grid_is_averaged(tmp_path):
    """Downsampling (a 15 m image onto the 30 m grid) uses average resampling whatever is asked."""
    fine = np.full((1, 4, 6), 0.2, np.float32)
    sharp = np.random.default_rng(3).uniform(0, 1, (1, 8, 12)).astype(np.float32)
    cube = ingest(
        {"2020-01-01": write_tif(tmp_path / "f.tif", fine)},
        {"2020-01-01": write_tif(tmp_path / "c.tif", sharp, res=15.0)},
        bands=["nir"],
        fine_sensor=Sensor("f", ("nir",)),
        coarse_sensor=Sensor("c", ("nir",)),
        chunks=None,
    )
    expected = sharp[0].reshape(4, 2, 6, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(cube["coarse"].values[0, 0], expected, rtol=1e-6)


def test_coarse_in_another_crs_is_reprojected(tmp_path):
    fine = np.full((1, 20, 20), 1000, np.int16)
    coarse = np.full((1, 4, 4), 0.3, np.float32)
    # the same area in UTM 33N, described in WGS84 degrees (coarse covers it generously)
    cube = ingest(
        {"2020-01-01": write_tif(tmp_path / "f.tif", fine)},
        {"2020-01-01": write_tif(tmp_path / "c.tif", coarse, crs="EPSG:4326", x0=14.9, y0=36.2, res=0.1)},
        bands=["nir"],
        fine_sensor=Sensor("f", ("nir",), scale=1e-4),
        coarse_sensor=Sensor("c", ("nir",)),
        chunks=None,
    )
    assert cube.rio.crs.to_epsg() == 32633
    np.testing.assert_allclose(cube["coarse"].values, 0.3)


def test_envi_without_georeferencing_gets_a_nominal_grid(tmp_path):
    rng = np.random.default_rng(2)
    fine = rng.integers(0, 9000, size=(3, 8, 12))
    coarse = rng.integers(0, 9000, size=(3, 2, 3))
    cube = ingest(
        {"2001-05-24": write_envi(tmp_path / "tm0524", fine)},
        {"2001-05-24": write_envi(tmp_path / "modis0524", coarse)},
        bands=["green", "red", "nir"],
        fine_sensor=Sensor("tm", ("green", "red", "nir"), scale=1e-4),
        coarse_sensor=Sensor("modis", ("green", "red", "nir"), scale=1e-4),
        pixel_size=25.0,
        chunks=None,
    )
    assert cube.rio.crs is None
    np.testing.assert_array_equal(cube["y"].values, -(np.arange(8) + 0.5) * 25.0)
    np.testing.assert_array_equal(cube["x"].values, (np.arange(12) + 0.5) * 25.0)
    np.testing.assert_array_equal(cube["fine"].values[0], (fine * 1e-4).astype(np.float32))
    np.testing.assert_array_equal(
        cube["coarse"].values[0], (coarse * 1e-4).astype(np.float32).repeat(4, 1).repeat(4, 2)
    )


def test_values_are_clipped_to_the_contract_range_unless_asked_not_to(tmp_path):
    raw = np.array([[[-39, 0, 5000, 10040]]], np.int16)
    paths = ({"2020-01-01": write_tif(tmp_path / "f.tif", raw)}, {"2020-01-01": write_tif(tmp_path / "c.tif", raw)})
    sensor = Sensor("s", ("nir",), scale=1e-4)
    clipped = ingest(*paths, bands=["nir"], fine_sensor=sensor, coarse_sensor=sensor, chunks=None)
    np.testing.assert_array_equal(clipped["fine"].values.ravel(), np.float32([0.0, 0.0, 0.5, 1.0]))
    kept = dataclasses.replace(sensor, clip=None)
    raw_values = ingest(*paths, bands=["nir"], fine_sensor=kept, coarse_sensor=kept, chunks=None)
    np.testing.assert_array_equal(raw_values["fine"].values.ravel(), (raw.ravel() * 1e-4).astype(np.float32))


def test_truth_goes_to_fine_truth_and_fine_stays_nan(scene):
    fine, _, files = scene
    fine_files = _by_date(files["fine"])
    (first, f1), (second, f2) = fine_files.items()
    cube = ingest(
        {first: f1},
        _by_date(files["coarse"]),
        truth={second: f2},
        bands=["red"],
        fine_sensor=FINE,
        coarse_sensor=COARSE,
        chunks=None,
    )
    assert np.isnan(cube["fine"].sel(time=second).values).all()
    np.testing.assert_array_equal(cube["fine_truth"].sel(time=second).values[0], (fine[1, 2] * 1e-4).astype(np.float32))
    np.testing.assert_array_equal(cube["fine_truth"].sel(time=first).values, cube["fine"].sel(time=first).values)


def test_dates_from_file_names(scene):
    _, _, files = scene
    pattern = DatePattern(r"_(\d{7})\.tif$", "%Y%j")
    cube = ingest(
        list(files["fine"].values()),
        list(files["coarse"].values()),
        date_pattern=pattern,
        bands=["nir"],
        fine_sensor=FINE,
        coarse_sensor=COARSE,
        chunks=None,
    )
    assert [str(t)[:10] for t in cube["time"].values] == ["2001-05-17", "2001-06-18", "2001-07-20"]


def test_ingest_is_lazy_after_its_one_checking_pass(scene):
    _, _, files = scene
    with raise_if_dask_computes(max_computes=1):
        cube = ingest(
            _by_date(files["fine"]),
            _by_date(files["coarse"]),
            bands=["nir"],
            fine_sensor=FINE,
            coarse_sensor=COARSE,
            chunks={"y": 16, "x": 16},
        )
        assert cube["fine"].chunks == ((1, 1, 1), (1,), (16, 16), (16, 16, 16))
        pred = stf.fuse(cube, cube["time"].values[1], method="delta")
    assert pred.shape == (1, 32, 48)


def test_sensor_presets_are_data():
    assert get_sensor("mod09ga").band_index("swir2") == 6
    assert get_sensor("landsat89_c2l2").offset == -0.2
    assert get_sensor(FINE) is FINE


# ----------------------------------------------------------------------------- errors
def test_error_fine_files_on_different_grids(tmp_path):
    a = write_tif(tmp_path / "a.tif", np.ones((1, 8, 8), np.int16))
    b = write_tif(tmp_path / "b.tif", np.ones((1, 8, 9), np.int16))
    c = write_tif(tmp_path / "c.tif", np.ones((1, 8, 8), np.int16), crs="EPSG:32634")
    s = Sensor("s", ("nir",), scale=1e-4)
    for other in (b, c):
        with pytest.raises(CatalogError, match=rf"fine/truth file {other} disagrees with {a}.*share one grid"):
            ingest(
                {"2020-01-01": a, "2020-01-02": other}, {"2020-01-01": a}, bands=["nir"], fine_sensor=s, coarse_sensor=s
            )


def test_error_coarse_files_on_different_grids(tmp_path):
    a = write_tif(tmp_path / "a.tif", np.ones((1, 8, 8), np.int16))
    b = write_tif(tmp_path / "b.tif", np.ones((1, 2, 2), np.int16), res=120.0, crs="EPSG:32634")
    c = write_tif(tmp_path / "c.tif", np.ones((1, 2, 2), np.int16), res=120.0)
    s = Sensor("s", ("nir",), scale=1e-4)
    with pytest.raises(CatalogError, match=r"coarse file .*disagrees with .*CRS EPSG:32633"):
        ingest({"2020-01-01": a}, {"2020-01-01": c, "2020-01-02": b}, bands=["nir"], fine_sensor=s, coarse_sensor=s)


def test_error_coarse_file_that_cannot_reach_the_fine_grid(tmp_path):
    fine = write_envi(tmp_path / "fine", np.ones((1, 8, 12)))
    odd = write_envi(tmp_path / "odd", np.ones((1, 3, 5)))
    georef = write_tif(tmp_path / "g.tif", np.ones((1, 2, 3), np.int16))
    s = Sensor("s", ("nir",), scale=1e-4)
    for coarse in (odd, georef):
        with pytest.raises(CatalogError, match=rf"coarse file {coarse} cannot be put on the fine grid"):
            ingest({"2020-01-01": fine}, {"2020-01-01": coarse}, bands=["nir"], fine_sensor=s, coarse_sensor=s)
    quarter = write_envi(tmp_path / "quarter", np.ones((1, 2, 3)))
    with pytest.raises(CatalogError, match=r"not georeferenced, so it can only be upsampled with 'nearest'"):
        ingest(
            {"2020-01-01": fine},
            {"2020-01-01": quarter},
            bands=["nir"],
            fine_sensor=s,
            coarse_sensor=s,
            resampling="bilinear",
        )


def test_error_scale_factor_leaves_values_far_outside_the_range(scene):
    _, _, files = scene
    unscaled = dataclasses.replace(FINE, scale=1.0)
    with pytest.raises(
        CatalogError,
        match=r"LT05_2001137.tif: after scale 1 and offset 0, 100.0% of valid values "
        r"lie outside \(-0.5, 1.5\).*reflectance x 10000: set scale 1.0e-4",
    ):
        ingest(
            _by_date(files["fine"]),
            _by_date(files["coarse"]),
            bands=["nir"],
            fine_sensor=unscaled,
            coarse_sensor=COARSE,
        )


def test_error_wrong_offset_gets_the_generic_hint(tmp_path):
    path = write_tif(tmp_path / "f.tif", np.full((1, 4, 4), 0.5, np.float32))
    shifted = Sensor("s", ("nir",), offset=-2.0)
    with pytest.raises(CatalogError, match=r"min -1.5, max -1.5\); check the sensor's scale, offset and nodata"):
        ingest({"2020-01-01": path}, {"2020-01-01": path}, bands=["nir"], fine_sensor=shifted, coarse_sensor=shifted)


def test_error_bands(scene, tmp_path):
    _, _, files = scene
    fine, coarse = _by_date(files["fine"]), _by_date(files["coarse"])
    with pytest.raises(CatalogError, match=r"band 'coastal' is not among sensor 'tm'.*choose cube bands that both"):
        ingest(fine, coarse, bands=["coastal"], fine_sensor=FINE, coarse_sensor=COARSE)
    three = Sensor("three", ("red", "nir", "blue"), scale=1e-4)
    with pytest.raises(CatalogError, match=r"has 6 band\(s\) but sensor 'three' declares 3"):
        ingest(fine, coarse, bands=["red"], fine_sensor=three, coarse_sensor=COARSE)
    with pytest.raises(CatalogError, match=r"bands must be a non-empty list of unique names"):
        ingest(fine, coarse, bands=["red", "red"], fine_sensor=FINE, coarse_sensor=COARSE)
    with pytest.raises(CatalogError, match=r"duplicate band names"):
        Sensor("dup", ("red", "red"))
    with pytest.raises(CatalogError, match=r"unknown sensor 'landsat99'"):
        get_sensor("landsat99")


def test_error_files_and_dates(scene, tmp_path):
    _, _, files = scene
    coarse = _by_date(files["coarse"])
    with pytest.raises(CatalogError, match=r"file .*nothere.tif does not exist.*STF_DATA_ROOT"):
        ingest({"2020-01-01": tmp_path / "nothere.tif"}, coarse, bands=["red"], fine_sensor=FINE, coarse_sensor=COARSE)
    junk = tmp_path / "junk.tif"
    junk.write_text("not a raster")
    with pytest.raises(CatalogError, match=r"GDAL cannot read .*junk.tif"):
        ingest({"2020-01-01": junk}, coarse, bands=["red"], fine_sensor=FINE, coarse_sensor=COARSE)
    with pytest.raises(CatalogError, match=r"no fine files given"):
        ingest({}, coarse, bands=["red"], fine_sensor=FINE, coarse_sensor=COARSE)
    with pytest.raises(CatalogError, match=r"no coarse files given"):
        ingest(_by_date(files["fine"]), {}, bands=["red"], fine_sensor=FINE, coarse_sensor=COARSE)
    with pytest.raises(
        CatalogError, match=r"fine: cannot tell the date of .*LT05_2001137.tif: sensor .tm. declares no date pattern"
    ):
        ingest(list(files["fine"].values()), coarse, bands=["red"], fine_sensor=FINE, coarse_sensor=COARSE)
    pattern = DatePattern(r"LT05_(\d{4})", "%Y")
    with pytest.raises(CatalogError, match=r"fine: two files for 2001-01-01"):
        ingest(
            list(files["fine"].values()),
            coarse,
            date_pattern=pattern,
            bands=["red"],
            fine_sensor=FINE,
            coarse_sensor=COARSE,
        )
    with pytest.raises(CatalogError, match=r"cannot read a date from 'x/b.tif': regex"):
        DatePattern(r"(\d{8})", "%Y%m%d").parse("x/b.tif")
    with pytest.raises(CatalogError, match=r"'2001999' .*does not match date format '%Y%j'"):
        DatePattern(r"(\d{7})", "%Y%j").parse("a_2001999.tif")
    with pytest.raises(CatalogError, match=r"date regex .* has no group; wrap the date part in"):
        DatePattern(r"\d+", "%Y")
    with pytest.raises(CatalogError, match=r"cannot read 'someday' as a date"):
        ingest({"someday": "a.tif"}, coarse, bands=["red"], fine_sensor=FINE, coarse_sensor=COARSE)
    with pytest.raises(CatalogError, match=r"resampling 'lanczos' is not one of"):
        ingest(
            _by_date(files["fine"]), coarse, bands=["red"], fine_sensor=FINE, coarse_sensor=COARSE, resampling="lanczos"
        )


@settings(max_examples=12, deadline=None)
@given(
    factor=st.integers(1, 4),
    rows=st.integers(1, 3),
    cols=st.integers(1, 3),
    scale=st.sampled_from([1e-4, 2.75e-5, 1.0 / 255]),
    offset=st.sampled_from([0.0, -0.2]),
    seed=st.integers(0, 2**16),
)
def test_property_scale_clip_and_nearest_upsampling(factor, rows, cols, scale, offset, seed):
    """Any scale/offset and integer coarse factor: values equal clip(raw * scale + offset) and the
    coarse image equals each native pixel repeated factor x factor times; nodata stays NaN."""
    rng = np.random.default_rng(seed)
    hi = int((1.2 - offset) / scale)  # keep scaled values inside the valid range
    fine = rng.integers(0, hi, size=(1, rows * factor, cols * factor)).astype(np.int32)
    coarse = rng.integers(0, hi, size=(1, rows, cols)).astype(np.int32)
    fine[0, 0, 0] = -1
    sensor = Sensor("s", ("nir",), scale=scale, offset=offset, nodata=-1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cube = ingest(
            {"2020-01-01": write_tif(tmp / "f.tif", fine)},
            {"2020-01-01": write_tif(tmp / "c.tif", coarse, res=RES * factor)},
            bands=["nir"],
            fine_sensor=sensor,
            coarse_sensor=sensor,
            chunks=None,
        )
    expected = np.clip((fine * scale + offset).astype(np.float32), 0, 1)
    expected[0, 0, 0] = np.nan
    np.testing.assert_array_equal(cube["fine"].values[0], expected)
    native = np.clip((coarse * scale + offset).astype(np.float32), 0, 1)
    np.testing.assert_array_equal(cube["coarse"].values[0], native.repeat(factor, 1).repeat(factor, 2))
    assert cube["fine_valid"].item() == pytest.approx(1 - 1 / fine.size)


# ----------------------------------------------------------------------------- products: Landsat C2 L2 + MOD09GA
def _maker():
    spec = importlib.util.spec_from_file_location("make_products", Path(__file__).parent / "data" / "make_products.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MAKER = _maker()
PRODUCT_BANDS = ["blue", "green", "red", "nir", "swir1", "swir2"]


@pytest.fixture
def products(tmp_path):
    return tmp_path, MAKER.write_products(tmp_path)


def _landsat_expected(dn, qa, masked_bits=(0, 1, 2, 3, 4)):
    """clip(DN * 2.75e-5 - 0.2, 0, 1), NaN where DN is fill or a masked QA_PIXEL bit is set."""
    values = np.clip((dn.astype(np.float64) * 2.75e-5 - 0.2).astype(np.float32), 0, 1)
    bad = np.zeros(qa.shape, bool)
    for bit in masked_bits:
        bad |= (qa >> bit) & 1 == 1
    values[:, bad] = np.nan
    values[dn == 0] = np.nan
    return values


def _modis_expected(stored, state, cube):
    """Nearest reference computed with pyproj: each fine pixel centre, moved to the sinusoidal grid, takes
    the 463 m pixel it falls in; NaN for fill and where its 1 km state is cloudy/mixed, shadow or cirrus >= average."""
    from pyproj import Transformer

    xx, yy = np.meshgrid(cube["x"].values, cube["y"].values)
    sx, sy = Transformer.from_crs("EPSG:32633", MAKER.SINUSOIDAL, always_xy=True).transform(xx, yy)
    t = MAKER.modis_grid()[0]
    cols = np.floor((sx - t.c) / MAKER.MODIS_PIXEL).astype(int)
    rows = np.floor((t.f - sy) / MAKER.MODIS_PIXEL).astype(int)
    order = [list(MAKER.MODIS_BANDS).index(b) for b in PRODUCT_BANDS]
    raw = stored[order][:, rows, cols]
    values = np.clip((raw.astype(np.float64) * 1e-4).astype(np.float32), 0, 1)
    s = state[rows // 2, cols // 2].astype(np.int64)
    bad = np.isin(s & 0b11, [1, 2]) | ((s >> 2) & 1 == 1) | np.isin((s >> 8) & 0b11, [2, 3])
    values[:, bad] = np.nan
    values[raw == -28672] = np.nan
    return values


def test_landsat_c2_and_mod09ga_files_from_globs(products):
    folder, data = products
    cube = stf.ingest(
        str(folder / "L*_SR_B*.TIF"), str(folder / "MOD09GA*.tif"), fine_sensor="landsat_c2_l2", coarse_sensor="mod09ga"
    )
    assert cube["band"].values.tolist() == PRODUCT_BANDS  # the bands both presets provide
    assert [str(t)[:10] for t in cube["time"].values] == ["2020-06-01", "2020-06-09", "2020-06-17"]
    assert cube.rio.crs.to_epsg() == 32633 and cube.rio.transform() == data["fine_transform"]
    # sinusoidal is equal-area and UTM scales by ~0.9996 near its central meridian: 463.3 m * 0.9996 / 30 m
    assert cube.attrs["coarse_factor"] == round(MAKER.MODIS_PIXEL * 0.9996 / 30) == 15
    assert cube["fine"].attrs["sensor"] == "landsat7_c2_l2, landsat8_c2_l2"
    c = cube.compute()
    for i, date in ((0, "2020-06-01"), (2, "2020-06-17")):
        scene = data["fine"][date]
        bits = (0, 1, 2, 3, 4) if scene["product"].startswith("LC08") else (0, 1, 3, 4)
        np.testing.assert_array_equal(c["fine"].values[i], _landsat_expected(scene["dn"], scene["qa"], bits))
    assert np.isnan(c["fine"].values[1]).all()
    assert not np.isnan(c["fine"].values[0][:, 35, 40]).any()  # snow is not masked by default
    for i, date in enumerate(MAKER.MODIS_DATES):
        expected = _modis_expected(data["coarse"][date]["stored"], data["coarse"][date]["state"], cube)
        np.testing.assert_array_equal(c["coarse"].values[i], expected)
        assert 0 < np.isnan(expected).mean() < 1
    np.testing.assert_allclose(c["fine_valid"].values[[0, 2]], 1 - np.isnan(c["fine"].values[[0, 2]]).mean((1, 2, 3)))


def test_one_band_file_per_date_finds_its_siblings_and_is_lazy(products):
    folder, _ = products
    full = stf.ingest(
        str(folder / "L*_SR_B*.TIF"),
        str(folder / "MOD09GA*.tif"),
        fine_sensor="landsat_c2_l2",
        coarse_sensor="mod09ga",
        chunks=None,
    )
    with raise_if_dask_computes(max_computes=1):
        cube = stf.ingest(
            str(folder / "L*_SR_B2.TIF"),
            str(folder / "MOD09GA*b01*.tif"),
            fine_sensor="landsat_c2_l2",
            coarse_sensor="mod09ga",
            chunks={"y": 32, "x": 48},
        )
        assert cube["fine"].chunks[2:] == ((32, 32), (48, 32))
    xr.testing.assert_identical(cube.compute(), full)


def test_quality_rules_and_dilation_are_parameters(products):
    folder, data = products
    sensor = get_sensor("landsat8_c2_l2").with_mask(["fill", "cloud"], dilation=1)
    cube = stf.ingest(
        str(folder / "LC08*_SR_B*.TIF"),
        str(folder / "MOD09GA*.tif"),
        fine_sensor=sensor,
        coarse_sensor="mod09ga",
        chunks={"y": 12, "x": 80},
    )  # a chunk border crosses the cloud
    scene = data["fine"]["2020-06-01"]
    cloud, fill = (scene["qa"] >> 3) & 1 == 1, scene["qa"] & 1 == 1
    padded = np.pad(cloud | fill, 1)
    grown = np.any([padded[1 + dy : 65 + dy, 1 + dx : 81 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)
    masked = np.isnan(cube["fine"].values[0, 0])
    np.testing.assert_array_equal(masked, grown | (scene["dn"][0] == 0))
    # the 4 x 6 cloud (rows 10-13) grown by one pixel across the chunk border at row 12, and the 3 fill
    # pixels of row 0 into row 1
    assert grown.sum() == (4 + 2) * (6 + 2) + 2 * 4
    unmasked = stf.ingest(
        str(folder / "LC08*_SR_B*.TIF"),
        str(folder / "MOD09GA*.tif"),
        fine_sensor="landsat_c2_l2",
        coarse_sensor="mod09ga",
        mask=False,
        chunks=None,
    )
    assert np.isnan(unmasked["fine"].values[0]).sum() == 6 * 3  # only the fill pixels
    with pytest.raises(CatalogError, match=r"QA band 'QA_PIXEL' has no rule\(s\) \['clouds'\]; choose among"):
        get_sensor("landsat_c2_l2").with_mask(["clouds"])


def test_sensor_presets_declare_products():
    l8, l7, modis, mcd = (get_sensor(n) for n in ("landsat8_c2_l2", "landsat7_c2_l2", "mod09ga", "mcd43a4"))
    assert (l8.asset("red"), l7.asset("red"), l7.asset("swir2")) == ("SR_B4", "SR_B3", "SR_B7")
    assert (l8.scale, l8.offset, l8.nodata) == (2.75e-5, -0.2, 0)
    assert [modis.asset(b) for b in PRODUCT_BANDS] == [f"sur_refl_b0{n}" for n in (3, 4, 1, 2, 6, 7)]
    assert (modis.scale, modis.nodata, mcd.nodata) == (1e-4, -28672, 32767)
    assert mcd.qa.asset_for("swir1") == "BRDF_Albedo_Band_Mandatory_Quality_Band6"
    qa = np.array([0, 1, 2, 255], np.uint8)  # MCD43A4: 0 good, 1 magnitude inversion, 255 fill
    np.testing.assert_array_equal(mcd.qa.bad(qa), [False, True, False, True])
    state = np.array([0b00, 0b01, 0b10, 0b11, 1 << 2, 1 << 8, 2 << 8, 3 << 8, 1 << 12], np.uint16)
    np.testing.assert_array_equal(modis.qa.bad(state), [0, 1, 1, 0, 1, 0, 1, 1, 0])
    assert get_sensor("landsat_c2_l2").for_file("LT05_L2SP_x_SR_B1.TIF").name == "landsat5_c2_l2"
    with pytest.raises(CatalogError, match=r"LX99_a.TIF matches none of sensor 'landsat_c2_l2'"):
        get_sensor("landsat_c2_l2").for_file("LX99_a.TIF")


def test_stf_ingest_is_the_function_after_the_catalog_module_is_imported():
    importlib.import_module("stf_pipeline.catalog")
    assert callable(stf.ingest) and stf.ingest.__name__ == "ingest"


# ----------------------------------------------------------------------------- product errors
def test_error_missing_quality_band(products):
    folder, _ = products
    qa = folder / f"{MAKER.LANDSAT['2020-06-01'][0]}_QA_PIXEL.TIF"
    qa.unlink()
    with pytest.raises(
        CatalogError,
        match=rf"its quality band 'QA_PIXEL' is missing: expected {qa}; put the "
        r"product's QA_PIXEL file beside its bands, or pass mask=False",
    ):
        stf.ingest(
            str(folder / "LC08*_SR_B*.TIF"),
            str(folder / "MOD09GA*.tif"),
            fine_sensor="landsat_c2_l2",
            coarse_sensor="mod09ga",
        )
    cube = stf.ingest(
        str(folder / "LC08*_SR_B*.TIF"),
        str(folder / "MOD09GA*.tif"),
        fine_sensor="landsat_c2_l2",
        coarse_sensor="mod09ga",
        mask=False,
        chunks=None,
    )
    assert cube.sizes["time"] == 3


def test_error_missing_band_file_and_unreadable_dates(products):
    folder, _ = products
    product = MAKER.LANDSAT["2020-06-01"][0]
    (folder / f"{product}_SR_B5.TIF").unlink()
    with pytest.raises(
        CatalogError,
        match=rf"landsat8_c2_l2 scene of 2020-06-01: no file for band 'nir' \('SR_B5'\): "
        rf"expected .*{product}_SR_B5.TIF",
    ):
        stf.ingest(
            str(folder / "LC08*_SR_B2.TIF"),
            str(folder / "MOD09GA*.tif"),
            fine_sensor="landsat_c2_l2",
            coarse_sensor="mod09ga",
        )
    odd = folder / "LC08_my_scene_SR_B2.TIF"
    (folder / f"{product}_SR_B2.TIF").rename(odd)
    with pytest.raises(
        CatalogError, match=r"cannot read a date from '.*LC08_my_scene_SR_B2.TIF': regex .*--date-regex"
    ):
        stf.ingest([odd], str(folder / "MOD09GA*.tif"), fine_sensor="landsat_c2_l2", coarse_sensor="mod09ga")
    with pytest.raises(CatalogError, match=r"fine: '.*nothing\*.TIF' matches no file"):
        stf.ingest(
            str(folder / "nothing*.TIF"),
            str(folder / "MOD09GA*.tif"),
            fine_sensor="landsat_c2_l2",
            coarse_sensor="mod09ga",
        )


def test_error_coarse_image_not_covering_the_fine_grid(tmp_path):
    fine = write_tif(tmp_path / "f.tif", np.full((1, 40, 40), 1000, np.int16))
    # 480 m pixels from x0 + 600 m: the western 600 m of the fine area are outside
    coarse = write_tif(tmp_path / "c.tif", np.full((1, 4, 4), 1000, np.int16), res=480.0, x0=X0 + 600)
    s = Sensor("s", ("nir",), scale=1e-4)
    with pytest.raises(
        CatalogError,
        match=rf"coarse file {coarse} does not cover the fine grid: the fine area spans "
        r"x 500000.0..501200.0.*holds x 500600.0..502520.0.*mosaic them first",
    ):
        ingest({"2020-01-01": fine}, {"2020-01-01": coarse}, bands=["nir"], fine_sensor=s, coarse_sensor=s)


# ----------------------------------------------------------------------------- the `stf ingest` command
def _own_files_args(folder, out):
    """``stf ingest`` arguments for the products fixture's Landsat C2 L2 and MOD09GA files."""
    return [
        "ingest",
        "--fine",
        str(folder / "L*_SR_B*.TIF"),
        "--coarse",
        str(folder / "MOD09GA*.tif"),
        "--sensor-fine",
        "landsat_c2_l2",
        "--sensor-coarse",
        "mod09ga",
        "-o",
        str(out),
    ]


def test_stf_ingest_own_files(products, capsys):
    from stf_pipeline.cli import main

    folder, _ = products
    out = folder / "cube.zarr"
    args = _own_files_args(folder, out)
    assert main([*args, "--mask-fine", "fill,cloud", "--dilate-fine", "1", "--chunk", "32"]) == 0
    text = capsys.readouterr().out
    assert "coarse_factor: 15" in text and "2 pair date(s)" in text and "1 coarse-only date(s)" in text
    sensor = get_sensor("landsat_c2_l2").with_mask(["fill", "cloud"], dilation=1)
    expected = stf.ingest(
        str(folder / "L*_SR_B*.TIF"),
        str(folder / "MOD09GA*.tif"),
        fine_sensor=sensor,
        coarse_sensor="mod09ga",
        chunks=None,
    )
    stored = stf.open_cube(out)
    assert stored["fine"].chunks[2] == (32, 32)
    for name in ("fine", "coarse"):
        np.testing.assert_array_equal(stored[name].values, expected[name].values)
    assert stored.rio.crs == expected.rio.crs and stored.attrs["coarse_factor"] == 15


def test_stf_ingest_errors_write_nothing(products, capsys):
    from stf_pipeline.cli import EXIT_ERROR, main

    folder, _ = products
    out = folder / "cube.zarr"
    tif = folder / f"{MAKER.LANDSAT['2020-06-01'][0]}_SR_B2.TIF"
    assert main(["ingest", str(tif), "-o", str(out)]) == EXIT_ERROR  # a GeoTIFF is not read as a catalog YAML
    err = capsys.readouterr().err
    assert err.startswith(
        f"stf: error: '{tif}' is an image (or a pattern of images), not a catalog YAML; "
        f"to ingest your own files run stf ingest --fine '{tif}' --coarse"
    )
    renamed = folder / "scene.yaml"
    tif.rename(renamed)  # a binary file whatever its name
    assert main(["ingest", str(renamed), "-o", str(out)]) == EXIT_ERROR
    assert "is an image (or a pattern of images), not a catalog YAML" in capsys.readouterr().err
    renamed.rename(tif)
    (folder / f"{MAKER.LANDSAT['2020-06-17'][0]}_QA_PIXEL.TIF").unlink()
    args = _own_files_args(folder, out)
    assert main(args) == EXIT_ERROR
    assert "its quality band 'QA_PIXEL' is missing" in capsys.readouterr().err
    assert main(args[:-4] + ["-o", str(out)]) == EXIT_ERROR
    assert (
        "stf ingest with your own files needs --sensor-coarse (sensors: stf ingest --list-sensors)"
        in capsys.readouterr().err
    )
    assert not out.exists() and not [p for p in folder.iterdir() if p.name.startswith(".cube.zarr")]
    assert main([*args, "--no-mask"]) == 0 and out.exists()


def test_mcd43a4_masks_each_band_by_its_own_quality_band(products):
    """MCD43A4: one quality band per band (0 full inversion, 1 magnitude inversion, 255 fill)."""
    folder, data = products
    transform, shape = MAKER.modis_grid()
    quality = {n: np.zeros(shape, np.uint8) for n in (1, 2, 3, 4, 6, 7)}
    quality[2][4, 5] = 1  # nir: magnitude inversion, masked by default
    quality[1][5, 6] = 255  # red: fill
    stored = {n: np.full(shape, 1000 * n, np.int16) for n in quality}
    for n in quality:
        for name, values in (
            (f"Nadir_Reflectance_Band{n}", stored[n]),
            (f"BRDF_Albedo_Band_Mandatory_Quality_Band{n}", quality[n]),
        ):
            MAKER.write(
                folder / f"MCD43A4.061_{name}_doy2020153_aid0001.tif", values, crs=MAKER.SINUSOIDAL, transform=transform
            )
    cube = stf.ingest(
        str(folder / "L*_SR_B*.TIF"),
        str(folder / "MCD43A4*Nadir_Reflectance_Band1_*.tif"),
        fine_sensor="landsat_c2_l2",
        coarse_sensor="mcd43a4",
        chunks=None,
    )
    coarse = cube["coarse"].sel(time="2020-06-01")
    from pyproj import Transformer

    xx, yy = np.meshgrid(cube["x"].values, cube["y"].values)
    sx, sy = Transformer.from_crs("EPSG:32633", MAKER.SINUSOIDAL, always_xy=True).transform(xx, yy)
    cols, rows = (
        ((sx - transform.c) // MAKER.MODIS_PIXEL).astype(int),
        ((transform.f - sy) // MAKER.MODIS_PIXEL).astype(int),
    )
    for band, n in (("red", 1), ("nir", 2), ("blue", 3)):
        expected = np.where(quality[n][rows, cols] == 0, np.float32(1000 * n * 1e-4), np.nan)
        np.testing.assert_array_equal(coarse.sel(band=band).values, expected)
    assert np.isnan(coarse.sel(band="nir").values).any() and np.isnan(coarse.sel(band="red").values).any()


# ------------------------------------------------------------------ rasterio reads as rioxarray did
#: real files of the shared data: a 6-band float32 GeoTIFF in a custom sinusoidal CRS with nodata -3.4e38,
#: a single-band EPSG:4326 GeoTIFF, and an ENVI file without georeferencing
REAL_FILES = (
    "imagefusion_kranj/landsat_unfilled/2020068_191-28_kranj.tif",
    "ubestarfm_lst/Landsat_LST_cloudrm_20160205.tif",
    "zhu_estarfm/tm0524",
)


@pytest.mark.parametrize("name", REAL_FILES)
def test_rasterio_reads_a_real_file_as_rioxarray_does(name):
    # the in-memory reader (rasterio) gives the grid, pixel-centre coordinates, nodata and values that
    # rioxarray.open_rasterio (the reader of every file before) gives for the same file
    from rasterio.errors import NotGeoreferencedWarning

    from stf_pipeline._ingest import _header, _pixel_centres, _read
    from stf_pipeline.catalog import data_root

    rioxarray = pytest.importorskip("rioxarray")
    path = data_root() / name
    if not path.exists():
        pytest.skip("shared real data not present")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        expected = rioxarray.open_rasterio(path, masked=False).load()
    header = _header(path)
    assert header.grid.crs == expected.rio.crs and (header.grid.crs is None) == name.startswith("zhu_estarfm")
    assert header.grid.transform == expected.rio.transform()
    assert header.grid.shape == expected.shape[1:] and header.count == expected.sizes["band"]
    if expected.rio.nodata is None:
        assert header.nodata is None
    else:
        assert np.asarray(header.nodata).astype(expected.dtype) == expected.rio.nodata
    coords = _pixel_centres(header.grid)
    np.testing.assert_array_equal(coords["x"], expected["x"].values)
    np.testing.assert_array_equal(coords["y"], expected["y"].values)
    values = _read(path, header, range(header.count), None)
    assert values.dtype == expected.dtype
    np.testing.assert_array_equal(values, expected.values)


def test_a_real_catalog_read_into_memory_equals_its_lazy_read():
    # kranj is georeferenced: with chunks its files are read lazily through rioxarray, without them by
    # rasterio into memory; the two cubes (coords, CRS, values, valid fractions) are identical
    from stf_pipeline.catalog import data_root

    if not (data_root() / "imagefusion_kranj").exists():
        pytest.skip("shared real data not present")
    eager, _ = stf.open_catalog("imagefusion_kranj", chunks=None)
    lazy, _ = stf.open_catalog("imagefusion_kranj")
    assert all(isinstance(v.data, np.ndarray) for v in eager.data_vars.values())
    xr.testing.assert_identical(eager, lazy.compute())
    assert eager.rio.crs == lazy.rio.crs and eager.rio.transform() == lazy.rio.transform()


@pytest.mark.parametrize(("rotation", "y_step"), [(30.0, -30.0), (90.0, -30.0), (90.0, 30.0)])
def test_a_file_on_a_rotated_grid_is_refused(tmp_path, rotation, y_step):
    # pixel-centre coords are computed for north-up grids only: a rotated one (a right angle included,
    # which keeps the grid rectilinear) must be warped first, not read onto wrong coordinates
    import rasterio
    from affine import Affine

    from stf_pipeline._ingest import _header

    path = tmp_path / "rotated.tif"
    transform = Affine.translation(500_000.0, 4_100_000.0) * Affine.rotation(rotation) * Affine.scale(30.0, y_step)
    profile = {"driver": "GTiff", "width": 4, "height": 3, "count": 1, "dtype": "int16", "crs": "EPSG:32633"}
    with rasterio.open(path, "w", transform=transform, **profile) as dst:
        dst.write(np.zeros((1, 3, 4), np.int16))
    with pytest.raises(CatalogError, match=r"(?s)rotated grid.*gdalwarp"):
        _header(path)
