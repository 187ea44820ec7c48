"""A layer written for speed, numerically the same as the stock one it replaces.

`GroupNorm`: flax's GroupNorm reduces over [B, H, W, G, C/G] with a reshape; computing the
statistics from per-channel sums of x and x^2 and applying one fused x*a + b is 6x faster on CPU
(24.8 -> 4.2 ms); on an H100 the training step gained 2 % (5,966 -> 6,079 images/s, bf16). Same
parameters (`scale`, `bias`), the same fast variance E[x^2] - E[x]^2 in float32 as flax, so
checkpoints and converters are unaffected.

`GroupNorm(swish=True)` is swish(GroupNorm(x)), the U-Net's pre-activation. With SWISH_VJP on,
it is one op with a hand-written backward (`group_norm_swish`): one pass over (x, dy) for the
per-channel sums of dy and dy*x, one elementwise pass for dx, only x saved for it. A lever, off
by default: on the Fashion-MNIST train step (2 cores, interleaved A/B, medians of 10-14 rounds)
it measured 45.7 -> 46.5 and 54.1 -> 53.8 images/s, i.e. nothing; GPU not yet measured
(`benchmarks/run.py --gn_swish_vjp=on`).

`GroupNorm(native=True)` (float32, where the U-Net runs the CPU kernels: `model.conv`) is
`native_group_norm`: csrc/group_norm.cc's forward and backward, built and loaded with the oneDNN
convolutions (onednn_conv.load). A custom call is also a fusion barrier: XLA:CPU had fused the
GroupNorm backwards of consecutive blocks, through the residual sums, into fusions that
recomputed them once per consumer. Train step 1,011 -> 910 ms (interleaved A/B, 8 rounds,
medians; `--nonative_group_norm` measures it).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from diffusion_jax.models import onednn_conv  # the library that holds the native handlers

# Off: flax's GroupNorm (benchmarks/run.py --nofast_group_norm measures the lever)
FAST_GROUP_NORM = True
# Off: XLA's GroupNorm also where the CPU kernels run (benchmarks/run.py --nonative_group_norm)
NATIVE_GROUP_NORM = True
# group_norm_swish's backward: "on" (every backend), "cpu" (CPU only) or "off" (autodiff)
SWISH_VJP = "off"


def _use_swish_vjp() -> bool:
  return SWISH_VJP == "on" or (SWISH_VJP == "cpu" and jax.default_backend() == "cpu")


def _group_mean(per_channel_sums, num_groups: int, x):
  """[B, C] sums over x's spatial positions -> [B, G] means over each group's elements."""
  n = x.shape[-1] // num_groups * math.prod(x.shape[1:-1])
  return per_channel_sums.reshape(x.shape[0], num_groups, -1).sum(-1) / n


def _stats(xf, num_groups: int, epsilon: float):
  """Per-(example, group) mean and 1/std of float32 NHWC x, from per-channel sums: [B, G]."""
  axes = tuple(range(1, xf.ndim - 1))
  mean = _group_mean(jnp.sum(xf, axes), num_groups, xf)
  var = jnp.maximum(_group_mean(jnp.sum(lax.square(xf), axes), num_groups, xf)
                    - lax.square(mean), 0.0)
  return mean, lax.rsqrt(var + epsilon)


def _per_channel(s, c: int):  # [B, G] -> [B, C]
  return jnp.repeat(s, c // s.shape[-1], axis=-1)


def _broadcast(v, x):  # [B, C] -> [B, 1, ..., 1, C]
  return v.reshape((x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],))


def _normalized(xf, scale, bias, mean, inv):
  """(x - mean) * inv * scale + bias as one x*a + b, float32."""
  a = _per_channel(inv, xf.shape[-1]) * scale
  b = bias - _per_channel(mean, xf.shape[-1]) * a
  return xf * _broadcast(a, xf) + _broadcast(b, xf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm_swish(x, scale, bias, num_groups: int, epsilon: float):
  """swish(GroupNorm(x)) over NHWC in float32, with the backward below."""
  return _gns_fwd(x, scale, bias, num_groups, epsilon)[0]


def _gns_fwd(x, scale, bias, num_groups, epsilon):
  xf = x.astype(jnp.float32)
  mean, inv = _stats(xf, num_groups, epsilon)
  return jax.nn.silu(_normalized(xf, scale, bias, mean, inv)), (x, scale, bias, mean, inv)


def _gns_bwd(num_groups, epsilon, res, g):
  """With z = xhat*scale + bias, dz = g * swish'(z), xhat = (x - mean) * inv over a group of n:
  dbias = sum dz, dscale = sum dz*xhat, and
  dx = inv * (dz*scale - mean_g(dz*scale) - xhat * mean_g(dz*scale*xhat)),
  where the group means come from per-channel sums of dz and dz*x (one pass over x and g)."""
  del epsilon
  x, scale, bias, mean, inv = res
  xf, c = x.astype(jnp.float32), x.shape[-1]
  z = _normalized(xf, scale, bias, mean, inv)
  sig = jax.nn.sigmoid(z)
  dz = g.astype(jnp.float32) * sig * (1 + z * (1 - sig))
  axes = tuple(range(1, x.ndim - 1))
  sum_dz, sum_dzx = jnp.sum(dz, axes), jnp.sum(dz * xf, axes)  # [B, C]
  mean_c, inv_c = _per_channel(mean, c), _per_channel(inv, c)
  sum_dz_xhat = inv_c * (sum_dzx - mean_c * sum_dz)  # per channel: sum dz * xhat
  group_mean = lambda s: _per_channel(_group_mean(s, num_groups, x), c)
  m1 = group_mean(scale * sum_dz)          # mean_g(dz * scale)
  m2 = group_mean(scale * sum_dz_xhat)     # mean_g(dz * scale * xhat)
  # dx = inv*scale*dz - inv*m1 - inv^2*m2*(x - mean): one x*a + dz*b + c pass
  a, b = -inv_c * inv_c * m2, inv_c * scale
  k = inv_c * inv_c * m2 * mean_c - inv_c * m1
  dx = dz * _broadcast(b, x) + xf * _broadcast(a, x) + _broadcast(k, x)
  return dx.astype(x.dtype), jnp.sum(sum_dz_xhat, 0), jnp.sum(sum_dz, 0)


group_norm_swish.defvjp(_gns_fwd, _gns_bwd)


def _native_call(target: str, outs, *args, **attrs):
  onednn_conv.load()
  return jax.ffi.ffi_call(onednn_conv.GROUP_NORM_TARGETS[target],
                          [jax.ShapeDtypeStruct(s, jnp.float32) for s in outs],
                          vmap_method="sequential")(*args, **attrs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def native_group_norm(x, scale, bias, num_groups: int, epsilon: float, swish: bool):
  """[swish](GroupNorm(x)) of float32 channels-last x by csrc/group_norm.cc on the CPU: a
  fusion-free kernel for each direction (two passes over x forward; two over x and dy back)."""
  return _native_fwd(x, scale, bias, num_groups, epsilon, swish)[0]


def _native_fwd(x, scale, bias, num_groups, epsilon, swish):
  stats = (x.shape[0], num_groups)
  y, mean, inv = _native_call("forward", (x.shape, stats, stats), x, scale, bias,
                              groups=np.int64(num_groups), epsilon=np.float32(epsilon),
                              swish=bool(swish))
  return y, (x, scale, bias, mean, inv)


def _native_bwd(num_groups, epsilon, swish, res, g):
  del epsilon
  x, scale, bias, mean, inv = res
  per_example = (x.shape[0], x.shape[-1])
  dx, dscale, dbias = _native_call("backward", (x.shape, per_example, per_example), x, scale,
                                   bias, mean, inv, g, groups=np.int64(num_groups),
                                   swish=bool(swish))
  return dx, jnp.sum(dscale, 0), jnp.sum(dbias, 0)


native_group_norm.defvjp(_native_fwd, _native_bwd)


class GroupNorm(nn.Module):
  """Group normalisation over NHWC (Wu & He 2018), parameters as flax's GroupNorm.

  swish=True returns swish(GroupNorm(x)) (through `group_norm_swish` where SWISH_VJP says).
  native=True (float32): `native_group_norm`, csrc/group_norm.cc's CPU kernels.
  """
  num_groups: int = 32
  epsilon: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  swish: bool = False
  native: bool = False

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f"GroupNorm: {c} channels are not divisible by {self.num_groups} groups")
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    dtype = self.dtype or x.dtype
    if NATIVE_GROUP_NORM and self.native and x.dtype == jnp.dtype(dtype) == jnp.float32:
      return native_group_norm(x, scale, bias, self.num_groups, self.epsilon, self.swish)
    if self.swish and _use_swish_vjp():
      return group_norm_swish(x, scale, bias, self.num_groups, self.epsilon).astype(dtype)
    xf = x.astype(jnp.float32)
    y = _normalized(xf, scale, bias, *_stats(xf, self.num_groups, self.epsilon)).astype(dtype)
    return nn.swish(y) if self.swish else y
