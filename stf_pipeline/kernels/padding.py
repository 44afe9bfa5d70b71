"""Blocks padded to one shape, so that a jitted kernel compiles once per scene.

JAX specialises a jitted function on the shapes of its arguments. The engine's blocks at the scene
edge are smaller than the others (:func:`stf_pipeline.parallel.map_overlapping`), so without
padding every distinct edge shape compiles the kernel again. The helpers here pad a block at its
far ends (the end of its last two axes, so a block keeps its origin and coarse alignment) to the
scene's largest block shape, and keep the padded pixels out of a computation that would otherwise
see them:

- :func:`pad_block` and :func:`crop_block` pad with a fill value (NaN for methods whose windows skip
  NaN: :attr:`MethodSpec.block_padding` ``"nan"``) and cut the result back;
- :func:`extent_mask` marks the real pixels of a padded block, a traced argument rather than a
  static shape, so blocks of every extent share one compiled program;
- :func:`masked_convolutions` zeroes every Flax convolution's output outside that mask, so each
  layer sees zeros beyond the real extent, as a ``'same'``-padded convolution does at the true
  scene border (for networks, ``block_padding="kernel"``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np


def pad_block(block: np.ndarray, shape: tuple[int, int], *, value: float = np.nan) -> np.ndarray:
    """``block`` ``(..., y, x)`` padded at the end of its last two axes to ``shape`` with ``value``.

    Parameters
    ----------
    block : numpy.ndarray
        Array whose last two axes are ``(y, x)``, at most ``shape``.
    shape : (int, int)
        The padded ``(y, x)`` size.
    value : float, default NaN
        Fill value of the added pixels.

    Returns
    -------
    numpy.ndarray
        ``block`` itself when it already has ``shape``, else a padded copy.

    Raises
    ------
    ValueError
        If ``block`` is larger than ``shape`` along either axis.
    """
    ny, nx = block.shape[-2:]
    dy, dx = int(shape[0]) - ny, int(shape[1]) - nx
    if dy < 0 or dx < 0:
        raise ValueError(f"a block of (y, x) size {(ny, nx)} cannot be padded to the smaller {tuple(shape)}.")
    if dy == 0 and dx == 0:
        return block
    widths = ((0, 0),) * (block.ndim - 2) + ((0, dy), (0, dx))
    return np.pad(block, widths, mode="constant", constant_values=value)


def crop_block(block: Any, extent: tuple[int, int]) -> Any:
    """The first ``extent = (y, x)`` pixels of the last two axes of ``block`` (undoes :func:`pad_block`)."""
    return block[..., : int(extent[0]), : int(extent[1])]


def extent_mask(shape: tuple[int, int], extent: tuple[int, int]) -> np.ndarray:
    """Boolean ``(y, x)`` array of ``shape``: True on the real pixels (the first ``extent``), False on padding."""
    mask = np.zeros(tuple(int(n) for n in shape), dtype=bool)
    mask[: int(extent[0]), : int(extent[1])] = True
    return mask


@contextlib.contextmanager
def masked_convolutions(inside: Any) -> Iterator[None]:
    """Within the block, every ``flax.linen.Conv`` output is zero where ``inside`` ``(y, x)`` is False.

    A stack of ``'same'`` convolutions applied to an input padded with zeros beyond ``inside``
    then gives, on ``inside``, exactly what it gives on the unpadded input: each layer sees zeros
    beyond the real extent, as it does beyond the array's edge. Convolution outputs are
    ``(batch, y, x, channel)`` (Flax's layout); ``inside`` may be a traced JAX array, so blocks of
    every extent share one compiled program. Use it around ``module.apply`` while tracing.
    """
    import flax.linen as nn
    import jax.numpy as jnp

    def interceptor(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, nn.Conv) and context.method_name == "__call__":
            return jnp.where(inside[:, :, None], out, jnp.zeros((), out.dtype))
        return out

    with nn.intercept_methods(interceptor):
        yield
