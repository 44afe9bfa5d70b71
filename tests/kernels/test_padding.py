"""Blocks padded to one shape: the NumPy helpers, and convolutions masked to the real extent
against a hand-written 'same' convolution of the unpadded image."""

from __future__ import annotations

import numpy as np
import pytest

from stf_pipeline.kernels.padding import crop_block, extent_mask, masked_convolutions, pad_block


def test_pad_block_pads_the_far_ends_and_crop_undoes_it():
    block = np.arange(2 * 2 * 3, dtype=np.float32).reshape(2, 2, 3)
    padded = pad_block(block, (4, 5))
    assert padded.shape == (2, 4, 5)
    np.testing.assert_array_equal(padded[:, :2, :3], block)
    assert np.isnan(padded[:, 2:, :]).all() and np.isnan(padded[:, :, 3:]).all()
    np.testing.assert_array_equal(crop_block(padded, (2, 3)), block)
    assert pad_block(block, (2, 3)) is block  # already the shape: no copy
    np.testing.assert_array_equal(pad_block(block[0], (3, 3), value=0.0), [[0, 1, 2], [3, 4, 5], [0, 0, 0]])
    with pytest.raises(ValueError, match=r"cannot be padded to the smaller \(1, 3\)"):
        pad_block(block, (1, 3))


def test_extent_mask_marks_the_real_pixels():
    np.testing.assert_array_equal(extent_mask((3, 4), (2, 3)), [[1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]])


def _same_conv(image: np.ndarray, kernel: np.ndarray, bias: float) -> np.ndarray:
    """A 'same' convolution of a ``(y, x)`` image by a 3x3 ``kernel`` with zeros outside, by hand."""
    ny, nx = image.shape
    out = np.full((ny, nx), bias, dtype=np.float64)
    for y in range(ny):
        for x in range(nx):
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    if 0 <= y + dy < ny and 0 <= x + dx < nx:
                        out[y, x] += kernel[dy + 1, dx + 1] * image[y + dy, x + dx]
    return out


def test_masked_convolutions_match_a_hand_computed_stack_on_the_real_extent():
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(4)
    image = rng.normal(size=(5, 6))
    k1, k2 = rng.normal(size=(3, 3)), rng.normal(size=(3, 3))
    b1, b2 = 0.7, -0.3  # biases make the padded pixels non-zero after a layer unless masked
    want = _same_conv(np.maximum(_same_conv(image, k1, b1), 0.0), k2, b2)

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
            x = nn.relu(nn.Conv(1, (3, 3), padding="SAME", name="c1")(x))
            return nn.Conv(1, (3, 3), padding="SAME", name="c2")(x)

    params = {
        "c1": {"kernel": jnp.asarray(k1[:, :, None, None], jnp.float32), "bias": jnp.asarray([b1], jnp.float32)},
        "c2": {"kernel": jnp.asarray(k2[:, :, None, None], jnp.float32), "bias": jnp.asarray([b2], jnp.float32)},
    }
    padded = pad_block(image, (8, 9), value=0.0)[None, :, :, None].astype(np.float32)
    inside = extent_mask((8, 9), (5, 6))

    @jax.jit
    def masked(params, x, inside):
        with masked_convolutions(inside):
            return Stack().apply({"params": params}, x)

    got = np.asarray(masked(params, padded, inside))[0, :5, :6, 0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    unmasked = np.asarray(Stack().apply({"params": params}, padded))[0, :5, :6, 0]
    assert not np.allclose(unmasked, want, atol=1e-3)  # without the mask the edge pixels change
