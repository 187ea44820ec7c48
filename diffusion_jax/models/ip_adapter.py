"""IP-Adapter (Ye et al. 2023, "IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image
Diffusion Models"): an image prompt's CLIP embedding projected to a few tokens
(`ImageProjection`; IP-Adapter Plus: the image encoder's patch states resampled by a perceiver,
`Resampler`), which every cross-attention of the U-Net attends to beside the text, with keys
and values of their own (Eq. 5: Z = Attn(Q, K, V) + scale * Attn(Q, K', V'); the k_ip / v_ip
projections of models/transformer.MultiHeadAttention).

The U-Net takes them in its context: {"text": [B, L, d], "ip_tokens": ([B, N_a, d] for each
adapter a), "ip_scale": [B, A]} (SDXL's dict gains the two keys); several adapters add up, each
through its own k_ip_a / v_ip_a. Weights: convert_ip_adapter.py.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.context import add_to_context, split_context

IP_KEYS = ("ip_tokens", "ip_scale")


class ImageProjection(nn.Module):
  """The image embedding [B, D] -> num_tokens tokens [B, num_tokens, width] (a Dense, then a
  LayerNorm per token; diffusers' ImageProjection, IP-Adapter's "image_proj")."""
  width: int
  num_tokens: int = 4
  reads_hidden_states = False  # it reads the image encoder's projected embedding

  @nn.compact
  def __call__(self, embeds):
    h = nn.Dense(self.num_tokens * self.width, name="proj")(embeds.astype(jnp.float32))
    return nn.LayerNorm(epsilon=1e-5, name="norm")(h.reshape(-1, self.num_tokens, self.width))


class Resampler(nn.Module):
  """IP-Adapter Plus's perceiver resampler (diffusers' IPAdapterPlusImageProjection): the image
  encoder's hidden states before its last layer [B, P, D] -> num_queries tokens [B, Q, width].
  Learned queries, `depth` blocks of attention from the queries to the states and themselves
  (each LayerNormed; heads of 64) and a GELU MLP (4x), both residual; then a Dense and a
  LayerNorm."""
  width: int
  hidden: int = 1280
  depth: int = 4
  heads: int = 12
  num_queries: int = 16
  reads_hidden_states = True

  @nn.compact
  def __call__(self, states):
    b, d = states.shape[0], 64
    norm = lambda name: nn.LayerNorm(epsilon=1e-5, name=name)
    dense = lambda n, name, bias=False: nn.Dense(n, use_bias=bias, name=name)
    latents = self.param("latents", nn.initializers.normal(self.hidden ** -0.5),
                         (1, self.num_queries, self.hidden))
    latents = jnp.broadcast_to(latents, (b,) + latents.shape[1:])
    x = dense(self.hidden, "proj_in", bias=True)(states.astype(jnp.float32))
    heads = lambda a: a.reshape(b, a.shape[1], self.heads, d)
    for i in range(self.depth):
      q_in = norm(f"layer_{i}_norm_latents")(latents)
      kv_in = jnp.concatenate([norm(f"layer_{i}_norm_states")(x), q_in], axis=1)
      k, v = jnp.split(dense(2 * self.heads * d, f"layer_{i}_kv")(kv_in), 2, axis=-1)
      h = jax.nn.dot_product_attention(heads(dense(self.heads * d, f"layer_{i}_q")(q_in)),
                                       heads(k), heads(v))
      latents = latents + dense(self.hidden, f"layer_{i}_out")(h.reshape(b, -1, self.heads * d))
      h = dense(4 * self.hidden, f"layer_{i}_ff_in")(norm(f"layer_{i}_ff_norm")(latents))
      latents = latents + dense(self.hidden, f"layer_{i}_ff_out")(jax.nn.gelu(h, False))
    return norm("norm_out")(dense(self.width, "proj_out", bias=True)(latents))


def split_ip_context(context):
  """(the context without the image prompts' tokens, {"ip_tokens", "ip_scale"} or None)."""
  context, ip = split_context(context, IP_KEYS)
  if ip is not None and (set(ip) != set(IP_KEYS) or
                         not isinstance(ip["ip_tokens"], (tuple, list))):
    raise ValueError("an image prompt's context: 'ip_tokens', one [B, N, d] per adapter (a "
                     "tuple), and 'ip_scale' [B, adapters]")
  return context, ip


def with_ip_context(context, tokens, scale):
  """The context with the image prompts' tokens (one [B, N_a, d] per adapter) and their scales
  [B, A] added."""
  return add_to_context(context, ip_tokens=tuple(tokens), ip_scale=scale)
