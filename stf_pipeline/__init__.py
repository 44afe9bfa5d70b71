"""stf_pipeline: spatio-temporal fusion of satellite images on xarray, Dask, Zarr and JAX.

>>> import stf_pipeline as stf
>>> cube = stf.synthetic_scene(height=200, width=200, n_times=6, seed=0)
>>> pred = stf.fuse(cube, target=cube.time[2].values, method="delta")

Public names are imported lazily (module ``__getattr__``), so ``import stf_pipeline`` stays
cheap and does not import JAX; importing it registers the ``.stf`` accessor. Progress is logged
under the ``stf_pipeline`` logger; ``stf_pipeline.log.setup()`` shows it (``stf`` does).
"""

from __future__ import annotations

import importlib
from typing import Any

from stf_pipeline import accessor as _accessor  # noqa: F401  (registers .stf)
from stf_pipeline import log as _log  # noqa: F401  (the stf_pipeline logger, silent until log.setup())
from stf_pipeline.exceptions import (
    CatalogError,
    ConfigError,
    CubeError,
    EvaluationError,
    MethodError,
    ModelError,
    PlotError,
    STFError,
    StoreError,
    TaskError,
)

__version__ = "0.1.0"

#: public name -> module that defines it
_LAZY: dict[str, str] = {
    "validate_cube": "stf_pipeline.cube",
    "open_cube": "stf_pipeline.cube",
    "write_cube": "stf_pipeline.cube",
    "make_cube": "stf_pipeline.cube",
    "synthetic_scene": "stf_pipeline.synthetic",
    "Task": "stf_pipeline.task",
    "resolve_task": "stf_pipeline.task",
    "fuse": "stf_pipeline.fusion",
    "fuse_series": "stf_pipeline.series",
    "available_methods": "stf_pipeline.methods",
    "get_method": "stf_pipeline.methods",
    "open_catalog": "stf_pipeline.catalog",
    "ingest": "stf_pipeline._ingest",
    "from_stac": "stf_pipeline.stac",
    "export": "stf_pipeline._export",
    "train": "stf_pipeline.training",
    "load_model": "stf_pipeline.training",
    "evaluate": "stf_pipeline.metrics",
    "compare": "stf_pipeline.comparison",
    "run": "stf_pipeline.runner",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'stf_pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "CatalogError",
    "ConfigError",
    "CubeError",
    "EvaluationError",
    "MethodError",
    "ModelError",
    "PlotError",
    "STFError",
    "StoreError",
    "TaskError",
    "__version__",
    *_LAZY,
]
