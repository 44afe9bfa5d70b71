"""Reading YAML (catalogs, sensor presets, pipelines) and checking the loaded mappings (unknown keys
are errors that name the key)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from stf_pipeline.exceptions import STFError


def safe_load(text: str) -> Any:
    """``yaml.safe_load`` with libyaml's parser when PyYAML has it (the same values, parsed in C:
    several times faster, which a one-shot process opening a catalog notices)."""
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def checked_keys(
    mapping: Any,
    allowed: Sequence[str],
    where: str,
    *,
    required: Sequence[str] = (),
    error: type[STFError],
) -> dict[str, Any]:
    """Return ``mapping`` as a dict after checking its keys.

    Raises
    ------
    error
        If ``mapping`` is not a mapping, has a key outside ``allowed``, or lacks a ``required`` one;
        the message names ``where``, the key and the valid keys.
    """
    if not isinstance(mapping, Mapping):
        raise error(f"{where} must be a mapping with keys {list(allowed)}, got {mapping!r}.")
    for key in mapping:
        if key not in allowed:
            raise error(f"{where}: unknown key {key!r}; valid keys are {list(allowed)}.")
    for key in required:
        if key not in mapping:
            raise error(f"{where}: missing required key {key!r}.")
    return dict(mapping)
