"""Export of a text-conditional (cross-attention) U-Net run as diffusers' StableDiffusionPipeline:
a Stable Diffusion fine-tune (configs/sd15_finetune.py), or any U-Net trained here on a frozen
CLIP text encoder's context (text.encoder a local directory).

What export.py writes for it:
- unet/: UNet2DConditionModel (CrossAttnDownBlock2D / CrossAttnUpBlock2D where config.model has
  attention, UNetMidBlock2DCrossAttn), its config read back by the import as this config's
  U-Net before anything is written; `use_linear_projection` and `upcast_attention` are the text
  encoder pipeline's U-Net's where it has one (SD 1.x: 1x1 convs; SD 2.x: linear layers);
- scheduler/: DDIMScheduler of config.diffusion and config.sampling's DDIM settings (SD's:
  steps_offset 1, set_alpha_to_one False);
- vae/: the KL first stage (AutoencoderKL, scaling_factor the run's latent scale);
- text_encoder/, tokenizer/: copied from text.encoder (frozen in training, so as they were);
- model_index.json of a StableDiffusionPipeline without safety checker.

Refused, with a message: class labels as the context (LDM's class-conditional models, no
diffusers module), text.encoder "learned" (LDM's own text transformer), SDXL's
micro-conditioning, inpainting U-Nets, VQ first stages.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Mapping

from diffusion_jax.convert_diffusers import (TRANSFORMER_RENAMES, ConversionError,
                                             conditional_model_config_from_diffusers, _target)

NO_COMPONENT = [None, None]  # how diffusers' model_index.json writes an absent component
# the source U-Net's config.json fields that the weights do not show, kept as they were
KEPT_FIELDS = ("use_linear_projection", "upcast_attention")
_TRANSFORMER_INNER = {ours: theirs for theirs, ours in TRANSFORMER_RENAMES.items()}
_ATTN_INNER = {"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".ckpt", ".msgpack", ".h5")


def text_encoder_directory(config) -> str:
  """config.text.encoder when it is a local CLIP directory (what a pipeline can hold)."""
  encoder = config.get("text", {}).get("encoder")
  if not encoder or encoder == "learned" or not os.path.isdir(encoder):
    raise ConversionError(
        f"text.encoder={encoder!r}: a cross-attention U-Net is exported as a "
        "StableDiffusionPipeline with its CLIP text encoder, so text.encoder must name that "
        "local directory (LDM's learned text transformer and class-label contexts have no "
        "diffusers form)")
  return encoder


def _source_unet_config(encoder: str) -> dict:
  path = os.path.join(encoder, "unet", "config.json")
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)


def conditional_unet_config(config, attn_levels) -> dict:
  """The config.json of the UNet2DConditionModel that `config.model` (cross-attention, with
  attention at `attn_levels`) is."""
  from diffusion_jax.latent import model_input_shape
  from diffusion_jax.models import LAYOUT
  m = config.model
  get = lambda key: m.get(key, LAYOUT[key])
  for key, why in (("num_classes", "class labels as the cross-attention context"),
                   ("added_cond_dim", "SDXL's micro-conditioning"),
                   ("output_channels", "an inpainting U-Net")):
    if m.get(key):
      raise ConversionError(f"model.{key}={m.get(key)}: {why} is not exported")
  encoder = text_encoder_directory(config)
  size, channels = model_input_shape(config)
  levels = len(m.ch_mult)
  widths = [m.ch * k for k in m.ch_mult]
  per_head = get("head_channels")  # else num_heads heads at every level
  # attention_head_dim: diffusers' legacy name for the heads' number (the import reads it so)
  heads = [w // per_head for w in widths] if per_head else get("num_heads")
  depth = get("transformer_depth")
  source = _source_unet_config(encoder)
  cfg = {"_class_name": "UNet2DConditionModel", **{k: source[k] for k in KEPT_FIELDS
                                                    if k in source},
         "sample_size": size, "in_channels": channels,
         "out_channels": channels * (2 if config.diffusion.var_type.startswith("learned")
                                     else 1),
         "block_out_channels": widths, "layers_per_block": m.num_res_blocks,
         "down_block_types": ["CrossAttnDownBlock2D" if i in attn_levels else "DownBlock2D"
                              for i in range(levels)],
         "up_block_types": ["CrossAttnUpBlock2D" if i in attn_levels else "UpBlock2D"
                            for i in reversed(range(levels))],
         "mid_block_type": "UNetMidBlock2DCrossAttn", "attention_head_dim": heads,
         "cross_attention_dim": get("context_dim"),
         "transformer_layers_per_block": list(depth) if isinstance(depth, (list, tuple))
         else depth, "dropout": float(m.dropout), "norm_eps": float(get("norm_eps")),
         "flip_sin_to_cos": bool(get("flip_sin_to_cos")), "freq_shift": float(get("freq_shift")),
         "downsample_padding": {"same": 0, "symmetric": 1}[get("downsample_padding")],
         "act_fn": "silu", "norm_num_groups": 32, "time_embedding_type": "positional",
         "resnet_time_scale_shift": "default", "center_input_sample": False}
  cfg.setdefault("use_linear_projection", True)
  if m.get("time_cond_dim"):  # LCM-distilled: the guidance scale's embedding
    cfg["time_cond_proj_dim"] = int(m.time_cond_dim)
  back = conditional_model_config_from_diffusers(cfg)  # the import reads it as this U-Net
  wrong = {k: (v, get(k)) for k, v in back.items() if k in LAYOUT and k != "attn_resolutions"
           and (tuple(v) if isinstance(v, (list, tuple)) else v) != (
               tuple(get(k)) if isinstance(get(k), (list, tuple)) else get(k))}
  if per_head:  # one width per head: the import may name it either way
    wrong.pop("num_heads", None), wrong.pop("head_channels", None)
  if wrong:
    raise ConversionError(f"UNet2DConditionModel cannot describe this U-Net: {wrong}")
  return cfg


def _transformer_inner(inner: list[str], path) -> list[str]:
  """Our SpatialTransformer's module path -> diffusers' Transformer2DModel names."""
  if len(inner) == 1 and inner[0] in ("norm", "proj_in", "proj_out"):
    return inner
  m = re.fullmatch(r"block_(\d+)", inner[0]) if inner else None
  if m and len(inner) == 2 and inner[1] in _TRANSFORMER_INNER:
    return ["transformer_blocks", m.group(1), _TRANSFORMER_INNER[inner[1]]]
  if m and len(inner) == 3 and inner[1] in ("attn_1", "attn_2") and inner[2] in _ATTN_INNER:
    return ["transformer_blocks", m.group(1), f"attn{inner[1][-1]}", _ATTN_INNER[inner[2]]]
  raise ConversionError(f"{'/'.join(path)}: no UNet2DConditionModel module holds it")


def conditional_unet_state_dict(params: Mapping[str, Any], levels: int,
                                linear_projection: bool = True) -> dict:
  """diffusers' UNet2DConditionModel state dict of our cross-attention U-Net's parameters
  (proj_in/proj_out as 1x1 convs where linear_projection is False, as SD 1.x holds them)."""
  from diffusion_jax.export import _module_name, _state_dict

  def name(path):
    top = path[0]
    if top == "temb_cond_proj":
      return "time_embedding.cond_proj"
    if top == "mid_attn" or re.fullmatch(r"(down|up)_\d+_attn_\d+", top):
      return ".".join([_module_name((top,), levels)] + _transformer_inner(list(path[1:]),
                                                                           path))
    return _module_name(path, levels)
  state = _state_dict(params, name, lambda key: _target(key, levels)[0])
  if not linear_projection:
    for key, value in state.items():
      if re.search(r"attentions\.\d+\.proj_(in|out)\.weight$", key):
        state[key] = value[:, :, None, None]
  return state


def copy_text_encoder(encoder: str, out: str) -> dict:
  """text_encoder/ and tokenizer/ from a pipeline directory, or from a CLIPTextModel directory
  that holds its tokenizer; their model_index.json entries."""
  for sub, keep in (("text_encoder", lambda f: True),
                    ("tokenizer", lambda f: not f.endswith(_WEIGHT_FILES))):
    src = os.path.join(encoder, sub) if os.path.isdir(os.path.join(encoder, sub)) else encoder
    os.makedirs(os.path.join(out, sub))
    for f in sorted(os.listdir(src)):
      if os.path.isfile(os.path.join(src, f)) and keep(f):
        shutil.copy2(os.path.join(src, f), os.path.join(out, sub, f))
  with open(os.path.join(out, "text_encoder", "config.json")) as f:
    text_cls = (json.load(f).get("architectures") or ["CLIPTextModel"])[0]
  return {"text_encoder": ["transformers", text_cls], "tokenizer": ["transformers",
                                                                   "CLIPTokenizer"],
          "safety_checker": NO_COMPONENT, "feature_extractor": NO_COMPONENT,
          "image_encoder": NO_COMPONENT}

