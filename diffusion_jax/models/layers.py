"""Building blocks of the DDPM U-Net (Ho et al. 2020, Appendix B), NHWC, Flax linen."""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import fast_ops, onednn_conv

Dtype = Any

# The original code initialises with variance scaling (fan_avg, uniform); the layers it marks
# init_scale=0 (each ResBlock's second conv, attention's output projection, the final conv) are
# zero-initialised so that every block starts as the identity.
default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
zero_init = nn.initializers.zeros


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
  """Sinusoidal embedding of the timestep, as in the Transformer (float32, [B, dim])."""
  assert t.ndim == 1 and dim % 2 == 0
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)


def group_norm(name: str, dtype: Dtype, swish: bool = False):
  """GroupNorm(32 groups), followed by swish if asked (fast_ops.group_norm_swish: a lever)."""
  if fast_ops.FAST_GROUP_NORM:
    return fast_ops.GroupNorm(num_groups=32, epsilon=1e-6, dtype=dtype, swish=swish, name=name)
  norm = nn.GroupNorm(num_groups=32, epsilon=1e-6, dtype=dtype, name=name)
  return (lambda x: nn.swish(norm(x))) if swish else norm


def conv(features: int, kernel: int, name: str, dtype: Dtype, strides: int = 1,
         init=default_init, onednn: bool = False):
  """k x k conv, "SAME" padding (TF's: the extra row/column after); oneDNN's kernels if asked."""
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding="SAME",
                 kernel_init=init, dtype=dtype, name=name,
                 conv_general_dilated=onednn_conv.conv_general_dilated if onednn else None)


class ResBlock(nn.Module):
  """GroupNorm, swish, conv; + Dense(swish(temb)); GroupNorm, swish, dropout, conv; + skip."""
  out_ch: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  onednn: bool = False  # convolutions through onednn_conv (CPU, float32)

  @nn.compact
  def __call__(self, x, temb, train: bool = False):
    h = group_norm("norm_1", self.dtype, swish=True)(x)
    h = conv(self.out_ch, 3, "conv_1", self.dtype, onednn=self.onednn)(h)
    h = h + nn.Dense(self.out_ch, kernel_init=default_init, dtype=self.dtype,
                     name="temb_proj")(nn.swish(temb))[:, None, None, :]
    h = group_norm("norm_2", self.dtype, swish=True)(h)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = conv(self.out_ch, 3, "conv_2", self.dtype, init=zero_init, onednn=self.onednn)(h)
    if x.shape[-1] != self.out_ch:  # "NIN" shortcut = 1x1 conv
      x = conv(self.out_ch, 1, "nin_shortcut", self.dtype, onednn=self.onednn)(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over the H*W positions, residual (Appendix B).

  implementation: None lets JAX choose; "cudnn" (GPU flash attention, bf16/fp16) or "xla".
  """
  dtype: Dtype = jnp.float32
  implementation: str | None = None

  @nn.compact
  def __call__(self, x):
    b, hgt, wid, c = x.shape
    h = group_norm("norm", self.dtype)(x).reshape(b, hgt * wid, 1, c)
    dense = lambda name, init=default_init: nn.Dense(c, kernel_init=init, dtype=self.dtype,
                                                     name=name)
    q, k, v = dense("q")(h), dense("k")(h), dense("v")(h)
    h = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)  # 1/sqrt(c)
    h = dense("proj_out", zero_init)(h).reshape(b, hgt, wid, c)
    return x + h


class Downsample(nn.Module):
  """Stride-2 3x3 conv (TF "SAME" padding: one row/column after)."""
  dtype: Dtype = jnp.float32
  onednn: bool = False

  @nn.compact
  def __call__(self, x):
    return conv(x.shape[-1], 3, "conv", self.dtype, strides=2, onednn=self.onednn)(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2, then a 3x3 conv."""
  dtype: Dtype = jnp.float32
  onednn: bool = False

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return conv(x.shape[-1], 3, "conv", self.dtype, onednn=self.onednn)(x)
