"""The CPU compiler options reach the compiled model, and bad or overridden ones fall back."""
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from diffusion_jax import xla_options


def _ynn_fused_ops(compiled_text: str) -> set:
  """The jaxpr op names (conv_general_dilated, dot_general, ...) XLA put into YNNPACK fusions."""
  ops = set()
  for line in compiled_text.splitlines():
    if '"__ynn_fusion"' in line and " fusion(" in line:
      m = re.search(r'op_name="([^"]+)"', line)
      ops.add(m.group(1).rsplit("/", 1)[-1] if m else "?")
  return ops


def _conv_dot_reduce(x, k, w):
  y = lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jnp.sum(y, axis=(1, 2)) @ w


def test_cpu_convolutions_and_matmuls_leave_ynnpack():
  assert jax.default_backend() == "cpu"
  assert xla_options.compiler_options() == xla_options.CPU_OPTIONS
  args = jnp.ones((4, 8, 8, 16)), jnp.ones((3, 3, 16, 32)), jnp.ones((32, 32))
  ours = _ynn_fused_ops(xla_options.jit(_conv_dot_reduce).lower(*args).compile().as_text())
  assert not ours & {"conv_general_dilated", "dot_general"}, ours
  # the same function, compiled and run both ways, gives the same numbers
  np.testing.assert_allclose(xla_options.jit(_conv_dot_reduce)(*args),
                             jax.jit(_conv_dot_reduce)(*args), rtol=1e-5)


def test_user_xla_flags_win(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=-reduce")
  assert xla_options.compiler_options() is None


def test_disabled_gives_xla_defaults(monkeypatch):
  monkeypatch.setattr(xla_options, "ENABLED", False)
  assert xla_options.compiler_options() is None


def test_an_option_this_jaxlib_lacks_falls_back_with_a_warning(caplog):
  assert xla_options._supported((("xla_cpu_no_such_option", "1"),)) is None
  assert "rejects the XLA:CPU options" in caplog.text
