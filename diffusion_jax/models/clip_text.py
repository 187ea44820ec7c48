"""CLIP's text transformer (Radford et al. 2021), the text encoder of Stable Diffusion 1.x
(OpenAI's ViT-L/14) and 2.x (OpenCLIP ViT-H/14, its last layer dropped): token ids [B, L] ->
the last hidden states [B, L, width], which the U-Net cross-attends to. Stable Diffusion XL
reads the penultimate layer's states of two encoders (OpenAI's ViT-L and OpenCLIP's bigG) and
bigG's pooled, projected embedding (`penultimate`, `pooled`; transformers'
CLIPTextModelWithProjection: the end-of-text token's final state times text_projection).

Pre-LayerNorm blocks with causal self-attention (each token sees those before it), an MLP with
quick_gelu (x sigmoid(1.702 x), OpenAI's) or exact GELU (OpenCLIP's), learned absolute
positions, a final LayerNorm. Parameter names follow transformers' CLIPTextModel
(convert_clip.py maps them).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
ACTIVATIONS = {"quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
               "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


def clip_layer(x, i: int, heads: int, mlp_width: int, act, eps: float, dtype, causal: bool):
  """CLIP's i-th transformer layer on x [B, L, width] (pre-LayerNorm self-attention and MLP,
  each residual), its parameters layer_{i}_* of the calling (compact) module."""
  b, length, width = x.shape
  norm = lambda name: nn.LayerNorm(epsilon=eps, dtype=dtype, name=name)
  dense = lambda n, name: nn.Dense(n, dtype=dtype, name=name)
  h = norm(f"layer_{i}_norm_1")(x)
  q, k, v = (dense(width, f"layer_{i}_{n}")(h).reshape(b, length, heads, width // heads)
             for n in ("q", "k", "v"))
  h = jax.nn.dot_product_attention(q, k, v, is_causal=causal).reshape(b, length, width)
  x = x + dense(width, f"layer_{i}_out")(h)
  h = act(dense(mlp_width, f"layer_{i}_fc1")(norm(f"layer_{i}_norm_2")(x)))
  return x + dense(width, f"layer_{i}_fc2")(h)


class CLIPTextEncoder(nn.Module):
  vocab_size: int = 49408
  width: int = 768
  layers: int = 12
  heads: int = 12
  mlp_width: int = 3072
  max_length: int = 77
  activation: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  causal: bool = True  # False: each token sees all (BERT-like; LDM's trained text transformer)
  projection_dim: int = 0  # > 0: text_projection (CLIPTextModelWithProjection) for `pooled`
  eos_token_id: int = 2  # where `pooled` reads: transformers' rule (2, the legacy: the argmax)

  @nn.compact
  def __call__(self, ids, penultimate: bool = False, pooled: bool = False, skip: int = 0):
    """Hidden states [B, L, width]: the final LayerNorm's, or with `penultimate` those after
    the last layer but one (transformers' hidden_states[-2], no LayerNorm; SDXL's); with
    `pooled` also the end-of-text token's final state [B, width] (projected to
    projection_dim when there is a text_projection). skip k: the states k layers earlier
    (diffusers' clip_skip: SD's final_layer_norm(hidden_states[-(k + 1)]), SDXL's
    hidden_states[-(k + 2)])."""
    length = ids.shape[1]
    if length > self.max_length:
      raise ValueError(f"{length} tokens; the text encoder has {self.max_length} positions")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation {self.activation!r}: one of {tuple(ACTIVATIONS)}")
    depth = self.layers - skip - int(penultimate)  # the layers whose output is returned
    if not 0 < depth <= self.layers:
      raise ValueError(f"skip={skip}: this text encoder has {self.layers} layers")
    act = ACTIVATIONS[self.activation]
    positions = self.param("position_embedding", nn.initializers.normal(0.01),
                           (self.max_length, self.width))
    x = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02),
                 name="token_embedding")(ids) + positions[:length]
    x = x.astype(self.dtype)
    norm = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name=name)
    hidden = None
    for i in range(self.layers if pooled else depth):
      if i == depth:
        hidden = x
      x = clip_layer(x, i, self.heads, self.mlp_width, act, self.layer_norm_eps, self.dtype,
                     self.causal)
    hidden = x if hidden is None else hidden
    final_norm = norm("final_norm")
    hidden = (hidden if penultimate else final_norm(hidden)).astype(jnp.float32)
    if not pooled:
      return hidden
    last = final_norm(x)
    # transformers' CLIPTextTransformer: the first end-of-text token (eos_token_id 2, the
    # configs of old: the largest id, CLIP's end-of-text)
    eos = jnp.argmax(ids if self.eos_token_id == 2 else (ids == self.eos_token_id), axis=-1)
    out = jnp.take_along_axis(last, eos[:, None, None], axis=1)[:, 0]
    if self.projection_dim:
      out = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype,
                     name="text_projection")(out)
    return hidden, out.astype(jnp.float32)
