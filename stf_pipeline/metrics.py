"""Accuracy of a fused image against the held-out truth: RMSE, CC, SSIM, bias, MAE, ERGAS, SAM.

``evaluate(pred, truth)`` takes two DataArrays with dims ``band, y, x`` (any further dims, such
as ``time``, are kept: one score per date) and returns a Dataset:

========  ===========  =====================================================================
name      dims         definition (over the pixels valid in every band of both images)
========  ===========  =====================================================================
rmse      band         ``sqrt(mean((P - T)**2))``
mae       band         ``mean(|P - T|)``
bias      band         ``mean(P - T)`` (positive: prediction too bright)
cc        band         Pearson correlation of ``P`` and ``T``
ssim      band         mean structural similarity, Wang et al. (2004), Gaussian window
ergas     (scene)      ``100 * ratio * sqrt(mean_b((rmse_b / mean(T_b))**2))``, Wald (2002)
sam       (scene)      mean spectral angle ``arccos(<P, T> / (|P| |T|))`` in radians
n_valid   (scene)      number of pixels scored
========  ===========  =====================================================================

Validity is one mask per pixel: a pixel that is NaN (or infinite) in any band of the prediction
or of the truth, or ``False`` in ``mask``, is excluded from every band and every metric.

SSIM follows Wang et al. (2004) exactly as ``skimage.metrics.structural_similarity(..,
gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=R)`` does: local
means, variances and covariance under a Gaussian window (σ = 1.5, truncated at 3.5 σ, so an
11 × 11 window), ``C1 = (0.01 R)²``, ``C2 = (0.03 R)²``, and the SSIM map averaged over the
pixels at least the window radius (5 px) from the image border. Where pixels are invalid, the
local moments are weighted by the valid pixels only (normalised convolution), and the map is
averaged over valid pixels; without invalid pixels this is skimage's number.

Dask-backed inputs give a lazy graph that is computed once (``compute=True``) or returned lazy
(``compute=False``); the SSIM filter runs over overlapping chunks (``map_overlap`` with depth =
window radius, ``boundary='none'``), so a chunked evaluation equals the unchunked one.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator, Mapping
from typing import cast

import dask.array as da
import numpy as np
import xarray as xr
from scipy import ndimage

from stf_pipeline.exceptions import EvaluationError

#: Wang et al. (2004) constants, as in skimage with ``gaussian_weights=True``.
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03

SPATIAL_DIMS: tuple[str, str] = ("y", "x")
BAND_DIM = "band"

#: metric name -> True if larger is better (used to mark the best method in tables).
HIGHER_IS_BETTER: dict[str, bool] = {
    "rmse": False,
    "mae": False,
    "bias": False,  # judged by |bias|
    "cc": True,
    "ssim": True,
    "ergas": False,
    "sam": False,
}
PER_BAND: tuple[str, ...] = ("rmse", "cc", "ssim", "bias", "mae")
PER_SCENE: tuple[str, ...] = ("ergas", "sam")


def ssim_radius(sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE) -> int:
    """Half width of the Gaussian SSIM window: ``int(truncate * sigma + 0.5)`` (5 for σ = 1.5)."""
    return int(truncate * sigma + 0.5)


def evaluate(
    pred: xr.DataArray,
    truth: xr.DataArray,
    *,
    mask: xr.DataArray | np.ndarray | None = None,
    ratio: float | None = None,
    data_range: float | Mapping[str, float] = 1.0,
    compute: bool = True,
) -> xr.Dataset:
    """Score a prediction against the truth, per band and per scene.

    Parameters
    ----------
    pred, truth : xarray.DataArray
        Dims ``band, y, x`` in any order, plus optional extra dims (e.g. ``time``) shared by both;
        same grid (``y``/``x`` coordinates) and same band names (the order may differ: truth is
        reordered to the prediction's). NaN marks missing pixels.
    mask : xarray.DataArray or numpy.ndarray of bool, optional
        ``True`` where pixels are to be scored; dims ``y, x`` (a NumPy array) or any subset of the
        prediction's dims (a DataArray; a ``band`` dim is reduced with *all*).
    ratio : float, optional
        ERGAS resolution ratio, fine pixel size / coarse pixel size (e.g. 30 / 480). Default:
        ``1 / coarse_factor`` from the ``coarse_factor`` attr of ``pred`` or ``truth``; without
        either, ``ergas`` is NaN and a warning says so.
    data_range : float or mapping band -> float, default 1.0
        SSIM dynamic range ``R`` (1.0 for reflectance in [0, 1]; e.g. 40.0 for land-surface
        temperature in kelvin). Recorded in the result's attrs.
    compute : bool, default True
        Compute the scores (one Dask compute for all of them). ``False`` returns the lazy
        Dataset; the checks on valid pixels then run when its ``n_valid`` is computed.

    Returns
    -------
    xarray.Dataset
        ``rmse, mae, bias, cc, ssim`` (dims ``band`` + extra dims), ``ergas, sam, n_valid``
        (extra dims only), float64; attrs name the SSIM settings and the ERGAS ratio.

    Raises
    ------
    EvaluationError
        If the inputs differ in grid, dims or bands, if the truth is all NaN, or if no pixel is
        valid in both images (and ``mask``).

    Examples
    --------
    >>> scores = stf.evaluate(pred, cube.fine_truth.sel(time=pred.time))  # doctest: +SKIP
    >>> scores.rmse.sel(band="nir").item()  # doctest: +SKIP
    """
    pred, truth = _align_pair(pred, truth)
    ratio = _ergas_ratio(pred, truth, ratio)
    bands = [str(b) for b in pred[BAND_DIM].values]
    ranges = _data_ranges(data_range, bands)
    extra = [d for d in pred.dims if d not in (BAND_DIM, *SPATIAL_DIMS)]
    order = (*extra, BAND_DIM, *SPATIAL_DIMS)
    pred = pred.transpose(*order)
    truth = truth.transpose(*order)

    # numpy's stubs type ufuncs of DataArrays as ndarrays; xarray returns DataArrays (hence the casts)
    truth_finite = cast(xr.DataArray, np.isfinite(truth))
    valid = (cast(xr.DataArray, np.isfinite(pred)) & truth_finite).all(BAND_DIM)
    if mask is not None:
        valid = valid & _as_mask(mask, pred)
    n_truth = truth_finite.sum((BAND_DIM, *SPATIAL_DIMS))
    n_valid = valid.sum(SPATIAL_DIMS)
    n_valid = xr.apply_ufunc(
        _require_valid, n_valid, n_truth, dask="parallelized", output_dtypes=[np.int64]
    )

    p = pred.astype(np.float64).where(valid)
    t = truth.astype(np.float64).where(valid)
    with _quiet():
        diff = p - t
        bias = diff.mean(SPATIAL_DIMS)
        rmse = cast(xr.DataArray, np.sqrt((diff**2).mean(SPATIAL_DIMS)))
        mae = abs(diff).mean(SPATIAL_DIMS)
        p_mean = p.mean(SPATIAL_DIMS)
        t_mean = t.mean(SPATIAL_DIMS)
        pa, ta = p - p_mean, t - t_mean
        spread = cast(xr.DataArray, np.sqrt((pa**2).mean(SPATIAL_DIMS) * (ta**2).mean(SPATIAL_DIMS)))
        cc = (pa * ta).mean(SPATIAL_DIMS) / spread.where(spread > 0)
        ergas = 100.0 * ratio * np.sqrt(((rmse / t_mean.where(t_mean != 0)) ** 2).mean(BAND_DIM, skipna=False))
        sam = _spectral_angle(p, t).mean(SPATIAL_DIMS)
        ssim = _ssim(p, t, ranges)

    scores = xr.Dataset(
        {
            "rmse": rmse,
            "cc": cc,
            "ssim": ssim,
            "bias": bias,
            "mae": mae,
            "ergas": ergas,
            "sam": sam,
            "n_valid": n_valid,
        }
    )
    scores = scores.drop_vars([c for c in scores.coords if c not in scores.dims])
    for name, text in _UNITS.items():
        scores[name].attrs["long_name"] = text
    scores.attrs.update(
        {
            "ssim_sigma": SSIM_SIGMA,
            "ssim_truncate": SSIM_TRUNCATE,
            "ssim_K1": SSIM_K1,
            "ssim_K2": SSIM_K2,
            "ssim_data_range": [ranges[b] for b in bands],
            "ergas_ratio": ratio,
            "sam_units": "radians",
        }
    )
    if not compute:
        return scores
    with _quiet():
        return scores.compute()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the NumPy warnings of empty or constant selections: those scores are NaN by design."""
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)
        warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
        yield


_UNITS: dict[str, str] = {
    "rmse": "root mean square error",
    "cc": "Pearson correlation coefficient",
    "ssim": "structural similarity (Wang et al. 2004, Gaussian sigma=1.5)",
    "bias": "mean error, prediction minus truth",
    "mae": "mean absolute error",
    "ergas": "ERGAS (Wald 2002), percent",
    "sam": "mean spectral angle, radians",
    "n_valid": "number of pixels scored",
}


def _require_valid(n_valid: np.ndarray, n_truth: np.ndarray) -> np.ndarray:
    if np.any(np.asarray(n_truth) == 0):
        raise EvaluationError(
            "the truth image is all NaN, so there is nothing to score against; "
            "check that the truth date has a fine observation (fine_truth) and pick another target if not."
        )
    if np.any(np.asarray(n_valid) == 0):
        raise EvaluationError(
            "no pixel is valid in every band of both the prediction and the truth (and the mask); "
            "check the prediction for NaN (a method that failed everywhere) or loosen the mask."
        )
    return np.asarray(n_valid, dtype=np.int64)


def _align_pair(pred: xr.DataArray, truth: xr.DataArray) -> tuple[xr.DataArray, xr.DataArray]:
    """Check that ``pred`` and ``truth`` share dims, grid and bands; reorder truth's bands."""
    for name, arr in (("pred", pred), ("truth", truth)):
        if not isinstance(arr, xr.DataArray):
            raise EvaluationError(
                f"{name} must be an xarray.DataArray with dims (band, y, x), got {type(arr).__name__}; "
                "select one variable, e.g. cube['fine_truth'].sel(time=...)."
            )
        missing = [d for d in (BAND_DIM, *SPATIAL_DIMS) if d not in arr.dims]
        if missing:
            raise EvaluationError(
                f"{name} has dims {tuple(arr.dims)} and lacks {missing}; "
                "evaluate images with dims (band, y, x) (use expand_dims('band') for a single band)."
            )
    if set(pred.dims) != set(truth.dims):
        raise EvaluationError(
            f"pred dims {tuple(pred.dims)} differ from truth dims {tuple(truth.dims)}; "
            "select the same dates from both (e.g. truth.sel(time=pred.time)) so the dims match."
        )
    pred_bands = [str(b) for b in pred[BAND_DIM].values]
    truth_bands = [str(b) for b in truth[BAND_DIM].values]
    if sorted(pred_bands) != sorted(truth_bands):
        raise EvaluationError(
            f"pred bands {pred_bands} differ from truth bands {truth_bands}; "
            f"select the common bands from both, e.g. .sel(band={sorted(set(pred_bands) & set(truth_bands))})."
        )
    for dim in pred.dims:
        if pred.sizes[dim] != truth.sizes[dim]:
            raise EvaluationError(
                f"pred and truth differ in size along {dim!r} ({pred.sizes[dim]} vs {truth.sizes[dim]}); "
                "they must be on the same grid: reproject one onto the other (rio.reproject_match)."
            )
    for dim in SPATIAL_DIMS:
        if dim in pred.coords and dim in truth.coords:
            a, b = np.asarray(pred[dim].values), np.asarray(truth[dim].values)
            spacing = float(np.abs(a[1] - a[0])) if a.size > 1 else 1.0
            if not np.allclose(a, b, rtol=0, atol=1e-3 * spacing):  # a thousandth of a pixel
                raise EvaluationError(
                    f"pred and truth are on different grids: their {dim!r} coordinates differ "
                    f"(pred {a[0]:.6g}..{a[-1]:.6g}, truth {b[0]:.6g}..{b[-1]:.6g}); "
                    "reproject one onto the other (rio.reproject_match) or crop both to the same window."
                )
    truth = truth.transpose(*pred.dims)
    if truth_bands != pred_bands:
        truth = truth.isel({BAND_DIM: [truth_bands.index(b) for b in pred_bands]})
    for dim in pred.dims:
        if dim not in (BAND_DIM, *SPATIAL_DIMS) and dim in pred.coords and dim in truth.coords:
            if not np.array_equal(pred[dim].values, truth[dim].values):
                raise EvaluationError(
                    f"pred and truth hold different {dim!r} values; select the same ones from both."
                )
    index = {d: pred[d].values for d in pred.dims if d in pred.coords}
    pred = pred.drop_vars(list(pred.coords)).assign_coords(index)
    truth = truth.drop_vars(list(truth.coords)).assign_coords(index)
    return pred, truth


def _ergas_ratio(pred: xr.DataArray, truth: xr.DataArray, ratio: float | None) -> float:
    """ERGAS ratio, given or ``1 / coarse_factor`` from the attrs; NaN (with a warning) if unknown."""
    if ratio is None:
        factor = pred.attrs.get("coarse_factor", truth.attrs.get("coarse_factor"))
        if factor is None:
            warnings.warn(
                "ERGAS needs the fine/coarse pixel-size ratio and neither pred nor truth has a "
                "'coarse_factor' attr, so ergas is NaN; pass ratio=1/cube.attrs['coarse_factor'] "
                "(e.g. ratio=30/480).",
                UserWarning,
                stacklevel=3,
            )
            return float("nan")
        ratio = 1.0 / float(factor)
    ratio = float(ratio)
    if not 0 < ratio <= 1:
        raise EvaluationError(
            f"ERGAS ratio must be fine/coarse pixel size in (0, 1], got {ratio}; e.g. ratio=30/480 for "
            "Landsat on MODIS."
        )
    return ratio


def _data_ranges(data_range: float | Mapping[str, float], bands: list[str]) -> dict[str, float]:
    if isinstance(data_range, Mapping):
        missing = [b for b in bands if b not in data_range]
        if missing:
            raise EvaluationError(
                f"data_range gives no value for band(s) {missing}; give every band "
                f"({bands}) or one float for all."
            )
        ranges = {b: float(data_range[b]) for b in bands}
    else:
        ranges = {b: float(data_range) for b in bands}
    for band, value in ranges.items():
        if not (np.isfinite(value) and value > 0):
            raise EvaluationError(
                f"SSIM data_range for band {band!r} must be a positive number, got {value}; "
                "use 1.0 for reflectance in [0, 1]."
            )
    return ranges


def _as_mask(mask: xr.DataArray | np.ndarray, like: xr.DataArray) -> xr.DataArray:
    if not isinstance(mask, xr.DataArray):
        arr = np.asarray(mask)
        if arr.shape != (like.sizes["y"], like.sizes["x"]):
            raise EvaluationError(
                f"a NumPy mask must have shape (y, x) = {(like.sizes['y'], like.sizes['x'])}, got {arr.shape}; "
                "pass an xarray.DataArray to mask along other dims."
            )
        mask = xr.DataArray(arr, dims=SPATIAL_DIMS)
    if mask.dtype != bool:
        raise EvaluationError(
            f"mask must be boolean (True where pixels are scored), got dtype {mask.dtype}; "
            "build it with a comparison, e.g. cube.fine_truth.notnull()."
        )
    unknown = [d for d in mask.dims if d not in like.dims]
    if unknown:
        raise EvaluationError(f"mask has dims {unknown} that the prediction lacks; drop or select them.")
    for dim in mask.dims:
        if mask.sizes[dim] != like.sizes[dim]:
            raise EvaluationError(
                f"mask size along {dim!r} is {mask.sizes[dim]}, the prediction's is {like.sizes[dim]}; "
                "build the mask on the prediction's grid."
            )
    mask = mask.drop_vars(list(mask.coords))
    if BAND_DIM in mask.dims:
        mask = mask.all(BAND_DIM)
    return mask.assign_coords({d: like[d].values for d in mask.dims if d in like.coords})


def _spectral_angle(p: xr.DataArray, t: xr.DataArray) -> xr.DataArray:
    """Per-pixel angle between the spectra; NaN where invalid or where a spectrum is all zero."""
    dot = (p * t).sum(BAND_DIM, skipna=False)
    norm = cast(xr.DataArray, np.sqrt((p**2).sum(BAND_DIM, skipna=False) * (t**2).sum(BAND_DIM, skipna=False)))
    cos = (dot / norm.where(norm > 0)).clip(-1.0, 1.0)
    return cast(xr.DataArray, np.arccos(cos))


def ssim_map(
    x: np.ndarray,
    y: np.ndarray,
    *,
    c1: np.ndarray,
    c2: np.ndarray,
    sigma: float = SSIM_SIGMA,
    truncate: float = SSIM_TRUNCATE,
) -> np.ndarray:
    """SSIM map of two ``(..., band, y, x)`` float64 blocks, NaN where either is invalid.

    Local moments are Gaussian-weighted averages over the valid pixels (normalised convolution);
    ``c1``/``c2`` are per-band ``(K R)²`` constants broadcastable to ``(band, 1, 1)``. Each output
    pixel depends only on inputs within :func:`ssim_radius` pixels, so the map of an
    overlapping block equals the same region of the whole-scene map.
    """
    valid = np.isfinite(x) & np.isfinite(y)
    w = valid.astype(np.float64)
    x0 = np.where(valid, x, 0.0)
    y0 = np.where(valid, y, 0.0)
    sig = (0.0,) * (x.ndim - 2) + (sigma, sigma)
    smooth = functools.partial(ndimage.gaussian_filter, sigma=sig, truncate=truncate, mode="reflect")
    with np.errstate(invalid="ignore", divide="ignore"):
        weight = smooth(w)
        weight = np.where(weight > 0, weight, np.nan)
        ux = smooth(x0) / weight
        uy = smooth(y0) / weight
        vx = smooth(x0 * x0) / weight - ux * ux
        vy = smooth(y0 * y0) / weight - uy * uy
        vxy = smooth(x0 * y0) / weight - ux * uy
        s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return np.where(valid, s, np.nan)


def _ssim(p: xr.DataArray, t: xr.DataArray, ranges: dict[str, float]) -> xr.DataArray:
    """Mean SSIM per band over valid pixels at least the window radius from the border."""
    radius = ssim_radius()
    bands = [str(b) for b in p[BAND_DIM].values]
    r = np.array([ranges[b] for b in bands], dtype=np.float64)[:, None, None]
    c1, c2 = (SSIM_K1 * r) ** 2, (SSIM_K2 * r) ** 2
    func = functools.partial(ssim_map, c1=c1, c2=c2)
    if isinstance(p.data, da.Array) or isinstance(t.data, da.Array):
        pa = da.asarray(p.data).rechunk({p.ndim - 3: -1})
        ta = da.asarray(t.data).rechunk(pa.chunks)
        depth = {p.ndim - 2: radius, p.ndim - 1: radius}
        data = da.map_overlap(
            func,
            pa,
            ta,
            depth=depth,
            boundary="none",
            dtype=np.float64,
            meta=np.empty((0,) * p.ndim, np.float64),
            align_arrays=False,
        )
    else:
        data = func(np.asarray(p.data), np.asarray(t.data))
    smap = p.copy(data=data)
    ny, nx = p.sizes["y"], p.sizes["x"]
    inner_y = xr.DataArray((np.arange(ny) >= radius) & (np.arange(ny) < ny - radius), dims="y")
    inner_x = xr.DataArray((np.arange(nx) >= radius) & (np.arange(nx) < nx - radius), dims="x")
    inner_y = inner_y.assign_coords(y=p["y"].values) if "y" in p.coords else inner_y
    inner_x = inner_x.assign_coords(x=p["x"].values) if "x" in p.coords else inner_x
    return smap.where(inner_y & inner_x).mean(SPATIAL_DIMS)


def best_indices(values: np.ndarray, metric: str) -> list[int]:
    """Indices of the best of ``values`` for ``metric``, ties included (|bias| smallest for bias).

    Empty if every value is NaN.
    """
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).any():
        return []
    if metric == "bias":
        score = -np.abs(values)
    elif HIGHER_IS_BETTER[metric]:
        score = values
    else:
        score = -values
    score = np.where(np.isfinite(score), score, -np.inf)
    return [int(i) for i in np.flatnonzero(score == score.max())]
