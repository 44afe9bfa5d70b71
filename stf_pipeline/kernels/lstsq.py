"""Batched least squares with box constraints: the unmixing solver of FSDAF (IDL ``P_OLS`` with
``CONSTRAINED_MIN``), usable by any method that solves many small bounded systems.

:func:`box_lstsq` (NumPy) and :func:`box_lstsq_jax` (traceable, for accelerators) run the same
primal-dual active-set steps. The rare problems whose active set has not settled go to SciPy's
BVLS in NumPy, and in JAX to a primal active-set method (one bound added or released per step,
Nocedal & Wright 2006, Algorithm 16.3), so the JAX form never leaves the device; both return the
unique minimiser.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import optimize

from stf_pipeline.exceptions import MethodError


def _max_steps(k: int) -> int:
    """Primal-dual active-set steps before a problem is handed to the fallback."""
    return 3 * k + 10


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
    for n in np.flatnonzero(~settled & (lo[:, 0] < hi[:, 0])):
        chol = np.linalg.cholesky(a[n])
        target = np.linalg.solve(chol, b[n])
        g[n] = optimize.lsq_linear(chol.T, target, bounds=(lo[n, 0], hi[n, 0]), method="bvls").x
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


def _subspace_minimiser(a: Any, b: Any, lo: Any, hi: Any, at_lo: Any, at_hi: Any) -> Any:
    """Minimiser with the variables ``at_lo`` / ``at_hi`` fixed on their bound: the free ones solve
    their own system, the fixed ones moved to the right-hand side (:func:`_cholesky_solve`)."""
    import jax.numpy as jnp

    k = a.shape[-1]
    free = ~(at_lo | at_hi)
    fixed_value = jnp.where(at_lo, lo, jnp.where(at_hi, hi, 0.0))
    system = jnp.where(free[:, :, None] & free[:, None, :], a, jnp.eye(k, dtype=bool)[None])
    target = jnp.where(free, b - jnp.einsum("nij,nj->ni", a, fixed_value), fixed_value)
    return _cholesky_solve(system, target)


def _primal_active_set(a: Any, b: Any, lo: Any, hi: Any, g: Any, done: Any) -> Any:
    """The problems not ``done``, solved by a primal active-set method from ``clip(g, lo, hi)``.

    Each step either moves towards the minimiser of the current free set (stopping at the first
    bound it meets, which joins the fixed set) or, at that minimiser, releases the fixed variable
    whose multiplier has the wrong sign by the most, until none has: finite in exact arithmetic
    (the objective falls at every move), capped at ``20·k + 50`` steps.
    """
    import jax.numpy as jnp
    from jax import lax

    k = a.shape[-1]
    rows = jnp.arange(b.shape[0])

    def step(state: tuple[Any, ...]) -> tuple[Any, ...]:
        count, x, at_lo, at_hi, done, at_minimum = state
        # at the free set's minimiser: release the worst wrong-signed multiplier, or finish
        grad = jnp.einsum("nij,nj->ni", a, x) - b
        wrong = jnp.where(at_lo, -grad, jnp.where(at_hi, grad, 0.0))
        worst = jnp.argmax(wrong, axis=1)
        release = at_minimum & ~done & (wrong[rows, worst] > 0.0)
        done = done | (at_minimum & ~release)
        released = release[:, None] & (jnp.arange(k)[None] == worst[:, None])
        # otherwise: a step towards the free set's minimiser, up to the first bound in the way
        moving = ~at_minimum & ~done
        p = _subspace_minimiser(a, b, lo, hi, at_lo, at_hi) - x
        free = ~(at_lo | at_hi)
        to_lo = jnp.where(free & (p < 0.0), (lo - x) / jnp.where(p < 0.0, p, -1.0), jnp.inf)
        to_hi = jnp.where(free & (p > 0.0), (hi - x) / jnp.where(p > 0.0, p, 1.0), jnp.inf)
        ratio = jnp.minimum(to_lo, to_hi)
        first = jnp.argmin(ratio, axis=1)
        alpha = jnp.clip(ratio[rows, first], 0.0, 1.0)
        blocked = moving & (alpha < 1.0)
        hit = blocked[:, None] & (jnp.arange(k)[None] == first[:, None])
        hit_lo = hit & (to_lo <= to_hi)
        hit_hi = hit & ~hit_lo
        x = jnp.where(moving[:, None], jnp.clip(x + alpha[:, None] * p, lo, hi), x)
        x = jnp.where(hit_lo, lo, jnp.where(hit_hi, hi, x))
        at_lo = (at_lo & ~released) | hit_lo
        at_hi = (at_hi & ~released) | hit_hi
        at_minimum = moving & ~blocked
        return count + 1, x, at_lo, at_hi, done, at_minimum

    def running(state: tuple[Any, ...]) -> Any:
        count, _, _, _, done, _ = state
        return (count < 20 * k + 50) & ~done.all()

    x = jnp.clip(g, lo, hi)
    state = (jnp.int32(0), x, x <= lo, (x >= hi) & (x > lo), done, jnp.zeros_like(done))
    return lax.while_loop(running, step, state)[1]


def box_lstsq_jax(gram: Any, rhs: Any, lower: Any, upper: Any, *, max_steps: int | None = None) -> Any:
    """:func:`box_lstsq` for float64 JAX arrays (traceable, under ``jax.enable_x64``).

    The same primal-dual active-set steps in a ``lax.while_loop`` until every problem has settled
    or ``max_steps`` (default ``3·k + 10``) have run; each step solves the free variables' system
    (the fixed ones moved to the right-hand side) by an unrolled Cholesky factorisation rather
    than LAPACK's pivoted LU, so the answers agree with :func:`box_lstsq` to rounding. Problems
    that have not settled, if any (none on the synthetic scenes measured), are solved by a primal
    active-set method (:func:`_primal_active_set`, under ``lax.cond``) instead of BVLS: the same
    unique minimiser, on the device.

    Parameters
    ----------
    gram : jax.Array ``(..., k, k)``
    rhs : jax.Array ``(..., k)``
    lower, upper : jax.Array ``(...)``
    max_steps : int, optional
        Primal-dual steps before the fallback takes over (default ``3·k + 10``).

    Returns
    -------
    jax.Array ``(..., k)`` float64
        NaN for problems with ``lower > upper``.

    Raises
    ------
    MethodError
        If ``gram`` or ``rhs`` is not float64 (JAX's x64 mode is off).
    """
    import jax.numpy as jnp
    from jax import lax

    if gram.dtype != jnp.float64 or rhs.dtype != jnp.float64:
        raise MethodError(
            f"box_lstsq_jax solves in float64, got {gram.dtype} and {rhs.dtype}; call it under "
            "jax.enable_x64(True) with float64 arrays."
        )
    batch, k = gram.shape[:-2], gram.shape[-1]
    a = gram.reshape(-1, k, k)
    b = rhs.reshape(-1, k)
    lo = jnp.broadcast_to(lower, batch).reshape(-1, 1).astype(jnp.float64)
    hi = jnp.broadcast_to(upper, batch).reshape(-1, 1).astype(jnp.float64)
    steps = _max_steps(k) if max_steps is None else max_steps

    def step(state: tuple[Any, ...]) -> tuple[Any, ...]:
        count, at_lo, at_hi, _, _ = state
        g = _subspace_minimiser(a, b, lo, hi, at_lo, at_hi)
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
    done = settled | ~(lo[:, 0] < hi[:, 0])
    g = lax.cond(done.all(), lambda g: g, lambda g: _primal_active_set(a, b, lo, hi, g, done), g)
    return jnp.where(lo <= hi, jnp.clip(g, lo, hi), jnp.nan).reshape(*batch, k)
