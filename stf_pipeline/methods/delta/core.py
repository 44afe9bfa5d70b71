"""``delta``'s NumPy kernel: the naive baseline, fine image plus coarse change.

For each pair i: ``F_i(t) = F(t_i) + C(t) - C(t_i)``. With two or more pairs the predictions are
averaged with weights ``1 / (m_i + eps)``, where ``m_i`` is the mean absolute coarse change
``|C(t) - C(t_i)|`` in a ``window × window`` neighbourhood (the temporal weight of ESTARFM,
Zhu et al. 2010, Eq. 11, here local rather than whole-window). A pair whose prediction is NaN at
a pixel gets no weight there.
"""

from __future__ import annotations

import numpy as np

from stf_pipeline.kernels.window import nanmean_window
from stf_pipeline.methods._base import MethodContext
from stf_pipeline.methods.delta.params import DeltaParams


def delta_kernel(
    fine: np.ndarray,
    coarse: np.ndarray,
    coarse_target: np.ndarray,
    *,
    params: DeltaParams,
    model: object | None = None,
) -> np.ndarray:
    """Fine + coarse change, inverse-change weighted over pairs. See module docstring."""
    change = coarse_target[None] - coarse  # (pair, band, y, x)
    predictions = fine + change
    if fine.shape[0] == 1:
        return predictions[0].astype(np.float32)
    mean_change = nanmean_window(np.abs(change), params.window // 2)
    weights = 1.0 / (mean_change + params.eps)
    weights = np.where(np.isfinite(predictions) & np.isfinite(weights), weights, 0.0)
    total = weights.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        fused = np.where(total > 0, (weights * np.nan_to_num(predictions)).sum(axis=0) / total, np.nan)
    return fused.astype(np.float32)


def halo(params: DeltaParams, context: MethodContext) -> int:
    return params.window // 2
