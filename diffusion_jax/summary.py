"""Summary mode: parameters by module, the total, and the cost of one forward pass."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models import build_model


def forward_flops(config, batch: int = 1) -> float:
  """FLOPs of one forward pass on `batch` images, from XLA's cost analysis."""
  model = build_model(config)
  size, ch = config.data.image_size, config.data.channels
  x = jax.ShapeDtypeStruct((batch, size, size, ch), jnp.float32)
  t = jax.ShapeDtypeStruct((batch,), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(x.shape),
                                             jnp.zeros(t.shape, jnp.int32)))
  compiled = jax.jit(model.apply).lower(params, x, t).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan")))


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
  t0 = time.time()
  flops = forward_flops(config)
  lines += ["-" * (width + 14), f"{'total':<{width}}  {total:>12,}",
            f"forward pass, one {config.data.image_size}x{config.data.image_size} image: "
            f"{flops / 1e9:.2f} GFLOPs (XLA cost analysis; {time.time() - t0:.1f}s to compile)"]
  return "\n".join(lines)
