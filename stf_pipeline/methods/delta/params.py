"""Parameters of the ``delta`` baseline."""

from __future__ import annotations

import dataclasses

from stf_pipeline.exceptions import MethodError


@dataclasses.dataclass(frozen=True)
class DeltaParams:
    """Parameters of the ``delta`` baseline.

    Attributes
    ----------
    window : int, default 5
        Odd side of the window for the mean coarse change that weights the pairs.
    eps : float, default 1e-6
        Added to the mean change before inverting (reflectance units).
    """

    window: int = 5
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.window < 1 or self.window % 2 == 0:
            raise MethodError(f"delta: window must be a positive odd number of pixels, got {self.window}.")
        if not self.eps > 0:
            raise MethodError(f"delta: eps must be > 0, got {self.eps}.")
