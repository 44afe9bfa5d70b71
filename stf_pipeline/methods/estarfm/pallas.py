"""ESTARFM's window sums as a Pallas (Triton) kernel, for GPUs.

One program computes a block of output pixels for a group of bands (:data:`LAYOUT`, see
:class:`stf_pipeline.kernels.pallas.Layout`) and keeps, per output row, the similar-pixel count,
the weight total and its bands' ten sums in registers over all window offsets: the sums of
:func:`stf_pipeline.methods.estarfm.core.body` (its :func:`~stf_pipeline.methods.estarfm.core.sum_terms`)
term for term, in the same row-major offset order for every pixel (float32). Similarity is
tested on all bands in every program. The whole device program around it is
:mod:`stf_pipeline.methods.estarfm.jax`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from stf_pipeline.kernels import pallas as kp
from stf_pipeline.kernels.similar import distance_factors
from stf_pipeline.methods.estarfm.core import FILLS, WEIGHT_EPS, sum_terms

#: The programs' layout on GPUs, chosen by timing (``docs/benchmarks.md``, STARFM and ESTARFM).
LAYOUT = kp.Layout(rows=2)


def _zero_nan(a: Any) -> Any:
    import jax.numpy as jnp

    return jnp.where(jnp.isnan(a), 0.0, a)


@functools.lru_cache(maxsize=16)
def estarfm_program(
    radius: int, bands: int, eps: float, interpret: bool, layout: kp.Layout
) -> Callable[..., Any]:
    """Jitted ``(threshold, fine, spread, coarse0, change, shape) -> (2 groups + 10 bands, y, x)`` sums.

    ``fine``: ``(2 bands, ...)`` NaN where missing; ``spread``: ``(1, ...)`` ``1 - R``;
    ``coarse0``, ``change``: ``(2 bands, ...)`` zero where missing; all padded
    (:mod:`stf_pipeline.kernels.pallas`). Planes of the result: the similar-pixel count and the
    weight total (once for each band group, the same values), then the ten per-band sums of
    :func:`~stf_pipeline.methods.estarfm.core.body` in its order, ``bands`` planes each.
    """
    import jax
    import jax.numpy as jnp

    nb = bands
    group = layout.band_group(nb)
    groups = nb // group
    rows = layout.rows
    side = 2 * radius + 1

    def kernel(
        thr_ref: Any, factor_ref: Any, fine_ref: Any, spread_ref: Any, coarse_ref: Any, change_ref: Any, out_ref: Any
    ) -> None:
        block = kp.Block(layout, radius)
        band = block.bands(group, nb)
        dated = [[d * nb + b for b in band] for d in (0, 1)]
        threshold = [thr_ref[k] for k in range(2 * nb)]
        centre = [[block.centre(fine_ref, k, i) for k in range(2 * nb)] for i in range(rows)]
        fine1 = [[_zero_nan(block.centre(fine_ref, b, i)) for b in band] for i in range(rows)]
        coarse1 = [[block.centre(coarse_ref, b, i) for b in band] for i in range(rows)]

        def one(source: Any, dx: Any, accs: list[list[Any]]) -> list[list[Any]]:
            q = [block.row(fine_ref, k, source, dx) for k in range(2 * nb)]
            if groups == 1:
                fine = [[q[k] for k in ks] for ks in dated]
            else:
                fine = [[block.row(fine_ref, k, source, dx) for k in ks] for ks in dated]
            coarse = [[block.row(coarse_ref, k, source, dx) for k in ks] for ks in dated]
            change = [[block.row(change_ref, k, source, dx) for k in ks] for ks in dated]
            spread = block.row(spread_ref, 0, source, dx)
            for i in range(rows):
                dy, inside = kp.window_row(source, i, radius)
                similar = jnp.abs(q[0] - centre[i][0]) < threshold[0]
                for k in range(1, 2 * nb):
                    similar = similar & (jnp.abs(q[k] - centre[i][k]) < threshold[k])
                if rows > 1:
                    similar = similar & inside
                m = similar.astype(jnp.float32)
                w = m / (spread * factor_ref[dy * side + dx] + np.float32(eps))
                accs[i][0] = accs[i][0] + m
                accs[i][1] = accs[i][1] + w
                for j in range(group):
                    f0 = [jnp.where(similar, fine[d][j], 0.0) for d in (0, 1)]
                    x1, x2 = (m * (coarse[d][j] - coarse1[i][j]) for d in (0, 1))
                    y1, y2 = (m * (f0[d] - fine1[i][j]) for d in (0, 1))
                    terms = sum_terms(w, [change[0][j], change[1][j]], f0, x1, x2, y1, y2)
                    for s, term in enumerate(terms):
                        accs[i][2 + s * group + j] = accs[i][2 + s * group + j] + term
            return accs

        zero = jnp.zeros((1, layout.width), jnp.float32)
        accs = kp.over_source_rows(radius, rows, [[zero] * (2 + 10 * group) for _ in range(rows)], one)
        planes = [2 * block.group, 2 * block.group + 1]
        planes += [2 * groups + s * nb + b for s in range(10) for b in band]
        block.store(out_ref, accs, planes)

    def run(threshold: Any, fine: Any, spread: Any, coarse0: Any, change: Any, shape: tuple[int, int]) -> Any:
        factor = distance_factors(radius)
        inputs = (threshold, factor, fine, spread, coarse0, change)
        return kp.call(kernel, 2 * groups + 10 * nb, shape, layout, groups, interpret, *inputs)

    return jax.jit(run, static_argnames="shape")


def pallas_sums(
    neighbour: dict[str, Any], threshold: Any, radius: int, layout: kp.Layout | None = None
) -> list[Any]:
    """The window sums by :func:`estarfm_program` (traceable) in ``layout`` (default :data:`LAYOUT`)."""
    import jax

    layout = LAYOUT if layout is None else layout
    pairs, bands, ny, nx = neighbour["fine"].shape
    shape = layout.blocked_shape((ny, nx))

    def planes(name: str) -> Any:
        a = neighbour[name].reshape((-1, ny, nx))
        return kp.pad_planes(a, radius, shape, np.nan if name == "fine" else FILLS[name])

    program = estarfm_program(radius, bands, WEIGHT_EPS, jax.default_backend() == "cpu", layout)
    sums = program(threshold.reshape(-1), *(planes(n) for n in ("fine", "spread", "coarse0", "change")), shape=shape)
    groups = bands // layout.band_group(bands)
    sums = sums[:, :ny, :nx]
    return [sums[0], sums[1]] + [sums[2 * groups + s * bands : 2 * groups + (s + 1) * bands] for s in range(10)]
