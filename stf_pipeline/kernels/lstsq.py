"""Batched least squares with box constraints: the unmixing solver of FSDAF (IDL ``P_OLS`` with
``CONSTRAINED_MIN``), usable by any method that solves many small bounded systems."""

from __future__ import annotations

import numpy as np
from scipy import optimize


def box_lstsq(gram: np.ndarray, rhs: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Solve ``min ½ gᵀ A g - bᵀ g`` subject to ``lower <= g <= upper``, batched.

    A primal-dual active-set method (Hintermüller, Ito & Kunisch 2003) on every problem at once:
    each step fixes the variables predicted to sit on a bound and solves the rest exactly.
    Problems whose active set has not settled after ``3·k + 10`` steps (rare; the method may
    cycle on non-M-matrices) are solved by bounded-variable least squares (SciPy BVLS).

    Parameters
    ----------
    gram : ndarray ``(..., k, k)``
        Symmetric positive definite matrices ``A``.
    rhs : ndarray ``(..., k)``
    lower, upper : ndarray ``(...)``
        Bounds shared by the ``k`` unknowns of each problem.

    Returns
    -------
    ndarray ``(..., k)`` float64
        NaN for problems with ``lower > upper`` (no data to bound them).
    """
    a = np.asarray(gram, dtype=np.float64)
    b = np.asarray(rhs, dtype=np.float64)
    batch, k = a.shape[:-2], a.shape[-1]
    a = a.reshape(-1, k, k)
    b = b.reshape(-1, k)
    lo = np.broadcast_to(np.asarray(lower, dtype=np.float64), batch).reshape(-1, 1)
    hi = np.broadcast_to(np.asarray(upper, dtype=np.float64), batch).reshape(-1, 1)
    eye = np.eye(k, dtype=bool)
    at_lo = np.zeros_like(b, dtype=bool)
    at_hi = np.zeros_like(b, dtype=bool)
    settled = np.zeros(b.shape[0], dtype=bool)
    g = np.zeros_like(b)
    for _ in range(3 * k + 10):
        free = ~(at_lo | at_hi)
        fixed_value = np.where(at_lo, lo, np.where(at_hi, hi, 0.0))
        system = np.where(free[:, :, None], a, eye[None])
        target = np.where(free, b, fixed_value)
        g = np.linalg.solve(system, target[..., None])[..., 0]
        grad = np.einsum("nij,nj->ni", a, g) - b
        new_lo = (g - grad) < lo
        new_hi = (g - grad) > hi
        settled = (new_lo == at_lo).all(axis=1) & (new_hi == at_hi).all(axis=1)
        if settled.all():
            break
        at_lo, at_hi = new_lo, new_hi
    for n in np.flatnonzero(~settled & (lo[:, 0] < hi[:, 0])):
        chol = np.linalg.cholesky(a[n])
        target = np.linalg.solve(chol, b[n])
        g[n] = optimize.lsq_linear(chol.T, target, bounds=(lo[n, 0], hi[n, 0]), method="bvls").x
    return np.where(lo <= hi, np.clip(g, lo, hi), np.nan).reshape(*batch, k)
