"""IP-Adapter (Ye et al. 2023, "IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image
Diffusion Models"): an image prompt's CLIP embedding projected to a few tokens
(`ImageProjection`), which every cross-attention of the U-Net attends to beside the text, with
keys and values of their own (Eq. 5: Z = Attn(Q, K, V) + scale * Attn(Q, K', V'); the k_ip /
v_ip projections of models/transformer.MultiHeadAttention).

The U-Net takes them in its context: {"text": [B, L, d], "ip_tokens": [B, N, d], "ip_scale":
[B]} (SDXL's dict gains the two keys). Weights: convert_ip_adapter.py.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

IP_KEYS = ("ip_tokens", "ip_scale")


class ImageProjection(nn.Module):
  """The image embedding [B, D] -> num_tokens tokens [B, num_tokens, width] (a Dense, then a
  LayerNorm per token; diffusers' ImageProjection, IP-Adapter's "image_proj")."""
  width: int
  num_tokens: int = 4

  @nn.compact
  def __call__(self, embeds):
    h = nn.Dense(self.num_tokens * self.width, name="proj")(embeds.astype(jnp.float32))
    return nn.LayerNorm(epsilon=1e-5, name="norm")(h.reshape(-1, self.num_tokens, self.width))


def split_ip_context(context):
  """(the context without the image prompt's tokens, {"ip_tokens", "ip_scale"} or None); a
  context left as {"text": ...} alone becomes that array."""
  if not (isinstance(context, dict) and "ip_tokens" in context):
    return context, None
  rest = {k: v for k, v in context.items() if k not in IP_KEYS}
  if "ip_scale" not in context:
    raise ValueError("an image prompt's context needs 'ip_scale' [B] beside 'ip_tokens'")
  return (rest["text"] if set(rest) == {"text"} else rest), {k: context[k] for k in IP_KEYS}


def with_ip_context(context, tokens, scale):
  """The context with the image prompt's tokens [B, N, d] and scale [B] added."""
  base = dict(context) if isinstance(context, dict) else {"text": context}
  return dict(base, ip_tokens=tokens, ip_scale=scale)
