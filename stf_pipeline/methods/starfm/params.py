"""Parameters of STARFM (defaults of the USDA StarFM program unless stated)."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import numpy as np

from stf_pipeline.exceptions import MethodError
from stf_pipeline.kernels.similar import radius_from_distance


@dataclasses.dataclass(frozen=True)
class StarfmParams:
    """Parameters of STARFM.

    Attributes
    ----------
    search_distance : float, default 750.0
        Search distance in CRS units (metres): the half side of the search window and the
        ``A`` of ``D = 1 + d / A``. Source: USDA StarFM example input (``MAX_SEARCH_DISTANCE =
        750``), which gives a 51x51 window at 30 m.
    radius : int, optional
        Half side of the window in pixels; default ``round(search_distance / pixel size)``,
        set by ``METHOD.prepare`` from the cube.
    n_classes : float, default 40
        ``m`` of the similarity threshold ``2 σ / m``. Source: USDA StarFM
        ``NUM_SLICE_PURE_TEST = 40``.
    uncertainty_fine, uncertainty_coarse : float, default 50
        Fine (Landsat) and coarse (MODIS) reflectance uncertainties on the ×1e4 scale. Source:
        USDA StarFM example input (``LANDSAT_UNCERTAINTY``, ``MODIS_UNCERTAINTY`` = 50).
    scale : float, default 10000
        Factor from reflectance to the integer scale the reference program works on: ``S``,
        ``T`` and the similarity test use the inputs × ``scale`` rounded to integers, and the
        ``+ 1`` in ``(S + 1)(T + 1)`` and the uncertainties are on that scale.
    filtering : {"strict", "either"}, default "strict"
        Candidate filter: both the spectral and temporal tests (Gao et al. 2006, text before
        Eqs. 13-14) or one of them (the USDA program).
    temporal_term : {"pairs", "always"}, default "pairs"
        When the weight has the temporal factor ``(T + 1)``: with two or more pairs only (the
        USDA program: one pair uses the spectral term only) or always (Gao et al. 2006, Eq. 10).
    zero_difference : {"weight", "copy"}, default "weight"
        A pixel's own zero spectral or temporal difference: a candidate like any other, its
        weight kept finite by the ``+ 1`` (the USDA program), or the paper's special cases (Gao
        et al. 2006, Sect. II): ``M_0(p)`` where ``S_k(p) = 0``, ``L_k(p)`` where ``T_k(p) = 0``
        (the mean over such pairs; it wins over ``S = 0``, as in ImageFusion's
        ``CopyOnZeroDiff``).
    class_std : tuple of tuple of float, optional
        Standard deviation of each pair's (outer) fine band (inner) over the whole scene, for
        the similarity threshold. Filled by ``METHOD.statistics`` in :func:`stf_pipeline.fuse`;
        a kernel called without it uses the block it is given.
    tile : int, optional
        Tile side of the ``jax`` backend's window sums (default: 48 on CPU, whole blocks on GPU).
    """

    search_distance: float = 750.0
    radius: int | None = None
    n_classes: float = 40.0
    uncertainty_fine: float = 50.0
    uncertainty_coarse: float = 50.0
    scale: float = 10000.0
    filtering: Literal["strict", "either"] = "strict"
    temporal_term: Literal["pairs", "always"] = "pairs"
    zero_difference: Literal["weight", "copy"] = "weight"
    class_std: tuple[tuple[float, ...], ...] | None = None
    tile: int | None = None

    def __post_init__(self) -> None:
        if not self.search_distance > 0:
            raise MethodError(f"starfm: search_distance must be > 0 (metres), got {self.search_distance}.")
        if self.radius is not None and (not isinstance(self.radius, (int, np.integer)) or self.radius < 1):
            raise MethodError(f"starfm: radius must be a positive integer number of pixels, got {self.radius!r}.")
        if not self.n_classes > 0:
            raise MethodError(f"starfm: n_classes must be > 0, got {self.n_classes}.")
        if self.uncertainty_fine < 0 or self.uncertainty_coarse < 0:
            raise MethodError(
                f"starfm: uncertainties must be >= 0, got fine={self.uncertainty_fine}, "
                f"coarse={self.uncertainty_coarse}."
            )
        if not self.scale > 0:
            raise MethodError(f"starfm: scale must be > 0, got {self.scale}.")
        if self.filtering not in ("strict", "either"):
            raise MethodError(
                f"starfm: filtering must be 'strict' (paper) or 'either' (USDA program), got {self.filtering!r}."
            )
        if self.temporal_term not in ("pairs", "always"):
            raise MethodError(
                f"starfm: temporal_term must be 'pairs' (USDA program) or 'always' (paper), got {self.temporal_term!r}."
            )
        if self.zero_difference not in ("weight", "copy"):
            raise MethodError(
                "starfm: zero_difference must be 'weight' (USDA program) or 'copy' (paper), "
                f"got {self.zero_difference!r}."
            )
        if self.tile is not None and self.tile < 0:
            raise MethodError(f"starfm: tile must be >= 0 (0: whole block), got {self.tile}.")

    @property
    def window_radius(self) -> int:
        """Half side of the search window in pixels (``search_distance`` in pixels if unset)."""
        return self.radius if self.radius is not None else radius_from_distance(self.search_distance, 1.0)

    @property
    def uncertainties(self) -> tuple[float, float, float]:
        """``(σ_S, σ_T, σ_C)`` on the ×``scale`` scale, as the USDA program combines them."""
        sigma_s = math.hypot(self.uncertainty_coarse, self.uncertainty_fine)
        sigma_t = math.sqrt(2.0) * self.uncertainty_coarse
        return sigma_s, sigma_t, math.hypot(sigma_s, sigma_t)
