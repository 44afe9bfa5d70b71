"""Unsupervised classification for the unmixing methods: seeded k-means and nearest-centre labelling.

FSDAF (Zhu et al. 2016) classifies the fine image at the pair date before unmixing. The class
*centres* are fitted once on a subsample of the whole image (:func:`kmeans`), then every pixel is
labelled by its nearest centre (:func:`nearest_centre`; :func:`nearest_centre_jax` on a JAX device),
a per-pixel rule, so chunked and unchunked labelling agree exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stf_pipeline.exceptions import MethodError


def nearest_centre(pixels: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Label each pixel with the index of its nearest centre (squared Euclidean distance).

    Parameters
    ----------
    pixels : ndarray ``(band, ...)``
    centres : ndarray ``(class, band)``

    Returns
    -------
    ndarray of int32 ``(...)``
        Class index in ``[0, class)``; ``-1`` where any band of the pixel is NaN. Ties go to the
        lower class index.
    """
    x = np.asarray(pixels, dtype=np.float64)
    c = np.asarray(centres, dtype=np.float64)
    flat = x.reshape(x.shape[0], -1)
    dist = np.zeros((c.shape[0], flat.shape[1]))
    for band in range(c.shape[1]):
        dist += (flat[band][None, :] - c[:, band][:, None]) ** 2
    labels = np.argmin(dist, axis=0).astype(np.int32)
    labels[~np.isfinite(flat).all(axis=0)] = -1
    return labels.reshape(x.shape[1:])


def _enough_spectra(samples: np.ndarray, needed: int, method: str, name: str) -> np.ndarray:
    """``samples`` as float64; raise if it has fewer than ``needed`` distinct spectra (rows)."""
    x = np.asarray(samples, dtype=np.float64)
    distinct = np.unique(x, axis=0).shape[0]
    if distinct < needed:
        raise MethodError(
            f"{method}: cannot form {name}={needed} classes from {distinct} distinct pixel spectra; "
            f"use {name} <= {max(distinct, 1)} or supply a class map (class_map=...)."
        )
    return x


def kmeans(
    samples: np.ndarray,
    n_classes: int,
    *,
    seed: int = 0,
    max_iter: int = 100,
    tol: float = 1e-6,
) -> np.ndarray:
    """Seeded k-means (k-means++ initialisation, Lloyd iterations) on ``(n, band)`` samples.

    Deterministic for a given ``seed``. Centres are returned sorted by their first band, then
    the next, so class numbers do not depend on the initialisation order. A cluster that empties
    is re-seeded at the sample farthest from its centre.

    Parameters
    ----------
    samples : ndarray ``(n, band)``
        Finite sample spectra.
    n_classes : int
    seed : int, default 0
    max_iter : int, default 100
    tol : float, default 1e-6
        Stop when no centre moves more than ``tol`` (Euclidean, data units).

    Returns
    -------
    ndarray ``(n_classes, band)`` float64

    Raises
    ------
    MethodError
        If there are fewer distinct samples than classes.
    """
    x = _enough_spectra(samples, n_classes, "k-means", "n_classes")
    rng = np.random.default_rng(seed)
    centres = np.empty((n_classes, x.shape[1]))
    centres[0] = x[rng.integers(x.shape[0])]
    closest = ((x - centres[0]) ** 2).sum(axis=1)
    for k in range(1, n_classes):
        total = closest.sum()
        idx = rng.choice(x.shape[0], p=closest / total) if total > 0 else rng.integers(x.shape[0])
        centres[k] = x[idx]
        closest = np.minimum(closest, ((x - centres[k]) ** 2).sum(axis=1))
    for _ in range(max_iter):
        labels = nearest_centre(x.T, centres)
        new = centres.copy()
        for k in range(n_classes):
            members = x[labels == k]
            if members.shape[0]:
                new[k] = members.mean(axis=0)
            else:
                far = ((x - centres[labels]) ** 2).sum(axis=1)
                new[k] = x[int(np.argmax(far))]
        shift = np.sqrt(((new - centres) ** 2).sum(axis=1)).max()
        centres = new
        if shift <= tol:
            break
    order = np.lexsort(centres.T[::-1])
    return centres[order]


def split_clusters(
    samples: np.ndarray, labels: np.ndarray, centres: np.ndarray, *, max_new: int, split_std: float, split_mult: float
) -> np.ndarray:
    """ISODATA split: clusters whose largest per-band standard deviation exceeds ``split_std``.

    The widest such clusters first (at most ``max_new``), each replaced by two centres at
    ``mean ± split_mult · σ`` along its widest band (Tou & Gonzalez 1974, step 8-10).
    """
    out = list(centres)
    spread = []
    for k in range(centres.shape[0]):
        members = samples[labels == k]
        if members.shape[0] > 1:
            std = members.std(axis=0)
            band = int(np.argmax(std))
            spread.append((float(std[band]), k, band))
    spread.sort(key=lambda t: (-t[0], t[1]))
    for sigma, k, band in [s for s in spread if s[0] > split_std][:max_new]:
        offset = np.zeros(centres.shape[1])
        offset[band] = split_mult * sigma
        out[k] = centres[k] - offset
        out.append(centres[k] + offset)
    return np.asarray(out)


def merge_clusters(
    centres: np.ndarray, counts: np.ndarray, *, max_pairs: int, merge_dist: float, min_classes: int
) -> np.ndarray:
    """ISODATA merge: up to ``max_pairs`` pairs of centres closer than ``merge_dist``, closest first.

    Each centre merges at most once, into the member-weighted mean, and never below
    ``min_classes`` centres (Tou & Gonzalez 1974, step 11-13).
    """
    k = centres.shape[0]
    dist = np.sqrt(((centres[:, None] - centres[None]) ** 2).sum(axis=-1))
    pairs = sorted((dist[i, j], i, j) for i in range(k) for j in range(i + 1, k) if dist[i, j] < merge_dist)
    used: set[int] = set()
    merged: list[np.ndarray] = []
    for _, i, j in pairs:
        if len(merged) == max_pairs or k - len(merged) <= min_classes:
            break
        if i in used or j in used:
            continue
        used |= {i, j}
        w = counts[[i, j]].astype(np.float64)
        mean = (centres[i] * w[0] + centres[j] * w[1]) / w.sum() if w.sum() > 0 else (centres[i] + centres[j]) / 2
        merged.append(mean)
    kept = [centres[i] for i in range(k) if i not in used]
    return np.asarray(kept + merged)


def isodata(
    samples: np.ndarray,
    *,
    min_classes: int = 4,
    max_classes: int = 6,
    iterations: int = 20,
    change_thresh: float = 0.05,
    merge_dist: float = 0.05,
    merge_pairs: int = 2,
    min_pixels: int = 200,
    split_std: float = 0.05,
    split_mult: float = 1.0,
) -> np.ndarray:
    """ISODATA clustering (Ball & Hall 1965; Tou & Gonzalez 1974) as FSDAF's IDL code calls ENVI's.

    Defaults are the parameters of ``FSDAF.pro``: ``NUM_CLASSES = max_class = 6``,
    ``MIN_CLASSES = min_class = 4``, ``ITERATIONS = 20``, ``CHANGE_THRESH = 0.05``,
    ``ISO_MERGE_DIST = 0.05·DN_max``, ``ISO_MERGE_PAIRS = 2``, ``ISO_MIN_PIXELS = 200``,
    ``ISO_SPLIT_STD = 0.05·DN_max``, ``ISO_SPLIT_SMULT = 1`` (distances in reflectance here, so
    ``DN_max = 1``).

    Start: ``max_classes`` centres evenly spaced on the diagonal of the data from ``μ - σ`` to
    ``μ + σ`` (per band). Each iteration: assign every sample to its nearest centre; drop
    clusters with fewer than ``min_pixels`` members (smallest first, keeping ``min_classes``);
    move centres to their members' means; then split (odd iterations, or with fewer than
    ``min_classes`` centres) up to ``max_classes`` centres, or merge (even iterations) down to
    ``min_classes``. Stops after ``iterations`` or when, in an iteration that neither split nor
    merged, fewer than ``change_thresh`` of the samples changed class. Deterministic; centres
    sorted as in :func:`kmeans`.

    Parameters
    ----------
    samples : ndarray ``(n, band)``
        Finite sample spectra.

    Returns
    -------
    ndarray ``(class, band)`` float64, ``min_classes <= class <= max_classes``

    Raises
    ------
    MethodError
        If the bounds are inconsistent or there are fewer distinct samples than ``min_classes``.
    """
    if not 1 <= min_classes <= max_classes:
        raise MethodError(
            f"isodata: need 1 <= min_classes <= max_classes, got min_classes={min_classes}, "
            f"max_classes={max_classes}; e.g. min_classes=4, max_classes=6 as the FSDAF code."
        )
    x = _enough_spectra(samples, min_classes, "isodata", "min_classes")
    mu, sigma = x.mean(axis=0), x.std(axis=0)
    steps = np.linspace(-1.0, 1.0, max_classes)[:, None]
    centres = mu + steps * sigma
    labels = np.full(x.shape[0], -1)
    for it in range(1, iterations + 1):
        new_labels = nearest_centre(x.T, centres)
        changed = float(np.mean(new_labels != labels))
        labels = new_labels
        counts = np.bincount(labels, minlength=centres.shape[0])
        small = [k for k in np.argsort(counts, kind="stable") if counts[k] < min_pixels]
        drop = set(small[: max(0, centres.shape[0] - min_classes)])
        keep = [k for k in range(centres.shape[0]) if k not in drop and counts[k] > 0]
        if len(keep) < centres.shape[0]:  # their samples go to the nearest remaining centre
            centres = centres[keep]
            labels = nearest_centre(x.T, centres)
            counts = np.bincount(labels, minlength=centres.shape[0])
        centres = np.asarray([x[labels == k].mean(axis=0) for k in range(centres.shape[0])])
        before = centres.shape[0]
        if (it % 2 == 1 or before < min_classes) and before < max_classes:
            centres = split_clusters(
                x, labels, centres, max_new=max_classes - before, split_std=split_std, split_mult=split_mult
            )
        elif it % 2 == 0 and before > min_classes:
            centres = merge_clusters(
                centres, counts, max_pairs=merge_pairs, merge_dist=merge_dist, min_classes=min_classes
            )
        if centres.shape[0] == before and changed < change_thresh:
            break
    order = np.lexsort(centres.T[::-1])
    return centres[order]


def nearest_centre_jax(pixels: Any, centres: Any) -> Any:
    """:func:`nearest_centre` for JAX arrays (traceable): the same squared distances, added band by
    band in the input's precision (float64 under ``jax.enable_x64`` gives the same labels), ties
    to the lower class index, ``-1`` where any band is NaN.

    Parameters
    ----------
    pixels : jax.Array ``(band, ...)``
    centres : jax.Array ``(class, band)``

    Returns
    -------
    jax.Array of int32 ``(...)``
    """
    import jax.numpy as jnp

    tail = (None,) * (pixels.ndim - 1)
    dist = jnp.zeros((centres.shape[0], *pixels.shape[1:]), dtype=pixels.dtype)
    for band in range(centres.shape[1]):
        dist = dist + (pixels[band][None] - centres[(slice(None), band, *tail)]) ** 2
    labels = jnp.argmin(dist, axis=0).astype(jnp.int32)
    return jnp.where(jnp.isfinite(pixels).all(axis=0), labels, -1)
