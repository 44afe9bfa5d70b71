"""Progress that is live wherever the user is, and never waits.

:class:`Progress` picks its display once, when it starts:

- a terminal (stderr is a TTY): a ``tqdm`` bar redrawn in place;
- Jupyter: a ``tqdm`` widget when ``ipywidgets`` is installed, else a text bar (no
  ``TqdmWarning``);
- anything else (a log file, a scheduler, CI): a line on the ``stf_pipeline`` logger at most
  every ``interval`` seconds and one at the end, written to stderr when logging is not set up.

Updates come from the caller (``update(n)``), so nothing sleeps or polls: a finished job is
reported the moment it finishes. :class:`DaskProgress` feeds a :class:`Progress` from the tasks
of a Dask computation (local schedulers) whose key names start with a given prefix.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from dask.callbacks import Callback

logger = logging.getLogger("stf_pipeline")


def display_kind() -> str:
    """``"widget"``, ``"text"`` (a redrawn bar) or ``"log"`` (periodic lines) for the current output."""
    shell = sys.modules.get("IPython")
    ipython = shell.get_ipython() if shell is not None and hasattr(shell, "get_ipython") else None
    if ipython is not None and type(ipython).__name__ == "ZMQInteractiveShell":
        try:
            import ipywidgets  # noqa: F401
        except ImportError:
            return "text"
        return "widget"
    stream = sys.stderr
    return "text" if stream is not None and hasattr(stream, "isatty") and stream.isatty() else "log"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else (
        f"{seconds // 60}:{seconds % 60:02d}"
    )


class Progress:
    """A progress display of ``total`` steps; a context manager.

    Parameters
    ----------
    total : int
        Number of steps.
    desc : str
        What is being done (shown before the count).
    unit : str, default "it"
        Name of one step.
    interval : float, default 10.0
        Seconds between two log lines in ``"log"`` mode (bars redraw as tqdm decides).
    enabled : bool, default True
        False shows nothing (``update`` is then free).
    kind : {"widget", "text", "log"}, optional
        Force a display; default :func:`display_kind`.
    initial : int, default 0
        Steps already done (a resumed job).
    """

    def __init__(
        self,
        total: int,
        *,
        desc: str,
        unit: str = "it",
        interval: float = 10.0,
        enabled: bool = True,
        kind: str | None = None,
        initial: int = 0,
    ) -> None:
        self.total = int(total)
        self.desc = desc
        self.unit = unit
        self.interval = float(interval)
        self.n = int(initial)
        self._postfix = ""
        self.kind = (kind or display_kind()) if enabled else "off"
        self._start = time.monotonic()
        self._last_log = self._start
        self._bar: Any = None
        if self.kind == "widget":
            from tqdm.notebook import tqdm as notebook_tqdm

            self._bar = notebook_tqdm(total=self.total, initial=self.n, desc=desc, unit=unit)
        elif self.kind == "text":
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total, initial=self.n, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True
            )

    def update(self, n: int = 1) -> None:
        """Advance by ``n`` steps."""
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.kind == "log":
            now = time.monotonic()
            if now - self._last_log >= self.interval and self.n < self.total:
                self._last_log = now
                self._log(now)

    def set_postfix(self, **values: str) -> None:
        """Show ``name=value`` pairs after the count (e.g. the current loss)."""
        self._postfix = ", ".join(f"{k}={v}" for k, v in values.items())
        if self._bar is not None:
            self._bar.set_postfix(values)

    def _log(self, now: float) -> None:
        elapsed = now - self._start
        fraction = self.n / self.total if self.total else 1.0
        left = f", about {_duration(elapsed / fraction - elapsed)} left" if 0 < fraction < 1 else ""
        message = (
            f"{self.desc}: {self.n}/{self.total} {self.unit} ({100 * fraction:.0f}%), "
            f"{_duration(elapsed)} elapsed{left}{'; ' + self._postfix if self._postfix else ''}"
        )
        if logger.hasHandlers():
            logger.info(message)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        """Finish the display (the last log line in ``"log"`` mode)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.kind == "log":
            self._log(time.monotonic())
            self.kind = "off"

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _key_name(key: Any) -> str:
    return str(key[0] if isinstance(key, tuple) else key)


class DaskProgress(Callback):
    """Advance ``progress`` by one for every finished Dask task whose key starts with ``prefix``.

    A ``dask.callbacks.Callback``: use it as a context manager around local-scheduler computes.
    """

    def __init__(self, progress: Progress, prefix: str) -> None:
        super().__init__()
        self.progress = progress
        self.prefix = prefix

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        if _key_name(key).startswith(self.prefix):
            self.progress.update(1)
