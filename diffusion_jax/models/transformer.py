"""LDM's SpatialTransformer (Rombach et al. 2022, Sec. 3.3 and Appendix E.2.1): the U-Net's
attention block when it is conditioned through cross-attention on a context [B, L, d_c]
(class embeddings, text embeddings, ...).

  SpatialTransformer: GroupNorm -> proj_in -> depth x BasicTransformerBlock -> proj_out, + x
  BasicTransformerBlock: x + SelfAttn(LN x); x + CrossAttn(LN x, context); x + GEGLU-FF(LN x)

Eq. 3: Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V, Q = W_Q phi(z_t), K = W_K tau(y),
V = W_V tau(y). Parameter names follow the blocks (attn_1 / attn_2: q, k, v, proj_out;
ff_in, ff_out); convert_diffusers maps Stable Diffusion's and LDM's names onto them.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.attention import dot_product_attention
from diffusion_jax.models.ip_adapter import split_ip_context
from diffusion_jax.models.layers import default_init, group_norm, zero_init
from diffusion_jax.models.pag import split_pag

Dtype = Any


class MultiHeadAttention(nn.Module):
  """Attention of x [B, T, C] to context [B, L, d_c] (x itself when None), `heads` heads;
  q, k, v without bias (as LDM's CrossAttention), the output projection with it. A context
  {"text", "ip_tokens", "ip_scale"}: IP-Adapter's decoupled cross-attention
  (models/ip_adapter.py), each adapter's image tokens through keys and values of their
  own, k_ip_a / v_ip_a."""
  heads: int
  dtype: Dtype = jnp.float32
  implementation: str = "auto"

  @nn.compact
  def __call__(self, x, context=None, perturb=None):
    """perturb [B]: where 1, the identity as the attention map (models/pag.py)."""
    b, t, c = x.shape
    context, ip = split_ip_context(context)
    context = x if context is None else context.astype(self.dtype)
    n = self.heads
    proj = lambda name: nn.Dense(c, use_bias=False, kernel_init=default_init, dtype=self.dtype,
                                 name=name)
    heads = lambda a: a.reshape(b, a.shape[1], n, c // n)
    q = heads(proj("q")(x))
    k, v = heads(proj("k")(context)), heads(proj("v")(context))
    h = dot_product_attention(q, k, v, self.implementation)  # Eq. 3
    if perturb is not None:  # each token attends to itself alone: its value
      h = jnp.where(perturb[:, None, None, None] > 0, v, h)
    for a, tokens in enumerate(() if ip is None else ip["ip_tokens"]):
      # IP-Adapter's Eq. 5: + scale * Attn(Q, K', V') of each adapter's image tokens
      tokens = tokens.astype(self.dtype)
      k_ip, v_ip = heads(proj(f"k_ip_{a}")(tokens)), heads(proj(f"v_ip_{a}")(tokens))
      scale = ip["ip_scale"][:, a].astype(h.dtype)[:, None, None, None]
      h = h + scale * dot_product_attention(q, k_ip, v_ip, self.implementation)
    return nn.Dense(c, kernel_init=default_init, dtype=self.dtype, name="proj_out")(
        h.reshape(b, t, c))


class BasicTransformerBlock(nn.Module):
  """Self-attention, cross-attention to the context, GEGLU feed-forward (4x), each pre-LayerNorm
  and residual; pag: the self-attention perturbed where pag_mask [B] is 1 (models/pag.py)."""
  heads: int
  dtype: Dtype = jnp.float32
  implementation: str = "auto"
  pag: bool = False

  @nn.compact
  def __call__(self, x, context, pag_mask=None):
    c = x.shape[-1]
    norm = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)
    attn = lambda name: MultiHeadAttention(self.heads, self.dtype, self.implementation, name=name)
    x = x + attn("attn_1")(norm("norm_1")(x), perturb=pag_mask if self.pag else None)
    x = x + attn("attn_2")(norm("norm_2")(x), context)
    h = nn.Dense(8 * c, kernel_init=default_init, dtype=self.dtype, name="ff_in")(
        norm("norm_3")(x))
    value, gate = jnp.split(h, 2, axis=-1)  # GEGLU (Shazeer 2020): value * GELU(gate)
    h = value * jax.nn.gelu(gate, approximate=False)
    return x + nn.Dense(c, kernel_init=default_init, dtype=self.dtype, name="ff_out")(h)


class SpatialTransformer(nn.Module):
  """The H*W positions of x [B, H, W, C] as tokens through `depth` transformer blocks that
  cross-attend to `context` [B, L, d_c]; residual, proj_out zero-initialised (identity at
  the start, as in LDM)."""
  heads: int
  depth: int = 1
  dtype: Dtype = jnp.float32
  implementation: str = "auto"
  native: bool = False  # GroupNorm by csrc/group_norm.cc
  pag_blocks: Sequence[int] = ()  # the blocks whose self-attention PAG perturbs

  @nn.compact
  def __call__(self, x, context):
    b, hgt, wid, c = x.shape
    context, pag_mask = split_pag(context)
    text = split_ip_context(context)[0]
    if text.ndim != 3 or text.shape[0] != b:
      raise ValueError(f"the context must be [B={b}, L, d]; got {text.shape}")
    h = group_norm("norm", self.dtype, native=self.native)(x).reshape(b, hgt * wid, c)
    h = nn.Dense(c, kernel_init=default_init, dtype=self.dtype, name="proj_in")(h)
    for i in range(self.depth):
      h = BasicTransformerBlock(self.heads, self.dtype, self.implementation,
                                i in self.pag_blocks, name=f"block_{i}")(h, context, pag_mask)
    h = nn.Dense(c, kernel_init=zero_init, dtype=self.dtype, name="proj_out")(h)
    return x + h.reshape(b, hgt, wid, c)
