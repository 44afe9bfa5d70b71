"""One process-wide thread pool for the compiled (Numba, ``nogil``) kernels of every method.

Blocks mapped by several Dask threads at once share its workers, so no more row strips run at
once than there are cores.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from stf_pipeline.cluster import machine_cores


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
