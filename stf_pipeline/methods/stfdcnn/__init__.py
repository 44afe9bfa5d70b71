"""``stfdcnn``: spatiotemporal fusion with two deep CNNs (Song et al., IEEE JSTARS 2018, 11:821-829).

STFDCNN bridges the coarse and fine resolutions in two learned steps through an intermediate
**low-spatial-resolution (LSR)** fine image, the fine image averaged over ``r x r`` fine pixels:

1. the **non-linear mapping (NLM) CNN** maps the coarse image, averaged over the same ``r x r``
   blocks, to the LSR fine image (the sensor difference: spectral response, atmosphere, PSF);
2. the **super-resolution (SR) CNN** maps the LSR fine image, interpolated (Keys cubic) onto the
   fine grid, to the fine image (the lost spatial detail).

Both are five-layer residual CNNs (:mod:`stf_pipeline.nn.stfdcnn_modules`), trained stage by
stage on the training dates (:func:`fit`) with BiaSTF's machinery: one training date held out
for validation, early stopping, refit on all dates, augmentation, a time limit.

Prediction, for the target ``t`` and the pairs ``k`` before and after, at both levels in turn:
transitional images ``T_j`` (``NLM(C_j)``, then ``SR(up(L_j))``); each pair predicts by
high-pass modulation of its known image ``L_k``::

    P_k = T_t + (T_t / T_k) * (L_k - T_k)

and the two predictions are weighted by ``1 / (local mean |T_t - T_k| + eps)``. The exact
equations are our reading of the paper's abstract; the choices that could not be confirmed (layer
sizes, ``r``, the weight window, the ratio guards ``min_reflectance`` and ``max_gain``) are
parameters, listed with their reasons in ``docs/methods/stfdcnn.md``.

Missing data: a pixel whose receptive field holds NaN gets no prediction from that pair (the
other takes over); NaN where no pair predicts.

Modules: :mod:`.config` (LSR factor, :class:`Architecture`, :class:`STFDCNNConfig` and presets),
:mod:`.params` (:class:`STFDCNNParams`, halo), :mod:`.networks` (array helpers, network application,
training batches), :mod:`.kernel` (block prediction, engine kernel), :mod:`.fit` (training).
"""

from __future__ import annotations

from stf_pipeline.methods._base import MethodSpec
from stf_pipeline.methods.stfdcnn.config import PRESETS, Architecture, STFDCNNConfig, default_lsr_factor
from stf_pipeline.methods.stfdcnn.fit import fit
from stf_pipeline.methods.stfdcnn.kernel import modulate_and_weight, predict_block, stfdcnn_kernel
from stf_pipeline.methods.stfdcnn.networks import NLMBatch, SRBatch, block_mean, erode, run_cnn, upsample
from stf_pipeline.methods.stfdcnn.params import COMPUTE_DTYPES, STFDCNNParams, _halo, _prepare, required_halo

METHOD = MethodSpec(
    name="stfdcnn",
    params_type=STFDCNNParams,
    kernels={"jax": stfdcnn_kernel},
    halo=_halo,
    n_pairs=(2, 2),
    coarse_aligned=True,
    learned=True,
    fit=fit,
    prepare=_prepare,
    device_inputs=("jax",),  # the kernel takes its inputs with jnp.asarray: device arrays stay there
)

__all__ = [
    "COMPUTE_DTYPES", "METHOD", "PRESETS", "Architecture", "NLMBatch", "SRBatch", "STFDCNNConfig", "STFDCNNParams",
    "block_mean", "default_lsr_factor", "erode", "fit", "modulate_and_weight", "predict_block", "required_halo",
    "run_cnn", "stfdcnn_kernel", "upsample",
]
