"""``fsdaf``: Flexible Spatiotemporal DAta Fusion (Zhu et al. 2016, RSE 172:165-177), one pair.

FSDAF predicts the fine image at the target date from one fine+coarse pair by unmixing the coarse
change per land-cover class, then correcting the residual with a thin-plate-spline (TPS)
prediction that captures land-cover change. Steps (paper section and the authors' IDL code
``FSDAF.pro``, 2019 version, whose defaults are used):

(a) **classes** of the fine pair image: a user class map (``class_map``, a data var of the cube),
    or class centres fitted once on a subsample of the whole pair image (:func:`fit_statistics`):
    seeded k-means with ``n_classes=4`` by default, or ISODATA with 4-6 classes and the other
    parameters of the authors' ENVI call (``classifier="isodata"``), each pixel taking its
    nearest centre (:func:`classify`);
(b) **class fractions** in every native coarse pixel ("cell", ``coarse_factor²`` fine pixels,
    :func:`class_fractions`);
(c) **class change** by *constrained* least squares (paper Eq. 3-4, :func:`unmix_change`): for
    every cell, in the ``(2·unmix_radius+1)²`` cells around it, the ``n_pure=100`` purest cells of
    each class (fraction > 0.01) whose coarse change lies within that class's 10th-90th
    percentiles give the rows of ``ΔC = Σ_c f_c Δf_c``; ``Δf`` is bounded to
    ``[min ΔC - std ΔC, max ΔC + std ΔC]`` over the window (IDL ``P_OLS`` with
    ``CONSTRAINED_MIN``), solved by a batched active-set method
    (:func:`stf_pipeline.kernels.lstsq.box_lstsq`). The window
    moves with the cell, so the change varies across large scenes;
(d) **temporal prediction** ``F_TP = F1 + Δf(class)`` and its coarse **residual**
    ``R = ΔC - Σ_c f_c Δf_c`` (Eq. 5-8, :func:`residuals`);
(e) **TPS prediction** of the target coarse image on the fine grid (Eq. 10-13): a true
    thin-plate spline through the cell centres within ``tps_radius`` cells of each cell
    (:func:`stf_pipeline.kernels.tps.local_tps`);
(f) **residual distribution** weighted by the homogeneity index (Eq. 14-20,
    :func:`heterogeneity`, :func:`distribute_residual`), clamped to the allowed range;
(g) **neighbourhood smoothing** (Eq. 21-24): the change of the ``n_similar=20`` most similar
    pixels within ``half_window=20`` pixels (:func:`similar_pixel_blend`), as in the IDL code's
    2017 revision: candidates are pixels within a per-band threshold ``2σ/n_classes`` rather than
    of the same class, and the weight includes the spectral difference as well as the distance.
    This step is most of the work: a compiled Numba scan on the CPU, ``lax.top_k`` over row
    strips with JAX.

Backend ``numba`` (the CPU reference) compiles each step; ``jax`` runs the whole block in one
device program (:func:`~stf_pipeline.methods.fsdaf.jax.fsdaf_block`). Windows stop only at the
block edge, class centres and noise clip are fitted once per scene (``METHOD.statistics``) and the
halo covers the longest dependency chain, so chunked equals unchunked (``docs/methods/fsdaf.md``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numpy as np

from stf_pipeline.exceptions import MethodError
from stf_pipeline.kernels.classify import isodata, kmeans, nearest_centre
from stf_pipeline.kernels.tps import local_tps
from stf_pipeline.methods._base import MethodContext
from stf_pipeline.methods.fsdaf import jax as jax_kernels
from stf_pipeline.methods.fsdaf import numba as numba_kernels
from stf_pipeline.methods.fsdaf.params import ISODATA_MIN_PIXELS, NOISE_QUANTILES, FSDAFParams
from stf_pipeline.methods.fsdaf.residual import (
    allowed_range,
    distribute_residual,
    heterogeneity,
    residuals,
    similarity_threshold,
    temporal_prediction,
)
from stf_pipeline.methods.fsdaf.unmix import cell_mean, class_fractions, unmix_change


def classify(fine: np.ndarray, params: FSDAFParams, class_map: np.ndarray | None = None) -> np.ndarray:
    """Class index ``(y, x)`` int32 of each fine pixel, ``-1`` where unknown (NaN).

    From ``class_map`` (values looked up in ``params.class_values``) if given, else the nearest
    of ``params.centres``.
    """
    if params.class_map is not None:
        if class_map is None:
            raise MethodError(
                f"fsdaf: class_map={params.class_map!r} was not passed to the kernel; run through "
                "stf.fuse (which reads the map from the cube) or pass extra={name: array}."
            )
        cmap = np.asarray(class_map, dtype=np.float64)
        if cmap.shape != fine.shape[1:]:
            raise MethodError(
                f"fsdaf: class map block has shape {cmap.shape}, the fine block {fine.shape[1:]}; "
                "the class map must be a (y, x) variable on the fine grid."
            )
        known = np.isfinite(cmap)
        if params.class_values is not None:
            values = np.unique(np.asarray(params.class_values, dtype=np.float64))
            index = np.clip(np.searchsorted(values, cmap), 0, len(values) - 1)
            known &= values[index] == cmap
        else:
            index = np.where(known, cmap, 0.0)
            bad = known & ((index != np.round(index)) | (index < 0) | (index >= params.n_classes))
            if bad.any():
                raise MethodError(
                    f"fsdaf: class map value {cmap[bad][0]!r} is not a class id in [0, n_classes={params.n_classes}); "
                    "list the class values, e.g. class_values=(1, 2, 3, 4) (other values are unclassified)."
                )
        labels = np.where(known, index, -1).astype(np.int32)
        labels[~np.isfinite(fine).all(axis=0)] = -1
        return labels
    return nearest_centre(fine, _centres(params))


def _centres(params: FSDAFParams) -> np.ndarray:
    """The class centres ``(class, band)`` float64 (error if none)."""
    if params.centres is None:
        raise MethodError(
            "fsdaf: no class centres; stf.fuse fits them (METHOD.statistics), or pass centres=... "
            "or class_map=...."
        )
    return np.asarray(params.centres, dtype=np.float64)


def _rank_factor(radius: int) -> np.ndarray:
    """Distance factor ``10 + d / r`` of the ranking key per window offset, float32 ``(2r+1, 2r+1)``."""
    dy, dx = np.meshgrid(np.arange(-radius, radius + 1), np.arange(-radius, radius + 1), indexing="ij")
    return np.float32(10.0) + (np.sqrt(dy * dy + dx * dx) / radius).astype(np.float32)


def similar_pixel_blend(
    fine: np.ndarray,
    change: np.ndarray,
    threshold: np.ndarray,
    *,
    half_window: int,
    n_similar: int,
    backend: str = "numba",
) -> np.ndarray:
    """Weighted change of the most similar pixels around each pixel (paper Eq. 21-24, IDL rules).

    Candidates within ``half_window`` (window truncated at the image edge) differ from the
    pixel by less than ``threshold`` in every band and have a finite change; the pixel itself
    always is one. They are ranked by the float32 key ``(S + 1e-5)(10 + d / w)`` with
    ``S = Σ_b |F_b(x') - F_b(x)| / F_b(x)`` and ``d`` the distance in pixels (IDL), the
    ``n_similar`` first kept (equal keys: the earlier offset in row-major window order, as in the
    reference) and weighted by ``1 / ((1 + d / w)(1 + S))``.

    Parameters
    ----------
    fine : ndarray ``(band, y, x)``
    change : ndarray ``(band, y, x)``
    threshold : ndarray ``(band, y, x)``
    half_window, n_similar : int
    backend : {"numba", "jax"}, default "numba"
        ``numba``: a compiled per-pixel scan with a sorted buffer of the best candidates, rows
        shared over the CPU cores (:mod:`stf_pipeline.methods.fsdaf.numba`); ``jax``: all keys of
        a row strip and ``lax.top_k`` (:mod:`stf_pipeline.methods.fsdaf.jax`), for GPUs. Both
        choose the same pixels; the weights are float64 with Numba, float32 with JAX.

    Returns
    -------
    ndarray ``(band, y, x)`` float64
        The weighted change; NaN where the pixel is NaN or has no candidate.
    """
    r = half_window
    k = min(n_similar, (2 * r + 1) ** 2)
    use = np.isfinite(fine).all(axis=0) & np.isfinite(change).all(axis=0)
    args = (fine, change, threshold, use, _rank_factor(r))
    if backend == "jax":
        return jax_kernels.blend(*args, radius=r, k=k)
    return numba_kernels.blend(*args, radius=r, k=k)


def _clip_bounds(params: FSDAFParams, n_bands: int) -> np.ndarray:
    """Clip of the fine image per band, ``(2, band)`` float64: the noise clip within the valid range."""
    lo, hi = params.valid_range
    if params.fine_clip is None:
        return np.array([[lo] * n_bands, [hi] * n_bands], dtype=np.float64)
    bounds = np.asarray(params.fine_clip, dtype=np.float64)
    return np.stack([np.maximum(bounds[:, 0], lo), np.minimum(bounds[:, 1], hi)])


def _clip_fine(fine: np.ndarray, params: FSDAFParams) -> np.ndarray:
    low, high = _clip_bounds(params, fine.shape[0])[:, :, None, None]
    return np.clip(fine, low, high)


def _on_device(
    fine: np.ndarray, coarse: np.ndarray, coarse_target: np.ndarray, params: FSDAFParams, class_map: np.ndarray | None
) -> np.ndarray:
    """The whole block on JAX's default device (:func:`stf_pipeline.methods.fsdaf.jax.fsdaf_block`);
    only a class map's lookup runs on the host."""
    labels_given = params.class_map is not None
    f1 = np.asarray(fine[0])
    classes = classify(f1, params, class_map) if labels_given else _centres(params)
    settings = jax_kernels.BlockSettings(
        factor=int(params.coarse_factor or 1),
        n_classes=params.n_class_total,
        unmix_radius=params.unmix_radius,
        n_pure=params.n_pure,
        tps_radius=params.tps_radius,
        half_window=params.half_window,
        n_similar=params.n_similar,
        valid_range=(float(params.valid_range[0]), float(params.valid_range[1])),
        labels_given=labels_given,
    )
    clip = _clip_bounds(params, f1.shape[0])
    rank = _rank_factor(params.half_window)
    return jax_kernels.fsdaf_block(f1, np.asarray(coarse[0]), np.asarray(coarse_target), classes, clip, rank,
                                   settings=settings)


def fsdaf_kernel(
    fine: np.ndarray,
    coarse: np.ndarray,
    coarse_target: np.ndarray,
    *,
    params: FSDAFParams,
    model: object | None = None,
    extra: dict[str, np.ndarray] | None = None,
    backend: str = "numba",
) -> np.ndarray:
    """FSDAF on one block (see module docstring for the steps): ``numba`` compiles every step for
    the CPU, ``jax`` runs every step on JAX's default device in one program
    (:mod:`stf_pipeline.methods.fsdaf.jax`).

    Parameters
    ----------
    fine, coarse : ndarray ``(1, band, y, x)``
    coarse_target : ndarray ``(band, y, x)``
    params : FSDAFParams
        With ``coarse_factor`` set and ``centres`` (or ``class_map``) given.
    model : ignored
    backend : {"numba", "jax"}, default "numba"
    extra : dict, optional
        ``{params.class_map: (y, x) block}`` when a class map is used.

    Returns
    -------
    ndarray ``(band, y, x)`` float32
    """
    if params.coarse_factor is None:
        raise MethodError("fsdaf: params.coarse_factor is not set; run through stf.fuse or fsdaf.prepare.")
    class_map = None if params.class_map is None or extra is None else extra.get(params.class_map)
    if backend == "jax":
        return _on_device(fine, coarse, coarse_target, params, class_map)
    factor = int(params.coarse_factor)
    f1 = np.asarray(fine[0], dtype=np.float64)
    c1 = np.asarray(coarse[0], dtype=np.float64)
    c2 = np.asarray(coarse_target, dtype=np.float64)
    labels = classify(f1, params, class_map)
    n_classes = params.n_class_total
    f1c = np.where(np.isfinite(f1), _clip_fine(f1, params), np.nan)
    fractions, complete = class_fractions(labels, n_classes, factor)
    c2_cells = cell_mean(c2, factor)
    dc = c2_cells - cell_mean(c1, factor)
    usable = complete & np.isfinite(dc).all(axis=0)
    change = unmix_change(fractions, dc, usable, radius=params.unmix_radius, n_pure=params.n_pure)
    temporal = temporal_prediction(f1c, labels, change, factor)
    residual = residuals(dc, fractions, change)
    tps = local_tps(c2_cells, factor, params.tps_radius, f1.shape[1:])
    het = heterogeneity(labels, params.half_window)
    low, high = allowed_range(c2, f1c, labels, change, factor, params.unmix_radius, params.valid_range)
    # clip(F_TP + distributed residual, allowed range) - F1
    pixel_change = distribute_residual(residual, tps, temporal, het, factor, bounds=(low, high, f1c))
    del tps, het, temporal, f1c  # large blocks: keep the peak memory down
    h, w = labels.shape
    cy = (np.arange(h) // factor)[:, None]
    cx = (np.arange(w) // factor)[None, :]
    threshold = similarity_threshold(f1, labels, n_classes, factor, params.unmix_radius)[:, cy, cx]
    blended = f1 + similar_pixel_blend(
        f1, pixel_change, threshold, half_window=params.half_window, n_similar=params.n_similar, backend=backend
    )
    return _range_fix(blended, f1, c1, c2, params.valid_range).astype(np.float32)


def _range_fix(
    pred: np.ndarray, f1: np.ndarray, c1: np.ndarray, c2: np.ndarray, valid_range: tuple[float, float]
) -> np.ndarray:
    """IDL's last correction: outside ``valid_range``, use ``F1 + C(t) - C(t1)``, clipped to it."""
    lo, hi = valid_range
    fallback = np.clip(f1 + c2 - c1, lo, hi)
    return np.where((pred < lo) | (pred > hi), fallback, pred)


#: FSDAF of one block, backend ``numba`` (the reference): every step compiled for the CPU.
fsdaf_numba = functools.partial(fsdaf_kernel, backend="numba")
#: FSDAF of one block, backend ``jax``: every step with JAX on its default device, one compiled
#: program per block shape (:func:`stf_pipeline.methods.fsdaf.jax.fsdaf_block`).
fsdaf_jax = functools.partial(fsdaf_kernel, backend="jax")


def prepare(params: FSDAFParams, context: MethodContext, model: object | None = None) -> FSDAFParams:
    """Take ``coarse_factor`` from the cube (error if the cube has none)."""
    if params.coarse_factor is not None:
        return params
    if context.coarse_factor is None:
        raise MethodError(
            "fsdaf needs the native coarse pixel size: set cube.attrs['coarse_factor'] (e.g. 16 for 480 m "
            "coarse on 30 m fine) or pass coarse_factor=16."
        )
    return dataclasses.replace(params, coarse_factor=int(context.coarse_factor))


def summarize(fine: Any, coarse: Any, coarse_target: Any, params: FSDAFParams) -> tuple[Any, ...] | None:
    """``SceneStatistics.summarize``: a regular-stride sample of about ``n_samples`` pixels of the
    pair fine image (a lazy slice for Dask), unless centres (or a class map) and the clip are given.

    Raises
    ------
    MethodError
        If the scene has fewer coarse pixels than classes.
    """
    h, w = fine.shape[-2:]
    factor = int(params.coarse_factor or 1)
    n_cells = -(-h // factor) * -(-w // factor)
    if params.n_class_total > n_cells:
        raise MethodError(
            f"fsdaf: {params.n_class_total} classes exceed the {n_cells} coarse pixels of the scene; unmixing needs "
            f"at least one coarse pixel per class: use n_classes <= {n_cells} (or merge classes of the map)."
        )
    if params.fine_clip is not None and (params.class_map is not None or params.centres is not None):
        return None
    stride = max(1, int(math.floor(math.sqrt(h * w / params.n_samples))))
    return fine[0, :, ::stride, ::stride], stride


def fit_statistics(params: FSDAFParams, sample: np.ndarray, stride: int) -> FSDAFParams:
    """``SceneStatistics.fit``: k-means (or ISODATA) centres unless a class map or centres are given,
    and the 0.01/99.99 percentile noise clip, from the sample of :func:`summarize`.

    The sample is every ``stride``-th pixel in y and x: ISODATA's minimum class size (pixels of
    the whole image in the IDL code) is divided by ``stride²``.
    """
    flat = np.asarray(sample, dtype=np.float64).reshape(sample.shape[0], -1).T
    flat = flat[np.isfinite(flat).all(axis=1)]
    if flat.shape[0] == 0:
        raise MethodError("fsdaf: the pair fine image has no valid pixel; choose another pair date.")
    updates: dict[str, Any] = {}
    if params.fine_clip is None:
        q = np.quantile(flat, NOISE_QUANTILES, axis=0)
        updates["fine_clip"] = tuple((float(lo), float(hi)) for lo, hi in q.T)
    if params.class_map is None and params.centres is None:
        if params.classifier == "isodata":
            centres = isodata(
                flat,
                min_classes=params.n_classes,
                max_classes=params.max_classes,
                min_pixels=max(1, round(ISODATA_MIN_PIXELS / stride**2)),
            )
        else:
            centres = kmeans(flat, params.n_classes, seed=params.seed)
        updates["centres"] = tuple(tuple(float(v) for v in row) for row in centres)
    return dataclasses.replace(params, **updates) if updates else params


def extra_vars(params: FSDAFParams) -> tuple[str, ...]:
    """Per-pixel cube variables the kernel needs in ``extra`` (the class map, if any)."""
    return (params.class_map,) if params.class_map is not None else ()


def halo(params: FSDAFParams, context: MethodContext) -> int:
    """Longest dependency of an output pixel: a similar pixel's cell window, or its homogeneity window."""
    factor = int(params.coarse_factor or context.coarse_factor or 1)
    cells = -(-params.half_window // factor) + max(params.unmix_radius, params.tps_radius) + 1
    return max(factor * cells, 2 * params.half_window)
