"""ESTARFM's window sums as a Pallas (Triton) kernel, for GPUs.

One program computes a block of output pixels (:data:`stf_pipeline.kernels.pallas.BLOCK`) and
keeps its ``2 + 10 bands`` accumulators in registers over all window offsets: the sums of
:func:`stf_pipeline.methods.estarfm.core.body` (its :func:`~stf_pipeline.methods.estarfm.core.sum_terms`)
term for term, in the same row-major offset order for every pixel (float32). The whole device
program around it is :mod:`stf_pipeline.methods.estarfm.jax`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from stf_pipeline.kernels import pallas as kp
from stf_pipeline.methods.estarfm.core import FILLS, WEIGHT_EPS, sum_terms


@functools.lru_cache(maxsize=16)
def estarfm_program(radius: int, bands: int, eps: float, interpret: bool) -> Callable[..., Any]:
    """Jitted ``(threshold, fine, spread, coarse0, change, shape) -> (2 + 10 bands, y, x)`` sums.

    ``fine``: ``(2 bands, ...)`` NaN where missing; ``spread``: ``(1, ...)`` ``1 - R``;
    ``coarse0``, ``change``: ``(2 bands, ...)`` zero where missing; all padded (module docstring).
    Planes of the result: the similar-pixel count, the weight total, then the ten per-band sums
    of :func:`~stf_pipeline.methods.estarfm.core.body` in its order, ``bands`` planes each.
    """
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    nb = bands
    inverse_radius = 1.0 / radius

    def kernel(thr_ref: Any, fine_ref: Any, spread_ref: Any, coarse_ref: Any, change_ref: Any, out_ref: Any) -> None:
        load = kp.loader(pl.program_id(0) * kp.BLOCK[0], pl.program_id(1) * kp.BLOCK[1])
        centre = [load(fine_ref, k, radius, radius) for k in range(2 * nb)]
        fine1 = [jnp.where(jnp.isnan(centre[b]), 0.0, centre[b]) for b in range(nb)]
        coarse1 = [load(coarse_ref, b, radius, radius) for b in range(nb)]
        threshold = [thr_ref[k] for k in range(2 * nb)]

        def one(dy: Any, dx: Any, accs: list[Any]) -> list[Any]:
            q = [load(fine_ref, k, dy, dx) for k in range(2 * nb)]
            similar = jnp.abs(q[0] - centre[0]) < threshold[0]
            for k in range(1, 2 * nb):
                similar = similar & (jnp.abs(q[k] - centre[k]) < threshold[k])
            m = similar.astype(jnp.float32)
            w = m / (load(spread_ref, 0, dy, dx) * kp.distance_factor(dy, dx, radius, inverse_radius) + np.float32(eps))
            accs[0] = accs[0] + m
            accs[1] = accs[1] + w
            for b in range(nb):
                f0 = [jnp.where(similar, q[k * nb + b], 0.0) for k in (0, 1)]
                x1, x2 = (m * (load(coarse_ref, k * nb + b, dy, dx) - coarse1[b]) for k in (0, 1))
                y1, y2 = (m * (f0[k] - fine1[b]) for k in (0, 1))
                change = [load(change_ref, k * nb + b, dy, dx) for k in (0, 1)]
                terms = sum_terms(w, change, f0, x1, x2, y1, y2)
                for s, term in enumerate(terms):
                    accs[2 + s * nb + b] = accs[2 + s * nb + b] + term
            return accs

        zero = jnp.zeros(kp.BLOCK, jnp.float32)
        kp.store(out_ref, kp.over_offsets(radius, [zero] * (2 + 10 * nb), one))

    def run(threshold: Any, fine: Any, spread: Any, coarse0: Any, change: Any, shape: tuple[int, int]) -> Any:
        return kp.call(kernel, 2 + 10 * nb, shape, interpret, threshold, fine, spread, coarse0, change)

    return jax.jit(run, static_argnames="shape")


def pallas_sums(neighbour: dict[str, Any], threshold: Any, radius: int) -> list[Any]:
    """The window sums by :func:`estarfm_program` (traceable)."""
    import jax

    pairs, bands, ny, nx = neighbour["fine"].shape
    shape = kp.blocked_shape((ny, nx))

    def planes(name: str) -> Any:
        a = neighbour[name].reshape((-1, ny, nx))
        return kp.pad_planes(a, radius, shape, np.nan if name == "fine" else FILLS[name])

    program = estarfm_program(radius, bands, WEIGHT_EPS, jax.default_backend() == "cpu")
    sums = program(threshold.reshape(-1), *(planes(n) for n in ("fine", "spread", "coarse0", "change")), shape=shape)
    sums = sums[:, :ny, :nx]
    return [sums[0], sums[1]] + [sums[2 + s * bands : 2 + (s + 1) * bands] for s in range(10)]
