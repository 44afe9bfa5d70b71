"""Moving-window machinery shared by STARFM and ESTARFM: loop over window offsets.

Both methods predict a pixel from the *similar pixels* of a square search window around it.
Rather than loop over pixels, the kernels loop over the ``(2r+1)²`` window offsets and, for
each offset, update per-pixel accumulators with whole-array operations: the *body* of a
method receives the centre pixels ``c`` and their neighbours ``q`` at one offset (aligned
arrays), the offset's distance and the method's constants ``k`` (non-spatial arrays), and
returns the increments of its accumulators.

Two drivers run a body (the two methods' bodies are also written as compiled kernels, with
Numba in their ``numba`` modules and with Pallas in their ``pallas`` modules, traced inside the
same whole-block programs as :func:`window_sums`):

* :func:`accumulate_numpy`: NumPy, slicing. Neighbours outside the block are skipped (the
  slices shrink), so a pixel's sums only ever see pixels of the block: no padding.
* :func:`window_sums`: JAX, traced inside each method's jitted whole-block program (so the
  preparation, the sums and the prediction stay on the device): ``lax.map`` over square tiles
  (cache-sized on CPU, one tile per block on GPUs), ``lax.fori_loop`` over the window rows,
  each row's offsets unrolled. Blocks are padded with *missing* values (NaN)
  which a body turns into zero increments, so the sums are those of the NumPy driver.

In both, every pixel adds its terms in the same offset order whatever block it sits in, so a
chunked result equals the unchunked one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from stf_pipeline.exceptions import MethodError
from stf_pipeline.kernels.device import to_device

#: ``body(xp, c, q, dist, k) -> tuple of increments``; ``c``/``q``: mappings of aligned arrays,
#: ``k``: mapping of constants. Must be a module-level function (it keys the JAX compile cache).
Body = Callable[[Any, Mapping[str, Any], Mapping[str, Any], Any, Mapping[str, Any]], tuple[Any, ...]]


def offsets(radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row-major window offsets ``(dy, dx)`` and their Euclidean distance in pixels."""
    side = np.arange(-radius, radius + 1)
    grid_y, grid_x = np.meshgrid(side, side, indexing="ij")
    dy, dx = grid_y.ravel(), grid_x.ravel()
    return dy, dx, np.sqrt(dy * dy + dx * dx)


def check_window(radius: int, shape: tuple[int, int], method: str) -> None:
    """Raise if a ``(2r+1)²`` window does not fit in a ``(y, x)`` scene of ``shape``."""
    side = 2 * radius + 1
    if side > min(shape):
        raise MethodError(
            f"{method}: the search window of {side}x{side} pixels (radius {radius}) is larger than the "
            f"scene of {shape[0]}x{shape[1]} pixels; pass a smaller window (radius <= {(min(shape) - 1) // 2})."
        )


def _pair_slices(d: int, n: int) -> tuple[slice, slice]:
    """Slices of centres and of their neighbours at offset ``d`` along an axis of length ``n``."""
    if d >= 0:
        return slice(0, n - d), slice(d, n)
    return slice(-d, n), slice(0, n + d)


def accumulate_numpy(
    body: Body,
    centre: Mapping[str, np.ndarray],
    neighbour: Mapping[str, np.ndarray],
    constants: Mapping[str, Any],
    *,
    radius: int,
    accumulators: Sequence[tuple[tuple[int, ...], Any]],
    shape: tuple[int, int],
) -> list[np.ndarray]:
    """Run ``body`` over every window offset with NumPy; returns the accumulators.

    Parameters
    ----------
    body : callable
        ``body(np, c, q, dist, k)`` with ``c``/``q`` the centre/neighbour arrays cut to the pixels
        whose neighbour at this offset lies in the block; returns one increment per accumulator.
    centre, neighbour : mapping of name -> array ``(..., y, x)``
    constants : mapping of name -> array or scalar, passed to ``body`` as ``k``
    radius : int
    accumulators : sequence of (leading shape, dtype)
    shape : (int, int)
        Spatial shape ``(y, x)`` of the block.
    """
    ny, nx = shape
    accs = [np.zeros((*lead, ny, nx), dtype=dtype) for lead, dtype in accumulators]
    for dy, dx, dist in zip(*offsets(radius), strict=True):
        cy, qy = _pair_slices(int(dy), ny)
        cx, qx = _pair_slices(int(dx), nx)
        if cy.start >= cy.stop or cx.start >= cx.stop:
            continue
        c = {k: v[..., cy, cx] for k, v in centre.items()}
        q = {k: v[..., qy, qx] for k, v in neighbour.items()}
        for acc, inc in zip(accs, body(np, c, q, float(dist), constants), strict=True):
            acc[..., cy, cx] += inc
    return accs


def default_tile() -> int:
    """Tile side for the JAX driver: cache-sized on CPU, whole blocks on accelerators."""
    import jax

    return 48 if jax.default_backend() == "cpu" else 0


def block_side(shape: tuple[int, int], tile: int) -> tuple[int, int]:
    """``(y, x)`` shape a block is padded to: whole tiles, or (``tile=0``) one square tile of a
    whole multiple of 256 pixels.

    Blocks of a chunked scene come in many shapes (edges, scene borders); padding them to these
    sizes lets a few compiled programs serve them all.
    """
    if tile == 0:
        side = 256 * -(-max(shape) // 256)
        return side, side
    return tile * -(-shape[0] // tile), tile * -(-shape[1] // tile)


def device_block(arrays: Sequence[Any], tile: int | None) -> tuple[list[Any], int]:
    """A block's arrays on JAX's default device, float32, padded with NaN to :func:`block_side`;
    and the tile side (``None``: :func:`default_tile`)."""
    tile = default_tile() if tile is None else int(tile)
    shape = block_side(tuple(np.shape(arrays[-1])[-2:]), tile)
    return to_device(arrays, shape), tile


def window_sums(
    body: Body,
    centre: Mapping[str, Any],
    neighbour: Mapping[str, Any],
    constants: Mapping[str, Any],
    *,
    radius: int,
    accumulators: Sequence[tuple[tuple[int, ...], Any]],
    tile: int,
    fills: Mapping[str, float] | None = None,
) -> list[Any]:
    """Run ``body`` over every window offset with JAX; traceable (call it inside ``jit``).

    The blocks' ``(y, x)`` sides must be whole multiples of ``tile`` (0: one tile per block).
    Neighbours outside the block read ``fills[name]`` (default NaN), which ``body`` must map to
    zero increments, as it does for missing pixels. ``lax.map`` runs the tiles one after the
    other; per tile, ``lax.fori_loop`` runs the window rows, each with its ``2r+1`` offsets
    unrolled. Every pixel adds the same terms in the same order whatever block it sits in.
    """
    import jax.numpy as jnp
    from jax import lax

    radius = int(radius)
    side = 2 * radius + 1
    ny, nx = next(iter(centre.values())).shape[-2:]
    t = tile or max(ny, nx)
    if ny % t or nx % t:
        raise ValueError(f"window_sums: block {ny}x{nx} is not made of whole {t}x{t} tiles")
    ty, tx = ny // t, nx // t
    fills = fills or {}
    padded = {
        name: jnp.pad(
            a, [(0, 0)] * (a.ndim - 2) + [(radius, radius)] * 2, constant_values=fills.get(name, np.nan)
        )
        for name, a in neighbour.items()
    }
    col_dx2 = (np.arange(side, dtype=np.float32) - radius) ** 2

    def cut(a: Any, y0: Any, x0: Any, size: int) -> Any:
        start = (0,) * (a.ndim - 2) + (y0, x0)
        return lax.dynamic_slice(a, start, a.shape[:-2] + (size, size))

    def one_tile(origin: Any) -> tuple:
        y0, x0 = origin[0], origin[1]
        c = {name: cut(a, y0, x0, t) for name, a in centre.items()}
        qt = {name: cut(a, y0, x0, t + 2 * radius) for name, a in padded.items()}

        def step(row: Any, accs: tuple) -> tuple:
            # one window row: dynamic in y (whole rows), its offsets unrolled (static in x)
            rows = {name: lax.dynamic_slice_in_dim(a, row, t, axis=a.ndim - 2) for name, a in qt.items()}
            dy2 = (row - radius).astype(jnp.float32) ** 2
            for col in range(side):
                q = {name: a[..., col : col + t] for name, a in rows.items()}
                incs = body(jnp, c, q, jnp.sqrt(dy2 + col_dx2[col]), constants)
                accs = tuple(acc + inc.astype(acc.dtype) for acc, inc in zip(accs, incs, strict=True))
            return accs

        init = tuple(jnp.zeros((*lead, t, t), dtype) for lead, dtype in accumulators)
        return lax.fori_loop(0, side, step, init)

    index = np.arange(ty * tx)
    origins = np.stack([(index // tx) * t, (index % tx) * t], axis=1).astype(np.int32)
    parts = lax.map(one_tile, origins)
    out = []
    for acc, (lead, _) in zip(parts, accumulators, strict=True):
        nlead = len(lead)
        acc = acc.reshape((ty, tx, *lead, t, t))
        perm = (*range(2, 2 + nlead), 0, 2 + nlead, 1, 3 + nlead)
        out.append(acc.transpose(perm).reshape((*lead, ny, nx)))
    return out


def f_critical(max_n: int, alpha: float) -> np.ndarray:
    """``F(1, n-2)`` critical values at level ``alpha`` for ``n`` in ``[0, max_n]`` (inf for n < 3)."""
    from scipy.special import fdtri  # the inverse F CDF that scipy.stats.f.isf calls (a lighter import)

    n = np.arange(max_n + 1)
    out = np.full(n.shape, np.inf)
    ok = n >= 3
    out[ok] = fdtri(1, n[ok] - 2, 1.0 - alpha)
    return out


def radius_from_distance(distance: float, pixel_size: float) -> int:
    """Search radius in pixels for a search distance in CRS units (metres)."""
    return int(math.floor(distance / pixel_size + 0.5))


def offset_distances(radius: int) -> np.ndarray:
    """Distances of the row-major window offsets in pixels, float32 (as the bodies see them)."""
    side = np.arange(-radius, radius + 1, dtype=np.float64)
    dy, dx = np.meshgrid(side, side, indexing="ij")
    return np.sqrt(dy * dy + dx * dx).ravel().astype(np.float32)


def distance_factors(radius: int) -> np.ndarray:
    """``D = 1 + d / r`` of the row-major window offsets, float32 (the compiled kernels' table)."""
    return np.float32(1) + offset_distances(radius) * np.float32(1.0 / radius)


def as_f32(a: Any) -> np.ndarray:
    """``a`` as a C-contiguous float32 NumPy array (what the compiled kernels take)."""
    return np.ascontiguousarray(a, dtype=np.float32)
