"""The embedded default scene: a realistic, seeded, lazily built Landsat/MODIS-like cube.

Every pixel value is a pure function of the seed, the date and the pixel's *global* row and
column (counter-based hashing, no sequential random state), so each Dask chunk is computed on its
own and the same seed gives the same cube whatever the chunking; a 10000×10000 scene costs no
more memory than a chunk.

The surface
    Land-cover parcels (a jittered Voronoi tiling, ~32 px fields) of five classes: crops with
    a per-parcel growing season (green-up date, peak greenness, senescence: CIA-like), pasture
    with a weak season, evergreen forest, urban/bare soil and permanent water; multiplicative
    within-parcel texture. A land-cover change event: a flood (LGC-like) that rises over the
    low-lying part of the scene (smooth "elevation" noise) around ``flood_date`` and recedes.
The fine sensor
    The surface plus small per-pixel noise.
The coarse sensor
    Differs from the fine one as a real MODIS does from Landsat: cross-band leakage (a band
    response mixing neighbouring bands), per-band gain and offset, a date-dependent atmospheric
    offset (strongest in blue), a Gaussian point-spread function, then the mean over native
    ``coarse_factor × coarse_factor`` pixels, put back on the fine grid (block-constant), as
    STF cubes store coarse images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
from dask.base import tokenize
from scipy.ndimage import gaussian_filter1d

from stf_pipeline.cube import DIMS, validate_cube
from stf_pipeline.exceptions import CubeError

BANDS: tuple[str, ...] = ("blue", "green", "red", "nir", "swir1", "swir2")

#: endmember spectra (reflectance) for blue, green, red, nir, swir1, swir2
_GREEN_VEG = np.array([0.030, 0.070, 0.040, 0.450, 0.220, 0.100])
_DRY_VEG = np.array([0.060, 0.090, 0.120, 0.280, 0.330, 0.240])
_SOIL = np.array([0.080, 0.110, 0.150, 0.220, 0.300, 0.260])
_URBAN = np.array([0.120, 0.130, 0.150, 0.200, 0.240, 0.220])
_WATER = np.array([0.070, 0.065, 0.045, 0.030, 0.015, 0.008])  # turbid flood water

WATER, CROP, PASTURE, FOREST, URBAN = range(5)
_CLASS_SHARES = np.cumsum([0.03, 0.47, 0.20, 0.15, 0.15])

PARCEL_SIZE = 32  # fine pixels per parcel lattice cell
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


# --------------------------------------------------------------------------- hashing
def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wraps modulo 2**64 by design)."""
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def hash_uniform(seed: int, *keys: np.ndarray | int) -> np.ndarray:
    """Uniform [0, 1) numbers that are a pure function of ``seed`` and integer ``keys``."""
    with np.errstate(over="ignore"):
        h = np.asarray(np.uint64(seed) * _GOLDEN + np.uint64(0x632BE59BD9B4E019), dtype=np.uint64)
        for key in keys:
            k = np.asarray(key).astype(np.int64).astype(np.uint64)
            h = _mix(h ^ (k + _GOLDEN))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


def value_noise(seed: int, rows: np.ndarray, cols: np.ndarray, scale: float) -> np.ndarray:
    """Smooth noise in [0, 1): hashed lattice values every ``scale`` pixels, smoothstep-interpolated."""
    fy, fx = rows / scale, cols / scale
    iy, ix = np.floor(fy).astype(np.int64), np.floor(fx).astype(np.int64)
    ty, tx = fy - iy, fx - ix
    ty, tx = ty * ty * (3 - 2 * ty), tx * tx * (3 - 2 * tx)
    v00 = hash_uniform(seed, iy, ix)
    v01 = hash_uniform(seed, iy, ix + 1)
    v10 = hash_uniform(seed, iy + 1, ix)
    v11 = hash_uniform(seed, iy + 1, ix + 1)
    return (v00 * (1 - tx) + v01 * tx) * (1 - ty) + (v10 * (1 - tx) + v11 * tx) * ty


# --------------------------------------------------------------------------- surface
def _parcels(seed: int, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lattice cell (row, col) of the parcel each pixel belongs to (nearest jittered seed point)."""
    cy, cx = rows // PARCEL_SIZE, cols // PARCEL_SIZE
    best = np.full(np.broadcast_shapes(rows.shape, cols.shape), np.inf)
    best_y = np.zeros(best.shape, np.int64)
    best_x = np.zeros(best.shape, np.int64)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            ny, nx = cy + dy, cx + dx
            sy = (ny + 0.15 + 0.7 * hash_uniform(seed + 1, ny, nx)) * PARCEL_SIZE
            sx = (nx + 0.15 + 0.7 * hash_uniform(seed + 2, ny, nx)) * PARCEL_SIZE
            dist = (rows + 0.5 - sy) ** 2 + (cols + 0.5 - sx) ** 2
            closer = dist < best
            best = np.where(closer, dist, best)
            best_y = np.where(closer, ny, best_y)
            best_x = np.where(closer, nx, best_x)
    return best_y, best_x


def surface_reflectance(
    seed: int,
    day: float,
    rows: np.ndarray,
    cols: np.ndarray,
    *,
    season_length: float,
    flood_day: float | None,
    flood_extent: float = 0.3,
) -> np.ndarray:
    """True surface reflectance ``(6, len(rows), len(cols))`` on ``day`` (days since the first date).

    ``rows``/``cols`` are 1-D global pixel indices; the result depends only on them, the seed and
    the day.
    """
    r = rows.astype(np.float64)[:, None]
    c = cols.astype(np.float64)[None, :]
    pr, pc = _parcels(seed, rows.astype(np.int64)[:, None], cols.astype(np.int64)[None, :])
    cls_draw = hash_uniform(seed + 3, pr, pc)
    cls = np.searchsorted(_CLASS_SHARES, cls_draw, side="right").clip(0, 4)
    green_up = season_length * (0.25 + 0.30 * hash_uniform(seed + 4, pr, pc))
    peak_green = 0.55 + 0.40 * hash_uniform(seed + 5, pr, pc)
    soil_bright = 0.75 + 0.5 * hash_uniform(seed + 6, pr, pc)
    width = 0.18 * season_length

    crop_green = peak_green * np.exp(-(((day - green_up) / width) ** 2))
    crop_dry = 0.7 / (1 + np.exp(-(day - green_up - width) / (0.05 * season_length))) * (1 - crop_green)
    season = np.sin(np.pi * np.clip(day / season_length, 0, 1))
    green = np.select(
        [cls == WATER, cls == CROP, cls == PASTURE, cls == FOREST],
        [0.0, crop_green, 0.25 + 0.3 * peak_green * season, 0.80 + 0.05 * season],
        default=0.05,
    )
    dry = np.select([cls == CROP, cls == PASTURE], [crop_dry, 0.3 * (1 - season)], default=0.0)
    dry = np.minimum(dry, 1 - green)
    bare = 1 - green - dry
    background = np.where(cls == URBAN, 1.0, 0.0)[None]
    soil = np.where(background > 0, _URBAN[:, None, None], soil_bright[None] * _SOIL[:, None, None])
    land = green[None] * _GREEN_VEG[:, None, None] + dry[None] * _DRY_VEG[:, None, None] + bare[None] * soil
    texture = 1 + 0.10 * (value_noise(seed + 7, r, c, 6.0) - 0.5) + 0.04 * (hash_uniform(seed + 8, r, c) - 0.5)
    land = land * texture[None]
    water = np.where(cls == WATER, 1.0, 0.0)
    if flood_day is not None:
        elevation = 0.75 * value_noise(seed + 9, r, c, 160.0) + 0.25 * value_noise(seed + 10, r, c, 40.0)
        level = flood_extent * np.exp(-(((day - flood_day) / (0.08 * season_length)) ** 2))
        water = np.maximum(water, np.clip((level + 0.2 - elevation) / 0.02, 0, 1) * (level > 0.02))
    return (1 - water)[None] * land + water[None] * _WATER[:, None, None]


# --------------------------------------------------------------------------- sensors
#: the coarse sensor's difference from the fine one (``synthetic_scene(coarse_bias=...)``): the
#: share of each neighbouring band leaking into a band, the spread of the per-band gains (around
#: 1) and offsets (around 0.005), the amplitude of the date-dependent atmospheric offset in the
#: first band, and the point-spread function's sigma in native coarse pixels
COARSE_BIAS: dict[str, float] = {
    "leak": 0.04, "gain_spread": 0.16, "offset_spread": 0.03, "atmosphere": 0.012, "psf": 0.5,
}


def _coarse_sensor(seed: int, n_bands: int, bias: dict[str, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Band leakage matrix, gain and offset of the coarse sensor relative to the fine one."""
    leak = bias["leak"]
    response = np.eye(n_bands) * (1 - 2 * leak) + np.eye(n_bands, k=1) * leak + np.eye(n_bands, k=-1) * leak
    response /= response.sum(axis=1, keepdims=True)
    gain = 1 - bias["gain_spread"] / 2 + bias["gain_spread"] * hash_uniform(seed + 20, np.arange(n_bands))
    offset = 0.005 - bias["offset_spread"] / 2 + bias["offset_spread"] * hash_uniform(seed + 21, np.arange(n_bands))
    return response, gain, offset


def _atmosphere(seed: int, t_index: int, n_bands: int, amplitude: float) -> np.ndarray:
    """Date-dependent additive atmospheric offset per band, strongest at short wavelengths."""
    strength = np.linspace(1.6, 0.3, n_bands)
    return amplitude * (2 * hash_uniform(seed + 22, t_index, np.arange(n_bands)) - 1) * strength


def _block_mean(a: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor × factor`` blocks of the last two axes, summed in a fixed order."""
    *lead, h, w = a.shape
    blocks = a.reshape(*lead, h // factor, factor, w // factor, factor)
    total = np.zeros((*lead, h // factor, w // factor))
    for i in range(factor):
        for j in range(factor):
            total += blocks[..., :, i, :, j]
    return total / (factor * factor)


def _psf_sigma(coarse_factor: int, psf: float) -> float:
    return psf * coarse_factor


class _Scene:
    """Frozen description of one synthetic scene; block functions close over it."""

    def __init__(
        self,
        *,
        seed: int,
        days: np.ndarray,
        n_bands: int,
        coarse_factor: int,
        flood_day: float | None,
        noise: float,
        bias: dict[str, float],
    ) -> None:
        self.seed = seed
        self.days = days
        self.n_bands = n_bands
        self.coarse_factor = coarse_factor
        self.flood_day = flood_day
        self.noise = noise
        self.bias = bias
        self.season_length = float(max(days[-1] - days[0], 1.0))

    def surface(self, t: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        refl = surface_reflectance(
            self.seed, float(self.days[t]), rows, cols, season_length=self.season_length, flood_day=self.flood_day
        )
        return refl[: self.n_bands]

    def fine_block(self, block_info: Mapping[int | None, Mapping[str, Any]]) -> np.ndarray:
        (t0, t1), _, (y0, y1), (x0, x1) = block_info[None]["array-location"]
        out = np.empty((t1 - t0, self.n_bands, y1 - y0, x1 - x0), np.float32)
        rows, cols = np.arange(y0, y1), np.arange(x0, x1)
        for k, t in enumerate(range(t0, t1)):
            noise = self.noise * (2 * hash_uniform(self.seed + 30, t, rows[:, None], cols[None, :]) - 1)
            out[k] = np.clip(self.surface(t, rows, cols) + noise[None], 0, 1)
        return out

    def coarse_block(self, block_info: Mapping[int | None, Mapping[str, Any]]) -> np.ndarray:
        (t0, t1), _, (y0, y1), (x0, x1) = block_info[None]["array-location"]
        f = self.coarse_factor
        sigma = _psf_sigma(f, self.bias["psf"])
        halo = max(int(np.ceil(4 * sigma)), 1)
        cy0, cy1 = y0 // f, -(-y1 // f)
        cx0, cx1 = x0 // f, -(-x1 // f)
        rows = np.arange(cy0 * f - halo, cy1 * f + halo)
        cols = np.arange(cx0 * f - halo, cx1 * f + halo)
        response, gain, offset = _coarse_sensor(self.seed, self.n_bands, self.bias)
        out = np.empty((t1 - t0, self.n_bands, y1 - y0, x1 - x0), np.float32)
        for k, t in enumerate(range(t0, t1)):
            seen = np.einsum("ij,jyx->iyx", response, self.surface(t, rows, cols))
            atmosphere = _atmosphere(self.seed, t, self.n_bands, self.bias["atmosphere"])
            seen = gain[:, None, None] * seen + (offset + atmosphere)[:, None, None]
            seen = gaussian_filter1d(seen, sigma, axis=1, truncate=4.0, mode="nearest")
            seen = gaussian_filter1d(seen, sigma, axis=2, truncate=4.0, mode="nearest")
            coarse = _block_mean(seen[:, halo:-halo, halo:-halo], f)
            full = np.repeat(np.repeat(coarse, f, axis=1), f, axis=2)
            out[k] = np.clip(full[:, y0 - cy0 * f : y1 - cy0 * f, x0 - cx0 * f : x1 - cx0 * f], 0, 1)
        return out


def synthetic_scene(
    height: int = 480,
    width: int = 480,
    n_times: int = 10,
    seed: int = 0,
    *,
    coarse_factor: int = 20,
    pixel_size: float = 25.0,
    bands: Sequence[str] = BANDS,
    start: str = "2004-04-16",
    interval_days: int = 16,
    fine_times: Sequence[int] | None = None,
    flood: bool = True,
    flood_time: float | None = None,
    noise: float = 0.004,
    coarse_bias: Mapping[str, float] | None = None,
    chunks: int = 512,
    crs: str = "EPSG:32755",
    origin: tuple[float, float] = (700_000.0, 6_700_000.0),
) -> xr.Dataset:
    """Build the embedded synthetic Landsat/MODIS-like cube, lazily.

    Parameters
    ----------
    height, width : int
        Fine grid size in pixels (any size: built chunk by chunk).
    n_times : int
        Number of dates, every ``interval_days`` from ``start``.
    seed : int
        Everything is a pure function of the seed (and pixel/date indices).
    coarse_factor : int, default 20
        Native coarse pixel size in fine pixels (20 × 25 m = 500 m MODIS).
    pixel_size : float, default 25.0
        Fine pixel size in metres (Landsat as resampled in the CIA/LGC data).
    bands : sequence of str
        Subset of ``blue, green, red, nir, swir1, swir2`` in that order (a prefix).
    fine_times : sequence of int, optional
        Indices of dates with a fine observation; the others have ``fine`` all-NaN and are the
        fusion targets. Default: every third date and the last one.
    flood : bool, default True
        Include the LGC-like flood event.
    flood_time : float, optional
        Date index of the flood peak (fractional allowed); default 55 % through the series.
    noise : float
        Amplitude of the fine sensor's per-pixel noise.
    coarse_bias : mapping, optional
        How the coarse sensor differs from the fine one: any of the keys of
        :data:`COARSE_BIAS` (``leak``, ``gain_spread``, ``offset_spread``, ``atmosphere``,
        ``psf``), the others keep those defaults.
    chunks : int, default 512
        Spatial chunk size (``time=1, band=-1``).
    crs : str
        CRS of the projected coordinates (default UTM 55S, south-east Australia).
    origin : (float, float)
        Upper-left corner ``(x, y)`` in CRS units.

    Returns
    -------
    xarray.Dataset
        A lazy cube with ``fine`` (NaN on dates without a fine observation), ``coarse``, the
        complete held-out fine series ``fine_truth``, per-date coords ``fine_valid`` and
        ``coarse_valid``, CRS and ``coarse_factor``.

    Examples
    --------
    >>> cube = synthetic_scene(240, 240, n_times=6, seed=1)
    >>> cube.sizes["time"], cube.attrs["coarse_factor"]
    (6, 20)
    """
    bands = tuple(bands)
    if bands != BANDS[: len(bands)] or not bands:
        raise CubeError(f"bands must be a non-empty prefix of {BANDS}, got {bands}; pick e.g. BANDS[:3].")
    if height < 1 or width < 1 or n_times < 1:
        raise CubeError(f"height, width and n_times must be >= 1, got {height}, {width}, {n_times}.")
    if coarse_factor < 1:
        raise CubeError(f"coarse_factor must be >= 1, got {coarse_factor}.")
    observed = sorted(set(fine_times)) if fine_times is not None else sorted({*range(0, n_times, 3), n_times - 1})
    if any(not 0 <= i < n_times for i in observed):
        raise CubeError(f"fine_times {list(observed)} must be date indices in [0, {n_times}).")

    unknown = sorted(set(coarse_bias or {}) - set(COARSE_BIAS))
    if unknown:
        raise CubeError(f"coarse_bias keys {unknown} are unknown; valid keys are {sorted(COARSE_BIAS)}.")
    bias = {**COARSE_BIAS, **{k: float(v) for k, v in (coarse_bias or {}).items()}}
    if not 0 <= bias["leak"] < 0.5 or bias["psf"] < 0:
        raise CubeError(f"coarse_bias: leak must be in [0, 0.5) and psf >= 0, got {bias['leak']} and {bias['psf']}.")
    days = np.arange(n_times, dtype=np.float64) * interval_days
    flood_day = None
    if flood:
        flood_day = (flood_time if flood_time is not None else 0.55 * (n_times - 1)) * interval_days
    scene = _Scene(
        seed=seed, days=days, n_bands=len(bands), coarse_factor=coarse_factor, flood_day=flood_day, noise=noise,
        bias=bias,
    )
    shape = (n_times, len(bands), height, width)
    dask_chunks = (1, len(bands), chunks, chunks)
    meta = np.empty((0, 0, 0, 0), np.float32)
    token = tokenize(seed, shape, coarse_factor, flood_day, noise, interval_days, chunks, sorted(bias.items()))
    truth = da.map_blocks(
        scene.fine_block, chunks=da.core.normalize_chunks(dask_chunks, shape), dtype=np.float32, meta=meta,
        name=f"synthetic-fine-{token}",
    )
    coarse = da.map_blocks(
        scene.coarse_block, chunks=da.core.normalize_chunks(dask_chunks, shape), dtype=np.float32, meta=meta,
        name=f"synthetic-coarse-{token}",
    )
    has_fine = np.zeros(n_times, bool)
    has_fine[observed] = True
    fine = da.where(has_fine[:, None, None, None], truth, np.float32(np.nan))

    time = pd.date_range(start, periods=n_times, freq=f"{interval_days}D").values.astype("datetime64[ns]")
    x0, y0 = origin
    coords = {
        "time": time,
        "band": np.asarray(bands, dtype=object),
        "y": y0 - (np.arange(height) + 0.5) * pixel_size,
        "x": x0 + (np.arange(width) + 0.5) * pixel_size,
        "fine_valid": ("time", has_fine.astype(np.float64)),
        "coarse_valid": ("time", np.ones(n_times)),
    }
    cube = xr.Dataset(
        {
            "fine": (DIMS, fine, {"units": "reflectance", "sensor": "synthetic fine (Landsat-like)"}),
            "coarse": (DIMS, coarse, {"units": "reflectance", "sensor": "synthetic coarse (MODIS-like)"}),
            "fine_truth": (
                DIMS, truth, {"units": "reflectance", "description": "held-out fine images, for evaluation"}
            ),
        },
        coords=coords,
        attrs={
            "coarse_factor": int(coarse_factor),
            "title": "stf_pipeline synthetic scene",
            "seed": int(seed),
            "flood_day": float(flood_day) if flood_day is not None else "none",
        },
    )
    import rioxarray  # noqa: F401  (registers .rio)

    cube = cube.rio.write_crs(crs)
    return validate_cube(cube)
