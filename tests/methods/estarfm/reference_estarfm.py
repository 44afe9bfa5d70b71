"""A deliberately slow, per-pixel float64 ESTARFM, written from Zhu et al. (2010) and the
description of the authors' code (similar pixels in every band of both dates; weights from the
spectral correlation and distance; conversion coefficient by least squares with its F test;
temporal weights from window means; the out-of-range and too-few-similar-pixels fallbacks).
Used only to check the fast kernel.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def _correlation(x: list[float], y: list[float]) -> float:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return math.nan
    return sxy / math.sqrt(sxx * syy)


def reference_estarfm(
    fine: np.ndarray,
    coarse: np.ndarray,
    coarse_target: np.ndarray,
    *,
    half_window: int,
    n_classes: float = 4.0,
    value_range: tuple[float, float] = (0.0, 1.0),
    min_coarse_change: float = 0.02,
    significance: float = 0.05,
    max_conversion: float = 5.0,
    min_similar: int = 6,
) -> np.ndarray:
    """ESTARFM of ``fine``/``coarse`` ``(2, band, y, x)`` and ``coarse_target`` ``(band, y, x)``."""
    F = np.asarray(fine, dtype=np.float64)
    C = np.asarray(coarse, dtype=np.float64)
    C0 = np.asarray(coarse_target, dtype=np.float64)
    _, nb, ny, nx = F.shape
    w = half_window

    def ok(i: int, j: int) -> bool:
        values = list(F[:, :, i, j].ravel()) + list(C[:, :, i, j].ravel()) + list(C0[:, i, j])
        return not any(math.isnan(v) for v in values)

    valid = [[ok(i, j) for j in range(nx)] for i in range(ny)]
    threshold = np.zeros((2, nb))
    for k in range(2):
        for b in range(nb):
            vals = [F[k, b, i, j] for i in range(ny) for j in range(nx) if not math.isnan(F[k, b, i, j])]
            mean = sum(vals) / len(vals)
            threshold[k, b] = 2.0 * math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals)) / n_classes

    def correlation(i: int, j: int) -> float:
        if nb == 1:
            r = 1.0 - 0.5 * sum(abs((F[k, 0, i, j] - C[k, 0, i, j]) / (F[k, 0, i, j] + C[k, 0, i, j])) for k in (0, 1))
        else:
            r = _correlation(list(F[:, :, i, j].ravel()), list(C[:, :, i, j].ravel()))
        return 0.5 if math.isnan(r) else r

    out = np.full((nb, ny, nx), np.nan)
    for i in range(ny):
        for j in range(nx):
            if not valid[i][j]:
                continue
            window = [
                (y, x)
                for y in range(max(0, i - w), min(ny, i + w + 1))
                for x in range(max(0, j - w), min(nx, j + w + 1))
                if valid[y][x]
            ]
            similar = [
                (y, x)
                for (y, x) in window
                if all(abs(F[k, b, y, x] - F[k, b, i, j]) < threshold[k, b] for k in (0, 1) for b in range(nb))
            ]
            for b in range(nb):
                mean0 = sum(C0[b, y, x] for y, x in window) / len(window)
                mean1 = sum(C[0, b, y, x] for y, x in window) / len(window)
                mean2 = sum(C[1, b, y, x] for y, x in window) / len(window)
                if len(similar) < min_similar:
                    d1 = mean0 - mean1 + 0.01**5
                    d2 = mean0 - mean2 + 0.01**5
                    t1 = (1 / abs(d1)) / (1 / abs(d1) + 1 / abs(d2))
                    out[b, i, j] = t1 * (F[0, b, i, j] + d1) + (1 - t1) * (F[1, b, i, j] + d2)
                    continue
                raw = [
                    1.0 / ((1.0 - correlation(y, x)) * (1.0 + math.hypot(y - i, x - j) / w) + 1e-7) for y, x in similar
                ]
                weight = [r / sum(raw) for r in raw]
                xs = [C[0, b, y, x] for y, x in similar] + [C[1, b, y, x] for y, x in similar]
                ys = [F[0, b, y, x] for y, x in similar] + [F[1, b, y, x] for y, x in similar]
                change = abs(
                    sum(C[0, b, y, x] for y, x in similar) - sum(C[1, b, y, x] for y, x in similar)
                ) / len(similar)
                v = 1.0
                if change >= min_coarse_change:
                    res = stats.linregress(xs, ys)
                    if res.pvalue <= significance and 0 < res.slope <= max_conversion:
                        v = res.slope
                a1 = 1 / (abs(mean0 - mean1) + 0.01**5)
                a2 = 1 / (abs(mean0 - mean2) + 0.01**5)
                t1, t2 = a1 / (a1 + a2), a2 / (a1 + a2)
                f01 = F[0, b, i, j] + sum(
                    wt * v * (C0[b, y, x] - C[0, b, y, x]) for wt, (y, x) in zip(weight, similar, strict=True)
                )
                f02 = F[1, b, i, j] + sum(
                    wt * v * (C0[b, y, x] - C[1, b, y, x]) for wt, (y, x) in zip(weight, similar, strict=True)
                )
                pred = t1 * f01 + t2 * f02
                if pred <= value_range[0] or pred >= value_range[1]:
                    f01 = sum(wt * F[0, b, y, x] for wt, (y, x) in zip(weight, similar, strict=True))
                    f02 = sum(wt * F[1, b, y, x] for wt, (y, x) in zip(weight, similar, strict=True))
                    pred = t1 * f01 + t2 * f02
                out[b, i, j] = pred
    return out
