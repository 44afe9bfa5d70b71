"""Unsupervised classification for the unmixing methods: seeded k-means and nearest-centre labelling.

FSDAF (Zhu et al. 2016) classifies the fine image at the pair date before unmixing. The class
*centres* are fitted once on a subsample of the whole image (:func:`kmeans`), then every pixel is
labelled by its nearest centre (:func:`nearest_centre`), a per-pixel rule, so chunked and unchunked
labelling agree exactly.
"""

from __future__ import annotations

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
    x = np.asarray(samples, dtype=np.float64)
    distinct = np.unique(x, axis=0).shape[0]
    if distinct < n_classes:
        raise MethodError(
            f"k-means: cannot form n_classes={n_classes} classes from {distinct} distinct pixel spectra; "
            f"use n_classes <= {max(distinct, 1)} or supply a class map (class_map=...)."
        )
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
