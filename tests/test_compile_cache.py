"""JAX's persistent compilation cache: on for the Python API where the package first uses JAX (its
programs land in the folder), off with ``STF_JAX_CACHE=0``, and a folder the user set is kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stf_pipeline._compile_cache import MIN_COMPILE_SECONDS, cache_wanted, compilation_cache_dir

ROOT = Path(__file__).resolve().parents[1]

#: fuse with the jax backend in a fresh process; report the cache folder JAX uses and its files
_FUSE = (
    "import json, os; import stf_pipeline as stf; "
    "cube = stf.synthetic_scene(48, 48, n_times=3, seed=0, fine_times=[0, 2]).load(); "
    "lazy = cube.chunk({'y': 32, 'x': 32}); "
    "stf.fuse(lazy, cube.time.values[1], method='starfm', backend='jax', radius=3).compute(); "
    "import jax; folder = jax.config.jax_compilation_cache_dir; "
    "print(json.dumps({'folder': folder, "
    "'files': sorted(os.listdir(folder)) if folder and os.path.isdir(folder) else []}))"
)


def _child(code: str, **env: str) -> dict:
    # the variables the package may have set in this test process (a worker that ran other tests) stay out
    ours = ("JAX_COMPILATION_CACHE_DIR", "STF_JAX_CACHE", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
    environ = {k: v for k, v in os.environ.items() if k not in ours}
    environ.update(PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", JAX_PLATFORMS="cpu", **env)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("value", "wanted"), [("0", False), ("off", False), (" FALSE ", False), ("1", True), ("", True)]
)
def test_stf_jax_cache_variable(monkeypatch: pytest.MonkeyPatch, value: str, wanted: bool) -> None:
    monkeypatch.setenv("STF_JAX_CACHE", value)
    assert cache_wanted() is wanted


def test_cache_folder_follows_jax_and_xdg_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compilation_cache_dir() == str(tmp_path / "stf_pipeline" / "jax")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
    assert compilation_cache_dir() == str(tmp_path / "mine")


def test_python_api_fills_the_cache_and_the_opt_out_leaves_it_off(tmp_path: Path) -> None:
    # every program is written (no minimum compile time), so the tiny scene's kernels land on disk
    every = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    on = _child(_FUSE, XDG_CACHE_HOME=str(tmp_path), **every)
    assert on["folder"] == str(tmp_path / "stf_pipeline" / "jax") and on["files"]
    off = _child(_FUSE, XDG_CACHE_HOME=str(tmp_path / "other"), STF_JAX_CACHE="0", **every)
    assert off["folder"] is None and not (tmp_path / "other").exists()


#: the minimum compile time of a cached program that JAX uses after a fuse
_MINIMUM = _FUSE.replace(
    "print(json.dumps({'folder': folder, ",
    "print(json.dumps({'minimum': jax.config.jax_persistent_cache_min_compile_time_secs, 'folder': folder, ",
)


@pytest.mark.parametrize(
    ("jax_first", "folder_variable"), [(False, False), (True, False), (True, True)],
    ids=["before-jax-import", "after-jax-import", "after-jax-import-with-the-folder-variable"],
)
def test_package_caches_programs_that_compile_in_a_tenth_of_a_second(
    tmp_path: Path, jax_first: bool, folder_variable: bool
) -> None:
    # JAX's own minimum (1 s) left a scene's Pallas kernels out of the cache; a value the user sets wins.
    # With $JAX_COMPILATION_CACHE_DIR set before JAX's import (stf bench compile's processes, Dask
    # workers), JAX opens the folder itself: the package's minimum applies all the same
    code = ("import jax; jax.numpy.zeros(1).block_until_ready(); " if jax_first else "") + _MINIMUM
    folder = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "set")} if folder_variable else {}
    got = _child(code, XDG_CACHE_HOME=str(tmp_path), **folder)
    assert got["minimum"] == MIN_COMPILE_SECONDS == 0.1
    assert got["folder"] == folder.get("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "stf_pipeline" / "jax"))
    mine = _child(code, XDG_CACHE_HOME=str(tmp_path), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="5", **folder)
    assert mine["minimum"] == 5.0


def test_a_folder_the_user_configured_is_kept_with_its_minimum_and_the_environment(tmp_path: Path) -> None:
    code = f"import jax; jax.config.update('jax_compilation_cache_dir', {str(tmp_path / 'user')!r}); " + _MINIMUM
    code = code.replace("'folder': folder, ", "'folder': folder, 'env': os.environ.get('JAX_COMPILATION_CACHE_DIR'), "
                        f"'env_minimum': os.environ.get({'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'!r}), ")
    got = _child(code, XDG_CACHE_HOME=str(tmp_path))
    assert got["folder"] == str(tmp_path / "user") and got["minimum"] == 1.0  # JAX's own default
    assert got["env"] is None and got["env_minimum"] is None  # nothing for Dask workers to inherit


@pytest.mark.slow
def test_bench_compile_counts_one_program_set_per_scene_when_padded(monkeypatch: pytest.MonkeyPatch) -> None:
    from stf_pipeline.cli import load_benchmark

    measure = load_benchmark("compile").measure

    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    (record,) = measure(["starfm:jax"], 64, 24, half_window=2, unpadded=True)  # chunks 24, 24, 16: ragged
    assert record["padding"] == "nan" and record["compiled_warm"] == 0
    # without padding every block shape (first, interior, last along each axis) compiles its own programs
    assert record["compiled_unpadded"] > record["compiled_first"] > 0
