"""STARFM's window sums as a Pallas (Triton) kernel, for GPUs.

One program computes a block of output pixels (:data:`stf_pipeline.kernels.pallas.BLOCK`) and
keeps its two accumulators per band in registers over all window offsets. The sums are those of
:func:`stf_pipeline.methods.starfm.core.strict_body` / ``either_body`` term for term, added in
the same row-major offset order for every pixel whatever block it sits in (float32). The whole
device program around it is :mod:`stf_pipeline.methods.starfm.jax`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from stf_pipeline.kernels import pallas as kp
from stf_pipeline.methods.starfm.params import StarfmParams


@functools.lru_cache(maxsize=16)
def starfm_program(radius: int, pairs: int, bands: int, strict: bool, interpret: bool) -> Callable[..., Any]:
    """Jitted STARFM sums ``(threshold, centre, neighbour..., shape) -> (2 bands, y, x)``.

    ``threshold``: ``(pairs bands,)``; ``spectral_min``, ``temporal_min``: ``(bands, ...)`` the
    centre's bounds; ``fine``, ``spectral``, ``temporal``, ``local``: ``(pairs bands, ...)`` as
    ``core.prepare_arrays`` makes them; ``inverse``: its ``inverse`` with -1 where ``unit``
    (weight 1 whatever the distance), one plane read instead of two; all padded (module
    docstring). Planes of the result: the weight totals, then the weighted sums, per band.
    """
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    nb = bands
    inverse_radius = 1.0 / radius

    def kernel(
        thr_ref: Any,
        smin_ref: Any,
        tmin_ref: Any,
        fine_ref: Any,
        spectral_ref: Any,
        temporal_ref: Any,
        inverse_ref: Any,
        local_ref: Any,
        out_ref: Any,
    ) -> None:
        load = kp.loader(pl.program_id(0) * kp.BLOCK[0], pl.program_id(1) * kp.BLOCK[1])
        centre = [load(fine_ref, k, radius, radius) for k in range(pairs * nb)]
        spectral_min = [load(smin_ref, b, radius, radius) for b in range(nb)]
        temporal_min = [load(tmin_ref, b, radius, radius) for b in range(nb)]
        threshold = [thr_ref[k] for k in range(pairs * nb)]

        def one(dy: Any, dx: Any, accs: list[Any]) -> list[Any]:
            factor = kp.distance_factor(dy, dx, radius, inverse_radius)
            for b in range(nb):
                total = weighted = None
                for p in range(pairs):
                    k = p * nb + b
                    close = jnp.abs(load(fine_ref, k, dy, dx) - centre[k]) <= threshold[k]
                    better_s = load(spectral_ref, k, dy, dx) <= spectral_min[b]
                    better_t = load(temporal_ref, k, dy, dx) <= temporal_min[b]
                    keep = close & (better_s & better_t if strict else better_s | better_t)
                    inverse = load(inverse_ref, k, dy, dx)
                    weight = jnp.where(keep, jnp.where(inverse < 0, 1.0, inverse / factor), 0.0)
                    part = jnp.where(keep, weight * load(local_ref, k, dy, dx), 0.0)
                    total = weight if total is None else total + weight
                    weighted = part if weighted is None else weighted + part
                accs[b] = accs[b] + total
                accs[nb + b] = accs[nb + b] + weighted
            return accs

        zero = jnp.zeros(kp.BLOCK, jnp.float32)
        kp.store(out_ref, kp.over_offsets(radius, [zero] * (2 * nb), one))

    def run(threshold: Any, *planes: Any, shape: tuple[int, int]) -> Any:
        return kp.call(kernel, 2 * nb, shape, interpret, threshold, *planes)

    return jax.jit(run, static_argnames="shape")


def pallas_sums(
    centre: dict[str, Any], neighbour: dict[str, Any], threshold: Any, params: StarfmParams
) -> tuple[Any, Any]:
    """The window sums by :func:`starfm_program` (traceable)."""
    import jax

    pairs, bands, ny, nx = neighbour["fine"].shape
    radius = params.window_radius
    shape = kp.blocked_shape((ny, nx))

    def planes(a: Any) -> Any:
        return kp.pad_planes(a.reshape((-1, ny, nx)), radius, shape, np.nan)

    inverse = jax.numpy.where(neighbour["unit"] > 0, -1.0, neighbour["inverse"])
    program = starfm_program(radius, pairs, bands, params.filtering == "strict", jax.default_backend() == "cpu")
    sums = program(
        threshold.reshape(-1),
        planes(centre["spectral"]),
        planes(centre["temporal"]),
        *(planes(neighbour[name]) for name in ("fine", "spectral", "temporal")),
        planes(inverse),
        planes(neighbour["local"]),
        shape=shape,
    )
    return sums[:bands, :ny, :nx], sums[bands:, :ny, :nx]
