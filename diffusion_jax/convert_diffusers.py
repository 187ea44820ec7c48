"""diffusers `UNet2DModel` weights (config.json + safetensors) -> our U-Net parameters.

Pure numpy: reading the safetensors file needs no torch. The mapping covers the layout of the
public DDPM checkpoints (google/ddpm-cifar10-32, google/ddpm-celebahq-256, google/ddpm-church-256
and their ema- variants), including the older attention names (query/key/value/proj_attn).
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import numpy as np

ATTN_RENAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
                "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
RESNET_RENAMES = {"norm1": "norm_1", "conv1": "conv_1", "time_emb_proj": "temb_proj",
                  "norm2": "norm_2", "conv2": "conv_2", "conv_shortcut": "nin_shortcut"}
# what our U-Net hard-codes, and the diffusers config values that agree with it
REQUIRED = {"act_fn": "silu", "norm_num_groups": 32, "flip_sin_to_cos": False, "freq_shift": 1,
            "time_embedding_type": "positional", "downsample_padding": 0,
            "resnet_time_scale_shift": "default", "center_input_sample": False,
            "class_embed_type": None, "num_class_embeds": None, "mid_block_scale_factor": 1,
            "add_attention": True}


class ConversionError(ValueError):
  pass


def check_diffusers_config(cfg: Mapping[str, Any], class_name: str,
                           required: Mapping[str, Any], ours: str) -> None:
  """Refuse a config.json of another class, or with a value that `ours` hard-codes otherwise."""
  if cfg.get("_class_name", class_name) != class_name:
    raise ConversionError(f"expected the config.json of a {class_name}, got "
                          f"{cfg.get('_class_name')!r}")
  for key, want in required.items():
    if key in cfg and cfg[key] != want:
      raise ConversionError(f"diffusers config {key}={cfg[key]!r} is not supported "
                            f"by {ours} (needs {want!r})")


def model_config_from_diffusers(cfg: Mapping[str, Any]) -> dict:
  """Our `config.model` fields for a diffusers UNet2DModel config.json."""
  check_diffusers_config(cfg, "UNet2DModel", REQUIRED, "the DDPM U-Net")
  if abs(float(cfg.get("norm_eps", 1e-6)) - 1e-6) > 1e-12:
    raise ConversionError(f"norm_eps={cfg['norm_eps']} is not supported (needs 1e-6)")
  boc = list(cfg["block_out_channels"])
  ch = boc[0]
  if any(c % ch for c in boc):
    raise ConversionError(f"block_out_channels {boc} are not multiples of {ch}")
  down = list(cfg["down_block_types"])
  up = list(cfg["up_block_types"])
  attn_levels = [i for i, t in enumerate(down) if t.startswith("Attn")]
  if sorted(len(up) - 1 - i for i, t in enumerate(up) if t.startswith("Attn")) != attn_levels:
    raise ConversionError(f"attention in down blocks {down} and up blocks {up} do not mirror")
  for i in attn_levels:
    head_dim = cfg.get("attention_head_dim")
    if head_dim is not None and head_dim != boc[i]:
      raise ConversionError(f"attention_head_dim={head_dim} means several heads; the DDPM "
                            "U-Net has one head per attention block (attention_head_dim=null)")
  size = cfg["sample_size"]
  size = size[0] if isinstance(size, (list, tuple)) else size
  in_ch, out_ch = cfg["in_channels"], cfg["out_channels"]
  if out_ch not in (in_ch, 2 * in_ch):
    raise ConversionError(f"out_channels={out_ch} must be in_channels ({in_ch}) or twice it")
  return {"name": "unet", "ch": ch, "ch_mult": tuple(c // ch for c in boc),
          "num_res_blocks": cfg["layers_per_block"],
          "attn_resolutions": tuple(size // 2 ** i for i in attn_levels),
          "dropout": float(cfg.get("dropout", 0.0)), "in_channels": in_ch,
          "learned_variance": out_ch == 2 * in_ch, "image_size": size}


def _target(key: str, levels: int) -> tuple[list[str], str]:
  """diffusers key -> (our module path, parameter name in the diffusers module)."""
  mod, leaf = key.rsplit(".", 1)
  fixed = {"conv_in": ["conv_in"], "conv_out": ["conv_out"], "conv_norm_out": ["norm_out"],
           "time_embedding.linear_1": ["temb_dense_0"],
           "time_embedding.linear_2": ["temb_dense_1"],
           "mid_block.resnets.0": ["mid_block_1"], "mid_block.resnets.1": ["mid_block_2"]}
  for prefix, path in fixed.items():
    if mod == prefix:
      return path, leaf
    if mod.startswith(prefix + "."):
      return path + [RESNET_RENAMES[mod[len(prefix) + 1:]]], leaf
  m = re.fullmatch(r"mid_block\.attentions\.0\.(.+)", mod)
  if m:
    return ["mid_attn", ATTN_RENAMES[m.group(1)]], leaf
  m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)"
                   r"\.(\d+)\.(.+)", mod)
  if not m:
    raise ConversionError(f"unexpected parameter {key!r} in the diffusers checkpoint")
  side, block, kind, j, rest = m.groups()
  level = int(block) if side == "down" else levels - 1 - int(block)
  if kind == "resnets":
    return [f"{side}_{level}_block_{j}", RESNET_RENAMES[rest]], leaf
  if kind == "attentions":
    return [f"{side}_{level}_attn_{j}", ATTN_RENAMES[rest]], leaf
  return [f"{side}_{level}_{kind[:-len('rs')]}", "conv"], leaf


def put_torch_tensor(params: dict, path: list[str], leaf: str, key: str, value) -> None:
  """Store one torch parameter (`leaf` "weight"/"bias" of module `key`) at `path` of a Flax
  tree: conv OIHW -> HWIO kernel, linear (out, in) -> (in, out), norm weight -> scale. The
  attention projections (q, k, v, proj_out) are Dense in ours, 1x1 convs in some checkpoints."""
  value = np.asarray(value, dtype=np.float32)
  if leaf == "weight" and value.ndim == 4:
    name, value = "kernel", value.transpose(2, 3, 1, 0)
    if path[-1] in ("q", "k", "v", "proj_out") and "attn" in path[-2]:
      if value.shape[:2] != (1, 1):
        raise ConversionError(f"{key!r}: attention projection with shape {value.shape}")
      value = value[0, 0]
  elif leaf == "weight" and value.ndim == 2:
    name, value = "kernel", value.T
  elif leaf == "weight" and value.ndim == 1:
    name = "scale"
  elif leaf == "bias":
    name = "bias"
  else:
    raise ConversionError(f"cannot map {key!r} with shape {value.shape}")
  node = params
  for p in path:
    node = node.setdefault(p, {})
  node[name] = value


def unet_params_from_diffusers(state: Mapping[str, np.ndarray], model_cfg: Mapping[str, Any]):
  """Flax parameter tree of `UNet` from a diffusers state dict (numpy arrays)."""
  levels = len(model_cfg["ch_mult"])
  params: dict = {}
  for key, value in state.items():
    path, leaf = _target(key, levels)
    put_torch_tensor(params, path, leaf, key, value)
  return params


def load_diffusers_unet(directory: str) -> tuple[dict, dict]:
  """(our model config fields, parameters) from a local diffusers UNet2DModel directory."""
  from safetensors.numpy import load_file
  cfg_path = os.path.join(directory, "config.json")
  unet_dir = directory
  if not os.path.exists(cfg_path) and os.path.exists(os.path.join(directory, "unet")):
    unet_dir = os.path.join(directory, "unet")  # a whole pipeline directory
    cfg_path = os.path.join(unet_dir, "config.json")
  weights = os.path.join(unet_dir, "diffusion_pytorch_model.safetensors")
  for path in (cfg_path, weights):
    if not os.path.exists(path):
      raise ConversionError(
          f"{path} not found: point at a diffusers UNet2DModel directory holding config.json "
          "and diffusion_pytorch_model.safetensors (e.g. a local copy of "
          "google/ddpm-cifar10-32; a .bin file can be re-saved with safetensors)")
  with open(cfg_path) as f:
    cfg = json.load(f)
  model_cfg = model_config_from_diffusers(cfg)
  return model_cfg, unet_params_from_diffusers(load_file(weights), model_cfg)
