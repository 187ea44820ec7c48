"""A U-Net with its own text encoder, trained together: LDM's text-to-image model (Rombach et al.
2022, Sec. 4.3.1: "a transformer tau_theta" on tokenized captions, conditioning through
cross-attention, Eq. 3), as opposed to Stable Diffusion's frozen CLIP (text_conditioning.py).

The context argument carries token ids [B, L] (text_conditioning.LearnedText's bytes); a
bidirectional transformer (CLIPTextEncoder with causal=False, pre-LayerNorm, GELU) turns them
into [B, L, context_dim] for the U-Net. One parameter tree {"unet": ..., "text": ...}, so the
optimiser, EMA, checkpoints and guidance (the empty caption's ids as the null context) are
those of any model.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from diffusion_jax.models.clip_text import CLIPTextEncoder
from diffusion_jax.models.unet import UNet


class TextConditionedUNet(nn.Module):
  unet: UNet
  text: CLIPTextEncoder

  @property
  def num_classes(self) -> int:
    return 0

  def __call__(self, x, t, y=None, train: bool = False, context=None):
    if context is None or context.ndim != 2 or not jnp.issubdtype(context.dtype, jnp.integer):
      raise ValueError("this model encodes its captions itself: pass their token ids [B, L] as "
                       f"context; got {None if context is None else (context.shape, context.dtype)}")
    return self.unet(x, t, y, train, self.text(context))


def text_conditioned_unet(unet: UNet, layers: int, max_length: int, vocab_size: int):
  """The U-Net with a text transformer of `layers` blocks as wide as its context (heads of 64
  channels, MLP 4x), for `max_length` tokens of a `vocab_size` vocabulary."""
  width = unet.context_dim
  return TextConditionedUNet(unet, CLIPTextEncoder(
      vocab_size=vocab_size, width=width, layers=layers, heads=max(1, width // 64),
      mlp_width=4 * width, max_length=max_length, activation="gelu", dtype=unet.dtype,
      causal=False))
