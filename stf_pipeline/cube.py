"""The cube contract (DESIGN.md §1): validate, build, open and write fusion cubes.

A cube is an :class:`xarray.Dataset` with float32 variables ``fine`` and ``coarse`` of dims
``(time, band, y, x)`` on one grid, strictly increasing ``time``, string ``band`` names, float
``y``/``x`` pixel centres, optionally a rioxarray ``spatial_ref`` CRS coordinate, and the attr
``coarse_factor`` (native coarse pixel size in fine pixels). Stores are Zarr v3 with a CRC32C
checksum per chunk, written atomically (temporary store, then rename) with consolidated metadata.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import xarray as xr

from stf_pipeline._atomic import atomic_directory
from stf_pipeline._dask import is_dask_array
from stf_pipeline.exceptions import CubeError, StoreError

DIMS: tuple[str, str, str, str] = ("time", "band", "y", "x")
VARIABLES: tuple[str, str] = ("fine", "coarse")
DEFAULT_CHUNKS: dict[str, int] = {"time": 1, "band": -1, "y": 512, "x": 512}
#: attr written on every store made by :func:`write_cube`; its value is the format version.
STORE_MARKER = "stf_pipeline_cube"
STORE_VERSION = 1
#: Zarr v3 stores, so every chunk carries a ``crc32c`` checksum (a core v3 codec) after its compression.
ZARR_FORMAT: Literal[3] = 3
#: Plausible range of reflectance; values outside it are almost always a missing scale factor.
REFLECTANCE_RANGE = (-0.5, 2.0)
#: Side of the window sampled per checked image by :func:`validate_cube`'s value checks.
SAMPLE_SIDE = 256


@contextlib.contextmanager
def quiet_zarr() -> Iterator[None]:
    """Silence Zarr's notes that consolidated metadata is not in the v3 spec (we write it on purpose:
    one file read opens a store) and that our bookkeeping files are not Zarr objects."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        # our own bookkeeping files (.stf_generation, .stf_progress/) sit in the store on purpose
        warnings.filterwarnings("ignore", message=r"Object at \.stf_\w+ is not recognized")
        yield


def strings_as_objects(ds: xr.Dataset) -> xr.Dataset:
    """Fixed-width ``<U`` string variables as object strings: Zarr v3 stores those with its
    specified variable-length string type (fixed-width ones have no v3 spec yet)."""
    ds = ds.copy()
    for name, var in ds.variables.items():
        if var.dtype.kind == "U":
            ds[name] = var.copy(data=var.values.astype(object))
    return ds


def chunk_encoding(chunks: tuple[int, ...]) -> dict[str, Any]:
    """Zarr encoding of a data variable: ``chunks``, fast Blosc-LZ4 compression, then a CRC32C checksum."""
    from zarr.codecs import BloscCodec, Crc32cCodec

    return {
        "chunks": chunks,
        "compressors": [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), Crc32cCodec()],
    }


def validate_cube(
    cube: xr.Dataset, *, require_coarse_factor: bool = False, check_values: bool | None = None
) -> xr.Dataset:
    """Check that ``cube`` follows the cube contract and return it unchanged.

    The metadata is checked in full. The values are checked on a sample (a
    ``SAMPLE_SIDE``-pixel window of a few dates of every variable): reflectance must lie in
    ``REFLECTANCE_RANGE`` (else a scale factor was not applied), must not be ``±inf``, and a
    coarse image that is provably blockwise constant (nearest-resampled) must be so at
    ``coarse_factor``. Coarse data that is not (bilinear or cubic resampling, a mosaic of
    differently aligned pieces) cannot contradict ``coarse_factor`` and passes.

    Parameters
    ----------
    cube : xarray.Dataset
        Candidate cube.
    require_coarse_factor : bool, default False
        Also require the ``coarse_factor`` attr (methods that aggregate to native coarse pixels).
    check_values : bool, optional
        Check the sampled values. Default: for in-memory variables only, so validating a lazy
        cube computes nothing; True also reads the sample of lazy (Dask) variables (one small
        compute: what :func:`open_cube`, :func:`write_cube` and ``fuse_series`` do).

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
    fused_series = "stf_series_request" in cube.attrs and "source" in cube.data_vars
    # a fused series keeps ``coarse`` only when asked to (stf.fuse_series(keep=...)): it is read, not fused again
    present = tuple(name for name in VARIABLES if name in cube.data_vars or not (fused_series and name == "coarse"))
    for name in present:
        if name not in cube.data_vars:
            raise CubeError(
                f"cube has no data variable {name!r} (found {sorted(map(str, cube.data_vars))}); "
                f"rename your {name}-sensor variable to {name!r}."
            )
    for name in present:
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
    if "coarse" in present and cube["fine"].shape != cube["coarse"].shape:
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
    if check_values is not False:
        _check_values(cube, lazy=bool(check_values))
    return cube


def _sample_windows(cube: xr.Dataset, name: str, *, lazy: bool) -> list[Any]:
    """Up to three ``(band, y, x)`` windows of ``name`` (first, middle, last date), lazy or not."""
    data = cube[name].data
    if is_dask_array(data) and not lazy:
        return []
    return [data[t0, :, y0:y1, x0:x1] for (t0, _), _, (y0, y1), (x0, x1) in _sample_regions(data)]


def _sample_regions(data: Any) -> list[tuple[tuple[int, int], ...]]:
    """The ``(start, stop)`` of each dimension of the windows :func:`_sample_windows` takes:
    one date, every band, a window of up to ``SAMPLE_SIDE`` pixels at the centre (for a Dask
    array, moved to the start of its chunk where it still fits, so that one chunk is read)."""
    n_time, n_band, height, width = data.shape
    side_y, side_x = min(SAMPLE_SIDE, height), min(SAMPLE_SIDE, width)
    y0, x0 = (height - side_y) // 2, (width - side_x) // 2
    if is_dask_array(data):
        y0 = _chunk_start(data.chunks[2], y0, side_y)
        x0 = _chunk_start(data.chunks[3], x0, side_x)
    dates = sorted({0, n_time // 2, n_time - 1})
    return [((t, t + 1), (0, n_band), (y0, y0 + side_y), (x0, x0 + side_x)) for t in dates]


def _checked_images(cube: xr.Dataset) -> list[str]:
    """The variables whose values the value check samples: float images ``(time, band, y, x)``."""
    return [str(n) for n in cube.data_vars if cube[n].dims == DIMS and np.issubdtype(cube[n].dtype, np.floating)]


def _values_checked_at_write(cube: xr.Dataset) -> bool:
    """Whether :func:`write_cube` checked the values of every chunk that the value check of a
    newly opened ``cube`` would read. It did when each such chunk is still as written: its size
    and checksum are those the store's manifest recorded (:func:`stf_pipeline.store.recorded_digests`),
    and :func:`write_cube` checks a cube's values before it writes a store. Then opening reads no
    image chunk; a store of another writer, a chunk written again since, or a variable read
    another way is checked as before."""
    from stf_pipeline.store import checked_reader, chunk_key, recorded_digests

    names = _checked_images(cube)
    for name in names:
        data = cube[name].data
        reader = checked_reader(data)
        if reader is None or reader.direct is None:
            return False
        keys: set[str] = set()
        for region in _sample_regions(data):
            spans = [
                range(start // size, (stop - 1) // size + 1)
                for (start, stop), size in zip(region, reader.direct.chunk_shape, strict=True)
            ]
            keys.update(chunk_key(index) for index in itertools.product(*spans))
        if recorded_digests(reader, sorted(keys)) is None:
            return False
    return bool(names)


def _chunk_start(chunks: tuple[int, ...], start: int, side: int) -> int:
    """Move a window start back to the start of its chunk when the window then still fits."""
    edges = np.cumsum((0, *chunks))
    begin = int(edges[np.searchsorted(edges, start, side="right") - 1])
    return begin if begin + side <= int(edges[-1]) else start


def _check_values(cube: xr.Dataset, *, lazy: bool) -> None:
    names = _checked_images(cube)
    samples = {name: _sample_windows(cube, name, lazy=lazy) for name in names}
    if lazy and any(is_dask_array(w) for ws in samples.values() for w in ws):
        flat = [w for ws in samples.values() for w in ws]
        import dask

        computed = iter(dask.compute(*flat))
        samples = {name: [next(computed) for _ in ws] for name, ws in samples.items()}
    low, high = REFLECTANCE_RANGE
    for name, windows in samples.items():
        for window in windows:
            # two reductions over the window, NaN ignored: ±inf shows as an infinite extreme
            lowest, highest = _nan_extremes(np.asarray(window))
            if np.isinf(lowest) or np.isinf(highest):
                raise CubeError(
                    f"variable {name!r} holds ±inf values; mark invalid pixels as NaN instead, e.g. "
                    f"cube[{name!r}] = cube[{name!r}].where(np.isfinite(cube[{name!r}]))."
                )
            if lowest < low or highest > high:  # False for an all-NaN window (NaN extremes)
                raise CubeError(
                    f"variable {name!r} holds values from {lowest:.4g} to {highest:.4g}, outside the "
                    f"plausible reflectance range [{low}, {high}]; apply the product's scale factor first "
                    "(e.g. x 1e-4 for 0-10000 integers, or x 2.75e-5 - 0.2 for Landsat Collection 2 Level-2)."
                )
    factor = cube.attrs.get("coarse_factor")
    if factor is not None and "coarse" in samples:
        for window in samples["coarse"]:
            native = _blockwise_factor(np.asarray(window))
            if native is not None and native != int(factor):
                raise CubeError(
                    f"attr 'coarse_factor' is {factor}, but the coarse images are blockwise constant in blocks of "
                    f"{native} fine pixels (nearest-resampled at that factor); set cube.attrs['coarse_factor'] = "
                    f"{native}, or check how the coarse images were resampled."
                )


def _nan_extremes(window: np.ndarray) -> tuple[float, float]:
    """Smallest and largest value of ``window``, NaN ignored (NaN, NaN where it holds no other)."""
    if window.size == 0:
        return np.nan, np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN: NaN on purpose
        return float(np.nanmin(window)), float(np.nanmax(window))


def _blockwise_factor(window: np.ndarray) -> int | None:
    """The block size at which a ``(band, y, x)`` window is piecewise constant, if it provably is.

    Finds the rows and columns where the image changes (NaN equal to NaN). When, along both
    axes, the most common step between changes is the same ``g >= 2`` and at least 90 % of the
    changes (and at least three) fall on one lattice of step ``g``, the window is a
    nearest-resampled image of native pixel size ``g``. A smooth (bilinear, cubic) or
    native-resolution image changes almost everywhere, and a mosaic of differently aligned
    pieces on no single lattice: None (nothing is proven).
    """
    steps = set()
    has_nan = bool(np.isnan(window).any())  # else equality alone decides (half the passes)
    for axis in (1, 2):
        a = np.moveaxis(window, axis, 0)
        same = a[1:] == a[:-1]
        if has_nan:
            same |= np.isnan(a[1:]) & np.isnan(a[:-1])
        changes = np.flatnonzero(~same.reshape(same.shape[0], -1).all(axis=1)) + 1
        if changes.size < 3:
            return None
        step = int(np.bincount(np.diff(changes)).argmax())
        if step < 2 or np.bincount(changes % step).max() < 0.9 * changes.size:
            return None
        steps.add(step)
    return steps.pop() if len(steps) == 1 else None


def make_cube(
    fine: Any,
    coarse: Any,
    *,
    time: Sequence[Any] | np.ndarray,
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
    time : sequence or array of date-likes
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
            "coarse": (
                DIMS, coarse.astype(np.float32) if hasattr(coarse, "astype") else np.asarray(coarse, np.float32)
            ),
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
    if not any(is_dask_array(cube[name].data) for name in VARIABLES):
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
    if any(is_dask_array(f.data) for f in fractions):
        import dask

        fractions = list(dask.compute(*fractions))
    return cube.assign_coords(
        {
            f"{name}_valid": ("time", np.asarray(f.values, dtype=np.float64))
            for name, f in zip(missing, fractions, strict=True)
        }
    )


def pixel_size(cube: xr.Dataset | xr.DataArray) -> float:
    """Fine pixel size in CRS units, from the ``x`` coordinate spacing (1.0 if unknown)."""
    x = cube["x"].values
    return float(abs(x[1] - x[0])) if x.size > 1 else 1.0


def cf_georeferenced(ds: xr.Dataset) -> xr.Dataset:
    """A copy of ``ds`` with its encodings cleared and its georeferencing in CF attributes.

    Encodings are cleared so that a cube read from one store is written with this package's
    chunks and codecs; that also drops rioxarray's ``grid_mapping`` encoding, so it is put back
    as the ``grid_mapping`` attribute of every data variable on the ``(y, x)`` grid, and ``x``/``y``
    get CF ``standard_name``, ``long_name`` and ``units`` (``rio.write_coordinate_system``):
    ``xr.open_zarr(path)``, rioxarray and GIS tools then read the store georeferenced. Without a
    CRS only the encodings are cleared. Write ``y``/``x`` with :func:`coord_encoding`.
    """
    import rioxarray  # noqa: F401  (registers .rio)

    ds = ds.copy()
    for var in ds.variables.values():
        var.encoding = {}
    if ds.rio.crs is None:
        return ds
    grid_mapping = ds.rio.grid_mapping
    for name in ds.data_vars:
        if {"y", "x"} <= set(ds.variables[name].dims):
            ds.variables[name].attrs["grid_mapping"] = grid_mapping
    return ds.rio.write_coordinate_system()


def coord_encoding() -> dict[str, dict[str, Any]]:
    """Zarr encoding of the ``y``/``x`` coordinates: no ``_FillValue`` (CF: a coordinate has no
    missing values; xarray would otherwise write ``NaN``)."""
    return {dim: {"_FillValue": None} for dim in ("y", "x")}


def write_cube(
    cube: xr.Dataset,
    path: str | os.PathLike[str],
    *,
    chunks: Mapping[str, int] | None = None,
    overwrite: bool = False,
    compute: bool = True,
) -> Path:
    """Validate ``cube`` and write it to a Zarr store atomically.

    The cube is written to a temporary store beside ``path`` and swapped into place only when
    complete (recoverably, see :mod:`stf_pipeline._atomic`), under the store's writer lock, so an
    interrupted write never leaves a half-written store at ``path``, an existing store is never
    lost and two writers never mix. Every chunk carries a CRC32C checksum.

    Parameters
    ----------
    cube : xarray.Dataset
    path : path-like
        Destination directory (``*.zarr``). A symlink is followed to its target.
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
        If ``path`` exists and ``overwrite`` is False, is not a cube store, is a dangling
        symlink, is being written by another process, or is a store the cube is read from.
    """
    import dask
    import zarr

    from stf_pipeline import store

    validate_cube(cube, check_values=True)
    if not compute:
        raise StoreError("write_cube(compute=False) cannot be atomic; use stf.fuse_series for lazy region writes.")
    path = resolve_store_path(path)
    store.check_not_an_input(path, store.input_stores(cube), what="write_cube")
    with store.WriterLock(path, action="write_cube"):
        remove_litter(path)
        if path.exists():
            if not overwrite:
                raise StoreError(f"{path} already exists; pass overwrite=True to replace it or choose another path.")
            if not _is_cube_store(path):
                raise StoreError(f"{path} exists and is not a stf_pipeline cube store; refusing to overwrite it.")
        sizes = {**DEFAULT_CHUNKS, **(chunks or {})}
        target = {dim: (cube.sizes[dim] if size == -1 else min(size, cube.sizes[dim])) for dim, size in sizes.items()}
        out = strings_as_objects(cf_georeferenced(with_valid_fractions(cube)).chunk(target))
        out.attrs[STORE_MARKER] = STORE_VERSION
        encoding = coord_encoding() | {
            str(name): chunk_encoding(tuple(c[0] for c in out[name].data.chunks))
            for name in out.data_vars
            if is_dask_array(out[name].data) and out[name].ndim
        }
        images = [str(name) for name in out.data_vars if out[name].dims == DIMS and out[name].dtype == np.float32]
        with atomic_directory(path) as tmp, quiet_zarr():
            # everything but the images through Zarr; the images' metadata too, their chunks encoded
            # and hashed here (store.DirectCodec, one task per chunk) when their encoding allows
            out.drop_vars(images).to_zarr(
                tmp, mode="w", consolidated=False, zarr_format=ZARR_FORMAT, write_empty_chunks=True,
                encoding={k: v for k, v in encoding.items() if k not in images},
            )
            image_writes = out[images].to_zarr(
                tmp, mode="a", consolidated=False, zarr_format=ZARR_FORMAT, write_empty_chunks=True,
                encoding={k: v for k, v in encoding.items() if k in images}, compute=False,
            )
            codecs = {name: store.DirectCodec.of(tmp, name) for name in images}
            direct = {name: (out[name].data, codec) for name, codec in codecs.items() if codec is not None}
            if len(direct) < len(images):  # e.g. a big-endian machine: Zarr writes them, unrecorded
                image_writes.compute()
                direct = {}
            (digests,) = dask.compute(store.write_chunks(tmp, direct))
            zarr.consolidate_metadata(tmp, zarr_format=ZARR_FORMAT)
            store.remove_partial_files(tmp)  # of chunk writes on a worker killed during the write
            store.write_manifest(tmp, digests)
            store.new_generation(tmp)
    return path


def resolve_store_path(path: str | os.PathLike[str]) -> Path:
    """``path`` with a symlink followed; a dangling symlink is refused before anything is written.

    Raises
    ------
    StoreError
        ``path`` is a symlink to nothing.
    """
    path = Path(path)
    if path.is_symlink():
        if not path.exists():
            raise StoreError(
                f"{path} is a symlink to {os.readlink(path)}, which does not exist; create the target "
                "directory's parent or remove the link, then write again."
            )
        return Path(os.path.realpath(path))
    return path


def remove_litter(path: Path) -> None:
    """Finish a killed swap of ``path`` and delete the leftovers of killed writes (writer lock held)."""
    from stf_pipeline._atomic import remove_litter as _remove_litter
    from stf_pipeline.store import remove_partial_files

    _remove_litter(path)
    if path.is_dir():
        remove_partial_files(path)


def _is_cube_store(path: Path) -> bool:
    try:
        ds = xr.open_zarr(path, consolidated=None)
    except Exception:
        return False
    return STORE_MARKER in ds.attrs


#: how many times an open starts again when a writer swaps the store during it
OPEN_ATTEMPTS = 5


def _await_swap(path: Path) -> None:
    """Before reading ``path``: wait out a swap in progress, or recover one a killed writer left."""
    import time

    from stf_pipeline._atomic import journal_path, recover_swap
    from stf_pipeline.store import is_locked

    deadline = time.monotonic() + 30.0
    while journal_path(path).exists():
        if not is_locked(path):
            recover_swap(path)
            return
        if time.monotonic() > deadline:
            return
        time.sleep(0.01)


def _being_replaced(path: Path, generation: str | None) -> bool:
    """Whether a writer swapped ``path`` since its generation read ``generation``, or is swapping it now."""
    from stf_pipeline._atomic import journal_path
    from stf_pipeline.store import read_generation

    return read_generation(path) != generation or journal_path(path).exists()


def _open_eagerly(path: Path, chunks: Mapping[str, int] | str | None) -> tuple[xr.Dataset, xr.Dataset]:
    """Open ``path`` twice (the lazy Dask view, the raw variables) and do every eager read: metadata,
    coordinates, small string labels and, for stores written here, the list of chunk files."""
    try:
        cube = xr.open_zarr(
            path, consolidated=None, chunks={} if chunks is None else chunks, decode_coords="all"  # type: ignore[arg-type]
        )
        raw = xr.open_dataset(path, engine="zarr", consolidated=None, chunks=None, cache=False, decode_coords="all")
        for name, var in list(cube.variables.items()):
            if var.dtype.kind == "T" or (var.dtype == object and var.size <= 100_000):
                # Zarr v3 strings come back as NumPy's variable-width StringDType: small labels, read as plain str
                cube[name] = var.copy(data=np.asarray(np.asarray(var.values).tolist(), dtype=str))
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
    if STORE_MARKER in cube.attrs or "stf_series_request" in cube.attrs:
        _check_chunks_present(path, cube)
    return cube, raw


def open_store(
    path: str | os.PathLike[str],
    *,
    chunks: Mapping[str, int] | str | None = None,
) -> xr.Dataset:
    """Open a store written by stf_pipeline lazily, with checked reads, without the cube contract.

    Damaged chunks raise :class:`CubeError` naming the chunk when read; a store replaced while
    being read raises too (see :class:`stf_pipeline.store.CheckedChunks`). Fused series use it
    (they need not hold the ``coarse`` images of a cube).

    The eager reads of the open (metadata, coordinates, labels) lie between two reads of the
    store's generation; a writer that swaps the store in between (or leaves the path empty
    between its two renames, where Zarr would read fill values) makes the open start again, so
    it never pairs one store's coordinates with another's data.

    Raises
    ------
    CubeError
        If the store is missing, truncated (a chunk file missing), an unfinished fused series,
        its metadata is corrupt, or it was replaced during each of :data:`OPEN_ATTEMPTS` opens.
    """
    from stf_pipeline.store import CheckedChunks, read_generation

    path = Path(path)
    for _ in range(OPEN_ATTEMPTS):
        _await_swap(path)
        generation = read_generation(path)
        if not path.exists():
            if _being_replaced(path, generation):
                continue
            raise CubeError(
                f"no cube store at {path}; create one with stf.write_cube(cube, {str(path)!r}) "
                "or `stf ingest CATALOG -o STORE`."
            )
        try:
            cube, raw = _open_eagerly(path, chunks)
        except CubeError:
            if _being_replaced(path, generation):
                continue
            raise
        if not _being_replaced(path, generation):
            break
    else:
        raise CubeError(
            f"{path} was replaced by another writer while it was being read, {OPEN_ATTEMPTS} times in a row; "
            "open it again (stf.open_cube) once the writer has finished."
        )
    import dask.array as da
    from dask.base import tokenize

    for name in list(cube.data_vars):
        data = cube[name].data
        if not is_dask_array(data) or not cube[name].ndim or cube[name].dtype.kind in "UT":
            continue
        store_chunks = tuple(cube[name].encoding.get("chunks") or tuple(c[0] for c in data.chunks))
        reader = CheckedChunks(raw[name].variable, path, str(name), store_chunks, generation)
        checked = da.from_array(
            reader, chunks=data.chunks, name=f"stf-read-{name}-{tokenize(reader, data.chunks)}",
            asarray=False, fancy=False, meta=np.empty((0,) * data.ndim, data.dtype),
        )
        cube[name] = cube[name].copy(data=checked)
    return cube


def open_cube(
    path: str | os.PathLike[str],
    *,
    chunks: Mapping[str, int] | str | None = None,
) -> xr.Dataset:
    """Open a cube store lazily and validate it.

    A swap of the store that a killed writer left half-done is recovered first. Every chunk
    file must be present; reads check each chunk's checksum and raise :class:`CubeError`
    naming a damaged chunk.

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
        If the store is missing, truncated or corrupt, or breaks the contract (values included,
        on a sample, unless the sampled chunks are still as :func:`write_cube` checked and wrote
        them: ``_values_checked_at_write``).
    """
    cube = open_store(path, chunks=chunks)
    try:
        return validate_cube(cube, check_values=not _values_checked_at_write(cube))
    except CubeError as err:
        raise CubeError(f"store {path} is not a valid cube: {err}") from None


def _chunk_files(path: Path, name: str, meta: Mapping[str, Any]) -> tuple[set[str], set[str]]:
    """The chunk keys a variable must have, and the ones present (temporary files ignored)."""
    from stf_pipeline.store import PARTIAL_SUFFIX

    root = path / name
    if meta.get("zarr_format") == 3:
        grid = meta["chunk_grid"]["configuration"]["chunk_shape"]
        encoding = meta.get("chunk_key_encoding", {})
        separator = encoding.get("configuration", {}).get("separator", "/")
        prefix = "c" + separator if encoding.get("name", "default") == "default" else ""
    else:
        grid = meta["chunks"]
        separator = meta.get("dimension_separator") or "."
        prefix = ""
    counts = [-(-size // chunk) if size else 0 for size, chunk in zip(meta["shape"], grid, strict=True)]
    expected = {prefix + separator.join(map(str, idx)) for idx in itertools.product(*(range(n) for n in counts))}
    if not meta["shape"]:
        expected = {prefix + "0"} if prefix else {"0"}
    present = set()
    for dirpath, _, files in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for file in files:
            if file.startswith(".") or file.endswith(PARTIAL_SUFFIX) or file in ("zarr.json", ".zarray", ".zattrs"):
                continue
            key = file if rel == "." else os.path.join(rel, file)
            present.add(key.replace(os.sep, "/") if separator == "/" else key)
    return expected, present


def _check_chunks_present(path: Path, cube: xr.Dataset) -> None:
    """Stores written by stf_pipeline hold every chunk (empty ones too): a missing one is damage."""
    import json

    for name in cube.data_vars:
        for meta_name in ("zarr.json", ".zarray"):
            meta_file = path / str(name) / meta_name
            if meta_file.is_file():
                meta = json.loads(meta_file.read_text())
                meta.setdefault("zarr_format", 3 if meta_name == "zarr.json" else 2)
                break
        else:
            continue
        if cube[name].ndim < 2:  # per-date labels are written once, and chunks equal to the fill value are not
            continue
        expected, present = _chunk_files(path, str(name), meta)
        missing = sorted(expected - present)
        if missing:
            raise CubeError(
                f"cube store {path} is truncated: variable {name!r} has {len(expected) - len(missing)} of "
                f"{len(expected)} chunk files (missing {name}/{missing[0]}); "
                "re-create it with stf.write_cube or `stf ingest`."
            )
