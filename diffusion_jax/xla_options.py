"""XLA compiler options for the functions that run the model, by backend; `jit` applies them.

CPU: convolutions and matmuls are left to XLA's Eigen kernels, which split each op over all
cores, rather than YNNPACK fusions (jaxlib 0.10's default), which ran each on one core: traced on
2 cores, one core sat idle 74 % of a training step. Measured with benchmarks/run.py on the
Fashion-MNIST config, 2 cores: training 12.6 -> 62.9 images/s, DDIM sampling 2.40 -> 5.85
(`--noxla_options` measures the lever). With Eigen convolutions, XLA's own kernel gradient is
faster than the per-tap matmuls this library used to hand-write for the YNNPACK ones.

The DiT (models/dit.py: dense layers, no convolutions) keeps its dots in YNNPACK, one library
call each ("INDIVIDUAL_DOT"): its training step on 2 cores, batch 64, 434-466 -> 504-538
images/s against Eigen's dots; the same option cost the U-Net 4-10 % (275/252 -> 247/241),
so it is chosen by the model (`jit(..., model=...)`).

GPU/TPU: none. A flag the user sets in XLA_FLAGS wins; a jaxlib without these flags gets XLA's
defaults and a warning.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from absl import logging

# YNNPACK keeps the reductions (its default list, less convolutions and dots)
CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
# by the model's class: its dots too, each its own YNNPACK call
MODEL_CPU_OPTIONS = {"DiT": {"xla_cpu_experimental_ynn_fusion_type":
                             "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}}
# off: XLA's defaults everywhere (benchmarks/run.py --noxla_options measures the lever)
ENABLED = True


def compiler_options(model=None) -> dict | None:
  """The options for jax.jit(compiler_options=...) on the default backend (None: XLA's), for
  a function that runs `model` (a flax module; None: the U-Net's)."""
  if not ENABLED or jax.default_backend() != "cpu":
    return None
  options = MODEL_CPU_OPTIONS.get(type(model).__name__, CPU_OPTIONS)
  if any(name in os.environ.get("XLA_FLAGS", "") for name in options):
    return None
  return _supported(tuple(options.items()))


@functools.cache
def _supported(options: tuple) -> dict | None:
  try:
    jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(jnp.zeros(())).compile()
  except Exception as e:  # noqa: BLE001 - XLA names an unknown option in a plain RuntimeError
    logging.warning("this jaxlib (%s) rejects the XLA:CPU options %s (%s); using XLA's defaults, "
                    "which trained 5x slower on 2 CPU cores", jax.__version__, dict(options), e)
    return None
  return dict(options)


def scan_unroll() -> bool:
  """lax.scan's `unroll` for a loop whose body differentiates the model: all of it on CPU.

  XLA:CPU computes a convolution's kernel gradient inside a while loop ~40x slower than outside
  one (jaxlib 0.10.2, 2 cores, one 3x3 conv on [64, 28, 28, 32]: 71 ms -> 2,977 ms; forward
  convolutions are unaffected), which made gradient accumulation train at 2.4 instead of ~55
  images/s. Unrolled, the loop is the same ops at full speed, for a longer compile. GPU/TPU keep
  the loop (one compiled body).
  """
  return jax.default_backend() == "cpu"


def jit(fun, model=None, **kwargs):
  """jax.jit with the backend's compiler options for `model` (resolved now: call it after
  choosing devices)."""
  return jax.jit(fun, compiler_options=compiler_options(model), **kwargs)
