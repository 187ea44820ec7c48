"""The FLOP count behind MFU: closed forms for a conv, a dot, their gradients and a scan."""
import jax
import jax.numpy as jnp
from jax import lax

from diffusion_jax.summary import matmul_flops

X = jax.ShapeDtypeStruct((2, 8, 8, 4), jnp.float32)
K = jax.ShapeDtypeStruct((3, 3, 4, 16), jnp.float32)
CONV = 2 * (2 * 8 * 8 * 16) * 4 * 9  # 2 x outputs x (in features x window)


def conv(x, k, strides=(1, 1)):
  return lax.conv_general_dilated(x, k, strides, "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_conv_dot_and_stride_closed_forms():
  assert matmul_flops(conv, X, K) == CONV
  assert matmul_flops(lambda x, k: conv(x, k, (2, 2)), X, K) == CONV / 4
  a, b = jax.ShapeDtypeStruct((5, 7), jnp.float32), jax.ShapeDtypeStruct((7, 3), jnp.float32)
  assert matmul_flops(jnp.dot, a, b) == 2 * 5 * 7 * 3
  assert matmul_flops(lambda x: jnp.tanh(x) * 2, a) == 0  # elementwise work is not counted


def test_backward_pass_is_twice_the_forward_and_scan_counts_every_step():
  loss = lambda x, k: jnp.sum(conv(x, k) ** 2)
  # forward + input gradient + kernel gradient, each one conv's worth
  assert matmul_flops(jax.grad(loss, argnums=(0, 1)), X, K) == 3 * CONV
  # kernel gradient only (no input gradient), inside a pjit
  assert matmul_flops(jax.jit(jax.grad(loss, argnums=1)), X, K) == 2 * CONV
  # a strided conv's input gradient (an lhs-dilated conv) is counted without the zeros
  strided = lambda x, k: jnp.sum(conv(x, k, (2, 2)) ** 2)
  assert matmul_flops(jax.grad(strided, argnums=(0, 1)), X, K) == 3 * CONV / 4
  steps = lambda x, k: lax.scan(lambda c, _: (conv(c, k[..., :4]), None), x, None, length=5)[0]
  assert matmul_flops(steps, X, K) == 5 * CONV / 4


def test_unet_forward_flops_match_the_paper_figure():
  from configs.cifar10_ddpm import get_config
  from diffusion_jax.summary import forward_flops
  assert abs(forward_flops(get_config()) / 1e9 - 12.4) < 0.1  # REFERENCE.md: 12.4 GFLOP
