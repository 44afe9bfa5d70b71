"""Moving-window machinery shared by STARFM and ESTARFM: loop over window offsets.

Both methods predict a pixel from the *similar pixels* of a square search window around it.
Rather than loop over pixels, the kernels loop over the ``(2r+1)²`` window offsets and, for
each offset, update per-pixel accumulators with whole-array operations: the *body* of a
method receives the centre pixels ``c`` and their neighbours ``q`` at one offset (aligned
arrays), the offset's distance and the method's constants ``k`` (non-spatial arrays), and
returns the increments of its accumulators.

Two drivers run a body (and :mod:`stf_pipeline.methods._similar_numba` compiles the two
methods' bodies with Numba, the default on CPUs):

* :func:`accumulate_numpy`: NumPy, slicing. Neighbours outside the block are skipped (the
  slices shrink), so a pixel's sums only ever see pixels of the block: no padding.
* :func:`accumulate_jax`: JAX, ``jit`` + ``lax.fori_loop`` over offsets inside ``lax.map`` over
  square tiles (cache-sized on CPU, one tile per block on GPU; on CPU the tiles are shared
  out over one thread per core, so a single block uses every core). Blocks are padded with
  *missing* values (NaN) which a body turns into zero increments, so the sums are those of
  the NumPy driver.

In both, every pixel adds its terms in the same offset order whatever block it sits in, so a
chunked result equals the unchunked one bitwise.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from stf_pipeline.exceptions import MethodError

#: ``body(xp, c, q, dist, k) -> tuple of increments``; ``c``/``q``: mappings of aligned arrays,
#: ``k``: mapping of constants. Must be a module-level function (it keys the JAX compile cache).
Body = Callable[[Any, Mapping[str, Any], Mapping[str, Any], Any, Mapping[str, Any]], tuple[Any, ...]]


def offsets(radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row-major window offsets ``(dy, dx)`` and their Euclidean distance in pixels."""
    side = np.arange(-radius, radius + 1)
    dy, dx = np.meshgrid(side, side, indexing="ij")
    dy, dx = dy.ravel(), dx.ravel()
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


def resolve_backend(backend: str) -> str:
    """``"auto"`` -> ``"jax"`` when JAX's default device is an accelerator, else ``"numba"``."""
    if backend != "auto":
        return backend
    import jax

    return "numba" if jax.default_backend() == "cpu" else "jax"


def default_tile() -> int:
    """Tile side for the JAX driver: cache-sized on CPU, whole blocks on accelerators."""
    import jax

    return 48 if jax.default_backend() == "cpu" else 0


def _workers() -> int:
    """Threads that run the tiles of one block (the CPU cores; one on accelerators)."""
    import jax

    from stf_pipeline.cluster import machine_cores

    return machine_cores() if jax.default_backend() == "cpu" else 1


@functools.lru_cache(maxsize=1)
def _pool(workers: int) -> ThreadPoolExecutor:
    # one pool for the process: blocks mapped by several Dask threads share its workers, so
    # no more tiles run at once than there are cores
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stf-tiles")


@functools.lru_cache(maxsize=64)
def _jax_driver(body: Body, radius: int, tile: int, acc_specs: tuple, names: tuple) -> Callable[..., Any]:
    import jax
    import jax.numpy as jnp
    from jax import lax

    side = 2 * radius + 1
    centre_names, neighbour_names, constant_names = names

    def run(centre: tuple, neighbour: tuple, constants: tuple, origins: Any) -> tuple:
        # centre: whole tiles; neighbour: the same plus a halo of ``radius``; origins: (tile, 2)
        k_const = dict(zip(constant_names, constants, strict=True))
        t = tile

        def cut(a: Any, y0: Any, x0: Any, size: int) -> Any:
            start = (0,) * (a.ndim - 2) + (y0, x0)
            return lax.dynamic_slice(a, start, a.shape[:-2] + (size, size))

        def one_tile(origin: Any) -> tuple:
            y0, x0 = origin[0], origin[1]
            c = dict(zip(centre_names, (cut(a, y0, x0, t) for a in centre), strict=True))
            qt = [cut(a, y0, x0, t + 2 * radius) for a in neighbour]

            def step(row: Any, accs: tuple) -> tuple:
                # one window row: dynamic in y (whole rows, contiguous), static in x
                rows = [lax.dynamic_slice_in_dim(a, row, t, axis=a.ndim - 2) for a in qt]
                dy2 = (row - radius).astype(jnp.float32) ** 2
                for col in range(side):
                    q = dict(
                        zip(
                            neighbour_names,
                            (a[..., col : col + t] for a in rows),
                            strict=True,
                        )
                    )
                    dist = jnp.sqrt(dy2 + np.float32((col - radius) ** 2))
                    incs = body(jnp, c, q, dist, k_const)
                    accs = tuple(acc + inc.astype(acc.dtype) for acc, inc in zip(accs, incs, strict=True))
                return accs

            init = tuple(jnp.zeros((*lead, t, t), dtype) for lead, dtype in acc_specs)
            return lax.fori_loop(0, side, step, init)

        return lax.map(one_tile, origins)

    return jax.jit(run)


def accumulate_jax(
    body: Body,
    centre: Mapping[str, Any],
    neighbour: Mapping[str, Any],
    constants: Mapping[str, Any],
    *,
    radius: int,
    accumulators: Sequence[tuple[tuple[int, ...], Any]],
    tile: int | None = None,
    fills: Mapping[str, float] | None = None,
) -> list[np.ndarray]:
    """Run ``body`` over every window offset with JAX (see module docstring).

    Neighbours outside the block read ``fills[name]`` (default NaN), which ``body`` must map to
    zero increments, as it does for missing pixels. Arrays may be NumPy or JAX; the result is a
    list of NumPy arrays. ``tile``: side of the square tiles (0: one tile per block); default
    :func:`default_tile`. On CPU the tiles are shared out over one thread per core; a tile's
    sums do not depend on the thread that computes it.
    """
    tile = default_tile() if tile is None else int(tile)
    radius = int(radius)
    names = (tuple(centre), tuple(neighbour), tuple(constants))
    specs = tuple((tuple(lead), np.dtype(dtype).name) for lead, dtype in accumulators)
    fill = tuple(float((fills or {}).get(name, np.nan)) for name in neighbour)
    # pad blocks to whole tiles (whole multiples of 256 pixels for one tile per block) so that
    # the many block shapes of a chunked scene share a few compiled programs
    ny, nx = np.shape(next(iter(centre.values())))[-2:]
    t = tile or 256 * -(-max(ny, nx) // 256)
    ty, tx = -(-ny // t), -(-nx // t)
    run = _jax_driver(body, radius, t, specs, names)

    def grow(a: Any, halo: int, value: float) -> np.ndarray:
        a = np.asarray(a)
        widths = [(0, 0)] * (a.ndim - 2) + [
            (halo, halo + ty * t - ny),
            (halo, halo + tx * t - nx),
        ]
        return np.pad(a, widths, constant_values=value)

    centre_padded = tuple(grow(a, 0, 0) for a in centre.values())
    neighbour_padded = tuple(grow(a, radius, v) for a, v in zip(neighbour.values(), fill, strict=True))
    constant_values = tuple(constants.values())
    index = np.arange(ty * tx)
    origins = np.stack([(index // tx) * t, (index % tx) * t], axis=1).astype(np.int32)
    # equal groups (the last tile repeated, its copies dropped) so that one program serves them all
    n_groups = min(_workers(), len(origins))
    size = -(-len(origins) // n_groups)
    filled = np.concatenate([origins, np.repeat(origins[-1:], n_groups * size - len(origins), axis=0)])
    groups = np.split(filled, n_groups)

    def one_group(group: np.ndarray) -> list[np.ndarray]:
        return [np.asarray(a) for a in run(centre_padded, neighbour_padded, constant_values, group)]

    if len(groups) == 1:
        parts = [one_group(groups[0])]
    else:
        parts = list(_pool(_workers()).map(one_group, groups))
    out = []
    for k, (lead, _) in enumerate(specs):
        acc = np.concatenate([part[k] for part in parts], axis=0)[: len(origins)]
        nlead = len(lead)
        acc = acc.reshape((ty, tx, *lead, t, t))
        perm = (*range(2, 2 + nlead), 0, 2 + nlead, 1, 3 + nlead)
        acc = acc.transpose(perm).reshape((*lead, ty * t, tx * t))
        out.append(acc[..., :ny, :nx])
    return out


def f_critical(max_n: int, alpha: float) -> np.ndarray:
    """``F(1, n-2)`` critical values at level ``alpha`` for ``n`` in ``[0, max_n]`` (inf for n < 3)."""
    from scipy.stats import f

    n = np.arange(max_n + 1)
    out = np.full(n.shape, np.inf)
    ok = n >= 3
    out[ok] = f.isf(alpha, 1, n[ok] - 2)
    return out


def radius_from_distance(distance: float, pixel_size: float) -> int:
    """Search radius in pixels for a search distance in CRS units (metres)."""
    return int(math.floor(distance / pixel_size + 0.5))
