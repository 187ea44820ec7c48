"""The speed-written layers give the stock layers' values and gradients."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from diffusion_jax.models import fast_ops


def _loss_and_grads(module, params, x):
  def loss(p, x):  # non-linear and weighted: every output element gets its own cotangent
    y = module.apply(p, x).astype(jnp.float32)
    return jnp.sum(jnp.sin(y) * jnp.arange(1, y.size + 1).reshape(y.shape) / y.size)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)


@pytest.mark.parametrize("shape,features,kernel,stride,padding", [
    ((4, 9, 7, 5), 8, 3, 1, "SAME"),
    ((4, 9, 7, 5), 9, 3, 2, "SAME"),   # the Downsample conv, odd sizes
    ((3, 8, 8, 6), 12, 1, 1, "SAME"),  # NIN shortcut
    ((2, 10, 10, 4), 8, 3, 1, "VALID"),
    ((2, 10, 11, 4), 10, 3, 2, ((1, 2), (0, 1))),
    ((2, 6, 6, 4), 3, 3, 1, "SAME"),   # few output channels: lax's own path
])
def test_conv_matches_lax_values_and_gradients(shape, features, kernel, stride, padding):
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  stock = nn.Conv(features, (kernel, kernel), strides=stride, padding=padding)
  fast = nn.Conv(features, (kernel, kernel), strides=stride, padding=padding,
                 conv_general_dilated=fast_ops.conv_general_dilated)
  params = stock.init(jax.random.PRNGKey(1), x)
  chex.assert_trees_all_equal_shapes(params, fast.init(jax.random.PRNGKey(1), x))
  (l1, (gp1, gx1)), (l2, (gp2, gx2)) = (_loss_and_grads(stock, params, x),
                                        _loss_and_grads(fast, params, x))
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  np.testing.assert_allclose(gx1, gx2, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(gp1, gp2, rtol=1e-5, atol=1e-5)


def test_conv_uses_the_custom_gradient_on_cpu_and_lax_for_other_layouts():
  x, k = jnp.ones((2, 6, 6, 3)), jnp.ones((3, 3, 3, 4))
  nhwc = lax.conv_dimension_numbers(x.shape, k.shape, ("NHWC", "HWIO", "NHWC"))
  jaxpr = lambda k: str(jax.make_jaxpr(lambda x, k: fast_ops.conv_general_dilated(
      x, k, (1, 1), "SAME", dimension_numbers=nhwc))(x, k))
  assert "custom_vjp" in jaxpr(jnp.ones((3, 3, 3, 8)))
  assert "custom_vjp" not in jaxpr(k)  # 4 output channels: too few to gain
  xc = jnp.ones((2, 3, 6, 6))  # NCHW, lax's default: left to lax as is
  out = fast_ops.conv_general_dilated(xc, k.transpose(3, 2, 0, 1), (1, 1), "SAME")
  np.testing.assert_allclose(out, lax.conv_general_dilated(xc, k.transpose(3, 2, 0, 1), (1, 1),
                                                           "SAME"))


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
