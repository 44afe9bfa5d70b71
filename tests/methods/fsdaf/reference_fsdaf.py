"""Slow float64 step-by-step FSDAF (Zhu et al. 2016) for checking ``stf_pipeline.methods.fsdaf``.

Written from the paper and the authors' IDL code with explicit loops over cells and pixels, no
code shared with the library: TPS by SciPy's ``RBFInterpolator(kernel='thin_plate_spline')``, the
bounded least squares by SciPy's BVLS. The rules that the library documents as its own choices
(moving windows, tie-breaks, global noise clip) are reproduced literally. Use on small scenes only.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.interpolate import RBFInterpolator
from scipy.optimize import lsq_linear

MIN_FRACTION = 0.01
RIDGE = 1e-6
EPS_W = 1e-10


def reference_fsdaf(f1, c1, c2, **kwargs):
    """FSDAF prediction ``(band, y, x)`` float64 from ``(band, y, x)`` arrays, one pair.

    Keywords: ``centres`` or (``labels``, ``n_classes``), ``factor``, ``half_window``, ``n_similar``,
    ``n_pure``, ``unmix_radius``, ``tps_radius``, ``valid_range``, ``fine_clip``.
    """
    with warnings.catch_warnings():  # all-NaN cells (missing coarse data) give empty means
        warnings.simplefilter("ignore", RuntimeWarning)
        return _reference(f1, c1, c2, **kwargs)


def _reference(f1, c1, c2, *, centres=None, labels=None, factor, half_window, n_similar, n_pure,
               unmix_radius, tps_radius, valid_range=(0.0, 1.0), fine_clip=None, n_classes=None):
    f1 = np.asarray(f1, float)
    c1 = np.asarray(c1, float)
    c2 = np.asarray(c2, float)
    nb, h, w = f1.shape
    lo_v, hi_v = valid_range
    # (a) classes
    if labels is None:
        labels = np.full((h, w), -1)
        for y in range(h):
            for x in range(w):
                if np.isfinite(f1[:, y, x]).all():
                    d = [((f1[:, y, x] - np.asarray(c)) ** 2).sum() for c in centres]
                    labels[y, x] = int(np.argmin(d))
        n_classes = len(centres)
    f1c = f1.copy()
    for b in range(nb):
        lo, hi = (lo_v, hi_v) if fine_clip is None else (max(fine_clip[b][0], lo_v), min(fine_clip[b][1], hi_v))
        f1c[b] = np.clip(f1[b], lo, hi)
    hc, wc = -(-h // factor), -(-w // factor)

    def pix(i, j):
        return slice(i * factor, min((i + 1) * factor, h)), slice(j * factor, min((j + 1) * factor, w))

    def window(i, j, r):
        return [(a, b) for a in range(i - r, i + r + 1) for b in range(j - r, j + r + 1) if 0 <= a < hc and 0 <= b < wc]

    # (b) fractions
    frac = np.full((n_classes, hc, wc), np.nan)
    complete = np.zeros((hc, wc), bool)
    dc = np.full((nb, hc, wc), np.nan)
    c2_cell = np.full((nb, hc, wc), np.nan)
    for i in range(hc):
        for j in range(wc):
            lab = labels[pix(i, j)]
            if (lab >= 0).any():
                for c in range(n_classes):
                    frac[c, i, j] = (lab == c).sum() / (lab >= 0).sum()
            complete[i, j] = (lab >= 0).all()
            for b in range(nb):
                v1 = c1[b][pix(i, j)]
                v2 = c2[b][pix(i, j)]
                m1 = v1[np.isfinite(v1)].mean() if np.isfinite(v1).any() else np.nan
                m2 = v2[np.isfinite(v2)].mean() if np.isfinite(v2).any() else np.nan
                dc[b, i, j] = m2 - m1
                c2_cell[b, i, j] = m2
    usable = complete & np.isfinite(dc).all(axis=0)
    # (c) unmixing per cell and band
    g = np.zeros((nb, n_classes, hc, wc))
    for i in range(hc):
        for j in range(wc):
            win = window(i, j, unmix_radius)
            for b in range(nb):
                vals = np.array([dc[b, a, c] for a, c in win if np.isfinite(dc[b, a, c])])
                if vals.size == 0:  # no coarse change anywhere in the window
                    g[b, :, i, j] = np.nan
                    continue
                std = vals.std(ddof=1) if vals.size > 1 else 0.0
                low, high = vals.min() - std, vals.max() + std
                mean = vals.mean()
                rows, ys = [], []
                for k in range(n_classes):
                    cand = [(a, c) for a, c in win if usable[a, c] and frac[k, a, c] > MIN_FRACTION]
                    cand.sort(
                        key=lambda t: (
                            -frac[k, t[0], t[1]],
                            (t[0] - i) ** 2 + (t[1] - j) ** 2,
                            (t[0] - i + unmix_radius) * (2 * unmix_radius + 1) + t[1] - j + unmix_radius,
                        )
                    )
                    cand = cand[:n_pure]
                    if not cand:
                        continue
                    yv = np.array([dc[b, a, c] for a, c in cand])
                    ys_sorted = np.sort(yv)
                    n = len(yv)
                    lo_t = ys_sorted[min(int(np.floor(0.1 * n + 1e-9)), n - 1)]
                    hi_t = ys_sorted[min(int(np.floor(0.9 * n + 1e-9)), n - 1)]
                    for (a, c), v in zip(cand, yv, strict=True):
                        if lo_t <= v <= hi_t:
                            rows.append(frac[:, a, c])
                            ys.append(v)
                x_mat = np.vstack([np.array(rows).reshape(-1, n_classes), np.sqrt(RIDGE) * np.eye(n_classes)])
                y_vec = np.concatenate([np.array(ys), np.sqrt(RIDGE) * np.full(n_classes, mean)])
                if low < high:
                    g[b, :, i, j] = lsq_linear(x_mat, y_vec, bounds=(low, high), method="bvls", tol=1e-14).x
                else:  # a window whose changes are all equal: the bounds pin the solution
                    g[b, :, i, j] = low
    # (d) temporal prediction, residual
    temporal = np.full((nb, h, w), np.nan)
    for y in range(h):
        for x in range(w):
            if labels[y, x] >= 0:
                temporal[:, y, x] = f1c[:, y, x] + g[:, labels[y, x], y // factor, x // factor]
    resid = dc - np.einsum("kij,bkij->bij", np.nan_to_num(frac), g)
    # (e) TPS per cell
    tps = np.full((nb, h, w), np.nan)
    for i in range(hc):
        for j in range(wc):
            knots = [(a, c) for a, c in window(i, j, tps_radius) if np.isfinite(c2_cell[:, a, c]).all()]
            ys_, xs_ = pix(i, j)
            yy, xx = np.meshgrid(np.arange(ys_.start, ys_.stop), np.arange(xs_.start, xs_.stop), indexing="ij")
            targets = np.stack([(yy + 0.5) / factor - 0.5, (xx + 0.5) / factor - 0.5], -1).reshape(-1, 2)
            pts = np.array(knots, float).reshape(-1, 2)
            vals = np.array([c2_cell[:, a, c] for a, c in knots]).reshape(-1, nb)
            if len(knots) >= 3 and np.linalg.matrix_rank(np.hstack([np.ones((len(pts), 1)), pts])) == 3:
                est = RBFInterpolator(pts, vals, kernel="thin_plate_spline", degree=1)(targets)
            else:
                est = np.tile(vals.mean(axis=0), (len(targets), 1))
            tps[:, ys_, xs_] = est.T.reshape(nb, *yy.shape)
    # (f) homogeneity, residual distribution, allowed range
    r = half_window
    het = np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            win_l = labels[max(0, y - r): y + r + 1, max(0, x - r): x + r + 1]
            if labels[y, x] >= 0:
                het[y, x] = (win_l == labels[y, x]).sum() / win_l.size
    second = np.full((nb, h, w), np.nan)
    for i in range(hc):
        for j in range(wc):
            ys_, xs_ = pix(i, j)
            win = window(i, j, unmix_radius)
            for b in range(nb):
                rr = resid[b, i, j]
                e = tps[b][ys_, xs_] - temporal[b][ys_, xs_]
                e = np.minimum(e, 0) if rr <= 0 else np.maximum(e, 0)
                wt = np.abs(e) * het[ys_, xs_] + abs(rr) * (1 - het[ys_, xs_]) + EPS_W
                wt = wt / np.nanmean(wt)
                wt = np.where(wt > 10, np.nanmean(wt), wt)
                wt = wt / np.nanmean(wt)
                c2_win = np.concatenate([c2[b][pix(a, c)].ravel() for a, c in win])
                cmin, cmax = np.nanmin(c2_win), np.nanmax(c2_win)
                tmin, tmax = np.inf, -np.inf
                for k in range(n_classes):
                    vals = np.concatenate([f1c[b][pix(a, c)][labels[pix(a, c)] == k] for a, c in win])
                    if vals.size:
                        tmin = min(tmin, vals.min() + g[b, k, i, j])
                        tmax = max(tmax, vals.max() + g[b, k, i, j])
                low = max(min(cmin, tmin), lo_v)
                high = min(max(cmax, tmax), hi_v)
                second[b][ys_, xs_] = np.clip(temporal[b][ys_, xs_] + wt * rr, low, high)
    change = second - f1c
    # (g) similar pixels
    th = np.zeros((nb, hc, wc))
    for i in range(hc):
        for j in range(wc):
            win = window(i, j, unmix_radius)
            present = {int(k) for a, c in win for k in np.unique(labels[pix(a, c)]) if k >= 0}
            for b in range(nb):
                vals = np.concatenate([f1[b][pix(a, c)].ravel() for a, c in win])
                vals = vals[np.isfinite(vals)]
                th[b, i, j] = 2 * vals.std(ddof=1) / max(len(present), 1)
    out = np.full((nb, h, w), np.nan)
    ok = np.isfinite(f1).all(0) & np.isfinite(change).all(0)
    for y in range(h):
        for x in range(w):
            if not np.isfinite(f1[:, y, x]).all():
                continue
            cands = []
            for yy in range(y - r, y + r + 1):
                for xx in range(x - r, x + r + 1):
                    if not (0 <= yy < h and 0 <= xx < w) or not ok[yy, xx]:
                        continue
                    diff = np.abs(f1[:, yy, xx] - f1[:, y, x])
                    if (yy, xx) != (y, x) and not (diff < th[:, y // factor, x // factor]).all():
                        continue
                    s = (diff / (f1[:, y, x] + 1e-8)).sum()
                    d = np.hypot(yy - y, xx - x) / r
                    scan = (yy - y + r) * (2 * r + 1) + (xx - x + r)
                    cands.append(((s + 1e-5) * (10 + d), scan, s, d, yy, xx))
            if not cands:
                continue
            cands.sort(key=lambda t: (t[0], t[1]))
            sel = cands[:n_similar]
            wts = np.array([1 / ((1 + d) * (1 + s)) for _, _, s, d, _, _ in sel])
            wts /= wts.sum()
            ch = np.array([change[:, yy, xx] for *_, yy, xx in sel])
            out[:, y, x] = f1[:, y, x] + wts @ ch
    fallback = np.clip(f1 + c2 - c1, lo_v, hi_v)
    return np.where((out < lo_v) | (out > hi_v), fallback, out)
