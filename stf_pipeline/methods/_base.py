"""The method protocol: what every fusion method gives the engine.

A method is a module in :mod:`stf_pipeline.methods` that defines one module-level
``METHOD = MethodSpec(...)``. The engine (:mod:`stf_pipeline.parallel`) owns chunking:
it calls ``kernel`` on overlapping NumPy blocks and trims ``halo`` pixels from each side.

Kernel contract
---------------
``kernel(fine, coarse, coarse_target, *, params, model=None) -> ndarray``

fine, coarse : float32 arrays ``(pair, band, y, x)``
    Fine and coarse reflectance at the pair dates, in the order the task gives them
    (chronological). NaN marks missing observations.
coarse_target : float32 array ``(band, y, x)``
    Coarse reflectance at the target date.
params : the method's frozen parameter dataclass.
model : a fitted model (learned methods only).

It returns float32 ``(band, y, x)``. A block is a window of the scene: at the scene edge the
block simply ends (no padding), so a kernel that treats "outside the block" as "no data" gives
a chunked result equal to the unchunked one, as long as every output pixel only depends on
inputs within ``halo`` pixels. Methods that work on native coarse pixels set
``coarse_aligned=True``: the engine then makes every block start on a multiple of
``coarse_factor`` (halo and chunks are rounded up to multiples of it) and passes
``coarse_factor`` through ``params`` or ``context``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from stf_pipeline._params import check_param_types
from stf_pipeline.exceptions import MethodError


class Kernel(Protocol):
    def __call__(
        self,
        fine: np.ndarray,
        coarse: np.ndarray,
        coarse_target: np.ndarray,
        *,
        params: Any,
        model: Any | None = None,
    ) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class MethodContext:
    """Facts about the cube a method may need to size its halo or parameters.

    Attributes
    ----------
    coarse_factor : int | None
        Native coarse pixel size in fine pixels (cube attr ``coarse_factor``).
    pixel_size : float
        Fine pixel size in CRS units (metres for projected CRSs); 1.0 when unknown.
    n_bands : int
        Number of bands in the cube.
    """

    coarse_factor: int | None
    pixel_size: float
    n_bands: int


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """Everything the engine needs to run one fusion method.

    Attributes
    ----------
    name : str
        Registry name (``"starfm"``...).
    params_type : type
        Frozen dataclass of the method's parameters; validates itself in ``__post_init__``.
    kernel : Kernel
        Pure block kernel (see module docstring).
    halo : Callable[[params, MethodContext], int]
        Pixels of context one output pixel needs on each side.
    n_pairs : tuple[int, int]
        Minimum and maximum number of pair dates the method accepts.
    coarse_aligned : bool
        Blocks must start on native coarse pixel boundaries.
    learned : bool
        Needs a model from ``fit`` before ``fuse``.
    fit : Callable | None
        ``fit(cube, *, train_times, config, ...) -> FittedModel`` for learned methods.
    prepare : Callable | None
        ``prepare(params, context) -> params``: fills context-dependent defaults (e.g. a search
        distance in metres turned into pixels) before the halo is computed. Learned methods get
        ``prepare(params, context, model=model)`` (e.g. a halo equal to the model's receptive field).
    statistics : Callable | None
        ``statistics(fine, coarse, coarse_target, params) -> params``: fills scene-wide
        statistics (e.g. the per-band standard deviation behind STARFM's similarity threshold)
        from the whole pair arrays, so that every block uses the same values and a chunked result
        equals the unchunked one. Given Dask arrays it returns a ``dask.delayed`` params object
        (the engine stays lazy); given NumPy arrays, the params themselves.
    extra_vars : Callable | None
        ``extra_vars(params) -> tuple[str, ...]``: names of ``(y, x)`` cube variables (e.g. a
        land-cover class map) the kernel needs; they are overlapped like the images and passed
        to the kernel as ``extra={name: block}``.
    """

    name: str
    params_type: type
    kernel: Kernel
    halo: Callable[[Any, MethodContext], int]
    n_pairs: tuple[int, int] = (1, 2)
    coarse_aligned: bool = False
    learned: bool = False
    fit: Callable[..., Any] | None = None
    prepare: Callable[..., Any] | None = None
    statistics: Callable[[Any, Any, Any, Any], Any] | None = None
    extra_vars: Callable[[Any], tuple[str, ...]] | None = None

    def make_params(self, params: Any | None = None, **overrides: Any) -> Any:
        """Build the parameter dataclass, rejecting unknown names with the valid ones listed and
        values of the wrong type with the expected type named."""
        if params is not None and not isinstance(params, self.params_type):
            raise MethodError(
                f"params for method {self.name!r} must be a {self.params_type.__name__}, "
                f"got {type(params).__name__}; pass keyword arguments instead."
            )
        valid = {f.name for f in dataclasses.fields(self.params_type)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise MethodError(
                f"unknown parameter(s) {unknown} for method {self.name!r}; "
                f"valid parameters are {sorted(valid)}."
            )
        check_param_types(self.params_type, overrides, method=self.name)
        base = params if params is not None else self.params_type()
        return dataclasses.replace(base, **overrides) if overrides else base


def params_to_attrs(params: Any) -> Mapping[str, Any]:
    """Flatten a parameter dataclass into attrs-safe values (for provenance in outputs)."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(params):
        value = getattr(params, field.name)
        if value is None:
            value = "None"
        elif isinstance(value, (tuple, list)):
            value = list(value)
        elif not isinstance(value, (int, float, str, bool)):
            value = str(value)
        out[field.name] = value
    return out
