"""Keys cubic interpolation between coarse-pixel centres: a float64 NumPy reference written from
Keys (1981), jax.image.resize's cubic, exactness properties, blocks against the whole image, NaN."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stf_pipeline.kernels.interpolate import SUPPORT_CELLS, cubic_between_centres, keys_weights


def _keys(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    return np.where(
        x <= 1, (a + 2) * x**3 - (a + 3) * x**2 + 1, np.where(x < 2, a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a, 0.0)
    )


def _reference(cells: np.ndarray, factor: int) -> np.ndarray:
    """Pixel by pixel: position in cell units, the four nearest cell centres, Keys' weights (float64);
    NaN where the support leaves the cells (the caller's fallback)."""
    hc, wc = cells.shape
    out = np.full((hc * factor, wc * factor), np.nan)
    for y in range(hc * factor):
        for x in range(wc * factor):
            py, px = (y + 0.5) / factor - 0.5, (x + 0.5) / factor - 0.5
            iy, ix = int(np.floor(py)), int(np.floor(px))
            rows, cols = range(iy - 1, iy + 3), range(ix - 1, ix + 3)
            if rows[0] < 0 or cols[0] < 0 or rows[-1] >= hc or cols[-1] >= wc:
                continue
            out[y, x] = sum(
                _keys(py - r) * _keys(px - c) * cells[r, c] for r in rows for c in cols
            )
    return out


@pytest.fixture(autouse=True)
def _float64():
    with jax.enable_x64(True):
        yield


def _blocky(cells: np.ndarray, factor: int) -> np.ndarray:
    return np.repeat(np.repeat(cells, factor, -2), factor, -1)


def test_weights_sum_to_one_and_centre_is_exact():
    for factor in (2, 3, 16, 20):
        shift, weights = keys_weights(factor)
        np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-12)
        assert set(shift.tolist()) <= {-2, -1}
    shift, weights = keys_weights(5)  # odd factor: pixel 2 is the cell centre
    np.testing.assert_array_equal(weights[2], [0.0, 1.0, 0.0, 0.0])
    assert shift[2] == -1


@pytest.mark.parametrize("factor", [4, 5, 20])
def test_matches_the_reference_inside_and_keeps_cells_at_the_edge(factor):
    rng = np.random.default_rng(factor)
    cells = rng.uniform(0.05, 0.4, (7, 8))
    out = np.asarray(cubic_between_centres(jnp.asarray(_blocky(cells, factor)), factor))
    reference = _reference(cells, factor)
    inside = np.isfinite(reference)
    assert inside.sum() > 0
    np.testing.assert_allclose(out[inside], reference[inside], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(out[~inside], _blocky(cells, factor)[~inside])


def test_agrees_with_jax_image_resize_cubic_inside():
    factor = 16
    cells = np.random.default_rng(1).uniform(0.0, 0.5, (2, 9, 10)).astype(np.float32)
    out = np.asarray(cubic_between_centres(jnp.asarray(_blocky(cells, factor)), factor))
    resized = np.asarray(jax.image.resize(jnp.asarray(cells), (2, 9 * factor, 10 * factor), method="cubic"))
    margin = SUPPORT_CELLS * factor
    np.testing.assert_allclose(out[:, margin:-margin, margin:-margin], resized[:, margin:-margin, margin:-margin],
                               atol=2e-6)


def test_reproduces_a_quadratic_surface_exactly_inside():
    factor = 6
    iy, ix = np.meshgrid(np.arange(8.0), np.arange(9.0), indexing="ij")
    cells = 0.1 + 0.01 * iy - 0.02 * ix + 0.003 * iy * ix
    out = np.asarray(cubic_between_centres(jnp.asarray(_blocky(cells, factor)), factor))
    py, px = np.meshgrid((np.arange(48) + 0.5) / factor - 0.5, (np.arange(54) + 0.5) / factor - 0.5, indexing="ij")
    exact = 0.1 + 0.01 * py - 0.02 * px + 0.003 * py * px
    inside = np.isfinite(_reference(cells, factor))
    np.testing.assert_allclose(out[inside], exact[inside], atol=1e-12)


def test_a_block_with_two_cells_of_halo_equals_the_whole_image():
    factor = 10
    image = _blocky(np.random.default_rng(2).uniform(0.0, 0.3, (3, 12, 12)), factor).astype(np.float32)
    image = image[:, :, :115]  # a partial last column of cells
    whole = np.asarray(cubic_between_centres(jnp.asarray(image), factor))
    halo = SUPPORT_CELLS * factor
    y0, y1, x0 = 40, 80, 50  # the block's own pixels start on cell edges
    block = np.asarray(cubic_between_centres(jnp.asarray(image[:, y0 - halo : y1 + halo, x0 - halo :]), factor))
    np.testing.assert_array_equal(block[:, halo:-halo, halo:], whole[:, y0:y1, x0:])


def test_a_missing_cell_removes_its_pixels_and_keeps_its_neighbours_blocky():
    factor = 4
    cells = np.random.default_rng(3).uniform(0.1, 0.3, (9, 9))
    cells[4, 4] = np.nan
    image = _blocky(cells, factor)
    out = np.asarray(cubic_between_centres(jnp.asarray(image), factor))
    np.testing.assert_array_equal(np.isnan(out), np.isnan(image))
    base = np.floor((np.arange(36) + 0.5) / factor - 0.5)
    reaches = (base - 1 <= 4) & (4 <= base + 2)  # along one axis: the pixel's four support cells hold cell 4
    near = reaches[:, None] & reaches[None, :]
    changed = np.abs(out - image) > 0
    assert not (changed & near).any()
    assert changed.any()


@settings(max_examples=25, deadline=None)
@given(factor=st.integers(2, 9), hc=st.integers(1, 6), wc=st.integers(1, 6), level=st.floats(0.0, 0.8))
def test_a_constant_image_stays_constant(factor, hc, wc, level):
    image = np.full((hc * factor, wc * factor), level, dtype=np.float32)
    out = np.asarray(cubic_between_centres(jnp.asarray(image), factor))
    np.testing.assert_allclose(out, level, atol=1e-6)
