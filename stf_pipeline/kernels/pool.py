"""One process-wide thread pool for the compiled (Numba, ``nogil``) kernels of every method.

Blocks mapped by several Dask threads at once share its workers, so no more row strips run at
once than there are cores.
"""

from __future__ import annotations

import functools
import logging
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from stf_pipeline.cluster import machine_cores

log = logging.getLogger("stf_pipeline.kernels")


@functools.lru_cache(maxsize=1)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stf-rows")


def run_rows(
    rows: Callable[..., None], height: int, inputs: tuple[Any, ...], outputs: tuple[Any, ...], *, threaded: bool = True
) -> None:
    """Call ``rows(*inputs, y_start, y_stop, *outputs)`` over strips of the ``height`` rows.

    Strips of a few rows, several per core, balance rows of unequal cost (gaps, edges);
    ``threaded=False`` runs them in the calling thread (the same numbers, as every row is
    computed on its own).
    """
    cores = machine_cores()
    if not threaded or cores == 1 or height < 2:
        rows(*inputs, 0, height, *outputs)
        return

    strip = max(1, min(16, -(-height // (4 * cores))))
    jobs = [_pool(cores).submit(rows, *inputs, y0, min(height, y0 + strip), *outputs) for y0 in range(0, height, strip)]
    for job in jobs:
        job.result()


def map_cores(function: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """``[function(item) for item in items]``, the items shared over the pool's threads (one
    compiled, ``nogil`` call each), in the calling thread where there is one core or one item."""
    cores = machine_cores()
    if cores == 1 or len(items) < 2:
        return [function(item) for item in items]
    return list(_pool(cores).map(function, items))


#: names of the warm-ups started in this process (each runs once)
_WARMED: set[str] = set()
_WARMED_LOCK = threading.Lock()


def compile_ahead(name: str, warm: Callable[[], Any]) -> None:
    """Start ``warm`` (the kernels' whole path on a tiny input) in a background thread, once per
    process and ``name``.

    Numba compiles a kernel on its first call, and a cold process compiles them one after the
    other while the cores wait. Warming them in the order the caller needs them lets the
    caller's own work (NumPy preparation, the first kernels' rows) overlap the compilation of
    the later ones; a kernel both threads reach is compiled once (Numba checks for it under its
    compiler lock), and with a filled disk cache the warm-up only loads. An error in the warm-up
    is logged at debug level and left to the caller's own call to raise.
    """
    with _WARMED_LOCK:
        if name in _WARMED:
            return
        _WARMED.add(name)

    def run() -> None:
        try:
            warm()
        except Exception as err:  # the caller's call raises it with its own inputs
            log.debug("warming %s failed: %s", name, err)

    threading.Thread(target=run, name=f"stf-compile-{name}", daemon=True).start()


def in_disk_cache(kernel: Any) -> bool:
    """Whether Numba's disk cache holds an index for ``kernel`` (a ``cache=True`` dispatcher):
    it was compiled by some process with this cache directory (``NUMBA_CACHE_DIR`` or
    ``__pycache__``) before."""
    code = kernel.py_func.__code__
    pattern = f"*.{kernel.py_func.__qualname__}-{code.co_firstlineno}.py*.nbi"
    return any(Path(kernel.stats.cache_path).glob(pattern))


def compile_in_child(name: str, entry: str, kernels: Sequence[Any]) -> None:
    """With a cold disk cache, compile ``kernels`` in a child process, once per process and ``name``.

    Numba compiles under one lock per process, so a cold process compiles its kernels one
    after the other on one core. A child process running ``entry`` (``"module:function"``, a
    warm-up that calls ``kernels`` on a tiny input) compiles the later kernels of a path on
    another core while this process compiles the first ones; it writes them to the disk cache,
    from which this process loads them when it reaches them (if the child is not done by then,
    this process compiles them itself: the same code either way). Nothing is started when every
    kernel is already in the cache: then loading them costs less than starting a process. An
    error in the child is left to this process's own calls to raise.
    """
    with _WARMED_LOCK:
        if name in _WARMED:
            return
        _WARMED.add(name)
    if all(in_disk_cache(kernel) for kernel in kernels):
        return
    module, function = entry.split(":")
    command = [sys.executable, "-c", f"import {module} as m; m.{function}()"]
    try:
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError as err:  # no interpreter to start (an embedded Python)
        log.debug("compiling %s in a child process failed to start: %s", name, err)
        return
    threading.Thread(target=child.wait, name=f"stf-compile-child-{name}", daemon=True).start()
