"""The method registry: one module per method, each defining ``METHOD``.

Modules are imported on first use, so importing the package stays light and a method whose
optional dependencies are missing fails only when it is asked for.
"""

from __future__ import annotations

import importlib
import importlib.util

from stf_pipeline.exceptions import MethodError
from stf_pipeline.methods._base import MethodContext, MethodSpec, params_to_attrs

#: registry name -> module path; a module defines ``METHOD: MethodSpec``.
_MODULES: dict[str, str] = {
    "delta": "stf_pipeline.methods.delta",
    "starfm": "stf_pipeline.methods.starfm",
    "estarfm": "stf_pipeline.methods.estarfm",
    "fsdaf": "stf_pipeline.methods.fsdaf",
    "stfdcnn": "stf_pipeline.methods.stfdcnn",
    "biastf": "stf_pipeline.methods.biastf",
}


def available_methods() -> list[str]:
    """Names of the methods whose modules are present in this installation."""
    found = []
    for name, module in _MODULES.items():
        if importlib.util.find_spec(module) is not None:
            found.append(name)
    return found


def get_method(name: str) -> MethodSpec:
    """Return the :class:`MethodSpec` registered under ``name``.

    Raises
    ------
    MethodError
        If ``name`` is not a registered method.
    """
    key = str(name).lower()
    if key not in _MODULES or importlib.util.find_spec(_MODULES[key]) is None:
        raise MethodError(
            f"unknown method {name!r}; choose one of {available_methods()}."
        )
    return importlib.import_module(_MODULES[key]).METHOD


__all__ = ["MethodContext", "MethodSpec", "available_methods", "get_method", "params_to_attrs"]
