"""STARFM (Gao et al. 2006): the NumPy reference (backend ``numpy``) and the engine hooks.

Gao, F., Masek, J., Schwaller, M., Hall, F. (2006). On the blending of the Landsat and MODIS
surface reflectance: predicting daily Landsat surface reflectance. IEEE TGRS 44(8), 2207-2218.

For every pixel ``p`` and band, with pairs ``k`` (fine ``L_k``, coarse ``M_k``) and the coarse
image ``M_0`` of the target date, STARFM averages the local predictions
``L_k(q) + M_0(q) - M_k(q)`` of the pixels ``q`` of a search window around ``p`` that are

1. *spectrally similar* to ``p`` in the fine image of their pair:
   ``|L_k(q) - L_k(p)| <= 2 σ(L_k) / n_classes`` (paper Eq. 15; ``σ`` the scene standard
   deviation of the band, as the USDA reference program computes it);
2. *better candidates* than ``p`` itself: spectral difference ``S = |L_k(q) - M_k(q)|`` at most
   ``min_k S(p) + σ_S`` and temporal difference ``T = |M_k(q) - M_0(q)|`` at most
   ``min_k T(p) + σ_T`` (paper Eqs. 13-14 with the min of the USDA program); ``filtering="strict"``
   requires both (the paper), ``"either"`` one of them (the USDA program);

weighted by ``1 / C`` with ``C = (S + 1)(T + 1) D`` on the reference program's ×1e4 scale
(``C = (S + 1) D`` with one pair: the spectral term only, as the program does), ``D = 1 + d / A``
with ``d`` the distance to ``p`` and ``A`` the search distance, both in pixels, and weight 1 when
``(S + 1)(T + 1) < σ_C`` (sensor uncertainties ``σ_S = √(σ_M² + σ_L²)``,
``σ_T = √2 σ_M``, ``σ_C = √(σ_S² + σ_T²)``, as in the program). Weights are normalised and
pooled over all pairs. A pixel with no candidate gets the mean of its own local predictions
over its valid pairs (as the ImageFusion library does; the USDA program writes a fill value),
NaN if it has none. NaN never enters a statistic. With ``zero_difference="copy"`` the paper's
special cases hold (Sect. II: a pixel whose fine and coarse agree, ``S_k(p) = 0``, takes
``M_0(p)``; one whose coarse did not change, ``T_k(p) = 0``, takes ``L_k(p)``); the program has
no such case.

``S``, ``T`` and the similarity test are computed on the program's integer scale: the inputs ×
``scale`` rounded to integers, as the program reads them (int16), so every test and the
weight-1 rule decide as the program does, also at ties; the local predictions use the unrounded
inputs. The departures from the paper and the program, and their measured effect, are in
``docs/methods/starfm.md``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from stf_pipeline.exceptions import MethodError
from stf_pipeline.kernels.similar import accumulate_numpy, radius_from_distance
from stf_pipeline.kernels.stats import ClassStd, quiet_nan, scene_std
from stf_pipeline.methods._base import MethodContext
from stf_pipeline.methods.starfm.numba import starfm_sums
from stf_pipeline.methods.starfm.params import StarfmParams


def strict_body(xp: Any, c: Any, q: Any, dist: Any, k: Any) -> tuple[Any, Any]:
    keep = (xp.abs(q["fine"] - c["fine"]) <= k["threshold"]) & (q["spectral"] <= c["spectral"]) & (
        q["temporal"] <= c["temporal"]
    )
    return _pool(xp, keep, q, dist, k)


def either_body(xp: Any, c: Any, q: Any, dist: Any, k: Any) -> tuple[Any, Any]:
    keep = (xp.abs(q["fine"] - c["fine"]) <= k["threshold"]) & (
        (q["spectral"] <= c["spectral"]) | (q["temporal"] <= c["temporal"])
    )
    return _pool(xp, keep, q, dist, k)


def _pool(xp: Any, keep: Any, q: Any, dist: Any, k: Any) -> tuple[Any, Any]:
    weight = q["unit"] + q["inverse"] / (1.0 + dist * k["inverse_radius"])
    weight = xp.where(keep, weight, 0.0)
    return weight.sum(axis=0), xp.where(keep, weight * q["local"], 0.0).sum(axis=0)


def prepare_arrays(
    xp: Any, fine: Any, coarse: Any, coarse_target: Any, params: StarfmParams
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The centre and neighbour arrays of the bodies, with NumPy (``xp=np``) or ``jax.numpy``."""
    fine = xp.asarray(fine, dtype=np.float32)
    coarse = xp.asarray(coarse, dtype=np.float32)
    target = xp.asarray(coarse_target, dtype=np.float32)[None]
    valid = xp.isfinite(fine) & xp.isfinite(coarse) & xp.isfinite(target)
    nan = np.float32(np.nan)
    scale = np.float32(params.scale)
    # the program's integer scale (it reads int16): exact differences, ties decided as it does
    fine_int, coarse_int, target_int = (xp.round(a * scale) for a in (fine, coarse, target))
    spectral = xp.where(valid, xp.abs(fine_int - coarse_int), nan)
    temporal = xp.where(valid, xp.abs(coarse_int - target_int), nan)
    sigma_s, sigma_t, sigma_c = params.uncertainties
    temporal_term = fine.shape[0] > 1 or params.temporal_term == "always"
    cost = (spectral + 1) * (temporal + 1) if temporal_term else spectral + 1
    unit = cost < sigma_c
    with np.errstate(divide="ignore", invalid="ignore"):
        inverse = xp.where(unit, np.float32(0), np.float32(1) / cost)
    neighbour = {
        "fine": xp.where(valid, fine_int, nan),
        "spectral": spectral,
        "temporal": temporal,
        "unit": unit.astype(np.float32),
        "inverse": inverse.astype(np.float32),
        "local": xp.where(valid, fine + target - coarse, nan),
    }
    with quiet_nan():
        centre = {
            "fine": neighbour["fine"],
            "spectral": (xp.nanmin(spectral, axis=0) + np.float32(sigma_s)).astype(np.float32),
            "temporal": (xp.nanmin(temporal, axis=0) + np.float32(sigma_t)).astype(np.float32),
        }
    return centre, neighbour


def scene_constants(fine: np.ndarray, params: StarfmParams) -> dict[str, Any]:
    std = params.class_std if params.class_std is not None else scene_std(fine)
    std_arr = np.asarray(std, dtype=np.float64)
    if std_arr.shape != np.shape(fine)[:2]:
        raise MethodError(
            f"starfm: class_std has shape {std_arr.shape} but the pairs and bands are {np.shape(fine)[:2]}; "
            "leave class_std=None to compute it from the scene."
        )
    return {
        # on the integer scale of the neighbours' "fine"
        "threshold": (std_arr * (2.0 * params.scale / params.n_classes)).astype(np.float32)[:, :, None, None],
        "inverse_radius": np.float32(1.0 / params.window_radius),
    }


def finish(
    xp: Any, total: Any, weighted: Any, fine: Any, coarse_target: Any, neighbour: dict[str, Any], params: StarfmParams
) -> Any:
    """Normalised weighted mean; the mean of the pixel's own local predictions without candidates;
    then, with ``zero_difference="copy"``, the paper's special cases."""
    with np.errstate(divide="ignore", invalid="ignore"), quiet_nan():
        fallback = xp.nanmean(neighbour["local"], axis=0)
        out = xp.where(total > 0, weighted / total, fallback).astype(np.float32)
    if params.zero_difference == "copy":
        return _copy_on_zero_difference(xp, out, fine, coarse_target, neighbour)
    return out


def _copy_on_zero_difference(xp: Any, out: Any, fine: Any, coarse_target: Any, neighbour: dict[str, Any]) -> Any:
    """The paper's special cases (``zero_difference="copy"``): ``M_0(p)`` where a pair has
    ``S(p) = 0``, then the mean of ``L_k(p)`` over the pairs with ``T_k(p) = 0``."""
    fine = xp.asarray(fine, dtype=np.float32)
    spectral_zero = (neighbour["spectral"] == 0).any(axis=0)
    temporal_zero = neighbour["temporal"] == 0
    count = temporal_zero.sum(axis=0)
    unchanged = xp.where(temporal_zero, fine, np.float32(0)).sum(axis=0) / xp.maximum(count, 1)
    out = xp.where(spectral_zero, xp.asarray(coarse_target, dtype=np.float32), out)
    return xp.where(count > 0, unchanged, out).astype(np.float32)


def on_host(
    fine: np.ndarray,
    coarse: np.ndarray,
    coarse_target: np.ndarray,
    *,
    params: StarfmParams,
    model: object | None = None,
    compiled: bool,
) -> np.ndarray:
    """STARFM prediction of one block on the CPU (see module docstring), float64 accumulation: the
    window sums offset by offset with whole-array operations (the reference), or (``compiled``)
    compiled per row (:func:`stf_pipeline.methods.starfm.numba.starfm_sums`; fastest on CPUs).

    Parameters
    ----------
    fine, coarse : float32 ``(pair, band, y, x)``
    coarse_target : float32 ``(band, y, x)``
    params : StarfmParams

    Returns
    -------
    float32 ``(band, y, x)``
    """
    constants = scene_constants(fine, params)
    centre, neighbour = prepare_arrays(np, fine, coarse, coarse_target, params)
    strict = params.filtering == "strict"
    if compiled:
        total, weighted = starfm_sums(centre, neighbour, constants, radius=params.window_radius, strict=strict)
    else:
        total, weighted = accumulate_numpy(
            strict_body if strict else either_body,
            centre,
            neighbour,
            constants,
            radius=params.window_radius,
            accumulators=[((np.shape(fine)[1],), np.float64)] * 2,
            shape=np.shape(coarse_target)[-2:],
        )
    return finish(np, total, weighted, fine, coarse_target, neighbour, params)


#: STARFM of one block, backend ``numpy`` (the reference).
starfm_numpy = functools.partial(on_host, compiled=False)
#: STARFM of one block, backend ``numba``.
starfm_numba = functools.partial(on_host, compiled=True)


def prepare(params: StarfmParams, context: MethodContext, model: object | None = None) -> StarfmParams:
    """The search window in pixels from ``search_distance`` and the cube's pixel size."""
    if params.radius is not None:
        return params
    radius = radius_from_distance(params.search_distance, context.pixel_size)
    if radius < 1:
        raise MethodError(
            f"starfm: search_distance {params.search_distance} is less than one pixel "
            f"({context.pixel_size}); pass a larger search_distance or radius=<pixels>."
        )
    return dataclasses.replace(params, radius=radius)


def halo(params: StarfmParams, context: MethodContext) -> int:
    return params.window_radius


#: ``MethodSpec.statistics``: the scene std of each fine band, once for the whole scene.
STATISTICS = ClassStd("starfm")
