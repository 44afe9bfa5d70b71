"""Random patch crops of a cube's dates, reproducible from ``(seed, step)``.

A :class:`PatchSampler` draws, for every training step, ``batch_size`` *items* (tuples of dates:
an ordered pair ``(i, j)`` for BiaSTF, a single date for a per-date mapping) and one square patch
origin per item, and crops the cube's variables there. What the crops mean is left to a
method-specific ``make_batch(crops, aux) -> Batch`` function, so one sampler serves every learned
method.

Draws depend only on ``(seed, step)``: a training run resumed from a checkpoint at step ``s``
sees exactly the batches an uninterrupted run sees from step ``s`` on.

Two ways to read:

- ``preload=True`` (default): the sampled dates are read once (only those dates, only the cube's
  variables asked for) into device memory, and crops are a jitted gather on the device. This is
  what makes GPU training fast.
- ``preload=False``: nothing is read up front; every batch reads just its patch windows from the
  (Dask- or Zarr-backed) cube in one compute. For scenes that do not fit in memory.

Both give identical crops.

``per_item`` arrays hold one image per *item* instead of per date (e.g. the output of a frozen
network for each pair, computed once over the scene): they are cropped at the item's patch like
the cube's variables, and augmented with them.

``augment=True`` applies one of the eight symmetries of the square (flips and 90-degree
rotations, drawn per item from ``(seed, step)`` as well) to every variable of an item alike, so
whatever a method derives from the crops (inputs, target, mask) stays aligned.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import dask
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr

from stf_pipeline.exceptions import ConfigError
from stf_pipeline.task import iso_date, to_datetime64, valid_fraction


@flax.struct.dataclass
class Batch:
    """One training batch, in the layout of :class:`stf_pipeline.nn.modules.BandNet`.

    Attributes
    ----------
    inputs : jax.Array ``(batch, y, x, band, channel)`` float32, finite (NaN replaced by 0)
    targets : jax.Array ``(batch, y, x, band)`` float32 (any value where ``mask`` is False)
    mask : jax.Array ``(batch, y, x, band)`` bool, True where the target is observed
    """

    inputs: jax.Array
    targets: jax.Array
    mask: jax.Array


def ordered_pairs(n: int) -> tuple[tuple[int, int], ...]:
    """All ordered pairs ``(i, j)``, ``i != j``, of ``n`` dates (``n * (n - 1)`` pairs).

    >>> ordered_pairs(3)
    ((0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1))
    """
    return tuple(itertools.permutations(range(n), 2))


@functools.partial(jax.jit, static_argnames=("size",))
def _gather(
    data: dict[str, jax.Array], dates: jax.Array, y0: jax.Array, x0: jax.Array, *, size: int
) -> dict[str, jax.Array]:
    """Crop ``(batch, k, band, size, size)`` windows from ``(time, band, y, x)`` arrays."""

    def crop(arr: jax.Array) -> jax.Array:
        n_bands = arr.shape[1]

        def one(ts: jax.Array, y: jax.Array, x: jax.Array) -> jax.Array:
            return jax.vmap(lambda t: jax.lax.dynamic_slice(arr, (t, 0, y, x), (1, n_bands, size, size))[0])(ts)

        return jax.vmap(one)(dates, y0, x0)

    return {name: crop(arr) for name, arr in data.items()}


@jax.jit
def dihedral(data: dict[str, jax.Array], ops: jax.Array) -> dict[str, jax.Array]:
    """Apply per item ``ops`` ``(batch, 3)`` bool (flip rows, flip columns, transpose, in that
    order) to every ``(batch, ..., p, p)`` array of ``data``: the eight symmetries of the square."""

    def one(arr: jax.Array, op: jax.Array) -> jax.Array:
        arr = jnp.where(op[0], jnp.flip(arr, -2), arr)
        arr = jnp.where(op[1], jnp.flip(arr, -1), arr)
        return jnp.where(op[2], jnp.swapaxes(arr, -1, -2), arr)

    return {name: jax.vmap(one)(arr, ops) for name, arr in data.items()}


class PatchSampler:
    """Seeded random patches over items of dates of a cube.

    Parameters
    ----------
    cube : xarray.Dataset
        A cube (NumPy-, Dask- or Zarr-backed).
    times : sequence of date-like
        The dates the items index into (e.g. the training dates).
    items : sequence of tuple of int
        Each item is a tuple of positions in ``times`` (all of the same length ``k``), e.g.
        :func:`ordered_pairs` ``(len(times))``. Items are drawn uniformly.
    patch_size : int
        Side of the square patches, in fine pixels.
    batch_size : int
        Items (patches) per batch.
    seed : int, default 0
        Draws depend only on ``(seed, step)``.
    align : int, default 1
        Patch origins are multiples of ``align`` (``coarse_factor`` for methods that work on
        native coarse pixels).
    variables : sequence of str, default ("fine", "coarse")
        Cube variables to crop.
    preload : bool, default True
        Read the dates into device memory once (fast) instead of per batch (see module docstring).
    augment : bool, default False
        Random flips and 90-degree rotations, the same for all variables of an item (module
        docstring); use it for training patches, not for validation.
    per_item : mapping of str to array, optional
        ``{name: (n_items, band, y, x)}``, one image per item, on the cube's grid; crops come
        out as ``(batch, 1, band, patch, patch)`` under ``name`` (module docstring). Held in
        device memory.

    Raises
    ------
    ConfigError
        Patch larger than the scene, no items, an item out of range, or a sampled date whose
        image is all NaN (a NaN-only date has nothing to learn from).
    """

    def __init__(
        self,
        cube: xr.Dataset,
        times: Sequence[Any],
        *,
        items: Sequence[tuple[int, ...]],
        patch_size: int,
        batch_size: int,
        seed: int = 0,
        align: int = 1,
        variables: Sequence[str] = ("fine", "coarse"),
        preload: bool = True,
        augment: bool = False,
        per_item: Mapping[str, Any] | None = None,
    ) -> None:
        height, width = int(cube.sizes["y"]), int(cube.sizes["x"])
        if patch_size < 1 or batch_size < 1:
            raise ConfigError(f"patch_size and batch_size must be >= 1, got {patch_size} and {batch_size}.")
        if patch_size > height or patch_size > width:
            raise ConfigError(
                f"patch size of {patch_size} is greater than the scene ({height} x {width} pixels); "
                f"use a patch_size of at most {min(height, width)}."
            )
        if not items:
            raise ConfigError(f"no items to sample from {len(times)} date(s); pass at least one item of dates.")
        lengths = {len(item) for item in items}
        if len(lengths) != 1:
            raise ConfigError(f"all items must hold the same number of dates, got lengths {sorted(lengths)}.")
        flat = [i for item in items for i in item]
        if min(flat) < 0 or max(flat) >= len(times):
            raise ConfigError(f"items index dates 0..{len(times) - 1}, got positions {sorted(set(flat))}.")
        all_times = cube["time"].values.astype("datetime64[ns]")
        dates = [to_datetime64(t) for t in times]
        missing = [iso_date(t) for t in dates if t not in all_times]
        if missing:
            known = [iso_date(t) for t in all_times]
            raise ConfigError(f"date(s) {missing} are not in the cube; its dates are {known}.")
        self._time_index = np.array([int(np.flatnonzero(all_times == t)[0]) for t in dates])
        per_item = dict(per_item or {})
        for name, arr in per_item.items():
            if tuple(arr.shape[:1]) + tuple(arr.shape[2:]) != (len(items), height, width) or name in variables:
                raise ConfigError(
                    f"per_item {name!r} must be (n_items={len(items)}, band, {height}, {width}) and not a cube "
                    f"variable {tuple(variables)}, got shape {tuple(arr.shape)}."
                )
        used = sorted(set(flat))
        for name in variables:
            valid = valid_fraction(cube, name)[self._time_index]
            empty = [iso_date(dates[i]) for i in used if not valid[i] > 0]
            if empty:
                raise ConfigError(
                    f"the {name} image is all NaN (no valid pixel) at date(s) {empty}; such patches hold "
                    "nothing to learn from: drop these dates from the training dates."
                )
        self.cube = cube
        self.times = tuple(dates)
        self.items = np.asarray(items, dtype=np.int32)
        self.patch_size = int(patch_size)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.align = max(int(align), 1)
        self.variables = tuple(variables)
        self.preload = bool(preload)
        self.augment = bool(augment)
        self._n_origins = ((height - self.patch_size) // self.align + 1, (width - self.patch_size) // self.align + 1)
        self._data: dict[str, jax.Array] | None = None
        self._per_item = {name: jnp.asarray(arr, dtype=jnp.float32) for name, arr in per_item.items()}
        if self.preload:
            self._data = {
                name: jnp.asarray(np.asarray(cube[name].isel(time=self._time_index).values, dtype=np.float32))
                for name in self.variables
            }

    def draw(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The items and patch origins of batch ``step``: ``(items (B, k), y0 (B,), x0 (B,))``."""
        which, y0, x0 = self._draw(step)
        return self.items[which], y0, x0

    def _draw(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Positions in ``items`` and patch origins of batch ``step``."""
        rng = np.random.default_rng([self.seed, int(step)])
        which = rng.integers(0, len(self.items), size=self.batch_size)
        y0 = rng.integers(0, self._n_origins[0], size=self.batch_size) * self.align
        x0 = rng.integers(0, self._n_origins[1], size=self.batch_size) * self.align
        return which, y0.astype(np.int32), x0.astype(np.int32)

    def symmetries(self, step: int) -> np.ndarray:
        """The ``(batch, 3)`` bool symmetries of batch ``step`` (see :func:`dihedral`)."""
        return np.random.default_rng([self.seed, int(step), 1]).integers(0, 2, size=(self.batch_size, 3)).astype(bool)

    def crops(self, step: int) -> dict[str, jax.Array]:
        """Crops of batch ``step``: ``{variable: (batch, k, band, patch, patch)}`` float32, NaN kept."""
        out = self._crops(step)
        return dihedral(out, jnp.asarray(self.symmetries(step))) if self.augment else out

    def _crops(self, step: int) -> dict[str, jax.Array]:
        which, y0, x0 = self._draw(step)
        items = self.items[which]
        per_item = (
            _gather(self._per_item, jnp.asarray(which[:, None]), jnp.asarray(y0), jnp.asarray(x0), size=self.patch_size)
            if self._per_item
            else {}
        )
        if self._data is not None:
            dated = _gather(self._data, jnp.asarray(items), jnp.asarray(y0), jnp.asarray(x0), size=self.patch_size)
            return {**dated, **per_item}
        p = self.patch_size
        out: dict[str, Any] = {}
        for name in self.variables:
            arr = self.cube[name].data
            windows = [
                [arr[int(self._time_index[t]), :, y : y + p, x : x + p] for t in item]
                for item, y, x in zip(items, y0, x0, strict=True)
            ]
            out[name] = windows
        (computed,) = dask.compute(out)
        return {name: jnp.asarray(np.asarray(value, dtype=np.float32)) for name, value in computed.items()} | per_item
