"""Write small Landsat-C2-L2-like and MODIS-MOD09GA-like GeoTIFFs, named as the products are.

Fine: Landsat Collection 2 Level-2 surface reflectance, one uint16 GeoTIFF per band
(``<product id>_SR_B<n>.TIF``, DN = (reflectance + 0.2) / 2.75e-5, fill 0) beside its
``<product id>_QA_PIXEL.TIF`` (bit 0 fill, 3 cloud, 4 cloud shadow, 5 snow, 6 clear) on a 30 m
UTM 33N grid; one Landsat 8 (LC08) and one Landsat 7 (LE07) scene, whose band numbers differ.

Coarse: MODIS MOD09GA as AppEEARS delivers it, one int16 GeoTIFF per band
(``MOD09GA.061_sur_refl_b01_1_doy<YYYYDDD>_aid0001.tif``, reflectance x 1e4, fill -28672) and the
1 km ``state_1km_1`` bit field (bits 0-1 cloud state, 2 shadow, 8-9 cirrus) on the MODIS sinusoidal
grid (463.3 m / 926.6 m pixels), covering the fine area with a margin.

:func:`write_stac` adds a static STAC catalog of them (``stac/``, one collection per sensor).

Values are seeded random fields; :func:`write_products` returns them (reflectance before
encoding, quality arrays, grids) so tests compute expected cube values independently.

Usage: ``python tests/data/make_products.py OUTDIR [--size 2048]``
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.transform import from_origin

#: MODIS sinusoidal projection (sphere of radius 6371007.181 m)
SINUSOIDAL = "+proj=sinu +lon_0=0 +x_0=0 +y_0=0 +R=6371007.181 +units=m +no_defs"
MODIS_PIXEL = 463.312716528
FINE_CRS, X0, Y0, RES = "EPSG:32633", 500_000.0, 4_000_000.0, 30.0
FINE_SHAPE = (64, 80)
#: product id of each fine scene and its bands' file names (cube band -> SR_Bn)
LANDSAT = {
    "2020-06-01": (
        "LC08_L2SP_190035_20200601_20200608_02_T1",
        {"blue": 2, "green": 3, "red": 4, "nir": 5, "swir1": 6, "swir2": 7},
    ),
    "2020-06-17": (
        "LE07_L2SP_190035_20200617_20200713_02_T1",
        {"blue": 1, "green": 2, "red": 3, "nir": 4, "swir1": 5, "swir2": 7},
    ),
}
MODIS_DATES = {"2020-06-01": "2020153", "2020-06-09": "2020161", "2020-06-17": "2020169"}
MODIS_BANDS = {"red": 1, "nir": 2, "blue": 3, "green": 4, "nir2": 5, "swir1": 6, "swir2": 7}
BANDS = ("blue", "green", "red", "nir", "swir1", "swir2")


def write(path: Path, data: np.ndarray, *, crs: Any, transform: Any, nodata: float | None = None) -> Path:
    """One single-band Cloud-Optimized GeoTIFF (as the archives deliver them)."""
    import rasterio.shutil
    from rasterio.io import MemoryFile

    with MemoryFile() as memory:
        with memory.open(
            driver="GTiff",
            height=data.shape[0],
            width=data.shape[1],
            count=1,
            dtype=data.dtype,
            crs=crs,
            transform=transform,
            nodata=nodata,
        ) as dst:
            dst.write(data, 1)
        with memory.open() as src:
            rasterio.shutil.copy(src, path, driver="COG", BLOCKSIZE=256)
    return path


def modis_grid() -> tuple[Any, tuple[int, int]]:
    """A 463 m sinusoidal grid (snapped to the MODIS pixel size) that covers the fine area with 3 pixels to spare."""
    from rasterio.transform import array_bounds
    from rasterio.warp import transform_bounds

    fb = array_bounds(*FINE_SHAPE, from_origin(X0, Y0, RES, RES))
    west, south, east, north = transform_bounds(FINE_CRS, SINUSOIDAL, fb[0], fb[1], fb[2], fb[3], densify_pts=21)
    x0 = (np.floor(west / MODIS_PIXEL) - 3) * MODIS_PIXEL
    y0 = (np.ceil(north / MODIS_PIXEL) + 3) * MODIS_PIXEL
    # even sizes, so that the 1 km grid (2 x 2 pixels) nests exactly
    width = 2 * int(np.ceil((east - x0) / MODIS_PIXEL / 2 + 1))
    height = 2 * int(np.ceil((y0 - south) / MODIS_PIXEL / 2 + 1))
    return from_origin(x0, y0, MODIS_PIXEL, MODIS_PIXEL), (height, width)


def write_products(folder: Path, *, seed: int = 0) -> dict[str, Any]:
    """Write the fine and coarse files into ``folder``; return their contents (see the module docstring)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    fine_transform = from_origin(X0, Y0, RES, RES)
    out: dict[str, Any] = {"fine": {}, "coarse": {}, "fine_transform": fine_transform}
    for i, (date, (product, numbers)) in enumerate(LANDSAT.items()):
        refl = rng.uniform(0.02, 0.6, size=(len(BANDS), *FINE_SHAPE))
        dn = np.round((refl + 0.2) / 2.75e-5).astype(np.uint16)
        qa = np.full(FINE_SHAPE, 1 << 6, np.uint16)  # clear
        dn[:, 0, :3] = 0  # fill along the first row
        qa[0, :3] = 1  # fill bit
        qa[10:14, 20 + i : 26 + i] = 1 << 3  # cloud
        qa[30:32, 5:9] = 1 << 4  # cloud shadow
        qa[35, 40] = 1 << 5  # snow: kept by default
        for band, number in numbers.items():
            write(
                folder / f"{product}_SR_B{number}.TIF",
                dn[BANDS.index(band)],
                crs=FINE_CRS,
                transform=fine_transform,
                nodata=0,
            )
        write(folder / f"{product}_QA_PIXEL.TIF", qa, crs=FINE_CRS, transform=fine_transform, nodata=1)
        out["fine"][date] = {"product": product, "dn": dn, "qa": qa}
    transform, shape = modis_grid()
    state_transform = from_origin(transform.c, transform.f, 2 * MODIS_PIXEL, 2 * MODIS_PIXEL)
    for i, (date, doy) in enumerate(MODIS_DATES.items()):
        refl = rng.uniform(0.02, 0.6, size=(len(MODIS_BANDS), *shape))
        stored = np.round(refl * 1e4).astype(np.int16)
        stored[:, -1, -1] = -28672  # fill in a corner
        state = np.zeros((shape[0] // 2, shape[1] // 2), np.uint16)
        # the fine area lies in 1 km rows 1-3, columns 1-4
        state[1 + i % 2, 2] = 0b01  # cloudy
        state[3, 3] = 0b1 << 2  # cloud shadow
        state[2, 4] = 0b11 << 8  # high cirrus
        state[3, 1] = 0b01 << 8  # small cirrus: kept by default
        state[1, 4] = 0b11  # cloud state "not set, assumed clear": kept
        for band, number in MODIS_BANDS.items():
            write(
                folder / f"MOD09GA.061_sur_refl_b{number:02d}_1_doy{doy}_aid0001.tif",
                stored[list(MODIS_BANDS).index(band)],
                crs=SINUSOIDAL,
                transform=transform,
                nodata=-28672,
            )
        write(
            folder / f"MOD09GA.061_state_1km_1_doy{doy}_aid0001.tif", state, crs=SINUSOIDAL, transform=state_transform
        )
        out["coarse"][date] = {"stored": stored, "state": state}
    out["coarse_transform"], out["state_transform"] = transform, state_transform
    return out


def _asset(pystac: Any, path: Path, roles: list[str]) -> Any:
    """A STAC asset of a local file with its projection fields (shape, transform, CRS as WKT2 or EPSG code)."""
    with rasterio.open(path) as src:
        extra = {"proj:shape": [src.height, src.width], "proj:transform": list(src.transform)[:6]}
        epsg = src.crs.to_epsg()
        extra.update({"proj:code": f"EPSG:{epsg}"} if epsg else {"proj:wkt2": src.crs.to_wkt()})
    return pystac.Asset(href=str(path.resolve()), media_type=pystac.MediaType.COG, roles=roles, extra_fields=extra)


def write_stac(folder: Path, *, drop: tuple[str, str] | None = None) -> dict[str, Path]:
    """A static STAC catalog of the files in ``folder`` (after :func:`write_products`): one collection per
    sensor, one item per scene. Landsat assets are keyed by common names (``red``, ``nir08``, ``qa_pixel``)
    as USGS and Planetary Computer key them; MODIS assets by their layer names. ``drop=(item id, asset key)``
    leaves one asset out. Returns the collections' JSON paths, ``{"fine": ..., "coarse": ...}``."""
    import datetime

    import pystac
    from pystac.extensions.projection import ProjectionExtension
    from rasterio.warp import transform_geom

    common = {1: "coastal", 2: "blue", 3: "green", 4: "red", 5: "nir08", 6: "swir16", 7: "swir22"}
    tm = {1: "blue", 2: "green", 3: "red", 4: "nir08", 5: "swir16", 7: "swir22"}
    scenes: dict[str, list[tuple[str, datetime.datetime, dict[str, Path]]]] = {"fine": [], "coarse": []}
    for date, (product, numbers) in LANDSAT.items():
        keys = common if product.startswith("LC") else tm
        assets = {keys[n]: folder / f"{product}_SR_B{n}.TIF" for n in numbers.values()}
        assets["qa_pixel"] = folder / f"{product}_QA_PIXEL.TIF"
        scenes["fine"].append((product, datetime.datetime.fromisoformat(date + "T09:40:00+00:00"), assets))
    for date, doy in MODIS_DATES.items():
        assets = {
            f"sur_refl_b{n:02d}": folder / f"MOD09GA.061_sur_refl_b{n:02d}_1_doy{doy}_aid0001.tif"
            for n in MODIS_BANDS.values()
        }
        assets["state_1km"] = folder / f"MOD09GA.061_state_1km_1_doy{doy}_aid0001.tif"
        scenes["coarse"].append(
            (f"MOD09GA.A{doy}.h19v05.061", datetime.datetime.fromisoformat(date + "T10:30:00+00:00"), assets)
        )
    out = {}
    root = pystac.Catalog("stf-test", "small Landsat and MODIS-like COGs")
    for role, entries in scenes.items():
        items = []
        for item_id, when, assets in entries:
            with rasterio.open(next(iter(assets.values()))) as src:
                b = src.bounds
                ring = [[b.left, b.bottom], [b.right, b.bottom], [b.right, b.top], [b.left, b.top], [b.left, b.bottom]]
                geometry = transform_geom(src.crs, "EPSG:4326", {"type": "Polygon", "coordinates": [ring]})
            xs = [p[0] for p in geometry["coordinates"][0]]
            ys = [p[1] for p in geometry["coordinates"][0]]
            item = pystac.Item(item_id, geometry, [min(xs), min(ys), max(xs), max(ys)], when, {})
            ProjectionExtension.add_to(item)
            for key, path in assets.items():
                if (item_id, key) != drop:
                    item.add_asset(
                        key, _asset(pystac, path, ["data"] if key not in ("qa_pixel", "state_1km") else ["qa"])
                    )
            items.append(item)
        collection = pystac.Collection(
            f"{role}-collection",
            f"{role} scenes",
            pystac.Extent(
                pystac.SpatialExtent([list(items[0].bbox)]),
                pystac.TemporalExtent([[items[0].datetime, items[-1].datetime]]),
            ),
        )
        collection.add_items(items)
        root.add_child(collection)
        out[role] = folder / "stac" / f"{role}-collection" / "collection.json"
    root.normalize_hrefs(str(folder / "stac"))
    root.save(pystac.CatalogType.SELF_CONTAINED)
    return out


def main(argv: list[str] | None = None) -> None:
    global FINE_SHAPE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, help="fine images of SIZE x SIZE pixels (default 64 x 80)")
    args = parser.parse_args(argv)
    if args.size:
        FINE_SHAPE = (args.size, args.size)
    write_products(args.outdir, seed=args.seed)
    write_stac(args.outdir)


if __name__ == "__main__":
    main()
