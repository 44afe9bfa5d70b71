"""Parameters of ESTARFM (defaults of Zhu's code unless stated)."""

from __future__ import annotations

import dataclasses

import numpy as np

from stf_pipeline.exceptions import MethodError


@dataclasses.dataclass(frozen=True)
class EstarfmParams:
    """Parameters of ESTARFM.

    Attributes
    ----------
    half_window : int, default 25
        ``w``: the search window is ``(2w+1)²`` = 51x51 fine pixels and ``D = 1 + d / w``.
        Source: Zhu's code, ``parameters_estarfm.yaml`` (``w: 25``).
    n_classes : float, default 4
        Estimated number of classes; similarity threshold ``2 σ / n_classes``. Source: Zhu's
        code (``num_class: 4.0``); Zhu et al. (2010) Eq. 3.
    value_range : (float, float), default (0.0, 1.0)
        Valid reflectance range: predictions at or beyond it fall back to the weighted fine
        mean. Source: Zhu's code (``DN_min: 0``, ``DN_max: 10000`` on the ×1e4 scale).
    min_coarse_change : float, default 0.02
        Smallest mean coarse change of the similar pixels between the pair dates for which ``V``
        is regressed (else 1). Source: Zhu's code (``DN_max * 0.02``).
    significance : float, default 0.05
        Largest p-value of the regression F test for which ``V`` is kept. Source: Zhu's code.
    max_conversion : float, default 5.0
        Largest ``V`` kept (``0 < V <= 5``). Source: Zhu's code.
    min_similar : int, default 6
        Fewest similar pixels for the weighted prediction (Zhu's code: ``number_cand > 5``).
    class_std : tuple of tuple of float, optional
        Scene standard deviation of each pair's (outer) fine band (inner). Filled by
        ``METHOD.statistics`` in :func:`stf_pipeline.fuse`; a kernel called without it uses the
        block it is given (the whole scene in Zhu's code with its default block size).
    tile : int, optional
        Tile side of the ``jax`` backend's window sums (default: 48 on CPU, whole blocks on GPU).
    """

    half_window: int = 25
    n_classes: float = 4.0
    value_range: tuple[float, float] = (0.0, 1.0)
    min_coarse_change: float = 0.02
    significance: float = 0.05
    max_conversion: float = 5.0
    min_similar: int = 6
    class_std: tuple[tuple[float, ...], ...] | None = None
    tile: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.half_window, (int, np.integer)) or self.half_window < 1:
            raise MethodError(f"estarfm: half_window must be a positive integer (pixels), got {self.half_window!r}.")
        if not self.n_classes > 0:
            raise MethodError(f"estarfm: n_classes must be > 0, got {self.n_classes}.")
        lo, hi = self.value_range
        if not lo < hi:
            raise MethodError(f"estarfm: value_range must be (min, max) with min < max, got {self.value_range}.")
        if self.min_coarse_change < 0:
            raise MethodError(f"estarfm: min_coarse_change must be >= 0, got {self.min_coarse_change}.")
        if not 0 < self.significance < 1:
            raise MethodError(f"estarfm: significance must be in (0, 1), got {self.significance}.")
        if not self.max_conversion > 0:
            raise MethodError(f"estarfm: max_conversion must be > 0, got {self.max_conversion}.")
        if self.min_similar < 3:
            raise MethodError(
                f"estarfm: min_similar must be >= 3 (a regression needs 3 points), got {self.min_similar}."
            )
        if self.tile is not None and self.tile < 0:
            raise MethodError(f"estarfm: tile must be >= 0 (0: whole block), got {self.tile}.")

    @property
    def window_radius(self) -> int:
        """Half side of the search window in pixels."""
        return int(self.half_window)
