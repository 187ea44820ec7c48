"""A layer written for speed, numerically the same as the stock one it replaces.

`GroupNorm`: flax's GroupNorm reduces over [B, H, W, G, C/G] with a reshape; computing the
statistics from per-channel sums of x and x^2 and applying one fused x*a + b is 6x faster on CPU
(24.8 -> 4.2 ms); on an H100 the training step gained 2 % (5,966 -> 6,079 images/s, bf16). Same
parameters (`scale`, `bias`), the same fast variance E[x^2] - E[x]^2 in float32 as flax, so
checkpoints and converters are unaffected.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

# Off: flax's GroupNorm (benchmarks/run.py --nofast_group_norm measures the lever)
FAST_GROUP_NORM = True


class GroupNorm(nn.Module):
  """Group normalisation over NHWC (Wu & He 2018), parameters as flax's GroupNorm."""
  num_groups: int = 32
  epsilon: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f"GroupNorm: {c} channels are not divisible by {self.num_groups} groups")
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    axes = tuple(range(1, x.ndim - 1))
    xf = x.astype(jnp.float32)
    n = c // self.num_groups * math.prod(x.shape[1:-1])
    group = lambda s: s.reshape(s.shape[0], self.num_groups, -1).sum(-1) / n  # [B, G]
    mean = group(jnp.sum(xf, axes))
    var = jnp.maximum(group(jnp.sum(lax.square(xf), axes)) - lax.square(mean), 0.0)
    inv = lax.rsqrt(var + self.epsilon)
    per_channel = lambda s: jnp.repeat(s, c // self.num_groups, axis=-1)  # [B, C]
    a = per_channel(inv) * scale
    b = bias - per_channel(mean) * a
    shape = (x.shape[0],) + (1,) * len(axes) + (c,)
    return (xf * a.reshape(shape) + b.reshape(shape)).astype(self.dtype or x.dtype)
