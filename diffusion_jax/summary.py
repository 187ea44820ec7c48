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


def _network(config):
  """(model, abstract inputs of one image, abstract keyword inputs) of the network the config
  trains: the denoiser (x, t; a text-conditional one's context: CLIP's 77 tokens) of images or
  latents or, with stage "autoencoder", the autoencoder (x; encode and decode the mean)."""
  from diffusion_jax.latent import model_input_shape
  from diffusion_jax.models import build_autoencoder
  image = lambda size, ch: jax.ShapeDtypeStruct((1, size, size, ch), jnp.float32)
  if config.get("stage", "diffusion") == "autoencoder":
    return build_autoencoder(config), (image(config.data.image_size, config.data.channels),), {}
  from diffusion_jax.text_conditioning import LEARNED
  text, encoder = {}, config.get("text", {}).get("encoder")
  if encoder == LEARNED:  # token ids (models/text_unet.py)
    text["context"] = jax.ShapeDtypeStruct((1, config.text.max_length), jnp.int32)
  elif encoder:
    text["context"] = jax.ShapeDtypeStruct((1, 77, config.model.context_dim), jnp.float32)
  return build_model(config), (image(*model_input_shape(config)),
                               jax.ShapeDtypeStruct((1,), jnp.int32)), text


def _abstract_params(model, inputs, kw_inputs):
  zeros = lambda a: jnp.zeros(a.shape, a.dtype)
  return jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), *map(zeros, inputs), **{k: zeros(a) for k, a in kw_inputs.items()}))


def forward_flops(config, batch: int = 1) -> float:
  """FLOPs of one forward pass on `batch` images (convolutions and matmuls) of the network as
  the paper defines it: upsampling counted as nearest x2 + 3x3 conv, whichever
  `model.upsample_conv` computes it (subpixel does fewer of those FLOPs)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.upsample_conv = "resize"
  model, inputs, kw_inputs = _network(config)
  params = _abstract_params(model, inputs, kw_inputs)
  batched = lambda a: jax.ShapeDtypeStruct((batch,) + a.shape[1:], a.dtype)
  inputs = [batched(a) for a in inputs] + [batched(a) for a in kw_inputs.values()]
  apply = model.apply
  if kw_inputs:  # the keyword inputs (the context) after the positional ones
    names, n = tuple(kw_inputs), len(inputs) - len(kw_inputs)
    apply = lambda p, *a: model.apply(p, *a[:n], **dict(zip(names, a[n:])))
  return matmul_flops(apply, params, *inputs)


def parameter_table(config) -> tuple[list[tuple[str, int]], int]:
  params = _abstract_params(*_network(config))["params"]
  rows = [(name, sum(int(np.prod(x.shape)) for x in jax.tree.leaves(sub)))
          for name, sub in params.items()]
  return rows, sum(n for _, n in rows)


def summary_text(config) -> str:
  rows, total = parameter_table(config)
  width = max(len(n) for n, _ in rows)
  lines = [f"{'module':<{width}}  {'parameters':>12}", "-" * (width + 14)]
  lines += [f"{name:<{width}}  {n:>12,}" for name, n in rows]
  from diffusion_jax.latent import latent_shape
  flops = forward_flops(config)
  lat = config.get("stage", "diffusion") == "diffusion" and latent_shape(config)
  size, what = (lat[0], "latent") if lat else (config.data.image_size, "image")
  lines += ["-" * (width + 14), f"{'total':<{width}}  {total:>12,}",
            f"forward pass, one {size}x{size} {what}: "
            f"{flops / 1e9:.2f} GFLOP (2 x multiply-adds of its convolutions and matmuls)"]
  return "\n".join(lines)
