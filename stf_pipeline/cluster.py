"""Dask clusters for long runs: local (sized to the machine), an existing one, or one worker per GPU.

>>> from stf_pipeline.cluster import ClusterConfig, start_cluster
>>> with start_cluster(ClusterConfig(n_workers=2)) as client:  # doctest: +SKIP
...     stf.fuse_series(cube, method="delta", out="fused.zarr")

Inside the ``with`` block the client is Dask's default scheduler, so every ``compute``/``to_zarr``
(and :func:`stf_pipeline.fuse_series`, which also shows ``distributed.progress``) runs on it.

Memory: each local worker gets a hard limit (``memory_limit``, default 70 % of the machine's
memory, cgroup limits included, shared among the workers). Dask spills to disk at 60 % of it,
pauses the worker at 80 % and restarts it at 95 %, so a scene far larger than memory (a
20000×20000 cube is ~9.6 GB per 6-band image) streams through chunk by chunk instead of
exhausting the machine, and the driver process keeps 30 % for itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

from stf_pipeline.exceptions import ConfigError

logger = logging.getLogger(__name__)

#: fraction of the machine's memory that all local workers together may hold
WORKER_MEMORY_FRACTION = 0.7
#: environment of GPU workers. dask-cuda lists each worker's own GPU first in its
#: CUDA_VISIBLE_DEVICES, so that GPU is JAX's default device (``cuda:0``) there; JAX still
#: opens the other GPUs, so it must allocate on demand rather than preallocate 75 % of each.
GPU_WORKER_ENV: dict[str, str] = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """Where and how to run: the ``cluster:`` block of a pipeline YAML.

    Attributes
    ----------
    address : str, optional
        Scheduler address of an existing Dask cluster (``tcp://host:8786``); its size is set
        there, so the other fields must stay unset.
    gpu : bool, default False
        Start a dask-cuda ``LocalCUDACluster``: one worker per visible GPU, whose JAX default
        device is that GPU.
    n_workers : int, optional
        Worker processes; default one per CPU core (one per GPU with ``gpu``).
    threads_per_worker : int, optional
        Threads per worker; default 1.
    memory_limit : int or str, optional
        Memory limit per worker in bytes or as ``"4GiB"``; default 70 % of the machine's memory
        divided among the workers.
    """

    address: str | None = None
    gpu: bool = False
    n_workers: int | None = None
    threads_per_worker: int | None = None
    memory_limit: int | str | None = None

    def __post_init__(self) -> None:
        if self.address is not None:
            if not isinstance(self.address, str) or "://" not in self.address:
                raise ConfigError(
                    f"cluster address must be a scheduler URL such as 'tcp://10.0.0.5:8786', got {self.address!r}."
                )
            sized = {k: getattr(self, k) for k in ("n_workers", "threads_per_worker", "memory_limit")}
            set_fields = sorted(k for k, v in sized.items() if v is not None)
            if self.gpu or set_fields:
                raise ConfigError(
                    f"cluster address {self.address!r} connects to an existing cluster, whose size is set there; "
                    f"remove {set_fields + (['gpu'] if self.gpu else [])} from the cluster config."
                )
        if not isinstance(self.gpu, bool):
            raise ConfigError(f"cluster gpu must be true or false, got {self.gpu!r}.")
        for name in ("n_workers", "threads_per_worker"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"cluster {name} must be a positive integer, got {value!r}.")
        if self.memory_limit is not None:
            memory_limit_bytes(self.memory_limit)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> ClusterConfig:
        """Build from a YAML mapping; unknown keys are errors that list the valid ones."""
        mapping = dict(mapping or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(mapping) - set(valid))
        if unknown:
            raise ConfigError(f"unknown cluster key(s) {unknown}; valid keys are {valid}.")
        return cls(**mapping)


def memory_limit_bytes(value: int | str) -> int:
    """Parse a memory limit (``4294967296``, ``"4GiB"``, ``"500 MB"``) to bytes."""
    from dask.utils import parse_bytes

    try:
        nbytes = int(value) if isinstance(value, int) and not isinstance(value, bool) else parse_bytes(value)
    except (ValueError, TypeError):
        nbytes = -1
    if nbytes <= 0:
        raise ConfigError(f"cluster memory_limit must be a positive size such as '4GiB', got {value!r}.")
    return nbytes


def machine_cores() -> int:
    """CPU cores this process may use (affinity mask when the OS gives one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def machine_memory() -> int:
    """Bytes of memory available to this process tree (cgroup limit if lower than RAM)."""
    from distributed.system import MEMORY_LIMIT

    return int(MEMORY_LIMIT)


def local_size(config: ClusterConfig, *, cores: int, memory: int) -> tuple[int, int, int]:
    """``(n_workers, threads_per_worker, memory_limit bytes per worker)`` of a local cluster."""
    threads = config.threads_per_worker or 1
    n_workers = config.n_workers or max(1, cores // threads)
    if config.memory_limit is not None:
        limit = memory_limit_bytes(config.memory_limit)
    else:
        limit = int(memory * WORKER_MEMORY_FRACTION / n_workers)
    return n_workers, threads, limit


@contextlib.contextmanager
def start_cluster(config: ClusterConfig | Mapping[str, Any] | None = None, *, quiet: bool = False) -> Iterator[Any]:
    """Start (or connect to) a Dask cluster and yield a ``distributed.Client`` for it.

    Parameters
    ----------
    config : ClusterConfig or mapping, optional
        Default: a local cluster sized to the machine.
    quiet : bool, default False
        Log the cluster size and dashboard link at DEBUG instead of INFO.

    Yields
    ------
    distributed.Client
        The default scheduler inside the block. On exit the client, and a cluster started
        here, are closed (an existing cluster given by ``address`` keeps running).

    Raises
    ------
    ConfigError
        Bad configuration, or ``gpu`` without dask-cuda installed.
    """
    from distributed import Client, LocalCluster

    if not isinstance(config, ClusterConfig):
        config = ClusterConfig.from_mapping(config)
    if config.address is not None:
        with Client(config.address) as client:
            _announce(client, f"connected to {config.address}", quiet=quiet)
            yield client
        return
    if config.gpu:
        cluster = _cuda_cluster(config)
        what = "GPU"
    else:
        n_workers, threads, limit = local_size(config, cores=machine_cores(), memory=machine_memory())
        cluster = LocalCluster(
            n_workers=n_workers, threads_per_worker=threads, memory_limit=limit, processes=True
        )
        what = "local"
    with cluster, Client(cluster) as client:
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        limits = {w.get("memory_limit") for w in workers}
        size = f"{len(workers)} worker(s), {sum(w['nthreads'] for w in workers)} thread(s)"
        size += f", {next(iter(limits)) / 2**30:.1f} GiB each" if len(limits) == 1 and None not in limits else ""
        _announce(client, f"{what} cluster: {size}", quiet=quiet)
        yield client


def shared(value: Any) -> Any:
    """``value`` as one Dask task that block tasks depend on, sent to the workers once.

    Under a ``distributed.Client`` the value is scattered to the cluster once per client (a
    large object such as a trained network then never sits inside a task graph: no ``Sending
    large graph`` for every call that uses it) and the same future is reused by later calls;
    without a client it is one ``dask.delayed`` task of the local graph.
    """
    import dask

    try:
        from distributed import default_client

        client = default_client()
    except (ImportError, ValueError):  # no distributed client: the threaded scheduler shares memory
        return dask.delayed(value, pure=False, traverse=False)
    cache = client.__dict__.setdefault("_stf_shared", {})
    held = cache.get(id(value))
    if held is None or held[0] is not value:  # the entry keeps ``value`` alive, so its id stays its own
        held = (value, client.scatter(value, hash=False))
        cache[id(value)] = held
    return dask.delayed(held[1], traverse=False)


def _cuda_cluster(config: ClusterConfig) -> Any:
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError as err:
        raise ConfigError(
            "cluster gpu: true needs dask-cuda; install it with pip install 'stf_pipeline[gpu]' "
            f"(import failed: {err})."
        ) from err
    import dask

    kwargs: dict[str, Any] = {"threads_per_worker": config.threads_per_worker or 1}
    if config.n_workers is not None:
        kwargs["n_workers"] = config.n_workers
    if config.memory_limit is not None:
        kwargs["memory_limit"] = memory_limit_bytes(config.memory_limit)
    # dask-cuda sets each worker's CUDA_VISIBLE_DEVICES (its own GPU first) in the worker spec's
    # env, replacing an env= argument; the nannies' configured environ is merged under it.
    environ = {**dask.config.get("distributed.nanny.environ", {}), **GPU_WORKER_ENV}
    with dask.config.set({"distributed.nanny.environ": environ}):
        return LocalCUDACluster(**kwargs)


def _announce(client: Any, what: str, *, quiet: bool) -> None:
    """Log the cluster's size and where its dashboard is (INFO; ``quiet``: DEBUG)."""
    level = logging.DEBUG if quiet else logging.INFO
    logger.log(level, "%s", what)
    try:
        import bokeh  # noqa: F401  (the dashboard needs it)
    except ImportError:
        logger.log(level, "Dask dashboard unavailable: pip install bokeh to watch the run live")
    else:
        logger.log(level, "Dask dashboard at %s", client.dashboard_link)
