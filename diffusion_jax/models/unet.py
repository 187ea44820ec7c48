"""The DDPM U-Net (Ho et al. 2020, Appendix B; PixelCNN++ backbone with attention)."""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from diffusion_jax.models import onednn_conv
from diffusion_jax.models.context import split_context
from diffusion_jax.models.freeu import apply_freeu, check_freeu
from diffusion_jax.models.ip_adapter import split_ip_context, with_ip_context
from diffusion_jax.models.pag import split_pag, with_pag_mask
from diffusion_jax.models.layers import (AttnBlock, Downsample, ResBlock, Upsample, conv,
                                         default_init, group_norm, num_heads,
                                         timestep_embedding, use_subpixel, zero_init)
from diffusion_jax.models.transformer import SpatialTransformer


class UNet(nn.Module):
  """eps_theta(x_t, t[, y]) on NHWC images.

  ch: base channels; ch_mult: multiplier per resolution level; attn_resolutions: spatial
  sizes that get self-attention; out_channels defaults to in_channels (twice that when
  `learned_variance`; output_channels > 0 sets it, e.g. 4 for an inpainting U-Net whose 9
  inputs are the latents, the mask and the masked image's latents); num_classes > 0 adds a
  label embedding (index num_classes is the null label, for classifier-free guidance). `dtype`
  is the compute dtype; parameters stay float32.
  attention: "auto" | "xla" | "cudnn" | "per_head" (models/attention.py).
  conv: "auto" | "xla" | "onednn" -- whose convolution kernels run (models/onednn_conv.py;
  "auto": oneDNN's for float32 on a single CPU device where they are installed, else XLA's);
  with oneDNN's, GroupNorm runs csrc/group_norm.cc's kernels (fast_ops.native_group_norm).
  upsample_conv: "auto" | "subpixel" | "resize" -- how the up path's nearest-x2 + 3x3 conv is
  computed (layers.Upsample: "subpixel" is the same function in fewer FLOPs; "auto" picks
  it on CPU, where it was measured faster).
  remat: recompute each block's activations in the backward pass instead of keeping them
  (less memory for the 256x256 models, for one more forward pass of each block).

  The latent-diffusion layouts (LDM, Stable Diffusion; the defaults are DDPM's):
  context_dim > 0: the attention blocks are SpatialTransformers (models/transformer.py) that
  cross-attend to a context [B, L, context_dim]: with num_classes > 0 the labels' (an
  embedding of num_classes + 1 rows, [B, 1, context_dim], LDM's class-conditional models),
  else the `context` argument (e.g. a text encoder's output). transformer_depth: blocks each
  (or one number per level; the middle block takes the last level's, as SDXL's 1, 2, 10).
  Stable Diffusion XL's micro-conditioning, added_cond_dim > 0: `context` is a dict, "text"
  [B, L, context_dim], "text_embeds" [B, P] (a pooled text embedding) and "time_ids" [B, K]
  (sizes and crop), each id embedded sinusoidally in added_time_dim channels, all concatenated
  (P + K * added_time_dim = added_cond_dim) through Dense-swish-Dense into the timestep
  embedding (diffusers' addition_embed_type "text_time").
  attn_levels: levels (0 = full size) with attention, instead of attn_resolutions (so that a
  model keeps its layout at any input size). num_heads / head_channels: attention heads (the
  latter, when > 0, gives channels / head_channels heads per block). norm_eps: the GroupNorm
  epsilon of the res blocks, self-attention and output; flip_sin_to_cos, freq_shift: the
  timestep embedding's (layers.timestep_embedding); downsample_padding: "same" | "symmetric".
  """
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.1
  in_channels: int = 3
  learned_variance: bool = False
  num_classes: int = 0
  dtype: Any = jnp.float32
  attention: str = "auto"
  remat: bool = False
  conv: str = "auto"
  upsample_conv: str = "auto"
  context_dim: int = 0
  transformer_depth: int | Sequence[int] = 1
  attn_levels: Sequence[int] = ()
  num_heads: int = 1
  head_channels: int = 0
  norm_eps: float = 1e-6
  flip_sin_to_cos: bool = False
  freq_shift: float = 1.0
  downsample_padding: str = "same"
  added_cond_dim: int = 0
  added_time_dim: int = 0
  time_cond_dim: int = 0  # LCM-distilled: context["timestep_cond"], the guidance's embedding
  output_channels: int = 0
  freeu: Sequence[float] = ()  # (s1, s2, b1, b2): FreeU at inference (models/freeu.py)
  pag_layers: Sequence[tuple[str, int]] = ()  # PAG's self-attentions (models/pag.py)

  @property
  def out_channels(self) -> int:
    if self.output_channels:
      return self.output_channels
    return self.in_channels * (2 if self.learned_variance else 1)

  def _context(self, b: int, y, context):
    """The cross-attention context [B, L, context_dim] (None without cross-attention)."""
    if not self.context_dim:
      if context is not None:
        raise ValueError("a context was passed to a U-Net without cross-attention "
                         "(context_dim = 0)")
      return None
    if self.num_classes:
      if context is not None:
        raise ValueError("this U-Net's context is its class labels (num_classes > 0): pass y")
      if y is None:
        y = jnp.full((b,), self.num_classes, dtype=jnp.int32)  # the null label
      return nn.Embed(self.num_classes + 1, self.context_dim, dtype=self.dtype,
                      name="label_context")(y)[:, None, :]
    if self.added_cond_dim:
      if not (isinstance(context, dict) and {"text", "text_embeds", "time_ids"} <= set(context)):
        raise ValueError("this U-Net (SDXL's) takes context={'text': [B, L, d], 'text_embeds': "
                         "[B, P], 'time_ids': [B, K]}")
      batch = lambda a: jnp.broadcast_to(a, (b,) + a.shape[1:]) if a.shape[0] == 1 else a
      return {"text": self._text_context(b, context["text"]),
              "text_embeds": batch(context["text_embeds"]), "time_ids": batch(context["time_ids"])}
    return self._text_context(b, context)

  def _text_context(self, b: int, context):
    if context is not None and context.ndim == 3 and context.shape[0] == 1:
      context = jnp.broadcast_to(context, (b,) + context.shape[1:])  # one for the whole batch
    if context is None or context.ndim != 3 or context.shape[0] != b or (
        context.shape[2] != self.context_dim):
      raise ValueError(f"this U-Net cross-attends to a context [B={b}, L, {self.context_dim}]; "
                       f"got {None if context is None else context.shape}")
    return context

  def _depth(self, level: int) -> int:
    depth = self.transformer_depth
    return depth if isinstance(depth, int) else depth[level]

  def transformer_blocks(self) -> list[tuple[str, str, int]]:
    """(diffusers' name of each transformer block, our SpatialTransformer's name, the block's
    index in it) of an attn_levels layout, in diffusers' order of its attention processors: the
    down blocks', the up blocks' (up_blocks[0]: the deepest level), the middle block's."""
    levels, out = len(self.ch_mult), []
    add = lambda prefix, ours, level: out.extend(
        (f"{prefix}.transformer_blocks.{d}", ours, d) for d in range(self._depth(level)))
    for i in range(levels):
      if i in self.attn_levels:
        for j in range(self.num_res_blocks):
          add(f"down_blocks.{i}.attentions.{j}", f"down_{i}_attn_{j}", i)
    for i in reversed(range(levels)):
      if i in self.attn_levels:
        for j in range(self.num_res_blocks + 1):
          add(f"up_blocks.{levels - 1 - i}.attentions.{j}", f"up_{i}_attn_{j}", i)
    add("mid_block.attentions.0", "mid_attn", levels - 1)
    return out

  def _added_embedding(self, cond):
    """SDXL's text_time embedding [B, 4 ch] of the pooled text and the size/crop ids."""
    b = cond["text"].shape[0]
    if cond["time_ids"].ndim != 2 or cond["time_ids"].shape[0] != b:
      raise ValueError(f"time_ids must be [B={b}, K]; got {cond['time_ids'].shape}")
    ids = timestep_embedding(cond["time_ids"].reshape(-1), self.added_time_dim,
                             flip_sin_to_cos=self.flip_sin_to_cos,
                             freq_shift=self.freq_shift).reshape(b, -1)
    h = jnp.concatenate([cond["text_embeds"].astype(jnp.float32), ids], axis=-1)
    if h.shape != (b, self.added_cond_dim):
      raise ValueError(f"text_embeds {cond['text_embeds'].shape} and time_ids "
                       f"{cond['time_ids'].shape} give {h.shape[-1]} added features; this U-Net "
                       f"takes {self.added_cond_dim}")
    h = nn.Dense(4 * self.ch, kernel_init=default_init, dtype=self.dtype,
                 name="add_embed_dense_0")(h)
    return nn.Dense(4 * self.ch, kernel_init=default_init, dtype=self.dtype,
                    name="add_embed_dense_1")(nn.swish(h))

  def _has_attention(self, level: int, size: int) -> bool:
    return level in self.attn_levels if self.attn_levels else size in self.attn_resolutions

  @nn.compact
  def __call__(self, x, t, y=None, train: bool = False, context=None, residuals=None):
    """residuals: a ControlNet's (models/controlnet.py), ([one per skip], middle), added to the
    skip connections and to the middle block's output (diffusers' down_block_additional_
    residuals and mid_block_additional_residual)."""
    temb, context = self._embeddings(x, t, y, context)
    h, hs = self._down_and_middle(x, temb, context, train)
    if residuals is not None:
      skips, middle = residuals
      if len(skips) != len(hs):
        raise ValueError(f"{len(skips)} skip residuals for the U-Net's {len(hs)} skips")
      hs = [a + r.astype(a.dtype) for a, r in zip(hs, skips)]
      h = h + middle.astype(h.dtype)
    onednn = onednn_conv.use_onednn(self.conv, self.dtype)
    subpixel = use_subpixel(self.upsample_conv)
    freeu = check_freeu(self.freeu)
    for i, mult in reversed(list(enumerate(self.ch_mult))):  # up path, skips concatenated
      for j in range(self.num_res_blocks + 1):
        h, skip = apply_freeu(len(self.ch_mult) - 1 - i, h, hs.pop(), freeu)
        h = jnp.concatenate([h, skip], axis=-1)
        h = self._res_block(self.ch * mult, f"up_{i}_block_{j}")(h, temb, train)
        if self._has_attention(i, h.shape[1]):
          h = self._attend(h, i, f"up_{i}_attn_{j}", context)
      if i != 0:
        h = Upsample(self.dtype, onednn, subpixel, name=f"up_{i}_upsample")(h)
    assert not hs

    h = group_norm("norm_out", self.dtype, swish=True, native=onednn, eps=self.norm_eps)(h)
    h = conv(self.out_channels, 3, "conv_out", self.dtype, init=zero_init, onednn=onednn)(h)
    return h.astype(jnp.float32)

  def _embeddings(self, x, t, y, context):
    """(the timestep embedding [B, 4 ch] with the labels' or SDXL's added one, the
    cross-attention context or None), the input checked."""
    b, height, width, c = x.shape
    levels = len(self.ch_mult)
    if c != self.in_channels:
      raise ValueError(f"U-Net expects {self.in_channels} channels, got input {x.shape}")
    if height % 2 ** (levels - 1) or width % 2 ** (levels - 1):
      raise ValueError(f"image size {height}x{width} is not divisible by 2^{levels - 1} "
                       f"(ch_mult has {levels} levels)")
    t = jnp.broadcast_to(jnp.asarray(t), (b,))
    context, pag = split_pag(context)  # perturbed-attention guidance's mask (models/pag.py)
    context, ip = split_ip_context(context)  # IP-Adapter's image tokens (models/ip_adapter.py)

    # timestep embedding -> Dense(4ch) -> swish -> Dense(4ch)
    temb = timestep_embedding(t, self.ch, flip_sin_to_cos=self.flip_sin_to_cos,
                              freq_shift=self.freq_shift)
    if self.time_cond_dim:  # diffusers' TimestepEmbedding(cond_proj): added to the sinusoids
      context, taken = split_context(context, ("timestep_cond",))
      if taken is None:
        raise ValueError("this U-Net (LCM-distilled) takes context={'text': ..., "
                         "'timestep_cond': [B, time_cond_dim]}")
      temb = temb + nn.Dense(self.ch, use_bias=False, dtype=self.dtype,
                             name="temb_cond_proj")(taken["timestep_cond"].astype(jnp.float32))
    temb = nn.Dense(4 * self.ch, kernel_init=default_init, dtype=self.dtype,
                    name="temb_dense_0")(temb)
    temb = nn.Dense(4 * self.ch, kernel_init=default_init, dtype=self.dtype,
                    name="temb_dense_1")(nn.swish(temb))
    context = self._context(b, y, context)
    if self.added_cond_dim:
      temb = temb + self._added_embedding(context)
      context = context["text"]
    if self.num_classes and context is None:
      if y is None:
        y = jnp.full((b,), self.num_classes, dtype=jnp.int32)  # the null label
      temb = temb + nn.Embed(self.num_classes + 1, 4 * self.ch, dtype=self.dtype,
                             name="label_emb")(y)
    if ip is not None:
      if context is None:
        raise ValueError("image prompt tokens need a cross-attention U-Net with a text context")
      batch = lambda a: jnp.broadcast_to(a, (b,) + a.shape[1:])
      context = with_ip_context(context, [batch(a) for a in ip["ip_tokens"]],
                                batch(ip["ip_scale"]))
    if pag is not None and context is not None:
      context = with_pag_mask(context, jnp.broadcast_to(pag, (b,)))
    return temb, context

  def _res_block(self, ch: int, name: str):
    # remat: static_argnums counts self, so 3 is `train` in ResBlock(x, temb, train)
    block_cls = nn.remat(ResBlock, static_argnums=(3,)) if self.remat else ResBlock
    return block_cls(ch, self.dropout, self.dtype, onednn_conv.use_onednn(self.conv, self.dtype),
                     self.norm_eps, name=name)

  def _attend(self, h, level: int, name: str, context):
    onednn = onednn_conv.use_onednn(self.conv, self.dtype)
    heads = num_heads(h.shape[-1], self.num_heads, self.head_channels)
    if context is None:
      attn_cls = nn.remat(AttnBlock) if self.remat else AttnBlock
      return attn_cls(self.dtype, self.attention, onednn, heads, self.norm_eps, name=name)(h)
    xattn_cls = nn.remat(SpatialTransformer) if self.remat else SpatialTransformer
    pag_blocks = tuple(block for module, block in self.pag_layers if module == name)
    return xattn_cls(heads, self._depth(level), self.dtype, self.attention, onednn, pag_blocks,
                     name=name)(h, context)

  def _down_and_middle(self, x, temb, context, train, added_input=None):
    """conv_in (+ added_input, a ControlNet's hint), the down path and the middle blocks: (h,
    the skips)."""
    levels = len(self.ch_mult)
    onednn = onednn_conv.use_onednn(self.conv, self.dtype)
    h = conv(self.ch, 3, "conv_in", self.dtype, onednn=onednn)(x.astype(self.dtype))
    if added_input is not None:
      h = h + added_input.astype(h.dtype)
    hs = [h]
    for i, mult in enumerate(self.ch_mult):  # down path
      for j in range(self.num_res_blocks):
        h = self._res_block(self.ch * mult, f"down_{i}_block_{j}")(h, temb, train)
        if self._has_attention(i, h.shape[1]):
          h = self._attend(h, i, f"down_{i}_attn_{j}", context)
        hs.append(h)
      if i != levels - 1:
        h = Downsample(self.dtype, onednn, self.downsample_padding,
                       name=f"down_{i}_downsample")(h)
        hs.append(h)

    h = self._res_block(h.shape[-1], "mid_block_1")(h, temb, train)  # middle
    h = self._attend(h, levels - 1, "mid_attn", context)
    h = self._res_block(h.shape[-1], "mid_block_2")(h, temb, train)
    return h, hs
