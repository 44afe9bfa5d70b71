"""Results out: fused images as Cloud-Optimized GeoTIFFs, one file per date.

:func:`to_geotiff` writes one image ``(band, y, x)`` (a prediction of :func:`stf_pipeline.fuse`,
or one date of a cube) as a COG through GDAL's COG driver: the CRS and transform of the cube,
one band per cube band with the band name as its description, a nodata value, and the values as
float32 reflectance or as int16 reflectance x 10000 with GDAL scale/offset (so
``rioxarray.open_rasterio(..., mask_and_scale=True)`` and QGIS read reflectance back). The file
is written beside its destination and renamed into place, so a destination never holds a
half-written file. :func:`export` writes the dates of a fused store (``stf.fuse_series``) or of
any cube, and ``stf export`` is the command for it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from affine import Affine

from stf_pipeline._dask import is_dask_array
from stf_pipeline.exceptions import StoreError

PathLike = str | os.PathLike[str]
#: output value types: float32 reflectance, or int16 reflectance x 10000 (scale 1e-4)
DTYPES: tuple[str, ...] = ("float32", "int16")
INT16_SCALE = 1e-4
INT16_NODATA = -32768
FORMATS: tuple[str, ...] = ("cog",)


#: where rioxarray looks for an image's CRS and cached transform: a grid-mapping coordinate (named by
#: the ``grid_mapping`` attr or encoding, ``spatial_ref`` by default) or ``crs``/``transform`` attrs
_GEOREFERENCING_ATTRS = ("grid_mapping", "crs", "transform")


def _carries_georeferencing(image: xr.DataArray) -> bool:
    """Whether rioxarray could find a CRS or a transform on ``image`` (else its coords are all there is)."""
    return (
        "spatial_ref" in image.coords
        or "grid_mapping" in image.encoding
        or any(key in image.attrs for key in _GEOREFERENCING_ATTRS)
    )


def _transform_from_coords(image: xr.DataArray) -> Affine:
    """The affine transform of evenly spaced ``x``/``y`` pixel-centre coords (at least 2 x 2): rioxarray's
    ``rio.transform(recalc=True)`` for an image that carries no georeferencing of its own."""
    left, right = float(image["x"][0]), float(image["x"][-1])
    top, bottom = float(image["y"][0]), float(image["y"][-1])
    res_x = (right - left) / (image.sizes["x"] - 1)
    res_y = (bottom - top) / (image.sizes["y"] - 1)
    return Affine(res_x, 0.0, left - res_x / 2.0, 0.0, res_y, top - res_y / 2.0)


def _georeferencing(image: xr.DataArray, crs: Any | None) -> tuple[Any, Any]:
    """CRS and affine transform of an image: from rioxarray when the image carries georeferencing
    (``spatial_ref``), else ``crs`` and the transform of its coords (without importing rioxarray)."""
    georeferenced = _carries_georeferencing(image)
    if crs is None and georeferenced:
        crs = image.rio.crs
    if crs is None:
        raise StoreError(
            "the image has no CRS, so a GeoTIFF of it would not be georeferenced; pass crs= (e.g. 'EPSG:32633') "
            "or write one on the cube with cube.rio.write_crs(...)."
        )
    if image.sizes["x"] < 2 or image.sizes["y"] < 2:
        raise StoreError(
            f"the image is {image.sizes['y']} x {image.sizes['x']} pixels; a GeoTIFF needs at least 2 x 2."
        )
    return crs, image.rio.transform(recalc=True) if georeferenced else _transform_from_coords(image)


def _encoded(values: np.ndarray, dtype: str) -> np.ndarray:
    """Reflectance as stored in the file: float32 (NaN stays NaN), or int16 x 10000 with NaN as INT16_NODATA."""
    if dtype == "float32":
        return values.astype(np.float32)
    scaled = np.round(values.astype(np.float64) / INT16_SCALE)
    finite = np.isfinite(scaled)
    scaled = np.clip(np.where(finite, scaled, INT16_NODATA), INT16_NODATA + 1, np.iinfo(np.int16).max)
    return np.where(finite, scaled, INT16_NODATA).astype(np.int16)


def to_geotiff(
    image: xr.DataArray,
    path: PathLike,
    *,
    dtype: str = "float32",
    crs: Any | None = None,
    overwrite: bool = False,
    blocksize: int = 512,
    compress: str = "DEFLATE",
    tags: dict[str, Any] | None = None,
) -> Path:
    """Write one image as a Cloud-Optimized GeoTIFF, atomically.

    Parameters
    ----------
    image : xarray.DataArray
        ``(band, y, x)`` reflectance (a prediction, or ``cube.fine.sel(time=...)``); a
        ``(time, band, y, x)`` array with one date is accepted. NumPy or Dask (computed here).
    path : path-like
        Destination ``.tif``.
    dtype : {"float32", "int16"}, default "float32"
        ``float32`` reflectance with nodata NaN, or ``int16`` reflectance x 10000 (rounded; nodata
        -32768) with GDAL scale 1e-4 and offset 0 on every band.
    crs : optional
        CRS when the image carries none.
    overwrite : bool, default False
        Replace an existing file.
    blocksize : int, default 512
        COG tile size in pixels.
    compress : str, default "DEFLATE"
        GDAL compression (``DEFLATE``, ``ZSTD``, ``LZW``, ``NONE``...).
    tags : dict, optional
        Extra dataset tags; the image's date, method, target and pairs attrs are written too.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    StoreError
        ``path`` exists (and not ``overwrite``), the image has no CRS or is not ``(band, y, x)``,
        or an unknown ``dtype``.

    Examples
    --------
    >>> pred = stf.fuse(cube, "2020-06-09", method="delta")  # doctest: +SKIP
    >>> pred.stf.to_geotiff("fused_2020-06-09.tif", dtype="int16")  # doctest: +SKIP
    """
    import rasterio
    import rasterio.shutil

    if dtype not in DTYPES:
        raise StoreError(f"dtype {dtype!r} is not one of {list(DTYPES)}; use float32 reflectance or int16 x 10000.")
    if "time" in image.dims:
        if image.sizes["time"] != 1:
            raise StoreError(
                f"to_geotiff writes one date, got {image.sizes['time']}; select one with .sel(time=...) "
                "or write them all with stf.export."
            )
        image = image.isel(time=0)
    if "band" not in image.dims:
        image = image.expand_dims(band=[str(image.name or "band")])
    if set(image.dims) != {"band", "y", "x"}:
        raise StoreError(f"to_geotiff needs dims (band, y, x), got {image.dims}; select one date and drop other dims.")
    image = image.transpose("band", "y", "x")
    path = Path(path)
    if path.exists() and not overwrite:
        raise StoreError(f"{path} already exists; pass overwrite=True or choose another path.")
    crs, transform = _georeferencing(image, crs)
    # a Dask image is computed once, on the local scheduler; encoded band by band (a float64 copy of one band
    # at a time)
    if is_dask_array(image.data):
        from stf_pipeline.parallel import local_scheduler

        image = image.compute(scheduler=local_scheduler())
    values = np.asarray(image.values)
    nodata = float("nan") if dtype == "float32" else float(INT16_NODATA)
    bands = [str(b) for b in image["band"].values]
    metadata = {k: str(v) for k, v in _provenance(image).items()}
    metadata.update({k: str(v) for k, v in (tags or {}).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    stem = f".{path.name}.{uuid.uuid4().hex[:8]}"
    plain, cog = path.with_name(stem + ".gtiff.tif"), path.with_name(stem + ".cog.tif")
    try:
        with rasterio.open(
            plain,
            "w",
            driver="GTiff",
            width=values.shape[2],
            height=values.shape[1],
            count=len(bands),
            dtype=dtype,
            crs=crs,
            transform=transform,
            nodata=nodata,
            tiled=True,
            blockxsize=blocksize,
            blockysize=blocksize,
        ) as dst:
            for i, band in enumerate(bands, start=1):
                dst.write(_encoded(values[i - 1], dtype), i)
                dst.set_band_description(i, band)
                dst.update_tags(i, name=band)
            if dtype == "int16":
                dst.scales = (INT16_SCALE,) * len(bands)
                dst.offsets = (0.0,) * len(bands)
            dst.units = (str(image.attrs.get("units", "reflectance")),) * len(bands)
            dst.update_tags(**metadata)
        rasterio.shutil.copy(
            plain,
            cog,
            driver="COG",
            BLOCKSIZE=blocksize,
            COMPRESS=compress,
            OVERVIEWS="AUTO",
            RESAMPLING="AVERAGE",
            OVERVIEW_RESAMPLING="AVERAGE",
            **({"PREDICTOR": "YES"} if compress.upper() in ("DEFLATE", "ZSTD", "LZW") else {}),
        )
        os.replace(cog, path)
    finally:
        for leftover in (plain, cog):
            leftover.unlink(missing_ok=True)
    return path


def _provenance(image: xr.DataArray) -> dict[str, Any]:
    """Tags from a prediction's attrs and coords: date, method, target, pairs, version."""
    out: dict[str, Any] = {}
    if "time" in image.coords and image["time"].size == 1:
        out["date"] = np.datetime_as_string(image["time"].values, unit="D")
    for key in ("method", "target", "pairs", "stf_params", "stf_pipeline_version", "source"):
        if key in image.attrs:
            out[key] = image.attrs[key]
    if "source" in image.coords and image["source"].size == 1:
        out["source"] = str(image["source"].values)
    return out


def _dates(cube: xr.Dataset, dates: Sequence[Any] | str | None, variable: str) -> list[np.datetime64]:
    """The dates to write: given, or the fused ones of a fused store, or every date with a valid image."""
    import pandas as pd

    times = cube["time"].values
    if dates is None:
        if "source" in cube:
            chosen = times[np.asarray(cube["source"].values).astype(str) == "fused"]
        else:
            name = f"{variable}_valid"
            valid = cube[name].values if name in cube.coords and cube[name].dims == ("time",) else None
            chosen = times if valid is None else times[valid > 0]
        if chosen.size == 0:
            raise StoreError(
                f"the store has no fused date (or no valid {variable!r} image); name dates with dates=[...]."
            )
        return list(chosen)
    if isinstance(dates, str):
        if dates == "all":
            return list(times)
        dates = [d.strip() for d in dates.split(",") if d.strip()]
    out = []
    for date in dates:
        try:
            stamp = pd.Timestamp(date).to_datetime64().astype("datetime64[ns]")
        except (ValueError, TypeError):
            raise StoreError(f"cannot read {date!r} as a date; use ISO dates such as 2020-06-09.") from None
        if stamp not in times:
            raise StoreError(
                f"{np.datetime_as_string(stamp, unit='D')} is not a date of the store "
                f"({[str(t)[:10] for t in times]}); choose among them."
            )
        out.append(stamp)
    return out


def export(
    source: PathLike | xr.Dataset,
    out_dir: PathLike,
    *,
    dates: Sequence[Any] | str | None = None,
    variable: str = "fine",
    format: str = "cog",
    dtype: str = "float32",
    prefix: str | None = None,
    overwrite: bool = False,
    **options: Any,
) -> list[Path]:
    """Write dates of a fused store (or any cube) as one Cloud-Optimized GeoTIFF per date.

    Parameters
    ----------
    source : path-like or xarray.Dataset
        A fused store written by ``stf.fuse_series`` (or any cube store or cube).
    out_dir : path-like
        Folder of the files ``{prefix}_{YYYY-MM-DD}.tif``.
    dates : sequence of date-likes, "all", or comma-separated str, optional
        Default: the fused dates of a fused store (its ``source`` variable), else every date with
        a valid ``variable`` image.
    variable : str, default "fine"
        The data variable to write (``fine``: observed and fused fine images).
    format : {"cog"}, default "cog"
    dtype : {"float32", "int16"}, default "float32"
        See :func:`to_geotiff`.
    prefix : str, optional
        File name prefix; default the store's name (``fused`` for ``fused.zarr``) or ``variable``.
    overwrite : bool, default False
        Replace existing files (else an existing file is an error and nothing is written).
    **options
        Passed to :func:`to_geotiff` (``blocksize``, ``compress``, ``crs``).

    Returns
    -------
    list of pathlib.Path
        The files written, in date order.

    Raises
    ------
    StoreError
        Unknown format or variable, a date not in the store, or an existing file without
        ``overwrite`` (checked for every file before the first is written).
    """
    from stf_pipeline.cube import open_cube

    if format not in FORMATS:
        raise StoreError(f"format {format!r} is not one of {list(FORMATS)}.")
    if isinstance(source, xr.Dataset):
        cube, name = source, variable
    else:
        cube, name = open_cube(source), Path(source).name.removesuffix(".zarr")
    if variable not in cube.data_vars:
        raise StoreError(
            f"the store has no variable {variable!r} (it has {sorted(map(str, cube.data_vars))}); choose one."
        )
    prefix = prefix or name
    chosen = _dates(cube, dates, variable)
    out_dir = Path(out_dir)
    targets = [out_dir / f"{prefix}_{np.datetime_as_string(t, unit='D')}.tif" for t in chosen]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not overwrite:
        raise StoreError(f"{existing} already exist; pass overwrite=True or another folder.")
    tags = {k: cube.attrs[k] for k in ("stf_method", "stf_params", "coarse_factor") if k in cube.attrs}
    written = []
    for date, target in zip(chosen, targets, strict=True):
        image = cube[variable].sel(time=date)
        written.append(to_geotiff(image, target, dtype=dtype, overwrite=overwrite, tags=tags, **options))
    return written
