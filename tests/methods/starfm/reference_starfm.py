"""A deliberately slow, per-pixel float64 STARFM, written from Gao et al. (2006) and the USDA
StarFM program's description (candidate filter with the minimum centre differences plus the
sensor uncertainties; weights 1/((S+1)(T+1)D), 1 within the combined uncertainty; the
spectral term only with one pair; differences and the similarity test on the program's integer
scale, i.e. the inputs × scale rounded, as the program reads int16). Used only to check the fast
kernel.
"""

from __future__ import annotations

import math

import numpy as np


def reference_starfm(
    fine: np.ndarray,
    coarse: np.ndarray,
    coarse_target: np.ndarray,
    *,
    radius: int,
    n_classes: float = 40.0,
    uncertainty_fine: float = 50.0,
    uncertainty_coarse: float = 50.0,
    scale: float = 10000.0,
    strict: bool = True,
    copy_zero: bool = False,
) -> np.ndarray:
    """STARFM of ``fine``/``coarse`` ``(pair, band, y, x)`` and ``coarse_target`` ``(band, y, x)``.

    ``copy_zero``: the paper's special cases (Sect. II): a pixel whose coarse did not change
    (``T = 0`` in some pair) keeps its fine value (mean over those pairs); else one whose fine
    equals its coarse (``S = 0``) takes the target's coarse value.
    """
    L = np.asarray(fine, dtype=np.float64)
    M = np.asarray(coarse, dtype=np.float64)
    M0 = np.asarray(coarse_target, dtype=np.float64)
    # the program's integer scale: spectral/temporal differences and similarity on rounded values
    Li, Mi, M0i = np.round(L * scale), np.round(M * scale), np.round(M0 * scale)
    n_pairs, n_bands, ny, nx = L.shape
    sigma_s = math.sqrt(uncertainty_coarse**2 + uncertainty_fine**2)
    sigma_t = math.sqrt(2.0) * uncertainty_coarse
    sigma_c = math.sqrt(sigma_s**2 + sigma_t**2)
    out = np.full((n_bands, ny, nx), np.nan)
    for b in range(n_bands):
        # similarity threshold: 2 sigma / m, sigma over the valid fine pixels of the scene
        tol = []
        for k in range(n_pairs):
            vals = [L[k, b, i, j] for i in range(ny) for j in range(nx) if not math.isnan(L[k, b, i, j])]
            mean = sum(vals) / len(vals)
            tol.append(2.0 * scale * math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals)) / n_classes)

        def valid(k: int, i: int, j: int) -> bool:
            # called only within this band's iteration, so the current ``b`` is the intended one
            return not (math.isnan(L[k, b, i, j]) or math.isnan(M[k, b, i, j]) or math.isnan(M0[b, i, j]))  # noqa: B023

        for i in range(ny):
            for j in range(nx):
                own = [k for k in range(n_pairs) if valid(k, i, j)]
                if not own:
                    continue
                if copy_zero:
                    unchanged = [L[k, b, i, j] for k in own if Mi[k, b, i, j] == M0i[b, i, j]]
                    if unchanged:
                        out[b, i, j] = sum(unchanged) / len(unchanged)
                        continue
                    if any(Li[k, b, i, j] == Mi[k, b, i, j] for k in own):
                        out[b, i, j] = M0[b, i, j]
                        continue
                min_s = min(abs(Li[k, b, i, j] - Mi[k, b, i, j]) for k in own)
                min_t = min(abs(Mi[k, b, i, j] - M0i[b, i, j]) for k in own)
                total = 0.0
                weighted = 0.0
                for k in own:
                    for y in range(max(0, i - radius), min(ny, i + radius + 1)):
                        for x in range(max(0, j - radius), min(nx, j + radius + 1)):
                            if not valid(k, y, x):
                                continue
                            if abs(Li[k, b, y, x] - Li[k, b, i, j]) > tol[k]:
                                continue
                            s = abs(Li[k, b, y, x] - Mi[k, b, y, x])
                            t = abs(Mi[k, b, y, x] - M0i[b, y, x])
                            s_ok = s <= min_s + sigma_s
                            t_ok = t <= min_t + sigma_t
                            if not ((s_ok and t_ok) if strict else (s_ok or t_ok)):
                                continue
                            cost = (s + 1) * (t + 1) if n_pairs > 1 else s + 1
                            d = 1.0 + math.hypot(y - i, x - j) / radius
                            w = 1.0 if cost < sigma_c else 1.0 / (cost * d)
                            total += w
                            weighted += w * (L[k, b, y, x] + M0[b, y, x] - M[k, b, y, x])
                if total > 0:
                    out[b, i, j] = weighted / total
                else:
                    local = [L[k, b, i, j] + M0[b, i, j] - M[k, b, i, j] for k in own]
                    out[b, i, j] = sum(local) / len(local)
    return out
