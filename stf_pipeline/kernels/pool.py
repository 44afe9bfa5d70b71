"""One process-wide thread pool for the compiled (Numba, ``nogil``) kernels of every method.

Blocks mapped by several Dask threads at once share its workers, so no more row strips run at
once than there are cores.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
