"""IP-Adapter weights (Ye et al. 2023; h94/IP-Adapter's ip-adapter_sd15.safetensors,
ip-adapter_sdxl.safetensors, ...: "image_proj.*" and "ip_adapter.{k}.to_k_ip / to_v_ip.weight")
-> models.ip_adapter.ImageProjection's (or Resampler's) parameters and the k_ip_a / v_ip_a
projections of the U-Net's cross-attentions (a: the adapter's index).

"ip_adapter.{k}" numbers the U-Net's attention layers as diffusers' unet.attn_processors lists
them (the down blocks', the up blocks', the middle block's; in each transformer block its
self-attention, then its cross-attention), so the cross-attentions are 1, 3, 5, ...
(`cross_attention_paths`). Pure numpy; the image encoder: convert_clip.load_vision_encoder.
"""
from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from diffusion_jax.convert_diffusers import ConversionError, put_torch_tensor


def cross_attention_paths(unet) -> list[tuple[str, ...]]:
  """Our module paths of the U-Net's cross-attentions in diffusers' attn_processors order."""
  if not (unet.context_dim and unet.attn_levels):
    raise ConversionError("IP-Adapter needs a cross-attention U-Net (Stable Diffusion's)")
  return [(ours, f"block_{d}", "attn_2") for _, ours, d in unet.transformer_blocks()]


def read_ip_adapter(path: str) -> dict[str, np.ndarray]:
  """The tensors of an IP-Adapter .safetensors file."""
  if not path.endswith(".safetensors"):
    raise ConversionError(f"{path}: IP-Adapter weights as .safetensors (h94/IP-Adapter "
                          "publishes both; .bin files are pickles, which are not read)")
  if not os.path.isfile(path):
    raise ConversionError(f"{path} not found: an IP-Adapter file, e.g. "
                          "ip-adapter_sd15.safetensors")
  from safetensors.numpy import load_file
  return load_file(path)


def ip_adapter_params(state: dict, unet, index: int = 0
                      ) -> tuple[Any, dict, dict[tuple[str, ...], dict]]:
  """(the image projection module, its parameters, {cross-attention path: {"k_ip_{index}": ...,
  "v_ip_{index}": ...}}) of an IP-Adapter state dict for `unet` (a models.unet.UNet), the
  index-th of the adapters it runs."""
  proj = {k.removeprefix("image_proj."): v for k, v in state.items()
          if k.startswith("image_proj.")}
  attn = {k.removeprefix("ip_adapter."): v for k, v in state.items()
          if k.startswith("ip_adapter.")}
  if not proj or not attn or len(proj) + len(attn) != len(state):
    raise ConversionError("not an IP-Adapter file: expected image_proj.* and ip_adapter.* "
                          f"tensors; got e.g. {sorted(state)[:4]}")
  module, projection = image_projection(proj, unet.context_dim)
  paths = cross_attention_paths(unet)
  found = sorted({int(k.split(".")[0]) for k in attn})
  if found != [2 * n + 1 for n in range(len(paths))]:
    raise ConversionError(f"the IP-Adapter has {len(found)} cross-attention layers; this U-Net "
                          f"has {len(paths)}: it was made for another model")
  layers = {}
  for n, path in enumerate(paths):
    layer = {}
    for name in ("k_ip", "v_ip"):
      key = f"{2 * n + 1}.to_{name}.weight"
      if key not in attn:
        raise ConversionError(f"ip_adapter.{key} is missing")
      weight = np.asarray(attn[key], np.float32)
      if weight.shape[1] != unet.context_dim:
        raise ConversionError(f"ip_adapter.{key} has shape {weight.shape}: made for a U-Net "
                              f"whose cross-attention reads {weight.shape[1]} features, not "
                              f"{unet.context_dim}")
      put_torch_tensor(layer, [f"{name}_{index}"], "weight", key, weight)
    layers[path] = layer
  return module, projection, layers


PLUS_RENAMES = {"0.norm1": "norm_states", "0.norm2": "norm_latents", "0.to_q": "q",
                "0.to_kv": "kv", "0.to_out": "out", "1.0": "ff_norm", "1.1": "ff_in",
                "1.3": "ff_out"}


def image_projection(proj: dict, width: int) -> tuple[Any, dict]:
  """(models.ip_adapter.ImageProjection or Resampler, its parameters) of the "image_proj.*"
  tensors: the plain adapter's Dense + LayerNorm, or IP-Adapter Plus's perceiver ("latents",
  "layers.{i}.0.to_q", ...)."""
  from diffusion_jax.models.ip_adapter import ImageProjection, Resampler
  params: dict = {}
  if set(proj) == {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}:
    for key, value in proj.items():
      module, leaf = key.split(".")
      put_torch_tensor(params, [module], leaf, key, value)
    tokens, rest = divmod(proj["proj.weight"].shape[0], width)
    if rest or proj["norm.weight"].shape[0] != width:
      raise ConversionError(f"the IP-Adapter's projection gives {proj['proj.weight'].shape[0]} "
                            f"features: not tokens of the U-Net's {width}")
    return ImageProjection(width, tokens), params
  if "latents" not in proj:
    raise ConversionError("the plain IP-Adapter (image_proj.proj / .norm, e.g. ip-adapter_sd15) "
                          "and IP-Adapter Plus (image_proj.latents, e.g. ip-adapter-plus_sd15) "
                          "are supported, not the Full Face or FaceID variants (image_proj "
                          f"has {sorted(proj)[:4]})")
  depth = 0
  for key, value in proj.items():
    m = re.fullmatch(r"layers\.(\d+)\.(\d\.\w+)\.(weight|bias)", key)
    if key == "latents":
      params["latents"] = np.asarray(value, np.float32)
    elif m and m.group(2) in PLUS_RENAMES:
      depth = max(depth, int(m.group(1)) + 1)
      put_torch_tensor(params, [f"layer_{m.group(1)}_{PLUS_RENAMES[m.group(2)]}"], m.group(3),
                       key, value)
    elif key.rsplit(".", 1)[0] in ("proj_in", "proj_out", "norm_out"):
      put_torch_tensor(params, [key.rsplit(".", 1)[0]], key.rsplit(".", 1)[1], key, value)
    else:
      raise ConversionError(f"unexpected IP-Adapter Plus tensor image_proj.{key}")
  _, queries, hidden = params["latents"].shape
  heads, rest = divmod(proj["layers.0.0.to_q.weight"].shape[0], 64)
  if rest or params["proj_out"]["kernel"].shape[1] != width:
    raise ConversionError(f"the IP-Adapter Plus resampler gives "
                          f"{params['proj_out']['kernel'].shape[1]} features (heads of 64); "
                          f"the U-Net reads {width}")
  return Resampler(width, hidden, depth, heads, queries), params
