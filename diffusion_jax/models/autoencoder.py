"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, Sec. 3.1, App. G).

The first stage of an LDM: E(x) gives the mean and log-variance of a diagonal Gaussian over a
latent h/f x w/f x c (f = 2^(levels - 1)); D(z) maps a latent back to the image. Same layout
as CompVis' `ldm.modules.diffusionmodules.model.Encoder/Decoder` and diffusers'
`AutoencoderKL` (kl-f8: ch 128, ch_mult (1, 2, 4, 4), 2 res blocks, z 4; Stable Diffusion's VAE
is that network), built from the U-Net's blocks without the timestep: ResBlock, single-head
AttnBlock, stride-2 Downsample (one row/column of padding after), nearest x2 + conv Upsample,
GroupNorm(32, eps 1e-6). NHWC; `dtype` is the compute dtype, parameters stay float32.

Attention goes by level index (`attn_levels`), not by spatial size, so one network encodes
images of any size divisible by f. The public kl-f* models attend in the middle block only.

codebook_size > 0 gives the VQ-regularised first stage instead (VQGAN, Esser et al. 2021; LDM's
vq-f4 / vq-f8, diffusers' `VQModel`): E(x) is one latent h (no variance), and D quantises it to
its nearest codebook vectors before decoding. LDM diffuses h itself (before quantisation).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import onednn_conv
from diffusion_jax.models.layers import (AttnBlock, Downsample, ResBlock, Upsample, conv,
                                         group_norm, use_subpixel)

LOGVAR_RANGE = (-30.0, 20.0)  # the clamp of ldm's DiagonalGaussianDistribution


def gaussian_from_moments(moments):
  """[..., 2c] -> (mean, logvar), each [..., c]; logvar clamped to LOGVAR_RANGE."""
  mean, logvar = jnp.split(moments, 2, axis=-1)
  return mean, jnp.clip(logvar, *LOGVAR_RANGE)


def sample_gaussian(rng, mean, logvar):
  """z = mean + exp(logvar / 2) * eps, the reparameterised posterior sample."""
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


def kl_to_standard_normal(mean, logvar):
  """KL(N(mean, exp(logvar)) || N(0, I)) summed over each example's latent: [B]."""
  kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  return jnp.sum(kl, axis=tuple(range(1, kl.ndim)))


class _Trunk(nn.Module):
  """What both halves share: their layout, and how the blocks are built (remat, conv kernels,
  attention)."""
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  attn_levels: Sequence[int] = ()
  mid_attn: bool = True
  dtype: Any = jnp.float32
  dropout: float = 0.0
  conv: str = "auto"
  attention: str = "auto"
  remat: bool = False

  def blocks(self):
    onednn = onednn_conv.use_onednn(self.conv, self.dtype)
    block_cls = nn.remat(ResBlock, static_argnums=(3,)) if self.remat else ResBlock
    attn_cls = nn.remat(AttnBlock) if self.remat else AttnBlock
    impl = self.attention
    res = lambda ch, name: block_cls(ch, self.dropout, self.dtype, onednn, name=name)
    attn = lambda name: attn_cls(self.dtype, impl, onednn, name=name)
    return res, attn, onednn

  def middle(self, h, train, mid_attn):
    res, attn, _ = self.blocks()
    h = res(h.shape[-1], "mid_block_1")(h, None, train)
    if mid_attn:
      h = attn("mid_attn")(h)
    return res(h.shape[-1], "mid_block_2")(h, None, train)

  def head(self, h, features, onednn):
    h = group_norm("norm_out", self.dtype, swish=True, native=onednn)(h)
    return conv(features, 3, "conv_out", self.dtype, onednn=onednn)(h)


class Encoder(_Trunk):
  """x [B, H, W, in] -> [B, H/f, W/f, out_channels] (2 z_channels: mean and log-variance)."""
  out_channels: int = 8

  @nn.compact
  def __call__(self, x, train: bool = False):
    res, attn, onednn = self.blocks()
    levels = len(self.ch_mult)
    h = conv(self.ch, 3, "conv_in", self.dtype, onednn=onednn)(x.astype(self.dtype))
    for i, mult in enumerate(self.ch_mult):
      for j in range(self.num_res_blocks):
        h = res(self.ch * mult, f"down_{i}_block_{j}")(h, None, train)
        if i in self.attn_levels:
          h = attn(f"down_{i}_attn_{j}")(h)
      if i != levels - 1:
        h = Downsample(self.dtype, onednn, name=f"down_{i}_downsample")(h)
    h = self.middle(h, train, self.mid_attn)
    return self.head(h, self.out_channels, onednn)


class Decoder(_Trunk):
  """z [B, h, w, z_channels] -> [B, h f, w f, out_channels]; num_res_blocks + 1 per level."""
  out_channels: int = 3
  upsample_conv: str = "auto"

  @nn.compact
  def __call__(self, z, train: bool = False):
    res, attn, onednn = self.blocks()
    subpixel = use_subpixel(self.upsample_conv)
    h = conv(self.ch * self.ch_mult[-1], 3, "conv_in", self.dtype, onednn=onednn)(
        z.astype(self.dtype))
    h = self.middle(h, train, self.mid_attn)
    for i, mult in reversed(list(enumerate(self.ch_mult))):
      for j in range(self.num_res_blocks + 1):
        h = res(self.ch * mult, f"up_{i}_block_{j}")(h, None, train)
        if i in self.attn_levels:
          h = attn(f"up_{i}_attn_{j}")(h)
      if i != 0:
        h = Upsample(self.dtype, onednn, subpixel, name=f"up_{i}_upsample")(h)
    return self.head(h, self.out_channels, onednn)


class AutoencoderKL(nn.Module):
  """E and D with the 1x1 convs between them (ldm's quant_conv / post_quant_conv).

  z_channels: the encoder's and decoder's latent width; embed_dim: the latent's channels after
  quant_conv (both 4 in kl-f8; without quant convs they must agree). `encode` gives the
  posterior's moments, `decode` an image in [-1, 1] (not clipped); `__call__` both, sampling
  z from the posterior when given an rng (training) and taking its mean otherwise.
  With codebook_size > 0 (VQ): `encode` gives (h, None), `decode` quantises first, and
  `__call__` gives (reconstruction, h, (z_q, indices)): z_q the chosen codebook vectors, which
  the decoder saw through the straight-through estimator h + sg(z_q - h).
  """
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  attn_levels: Sequence[int] = ()
  mid_attn: bool = True
  in_channels: int = 3
  out_channels: int = 3
  z_channels: int = 4
  embed_dim: int = 4
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  dropout: float = 0.0
  dtype: Any = jnp.float32
  attention: str = "auto"
  remat: bool = False
  conv: str = "auto"
  upsample_conv: str = "auto"
  codebook_size: int = 0

  @property
  def downsampling_factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  def setup(self):
    shared = dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                  attn_levels=tuple(self.attn_levels), mid_attn=self.mid_attn,
                  dtype=self.dtype, dropout=self.dropout, conv=self.conv,
                  attention=self.attention, remat=self.remat)
    if not (self.use_quant_conv and self.use_post_quant_conv) and (
        self.z_channels != self.embed_dim):
      raise ValueError(f"z_channels={self.z_channels} and embed_dim={self.embed_dim} differ, "
                       "which needs both quant_conv and post_quant_conv")
    moments = 1 if self.codebook_size else 2  # VQ: one latent; KL: mean and log-variance
    self.encoder = Encoder(out_channels=moments * self.z_channels, **shared)
    self.decoder = Decoder(out_channels=self.out_channels, upsample_conv=self.upsample_conv,
                           **shared)
    onednn = onednn_conv.use_onednn(self.conv, self.dtype)
    if self.use_quant_conv:
      self.quant_conv = conv(moments * self.embed_dim, 1, "quant_conv", self.dtype,
                             onednn=onednn)
    if self.codebook_size:  # taming-transformers' init
      bound = 1.0 / self.codebook_size
      self.codebook = self.param(
          "codebook", lambda k, shape: jax.random.uniform(k, shape, jnp.float32, -bound, bound),
          (self.codebook_size, self.embed_dim))
    if self.use_post_quant_conv:
      self.post_quant_conv = conv(self.z_channels, 1, "post_quant_conv", self.dtype,
                                  onednn=onednn)

  def encode(self, x, train: bool = False):
    """Images [B, H, W, in_channels] in [-1, 1] -> (mean, logvar), each [B, H/f, W/f, embed]."""
    f = self.downsampling_factor
    if x.ndim != 4 or x.shape[-1] != self.in_channels or x.shape[1] % f or x.shape[2] % f:
      raise ValueError(f"the autoencoder takes [B, H, W, {self.in_channels}] images with H and "
                       f"W divisible by {f}; got {x.shape}")
    moments = self.encoder(x, train)
    if self.use_quant_conv:
      moments = self.quant_conv(moments)
    if self.codebook_size:
      return moments.astype(jnp.float32), None
    return gaussian_from_moments(moments.astype(jnp.float32))

  def quantize(self, h):
    """(z_q, indices): each latent vector's nearest codebook vector (Euclidean), float32."""
    h = h.astype(jnp.float32)
    e = self.codebook
    dist = (jnp.sum(h * h, -1, keepdims=True) - 2.0 * jnp.einsum("...c,nc->...n", h, e)
            + jnp.sum(e * e, -1))
    indices = jnp.argmin(dist, axis=-1)
    return e[indices], indices

  def decode(self, z, train: bool = False, quantize: bool = True):
    """Latents [B, h, w, embed_dim] -> images [B, h f, w f, out_channels] (float32); a VQ model
    quantises them first (quantize=False: they are codebook vectors already)."""
    if z.ndim != 4 or z.shape[-1] != self.embed_dim:
      raise ValueError(f"the decoder takes [B, h, w, {self.embed_dim}] latents; got {z.shape}")
    if self.codebook_size and quantize:
      z = self.quantize(z)[0]
    if self.use_post_quant_conv:
      z = self.post_quant_conv(z.astype(self.dtype))
    return self.decoder(z, train).astype(jnp.float32)

  def __call__(self, x, rng=None, train: bool = False):
    """(reconstruction, mean, logvar); z ~ posterior with `rng`, its mean without. VQ:
    (reconstruction, h, (z_q, codebook indices))."""
    if self.codebook_size:
      h, _ = self.encode(x, train)
      z_q, indices = self.quantize(h)
      rec = self.decode(h + jax.lax.stop_gradient(z_q - h), train, quantize=False)
      return rec, h, (z_q, indices)
    mean, logvar = self.encode(x, train)
    z = mean if rng is None else sample_gaussian(rng, mean, logvar)
    return self.decode(z, train), mean, logvar
