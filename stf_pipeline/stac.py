"""STAC in: a cube from STAC items (a STAC API search, a static catalog), lazy and chunked.

:func:`from_stac` loads fine and coarse items through ``odc-stac`` (the optional extra ``stac``):
the fine items define the grid (their native CRS and resolution, or ``crs``/``resolution``,
cropped to ``bbox``), the coarse items are loaded onto that grid by ``odc.stac.load(geobox=...)``
with the chosen resampling, their quality bands with ``nearest``. Each item's assets are found
for the sensor's declared assets (:mod:`stf_pipeline.sensors`): an asset key equal to the
asset name (``sur_refl_b01``), or an asset whose file name holds it as a word (``..._SR_B4.TIF``
behind the key ``red``), or ``asset_keys`` given. Scaling, fill values, quality masks, band
names and the checks are those of :func:`stf_pipeline.ingest`, so the same files give the
same cube by either path (with ``nearest`` resampling; the quality mask of a coarse sensor is
decoded on the fine grid here, on the coarse grid there, which differs only for other
resamplings and for ``dilation``, counted in pixels of the grid it is applied on).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import dask.array as da
import numpy as np
import xarray as xr

from stf_pipeline._ingest import (
    DEFAULT_CHUNKS,
    RESAMPLING,
    _check_values,
    _derived_factor,
    _Grid,
    _representable,
    _scale_block,
    _token,
    common_bands,
)
from stf_pipeline.cube import DIMS, validate_cube
from stf_pipeline.exceptions import CatalogError
from stf_pipeline.sensors import AnySensor, Sensor, get_sensor

PathLike = str | os.PathLike[str]
Items = Iterable[Any] | PathLike


def _import_odc() -> Any:
    try:
        import odc.stac
    except ImportError:
        raise CatalogError(
            "stf.from_stac needs odc-stac and pystac: pip install 'stf_pipeline[stac]' (or pip install odc-stac)."
        ) from None
    return odc.stac


def _items(items: Items, role: str) -> list[Any]:
    """A list of pystac Items from items, an ItemCollection, or the path of a catalog/collection/item JSON."""
    import pystac

    if isinstance(items, (str, os.PathLike)):
        read = pystac.read_file(os.fspath(items))
        if isinstance(read, pystac.Item):
            found = [read]
        elif isinstance(read, pystac.ItemCollection):
            found = list(read)
        else:
            found = list(cast(Any, read).get_items(recursive=True))  # a Catalog or Collection
    else:
        found = list(cast(Iterable[Any], items))
    if not found:
        raise CatalogError(f"no {role} STAC items given; search a collection (pystac_client) or read a catalog first.")
    return found


def _asset_key(item: Any, asset: str, overrides: Mapping[str, str], what: str) -> str:
    """The key of ``item``'s asset that holds ``asset`` (see the module docstring)."""
    if asset in overrides:
        key = overrides[asset]
        if key in item.assets:
            return key
    else:
        for key in item.assets:
            if key.lower() == asset.lower():
                return key
        word = _token(asset)
        matches = [key for key, a in item.assets.items() if word.search(Path(a.href.split("?")[0]).name)]
        if len(matches) == 1:
            return matches[0]
    raise CatalogError(
        f"STAC item {item.id!r} has no asset for {what} ({asset!r}); its assets are {sorted(item.assets)}; "
        f"map it with asset_keys={{{asset!r}: KEY}}, choose bands it has, or mask=False for a missing quality band."
    )


def _member(sensor: AnySensor, item: Any) -> Sensor:
    """The sensor reading ``item`` (a family's member chosen by the item's id, then its first asset's file name)."""
    if isinstance(sensor, Sensor):
        return sensor
    try:
        return sensor.for_file(item.id)
    except CatalogError:
        first = next(iter(item.assets.values()))
        return sensor.for_file(Path(first.href.split("?")[0]).name)


def _load(
    odc_stac: Any,
    items: list[Any],
    sensor: AnySensor,
    bands: Sequence[str],
    *,
    mask: bool,
    overrides: Mapping[str, str],
    chunks: Mapping[str, int] | None,
    resampling: str,
    geobox: Any | None,
    load_options: Mapping[str, Any],
    crop: tuple[float, float, float, float] | None = None,
) -> tuple[xr.DataArray, Any, dict[np.datetime64, str], list[Sensor]]:
    """Items of one sensor -> ``(time, band, y, x)`` float32 reflectance (NaN masked), its geobox, item ids by date."""
    groups: dict[Sensor, list[Any]] = {}
    for item in items:
        groups.setdefault(_member(sensor, item), []).append(item)
    parts, labels = [], {}
    for member, group in groups.items():
        wanted = {band: member.asset(band) for band in bands}
        qa_assets = {band: member.qa.asset_for(band) for band in bands} if mask and member.qa is not None else {}
        keys: dict[str, str] = {}
        for item in group:
            for band, asset in wanted.items():
                key = _asset_key(item, asset, overrides, f"band {band!r}")
                if keys.setdefault(band, key) != key:
                    raise CatalogError(
                        f"STAC item {item.id!r} keeps band {band!r} under {key!r}, other {member.name} items under "
                        f"{keys[band]!r}; map it with asset_keys={{{asset!r}: KEY}}."
                    )
            for band, asset in qa_assets.items():
                keys.setdefault(f"qa:{asset}", _asset_key(item, asset, overrides, f"the quality band of {band!r}"))
        load_keys = list(dict.fromkeys(keys.values()))
        modes = {key: "nearest" for name, key in keys.items() if name.startswith("qa:")}
        ds = odc_stac.load(
            group,
            bands=load_keys,
            groupby="solar_day",
            chunks=dict(chunks or {"x": -1, "y": -1}),
            resampling={"*": resampling, **modes},
            geobox=geobox,
            **(load_options if geobox is None else {}),  # later groups: the first group's grid
        )
        if geobox is None and crop is not None:
            ds = _crop(ds, crop)
        geobox = ds.odc.geobox
        times = ds["time"].values.astype("datetime64[D]").astype("datetime64[ns]")
        for t, item_ids in zip(times, _ids_by_day(group), strict=True):
            labels[t] = f"STAC items {item_ids}"
        stored = xr.concat([ds[keys[b]] for b in bands], dim="band").transpose("band", "time", "y", "x")
        if isinstance(stored.data, da.Array):
            stored = stored.chunk({"band": -1})  # _scale_block takes every band's nodata
        given = [member.nodata if member.nodata is not None else ds[keys[b]].attrs.get("nodata") for b in bands]
        nodata = tuple(n if n is not None and _representable(n, stored.dtype) else None for n in given)
        scaled = xr.apply_ufunc(
            _scale_block,
            stored,
            kwargs={"nodata": nodata, "scale": member.scale, "offset": member.offset},
            dask="parallelized",
            output_dtypes=[np.float32],
        )
        if qa_assets:
            qa: Any = member.qa
            bad = []
            for band in bands:
                raw = ds[keys[f"qa:{qa_assets[band]}"]].data
                if isinstance(raw, da.Array):
                    depth = {0: 0, 1: qa.dilation, 2: qa.dilation}
                    bad.append(
                        raw.map_overlap(qa.bad, depth=depth, boundary="none", dtype=bool)
                        if qa.dilation
                        else da.map_blocks(qa.bad, raw, dtype=bool)
                    )
                else:
                    bad.append(qa.bad(np.asarray(raw)))
            stack = da.stack(bad) if any(isinstance(b, da.Array) for b in bad) else np.stack(bad)
            scaled = scaled.where(~xr.DataArray(stack, dims=scaled.dims, coords=scaled.coords))
        scaled = scaled.assign_coords(time=times, band=list(bands)).transpose(*DIMS)
        parts.append(scaled.drop_vars([c for c in scaled.coords if c not in DIMS]))
    stack = xr.concat(parts, dim="time") if len(parts) > 1 else parts[0]
    stack = stack.sortby("time")
    if isinstance(stack.data, da.Array):
        stack = stack.chunk({"time": 1, "band": -1})
    if np.unique(stack["time"].values).size != stack.sizes["time"]:
        raise CatalogError("two STAC items of different sensors fall on one day; keep one sensor per date.")
    return stack, geobox, labels, list(groups)


def _crop(ds: xr.Dataset, bbox: tuple[float, float, float, float]) -> xr.Dataset:
    """The pixels of ``ds`` (on its native grid) whose centres lie in the lon/lat ``bbox``."""
    from rasterio.warp import transform_bounds

    west, south, east, north = transform_bounds("EPSG:4326", ds.odc.geobox.crs.to_wkt(), *bbox, densify_pts=21)
    x, y = ds["x"].values, ds["y"].values
    keep_x, keep_y = (x >= west) & (x <= east), (y >= south) & (y <= north)
    if not keep_x.any() or not keep_y.any():
        raise CatalogError(
            f"bbox {bbox} does not overlap the fine items' grid; give a lon/lat box inside their footprint."
        )
    return ds.isel(x=np.flatnonzero(keep_x), y=np.flatnonzero(keep_y))


def _solar_day(item: Any) -> np.datetime64:
    """The item's local solar day (UTC time + longitude / 15 h), as odc-stac's ``groupby="solar_day"`` dates it."""
    when = item.datetime or item.common_metadata.start_datetime
    if when is None:
        raise CatalogError(f"STAC item {item.id!r} has no datetime (nor start_datetime); it cannot be dated.")
    west, _, east, _ = item.bbox if item.bbox is not None else (0.0, 0.0, 0.0, 0.0)
    offset = np.timedelta64(int(round((west + east) / 2 / 15 * 3600)), "s")  # 15 degrees of longitude per hour
    stamp = np.datetime64(when.replace(tzinfo=None), "s") + offset
    return stamp.astype("datetime64[D]")


def _ids_by_day(items: list[Any]) -> list[list[str]]:
    """Item ids grouped by local solar day, in day order (as odc-stac's solar_day grouping orders them)."""
    days: dict[Any, list[str]] = {}
    for item in items:
        days.setdefault(_solar_day(item), []).append(item.id)
    return [days[d] for d in sorted(days)]


def _grid(geobox: Any) -> _Grid:
    from rasterio.crs import CRS

    return _Grid(tuple(geobox.shape), CRS.from_user_input(geobox.crs.to_wkt()), geobox.transform, True)


def _check_coverage(coarse_items: list[Any], geobox: Any) -> None:
    """Every coarse date's items must cover the fine area (their footprints, to the item geometry)."""
    from odc.geo.geom import Geometry, unary_union

    area = geobox.extent.to_crs("EPSG:4326")
    by_day: dict[Any, list[Any]] = {}
    for item in coarse_items:
        by_day.setdefault(_solar_day(item), []).append(item)
    for day, items in sorted(by_day.items()):
        if any(item.geometry is None for item in items):
            continue
        footprint = unary_union([Geometry(item.geometry, crs="EPSG:4326") for item in items])
        if footprint is None or not footprint.buffer(1e-9).contains(area):
            raise CatalogError(
                f"coarse STAC items {[i.id for i in items]} of {day} do not cover the fine area {area.boundingbox}; "
                "search with the fine area's bbox (intersects=) or add the neighbouring tiles."
            )


def from_stac(
    fine_items: Items,
    coarse_items: Items,
    *,
    fine_sensor: str | AnySensor,
    coarse_sensor: str | AnySensor,
    bands: Sequence[str] | None = None,
    bbox: tuple[float, float, float, float] | None = None,
    crs: Any | None = None,
    resolution: float | None = None,
    resampling: str = "nearest",
    mask: bool = True,
    asset_keys: Mapping[str, str] | None = None,
    coarse_factor: int | None = None,
    chunks: Mapping[str, int] | None = DEFAULT_CHUNKS,
    attrs: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """Build a cube from fine and coarse STAC items, lazily.

    Parameters
    ----------
    fine_items, coarse_items : iterable of pystac.Item, ItemCollection, or path
        The items (e.g. ``pystac_client`` search results) or the path of a static catalog,
        collection, item collection or item JSON.
    fine_sensor, coarse_sensor : str, Sensor or SensorFamily
        Sensor presets (``"landsat_c2_l2"``, ``"mod09ga"``...) or declared sensors.
    bands : sequence of str, optional
        Cube bands; default every band both sensors provide.
    bbox : (west, south, east, north), optional
        Area in degrees (EPSG:4326): the fine items' pixels whose centres lie in it (their native
        grid, cropped); default the fine items' extent.
    crs, resolution : optional
        Grid of the cube; default the fine items' native CRS and resolution.
    resampling : {"nearest", "bilinear", "cubic", "average"}, default "nearest"
        Coarse -> fine grid (quality bands always ``nearest``).
    mask : bool, default True
        Mask the pixels the sensors' quality bands flag.
    asset_keys : mapping, optional
        Sensor asset name -> STAC asset key, where the items name them otherwise
        (e.g. ``{"QA_PIXEL": "qa_pixel"}``).
    coarse_factor : int, optional
        Default: derived from the coarse items' native grid.
    chunks : mapping, optional
        Dask chunks of ``y``/``x`` (default 512 x 512); ``None`` loads one chunk per date.
    attrs : mapping, optional
        Extra cube attrs.

    Returns
    -------
    xarray.Dataset
        A validated, Dask-backed cube like :func:`stf_pipeline.ingest`'s (``fine``, ``coarse``,
        ``fine_valid``/``coarse_valid``, CRS, ``coarse_factor``).

    Raises
    ------
    CatalogError
        odc-stac missing, no items, an item without an asked band or quality band, coarse items
        that do not cover the fine area, or values far outside the sensor's range.

    Examples
    --------
    Planetary Computer (see docs/ingest.md):

    >>> cube = stf.from_stac(landsat_items, modis_items, fine_sensor="landsat_c2_l2", coarse_sensor="mod09a1",
    ...                      bbox=(12.4, 41.8, 12.6, 41.95), asset_keys={"QA_PIXEL": "qa_pixel"})  # doctest: +SKIP
    """
    import rioxarray  # noqa: F401  (registers .rio)

    odc_stac = _import_odc()
    if resampling not in RESAMPLING:
        raise CatalogError(f"resampling {resampling!r} is not one of {RESAMPLING}.")
    sensors = {"fine": get_sensor(fine_sensor), "coarse": get_sensor(coarse_sensor)}
    bands = common_bands(sensors["fine"], sensors["coarse"]) if bands is None else [str(b) for b in bands]
    if not bands or len(set(bands)) != len(bands):
        raise CatalogError(f"bands must be a non-empty list of unique names, got {bands}.")
    overrides = dict(asset_keys or {})
    fine_list, coarse_list = _items(fine_items, "fine"), _items(coarse_items, "coarse")
    grid_options: dict[str, Any] = {k: v for k, v in (("crs", crs), ("resolution", resolution)) if v is not None}
    if grid_options and bbox is not None:
        grid_options["bbox"] = bbox  # a grid of the user's: odc-stac fits it to the box
    fine, geobox, fine_labels, fine_members = _load(
        odc_stac,
        fine_list,
        sensors["fine"],
        bands,
        resampling="nearest",
        geobox=None,
        load_options=grid_options,
        crop=None if grid_options else bbox,
        mask=mask,
        overrides=overrides,
        chunks=chunks,
    )
    _check_coverage(coarse_list, geobox)
    coarse, _, coarse_labels, coarse_members = _load(
        odc_stac,
        coarse_list,
        sensors["coarse"],
        bands,
        resampling=resampling,
        geobox=geobox,
        load_options={},
        mask=mask,
        overrides=overrides,
        chunks=chunks,
    )
    if coarse_factor is None:
        native = odc_stac.load(
            coarse_list[:1],
            bands=[_asset_key(coarse_list[0], coarse_members[0].asset(bands[0]), overrides, f"band {bands[0]!r}")],
            chunks={},
        )
        coarse_factor = _derived_factor(_grid(native.odc.geobox), _grid(geobox))
    y, x = fine["y"].values.astype(np.float64), fine["x"].values.astype(np.float64)
    stacks = {"fine": fine.assign_coords(y=y, x=x), "coarse": coarse.assign_coords(y=y, x=x)}
    labels = {"fine": fine_labels, "coarse": coarse_labels}
    readers = {"fine": fine_members[0], "coarse": coarse_members[0]}
    fractions = _check_values(stacks, labels, readers)
    times = np.array(sorted(set(fine["time"].values) | set(coarse["time"].values)), dtype="datetime64[ns]")
    for role, stack in stacks.items():
        bounds = readers[role].clip
        if bounds is not None:
            stack = stack.clip(*bounds)
        stacks[role] = stack.reindex(time=times).astype(np.float32)
    cube = xr.Dataset(stacks, attrs=dict(attrs or {}))
    for role, members in (("fine", fine_members), ("coarse", coarse_members)):
        cube[role].attrs.update({"units": members[0].units, "sensor": ", ".join(sorted(m.name for m in members))})
    valid = {role: dict.fromkeys(times, 0.0) for role in stacks}
    for role, stack in (("fine", fine), ("coarse", coarse)):
        valid[role].update(zip(stack["time"].values, fractions[role], strict=True))
    cube = cube.assign_coords(
        fine_valid=("time", [valid["fine"][t] for t in times]),
        coarse_valid=("time", [valid["coarse"][t] for t in times]),
    )
    cube.attrs["coarse_factor"] = int(coarse_factor)
    grid = _grid(geobox)
    cube = cube.rio.write_crs(grid.crs).rio.write_transform(grid.transform)
    return validate_cube(cube)
