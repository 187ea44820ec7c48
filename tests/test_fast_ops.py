"""The speed-written GroupNorm gives flax's values and gradients."""
import platform
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import fast_ops


def _loss_and_grads(module, params, x):
  def loss(p, x):  # non-linear and weighted: every output element gets its own cotangent
    y = module.apply(p, x).astype(jnp.float32)
    return jnp.sum(jnp.sin(y) * jnp.arange(1, y.size + 1).reshape(y.shape) / y.size)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_group_norm_matches_flax(dtype):
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 8, 64)) * 3 + 1
  stock, fast = nn.GroupNorm(32, epsilon=1e-6, dtype=dtype), fast_ops.GroupNorm(32, 1e-6, dtype)
  params = stock.init(jax.random.PRNGKey(1), x)
  chex.assert_trees_all_equal_shapes(params, fast.init(jax.random.PRNGKey(1), x))
  params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.PRNGKey(2), p.shape), params)
  y1, y2 = stock.apply(params, x), fast.apply(params, x)
  assert y2.dtype == dtype
  tol = 1e-5 if dtype == jnp.float32 else 5e-2
  np.testing.assert_allclose(np.float32(y1), np.float32(y2), atol=tol * 10, rtol=tol)
  if dtype == jnp.float32:
    (_, (g1, gx1)), (_, (g2, gx2)) = (_loss_and_grads(stock, params, x),
                                      _loss_and_grads(fast, params, x))
    chex.assert_trees_all_close(g1, g2, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gx1, gx2, rtol=1e-4, atol=1e-5)


def test_group_norm_rejects_channels_not_divisible_by_groups():
  with pytest.raises(ValueError, match="not divisible by 32 groups"):
    fast_ops.GroupNorm(32).init(jax.random.PRNGKey(0), jnp.ones((1, 4, 4, 48)))


@pytest.mark.parametrize("swish_vjp", ["on", "off"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_group_norm_swish_matches_flax_then_swish(monkeypatch, swish_vjp, dtype):
  """GroupNorm(swish=True), with group_norm_swish's hand-written backward or autodiff."""
  monkeypatch.setattr(fast_ops, "SWISH_VJP", swish_vjp)
  x = (jax.random.normal(jax.random.PRNGKey(0), (2, 6, 10, 64)) * 3 + 1).astype(dtype)
  fused = fast_ops.GroupNorm(32, 1e-6, dtype, swish=True)
  params = fused.init(jax.random.PRNGKey(1), x)
  params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.PRNGKey(2), p.shape), params)

  class StockThenSwish(nn.Module):  # the reference in float32 (bf16 autodiff rounds more)
    @nn.compact
    def __call__(self, x):
      return nn.swish(nn.GroupNorm(32, epsilon=1e-6, name="norm")(x.astype(jnp.float32)))

  stock_params = {"params": {"norm": params["params"]}}
  y1, y2 = StockThenSwish().apply(stock_params, x), fused.apply(params, x)
  assert y2.dtype == dtype
  tol = 1e-5 if dtype == jnp.float32 else 5e-2
  np.testing.assert_allclose(np.float32(y1), np.float32(y2), atol=tol * 10, rtol=tol)
  (_, (g1, gx1)), (_, (g2, gx2)) = (_loss_and_grads(StockThenSwish(), stock_params, x),
                                    _loss_and_grads(fused, params, x))
  assert gx2.dtype == dtype
  # bf16: the output's rounding perturbs every gradient; 3 % of each gradient's largest entry
  close = (lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)) if (
      dtype == jnp.float32) else (lambda a, b: np.testing.assert_allclose(
          np.float32(a), b, atol=0.03 * np.abs(b).max()))
  for name in ("scale", "bias"):
    close(g2["params"][name], g1["params"]["norm"][name])
  close(gx2, np.float32(gx1))


def test_group_norm_swish_uses_its_own_backward_where_asked(monkeypatch):
  monkeypatch.setattr(fast_ops, "SWISH_VJP", "cpu")
  x = jnp.ones((1, 4, 4, 32))
  params = fast_ops.GroupNorm(32, swish=True).init(jax.random.PRNGKey(0), x)
  jaxpr = str(jax.make_jaxpr(lambda p, x: fast_ops.GroupNorm(32, swish=True).apply(p, x))(params, x))
  assert "custom_vjp_call" in jaxpr


native = pytest.mark.skipif(
    not (sys.platform == "linux" and platform.machine() == "x86_64"),
    reason="built with the oneDNN convolutions (pip packages for Linux x86-64)")


@native
@pytest.mark.parametrize("swish", [True, False])
@pytest.mark.parametrize("shape", [(3, 5, 7, 64), (2, 4, 4, 96), (2, 9, 32), (1, 1, 1, 64)])
def test_native_group_norm_matches_flax(swish, shape):
  """csrc/group_norm.cc: values and the gradients of x, scale and bias against flax's GroupNorm
  (then swish), for odd spatial sizes, 2 and 3 channels per group, rank 3, a single pixel."""
  x = jax.random.normal(jax.random.PRNGKey(0), shape) * 3 + 1
  c = shape[-1]
  scale = 1 + 0.5 * jax.random.normal(jax.random.PRNGKey(1), (c,))
  bias = jax.random.normal(jax.random.PRNGKey(2), (c,))
  stock = nn.GroupNorm(32, epsilon=1e-6)
  ref = lambda x, s, b: (nn.swish if swish else (lambda v: v))(
      stock.apply({"params": {"scale": s, "bias": b}}, x))
  got = lambda x, s, b: fast_ops.native_group_norm(x, s, b, 32, 1e-6, swish)
  np.testing.assert_allclose(jax.jit(got)(x, scale, bias), ref(x, scale, bias),
                             rtol=1e-5, atol=1e-5)
  dy = jax.random.normal(jax.random.PRNGKey(3), shape)
  grads = [jax.jit(jax.vjp(f, x, scale, bias)[1])(dy) for f in (ref, got)]
  for want, have in zip(*grads):
    scale_of = max(1.0, float(jnp.abs(want).max()))
    np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-4 * scale_of)


@native
def test_native_group_norm_is_one_custom_call_each_way_and_propagates_nan():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 64))
  norm = fast_ops.GroupNorm(32, 1e-6, swish=True, native=True)
  params = norm.init(jax.random.PRNGKey(1), x)
  hlo = jax.jit(jax.grad(lambda p, x: norm.apply(p, x).sum(), argnums=(0, 1))).lower(
      params, x).as_text()
  assert hlo.count('@GroupNormForward') == 1 and hlo.count('@GroupNormBackward') == 1
  y = norm.apply(params, x.at[0, 1, 2, 1].set(jnp.nan))  # channel 1: group 0 (channels 0, 1)
  assert np.isnan(y[0, ..., :2]).all() and np.isfinite(y[1]).all()  # group 0 of example 0 only
  assert np.isnan(y[0, ..., 2:]).sum() == 0
  bf16 = fast_ops.GroupNorm(32, 1e-6, jnp.bfloat16, swish=True, native=True)  # float32 only
  assert "GroupNorm" not in jax.jit(bf16.apply).lower(params, x.astype(jnp.bfloat16)).as_text()
