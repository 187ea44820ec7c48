"""LoRA weights (Hu et al. 2021) for Stable Diffusion pipelines, merged into the converted
parameters: W <- W + weight * (alpha / r) * B A for each adapted linear or convolution.

Reads the two formats people have (.safetensors):
- diffusers / PEFT (`save_lora_weights`): "unet.<module>.lora_A.weight" / "lora_B.weight" (or
  "lora.down" / "lora.up"), "text_encoder." / "text_encoder_2." likewise; alpha and r from the
  file's "lora_adapter_metadata" ("unet.lora_alpha", "unet.r"), else alpha = r;
- kohya-ss / A1111: "lora_unet_<module with _>.lora_down.weight" / "lora_up.weight" / "alpha",
  "lora_te_" (SDXL: "lora_te1_", "lora_te2_") for the text encoders; U-Net modules named as
  diffusers' (SD 1.x/2.x trainers) or in LDM's layout (input_blocks, middle_block, ...:
  kohya's SDXL trainer, which trains Stability's U-Net; convert_ldm maps them).
Module names map onto ours through the converters (convert_diffusers, convert_clip), so a
LoRA reaches exactly the parameters the same weights in a full checkpoint would.
"""
from __future__ import annotations

import json
import os
import re
from typing import Mapping

import numpy as np

from diffusion_jax.convert_diffusers import ConversionError

COMPONENTS = {"unet": "unet", "unet_ldm": "unet", "text_encoder": "text",
              "text_encoder_2": "text_2"}  # -> params ("unet_ldm": a U-Net in LDM's names)
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
# diffusers' module names that hold an underscore (kohya writes every "." as "_")
COMPOUNDS = ("down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k",
             "to_v", "to_out", "proj_in", "proj_out", "time_emb_proj", "conv_shortcut",
             "conv_in", "conv_out", "conv_norm_out", "time_embedding", "linear_1", "linear_2",
             "add_embedding", "text_model", "self_attn", "q_proj", "k_proj", "v_proj",
             "out_proj", "final_layer_norm")
LDM_COMPOUNDS = ("input_blocks", "middle_block", "output_blocks", "transformer_blocks",
                 "in_layers", "out_layers", "emb_layers", "skip_connection", "time_embed",
                 "label_emb", "proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out")
LDM_NAME = re.compile(r"(input_blocks|middle_block|output_blocks|time_embed|label_emb)_|out_2$")


def read_lora(path: str) -> tuple[dict, dict]:
  """(tensors as float32 numpy, the file's metadata) of a .safetensors LoRA file."""
  from safetensors import safe_open
  if not (path.endswith(".safetensors") and os.path.isfile(path)):
    raise ConversionError(f"{path!r} is not a .safetensors file (a LoRA's weights)")
  with safe_open(path, "np") as f:
    return {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}, f.metadata() or {}


def kohya_module(name: str) -> tuple[str, str]:
  """(naming, module) of a kohya U-Net key body: ("diffusers", down_blocks.0.attentions.0.proj_in)
  for down_blocks_0_attentions_0_proj_in, ("ldm", input_blocks.4.1.proj_in) for
  input_blocks_4_1_proj_in."""
  naming, compounds = ("ldm", LDM_COMPOUNDS) if LDM_NAME.match(name) else ("diffusers",
                                                                            COMPOUNDS)
  name = name.replace("_", ".")
  for compound in compounds:
    name = name.replace(compound.replace("_", "."), compound)
  return naming, name


def lora_deltas(state: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> dict:
  """{component ("unet", "unet_ldm", "text_encoder", "text_encoder_2"): {module name (diffusers'
  or, for "unet_ldm", LDM's): the weight's change (alpha / r) B A, in torch's layout}}."""
  pairs: dict = {}  # (component, module) -> {"down", "up", "alpha"}
  for key, value in state.items():
    m = re.fullmatch(r"(unet|text_encoder|text_encoder_2)\.(.+)\.(lora_A|lora_B|lora\.down|"
                     r"lora\.up)\.weight", key)
    k = re.fullmatch(r"(lora_unet_|lora_te[12]?_)(.+)\.(lora_down\.weight|lora_up\.weight|alpha)",
                     key)
    if m:
      part = "down" if m.group(3) in ("lora_A", "lora.down") else "up"
      pairs.setdefault((m.group(1), m.group(2)), {})[part] = value
    elif k:
      part = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[k.group(3)]
      component = KOHYA_PREFIXES[k.group(1)]
      naming, module = kohya_module(k.group(2))
      if component == "unet" and naming == "ldm":
        component = "unet_ldm"
      pairs.setdefault((component, module), {})[part] = value
    else:
      raise ConversionError(f"unexpected key {key!r} in the LoRA file (diffusers' or kohya's "
                            "LoRA formats; LyCORIS' LoHa / LoKr are not supported)")
  meta = json.loads(metadata.get("lora_adapter_metadata", "{}"))
  for key in ("rank_pattern", "alpha_pattern"):
    if any(meta.get(f"{c}.{key}") for c in COMPONENTS):
      raise ConversionError(f"the LoRA's metadata sets a per-module {key}, which is not "
                            "supported")
  deltas: dict = {}
  for (component, module), parts in pairs.items():
    if "down" not in parts or "up" not in parts:
      raise ConversionError(f"LoRA of {component}.{module}: needs both its down (A) and up (B)")
    down, up = parts["down"], parts["up"]
    rank = down.shape[0]
    alpha = float(parts["alpha"]) if "alpha" in parts else float(
        meta.get(f"{component}.lora_alpha", meta.get(f"{component}.r", rank)))
    if up.shape[1] != rank:
      raise ConversionError(f"LoRA of {component}.{module}: up {up.shape} and down "
                            f"{down.shape} do not share the rank")
    change = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)  # conv: [out, in*k*k]
    deltas.setdefault(component, {})[module] = (alpha / rank) * change.reshape(
        (up.shape[0],) + down.shape[1:])
  return deltas


def merged_params(params: Mapping, deltas: Mapping, converters: Mapping, weight: float = 1.0):
  """`params` ({"unet": ..., "text": ..., ["text_2": ...]}) with the deltas added, each
  component's through its converter (a function of a {diffusers key: torch tensor} dict to our
  tree); a LoRA for a component or parameter the pipeline lacks is refused."""
  import jax
  from flax.traverse_util import flatten_dict, unflatten_dict
  out = dict(params)
  for component, by_module in deltas.items():
    ours = COMPONENTS[component]
    if ours not in params:
      raise ConversionError(f"the LoRA adapts {component}, which this pipeline does not have")
    change = converters[component]({f"{m}.weight": d for m, d in by_module.items()})
    flat = flatten_dict(out[ours])
    for path, delta in flatten_dict(change).items():
      if path not in flat:
        raise ConversionError(f"the LoRA changes {component} parameter {'/'.join(path)}, "
                              "which the model does not have")
      old = flat[path]
      if tuple(old.shape) != tuple(np.shape(delta)):
        raise ConversionError(f"LoRA change of {'/'.join(path)}: shape {np.shape(delta)}, "
                              f"the parameter's {tuple(old.shape)}")
      flat[path] = jax.device_put(old + weight * np.asarray(delta, old.dtype), old.sharding)
    out[ours] = unflatten_dict(flat)
  return out
