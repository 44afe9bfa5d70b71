"""STFDCNN's array helpers (LSR averaging, cubic interpolation, erosion of the valid masks), the
application of a network to images, and the training batches of the two stages."""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import jax
import jax.numpy as jnp

from stf_pipeline.nn.stfdcnn_modules import CNNConfig, ResidualCNN


def block_mean(x: jax.Array, r: int) -> jax.Array:
    """NaN-aware mean over ``r x r`` blocks of the last two axes (a partial last block averages
    what it holds); NaN where a block holds no valid value."""
    if r == 1:
        return x
    *lead, h, w = x.shape
    hb, wb = -(-h // r), -(-w // r)
    pad = [(0, 0)] * len(lead) + [(0, hb * r - h), (0, wb * r - w)]
    x = jnp.pad(x, pad, constant_values=jnp.nan).reshape(*lead, hb, r, wb, r)
    valid = jnp.isfinite(x)
    total = jnp.where(valid, x, 0.0).sum(axis=(-3, -1))
    count = valid.sum(axis=(-3, -1))
    return jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.nan)


def upsample(x: jax.Array, r: int, shape: tuple[int, int]) -> jax.Array:
    """Cubic interpolation of an LSR image onto the fine grid, cropped to ``shape``."""
    if r == 1:
        return x[..., : shape[0], : shape[1]]
    *lead, h, w = x.shape
    up = jax.image.resize(x, (*lead, h * r, w * r), method="cubic")
    return up[..., : shape[0], : shape[1]]


def _window(x: jax.Array, radius: int, op: str) -> jax.Array:
    """Sum (``op="sum"``, outside = 0) or minimum (``op="min"``, outside = 1) over a
    ``(2 radius + 1)^2`` window of the last two axes."""
    if radius == 0:
        return x
    dims = (1,) * (x.ndim - 2) + (2 * radius + 1, 2 * radius + 1)
    pad = [(0, 0)] * (x.ndim - 2) + [(radius, radius), (radius, radius)]
    if op == "sum":
        return jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, (1,) * x.ndim, pad)
    return jax.lax.reduce_window(x, 1.0, jax.lax.min, dims, (1,) * x.ndim, pad)


def erode(valid: jax.Array, radius: int) -> jax.Array:
    """True where every pixel within ``radius`` is valid (outside the array counts as valid)."""
    return _window(valid.astype(jnp.float32), radius, "min") > 0.5


def run_cnn(
    params: Any, config: CNNConfig, images: jax.Array, *, dtype: Any = jnp.float32
) -> jax.Array:
    """Apply a :class:`ResidualCNN` to ``(n, band, y, x)`` images; NaN must already be filled."""
    n_bands = images.shape[1]
    x = jnp.transpose(images, (0, 2, 3, 1))[..., None]
    # no mutable collections: Flax's apply returns the output alone, not the (output, variables) of mutable=...
    out = cast(jax.Array, ResidualCNN(n_bands=n_bands, config=config, dtype=dtype).apply({"params": params}, x))
    return jnp.transpose(out, (0, 3, 1, 2))


def _all_bands_finite(x: jax.Array) -> jax.Array:
    """``(..., band, y, x) -> (..., y, x)``: every band finite."""
    return jnp.isfinite(x).all(axis=-3)


def _to_network_layout(images: jax.Array) -> jax.Array:
    """``(batch, band, y, x) -> (batch, y, x, band, 1)``."""
    return jnp.transpose(images, (0, 2, 3, 1))[..., None]


def _targets_and_mask(target: jax.Array, input_ok: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Targets ``(batch, band, y, x)`` in network layout and the loss mask: target observed and
    input valid (``input_ok``: ``(batch, y, x)``)."""
    targets = jnp.transpose(target, (0, 2, 3, 1))
    mask = jnp.isfinite(targets) & input_ok[..., None]
    return jnp.nan_to_num(targets), mask


@dataclasses.dataclass(frozen=True)
class NLMBatch:
    """``make_batch`` of stage 1: coarse -> LSR fine, both averaged over ``r x r`` fine pixels.

    Crops are ``{"fine", "coarse": (batch, 1, band, p, p)}`` with ``p`` a multiple of ``r`` and
    origins aligned to ``r``. The loss ignores pixels whose receptive field (``radius`` LSR
    pixels) holds a missing coarse value.
    """

    lsr_factor: int
    radius: int

    def __call__(self, crops: dict[str, jax.Array], aux: Any) -> Any:
        from stf_pipeline.nn.sampler import Batch

        coarse = block_mean(crops["coarse"][:, 0], self.lsr_factor)
        fine = block_mean(crops["fine"][:, 0], self.lsr_factor)
        ok = erode(_all_bands_finite(coarse), self.radius)
        targets, mask = _targets_and_mask(fine, ok)
        return Batch(inputs=_to_network_layout(jnp.nan_to_num(coarse)), targets=targets, mask=mask)


@dataclasses.dataclass(frozen=True)
class SRBatch:
    """``make_batch`` of stage 2: LSR fine interpolated onto the fine grid -> fine.

    The loss ignores pixels whose receptive field (``radius`` fine pixels, plus the cubic
    interpolation's support) holds a missing LSR value.
    """

    lsr_factor: int
    radius: int

    def __call__(self, crops: dict[str, jax.Array], aux: Any) -> Any:
        from stf_pipeline.nn.sampler import Batch

        r = self.lsr_factor
        fine = crops["fine"][:, 0]
        shape = (fine.shape[-2], fine.shape[-1])
        lsr = block_mean(fine, r)
        up_ok = jnp.repeat(jnp.repeat(erode(_all_bands_finite(lsr), 2), r, axis=-2), r, axis=-1)
        ok = erode(up_ok[..., : shape[0], : shape[1]], self.radius)
        targets, mask = _targets_and_mask(fine, ok)
        inputs = upsample(jnp.nan_to_num(lsr), r, shape)
        return Batch(inputs=_to_network_layout(inputs), targets=targets, mask=mask)
