"""FSDAF's compiled CPU kernels (Numba): the similar-pixel step (g) and the per-pixel and per-cell steps.

:func:`blend` (step g) is most of the work. :func:`distribute`, :func:`temporal`,
:func:`cell_extremes`, :func:`cell_mean` and :func:`homogeneity` replace NumPy expressions that
made several full-size temporaries; each pixel or cell is computed on its own, in a fixed order.

In :func:`blend`, every pixel's ``(2r+1)²`` window (truncated at the block edge) is scanned one
window row at a time, sixteen offsets at once: :func:`_window_keys` computes their float32 ranking
keys as explicit SIMD vectors (the same operations, in the same band order, as the JAX path
:mod:`stf_pipeline.methods.fsdaf.jax`; the block is padded on the right with missing pixels, so
every group of sixteen is read whole), keeps the row in a small buffer and returns the bit mask of
the keys below a *bound*. The bound is a guess, the ``n_similar``-th key of the previous pixel of
the row times :data:`_GUESS_MARGIN` (neighbours' keys are alike); while fewer than ``n_similar``
keys lie below it, it grows (:data:`_GUESS_GROWTH`, then no bound) and the buffered keys are
counted again (:func:`_below_mask`). The keys below the bound, packed with their scan index into
one int64 (key bits above, index below: positive floats order like their bits), are then the only
ones sorted, and the ``n_similar`` smallest kept. That is the same selection as a scan of every key
into a sorted buffer: equal keys go to the earlier offset in row-major window order, the tie-break
of the paper-literal reference (``tests/methods/fsdaf/reference_fsdaf.py``) and of
``jax.lax.top_k``; the guess changes how many keys are sorted, never which are kept. The weights
of the chosen pixels are then computed in float64.

The compiled functions release the GIL (``nogil=True``); :func:`blend` splits a block's rows over
the process-wide pool of one thread per core that STARFM and ESTARFM use too
(:func:`stf_pipeline.kernels.pool.run_rows`: shared by all Dask threads, so blocks
mapped at once never run more row strips than there are cores). Each pixel is computed on its own
(the guess only carries a starting bound along a row), so the result does not depend on the split.
``cache=True`` keeps the compiled code on disk next to this module (``__pycache__``), so only the
first run on a machine pays the compilation.
"""

from __future__ import annotations

from typing import Any

import llvmlite.ir as llvm_ir
import numba
import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from stf_pipeline.kernels.pool import run_rows

#: window offsets whose ranking keys are computed together (one SIMD vector of float32)
_VECTOR = 16
#: the first bound of a pixel's keys: the previous pixel's ``n_similar``-th key times this
_GUESS_MARGIN = 1.2
#: factor by which a bound too low to hold ``n_similar`` keys grows (then: no bound)
_GUESS_GROWTH = 1.5


def _splat(builder: Any, value: Any, vector: Any) -> Any:
    """``value`` in every lane of an LLVM ``vector`` type."""
    undef = llvm_ir.Constant(vector, llvm_ir.Undefined)
    lane0 = builder.insert_element(undef, value, llvm_ir.Constant(llvm_ir.IntType(32), 0))
    return builder.shuffle_vector(lane0, undef, llvm_ir.Constant(llvm_ir.VectorType(llvm_ir.IntType(32), _VECTOR),
                                                                 [0] * _VECTOR))


def _load_vector(builder: Any, pointer: Any, vector: Any, align: int) -> Any:
    return builder.load(builder.bitcast(pointer, vector.as_pointer()), align=align)


def _mask_bits(builder: Any, lanes: Any) -> Any:
    """An ``<16 x i1>`` lane mask as the low 16 bits of an int64."""
    return builder.zext(builder.bitcast(lanes, llvm_ir.IntType(_VECTOR)), llvm_ir.IntType(64))


@intrinsic
def _window_keys(
    typingctx: Any, fine: Any, use: Any, rank: Any, keys: Any, centre: Any, inv: Any, thr: Any, yy: Any, x0: Any,
    ry: Any, rx: Any, lane0: Any, m: Any, bound: Any,
) -> Any:  # pragma: no cover - compiled
    """Ranking keys of the 16 window offsets ``lane0 .. lane0 + 15`` of window row ``ry`` (image row
    ``yy``, columns from ``x0``), stored in ``keys[ry, lane0:lane0 + 16]``; returns the mask of
    those whose key bits (int32) are below ``bound``.

    Per lane, as the scalar expression ``(Σ_b |F_b - c_b| · inv_b + 1e-5) · rank`` (bands added in
    order from 0.0, float32, no fused multiply-add) if ``use`` and the lane is one of the ``m``
    window columns and ``|F_b - c_b| < thr_b`` in every band, else ``inf``. ``fine`` and ``use``
    must hold 16 columns from ``x0 + lane0`` (the caller pads them).
    """
    sig = types.int64(fine, use, rank, keys, centre, inv, thr, yy, x0, ry, rx, lane0, m, bound)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        fine_v, use_v, rank_v, keys_v, centre_v, inv_v, thr_v, yy_v, x0_v, ry_v, rx_v, lane0_v, m_v, bound_v = args
        f32, i32 = llvm_ir.FloatType(), llvm_ir.IntType(32)
        vf = llvm_ir.VectorType(f32, _VECTOR)
        vi = llvm_ir.VectorType(i32, _VECTOR)
        vbyte = llvm_ir.VectorType(llvm_ir.IntType(8), _VECTOR)
        fa, ua, ra, ka, ca, ia, ta = (
            context.make_array(ty)(context, builder, value)
            for ty, value in zip(signature.args[:7], args[:7], strict=True)
        )
        _, h, w = cgutils.unpack_tuple(builder, fa.shape, 3)
        use_w = cgutils.unpack_tuple(builder, ua.shape, 2)[1]
        rank_w = cgutils.unpack_tuple(builder, ra.shape, 2)[1]
        keys_w = cgutils.unpack_tuple(builder, ka.shape, 2)[1]
        n_bands = cgutils.unpack_tuple(builder, ca.shape, 1)[0]
        col = builder.add(x0_v, lane0_v)
        # candidates: use & (lane < m)
        used = _load_vector(builder, builder.gep(ua.data, [builder.add(builder.mul(yy_v, use_w), col)]), vbyte, 1)
        passed = builder.icmp_unsigned("!=", used, llvm_ir.Constant(vbyte, [0] * _VECTOR))
        lane = builder.add(_splat(builder, builder.trunc(lane0_v, i32), vi), llvm_ir.Constant(vi, list(range(_VECTOR))))
        passed = builder.and_(passed, builder.icmp_signed("<", lane, _splat(builder, builder.trunc(m_v, i32), vi)))
        spectral_slot = cgutils.alloca_once(builder, vf)
        passed_slot = cgutils.alloca_once(builder, passed.type)
        builder.store(llvm_ir.Constant(vf, [0.0] * _VECTOR), spectral_slot)
        builder.store(passed, passed_slot)
        fabs = cgutils.get_or_insert_function(builder.module, llvm_ir.FunctionType(vf, [vf]), "llvm.fabs.v16f32")
        with cgutils.for_range(builder, n_bands) as loop:
            b = loop.index
            row = builder.add(builder.mul(b, h), yy_v)
            q = _load_vector(builder, builder.gep(fa.data, [builder.add(builder.mul(row, w), col)]), vf, 4)
            cb, ib, tb = (builder.load(builder.gep(a.data, [b])) for a in (ca, ia, ta))
            d = builder.call(fabs, [builder.fsub(q, _splat(builder, cb, vf))])
            inside = builder.fcmp_ordered("<", d, _splat(builder, tb, vf))
            builder.store(builder.and_(builder.load(passed_slot), inside), passed_slot)
            spectral = builder.fadd(builder.load(spectral_slot), builder.fmul(d, _splat(builder, ib, vf)))
            builder.store(spectral, spectral_slot)
        rank_row = builder.gep(ra.data, [builder.add(builder.mul(ry_v, rank_w), builder.add(rx_v, lane0_v))])
        key = builder.fmul(
            builder.fadd(builder.load(spectral_slot), llvm_ir.Constant(vf, [float(np.float32(1e-5))] * _VECTOR)),
            _load_vector(builder, rank_row, vf, 4),
        )
        key = builder.select(builder.load(passed_slot), key, llvm_ir.Constant(vf, [float("inf")] * _VECTOR))
        key_row = builder.gep(ka.data, [builder.add(builder.mul(ry_v, keys_w), lane0_v)])
        builder.store(key, builder.bitcast(key_row, vf.as_pointer()), align=4)
        below = builder.icmp_signed("<", builder.bitcast(key, vi), _splat(builder, builder.trunc(bound_v, i32), vi))
        return _mask_bits(builder, below)

    return sig, codegen


@intrinsic
def _below_mask(typingctx: Any, keys: Any, ry: Any, lane0: Any, bound: Any) -> Any:  # pragma: no cover - compiled
    """Mask of the 16 keys ``keys[ry, lane0:lane0 + 16]`` whose bits (int32) are below ``bound``."""
    sig = types.int64(keys, ry, lane0, bound)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        keys_v, ry_v, lane0_v, bound_v = args
        i32 = llvm_ir.IntType(32)
        vi = llvm_ir.VectorType(i32, _VECTOR)
        ka = context.make_array(signature.args[0])(context, builder, keys_v)
        keys_w = cgutils.unpack_tuple(builder, ka.shape, 2)[1]
        bits = _load_vector(builder, builder.gep(ka.data, [builder.add(builder.mul(ry_v, keys_w), lane0_v)]), vi, 4)
        return _mask_bits(builder, builder.icmp_signed("<", bits, _splat(builder, builder.trunc(bound_v, i32), vi)))

    return sig, codegen


@intrinsic
def _popcount(typingctx: Any, value: Any) -> Any:  # pragma: no cover - compiled
    """Number of set bits of an integer."""
    if not isinstance(value, types.Integer):
        return None
    return value(value), lambda context, builder, signature, args: builder.ctpop(args[0])


@intrinsic
def _trailing_zeros(typingctx: Any, value: Any) -> Any:  # pragma: no cover - compiled
    """Index of the lowest set bit of a non-zero integer."""
    if not isinstance(value, types.Integer):
        return None
    return value(value), lambda context, builder, signature, args: builder.cttz(
        args[0], llvm_ir.Constant(llvm_ir.IntType(1), 1)
    )


@numba.njit(nogil=True, cache=True)
def _grow(bound: np.int32, factor: np.float32, scratch: np.ndarray) -> np.int32:  # pragma: no cover - compiled
    """The bits of the float32 with bits ``bound`` times ``factor``; ``inf``'s bits unless positive and finite."""
    bits = scratch.view(np.int32)
    bits[0] = bound
    scratch[0] = scratch[0] * factor
    return bits[0] if 0 < bits[0] < 0x7F800000 else np.int32(0x7F800000)


@numba.njit(nogil=True, cache=True)
def _blend_rows(
    fine: np.ndarray,
    change: np.ndarray,
    threshold: np.ndarray,
    use: np.ndarray,
    rank: np.ndarray,
    radius: int,
    k: int,
    lanes: int,
    y_start: int,
    y_stop: int,
    out: np.ndarray,
) -> None:  # pragma: no cover - compiled; covered through blend()
    # fine: (band, y, x + lanes) float32, padded with NaN; change: (band, y, x) float64; threshold:
    # (band, y, x) float32; use: (y, x + lanes) bool, padded with False; rank: (side, radius + lanes)
    # float32 = 10 + d / r, padded with ones; lanes: the window's columns rounded up to whole SIMD
    # vectors; out: (band, y, x) float64, rows y_start:y_stop written
    nb, h, padded = fine.shape
    w = padded - lanes
    side = 2 * radius + 1
    vectors = lanes // _VECTOR
    keys = np.empty((side, lanes), dtype=np.float32)
    key_bits = keys.view(np.int32)
    masks = np.empty((side, vectors), dtype=np.int64)
    hit = np.empty(side * lanes, dtype=np.int64)
    best = np.empty(k, dtype=np.int64)  # packed (key bits << 32 | scan index), ascending
    centre = np.empty(nb, dtype=np.float32)
    inv = np.empty(nb, dtype=np.float32)
    thr = np.empty(nb, dtype=np.float32)
    acc = np.empty(nb, dtype=np.float64)
    scratch = np.empty(1, dtype=np.float32)
    eps = np.float32(1e-8)
    floor = np.float32(1e-5)
    margin = np.float32(_GUESS_MARGIN)
    growth = np.float32(_GUESS_GROWTH)
    unbounded = np.int32(0x7F800000)  # the bits of +inf: above every candidate's key
    for y in range(y_start, y_stop):
        y0 = max(0, y - radius)
        y1 = min(h, y + radius + 1)
        guess = unbounded
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
            m = min(w, x + radius + 1) - x0
            rx = x0 - x + radius
            # the keys of every window row, the masks of those below the guess
            count = 0
            for yy in range(y0, y1):
                ry = yy - y + radius
                for v in range(vectors):
                    mask: int = _window_keys(  # type: ignore[call-arg]  # typing context passed by Numba
                        fine, use, rank, keys, centre, inv, thr, yy, x0, ry, rx, v * _VECTOR, m, guess
                    )
                    masks[ry, v] = mask
                    count += _popcount(mask)
            # the pixel itself is a candidate whatever the threshold
            i = x - x0
            was_below = key_bits[radius, i] < guess
            spectral = np.float32(0.0)
            for b in range(nb):
                spectral += abs(centre[b] - centre[b]) * inv[b]
            keys[radius, i] = (spectral + floor) * rank[radius, rx + i] if use[y, x] else np.float32(np.inf)
            is_below = key_bits[radius, i] < guess
            if was_below != is_below:
                masks[radius, i // _VECTOR] ^= np.int64(1) << (i % _VECTOR)
                count += int(is_below) - int(was_below)
            # a bound with at least k keys below it (or none)
            bound = guess
            while count < k and bound < unbounded:
                bound = _grow(bound, growth, scratch)
                count = 0
                for ry in range(y0 - y + radius, y1 - y + radius):
                    for v in range(vectors):
                        mask = _below_mask(keys, ry, v * _VECTOR, bound)  # type: ignore[call-arg]
                        masks[ry, v] = mask
                        count += _popcount(mask)
            # those keys packed with their scan index, then the k smallest in ascending order
            n_hit = 0
            for ry in range(y0 - y + radius, y1 - y + radius):
                for v in range(vectors):
                    mask = masks[ry, v]
                    while mask != 0:
                        i = v * _VECTOR + _trailing_zeros(mask)  # type: ignore[call-arg]
                        mask &= mask - 1
                        hit[n_hit] = (np.int64(key_bits[ry, i]) << 32) | (ry * side + rx + i)
                        n_hit += 1
            n = 0
            for q in range(n_hit):
                packed = hit[q]
                if n == k:
                    if packed >= best[k - 1]:
                        continue
                    j = k - 1
                else:
                    j = n
                    n += 1
                while j > 0 and best[j - 1] > packed:
                    best[j] = best[j - 1]
                    j -= 1
                best[j] = packed
            guess = _grow(np.int32(best[k - 1] >> 32), margin, scratch) if n == k else unbounded
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
    nb, h, w = fine.shape
    side = rank.shape[1]
    lanes = -(-side // _VECTOR) * _VECTOR
    # padded on the right so that every group of offsets is read whole (the padding is no candidate)
    f = np.full((nb, h, w + lanes), np.nan, dtype=np.float32)
    f[:, :, :w] = fine
    u = np.zeros((h, w + lanes), dtype=np.bool_)
    u[:, :w] = use
    c = np.ascontiguousarray(change, dtype=np.float64)
    t = np.ascontiguousarray(threshold, dtype=np.float32)
    r = np.ones((side, radius + lanes), dtype=np.float32)
    r[:, :side] = rank
    out = np.empty(change.shape, dtype=np.float64)
    run_rows(_blend_rows, h, (f, c, t, u, r, radius, k, lanes), (out,), threaded=threaded)
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
