"""Catalogs: the five shared data sets, the CIA/LGC catalogs on a fake copy, the data root, schema errors."""

from __future__ import annotations

import datetime
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr
import yaml

import stf_pipeline as stf
from stf_pipeline.catalog import (
    CATALOG_DIR,
    DATA_ROOT_ENV,
    Catalog,
    _read_layer,
    catalog_names,
    data_root,
    data_roots,
    load_catalog,
)
from stf_pipeline.exceptions import CatalogError

pytestmark = pytest.mark.filterwarnings(
    "ignore::PendingDeprecationWarning", "ignore::rasterio.errors.NotGeoreferencedWarning"
)

SHARED = ("hcm", "imagefusion_kranj", "ubestarfm_lst", "zhu_estarfm", "zhu_fsdaf_lgc")
needs_data = pytest.mark.skipif(not (data_root() / "zhu_estarfm").exists(), reason="shared real data not present")


def _iso(values):
    return [str(np.datetime_as_string(v, unit="D")) for v in np.atleast_1d(values)]


def _load_fake_maker():
    spec = importlib.util.spec_from_file_location("make_fake_cia", Path(__file__).parent / "data" / "make_fake_cia.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_shipped_catalog_loads():
    assert set(SHARED) | {"cia", "lgc"} <= set(catalog_names())
    for name in catalog_names():
        catalog = load_catalog(name)
        assert catalog.name == name and catalog.description


# ------------------------------------------------------------------ the five shared data sets
@needs_data
@pytest.mark.parametrize("name", SHARED)
def test_shared_catalog_gives_contract_cube_and_task(name):
    cube, task = stf.open_catalog(name)
    stf.validate_cube(cube, require_coarse_factor=True)
    c = cube.compute()
    for var in ("fine", "coarse", "fine_truth"):
        values = c[var].values
        finite = values[np.isfinite(values)]
        assert finite.size and finite.min() >= 0.0 and finite.max() <= 1.0, var
    target = task.target
    assert np.isnan(c["fine"].sel(time=target).values).all()  # held out
    assert np.isfinite(c["fine_truth"].sel(time=target).values).mean() > 0.9
    for pair in task.pairs:
        assert c["fine_valid"].sel(time=pair) > 0.9 and c["coarse_valid"].sel(time=pair) == 1.0
    assert c["fine_valid"].sel(time=target) == 0.0


@needs_data
def test_zhu_estarfm_values_equal_the_raw_envi_files():
    root = data_root() / "zhu_estarfm"
    cube, task = stf.open_catalog("zhu_estarfm", chunks=None)
    assert _iso(task.target) == ["2001-07-11"] and _iso(task.pairs) == ["2001-05-24", "2001-08-12"]
    assert cube.attrs["coarse_factor"] == 20 and list(cube["band"].values) == ["green", "red", "nir"]

    def raw(name):
        data = np.fromfile(root / name, "<i2").reshape(3, 400, 400)
        return np.clip((data.astype(np.float64) * 1e-4).astype(np.float32), 0, 1)

    np.testing.assert_array_equal(cube["fine"].sel(time="2001-05-24").values, raw("tm0524"))
    np.testing.assert_array_equal(cube["coarse"].sel(time="2001-07-11").values, raw("modis0711"))
    np.testing.assert_array_equal(cube["fine_truth"].sel(time="2001-07-11").values, raw("tm0711"))


@needs_data
def test_kranj_nodata_becomes_nan_and_dates_come_from_names():
    cube, task = stf.open_catalog("imagefusion_kranj", chunks=None)
    path = data_root() / "imagefusion_kranj" / "landsat_unfilled" / "2020068_191-28_kranj.tif"
    with rasterio.open(path) as src:
        raw = src.read()
        nodata = np.float32(src.nodata)
    fine = cube["fine"].sel(time="2020-03-08").values
    np.testing.assert_array_equal(np.isnan(fine), raw == nodata)
    np.testing.assert_array_equal(
        fine[raw != nodata], (raw[raw != nodata].astype(np.float64) * 1e-4).astype(np.float32)
    )
    assert cube.sizes["time"] == 26  # daily MODIS 2020-068 .. 093 from file names
    assert _iso(cube["time"].values[[0, -1]]) == ["2020-03-08", "2020-04-02"]
    assert _iso(task.pairs) == ["2020-03-08", "2020-04-02"]


@needs_data
def test_lst_is_mapped_linearly_from_kelvin():
    cube, _ = stf.open_catalog("ubestarfm_lst", chunks=None)
    with rasterio.open(data_root() / "ubestarfm_lst" / "Landsat_LST_cloudrm_20160308.tif") as src:
        kelvin = src.read(1)
    truth = cube["fine_truth"].sel(time="2016-03-08", band="lst").values
    np.testing.assert_allclose(100.0 * truth + 250.0, kelvin, rtol=1e-6)
    assert cube["fine"].attrs["units"] == "(T - 250 K) / 100 K"
    assert cube.rio.crs.to_epsg() == 4326


# ------------------------------------------------------------------ CIA / LGC on a fake copy
@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    return _load_fake_maker().make_fake(tmp_path_factory.mktemp("fake_cia"))


def test_cia_catalog_on_fake_copy_uses_the_biastf_split(fake_root):
    cube, task = stf.open_catalog("cia", root=fake_root)
    assert cube.sizes["time"] == 17 and cube.sizes["y"] == 60 and cube.sizes["x"] == 40
    assert cube.rio.crs.to_epsg() == 32755 and cube.attrs["coarse_factor"] == 20
    dates = _iso(cube["time"].values)
    assert dates[0] == "2001-10-08" and dates[-1] == "2002-05-04"
    held = [dates[i - 1] for i in range(8, 15)]
    assert cube.attrs["stf_targets"] == held
    assert cube.attrs["stf_train_times"] == [dates[i - 1] for i in (1, 2, 3, 4, 5, 6, 7, 15)]
    assert _iso(task.target) == [dates[9]]  # pair 10, the paper's detailed case
    assert _iso(task.pairs) == [dates[6], dates[14]]  # nearest observed pairs: 7 and 15
    np.testing.assert_array_equal(cube["fine_valid"].values == 0, np.isin(dates, held))
    # values: the fake Landsat file of pair 10 is ENVI BIL (row, band, col), x 1e4
    landsat = next((fake_root / "CIA" / "Landsat" / "2002_053_22feb").glob("*.bil"))
    raw = np.fromfile(landsat, "<i2").reshape(60, 6, 40).transpose(1, 0, 2)
    truth = cube["fine_truth"].sel(time=dates[9]).values
    np.testing.assert_array_equal(truth, np.clip((raw * 1e-4).astype(np.float32), 0, 1))


def test_lgc_catalog_on_fake_copy_uses_the_biastf_split(fake_root):
    cube, task = stf.open_catalog("lgc", root=fake_root)
    dates = _iso(cube["time"].values)
    assert len(dates) == 14 and dates[7] == "2004-12-12"  # pair 8: the flood
    assert cube.attrs["stf_targets"] == dates[6:12]
    assert cube.attrs["stf_train_times"] == dates[:6] + dates[12:]
    assert _iso(task.target) == ["2004-12-12"] and _iso(task.pairs) == [dates[5], dates[12]]


def test_data_root_env_var_points_catalogs_at_another_copy(fake_root, monkeypatch):
    monkeypatch.setenv(DATA_ROOT_ENV, str(fake_root))
    assert data_root() == fake_root and data_roots() == [(fake_root, "$STF_DATA_ROOT")]
    cube, _ = stf.open_catalog("lgc")
    assert cube.sizes["time"] == 14
    monkeypatch.setenv(DATA_ROOT_ENV, str(fake_root / "elsewhere"))
    with pytest.raises(
        CatalogError,
        match=r"catalog lgc: its data folder 'LGC' was not found; looked in .*elsewhere/LGC \(\$STF_DATA_ROOT\)\. "
        r"Get the files: doi:10.4225/08/5111AD2B7FEE6 .* set \$STF_DATA_ROOT to the folder that holds it, or pass "
        r"that folder as the data root \(root= in Python, --root on the command line\)",
    ):
        stf.open_catalog("lgc")


def test_data_root_search_order(fake_root, tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    clone = (Path(__file__).resolve().parents[2] / "shared" / "data" / "real").resolve()
    user = tmp_path / "xdg" / "stf_pipeline"
    assert data_roots() == [(clone, "beside the clone"), (user, "the user data folder")]
    with pytest.raises(CatalogError, match=rf"looked in {clone}/LGC \(beside the clone\); {user}/LGC \(the user"):
        stf.open_catalog("lgc")
    shutil.copytree(fake_root / "LGC", user / "LGC")  # found in the user data folder
    assert stf.open_catalog("lgc")[0].sizes["time"] == 14
    with pytest.raises(CatalogError, match=r"looked in .*nowhere/LGC \(root= \(--root\)\)"):
        stf.open_catalog("lgc", root=tmp_path / "nowhere")  # an explicit root is the only place looked at


def test_catalogs_are_package_data():
    import importlib.resources

    shipped = importlib.resources.files("stf_pipeline") / "catalogs" / "zhu_estarfm.yaml"
    assert shipped.is_file() and load_catalog("zhu_estarfm").download.startswith("the ESTARFM test data")
    assert all(load_catalog(name).download for name in catalog_names())  # every catalog says where to get it


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.update(root="../../etc"), r"root: '../../etc' must be a path inside the catalog's folder"),
        (lambda s: s.update(root="/data/LGC"), r"root: '/data/LGC' must be a path inside"),
        (
            lambda s: s["fine"]["files"].update({"2004-04-17": "../../../../etc/hostname"}),
            r"fine.files: '../../../../etc/hostname'",
        ),
        (lambda s: s["fine"]["files"].update({"2004-04-17": "/etc/hostname"}), r"fine.files: '/etc/hostname' must be"),
        (lambda s: s["coarse"].update(glob="../*/MODIS/*.int"), r"coarse.glob: '../\*/MODIS/\*.int' must be"),
        (lambda s: s.update(layers={"classes": "../x.tif"}), r"layers.classes: '../x.tif' must be"),
    ],
)
def test_catalog_paths_stay_in_the_catalog_folder(tmp_path, base_spec, edit, message):
    edit(base_spec)
    with pytest.raises(CatalogError, match=message + r".*pass the data root \(root= in Python, --root"):
        load_catalog(_write(tmp_path, base_spec))


def test_catalog_names_are_not_paths():
    with pytest.raises(CatalogError, match=r"unknown catalog '../catalogs/cia'"):
        load_catalog("../catalogs/cia")


# ------------------------------------------------------------------ schema and task errors
def _write(tmp_path, spec, name="cat.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture
def base_spec():
    return yaml.safe_load((CATALOG_DIR / "lgc.yaml").read_text())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.update(colour="red"), r"unknown key 'colour'; valid keys are \['name', 'description'"),
        (lambda s: s.pop("bands"), r"missing required key 'bands'"),
        (lambda s: s.update(bands="red"), r"'bands' must be a non-empty list of band names"),
        (lambda s: s.update(coarse_factor=0), r"coarse_factor must be a positive integer, got 0"),
        (lambda s: s.update(pixel_size=-1), r"pixel_size must be a positive number, got -1"),
        (lambda s: s["fine"].update(sensor={"bands": ["a"], "gain": 2}), r"fine.sensor: unknown key 'gain'"),
        (lambda s: s["fine"].update(sensor={"scale": 1e-4}), r"a sensor needs 'bands'"),
        (lambda s: s["fine"].update(sensor="landsat99"), r"unknown sensor 'landsat99'"),
        (lambda s: s["fine"].pop("sensor"), r"fine: missing required key 'sensor'"),
        (lambda s: s["coarse"].update(files={"2004-04-16": "x"}), r"coarse: give exactly one of 'files'"),
        (lambda s: s["coarse"].pop("date"), r"coarse: 'glob' needs 'date: \{regex"),
        (lambda s: s["coarse"].update(date={"regex": "(x)"}), r"coarse.date: missing required key 'format'"),
        (lambda s: s["coarse"].update(resampling="lanczos"), r"coarse.resampling 'lanczos' is not one of"),
        (lambda s: s["fine"].update(resampling="bilinear"), r"fine: unknown key 'resampling'"),
        (lambda s: s["truth"].update(sensor="landsat_sr"), r"truth: unknown key 'sensor'; valid keys are \['files'"),
        (lambda s: s["fine"].update(files=[]), r"fine.files must be a non-empty mapping"),
        (lambda s: s["fine"]["files"].update(someday="x.int"), r"cannot read 'someday' as a date"),
        (lambda s: s["task"].update(when="now"), r"task: unknown key 'when'; valid keys are \['target', 'pairs'"),
        (lambda s: s["task"].update(train="2004-04-16"), r"task.train must be a list of dates"),
        (lambda s: s["task"].update(target="2004-04-16"), r"target 2004-04-16 must be one of targets"),
    ],
)
def test_schema_errors_name_the_key(tmp_path, base_spec, edit, message):
    edit(base_spec)
    with pytest.raises(CatalogError, match=message):
        load_catalog(_write(tmp_path, base_spec))


def test_task_and_file_errors(tmp_path, fake_root, base_spec):
    spec = dict(base_spec, task={"target": "2004-12-12", "train": ["2003-01-01"]})
    with pytest.raises(CatalogError, match=r"task train \['2003-01-01'\] are not dates of its files"):
        stf.open_catalog(_write(tmp_path, spec), root=fake_root)
    spec = dict(base_spec, task={"target": "2004-12-12", "pairs": ["2004-11-26"]})
    with pytest.raises(
        CatalogError, match=r"its task does not fit its files: the fine image at pair date 2004-11-26 is all NaN"
    ):
        stf.open_catalog(_write(tmp_path, spec), root=fake_root)
    both = yaml.safe_load(yaml.safe_dump(base_spec))
    first = datetime.date(2004, 4, 16)  # YAML reads unquoted ISO dates as dates
    both["truth"]["files"][first] = both["fine"]["files"][first]
    with pytest.raises(CatalogError, match=r"2004-04-16 has both a fine file and a truth file"):
        stf.open_catalog(_write(tmp_path, both), root=fake_root)
    spec = yaml.safe_load(yaml.safe_dump(base_spec))
    spec["coarse"]["glob"] = "MODIS/*/*.hdf"
    with pytest.raises(CatalogError, match=r"glob 'MODIS/\*/\*.hdf' matches no file under .*LGC"):
        stf.open_catalog(_write(tmp_path, spec), root=fake_root)
    copy = tmp_path / "copy"
    shutil.copytree(fake_root / "LGC", copy / "LGC")
    extra = copy / "LGC" / "MODIS" / "2004_107_Apr16" / "MOD09GA_A2004107.sur_refl.int"
    shutil.copy(extra, extra.with_name("MOD09GA_A2004107.v2.sur_refl.int"))
    with pytest.raises(CatalogError, match=r"coarse: two files for 2004-04-16"):
        stf.open_catalog("lgc", root=copy)


def test_unknown_and_broken_catalog_files(tmp_path):
    with pytest.raises(CatalogError, match=r"unknown catalog 'modis_everywhere'; shipped catalogs are \[.*'cia'"):
        load_catalog("modis_everywhere")
    with pytest.raises(CatalogError, match=r"catalog file .*missing.yaml does not exist"):
        load_catalog(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("bands: [red\nfine: {")
    with pytest.raises(CatalogError, match=r"catalog .*bad.yaml is not valid YAML"):
        load_catalog(bad)
    with pytest.raises(CatalogError, match=r"catalog <mapping> must be a mapping"):
        Catalog.from_mapping(["not", "a", "mapping"])


@needs_data
def test_layers_bring_a_class_map_on_the_fine_grid():
    cube, _ = stf.open_catalog("zhu_fsdaf_lgc")
    assert cube["classes"].dims == ("y", "x") and cube["classes"].dtype == np.uint8
    np.testing.assert_array_equal(np.unique(cube["classes"].values), [1, 2, 3, 4])


@needs_data
def test_layer_errors():
    spec = yaml.safe_load((CATALOG_DIR / "zhu_fsdaf_lgc.yaml").read_text())
    assert load_catalog("zhu_fsdaf_lgc").layers == (("classes", "Landsat20041126_SVM_classification"),)
    with pytest.raises(CatalogError, match="'layers' must map variable names"):
        Catalog.from_mapping({**spec, "layers": ["a.tif"]})
    bad = Catalog.from_mapping({**spec, "layers": {"classes": "Landsat20041126"}})
    with pytest.raises(CatalogError, match="must be one band on the fine grid"):
        stf.open_catalog(bad)


def test_a_layer_file_of_subdatasets_is_refused(tmp_path):
    """A netCDF file of two variables opens as subdatasets (a Dataset), not as one single-band raster."""
    grid = {"y": np.arange(8.0), "x": np.arange(8.0)}
    layers = xr.Dataset({name: (("y", "x"), np.zeros((8, 8), np.float32)) for name in ("a", "b")}, coords=grid)
    layers.to_netcdf(tmp_path / "two.nc", engine="scipy")
    cube = stf.synthetic_scene(8, 8, n_times=2)
    with pytest.raises(CatalogError, match="two.nc holds subdatasets; a layer must be a single-band raster"):
        _read_layer(tmp_path / "two.nc", cube, "layer 'classes'")
