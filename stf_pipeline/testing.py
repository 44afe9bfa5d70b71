"""Reusable checks and tiny fixtures for tests of stf_pipeline and of code built on it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import dask
import numpy as np
import xarray as xr

from stf_pipeline.cube import make_cube

BANDS6: tuple[str, ...] = ("blue", "green", "red", "nir", "swir1", "swir2")


class DaskComputeError(RuntimeError):
    """Raised by :func:`raise_if_dask_computes` when something computes."""


@contextlib.contextmanager
def raise_if_dask_computes(max_computes: int = 0) -> Iterator[None]:
    """Fail if Dask computes more than ``max_computes`` times inside the block.

    Building a lazy graph must not compute; wrap graph-building code in this guard.
    """
    count = 0

    def scheduler(dsk, keys, **kwargs):  # noqa: ANN001
        nonlocal count
        count += 1
        if count > max_computes:
            raise DaskComputeError(f"Too many computes: {count} > {max_computes}; something was computed eagerly.")
        return dask.get(dsk, keys, **kwargs)

    with dask.config.set(scheduler=scheduler):
        yield


def random_cube(
    *,
    n_times: int = 3,
    height: int = 40,
    width: int = 48,
    bands: Sequence[str] = ("red", "nir"),
    coarse_factor: int = 8,
    seed: int = 0,
    pixel_size: float = 30.0,
) -> xr.Dataset:
    """A small seeded NumPy-backed cube with real coordinates and a UTM CRS.

    Fine is smooth random texture plus a per-date offset; coarse is the fine image block-averaged
    by ``coarse_factor``, with a gain and offset, put back on the fine grid.
    """
    rng = np.random.default_rng(seed)
    shape = (n_times, len(bands), height, width)
    base = rng.uniform(0.05, 0.45, size=(1, len(bands), height, width))
    drift = rng.uniform(-0.05, 0.05, size=(n_times, len(bands), 1, 1))
    fine = np.clip(base + drift + rng.normal(0, 0.01, size=shape), 0, 1)
    hb, wb = -(-height // coarse_factor), -(-width // coarse_factor)
    pad = np.pad(fine, ((0, 0), (0, 0), (0, hb * coarse_factor - height), (0, wb * coarse_factor - width)), mode="edge")
    blocks = pad.reshape(n_times, len(bands), hb, coarse_factor, wb, coarse_factor).mean(axis=(3, 5))
    coarse = np.repeat(np.repeat(blocks, coarse_factor, axis=2), coarse_factor, axis=3)[..., :height, :width]
    coarse = 0.95 * coarse + 0.01
    times = np.datetime64("2020-03-01") + np.arange(n_times) * np.timedelta64(16, "D")
    y = 5_000_000.0 - (np.arange(height) + 0.5) * pixel_size
    x = 500_000.0 + (np.arange(width) + 0.5) * pixel_size
    return make_cube(
        fine.astype(np.float32),
        coarse.astype(np.float32),
        time=times,
        band=list(bands),
        y=y,
        x=x,
        crs="EPSG:32633",
        coarse_factor=coarse_factor,
    )


def assert_chunked_equals_unchunked(
    unchunked: xr.DataArray, chunked: xr.DataArray, *, rtol: float = 0.0, atol: float = 0.0
) -> None:
    """Assert a chunked (Dask) result equals the unchunked one (bitwise by default), NaNs included."""
    a = np.asarray(unchunked.values)
    b = np.asarray(chunked.compute().values)
    if rtol == 0 and atol == 0:
        np.testing.assert_array_equal(a, b)
    else:
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, equal_nan=True)
