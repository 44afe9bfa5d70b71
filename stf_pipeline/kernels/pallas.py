"""Shared pieces of the Pallas (Triton) window-sum kernels of STARFM and ESTARFM, for GPUs.

The XLA driver (:func:`stf_pipeline.kernels.similar.window_sums`) updates whole-image
accumulators once per window offset, so every offset reads the inputs and reads and writes the
accumulators in the GPU's memory: at 51x51 offsets that traffic, not arithmetic, sets its time.
A Pallas program instead computes a small block of output pixels and keeps its accumulators in
registers over all the offsets; the neighbour blocks it loads are mostly cache hits (the blocks
of adjacent offsets overlap). Every pixel adds its terms in the same row-major offset order
whatever block it sits in (float32, as the XLA driver).

Inputs are planes ``(plane, y, x)`` (pair-major, band-minor), padded by the window radius on
every side (and to whole blocks at the bottom and right) with *missing* values: NaN fine
reflectance, so a neighbour outside the block is never similar. ``interpret=True`` runs the
same kernels on the CPU (slowly), which is how the tests check them. The block shape and warp
count were chosen by timing (``docs/methods/starfm.md``, section Pallas).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

#: Output block of one program (rows, columns) and its warps: one pixel a thread.
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


def call(kernel: Callable[..., None], n_out: int, shape: tuple[int, int], interpret: bool, *inputs: Any) -> Any:
    """Run ``kernel`` over a grid of output blocks covering ``shape``: ``(n_out, *shape)`` float32.

    ``interpret=True`` interprets it (any device, slowly); otherwise it is compiled by Triton with
    :data:`NUM_WARPS` warps.
    """
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


def loader(y0: Any, x0: Any) -> Callable[[Any, int, Any, Any], Any]:
    """``load(ref, plane, dy, dx)``: the output block at ``(y0, x0)`` of ``plane``, shifted by the
    offset ``(dy, dx)`` in padded coordinates (``(radius, radius)`` is the block itself)."""
    from jax.experimental import pallas as pl

    def load(ref: Any, plane: int, dy: Any, dx: Any) -> Any:
        return ref[plane, pl.ds(y0 + dy, BLOCK[0]), pl.ds(x0 + dx, BLOCK[1])]

    return load


def over_offsets(radius: int, accs: list[Any], one: Callable[[Any, Any, list[Any]], list[Any]]) -> list[Any]:
    """``one(dy, dx, accs)`` over the window offsets in row-major order (padded coordinates)."""
    from jax import lax

    side = 2 * radius + 1

    def row(dy: Any, accs: tuple) -> tuple:
        return lax.fori_loop(0, side, lambda dx, a: tuple(one(dy, dx, list(a))), accs)

    return list(lax.fori_loop(0, side, row, tuple(accs)))


def distance_factor(dy: Any, dx: Any, radius: int, inverse_radius: float) -> Any:
    """``D = 1 + d / r`` of the offset ``(dy, dx)`` in padded coordinates (float32)."""
    import jax.numpy as jnp

    fy = (dy - radius).astype(jnp.float32)
    fx = (dx - radius).astype(jnp.float32)
    return 1.0 + jnp.sqrt(fy * fy + fx * fx) * np.float32(inverse_radius)


def store(out_ref: Any, accs: list[Any]) -> None:
    """Write the accumulators as the planes of this program's output block."""
    from jax.experimental import pallas as pl

    y0 = pl.program_id(0) * BLOCK[0]
    x0 = pl.program_id(1) * BLOCK[1]
    for n, acc in enumerate(accs):
        out_ref[n, pl.ds(y0, BLOCK[0]), pl.ds(x0, BLOCK[1])] = acc
