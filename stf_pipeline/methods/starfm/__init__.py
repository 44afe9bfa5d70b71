"""STARFM: the Spatial and Temporal Adaptive Reflectance Fusion Model (Gao et al. 2006).

The method (equations, departures from the paper and the USDA program) is described in
:mod:`stf_pipeline.methods.starfm.core`; its backends: ``numpy`` (:mod:`.core`, the reference),
``numba`` (:mod:`.numba`, ``auto`` on CPUs), ``jax`` and ``pallas`` (:mod:`.jax`,
:mod:`.pallas`; ``pallas`` is ``auto`` on GPUs).
"""

from __future__ import annotations

from stf_pipeline.methods._base import MethodSpec, SceneStatistics
from stf_pipeline.methods.starfm.core import STATISTICS, halo, prepare, starfm_numba, starfm_numpy
from stf_pipeline.methods.starfm.jax import starfm_jax, starfm_pallas
from stf_pipeline.methods.starfm.params import StarfmParams

METHOD: MethodSpec[StarfmParams] = MethodSpec(
    name="starfm",
    params_type=StarfmParams,
    kernels={"numpy": starfm_numpy, "numba": starfm_numba, "jax": starfm_jax, "pallas": starfm_pallas},
    auto={"cpu": "numba", "gpu": "pallas"},
    halo=halo,
    n_pairs=(1, 8),
    prepare=prepare,
    statistics=SceneStatistics(STATISTICS.summarize, STATISTICS.fit, uses_target=False),
    block_padding="nan",  # windows skip NaN as they skip "outside the block"
)

__all__ = ["METHOD", "StarfmParams", "starfm_jax", "starfm_numba", "starfm_numpy", "starfm_pallas"]
