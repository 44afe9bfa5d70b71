"""The ``stf`` command, ``describe_cube``, and the cube store contract seen from outside.

The reference cube here is written with plain xarray/Zarr (not with stf_pipeline), so the round
trip through ``write_cube``/``open_cube`` and the ``stf info`` text are checked against a store
that only follows the contract.
"""

from __future__ import annotations

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
import yaml
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
    spatial_ref = xr.Variable(
        (), np.int64(0), attrs={**crs.to_cf(), "crs_wkt": crs.to_wkt(), "spatial_ref": crs.to_wkt()}
    )
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
    with pytest.raises(
        CubeError, match=r"cannot open cube store .*corrupt.zarr: it is truncated or corrupt \(JSONDecodeError"
    ):
        stf.open_cube(corrupt)
    no_fine = shutil.copytree(foreign_store, tmp_path / "no_fine.zarr")
    (no_fine / ".zmetadata").unlink()
    (no_fine / "fine" / ".zarray").unlink()
    with pytest.raises(CubeError, match=r"store .*no_fine.zarr is not a valid cube: cube has no data variable 'fine'"):
        stf.open_cube(no_fine)


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["info", str(tmp_path / "absent.zarr")]) == 2
    assert capsys.readouterr().err.startswith(f"stf: error: no cube store at {tmp_path / 'absent.zarr'}")
    assert main(["run", str(tmp_path / "absent.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stf: error: pipeline file") and "shipped pipeline (biastf-synthetic" in err
    assert err.count("\n") == 1
    assert main(["ingest", "no_such_catalog", "-o", str(tmp_path / "x.zarr")]) == 2
    assert "stf: error: unknown catalog 'no_such_catalog'" in capsys.readouterr().err
    assert main(["bench", "no_such_bench"]) == 2
    assert "stf: error: unknown benchmark 'no_such_bench'; available: [" in capsys.readouterr().err
    assert main(["bench"]) == 2
    from stf_pipeline.cli import benchmark_names

    names = benchmark_names()
    assert {"biastf", "methods", "scale", "startup", "stfdcnn"} <= set(names)
    expected = f"stf: error: name a benchmark: stf bench NAME [ARGS]; available: {', '.join(names)}."
    assert expected in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["frobnicate"])
    assert exit_.value.code == 2


@pytest.mark.parametrize(
    "command", [[], ["run"], ["info"], ["ingest"], ["export"], ["compare"], ["bench"], ["bench", "scale"]]
)
def test_every_help_exits_0(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: stf {' '.join(command)}".rstrip())
    if command == ["bench"]:
        from stf_pipeline.cli import benchmark_names

        assert f"benchmarks: {', '.join(benchmark_names())}" in " ".join(out.split())  # help text wraps


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"stf (stf_pipeline) {stf.__version__}\n"


@pytest.mark.parametrize(
    ("message", "cli"),
    [
        ("x.zarr already exists; pass overwrite=True to replace it or choose another path.",
         "x.zarr already exists; pass --overwrite to replace it or choose another path."),
        ("x holds another fused series (...); pass overwrite=True to replace it, or choose another out= path.",
         "x holds another fused series (...); pass --overwrite to replace it, or choose another --out folder."),
        ("x holds a cube; pass overwrite=True to replace it, or pass output= another folder.",
         "x holds a cube; pass --overwrite to replace it, or pass --out with another folder."),
        ("or pass that folder as the data root (root= in Python, --root on the command line).",
         "or pass that folder as the data root (--root DIR)."),
        ("x holds another request. Pass overwrite=True (--overwrite) to replace it, or choose another out= path.",
         "x holds another request. Pass --overwrite to replace it, or choose another --out folder."),
        ("x already exists; pass overwrite=True (stf export --overwrite) or another folder.",
         "x already exists; pass --overwrite or another folder."),
        ("two\n  lines", "two lines"),
    ],
)
def test_errors_are_worded_for_the_command_line(message, cli):
    from stf_pipeline.cli import cli_message

    assert cli_message(stf.STFError(message)) == cli


def test_overwrite_errors_name_the_option(tmp_path, capsys):
    foreign = tmp_path / "a.zarr"
    independent_cube().to_zarr(foreign, zarr_format=2, consolidated=True)
    with pytest.raises(stf.StoreError, match="pass overwrite=True"):
        stf.write_cube(independent_cube(), foreign)  # the library's wording...
    spec = {"name": "t", "cube": {"zarr": str(foreign)}, "write_cube": True, "methods": []}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    stf.write_cube(stf.synthetic_scene(height=8, width=8, n_times=3), out / "cube.zarr")
    assert main(["run", str(tmp_path / "p.yaml"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # ...and the command's
    assert err == (
        f"stf: error: {out / 'cube.zarr'} holds a cube written from another source; pass --overwrite to replace it, "
        "or pass --out with another folder."
    )
    assert main(["run", str(tmp_path / "p.yaml"), "--out", str(out), "--overwrite"]) == 0


def test_ctrl_c_prints_one_line_and_exits_130(monkeypatch, capsys):
    from stf_pipeline import runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run", interrupted)
    assert main(["run", "demo"]) == 130
    captured = capsys.readouterr()
    assert captured.err == "interrupted: rerun the same command to resume\n" and captured.out == ""


def test_verbose_and_quiet_set_the_log_level():
    import logging

    from stf_pipeline.log import level_from_flags

    assert level_from_flags() == logging.INFO
    assert level_from_flags(verbose=1) == logging.DEBUG and level_from_flags(verbose=3) == logging.DEBUG
    assert level_from_flags(quiet=1) == logging.WARNING and level_from_flags(quiet=2) == logging.ERROR
    assert level_from_flags(verbose=1, quiet=1) == logging.INFO
    from stf_pipeline.cli import build_parser

    assert build_parser().parse_args(["-q", "run", "demo"]).quiet == 1  # before the command
    assert build_parser().parse_args(["run", "demo", "-vv"]).verbose == 2  # or after it


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
    got = stored["fine_truth"].compute().drop_vars("spatial_ref")
    want = cube["fine_truth"].compute().drop_vars("spatial_ref")
    xr.testing.assert_equal(got, want)  # values and coordinates: the store adds CF attributes to x/y
    assert got.attrs == want.attrs
    assert got["x"].attrs["standard_name"] == "projection_x_coordinate"
    assert main(["ingest", "lgc", "-o", str(out), "--root", str(root)]) == 2
    assert "already exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert main(["ingest", "lgc", "-o", str(out), "--root", str(root), "--overwrite"]) == 0


def test_bench_and_compare_dispatch(monkeypatch):
    from stf_pipeline import cli

    calls = []
    bench = types.ModuleType("benchmarks.fake_bench")
    bench.main = lambda argv: calls.append(("bench", argv)) or 3
    monkeypatch.setattr(cli, "load_benchmark", {"fake_bench": bench}.__getitem__)
    assert main(["bench", "fake_bench", "--size", "64", "-n", "2", "--help"]) == 3
    from stf_pipeline import runner

    class Table:
        def to_markdown(self):
            return "| table |"

    monkeypatch.setattr(runner, "run_compare", lambda path, **kw: calls.append(("compare", path, kw)) or Table())
    assert main(["compare", "pipelines/demo.yaml", "--no-figures", "--methods", "delta,starfm", "-o", "x"]) == 0
    assert calls == [
        ("bench", ["--size", "64", "-n", "2", "--help"]),
        ("compare", "pipelines/demo.yaml", {"out": Path("x"), "figures": False, "methods": ["delta", "starfm"],
                                            "targets": None, "root": None, "overwrite": False}),
    ]


def test_bench_loads_the_clones_folder_by_path(tmp_path, monkeypatch, capsys):
    from stf_pipeline import cli

    folder = tmp_path / "benchmarks"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    (folder / "_common.py").write_text("OFFSET = 7\n")
    (folder / "mine.py").write_text(
        "from benchmarks._common import OFFSET\n\ndef main(argv):\n    return OFFSET + len(argv)\n"
    )
    for name in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(cli, "BENCHMARKS", folder)
    assert cli.benchmark_names() == ["mine"]
    assert main(["bench", "mine", "a", "b"]) == 9
    assert sys.modules["benchmarks.mine"].__file__ == str(folder / "mine.py")
    monkeypatch.setattr(cli, "BENCHMARKS", tmp_path / "absent")  # an installed wheel: no clone beside it
    assert main(["bench", "mine"]) == 2
    err = capsys.readouterr().err
    prefix = "stf: error: benchmarks run from a clone of the repository: no benchmarks folder at"
    assert err.startswith(f"{prefix} {tmp_path / 'absent'}")
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "benchmarks run from a clone of the repository" in " ".join(capsys.readouterr().out.split())


def test_stf_turns_on_the_jax_compilation_cache(monkeypatch, tmp_path):
    from stf_pipeline._compile_cache import compilation_cache_dir

    monkeypatch.setenv("STF_JAX_CACHE", "1")
    monkeypatch.delitem(sys.modules, "jax", raising=False)  # as in a fresh `stf` process: set before JAX loads
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compilation_cache_dir() == str(tmp_path / "stf_pipeline" / "jax")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
    assert compilation_cache_dir() == str(tmp_path / "mine")
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    from stf_pipeline import cli

    seen = []
    bench = types.ModuleType("benchmarks.fake_env")
    bench.main = lambda argv: seen.append(os.environ["JAX_COMPILATION_CACHE_DIR"]) or 0
    monkeypatch.setattr(cli, "load_benchmark", {"fake_env": bench}.__getitem__)
    assert main(["bench", "fake_env"]) == 0 and seen == [str(tmp_path / "stf_pipeline" / "jax")]
    # a fresh process started by stf (a Dask worker) inherits it, and JAX reads it on import
    code = "import jax; print(jax.config.jax_compilation_cache_dir)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == seen[0]
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    monkeypatch.setenv("STF_JAX_CACHE", "0")  # the opt-out holds for the command too
    seen.clear()
    bench.main = lambda argv: seen.append(os.environ.get("JAX_COMPILATION_CACHE_DIR")) or 0
    assert main(["bench", "fake_env"]) == 0 and seen == [None]


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


@pytest.mark.slow
def test_ctrl_c_during_a_run_then_the_same_command_resumes(tmp_path):
    """A real SIGINT while ``stf run`` fuses: one line, exit 130; the same command then resumes."""
    import signal
    import threading
    import time

    (tmp_path / "p.yaml").write_text(yaml.safe_dump({
        "name": "sig", "cube": {"synthetic": {"height": 480, "width": 480, "n_times": 6, "seed": 0}},
        "methods": [{"name": "fsdaf"}], "chunks": [96, 96], "figures": False,
    }))
    command = [sys.executable, "-m", "stf_pipeline.cli", "run", "p.yaml"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while not any("fusing with fsdaf" in line for line in lines) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 130
    reader.join(10)
    assert lines[-1] == "interrupted: rerun the same command to resume\n"
    assert not any("Traceback" in line for line in lines)
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "reusing out/sig/cube.zarr" in again.stderr and "resuming out/sig/fused_fsdaf.zarr" in again.stderr
    assert list(stf.open_cube(tmp_path / "out" / "sig" / "fused_fsdaf.zarr")["source"].values).count("fused") == 3
