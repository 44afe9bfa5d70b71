"""Start-up cost: what ``import stf_pipeline`` pulls in, which device question imports JAX, and
that every compiled kernel is cached on disk (so a second process does not compile again)."""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
from numba.core.caching import NullCache
from numba.core.dispatcher import Dispatcher

import stf_pipeline
from stf_pipeline.cli import EXIT_ERROR
from stf_pipeline.methods import _base

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("jax", "flax", "optax", "orbax", "rasterio", "matplotlib", "distributed", "numba", "scipy.stats")


def _child(code: str, **env: str) -> dict:
    """Run ``code`` in a fresh interpreter (this checkout first on the path); its last stdout line as JSON."""
    environ = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **env}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_stf_pipeline_imports_no_heavy_dependency() -> None:
    loaded = _child(
        "import json, sys; import stf_pipeline as stf; stf.STFError; "
        f"print(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))"
    )
    assert loaded == []



def test_cube_task_ingest_and_statistics_modules_import_no_dask_array() -> None:
    # they only recognise Dask arrays (stf_pipeline._dask.is_dask_array): a read into memory,
    # validation, task resolution, the scene statistics of NumPy data, a fusion of NumPy data and
    # its GeoTIFF never import dask.array themselves
    loaded = _child(
        "import json, sys; import numpy as np; "
        "import stf_pipeline.cube, stf_pipeline.task, stf_pipeline._ingest, stf_pipeline.kernels.stats as st; "
        "import stf_pipeline.catalog, stf_pipeline.fusion, stf_pipeline.parallel, stf_pipeline._export; "
        "from stf_pipeline._dask import is_dask_array; "
        "std = st.class_std_summary(np.ones((2, 3, 4, 4))); "
        "print(json.dumps([is_dask_array(np.ones(2)), 'dask.array' in sys.modules, std.shape == (2, 3)]))"
    )
    assert loaded == [False, False, True]


def _write_envi(path: Path, data: np.ndarray) -> Path:
    """An ENVI BSQ int16 file without georeferencing (the classic sample data sets' format)."""
    data.astype("<i2").tofile(path)
    path.with_name(path.name + ".hdr").write_text(
        f"ENVI\nsamples = {data.shape[2]}\nlines = {data.shape[1]}\nbands = {data.shape[0]}\nheader offset = 0\n"
        "file type = ENVI Standard\ndata type = 2\ninterleave = bsq\nbyte order = 0\n"
    )
    return path


def test_a_one_shot_fusion_of_files_read_into_memory_imports_no_rioxarray(tmp_path: Path) -> None:
    # ENVI files (as zhu_estarfm) read into memory, fused with ESTARFM and saved as a GeoTIFF: rasterio
    # reads and writes them, rioxarray (and pyproj) are never imported. dask.array still is, by xarray
    # itself: it imports it to recognise Dask data when it first wraps a NumPy array in a Variable
    rng = np.random.default_rng(0)
    fine = {d: _write_envi(tmp_path / f"tm{d}", rng.integers(500, 3000, (3, 16, 16))) for d in ("0524", "0812")}
    coarse = {
        d: _write_envi(tmp_path / f"modis{d}", rng.integers(500, 3000, (3, 4, 4))) for d in ("0524", "0711", "0812")
    }
    loaded = _child(
        "import json, sys; import stf_pipeline as stf; from stf_pipeline.sensors import Sensor; "
        "bands = ('green', 'red', 'nir'); "
        f"fine = {{'2001-05-24': {str(fine['0524'])!r}, '2001-08-12': {str(fine['0812'])!r}}}; "
        f"coarse = {{'2001-05-24': {str(coarse['0524'])!r}, '2001-07-11': {str(coarse['0711'])!r}, "
        f"'2001-08-12': {str(coarse['0812'])!r}}}; "
        "cube = stf.ingest(fine, coarse, bands=list(bands), fine_sensor=Sensor('tm', bands, scale=1e-4), "
        "coarse_sensor=Sensor('modis', bands, scale=1e-4), chunks=None); "
        "pred = stf.fuse(cube, '2001-07-11', method='estarfm', half_window=3); "
        f"pred.stf.to_geotiff({str(tmp_path / 'fused.tif')!r}, crs='EPSG:32650'); "
        "print(json.dumps([m for m in ('rioxarray', 'pyproj', 'jax') if m in sys.modules]))",
        JAX_PLATFORMS="cpu",
    )
    assert loaded == []
    assert (tmp_path / "fused.tif").is_file()


def test_rio_imports_rioxarray_on_first_use() -> None:
    # cubes keep their .rio after the package stopped importing rioxarray to read files; importing
    # rioxarray afterwards replaces the placeholder without xarray's accessor warning (-W error)
    code = (
        "import json, sys, warnings; warnings.simplefilter('error'); import xarray as xr; import stf_pipeline; "
        "before = 'rioxarray' in sys.modules; crs = xr.Dataset().rio.crs; "
        "print(json.dumps([before, crs, 'rioxarray' in sys.modules, type(xr.DataArray([1.0]).rio).__module__]))"
    )
    assert _child(code) == [False, None, True, "rioxarray.raster_array"]
    later = _child(
        "import json, sys, warnings; warnings.simplefilter('error'); import xarray as xr; import stf_pipeline; "
        "import rioxarray; print(json.dumps(type(xr.Dataset().rio).__module__))"
    )
    assert later == "rioxarray.raster_dataset"


def test_is_dask_array_recognises_dask_arrays() -> None:
    da = pytest.importorskip("dask.array")
    from stf_pipeline._dask import is_dask_array

    assert is_dask_array(da.zeros(3)) and not is_dask_array(np.zeros(3)) and not is_dask_array([1.0])


def test_the_stf_command_leaves_jax_and_matplotlib_for_later() -> None:
    # stf's main() sets JAX_COMPILATION_CACHE_DIR, which JAX reads when it is imported, so the command's
    # own (top-level) imports must not import JAX; Matplotlib is imported only when figures are drawn
    loaded = _child(
        "import json, sys; import stf_pipeline.cli as cli; cli.build_parser(); "
        "print(json.dumps([m for m in ('jax', 'matplotlib') if m in sys.modules]))"
    )
    assert loaded == []


def test_the_stf_command_freezes_its_objects_only_as_the_process(tmp_path: Path) -> None:
    # the console script (no argv) spares the interpreter's final collections; main(argv) called from
    # Python (tests, notebooks) leaves the collector as it was
    missing = str(tmp_path / "missing.zarr")
    result = _child(
        "import gc, json, sys; import stf_pipeline.cli as cli; "
        f"code = cli.main(['info', {missing!r}]); frozen = gc.get_freeze_count(); "
        f"sys.argv = ['stf', 'info', {missing!r}]; process_code = cli.main(); "
        "print(json.dumps([code, frozen, process_code, gc.get_freeze_count() > 0]))"
    )
    assert result == [EXIT_ERROR, 0, EXIT_ERROR, True]


def test_numba_fusion_on_cpu_never_imports_jax() -> None:
    # a CPU-only JAX (no accelerator plugin) is not imported to learn that the device is a CPU
    result = _child(
        "import json, sys; import numpy as np; import stf_pipeline as stf; "
        "cube = stf.synthetic_scene(40, 40, n_times=3, seed=0, fine_times=[0, 2]).load(); "
        "pred = stf.fuse(cube, cube.time.values[1], method='estarfm', half_window=5); "
        "print(json.dumps({'backend': pred.attrs['backend'], 'jax': 'jax' in sys.modules, "
        "'finite': bool(np.isfinite(pred.values).any())}))",
        JAX_PLATFORMS="cpu",
    )
    assert result == {"backend": "numba", "jax": False, "finite": True}


@pytest.mark.parametrize(
    ("platforms", "expected"), [("cpu", False), ("cuda", True), ("cpu,cuda", True), (" cpu ", False)]
)
def test_jax_platforms_decide_whether_an_accelerator_is_possible(
    monkeypatch: pytest.MonkeyPatch, platforms: str, expected: bool
) -> None:
    monkeypatch.delitem(sys.modules, "jax", raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert _base._accelerator_possible() is expected


def test_an_installed_jax_plugin_makes_an_accelerator_possible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "jax", raising=False)
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    found = {"jax_plugins": object()}
    monkeypatch.setattr(_base.importlib.util, "find_spec", lambda name: found.get(name))
    _base._plugin_installed.cache_clear()
    assert _base._accelerator_possible() is True
    found.clear()
    scans = []
    monkeypatch.setattr(_base.importlib.metadata, "entry_points", lambda group: scans.append(group) or [])
    _base._plugin_installed.cache_clear()
    assert _base._accelerator_possible() is False
    assert _base._accelerator_possible() is False
    assert scans == ["jax_plugins"]  # the installed distributions are scanned once per process
    _base._plugin_installed.cache_clear()


def test_device_kind_asks_jax_once_it_is_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    jax = pytest.importorskip("jax")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert "jax" in sys.modules
    assert _base.device_kind() == ("cpu" if jax.default_backend() == "cpu" else "gpu")


def _compiled_kernels() -> dict[str, Dispatcher]:
    """Every Numba dispatcher defined in a module of the package that imports Numba."""
    found: dict[str, Dispatcher] = {}
    for info in pkgutil.walk_packages(stf_pipeline.__path__, "stf_pipeline."):
        spec = importlib.util.find_spec(info.name)
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            continue
        if "import numba" not in Path(spec.origin).read_text():
            continue
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if isinstance(value, Dispatcher) and value.py_func.__module__ == module.__name__:
                found[f"{module.__name__}.{name}"] = value
    return found


def test_every_compiled_kernel_is_cached_on_disk() -> None:
    kernels = _compiled_kernels()
    # the window sums, statistics and the kernels of STARFM, ESTARFM and FSDAF
    assert len(kernels) >= 12, sorted(kernels)
    uncached = sorted(name for name, kernel in kernels.items() if isinstance(kernel._cache, NullCache))
    assert uncached == [], f"add cache=True to the @numba.njit of {uncached}"
    for name, kernel in kernels.items():
        # the locator numba chose (next to the source, else the user cache dir or $NUMBA_CACHE_DIR) is usable
        locator = kernel._cache._impl.locator
        locator.ensure_cache_path()
        assert os.access(kernel._cache.cache_path, os.W_OK), name


@pytest.mark.slow  # compiles the ESTARFM kernels from nothing (about 10 CPU-s)
def test_cache_dir_override_is_used(tmp_path: Path) -> None:
    # $NUMBA_CACHE_DIR (for a read-only install) receives the compiled kernels of a fusion
    _child(
        "import json; import stf_pipeline as stf; "
        "cube = stf.synthetic_scene(30, 30, n_times=3, seed=0, fine_times=[0, 2]).load(); "
        "stf.fuse(cube, cube.time.values[1], method='estarfm', backend='numba', half_window=5); print('{}')",
        NUMBA_CACHE_DIR=str(tmp_path),
        JAX_PLATFORMS="cpu",
    )
    cached = {p.name.split("-")[0] for p in tmp_path.rglob("*.nbi")}
    assert {"numba._estarfm_rows", "numba._estarfm_finish_rows", "window._box_sum_3d"} <= cached, cached
    assert numba.config.CACHE_DIR != str(tmp_path)  # the child's setting did not leak here


def test_estarfm_kernels_warmed_in_the_background_compile_once(tmp_path: Path) -> None:
    """The background warm-up (``kernels.pool.compile_ahead``) compiles the same signatures as the
    fusion's own calls: with an empty disk cache every ESTARFM kernel ends with one signature."""
    code = (
        "import json; import numpy as np; import stf_pipeline as stf; "
        "from stf_pipeline.testing import random_cube; "
        "from stf_pipeline.kernels import pool, stats, window; from stf_pipeline.methods.estarfm import numba as nb; "
        "cube = random_cube(n_times=3, height=40, width=40, bands=('red', 'nir', 'swir1'), seed=3); "
        "t = cube.time.values; "
        "pred = stf.fuse(cube, t[1], method='estarfm', pairs=[t[0], t[2]], backend='numba', half_window=5); "
        "kernels = [stats._plane_std, nb._correlation_rows, nb._estarfm_rows, window._box_sum_3d, "
        "nb._estarfm_finish_rows]; "
        "print(json.dumps(['estarfm' in pool._WARMED, bool(np.isfinite(pred.values).any()), "
        "[len(k.signatures) for k in kernels]]))"
    )
    assert _child(code, NUMBA_CACHE_DIR=str(tmp_path / "numba")) == [True, True, [1, 1, 1, 1, 1]]


def test_a_child_process_compiles_the_estarfm_prediction_kernels_into_the_disk_cache(tmp_path: Path) -> None:
    """``warm_prediction`` (what ``compile_in_child`` runs) leaves both prediction kernels in the
    cache another process then finds, and only those: the window sums are left to the caller."""
    code = (
        "import json; from stf_pipeline.kernels.pool import in_disk_cache; "
        "from stf_pipeline.methods.estarfm import core, numba as nb; {run}"
        "print(json.dumps([in_disk_cache(k) for k in (*core.PREDICTION_KERNELS, nb._estarfm_rows)]))"
    )
    cache = str(tmp_path / "numba")
    assert _child(code.format(run=""), NUMBA_CACHE_DIR=cache) == [False, False, False]
    assert _child(code.format(run="core.warm_prediction(); "), NUMBA_CACHE_DIR=cache) == [True, True, False]
    assert _child(code.format(run=""), NUMBA_CACHE_DIR=cache) == [True, True, False]


def test_compile_in_child_starts_one_child_and_only_with_a_cold_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    from stf_pipeline.kernels import pool

    started = []

    class Child:
        def __init__(self, command: list[str], **kwargs: object) -> None:
            started.append(command)

        def wait(self) -> int:
            return 0

    monkeypatch.setattr(pool.subprocess, "Popen", Child)
    monkeypatch.setattr(pool, "in_disk_cache", lambda kernel: kernel == "cached")
    monkeypatch.setattr(pool, "_WARMED", set())
    pool.compile_in_child("warm", "some.module:warm", ["cached", "cached"])
    assert started == []
    pool.compile_in_child("cold", "some.module:warm", ["cached", "not cached"])
    pool.compile_in_child("cold", "some.module:warm", ["not cached"])  # once per process and name
    assert started == [[sys.executable, "-c", "import some.module as m; m.warm()"]]
