"""Moving a block's arrays between the host and JAX's device, the way the device kernels need it.

:func:`to_device` sends all of a block's arrays in one ``jax.device_put`` (a strided view of the
cube as its contiguous dates, stacked and padded on the device); :func:`to_host` brings a result
back through pinned host memory on a GPU. On the lent H100 the copy back alone took a steady
STARFM fusion from 0.21 to 0.19 s (``docs/benchmarks.md``, starfm-estarfm-gpu-2026-12-07-3 and
gpu-host-transfers-2026-12-07).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def to_device(arrays: Sequence[Any], shape: tuple[int, int] | None = None) -> list[Any]:
    """``arrays`` as float32 arrays on JAX's default device (padded with NaN to ``shape`` ``(y, x)``
    if given), in one transfer and without a host copy of a strided view.

    A view that is not C-contiguous (the pairs' dates as a strided slice of the cube,
    :func:`stf_pipeline.fusion.at_times`) goes over as its contiguous leading slices, stacked on
    the device in the program that pads: ``jax.numpy.asarray`` would first copy it whole on the
    host. One ``jax.device_put`` of all pieces took 27 ms where separate transfers and stacks
    took 50 ms (two 2000² × 6 pairs and a target, one H100; ``docs/benchmarks.md``). Arrays
    already on the device (:func:`stf_pipeline.parallel.map_on_device`) stay there.
    """
    import jax

    pieces = [
        a.astype(np.float32) if isinstance(a, jax.Array)  # already there (the engine's device blocks)
        else tuple(np.asarray(part, np.float32) for part in a) if _strided(a) else np.asarray(a, np.float32)
        for a in arrays
    ]
    return _assembler(None if shape is None else (int(shape[0]), int(shape[1])))(jax.device_put(pieces))


def to_host(a: Any) -> np.ndarray:
    """A JAX array as NumPy, copied back through pinned host memory on a GPU.

    A copy into pageable memory ran at 1.4 GB/s on the lent H100 (69 ms for a 2000² × 6 float32
    prediction), one into pinned memory in 2.3 ms (``docs/benchmarks.md``). Where the device
    has no pinned host memory (CPUs), or JAX refuses it, the plain copy.
    """
    import jax

    if any(device.platform == "gpu" for device in a.devices()):
        try:
            a = jax.device_put(a, a.sharding.with_memory_kind("pinned_host"))
        except (ValueError, TypeError, NotImplementedError, RuntimeError):  # no such memory here
            pass
    return np.asarray(a)


def _strided(a: Any) -> bool:
    return isinstance(a, np.ndarray) and a.ndim > 2 and not a.flags.c_contiguous


@functools.lru_cache(maxsize=32)
def _assembler(shape: tuple[int, int] | None) -> Callable[[list[Any]], list[Any]]:
    """Jitted: stack the pieces of :func:`to_device` and pad them to ``shape`` (``None``: as they are)."""
    import jax
    import jax.numpy as jnp

    def run(pieces: list[Any]) -> list[Any]:
        arrays = [jnp.stack(a) if isinstance(a, tuple) else a for a in pieces]
        return arrays if shape is None else [_pad(a, shape) for a in arrays]

    return jax.jit(run)


def _pad(a: Any, shape: tuple[int, int], value: float = np.nan) -> Any:
    """Pad the last two axes of ``a`` at their ends to ``shape`` with ``value`` (JAX)."""
    import jax.numpy as jnp

    widths = [(0, 0)] * (a.ndim - 2) + [(0, shape[0] - a.shape[-2]), (0, shape[1] - a.shape[-1])]
    return jnp.pad(a, widths, constant_values=value)
