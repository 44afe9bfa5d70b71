"""``FittedModel``: a trained learned-method model, saved and loaded with its configuration.

On disk a model is a directory::

    model.json      format version, method, config, bands, coarse_factor, training dates, history
    params.msgpack  the parameter pytrees (Flax msgpack), e.g. {"G": ..., "B": ...}

written atomically (temporary directory, then rename). :func:`FittedModel.load` refuses a
directory that is not a model or has an unknown format version; :meth:`FittedModel.check_cube`
refuses a cube with other bands or another ``coarse_factor`` than the training cube.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import xarray as xr
from flax import serialization

from stf_pipeline._atomic import atomic_directory
from stf_pipeline.exceptions import ModelError

#: Version of the on-disk layout; bumped when it changes incompatibly.
FORMAT_VERSION = 1
_MARKER = "stf_pipeline_model"


@dataclasses.dataclass(frozen=True, eq=False)
class FittedModel:
    """A trained model of a learned method.

    Attributes
    ----------
    method : str
        Registry name of the method that made it (``"biastf"``, ``"stfdcnn"``).
    config : dict
        The method's training/architecture configuration, JSON-able (the method rebuilds its
        networks from it).
    params : dict of pytrees
        Trained parameters by network name (NumPy arrays).
    bands : tuple of str
        Band names of the training cube, in order.
    coarse_factor : int or None
        ``coarse_factor`` attr of the training cube.
    train_times : tuple of str
        Training dates (ISO).
    history : dict
        Loss histories by stage (see :func:`stf_pipeline.nn.train.fit`).
    extra : dict
        Other JSON-able facts the method needs at inference (e.g. normalisation constants).
    """

    method: str
    config: dict[str, Any]
    params: dict[str, Any]
    bands: tuple[str, ...]
    coarse_factor: int | None
    train_times: tuple[str, ...] = ()
    history: dict[str, Any] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "bands", tuple(str(b) for b in self.bands))
        object.__setattr__(self, "train_times", tuple(str(t) for t in self.train_times))
        object.__setattr__(self, "params", jax.tree_util.tree_map(np.asarray, dict(self.params)))

    def __repr__(self) -> str:
        n = sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(self.params))
        return (
            f"FittedModel(method={self.method!r}, bands={list(self.bands)}, coarse_factor={self.coarse_factor}, "
            f"networks={sorted(self.params)}, parameters={n:,}, train_times={list(self.train_times)})"
        )

    def check_cube(self, cube: xr.Dataset) -> None:
        """Raise :class:`ModelError` unless ``cube`` has the training bands and ``coarse_factor``."""
        bands = tuple(str(b) for b in cube["band"].values.tolist())
        if bands != self.bands:
            raise ModelError(
                f"this {self.method} model was trained on bands {list(self.bands)}, but the cube has {list(bands)}; "
                f"select them with cube.sel(band={list(self.bands)}) or train a model on these bands."
            )
        factor = cube.attrs.get("coarse_factor")
        if self.coarse_factor is not None and factor is not None and int(factor) != int(self.coarse_factor):
            raise ModelError(
                f"this {self.method} model was trained with coarse_factor={self.coarse_factor}, but the cube has "
                f"coarse_factor={factor}; train a model on data of this resolution ratio."
            )

    def to_json(self) -> dict[str, Any]:
        """Everything but the parameters, as JSON-able data."""
        return {
            _MARKER: FORMAT_VERSION,
            "method": self.method,
            "config": self.config,
            "bands": list(self.bands),
            "coarse_factor": self.coarse_factor,
            "train_times": list(self.train_times),
            "history": self.history,
            "extra": self.extra,
        }

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the model to directory ``path`` atomically; returns the path.

        Raises
        ------
        ModelError
            If ``path`` exists and ``overwrite`` is False, or exists and is not a model.
        """
        path = Path(path)
        if path.exists():
            if not overwrite:
                raise ModelError(f"{path} already exists; pass overwrite=True or choose another path.")
            if not (path / "model.json").is_file():
                raise ModelError(f"{path} exists and is not a saved model; refusing to overwrite it.")
        with atomic_directory(path) as tmp:
            tmp.mkdir(parents=True)
            (tmp / "params.msgpack").write_bytes(serialization.msgpack_serialize(self.params))
            (tmp / "model.json").write_text(json.dumps(self.to_json(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FittedModel:
        """Read a model written by :meth:`save`.

        Raises
        ------
        ModelError
            Missing or unreadable directory, not a model, or an unsupported format version.
        """
        path = Path(path)
        meta_path = path / "model.json"
        if not meta_path.is_file():
            raise ModelError(f"no saved model at {path} (no model.json); save one with model.save({str(path)!r}).")
        try:
            meta: Mapping[str, Any] = json.loads(meta_path.read_text())
            params = serialization.msgpack_restore((path / "params.msgpack").read_bytes())
        except (OSError, ValueError) as err:
            raise ModelError(f"cannot read the model at {path} ({type(err).__name__}: {err}); save it again.") from err
        version = meta.get(_MARKER)
        if version != FORMAT_VERSION:
            raise ModelError(
                f"{path} holds model format version {version!r}, this stf_pipeline reads version {FORMAT_VERSION}; "
                "retrain the model or use the stf_pipeline version that wrote it."
            )
        return cls(
            method=str(meta["method"]),
            config=dict(meta["config"]),
            params=dict(params),
            bands=tuple(meta["bands"]),
            coarse_factor=meta.get("coarse_factor"),
            train_times=tuple(meta.get("train_times", ())),
            history=dict(meta.get("history", {})),
            extra=dict(meta.get("extra", {})),
        )
