"""Building blocks of the DDPM U-Net (Ho et al. 2020, Appendix B), NHWC, Flax linen."""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import fast_ops, onednn_conv
from diffusion_jax.models.attention import dot_product_attention

Dtype = Any

# The original code initialises with variance scaling (fan_avg, uniform); the layers it marks
# init_scale=0 (each ResBlock's second conv, attention's output projection, the final conv) are
# zero-initialised so that every block starts as the identity.
default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
zero_init = nn.initializers.zeros


def timestep_embedding(t, dim: int, max_period: float = 10000.0, flip_sin_to_cos: bool = False,
                       freq_shift: float = 1.0):
  """Sinusoidal embedding of the timestep, as in the Transformer (float32, [B, dim]).

  Frequencies max_period^(-i / (dim/2 - freq_shift)), i < dim/2; [sin, cos]. DDPM's (the
  defaults): freq_shift 1, sin first; LDM / Stable Diffusion's: freq_shift 0, cos first.
  """
  assert t.ndim == 1 and dim % 2 == 0
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
                  / (half - freq_shift))
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  parts = [jnp.cos(args), jnp.sin(args)] if flip_sin_to_cos else [jnp.sin(args), jnp.cos(args)]
  return jnp.concatenate(parts, axis=1)


def group_norm(name: str, dtype: Dtype, swish: bool = False, native: bool = False,
               eps: float = 1e-6):
  """GroupNorm(32 groups), followed by swish if asked; native: csrc/group_norm.cc's kernels."""
  if fast_ops.FAST_GROUP_NORM:
    return fast_ops.GroupNorm(num_groups=32, epsilon=eps, dtype=dtype, swish=swish,
                              native=native, name=name)
  norm = nn.GroupNorm(num_groups=32, epsilon=eps, dtype=dtype, name=name)
  return (lambda x: nn.swish(norm(x))) if swish else norm


def conv(features: int, kernel: int, name: str, dtype: Dtype, strides: int = 1,
         init=default_init, onednn: bool = False, padding="SAME"):
  """k x k conv, "SAME" padding (TF's: the extra row/column after) unless given; oneDNN's
  kernels if asked."""
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=padding,
                 kernel_init=init, dtype=dtype, name=name,
                 conv_general_dilated=onednn_conv.conv_general_dilated if onednn else None)


class ResBlock(nn.Module):
  """GroupNorm, swish, conv; + Dense(swish(temb)); GroupNorm, swish, dropout, conv; + skip.

  temb=None (the autoencoder's blocks): no timestep projection.
  """
  out_ch: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  onednn: bool = False  # the CPU kernels: onednn_conv's convolutions, native GroupNorm
  eps: float = 1e-6     # GroupNorm's (Stable Diffusion's U-Net: 1e-5)

  @nn.compact
  def __call__(self, x, temb=None, train: bool = False):
    h = group_norm("norm_1", self.dtype, swish=True, native=self.onednn, eps=self.eps)(x)
    h = conv(self.out_ch, 3, "conv_1", self.dtype, onednn=self.onednn)(h)
    if temb is not None:
      h = h + nn.Dense(self.out_ch, kernel_init=default_init, dtype=self.dtype,
                       name="temb_proj")(nn.swish(temb))[:, None, None, :]
    h = group_norm("norm_2", self.dtype, swish=True, native=self.onednn, eps=self.eps)(h)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = conv(self.out_ch, 3, "conv_2", self.dtype, init=zero_init, onednn=self.onednn)(h)
    if x.shape[-1] != self.out_ch:  # "NIN" shortcut = 1x1 conv
      x = conv(self.out_ch, 1, "nin_shortcut", self.dtype, onednn=self.onednn)(x)
    return x + h


def num_heads(channels: int, heads: int, head_channels: int) -> int:
  """Attention heads over `channels`: channels / head_channels where that is given, else heads."""
  n = channels // head_channels if head_channels else heads
  if n < 1 or channels % n or (head_channels and channels % head_channels):
    raise ValueError(f"{channels} channels do not split into {n} attention heads "
                     f"(num_heads={heads}, head_channels={head_channels})")
  return n


class AttnBlock(nn.Module):
  """Self-attention over the H*W positions, residual (Appendix B: one head; LDM's U-Nets split
  the channels into `heads`).

  implementation: models/attention.py's ("auto", "xla", "cudnn", "per_head").
  """
  dtype: Dtype = jnp.float32
  implementation: str = "auto"
  native: bool = False  # GroupNorm by csrc/group_norm.cc
  heads: int = 1
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    b, hgt, wid, c = x.shape
    n = self.heads
    h = group_norm("norm", self.dtype, native=self.native, eps=self.eps)(x)
    h = h.reshape(b, hgt * wid, c)
    dense = lambda name, init=default_init: nn.Dense(c, kernel_init=init, dtype=self.dtype,
                                                     name=name)
    q, k, v = (dense(name)(h).reshape(b, hgt * wid, n, c // n) for name in "qkv")
    h = dot_product_attention(q, k, v, self.implementation)  # 1/sqrt(d)
    h = dense("proj_out", zero_init)(h.reshape(b, hgt * wid, c)).reshape(b, hgt, wid, c)
    return x + h


DOWNSAMPLE_PADDING = ("same", "symmetric")


class Downsample(nn.Module):
  """Stride-2 3x3 conv. padding "same": TF's, one row/column after (DDPM, LDM's autoencoders);
  "symmetric": one on each side (torch's padding=1: LDM's and Stable Diffusion's U-Nets)."""
  dtype: Dtype = jnp.float32
  onednn: bool = False
  padding: str = "same"

  @nn.compact
  def __call__(self, x):
    if self.padding not in DOWNSAMPLE_PADDING:
      raise ValueError(f"downsample padding {self.padding!r}: one of {DOWNSAMPLE_PADDING}")
    pad = "SAME" if self.padding == "same" else ((1, 1), (1, 1))
    return conv(x.shape[-1], 3, "conv", self.dtype, strides=2, onednn=self.onednn,
                padding=pad)(x)


UPSAMPLE_CONV = ("auto", "subpixel", "resize")


def use_subpixel(upsample_conv: str) -> bool:
  """Whether `Upsample` runs as a subpixel conv: "auto" picks it on CPU and GPU, where it
  measured faster (README, levers; TPU: not measured, resize kept)."""
  if upsample_conv not in UPSAMPLE_CONV:
    raise ValueError(f"model.upsample_conv={upsample_conv!r}: expected one of {UPSAMPLE_CONV}")
  return upsample_conv == "subpixel" or (upsample_conv == "auto"
                                         and jax.default_backend() in ("cpu", "gpu"))


class Upsample(nn.Module):
  """Nearest-neighbour x2, then a 3x3 conv ("resize-conv").

  subpixel: the same function in fewer FLOPs. Each output pixel of phase (a, b) (its row and
  column parity) sees only a 2x2 neighbourhood of the low-resolution input, so the 3x3 kernel
  folds into four 2x2 kernels (`subpixel_kernel`), run as one 2x2 convolution with 4x the
  output channels on the input padded by one, whose phases interleave into the 2x output:
  2.25 (h / (h + 1))^2 times fewer FLOPs for an h x h input. Same parameters (`conv/kernel`
  [3, 3, C, C], `conv/bias`); equal up to float rounding.
  """
  dtype: Dtype = jnp.float32
  onednn: bool = False
  subpixel: bool = False

  @nn.compact
  def __call__(self, x):
    if not self.subpixel:
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
      return conv(x.shape[-1], 3, "conv", self.dtype, onednn=self.onednn)(x)
    return SubpixelUpsampleConv(x.shape[-1], self.dtype, self.onednn, name="conv")(x)


def _fold_taps(k):
  """[3, ...] taps over the x2 nearest-upsampled signal -> [2 phases, 2 taps, ...] over the
  original: output 2i (even phase) sees inputs (i-1, i, i), output 2i+1 sees (i, i, i+1)."""
  return jnp.stack([jnp.stack([k[0], k[1] + k[2]]), jnp.stack([k[0] + k[1], k[2]])])


def subpixel_kernel(kernel):
  """[3, 3, Cin, Cout] -> [2, 2, Cin, 4 * Cout]: output channels ordered (row phase, column
  phase, Cout)."""
  kh, kw, cin, cout = kernel.shape
  assert (kh, kw) == (3, 3), kernel.shape
  rows = _fold_taps(kernel.astype(jnp.float32))      # [a, s, kw, cin, cout]
  both = _fold_taps(jnp.moveaxis(rows, 2, 0))        # [b, t, a, s, cin, cout]
  return both.transpose(3, 1, 4, 2, 0, 5).reshape(2, 2, cin, 4 * cout)  # [s, t, cin, a, b, cout]


def subpixel_upsample_conv(x, kernel, conv_general_dilated=jax.lax.conv_general_dilated):
  """conv3x3_same(nearest_upsample_x2(x), kernel), without the upsampled tensor (no bias)."""
  n, h, w, _ = x.shape
  cout = kernel.shape[-1]
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = conv_general_dilated(xp, subpixel_kernel(kernel).astype(x.dtype), (1, 1),
                             ((0, 0), (0, 0)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  out = out.reshape(n, h + 1, w + 1, 2, 2, cout)  # phase (a, b) of pixel (i, j): out[i+a, j+b]
  rows = [jnp.stack([out[:, a:a + h, b:b + w, a, b] for b in (0, 1)], axis=3) for a in (0, 1)]
  return jnp.stack(rows, axis=2).reshape(n, 2 * h, 2 * w, cout)  # [n, h, a, w, b, c]


class SubpixelUpsampleConv(nn.Module):
  """The parameters of nn.Conv(features, (3, 3), "SAME"), applied by subpixel_upsample_conv."""
  features: int
  dtype: Dtype = jnp.float32
  onednn: bool = False

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", default_init, (3, 3, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    conv_fn = onednn_conv.conv_general_dilated if self.onednn else jax.lax.conv_general_dilated
    return subpixel_upsample_conv(x, kernel, conv_fn) + bias
