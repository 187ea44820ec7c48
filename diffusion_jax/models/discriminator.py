"""The PatchGAN discriminator of the LDM autoencoder's loss (pix2pix's NLayerDiscriminator, as in
taming-transformers and CompVis latent-diffusion): one real/fake logit per overlapping patch
(70x70 pixels with the default 3 layers).

conv4x4/2 (ndf) -> LeakyReLU(0.2) -> [conv4x4/2 (no bias) -> BatchNorm -> LeakyReLU] x
(n_layers - 1) -> conv4x4/1 (8 ndf at most) -> BatchNorm -> LeakyReLU -> conv4x4/1 (1 channel);
every conv pads by 1. Initialised as theirs: conv weights N(0, 0.02), BatchNorm scales
N(1, 0.02); the two conv biases start at 0 (torch's default draws them from U(+-1/sqrt(fan_in))).
BatchNorm uses the statistics of each call's batch in training (torch's momentum 0.1 = flax's
0.9; flax's running variance is the biased estimate), the running ones in evaluation.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _scale_init(key, shape, dtype=jnp.float32):
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class PatchDiscriminator(nn.Module):
  """[B, H, W, C] images in [-1, 1] -> [B, H', W', 1] logits (H' = H/8 - 2 for 3 layers)."""
  ndf: int = 64
  n_layers: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = lambda features, stride, bias, name: nn.Conv(
        features, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)), use_bias=bias,
        kernel_init=nn.initializers.normal(0.02), dtype=self.dtype, name=name)
    norm = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                     scale_init=_scale_init, dtype=self.dtype, name=name)
    h = nn.leaky_relu(conv(self.ndf, 2, True, "conv_0")(x.astype(self.dtype)), 0.2)
    for n in range(1, self.n_layers + 1):
      stride = 2 if n < self.n_layers else 1
      h = conv(self.ndf * min(2 ** n, 8), stride, False, f"conv_{n}")(h)
      h = nn.leaky_relu(norm(f"norm_{n}")(h), 0.2)
    return conv(1, 1, True, "conv_out")(h).astype(jnp.float32)
