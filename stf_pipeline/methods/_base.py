"""The method protocol: what every fusion method gives the engine.

A method is a subpackage of :mod:`stf_pipeline.methods` whose ``__init__`` defines one
``METHOD = MethodSpec(...)`` and whose name is one line of the registry
(:data:`stf_pipeline.methods._MODULES`). The engine (:mod:`stf_pipeline.fusion`,
:mod:`stf_pipeline.parallel`) owns chunking, laziness and the choice of backend: it calls the
chosen kernel on overlapping NumPy blocks and trims ``halo`` pixels from each side.

Kernel contract
---------------
``kernel(fine, coarse, coarse_target, *, params, model=None) -> ndarray``

fine, coarse : float32 arrays ``(pair, band, y, x)``
    Fine and coarse reflectance at the pair dates, chronological. NaN marks missing data.
coarse_target : float32 array ``(band, y, x)``
    Coarse reflectance at the target date.
params : the method's frozen parameter dataclass ``P``.
model : a fitted model (learned methods only).

It returns float32 ``(band, y, x)``. A block is a window of the scene: at the scene edge the
block simply ends (no padding), so a kernel that treats "outside the block" as "no data" gives
a chunked result equal to the unchunked one, as long as every output pixel only depends on
inputs within ``halo`` pixels. Methods that work on native coarse pixels set
``coarse_aligned=True``: the engine then makes every block start on a multiple of
``coarse_factor``. A method declares one kernel per backend (``numpy``, ``numba``, ``jax``,
``pallas``) and which one ``backend="auto"`` takes on a CPU and on a GPU.

Block padding
-------------
A jitted kernel (backends in :data:`PADDED_BACKENDS`) compiles once per block shape, and the
blocks at the scene edge are smaller. ``block_padding`` says how a method gets one shape per scene:
``"nan"``, the engine pads a short block at its far ends (the end of ``y`` and ``x``) with NaN to
the scene's largest block shape and crops the result, which is exact for kernels that skip NaN
exactly as they skip "outside the block"; ``"kernel"``, the engine passes that shape as
``pad_to=(y, x)`` and the kernel pads itself (e.g. a network whose convolutions must see zeros at
the real extent: :mod:`stf_pipeline.kernels.padding`); ``"none"``, blocks keep their shapes.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeVar, get_args

import numpy as np

from stf_pipeline._compile_cache import enable_compilation_cache
from stf_pipeline._params import check_param_types
from stf_pipeline.exceptions import MethodError

if TYPE_CHECKING:
    from stf_pipeline.nn.model import FittedModel

#: Kernel implementations a method may declare.
Backend = Literal["numpy", "numba", "jax", "pallas"]
#: Kinds of JAX default device that ``backend="auto"`` distinguishes.
Device = Literal["cpu", "gpu"]
BACKENDS: tuple[str, ...] = get_args(Backend)
#: How a method's blocks get one shape per scene (see "Block padding" above).
BlockPadding = Literal["none", "nan", "kernel"]
BLOCK_PADDINGS: tuple[str, ...] = get_args(BlockPadding)
#: Backends whose kernels compile per block shape: the engine pads their blocks to one shape.
PADDED_BACKENDS: tuple[str, ...] = ("jax", "pallas")

P = TypeVar("P")
P_contra = TypeVar("P_contra", contravariant=True)


class Kernel(Protocol[P_contra]):
    """A pure block kernel (see the module docstring)."""

    def __call__(
        self,
        fine: np.ndarray,
        coarse: np.ndarray,
        coarse_target: np.ndarray,
        *,
        params: P_contra,
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
class SceneStatistics(Generic[P]):
    """Scene-wide values every block must share, so that a chunked result equals the unchunked one.

    Attributes
    ----------
    summarize : Callable[[fine, coarse, coarse_target, P], tuple | None]
        Array reductions of the whole pair and target arrays (e.g. a per-band standard deviation,
        a strided sample), written once for NumPy and Dask arrays alike (a Dask reduction stays
        lazy); ``None`` when ``params`` already hold the values. May raise :class:`MethodError`
        for inputs the method cannot use (e.g. a window larger than the scene).
    fit : Callable[[P, *summaries], P]
        The parameters with the statistics filled in, from the NumPy summaries.
    uses_target : bool, default True
        Whether ``summarize`` reads ``coarse_target``. ``False`` lets
        :func:`stf_pipeline.fuse_series` compute the statistics once for all the dates fused
        from the same pairs (each computation reads the whole pair images of the scene).

    The engine joins the two (:func:`stf_pipeline.parallel.fill_statistics`): eagerly for NumPy
    input, as one ``dask.delayed`` task for Dask input, so building a graph computes nothing.
    """

    summarize: Callable[[Any, Any, Any, P], tuple[Any, ...] | None]
    fit: Callable[..., P]
    uses_target: bool = True

    def __call__(self, fine: np.ndarray, coarse: np.ndarray, coarse_target: np.ndarray, params: P) -> P:
        """The parameters filled from NumPy inputs, now."""
        summaries = self.summarize(fine, coarse, coarse_target, params)
        return params if summaries is None else self.fit(params, *summaries)


def _accelerator_possible() -> bool:
    """Whether JAX could find an accelerator here: JAX is already imported, or ``JAX_PLATFORMS``
    names a platform other than the CPU, or an accelerator plugin (a ``jax_plugins`` module or
    entry point, ``libtpu``) is installed. Without any of these JAX has only its CPU backend."""
    if "jax" in sys.modules:
        return True
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return any(p.strip() not in ("", "cpu") for p in platforms.split(","))
    return _plugin_installed()


@functools.lru_cache(maxsize=1)
def _plugin_installed() -> bool:
    """Whether a JAX accelerator plugin is installed: asked once per process, since reading every
    installed distribution's entry points took 9 ms, on every fuse (a 2-core machine)."""
    if importlib.util.find_spec("jax_plugins") is not None or importlib.util.find_spec("libtpu") is not None:
        return True
    return bool(importlib.metadata.entry_points(group="jax_plugins"))


def device_kind() -> Device:
    """``"cpu"`` when JAX's default device is the CPU, else ``"gpu"`` (any accelerator).

    JAX (seconds to import) is only asked when an accelerator is possible at all
    (:func:`_accelerator_possible`), so a CPU-only process fusing with Numba never imports it.
    """
    if not _accelerator_possible():
        return "cpu"
    enable_compilation_cache()
    import jax

    return "cpu" if jax.default_backend() == "cpu" else "gpu"


@dataclasses.dataclass(frozen=True, eq=False)
class MethodSpec(Generic[P]):
    """Everything the engine needs to run one fusion method; ``P`` is its parameter dataclass.

    Attributes
    ----------
    name : str
        Registry name (``"starfm"``...).
    params_type : type[P]
        Frozen dataclass of the method's parameters; validates itself in ``__post_init__``.
    halo : Callable[[P, MethodContext], int]
        Pixels of context one output pixel needs on each side.
    kernels : Mapping[Backend, Kernel[P]]
        The block kernel of every backend the method implements.
    auto : Mapping[Device, Backend]
        The backend ``backend="auto"`` takes on each kind of device (e.g. ``{"cpu": "numba",
        "gpu": "pallas"}``); a device not listed takes ``reference``.
    reference : Backend | None
        The backend the others are checked against (default: ``"numpy"`` if declared, else the
        first of ``kernels``).
    kernel : Kernel[P] | None
        Filled in: a kernel that runs the ``auto`` backend of the device at call time.
    n_pairs : tuple[int, int]
        Minimum and maximum number of pair dates the method accepts.
    coarse_aligned : bool
        Blocks must start on native coarse pixel boundaries.
    learned : bool
        Needs a model from ``fit`` before ``fuse``.
    fit : Callable[..., FittedModel] | None
        ``fit(cube, *, train_times, config, ...) -> FittedModel`` for learned methods.
    prepare : Callable[[P, MethodContext, FittedModel | None], P] | None
        ``prepare(params, context, model=None) -> params``: fills context-dependent defaults (a
        search distance in metres turned into pixels, a halo equal to a model's receptive
        field) before the halo is computed.
    statistics : SceneStatistics[P] | None
        Scene-wide values every block shares (see :class:`SceneStatistics`).
    extra_vars : Callable[[P], tuple[str, ...]] | None
        Names of ``(y, x)`` cube variables (e.g. a land-cover class map) the kernel needs; they
        are overlapped like the images and passed to the kernel as ``extra={name: block}``.
    block_padding : {"none", "nan", "kernel"}
        How the blocks of a :data:`PADDED_BACKENDS` backend get one shape per scene, so its jitted
        kernel compiles once (see the module docstring): the engine pads with NaN, the kernel
        pads itself to ``pad_to``, or no padding.
    device_inputs : tuple of Backend
        Backends whose kernel takes the block's images as JAX device arrays as well as NumPy
        (it moves them with :func:`~stf_pipeline.kernels.device.to_device`, which leaves device
        arrays there): on this process's GPU the engine may then send a scene's chunks to the
        device as they are read and run the scene as one block there
        (:func:`~stf_pipeline.parallel.map_on_device`).
    """

    name: str
    params_type: type[P]
    halo: Callable[[P, MethodContext], int]
    kernels: Mapping[Backend, Kernel[P]] = dataclasses.field(default_factory=dict)
    auto: Mapping[Device, Backend] = dataclasses.field(default_factory=dict)
    reference: Backend | None = None
    kernel: Kernel[P] | None = None
    n_pairs: tuple[int, int] = (1, 2)
    coarse_aligned: bool = False
    learned: bool = False
    fit: Callable[..., FittedModel] | None = None
    prepare: Callable[..., P] | None = None
    statistics: SceneStatistics[P] | None = None
    extra_vars: Callable[[P], tuple[str, ...]] | None = None
    block_padding: BlockPadding = "none"
    device_inputs: tuple[Backend, ...] = ()

    def __post_init__(self) -> None:
        if self.block_padding not in BLOCK_PADDINGS:
            raise MethodError(
                f"method {self.name!r}: block_padding {self.block_padding!r} is not one of {list(BLOCK_PADDINGS)}."
            )
        kernels = dict(self.kernels)
        if not kernels:
            raise MethodError(f"method {self.name!r} declares no kernel; pass kernels={{'numpy': ...}}.")
        unknown = sorted(set(kernels) - set(BACKENDS))
        if unknown:
            raise MethodError(
                f"method {self.name!r} declares unknown backend(s) {unknown}; backends are {list(BACKENDS)}."
            )
        object.__setattr__(self, "kernels", kernels)
        undeclared = sorted(set(self.device_inputs) - set(kernels))
        if undeclared:
            raise MethodError(
                f"method {self.name!r}: device_inputs {undeclared} are not among its kernels {list(kernels)}."
            )
        if self.reference is None:
            object.__setattr__(self, "reference", "numpy" if "numpy" in kernels else next(iter(kernels)))
        declared: list[tuple[str, Any]] = [*self.auto.items(), ("reference", self.reference)]
        for device, backend in declared:
            if backend not in kernels:
                raise MethodError(
                    f"method {self.name!r}: {device} backend {backend!r} is not among its kernels {list(kernels)}."
                )
        if self.kernel is None:
            object.__setattr__(self, "kernel", _AutoKernel(self))

    @property
    def backends(self) -> tuple[Backend, ...]:
        """The backends this method implements."""
        return tuple(self.kernels)

    def resolve_backend(self, backend: str = "auto") -> Backend:
        """The backend ``backend`` names: itself if declared; for ``"auto"``, the ``auto`` choice for
        JAX's default device (a method with one backend never asks the device).

        Raises
        ------
        MethodError
            If the method has no such backend.
        """
        if backend == "auto":
            if len(self.kernels) == 1:
                return next(iter(self.kernels))
            return self.auto.get(device_kind(), self.reference) or self.backends[0]
        if backend not in self.kernels:
            raise MethodError(
                f"method {self.name!r} has no {backend!r} backend; choose one of {['auto', *self.backends]}."
            )
        return backend  # type: ignore[return-value]

    def padding_for(self, backend: str = "auto") -> BlockPadding:
        """The block padding the engine applies for ``backend``: ``block_padding`` for a backend that
        compiles per shape (:data:`PADDED_BACKENDS`), else ``"none"`` (padding would only add work)."""
        return self.block_padding if self.resolve_backend(backend) in PADDED_BACKENDS else "none"

    def kernel_for(self, backend: str = "auto") -> Kernel[P]:
        """The block kernel of ``backend`` (see :meth:`resolve_backend`); for a JAX backend, with
        JAX's persistent compilation cache on (:func:`~stf_pipeline._compile_cache.enable_compilation_cache`)."""
        chosen = self.resolve_backend(backend)
        if chosen in ("jax", "pallas"):
            enable_compilation_cache()
        return self.kernels[chosen]

    def make_params(self, params: P | None = None, **overrides: Any) -> P:
        """Build the parameter dataclass, rejecting unknown names with the valid ones listed and
        values of the wrong type with the expected type named."""
        if params is not None and not isinstance(params, self.params_type):
            raise MethodError(
                f"params for method {self.name!r} must be a {self.params_type.__name__}, "
                f"got {type(params).__name__}; pass keyword arguments instead."
            )
        valid = {f.name for f in dataclasses.fields(self.params_type)}  # type: ignore[arg-type]
        unknown = sorted(set(overrides) - valid)
        if unknown:
            hint = " (backend= is an argument of stf.fuse)" if "backend" in unknown else ""
            raise MethodError(
                f"unknown parameter(s) {unknown} for method {self.name!r}; "
                f"valid parameters are {sorted(valid)}{hint}."
            )
        check_param_types(self.params_type, overrides, method=self.name)
        base = params if params is not None else self.params_type()
        return dataclasses.replace(base, **overrides) if overrides else base  # type: ignore[type-var]


@dataclasses.dataclass(frozen=True, eq=False)
class _AutoKernel:
    """A method's kernel for ``backend="auto"``, chosen when called (by the device of that moment)."""

    spec: MethodSpec[Any] = dataclasses.field(repr=False)

    def __call__(self, fine: np.ndarray, coarse: np.ndarray, coarse_target: np.ndarray, **kwargs: Any) -> np.ndarray:
        return self.spec.kernel_for("auto")(fine, coarse, coarse_target, **kwargs)


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
