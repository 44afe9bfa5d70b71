"""STARFM's window sums on the CPU, compiled with Numba (the sums of backend ``numba``, ``auto`` on CPUs).

The sums of the NumPy bodies (:mod:`stf_pipeline.methods.starfm.core`), with each window
offset's work fused into one compiled loop, so nothing goes through memory per offset. *Row
form*: for an output row, band and pair, the window rows in order and, for each, its offsets in
order: branch-free loops over the output row's pixels (vectorised by LLVM) add the offset's
weights to float32 sums over the window row (its input rows stay in the L1 cache), which are
then added to float64 accumulators. Neighbours outside the block are skipped and every pixel
adds its terms in the same offset order whatever block or row strip it sits in, so chunked
results equal unchunked ones bitwise. Rows are shared over the cores
(:func:`stf_pipeline.kernels.pool.run_rows`); ``cache=True`` keeps the compiled code on disk.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

from stf_pipeline.kernels.pool import run_rows
from stf_pipeline.kernels.similar import as_f32, distance_factors

_F0 = np.float32(0.0)
_F1 = np.float32(1.0)


@numba.njit(nogil=True, cache=True)
def _starfm_rows(
    fine: np.ndarray,
    spectral: np.ndarray,
    temporal: np.ndarray,
    unit: np.ndarray,
    inverse: np.ndarray,
    local: np.ndarray,
    centre_spectral: np.ndarray,
    centre_temporal: np.ndarray,
    threshold: np.ndarray,
    distance_factor: np.ndarray,
    radius: int,
    strict: bool,
    y_start: int,
    y_stop: int,
    total: np.ndarray,
    weighted: np.ndarray,
) -> None:  # pragma: no cover - compiled; covered through starfm_sums()
    # neighbour arrays (pair, band, y, x) float32, NaN where missing; centre_*: (band, y, x);
    # threshold: (pair, band); distance_factor: (side * side,) = 1 / (1 + d / A) per offset;
    # total, weighted: (band, y, x) float64, rows y_start:y_stop written
    n_pairs, n_bands, h, w = fine.shape
    side = 2 * radius + 1
    row_w = np.empty(w, dtype=np.float32)
    row_wl = np.empty(w, dtype=np.float32)
    for y in range(y_start, y_stop):
        for b in range(n_bands):
            out_w = total[b, y]
            out_wl = weighted[b, y]
            out_w[:] = 0.0
            out_wl[:] = 0.0
            for p in range(n_pairs):
                t = threshold[p, b]
                # one neighbour row at a time: its arrays stay in the L1 cache over the offsets
                for yy in range(max(0, y - radius), min(h, y + radius + 1)):
                    row_w[:] = _F0
                    row_wl[:] = _F0
                    for dx in range(-radius, radius + 1):
                        x0 = max(0, -dx)
                        x1 = min(w, w - dx)
                        if x0 >= x1:
                            continue
                        g = distance_factor[(yy - y + radius) * side + dx + radius]
                        # 1-d views from index 0: LLVM vectorises the loop (no index wraparound)
                        c_f = fine[p, b, y, x0:x1]
                        c_s = centre_spectral[b, y, x0:x1]
                        c_t = centre_temporal[b, y, x0:x1]
                        q_f = fine[p, b, yy, x0 + dx : x1 + dx]
                        q_s = spectral[p, b, yy, x0 + dx : x1 + dx]
                        q_t = temporal[p, b, yy, x0 + dx : x1 + dx]
                        q_u = unit[p, b, yy, x0 + dx : x1 + dx]
                        q_i = inverse[p, b, yy, x0 + dx : x1 + dx]
                        q_l = local[p, b, yy, x0 + dx : x1 + dx]
                        o_w = row_w[x0:x1]
                        o_wl = row_wl[x0:x1]
                        for i in range(x1 - x0):
                            near = abs(q_f[i] - c_f[i]) <= t
                            if strict:
                                keep = near & (q_s[i] <= c_s[i]) & (q_t[i] <= c_t[i])
                            else:
                                keep = near & ((q_s[i] <= c_s[i]) | (q_t[i] <= c_t[i]))
                            weight = q_u[i] + q_i[i] * g
                            o_w[i] += weight if keep else _F0
                            o_wl[i] += weight * q_l[i] if keep else _F0
                    for i in range(w):
                        out_w[i] += row_w[i]
                        out_wl[i] += row_wl[i]


def starfm_sums(
    centre: dict[str, np.ndarray],
    neighbour: dict[str, np.ndarray],
    constants: dict[str, Any],
    *,
    radius: int,
    strict: bool,
    threaded: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """STARFM's window sums ``(Σ w, Σ w L)``, ``(band, y, x)`` float64.

    ``centre``, ``neighbour``, ``constants``: the arrays of ``core.prepare_arrays``;
    ``strict``: the paper's filter (else the USDA program's ``either``).
    """
    fine = as_f32(neighbour["fine"])
    n_bands, h, w = fine.shape[1:]
    factor = _F1 / distance_factors(radius)
    total = np.empty((n_bands, h, w), dtype=np.float64)
    weighted = np.empty((n_bands, h, w), dtype=np.float64)
    threshold = as_f32(np.asarray(constants["threshold"]).reshape(fine.shape[:2]))
    arrays = [as_f32(neighbour[k]) for k in ("spectral", "temporal", "unit", "inverse", "local")]
    arrays += [as_f32(centre["spectral"]), as_f32(centre["temporal"])]
    inputs = (fine, *arrays, threshold, factor, int(radius), bool(strict))
    run_rows(_starfm_rows, h, inputs, (total, weighted), threaded=threaded)
    return total, weighted
