"""STARFM's window sums as a Pallas (Triton) kernel, for GPUs.

One program computes a block of output pixels for a group of bands (:data:`LAYOUT`, see
:class:`stf_pipeline.kernels.pallas.Layout`) and keeps its two accumulators per band and output
row in registers over all window offsets. The sums are those of
:func:`stf_pipeline.methods.starfm.core.strict_body` / ``either_body`` term for term, added in
the same row-major offset order for every pixel whatever block it sits in (float32); the weight
multiplies by ``1 / D`` from a table (:func:`~stf_pipeline.kernels.similar.distance_factors`)
where the body divides by ``D``, a difference of float32 rounding. The whole device program
around it is :mod:`stf_pipeline.methods.starfm.jax`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from stf_pipeline.kernels import pallas as kp
from stf_pipeline.kernels.similar import distance_factors
from stf_pipeline.methods.starfm.params import StarfmParams

#: The programs' layout on GPUs, chosen by timing (``docs/benchmarks.md``, STARFM and ESTARFM).
LAYOUT = kp.Layout(rows=8, width=256, bands=1)

_NEIGHBOUR = ("fine", "spectral", "temporal", "inverse", "local")


@functools.lru_cache(maxsize=16)
def starfm_program(
    radius: int, pairs: int, bands: int, strict: bool, interpret: bool, layout: kp.Layout
) -> Callable[..., Any]:
    """Jitted STARFM sums ``(threshold, inverse_factor, centre..., neighbour..., shape) -> (2 bands, y, x)``.

    ``threshold``: ``(pairs bands,)``; ``inverse_factor``: ``1 / D`` by offset;
    ``spectral_min``, ``temporal_min``: ``(bands, ...)`` the centre's bounds; ``fine``,
    ``spectral``, ``temporal``, ``local``: ``(pairs bands, ...)`` as ``core.prepare_arrays``
    makes them; ``inverse``: its ``inverse`` with -1 where ``unit`` (weight 1 whatever the
    distance), one plane read instead of two; all padded (:mod:`stf_pipeline.kernels.pallas`).
    Planes of the result: the weight totals, then the weighted sums, per band.
    """
    import jax
    import jax.numpy as jnp

    nb = bands
    group = layout.band_group(nb)
    rows = layout.rows
    side = 2 * radius + 1

    def kernel(thr_ref: Any, factor_ref: Any, smin_ref: Any, tmin_ref: Any, *refs: Any) -> None:
        *neighbour_refs, out_ref = refs
        block = kp.Block(layout, radius)
        band = block.bands(group, nb)
        plane = [[p * nb + b for b in band] for p in range(pairs)]
        threshold = [[thr_ref[k] for k in ks] for ks in plane]
        centre = [[[block.centre(neighbour_refs[0], k, i) for k in ks] for ks in plane] for i in range(rows)]
        spectral_min = [[block.centre(smin_ref, b, i) for b in band] for i in range(rows)]
        temporal_min = [[block.centre(tmin_ref, b, i) for b in band] for i in range(rows)]

        def one(source: Any, dx: Any, accs: list[list[Any]]) -> list[list[Any]]:
            q = {
                name: [[block.row(ref, k, source, dx) for k in ks] for ks in plane]
                for name, ref in zip(_NEIGHBOUR, neighbour_refs, strict=True)
            }
            for i in range(rows):
                dy, inside = kp.window_row(source, i, radius)
                inverse_factor = factor_ref[dy * side + dx]
                for j in range(group):
                    total = weighted = None
                    for p in range(pairs):
                        close = jnp.abs(q["fine"][p][j] - centre[i][p][j]) <= threshold[p][j]
                        better_s = q["spectral"][p][j] <= spectral_min[i][j]
                        better_t = q["temporal"][p][j] <= temporal_min[i][j]
                        keep = close & (better_s & better_t if strict else better_s | better_t)
                        if rows > 1:
                            keep = keep & inside
                        inverse = q["inverse"][p][j]
                        weight = jnp.where(keep, jnp.where(inverse < 0, 1.0, inverse * inverse_factor), 0.0)
                        part = jnp.where(keep, weight * q["local"][p][j], 0.0)
                        total = weight if total is None else total + weight
                        weighted = part if weighted is None else weighted + part
                    accs[i][j] = accs[i][j] + total
                    accs[i][group + j] = accs[i][group + j] + weighted
            return accs

        zero = jnp.zeros((1, layout.width), jnp.float32)
        accs = kp.over_source_rows(radius, rows, [[zero] * (2 * group) for _ in range(rows)], one)
        block.store(out_ref, accs, band + [nb + b for b in band])

    def run(threshold: Any, *planes: Any, shape: tuple[int, int]) -> Any:
        inverse_factor = np.float32(1) / distance_factors(radius)
        return kp.call(kernel, 2 * nb, shape, layout, nb // group, interpret, threshold, inverse_factor, *planes)

    return jax.jit(run, static_argnames="shape")


def pallas_sums(
    centre: dict[str, Any],
    neighbour: dict[str, Any],
    threshold: Any,
    params: StarfmParams,
    layout: kp.Layout | None = None,
) -> tuple[Any, Any]:
    """The window sums by :func:`starfm_program` (traceable) in ``layout`` (default :data:`LAYOUT`)."""
    import jax

    layout = LAYOUT if layout is None else layout
    pairs, bands, ny, nx = neighbour["fine"].shape
    radius = params.window_radius
    shape = layout.blocked_shape((ny, nx))

    def planes(a: Any) -> Any:
        return kp.pad_planes(a.reshape((-1, ny, nx)), radius, shape, np.nan)

    inverse = jax.numpy.where(neighbour["unit"] > 0, -1.0, neighbour["inverse"])
    interpret = jax.default_backend() == "cpu"
    program = starfm_program(radius, pairs, bands, params.filtering == "strict", interpret, layout)
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
