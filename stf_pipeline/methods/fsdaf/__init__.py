"""FSDAF: Flexible Spatiotemporal DAta Fusion (Zhu et al. 2016), one pair.

The method and its steps are described in :mod:`stf_pipeline.methods.fsdaf.core`; steps (b)-(c)
live in :mod:`.unmix`, (d) and (f) in :mod:`.residual`, the compiled CPU kernels in :mod:`.numba`
and the JAX forms of every step in :mod:`.jax`. Backends: ``numba`` (the reference, ``auto`` on
CPUs) and ``jax`` (``auto`` on GPUs: the whole block on the device, one compiled program per block
shape).
"""

from __future__ import annotations

from stf_pipeline.methods._base import MethodSpec, SceneStatistics
from stf_pipeline.methods.fsdaf.core import (
    classify,
    extra_vars,
    fit_statistics,
    fsdaf_jax,
    fsdaf_kernel,
    fsdaf_numba,
    halo,
    prepare,
    similar_pixel_blend,
    summarize,
)
from stf_pipeline.methods.fsdaf.params import FSDAFParams

METHOD: MethodSpec[FSDAFParams] = MethodSpec(
    name="fsdaf",
    params_type=FSDAFParams,
    kernels={"numba": fsdaf_numba, "jax": fsdaf_jax},
    auto={"cpu": "numba", "gpu": "jax"},
    halo=halo,
    n_pairs=(1, 1),
    coarse_aligned=True,
    prepare=prepare,
    statistics=SceneStatistics(summarize, fit_statistics, uses_target=False),
    extra_vars=extra_vars,
)

__all__ = [
    "METHOD",
    "FSDAFParams",
    "classify",
    "fsdaf_jax",
    "fsdaf_kernel",
    "fsdaf_numba",
    "prepare",
    "similar_pixel_blend",
]
