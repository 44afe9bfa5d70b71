"""Shared pieces of the Pallas (Triton) window-sum kernels of STARFM and ESTARFM, for GPUs.

The XLA driver (:func:`stf_pipeline.kernels.similar.window_sums`) updates whole-image
accumulators once per window offset, so every offset reads the inputs and reads and writes the
accumulators in the GPU's memory: at 51x51 offsets that traffic, not arithmetic, sets its time.
A Pallas program instead computes a block of output pixels, ``rows`` rows of ``width`` pixels
(one column a thread), and keeps its accumulators in registers over all the offsets.

The program walks the *source* rows of its window band once: each neighbour row it loads at
column offset ``dx`` is the row ``dy = source - i`` of output row ``i``'s window, so one load
serves all ``rows`` output rows (a ``rows``-fold cut of the loads against one row a program).
For every output pixel the terms are still added in the row-major offset order of its own
window, whatever block it sits in (float32, as the XLA driver): chunked equals unchunked. A
source row outside an output row's window adds nothing to it (its terms are masked).

Inputs are planes ``(plane, y, x)`` (pair-major, band-minor), padded by the window radius on
every side (and to whole blocks at the bottom and right) with *missing* values: NaN fine
reflectance, so a neighbour outside the block is never similar. ``interpret=True`` runs the
same kernels on the CPU (slowly), which is how the tests check them. The layouts were chosen
by timing on a GPU (``docs/benchmarks.md``, STARFM and ESTARFM).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Layout:
    """The work of one Pallas program and its warps.

    Attributes
    ----------
    rows
        Output rows sharing every loaded neighbour row (more rows: fewer loads, more registers).
    width
        Output columns, one a thread.
    bands
        Bands whose sums one program keeps (``0``: all). Fewer bands a program keep fewer
        accumulators in registers; a program still reads every band its test needs.
    warps
        Warps a program (Triton's ``num_warps``).
    """

    rows: int = 1
    width: int = 128
    bands: int = 0
    warps: int = 4

    def band_group(self, bands: int) -> int:
        """Bands a program: the largest divisor of ``bands`` not above :attr:`bands` (all if 0)."""
        if self.bands <= 0 or self.bands >= bands:
            return bands
        return max(d for d in range(1, self.bands + 1) if bands % d == 0)

    def blocked_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        """``(y, x)`` rounded up to whole output blocks."""
        return self.rows * -(-shape[0] // self.rows), self.width * -(-shape[1] // self.width)


def pad_planes(a: Any, radius: int, shape: tuple[int, int], value: float) -> Any:
    """Pad ``(..., y, x)`` by ``radius`` on every side and to ``shape`` + halo at the far ends."""
    import jax.numpy as jnp

    extra = (shape[0] - a.shape[-2], shape[1] - a.shape[-1])
    widths = [(0, 0)] * (a.ndim - 2) + [(radius, radius + extra[0]), (radius, radius + extra[1])]
    return jnp.pad(a, widths, constant_values=value)


def call(
    kernel: Callable[..., None],
    n_out: int,
    shape: tuple[int, int],
    layout: Layout,
    groups: int,
    interpret: bool,
    *inputs: Any,
) -> Any:
    """Run ``kernel`` over a grid of output blocks covering ``shape`` times ``groups`` band
    groups: ``(n_out, *shape)`` float32.

    ``interpret=True`` interprets it (any device, slowly); otherwise it is compiled by Triton with
    ``layout.warps`` warps.
    """
    import jax
    from jax.experimental import pallas as pl

    kwargs: dict[str, Any] = {"interpret": True} if interpret else {}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        kwargs["compiler_params"] = plgpu.CompilerParams(num_warps=layout.warps, num_stages=1)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((n_out, *shape), np.float32),
        grid=(shape[0] // layout.rows, shape[1] // layout.width, groups),
        **kwargs,
    )(*inputs)


class Block:
    """Where this program's output block lies, and its loads (inside a kernel)."""

    def __init__(self, layout: Layout, radius: int) -> None:
        from jax.experimental import pallas as pl

        self.layout = layout
        self.radius = radius
        self.y0 = pl.program_id(0) * layout.rows
        self.x0 = pl.program_id(1) * layout.width
        self.group = pl.program_id(2)

    def bands(self, group: int, bands: int) -> list[Any]:
        """The bands of this program's group: static indices when one group holds them all."""
        if group == bands:
            return list(range(bands))
        return [self.group * group + j for j in range(group)]

    def row(self, ref: Any, plane: Any, source: Any, dx: Any) -> Any:
        """Padded row ``y0 + source`` of ``plane`` from column ``x0 + dx``: ``(1, width)``."""
        from jax.experimental import pallas as pl

        return ref[plane, pl.ds(self.y0 + source, 1), pl.ds(self.x0 + dx, self.layout.width)]

    def centre(self, ref: Any, plane: Any, i: int) -> Any:
        """Output row ``i`` of ``plane`` (the centre pixels): ``(1, width)``."""
        return self.row(ref, plane, self.radius + i, self.radius)

    def store(self, out_ref: Any, accs: list[list[Any]], planes: list[Any]) -> None:
        """Write output row ``i``'s accumulator ``n`` into plane ``planes[n]``."""
        from jax.experimental import pallas as pl

        for i, row in enumerate(accs):
            for plane, acc in zip(planes, row, strict=True):
                out_ref[plane, pl.ds(self.y0 + i, 1), pl.ds(self.x0, self.layout.width)] = acc


def over_source_rows(
    radius: int, rows: int, accs: list[list[Any]], one: Callable[[Any, Any, list[list[Any]]], list[list[Any]]]
) -> list[list[Any]]:
    """``one(source, dx, accs)`` over the source rows of the block's window band (``rows + 2r``)
    and, within each, the column offsets, in that order: row-major offsets for every output row.

    ``accs[i]`` are output row ``i``'s accumulators.
    """
    from jax import lax

    side = 2 * radius + 1
    per_row = len(accs[0])

    def flat(a: tuple) -> list[list[Any]]:
        return [list(a[i * per_row : (i + 1) * per_row]) for i in range(rows)]

    def column(dx: Any, a: tuple, source: Any) -> tuple:
        return tuple(x for row in one(source, dx, flat(a)) for x in row)

    def source_row(source: Any, a: tuple) -> tuple:
        return lax.fori_loop(0, side, lambda dx, b: column(dx, b, source), a)

    start = tuple(x for row in accs for x in row)
    return flat(lax.fori_loop(0, rows - 1 + side, source_row, start))


def window_row(source: Any, i: int, radius: int) -> tuple[Any, Any]:
    """Output row ``i``'s window row ``dy`` for ``source`` (clipped into the window) and whether
    ``source`` lies in that window at all (scalars)."""
    import jax.numpy as jnp

    dy = source - i
    inside = (dy >= 0) & (dy <= 2 * radius)
    return jnp.clip(dy, 0, 2 * radius), inside
