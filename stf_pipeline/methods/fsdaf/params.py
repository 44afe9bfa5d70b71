"""Parameters and constants of FSDAF (the authors' IDL ``FSDAF.pro`` unless stated)."""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from stf_pipeline.exceptions import MethodError

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
        parameters of the IDL code (:func:`stf_pipeline.kernels.classify.isodata`), fitted on the
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
        threshold. The IDL code uses fixed 30x30-cell blocks; 17x17 cells is our choice
        (measured in ``docs/methods/fsdaf.md``), while the halo grows with it.
    tps_radius : int, default 3
        Half side, in cells, of the knot neighbourhood of each local thin-plate spline (our
        choice: 7x7 knots; ``docs/methods/fsdaf.md``).
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
