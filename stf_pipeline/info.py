"""A readable description of a cube: what ``stf info`` prints (also handy in Jupyter)."""

from __future__ import annotations

import os

import dask
import numpy as np
import xarray as xr

from stf_pipeline.cube import STORE_MARKER, open_cube, pixel_size, validate_cube


def _valid_fractions(cube: xr.Dataset) -> dict[str, np.ndarray]:
    """Per-date valid-pixel fraction of ``fine``, ``coarse`` (and ``fine_truth``), from the
    ``*_valid`` coords when present, else computed in one pass."""
    names = [n for n in ("fine", "coarse", "fine_truth") if n in cube.data_vars or f"{n}_valid" in cube.coords]
    known = {n: np.asarray(cube[f"{n}_valid"].values, float) for n in names if f"{n}_valid" in cube.coords}
    lazy = {n: cube[n].notnull().mean(("band", "y", "x")) for n in names if n not in known}
    (computed,) = dask.compute(lazy)
    return {**known, **{n: np.asarray(v.values, float) for n, v in computed.items()}}


def _crs_text(cube: xr.Dataset) -> str:
    crs = cube.rio.crs
    if crs is None:
        return "none (not georeferenced)"
    epsg = crs.to_epsg()
    if epsg is not None:
        return f"EPSG:{epsg}"
    wkt = crs.to_wkt()
    name = wkt.split('"')[1] if '"' in wkt else wkt[:40]
    return f"{name} (WKT, no EPSG code)"


def _sources(cube: xr.Dataset) -> np.ndarray | None:
    """Per-date ``observed``/``fused`` labels of a fused cube (``stf.fuse_series`` output), else None."""
    if "source" in cube.data_vars and cube["source"].dims == ("time",):
        return np.asarray(cube["source"].values).astype(str)
    return None


def _short(value: object, width: int = 60) -> str:
    text = str(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _percent(value: float) -> str:
    return f"{100 * value:5.1f}%"


def describe_cube(cube: xr.Dataset | str | os.PathLike[str]) -> str:
    """Describe a cube (or a cube store path) in plain text.

    Lists the dates and, per date, whether it is a *pair* (fine and coarse), *coarse-only*
    (a fusion target) or *fine-only* (for a fused cube from :func:`stf_pipeline.fuse_series`:
    *fused* or *observed*), with the missing-data fraction of each variable; the bands, grid,
    CRS, ``coarse_factor``, chunks and attributes.

    Parameters
    ----------
    cube : xarray.Dataset or path-like
        A cube, or the path of a cube store (opened with :func:`stf_pipeline.open_cube`).

    Returns
    -------
    str

    Examples
    --------
    >>> print(describe_cube(stf.synthetic_scene(64, 64, n_times=4)))  # doctest: +SKIP
    """
    store = None
    if not isinstance(cube, xr.Dataset):
        store = str(cube)
        cube = open_cube(cube)
    validate_cube(cube)
    import rioxarray  # noqa: F401  (registers .rio)

    times = cube["time"].values
    fractions = _valid_fractions(cube)
    fine, coarse = fractions["fine"], fractions["coarse"]
    n_y, n_x = int(cube.sizes["y"]), int(cube.sizes["x"])
    size = pixel_size(cube)
    x, y = cube["x"].values, cube["y"].values
    lines = [f"stf cube{': ' + store if store else ''}"]
    if "catalog" in cube.attrs:
        lines.append(f"  catalog: {cube.attrs['catalog']}")
    if "title" in cube.attrs and cube.attrs["title"] != cube.attrs.get("catalog"):
        lines.append(f"  title: {cube.attrs['title']}")
    lines += [
        f"  dates: {times.size} ({np.datetime_as_string(times[0], unit='D')} .. "
        f"{np.datetime_as_string(times[-1], unit='D')})",
        f"  bands: {', '.join(map(str, cube['band'].values))}",
        f"  grid: {n_y} x {n_x} pixels (y, x), pixel size {size:g}, "
        f"x {x.min() - size / 2:.6g} .. {x.max() + size / 2:.6g}, "
        f"y {y.min() - size / 2:.6g} .. {y.max() + size / 2:.6g}",
        f"  CRS: {_crs_text(cube)}",
        f"  coarse_factor: {cube.attrs.get('coarse_factor', 'not set')}",
    ]
    variables = []
    for name, var in cube.data_vars.items():
        chunks = var.chunks
        chunk_text = "in memory" if chunks is None else "chunks " + "x".join(str(c[0]) for c in chunks)
        units = var.attrs.get("units")
        variables.append(f"{name} {var.dtype}{f' [{units}]' if units else ''} ({chunk_text})")
    lines.append("  variables: " + "; ".join(variables))
    source = _sources(cube)
    if source is not None:
        n_fused = int(np.sum(source == "fused"))
        lines.append(f"  fused cube: {n_fused} fused date(s), {source.size - n_fused} observed date(s)")
    else:
        n_pairs = int(np.sum((fine > 0) & (coarse > 0)))
        n_targets = int(np.sum((fine == 0) & (coarse > 0)))
        lines.append(f"  {n_pairs} pair date(s) (fine and coarse), {n_targets} coarse-only date(s) (fusion targets)")
    header = f"  {'date':<10}  {'role':<11}  {'fine missing':>12}  {'coarse missing':>14}"
    truth = fractions.get("fine_truth")
    if truth is not None:
        header += f"  {'truth missing':>13}"
    lines.append(header)
    for i, t in enumerate(times):
        if source is not None:
            role = str(source[i])
        elif fine[i] > 0 and coarse[i] > 0:
            role = "pair"
        elif coarse[i] > 0:
            role = "coarse-only"
        elif fine[i] > 0:
            role = "fine-only"
        else:
            role = "empty"
        row = (
            f"  {np.datetime_as_string(t, unit='D'):<10}  {role:<11}  "
            f"{_percent(1 - fine[i]):>12}  {_percent(1 - coarse[i]):>14}"
        )
        if truth is not None:
            row += f"  {_percent(1 - truth[i]):>13}"
        lines.append(row)
    hidden = ("title", "catalog", "coarse_factor", "description", STORE_MARKER, "stf_pipeline_source")
    extra = {k: v for k, v in cube.attrs.items() if k not in hidden}
    if extra:
        lines.append("  attrs: " + ", ".join(f"{k}={_short(v)}" for k, v in extra.items()))
    return "\n".join(lines)
