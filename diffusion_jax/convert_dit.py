"""diffusers' DiT (DiTTransformer2DModel, or the Transformer2DModel of older DiT pipelines such as
facebook/DiT-XL-2-256) -> models/dit.py's DiT, and back; and the paper's own checkpoints
(facebookresearch/DiT's DiT-XL-2-256x256.pt, DiT-XL-2-512x512.pt, re-saved as .safetensors).

  fields, params = load_diffusers_dit("DiT-XL-2-256")   # a pipeline or its transformer/ folder
  model = DiT(**dit_fields(fields))
  out = model.apply({"params": params}, z_t, t, y)      # NHWC latents; eps and v

diffusers copies the paper's one timestep-and-label embedder into every block (each block's
norm1.emb); ours is one module, so those copies must agree, as they do in weights converted from
the paper's checkpoints (a file whose blocks' embedders differ is refused). The last layer reads
block 0's.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np

from diffusion_jax.convert_diffusers import ConversionError, load_model_dir

CLASS_NAMES = ("DiTTransformer2DModel", "Transformer2DModel")
# the values our DiT hard-codes: adaLN-Zero blocks, tanh GELU MLPs, biased attention
REQUIRED = {"norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate",
            "attention_bias": True, "norm_elementwise_affine": False, "upcast_attention": False,
            "cross_attention_dim": None, "num_vector_embeds": None}
EMBEDDER = "transformer_blocks.{}.norm1.emb."


def dit_fields_from_diffusers(cfg: Mapping[str, Any]) -> dict:
  """Our DiT's fields (and image_size: the latents' side) from a diffusers config.json."""
  if cfg.get("_class_name") not in CLASS_NAMES or not cfg.get("patch_size"):
    raise ConversionError(f"expected the config.json of a DiT ({CLASS_NAMES[0]}, or a "
                          f"{CLASS_NAMES[1]} with a patch_size), got {cfg.get('_class_name')!r}")
  for key, want in REQUIRED.items():
    if cfg.get(key, want) != want:
      raise ConversionError(f"diffusers config {key}={cfg[key]!r} is not supported by "
                            f"diffusion_jax's DiT (needs {want!r})")
  heads, head_dim = cfg.get("num_attention_heads", 16), cfg.get("attention_head_dim", 72)
  c_in = cfg.get("in_channels", 4)
  c_out = cfg.get("out_channels") or c_in
  if c_out not in (c_in, 2 * c_in):
    raise ConversionError(f"out_channels={c_out}: a DiT predicts eps ({c_in} channels) or eps "
                          f"and its variance ({2 * c_in})")
  if not cfg.get("num_embeds_ada_norm"):
    raise ConversionError("num_embeds_ada_norm (the number of classes) is not set")
  return {"patch_size": cfg["patch_size"], "hidden_size": heads * head_dim,
          "depth": cfg.get("num_layers", 28), "num_heads": heads, "mlp_ratio": 4.0,
          "in_channels": c_in, "learned_variance": c_out == 2 * c_in,
          "num_classes": cfg["num_embeds_ada_norm"], "norm_eps": cfg.get("norm_eps", 1e-5),
          "freq_shift": 1.0, "image_size": cfg.get("sample_size", 32)}


def dit_fields(fields: Mapping[str, Any]) -> dict:
  """The DiT constructor's keyword arguments among `fields`."""
  return {k: v for k, v in fields.items() if k != "image_size"}


def _linear(state, prefix: str) -> dict:
  return {"kernel": np.asarray(state[prefix + ".weight"], np.float32).T,
          "bias": np.asarray(state[prefix + ".bias"], np.float32)}


def _check_shared_embedder(state: Mapping[str, Any], depth: int) -> None:
  first = {k[len(EMBEDDER.format(0)):]: v for k, v in state.items()
           if k.startswith(EMBEDDER.format(0))}
  if not first:
    raise ConversionError(f"no {EMBEDDER.format(0)}* weights: not a class-conditional DiT")
  for i in range(1, depth):
    for name, value in first.items():
      other = state.get(EMBEDDER.format(i) + name)
      if other is None or not np.array_equal(np.asarray(other), np.asarray(value)):
        raise ConversionError(
            f"{EMBEDDER.format(i)}{name} differs from block 0's: DiT has one timestep and label "
            "embedder, which diffusers copies into each block; these weights are not a DiT's")


def dit_params_from_diffusers(state: Mapping[str, Any], fields: Mapping[str, Any]) -> dict:
  """Our DiT's parameters from a DiTTransformer2DModel state dict (numpy arrays)."""
  depth = fields["depth"]
  missing = [k for k in ("pos_embed.proj.weight", "proj_out_2.weight",
                         f"transformer_blocks.{depth - 1}.attn1.to_q.weight") if k not in state]
  if missing or f"transformer_blocks.{depth}.norm1.linear.weight" in state:
    raise ConversionError(f"not the weights of a DiT of depth {depth} (config.json's "
                          f"num_layers): {'missing ' + missing[0] if missing else 'more blocks'}")
  _check_shared_embedder(state, depth)
  emb = EMBEDDER.format(0)
  patch = np.asarray(state["pos_embed.proj.weight"], np.float32)
  params = {
      "patch_embed": {"kernel": patch.transpose(2, 3, 1, 0),
                      "bias": np.asarray(state["pos_embed.proj.bias"], np.float32)},
      "t_embed_1": _linear(state, emb + "timestep_embedder.linear_1"),
      "t_embed_2": _linear(state, emb + "timestep_embedder.linear_2"),
      "y_embed": {"embedding": np.asarray(state[emb + "class_embedder.embedding_table.weight"],
                                          np.float32)},
      "final_ada_ln": _linear(state, "proj_out_1"),
      "final_proj": _linear(state, "proj_out_2"),
  }
  for i in range(depth):
    b = f"transformer_blocks.{i}."
    qkv = [_linear(state, f"{b}attn1.to_{x}") for x in "qkv"]
    params[f"block_{i}"] = {
        "ada_ln": _linear(state, b + "norm1.linear"),
        "qkv": {k: np.concatenate([p[k] for p in qkv], axis=-1) for k in ("kernel", "bias")},
        "proj": _linear(state, b + "attn1.to_out.0"),
        "mlp_in": _linear(state, b + "ff.net.0.proj"),
        "mlp_out": _linear(state, b + "ff.net.2"),
    }
  unknown = sorted(set(state) - set(dit_state_dict(params, fields)))
  if unknown:
    raise ConversionError(f"{len(unknown)} tensors that a DiT of depth {depth} does not have, "
                          f"e.g. {unknown[:3]}")
  return params


def dit_state_dict(params: Mapping[str, Any], fields: Mapping[str, Any]) -> dict:
  """diffusers' DiTTransformer2DModel state dict (numpy) of our DiT's parameters: what
  `dit_params_from_diffusers` reads (the embedder copied into every block)."""
  get = lambda *path: np.asarray(_at(params, path), np.float32)
  linear = lambda prefix, *path: {prefix + ".weight": get(*path, "kernel").T,
                                  prefix + ".bias": get(*path, "bias")}
  state = {"pos_embed.proj.weight": get("patch_embed", "kernel").transpose(3, 2, 0, 1),
           "pos_embed.proj.bias": get("patch_embed", "bias")}
  state.update(linear("proj_out_1", "final_ada_ln"))
  state.update(linear("proj_out_2", "final_proj"))
  d = fields["hidden_size"]
  for i in range(fields["depth"]):
    b, blk = f"transformer_blocks.{i}.", f"block_{i}"
    emb = EMBEDDER.format(i)
    state.update(linear(emb + "timestep_embedder.linear_1", "t_embed_1"))
    state.update(linear(emb + "timestep_embedder.linear_2", "t_embed_2"))
    state[emb + "class_embedder.embedding_table.weight"] = get("y_embed", "embedding")
    state.update(linear(b + "norm1.linear", blk, "ada_ln"))
    kernel, bias = get(blk, "qkv", "kernel"), get(blk, "qkv", "bias")
    for j, x in enumerate("qkv"):
      state[f"{b}attn1.to_{x}.weight"] = kernel[:, j * d:(j + 1) * d].T
      state[f"{b}attn1.to_{x}.bias"] = bias[j * d:(j + 1) * d]
    state.update(linear(b + "attn1.to_out.0", blk, "proj"))
    state.update(linear(b + "ff.net.0.proj", blk, "mlp_in"))
    state.update(linear(b + "ff.net.2", blk, "mlp_out"))
  return {k: np.ascontiguousarray(v) for k, v in state.items()}


def _at(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def is_dit_dir(directory: str) -> bool:
  """Whether `directory` is a DiT pipeline (transformer/ inside) or a DiT model folder."""
  if os.path.isdir(os.path.join(directory, "transformer")):
    return True
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    return False
  with open(path) as f:
    return '"patch_size"' in f.read()


def load_diffusers_dit(directory: str) -> tuple[dict, dict]:
  """(fields, parameters) of a local diffusers DiT: a pipeline directory (its transformer/) or
  the transformer's own folder, config.json and diffusion_pytorch_model.safetensors."""
  return load_model_dir(directory, "transformer", "point at a diffusers DiT pipeline "
                        "(transformer/, vae/, scheduler/; e.g. a local copy of "
                        "facebook/DiT-XL-2-256) or its transformer/ folder; a .bin file can be "
                        "re-saved with safetensors", dit_fields_from_diffusers,
                        dit_params_from_diffusers)


ORIGINAL_KEY = "x_embedder.proj.weight"  # the paper's code's naming (its models.py)


def is_original_dit(keys) -> bool:
  """Whether a state dict's keys are facebookresearch/DiT's (x_embedder, blocks.N, ...)."""
  return ORIGINAL_KEY in keys


def dit_from_original(state: Mapping[str, Any], num_heads: int) -> tuple[dict, dict]:
  """(fields, parameters) of our DiT from a state dict in the paper's code's naming, the
  released DiT-XL-2-*.pt files' (EMA weights; a training checkpoint's "ema" entry).

  The paper's constants become fields: timestep frequencies with freq_shift 0 and both
  LayerNorms' epsilon 1e-6 (diffusers' DiT: 1 and 1e-5). The heads are not in the weights:
  num_heads is the config's (Table 1: DiT-XL and -L 16, -B 12, -S 6)."""
  read = set()  # every key the mapping takes; the rest is refused below

  def arr(key):
    read.add(key)
    return np.asarray(state[key], np.float32)
  lin = lambda prefix: {"kernel": arr(prefix + ".weight").T, "bias": arr(prefix + ".bias")}
  patch = arr(ORIGINAL_KEY)  # [D, C, p, p]
  d, c_in, p, _ = patch.shape
  depth = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))),
                  default=-1)
  needed = ["pos_embed", "final_layer.linear.weight", "y_embedder.embedding_table.weight",
            "t_embedder.mlp.0.weight"]
  if depth == 0 or any(k not in state for k in needed):
    raise ConversionError("not a whole DiT in the paper's naming: needs blocks.N.* and "
                          + ", ".join(needed))
  if d % num_heads:
    raise ConversionError(f"model.num_heads={num_heads} does not divide the width {d}")
  pos = arr("pos_embed").reshape(-1, d)
  grid = int(round(np.sqrt(len(pos))))
  from diffusion_jax.models.dit import sincos_2d
  if grid * grid != len(pos) or not np.allclose(pos, sincos_2d(d, grid), atol=1e-5):
    raise ConversionError("pos_embed is not the fixed 2-D sin-cos table of a square patch grid, "
                          "which our DiT computes: not a DiT of the paper's code")
  c_out = arr("final_layer.linear.weight").shape[0] // (p * p)
  if c_out not in (c_in, 2 * c_in):
    raise ConversionError(f"the last layer gives {c_out} channels per pixel: a DiT predicts eps "
                          f"({c_in}) or eps and its variance ({2 * c_in})")
  fields = {"patch_size": p, "hidden_size": d, "depth": depth, "num_heads": num_heads,
            "mlp_ratio": arr("blocks.0.mlp.fc1.weight").shape[0] / d, "in_channels": c_in,
            "learned_variance": c_out == 2 * c_in,
            # the table's last row is the null label of guidance (class_dropout_prob > 0)
            "num_classes": arr("y_embedder.embedding_table.weight").shape[0] - 1,
            "norm_eps": 1e-6, "freq_shift": 0.0, "image_size": grid * p}
  params = {"patch_embed": {"kernel": patch.transpose(2, 3, 1, 0),
                            "bias": arr("x_embedder.proj.bias")},
            "t_embed_1": lin("t_embedder.mlp.0"), "t_embed_2": lin("t_embedder.mlp.2"),
            "y_embed": {"embedding": arr("y_embedder.embedding_table.weight")},
            "final_ada_ln": lin("final_layer.adaLN_modulation.1"),
            "final_proj": lin("final_layer.linear")}
  names = {"ada_ln": "adaLN_modulation.1", "qkv": "attn.qkv", "proj": "attn.proj",
           "mlp_in": "mlp.fc1", "mlp_out": "mlp.fc2"}  # timm's qkv: [q; k; v], heads inside
  try:
    for i in range(depth):
      params[f"block_{i}"] = {ours: lin(f"blocks.{i}.{theirs}") for ours, theirs in names.items()}
  except KeyError as e:
    raise ConversionError(f"{e.args[0]} is missing: not a whole DiT in the paper's naming")
  unknown = sorted(set(state) - read)
  if unknown:
    raise ConversionError(f"{len(unknown)} tensors that a DiT of the paper's code does not have, "
                          f"e.g. {unknown[:3]}")
  return fields, params
