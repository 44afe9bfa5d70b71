"""Dask without importing it: ``import dask.array`` costs a one-shot process a large share of its
start-up, and no Dask array can exist before it has been imported, so a module that only needs to
*recognise* Dask arrays asks :data:`sys.modules` instead (the paths that build or compute Dask
graphs import it where they do so)."""

from __future__ import annotations

import sys
from typing import Any


def is_dask_array(data: Any) -> bool:
    """Whether ``data`` is a ``dask.array.Array`` (``False``, without importing Dask, while
    ``dask.array`` has not been imported)."""
    da = sys.modules.get("dask.array")
    return da is not None and isinstance(data, da.Array)
