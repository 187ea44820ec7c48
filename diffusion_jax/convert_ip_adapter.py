"""IP-Adapter weights (Ye et al. 2023; h94/IP-Adapter's ip-adapter_sd15.safetensors,
ip-adapter_sdxl.safetensors, ...: "image_proj.*" and "ip_adapter.{k}.to_k_ip / to_v_ip.weight")
-> models.ip_adapter.ImageProjection's parameters and the k_ip / v_ip projections of the
U-Net's cross-attentions.

"ip_adapter.{k}" numbers the U-Net's attention layers as diffusers' unet.attn_processors lists
them (the down blocks', the up blocks', the middle block's; in each transformer block its
self-attention, then its cross-attention), so the cross-attentions are 1, 3, 5, ...
(`cross_attention_paths`). Pure numpy; the image encoder: convert_clip.load_vision_encoder.
"""
from __future__ import annotations

import os

import numpy as np

from diffusion_jax.convert_diffusers import ConversionError, put_torch_tensor


def cross_attention_paths(unet) -> list[tuple[str, ...]]:
  """Our module paths of the U-Net's cross-attentions in diffusers' attn_processors order."""
  levels = len(unet.ch_mult)
  if not (unet.context_dim and unet.attn_levels):
    raise ConversionError("IP-Adapter needs a cross-attention U-Net (Stable Diffusion's)")
  depth = unet._depth
  blocks = lambda name, level: [(name, f"block_{d}", "attn_2") for d in range(depth(level))]
  paths = []
  for i in range(levels):
    if i in unet.attn_levels:
      for j in range(unet.num_res_blocks):
        paths += blocks(f"down_{i}_attn_{j}", i)
  for i in reversed(range(levels)):  # diffusers' up_blocks[0] is the deepest level
    if i in unet.attn_levels:
      for j in range(unet.num_res_blocks + 1):
        paths += blocks(f"up_{i}_attn_{j}", i)
  return paths + blocks("mid_attn", levels - 1)


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


def ip_adapter_params(state: dict, unet) -> tuple[dict, dict[tuple[str, ...], dict]]:
  """(ImageProjection parameters, {cross-attention path: {"k_ip": ..., "v_ip": ...}}) of an
  IP-Adapter state dict for `unet` (a models.unet.UNet)."""
  proj = {k.removeprefix("image_proj."): v for k, v in state.items()
          if k.startswith("image_proj.")}
  attn = {k.removeprefix("ip_adapter."): v for k, v in state.items()
          if k.startswith("ip_adapter.")}
  if not proj or not attn or len(proj) + len(attn) != len(state):
    raise ConversionError("not an IP-Adapter file: expected image_proj.* and ip_adapter.* "
                          f"tensors; got e.g. {sorted(state)[:4]}")
  if set(proj) != {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}:
    raise ConversionError("only the plain IP-Adapter (image_proj.proj and .norm, e.g. "
                          "ip-adapter_sd15, ip-adapter_sdxl) is supported, not the Plus, Full "
                          f"Face or FaceID variants (image_proj has {sorted(proj)[:4]})")
  projection: dict = {}
  for key, value in proj.items():
    module, leaf = key.split(".")
    put_torch_tensor(projection, [module], leaf, key, value)
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
      put_torch_tensor(layer, [name], "weight", key, weight)
    layers[path] = layer
  return projection, layers
