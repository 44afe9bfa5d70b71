"""Batched least squares with box constraints: the unmixing solver of FSDAF (IDL ``P_OLS`` with
``CONSTRAINED_MIN``), usable by any method that solves many small bounded systems.

:func:`box_lstsq` (NumPy) and :func:`box_lstsq_jax` (traceable, for accelerators) run the same
active-set steps; both hand the rare problems whose active set has not settled to SciPy's BVLS
(:func:`bvls_unsettled`), the JAX form through a host callback taken only when some remain.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import optimize


def _max_steps(k: int) -> int:
    """Active-set steps before a problem is handed to BVLS."""
    return 3 * k + 10


def bvls_unsettled(a: np.ndarray, b: np.ndarray, lo: np.ndarray, hi: np.ndarray, g: np.ndarray,
                   settled: np.ndarray) -> np.ndarray:
    """``g`` with the problems that are not ``settled`` (and have ``lo < hi``) solved by BVLS.

    Parameters
    ----------
    a : ndarray ``(n, k, k)``
    b, g : ndarray ``(n, k)``
    lo, hi : ndarray ``(n, 1)``
    settled : ndarray ``(n,)`` bool

    Returns
    -------
    ndarray ``(n, k)`` float64
        A copy of ``g``.
    """
    g = np.array(g, dtype=np.float64)
    for n in np.flatnonzero(~np.asarray(settled) & (lo[:, 0] < hi[:, 0])):
        chol = np.linalg.cholesky(a[n])
        target = np.linalg.solve(chol, b[n])
        g[n] = optimize.lsq_linear(chol.T, target, bounds=(lo[n, 0], hi[n, 0]), method="bvls").x
    return g


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
    for _ in range(_max_steps(k)):
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
    g = bvls_unsettled(a, b, lo, hi, g, settled)
    return np.where(lo <= hi, np.clip(g, lo, hi), np.nan).reshape(*batch, k)


def _cholesky_solve(a: Any, b: Any) -> Any:
    """Solve batched symmetric positive definite systems ``(..., k, k)`` by an unrolled Cholesky
    factorisation (``k`` small and static): elementwise operations over the batch, no pivoting."""
    import jax.numpy as jnp

    k = a.shape[-1]
    low: list[list[Any]] = [[None] * k for _ in range(k)]
    for j in range(k):
        diag = a[..., j, j] - sum((low[j][m] ** 2 for m in range(j)), jnp.zeros_like(a[..., j, j]))
        low[j][j] = jnp.sqrt(diag)
        for i in range(j + 1, k):
            off = a[..., i, j] - sum((low[i][m] * low[j][m] for m in range(j)), jnp.zeros_like(a[..., i, j]))
            low[i][j] = off / low[j][j]
    y: list[Any] = []
    for i in range(k):  # L y = b
        y.append((b[..., i] - sum((low[i][m] * y[m] for m in range(i)), jnp.zeros_like(b[..., i]))) / low[i][i])
    x: list[Any] = [None] * k
    for i in reversed(range(k)):  # Lᵀ x = y
        rest = sum((low[m][i] * x[m] for m in range(i + 1, k)), jnp.zeros_like(y[i]))
        x[i] = (y[i] - rest) / low[i][i]
    return jnp.stack(x, axis=-1)


def box_lstsq_jax(gram: Any, rhs: Any, lower: Any, upper: Any, *, max_steps: int | None = None) -> Any:
    """:func:`box_lstsq` for JAX arrays (traceable; float64 under ``jax.enable_x64``).

    The same active-set steps in a ``lax.while_loop`` until every problem has settled or
    ``max_steps`` (default ``3·k + 10``) have run; each step solves the free variables' system
    (the fixed ones moved to the right-hand side) by an unrolled Cholesky factorisation rather
    than LAPACK's pivoted LU, so the answers agree with :func:`box_lstsq` to rounding. The
    problems that have not settled, if any, are solved by SciPy's BVLS on the host
    (:func:`bvls_unsettled` through ``jax.pure_callback`` under ``lax.cond``): none on the
    synthetic scenes measured.

    Parameters
    ----------
    gram : jax.Array ``(..., k, k)``
    rhs : jax.Array ``(..., k)``
    lower, upper : jax.Array ``(...)``
    max_steps : int, optional
        Active-set steps before BVLS takes over (default ``3·k + 10``).

    Returns
    -------
    jax.Array ``(..., k)``
        NaN for problems with ``lower > upper``.
    """
    import jax
    import jax.numpy as jnp
    from jax import lax

    batch, k = gram.shape[:-2], gram.shape[-1]
    a = gram.reshape(-1, k, k)
    b = rhs.reshape(-1, k)
    lo = jnp.broadcast_to(lower, batch).reshape(-1, 1).astype(a.dtype)
    hi = jnp.broadcast_to(upper, batch).reshape(-1, 1).astype(a.dtype)
    eye = jnp.eye(k, dtype=bool)
    steps = _max_steps(k) if max_steps is None else max_steps

    def step(state: tuple[Any, ...]) -> tuple[Any, ...]:
        count, at_lo, at_hi, _, _ = state
        free = ~(at_lo | at_hi)
        fixed_value = jnp.where(at_lo, lo, jnp.where(at_hi, hi, 0.0))
        both = free[:, :, None] & free[:, None, :]
        system = jnp.where(both, a, eye[None])
        target = jnp.where(free, b - jnp.einsum("nij,nj->ni", a, fixed_value), fixed_value)
        g = _cholesky_solve(system, target)
        grad = jnp.einsum("nij,nj->ni", a, g) - b
        new_lo = (g - grad) < lo
        new_hi = (g - grad) > hi
        settled = (new_lo == at_lo).all(axis=1) & (new_hi == at_hi).all(axis=1)
        return count + 1, new_lo, new_hi, g, settled

    def running(state: tuple[Any, ...]) -> Any:
        count, *_, settled = state
        return (count < steps) & ~settled.all()

    none = jnp.zeros(b.shape, dtype=bool)
    state = (jnp.int32(0), none, none, jnp.zeros_like(b), jnp.zeros(b.shape[0], dtype=bool))
    _, _, _, g, settled = lax.while_loop(running, step, state)

    def host(g: Any) -> Any:
        shape = jax.ShapeDtypeStruct(g.shape, g.dtype)
        return jax.pure_callback(bvls_unsettled, shape, a, b, lo, hi, g, settled)

    g = lax.cond((~settled & (lo[:, 0] < hi[:, 0])).any(), host, lambda g: g, g)
    return jnp.where(lo <= hi, jnp.clip(g, lo, hi), jnp.nan).reshape(*batch, k)
