"""The ``.stf`` accessor: the module-level functions, bound to a cube.

Each accessor method is the library function with the cube as first argument, so
documentation and behaviour cannot drift (``cube.stf.fuse(...) is stf.fuse(cube, ...)``).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import xarray as xr

#: accessor name -> (module, function); the function takes the cube/array first.
_BOUND: dict[str, tuple[str, str]] = {
    "validate": ("stf_pipeline.cube", "validate_cube"),
    "write": ("stf_pipeline.cube", "write_cube"),
    "fuse": ("stf_pipeline.fusion", "fuse"),
    "fuse_series": ("stf_pipeline.series", "fuse_series"),
    "train": ("stf_pipeline.training", "train"),
    "evaluate": ("stf_pipeline.metrics", "evaluate"),
    "compare": ("stf_pipeline.comparison", "compare"),
    "to_geotiff": ("stf_pipeline._export", "to_geotiff"),
}


class _STFAccessor:
    def __init__(self, obj: xr.Dataset | xr.DataArray) -> None:
        self._obj = obj

    def __getattr__(self, name: str) -> Any:
        if name not in _BOUND:
            raise AttributeError(f"'.stf' has no method {name!r}; available: {sorted(_BOUND)}")
        module, func_name = _BOUND[name]
        func = getattr(importlib.import_module(module), func_name)
        bound = functools.partial(func, self._obj)
        functools.update_wrapper(bound, func)
        return bound

    def __dir__(self) -> list[str]:
        return sorted(_BOUND)


@xr.register_dataset_accessor("stf")
class STFDatasetAccessor(_STFAccessor):
    """``Dataset.stf``: fusion functions bound to a cube."""


@xr.register_dataarray_accessor("stf")
class STFDataArrayAccessor(_STFAccessor):
    """``DataArray.stf``: functions bound to a prediction (e.g. ``pred.stf.evaluate(truth)``)."""
