"""Scaled dot-product attention, softmax(Q K^T / sqrt(d)) V, for q [B, T, N, d], k, v [B, S, N, d].

implementation (config.model.attention):
  "xla" / "cudnn": jax.nn.dot_product_attention's (cudnn: GPU flash attention, bf16/fp16).
  "per_head": one (batch item, head) at a time (lax.map), each a [T, d] x [d, S] matmul, a softmax
    over [T, S] and a [T, S] x [S, d] matmul. XLA:CPU runs jax.nn.dot_product_attention as batched
    4-D dots and reductions over the whole [B, N, T, S] logits; one item and head at a time keeps
    the logits of one head in cache where they fit and runs plain 2-D matmuls. On this machine's
    2 cores (float32, forward): 2 x 8 heads x 4096 tokens x 40 (Stable Diffusion's 64x64 level
    with guidance) 1,357 -> 507 ms; 64 x 256 tokens x 64 (one head) 27.9 -> 12.3 ms. That is
    sampling's speed-up: under differentiation (training) the forward pass is
    `_einsum_attention`, attention as two einsums over all items and heads, whose vjp is saved
    (forward + backward 7,571 -> 2,411 ms and 57 -> 53 ms against jax.nn's; a scan's transpose
    would be 3,108 ms).
  "auto": on CPU "per_head" with one device; with several, `_einsum_attention` (the batch axis
    stays split over the devices: a lax.map over a split axis would gather q, k, v onto each);
    on GPU (Ampere or later) cuDNN's flash attention for long bf16/fp16 attention (`use_flash`:
    T x S >= 1024^2, head size a multiple of 8 up to 128), where XLA's path writes and reads the
    whole [B, N, T, S] logits (Stable Diffusion's 4,096 tokens), else XLA's (one 256-wide head
    over 256 positions, the CIFAR-10 U-Net: cuDNN's training step was 0.81x); elsewhere
    jax.nn's choice.

All are the same function: tests/test_attention.py compares values and gradients.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "per_head")


def _einsum_attention(q, k, v):
  """Attention as two einsums over all items and heads (used for the gradient of "per_head")."""
  logits = jnp.einsum("btnd,bsnd->bnts", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
  return jnp.einsum("bnts,bsnd->btnd", weights, v)


@jax.custom_vjp
def per_head_attention(q, k, v):
  """Attention for q [B, T, N, d], k, v [B, S, N, d], one (item, head) at a time."""
  b, t, n, d = q.shape
  rows = lambda x: jnp.moveaxis(x, 2, 1).reshape(b * n, x.shape[1], 1, d)  # [B*N, len, 1, d]
  one = lambda qkv: _einsum_attention(*(x[None] for x in qkv))[0]
  out = jax.lax.map(one, (rows(q), rows(k), rows(v)))  # [B*N, T, 1, d]
  return jnp.moveaxis(out.reshape(b, n, t, d), 1, 2)


def _per_head_fwd(q, k, v):
  out, vjp = jax.vjp(_einsum_attention, q, k, v)
  return out, vjp


def _per_head_bwd(vjp, g):
  return vjp(g)


per_head_attention.defvjp(_per_head_fwd, _per_head_bwd)


def flash_capable() -> bool:
  """Whether the first device is a GPU that runs cuDNN's flash attention (compute capability
  8.0 or more: Ampere, Hopper, ...; on older cards it fails when XLA compiles, too late to
  fall back)."""
  try:
    return float(getattr(jax.devices()[0], "compute_capability", 0) or 0) >= 8.0
  except (TypeError, ValueError):
    return False


def use_flash(q, k) -> bool:
  """Whether "auto" takes cuDNN's flash attention on a capable GPU (see above)."""
  d = q.shape[-1]
  return (q.dtype in (jnp.bfloat16, jnp.float16) and d % 8 == 0 and d <= 128
          and q.shape[1] * k.shape[1] >= 1024 * 1024)


def dot_product_attention(q, k, v, implementation: str = "auto"):
  """softmax(q k^T / sqrt(d)) v over the second axis of k, v; implementation as above."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r}: one of {IMPLEMENTATIONS}")
  if implementation == "auto":
    if jax.default_backend() == "gpu":
      if use_flash(q, k) and flash_capable():
        try:
          return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
        except (NotImplementedError, ValueError, RuntimeError):  # no cuDNN for this: XLA's
          pass
      implementation = "xla"
    elif jax.default_backend() != "cpu":
      implementation = None
    elif jax.device_count() > 1:
      return _einsum_attention(q, k, v)
    else:
      implementation = "per_head"
  if implementation == "per_head":
    return per_head_attention(q, k, v)
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
