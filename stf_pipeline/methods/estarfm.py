"""ESTARFM: the Enhanced STARFM for complex heterogeneous regions (Zhu et al. 2010).

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
from typing import Any, Literal

import numpy as np

from stf_pipeline.exceptions import MethodError
from stf_pipeline.methods._base import MethodContext, MethodSpec
from stf_pipeline.methods._similar import (
    accumulate_numpy,
    device_block,
    f_critical,
    resolve_backend,
    window_sums,
)
from stf_pipeline.methods._similar_numba import box_sum, estarfm_finish
from stf_pipeline.methods._similar_numba import spectral_correlation as _correlation
from stf_pipeline.methods._window import box_sum_jax
from stf_pipeline.methods.starfm import _quiet, fill_class_std

#: Added to ``(1 - R) D`` before inverting (Zhu's code: ``+ 0.0000001``).
_WEIGHT_EPS = 1e-7
#: Added to the window-mean coarse changes before inverting (Zhu's code: ``0.01**5``).
_CHANGE_EPS = 0.01**5


@dataclasses.dataclass(frozen=True)
class EstarfmParams:
    """Parameters of ESTARFM.

    Attributes
    ----------
    half_window : int, default 25
        ``w``: the search window is ``(2w+1)²`` = 51x51 fine pixels and ``D = 1 + d / w``.
        Source: Zhu's code, ``parameters_estarfm.yaml`` (``w: 25``).
    n_classes : float, default 4
        Estimated number of classes; similarity threshold ``2 σ / n_classes``. Source: Zhu's
        code (``num_class: 4.0``); Zhu et al. (2010) Eq. 3.
    value_range : (float, float), default (0.0, 1.0)
        Valid reflectance range: predictions at or beyond it fall back to the weighted fine
        mean. Source: Zhu's code (``DN_min: 0``, ``DN_max: 10000`` on the ×1e4 scale).
    min_coarse_change : float, default 0.02
        Smallest mean coarse change of the similar pixels between the pair dates for which ``V``
        is regressed (else 1). Source: Zhu's code (``DN_max * 0.02``).
    significance : float, default 0.05
        Largest p-value of the regression F test for which ``V`` is kept. Source: Zhu's code.
    max_conversion : float, default 5.0
        Largest ``V`` kept (``0 < V <= 5``). Source: Zhu's code.
    min_similar : int, default 6
        Fewest similar pixels for the weighted prediction (Zhu's code: ``number_cand > 5``).
    class_std : tuple of tuple of float, optional
        Scene standard deviation of each pair's (outer) fine band (inner). Filled by
        ``METHOD.statistics`` in :func:`stf_pipeline.fuse`; a kernel called without it uses the
        block it is given (the whole scene in Zhu's code with its default block size).
    backend : {"auto", "numba", "pallas", "jax", "numpy"}, default "auto"
        Window sums: ``numba``, compiled per pixel (float64 accumulation; fastest on CPUs,
        :mod:`~stf_pipeline.methods._similar_numba`); ``pallas``, on the device in one jitted
        program with the preparation, a Pallas kernel keeping each pixel block's sums in
        registers (float32; fastest on GPUs, :mod:`~stf_pipeline.methods._similar_pallas`;
        interpreted, slowly, on CPUs); ``jax``, the same program with ``lax.fori_loop`` over
        offsets in tiles (float32; any JAX device); ``numpy``, offset by offset with whole-array
        operations (float64 accumulation); ``auto``: ``pallas`` where JAX's default device is an
        accelerator, else ``numba``. The prediction from the sums is float64: compiled on the
        host for ``numba`` and ``numpy``, on the device for ``pallas`` and ``jax``.
    tile : int, optional
        Tile side of the JAX kernel (default: 48 on CPU, whole blocks on GPU).
    """

    half_window: int = 25
    n_classes: float = 4.0
    value_range: tuple[float, float] = (0.0, 1.0)
    min_coarse_change: float = 0.02
    significance: float = 0.05
    max_conversion: float = 5.0
    min_similar: int = 6
    class_std: tuple[tuple[float, ...], ...] | None = None
    backend: Literal["auto", "numba", "pallas", "jax", "numpy"] = "auto"
    tile: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.half_window, (int, np.integer)) or self.half_window < 1:
            raise MethodError(f"estarfm: half_window must be a positive integer (pixels), got {self.half_window!r}.")
        if not self.n_classes > 0:
            raise MethodError(f"estarfm: n_classes must be > 0, got {self.n_classes}.")
        lo, hi = self.value_range
        if not lo < hi:
            raise MethodError(f"estarfm: value_range must be (min, max) with min < max, got {self.value_range}.")
        if self.min_coarse_change < 0:
            raise MethodError(f"estarfm: min_coarse_change must be >= 0, got {self.min_coarse_change}.")
        if not 0 < self.significance < 1:
            raise MethodError(f"estarfm: significance must be in (0, 1), got {self.significance}.")
        if not self.max_conversion > 0:
            raise MethodError(f"estarfm: max_conversion must be > 0, got {self.max_conversion}.")
        if self.min_similar < 3:
            raise MethodError(f"estarfm: min_similar must be >= 3 (a regression needs 3 points), got {self.min_similar}.")
        if self.backend not in ("auto", "numba", "pallas", "jax", "numpy"):
            raise MethodError(
                f"estarfm: backend must be 'auto', 'numba', 'pallas', 'jax' or 'numpy', got {self.backend!r}."
            )
        if self.tile is not None and self.tile < 0:
            raise MethodError(f"estarfm: tile must be >= 0 (0: whole block), got {self.tile}.")

    @property
    def window_radius(self) -> int:
        """Half side of the search window in pixels."""
        return int(self.half_window)


def spectral_correlation(fine: np.ndarray, coarse: np.ndarray) -> np.ndarray:
    """``R`` of every pixel: correlation of its fine and coarse spectra over both pair dates.

    One band: ``1 - (|F_1 - C_1| / (F_1 + C_1) + |F_2 - C_2| / (F_2 + C_2)) / 2``. Undefined
    values are 0.5 (Zhu's code). ``fine``, ``coarse``: ``(pair, band, y, x)``.
    """
    return _correlation(fine, coarse)


def _body(xp: Any, c: Any, q: Any, dist: Any, k: Any) -> tuple[Any, ...]:
    similar = xp.abs(q["fine"] - c["fine"]) < k["threshold"]
    similar = xp.all(similar.reshape((-1, *similar.shape[2:])), axis=0)
    m = similar.astype(q["spread"].dtype)
    w = m / (q["spread"] * (1.0 + dist * k["inverse_radius"]) + _WEIGHT_EPS)
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


def _prepare_arrays(
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


def _constants(fine: np.ndarray, params: EstarfmParams) -> dict[str, Any]:
    if np.shape(fine)[0] != 2:
        raise MethodError(
            f"estarfm takes exactly 2 pairs (one before and one after the target), got {np.shape(fine)[0]}; "
            "pass pairs=[before, after] or use method='starfm' for one pair."
        )
    std = params.class_std if params.class_std is not None else _block_std(fine)
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


def _accumulators(bands: int, dtype: Any) -> list[tuple[tuple[int, ...], Any]]:
    # similar-pixel count and weight total, then ten per-band sums (see _body)
    return [((), dtype), ((), dtype)] + [((bands,), dtype)] * 10


#: Neighbours outside a block: missing (NaN fine), no spread, zero sums.
_FILLS = {"spread": 1.0, "fine0": 0.0, "coarse0": 0.0, "change": 0.0}


@functools.lru_cache(maxsize=16)
def _jax_program(radius: int, tile: int, pallas: bool) -> Any:
    """The jitted whole-block preparation and window sums of ESTARFM (float32): by the XLA
    driver or (``pallas``) the Pallas kernel; also the valid mask, for the prediction."""
    import jax
    import jax.numpy as jnp

    def run(fine: Any, coarse: Any, coarse_target: Any, threshold: Any) -> tuple[list[Any], Any]:
        centre, neighbour, valid = _prepare_arrays(jnp, fine, coarse, coarse_target)
        if pallas:
            return _pallas_sums(neighbour, threshold, radius), valid
        constants = {"threshold": threshold, "inverse_radius": np.float32(1.0 / radius)}
        sums = window_sums(
            _body,
            centre,
            neighbour,
            constants,
            radius=radius,
            accumulators=_accumulators(fine.shape[1], np.float32),
            tile=tile,
            fills=_FILLS,
        )
        return sums, valid

    return jax.jit(run)


def _pallas_sums(neighbour: dict[str, Any], threshold: Any, radius: int) -> list[Any]:
    """The window sums by :func:`~stf_pipeline.methods._similar_pallas.estarfm_program` (traceable)."""
    import jax

    from stf_pipeline.methods._similar_pallas import blocked_shape, estarfm_program, pad_planes

    pairs, bands, ny, nx = neighbour["fine"].shape
    shape = blocked_shape((ny, nx))

    def planes(name: str) -> Any:
        a = neighbour[name].reshape((-1, ny, nx))
        return pad_planes(a, radius, shape, np.nan if name == "fine" else _FILLS[name])

    program = estarfm_program(radius, bands, _WEIGHT_EPS, jax.default_backend() == "cpu")
    sums = program(threshold.reshape(-1), *(planes(n) for n in ("fine", "spread", "coarse0", "change")), shape=shape)
    sums = sums[:, :ny, :nx]
    return [sums[0], sums[1]] + [sums[2 + s * bands : 2 + (s + 1) * bands] for s in range(10)]


def _predict_xp(
    xp: Any, sums: list[Any], fine: Any, change_sum: Any, n_valid: Any, valid: Any, table: np.ndarray, params: EstarfmParams
) -> Any:
    """ESTARFM's per-pixel prediction from the window sums as whole-array float64 operations
    (``jax.numpy`` on the device; the formulas of ``_similar_numba._estarfm_finish_rows``)."""
    count, total, *rest = (a.astype(np.float64) for a in sums)
    wchange1, wchange2, wfine1, wfine2, sx, sd, sy, sxx, syy, sxy = rest
    f1, f2 = fine[0].astype(np.float64), fine[1].astype(np.float64)
    eps = _CHANGE_EPS
    # temporal weights from the window means over the valid pixels
    d1, d2 = change_sum[0] / n_valid, change_sum[1] / n_valid
    inv1, inv2 = 1.0 / (xp.abs(d1) + eps), 1.0 / (xp.abs(d2) + eps)
    t1, t2 = inv1 / (inv1 + inv2), inv2 / (inv1 + inv2)
    # too few similar pixels: the window-mean coarse changes
    g1, g2 = d1 + eps, d2 + eps
    u1, u2 = 1.0 / xp.abs(g1), 1.0 / xp.abs(g2)
    few = u1 / (u1 + u2) * (f1 + g1) + u2 / (u1 + u2) * (f2 + g2)
    # conversion coefficient: regression of fine on coarse, similar pixels of both dates
    n = 2.0 * count
    cxx, cyy, cxy = sxx - sx * sx / n, syy - sy * sy / n, sxy - sx * sy / n
    slope = cxy / cxx
    r2 = cxy * cxy / (cxx * cyy)
    fstat = xp.where(r2 < 1.0, r2 * (n - 2.0) / (1.0 - r2), np.inf)
    critical = xp.asarray(table)[xp.clip(n, 0, table.size - 1).astype(np.int32)]
    significant = (cxx > 0) & (cyy > 0) & (fstat >= critical)
    changed = xp.abs(sd) / count >= params.min_coarse_change
    keep = changed & significant & (slope > 0) & (slope <= params.max_conversion)
    conversion = xp.where(keep, slope, 1.0)
    pred = t1 * (f1 + conversion * wchange1 / total) + t2 * (f2 + conversion * wchange2 / total)
    lo, hi = params.value_range
    pred = xp.where((pred <= lo) | (pred >= hi), (t1 * wfine1 + t2 * wfine2) / total, pred)
    pred = xp.where(count < params.min_similar, few, pred)
    return xp.where(valid, pred, np.nan).astype(np.float32)


@functools.lru_cache(maxsize=16)
def _predict_program(params: EstarfmParams) -> Any:
    """Jitted device prediction from the sums (float64: call it under ``jax.enable_x64``)."""
    import jax

    radius = params.half_window
    table = _f_table(2 * (2 * radius + 1) ** 2, params.significance)

    def run(sums: list[Any], valid: Any, fine: Any, coarse: Any, coarse_target: Any) -> Any:
        import jax.numpy as jnp

        c, t = coarse.astype(np.float64), coarse_target.astype(np.float64)
        n_valid = box_sum_jax(valid.astype(np.float64), radius)
        change_sum = box_sum_jax(jnp.where(valid, t[None] - c, 0.0), radius)
        return _predict_xp(jnp, sums, fine, change_sum, n_valid, valid, table, params)

    return jax.jit(run)


def _estarfm_jax(
    fine: np.ndarray, coarse: np.ndarray, coarse_target: np.ndarray, constants: dict[str, Any], params: EstarfmParams
) -> np.ndarray:
    """ESTARFM of one block on JAX's default device: float32 sums, float64 prediction."""
    import jax

    inputs, tile = device_block((fine, coarse, coarse_target), params.tile)
    pallas = resolve_backend(params.backend) == "pallas"
    sums, valid = _jax_program(params.half_window, tile, pallas)(*inputs, constants["threshold"])
    ny, nx = np.shape(coarse_target)[-2:]
    with jax.enable_x64(True):
        out = _predict_program(dataclasses.replace(params, class_std=None))(sums, valid, *inputs)
        return np.asarray(out[:, :ny, :nx])


def _block_std(fine: np.ndarray) -> tuple[tuple[float, ...], ...]:
    from stf_pipeline.methods.starfm import scene_std

    return scene_std(fine)


@functools.lru_cache(maxsize=8)
def _f_table(max_n: int, alpha: float) -> np.ndarray:
    return f_critical(max_n, alpha)


def _finish(
    accs: list[np.ndarray],
    fine: np.ndarray,
    coarse: np.ndarray,
    coarse_target: np.ndarray,
    valid: np.ndarray,
    params: EstarfmParams,
) -> np.ndarray:
    """Per-pixel ESTARFM prediction from the window sums (float64; compiled, see module docstring)."""
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
        _f_table(2 * (2 * radius + 1) ** 2, params.significance),
        value_range=params.value_range,
        min_coarse_change=params.min_coarse_change,
        max_conversion=params.max_conversion,
        min_similar=params.min_similar,
        change_eps=_CHANGE_EPS,
    )


def estarfm_kernel(
    fine: np.ndarray,
    coarse: np.ndarray,
    coarse_target: np.ndarray,
    *,
    params: EstarfmParams,
    model: object | None = None,
) -> np.ndarray:
    """ESTARFM prediction of one block (see module docstring).

    Parameters
    ----------
    fine, coarse : float32 ``(2, band, y, x)``
    coarse_target : float32 ``(band, y, x)``
    params : EstarfmParams

    Returns
    -------
    float32 ``(band, y, x)``
    """
    constants = _constants(fine, params)
    backend = resolve_backend(params.backend)
    if backend in ("jax", "pallas"):
        return _estarfm_jax(fine, coarse, coarse_target, constants, params)
    centre, neighbour, valid = _prepare_arrays(np, fine, coarse, coarse_target)
    if backend == "numba":
        from stf_pipeline.methods._similar_numba import estarfm_sums

        accs = estarfm_sums(centre, neighbour, constants, radius=params.half_window, eps=_WEIGHT_EPS)
    else:
        accs = accumulate_numpy(
            _body,
            centre,
            neighbour,
            constants,
            radius=params.half_window,
            accumulators=_accumulators(np.shape(fine)[1], np.float64),
            shape=np.shape(coarse_target)[-2:],
        )
    with _quiet():
        return _finish(accs, fine, coarse, coarse_target, valid, params)


def _halo(params: EstarfmParams, context: MethodContext) -> int:
    return params.half_window


def _statistics(fine: Any, coarse: Any, coarse_target: Any, params: EstarfmParams) -> Any:
    return fill_class_std(fine, coarse, coarse_target, params, method="estarfm")


METHOD = MethodSpec(
    name="estarfm",
    params_type=EstarfmParams,
    kernel=estarfm_kernel,
    halo=_halo,
    n_pairs=(2, 2),
    statistics=_statistics,
)
