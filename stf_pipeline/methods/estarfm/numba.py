"""ESTARFM's compiled CPU pieces (Numba): the window sums (backend ``numba``, ``auto`` on CPUs),
the spectral correlation and the prediction from the sums (both host backends).

Window sums, *pixel form*: for each pixel, the window rows in order; per row a branch-free test
of every neighbour's similarity (all bands of both dates), then the similar neighbours and their
weights kept in window order. Most neighbours are not similar, so only those are summed: their
inputs are packed per pixel (:func:`_pack`: both pairs' coarse and fine values and coarse
changes, eight bands side by side), so one neighbour is one contiguous read and its increments
of the ten sums of eight bands are SIMD operations on sums held in registers (a stack buffer,
:func:`_stack_f64`). The increments are float32, as the NumPy body computes them, added in
offset order to float64 sums per band: the sums of the NumPy driver, bit for bit. The spectral
correlation ``R`` and the prediction from the sums are the operations of their NumPy expressions
in the same order (so the same values). Neighbours outside the block are skipped and every pixel
adds its terms in the same offset order whatever block or row strip it sits in, so chunked
results equal unchunked ones bitwise. Rows are shared over the cores
(:func:`stf_pipeline.kernels.pool.run_rows`); ``cache=True`` keeps the compiled code on disk.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from stf_pipeline.kernels.pool import run_rows
from stf_pipeline.kernels.similar import as_f32, distance_factors
from stf_pipeline.kernels.window import _box_sum_3d

_F1 = np.float32(1.0)
#: bands summed together in one SIMD vector (eight float32 lanes; 6-band scenes use one group)
_GROUP = 8
#: the ten sums of one group
_GROUP_SUMS = 10 * _GROUP


@intrinsic
def _stack_f64(typingctx: Any, size: Any) -> Any:  # pragma: no cover - compiled
    """A float64 buffer of ``size`` (a literal) elements on the stack of the calling kernel: LLVM
    knows it aliases no argument, so sums kept there stay in SIMD registers."""
    if not isinstance(size, types.IntegerLiteral):
        return None
    n = size.literal_value

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return cgutils.alloca_once(builder, context.get_value_type(types.float64), size=n)

    return types.CPointer(types.float64)(size), codegen


def _pack(fine0: np.ndarray, coarse0: np.ndarray, change: np.ndarray) -> np.ndarray:
    """The per-neighbour inputs of the sums, ``(band group, y * x, 6, _GROUP)`` float32: for each
    pixel the coarse and fine values of both pairs and the two coarse changes, the bands of a
    group side by side (zero-padded), so one similar neighbour is one contiguous read."""
    n_bands, h, w = fine0.shape[1:]
    groups = -(-n_bands // _GROUP)
    packed = np.zeros((groups, h * w, 6, _GROUP), dtype=np.float32)
    for k, (array, pair) in enumerate(
        [(coarse0, 0), (coarse0, 1), (fine0, 0), (fine0, 1), (change, 0), (change, 1)]
    ):
        for g in range(groups):
            bands = array[pair, g * _GROUP : (g + 1) * _GROUP]
            packed[g, :, k, : bands.shape[0]] = bands.reshape(bands.shape[0], h * w).T
    return packed


@numba.njit(nogil=True, cache=True)
def _estarfm_rows(
    fine: np.ndarray,
    spread: np.ndarray,
    packed: np.ndarray,
    threshold: np.ndarray,
    distance_term: np.ndarray,
    eps: np.float32,
    radius: int,
    y_start: int,
    y_stop: int,
    count: np.ndarray,
    total: np.ndarray,
    sums: np.ndarray,
) -> None:  # pragma: no cover - compiled; covered through estarfm_sums()
    # fine: (2, band, y, x) float32, NaN where missing; spread: (y, x); packed: (band group,
    # y * x, 6, _GROUP) float32, the coarse and fine images of both pairs and the coarse changes
    # (0 where missing; see _pack); threshold: (2, band); distance_term: (side * side,) =
    # 1 + d / w per offset; count, total: (y, x) float64; sums: (10, band, y, x) float64
    n_pairs, n_bands, h, w = fine.shape
    # on the stack: kept in registers (Numba passes the typing context an intrinsic declares)
    sums_group = numba.carray(_stack_f64(_GROUP_SUMS), (10, _GROUP))  # type: ignore[call-arg]
    side = 2 * radius + 1
    similar = np.empty(side, dtype=np.bool_)
    centre = np.empty((n_pairs, n_bands), dtype=np.float32)
    index = np.empty(side * side, dtype=np.int64)  # flat (y * w + x) index of the similar pixels
    offset = np.empty(side * side, dtype=np.int64)  # their window offset (row-major)
    weight = np.empty(side * side, dtype=np.float32)
    spread_flat = spread.ravel()
    for y in range(y_start, y_stop):
        y0 = max(0, y - radius)
        y1 = min(h, y + radius + 1)
        for x in range(w):
            x0 = max(0, x - radius)
            x1 = min(w, x + radius + 1)
            m = x1 - x0
            finite = True
            for p in range(n_pairs):
                for b in range(n_bands):
                    centre[p, b] = fine[p, b, y, x]
                    finite = finite and np.isfinite(centre[p, b])
            # pass 1: the similar pixels and their weights, in window order (a missing centre has
            # none: every comparison with NaN is false)
            n = 0
            for yy in range(y0, y1 if finite else y0):
                row = similar[:m]
                row[:] = True
                for p in range(n_pairs):
                    for b in range(n_bands):
                        c = centre[p, b]
                        t = threshold[p, b]
                        q = fine[p, b, yy, x0:x1]
                        for i in range(m):
                            row[i] = row[i] & (abs(q[i] - c) < t)
                base = (yy - y + radius) * side + x0 - x + radius
                for i in range(m):  # branch-free compaction
                    index[n] = yy * w + x0 + i
                    offset[n] = base + i
                    n += row[i]
            count[y, x] = n
            weight_sum = 0.0
            for j in range(n):
                weight[j] = _F1 / (spread_flat[index[j]] * distance_term[offset[j]] + eps)
                weight_sum += weight[j]
            total[y, x] = weight_sum
            # pass 2: per group of bands (one SIMD vector), the sums, terms added in window order
            for g in range(packed.shape[0]):
                data = packed[g]
                here = data[y * w + x]
                sums_group[:] = 0.0
                for j in range(n):
                    q = data[index[j]]
                    wj = weight[j]
                    for b in range(_GROUP):
                        x1b = q[0, b] - here[0, b]
                        x2b = q[1, b] - here[0, b]
                        y1b = q[2, b] - here[2, b]
                        y2b = q[3, b] - here[2, b]
                        sums_group[0, b] += wj * q[4, b]
                        sums_group[1, b] += wj * q[5, b]
                        sums_group[2, b] += wj * q[2, b]
                        sums_group[3, b] += wj * q[3, b]
                        sums_group[4, b] += x1b + x2b
                        sums_group[5, b] += x1b - x2b
                        sums_group[6, b] += y1b + y2b
                        sums_group[7, b] += x1b * x1b + x2b * x2b
                        sums_group[8, b] += y1b * y1b + y2b * y2b
                        sums_group[9, b] += x1b * y1b + x2b * y2b
                for b in range(min(_GROUP, n_bands - g * _GROUP)):
                    for k in range(10):
                        sums[k, g * _GROUP + b, y, x] = sums_group[k, b]


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _estarfm_finish_rows(
    count: np.ndarray,
    total: np.ndarray,
    sums: np.ndarray,
    fine: np.ndarray,
    change_sum: np.ndarray,
    n_valid: np.ndarray,
    valid: np.ndarray,
    table: np.ndarray,
    value_range: tuple[float, float],
    min_coarse_change: float,
    max_conversion: float,
    min_similar: float,
    change_eps: float,
    y_start: int,
    y_stop: int,
    out: np.ndarray,
) -> None:  # pragma: no cover - compiled; covered through estarfm_finish()
    # count, total, n_valid: (y, x) float64; sums: (10, band, y, x) float64; fine: (2, band, y, x)
    # float32; change_sum: (2, band, y, x) float64; valid: (y, x) bool; out: (band, y, x) float32
    lo, hi = value_range
    n_bands, w = fine.shape[1], fine.shape[3]
    top = table.size - 1
    for y in range(y_start, y_stop):
        for x in range(w):
            if not valid[y, x]:
                for b in range(n_bands):
                    out[b, y, x] = np.nan
                continue
            m = count[y, x]
            n = 2.0 * m
            for b in range(n_bands):
                f1 = np.float64(fine[0, b, y, x])
                f2 = np.float64(fine[1, b, y, x])
                # temporal weights from the window means over the valid pixels
                d1 = change_sum[0, b, y, x] / n_valid[y, x]
                d2 = change_sum[1, b, y, x] / n_valid[y, x]
                inv1 = 1.0 / (abs(d1) + change_eps)
                inv2 = 1.0 / (abs(d2) + change_eps)
                t1 = inv1 / (inv1 + inv2)
                t2 = inv2 / (inv1 + inv2)
                if m < min_similar:
                    g1 = d1 + change_eps
                    g2 = d2 + change_eps
                    u1 = 1.0 / abs(g1)
                    u2 = 1.0 / abs(g2)
                    out[b, y, x] = np.float32(u1 / (u1 + u2) * (f1 + g1) + u2 / (u1 + u2) * (f2 + g2))
                    continue
                # conversion coefficient: regression of fine on coarse, similar pixels of both dates
                wchange1 = sums[0, b, y, x]
                wchange2 = sums[1, b, y, x]
                wfine1 = sums[2, b, y, x]
                wfine2 = sums[3, b, y, x]
                sx = sums[4, b, y, x]
                sd = sums[5, b, y, x]
                sy = sums[6, b, y, x]
                sxx = sums[7, b, y, x]
                syy = sums[8, b, y, x]
                sxy = sums[9, b, y, x]
                cxx = sxx - sx * sx / n
                cyy = syy - sy * sy / n
                cxy = sxy - sx * sy / n
                slope = cxy / cxx
                r2 = cxy * cxy / (cxx * cyy)
                fstat = r2 * (n - 2.0) / (1.0 - r2) if r2 < 1.0 else np.inf
                critical = table[np.int64(min(max(n, 0.0), top))]
                significant = (cxx > 0) & (cyy > 0) & (fstat >= critical)
                changed = abs(sd) / m >= min_coarse_change
                keep = changed & significant & (slope > 0) & (slope <= max_conversion)
                conversion = slope if keep else 1.0
                t = total[y, x]
                pred = t1 * (f1 + conversion * wchange1 / t) + t2 * (f2 + conversion * wchange2 / t)
                if (pred <= lo) | (pred >= hi):
                    pred = (t1 * wfine1 + t2 * wfine2) / t
                out[b, y, x] = np.float32(pred)


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _correlation_rows(
    fine: np.ndarray, coarse: np.ndarray, one_band: bool, y_start: int, y_stop: int, out: np.ndarray
) -> None:  # pragma: no cover - compiled; covered through spectral_correlation()
    # fine, coarse: (sample, y, x) float64 (pair-major, band-minor samples); out: (y, x) float64.
    # Sums over the samples in order, as NumPy reduces an outer axis: the values of the NumPy
    # expressions of estarfm.spectral_correlation.
    n, _, w = fine.shape
    for y in range(y_start, y_stop):
        for x in range(w):
            if one_band:  # 1 - (sum over the dates of |F - C| / (F + C)) / 2
                r = abs((fine[0, y, x] - coarse[0, y, x]) / (fine[0, y, x] + coarse[0, y, x]))
                for k in range(1, n):
                    r += abs((fine[k, y, x] - coarse[k, y, x]) / (fine[k, y, x] + coarse[k, y, x]))
                r = 1.0 - 0.5 * r
            else:  # Pearson correlation of the two spectra
                sf = fine[0, y, x]
                sc = coarse[0, y, x]
                for k in range(1, n):
                    sf += fine[k, y, x]
                    sc += coarse[k, y, x]
                mf = sf / n
                mc = sc / n
                df = fine[0, y, x] - mf
                dc = coarse[0, y, x] - mc
                sfc = df * dc
                sff = df * df
                scc = dc * dc
                for k in range(1, n):
                    df = fine[k, y, x] - mf
                    dc = coarse[k, y, x] - mc
                    sfc += df * dc
                    sff += df * df
                    scc += dc * dc
                r = sfc / np.sqrt(sff * scc)
            out[y, x] = r if np.isfinite(r) else 0.5


#: the kernels of the prediction from the window sums (its window means, then :func:`estarfm_finish`)
PREDICTION_KERNELS = (_box_sum_3d, _estarfm_finish_rows)


def estarfm_finish(
    accs: list[np.ndarray],
    fine: np.ndarray,
    change_sum: np.ndarray,
    n_valid: np.ndarray,
    valid: np.ndarray,
    table: np.ndarray,
    *,
    value_range: tuple[float, float],
    min_coarse_change: float,
    max_conversion: float,
    min_similar: int,
    change_eps: float,
) -> np.ndarray:
    """ESTARFM's per-pixel prediction from its window sums, float64 math, ``(band, y, x)`` float32.

    ``accs``: the twelve sums of :func:`estarfm_sums`; ``fine``: the pairs' fine images;
    ``change_sum``: window sums of the valid coarse changes ``C_0 - C_k`` and ``n_valid`` of the
    valid pixels; ``table``: F-test critical values by number of regression points. The
    operations of :func:`stf_pipeline.methods.estarfm.jax.predict_xp`, pixel by pixel.
    """
    count, total, *rest = (np.asarray(a, dtype=np.float64) for a in accs)
    sums = np.ascontiguousarray(np.stack(rest))
    f = as_f32(fine)
    out = np.empty(f.shape[1:], dtype=np.float32)
    inputs = (
        np.ascontiguousarray(count), np.ascontiguousarray(total), sums, f,
        np.ascontiguousarray(change_sum, dtype=np.float64), np.ascontiguousarray(n_valid, dtype=np.float64),
        np.ascontiguousarray(valid, dtype=np.bool_), np.ascontiguousarray(table, dtype=np.float64),
        (float(value_range[0]), float(value_range[1])), float(min_coarse_change), float(max_conversion),
        float(min_similar), float(change_eps),
    )
    run_rows(_estarfm_finish_rows, f.shape[2], inputs, (out,))
    return out


def spectral_correlation(fine: np.ndarray, coarse: np.ndarray) -> np.ndarray:
    """ESTARFM's ``R`` per pixel, float64 ``(y, x)``
    (see :func:`stf_pipeline.methods.estarfm.core.spectral_correlation`).

    ``fine``, ``coarse``: ``(pair, band, y, x)``.
    """
    f = np.asarray(fine, dtype=np.float64)
    one_band = f.shape[1] == 1
    c = np.asarray(coarse, dtype=np.float64)
    f = np.ascontiguousarray(f.reshape((-1, *f.shape[-2:])))
    c = np.ascontiguousarray(c.reshape((-1, *c.shape[-2:])))
    out = np.empty(f.shape[1:], dtype=np.float64)
    run_rows(_correlation_rows, f.shape[1], (f, c, one_band), (out,))
    return out


def estarfm_sums(
    centre: dict[str, np.ndarray],
    neighbour: dict[str, np.ndarray],
    constants: dict[str, Any],
    *,
    radius: int,
    eps: float,
    threaded: bool = True,
) -> list[np.ndarray]:
    """ESTARFM's twelve window sums (as :func:`stf_pipeline.methods.estarfm.core.body` accumulates them), float64.

    ``centre``, ``neighbour``, ``constants``: the arrays of
    :func:`stf_pipeline.methods.estarfm.core.prepare_arrays`; ``eps``:
    added to ``(1 - R) D`` before inverting. Returns ``[count, total, *sums]``: ``(y, x)`` twice,
    then ten ``(band, y, x)``.
    """
    fine = as_f32(neighbour["fine"])
    n_bands, h, w = fine.shape[1:]
    distance_term = distance_factors(radius)
    threshold = as_f32(np.asarray(constants["threshold"]).reshape(fine.shape[:2]))
    count = np.empty((h, w), dtype=np.float64)
    total = np.empty((h, w), dtype=np.float64)
    sums = np.empty((10, n_bands, h, w), dtype=np.float64)
    packed = _pack(*(as_f32(neighbour[k]) for k in ("fine0", "coarse0", "change")))
    inputs = (fine, as_f32(neighbour["spread"]), packed, threshold, distance_term, np.float32(eps), int(radius))
    run_rows(_estarfm_rows, h, inputs, (count, total, sums), threaded=threaded)
    return [count, total, *sums]
