"""Orbax checkpoints that resume a killed training run.

A :class:`CheckpointStore` is one directory of step-numbered Orbax checkpoints (the newest
``max_to_keep`` are kept). Each holds a pytree (train state, best parameters...) and JSON
metadata (loss history, early-stopping counters) together with a *fingerprint* of what is being
trained (method, stage, configuration, bands, coarse factor). Restoring into a different model
raises :class:`~stf_pipeline.exceptions.ModelError` instead of loading mismatched weights.
Checkpoints are written synchronously: when ``save`` returns, the step is on disk.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from stf_pipeline.exceptions import ModelError


def _canonical(value: Any) -> Any:
    """JSON round trip, so tuples and lists (and key order) compare equal."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


class CheckpointStore:
    """Step-numbered Orbax checkpoints in ``directory``, guarded by a fingerprint.

    Parameters
    ----------
    directory : path-like
        Created if missing.
    fingerprint : mapping
        JSON-able description of the model being trained; a checkpoint written with another
        fingerprint is refused on restore.
    max_to_keep : int, default 2
    """

    def __init__(
        self, directory: str | os.PathLike[str], *, fingerprint: Mapping[str, Any], max_to_keep: int = 2
    ) -> None:
        self.directory = Path(directory).absolute()
        self.fingerprint = _canonical(dict(fingerprint))
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=False, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest saved step, or None."""
        return self._manager.latest_step()

    def save(self, step: int, tree: Any, meta: Mapping[str, Any]) -> None:
        """Save ``tree`` (arrays pytree) and ``meta`` (JSON-able) as checkpoint ``step``."""
        payload = {"meta": _canonical(dict(meta)), "fingerprint": self.fingerprint}
        self._manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(payload)),
            force=True,
        )
        self._manager.wait_until_finished()

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restore checkpoint ``step`` (default: the newest) into the structure of ``template``.

        Returns
        -------
        (tree, meta)

        Raises
        ------
        ModelError
            No checkpoint, a checkpoint of another model (fingerprint differs), or one that
            cannot be read into ``template``.
        """
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise ModelError(f"no checkpoint in {self.directory}; train first, or point workdir elsewhere.")
        payload = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        saved = payload.get("fingerprint")
        if saved != self.fingerprint:
            diff = sorted(
                k for k in set(saved or {}) | set(self.fingerprint) if (saved or {}).get(k) != self.fingerprint.get(k)
            )
            raise ModelError(
                f"checkpoint in {self.directory} (step {step}) belongs to another model (differs in {diff}); "
                "use a fresh workdir for this model, or delete the old checkpoints."
            )
        try:
            tree = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(template))
            )["state"]
        except Exception as err:  # orbax raises ValueError/KeyError/... for mismatched trees
            raise ModelError(
                f"checkpoint in {self.directory} (step {step}) does not fit this model ({type(err).__name__}: {err}); "
                "use a fresh workdir."
            ) from err
        return tree, payload["meta"]

    def close(self) -> None:
        """Release the manager's resources."""
        self._manager.close()

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def checkpoint_store(directory: Path | None, *, fingerprint: dict[str, Any]) -> contextlib.AbstractContextManager:
    """A :class:`CheckpointStore` in ``directory`` as a context manager; no checkpoints (``None``) without one."""
    return contextlib.nullcontext() if directory is None else CheckpointStore(directory, fingerprint=fingerprint)
