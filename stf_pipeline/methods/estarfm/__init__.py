"""ESTARFM: the Enhanced STARFM for complex heterogeneous regions (Zhu et al. 2010).

The method is described in :mod:`stf_pipeline.methods.estarfm.core`; its backends: ``numpy``
(:mod:`.core`, the reference), ``numba`` (``auto`` on CPUs; compiled pieces in :mod:`.numba`),
``jax`` and ``pallas`` (:mod:`.jax`, :mod:`.pallas`; ``pallas`` is ``auto`` on GPUs).
"""

from __future__ import annotations

from stf_pipeline.methods._base import MethodSpec, SceneStatistics
from stf_pipeline.methods.estarfm.core import (
    STATISTICS,
    estarfm_numba,
    estarfm_numpy,
    halo,
    spectral_correlation,
    sum_terms,
)
from stf_pipeline.methods.estarfm.jax import estarfm_jax, estarfm_pallas
from stf_pipeline.methods.estarfm.params import EstarfmParams

METHOD: MethodSpec[EstarfmParams] = MethodSpec(
    name="estarfm",
    params_type=EstarfmParams,
    kernels={"numpy": estarfm_numpy, "numba": estarfm_numba, "jax": estarfm_jax, "pallas": estarfm_pallas},
    auto={"cpu": "numba", "gpu": "pallas"},
    halo=halo,
    n_pairs=(2, 2),
    statistics=SceneStatistics(STATISTICS.summarize, STATISTICS.fit, uses_target=False),
    block_padding="nan",  # windows skip NaN as they skip "outside the block"
)

__all__ = [
    "METHOD",
    "EstarfmParams",
    "estarfm_jax",
    "estarfm_numba",
    "estarfm_numpy",
    "estarfm_pallas",
    "spectral_correlation",
    "sum_terms",
]
