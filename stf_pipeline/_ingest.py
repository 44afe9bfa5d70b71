"""Real files -> cube: GeoTIFF and ENVI rasters read through rasterio/GDAL.

:func:`ingest` reads one group of fine files and one group of coarse files (plus optional
held-out fine ``truth`` files) as their sensors declare them (:mod:`stf_pipeline.sensors`): a
multi-band file per date, or one file per band (Landsat Collection 2 ``*_SR_B4.TIF``, MODIS
``*sur_refl_b01*``) whose sibling files, quality band included, are found by name. It masks
nodata and the pixels the quality band flags to NaN, applies the scale, maps the sensors' bands
onto the cube's band names, puts coarse images at their native resolution and in any CRS onto
the fine grid (``rio.reproject_match``) and returns a cube (DESIGN.md §1) with per-date
``fine_valid``/``coarse_valid`` coords and ``coarse_factor`` derived from the grids.

Files without georeferencing (no CRS, identity transform: the classic ENVI sample data sets) get
a nominal grid of ``pixel_size`` pixels with y decreasing from 0; coarse files of such data
must then be on the fine grid already or an integer factor coarser (nearest upsampling).

Files are read with rasterio: into memory directly (``chunks=None`` or files without
georeferencing), so a one-shot process reading a small scene imports neither rioxarray nor
``dask.array``; lazily, block by block, through ``rioxarray.open_rasterio`` when Dask chunks are
asked for. rioxarray also writes the cube's CRS (``spatial_ref``) and reprojects coarse images.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import xarray as xr
from affine import Affine

from stf_pipeline._dask import is_dask_array
from stf_pipeline.cube import DIMS, validate_cube
from stf_pipeline.exceptions import CatalogError
from stf_pipeline.sensors import AnySensor, DatePattern, QAMask, Sensor, get_sensor
from stf_pipeline.task import iso_date

PathLike = str | os.PathLike[str]
#: what :func:`ingest` takes for one sensor's files
Files = Mapping[Any, PathLike] | Sequence[PathLike] | str
#: resampling names accepted for coarse -> fine reprojection
RESAMPLING: tuple[str, ...] = ("nearest", "bilinear", "cubic", "average")
#: default Dask chunks of an ingested cube (per date, all bands)
DEFAULT_CHUNKS: dict[str, int] = {"y": 512, "x": 512}
#: share of valid pixels allowed outside a sensor's ``valid_range`` before a file is rejected
MAX_OUT_OF_RANGE = 0.001
#: characters that make a file argument a glob pattern
GLOB_CHARS = re.compile(r"[*?\[]")


def _to_date(value: Any, where: str) -> np.datetime64:
    try:
        return pd.Timestamp(value).to_datetime64().astype("datetime64[ns]")
    except (ValueError, TypeError):
        raise CatalogError(f"{where}: cannot read {value!r} as a date; use an ISO date such as 2001-05-24.") from None


@dataclasses.dataclass(frozen=True)
class _Grid:
    shape: tuple[int, int]
    crs: Any
    transform: Any
    georeferenced: bool

    def describe(self) -> str:
        crs = self.crs.to_string() if self.crs is not None else "none"
        return f"shape {self.shape}, CRS {crs}, transform {tuple(round(v, 6) for v in self.transform[:6])}"


@dataclasses.dataclass(frozen=True)
class _Header:
    """What a raster file's header says (read without its pixels)."""

    grid: _Grid
    count: int
    dtype: np.dtype
    #: the file's nodata value (of its first band, as GDAL reports it), None without one
    nodata: float | None
    #: band descriptions ("" where a band has none)
    descriptions: tuple[str, ...]


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[Any]:
    """``path`` open in rasterio, GDAL's "not georeferenced" warning silenced (files without
    georeferencing are expected: they get a nominal grid); errors name the file and the fix."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    if not path.exists():
        raise CatalogError(f"file {path} does not exist; check the catalog's paths and the data root (STF_DATA_ROOT).")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        try:
            src = rasterio.open(path)
        except RasterioIOError as err:
            hint = (
                "this GDAL has no HDF4 driver: save the bands as GeoTIFF (gdal_translate of each subdataset, or "
                "order GeoTIFF from AppEEARS)"
                if path.suffix.lower() in (".hdf", ".h5", ".he5")
                else "is it a GeoTIFF or an ENVI file with its .hdr?"
            )
            raise CatalogError(f"GDAL cannot read {path} ({err}); {hint}") from None
        with src:
            yield src


def _header(path: Path) -> _Header:
    """The grid, band count, data type, nodata and band descriptions of a raster file."""
    with _opened(path) as src:
        transform = src.transform
        if src.subdatasets or src.count == 0:
            raise CatalogError(
                f"{path} holds subdatasets ({len(src.subdatasets)}), not bands; save each band as a GeoTIFF "
                "(gdal_translate of each subdataset) and give those files."
            )
        if transform.b != 0 or transform.d != 0:  # rotated or sheared, a right angle included
            raise CatalogError(
                f"{path} is on a rotated grid ({transform}); warp it onto a north-up grid first "
                "(gdalwarp without -tr keeps its resolution)."
            )
        return _Header(
            grid=_Grid(
                shape=(int(src.height), int(src.width)),
                crs=src.crs,
                transform=transform,
                georeferenced=src.crs is not None or not transform.is_identity,
            ),
            count=int(src.count),
            dtype=np.dtype(src.dtypes[0]),
            nodata=src.nodata,
            descriptions=tuple(str(d or "") for d in src.descriptions),
        )


def _read(path: Path, header: _Header, indexes: Sequence[int], chunks: Mapping[str, int] | None) -> Any:
    """Bands ``indexes`` (0-based) of a file as stored, ``(band, y, x)``: a Dask array of ``chunks`` for a
    georeferenced file when ``chunks`` are given (read lazily, block by block, through rioxarray), else
    NumPy read now by rasterio (files without georeferencing are small classic samples)."""
    if chunks is not None and header.grid.georeferenced:
        import rioxarray

        lazy = rioxarray.open_rasterio(path, chunks={"band": -1, **chunks}, masked=False, lock=False)
        return cast(xr.DataArray, lazy).data[list(indexes)]
    with _opened(path) as src:
        return src.read([i + 1 for i in indexes])


def _pixel_centres(grid: _Grid) -> dict[str, np.ndarray]:
    """``y``/``x`` coordinates of the pixel centres of a north-up grid, as rioxarray computes them."""
    (rows, cols), centre = grid.shape, grid.transform @ Affine.translation(0.5, 0.5)
    x, _ = centre @ (np.arange(cols), np.zeros(cols))
    _, y = centre @ (np.zeros(rows), np.arange(rows))
    return {"y": np.asarray(y, dtype=np.float64), "x": np.asarray(x, dtype=np.float64)}


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


def _scale_block(raw: np.ndarray, *, nodata: tuple[float | None, ...], scale: float, offset: float) -> np.ndarray:
    """``raw * scale + offset`` as float32, NaN where ``raw`` (band, y, x) is its band's nodata or not finite."""
    values = raw.astype(np.float64) * scale + offset
    invalid = ~np.isfinite(values)
    for i, value in enumerate(nodata):
        if value is not None:
            invalid[i] |= raw[i] == np.asarray(value).astype(raw.dtype)
    values[invalid] = np.nan
    return values.astype(np.float32)


def _nominal_coords(shape: tuple[int, int], pixel_size: float) -> dict[str, np.ndarray]:
    rows, cols = shape
    return {
        "y": -(np.arange(rows) + 0.5) * pixel_size,
        "x": (np.arange(cols) + 0.5) * pixel_size,
    }


def _check_group(firsts: Sequence[tuple[Path, _Grid]], role: str) -> _Grid:
    """The one grid of a sensor's files (each scene's first band file); an error names two that disagree."""
    (first_path, first), *rest = firsts
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
        import rioxarray  # noqa: F401  (registers .rio)
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
            return xr.DataArray(
                data, dims=array.dims, coords={"band": array["band"], "y": template["y"], "x": template["x"]}
            )
    raise CatalogError(
        f"coarse file {path} cannot be put on the fine grid: {grid.describe()} vs fine {fine_grid.describe()}; "
        "georeference both (same or reprojectable CRS) or give the coarse file the fine file's shape."
    )


def _expand(files: Files | None, role: str) -> Mapping[Any, PathLike] | list[Path]:
    """A mapping as given; a glob (or a sequence of paths and globs) -> the sorted list of matching paths."""
    if files is None:
        return {}
    if isinstance(files, Mapping):
        return files
    items = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    out: list[Path] = []
    for item in items:
        text = os.fspath(item)
        if GLOB_CHARS.search(text):
            found = sorted(glob.glob(os.path.expanduser(text)))
            if not found:
                raise CatalogError(f"{role}: {text!r} matches no file; check the pattern and the folder it names.")
            out.extend(Path(f) for f in found)
        else:
            out.append(Path(text))
    return out


def _token(asset: str) -> re.Pattern[str]:
    """``asset`` as a whole word of a file name or band description (``SR_B1`` matches ``x_SR_B1.TIF``,
    not ``x_SR_B10``)."""
    return re.compile(rf"(?<![A-Za-z0-9]){re.escape(asset)}(?![A-Za-z0-9])")


@dataclasses.dataclass(frozen=True)
class _Scene:
    """One date of one sensor: a multi-band ``path``, or single-band ``files`` by asset name."""

    date: np.datetime64
    sensor: Sensor
    path: Path | None = None
    files: tuple[tuple[str, Path], ...] = ()

    @property
    def first(self) -> Path:
        """The file that names the scene in messages (and whose grid is the scene's grid)."""
        return self.path if self.path is not None else self.files[0][1]

    def file(self, asset: str) -> Path | None:
        """The single-band file of ``asset``: given, or its sibling named like a given file."""
        found = dict(self.files)
        if asset in found:
            return found[asset]
        for known, path in self.files:
            sibling = path.with_name(_token(known).sub(asset.replace("\\", r"\\"), path.name, count=1))
            for candidate in (sibling, sibling.with_suffix(sibling.suffix.swapcase())):
                if candidate.is_file():
                    return candidate
        return None


def _per_band_asset(sensor: Sensor, path: Path) -> str | None:
    """The asset whose name is a word of ``path``'s file name (a single-band file), else None."""
    if not sensor.assets:
        return None
    names = [a for _, a in sensor.asset_pairs]
    if sensor.qa is not None:
        names += sensor.qa.asset_names
    for asset in sorted(names, key=len, reverse=True):
        if _token(asset).search(path.name):
            return asset
    return None


def _scenes(
    files: Files | None,
    sensor: AnySensor,
    *,
    date_pattern: DatePattern | None,
    role: str,
) -> dict[np.datetime64, _Scene]:
    """Group a sensor's files into one scene per date (dates given, or read from the file names)."""
    given = _expand(files, role)
    pairs: list[tuple[np.datetime64, Path]] = []
    if isinstance(given, Mapping):
        pairs = [(_to_date(date, role), Path(path)) for date, path in given.items()]
    else:
        for path in given:
            pattern = date_pattern or sensor.for_file(path).date
            if pattern is None:
                raise CatalogError(
                    f"{role}: cannot tell the date of {path}: sensor {sensor.name!r} declares no date pattern; "
                    "pass {date: path}, a date_pattern (stf ingest --date-regex/--date-format) or a sensor preset."
                )
            pairs.append((pattern.parse(path), path))
    grouped: dict[np.datetime64, dict[str, Any]] = {}
    for date, path in sorted(pairs, key=lambda p: (p[0], str(p[1]))):
        member = sensor.for_file(path)
        asset = _per_band_asset(member, path)
        entry = grouped.setdefault(date, {"sensor": member, "path": None, "files": {}})
        other = entry["path"] or next(iter(entry["files"].values()), None)
        if other is not None and (
            entry["sensor"] != member or asset is None or entry["path"] is not None or asset in entry["files"]
        ):
            raise CatalogError(f"{role}: two files for {iso_date(date)}: {other} and {path}; keep one per date.")
        if asset is None:
            entry["path"] = path
        else:
            entry["files"][asset] = path
    return {
        date: _Scene(date, e["sensor"], e["path"], tuple(e["files"].items())) for date, e in sorted(grouped.items())
    }


def _band_data(
    scene: _Scene, bands: Sequence[str], chunks: Mapping[str, int] | None
) -> tuple[xr.DataArray, list[float | None], _Grid]:
    """The stored values of ``bands`` of a scene, ``(band, y, x)`` on the scene's grid, band coords = cube
    names; with each band's file nodata and the scene's grid."""
    sensor = scene.sensor
    if scene.path is not None:
        header = _header(scene.path)
        if sensor.bands and header.count == len(sensor.bands):
            indexes = [sensor.band_index(b) for b in bands]
        elif sensor.assets:
            indexes = [_described_band(header, sensor.asset(b), scene.path, sensor) for b in bands]
        else:
            raise CatalogError(
                f"{scene.path} has {header.count} band(s) but sensor {sensor.name!r} declares {len(sensor.bands)} "
                f"({list(sensor.bands)}); fix the sensor's band list."
            )
        data = _read(scene.path, header, indexes, chunks)
        nodata = [header.nodata] * len(bands)
        grid = header.grid
    else:
        layers, nodata, first = [], [], None
        for band in bands:
            path = _required_file(scene, sensor.asset(band), f"band {band!r}")
            header = _header(path)
            if header.count != 1:
                raise CatalogError(f"{path} has {header.count} bands; a file named for one band must hold one band.")
            if first is not None and not _same_grid(first, header.grid):
                raise CatalogError(
                    f"{path} disagrees with {scene.first} of the same scene: {header.grid.describe()} vs "
                    f"{first.describe()}; the bands of a scene must share one grid (resample them first)."
                )
            first = first or header.grid
            layers.append(_read(path, header, [0], chunks))
            nodata.append(header.nodata)
        grid = cast(_Grid, first)
        if any(is_dask_array(layer) for layer in layers):
            import dask.array as da

            data = da.concatenate(layers, axis=0).rechunk({0: -1})
        else:
            data = np.concatenate(layers, axis=0)
    coords = {"band": list(bands), **_pixel_centres(grid)}
    return xr.DataArray(data, dims=("band", "y", "x"), coords=coords), nodata, grid


def _described_band(header: _Header, asset: str, path: Path, sensor: Sensor) -> int:
    """Position of the band of a multi-band file whose description names ``asset``."""
    for i, text in enumerate(header.descriptions):
        if _token(asset).search(text):
            return i
    raise CatalogError(
        f"{path} has {header.count} band(s) but sensor {sensor.name!r} declares {len(sensor.bands)} "
        f"({list(sensor.bands)}) and no band is described {asset!r}; fix the sensor's band list or give one file "
        "per band."
    )


def _required_file(scene: _Scene, asset: str, what: str) -> Path:
    path = scene.file(asset)
    if path is None:
        known, first = scene.files[0]
        expected = first.with_name(_token(known).sub(asset, first.name, count=1))
        raise CatalogError(
            f"{scene.sensor.name} scene of {iso_date(scene.date)}: no file for {what} ({asset!r}): expected {expected} "
            f"beside {first.name}; put the product's {asset} file there or choose other bands."
        )
    return path


def _quality(scene: _Scene, bands: Sequence[str], grid: _Grid, chunks: Mapping[str, int] | None) -> xr.DataArray:
    """Boolean ``(band, y, x)`` on the scene's ``grid``: where the quality band marks a pixel bad."""
    qa: QAMask = scene.sensor.qa  # type: ignore[assignment]
    per_asset: dict[str, xr.DataArray] = {}
    layers = []
    for band in bands:
        asset = qa.asset_for(band)
        if asset not in per_asset:
            per_asset[asset] = _bad_pixels(scene, asset, qa, grid, chunks)
        layers.append(per_asset[asset])
    return xr.concat(layers, dim="band", join="override", coords="minimal", compat="override").assign_coords(
        band=list(bands)
    )


def _bad_pixels(scene: _Scene, asset: str, qa: QAMask, grid: _Grid, chunks: Mapping[str, int] | None) -> xr.DataArray:
    hint = (
        f"put the product's {asset} file beside its bands, or pass mask=False (stf ingest --no-mask) "
        "to ingest without the quality mask"
    )
    if scene.path is not None:
        header = _header(scene.path)
        try:
            index = _described_band(header, asset, scene.path, scene.sensor)
        except CatalogError:
            raise CatalogError(
                f"{scene.path}: no quality band {asset!r} (no band of the file is described so); {hint}."
            ) from None
        data = _read(scene.path, header, [index], chunks)[0]
    else:
        path = scene.file(asset)
        if path is None:
            known, first = scene.files[0]
            expected = first.with_name(_token(known).sub(asset, first.name, count=1))
            raise CatalogError(f"{first}: its quality band {asset!r} is missing: expected {expected}; {hint}.")
        header = _header(path)
        data = _read(path, header, [0], chunks)[0]
    if is_dask_array(data):
        if qa.dilation:
            bad = data.map_overlap(qa.bad, depth=qa.dilation, boundary="none", dtype=bool)
        else:
            bad = data.map_blocks(qa.bad, dtype=bool)
    else:
        bad = qa.bad(np.asarray(data))
    if not _same_grid(header.grid, grid):
        bad = _nearest_onto(np.asarray(bad), header.grid, grid, scene.file(asset) or scene.first)
    return xr.DataArray(bad, dims=("y", "x"))


def _nearest_onto(bad: np.ndarray, source: _Grid, target: _Grid, path: Path) -> np.ndarray:
    """A quality mask on another grid (MODIS 1 km state on 500 m bands) onto ``target``; outside it: bad."""
    from rasterio.enums import Resampling
    from rasterio.warp import reproject

    if source.crs is None or target.crs is None:
        raise CatalogError(
            f"quality band {path} is on another grid than its bands ({source.describe()} vs {target.describe()}) "
            "and not georeferenced; give it the bands' grid."
        )
    out = np.ones(target.shape, dtype=np.uint8)
    reproject(
        bad.astype(np.uint8),
        out,
        src_transform=source.transform,
        src_crs=source.crs,
        dst_transform=target.transform,
        dst_crs=target.crs,
        resampling=Resampling.nearest,
        dst_nodata=1,
    )
    return out.astype(bool)


def _read_scene(scene: _Scene, bands: Sequence[str], chunks: Mapping[str, int] | None, *, mask: bool) -> xr.DataArray:
    """A scene's ``bands`` as float32 reflectance ``(band, y, x)`` on its own grid, NaN for nodata and flagged
    pixels."""
    sensor = scene.sensor
    data, file_nodata, grid = _band_data(scene, bands, chunks)
    nodata = [sensor.nodata if sensor.nodata is not None else n for n in file_nodata]
    nodata = [n if n is not None and _representable(n, data.dtype) else None for n in nodata]
    scaled = xr.apply_ufunc(
        _scale_block,
        data,
        kwargs={"nodata": tuple(nodata), "scale": sensor.scale, "offset": sensor.offset},
        dask="parallelized",
        output_dtypes=[np.float32],
    )
    if mask and sensor.qa is not None:
        bad = _quality(scene, bands, grid, chunks)
        scaled = scaled.where(~bad.assign_coords(y=scaled["y"], x=scaled["x"]).data)
    scaled.attrs = {}
    return scaled


def _stack(
    images: Mapping[np.datetime64, xr.DataArray],
    template: xr.DataArray,
    chunks: Mapping[str, int] | None,
) -> xr.DataArray:
    """``(time, band, y, x)`` from per-date images (Dask-backed, one chunk per date, when ``chunks``)."""
    times = np.array(sorted(images), dtype="datetime64[ns]")
    layers = [images[t].data for t in times]
    if chunks is not None:
        import dask.array as da

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
    paths: Mapping[str, Mapping[np.datetime64, Any]],
    sensors: Mapping[str, Sensor],
) -> dict[str, np.ndarray]:
    """One pass over every stack: valid fraction per date; error for values outside the sensor's range, naming
    the file (``paths``: what names each date's image in messages)."""
    stats = {}
    for role, stack in stacks.items():
        lo, hi = sensors[role].valid_range
        valid = stack.notnull()
        outside = valid & ((stack < lo) | (stack > hi))
        dims = ("band", "y", "x")
        stats[role] = (valid.sum(dims), outside.sum(dims), stack.min(dims), stack.max(dims))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN dates have no min/max
        if any(is_dask_array(a.data) for values in stats.values() for a in values):
            import dask

            from stf_pipeline.parallel import local_scheduler

            (computed,) = dask.compute(stats, scheduler=local_scheduler())
        else:
            computed = stats
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
                    f"of valid values lie outside {sensor.valid_range} (min {float(vmin[i]):.4g}, "
                    f"max {top:.4g}); {hint}."
                )
        fractions[role] = np.asarray(n_valid, dtype=np.float64) / np.prod(stacks[role].shape[1:])
    return fractions


def common_bands(fine_sensor: str | AnySensor, coarse_sensor: str | AnySensor) -> list[str]:
    """The cube bands both sensors provide, in the fine sensor's order (the default of :func:`ingest`)."""
    coarse = set(get_sensor(coarse_sensor).cube_bands)
    return [b for b in get_sensor(fine_sensor).cube_bands if b in coarse]


def _scene_grid(scene: _Scene, bands: Sequence[str]) -> tuple[Path, _Grid]:
    """The file of a scene's first band and its grid."""
    path = scene.path or _required_file(scene, scene.sensor.asset(bands[0]), f"band {bands[0]!r}")
    return path, _header(path).grid


def _bounds(grid: _Grid) -> tuple[float, float, float, float]:
    from rasterio.transform import array_bounds

    south_north = array_bounds(grid.shape[0], grid.shape[1], grid.transform)
    return south_north[0], south_north[1], south_north[2], south_north[3]  # west, south, east, north


def _check_covers(path: Path, grid: _Grid, fine_grid: _Grid) -> None:
    """A coarse image must cover the fine grid (to within half a coarse pixel)."""
    from rasterio.warp import transform_bounds

    if grid.crs is None or fine_grid.crs is None:
        return
    west, south, east, north = transform_bounds(fine_grid.crs, grid.crs, *_bounds(fine_grid), densify_pts=21)
    cw, cs, ce, cn = _bounds(grid)
    tol = 0.5 * max(abs(grid.transform.a), abs(grid.transform.e))
    if west < cw - tol or east > ce + tol or south < cs - tol or north > cn + tol:
        raise CatalogError(
            f"coarse file {path} does not cover the fine grid: the fine area spans x {west:.1f}..{east:.1f}, "
            f"y {south:.1f}..{north:.1f} in its CRS but it holds x {cw:.1f}..{ce:.1f}, y {cs:.1f}..{cn:.1f}; "
            "use the coarse tile(s) that contain the fine area (mosaic them first) or crop the fine files to it."
        )


def _derived_factor(grid: _Grid, fine_grid: _Grid) -> int:
    """Native coarse pixel size in fine pixels: the square root of the area, in the fine CRS, of the
    coarse pixel at the centre of the coarse grid (MODIS sinusoidal pixels are sheared in UTM)."""
    if not grid.georeferenced:
        return max(1, round(fine_grid.shape[0] / grid.shape[0]))
    row, col = grid.shape[0] // 2, grid.shape[1] // 2
    corners = [grid.transform * (col + dc, row + dr) for dc, dr in ((0, 0), (1, 0), (1, 1), (0, 1))]
    xs, ys = np.array([c[0] for c in corners]), np.array([c[1] for c in corners])
    if grid.crs is not None and fine_grid.crs is not None and grid.crs != fine_grid.crs:
        from rasterio.warp import transform

        xs, ys = map(np.asarray, transform(grid.crs, fine_grid.crs, xs, ys))
    area = 0.5 * abs(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1)))  # shoelace
    fine_area = abs(fine_grid.transform.a * fine_grid.transform.e)
    return max(1, round(float(np.sqrt(area / fine_area))))


def ingest(
    fine: Files,
    coarse: Files,
    *,
    fine_sensor: str | AnySensor,
    coarse_sensor: str | AnySensor,
    bands: Sequence[str] | None = None,
    truth: Files | None = None,
    date_pattern: DatePattern | None = None,
    coarse_factor: int | None = None,
    resampling: str = "nearest",
    mask: bool = True,
    pixel_size: float = 30.0,
    chunks: Mapping[str, int] | None = DEFAULT_CHUNKS,
    attrs: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """Read fine and coarse raster files (GeoTIFF, ENVI...) into a validated cube.

    Parameters
    ----------
    fine, coarse : mapping of date -> path, sequence of paths, or a glob
        Fine (e.g. Landsat) and coarse (e.g. MODIS) files. With paths or a glob (``"LC08*_SR_B*.TIF"``)
        each file's date is read from its name (``date_pattern``, else the sensor's). Products
        shipped as one file per band may be given by any one band file: the other bands and the
        quality band are found beside it by name.
    fine_sensor, coarse_sensor : str, Sensor or SensorFamily
        How to read each sensor (a preset name from :data:`stf_pipeline.sensors.SENSORS`, e.g.
        ``"landsat_c2_l2"``, ``"mod09ga"``, or a declared :class:`~stf_pipeline.sensors.Sensor`).
        ``sensor.with_mask(use, dilation=...)`` chooses the quality rules.
    bands : sequence of str, optional
        Cube band names, in cube order; default: every band both sensors provide.
    truth : mapping, sequence or glob, optional
        Held-out fine images (fine sensor) for evaluation; they go into ``fine_truth`` and
        ``fine`` stays NaN at their dates unless a fine file is given for the same date.
    date_pattern : DatePattern, optional
        Reads dates from file names instead of the sensors' own patterns.
    coarse_factor : int, optional
        Native coarse pixel size in fine pixels (cube attr); default: derived from the grids
        when the coarse files are at their native resolution.
    resampling : {"nearest", "bilinear", "cubic", "average"}, default "nearest"
        How coarse images at native resolution are put on the fine grid. A source finer than
        the fine grid (downsampling) always uses ``average``.
    mask : bool, default True
        Mask the pixels each sensor's quality band flags (its ``qa`` rules); False ignores
        quality bands.
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
        Missing or unreadable file or quality band, a date that cannot be read, files of one
        sensor on different grids, a coarse file that does not cover or cannot be put on the
        fine grid, an unknown band, or values far outside the sensor's valid range after
        scaling (a wrong scale factor).

    Examples
    --------
    >>> cube = stf.ingest("LC08*_SR_B*.TIF", "MOD09GA*.tif", fine_sensor="landsat_c2_l2",
    ...                   coarse_sensor="mod09ga")  # doctest: +SKIP
    """
    if resampling not in RESAMPLING:
        raise CatalogError(f"resampling {resampling!r} is not one of {RESAMPLING}.")
    sensors = {"fine": get_sensor(fine_sensor), "coarse": get_sensor(coarse_sensor)}
    sensors["truth"] = sensors["fine"]
    bands = common_bands(sensors["fine"], sensors["coarse"]) if bands is None else [str(b) for b in bands]
    if not bands or len(set(bands)) != len(bands):
        raise CatalogError(f"bands must be a non-empty list of unique names, got {bands}.")
    groups = {
        role: _scenes(files, sensors[role], date_pattern=date_pattern, role=role)
        for role, files in (("fine", fine), ("coarse", coarse), ("truth", truth))
    }
    if not groups["fine"]:
        raise CatalogError("no fine files given; a fusion cube needs at least one fine image (a pair date).")
    if not groups["coarse"]:
        raise CatalogError("no coarse files given; a fusion cube needs the coarse image of every date.")
    firsts = {role: {date: _scene_grid(scene, bands) for date, scene in g.items()} for role, g in groups.items()}
    fine_grid = _check_group([*firsts["fine"].values(), *firsts["truth"].values()], "fine/truth")
    coarse_grid = _check_group(list(firsts["coarse"].values()), "coarse")
    on_fine = _on_fine_grid(coarse_grid, fine_grid)
    if not on_fine:
        for path, _ in firsts["coarse"].values():
            _check_covers(path, coarse_grid, fine_grid)

    images: dict[str, dict[np.datetime64, xr.DataArray]] = {role: {} for role in groups}
    template: xr.DataArray | None = None
    for role in ("fine", "truth", "coarse"):
        for date, scene in groups[role].items():
            path = firsts[role][date][0]
            if role != "coarse":
                image = _read_scene(scene, bands, chunks, mask=mask)
                if template is None:
                    template = image
                    if not fine_grid.georeferenced:
                        template = template.assign_coords(_nominal_coords(fine_grid.shape, pixel_size))
                image = image.assign_coords(y=template["y"], x=template["x"])
            else:
                # a native-resolution image is small: read it without Dask to resample it
                image = _read_scene(scene, bands, chunks if on_fine else None, mask=mask)
                image = _onto_fine_grid(
                    image, coarse_grid, fine_grid, cast(xr.DataArray, template), resampling=resampling, path=path
                )
            images[role][date] = image if is_dask_array(image.data) else image.load()
    paths = {role: {date: first[0] for date, first in f.items()} for role, f in firsts.items()}
    times = np.array(sorted(set().union(*groups.values())), dtype="datetime64[ns]")
    stacks = {role: _stack(images[role], cast(xr.DataArray, template), chunks) for role in groups if images[role]}
    readers = {role: next(iter(g.values())).sensor for role, g in groups.items() if g}
    fractions = _check_values(stacks, paths, readers)
    for role, stack in stacks.items():
        bounds = _clip_of(groups[role])
        if bounds is not None:
            stack = stack.clip(*bounds)
        stacks[role] = stack.reindex(time=times).astype(np.float32)  # NaN on dates without a file
    data_vars = {"fine": stacks["fine"], "coarse": stacks["coarse"]}
    if "truth" in stacks:
        is_truth = xr.DataArray(np.isin(times, list(groups["truth"])), dims="time", coords={"time": times})
        data_vars["fine_truth"] = xr.where(is_truth, stacks["truth"], stacks["fine"]).astype(np.float32)
    cube = xr.Dataset(data_vars, attrs=dict(attrs or {}))
    for name, role in (("fine", "fine"), ("coarse", "coarse"), ("fine_truth", "fine")):
        if name in cube:
            cube[name].attrs.update(_provenance(sensors[role], groups[role] or groups["fine"], mask))
    if "fine_truth" in cube:
        cube["fine_truth"].attrs["description"] = "held-out fine images, for evaluation"
    valid = {
        role: dict(zip(np.array(sorted(groups[role]), dtype="datetime64[ns]"), fractions[role], strict=True))
        for role in ("fine", "coarse")
    }
    cube = cube.assign_coords(
        fine_valid=("time", [valid["fine"].get(t, 0.0) for t in times]),
        coarse_valid=("time", [valid["coarse"].get(t, 0.0) for t in times]),
    )
    if coarse_factor is None and not on_fine:
        coarse_factor = _derived_factor(coarse_grid, fine_grid)
    if coarse_factor is not None:
        cube.attrs["coarse_factor"] = int(coarse_factor)
    if fine_grid.crs is not None:
        import rioxarray  # noqa: F401  (registers .rio)

        cube = cube.rio.write_crs(fine_grid.crs).rio.write_transform(fine_grid.transform)
    return validate_cube(cube)


def _clip_of(scenes: Mapping[np.datetime64, _Scene]) -> tuple[float, float] | None:
    """The clip range of a group's sensor(s) (the members of a family share it)."""
    clips = {scene.sensor.clip for scene in scenes.values()}
    if len(clips) > 1:
        raise CatalogError(
            f"the sensors {sorted({s.sensor.name for s in scenes.values()})} clip differently; "
            "give them one clip range."
        )
    return clips.pop() if clips else None


def _provenance(sensor: AnySensor, scenes: Mapping[np.datetime64, _Scene], mask: bool) -> dict[str, str]:
    """Variable attrs: units, sensor name(s) and the quality rules applied."""
    members = sorted({scene.sensor.name for scene in scenes.values()}) or [sensor.name]
    out = {"units": next(iter(scenes.values())).sensor.units if scenes else "reflectance", "sensor": ", ".join(members)}
    rules = {
        f"{s.sensor.qa.asset if isinstance(s.sensor.qa.asset, str) else 'per-band quality'}: "
        f"{', '.join(s.sensor.qa.use or ())} (dilation {s.sensor.qa.dilation} px)"
        for s in scenes.values()
        if mask and s.sensor.qa is not None
    }
    if rules:
        out["quality_mask"] = "; ".join(sorted(rules))
    return out
