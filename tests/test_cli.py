"""The ``stf`` command, ``describe_cube``, and the cube store contract seen from outside.

The reference cube here is written with plain xarray/Zarr (not with stf_pipeline), so the round
trip through ``write_cube``/``open_cube`` and the ``stf info`` text are checked against a store
that only follows the contract.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import rioxarray  # noqa: F401  (registers .rio)
import xarray as xr
from pyproj import CRS

import stf_pipeline as stf
from stf_pipeline.cli import main
from stf_pipeline.exceptions import CubeError
from stf_pipeline.info import describe_cube

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")


def independent_cube() -> xr.Dataset:
    """4 dates x 2 bands x 6 x 8 on UTM 33N, built and georeferenced by hand (CF grid_mapping)."""
    rng = np.random.default_rng(7)
    shape = (4, 2, 6, 8)
    fine = rng.uniform(0, 0.5, shape).astype(np.float32)
    fine[[1, 2]] = np.nan  # coarse-only dates
    fine[3, :, :3, :4] = np.nan  # a quarter of date 4 clouded
    coarse = rng.uniform(0, 0.5, shape).astype(np.float32)
    coarse[2, :, :3, :] = np.nan  # half of date 3 missing
    truth = rng.uniform(0, 0.5, shape).astype(np.float32)
    crs = CRS.from_epsg(32633)
    spatial_ref = xr.Variable((), np.int64(0), attrs={**crs.to_cf(), "crs_wkt": crs.to_wkt(), "spatial_ref": crs.to_wkt()})
    dims = ("time", "band", "y", "x")
    var_attrs = {"grid_mapping": "spatial_ref", "units": "reflectance"}
    return xr.Dataset(
        {
            "fine": (dims, fine, var_attrs),
            "coarse": (dims, coarse, var_attrs),
            "fine_truth": (dims, truth, var_attrs),
        },
        coords={
            "time": np.array(["2021-01-01", "2021-01-17", "2021-02-02", "2021-02-18"], dtype="datetime64[ns]"),
            "band": np.array(["red", "nir"], dtype=object),
            "y": 4_500_000.0 - (np.arange(6) + 0.5) * 30.0,
            "x": 600_000.0 + (np.arange(8) + 0.5) * 30.0,
            "spatial_ref": spatial_ref,
        },
        attrs={"coarse_factor": 4, "title": "hand-made cube", "site": "nowhere"},
    )


@pytest.fixture
def foreign_store(tmp_path):
    path = tmp_path / "foreign.zarr"
    independent_cube().to_zarr(path, zarr_format=2, consolidated=True)
    return path


def test_foreign_store_round_trips_bit_for_bit(foreign_store, tmp_path):
    reference = independent_cube()
    opened = stf.open_cube(foreign_store)
    assert opened.rio.crs.to_epsg() == 32633
    out = stf.write_cube(opened, tmp_path / "copy.zarr")
    again = stf.open_cube(out).compute()
    for name in ("fine", "coarse", "fine_truth"):
        assert again[name].dtype == np.float32
        np.testing.assert_array_equal(again[name].values.view(np.uint32), reference[name].values.view(np.uint32))
        assert again[name].attrs["units"] == "reflectance"
    for name in ("time", "band", "y", "x"):
        np.testing.assert_array_equal(again[name].values, reference[name].values)
    assert again.rio.crs == reference.rio.crs
    assert {k: again.attrs[k] for k in reference.attrs} == reference.attrs


def test_stf_info_describes_a_foreign_store(foreign_store, capsys):
    assert main(["info", str(foreign_store)]) == 0
    text = capsys.readouterr().out
    assert f"stf cube: {foreign_store}" in text
    assert "title: hand-made cube" in text
    assert "dates: 4 (2021-01-01 .. 2021-02-18)" in text
    assert "bands: red, nir" in text
    assert "grid: 6 x 8 pixels (y, x), pixel size 30, x 600000 .. 600240, y 4.49982e+06 .. 4.5e+06" in text
    assert "CRS: EPSG:32633" in text
    assert "coarse_factor: 4" in text
    assert "2 pair date(s) (fine and coarse), 2 coarse-only date(s) (fusion targets)" in text
    rows = [line.split() for line in text.splitlines() if line.startswith("  2021-")]
    assert rows == [
        ["2021-01-01", "pair", "0.0%", "0.0%", "0.0%"],
        ["2021-01-17", "coarse-only", "100.0%", "0.0%", "0.0%"],
        ["2021-02-02", "coarse-only", "100.0%", "50.0%", "0.0%"],
        ["2021-02-18", "pair", "25.0%", "0.0%", "0.0%"],
    ]
    assert "site=nowhere" in text


def test_describe_cube_without_crs_or_truth():
    cube = independent_cube().drop_vars(["fine_truth", "spatial_ref"])
    text = describe_cube(cube)
    assert "CRS: none (not georeferenced)" in text and "truth missing" not in text


@pytest.mark.filterwarnings("ignore:Failed to open Zarr store with consolidated metadata")
def test_open_cube_on_missing_truncated_and_corrupt_stores(foreign_store, tmp_path):
    with pytest.raises(CubeError, match=r"no cube store at .*absent.zarr; create one with stf.write_cube"):
        stf.open_cube(tmp_path / "absent.zarr")
    truncated = shutil.copytree(foreign_store, tmp_path / "truncated.zarr")
    (truncated / ".zmetadata").unlink()
    (truncated / ".zgroup").unlink()
    with pytest.raises(CubeError, match=r"cannot open cube store .*truncated.zarr: it is truncated or corrupt"):
        stf.open_cube(truncated)
    corrupt = shutil.copytree(foreign_store, tmp_path / "corrupt.zarr")
    (corrupt / ".zmetadata").write_text("{ this is not json")
    with pytest.raises(CubeError, match=r"cannot open cube store .*corrupt.zarr: it is truncated or corrupt \(JSONDecodeError"):
        stf.open_cube(corrupt)
    no_fine = shutil.copytree(foreign_store, tmp_path / "no_fine.zarr")
    (no_fine / ".zmetadata").unlink()
    (no_fine / "fine" / ".zarray").unlink()
    with pytest.raises(CubeError, match=r"store .*no_fine.zarr is not a valid cube: cube has no data variable 'fine'"):
        stf.open_cube(no_fine)


def test_cli_errors_are_one_line_and_exit_1(tmp_path, capsys):
    assert main(["info", str(tmp_path / "absent.zarr")]) == 1
    assert capsys.readouterr().err.startswith(f"stf info: error: no cube store at {tmp_path / 'absent.zarr'}")
    assert main(["run", str(tmp_path / "absent.yaml")]) == 1
    assert "stf run: error: pipeline file" in capsys.readouterr().err
    assert main(["ingest", "no_such_catalog", "-o", str(tmp_path / "x.zarr")]) == 1
    assert "stf ingest: error: unknown catalog 'no_such_catalog'" in capsys.readouterr().err
    assert main(["bench", "no_such_bench"]) == 1
    assert "stf bench: error: unknown benchmark 'no_such_bench'; available: [" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["frobnicate"])


def test_stf_ingest_writes_a_catalog_cube(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("make_fake_cia", REPO / "tests" / "data" / "make_fake_cia.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    root = maker.make_fake(tmp_path / "data")
    out = tmp_path / "lgc.zarr"
    assert main(["ingest", "lgc", "-o", str(out), "--root", str(root)]) == 0
    text = capsys.readouterr().out
    assert "catalog: lgc" in text and "8 pair date(s)" in text and "6 coarse-only date(s)" in text
    assert "task: target 2004-12-12, pairs ['2004-10-25', '2005-03-02']" in text
    cube, _ = stf.open_catalog("lgc", root=root)
    stored = stf.open_cube(out)
    xr.testing.assert_identical(stored["fine_truth"].compute().drop_vars("spatial_ref"),
                                cube["fine_truth"].compute().drop_vars("spatial_ref"))
    assert main(["ingest", "lgc", "-o", str(out), "--root", str(root)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["ingest", "lgc", "-o", str(out), "--root", str(root), "--overwrite"]) == 0


def test_bench_and_compare_dispatch(monkeypatch):
    calls = []
    bench = types.ModuleType("stf_pipeline.benchmarks.fake_bench")
    bench.__spec__ = importlib.machinery.ModuleSpec(bench.__name__, None)
    bench.main = lambda argv: calls.append(("bench", argv)) or 3
    monkeypatch.setitem(sys.modules, bench.__name__, bench)
    assert main(["bench", "fake_bench", "--size", "64", "-n", "2"]) == 3
    import stf_pipeline.comparison as comparison

    monkeypatch.setattr(comparison, "main", lambda argv: calls.append(("compare", argv)) or 0)
    assert main(["compare", "pipelines/demo.yaml", "--no-figures"]) == 0
    assert calls == [("bench", ["--size", "64", "-n", "2"]), ("compare", ["pipelines/demo.yaml", "--no-figures"])]


def test_stf_turns_on_the_jax_compilation_cache(monkeypatch, tmp_path):
    from stf_pipeline.cli import compilation_cache_dir

    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compilation_cache_dir() == str(tmp_path / "stf_pipeline" / "jax")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
    assert compilation_cache_dir() == str(tmp_path / "mine")
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    seen = []
    bench = types.ModuleType("stf_pipeline.benchmarks.fake_env")
    bench.__spec__ = importlib.machinery.ModuleSpec(bench.__name__, None)
    bench.main = lambda argv: seen.append(os.environ["JAX_COMPILATION_CACHE_DIR"]) or 0
    monkeypatch.setitem(sys.modules, bench.__name__, bench)
    assert main(["bench", "fake_env"]) == 0 and seen == [str(tmp_path / "stf_pipeline" / "jax")]
    # a fresh process started by stf (a Dask worker) inherits it, and JAX reads it on import
    code = "import jax; print(jax.config.jax_compilation_cache_dir)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == seen[0]


def test_module_entry_point(foreign_store):
    result = subprocess.run(
        [sys.executable, "-m", "stf_pipeline.cli", "info", str(foreign_store)],
        capture_output=True, text=True, cwd=REPO, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "CRS: EPSG:32633" in result.stdout


def test_stf_info_labels_the_dates_of_a_fused_cube(foreign_store, tmp_path, capsys):
    stf.fuse_series(stf.open_cube(foreign_store), method="delta", out=tmp_path / "fused.zarr", progress=False)
    assert main(["info", str(tmp_path / "fused.zarr")]) == 0
    text = capsys.readouterr().out
    assert "fused cube: 2 fused date(s), 2 observed date(s)" in text
    roles = [line.split()[1] for line in text.splitlines() if line.startswith("  2021-")]
    assert roles == ["observed", "fused", "fused", "observed"]
