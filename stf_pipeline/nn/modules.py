"""Flax building blocks for the learned methods.

Layout convention: images enter a network as ``(batch, y, x, band, channel)`` and leave as
``(batch, y, x, band)``: every band carries the same ``channel`` inputs (e.g. coarse change and
known fine image), and the network predicts one value per band.

- :class:`ConvStack` is a plain stack of 'same'-padded, stride-1 convolutions with ReLU between
  them and a linear last layer (BiaSTF's Table 1 is ``ConvStack((128, 128, 128, 1), (7, 5, 3, 3))``).
- :class:`BandNet` applies a stack either **per band** (one independent network per band, the
  paper's choice: a scan over bands with stacked weights, so each band runs as plain
  convolutions over the whole batch, one band after the other: grouped convolutions, what a
  vectorised map would give, are orders of magnitude slower on CPUs) or **multiband** (one network
  whose input is all bands' channels and whose last layer has one output per band: fewer, wider
  convolutions, faster on a GPU).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp


def receptive_radius(kernel_sizes: Sequence[int]) -> int:
    """Pixels of context on each side that one output of a stride-1 stack depends on.

    >>> receptive_radius((7, 5, 3, 3))
    7
    """
    return sum(int(k) // 2 for k in kernel_sizes)


class ConvStack(nn.Module):
    """Stride-1 'same' convolutions, ReLU after every layer but the last.

    Attributes
    ----------
    features : sequence of int
        Output channels of each layer; the last one is the number of outputs.
    kernel_sizes : sequence of int
        Square kernel side of each layer (same length as ``features``).
    dtype : jnp.dtype
        Computation dtype (``jnp.bfloat16`` for fast inference); parameters stay float32.
    zero_last : bool, default False
        Initialise the last layer to zero, so the untrained stack outputs 0 (for networks that
        learn a correction added to a baseline).
    """

    features: Sequence[int]
    kernel_sizes: Sequence[int]
    dtype: jnp.dtype = jnp.float32
    zero_last: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """``(batch, y, x, channel) -> (batch, y, x, features[-1])``, float32."""
        if len(self.features) != len(self.kernel_sizes):
            raise ValueError(
                f"ConvStack needs one kernel size per layer: features {tuple(self.features)} vs "
                f"kernel_sizes {tuple(self.kernel_sizes)}."
            )
        x = x.astype(self.dtype)
        last = len(self.features) - 1
        for i, (width, k) in enumerate(zip(self.features, self.kernel_sizes, strict=True)):
            init = nn.initializers.zeros if (i == last and self.zero_last) else nn.linear.default_kernel_init
            x = nn.Conv(
                int(width),
                (int(k), int(k)),
                padding="SAME",
                dtype=self.dtype,
                param_dtype=jnp.float32,
                kernel_init=init,
                name=f"conv{i + 1}",
            )(x)
            if i < last:
                x = nn.relu(x)
        return x.astype(jnp.float32)


class _BandSlice(nn.Module):
    """One band's network as a scan body: ``(carry, (batch, y, x, channel)) -> (carry, (batch, y, x))``."""

    hidden: Sequence[int]
    kernel_sizes: Sequence[int]
    dtype: jnp.dtype = jnp.float32
    zero_last: bool = False

    @nn.compact
    def __call__(self, carry: None, x: jnp.ndarray) -> tuple[None, jnp.ndarray]:
        return carry, ConvStack((*self.hidden, 1), self.kernel_sizes, self.dtype, self.zero_last, name="net")(x)[..., 0]


class BandNet(nn.Module):
    """A :class:`ConvStack` applied per band (separate weights) or to all bands at once.

    Attributes
    ----------
    n_bands : int
        Number of bands (outputs).
    hidden : sequence of int
        Widths of the hidden layers (``(n1, n2, n3)`` in BiaSTF's Table 1); the last layer has one
        output per band.
    kernel_sizes : sequence of int
        Kernel side of every layer, hidden ones and the last (``len(hidden) + 1`` values).
    multiband : bool, default False
        False: one independent network per band (input channels of that band only), weights
        stacked along a leading band axis (``params["bands"]["net"]``).
        True: one network seeing every band's channels, with ``n_bands`` outputs.
    dtype : jnp.dtype
        Computation dtype.
    zero_last : bool, default False
        Zero-initialise the last layer (see :class:`ConvStack`).
    """

    n_bands: int
    hidden: Sequence[int]
    kernel_sizes: Sequence[int]
    multiband: bool = False
    dtype: jnp.dtype = jnp.float32
    zero_last: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """``(batch, y, x, band, channel) -> (batch, y, x, band)`` float32."""
        if x.ndim != 5 or x.shape[3] != self.n_bands:
            raise ValueError(
                f"BandNet expects (batch, y, x, {self.n_bands} bands, channel) input, got shape {x.shape}."
            )
        if self.multiband:
            flat = x.reshape(*x.shape[:3], -1)
            net = ConvStack((*self.hidden, self.n_bands), self.kernel_sizes, self.dtype, self.zero_last, name="net")
            return net(flat)
        per_band = nn.scan(
            _BandSlice,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=3,
            out_axes=3,
            length=self.n_bands,
            unroll=self.n_bands,
        )
        return per_band(self.hidden, self.kernel_sizes, self.dtype, self.zero_last, name="bands")(None, x)[1]
