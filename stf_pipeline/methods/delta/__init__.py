"""``delta``: the naive baseline, fine image plus coarse change (see :mod:`.core`)."""

from __future__ import annotations

from stf_pipeline.methods._base import MethodSpec
from stf_pipeline.methods.delta.core import delta_kernel, halo
from stf_pipeline.methods.delta.params import DeltaParams

METHOD: MethodSpec[DeltaParams] = MethodSpec(
    name="delta",
    params_type=DeltaParams,
    kernels={"numpy": delta_kernel},
    halo=halo,
    n_pairs=(1, 8),
)

__all__ = ["METHOD", "DeltaParams", "delta_kernel"]
