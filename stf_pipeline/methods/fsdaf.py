"""``fsdaf``: Flexible Spatiotemporal DAta Fusion (Zhu et al. 2016, RSE 172:165-177), one pair.

FSDAF predicts the fine image at the target date from one fine+coarse pair by unmixing the coarse
change per land-cover class, then correcting the residual with a thin-plate-spline (TPS)
prediction that captures land-cover change. Steps (paper section and the authors' IDL code
``FSDAF.pro``, 2019 version, whose defaults are used):

(a) **classes** of the fine pair image: a user class map (``class_map``, a data var of the cube),
    or class centres fitted once on a subsample of the whole pair image (:func:`statistics`):
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
    ``CONSTRAINED_MIN``), solved by a batched active-set method (:func:`box_lstsq`). The window
    moves with the cell, so the change varies across large scenes;
(d) **temporal prediction** ``F_TP = F1 + Δf(class)`` and its coarse **residual**
    ``R = ΔC - Σ_c f_c Δf_c`` (Eq. 5-8, :func:`residuals`);
(e) **TPS prediction** of the target coarse image on the fine grid (Eq. 10-13): a true
    thin-plate spline through the cell centres within ``tps_radius`` cells of each cell
    (:func:`stf_pipeline.methods._tps.local_tps`);
(f) **residual distribution** weighted by the homogeneity index (Eq. 14-20,
    :func:`heterogeneity`, :func:`distribute_residual`), clamped to the allowed range;
(g) **neighbourhood smoothing** (Eq. 21-24): the change of the ``n_similar=20`` most similar
    pixels within ``half_window=20`` pixels (:func:`similar_pixel_blend`), as in the IDL code's
    2017 revision: candidates are pixels within a per-band threshold ``2σ/n_classes`` rather than
    of the same class, and the weight includes the spectral difference as well as the distance.
    This step is 95 % of the work: a compiled Numba scan on the CPU, ``lax.top_k`` over row
    strips with JAX on a GPU (``backend``), both choosing the same pixels.

Chunk-border correctness
------------------------
Everything a block computes is either per pixel or a function of a fixed neighbourhood: class
centres and the fine clip are scene-wide parameters fitted once before the blocks run
(:func:`statistics`, lazily for Dask input); every window (unmixing, allowed range, similarity
threshold, TPS, homogeneity, similar pixels) is centred on the cell or pixel and truncated only at
the block edge. The halo is ``max(coarse_factor · (ceil(half_window / coarse_factor) + max(unmix_radius,
tps_radius) + 1), 2 · half_window)`` fine pixels, which covers the longest dependency chains
(similar pixel → its cell → that cell's window; similar pixel → its homogeneity window), and the
engine aligns blocks to cells (``coarse_aligned=True``). So every output pixel sees exactly the
data it sees in an unchunked run; window sums are accumulated
in a fixed order and every cell's small systems are solved on their own, so chunked equals
unchunked (bitwise in practice; the tests allow 1e-6 for batched LAPACK/BLAS rounding).

Where this differs from the authors' code (all deliberate): statistics that the IDL code takes
over a whole 30x30-cell processing block (unmixing samples and bounds, allowed value range,
similarity threshold) are taken over the moving ``unmix_radius`` window, so they do not depend on
how the scene is tiled; the fine-image noise clip (0.01/99.99 percentiles) is global; the constraint
is kept (the authors' Python port drops it); the out-of-range clamp enforces both bounds; ties in
purity are broken by distance to the cell; classes are fitted on a subsample (k-means by default,
our ISODATA with the IDL parameters on request) rather than by ENVI's ISODATA on every pixel.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import numpy as np
from scipy import ndimage, optimize

from stf_pipeline.exceptions import MethodError
from stf_pipeline.methods._base import MethodContext, MethodSpec
from stf_pipeline.methods._classify import isodata, kmeans, nearest_centre
from stf_pipeline.methods._tps import local_tps
from stf_pipeline.methods._window import box_sum

#: Fraction above which a cell "contains" a class (IDL: ``Fraction1 gt 0.01``).
MIN_FRACTION = 0.01
#: Percentiles of the coarse change kept among the purest cells (IDL: ``Percentiles=[0.1, 0.9]``).
CHANGE_PERCENTILES = (0.1, 0.9)
#: Quantiles of the fine image clipped as noise (IDL: ``Percentiles=[0.0001, 0.9999]``).
NOISE_QUANTILES = (0.0001, 0.9999)
#: Cap on normalised residual weights (IDL: ``w_change gt 10``).
MAX_RESIDUAL_WEIGHT = 10.0
#: Added to residual weights (IDL: ``+0.000001`` on a 0-10000 scale, i.e. 1e-10 in reflectance).
RESIDUAL_EPS = 1e-10
#: ISODATA's minimum class size in pixels of the whole image (IDL: ``ISO_MIN_PIXELS = 200``).
ISODATA_MIN_PIXELS = 200
#: Ridge pulling a class with no samples towards the window's mean change (keeps systems regular).
RIDGE = 1e-6


@dataclasses.dataclass(frozen=True)
class FSDAFParams:
    """Parameters of FSDAF. Defaults are the authors' (IDL ``FSDAF.pro``) unless stated.

    Attributes
    ----------
    half_window : int, default 20
        Half side of the similar-pixel and homogeneity windows, fine pixels (IDL ``w=20``).
    n_similar : int, default 20
        Similar pixels per target pixel (IDL ``num_similar_pixel=20``).
    n_classes : int, default 4
        k-means classes when no class map is given (IDL ISODATA: 4 to 6 classes; 4 is the
        ISODATA minimum and the number of classes of the authors' sample class map); with
        ``classifier="isodata"`` the minimum number of classes (IDL ``min_class = 4``).
    classifier : {"kmeans", "isodata"}, default "kmeans"
        How the pair image is classified without a class map: seeded k-means with ``n_classes``
        classes, or ISODATA with ``n_classes`` to ``max_classes`` classes and the other
        parameters of the IDL code (:func:`stf_pipeline.methods._classify.isodata`), fitted on the
        same subsample.
    max_classes : int, default 6
        ISODATA's maximum number of classes (IDL ``max_class = 6``).
    class_map : str, optional
        Name of a ``(y, x)`` data var of the cube holding a classification of the pair fine
        image. Overrides k-means. Its values are the class ids ``0 .. n_classes - 1`` unless
        ``class_values`` lists them; NaN (and values not listed) = unclassified.
    n_pure : int, default 100
        Purest cells per class used for unmixing (IDL ``num_pure=100``).
    unmix_radius : int, default 8
        Half side, in cells, of the moving window for unmixing, allowed range and similarity
        threshold. The IDL code uses fixed 30x30-cell blocks; 17x17 cells is our choice: on
        ``zhu_fsdaf_lgc`` radius 5 was worse (RMSE 0.0203) and 12 or 15 no better (0.0200) than 8
        (0.0200), while the halo grows with it.
    tps_radius : int, default 3
        Half side, in cells, of the knot neighbourhood of each local thin-plate spline (our
        choice: 7x7 knots; 5 gives the same RMSE on ``zhu_fsdaf_lgc`` at more cost).
    valid_range : (float, float), default (0.0, 1.0)
        Physical range of reflectance (IDL ``DN_min``/``DN_max`` = 0/10000 at scale 1e-4).
    n_samples : int, default 20000
        Pixels sampled (regular stride) from the pair image to fit k-means and the noise clip
        (our choice; the IDL code classifies every pixel with ENVI ISODATA).
    seed : int, default 0
        Seed of the k-means++ initialisation.
    coarse_factor : int, optional
        Filled from the cube's ``coarse_factor`` attr by :func:`prepare`.
    centres : tuple of tuples, optional
        k-means class centres ``(class, band)``; fitted by :func:`statistics` when ``None``.
    class_values : tuple of float, optional
        The values of the class map that are classes (e.g. ``(1, 2, 3, 4)`` for an ENVI map
        whose 0 is "Unclassified").
    fine_clip : tuple of (float, float), optional
        Per-band clip of the fine pair image (noise); filled by :func:`statistics`, none if ``None``.
    backend : {"auto", "numba", "jax"}, default "auto"
        Implementation of the similar-pixel step (g), 95 % of the work (:func:`similar_pixel_blend`):
        ``auto`` takes JAX on a GPU/TPU and Numba on the CPU.
    """

    half_window: int = 20
    n_similar: int = 20
    n_classes: int = 4
    classifier: Literal["kmeans", "isodata"] = "kmeans"
    max_classes: int = 6
    class_map: str | None = None
    n_pure: int = 100
    unmix_radius: int = 8
    tps_radius: int = 3
    valid_range: tuple[float, float] = (0.0, 1.0)
    n_samples: int = 20000
    seed: int = 0
    coarse_factor: int | None = None
    centres: tuple[tuple[float, ...], ...] | None = None
    class_values: tuple[float, ...] | None = None
    fine_clip: tuple[tuple[float, float], ...] | None = None
    backend: Literal["auto", "numba", "jax"] = "auto"

    def __post_init__(self) -> None:
        for name in ("half_window", "n_similar", "n_pure", "unmix_radius", "tps_radius", "n_samples"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise MethodError(f"fsdaf: {name} must be a positive integer, got {value!r}.")
        if not isinstance(self.n_classes, (int, np.integer)) or self.n_classes < 2:
            raise MethodError(f"fsdaf: n_classes must be an integer >= 2, got {self.n_classes!r}.")
        if self.classifier not in ("kmeans", "isodata"):
            raise MethodError(f"fsdaf: classifier must be 'kmeans' or 'isodata', got {self.classifier!r}.")
        if self.classifier == "isodata" and not (
            isinstance(self.max_classes, (int, np.integer)) and self.max_classes >= self.n_classes
        ):
            raise MethodError(
                f"fsdaf: ISODATA needs max_classes >= n_classes (the minimum), got max_classes={self.max_classes!r} "
                f"and n_classes={self.n_classes}; e.g. n_classes=4, max_classes=6 as the authors' code."
            )
        if self.backend not in ("auto", "numba", "jax"):
            raise MethodError(f"fsdaf: backend must be 'auto', 'numba' or 'jax', got {self.backend!r}.")
        lo, hi = self.valid_range
        if not lo < hi:
            raise MethodError(f"fsdaf: valid_range must be (low, high) with low < high, got {self.valid_range!r}.")
        if self.coarse_factor is not None and (int(self.coarse_factor) != self.coarse_factor or self.coarse_factor < 1):
            raise MethodError(f"fsdaf: coarse_factor must be a positive integer, got {self.coarse_factor!r}.")
        if self.class_map is not None and not isinstance(self.class_map, str):
            raise MethodError(
                f"fsdaf: class_map must name a (y, x) data var of the cube, got {type(self.class_map).__name__}; "
                "add the map to the cube (cube['classes'] = ...) and pass class_map='classes'."
            )

    @property
    def n_class_total(self) -> int:
        """Number of classes the kernel works with."""
        if self.class_map is not None:
            return len(self.class_values) if self.class_values is not None else int(self.n_classes)
        if self.centres is not None:
            return len(self.centres)
        return int(self.n_classes)


# --------------------------------------------------------------------------------------------
# (a) classes
# --------------------------------------------------------------------------------------------


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
    if params.centres is None:
        raise MethodError(
            "fsdaf: no class centres; stf.fuse fits them (METHOD.statistics), or pass centres=... "
            "or class_map=...."
        )
    return nearest_centre(fine, np.asarray(params.centres))


# --------------------------------------------------------------------------------------------
# (b) cells and fractions
# --------------------------------------------------------------------------------------------


def _to_cells(a: np.ndarray, factor: int, fill: float) -> np.ndarray:
    """Pad the last two axes to multiples of ``factor`` and split into ``(..., hc, f, wc, f)``."""
    h, w = a.shape[-2:]
    hc, wc = -(-h // factor), -(-w // factor)
    pad = [(0, 0)] * (a.ndim - 2) + [(0, hc * factor - h), (0, wc * factor - w)]
    a = np.pad(a, pad, constant_values=fill)
    return a.reshape(*a.shape[:-2], hc, factor, wc, factor)


def cell_mean(a: np.ndarray, factor: int) -> np.ndarray:
    """Mean of the finite values of each cell on the last two axes; NaN for empty cells (compiled)."""
    from stf_pipeline.methods import _fsdaf_numba

    return _fsdaf_numba.cell_mean(a, factor)


def class_fractions(labels: np.ndarray, n_classes: int, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of each class among the classified fine pixels of each cell.

    Returns
    -------
    fractions : ndarray ``(class, hc, wc)`` float64
        Sums to 1 over classes in every cell with a classified pixel; NaN in cells without.
    complete : ndarray ``(hc, wc)`` bool
        Every fine pixel of the cell (inside the image) is classified: only these cells may be
        used for unmixing (IDL drops cells whose fractions do not sum to 1).
    """
    cells = _to_cells(labels, factor, -2)  # -2 = outside the image
    onehot = cells[None] == np.arange(n_classes)[:, None, None, None, None]
    counts = onehot.sum(axis=(-3, -1)).astype(np.float64)
    classified = counts.sum(axis=0)
    complete = ((cells >= 0) | (cells == -2)).all(axis=(-3, -1)) & (classified > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        fractions = np.where(classified > 0, counts / classified, np.nan)
    return fractions, complete


# --------------------------------------------------------------------------------------------
# (c) constrained unmixing
# --------------------------------------------------------------------------------------------


def box_lstsq(gram: np.ndarray, rhs: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Solve ``min ½ gᵀ A g - bᵀ g`` subject to ``lower <= g <= upper``, batched.

    A primal-dual active-set method (Hintermüller, Ito & Kunisch 2003) on every problem at once:
    each step fixes the variables predicted to sit on a bound and solves the rest exactly.
    Problems whose active set has not settled after ``3·k + 10`` steps (rare; the method may
    cycle on non-M-matrices) are solved by bounded-variable least squares (SciPy BVLS).

    Parameters
    ----------
    gram : ndarray ``(..., k, k)``
        Symmetric positive definite matrices ``A``.
    rhs : ndarray ``(..., k)``
    lower, upper : ndarray ``(...)``
        Bounds shared by the ``k`` unknowns of each problem.

    Returns
    -------
    ndarray ``(..., k)`` float64
        NaN for problems with ``lower > upper`` (no data to bound them).
    """
    a = np.asarray(gram, dtype=np.float64)
    b = np.asarray(rhs, dtype=np.float64)
    batch, k = a.shape[:-2], a.shape[-1]
    a = a.reshape(-1, k, k)
    b = b.reshape(-1, k)
    lo = np.broadcast_to(np.asarray(lower, dtype=np.float64), batch).reshape(-1, 1)
    hi = np.broadcast_to(np.asarray(upper, dtype=np.float64), batch).reshape(-1, 1)
    eye = np.eye(k, dtype=bool)
    at_lo = np.zeros_like(b, dtype=bool)
    at_hi = np.zeros_like(b, dtype=bool)
    settled = np.zeros(b.shape[0], dtype=bool)
    g = np.zeros_like(b)
    for _ in range(3 * k + 10):
        free = ~(at_lo | at_hi)
        fixed_value = np.where(at_lo, lo, np.where(at_hi, hi, 0.0))
        system = np.where(free[:, :, None], a, eye[None])
        target = np.where(free, b, fixed_value)
        g = np.linalg.solve(system, target[..., None])[..., 0]
        grad = np.einsum("nij,nj->ni", a, g) - b
        new_lo = (g - grad) < lo
        new_hi = (g - grad) > hi
        settled = (new_lo == at_lo).all(axis=1) & (new_hi == at_hi).all(axis=1)
        if settled.all():
            break
        at_lo, at_hi = new_lo, new_hi
    for n in np.flatnonzero(~settled & (lo[:, 0] < hi[:, 0])):
        chol = np.linalg.cholesky(a[n])
        target = np.linalg.solve(chol, b[n])
        g[n] = optimize.lsq_linear(chol.T, target, bounds=(lo[n, 0], hi[n, 0]), method="bvls").x
    return np.where(lo <= hi, np.clip(g, lo, hi), np.nan).reshape(*batch, k)


def _offset_rank(radius: int) -> np.ndarray:
    """Rank of each window offset by distance to the centre, then scan order (purity tie-break)."""
    dy, dx = np.meshgrid(np.arange(-radius, radius + 1), np.arange(-radius, radius + 1), indexing="ij")
    order = np.lexsort((np.arange(dy.size), (dy * dy + dx * dx).ravel()))
    rank = np.empty(dy.size, dtype=np.int64)
    rank[order] = np.arange(dy.size)
    return rank


def _windows(a: np.ndarray, radius: int, fill: Any) -> np.ndarray:
    """``(..., hc, wc) -> (..., hc, wc, (2r+1)²)`` windows around every cell, ``fill`` outside."""
    side = 2 * radius + 1
    pad = [(0, 0)] * (a.ndim - 2) + [(radius, radius), (radius, radius)]
    padded = np.pad(a, pad, constant_values=fill)
    view = np.lib.stride_tricks.sliding_window_view(padded, (side, side), axis=(-2, -1))
    return view.reshape(*a.shape, side * side)


def _window_stats(values: np.ndarray, radius: int, ddof: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Count, mean and standard deviation of finite values in the ``(2r+1)²`` cell window."""
    valid = np.isfinite(values)
    x = np.where(valid, values, 0.0)
    count = box_sum(valid.astype(np.float64), radius)
    total = box_sum(x, radius)
    square = box_sum(x * x, radius)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
        var = (square - count * mean * mean) / (count - ddof)
    return count, mean, np.sqrt(np.maximum(var, 0.0))


def _window_extreme(values: np.ndarray, radius: int, *, minimum: bool) -> np.ndarray:
    """Min (or max) of finite values over the ``(2r+1)²`` window on the last two axes."""
    fill = np.inf if minimum else -np.inf
    x = np.where(np.isfinite(values), values, fill)
    size = [1] * (x.ndim - 2) + [2 * radius + 1, 2 * radius + 1]
    func = ndimage.minimum_filter if minimum else ndimage.maximum_filter
    return func(x, size=size, mode="constant", cval=fill)


def change_bounds(coarse_change: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Bounds of the class change per band and cell: window ``min - std`` and ``max + std``."""
    _, _, std = _window_stats(coarse_change, radius)
    std = np.nan_to_num(std)
    low = _window_extreme(coarse_change, radius, minimum=True) - std
    high = _window_extreme(coarse_change, radius, minimum=False) + std
    return low, high


def unmix_change(
    fractions: np.ndarray,
    coarse_change: np.ndarray,
    usable: np.ndarray,
    *,
    radius: int,
    n_pure: int,
    batch_cells: int = 128,
) -> np.ndarray:
    """Per-class change of every cell by constrained unmixing of the coarse change around it.

    For cell ``i`` and band ``b``: in the window of ``radius`` cells around ``i``, take for
    each class ``c`` the (at most) ``n_pure`` usable cells with the largest fraction of ``c``
    among those with fraction > ``MIN_FRACTION`` (ties: nearer to ``i`` first, then scan order);
    keep those whose coarse change lies between the values at positions ``floor(0.1 n)`` and
    ``floor(0.9 n)`` of their sorted changes; stack the kept rows of all classes into
    ``X g = y`` and solve ``min |X g - y|² + RIDGE |g - m|²`` with ``g`` in :func:`change_bounds`
    (``m``: window mean change).

    Parameters
    ----------
    fractions : ndarray ``(class, hc, wc)``
    coarse_change : ndarray ``(band, hc, wc)``
        Native coarse change ``C(t) - C(t1)``.
    usable : ndarray ``(hc, wc)`` bool
        Complete cells with a finite change in every band.
    radius, n_pure : int
    batch_cells : int, default 128
        Cells solved per batch (bounds memory).

    Returns
    -------
    ndarray ``(band, class, hc, wc)`` float64
    """
    n_classes, hc, wc = fractions.shape
    nb = coarse_change.shape[0]
    side2 = (2 * radius + 1) ** 2
    n_cells = hc * wc
    frac = np.where(usable, np.nan_to_num(fractions), 0.0)
    frac_w = _windows(frac, radius, 0.0).reshape(n_classes, n_cells, side2)
    use_w = _windows(usable, radius, False).reshape(n_cells, side2)
    dc = np.where(usable, coarse_change, 0.0)
    dc_w = _windows(dc, radius, 0.0).reshape(nb, n_cells, side2)
    low, high = change_bounds(np.where(np.isfinite(coarse_change), coarse_change, np.nan), radius)
    _, mean, _ = _window_stats(np.where(np.isfinite(coarse_change), coarse_change, np.nan), radius)
    low, high, mean = (v.reshape(nb, n_cells) for v in (low, high, mean))
    mean = np.nan_to_num(mean)
    scale = np.int64(1) << 31
    quantised = np.rint(frac_w * scale).astype(np.int64)
    rank = _offset_rank(radius)
    invalid = np.iinfo(np.int64).max
    keys = np.where(use_w[None] & (frac_w > MIN_FRACTION), (scale - quantised) * side2 + rank, invalid)
    n_keep = min(n_pure, side2)
    change = np.empty((nb, n_classes, n_cells))
    lo_q, hi_q = CHANGE_PERCENTILES
    for start in range(0, n_cells, batch_cells):
        sl = slice(start, min(start + batch_cells, n_cells))
        key = keys[:, sl]  # (class, cells, side2)
        if n_keep < side2:
            idx = np.argpartition(key, n_keep - 1, axis=-1)[..., :n_keep]
        else:
            idx = np.broadcast_to(np.arange(side2), key.shape).copy()
        valid = np.take_along_axis(key, idx, axis=-1) < invalid  # (class, cells, P)
        rows = np.take_along_axis(frac_w[:, sl][None], idx[:, None], axis=-1)  # (class, feat, cells, P)
        rows = rows.transpose(2, 0, 3, 1).reshape(-1, n_classes * n_keep, n_classes)  # (cells, R, feat)
        y = np.take_along_axis(dc_w[:, sl][:, None], idx[None], axis=-1)  # (band, class, cells, P)
        n = valid.sum(axis=-1)  # (class, cells)
        ordered = np.sort(np.where(valid[None], y, np.inf), axis=-1)
        lo_i = np.clip(np.floor(lo_q * n + 1e-9).astype(np.int64), 0, np.maximum(n - 1, 0))
        hi_i = np.clip(np.floor(hi_q * n + 1e-9).astype(np.int64), 0, np.maximum(n - 1, 0))
        lo_v = np.take_along_axis(ordered, np.broadcast_to(lo_i[None, ..., None], (nb, *lo_i.shape, 1)), axis=-1)
        hi_v = np.take_along_axis(ordered, np.broadcast_to(hi_i[None, ..., None], (nb, *hi_i.shape, 1)), axis=-1)
        keep = valid[None] & (y >= lo_v) & (y <= hi_v)  # (band, class, cells, P)
        keep = keep.transpose(0, 2, 1, 3).reshape(nb, -1, n_classes * n_keep).astype(np.float64)
        y = y.transpose(0, 2, 1, 3).reshape(nb, -1, n_classes * n_keep)
        weighted = rows[None] * keep[..., None]  # (band, cells, R, feat)
        gram = np.swapaxes(weighted, -1, -2) @ rows[None]  # (band, cells, feat, feat)
        rhs = np.einsum("bcrk,bcr->bck", weighted, y)
        gram = gram + RIDGE * np.eye(n_classes)
        rhs = rhs + RIDGE * mean[:, sl, None]
        change[:, :, sl] = box_lstsq(gram, rhs, low[:, sl], high[:, sl]).transpose(0, 2, 1)
    return change.reshape(nb, n_classes, hc, wc)


# --------------------------------------------------------------------------------------------
# (d) temporal prediction and residual
# --------------------------------------------------------------------------------------------


def temporal_prediction(fine: np.ndarray, labels: np.ndarray, change: np.ndarray, factor: int) -> np.ndarray:
    """``F1 + Δf[class]`` using the change of each pixel's own cell; NaN for unclassified pixels."""
    from stf_pipeline.methods import _fsdaf_numba

    return _fsdaf_numba.temporal(fine, labels, change, factor)


def residuals(coarse_change: np.ndarray, fractions: np.ndarray, change: np.ndarray) -> np.ndarray:
    """Coarse residual ``R = ΔC - Σ_c f_c Δf_c`` per band and cell (paper Eq. 6-8)."""
    return coarse_change - np.einsum("khw,bkhw->bhw", np.nan_to_num(fractions), change)


# --------------------------------------------------------------------------------------------
# (f) homogeneity and residual distribution
# --------------------------------------------------------------------------------------------


def heterogeneity(labels: np.ndarray, radius: int) -> np.ndarray:
    """Homogeneity index (paper Eq. 16): share of the window's pixels in the pixel's own class.

    The window is ``(2r+1)²`` truncated at the image edge (denominator: its pixels inside the
    image, as in the IDL code); unclassified pixels get 0. Exact integer counts from an integral
    image per class, compiled (:func:`stf_pipeline.methods._fsdaf_numba.homogeneity`).
    """
    from stf_pipeline.methods import _fsdaf_numba

    return _fsdaf_numba.homogeneity(labels, radius)


def distribute_residual(
    residual: np.ndarray,
    tps: np.ndarray,
    temporal: np.ndarray,
    het: np.ndarray,
    factor: int,
    *,
    bounds: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Spread each cell's residual over its fine pixels (paper Eq. 14-20, IDL weights).

    ``E_ho = F_TPS - F_TP`` keeps only the sign of ``R`` (other values set to 0),
    ``W = |E_ho|·HI + |R|·(1 - HI) + eps``, normalised to mean 1 over the cell's pixels, weights
    above 10 reset to the mean, normalised again; the pixel change is ``W · R``. Means are over
    the cell's pixels with a finite ``W``. With ``bounds=(low, high, base)`` (the allowed range
    per band and cell, and a per-pixel base) returns ``clip(F_TP + W·R, low, high) - base``.
    Compiled, one cell at a time, cell rows over the CPU cores
    (:func:`stf_pipeline.methods._fsdaf_numba.distribute`).
    """
    from stf_pipeline.methods import _fsdaf_numba

    return _fsdaf_numba.distribute(
        residual, tps, temporal, het, factor, eps=RESIDUAL_EPS, cap=MAX_RESIDUAL_WEIGHT, bounds=bounds
    )


def allowed_range(
    coarse_target: np.ndarray,
    fine: np.ndarray,
    labels: np.ndarray,
    change: np.ndarray,
    factor: int,
    radius: int,
    valid_range: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray]:
    """Allowed value range at the target date per band and cell.

    The IDL code bounds the prediction by the range of the target coarse image and of the
    temporal prediction over its processing block, within ``valid_range``. Here the window is the
    ``radius``-cell window of the cell, and the temporal prediction over it uses the cell's own
    class changes: ``min(min C(t), min_c (min F1[class c] + Δf_c))`` and likewise for the max.
    """
    from stf_pipeline.methods._fsdaf_numba import cell_extremes

    n_classes = change.shape[1]
    c_low, c_high = cell_extremes(coarse_target, np.zeros(labels.shape, dtype=np.int64), 1, factor)
    f_low, f_high = cell_extremes(fine, labels, n_classes, factor)  # (class, band, hc, wc)
    c_min = _window_extreme(c_low[0], radius, minimum=True)
    c_max = _window_extreme(c_high[0], radius, minimum=False)
    t_min = np.full(c_min.shape, np.inf)
    t_max = np.full(c_max.shape, -np.inf)
    for c in range(n_classes):
        t_min = np.fmin(t_min, _window_extreme(f_low[c], radius, minimum=True) + change[:, c])
        t_max = np.fmax(t_max, _window_extreme(f_high[c], radius, minimum=False) + change[:, c])
    low = np.maximum(np.fmin(c_min, t_min), valid_range[0])
    high = np.minimum(np.fmax(c_max, t_max), valid_range[1])
    return low, high


def similarity_threshold(fine: np.ndarray, labels: np.ndarray, n_classes: int, factor: int, radius: int) -> np.ndarray:
    """Per band and cell: ``2 · std(F1) / n`` over the cell window (IDL ``similar_th``).

    ``std`` (sample standard deviation) of the fine pixels and ``n`` the number of classes
    present, both over the ``radius``-cell window of the cell.
    """
    cells = _to_cells(np.asarray(fine, dtype=np.float64), factor, np.nan)
    valid = np.isfinite(cells)
    x = np.where(valid, cells, 0.0)
    count = box_sum(valid.sum(axis=(-3, -1)).astype(np.float64), radius)
    total = box_sum(x.sum(axis=(-3, -1)), radius)
    square = box_sum((x * x).sum(axis=(-3, -1)), radius)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
        std = np.sqrt(np.maximum((square - count * mean * mean) / (count - 1), 0.0))
    lab_cells = _to_cells(labels, factor, -1)
    present = np.zeros(std.shape[1:])
    for c in range(n_classes):
        has = (lab_cells == c).any(axis=(-3, -1)).astype(np.float64)
        present += box_sum(has, radius) > 0
    return 2.0 * std / np.maximum(present, 1.0)


# --------------------------------------------------------------------------------------------
# (g) similar pixels
# --------------------------------------------------------------------------------------------


def _rank_factor(radius: int) -> np.ndarray:
    """Distance factor ``10 + d / r`` of the ranking key per window offset, float32 ``(2r+1, 2r+1)``."""
    dy, dx = np.meshgrid(np.arange(-radius, radius + 1), np.arange(-radius, radius + 1), indexing="ij")
    return np.float32(10.0) + (np.sqrt(dy * dy + dx * dx) / radius).astype(np.float32)


def resolve_backend(backend: str) -> str:
    """``"auto"`` -> ``"jax"`` when JAX's default device is an accelerator, else ``"numba"``."""
    if backend != "auto":
        return backend
    import jax

    return "numba" if jax.default_backend() == "cpu" else "jax"


def similar_pixel_blend(
    fine: np.ndarray,
    change: np.ndarray,
    threshold: np.ndarray,
    *,
    half_window: int,
    n_similar: int,
    backend: str = "auto",
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
    backend : {"auto", "numba", "jax"}, default "auto"
        ``numba``: a compiled per-pixel scan with a sorted buffer of the best candidates, rows
        shared over the CPU cores (:mod:`stf_pipeline.methods._fsdaf_numba`); ``jax``: all keys of
        a row strip and ``lax.top_k`` (:mod:`stf_pipeline.methods._fsdaf_jax`), for GPUs;
        ``auto``: ``jax`` on an accelerator, else ``numba``. Both choose the same pixels; the
        weights are float64 with Numba, float32 with JAX.

    Returns
    -------
    ndarray ``(band, y, x)`` float64
        The weighted change; NaN where the pixel is NaN or has no candidate.
    """
    r = half_window
    k = min(n_similar, (2 * r + 1) ** 2)
    use = np.isfinite(fine).all(axis=0) & np.isfinite(change).all(axis=0)
    args = (fine, change, threshold, use, _rank_factor(r))
    if resolve_backend(backend) == "jax":
        from stf_pipeline.methods import _fsdaf_jax

        return _fsdaf_jax.blend(*args, radius=r, k=k)
    from stf_pipeline.methods import _fsdaf_numba

    return _fsdaf_numba.blend(*args, radius=r, k=k)


# --------------------------------------------------------------------------------------------
# the kernel
# --------------------------------------------------------------------------------------------


def _clip_fine(fine: np.ndarray, params: FSDAFParams) -> np.ndarray:
    lo, hi = params.valid_range
    if params.fine_clip is None:
        return np.clip(fine, lo, hi)
    bounds = np.asarray(params.fine_clip, dtype=np.float64)
    low = np.maximum(bounds[:, 0], lo)[:, None, None]
    high = np.minimum(bounds[:, 1], hi)[:, None, None]
    return np.clip(fine, low, high)


def fsdaf_kernel(
    fine: np.ndarray,
    coarse: np.ndarray,
    coarse_target: np.ndarray,
    *,
    params: FSDAFParams,
    model: object | None = None,
    extra: dict[str, np.ndarray] | None = None,
) -> np.ndarray:
    """FSDAF on one block (see module docstring for the steps).

    Parameters
    ----------
    fine, coarse : ndarray ``(1, band, y, x)``
    coarse_target : ndarray ``(band, y, x)``
    params : FSDAFParams
        With ``coarse_factor`` set and ``centres`` (or ``class_map``) given.
    model : ignored
    extra : dict, optional
        ``{params.class_map: (y, x) block}`` when a class map is used.

    Returns
    -------
    ndarray ``(band, y, x)`` float32
    """
    if params.coarse_factor is None:
        raise MethodError("fsdaf: params.coarse_factor is not set; run through stf.fuse or fsdaf.prepare.")
    factor = int(params.coarse_factor)
    f1 = np.asarray(fine[0], dtype=np.float64)
    c1 = np.asarray(coarse[0], dtype=np.float64)
    c2 = np.asarray(coarse_target, dtype=np.float64)
    class_map = None if params.class_map is None or extra is None else extra.get(params.class_map)
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
        f1, pixel_change, threshold, half_window=params.half_window, n_similar=params.n_similar, backend=params.backend
    )
    return _range_fix(blended, f1, c1, c2, params.valid_range).astype(np.float32)


def _range_fix(
    pred: np.ndarray, f1: np.ndarray, c1: np.ndarray, c2: np.ndarray, valid_range: tuple[float, float]
) -> np.ndarray:
    """IDL's last correction: outside ``valid_range``, use ``F1 + C(t) - C(t1)``, clipped to it."""
    lo, hi = valid_range
    fallback = np.clip(f1 + c2 - c1, lo, hi)
    return np.where((pred < lo) | (pred > hi), fallback, pred)


# --------------------------------------------------------------------------------------------
# engine hooks
# --------------------------------------------------------------------------------------------


def prepare(params: FSDAFParams, context: MethodContext) -> FSDAFParams:
    """Take ``coarse_factor`` from the cube (error if the cube has none)."""
    if params.coarse_factor is not None:
        return params
    if context.coarse_factor is None:
        raise MethodError(
            "fsdaf needs the native coarse pixel size: set cube.attrs['coarse_factor'] (e.g. 16 for 480 m "
            "coarse on 30 m fine) or pass coarse_factor=16."
        )
    return dataclasses.replace(params, coarse_factor=int(context.coarse_factor))


def _fit_statistics(params: FSDAFParams, sample: np.ndarray, stride: int) -> FSDAFParams:
    """Fill ``fine_clip`` and (without a class map) ``centres`` from a ``(band, y, x)`` sample.

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


def statistics(fine: Any, coarse: Any, coarse_target: Any, params: FSDAFParams) -> Any:
    """``MethodSpec.statistics``: the scene-wide inputs every block must share.

    k-means centres (unless a class map or centres are given) and the 0.01/99.99 percentile
    noise clip, both from a regular-stride sample of about ``n_samples`` pixels of the pair fine
    image. NumPy input: returns the filled params. Dask input: a ``dask.delayed`` params, so
    building the graph computes nothing.

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
        return params
    stride = max(1, int(math.floor(math.sqrt(h * w / params.n_samples))))
    sample = fine[0, :, ::stride, ::stride]
    try:
        import dask.array as da
    except ImportError:  # pragma: no cover - dask is a dependency
        da = None
    if da is not None and isinstance(sample, da.Array):
        import dask

        return dask.delayed(_fit_statistics, pure=True)(params, sample, stride)
    return _fit_statistics(params, sample, stride)


def extra_vars(params: FSDAFParams) -> tuple[str, ...]:
    """Per-pixel cube variables the kernel needs in ``extra`` (the class map, if any)."""
    return (params.class_map,) if params.class_map is not None else ()


def _halo(params: FSDAFParams, context: MethodContext) -> int:
    """Longest dependency of an output pixel: a similar pixel's cell window, or its homogeneity window."""
    factor = int(params.coarse_factor or context.coarse_factor or 1)
    cells = -(-params.half_window // factor) + max(params.unmix_radius, params.tps_radius) + 1
    return max(factor * cells, 2 * params.half_window)


METHOD = MethodSpec(
    name="fsdaf",
    params_type=FSDAFParams,
    kernel=fsdaf_kernel,
    halo=_halo,
    n_pairs=(1, 1),
    coarse_aligned=True,
    prepare=prepare,
    statistics=statistics,
    extra_vars=extra_vars,
)
