"""Summary mode: parameters by module, the total, and the cost of one forward pass."""
from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models import build_model, onednn_conv


def matmul_flops(fn, *args) -> float:
  """2 x the multiply-adds of every convolution (oneDNN's included) and dot in fn's jaxpr (a
  backward pass included, scan bodies times their length): what MFU counts, on every backend.
  (XLA's compiled cost analysis leaves cuDNN's convolutions out on GPU.) `args` may be
  jax.ShapeDtypeStruct: nothing is computed."""
  def count(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
      name, out = eqn.primitive.name, eqn.outvars[0].aval
      if name == "conv_general_dilated":
        rhs, spec = eqn.invars[1].aval, eqn.params["dimension_numbers"].rhs_spec
        window = np.prod([rhs.shape[d] for d in spec[2:]])
        # in features per group; an input gradient of a strided conv dilates its input with
        # zeros (lhs_dilation): only 1 in prod(lhs_dilation) of its products is real
        total += (2.0 * np.prod(out.shape) * rhs.shape[spec[1]] * window
                  / np.prod(eqn.params["lhs_dilation"]))
      elif name == "ffi_call" and eqn.params["target_name"] in onednn_conv.TARGETS.values():
        total += onednn_conv.flops(eqn.params["target_name"], [v.aval for v in eqn.invars],
                                   eqn.params["result_avals"])
      elif name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval
        total += 2.0 * np.prod(out.shape) * np.prod([lhs.shape[d] for d in lhs_contract])
      times = eqn.params.get("length", 1) if name == "scan" else 1
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        total += times * count(sub)
    return total
  return count(jax.make_jaxpr(fn)(*args).jaxpr)


def forward_flops(config, batch: int = 1) -> float:
  """FLOPs of one forward pass on `batch` images (convolutions and matmuls) of the network as
  the paper defines it: upsampling counted as nearest x2 + 3x3 conv, whichever
  `model.upsample_conv` computes it (subpixel does fewer of those FLOPs)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.upsample_conv = "resize"
  model = build_model(config)
  size, ch = config.data.image_size, config.data.channels
  x = jax.ShapeDtypeStruct((batch, size, size, ch), jnp.float32)
  t = jax.ShapeDtypeStruct((batch,), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(x.shape),
                                             jnp.zeros(t.shape, jnp.int32)))
  return matmul_flops(model.apply, params, x, t)


def parameter_table(config) -> tuple[list[tuple[str, int]], int]:
  model = build_model(config)
  size, ch = config.data.image_size, config.data.channels
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, ch)),
                                             jnp.zeros((1,), jnp.int32)))["params"]
  rows = [(name, sum(int(np.prod(x.shape)) for x in jax.tree.leaves(sub)))
          for name, sub in params.items()]
  return rows, sum(n for _, n in rows)


def summary_text(config) -> str:
  rows, total = parameter_table(config)
  width = max(len(n) for n, _ in rows)
  lines = [f"{'module':<{width}}  {'parameters':>12}", "-" * (width + 14)]
  lines += [f"{name:<{width}}  {n:>12,}" for name, n in rows]
  flops = forward_flops(config)
  lines += ["-" * (width + 14), f"{'total':<{width}}  {total:>12,}",
            f"forward pass, one {config.data.image_size}x{config.data.image_size} image: "
            f"{flops / 1e9:.2f} GFLOP (2 x multiply-adds of its convolutions and matmuls)"]
  return "\n".join(lines)
