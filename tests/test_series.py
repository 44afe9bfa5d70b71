"""fuse_series: the fused cube equals per-date fuse, resumes after a kill, never clobbers foreign paths."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import dask
import numpy as np
import pytest

import stf_pipeline as stf
from stf_pipeline import series, store
from stf_pipeline.testing import random_cube, tree_bytes

CHUNKS = (16, 16)


def gappy_cube(**kwargs):
    """5 dates; fine missing (all NaN) on dates 1 and 3, the coarse-only dates."""
    cube = random_cube(n_times=5, height=40, width=48, **kwargs)
    fine = cube["fine"].values.copy()
    fine[[1, 3]] = np.nan
    fine[0, :, :3, :5] = np.nan  # some nodata in an observed image
    fine[2, :, 16:32, 16:32] = np.nan  # a whole all-NaN region (chunk) of an observed image
    return stf.make_cube(
        fine, cube["coarse"].values, time=cube.time.values, band=cube.band.values, y=cube.y.values,
        x=cube.x.values, crs="EPSG:32633", coarse_factor=cube.attrs["coarse_factor"],
    )




@pytest.mark.parametrize("backend", ["numpy", "dask"])
def test_series_equals_fuse_per_date(tmp_path, backend):
    cube = gappy_cube()
    if backend == "dask":
        cube = cube.chunk({"time": 1, "y": 24, "x": 24})
    out = stf.fuse_series(cube, method="delta", out=tmp_path / "f.zarr", chunks=CHUNKS, progress=False)
    assert out.attrs["stf_series_complete"] is True
    assert out.encoding["stf_action"] == "fused"
    assert out.source.values.tolist() == ["observed", "fused", "observed", "fused", "observed"]
    np.testing.assert_array_equal(out.time.values, cube.time.values)
    for i, date in enumerate(cube.time.values):
        if i in (1, 3):
            expected = stf.fuse(cube.compute(), date, method="delta").values
        else:
            expected = cube["fine"].isel(time=i).values
        np.testing.assert_array_equal(out["fine"].isel(time=i).values, expected)
    # the store holds the fused variable and its provenance, not copies of the inputs
    assert sorted(out.data_vars) == ["fine", "fusion_method", "fusion_pairs", "model_digest", "source"]
    assert out.fusion_method.values.tolist() == ["", "delta", "", "delta", ""]
    assert out.fusion_pairs.values.tolist()[1] == "2020-03-01,2020-04-02"
    assert set(out.model_digest.values.tolist()) == {""}
    assert out.rio.crs.to_epsg() == 32633
    assert out["fine"].encoding["chunks"] == (1, 2, *CHUNKS)
    assert not (tmp_path / "f.zarr" / series.PROGRESS_DIR).exists()
    assert out.attrs["stf_method"] == "delta"
    assert '"2020-03-17": ["2020-03-01", "2020-04-02"]' in out.attrs["stf_tasks"]
    stf.validate_cube(out)
    reopened = stf.open_cube(tmp_path / "f.zarr")
    np.testing.assert_array_equal(reopened.coarse_valid.values, np.ones(5))
    # what the user asks to keep is copied at every output date
    kept = stf.fuse_series(
        cube, method="delta", out=tmp_path / "k.zarr", chunks=CHUNKS, progress=False, keep=("coarse",)
    )
    np.testing.assert_array_equal(kept["coarse"].values, cube["coarse"].values)
    np.testing.assert_array_equal(kept["fine"].values, out["fine"].values)
    with pytest.raises(stf.CubeError, match="no data variable 'fine_truth'"):
        stf.fuse_series(cube, method="delta", out=tmp_path / "t.zarr", progress=False, keep=("fine_truth",))
    with pytest.raises(stf.CubeError, match="cannot be kept"):
        stf.fuse_series(cube, method="delta", out=tmp_path / "t.zarr", progress=False, keep=("qa",))


def test_targets_pairs_and_dates_of_any_type(tmp_path):
    import pandas as pd

    cube = gappy_cube()
    times = cube.time.values
    out = stf.fuse_series(
        cube, method="delta", out=tmp_path / "f.zarr", chunks=CHUNKS, progress=False,
        targets=[str(times[1])[:10], pd.Timestamp(times[2])],  # a date with fine data can be a target
        pairs={np.datetime64(times[1], "D"): [times[0]], str(times[2])[:10]: [times[0], times[4]]},
        window=3,
    )
    assert out.source.values.tolist() == ["observed", "fused", "fused", "observed"]
    np.testing.assert_array_equal(out.time.values, times[[0, 1, 2, 4]])
    ref = stf.fuse(cube, times[2], method="delta", pairs=[times[0], times[4]], window=3)
    np.testing.assert_array_equal(out["fine"].sel(time=times[2]).values, ref.values)
    ref = stf.fuse(cube, times[1], method="delta", pairs=[times[0]])
    np.testing.assert_array_equal(out["fine"].sel(time=times[1]).values, ref.values)
    assert '"window": 3' in out.attrs["stf_params"]


def test_bad_targets_fail_before_any_write(tmp_path):
    cube = gappy_cube()
    coarse = cube["coarse"].values.copy()
    coarse[3] = np.nan
    broken = cube.copy(data={"fine": cube["fine"].values, "coarse": coarse})
    with pytest.raises(stf.TaskError, match="all NaN"):
        stf.fuse_series(broken, method="delta", out=tmp_path / "a.zarr", targets=[cube.time.values[3]])
    with pytest.raises(stf.TaskError, match="pair"):
        stf.fuse_series(cube, method="delta", out=tmp_path / "a.zarr", targets=[cube.time.values[1]],
                        pairs=[cube.time.values[3]])
    full = random_cube(n_times=3)
    with pytest.raises(stf.TaskError, match="no coarse-only date"):
        stf.fuse_series(full, method="delta", out=tmp_path / "a.zarr")
    with pytest.raises(stf.MethodError, match="unknown parameter"):
        stf.fuse_series(cube, method="delta", out=tmp_path / "a.zarr", windw=3)
    assert not (tmp_path / "a.zarr").exists()


def test_foreign_paths_are_never_touched(tmp_path):
    cube = gappy_cube()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    plain_file = tmp_path / "file.zarr"
    plain_file.write_text("x")
    for path in (foreign, plain_file):
        for overwrite in (False, True):
            with pytest.raises(stf.StoreError, match="not a stf_pipeline store"):
                stf.fuse_series(cube, method="delta", out=path, overwrite=overwrite, progress=False)
    assert (foreign / "notes.txt").read_text() == "precious"
    assert plain_file.read_text() == "x"
    # a zarr store that is not ours is refused as well
    cube.to_zarr(tmp_path / "other.zarr", zarr_format=2)
    with pytest.raises(stf.StoreError, match="not a stf_pipeline store"):
        stf.fuse_series(cube, method="delta", out=tmp_path / "other.zarr", overwrite=True, progress=False)


def test_existing_stores_rerun_refuse_or_overwrite(tmp_path, monkeypatch):
    cube = gappy_cube()
    path = tmp_path / "f.zarr"
    stf.fuse_series(cube, method="delta", out=path, chunks=CHUNKS, progress=False)
    before = tree_bytes(path)
    # same request on a complete store (overwrite or not): nothing fused again, store unchanged
    with monkeypatch.context() as m:
        _forbid_fusing(m)
        stf.fuse_series(cube, method="delta", out=path, chunks=CHUNKS, progress=False)
        stf.fuse_series(cube, method="delta", out=path, chunks=CHUNKS, progress=False, overwrite=True)
    assert tree_bytes(path) == before
    # other input data on the same grid and dates is another request, wherever the change is
    fine = cube["fine"].values.copy()
    fine[4, 1, 39, 47] += 0.01  # one pixel of the last observed date, far from the top-left corner
    changed = cube.copy(data={"fine": fine, "coarse": cube["coarse"].values})
    for other in (changed, changed.chunk({"y": 16})):
        with pytest.raises(stf.StoreError, match=r"the input data changed\. Pass overwrite=True \(--overwrite\)"):
            stf.fuse_series(other, method="delta", out=path, chunks=CHUNKS, progress=False)
    # the same data, rewritten to a new store and opened lazily, is the same request
    stf.write_cube(cube, tmp_path / "input.zarr", chunks={"y": 24, "x": 24})
    lazy = stf.open_cube(tmp_path / "input.zarr")
    with monkeypatch.context() as m:
        _forbid_fusing(m)
        again = stf.fuse_series(lazy, method="delta", out=path, chunks=CHUNKS, progress=False)
    assert again.encoding["stf_action"] == "reused"
    with pytest.raises(stf.StoreError, match="the method or parameters changed"):
        stf.fuse_series(cube, method="delta", out=path, chunks=CHUNKS, progress=False, window=3)
    assert tree_bytes(path) == before
    out = stf.fuse_series(cube, method="delta", out=path, chunks=CHUNKS, progress=False, window=3, overwrite=True)
    assert '"window": 3' in out.attrs["stf_params"]
    # a cube store written by write_cube is ours: refused without overwrite, replaced with it
    stf.write_cube(cube, tmp_path / "c.zarr")
    with pytest.raises(stf.StoreError):
        stf.fuse_series(cube, method="delta", out=tmp_path / "c.zarr", progress=False)
    stf.fuse_series(cube, method="delta", out=tmp_path / "c.zarr", progress=False, overwrite=True, chunks=CHUNKS)


def _forbid_fusing(monkeypatch):
    """Make any fusion or region write fail (the fingerprint of the inputs is still computed)."""

    def fail(*args, **kwargs):
        raise AssertionError("a complete store was fused again")

    monkeypatch.setattr(series, "prepare_fusion", fail)
    monkeypatch.setattr(series, "_write_region", fail)


class _Crash(Exception):
    pass


def crash_after(monkeypatch, n: int) -> list:
    """Make the region write after ``n`` successful ones raise ``_Crash``; returns the list that
    records the written regions' ``(variable, date, y block, x block)``."""
    original = series._write_region
    calls: list = []

    def crashing(*args, **kwargs):
        if len(calls) == n:
            raise _Crash
        calls.append(args[2:6])
        return original(*args, **kwargs)

    monkeypatch.setattr(series, "_write_region", crashing)
    return calls


def test_interrupted_run_resumes_without_recomputing(tmp_path, monkeypatch):
    cube = gappy_cube()
    reference = tmp_path / "ref.zarr"
    stf.fuse_series(cube, method="delta", out=reference, chunks=CHUNKS, progress=False)
    n_regions = 5 * 3 * 3  # dates x y blocks x x blocks of 'fine'

    original = series._write_region
    calls = crash_after(monkeypatch, 17)
    path = tmp_path / "f.zarr"
    with dask.config.set(scheduler="synchronous"), pytest.raises(_Crash):
        stf.fuse_series(cube, method="delta", out=path, chunks=CHUNKS, progress=False)
    assert not series._zarr_group(path).attrs["stf_series_complete"]
    assert len(os.listdir(path / series.PROGRESS_DIR)) == 17
    # an unfinished store is not a cube yet
    with pytest.raises(stf.CubeError, match="not finished yet.*rerun stf.fuse_series"):
        stf.open_cube(path)

    calls.clear()
    monkeypatch.setattr(series, "_write_region", lambda *a: (calls.append(a[2:6]), original(*a)))
    stf.fuse_series(cube, method="delta", out=path, chunks=CHUNKS, progress=False)
    assert len(calls) == n_regions - 17  # written regions are not recomputed
    assert tree_bytes(path) == tree_bytes(reference)

    # killed while finalizing (marked complete, record not yet removed): the next call finishes it
    (path / series.PROGRESS_DIR).mkdir()
    stf.fuse_series(cube, method="delta", out=path, chunks=CHUNKS, progress=False)
    assert tree_bytes(path) == tree_bytes(reference)


_KILLED_RUN = textwrap.dedent(
    """
    import sys, time
    import dask, numpy as np
    import stf_pipeline as stf
    from stf_pipeline import series, store
    sys.path.insert(0, {tests!r})
    from test_series import gappy_cube

    original = series._write_region

    def slow(*args):
        time.sleep(0.03)
        return original(*args)

    series._write_region = slow
    with dask.config.set(scheduler="threads", num_workers=2):
        stf.fuse_series(gappy_cube(), method="delta", out={out!r}, chunks=(16, 16), progress=False)
    """
)


def test_killed_subprocess_resumes_to_the_same_store(tmp_path):
    cube = gappy_cube()
    reference = tmp_path / "ref.zarr"
    stf.fuse_series(cube, method="delta", out=reference, chunks=CHUNKS, progress=False)
    path = tmp_path / "f.zarr"
    script = _KILLED_RUN.format(tests=str(Path(__file__).parent), out=str(path))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
    progress = path / series.PROGRESS_DIR
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if progress.is_dir() and len(os.listdir(progress)) >= 6:
            break
        time.sleep(0.005)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    done = len(os.listdir(progress))
    assert 6 <= done < 90
    assert not series._zarr_group(path).attrs["stf_series_complete"]
    stf.fuse_series(cube, method="delta", out=path, chunks=CHUNKS, progress=False)
    assert tree_bytes(path) == tree_bytes(reference)


@pytest.mark.slow
def test_learned_method_trains_once_beside_the_store_and_resume_reuses_it(tmp_path, monkeypatch, caplog):
    import logging

    cube = random_cube(n_times=5, height=48, width=48)
    fine = cube["fine"].values.copy()
    fine[[1, 3]] = np.nan
    cube = cube.copy(data={"fine": fine, "coarse": cube["coarse"].values})
    path = tmp_path / "f.zarr"
    model_dir = tmp_path / "f.model"  # the default: beside the store, not inside it
    options = {"config": "tiny"}

    original = series._write_region

    def crashing(*args):
        if args[2] == "fine" and args[3] == 3:
            raise _Crash
        return original(*args)

    monkeypatch.setattr(series, "_write_region", crashing)
    with dask.config.set(scheduler="synchronous"), pytest.raises(_Crash):
        stf.fuse_series(cube, method="biastf", out=path, chunks=(32, 32), progress=False, train_options=options)
    checkpoints = _file_stamps(model_dir, "stage*/**/*")
    assert checkpoints and (model_dir / "loss_curves.png").is_file()
    assert not [p for p in path.iterdir() if "train" in p.name]
    monkeypatch.setattr(series, "_write_region", original)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = stf.fuse_series(cube, method="biastf", out=path, chunks=(32, 32), progress=False, train_options=options)
    assert not [w for w in caught if "not recognized" in str(w.message)]
    assert _file_stamps(model_dir, "stage*/**/*") == checkpoints  # restored, not trained again
    model = stf.load_model(model_dir / "model")
    digest = store.model_digest(model)
    assert out.model_digest.values.tolist() == ["", digest, "", digest, ""]
    for date in cube.time.values[[1, 3]]:
        ref = stf.fuse(cube, date, method="biastf", model=model)
        np.testing.assert_array_equal(out["fine"].sel(time=date).values, ref.values)
    with caplog.at_level(logging.INFO, logger="stf_pipeline"):
        again = stf.fuse_series(cube, method="biastf", out=path, chunks=(32, 32), progress=False, train_options=options)
    assert again.encoding["stf_action"] == "reused" and f"reusing {path}" in caplog.text
    # other training options: the store and the model directory belong to another request
    other = {"config": "tiny", "seed": 1}
    with pytest.raises(stf.StoreError, match=r"the method or parameters changed\. Pass overwrite=True"):
        stf.fuse_series(cube, method="biastf", out=path, chunks=(32, 32), progress=False, train_options=other)
    with pytest.raises(stf.StoreError, match="holds a model trained for another request"):
        stf.fuse_series(cube, method="biastf", out=tmp_path / "g.zarr", model_dir=model_dir, chunks=(32, 32),
                        progress=False, train_options=other)


def _file_stamps(root: Path, pattern: str) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.glob(pattern) if p.is_file()
    }


def test_tiles_computed_one_after_the_other_give_the_same_store(tmp_path, monkeypatch):
    cube = gappy_cube()
    reference = tmp_path / "ref.zarr"
    stf.fuse_series(cube, method="delta", out=reference, chunks=CHUNKS, progress=False, window=5)
    monkeypatch.setattr(series, "tile_blocks", lambda: 1)  # 3 x 3 tiles of one chunk each, each with halo strips
    batches = []
    original = series._compute
    monkeypatch.setattr(series, "_compute", lambda b, **kw: (batches.append(len(b)), original(b, **kw)))
    stf.fuse_series(cube, method="delta", out=tmp_path / "f.zarr", chunks=CHUNKS, progress=False, window=5)
    assert batches == [5 * 9]
    assert tree_bytes(tmp_path / "f.zarr") == tree_bytes(reference)


@pytest.mark.parametrize(
    ("method", "params", "factor"),
    [
        ("starfm", {"radius": 3}, 8),
        ("fsdaf", {"half_window": 4, "unmix_radius": 1, "tps_radius": 1, "n_classes": 3}, 4),
    ],
)
def test_tiles_with_halo_strips_equal_one_unchunked_fuse(tmp_path, monkeypatch, method, params, factor):
    """Tiles of one chunk, each fused from its window (the chunk and a halo strip each side), with
    the scene statistics computed once per date, give the unchunked prediction bit for bit (for
    FSDAF the blocks and strips also start on the coarse grid)."""
    from stf_pipeline import fusion

    base = random_cube(n_times=3, height=64, width=80, coarse_factor=factor, seed=3)
    cube = stf.make_cube(
        np.where(np.arange(3)[:, None, None, None] == 1, np.nan, base["fine"].values), base["coarse"].values,
        time=base.time.values, band=base.band.values, y=base.y.values, x=base.x.values, crs="EPSG:32633",
        coarse_factor=factor,
    ).chunk({"time": 1, "y": 32, "x": 32})
    monkeypatch.setattr(series, "tile_blocks", lambda: 1)
    statistics = []
    original = fusion.FusionCall.with_scene_statistics
    monkeypatch.setattr(
        fusion.FusionCall, "with_scene_statistics", lambda self, c: (statistics.append(1), original(self, c))[1]
    )
    out = stf.fuse_series(cube, method=method, out=tmp_path / "f.zarr", chunks=CHUNKS, progress=False, **params)
    assert statistics == [1]  # one fused date, 4 x 5 tiles
    target = cube.time.values[1]
    expected = stf.fuse(cube.compute(), target, method=method, **params)
    np.testing.assert_array_equal(out["fine"].sel(time=target).values, expected.values)


def test_tile_side_follows_the_worker_count():
    """About two compute blocks per worker thread in a tile, at least 2 x 2."""
    with dask.config.set(scheduler="threads", num_workers=2):
        assert series.tile_blocks() == 2
    with dask.config.set(scheduler="threads", num_workers=8):
        assert series.tile_blocks() == 4
    with dask.config.set(scheduler="threads", num_workers=32):
        assert series.tile_blocks() == 8
    with dask.config.set(scheduler="sync"):
        assert series.tile_blocks() == 2


def test_backend_is_part_of_the_request(tmp_path, monkeypatch):
    """A store begun with one backend is not resumed with another (they agree only to a
    tolerance); ``auto`` is the same request as the backend it resolves to."""
    cube = gappy_cube()
    auto = stf.get_method("starfm").resolve_backend("auto")
    other = "numba" if auto == "numpy" else "numpy"
    path = tmp_path / "f.zarr"
    original = series._write_region
    crash_after(monkeypatch, 5)
    with dask.config.set(scheduler="synchronous"), pytest.raises(_Crash):
        stf.fuse_series(cube, method="starfm", out=path, chunks=CHUNKS, progress=False, radius=4, backend=auto)
    monkeypatch.setattr(series, "_write_region", original)
    partial = tree_bytes(path)
    with pytest.raises(stf.StoreError, match="the method or parameters changed"):
        stf.fuse_series(cube, method="starfm", out=path, chunks=CHUNKS, progress=False, radius=4, backend=other)
    assert tree_bytes(path) == partial
    resumed = stf.fuse_series(cube, method="starfm", out=path, chunks=CHUNKS, progress=False, radius=4)  # auto
    assert resumed.encoding["stf_action"] == "resumed"
    with monkeypatch.context() as m:
        _forbid_fusing(m)
        again = stf.fuse_series(cube, method="starfm", out=path, chunks=CHUNKS, progress=False, radius=4, backend=auto)
    assert again.encoding["stf_action"] == "reused"


def test_fusing_a_fused_store_names_the_missing_coarse(tmp_path):
    cube = gappy_cube()
    target = cube.time.values[1]
    fused = stf.fuse_series(cube, method="delta", out=tmp_path / "f.zarr", chunks=CHUNKS, progress=False)
    hint = r"needs the data variable 'coarse'.*a fused store: fuse from the input cube, or .*keep=\('coarse',\)"
    for store_cube in (fused, stf.open_cube(tmp_path / "f.zarr")):
        with pytest.raises(stf.CubeError, match="stf.fuse " + hint):
            stf.fuse(store_cube, target, method="delta")
    with pytest.raises(stf.CubeError, match="stf.fuse_series " + hint):
        stf.fuse_series(fused, method="delta", out=tmp_path / "g.zarr", progress=False)
    assert not (tmp_path / "g.zarr").exists()
    # the remedy works: a store that keeps 'coarse' fuses like the input cube
    kept = stf.fuse_series(
        cube, method="delta", out=tmp_path / "k.zarr", chunks=CHUNKS, progress=False, keep=("coarse",)
    )
    pairs = [cube.time.values[0], cube.time.values[2]]
    expected = stf.fuse(cube, target, method="delta", pairs=pairs).values
    np.testing.assert_array_equal(stf.fuse(kept, target, method="delta", pairs=pairs).values, expected)


def test_fused_store_is_cf_georeferenced_and_resumes(tmp_path, monkeypatch):
    import json

    import xarray as xr

    cube = gappy_cube()
    path = tmp_path / "f.zarr"
    fused = stf.fuse_series(cube, method="delta", out=path, chunks=CHUNKS, progress=False, keep=("coarse",))
    for name in ("fine", "coarse"):
        assert json.loads((path / name / "zarr.json").read_text())["attributes"]["grid_mapping"] == "spatial_ref"
    x_attrs = json.loads((path / "x" / "zarr.json").read_text())["attributes"]
    assert x_attrs["standard_name"] == "projection_x_coordinate" and "_FillValue" not in x_attrs
    opened = xr.open_zarr(path)
    assert opened.fine.attrs["grid_mapping"] == "spatial_ref"
    assert opened.y.attrs["standard_name"] == "projection_y_coordinate"
    assert opened.fine.rio.crs.to_epsg() == 32633
    assert opened.fine.rio.transform() == cube.fine.rio.transform()
    # the metadata is not part of the request: the same call reuses the store
    with monkeypatch.context() as m:
        _forbid_fusing(m)
        again = stf.fuse_series(cube, method="delta", out=path, chunks=CHUNKS, progress=False, keep=("coarse",))
    assert again.encoding["stf_action"] == "reused"
    assert fused.fine.encoding["grid_mapping"] == "spatial_ref"  # open_cube decodes it as rioxarray does


@pytest.mark.parametrize("method", ["starfm", "delta"])
def test_dates_fused_from_the_same_pairs_share_their_statistics(tmp_path, monkeypatch, method):
    # STARFM's scene statistics (the std of the pair fine images) do not read the target: the two
    # dates fused from the same pairs compute them once, and each still equals its own stf.fuse
    from stf_pipeline import fusion

    base = random_cube(n_times=4, height=48, width=48, coarse_factor=8, seed=5)
    fine = np.where(np.isin(np.arange(4), [1, 2])[:, None, None, None], np.nan, base["fine"].values)
    cube = stf.make_cube(
        fine, base["coarse"].values, time=base.time.values, band=base.band.values, y=base.y.values,
        x=base.x.values, crs="EPSG:32633", coarse_factor=8,
    )
    statistics = []
    original = fusion.FusionCall.with_scene_statistics
    monkeypatch.setattr(
        fusion.FusionCall, "with_scene_statistics", lambda self, c: (statistics.append(1), original(self, c))[1]
    )
    params = {"radius": 3} if method == "starfm" else {}
    out = stf.fuse_series(cube, method=method, out=tmp_path / "f.zarr", chunks=CHUNKS, progress=False, **params)
    assert out.source.values.tolist() == ["observed", "fused", "fused", "observed"]
    assert len(statistics) == (1 if method == "starfm" else 2)  # delta has none: each call is its own
    for target in cube.time.values[1:3]:
        expected = stf.fuse(cube, target, method=method, **params)
        np.testing.assert_array_equal(out["fine"].sel(time=target).values, expected.values)


class _CountingDates:
    """An array read lazily (``dask.array.from_array``) that counts the reads of each date (axis 0)."""

    def __init__(self, values):
        self.values, self.shape, self.dtype, self.ndim = values, values.shape, values.dtype, values.ndim
        self.reads = np.zeros(values.shape[0], dtype=int)

    def __getitem__(self, key):
        np.add.at(self.reads, np.arange(self.shape[0])[key[0]], 1)
        return self.values[key]


def test_dates_fused_from_the_same_pairs_read_the_pairs_once_per_tile(tmp_path, monkeypatch):
    # four dates fused from the same two pairs share one batch per tile: each chunk of the pairs'
    # images is read once for them (four times with one date a batch), and the store is the same
    import dask.array as da

    base = random_cube(n_times=6, height=48, width=48, coarse_factor=8, seed=6)
    fine = np.where(np.isin(np.arange(6), [1, 2, 3, 4])[:, None, None, None], np.nan, base["fine"].values)
    plain = stf.make_cube(
        fine, base["coarse"].values, time=base.time.values, band=base.band.values, y=base.y.values,
        x=base.x.values, crs="EPSG:32633", coarse_factor=8,
    )
    compute = series._compute
    reads = {}
    for per_batch in (1, 4):
        monkeypatch.setattr(series, "DATES_PER_BATCH", per_batch)
        counters = {name: _CountingDates(plain[name].values) for name in ("fine", "coarse")}
        cube = plain.copy()
        for name, counter in counters.items():
            cube[name] = plain[name].copy(data=da.from_array(counter, chunks=(1, -1, 16, 16)))

        def counted(batches, counters=counters, **kwargs):  # the reads of the fusion, not of the digest
            for counter in counters.values():
                counter.reads[:] = 0
            compute(batches, **kwargs)

        monkeypatch.setattr(series, "_compute", counted)
        stf.fuse_series(cube, method="starfm", out=tmp_path / f"{per_batch}.zarr", chunks=CHUNKS, progress=False,
                        radius=3)
        reads[per_batch] = {name: counter.reads.copy() for name, counter in counters.items()}
    pairs = [0, 5]
    np.testing.assert_array_equal(reads[1]["coarse"][pairs], 4 * reads[4]["coarse"][pairs])
    np.testing.assert_array_equal(reads[1]["coarse"][1:5], reads[4]["coarse"][1:5])  # each target once
    assert (reads[4]["fine"][pairs] < reads[1]["fine"][pairs]).all()  # (and once for the scene statistics)
    assert tree_bytes(tmp_path / "1.zarr") == tree_bytes(tmp_path / "4.zarr")
