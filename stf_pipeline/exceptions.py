"""One hierarchy of errors, rooted at :class:`STFError`.

Every message names the bad value and says how to fix it.
"""

from __future__ import annotations


class STFError(Exception):
    """Root of every error raised on purpose by stf_pipeline."""


class CubeError(STFError, ValueError):
    """A dataset breaks the cube contract, or a cube store is missing or corrupt."""


class TaskError(STFError, ValueError):
    """A fusion task cannot be formed: target or pair dates missing, unusable or all-NaN."""


class MethodError(STFError, ValueError):
    """Unknown method, bad method parameters, or a method used outside its domain."""


class CatalogError(STFError, ValueError):
    """A catalog file is unknown, malformed, or points at files that disagree."""


class ConfigError(STFError, ValueError):
    """A pipeline or training configuration is malformed (unknown key, bad value)."""


class ModelError(STFError, ValueError):
    """A trained model does not fit the cube it is applied to, or a checkpoint is unusable."""


class StoreError(STFError, OSError):
    """An output store exists and is not ours, or is incomplete in a way that cannot be resumed."""


class EvaluationError(STFError, ValueError):
    """Prediction and truth cannot be compared (different grids or bands, nothing valid)."""


class PlotError(STFError, ValueError):
    """A figure cannot be drawn from the given images (missing bands, mismatched shapes)."""
