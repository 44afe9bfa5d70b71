"""STARFM's and ESTARFM's window sums on GPUs, as Pallas (Triton) kernels.

The XLA driver of :mod:`stf_pipeline.methods._similar` updates whole-image accumulators once
per window offset, so every offset reads the inputs and reads and writes the accumulators in
the GPU's memory: at 51x51 offsets that traffic, not arithmetic, sets its time. Here one
program computes a small block of output pixels and keeps its accumulators in registers over
all the offsets; the neighbour blocks it loads are mostly cache hits (the blocks of adjacent
offsets overlap). The sums are those of the methods' bodies (``starfm._strict_body`` /
``_either_body``, ``estarfm._body``), term for term, added in the same row-major offset order
for every pixel whatever block it sits in (float32, as the XLA driver).

Inputs are planes ``(plane, y, x)`` (pair-major, band-minor), padded by the window radius on
every side (and to whole blocks at the bottom and right) with *missing* values: NaN fine
reflectance, so a neighbour outside the block is never similar. ``interpret=True`` runs the
same kernels on the CPU (slowly), which is how the tests check them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

#: Output block of one program (rows, columns) and its warps: one pixel a thread. Blocks of
#: 8x16, 4x32, 4x64, 2x64, 2x128 and 1x128 pixels with 4 or 8 warps were timed on one H100
#: (2000x2000x6, 51x51 window): 1x128 with 4 warps was among the fastest for both methods
#: (whole-block kernel calls: STARFM 0.73 s, ESTARFM 0.73 s; 8x16: 1.66 s and 0.71 s).
BLOCK = (1, 128)
NUM_WARPS = 4


def pad_planes(a: Any, radius: int, shape: tuple[int, int], value: float) -> Any:
    """Pad ``(..., y, x)`` by ``radius`` on every side and to ``shape`` + halo at the far ends."""
    import jax.numpy as jnp

    extra = (shape[0] - a.shape[-2], shape[1] - a.shape[-1])
    widths = [(0, 0)] * (a.ndim - 2) + [(radius, radius + extra[0]), (radius, radius + extra[1])]
    return jnp.pad(a, widths, constant_values=value)


def blocked_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """``(y, x)`` rounded up to whole output blocks."""
    return BLOCK[0] * -(-shape[0] // BLOCK[0]), BLOCK[1] * -(-shape[1] // BLOCK[1])


def _call(kernel: Callable[..., None], n_out: int, shape: tuple[int, int], interpret: bool, *inputs: Any) -> Any:
    import jax
    from jax.experimental import pallas as pl

    kwargs: dict[str, Any] = {"interpret": True} if interpret else {}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        kwargs["compiler_params"] = plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((n_out, *shape), np.float32),
        grid=(shape[0] // BLOCK[0], shape[1] // BLOCK[1]),
        **kwargs,
    )(*inputs)


def _loader(y0: Any, x0: Any) -> Callable[[Any, int, Any, Any], Any]:
    from jax.experimental import pallas as pl

    def load(ref: Any, plane: int, dy: Any, dx: Any) -> Any:
        return ref[plane, pl.ds(y0 + dy, BLOCK[0]), pl.ds(x0 + dx, BLOCK[1])]

    return load


def _offsets(radius: int, accs: list[Any], one: Callable[[Any, Any, list[Any]], list[Any]]) -> list[Any]:
    """``one(dy, dx, accs)`` over the window offsets in row-major order (padded coordinates)."""
    from jax import lax

    side = 2 * radius + 1

    def row(dy: Any, accs: tuple) -> tuple:
        return lax.fori_loop(0, side, lambda dx, a: tuple(one(dy, dx, list(a))), accs)

    return list(lax.fori_loop(0, side, row, tuple(accs)))


def _distance_factor(dy: Any, dx: Any, radius: int, inverse_radius: float) -> Any:
    import jax.numpy as jnp

    fy = (dy - radius).astype(jnp.float32)
    fx = (dx - radius).astype(jnp.float32)
    return 1.0 + jnp.sqrt(fy * fy + fx * fx) * np.float32(inverse_radius)


def _store(out_ref: Any, accs: list[Any]) -> None:
    from jax.experimental import pallas as pl

    y0 = pl.program_id(0) * BLOCK[0]
    x0 = pl.program_id(1) * BLOCK[1]
    for n, acc in enumerate(accs):
        out_ref[n, pl.ds(y0, BLOCK[0]), pl.ds(x0, BLOCK[1])] = acc


@functools.lru_cache(maxsize=16)
def estarfm_program(radius: int, bands: int, eps: float, interpret: bool) -> Callable[..., Any]:
    """Jitted ``(threshold, fine, spread, coarse0, change, shape) -> (2 + 10 bands, y, x)`` sums.

    ``fine``: ``(2 bands, ...)`` NaN where missing; ``spread``: ``(1, ...)`` ``1 - R``;
    ``coarse0``, ``change``: ``(2 bands, ...)`` zero where missing; all padded (module docstring).
    Planes of the result: the similar-pixel count, the weight total, then the ten per-band sums
    of ``estarfm._body`` in its order, ``bands`` planes each.
    """
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    from stf_pipeline.methods.estarfm import sum_terms

    nb = bands
    inverse_radius = 1.0 / radius

    def kernel(thr_ref: Any, fine_ref: Any, spread_ref: Any, coarse_ref: Any, change_ref: Any, out_ref: Any) -> None:
        load = _loader(pl.program_id(0) * BLOCK[0], pl.program_id(1) * BLOCK[1])
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
            w = m / (load(spread_ref, 0, dy, dx) * _distance_factor(dy, dx, radius, inverse_radius) + np.float32(eps))
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

        zero = jnp.zeros(BLOCK, jnp.float32)
        _store(out_ref, _offsets(radius, [zero] * (2 + 10 * nb), one))

    def run(threshold: Any, fine: Any, spread: Any, coarse0: Any, change: Any, shape: tuple[int, int]) -> Any:
        return _call(kernel, 2 + 10 * nb, shape, interpret, threshold, fine, spread, coarse0, change)

    return jax.jit(run, static_argnames="shape")


@functools.lru_cache(maxsize=16)
def starfm_program(radius: int, pairs: int, bands: int, strict: bool, interpret: bool) -> Callable[..., Any]:
    """Jitted STARFM sums ``(threshold, centre, neighbour..., shape) -> (2 bands, y, x)``.

    ``threshold``: ``(pairs bands,)``; ``spectral_min``, ``temporal_min``: ``(bands, ...)`` the
    centre's bounds; ``fine``, ``spectral``, ``temporal``, ``local``: ``(pairs bands, ...)`` as
    ``starfm._prepare_arrays`` makes them; ``inverse``: its ``inverse`` with -1 where ``unit``
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
        load = _loader(pl.program_id(0) * BLOCK[0], pl.program_id(1) * BLOCK[1])
        centre = [load(fine_ref, k, radius, radius) for k in range(pairs * nb)]
        spectral_min = [load(smin_ref, b, radius, radius) for b in range(nb)]
        temporal_min = [load(tmin_ref, b, radius, radius) for b in range(nb)]
        threshold = [thr_ref[k] for k in range(pairs * nb)]

        def one(dy: Any, dx: Any, accs: list[Any]) -> list[Any]:
            factor = _distance_factor(dy, dx, radius, inverse_radius)
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

        zero = jnp.zeros(BLOCK, jnp.float32)
        _store(out_ref, _offsets(radius, [zero] * (2 * nb), one))

    def run(threshold: Any, *planes: Any, shape: tuple[int, int]) -> Any:
        return _call(kernel, 2 * nb, shape, interpret, threshold, *planes)

    return jax.jit(run, static_argnames="shape")
