"""FSDAF's compiled CPU kernels (Numba): the similar-pixel step (g) and the per-pixel and per-cell steps.

:func:`blend` (step g) is most of the work. :func:`distribute`, :func:`temporal`,
:func:`cell_extremes`, :func:`cell_mean` and :func:`homogeneity` replace NumPy expressions that
made several full-size temporaries; each pixel or cell is computed on its own, in a fixed order.

In :func:`blend`, for every pixel the ``(2r+1)²`` window (truncated at the block edge) is
scanned one window row at a time: the row's float32 ranking keys are computed branch-free, in
whole SIMD vectors where the block allows (the same operations, in the same band order, as the
JAX path :mod:`stf_pipeline.methods.fsdaf.jax`), packed with their scan index into one int64 (key
bits above, index below: positive floats order like their bits), and those below the current
k-th best are inserted into a small sorted buffer, branch-free (each slot takes the min/max of
its old neighbours and the new key).
Equal keys thus go to the earlier offset in row-major window order: the tie-break of the
paper-literal reference (``tests/methods/fsdaf/reference_fsdaf.py``) and of ``jax.lax.top_k``. The weights of
the chosen pixels are then computed in float64.

The compiled functions release the GIL (``nogil=True``); :func:`blend` splits a block's rows over
the process-wide pool of one thread per core that STARFM and ESTARFM use too
(:func:`stf_pipeline.kernels.pool.run_rows`: shared by all Dask threads, so blocks
mapped at once never run more row strips than there are cores). Each pixel is computed on its own, so the
result does not depend on the split. ``cache=True`` keeps the compiled code on disk next to this
module (``__pycache__``), so only the first run on a machine pays the compilation.
"""

from __future__ import annotations

import numba
import numpy as np

from stf_pipeline.kernels.pool import run_rows

#: float32 lanes of the widest SIMD vector (AVX-512): the ranking keys are computed in whole vectors
_VECTOR = 16


@numba.njit(nogil=True, cache=True)
def _blend_rows(
    fine: np.ndarray,
    change: np.ndarray,
    threshold: np.ndarray,
    use: np.ndarray,
    rank: np.ndarray,
    radius: int,
    k: int,
    y_start: int,
    y_stop: int,
    out: np.ndarray,
) -> None:  # pragma: no cover - compiled; covered through blend()
    # fine, threshold: (band, y, x) float32; change: (band, y, x) float64; use: (y, x) bool;
    # rank: (side, lanes) float32 = 10 + d / r, padded with ones to whole SIMD vectors;
    # out: (band, y, x) float64, rows y_start:y_stop written
    nb, h, w = fine.shape
    side = 2 * radius + 1
    best = np.empty(k, dtype=np.int64)  # packed (key bits << 32 | scan index), ascending
    previous = np.empty(k, dtype=np.int64)
    hit = np.empty(side, dtype=np.int64)
    centre = np.empty(nb, dtype=np.float32)
    inv = np.empty(nb, dtype=np.float32)
    thr = np.empty(nb, dtype=np.float32)
    acc = np.empty(nb, dtype=np.float64)
    lanes = rank.shape[1]  # the window's columns rounded up to whole SIMD vectors
    spectral = np.empty(lanes, dtype=np.float32)
    passed = np.empty(lanes, dtype=np.bool_)
    key = np.empty(lanes, dtype=np.float32)
    key_bits = key.view(np.int32)
    eps = np.float32(1e-8)
    floor = np.float32(1e-5)
    inf = np.float32(np.inf)
    no_candidate = np.int64(0x7F800000) << 32  # the packed key of +inf: larger than any candidate's
    for y in range(y_start, y_stop):
        y0 = max(0, y - radius)
        y1 = min(h, y + radius + 1)
        for x in range(w):
            finite = True
            for b in range(nb):
                centre[b] = fine[b, y, x]
                inv[b] = np.float32(1.0) / (centre[b] + eps)
                thr[b] = threshold[b, y, x]
                finite = finite and np.isfinite(centre[b])
            if not finite:
                for b in range(nb):
                    out[b, y, x] = np.nan
                continue
            x0 = max(0, x - radius)
            x1 = min(w, x + radius + 1)
            m = x1 - x0
            rx = x0 - x + radius
            # keys over whole SIMD vectors where the block allows (the lanes past the window are
            # no candidates), so no lane is computed by a scalar remainder loop
            mm = lanes if rx == 0 and x0 + lanes <= w else m
            best[:] = no_candidate
            worst = no_candidate
            for yy in range(y0, y1):
                # keys of one window row, branch-free (vectorised by LLVM)
                ry = yy - y + radius
                for i in range(mm):
                    passed[i] = use[yy, x0 + i] & (i < m)
                    spectral[i] = 0.0
                for b in range(nb):
                    cb = centre[b]
                    tb = thr[b]
                    ib = inv[b]
                    for i in range(mm):
                        d = abs(fine[b, yy, x0 + i] - cb)
                        passed[i] = passed[i] & (d < tb)
                        spectral[i] += d * ib
                if yy == y:  # the pixel itself is a candidate whatever the threshold
                    passed[x - x0] = use[y, x]
                for i in range(mm):
                    key[i] = (spectral[i] + floor) * rank[ry, rx + i] if passed[i] else inf
                # those that beat the current k-th, then insertion into the sorted buffer
                base = ry * side + rx
                c = 0
                for i in range(m):
                    packed = (np.int64(key_bits[i]) << 32) | (base + i)
                    hit[c] = packed
                    c += packed < worst  # type: ignore[assignment]  # bool as 0/1, compiled
                for q in range(c):
                    packed = hit[q]
                    # branch-free insertion into the ascending buffer (empty slots hold `no_candidate`,
                    # the last drops out): slot j takes min(max(old j-1, packed), old j), which leaves
                    # the buffer as it is for a key above its last (one that an earlier hit of the row
                    # has since beaten)
                    previous[:] = best
                    best[0] = min(previous[0], packed)
                    for j in range(1, k):
                        best[j] = min(max(previous[j - 1], packed), previous[j])
                    worst = best[k - 1]
            n = 0
            for i in range(k):
                n += best[i] < no_candidate
            total = 0.0
            for b in range(nb):
                acc[b] = 0.0
            for i in range(n):
                scan = best[i] & 0xFFFFFFFF
                dy = scan // side - radius
                dx = scan % side - radius
                dist = np.sqrt(np.float64(dy * dy + dx * dx)) / radius
                s = 0.0
                for b in range(nb):
                    c64 = np.float64(centre[b])
                    s += abs(np.float64(fine[b, y + dy, x + dx]) - c64) / (c64 + 1e-8)
                weight = 1.0 / ((1.0 + dist) * (1.0 + s))
                total += weight
                for b in range(nb):
                    acc[b] += weight * change[b, y + dy, x + dx]
            for b in range(nb):
                out[b, y, x] = acc[b] / total if n > 0 else np.nan


def blend(
    fine: np.ndarray,
    change: np.ndarray,
    threshold: np.ndarray,
    use: np.ndarray,
    rank: np.ndarray,
    *,
    radius: int,
    k: int,
    threaded: bool = True,
) -> np.ndarray:
    """Weighted change of the ``k`` most similar pixels, ``(band, y, x)`` float64.

    Parameters
    ----------
    fine, threshold : ndarray ``(band, y, x)``, cast to float32
    change : ndarray ``(band, y, x)``, cast to float64
    use : ndarray ``(y, x)`` bool
        Pixels that may be similar pixels (finite fine and change).
    rank : ndarray ``(2r+1, 2r+1)`` float32
        Distance factor ``10 + d / r`` of the ranking key per window offset.
    radius, k : int
    threaded : bool, default True
        Share the rows over the process's pool of one thread per core; ``False``: run them in
        the calling thread (the same numbers).

    Returns
    -------
    ndarray ``(band, y, x)`` float64
        NaN where the pixel is NaN or has no candidate.
    """
    h = fine.shape[1]
    f = np.ascontiguousarray(fine, dtype=np.float32)
    c = np.ascontiguousarray(change, dtype=np.float64)
    t = np.ascontiguousarray(threshold, dtype=np.float32)
    u = np.ascontiguousarray(use, dtype=np.bool_)
    side = rank.shape[1]
    r = np.ones((side, -(-side // _VECTOR) * _VECTOR), dtype=np.float32)
    r[:, :side] = rank
    out = np.empty(f.shape, dtype=np.float64)
    run_rows(_blend_rows, h, (f, c, t, u, r, radius, k), (out,), threaded=threaded)
    return out


@numba.njit(nogil=True, cache=True)
def _distribute_rows(
    residual: np.ndarray,
    tps: np.ndarray,
    temporal: np.ndarray,
    het: np.ndarray,
    factor: int,
    eps: float,
    cap: float,
    bounded: bool,
    low: np.ndarray,
    high: np.ndarray,
    base: np.ndarray,
    cell_start: int,
    cell_stop: int,
    out: np.ndarray,
) -> None:  # pragma: no cover - compiled; covered through distribute()
    # residual, low, high: (band, hc, wc); tps, temporal, base, out: (band, y, x) float64; het: (y, x)
    nb, h, w = tps.shape
    wc = residual.shape[2]
    for ci in range(cell_start, cell_stop):
        y0 = ci * factor
        y1 = min(h, y0 + factor)
        for cj in range(wc):
            x0 = cj * factor
            x1 = min(w, x0 + factor)
            for b in range(nb):
                r = residual[b, ci, cj]
                total = 0.0
                count = 0
                for y in range(y0, y1):
                    for x in range(x0, x1):
                        e = tps[b, y, x] - temporal[b, y, x]
                        if r <= 0.0:  # keep the sign of r; NaN stays NaN (not min/max)
                            if e > 0.0:  # noqa: PLR1730
                                e = 0.0
                        elif e < 0.0:
                            e = 0.0
                        weight = abs(e) * het[y, x] + abs(r) * (1.0 - het[y, x]) + eps
                        out[b, y, x] = weight
                        if np.isfinite(weight):
                            total += weight
                            count += 1
                if count == 0:  # no valid weight: every pixel is NaN already
                    continue
                mean = total / count
                total = 0.0
                for y in range(y0, y1):
                    for x in range(x0, x1):
                        out[b, y, x] /= mean
                        if np.isfinite(out[b, y, x]):
                            total += out[b, y, x]
                capped = total / count
                total = 0.0
                for y in range(y0, y1):
                    for x in range(x0, x1):
                        if out[b, y, x] > cap:
                            out[b, y, x] = capped
                        if np.isfinite(out[b, y, x]):
                            total += out[b, y, x]
                mean = total / count
                for y in range(y0, y1):
                    for x in range(x0, x1):
                        value = out[b, y, x] / mean * r
                        if bounded:  # clip(temporal + value, low, high) - base, as np.clip
                            value = temporal[b, y, x] + value
                            if value < low[b, ci, cj]:  # noqa: PLR1730 - NaN stays NaN
                                value = low[b, ci, cj]
                            if value > high[b, ci, cj]:  # noqa: PLR1730
                                value = high[b, ci, cj]
                            value -= base[b, y, x]
                        out[b, y, x] = value


def distribute(
    residual: np.ndarray,
    tps: np.ndarray,
    temporal: np.ndarray,
    het: np.ndarray,
    factor: int,
    *,
    eps: float,
    cap: float,
    bounds: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    threaded: bool = True,
) -> np.ndarray:
    """Residual distribution of :func:`stf_pipeline.methods.fsdaf.distribute_residual`, one cell at a time.

    With ``bounds=(low, high, base)`` (``low``/``high`` per band and cell, ``base`` per pixel)
    returns ``clip(temporal + W·R, low, high) - base`` instead of ``W·R``, without the
    intermediate full-size arrays. Cell rows are shared over the pool like :func:`blend`'s pixel
    rows; every cell is computed on its own, so the split does not change the result.
    """
    r = np.ascontiguousarray(residual, dtype=np.float64)
    t = np.ascontiguousarray(tps, dtype=np.float64)
    tp = np.ascontiguousarray(temporal, dtype=np.float64)
    hi = np.ascontiguousarray(het, dtype=np.float64)
    if bounds is None:
        low = high = r
        base = tp
    else:
        low, high = (np.ascontiguousarray(v, dtype=np.float64) for v in bounds[:2])
        base = np.ascontiguousarray(bounds[2], dtype=np.float64)
    bounded = bounds is not None
    out = np.empty(t.shape, dtype=np.float64)
    hc = r.shape[1]
    args = (r, t, tp, hi, factor, eps, cap, bounded, low, high, base)
    run_rows(_distribute_rows, hc, args, (out,), threaded=threaded)
    return out


@numba.njit(nogil=True, cache=True)
def _temporal(
    fine: np.ndarray, labels: np.ndarray, change: np.ndarray, factor: int, out: np.ndarray
) -> None:  # pragma: no cover - compiled; covered through temporal()
    nb, h, w = fine.shape
    for y in range(h):
        ci = y // factor
        for x in range(w):
            c = labels[y, x]
            for b in range(nb):
                out[b, y, x] = fine[b, y, x] + change[b, c, ci, x // factor] if c >= 0 else np.nan


def temporal(fine: np.ndarray, labels: np.ndarray, change: np.ndarray, factor: int) -> np.ndarray:
    """``F1 + Δf[class]`` of :func:`stf_pipeline.methods.fsdaf.temporal_prediction`, compiled."""
    f = np.ascontiguousarray(fine, dtype=np.float64)
    out = np.empty(f.shape, dtype=np.float64)
    _temporal(
        f, np.ascontiguousarray(labels, dtype=np.int64), np.ascontiguousarray(change, dtype=np.float64), factor, out
    )
    return out


@numba.njit(nogil=True, cache=True)
def _extremes_rows(
    a: np.ndarray, groups: np.ndarray, factor: int, cell_start: int, cell_stop: int, low: np.ndarray, high: np.ndarray
) -> None:  # pragma: no cover - compiled; covered through cell_extremes()
    # a: (band, y, x); groups: (y, x) int, < 0 = none; low, high: (group, band, hc, wc)
    nb, h, w = a.shape
    n_groups, _, _, wc = low.shape
    for ci in range(cell_start, cell_stop):
        y0 = ci * factor
        y1 = min(h, y0 + factor)
        for cj in range(wc):
            x0 = cj * factor
            x1 = min(w, x0 + factor)
            for g in range(n_groups):
                for b in range(nb):
                    low[g, b, ci, cj] = np.inf
                    high[g, b, ci, cj] = -np.inf
            for y in range(y0, y1):
                for x in range(x0, x1):
                    g = groups[y, x]
                    if g < 0 or g >= n_groups:
                        continue
                    for b in range(nb):
                        v = a[b, y, x]
                        if np.isfinite(v):
                            low[g, b, ci, cj] = min(low[g, b, ci, cj], v)
                            high[g, b, ci, cj] = max(high[g, b, ci, cj], v)


def cell_extremes(
    a: np.ndarray, groups: np.ndarray, n_groups: int, factor: int, *, threaded: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Min and max of the finite values of each group (e.g. class) in each cell.

    Parameters
    ----------
    a : ndarray ``(band, y, x)``
    groups : ndarray ``(y, x)`` int
        Group of each pixel in ``[0, n_groups)``; other values are left out.
    n_groups, factor : int

    Returns
    -------
    low, high : ndarray ``(group, band, hc, wc)`` float64
        ``+inf`` / ``-inf`` where a group has no finite value in the cell.
    """
    x = np.ascontiguousarray(a, dtype=np.float64)
    g = np.ascontiguousarray(groups, dtype=np.int64)
    nb, h, w = x.shape
    hc, wc = -(-h // factor), -(-w // factor)
    low = np.empty((n_groups, nb, hc, wc))
    high = np.empty((n_groups, nb, hc, wc))
    run_rows(_extremes_rows, hc, (x, g, factor), (low, high), threaded=threaded)
    return low, high


@numba.njit(nogil=True, cache=True)
def _homogeneity(labels: np.ndarray, radius: int, out: np.ndarray) -> None:  # pragma: no cover - compiled
    h, w = labels.shape
    n_classes = 0
    for y in range(h):
        for x in range(w):
            n_classes = max(n_classes, labels[y, x] + 1)
    integral = np.zeros((h + 1, w + 1), dtype=np.int64)
    for y in range(h):
        for x in range(w):
            out[y, x] = 0.0
    for c in range(n_classes):
        for y in range(h):
            run = 0
            for x in range(w):
                run += labels[y, x] == c
                integral[y + 1, x + 1] = integral[y, x + 1] + run
        for y in range(h):
            y0 = max(0, y - radius)
            y1 = min(h, y + radius + 1)
            for x in range(w):
                if labels[y, x] != c:
                    continue
                x0 = max(0, x - radius)
                x1 = min(w, x + radius + 1)
                same = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
                out[y, x] = same / ((y1 - y0) * (x1 - x0))


def homogeneity(labels: np.ndarray, radius: int) -> np.ndarray:
    """Share of the ``(2r+1)²`` window (truncated at the edges) in the pixel's own class; 0 if unclassified.

    Exact integer window counts from one integral image per class
    (:func:`stf_pipeline.methods.fsdaf.heterogeneity`).
    """
    out = np.empty(labels.shape, dtype=np.float64)
    _homogeneity(np.ascontiguousarray(labels, dtype=np.int64), radius, out)
    return out


@numba.njit(nogil=True, cache=True)
def _cell_mean(a: np.ndarray, factor: int, out: np.ndarray) -> None:  # pragma: no cover - compiled
    n, h, w = a.shape
    _, hc, wc = out.shape
    total = np.zeros(wc)
    count = np.zeros(wc, dtype=np.int64)
    for i in range(n):
        for ci in range(hc):
            total[:] = 0.0
            count[:] = 0
            for y in range(ci * factor, min(h, (ci + 1) * factor)):
                for x in range(w):
                    v = a[i, y, x]
                    if np.isfinite(v):
                        total[x // factor] += v
                        count[x // factor] += 1
            for cj in range(wc):
                out[i, ci, cj] = total[cj] / count[cj] if count[cj] > 0 else np.nan


def cell_mean(a: np.ndarray, factor: int) -> np.ndarray:
    """Mean of the finite values of each ``factor × factor`` cell on the last two axes (NaN if none)."""
    x = np.asarray(a, dtype=np.float64)
    lead, (h, w) = x.shape[:-2], x.shape[-2:]
    out = np.empty((int(np.prod(lead)), -(-h // factor), -(-w // factor)))
    _cell_mean(np.ascontiguousarray(x.reshape(-1, h, w)), factor, out)
    return out.reshape(*lead, *out.shape[1:])
