"""``biastf``: sensor-bias-driven spatio-temporal fusion (Li et al., Sci China Inf Sci 2020, 63:140302).

The model (Eqs. 11-13), for the target date ``k`` and the pair dates ``j`` in ``{k-1, k+1}``::

    F^(j,k) = F(j) + G(dC(k, j)) + B(k, j),        F(k) = f(F^(k-1,k), F^(k+1,k))

``dC(k, j) = C(k) - C(j)``: the coarse change on the fine grid; ``G`` turns it into the fine change,
``B`` is the sensors' bias that ``G`` leaves, ``f`` fuses the two transitional predictions.

- **Networks** (Table 1): ``G`` and ``B`` are Conv 7x7 -> 5x5 -> 3x3 (ReLU, 'same') -> 3x3,
  with ``filters`` ``(n1, n2, n3)``. They are one network per band (``multiband=False``, the
  paper) or one network for all bands (``multiband=True``).
- **G's base** (``g_base``): ``G = base + net``; by default the change that takes ``F(j)`` to
  ``C(k) + g (F(j) - C(j))``, ``g = min(1, C(k) / C(j))`` (``"modulated"``), else ``dC`` or ``A dC``
  (:class:`BiaSTFConfig`). Inputs are ``dC, F(j), C(j), C(k)``, and for ``B`` also ``G``'s output,
  each normalised per band with constants recorded in the model (``normalise``).
- **Training** (Eqs. 16-18) runs on all ordered pairs of the training dates. Stage 1 fits ``G``
  to ``dF``; stage 2 fits ``B`` to ``dF - G``. The loss is the mean absolute error (``"l2"``:
  Eq. 16-17's squared error). Unless ``val_times`` are given, one training date is held out
  (:func:`stf_pipeline.nn.holdout_split`). Training stops when the held-out date stops
  improving, and the best step is kept. Both networks are then refitted on all dates for
  that many steps (``refit``). With nothing to validate on, the networks stay zero
  (``unvalidated_steps``).
- **Beyond the training changes**: where ``|dC|`` exceeds ``L`` (the 99.5th percentile of the
  training pairs' ``|dC|``, per band), the learned part ``G + B - base`` fades linearly to 0 at
  ``1.25 L``. There the prediction falls back to ``F(j) + base``.
- **Fusion f** (``weights``): ``"variance"`` (default) weights each direction by
  ``((S + eps)² + V²) ** -0.5``, ``S`` the local mean ``|C(k) - C(j)|``, ``V²`` the variance of
  ``C(k) - C(j)`` over three coarse pixels; ``"change"`` by ``1 / (S + eps)``; ``"similarity"``
  uses ``S = |local mean of F^(j,k) - C(k)|``, the paper's wording.
- **Inference** runs through the engine. The halo is ``2 x 7`` pixels (G then B) plus half the
  wider of the fusion and spread windows, so chunked equals unchunked. A pixel with NaN in its receptive field gets no
  prediction from that direction.

Measurements behind every default (hardware, commands, numbers) are in ``docs/methods/biastf.md``.

Modules: :mod:`.config` (:class:`BiaSTFConfig`, presets, training sized to the device),
:mod:`.params` (:class:`BiaSTFParams`, defaults from the cube, halo), :mod:`.networks` (statistics,
features, networks, training batches), :mod:`.kernel` (forward pass, fade, fusion ``f``, engine
kernel), :mod:`.fit` (training).
"""

from __future__ import annotations

from stf_pipeline.methods._base import MethodSpec
from stf_pipeline.methods.biastf.config import (
    B_INPUTS,
    G_BASES,
    G_INPUTS,
    NET_RADIUS,
    PRESETS,
    TABLE1_KERNELS,
    TRAIN_DTYPES,
    TRAINING,
    BiaSTFConfig,
    cpu_training,
)
from stf_pipeline.methods.biastf.fit import fit
from stf_pipeline.methods.biastf.kernel import (
    _WARNED,
    BEYOND_WARNING,
    CHANGE_FADE,
    biastf_kernel,
    fuse_directions,
    interpolation_factor,
    predict_block,
    predictor,
    trust_in_change,
)
from stf_pipeline.methods.biastf.networks import (
    CHANGE_PERCENTILE,
    CONVERSION_RIDGE,
    FROZEN_G_BYTES,
    Statistics,
    b_batch,
    change_limit,
    fit_statistics,
    frozen_g_outputs,
    g_batch,
    make_networks,
)
from stf_pipeline.methods.biastf.params import DTYPES, FUSION_WEIGHTS, BiaSTFParams, _halo, _prepare

METHOD = MethodSpec(
    name="biastf",
    params_type=BiaSTFParams,
    kernels={"jax": biastf_kernel},
    halo=_halo,
    n_pairs=(2, 2),
    learned=True,
    fit=fit,
    prepare=_prepare,
    block_padding="kernel",  # zero padding at the real extent, layer by layer: kernels.padding
    coarse_aligned=True,  # blocks start on native pixels' edges (coarse_interpolation's cells)
    device_inputs=("jax",),  # the kernel sends its inputs with kernels.device.to_device
)

__all__ = [
    "B_INPUTS", "BEYOND_WARNING", "CHANGE_FADE", "CHANGE_PERCENTILE", "CONVERSION_RIDGE", "DTYPES", "FROZEN_G_BYTES",
    "FUSION_WEIGHTS",
    "G_BASES", "G_INPUTS", "METHOD", "NET_RADIUS", "PRESETS", "TABLE1_KERNELS", "TRAINING", "TRAIN_DTYPES",
    "_WARNED", "BiaSTFConfig", "BiaSTFParams", "Statistics", "b_batch", "biastf_kernel", "change_limit", "cpu_training",
    "fit", "fit_statistics", "frozen_g_outputs", "fuse_directions", "g_batch", "interpolation_factor", "make_networks",
    "predict_block",
    "predictor", "trust_in_change",
]
