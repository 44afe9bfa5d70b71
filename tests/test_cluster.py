"""Clusters: config validation and sizing, runs on a LocalCluster equal local runs, a dying worker is survived."""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import stf_pipeline as stf
from stf_pipeline import series
from stf_pipeline.cluster import ClusterConfig, local_size, memory_limit_bytes, start_cluster
from stf_pipeline.testing import random_cube

GiB = 2**30


def test_config_from_mapping_and_validation():
    assert ClusterConfig.from_mapping(None) == ClusterConfig()
    config = ClusterConfig.from_mapping({"n_workers": 2, "memory_limit": "3GiB"})
    assert (config.n_workers, memory_limit_bytes(config.memory_limit)) == (2, 3 * GiB)
    with pytest.raises(stf.ConfigError, match=r"unknown cluster key\(s\) \['workers'\]"):
        ClusterConfig.from_mapping({"workers": 2})
    with pytest.raises(stf.ConfigError, match="positive integer"):
        ClusterConfig(n_workers=0)
    with pytest.raises(stf.ConfigError, match="positive integer"):
        ClusterConfig(threads_per_worker=True)
    with pytest.raises(stf.ConfigError, match="memory_limit"):
        ClusterConfig(memory_limit="lots")
    with pytest.raises(stf.ConfigError, match="scheduler URL"):
        ClusterConfig(address="localhost")
    with pytest.raises(stf.ConfigError, match=r"remove \['n_workers', 'gpu'\]"):
        ClusterConfig(address="tcp://10.0.0.5:8786", n_workers=2, gpu=True)
    with pytest.raises(stf.ConfigError, match="true or false"):
        ClusterConfig(gpu="yes")


def test_local_cluster_is_sized_to_the_machine():
    # this CI machine: 2 cores, 24 GiB; the workers together keep under 70 % of memory
    n, threads, limit = local_size(ClusterConfig(), cores=2, memory=24 * GiB)
    assert (n, threads) == (2, 1)
    assert n * limit <= 0.7 * 24 * GiB
    # the pause threshold (80 % of a worker's limit) caps what a 20000x20000 run holds in RAM
    assert n * limit * 0.8 < 16 * GiB
    assert local_size(ClusterConfig(threads_per_worker=4), cores=16, memory=64 * GiB)[:2] == (4, 4)
    assert local_size(ClusterConfig(memory_limit="1GiB"), cores=2, memory=24 * GiB)[2] == GiB


@pytest.mark.skipif(importlib.util.find_spec("dask_cuda") is not None, reason="dask-cuda is installed")
def test_gpu_without_dask_cuda_says_how_to_install():
    with pytest.raises(stf.ConfigError, match=r"stf_pipeline\[gpu\]"):
        with start_cluster({"gpu": True}, quiet=True):
            pass


def _cube():
    cube = random_cube(n_times=5, height=64, width=64, bands=("red", "nir", "swir1"))
    fine = cube["fine"].values.copy()
    fine[[1, 3]] = np.nan
    return cube.copy(data={"fine": fine, "coarse": cube["coarse"].values}).drop_vars(["fine_valid", "coarse_valid"])


def _files(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_existing_cluster_by_address(tmp_path, caplog):
    from distributed import LocalCluster

    caplog.set_level(logging.INFO, logger="stf_pipeline")
    cube = _cube()
    stf.fuse_series(cube, method="delta", out=tmp_path / "ref.zarr", chunks=(32, 32), progress=False)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False) as cluster:
        with start_cluster({"address": cluster.scheduler_address}) as client:
            assert client.scheduler_info()["address"] == cluster.scheduler_address

            stf.fuse_series(cube, method="delta", out=tmp_path / "f.zarr", chunks=(32, 32))
    assert f"connected to {cluster.scheduler_address}" in caplog.messages
    assert _files(tmp_path / "f.zarr") == _files(tmp_path / "ref.zarr")


def test_worker_killed_mid_run_gives_the_same_store(tmp_path):
    cube = _cube()
    chunks = (16, 16)  # 160 small regions, so the run lasts long enough to kill a worker in it
    reference = tmp_path / "ref.zarr"
    stf.fuse_series(cube, method="delta", out=reference, chunks=chunks, progress=False)
    n_regions = 2 * 5 * 4 * 4
    path = tmp_path / "f.zarr"
    config = ClusterConfig(n_workers=2, threads_per_worker=1, memory_limit="1GiB")
    with start_cluster(config, quiet=True) as client:
        pids = client.run(os.getpid)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                stf.fuse_series(cube, method="delta", out=path, chunks=chunks, progress=False)
            except BaseException as err:  # noqa: BLE001  (re-raised in the test thread)
                errors.append(err)

        thread = threading.Thread(target=run)
        thread.start()
        progress = path / series.PROGRESS_DIR
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if progress.is_dir() and len(os.listdir(progress)) >= 10:
                break
            time.sleep(0.002)
        written_at_kill = len(os.listdir(progress))
        victim = sorted(pids)[0]
        os.kill(pids[victim], signal.SIGKILL)
        thread.join(120)
        assert not thread.is_alive()
        if errors:
            raise errors[0]
        assert written_at_kill < n_regions, "the run finished before a worker could be killed"
        assert victim not in client.scheduler_info()["workers"] or client.run(os.getpid)[victim] != pids[victim]
    assert _files(path) == _files(reference)


@pytest.mark.gpu
def test_gpu_cluster_one_worker_per_gpu_gives_the_same_store(tmp_path):
    """On a GPU machine with dask-cuda: ``JAX_PLATFORMS=cuda pytest -m gpu tests/test_cluster.py``
    (the conftest defaults JAX to the CPU, and the workers inherit the environment)."""
    pytest.importorskip("dask_cuda")
    cube = _cube()
    stf.fuse_series(cube, method="starfm", out=tmp_path / "ref.zarr", chunks=(32, 32), progress=False)
    with start_cluster({"gpu": True}, quiet=True) as client:
        devices = client.run(lambda: __import__("jax").devices()[0].platform)
        assert set(devices.values()) == {"gpu"}
        stf.fuse_series(cube, method="starfm", out=tmp_path / "f.zarr", chunks=(32, 32), progress=False)
    np.testing.assert_allclose(
        stf.open_cube(tmp_path / "f.zarr")["fine"].values,
        stf.open_cube(tmp_path / "ref.zarr")["fine"].values,
        rtol=1e-5, atol=1e-6,
    )


def _memory_catalog(folder: Path) -> Path:
    """A catalog of GeoTIFFs without georeferencing (like the classic ENVI samples): ingest reads
    them into memory, so the cube's images sit inside its Dask graph. Returns the catalog file."""
    import rasterio
    import yaml

    rng = np.random.default_rng(5)
    dates = ["2020-01-01", "2020-01-17", "2020-02-02"]
    data = folder / "mem"
    data.mkdir(parents=True)
    for kind in ("fine", "coarse"):
        for d in dates:
            with rasterio.open(data / f"{kind}_{d}.tif", "w", driver="GTiff", height=160, width=160, count=2,
                               dtype="float32") as dst:
                dst.write(rng.uniform(0.05, 0.5, (2, 160, 160)).astype(np.float32))
    sensor = {"name": "plain", "bands": ["red", "nir"], "scale": 1.0}
    catalog = {
        "name": "mem", "root": "mem", "download": "made by the test", "bands": ["red", "nir"], "coarse_factor": 4,
        "fine": {"sensor": sensor, "files": {dates[0]: f"fine_{dates[0]}.tif", dates[2]: f"fine_{dates[2]}.tif"}},
        "coarse": {"sensor": sensor, "files": {d: f"coarse_{d}.tif" for d in dates}},
        "truth": {"files": {dates[1]: f"fine_{dates[1]}.tif"}},
        "task": {"target": dates[1], "pairs": [dates[0], dates[2]]},
    }
    path = folder / "mem.yaml"
    path.write_text(yaml.safe_dump(catalog))
    return path


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_pipeline_on_a_cluster_sends_no_data_in_graphs(tmp_path, monkeypatch, caplog, recwarn):
    """A catalog cube read into memory reaches a cluster's workers through a Zarr store, so no
    graph carries its images (the warning threshold is lowered to half of one image stack)."""
    import dask
    import yaml

    from stf_pipeline.runner import WORKER_CUBE, run

    catalog = _memory_catalog(tmp_path)
    cube, _ = stf.open_catalog(catalog, root=tmp_path)
    threshold = cube["fine"].nbytes // 2  # a graph carrying the images exceeds it, one naming chunks does not
    assert len(__import__("cloudpickle").dumps(dict(cube["fine"].data.__dask_graph__()))) > threshold  # in the graph
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({
        "name": "c", "cube": {"catalog": str(catalog)}, "write_cube": False, "figures": False,
        "methods": [{"name": "delta", "params": {"window": 3}}],
        "cluster": {"n_workers": 1, "threads_per_worker": 2, "memory_limit": "1GiB"},
    }))
    caplog.set_level(logging.WARNING, logger="distributed")
    with dask.config.set({"distributed.admin.large-graph-warning-threshold": threshold}):
        result = run(tmp_path / "p.yaml", root=tmp_path)
    assert float(result.scores["delta"]["rmse"].mean()) > 0
    noise = [str(w.message) for w in recwarn if "large graph" in str(w.message)]
    noise += [r.getMessage() for r in caplog.records if "run_spec" in r.getMessage()]
    assert noise == []
    assert not (tmp_path / "out" / "c" / WORKER_CUBE).exists()  # removed at the end


@pytest.mark.slow
def test_a_model_goes_to_the_cluster_once_not_inside_graphs(tmp_path, recwarn):
    """A trained model is scattered once per client (stf_pipeline.cluster.shared): no graph carries
    it (threshold: half the pickled model), and the store equals the one fused on threads."""
    import argparse
    import pickle

    import dask

    from stf_pipeline.cli import load_benchmark

    bench = load_benchmark("biastf")  # the clone's benchmarks/biastf.py
    model = bench.random_model(argparse.Namespace(filters=16, steps=1, batch_size=1, patch_size=16), multiband=True)
    cube = stf.synthetic_scene(height=48, width=48, n_times=5, seed=2)  # six bands, as the random model
    stf.fuse_series(cube, method="biastf", model=model, out=tmp_path / "ref.zarr", chunks=(24, 24), progress=False)
    with dask.config.set({"distributed.admin.large-graph-warning-threshold": len(pickle.dumps(model)) // 2}):
        with start_cluster({"n_workers": 1, "threads_per_worker": 2, "memory_limit": "2GiB"}, quiet=True):
            stf.fuse_series(
                cube, method="biastf", model=model, out=tmp_path / "f.zarr", chunks=(24, 24), progress=False
            )
    assert [str(w.message) for w in recwarn if "large graph" in str(w.message)] == []
    np.testing.assert_allclose(
        stf.open_cube(tmp_path / "f.zarr")["fine"].values, stf.open_cube(tmp_path / "ref.zarr")["fine"].values,
        rtol=0, atol=1e-6,
    )
