"""DiT, the Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with
Transformers"): a latent diffusion backbone that is a ViT over patches of the latents.

  x [B, H, W, C] -> p x p patches, linear (a strided conv) + fixed 2-D sin-cos positions
    -> depth x DiT block (adaLN-Zero, Sec. 3.2):
         c = t_emb + y_emb;  (shift, scale, gate) x 2 = Linear(SiLU(c))
         x += gate_msa * Attn(LN(x) (1 + scale_msa) + shift_msa)
         x += gate_mlp * MLP(LN(x) (1 + scale_mlp) + shift_mlp)      MLP: 4x, GELU (tanh)
    -> final layer: LN(x) (1 + scale) + shift, Linear to p x p x C_out -> unpatchify

C_out = 2C with a learned variance (the paper's models: eps and IDDPM's v, "learned_range"),
else C. The class label's table has one more row, num_classes: the null label of classifier-free
guidance (as `models.drop_labels`). Initialisation as the paper's code: Xavier-uniform linears,
N(0, 0.02) for the label table and the timestep MLP, zeros for every adaLN linear and the
output layer, so that each block starts as the identity.

Parameter layout (convert_dit.py maps diffusers' DiTTransformer2DModel onto it): patch_embed,
t_embed_{1,2}, y_embed, block_{i}/{ada_ln, qkv, proj, mlp_in, mlp_out}, final_ada_ln,
final_proj. diffusers' DiT differs from the paper's code in two constants, which are fields
here: the timestep frequencies 1e4^(-i / (128 - freq_shift)) with freq_shift 1 (the paper's: 0)
and the MLP's LayerNorm epsilon norm_eps 1e-5 (the paper's: 1e-6).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models.attention import dot_product_attention
from diffusion_jax.models.layers import timestep_embedding

Dtype = Any
TIME_FREQUENCIES = 256  # the timestep's sinusoidal embedding width, before its MLP
xavier = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros
normal = nn.initializers.normal(0.02)


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
  """[len(positions), dim]: sin(p w_i), then cos(p w_i), w_i = 1e4^(-i / (dim/2)) (MAE's)."""
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.outer(positions.reshape(-1), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid: int) -> np.ndarray:
  """The fixed positions of a grid x grid patch image, [grid * grid, dim], row-major: the first
  half of the channels encode the column, the second half the row (the paper's code)."""
  col, row = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
  return np.concatenate([sincos_1d(dim // 2, col), sincos_1d(dim // 2, row)], axis=1)


def dense(features: int, name: str, dtype: Dtype, init=xavier) -> nn.Dense:
  """A linear layer of the DiT (Xavier-uniform unless told, zero bias)."""
  return nn.Dense(features, kernel_init=init, dtype=dtype, name=name)


def modulate(x, shift, scale):
  """adaLN: x (1 + scale) + shift, per example ([B, T, D] and [B, D])."""
  return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
  """One adaLN-Zero block: self-attention and MLP, each modulated and gated by c."""
  heads: int
  mlp_ratio: float = 4.0
  norm_eps: float = 1e-5
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x, c, train: bool = False):
    b, t, d = x.shape
    mod = dense(6 * d, "ada_ln", self.dtype, zeros)(nn.silu(c))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
    norm = lambda eps, h: nn.LayerNorm(epsilon=eps, use_bias=False, use_scale=False,
                                       dtype=self.dtype)(h)
    h = modulate(norm(1e-6, x), shift_msa, scale_msa)
    qkv = dense(3 * d, "qkv", self.dtype)(h).reshape(b, t, 3 * self.heads, d // self.heads)
    q, k, v = jnp.split(qkv, 3, axis=2)
    h = dot_product_attention(q, k, v, self.attention).reshape(b, t, d)
    h = nn.Dropout(self.dropout, deterministic=not train)(dense(d, "proj", self.dtype)(h))
    x = x + gate_msa[:, None] * h
    h = modulate(norm(self.norm_eps, x), shift_mlp, scale_mlp)
    h = nn.gelu(dense(int(d * self.mlp_ratio), "mlp_in", self.dtype)(h), approximate=True)
    h = dense(d, "mlp_out", self.dtype)(nn.Dropout(self.dropout, deterministic=not train)(h))
    return x + gate_mlp[:, None] * h


class DiT(nn.Module):
  """eps (and v) of x_t [B, H, W, C] at timesteps t [B] (and labels y [B]); NHWC out.

  DiT-XL/2 (the paper's best, 675M parameters): patch_size 2, hidden_size 1152, depth 28,
  num_heads 16; -L 1024/24/16, -B 768/12/12, -S 384/12/6 (Table 1).
  """
  patch_size: int = 2
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  in_channels: int = 4
  learned_variance: bool = True
  num_classes: int = 1000
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  attention: str = "auto"
  remat: bool = False
  norm_eps: float = 1e-5
  freq_shift: float = 1.0

  @nn.compact
  def __call__(self, x, t, y=None, train: bool = False, context=None):
    if context is not None:
      raise ValueError("DiT is class-conditional (y); it takes no context")
    b, height, width, _ = x.shape
    p, d = self.patch_size, self.hidden_size
    if height != width or height % p:
      raise ValueError(f"DiT takes square inputs whose side is a multiple of patch_size={p}, "
                       f"not {height}x{width}")
    grid = height // p
    kernel = lambda key, shape, dtype=jnp.float32: xavier(key, (p * p * shape[2], d), dtype
                                                          ).reshape(shape)
    h = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", kernel_init=kernel,
                dtype=self.dtype, name="patch_embed")(x.astype(self.dtype))
    h = h.reshape(b, grid * grid, d) + jnp.asarray(sincos_2d(d, grid), h.dtype)

    temb = timestep_embedding(jnp.broadcast_to(jnp.asarray(t), (b,)), TIME_FREQUENCIES,
                              flip_sin_to_cos=True, freq_shift=self.freq_shift)
    c = dense(d, "t_embed_2", self.dtype, normal)(
        nn.silu(dense(d, "t_embed_1", self.dtype, normal)(temb)))
    if self.num_classes:
      labels = jnp.full((b,), self.num_classes, jnp.int32) if y is None else y
      c = c + nn.Embed(self.num_classes + 1, d, embedding_init=normal, dtype=self.dtype,
                       name="y_embed")(labels)

    block = nn.remat(DiTBlock, static_argnums=(3,)) if self.remat else DiTBlock
    for i in range(self.depth):
      h = block(self.num_heads, self.mlp_ratio, self.norm_eps, self.dropout, self.dtype,
                self.attention, name=f"block_{i}")(h, c, train)

    ada = dense(2 * d, "final_ada_ln", self.dtype, zeros)(nn.silu(c))
    shift, scale = jnp.split(ada, 2, axis=-1)
    h = modulate(nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=self.dtype)(h),
                 shift, scale)
    out_ch = self.in_channels * (2 if self.learned_variance else 1)
    h = dense(p * p * out_ch, "final_proj", self.dtype, zeros)(h).astype(jnp.float32)
    h = h.reshape(b, grid, grid, p, p, out_ch)
    return jnp.einsum("nhwpqc->nhpwqc", h).reshape(b, height, width, out_ch)
