"""Directory stores that appear whole or not at all (cube stores, fused series, saved models)."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def _sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to fill; on success rename it into place.

    An existing directory at ``path`` is moved aside first and deleted only once the new one is in
    place, so ``path`` never holds a half-written or half-deleted store. On failure the temporary
    directory is removed and ``path`` is untouched.
    """
    tmp = _sibling(path, "tmp")
    try:
        yield tmp
        trash = None
        if path.exists():
            trash = _sibling(path, "old")
            os.replace(path, trash)
        os.replace(tmp, path)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_directory(path: Path) -> None:
    """Delete ``path`` by first renaming it aside, so an interrupted delete leaves nothing at ``path``."""
    trash = _sibling(path, "old")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)
