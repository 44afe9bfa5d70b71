"""The cube contract (DESIGN.md §1): validate, build, open and write fusion cubes.

A cube is an :class:`xarray.Dataset` with float32 variables ``fine`` and ``coarse`` of dims
``(time, band, y, x)`` on one grid, strictly increasing ``time``, string ``band`` names, float
``y``/``x`` pixel centres, optionally a rioxarray ``spatial_ref`` CRS coordinate, and the attr
``coarse_factor`` (native coarse pixel size in fine pixels). Stores are Zarr, written
atomically (temporary store, then rename) with consolidated metadata.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr

from stf_pipeline._atomic import atomic_directory
from stf_pipeline.exceptions import CubeError, StoreError

DIMS: tuple[str, str, str, str] = ("time", "band", "y", "x")
VARIABLES: tuple[str, str] = ("fine", "coarse")
DEFAULT_CHUNKS: dict[str, int] = {"time": 1, "band": -1, "y": 512, "x": 512}
#: attr written on every store made by :func:`write_cube`; its value is the format version.
STORE_MARKER = "stf_pipeline_cube"
STORE_VERSION = 1
#: Zarr v2 stores: consolidated metadata is standard there and GDAL/other readers open them.
ZARR_FORMAT = 2


def validate_cube(cube: xr.Dataset, *, require_coarse_factor: bool = False) -> xr.Dataset:
    """Check that ``cube`` follows the cube contract and return it unchanged.

    Only metadata is inspected: nothing is computed.

    Parameters
    ----------
    cube : xarray.Dataset
        Candidate cube.
    require_coarse_factor : bool, default False
        Also require the ``coarse_factor`` attr (methods that aggregate to native coarse pixels).

    Returns
    -------
    xarray.Dataset
        The same object, for chaining.

    Raises
    ------
    CubeError
        Naming the first problem found and how to fix it.
    """
    if not isinstance(cube, xr.Dataset):
        raise CubeError(
            f"a cube must be an xarray.Dataset, got {type(cube).__name__}; "
            "build one with stf.make_cube(fine, coarse, ...)."
        )
    for name in VARIABLES:
        if name not in cube.data_vars:
            raise CubeError(
                f"cube has no data variable {name!r} (found {sorted(map(str, cube.data_vars))}); "
                f"rename your {name}-sensor variable to {name!r}."
            )
    for name in VARIABLES:
        var = cube[name]
        if tuple(var.dims) != DIMS:
            raise CubeError(
                f"variable {name!r} has dims {tuple(var.dims)}, expected {DIMS}; "
                f"use .transpose{DIMS} (and expand_dims for a missing 'time' or 'band')."
            )
        if var.dtype != np.float32:
            raise CubeError(
                f"variable {name!r} has dtype {var.dtype}, expected float32 reflectance in [0, 1]; "
                "apply the scale factor and use .astype('float32')."
            )
    if cube["fine"].shape != cube["coarse"].shape:
        raise CubeError(
            f"fine {cube['fine'].shape} and coarse {cube['coarse'].shape} differ in shape; "
            "resample the coarse images onto the fine grid (rio.reproject_match)."
        )
    for dim in DIMS:
        if dim not in cube.coords:
            raise CubeError(f"cube has no {dim!r} coordinate; assign one with .assign_coords({dim}=...).")
    times = cube["time"].values
    if not np.issubdtype(times.dtype, np.datetime64):
        raise CubeError(
            f"'time' coordinate has dtype {times.dtype}, expected datetime64; "
            "convert with pandas.to_datetime."
        )
    if times.size == 0:
        raise CubeError("cube has no dates (time has length 0); add at least one date.")
    steps = np.diff(times.astype("datetime64[ns]").astype(np.int64))
    if np.any(steps <= 0):
        bad = int(np.argmax(steps <= 0))
        kind = "duplicate" if steps[bad] == 0 else "decreasing"
        raise CubeError(
            f"'time' must be strictly increasing, but {np.datetime_as_string(times[bad + 1], unit='D')} "
            f"is {kind} after {np.datetime_as_string(times[bad], unit='D')}; "
            "sort with .sortby('time') and drop duplicates with .drop_duplicates('time')."
        )
    bands = cube["band"].values
    if bands.dtype.kind not in "UOT" or not all(isinstance(b, str) for b in bands.tolist()):
        raise CubeError(
            f"'band' coordinate must hold band names (str), got dtype {bands.dtype}; "
            "assign names, e.g. .assign_coords(band=['blue', 'green', 'red', 'nir', 'swir1', 'swir2'])."
        )
    if len(set(bands.tolist())) != bands.size:
        raise CubeError(f"'band' names must be unique, got {bands.tolist()}; rename the duplicates.")
    for dim in ("y", "x"):
        values = cube[dim].values
        if not np.issubdtype(values.dtype, np.floating):
            raise CubeError(
                f"{dim!r} coordinate has dtype {values.dtype}, expected float64 pixel centres; "
                f"use .assign_coords({dim}=cube.{dim}.astype('float64'))."
            )
        if values.size > 1 and not (np.all(np.diff(values) > 0) or np.all(np.diff(values) < 0)):
            raise CubeError(f"{dim!r} coordinate must be monotonic (a regular grid); sort it with .sortby({dim!r}).")
    factor = cube.attrs.get("coarse_factor")
    if factor is None:
        if require_coarse_factor:
            raise CubeError(
                "cube has no 'coarse_factor' attr (native coarse pixel size in fine pixels); "
                "set it, e.g. cube.attrs['coarse_factor'] = 16 for 480 m MODIS on 30 m Landsat."
            )
    elif isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1:
        raise CubeError(
            f"attr 'coarse_factor' must be a positive int, got {factor!r}; "
            "set it to the coarse pixel size divided by the fine pixel size."
        )
    return cube


def make_cube(
    fine: Any,
    coarse: Any,
    *,
    time: Sequence[Any],
    band: Sequence[str],
    y: Sequence[float] | np.ndarray,
    x: Sequence[float] | np.ndarray,
    crs: Any | None = None,
    coarse_factor: int | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """Build a validated cube from ``(time, band, y, x)`` arrays (NumPy or Dask).

    Parameters
    ----------
    fine, coarse : array-like
        Reflectance in [0, 1], shape ``(time, band, y, x)``; cast to float32.
    time : sequence of date-likes
    band : sequence of str
    y, x : sequence of float
        Pixel centres in CRS units.
    crs : optional
        Anything ``rio.write_crs`` accepts (EPSG code, WKT, ``rasterio.crs.CRS``).
    coarse_factor : int, optional
        Native coarse pixel size in fine pixels.
    attrs : mapping, optional
        Extra dataset attrs.

    Returns
    -------
    xarray.Dataset
    """
    import pandas as pd

    coords = {
        "time": pd.DatetimeIndex(pd.to_datetime(list(time))).values.astype("datetime64[ns]"),
        "band": np.asarray([str(b) for b in band], dtype=object),
        "y": np.asarray(y, dtype=np.float64),
        "x": np.asarray(x, dtype=np.float64),
    }
    cube = xr.Dataset(
        {
            "fine": (DIMS, fine.astype(np.float32) if hasattr(fine, "astype") else np.asarray(fine, np.float32)),
            "coarse": (DIMS, coarse.astype(np.float32) if hasattr(coarse, "astype") else np.asarray(coarse, np.float32)),
        },
        coords=coords,
        attrs=dict(attrs or {}),
    )
    if coarse_factor is not None:
        cube.attrs["coarse_factor"] = int(coarse_factor)
    if crs is not None:
        import rioxarray  # noqa: F401  (registers .rio)

        cube = cube.rio.write_crs(crs)
    for name in VARIABLES:
        cube[name].attrs.setdefault("units", "reflectance")
    if not any(isinstance(cube[name].data, da.Array) for name in VARIABLES):
        cube = with_valid_fractions(cube)
    return validate_cube(cube)


def with_valid_fractions(cube: xr.Dataset) -> xr.Dataset:
    """Add per-date coords ``fine_valid``/``coarse_valid``: the fraction of valid pixels.

    Task resolution reads them instead of scanning the images, so that building a fusion graph
    on a lazy cube computes nothing. Computes the fractions (one pass) if they are missing.
    """
    missing = [name for name in VARIABLES if f"{name}_valid" not in cube.coords]
    if not missing:
        return cube
    fractions = [cube[name].notnull().mean(("band", "y", "x")) for name in missing]
    if any(isinstance(f.data, da.Array) for f in fractions):
        fractions = list(dask.compute(*fractions))
    return cube.assign_coords(
        {f"{name}_valid": ("time", np.asarray(f.values, dtype=np.float64)) for name, f in zip(missing, fractions)}
    )


def pixel_size(cube: xr.Dataset | xr.DataArray) -> float:
    """Fine pixel size in CRS units, from the ``x`` coordinate spacing (1.0 if unknown)."""
    x = cube["x"].values
    return float(abs(x[1] - x[0])) if x.size > 1 else 1.0


def _clear_encoding(cube: xr.Dataset) -> xr.Dataset:
    cube = cube.copy()
    for var in cube.variables.values():
        var.encoding = {}
    return cube


def write_cube(
    cube: xr.Dataset,
    path: str | os.PathLike[str],
    *,
    chunks: Mapping[str, int] | None = None,
    overwrite: bool = False,
    compute: bool = True,
) -> Path:
    """Validate ``cube`` and write it to a Zarr store atomically.

    The cube is written to a temporary store beside ``path`` and renamed into place only
    when complete, so an interrupted write never leaves a half-written store at ``path``
    and an existing store is never lost.

    Parameters
    ----------
    cube : xarray.Dataset
    path : path-like
        Destination directory (``*.zarr``).
    chunks : mapping, optional
        Chunk sizes; default ``time=1, band=-1, y=512, x=512``.
    overwrite : bool, default False
        Replace an existing cube store at ``path`` (never a store that is not a cube).
    compute : bool, default True
        Must be True: an atomic write needs the data written before the rename.

    Returns
    -------
    pathlib.Path
        The store path.

    Raises
    ------
    CubeError
        If the cube breaks the contract.
    StoreError
        If ``path`` exists and ``overwrite`` is False, or it is not a cube store.
    """
    validate_cube(cube)
    if not compute:
        raise StoreError("write_cube(compute=False) cannot be atomic; use stf.fuse_series for lazy region writes.")
    path = Path(path)
    if path.exists():
        if not overwrite:
            raise StoreError(f"{path} already exists; pass overwrite=True to replace it or choose another path.")
        if not _is_cube_store(path):
            raise StoreError(f"{path} exists and is not a stf_pipeline cube store; refusing to overwrite it.")
    sizes = {**DEFAULT_CHUNKS, **(chunks or {})}
    target = {dim: (cube.sizes[dim] if size == -1 else min(size, cube.sizes[dim])) for dim, size in sizes.items()}
    out = _clear_encoding(with_valid_fractions(cube)).chunk(target)
    out.attrs[STORE_MARKER] = STORE_VERSION
    with atomic_directory(path) as tmp:
        out.to_zarr(tmp, mode="w", consolidated=True, zarr_format=ZARR_FORMAT, write_empty_chunks=True)
    return path


def _is_cube_store(path: Path) -> bool:
    try:
        ds = xr.open_zarr(path, consolidated=None)
    except Exception:
        return False
    return STORE_MARKER in ds.attrs


def open_cube(
    path: str | os.PathLike[str],
    *,
    chunks: Mapping[str, int] | str | None = None,
) -> xr.Dataset:
    """Open a cube store lazily and validate it.

    Parameters
    ----------
    path : path-like
        A Zarr store written to the cube contract (by :func:`write_cube` or any other tool).
    chunks : mapping or "auto", optional
        Dask chunks; default: the store's own chunks.

    Returns
    -------
    xarray.Dataset
        Lazy (Dask-backed) cube.

    Raises
    ------
    CubeError
        If the store is missing, truncated or corrupt, or breaks the contract.
    """
    path = Path(path)
    if not path.exists():
        raise CubeError(
            f"no cube store at {path}; create one with stf.write_cube(cube, {str(path)!r}) "
            "or `stf ingest CATALOG -o STORE`."
        )
    try:
        cube = xr.open_zarr(path, consolidated=None, chunks={} if chunks is None else chunks, decode_coords="all")
    except Exception as err:  # zarr/xarray raise many types for broken stores
        raise CubeError(
            f"cannot open cube store {path}: it is truncated or corrupt ({type(err).__name__}: {err}); "
            "re-create it with stf.write_cube or `stf ingest`."
        ) from err
    if cube.attrs.get("stf_series_complete") is False or cube.attrs.get("stf_series_complete") == 0:
        raise CubeError(
            f"{path} is a fused series that is not finished yet (an interrupted stf.fuse_series run); "
            "rerun stf.fuse_series with the same arguments to resume it."
        )
    if STORE_MARKER in cube.attrs:
        _check_chunks_present(path, cube)
    try:
        return validate_cube(cube)
    except CubeError as err:
        raise CubeError(f"store {path} is not a valid cube: {err}") from None


def _check_chunks_present(path: Path, cube: xr.Dataset) -> None:
    """Stores written by :func:`write_cube` hold every chunk (empty ones too): a missing one is damage."""
    import json

    for name in cube.data_vars:
        meta_file = path / str(name) / ".zarray"
        if not meta_file.is_file():
            continue
        meta = json.loads(meta_file.read_text())
        expected = 1
        for size, chunk in zip(meta["shape"], meta["chunks"]):
            expected *= -(-size // chunk) if size else 0
        present = sum(1 for p in (path / str(name)).iterdir() if not p.name.startswith("."))
        if present < expected:
            raise CubeError(
                f"cube store {path} is truncated: variable {name!r} has {present} of {expected} chunk files; "
                "re-create it with stf.write_cube or `stf ingest`."
            )
