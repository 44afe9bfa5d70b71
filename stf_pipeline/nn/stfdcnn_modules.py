"""Flax modules of STFDCNN (Song et al., IEEE JSTARS 2018, 11:821-829).

STFDCNN learns two five-layer CNNs with residual learning:

* the **non-linear mapping (NLM) CNN** maps a coarse (MODIS-like) image, resampled onto an
  intermediate "low-spatial-resolution (LSR) Landsat" grid, to the fine image degraded to that
  grid;
* the **super-resolution (SR) CNN** maps an LSR fine image, interpolated onto the fine grid,
  to the full-resolution fine image.

Both are the same plain convolutional stack (convolution + ReLU, a linear last layer: the shared
:class:`~stf_pipeline.nn.modules.ConvStack`) whose output is added to its input (residual
learning, as in VDSR: the network predicts only what the input lacks). They differ only in the
grid they run on and in what they are trained on, so one module, :class:`ResidualCNN`, serves
both; all bands enter one network together (the CNNs map multispectral images).

What the paper's abstract confirms: two CNNs, five layers each, the NLM/SR split, the LSR
intermediate images. What we could not confirm from a public source (the full text is not
available to us): the kernel sizes and widths of the layers. Our defaults are the VDSR choice
that goes with residual learning, 3x3 kernels and 64 feature maps per hidden layer; both are
parameters (:class:`CNNConfig`), so a closer reading of the paper changes a config, not code.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from stf_pipeline.exceptions import ConfigError
from stf_pipeline.nn.modules import ConvStack, receptive_radius


@dataclasses.dataclass(frozen=True)
class CNNConfig:
    """Shape of one STFDCNN convolutional network.

    Attributes
    ----------
    kernel_sizes : tuple of int, default (3, 3, 3, 3, 3)
        Odd square kernel size of each layer; its length is the depth (5 in the paper).
        Not confirmed from the paper's full text (see module docstring).
    widths : tuple of int, default (64, 64, 64, 64)
        Feature maps of the hidden layers (one fewer than ``kernel_sizes``: the last layer
        outputs one channel per band). Not confirmed from the paper's full text.
    residual : bool, default True
        Add the input to the output (the network learns the residual).
    """

    kernel_sizes: tuple[int, ...] = (3, 3, 3, 3, 3)
    widths: tuple[int, ...] = (64, 64, 64, 64)
    residual: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "kernel_sizes", tuple(int(k) for k in self.kernel_sizes))
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if not self.kernel_sizes or any(k < 1 or k % 2 == 0 for k in self.kernel_sizes):
            raise ConfigError(
                f"stfdcnn: kernel_sizes must be a non-empty tuple of positive odd ints, got {self.kernel_sizes}; "
                "use e.g. (3, 3, 3, 3, 3)."
            )
        if len(self.widths) != len(self.kernel_sizes) - 1 or any(w < 1 for w in self.widths):
            raise ConfigError(
                f"stfdcnn: widths must hold {len(self.kernel_sizes) - 1} positive ints (one per hidden layer "
                f"of the {len(self.kernel_sizes)}-layer network), got {self.widths}."
            )

    @property
    def depth(self) -> int:
        """Number of convolutional layers."""
        return len(self.kernel_sizes)

    @property
    def receptive_radius(self) -> int:
        """Pixels each side of an output pixel that can change it (on the network's own grid)."""
        return receptive_radius(self.kernel_sizes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (for checkpoint metadata)."""
        return {"kernel_sizes": list(self.kernel_sizes), "widths": list(self.widths), "residual": self.residual}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CNNConfig:
        """Inverse of :meth:`to_dict`."""
        return cls(
            kernel_sizes=tuple(data["kernel_sizes"]), widths=tuple(data["widths"]), residual=bool(data["residual"])
        )


class ResidualCNN(nn.Module):
    """One STFDCNN network: a :class:`~stf_pipeline.nn.modules.ConvStack` plus its input.

    Attributes
    ----------
    n_bands : int
        Number of bands: the network maps all bands jointly to all bands.
    config : CNNConfig
        Kernel sizes, widths, residual flag.
    dtype : jnp.dtype, default float32
        Computation dtype of the convolutions (``jnp.bfloat16`` for fast inference);
        parameters, the skip connection and the output stay float32.

    The input is ``(batch, y, x, band, 1)`` and the output ``(batch, y, x, band)``: the layout of
    :class:`stf_pipeline.nn.sampler.Batch`, so the shared ``train_step`` trains it unchanged.
    ``'SAME'`` zero padding keeps the spatial size.
    """

    n_bands: int
    config: CNNConfig = CNNConfig()
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """``(batch, y, x, band, 1) -> (batch, y, x, band)`` float32."""
        if x.ndim != 5 or x.shape[3] != self.n_bands or x.shape[4] != 1:
            raise ConfigError(
                f"stfdcnn: the network expects (batch, y, x, {self.n_bands} bands, 1) input, got shape {x.shape}."
            )
        image = x[..., 0].astype(jnp.float32)
        cfg = self.config
        out = ConvStack((*cfg.widths, self.n_bands), cfg.kernel_sizes, self.dtype, name="net")(image)
        return image + out if cfg.residual else out


__all__ = ["CNNConfig", "ResidualCNN"]
