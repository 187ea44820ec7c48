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


def _conv(x, k):
  return lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _conv_dot_reduce(x, k, w):
  return jnp.sum(_conv(x, k), axis=(1, 2)) @ w


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


def _loops_with_convolutions(compiled_text: str) -> list:
  """Bodies of the while loops in compiled HLO that run a convolution themselves."""
  bodies = {}
  for m in re.finditer(r"\n(%[\w.\-]+) \([^\n]*\{\n(.*?)\n\}", compiled_text, re.S):
    bodies[m.group(1)] = m.group(2)
  loops = re.findall(r"while\(.*?body=(%[\w.\-]+)", compiled_text)
  return [b for b in loops if "convolution(" in bodies.get(b, "")]


def test_gradient_loops_are_unrolled_on_cpu(tmp_path):
  """XLA:CPU runs a conv kernel-gradient inside a while loop ~40x slower, so the train step's
  loops (gradient accumulation, several steps per call) must not leave one there."""
  from diffusion_jax import parallel
  from diffusion_jax.train import Trainer
  from helpers import small_graph, tiny_config
  config = small_graph(tiny_config(tmp_path))
  config.training.grad_accum_steps = config.training.steps_per_dispatch = 2
  tr = Trainer(config, mesh=parallel.make_mesh(1))
  image = jax.ShapeDtypeStruct((2, 16, 16, 16, 1), jnp.float32)
  batch = {"image": image, "label": jax.ShapeDtypeStruct((2, 16), jnp.int32)}
  text = tr.multi_step_fn.lower(tr.abstract_state, batch).compile().as_text()
  assert "convolution(" in text and not _loops_with_convolutions(text)
  # the check itself: a rolled loop over a conv gradient is found
  rolled = jax.jit(lambda w, xs: lax.scan(
      lambda c, x: (c + jax.grad(lambda w: jnp.sum(jnp.sin(_conv(x, w))))(w), None), w, xs)[0])
  w, xs = jnp.ones((3, 3, 4, 4)), jnp.ones((2, 1, 8, 8, 4))
  assert _loops_with_convolutions(rolled.lower(w, xs).compile().as_text())


def test_the_dit_keeps_its_dots_in_ynnpack_and_the_unet_does_not():
  from diffusion_jax.models.dit import DiT
  from diffusion_jax.models.unet import UNet
  dense = lambda x, w: jnp.tanh(x @ w) @ w.T
  args = jnp.ones((64, 32)), jnp.ones((32, 48))
  fused = lambda model: _ynn_fused_ops(
      xla_options.jit(dense, model).lower(*args).compile().as_text())
  assert xla_options.compiler_options(DiT()) == xla_options.MODEL_CPU_OPTIONS["DiT"]
  assert "dot_general" in fused(DiT())
  assert "dot_general" not in fused(UNet()) | fused(None)
  np.testing.assert_allclose(xla_options.jit(dense, DiT())(*args), jax.jit(dense)(*args),
                             rtol=1e-5)
