"""STFDCNN's prediction parameters and the halo its networks need."""

from __future__ import annotations

import dataclasses
from typing import Any

from stf_pipeline.exceptions import MethodError, ModelError
from stf_pipeline.methods._base import MethodContext
from stf_pipeline.methods.stfdcnn.config import Architecture, default_lsr_factor

#: inference compute dtype -> JAX matmul/convolution precision
COMPUTE_DTYPES: dict[str, str] = {"float32": "highest", "tensorfloat32": "tensorfloat32", "bfloat16": "default"}




@dataclasses.dataclass(frozen=True)
class STFDCNNParams:
    """Prediction parameters of STFDCNN (the networks themselves come with the model).

    Attributes
    ----------
    weight_window : int, default 3
        Odd side of the local window (in pixels of each level: LSR pixels, then fine pixels)
        over which the mean transitional change ``|T_t - T_k|`` that weights pair ``k`` is taken.
    eps : float, default 1e-4
        Added to the mean change before inverting (reflectance units).
    min_reflectance : float, default 0.01
        Floor of both terms of the modulation ratio ``T_t / T_k`` (guards reflectance near 0
        and negative CNN outputs).
    max_gain : float, default 4.0
        The modulation ratio is clipped to ``[1 / max_gain, max_gain]``.
    compute_dtype : {"float32", "tensorfloat32", "bfloat16"}, default "float32"
        Arithmetic of the convolutions and the interpolation at inference. ``"float32"`` is exact
        single precision everywhere, so a chunked result equals the unchunked one to ~1e-6;
        on GPUs ``"tensorfloat32"`` (tensor cores, 10-bit mantissa: ~2e-3 reflectance apart, also
        between chunkings) and ``"bfloat16"`` are faster. On CPUs the first two are the same.
    halo : int, optional
        Context pixels per side the engine gives each chunk. Default: the model's receptive
        field (:func:`required_halo`), filled in by ``stf.fuse``; a smaller value raises
        :class:`~stf_pipeline.ModelError`.
    """

    weight_window: int = 3
    eps: float = 1e-4
    min_reflectance: float = 0.01
    max_gain: float = 4.0
    compute_dtype: str = "float32"
    halo: int | None = None

    def __post_init__(self) -> None:
        if self.weight_window < 1 or self.weight_window % 2 == 0:
            raise MethodError(
                f"stfdcnn: weight_window must be a positive odd number of pixels, got {self.weight_window}."
            )
        if not self.eps > 0:
            raise MethodError(f"stfdcnn: eps must be > 0, got {self.eps}.")
        if not self.min_reflectance > 0:
            raise MethodError(f"stfdcnn: min_reflectance must be > 0, got {self.min_reflectance}.")
        if not self.max_gain >= 1:
            raise MethodError(f"stfdcnn: max_gain must be >= 1, got {self.max_gain}.")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise MethodError(
                f"stfdcnn: compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, got {self.compute_dtype!r}."
            )
        if self.halo is not None and self.halo < 0:
            raise MethodError(f"stfdcnn: halo must be >= 0 pixels, got {self.halo}.")


def required_halo(arch: Architecture, params: STFDCNNParams) -> int:
    """Fine pixels of context one output pixel depends on.

    Fine level: weight window + SR receptive field; then, on the LSR grid (``r`` fine pixels
    each): the cubic interpolation's support (2), the weight window, the NLM receptive field and
    one pixel for the LSR block an output pixel sits in.
    """
    rho = params.weight_window // 2
    r = arch.lsr_factor
    return rho + arch.sr.receptive_radius + r * (2 + rho + arch.nlm.receptive_radius + 1)


def _prepare(params: STFDCNNParams, context: MethodContext, model: Any | None = None) -> STFDCNNParams:
    """Fill ``halo`` with the receptive field of the model's networks (unless given or no model yet)."""
    if context.coarse_factor is None:
        raise MethodError(
            "stfdcnn works on LSR pixels nested in native coarse pixels: the cube needs the attr "
            "'coarse_factor' (e.g. cube.attrs['coarse_factor'] = 16 for 480 m MODIS on 30 m Landsat)."
        )
    if params.halo is not None or model is None:
        return params
    arch, _, _ = _unpack(model)
    return dataclasses.replace(params, halo=required_halo(arch, params))


def _halo(params: STFDCNNParams, context: MethodContext) -> int:
    """``params.halo``; before a model is known (planning chunks), that of the default networks."""
    if params.halo is not None:
        return params.halo
    factor = context.coarse_factor or 1
    default = Architecture(bands=(), lsr_factor=default_lsr_factor(factor), coarse_factor=factor)
    return required_halo(default, params)


def _unpack(model: Any) -> tuple[Architecture, Any, Any]:
    """The architecture and the two networks' parameters of a trained STFDCNN model."""
    method = getattr(model, "method", None)
    if method != "stfdcnn":
        found = method if method is not None else type(model).__name__
        raise ModelError(
            f"stfdcnn needs a model trained with method='stfdcnn', got a model of {found!r}; "
            "train one with stf.train(cube, method='stfdcnn', train_times=[...])."
        )
    return Architecture.from_dict(model.config["architecture"]), model.params["nlm"], model.params["sr"]
