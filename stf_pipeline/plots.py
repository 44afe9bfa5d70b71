"""Figures a user would rather look at than read: the BiaSTF paper's Figures 4 and 7–10 for any cube.

Every function takes the truth and a ``{label: prediction}`` mapping of ``(band, y, x)``
DataArrays on one grid, returns a :class:`matplotlib.figure.Figure` (shown inline in Jupyter) and
writes it as PNG when given ``path``. Figures are built without :mod:`matplotlib.pyplot`, so they
work under any backend (Agg on servers) and leave no global state behind.

* :func:`plot_composites` — truth and predictions as true- or false-colour composites with one
  shared stretch (percentiles of the truth) and a zoom box (Figures 7/8). Its title names the
  date, which band is drawn in which colour and the stretch; a scale bar gives the distances.
* :func:`plot_change` — change ``ΔF`` from a reference (pair) date, true and predicted (Figure 9).
* :func:`plot_bias` — fine-minus-coarse bias, true and predicted, and the prediction error
  (bias-error) maps (Figure 10).
* :func:`plot_scatter` — per-band density of prediction against truth with the 1:1 line.
* :func:`plot_losses` — loss curves of learned methods (Figure 4).
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr
from matplotlib import cm, colors
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from scipy import ndimage

from stf_pipeline.exceptions import PlotError

#: band names of the composites by kind
COMPOSITES: dict[str, tuple[str, str, str]] = {
    "true": ("red", "green", "blue"),
    "false": ("nir", "red", "green"),
}
PathLike = str | os.PathLike[str]


# --------------------------------------------------------------------------- helpers
def _as_image(arr: xr.DataArray, name: str) -> xr.DataArray:
    if not isinstance(arr, xr.DataArray) or not {"band", "y", "x"} <= set(arr.dims):
        raise PlotError(
            f"{name} must be an xarray.DataArray with dims (band, y, x), got "
            f"{getattr(arr, 'dims', type(arr).__name__)}; select one date, e.g. .sel(time=...)."
        )
    extra = [d for d in arr.dims if d not in ("band", "y", "x")]
    if extra:
        raise PlotError(f"{name} has extra dims {extra}; select one value of each, e.g. .isel({extra[0]}=0).")
    return arr.transpose("band", "y", "x")


def _check_inputs(
    truth: xr.DataArray, predictions: Mapping[str, xr.DataArray]
) -> tuple[xr.DataArray, dict[str, xr.DataArray]]:
    truth = _as_image(truth, "truth")
    if not predictions:
        raise PlotError("no predictions to plot; pass {'method name': prediction, ...}.")
    preds = {}
    for label, pred in predictions.items():
        pred = _as_image(pred, f"prediction {label!r}")
        if pred.shape[1:] != truth.shape[1:]:
            raise PlotError(
                f"prediction {label!r} has grid {pred.shape[1:]}, the truth {truth.shape[1:]}; "
                "plot images on the same grid."
            )
        preds[str(label)] = pred
    return truth, preds


def _bands(arr: xr.DataArray) -> list[str]:
    return [str(b) for b in arr["band"].values]


def resolve_bands(available: Sequence[str], bands: str | Sequence[str]) -> tuple[str, ...]:
    """Band names of a composite: ``"true"``, ``"false"`` or explicit names (1 or 3 of them)."""
    names = COMPOSITES.get(bands, None) if isinstance(bands, str) else tuple(bands)
    if names is None:
        raise PlotError(f"unknown composite {bands!r}; use 'true', 'false' or a tuple of 1 or 3 band names.")
    missing = [b for b in names if b not in available]
    if missing:
        raise PlotError(
            f"bands {missing} of composite {bands!r} are not in the image (bands {list(available)}); "
            f"pass bands=(r, g, b) from those, e.g. bands={tuple(available[:3])!r}."
        )
    if len(names) not in (1, 3):
        raise PlotError(f"a composite takes 1 (grey) or 3 (RGB) bands, got {names}.")
    return names


def stretch_limits(
    image: xr.DataArray, bands: Sequence[str], percentiles: tuple[float, float] = (2.0, 98.0)
) -> np.ndarray:
    """Per-band ``(low, high)`` display limits: percentiles of the valid pixels, shape ``(n, 2)``."""
    data = np.asarray(image.sel(band=list(bands)).values, dtype=np.float64)
    limits = np.empty((len(bands), 2))
    for i, band in enumerate(data):
        valid = band[np.isfinite(band)]
        if valid.size == 0:
            raise PlotError(f"band {bands[i]!r} of the reference image is all NaN; nothing to stretch on.")
        lo, hi = np.percentile(valid, percentiles)
        limits[i] = (lo, hi if hi > lo else lo + 1e-6)
    return limits


def to_rgb(image: xr.DataArray, bands: Sequence[str], limits: np.ndarray) -> np.ndarray:
    """``(y, x, 4)`` RGBA in [0, 1] (linear stretch between ``limits``, NaN transparent)."""
    data = np.asarray(image.sel(band=list(bands)).values, dtype=np.float64)
    scaled = (data - limits[:, 0, None, None]) / (limits[:, 1] - limits[:, 0])[:, None, None]
    rgb = np.clip(np.moveaxis(scaled, 0, -1), 0, 1)
    if rgb.shape[-1] == 1:
        rgb = np.repeat(rgb, 3, axis=-1)
    alpha = np.isfinite(rgb).all(-1, keepdims=True).astype(np.float64)
    return np.concatenate([np.nan_to_num(rgb), alpha], axis=-1)


def worst_window(truth: xr.DataArray, predictions: Mapping[str, xr.DataArray], size: int) -> tuple[int, int, int, int]:
    """``(row0, row1, col0, col1)`` of the ``size``-pixel square where the predictions err most."""
    ny, nx = truth.sizes["y"], truth.sizes["x"]
    size = int(min(size, ny, nx))
    t = np.asarray(truth.values, dtype=np.float64)
    err = sum(np.abs(np.asarray(p.values, dtype=np.float64) - t) for p in predictions.values())
    err = np.nan_to_num(err).mean(axis=0)  # invalid pixels count as no error
    smooth = ndimage.uniform_filter(err, size=size, mode="constant")
    half = size // 2
    inner = smooth[half : ny - (size - half) + 1, half : nx - (size - half) + 1]
    i, j = np.unravel_index(int(np.argmax(inner)), inner.shape)
    return int(i), int(i) + size, int(j), int(j) + size


def composite_text(bands: str | Sequence[str], names: Sequence[str]) -> str:
    """Which band is drawn in which colour: ``true colour, R,G,B = red, green, blue``."""
    if len(names) == 1:
        return f"grey = {names[0]}"
    mapping = f"R,G,B = {', '.join(names)}"
    return f"{bands} colour, {mapping}" if isinstance(bands, str) else mapping


def image_date(image: xr.DataArray) -> str | None:
    """The ISO date of a one-date image (its scalar ``time`` or ``target`` coordinate), else None."""
    for name in ("time", "target"):
        if name in image.coords and image[name].ndim == 0:
            value = image[name].values
            return str(np.datetime_as_string(value, unit="D") if value.dtype.kind == "M" else value)
    return None


def ground_units(image: xr.DataArray) -> tuple[float, str] | None:
    """``(pixel size, unit)`` along x in the image's CRS: metres for projected CRSs, degrees for
    geographic ones, nominal metres without a CRS; None when the pixel size is unknown."""
    if image.sizes["x"] < 2:
        return None
    size = float(abs(image["x"].values[1] - image["x"].values[0]))
    crs = None
    try:
        import rioxarray  # noqa: F401  (registers .rio)

        crs = image.rio.crs
    except Exception:  # noqa: BLE001  (no or an unreadable CRS: a nominal grid)
        crs = None
    if crs is not None and crs.is_geographic:
        return size, "°"
    return size, "m" if crs is not None else "m (nominal grid)"


def _nice_length(length: float) -> float:
    """The largest of 1, 2, 5 x 10^k not above ``length``."""
    power = 10 ** np.floor(np.log10(length))
    return float(max(m for m in (1, 2, 5) if m * power <= length) * power)


def _scale_bar(ax: Any, pixels: int, units: tuple[float, str]) -> None:
    """A bar of a round ground length (about a quarter of the panel width) in the lower left corner."""
    size, unit = units
    length = _nice_length(pixels * size / 4)
    if unit.startswith("m") and length >= 1000:
        label = f"{length / 1000:g} km{unit[1:]}"
    else:
        label = f"{length:g} {unit}" if unit != "°" else f"{length:g}°"
    bar = length / size
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()  # images: y0 is the bottom edge (the larger row)
    left = x0 + 0.05 * (x1 - x0)
    bottom = y0 - 0.07 * (y0 - y1)
    ax.plot([left, left + bar], [bottom, bottom], color="black", linewidth=4, solid_capstyle="butt")
    ax.plot([left, left + bar], [bottom, bottom], color="white", linewidth=2, solid_capstyle="butt")
    ax.text(left, bottom - 0.04 * (y0 - y1), label, color="white", fontsize=7, va="bottom", ha="left",
            bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "linewidth": 0})
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)


def _save(fig: Figure, path: PathLike | None, dpi: int) -> Figure:
    if path is not None:
        os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
        fig.savefig(path, dpi=dpi)
    return fig


def _symmetric_limit(arrays: Sequence[np.ndarray], percentile: float = 98.0) -> float:
    values = np.concatenate([np.abs(a[np.isfinite(a)]).ravel() for a in arrays])
    if values.size == 0:
        return 1.0
    limit = float(np.percentile(values, percentile))
    return limit if limit > 0 else float(values.max()) or 1.0


def _label_axes(ax: Any, title: str) -> None:
    """Title, no ticks, and a hatched background so that NaN (no data) never looks like a value."""
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_facecolor("white")
    ax.patch.set_hatch("////")
    ax.patch.set_edgecolor("0.65")


def _suptitle(fig: Figure, text: str, fontsize: float = 10) -> None:
    """Figure title wrapped to the figure width, so that it is never clipped."""
    chars = max(20, int(fig.get_figwidth() * 72 / (0.6 * fontsize)))
    fig.suptitle(textwrap.fill(text, chars), fontsize=fontsize)


def _nodata_note(*arrays: Any) -> str:
    """``"; hatched = no data"`` if any of the images has NaN pixels, else ``""``."""
    return "; hatched = no data" if any(np.isnan(np.asarray(a, dtype=np.float64)).any() for a in arrays) else ""


# --------------------------------------------------------------------------- figures
def plot_composites(
    truth: xr.DataArray,
    predictions: Mapping[str, xr.DataArray],
    *,
    bands: str | Sequence[str] = "true",
    zoom: tuple[int, int, int, int] | None = None,
    percentiles: tuple[float, float] = (2.0, 98.0),
    title: str | None = None,
    date: str | None = None,
    scale_bar: bool = True,
    panel_size: float = 2.6,
    path: PathLike | None = None,
    dpi: int = 120,
) -> Figure:
    """Truth and predictions as composites with one shared stretch and a zoom box (Figures 7/8).

    The figure's title says what is drawn: the date, which band is drawn in which colour (``true
    colour, R,G,B = red, green, blue``), the stretch (``2–98 % per band of the truth, shared by
    all panels``) and the zoom window; the truth panels carry a scale bar in the CRS's units.

    Parameters
    ----------
    truth : xarray.DataArray
        ``(band, y, x)``; its percentiles set the stretch used for every panel.
    predictions : mapping of str to xarray.DataArray
        ``{method label: (band, y, x) prediction}`` on the truth's grid.
    bands : "true", "false" or sequence of str
        ``"true"`` = (red, green, blue), ``"false"`` = (nir, red, green), or 3 band names
        (RGB) or 1 (grey).
    zoom : (row0, row1, col0, col1), optional
        Pixel window shown enlarged in the second row and boxed in the first; default: the
        square (a quarter of the scene side) where the predictions err most.
    percentiles : (float, float), default (2, 98)
        Linear stretch between these percentiles of the truth, per band.
    title : str, optional
        Put first in the figure title (e.g. the run's name); the description follows.
    date : str, optional
        The date shown; default the truth's scalar ``time`` (or ``target``) coordinate.
    scale_bar : bool, default True
        Draw a scale bar (needs the ``x`` coordinate's pixel size) on the truth panels.
    panel_size : float
        Inches per panel.
    path : path-like, optional
        Write the figure as PNG here.
    dpi : int

    Returns
    -------
    matplotlib.figure.Figure
    """
    date = date if date is not None else image_date(truth)
    truth, preds = _check_inputs(truth, predictions)
    names = resolve_bands(_bands(truth), bands)
    limits = stretch_limits(truth, names, percentiles)
    ny, nx = truth.sizes["y"], truth.sizes["x"]
    if zoom is None:
        zoom = worst_window(truth.sel(band=list(names)), {k: v.sel(band=list(names)) for k, v in preds.items()},
                            max(8, min(ny, nx) // 4))
    r0, r1, c0, c1 = (int(v) for v in zoom)
    if not (0 <= r0 < r1 <= ny and 0 <= c0 < c1 <= nx):
        raise PlotError(f"zoom window {zoom} is outside the {ny}×{nx} image; give (row0, row1, col0, col1) inside it.")
    panels = {"truth": truth, **preds}
    fig = Figure(figsize=(panel_size * len(panels), panel_size * 2 + 0.6), layout="constrained")
    axes = fig.subplots(2, len(panels), squeeze=False)
    for k, (label, image) in enumerate(panels.items()):
        rgba = to_rgb(image, names, limits)
        axes[0, k].imshow(rgba, interpolation="nearest")
        axes[0, k].add_patch(
            Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0, r1 - r0, fill=False, edgecolor="yellow", linewidth=1.5)
        )
        _label_axes(axes[0, k], label)
        axes[1, k].imshow(rgba[r0:r1, c0:c1], interpolation="nearest")
        for side in axes[1, k].spines.values():
            side.set_edgecolor("yellow")
            side.set_linewidth(1.5)
        _label_axes(axes[1, k], f"{label}: zoom")
    if len(names) == 1:
        scale = cm.ScalarMappable(colors.Normalize(*limits[0]), cmap="gray")
        fig.colorbar(scale, ax=axes, label=f"{names[0]} (shared stretch)", shrink=0.8, extend="both")
    units = ground_units(truth) if scale_bar else None
    if units is not None:
        _scale_bar(axes[0, 0], nx, units)
        _scale_bar(axes[1, 0], c1 - c0, units)
    stretch = f"stretch {percentiles[0]:g}–{percentiles[1]:g} % per band of the truth, shared by all panels"
    note = _nodata_note(*(p.sel(band=list(names)).values for p in panels.values()))
    text = "; ".join(
        part for part in (
            date, composite_text(bands, names), stretch, f"yellow box: zoom, rows {r0}–{r1}, cols {c0}–{c1}"
        ) if part
    )
    _suptitle(fig, (f"{title}: {text}" if title else text[0].upper() + text[1:]) + note)
    return _save(fig, path, dpi)


def _diverging_row(
    fig: Figure,
    axes: np.ndarray,
    maps: Mapping[str, np.ndarray],
    *,
    limit: float,
    label: str,
    cmap: str = "RdBu_r",
) -> None:
    norm = colors.Normalize(-limit, limit)
    for ax, (title, data) in zip(axes, maps.items(), strict=True):
        ax.imshow(data, cmap=cmap, norm=norm, interpolation="nearest")
        _label_axes(ax, title)
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=list(axes), label=label, shrink=0.9, extend="both")


def plot_change(
    truth: xr.DataArray,
    predictions: Mapping[str, xr.DataArray],
    reference: xr.DataArray,
    *,
    band: str | None = None,
    reference_label: str = "pair date",
    percentile: float = 98.0,
    panel_size: float = 2.8,
    path: PathLike | None = None,
    dpi: int = 120,
) -> Figure:
    """Change maps ``ΔF`` from a reference fine image: true, predicted, and their difference (Figure 9).

    Row 1: ``truth − reference`` and ``prediction − reference`` per method; row 2: the error of
    the predicted change (``prediction − truth``). Each row shares one symmetric colour scale
    (``percentile`` of the absolute true change, resp. error).

    Parameters
    ----------
    truth, reference : xarray.DataArray
        ``(band, y, x)`` fine images at the target and at the reference (pair) date.
    predictions : mapping of str to xarray.DataArray
    band : str, optional
        Band to show; default ``nir`` if present, else the first band.
    reference_label : str
        How to name the reference date in titles (e.g. its ISO date).
    percentile, panel_size, path, dpi
        See :func:`plot_composites`.
    """
    truth, preds = _check_inputs(truth, predictions)
    reference = _as_image(reference, "reference")
    band = _default_band(truth, band)
    t = _band(truth, band)
    ref = _band(reference, band)
    change = {"true ΔF": t - ref, **{f"{k} ΔF": _band(v, band) - ref for k, v in preds.items()}}
    error = {f"{k}: ΔF error": _band(v, band) - t for k, v in preds.items()}
    n = len(change)
    fig = Figure(figsize=(panel_size * n + 1.2, panel_size * 2 + 0.6), layout="constrained")
    axes = fig.subplots(2, n, squeeze=False)
    _diverging_row(fig, axes[0], change, limit=_symmetric_limit([change["true ΔF"]], percentile),
                   label=f"ΔF {band} (reflectance)")
    axes[1, 0].set_axis_off()
    axes[1, 0].text(0.5, 0.5, "row 2:\npredicted ΔF\n− true ΔF\n(= prediction\n− truth)", ha="center",
                    va="center", fontsize=9, transform=axes[1, 0].transAxes)
    _diverging_row(fig, axes[1, 1:], error, limit=_symmetric_limit(list(error.values()), percentile),
                   label=f"error {band} (reflectance)", cmap="PuOr_r")
    note = _nodata_note(*change.values(), *error.values())
    _suptitle(fig, f"Change of {band} from {reference_label} to the target date: true vs predicted{note}")
    return _save(fig, path, dpi)


def plot_bias(
    truth: xr.DataArray,
    predictions: Mapping[str, xr.DataArray],
    coarse: xr.DataArray,
    *,
    band: str | None = None,
    percentile: float = 98.0,
    panel_size: float = 2.8,
    path: PathLike | None = None,
    dpi: int = 120,
) -> Figure:
    """Bias maps (fine − coarse at the target date) and bias-error maps (Figure 10).

    Row 1: the true bias ``truth − coarse`` and each method's ``prediction − coarse``; row 2: each
    method's bias error ``prediction − truth``. Each row shares one symmetric colour scale.

    Parameters
    ----------
    truth, coarse : xarray.DataArray
        ``(band, y, x)`` fine truth and coarse image (on the fine grid) at the target date.
    predictions : mapping of str to xarray.DataArray
    band : str, optional
        Default ``nir`` if present, else the first band.
    percentile, panel_size, path, dpi
        See :func:`plot_composites`.
    """
    truth, preds = _check_inputs(truth, predictions)
    coarse = _as_image(coarse, "coarse")
    band = _default_band(truth, band)
    t = _band(truth, band)
    c = _band(coarse, band)
    bias = {"true bias (fine − coarse)": t - c, **{f"{k} − coarse": _band(v, band) - c for k, v in preds.items()}}
    error = {f"{k}: bias error": _band(v, band) - t for k, v in preds.items()}
    n = len(bias)
    fig = Figure(figsize=(panel_size * n + 1.2, panel_size * 2 + 0.6), layout="constrained")
    axes = fig.subplots(2, n, squeeze=False)
    _diverging_row(fig, axes[0], bias, limit=_symmetric_limit(list(bias.values())[:1], percentile),
                   label=f"bias {band} (reflectance)")
    axes[1, 0].set_axis_off()
    axes[1, 0].text(0.5, 0.5, "row 2:\nbias error\n= prediction\n− truth", ha="center", va="center", fontsize=9,
                    transform=axes[1, 0].transAxes)
    _diverging_row(fig, axes[1, 1:], error, limit=_symmetric_limit(list(error.values()), percentile),
                   label=f"error {band} (reflectance)", cmap="PuOr_r")
    note = _nodata_note(*bias.values(), *error.values())
    _suptitle(fig, f"Fine-minus-coarse bias of {band} at the target date, and the error of each prediction{note}")
    return _save(fig, path, dpi)


def plot_scatter(
    truth: xr.DataArray,
    predictions: Mapping[str, xr.DataArray],
    *,
    bands: Sequence[str] | None = None,
    bins: int = 80,
    panel_size: float = 2.6,
    path: PathLike | None = None,
    dpi: int = 120,
) -> Figure:
    """Per-band density of prediction vs truth, with the 1:1 line and RMSE/CC/bias in each panel.

    Rows are methods, columns are bands; the axes of one band share limits (0.5–99.5 % of the
    truth and predictions together) and all panels one logarithmic count scale.

    Parameters
    ----------
    truth : xarray.DataArray
    predictions : mapping of str to xarray.DataArray
    bands : sequence of str, optional
        Default: all bands of the truth.
    bins : int
        Histogram bins per axis.
    panel_size, path, dpi
        See :func:`plot_composites`.
    """
    truth, preds = _check_inputs(truth, predictions)
    bands = list(bands) if bands is not None else _bands(truth)
    missing = [b for b in bands if b not in _bands(truth)]
    if missing:
        raise PlotError(f"bands {missing} are not in the image (bands {_bands(truth)}); pick from those.")
    valid = np.isfinite(np.asarray(truth.values)).all(0)
    for p in preds.values():
        valid &= np.isfinite(np.asarray(p.values)).all(0)
    if not valid.any():
        raise PlotError("no pixel is valid in the truth and every prediction; nothing to scatter.")
    hists: dict[tuple[int, int], np.ndarray] = {}
    edges: dict[int, np.ndarray] = {}
    stats: dict[tuple[int, int], str] = {}
    for j, band in enumerate(bands):
        t = _band(truth, band)[valid]
        every = np.concatenate([t, *(_band(p, band)[valid] for p in preds.values())])
        lo, hi = np.percentile(every, [0.5, 99.5])
        pad = 0.05 * (hi - lo) if hi > lo else 0.01
        edges[j] = np.linspace(lo - pad, hi + pad, bins + 1)
        for i, p in enumerate(preds.values()):
            v = _band(p, band)[valid]
            hists[i, j] = np.histogram2d(t, v, bins=(edges[j], edges[j]))[0].T
            d = v - t
            cc = np.corrcoef(v, t)[0, 1] if v.std() > 0 and t.std() > 0 else np.nan
            stats[i, j] = f"RMSE {np.sqrt(np.mean(d * d)):.4f}\nCC {cc:.3f}\nbias {d.mean():+.4f}"
    vmax = max(float(h.max()) for h in hists.values())
    norm = colors.LogNorm(1, max(vmax, 2))
    fig = Figure(figsize=(panel_size * len(bands) + 1.2, panel_size * len(preds) + 0.5), layout="constrained")
    axes = fig.subplots(len(preds), len(bands), squeeze=False)
    for i, label in enumerate(preds):
        for j, band in enumerate(bands):
            ax = axes[i, j]
            e = edges[j]
            h = np.where(hists[i, j] > 0, hists[i, j], np.nan)
            ax.imshow(h, origin="lower", extent=(e[0], e[-1], e[0], e[-1]), norm=norm, cmap="viridis",
                              interpolation="nearest")
            ax.plot([e[0], e[-1]], [e[0], e[-1]], color="red", linewidth=0.8, label="1:1")
            ax.set_xlim(e[0], e[-1])
            ax.set_ylim(e[0], e[-1])
            ax.set_aspect("equal")
            ax.tick_params(labelsize=7)
            ax.text(0.03, 0.97, stats[i, j], transform=ax.transAxes, va="top", fontsize=7,
                    bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none"})
            if i == 0:
                ax.set_title(band, fontsize=10)
            if i == len(preds) - 1:
                ax.set_xlabel("truth", fontsize=8)
            if j == 0:
                ax.set_ylabel(f"{label}\nprediction", fontsize=8)
    axes[0, -1].legend(loc="lower right", fontsize=7)
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap="viridis"), ax=axes, label="pixels per bin", shrink=0.8)
    _suptitle(fig, f"Prediction vs truth ({int(valid.sum())} pixels valid in all images)")
    return _save(fig, path, dpi)


def plot_losses(
    history: Sequence[float] | Mapping[str, Any],
    *,
    keys: Sequence[str] = ("loss", "val_loss"),
    log: bool = True,
    title: str = "Training loss",
    path: PathLike | None = None,
    dpi: int = 120,
) -> Figure:
    """Loss curves of learned methods (Figure 4).

    Parameters
    ----------
    history : sequence of float or mapping
        One of: a list of per-step losses; ``{name: list of losses}`` (one curve each, e.g. one
        per method); a training history ``{"step": [...], "loss": [...], "val_step": [...],
        "val_loss": [...]}``; or per-stage histories ``{stage: history}`` as stored in a fitted
        model's ``history`` (stages are drawn one after another on a global step axis).
    keys : sequence of str
        Which readings of a training history to draw (``loss``, ``rmse``, ``val_loss``...).
    log : bool
        Logarithmic loss axis.
    title, path, dpi
        See :func:`plot_composites`.
    """
    curves = _loss_curves(history, keys)
    if not curves:
        raise PlotError("the loss history is empty; train for at least one logged step.")
    fig = Figure(figsize=(6.4, 3.8), layout="constrained")
    ax = fig.subplots()
    for label, (steps, values) in curves.items():
        style = "--" if "val" in label else "-"
        ax.plot(steps, values, style, label=label, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if log and all(np.all(np.asarray(v) > 0) for _, v in curves.values()):
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return _save(fig, path, dpi)


def _loss_curves(
    history: Sequence[float] | Mapping[str, Any], keys: Sequence[str]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    def steps_of(h: Mapping[str, Any], key: str) -> np.ndarray:
        step_key = "val_step" if key.startswith("val_") else "step"
        n = len(h[key])
        return np.asarray(h.get(step_key, np.arange(1, n + 1)), dtype=float)[:n]

    if not isinstance(history, Mapping):
        values = np.asarray(list(history), dtype=float)
        return {"loss": (np.arange(1, values.size + 1, dtype=float), values)} if values.size else {}
    if "step" in history or set(keys) & set(history):  # one training history
        return {k: (steps_of(history, k), np.asarray(history[k], float)) for k in keys if len(history.get(k, []))}
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    offset = 0.0
    for name, h in history.items():
        if isinstance(h, Mapping):
            last = offset
            for k in keys:
                if len(h.get(k, [])):
                    steps = steps_of(h, k) + offset
                    curves[f"{name} {k}"] = (steps, np.asarray(h[k], float))
                    last = max(last, float(steps.max()))
            offset = last
        else:
            values = np.asarray(list(h), dtype=float)
            if values.size:
                curves[str(name)] = (np.arange(1, values.size + 1, dtype=float), values)
    return curves


def _default_band(image: xr.DataArray, band: str | None) -> str:
    names = _bands(image)
    if band is None:
        return "nir" if "nir" in names else names[0]
    if band not in names:
        raise PlotError(f"band {band!r} is not in the image (bands {names}); pick one of those.")
    return band


def _band(image: xr.DataArray, band: str) -> np.ndarray:
    return np.asarray(image.sel(band=band).values, dtype=np.float64)
