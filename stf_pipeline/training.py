"""``stf.train`` and ``stf.load_model``: fit a learned method on a cube, and read a saved model."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xarray as xr

from stf_pipeline._compile_cache import enable_compilation_cache
from stf_pipeline.cube import validate_cube
from stf_pipeline.exceptions import MethodError, ModelError
from stf_pipeline.methods import available_methods, get_method
from stf_pipeline.task import DateLike

if TYPE_CHECKING:
    from stf_pipeline.nn.model import FittedModel


def train(
    cube: xr.Dataset,
    *,
    method: str,
    train_times: Sequence[DateLike] | None = None,
    config: Any | None = None,
    workdir: str | os.PathLike[str] | None = None,
    val_times: Sequence[DateLike] | None = None,
    **options: Any,
) -> FittedModel:
    """Train the learned ``method`` on ``cube`` and return its :class:`~stf_pipeline.nn.FittedModel`.

    Parameters
    ----------
    cube : xarray.Dataset
        A cube; only the dates in ``train_times`` (and ``val_times``) are read.
    method : str
        A learned method: ``"biastf"`` or ``"stfdcnn"``.
    train_times : sequence of date-like, optional
        Dates with both fine and coarse images to learn from. Default: the cube's
        ``stf_train_times`` attr (catalog splits), else every date with a fine image.
    config : optional
        The method's configuration: its config dataclass, a mapping of its fields (nested
        ``train`` mapping for the optimisation settings), a preset name, or None: a
        configuration sized to the device (a GPU, or the CPU's memory), trained until a
        held-out training date stops improving.
    workdir : path-like, optional
        Directory for checkpoints, loss history and loss-curve figure; a rerun with the same
        workdir resumes a killed or interrupted (Ctrl-C) training from its last checkpoint.
    val_times : sequence of date-like, optional
        Held-out dates for the validation loss and early stopping. Default: the method holds
        out one of ``train_times`` (three or more) and says so in the model's ``extra``.
    **options
        Further keyword arguments of the method's ``fit``.

    Returns
    -------
    FittedModel

    Raises
    ------
    MethodError
        Unknown or non-learned method.
    ConfigError, TaskError, ModelError
        From the method (bad configuration, dates, or checkpoint of another model).

    Examples
    --------
    >>> model = stf.train(  # doctest: +SKIP
    ...     cube, method="biastf", train_times=cube.time[[0, 1, 3]].values, config="tiny"
    ... )
    >>> model.save("biastf.model")  # doctest: +SKIP
    """
    validate_cube(cube)
    spec = get_method(method)
    if not spec.learned or spec.fit is None:
        learned = [name for name in available_methods() if get_method(name).learned]
        raise MethodError(f"method {spec.name!r} is not learned and needs no training; learned methods are {learned}.")
    if train_times is None:
        train_times = default_train_times(cube)
    enable_compilation_cache()
    return spec.fit(
        cube,
        train_times=list(train_times),
        config=config,
        workdir=None if workdir is None else Path(workdir),
        val_times=None if val_times is None else list(val_times),
        **options,
    )


def default_train_times(cube: xr.Dataset) -> list[str]:
    """The cube's ``stf_train_times`` attr (catalog splits), else every date with a fine image."""
    import numpy as np

    from stf_pipeline.task import valid_fraction

    listed = list(cube.attrs.get("stf_train_times") or [])
    if listed:
        return [str(t) for t in listed]
    return [
        str(np.datetime_as_string(t, unit="D"))
        for t, f in zip(cube["time"].values, valid_fraction(cube, "fine"), strict=True)
        if f > 0
    ]


def load_model(path: str | os.PathLike[str]) -> FittedModel:
    """Read a model saved with ``model.save(path)``.

    Raises
    ------
    ModelError
        Not a model, an unsupported format version, or a model of a method not installed.
    """
    from stf_pipeline.nn.model import FittedModel

    model = FittedModel.load(path)
    try:
        spec = get_method(model.method)
    except MethodError as err:
        raise ModelError(
            f"the model at {path} was made by method {model.method!r}, which is not available: {err}"
        ) from None
    if not spec.learned:
        raise ModelError(f"the model at {path} names method {model.method!r}, which is not a learned method.")
    return model


__all__: list[str] = ["default_train_times", "load_model", "train"]
