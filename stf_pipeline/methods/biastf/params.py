"""BiaSTF's inference parameters, their context-dependent defaults and the halo."""

from __future__ import annotations

import dataclasses
from typing import Any

from stf_pipeline.exceptions import MethodError
from stf_pipeline.kernels.interpolate import SUPPORT_CELLS
from stf_pipeline.methods._base import MethodContext
from stf_pipeline.methods.biastf.config import NET_RADIUS

DTYPES: tuple[str, ...] = ("float32", "tensorfloat32", "bfloat16")
FUSION_WEIGHTS: tuple[str, ...] = ("variance", "change", "similarity")
#: numbers of orientations the geometric self-ensemble may average (the identity, the flips, all eight)
SELF_ENSEMBLES: tuple[int, ...] = (1, 4, 8)
#: default power of the ``"variance"`` weights: below 1 (inverse variance) because the coarse
#: change's moments only estimate a direction's error; 0.5 had a lower RMSE and a higher SSIM
#: than the previous ``1 / S`` weights on every study run and real set, higher powers lost SSIM on
#: some (``docs/methods/biastf.md``)
VARIANCE_POWER = 0.5


@dataclasses.dataclass(frozen=True)
class BiaSTFParams:
    """Inference parameters of ``biastf`` (the networks come from the fitted model).

    Attributes
    ----------
    window : int, optional
        Odd side (fine pixels) of the neighbourhood over which each transitional prediction is
        compared with the target coarse image; default ``coarse_factor`` rounded up to odd (15 when
        the cube has no ``coarse_factor``).
    eps : float, default 1e-3
        Added to the mean absolute difference before inverting (reflectance units).
    weights : {"variance", "change", "similarity"}, default "variance"
        What the fusion ``f`` weights each direction by
        (:func:`~stf_pipeline.methods.biastf.kernel.fuse_directions`): ``"variance"``, the inverse
        of ``(S + eps)² + V²``, with ``S`` the local mean absolute coarse change ``|C(k) - C(j)|``
        over ``window`` and ``V²`` the variance of ``C(k) - C(j)`` over ``spread_window`` (an
        estimate of the direction's squared error); ``"change"``, the inverse of ``S + eps``; or
        ``"similarity"``, the prediction's local mean difference with ``C(k)`` (the paper's
        wording, degenerate under a sensor bias).
    weight_power : float, optional
        The weights above raised to this power (:attr:`power`); default 0.5 for ``"variance"``
        (:data:`VARIANCE_POWER`), 1 for the others (``"change"`` with 2 is inverse-variance
        weighting when a direction's error grows in proportion to ``S``).
    spread_window : int, optional
        Odd side (fine pixels) of the neighbourhood of ``V`` (``weights="variance"``); default
        three coarse pixels (:func:`default_spread_window`), so that it sees how the change varies
        between neighbouring coarse pixels.
    self_ensemble : {1, 4, 8}, default 4
        Orientations of the block the networks see, their corrections mapped back and averaged
        (geometric self-ensemble): 1 the block as it is, 4 its flips, 8 every flip and 90-degree
        rotation (what training augments with). Costs that many forward passes; 4 gave lower
        RMSE and higher SSIM than 1 on every scene and seed of the study, as much as 8
        (``docs/methods/biastf.md``).
    dtype : {"tensorfloat32", "float32", "bfloat16"}, default "tensorfloat32"
        Computation of the networks: float32 at the device's default precision (TF32 tensor cores
        on NVIDIA GPUs, 4e-5 to 4e-4 off full float32; plain float32 on CPUs), float32 at full precision
        (9x slower on an H100), or bfloat16 (fastest, up to 3e-3 off).
    extrapolate : bool, default False
        Apply the networks' corrections also where the coarse change is beyond the range seen in
        training; by default they fade out there (module docstring).
    """

    window: int | None = None
    eps: float = 1e-3
    weights: str = "variance"
    weight_power: float | None = None
    spread_window: int | None = None
    self_ensemble: int = 4
    dtype: str = "tensorfloat32"
    extrapolate: bool = False

    def windows(self, coarse_factor: int | None) -> tuple[int, int]:
        """``window`` and ``spread_window``, each from the cube's ``coarse_factor`` where it is not
        given (:func:`default_window`, :func:`default_spread_window`)."""
        return (
            default_window(coarse_factor) if self.window is None else self.window,
            default_spread_window(coarse_factor) if self.spread_window is None else self.spread_window,
        )

    @property
    def power(self) -> float:
        """The power of ``f``'s weights: ``weight_power``, or the default of the ``weights``."""
        if self.weight_power is not None:
            return float(self.weight_power)
        return VARIANCE_POWER if self.weights == "variance" else 1.0

    def __post_init__(self) -> None:
        if self.window is not None and (self.window < 1 or self.window % 2 == 0):
            raise MethodError(f"biastf: window must be a positive odd number of pixels, got {self.window}.")
        if self.spread_window is not None and (self.spread_window < 1 or self.spread_window % 2 == 0):
            raise MethodError(
                f"biastf: spread_window must be a positive odd number of pixels, got {self.spread_window}."
            )
        if not self.eps > 0:
            raise MethodError(f"biastf: eps must be > 0, got {self.eps}.")
        if self.weights not in FUSION_WEIGHTS:
            raise MethodError(f"biastf: weights must be one of {FUSION_WEIGHTS}, got {self.weights!r}.")
        if self.weight_power is not None and not self.weight_power > 0:
            raise MethodError(f"biastf: weight_power must be > 0, got {self.weight_power}.")
        if self.self_ensemble not in SELF_ENSEMBLES:
            raise MethodError(f"biastf: self_ensemble must be one of {SELF_ENSEMBLES}, got {self.self_ensemble!r}.")
        if self.dtype not in DTYPES:
            raise MethodError(f"biastf: dtype must be one of {DTYPES}, got {self.dtype!r}.")


def default_window(coarse_factor: int | None) -> int:
    """The default ``window``: ``coarse_factor`` rounded up to odd, 15 without one."""
    factor = coarse_factor or 15
    return factor if factor % 2 else factor + 1


def default_spread_window(coarse_factor: int | None) -> int:
    """The default ``spread_window``: three coarse pixels (``3 coarse_factor``, 15 without one),
    rounded up to odd."""
    side = 3 * (coarse_factor or 15)
    return side if side % 2 else side + 1


def _prepare(params: BiaSTFParams, context: MethodContext, model: Any = None) -> BiaSTFParams:
    window, spread = params.windows(context.coarse_factor)
    return dataclasses.replace(params, window=window, spread_window=spread)


def _halo(params: BiaSTFParams, context: MethodContext) -> int:
    """The networks' receptive field (``G`` then ``B``) plus the reach of ``f``'s windows, or of the
    coarse interpolation (``SUPPORT_CELLS`` native pixels, which a model may have been trained with)."""
    window, spread = params.windows(context.coarse_factor)
    reach = max(window, spread) if params.weights == "variance" else window
    return 2 * NET_RADIUS + max(reach // 2, SUPPORT_CELLS * (context.coarse_factor or 0))
