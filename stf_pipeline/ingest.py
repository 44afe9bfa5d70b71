"""Real files -> cube: GeoTIFF and ENVI rasters read through rioxarray/GDAL.

Sensors are declared as data (:class:`Sensor`): the names of a file's bands in file order, the
scale factor and offset that turn stored values into reflectance, the nodata value and the
physical range the scaled values must fall in. :func:`ingest` reads one group of fine files and
one group of coarse files (plus optional held-out fine ``truth`` files), masks nodata to NaN,
applies the scale, maps the sensors' bands onto the cube's band names, puts coarse images that
are at their native resolution onto the fine grid (``rio.reproject_match``) and returns a cube
(DESIGN.md §1) with per-date ``fine_valid``/``coarse_valid`` coords.

Files without georeferencing (no CRS, identity transform: the classic ENVI sample data sets) get
a nominal grid of ``pixel_size`` pixels with y decreasing from 0; coarse files of such data
must then be on the fine grid already or an integer factor coarser (nearest upsampling).
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

from stf_pipeline.cube import DIMS, validate_cube
from stf_pipeline.exceptions import CatalogError

PathLike = str | os.PathLike[str]
#: resampling names accepted for coarse -> fine reprojection
RESAMPLING: tuple[str, ...] = ("nearest", "bilinear", "cubic", "average")
#: default Dask chunks of an ingested cube (per date, all bands)
DEFAULT_CHUNKS: dict[str, int] = {"y": 512, "x": 512}
#: share of valid pixels allowed outside a sensor's ``valid_range`` before a file is rejected
MAX_OUT_OF_RANGE = 0.001


@dataclasses.dataclass(frozen=True)
class Sensor:
    """How to turn one sensor's stored values into cube values.

    Attributes
    ----------
    name : str
        Short identifier (``"landsat_sr"``, ``"mod09ga"``...).
    bands : tuple of str
        Cube band name of each band in the file, in file order (``""`` for a band the cube
        never uses).
    scale, offset : float
        ``value = stored * scale + offset`` (e.g. ``scale=1e-4`` for reflectance × 10000).
    nodata : float, optional
        Stored value that marks missing data; default: the file's own nodata tag.
    units : str, default "reflectance"
        Written to the variable's ``units`` attr.
    valid_range : (float, float), default (-0.5, 1.5)
        Scaled values must lie in this range (more than 0.1 % of valid pixels outside it is an
        error: a wrong scale factor or nodata value).
    clip : (float, float) or None, default (0.0, 1.0)
        Scaled values are clipped to this range, the cube contract's reflectance range (small
        negative reflectances are atmospheric-correction noise); ``None`` keeps them.
    """

    name: str
    bands: tuple[str, ...]
    scale: float = 1.0
    offset: float = 0.0
    nodata: float | None = None
    units: str = "reflectance"
    valid_range: tuple[float, float] = (-0.5, 1.5)
    clip: tuple[float, float] | None = (0.0, 1.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "bands", tuple(str(b) for b in self.bands))
        object.__setattr__(self, "valid_range", tuple(float(v) for v in self.valid_range))
        if self.clip is not None:
            object.__setattr__(self, "clip", tuple(float(v) for v in self.clip))
            if len(self.clip) != 2 or not self.clip[0] < self.clip[1]:
                raise CatalogError(f"sensor {self.name!r}: clip must be (low, high) with low < high or null, got {self.clip}.")
        if not self.bands:
            raise CatalogError(f"sensor {self.name!r} declares no bands; list the file's bands in order.")
        named = [b for b in self.bands if b]
        if len(set(named)) != len(named):
            raise CatalogError(f"sensor {self.name!r} has duplicate band names {list(self.bands)}; make them unique.")
        if not (np.isfinite(self.scale) and self.scale != 0):
            raise CatalogError(f"sensor {self.name!r}: scale must be a finite non-zero number, got {self.scale!r}.")
        lo, hi = self.valid_range
        if len(self.valid_range) != 2 or not lo < hi:
            raise CatalogError(f"sensor {self.name!r}: valid_range must be (low, high) with low < high, got {self.valid_range}.")

    def band_index(self, band: str) -> int:
        """0-based position of cube band ``band`` in this sensor's files."""
        if band not in self.bands or not band:
            raise CatalogError(
                f"band {band!r} is not among sensor {self.name!r}'s bands {[b for b in self.bands if b]}; "
                "choose cube bands that both sensors provide or fix the sensor's band list."
            )
        return self.bands.index(band)


#: Landsat/MODIS sensors as data. MODIS MOD09GA stores bands 1-7 in wavelength-number order.
SENSORS: dict[str, Sensor] = {
    s.name: s
    for s in (
        # Landsat 4-7 surface reflectance (LEDAPS, or CIA/LGC's MODTRAN product): 6 reflective bands x 1e4
        Sensor("landsat_sr", ("blue", "green", "red", "nir", "swir1", "swir2"), scale=1e-4, nodata=-9999),
        # Landsat 8/9 Collection 2 Level-2 SR (bands 1-7): DN * 2.75e-5 - 0.2, fill 0
        Sensor(
            "landsat89_c2l2",
            ("coastal", "blue", "green", "red", "nir", "swir1", "swir2"),
            scale=2.75e-5,
            offset=-0.2,
            nodata=0,
        ),
        # MODIS MOD09GA/MOD09A1 bands 1-7 (red, nir, blue, green, 1240 nm, swir1, swir2) x 1e4, fill -28672
        Sensor("mod09ga", ("red", "nir", "blue", "green", "nir2", "swir1", "swir2"), scale=1e-4, nodata=-28672),
        # MODIS reflectance already re-ordered to the Landsat band order (as in the CIA/LGC data)
        Sensor("mod09ga_landsat_order", ("blue", "green", "red", "nir", "swir1", "swir2"), scale=1e-4, nodata=-28672),
    )
}


def get_sensor(sensor: str | Sensor) -> Sensor:
    """Return a :class:`Sensor`, looking a name up in :data:`SENSORS`."""
    if isinstance(sensor, Sensor):
        return sensor
    if sensor not in SENSORS:
        raise CatalogError(f"unknown sensor {sensor!r}; use one of {sorted(SENSORS)} or declare a Sensor(...).")
    return SENSORS[sensor]


@dataclasses.dataclass(frozen=True)
class DatePattern:
    """Read a file's date from its path.

    Attributes
    ----------
    regex : str
        Regular expression searched in the path (as a POSIX string); its first group is the date.
    format : str
        ``strptime`` format of that group, e.g. ``"%Y%j"`` (year + day of year) or ``"%Y%m%d"``.
    """

    regex: str
    format: str

    def __post_init__(self) -> None:
        try:
            compiled = re.compile(self.regex)
        except re.error as err:
            raise CatalogError(f"date regex {self.regex!r} is not a valid regular expression ({err}).") from None
        if compiled.groups < 1:
            raise CatalogError(f"date regex {self.regex!r} has no group; wrap the date part in (...).")

    def parse(self, path: PathLike) -> np.datetime64:
        text = Path(path).as_posix()
        match = re.search(self.regex, text)
        if match is None:
            raise CatalogError(
                f"cannot read a date from {text!r}: regex {self.regex!r} does not match; "
                "fix the regex or list the file with its date explicitly."
            )
        try:
            stamp = pd.to_datetime(match.group(1), format=self.format)
        except ValueError as err:
            raise CatalogError(
                f"{match.group(1)!r} (from {text!r}) does not match date format {self.format!r}: {err}."
            ) from None
        return stamp.to_datetime64().astype("datetime64[ns]")


def _iso(date: np.datetime64) -> str:
    return str(np.datetime_as_string(date, unit="D"))


def _to_date(value: Any, where: str) -> np.datetime64:
    try:
        return pd.Timestamp(value).to_datetime64().astype("datetime64[ns]")
    except (ValueError, TypeError):
        raise CatalogError(f"{where}: cannot read {value!r} as a date; use an ISO date such as 2001-05-24.") from None


def dated_files(
    files: Mapping[Any, PathLike] | Sequence[PathLike],
    *,
    date_pattern: DatePattern | None = None,
    role: str = "files",
) -> dict[np.datetime64, Path]:
    """Normalise ``{date: path}`` or a sequence of paths (dates read by ``date_pattern``) to a sorted dict."""
    if isinstance(files, Mapping):
        pairs = [(_to_date(date, role), Path(path)) for date, path in files.items()]
    else:
        if date_pattern is None:
            raise CatalogError(
                f"{role}: paths were given without dates; pass {{date: path}} or a date_pattern "
                "(e.g. DatePattern(r'(\\d{7})_', '%Y%j'))."
            )
        pairs = [(date_pattern.parse(path), Path(path)) for path in files]
    out: dict[np.datetime64, Path] = {}
    for date, path in sorted(pairs, key=lambda p: p[0]):
        if date in out:
            raise CatalogError(f"{role}: two files for {_iso(date)}: {out[date]} and {path}; keep one per date.")
        out[date] = path
    return out


@dataclasses.dataclass(frozen=True)
class _Grid:
    shape: tuple[int, int]
    crs: Any
    transform: Any
    georeferenced: bool

    def describe(self) -> str:
        crs = self.crs.to_string() if self.crs is not None else "none"
        return f"shape {self.shape}, CRS {crs}, transform {tuple(round(v, 6) for v in self.transform[:6])}"


def _open(path: Path, chunks: Mapping[str, int] | None) -> xr.DataArray:
    """Open a raster lazily: Dask-backed with ``chunks`` when it is georeferenced; files without
    georeferencing (small classic samples) are read by the caller into memory, in its thread, so
    GDAL's "not georeferenced" warning (expected: they get a nominal grid) is silenced."""
    import rioxarray

    if not path.exists():
        raise CatalogError(f"file {path} does not exist; check the catalog's paths and the data root (STF_DATA_ROOT).")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        try:
            array = rioxarray.open_rasterio(path, masked=False)
        except RasterioIOError as err:
            raise CatalogError(f"GDAL cannot read {path} ({err}); is it a GeoTIFF or an ENVI file with its .hdr?") from None
    if chunks is not None and _grid_of(array).georeferenced:
        array = rioxarray.open_rasterio(path, chunks={"band": -1, **chunks}, masked=False, lock=False)
    return array


def _grid_of(array: xr.DataArray) -> _Grid:
    crs = array.rio.crs
    transform = array.rio.transform()
    return _Grid(
        shape=(int(array.sizes["y"]), int(array.sizes["x"])),
        crs=crs,
        transform=transform,
        georeferenced=crs is not None or not transform.is_identity,
    )


def _same_grid(a: _Grid, b: _Grid) -> bool:
    return a.shape == b.shape and a.crs == b.crs and a.transform.almost_equals(b.transform)


def _representable(value: float, dtype: np.dtype) -> bool:
    """Whether ``value`` is a value of ``dtype`` (an int16 file cannot hold nodata=-3.4e38)."""
    if not np.isfinite(value):
        return False
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return bool(info.min <= value <= info.max and float(value).is_integer())
    return True


def _scaled(raw: xr.DataArray, sensor: Sensor, bands: Sequence[str], path: Path) -> xr.DataArray:
    """Select ``bands`` by name, mask nodata and non-finite values to NaN, apply the scale (float32)."""
    if raw.sizes["band"] != len(sensor.bands):
        raise CatalogError(
            f"{path} has {raw.sizes['band']} band(s) but sensor {sensor.name!r} declares {len(sensor.bands)} "
            f"({list(sensor.bands)}); fix the sensor's band list."
        )
    picked = raw.isel(band=[sensor.band_index(b) for b in bands])
    nodata = sensor.nodata if sensor.nodata is not None else raw.rio.nodata
    if nodata is not None and not _representable(nodata, raw.dtype):
        nodata = None
    scaled = xr.apply_ufunc(
        _scale_block,
        picked,
        kwargs={"nodata": nodata, "scale": sensor.scale, "offset": sensor.offset},
        dask="parallelized",
        output_dtypes=[np.float32],
    )
    scaled = scaled.drop_vars([c for c in scaled.coords if c not in ("y", "x")])
    return scaled.assign_coords(band=list(bands))


def _scale_block(raw: np.ndarray, *, nodata: float | None, scale: float, offset: float) -> np.ndarray:
    """``raw * scale + offset`` as float32, NaN where ``raw`` is nodata or not finite."""
    values = raw.astype(np.float64) * scale + offset
    invalid = ~np.isfinite(values)
    if nodata is not None:
        invalid |= raw == np.asarray(nodata).astype(raw.dtype)
    values[invalid] = np.nan
    return values.astype(np.float32)


def _nominal_coords(shape: tuple[int, int], pixel_size: float) -> dict[str, np.ndarray]:
    rows, cols = shape
    return {
        "y": -(np.arange(rows) + 0.5) * pixel_size,
        "x": (np.arange(cols) + 0.5) * pixel_size,
    }


def _check_group(arrays: Mapping[Path, xr.DataArray], role: str) -> _Grid:
    grids = {path: _grid_of(array) for path, array in arrays.items()}
    (first_path, first), *rest = grids.items()
    for path, grid in rest:
        if not _same_grid(first, grid):
            raise CatalogError(
                f"{role} file {path} disagrees with {first_path}: {grid.describe()} vs {first.describe()}; "
                f"all {role} files must share one grid (reproject them first, e.g. gdalwarp)."
            )
    return first


def _on_fine_grid(grid: _Grid, fine_grid: _Grid) -> bool:
    """Whether a coarse file is already on the fine grid (no resampling needed)."""
    return _same_grid(grid, fine_grid) or (
        not grid.georeferenced and not fine_grid.georeferenced and grid.shape == fine_grid.shape
    )


def _onto_fine_grid(
    array: xr.DataArray,
    grid: _Grid,
    fine_grid: _Grid,
    template: xr.DataArray,
    *,
    resampling: str,
    path: Path,
) -> xr.DataArray:
    """Put a scaled coarse image (NaN for nodata) onto the fine grid."""
    if _on_fine_grid(grid, fine_grid):
        return array.assign_coords(y=template["y"], x=template["x"])
    if grid.crs is not None and fine_grid.crs is not None:
        from rasterio.enums import Resampling

        source_res = abs(grid.transform.a) if grid.crs == fine_grid.crs else np.inf
        method = "average" if source_res < abs(fine_grid.transform.a) else resampling
        source = array.load().rio.write_crs(grid.crs).rio.write_transform(grid.transform)
        source = source.rio.write_nodata(np.nan, encoded=False)
        target = template.rio.write_crs(fine_grid.crs).rio.write_transform(fine_grid.transform)
        moved = source.rio.reproject_match(target, resampling=Resampling[method], nodata=np.nan)
        moved = moved.drop_vars([c for c in moved.coords if c not in ("band", "y", "x")])
        return moved.astype(np.float32).assign_coords(y=template["y"], x=template["x"])
    if not grid.georeferenced and not fine_grid.georeferenced:
        (h, w), (fh, fw) = grid.shape, fine_grid.shape
        if fh % h == 0 and fw % w == 0 and fh // h == fw // w:
            if resampling != "nearest":
                raise CatalogError(
                    f"{path} is not georeferenced, so it can only be upsampled with 'nearest', not {resampling!r}; "
                    "georeference the files or set resampling: nearest."
                )
            factor = fh // h
            data = array.data
            data = data.repeat(factor, axis=1).repeat(factor, axis=2)
            return xr.DataArray(data, dims=array.dims, coords={"band": array["band"], "y": template["y"], "x": template["x"]})
    raise CatalogError(
        f"coarse file {path} cannot be put on the fine grid: {grid.describe()} vs fine {fine_grid.describe()}; "
        "georeference both (same or reprojectable CRS) or give the coarse file the fine file's shape."
    )


def _stack(
    images: Mapping[np.datetime64, xr.DataArray],
    template: xr.DataArray,
    chunks: Mapping[str, int] | None,
) -> xr.DataArray:
    """``(time, band, y, x)`` from per-date images (Dask-backed, one chunk per date, when ``chunks``)."""
    times = np.array(sorted(images), dtype="datetime64[ns]")
    layers = [images[t].data for t in times]
    if chunks is not None:
        spatial = (-1, chunks.get("y", -1), chunks.get("x", -1))
        stacked = da.stack([da.asarray(layer).rechunk(spatial) for layer in layers])
    else:
        stacked = np.stack([np.asarray(layer) for layer in layers])
    return xr.DataArray(
        stacked,
        dims=DIMS,
        coords={"time": times, "band": template["band"].values, "y": template["y"].values, "x": template["x"].values},
    )


def _check_values(
    stacks: Mapping[str, xr.DataArray],
    paths: Mapping[str, Mapping[np.datetime64, Path]],
    sensors: Mapping[str, Sensor],
) -> dict[str, np.ndarray]:
    """One pass over every stack: valid fraction per date; error for values outside the sensor's range."""
    stats = {}
    for role, stack in stacks.items():
        lo, hi = sensors[role].valid_range
        valid = stack.notnull()
        outside = valid & ((stack < lo) | (stack > hi))
        dims = ("band", "y", "x")
        stats[role] = (valid.sum(dims), outside.sum(dims), stack.min(dims), stack.max(dims))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN dates have no min/max
        (computed,) = dask.compute(stats)
    fractions = {}
    for role, (n_valid, n_outside, vmin, vmax) in computed.items():
        sensor = sensors[role]
        for i, t in enumerate(stacks[role]["time"].values):
            n, bad = int(n_valid[i]), int(n_outside[i])
            if n and bad > MAX_OUT_OF_RANGE * n:
                top = float(vmax[i])
                hint = (
                    "values look like reflectance x 10000: set scale 1.0e-4"
                    if top > 100 * sensor.valid_range[1]
                    else "check the sensor's scale, offset and nodata value"
                )
                raise CatalogError(
                    f"{paths[role][t]}: after scale {sensor.scale:g} and offset {sensor.offset:g}, {bad / n:.1%} "
                    f"of valid values lie outside {sensor.valid_range} (min {float(vmin[i]):.4g}, max {top:.4g}); {hint}."
                )
        fractions[role] = np.asarray(n_valid, dtype=np.float64) / np.prod(stacks[role].shape[1:])
    return fractions


def ingest(
    fine: Mapping[Any, PathLike] | Sequence[PathLike],
    coarse: Mapping[Any, PathLike] | Sequence[PathLike],
    *,
    bands: Sequence[str],
    fine_sensor: str | Sensor,
    coarse_sensor: str | Sensor,
    truth: Mapping[Any, PathLike] | Sequence[PathLike] | None = None,
    date_pattern: DatePattern | None = None,
    coarse_factor: int | None = None,
    resampling: str = "nearest",
    pixel_size: float = 30.0,
    chunks: Mapping[str, int] | None = DEFAULT_CHUNKS,
    attrs: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """Read fine and coarse raster files (GeoTIFF, ENVI...) into a validated cube.

    Parameters
    ----------
    fine, coarse : mapping of date -> path, or sequence of paths
        Fine (e.g. Landsat) and coarse (e.g. MODIS) files. With a sequence, each file's date is
        read from its path by ``date_pattern``.
    bands : sequence of str
        Cube band names, in cube order; each must be a band of both sensors.
    fine_sensor, coarse_sensor : str or Sensor
        How to read each sensor (a name from :data:`SENSORS` or a :class:`Sensor`).
    truth : mapping or sequence, optional
        Held-out fine images (fine sensor) for evaluation; they go into ``fine_truth`` and
        ``fine`` stays NaN at their dates unless a fine file is given for the same date.
    date_pattern : DatePattern, optional
        Reads dates from paths given as sequences.
    coarse_factor : int, optional
        Native coarse pixel size in fine pixels (cube attr).
    resampling : {"nearest", "bilinear", "cubic", "average"}, default "nearest"
        How coarse images at native resolution are put on the fine grid. A source finer than
        the fine grid (downsampling) always uses ``average``.
    pixel_size : float, default 30.0
        Nominal pixel size for files without georeferencing.
    chunks : mapping, optional
        Dask chunks of ``y``/``x`` (default 512×512, lazy); ``None`` loads everything into NumPy.
    attrs : mapping, optional
        Extra cube attrs.

    Returns
    -------
    xarray.Dataset
        A validated cube: ``fine``, ``coarse`` (and ``fine_truth`` with the fine files and the
        truth files together), per-date coords ``fine_valid``/``coarse_valid``, CRS when the
        files have one.

    Raises
    ------
    CatalogError
        Missing or unreadable file, files of one sensor on different grids, a coarse file that
        cannot be put on the fine grid, an unknown band, or values far outside the sensor's
        valid range after scaling (a wrong scale factor).

    Examples
    --------
    >>> cube = stf.ingest(
    ...     {"2001-05-24": "LT05_20010524.tif"},
    ...     {"2001-05-24": "MOD09GA_A2001144.tif", "2001-07-11": "MOD09GA_A2001192.tif"},
    ...     bands=["red", "nir"], fine_sensor="landsat_sr", coarse_sensor="mod09ga", coarse_factor=16,
    ... )  # doctest: +SKIP
    """
    if resampling not in RESAMPLING:
        raise CatalogError(f"resampling {resampling!r} is not one of {RESAMPLING}.")
    bands = [str(b) for b in bands]
    if not bands or len(set(bands)) != len(bands):
        raise CatalogError(f"bands must be a non-empty list of unique names, got {bands}.")
    sensors = {"fine": get_sensor(fine_sensor), "coarse": get_sensor(coarse_sensor)}
    sensors["truth"] = sensors["fine"]
    groups = {
        "fine": dated_files(fine, date_pattern=date_pattern, role="fine"),
        "coarse": dated_files(coarse, date_pattern=date_pattern, role="coarse"),
        "truth": dated_files(truth or {}, date_pattern=date_pattern, role="truth"),
    }
    if not groups["fine"]:
        raise CatalogError("no fine files given; a fusion cube needs at least one fine image (a pair date).")
    if not groups["coarse"]:
        raise CatalogError("no coarse files given; a fusion cube needs the coarse image of every date.")
    raw = {role: {path: _open(path, chunks) for path in files.values()} for role, files in groups.items()}
    fine_grid = _check_group({**raw["fine"], **raw["truth"]}, "fine/truth")
    _check_group(raw["coarse"], "coarse")  # one grid; each file is moved onto the fine grid below

    first = next(iter(raw["fine"].values()))
    template = _scaled(first, sensors["fine"], bands, next(iter(raw["fine"])))
    if not fine_grid.georeferenced:
        template = template.assign_coords(_nominal_coords(fine_grid.shape, pixel_size))

    images: dict[str, dict[np.datetime64, xr.DataArray]] = {role: {} for role in groups}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # see _open
        for role, date, path in ((r, d, p) for r, files in groups.items() for d, p in files.items()):
            if role == "coarse":
                grid = _grid_of(raw[role][path])
                # a native-resolution image is small: read it without Dask to resample it
                source = raw[role][path] if _on_fine_grid(grid, fine_grid) else _open(path, None)
                scaled = _onto_fine_grid(
                    _scaled(source, sensors[role], bands, path), grid, fine_grid, template, resampling=resampling, path=path
                )
            else:
                scaled = _scaled(raw[role][path], sensors[role], bands, path)
                scaled = scaled.assign_coords(y=template["y"], x=template["x"])
            images[role][date] = scaled.load() if not isinstance(scaled.data, da.Array) else scaled

    times = np.array(sorted(set().union(*groups.values())), dtype="datetime64[ns]")
    stacks = {role: _stack(images[role], template, chunks) for role in groups if images[role]}
    fractions = _check_values(stacks, groups, sensors)
    for role, stack in stacks.items():
        bounds = sensors[role].clip
        if bounds is not None:
            stack = stack.clip(*bounds)
        stacks[role] = stack.reindex(time=times).astype(np.float32)  # NaN on dates without a file
    data_vars = {"fine": stacks["fine"], "coarse": stacks["coarse"]}
    if "truth" in stacks:
        is_truth = xr.DataArray(np.isin(times, list(groups["truth"])), dims="time", coords={"time": times})
        data_vars["fine_truth"] = xr.where(is_truth, stacks["truth"], stacks["fine"]).astype(np.float32)
    cube = xr.Dataset(data_vars, attrs=dict(attrs or {}))
    for role, sensor in (("fine", sensors["fine"]), ("coarse", sensors["coarse"])):
        cube[role].attrs.update({"units": sensor.units, "sensor": sensor.name})
    if "fine_truth" in cube:
        cube["fine_truth"].attrs.update(
            {"units": sensors["fine"].units, "sensor": sensors["fine"].name, "description": "held-out fine images, for evaluation"}
        )
    valid = {
        role: dict(zip(np.array(sorted(groups[role]), dtype="datetime64[ns]"), fractions[role]))
        for role in ("fine", "coarse")
    }
    cube = cube.assign_coords(
        fine_valid=("time", [valid["fine"].get(t, 0.0) for t in times]),
        coarse_valid=("time", [valid["coarse"].get(t, 0.0) for t in times]),
    )
    if coarse_factor is not None:
        cube.attrs["coarse_factor"] = int(coarse_factor)
    if fine_grid.crs is not None:
        cube = cube.rio.write_crs(fine_grid.crs).rio.write_transform(fine_grid.transform)
    return validate_cube(cube)
