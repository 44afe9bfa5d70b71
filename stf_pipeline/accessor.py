"""The ``.stf`` accessor: the module-level functions, bound to a cube.

Each accessor method is the library function with the cube as first argument, so
documentation and behaviour cannot drift (``cube.stf.fuse(...) is stf.fuse(cube, ...)``).

Importing the package also makes rioxarray's ``.rio`` available without importing rioxarray
(and the ``dask.array`` it imports) until ``.rio`` is first used: see :class:`_LazyRio`.
"""

from __future__ import annotations

import functools
import importlib
import sys
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


class _LazyRio:
    """``.rio`` before rioxarray is imported: its first use imports rioxarray, which registers its own
    accessor in this one's place, and returns that accessor.

    Cubes read by the package have always had ``.rio`` (reading imported rioxarray); a process that
    reads files into memory and never asks for ``.rio`` no longer pays for rioxarray's import.
    """

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            # nothing at class level: rioxarray's registration (hasattr(cls, "rio")) then replaces this
            # descriptor without xarray's "overriding a preexisting attribute" warning
            raise AttributeError("rio")
        import rioxarray  # noqa: F401  (registers .rio on Dataset and DataArray)

        if not hasattr(type(obj), "rio"):
            raise AttributeError(f"importing rioxarray did not register '.rio' on {type(obj).__name__}")
        return obj.rio


if "rioxarray" not in sys.modules:
    for _cls in (xr.Dataset, xr.DataArray):
        if "rio" not in vars(_cls):
            _cls.rio = _LazyRio()  # type: ignore[union-attr]
