"""STARFM: the Spatial and Temporal Adaptive Reflectance Fusion Model (Gao et al. 2006).

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
weight-1 rule decide as the program does, also at the frequent ties (on ×1e4 data
``S + 1 = σ_C = 100`` happens); from float32 reflectances unrounded they fell either way (up to
0.1 reflectance apart at 0.5 % of the pixels of ``zhu_fsdaf_lgc``). The local predictions use
the unrounded inputs. Run beside the program (v1.2.1) on ``zhu_fsdaf_lgc`` and ``zhu_estarfm``,
``filtering="either"`` gives its integer output to 1.5e-4 once its integer artefacts are set
aside: its window of ``2A / res`` pixels spans offsets ``-A/res .. A/res - 1`` (ours is
symmetric, ``2r + 1``), and it truncates the slice ``2σ/m`` and the uncertainties to integers
(``σ_C = 98``). Those move the mean RMSE by < 0.5 %.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import warnings
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np

from stf_pipeline.exceptions import MethodError
from stf_pipeline.methods._base import MethodContext, MethodSpec
from stf_pipeline.methods._similar import (
    accumulate_numpy,
    check_window,
    device_block,
    radius_from_distance,
    resolve_backend,
    window_sums,
)


@dataclasses.dataclass(frozen=True)
class StarfmParams:
    """Parameters of STARFM.

    Attributes
    ----------
    search_distance : float, default 750.0
        Search distance in CRS units (metres): the half side of the search window and the
        ``A`` of ``D = 1 + d / A``. Source: USDA StarFM example input (``MAX_SEARCH_DISTANCE =
        750``), which gives a 51x51 window at 30 m.
    radius : int, optional
        Half side of the window in pixels; default ``round(search_distance / pixel size)``,
        set by ``METHOD.prepare`` from the cube.
    n_classes : float, default 40
        ``m`` of the similarity threshold ``2 σ / m``. Source: USDA StarFM
        ``NUM_SLICE_PURE_TEST = 40``.
    uncertainty_fine, uncertainty_coarse : float, default 50
        Fine (Landsat) and coarse (MODIS) reflectance uncertainties on the ×1e4 scale. Source:
        USDA StarFM example input (``LANDSAT_UNCERTAINTY``, ``MODIS_UNCERTAINTY`` = 50).
    scale : float, default 10000
        Factor from reflectance to the integer scale the reference program works on: ``S``,
        ``T`` and the similarity test use the inputs × ``scale`` rounded to integers, and the
        ``+ 1`` in ``(S + 1)(T + 1)`` and the uncertainties are on that scale.
    filtering : {"strict", "either"}, default "strict"
        Candidate filter: both the spectral and temporal tests (Gao et al. 2006, text before
        Eqs. 13-14) or one of them (the USDA program).
    temporal_term : {"pairs", "always"}, default "pairs"
        When the weight has the temporal factor ``(T + 1)``: with two or more pairs only (the
        USDA program: one pair uses the spectral term only) or always (Gao et al. 2006, Eq. 10).
    zero_difference : {"weight", "copy"}, default "weight"
        A pixel's own zero spectral or temporal difference: a candidate like any other, its
        weight kept finite by the ``+ 1`` (the USDA program), or the paper's special cases (Gao
        et al. 2006, Sect. II): ``M_0(p)`` where ``S_k(p) = 0``, ``L_k(p)`` where ``T_k(p) = 0``
        (the mean over such pairs; it wins over ``S = 0``, as in ImageFusion's
        ``CopyOnZeroDiff``).
    class_std : tuple of tuple of float, optional
        Standard deviation of each pair's (outer) fine band (inner) over the whole scene, for
        the similarity threshold. Filled by ``METHOD.statistics`` in :func:`stf_pipeline.fuse`;
        a kernel called without it uses the block it is given.
    backend : {"auto", "numba", "pallas", "jax", "numpy"}, default "auto"
        Kernel: ``numba``, the window sums compiled per row (float64 accumulation; fastest on
        CPUs, :mod:`~stf_pipeline.methods._similar_numba`); ``pallas``, one jitted program on
        the device whose window sums are a Pallas kernel keeping each pixel block's sums in
        registers (float32; fastest on GPUs, :mod:`~stf_pipeline.methods._similar_pallas`;
        interpreted, slowly, on CPUs); ``jax``, the same program with the window sums as
        ``lax.fori_loop`` over offsets in tiles (float32; any JAX device); ``numpy``, offset by
        offset with whole-array operations (float64 accumulation); ``auto``: ``pallas`` where
        JAX's default device is an accelerator, else ``numba``.
    tile : int, optional
        Tile side of the JAX kernel (default: 48 on CPU, whole blocks on GPU).
    """

    search_distance: float = 750.0
    radius: int | None = None
    n_classes: float = 40.0
    uncertainty_fine: float = 50.0
    uncertainty_coarse: float = 50.0
    scale: float = 10000.0
    filtering: Literal["strict", "either"] = "strict"
    temporal_term: Literal["pairs", "always"] = "pairs"
    zero_difference: Literal["weight", "copy"] = "weight"
    class_std: tuple[tuple[float, ...], ...] | None = None
    backend: Literal["auto", "numba", "pallas", "jax", "numpy"] = "auto"
    tile: int | None = None

    def __post_init__(self) -> None:
        if not self.search_distance > 0:
            raise MethodError(f"starfm: search_distance must be > 0 (metres), got {self.search_distance}.")
        if self.radius is not None and (not isinstance(self.radius, (int, np.integer)) or self.radius < 1):
            raise MethodError(f"starfm: radius must be a positive integer number of pixels, got {self.radius!r}.")
        if not self.n_classes > 0:
            raise MethodError(f"starfm: n_classes must be > 0, got {self.n_classes}.")
        if self.uncertainty_fine < 0 or self.uncertainty_coarse < 0:
            raise MethodError(
                f"starfm: uncertainties must be >= 0, got fine={self.uncertainty_fine}, "
                f"coarse={self.uncertainty_coarse}."
            )
        if not self.scale > 0:
            raise MethodError(f"starfm: scale must be > 0, got {self.scale}.")
        if self.filtering not in ("strict", "either"):
            raise MethodError(f"starfm: filtering must be 'strict' (paper) or 'either' (USDA program), got {self.filtering!r}.")
        if self.temporal_term not in ("pairs", "always"):
            raise MethodError(
                f"starfm: temporal_term must be 'pairs' (USDA program) or 'always' (paper), got {self.temporal_term!r}."
            )
        if self.zero_difference not in ("weight", "copy"):
            raise MethodError(
                "starfm: zero_difference must be 'weight' (USDA program) or 'copy' (paper), "
                f"got {self.zero_difference!r}."
            )
        if self.backend not in ("auto", "numba", "pallas", "jax", "numpy"):
            raise MethodError(
                f"starfm: backend must be 'auto', 'numba', 'pallas', 'jax' or 'numpy', got {self.backend!r}."
            )
        if self.tile is not None and self.tile < 0:
            raise MethodError(f"starfm: tile must be >= 0 (0: whole block), got {self.tile}.")

    @property
    def window_radius(self) -> int:
        """Half side of the search window in pixels (``search_distance`` in pixels if unset)."""
        return self.radius if self.radius is not None else radius_from_distance(self.search_distance, 1.0)

    @property
    def uncertainties(self) -> tuple[float, float, float]:
        """``(σ_S, σ_T, σ_C)`` on the ×``scale`` scale, as the USDA program combines them."""
        sigma_s = math.hypot(self.uncertainty_coarse, self.uncertainty_fine)
        sigma_t = math.sqrt(2.0) * self.uncertainty_coarse
        return sigma_s, sigma_t, math.hypot(sigma_s, sigma_t)


def scene_std(fine: np.ndarray) -> tuple[tuple[float, ...], ...]:
    """Population standard deviation of each ``(pair, band)`` of ``fine``, NaN excluded."""
    from stf_pipeline.methods._similar_numba import plane_std

    return tuple(tuple(float(v) for v in row) for row in plane_std(fine))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence NumPy's all-NaN-slice warnings: an all-NaN statistic is NaN on purpose."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _with_std(params: Any, std: Any, method: str) -> Any:
    rows = tuple(tuple(float(v) for v in row) for row in np.asarray(std, dtype=np.float64))
    for k, row in enumerate(rows):
        if not all(np.isfinite(row)):
            raise MethodError(
                f"{method}: the fine image of pair {k} is all NaN in some band (std {row}); "
                "choose pair dates with fine observations."
            )
    return dataclasses.replace(params, class_std=rows)


def fill_class_std(fine: Any, coarse: Any, coarse_target: Any, params: Any, *, method: str) -> Any:
    """``MethodSpec.statistics`` shared by STARFM and ESTARFM: the scene std of each fine band.

    Checks the window against the scene. NumPy input: returns the filled params. Dask input:
    a ``dask.delayed`` params (lazy).
    """
    check_window(params.window_radius, tuple(fine.shape[-2:]), method)
    if params.class_std is not None:
        return params
    try:
        import dask.array as da
    except ImportError:  # pragma: no cover - dask is a dependency
        da = None
    if da is not None and isinstance(fine, da.Array):
        import dask

        with _quiet():
            std = da.nanstd(fine.astype(np.float64), axis=(-2, -1))
        return dask.delayed(_with_std, pure=True)(params, std, method)
    return _with_std(params, scene_std(fine), method)


def _strict_body(xp: Any, c: Any, q: Any, dist: Any, k: Any) -> tuple[Any, Any]:
    keep = (xp.abs(q["fine"] - c["fine"]) <= k["threshold"]) & (q["spectral"] <= c["spectral"]) & (
        q["temporal"] <= c["temporal"]
    )
    return _pool(xp, keep, q, dist, k)


def _either_body(xp: Any, c: Any, q: Any, dist: Any, k: Any) -> tuple[Any, Any]:
    keep = (xp.abs(q["fine"] - c["fine"]) <= k["threshold"]) & (
        (q["spectral"] <= c["spectral"]) | (q["temporal"] <= c["temporal"])
    )
    return _pool(xp, keep, q, dist, k)


def _pool(xp: Any, keep: Any, q: Any, dist: Any, k: Any) -> tuple[Any, Any]:
    weight = q["unit"] + q["inverse"] / (1.0 + dist * k["inverse_radius"])
    weight = xp.where(keep, weight, 0.0)
    return weight.sum(axis=0), xp.where(keep, weight * q["local"], 0.0).sum(axis=0)


def _prepare_arrays(
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
    with _quiet():
        centre = {
            "fine": neighbour["fine"],
            "spectral": (xp.nanmin(spectral, axis=0) + np.float32(sigma_s)).astype(np.float32),
            "temporal": (xp.nanmin(temporal, axis=0) + np.float32(sigma_t)).astype(np.float32),
        }
    return centre, neighbour


def _constants(fine: np.ndarray, params: StarfmParams) -> dict[str, Any]:
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


def _finish(
    xp: Any, total: Any, weighted: Any, fine: Any, coarse_target: Any, neighbour: dict[str, Any], params: StarfmParams
) -> Any:
    """Normalised weighted mean; the mean of the pixel's own local predictions without candidates;
    then, with ``zero_difference="copy"``, the paper's special cases."""
    with np.errstate(divide="ignore", invalid="ignore"), _quiet():
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


@functools.lru_cache(maxsize=16)
def _jax_program(params: StarfmParams, tile: int, pallas: bool) -> Any:
    """The jitted whole-block STARFM (preparation, window sums, prediction) for ``params``:
    the window sums by the XLA driver or (``pallas``) the Pallas kernel."""
    import jax
    import jax.numpy as jnp

    body = _strict_body if params.filtering == "strict" else _either_body

    def run(fine: Any, coarse: Any, coarse_target: Any, threshold: Any) -> Any:
        centre, neighbour = _prepare_arrays(jnp, fine, coarse, coarse_target, params)
        if pallas:
            total, weighted = _pallas_sums(centre, neighbour, threshold, params)
        else:
            constants = {"threshold": threshold, "inverse_radius": np.float32(1.0 / params.window_radius)}
            specs = [((fine.shape[1],), np.float32)] * 2
            total, weighted = window_sums(
                body, centre, neighbour, constants, radius=params.window_radius, accumulators=specs, tile=tile
            )
        return _finish(jnp, total, weighted, fine, coarse_target, neighbour, params)

    return jax.jit(run)


def _pallas_sums(centre: dict[str, Any], neighbour: dict[str, Any], threshold: Any, params: StarfmParams) -> tuple[Any, Any]:
    """The window sums by :func:`~stf_pipeline.methods._similar_pallas.starfm_program` (traceable)."""
    import jax

    from stf_pipeline.methods._similar_pallas import blocked_shape, pad_planes, starfm_program

    pairs, bands, ny, nx = neighbour["fine"].shape
    radius = params.window_radius
    shape = blocked_shape((ny, nx))

    def planes(a: Any) -> Any:
        return pad_planes(a.reshape((-1, ny, nx)), radius, shape, np.nan)

    inverse = jax.numpy.where(neighbour["unit"] > 0, -1.0, neighbour["inverse"])
    program = starfm_program(radius, pairs, bands, params.filtering == "strict", jax.default_backend() == "cpu")
    sums = program(
        threshold.reshape(-1),
        planes(centre["spectral"]),
        planes(centre["temporal"]),
        *(planes(neighbour[name]) for name in ("fine", "spectral", "temporal")),
        planes(inverse),
        planes(neighbour["local"]),
        shape=shape,
    )
    return sums[:bands, :ny, :nx], sums[bands:, :ny, :nx]


def _starfm_jax(fine: np.ndarray, coarse: np.ndarray, coarse_target: np.ndarray, params: StarfmParams) -> np.ndarray:
    """STARFM of one block on JAX's default device (float32)."""
    constants = _constants(fine, params)
    inputs, tile = device_block((fine, coarse, coarse_target), params.tile)
    program = _jax_program(dataclasses.replace(params, class_std=None), tile, resolve_backend(params.backend) == "pallas")
    ny, nx = np.shape(coarse_target)[-2:]
    return np.asarray(program(*inputs, constants["threshold"])[:, :ny, :nx])


def starfm_kernel(
    fine: np.ndarray,
    coarse: np.ndarray,
    coarse_target: np.ndarray,
    *,
    params: StarfmParams,
    model: object | None = None,
) -> np.ndarray:
    """STARFM prediction of one block (see module docstring).

    Parameters
    ----------
    fine, coarse : float32 ``(pair, band, y, x)``
    coarse_target : float32 ``(band, y, x)``
    params : StarfmParams

    Returns
    -------
    float32 ``(band, y, x)``
    """
    backend = resolve_backend(params.backend)
    if backend in ("jax", "pallas"):
        return _starfm_jax(fine, coarse, coarse_target, params)
    constants = _constants(fine, params)
    centre, neighbour = _prepare_arrays(np, fine, coarse, coarse_target, params)
    if backend == "numba":
        from stf_pipeline.methods._similar_numba import starfm_sums

        total, weighted = starfm_sums(
            centre, neighbour, constants, radius=params.window_radius, strict=params.filtering == "strict"
        )
    else:
        body = _strict_body if params.filtering == "strict" else _either_body
        total, weighted = accumulate_numpy(
            body,
            centre,
            neighbour,
            constants,
            radius=params.window_radius,
            accumulators=[((np.shape(fine)[1],), np.float64)] * 2,
            shape=np.shape(coarse_target)[-2:],
        )
    return _finish(np, total, weighted, fine, coarse_target, neighbour, params)


def _prepare(params: StarfmParams, context: MethodContext) -> StarfmParams:
    if params.radius is not None:
        return params
    radius = radius_from_distance(params.search_distance, context.pixel_size)
    if radius < 1:
        raise MethodError(
            f"starfm: search_distance {params.search_distance} is less than one pixel "
            f"({context.pixel_size}); pass a larger search_distance or radius=<pixels>."
        )
    return dataclasses.replace(params, radius=radius)


def _halo(params: StarfmParams, context: MethodContext) -> int:
    return params.window_radius


def _statistics(fine: Any, coarse: Any, coarse_target: Any, params: StarfmParams) -> Any:
    return fill_class_std(fine, coarse, coarse_target, params, method="starfm")


METHOD = MethodSpec(
    name="starfm",
    params_type=StarfmParams,
    kernel=starfm_kernel,
    halo=_halo,
    n_pairs=(1, 8),
    prepare=_prepare,
    statistics=_statistics,
)
