"""Directory stores that appear whole or not at all (cube stores, fused series, saved models).

A store is written into a temporary sibling ``.NAME.tmp-XXXXXXXX`` and swapped into place by
:func:`atomic_directory`. The swap is two renames (the old store aside to ``.NAME.old-XXXXXXXX``,
the new one to ``NAME``); before the first one a journal ``.NAME.stf-swap`` records both names,
so a process killed between the renames leaves enough to finish the swap: :func:`recover_swap`
(run by the next writer, and by readers that find the path missing) rolls forward when the new
store is there and back otherwise, so ``NAME`` is never left empty. Every temporary or old
sibling that no journal refers to is litter of a killed write; :func:`remove_litter`, which only
the holder of the store's writer lock may call, deletes it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger("stf_pipeline")

_KINDS = ("tmp", "old")


def _sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{uuid.uuid4().hex[:8]}")


def journal_path(path: Path) -> Path:
    """The swap journal of ``path`` (exists only while a swap is under way or was killed)."""
    return path.with_name(f".{path.name}.stf-swap")


def _write_json_atomically(path: Path, data: dict[str, str | None]) -> None:
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.partial")
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_directory(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def swap_into_place(new: Path, path: Path) -> None:
    """Replace ``path`` (if any) with the complete directory ``new``, recoverably.

    The caller holds the writer lock of ``path``.
    """
    old = _sibling(path, "old") if (path.exists() or path.is_symlink()) else None
    journal = journal_path(path)
    _write_json_atomically(journal, {"new": new.name, "old": None if old is None else old.name})
    _fsync_directory(path.parent)
    if old is not None:
        os.replace(path, old)
    os.replace(new, path)
    _fsync_directory(path.parent)
    journal.unlink()
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover_swap(path: Path) -> str | None:
    """Finish or undo a swap of ``path`` that a killed process left half-done.

    Returns ``"forward"`` (the new store was moved into place), ``"back"`` (the old one was
    restored), ``"done"`` (both renames had happened; only the journal was left) or None (no
    journal). Safe to call concurrently with other recoveries and with no writer running.
    """
    journal = journal_path(path)
    try:
        record = json.loads(journal.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # a journal cut short: its swap had not started
        journal.unlink(missing_ok=True)
        return None
    new = path.with_name(record["new"])
    old = path.with_name(record["old"]) if record.get("old") else None
    outcome = "done"
    if not (path.exists() or path.is_symlink()):
        try:
            if new.is_dir():
                os.replace(new, path)
                outcome = "forward"
            elif old is not None and old.is_dir():
                os.replace(old, path)
                outcome = "back"
        except FileNotFoundError:  # another process recovered it first
            return recover_swap(path) if journal.exists() else "done"
    journal.unlink(missing_ok=True)
    if outcome != "done" or old is not None:
        logger.warning("recovered the interrupted replacement of %s (%s)", path, outcome)
    return outcome


def remove_litter(path: Path) -> list[Path]:
    """Delete the temporary and old siblings of ``path`` left by killed writes; return them.

    Only the holder of ``path``'s writer lock may call this (nobody else is writing a sibling).
    """
    recover_swap(path)
    removed = []
    for kind in _KINDS:
        for sibling in path.parent.glob(f".{path.name}.{kind}-*"):
            shutil.rmtree(sibling, ignore_errors=True)
            removed.append(sibling)
    if removed:
        logger.info("removed %d leftover(s) of killed writes of %s", len(removed), path)
    return removed


@contextlib.contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to fill; on success swap it into place.

    An existing directory at ``path`` is moved aside and deleted only once the new one is in
    place (see :func:`swap_into_place`), so ``path`` never holds a half-written or half-deleted
    store and a kill at any point is recovered by :func:`recover_swap`. On failure the temporary
    directory is removed and ``path`` is untouched. The caller holds ``path``'s writer lock.
    """
    tmp = _sibling(path, "tmp")
    try:
        yield tmp
        swap_into_place(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_directory(path: Path) -> None:
    """Delete ``path`` by first renaming it aside, so an interrupted delete leaves nothing at ``path``."""
    trash = _sibling(path, "old")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)
