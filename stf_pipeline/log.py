"""Logging: every module logs under the ``stf_pipeline`` logger; :func:`setup` shows it.

The library never configures logging on import (a :class:`logging.NullHandler` keeps Python from
printing its "no handler" fallback); an application decides what to show. ``stf`` calls
:func:`setup` with ``-v`` / ``-q``; in Python or Jupyter, ``stf_pipeline.log.setup()`` shows the
progress of :func:`stf_pipeline.run` and friends (INFO), ``setup("DEBUG")`` more.

>>> from stf_pipeline.log import setup
>>> setup("INFO")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

#: the package's logger; modules use ``logging.getLogger(__name__)``, its children
LOGGER_NAME = "stf_pipeline"
#: ``stf``'s default level and the levels ``-v`` and ``-q`` step to (one flag: one step)
LEVELS: tuple[int, ...] = (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR)
DEFAULT_LEVEL = logging.INFO

logging.getLogger(LOGGER_NAME).addHandler(logging.NullHandler())


class _Formatter(logging.Formatter):
    """INFO as the bare message (what the user follows); other levels prefixed with the level name."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno == logging.INFO else f"{record.levelname.lower()}: {text}"


def level_from_flags(verbose: int = 0, quiet: int = 0) -> int:
    """The level of ``stf -v``/``-q``: INFO, one step down (DEBUG) per ``-v``, up per ``-q``."""
    index = LEVELS.index(DEFAULT_LEVEL) - verbose + quiet
    return LEVELS[min(max(index, 0), len(LEVELS) - 1)]


def setup(level: int | str = DEFAULT_LEVEL, *, stream: TextIO | None = None) -> logging.Handler:
    """Show the ``stf_pipeline`` logger's records at ``level`` and above on ``stream``.

    Replaces a handler installed by an earlier call (so calling it twice does not print twice)
    and stops the records there (not passed on to the root logger's handlers).

    Parameters
    ----------
    level : int or str, default INFO
        A :mod:`logging` level (``logging.DEBUG``) or its name (``"debug"``).
    stream : file-like, optional
        Default ``sys.stderr`` (looked up at each record, so pytest's capture and Jupyter see it).

    Returns
    -------
    logging.Handler
        The installed handler.
    """
    logger = logging.getLogger(LOGGER_NAME)
    for old in list(logger.handlers):
        if isinstance(old, _SetupHandler):
            logger.removeHandler(old)
    handler = _StderrHandler() if stream is None else _SetupHandler(stream)
    handler.setFormatter(_Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.propagate = False  # a root handler some dependency installs would print every record again
    logger.setLevel(level.upper() if isinstance(level, str) else level)
    return handler


class _SetupHandler(logging.StreamHandler[TextIO]):
    """A stream handler installed by :func:`setup` (the type a later call finds and replaces)."""


class _StderrHandler(_SetupHandler):
    """A stream handler that writes to the *current* ``sys.stderr``."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:  # StreamHandler.__init__ assigns it
        pass
