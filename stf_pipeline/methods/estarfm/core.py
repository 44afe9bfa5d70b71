"""ESTARFM (Zhu et al. 2010): the NumPy reference, the host kernels and the engine hooks.

Zhu, X., Chen, J., Gao, F., Chen, X., Masek, J. G. (2010). An enhanced spatial and temporal
adaptive reflectance fusion model for complex heterogeneous regions. Remote Sensing of
Environment 114(11), 2610-2623; computed as the authors' IDL/Python code does.

With two pairs ``(F_1, C_1)``, ``(F_2, C_2)`` and the coarse image ``C_0`` of the target date, for
every pixel ``p`` with valid data in all five images:

1. *similar pixels* ``q`` of the ``(2w+1)²`` window: ``|F_k(q) - F_k(p)| < 2 σ(F_k) / n_classes`` in
   every band on both pair dates (``σ``: the scene standard deviation of the band);
2. weights ``1 / ((1 - R(q)) D(q) + 1e-7)``, normalised, with ``R(q)`` the correlation of the fine
   and coarse spectra of ``q`` (all bands of both dates; ``1 - |F - C| / (F + C)`` averaged over
   the dates for one band; 0.5 where undefined, as the code does) and ``D = 1 + d / w``;
3. the conversion coefficient ``V`` per band: the slope of the least-squares regression of
   fine on coarse over the similar pixels of both dates, kept where the mean coarse change of
   the similar pixels between the pair dates is at least ``min_coarse_change``, the regression
   is significant (F test, ``p <= significance``) and ``0 < V <= max_conversion``; else 1;
4. ``F_0k = F_k(p) + Σ w V (C_0 - C_k)`` over the similar pixels, combined with temporal weights
   ``T_k ∝ 1 / |mean C_0 - mean C_k|`` (means over the valid pixels of the window); where the
   result leaves ``value_range`` the weighted mean of the similar pixels' fine values replaces
   ``F_k(p) + ...``; with fewer than ``min_similar`` similar pixels,
   ``F_0 = Σ_k T_k (F_k(p) + mean C_0 - mean C_k)``.

Pixels outside the block are missing, never zero, so chunked runs equal the whole-scene run
(the authors' code cuts the scene into blocks without overlap, which makes seams).
NaN never enters a statistic; a pixel with a missing input is NaN.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from stf_pipeline.exceptions import MethodError
from stf_pipeline.kernels.pool import compile_ahead, compile_in_child
from stf_pipeline.kernels.similar import accumulate_numpy, f_critical
from stf_pipeline.kernels.stats import ClassStd, quiet_nan, scene_std
from stf_pipeline.kernels.window import box_sum
from stf_pipeline.methods._base import MethodContext
from stf_pipeline.methods.estarfm.numba import PREDICTION_KERNELS, estarfm_finish, estarfm_sums
from stf_pipeline.methods.estarfm.numba import spectral_correlation as compiled_correlation
from stf_pipeline.methods.estarfm.params import EstarfmParams

#: Added to ``(1 - R) D`` before inverting (Zhu's code: ``+ 0.0000001``).
WEIGHT_EPS = 1e-7
#: Added to the window-mean coarse changes before inverting (Zhu's code: ``0.01**5``).
CHANGE_EPS = 0.01**5


def spectral_correlation(fine: np.ndarray, coarse: np.ndarray) -> np.ndarray:
    """``R`` of every pixel: correlation of its fine and coarse spectra over both pair dates.

    One band: ``1 - (|F_1 - C_1| / (F_1 + C_1) + |F_2 - C_2| / (F_2 + C_2)) / 2``. Undefined
    values are 0.5 (Zhu's code). ``fine``, ``coarse``: ``(pair, band, y, x)``.
    """
    return compiled_correlation(fine, coarse)


def body(xp: Any, c: Any, q: Any, dist: Any, k: Any) -> tuple[Any, ...]:
    similar = xp.abs(q["fine"] - c["fine"]) < k["threshold"]
    similar = xp.all(similar.reshape((-1, *similar.shape[2:])), axis=0)
    m = similar.astype(q["spread"].dtype)
    w = m / (q["spread"] * (1.0 + dist * k["inverse_radius"]) + WEIGHT_EPS)
    x1 = m * (q["coarse0"][0] - c["coarse1"])
    x2 = m * (q["coarse0"][1] - c["coarse1"])
    y1 = m * (q["fine0"][0] - c["fine1"])
    y2 = m * (q["fine0"][1] - c["fine1"])
    return (m, w, *sum_terms(w, q["change"], q["fine0"], x1, x2, y1, y2))


def sum_terms(w: Any, change: Any, fine0: Any, x1: Any, x2: Any, y1: Any, y2: Any) -> tuple[Any, ...]:
    """A neighbour's increments of the ten per-band window sums, in their order: the weighted
    coarse changes and fine values of both dates, then the regression sums (``x``: coarse,
    ``y``: fine, both dates, relative to the centre pixel's first date)."""
    return (
        w * change[0],
        w * change[1],
        w * fine0[0],
        w * fine0[1],
        x1 + x2,
        x1 - x2,
        y1 + y2,
        x1 * x1 + x2 * x2,
        y1 * y1 + y2 * y2,
        x1 * y1 + x2 * y2,
    )


def _spread(xp: Any, fine0: Any, coarse0: Any) -> Any:
    """``1 - R`` per pixel: the compiled float64 :func:`spectral_correlation` for NumPy; the same
    formula in float32 for ``jax.numpy``."""
    if xp is np:
        return 1.0 - spectral_correlation(fine0, coarse0)
    f = fine0.reshape((-1, *fine0.shape[2:]))
    c = coarse0.reshape((-1, *coarse0.shape[2:]))
    if fine0.shape[1] == 1:
        r = 1.0 - 0.5 * xp.abs((f - c) / (f + c)).sum(axis=0)
    else:
        df = f - f.mean(axis=0)
        dc = c - c.mean(axis=0)
        r = (df * dc).sum(axis=0) / xp.sqrt((df * df).sum(axis=0) * (dc * dc).sum(axis=0))
    return 1.0 - xp.where(xp.isfinite(r), r, 0.5)


def prepare_arrays(
    xp: Any, fine: Any, coarse: Any, coarse_target: Any
) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """The centre and neighbour arrays of the body and the valid mask, NumPy or ``jax.numpy``."""
    fine = xp.asarray(fine, dtype=np.float32)
    coarse = xp.asarray(coarse, dtype=np.float32)
    target = xp.asarray(coarse_target, dtype=np.float32)
    # pixels with data in every band of all five images
    valid = xp.isfinite(fine).all(axis=(0, 1)) & xp.isfinite(coarse).all(axis=(0, 1)) & xp.isfinite(target).all(axis=0)
    zero = np.float32(0)
    fine0 = xp.where(valid, fine, zero)
    coarse0 = xp.where(valid, coarse, zero)
    target0 = xp.where(valid, target, zero)
    neighbour = {
        "fine": xp.where(valid, fine, np.float32(np.nan)),
        "spread": xp.where(valid, _spread(xp, fine0, coarse0), 1.0).astype(np.float32),
        "fine0": fine0,
        "coarse0": coarse0,
        "change": target0[None] - coarse0,
    }
    centre = {"fine": neighbour["fine"], "fine1": fine0[0], "coarse1": coarse0[0]}
    return centre, neighbour, valid


def scene_constants(fine: np.ndarray, params: EstarfmParams) -> dict[str, Any]:
    if np.shape(fine)[0] != 2:
        raise MethodError(
            f"estarfm takes exactly 2 pairs (one before and one after the target), got {np.shape(fine)[0]}; "
            "pass pairs=[before, after] or use method='starfm' for one pair."
        )
    std = params.class_std if params.class_std is not None else scene_std(fine)
    std_arr = np.asarray(std, dtype=np.float64)
    if std_arr.shape != np.shape(fine)[:2]:
        raise MethodError(
            f"estarfm: class_std has shape {std_arr.shape} but the pairs and bands are {np.shape(fine)[:2]}; "
            "leave class_std=None to compute it from the scene."
        )
    return {
        "threshold": (std_arr * 2.0 / params.n_classes).astype(np.float32)[:, :, None, None],
        "inverse_radius": np.float32(1.0 / params.half_window),
    }


def accumulators(bands: int, dtype: Any) -> list[tuple[tuple[int, ...], Any]]:
    # similar-pixel count and weight total, then ten per-band sums (see body)
    return [((), dtype), ((), dtype)] + [((bands,), dtype)] * 10


#: Neighbours outside a block: missing (NaN fine), no spread, zero sums.
FILLS = {"spread": 1.0, "fine0": 0.0, "coarse0": 0.0, "change": 0.0}


@functools.lru_cache(maxsize=8)
def f_table(max_n: int, alpha: float) -> np.ndarray:
    return f_critical(max_n, alpha)


def finish(
    accs: list[np.ndarray],
    fine: np.ndarray,
    coarse: np.ndarray,
    coarse_target: np.ndarray,
    valid: np.ndarray,
    params: EstarfmParams,
) -> np.ndarray:
    """Per-pixel ESTARFM prediction from the window sums on the host (float64, compiled:
    :func:`stf_pipeline.methods.estarfm.numba.estarfm_finish`)."""
    c = np.asarray(coarse, dtype=np.float64)
    t = np.asarray(coarse_target, dtype=np.float64)
    radius = params.half_window
    # temporal weights: window means of the coarse changes over the valid pixels
    n_valid = box_sum(valid, radius)
    change_sum = np.stack([box_sum(np.where(valid, t - c[k], 0.0), radius) for k in (0, 1)])
    return estarfm_finish(
        accs,
        fine,
        change_sum,
        n_valid,
        valid,
        f_table(2 * (2 * radius + 1) ** 2, params.significance),
        value_range=params.value_range,
        min_coarse_change=params.min_coarse_change,
        max_conversion=params.max_conversion,
        min_similar=params.min_similar,
        change_eps=CHANGE_EPS,
    )


def on_host(
    fine: np.ndarray,
    coarse: np.ndarray,
    coarse_target: np.ndarray,
    *,
    params: EstarfmParams,
    model: object | None = None,
    compiled: bool,
) -> np.ndarray:
    """ESTARFM prediction of one block on the CPU (see module docstring): the window sums offset by
    offset with whole-array operations (the reference), or (``compiled``) compiled per pixel
    (:func:`stf_pipeline.methods.estarfm.numba.estarfm_sums`; fastest on CPUs), both with float64
    accumulation; then the compiled float64 prediction.

    Parameters
    ----------
    fine, coarse : float32 ``(2, band, y, x)``
    coarse_target : float32 ``(band, y, x)``
    params : EstarfmParams

    Returns
    -------
    float32 ``(band, y, x)``
    """
    if compiled:
        compile_in_child("estarfm-prediction", f"{__name__}:warm_prediction", PREDICTION_KERNELS)
        compile_ahead("estarfm", functools.partial(_warm_compiled, params))
    constants = scene_constants(fine, params)
    centre, neighbour, valid = prepare_arrays(np, fine, coarse, coarse_target)
    if compiled:
        accs = estarfm_sums(centre, neighbour, constants, radius=params.half_window, eps=WEIGHT_EPS)
    else:
        accs = accumulate_numpy(
            body,
            centre,
            neighbour,
            constants,
            radius=params.half_window,
            accumulators=accumulators(np.shape(fine)[1], np.float64),
            shape=np.shape(coarse_target)[-2:],
        )
    with quiet_nan():
        return finish(accs, fine, coarse, coarse_target, valid, params)


def _tiny_pairs() -> tuple[np.ndarray, np.ndarray]:
    """Fine and coarse images of 2 pairs, 2 bands, 4 x 4 pixels: the warm-ups' input."""
    rng = np.random.default_rng(0)
    fine, coarse = (rng.uniform(0.1, 0.3, (2, 2, 4, 4)).astype(np.float32) for _ in range(2))
    return fine, coarse


def _warm_compiled(params: EstarfmParams) -> None:
    """The compiled path on a 2-pair, 2-band 4 x 4 block (several bands: the spectral correlation
    is compiled too): compiles (or loads) every kernel it calls."""
    fine, coarse = _tiny_pairs()
    on_host(fine, coarse, coarse[0], params=dataclasses.replace(params, class_std=None), compiled=True)


def warm_prediction() -> None:
    """Compile (or load) the kernels of :func:`finish`, :data:`PREDICTION_KERNELS`, on zero sums
    of a 2-band 4 x 4 block: the last kernels of the compiled path, which a child process compiles
    while a cold process compiles the window sums (:func:`~stf_pipeline.kernels.pool.compile_in_child`)."""
    fine, coarse = _tiny_pairs()
    accs = [np.zeros((4, 4))] * 2 + [np.zeros((2, 4, 4))] * 10
    finish(accs, fine, coarse, coarse[0], np.ones((4, 4), dtype=bool), EstarfmParams())


#: ESTARFM of one block, backend ``numpy`` (the reference).
estarfm_numpy = functools.partial(on_host, compiled=False)
#: ESTARFM of one block, backend ``numba``.
estarfm_numba = functools.partial(on_host, compiled=True)


def halo(params: EstarfmParams, context: MethodContext) -> int:
    return params.half_window


#: ``MethodSpec.statistics``: the scene std of each fine band, once for the whole scene.
STATISTICS = ClassStd("estarfm")
