"""Single-file checkpoints in CompVis' `ldm` naming -> our U-Net, CLIP text encoder and
autoencoder: Stable Diffusion 1.x (e.g. v1-5-pruned-emaonly.safetensors) and LDM's
class-conditional models (cin256: a ClassEmbedder's table `cond_stage_model.embedding.weight`
as the cross-attention context, our `label_context`).

A single file holds `model.diffusion_model.*` (openaimodel's UNetModel with SpatialTransformers:
input_blocks / middle_block / output_blocks), `cond_stage_model.transformer.*` (transformers'
CLIPTextModel names) and `first_stage_model.*` (convert_autoencoder reads it). The layout is
read from the weights; what the weights do not say is Stable Diffusion's: GroupNorm eps 1e-5,
the flipped timestep embedding, symmetric down-sampling padding, and the heads (8 per block
with a 768-wide context, SD 1.x; 64 channels per head with 1024, SD 2.x). SD 2.x files hold
OpenCLIP's text tower (`cond_stage_model.model.*`: fused in_proj, resblocks), of which SD uses
the penultimate layer: its last block is dropped, ln_final kept (as diffusers converts it).
`ldm_state_dict` writes our U-Net back in that naming.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np

from diffusion_jax.convert_diffusers import (ConversionError, _attention_path,
                                             put_torch_tensor)

UNET_PREFIX = "model.diffusion_model."
TEXT_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_PREFIX = "conditioner.embedders."
SDXL_TEXT_PREFIX = SDXL_PREFIX + "0.transformer."  # OpenAI CLIP ViT-L (transformers' names)
SDXL_OPEN_CLIP_PREFIX = SDXL_PREFIX + "1.model."  # OpenCLIP ViT-bigG
CLASS_EMBEDDER = "cond_stage_model.embedding.weight"  # [classes + 1 (the null), context_dim]
RESBLOCK = {"in_layers.0": "norm_1", "in_layers.2": "conv_1", "emb_layers.1": "temb_proj",
            "out_layers.0": "norm_2", "out_layers.3": "conv_2", "skip_connection": "nin_shortcut"}
HEADS_BY_CONTEXT = {768: {"num_heads": 8, "head_channels": 0},      # SD 1.x
                    1024: {"num_heads": 1, "head_channels": 64},    # SD 2.x
                    2048: {"num_heads": 1, "head_channels": 64}}    # SDXL


def ldm_modules(ch_mult, num_res_blocks: int, attn_levels) -> dict[str, str]:
  """Our U-Net's module names -> openaimodel's module prefixes."""
  out = {"temb_dense_0": "time_embed.0", "temb_dense_1": "time_embed.2",
         "add_embed_dense_0": "label_emb.0.0", "add_embed_dense_1": "label_emb.0.2",  # SDXL's
         "conv_in": "input_blocks.0.0", "mid_block_1": "middle_block.0",
         "mid_attn": "middle_block.1", "mid_block_2": "middle_block.2", "norm_out": "out.0",
         "conv_out": "out.2"}
  levels, n = len(ch_mult), 1
  for i in range(levels):
    for j in range(num_res_blocks):
      out[f"down_{i}_block_{j}"] = f"input_blocks.{n}.0"
      if i in attn_levels:
        out[f"down_{i}_attn_{j}"] = f"input_blocks.{n}.1"
      n += 1
    if i != levels - 1:
      out[f"down_{i}_downsample"] = f"input_blocks.{n}.0"
      n += 1
  n = 0
  for i in reversed(range(levels)):
    for j in range(num_res_blocks + 1):
      out[f"up_{i}_block_{j}"] = f"output_blocks.{n}.0"
      k = 1
      if i in attn_levels:
        out[f"up_{i}_attn_{j}"] = f"output_blocks.{n}.1"
        k = 2
      if i != 0 and j == num_res_blocks:
        out[f"up_{i}_upsample"] = f"output_blocks.{n}.{k}"
      n += 1
  return out


def unet_fields_from_ldm(state: Mapping[str, Any], heads: dict | None = None,
                         added_time_dim: int = 256) -> dict:
  """Our U-Net's fields from openaimodel weights (`model.diffusion_model.` stripped): SD 1.x/2.x,
  or SDXL's (a transformer depth per level; label_emb: the pooled text and size ids, each id
  embedded in `added_time_dim` channels, which the weights do not say)."""
  try:
    conv_in = state["input_blocks.0.0.weight"]
  except KeyError:
    raise ConversionError("no U-Net in this file (model.diffusion_model.input_blocks.0.0.*)")
  if any(k.endswith(".qkv.weight") for k in state):
    raise ConversionError("this U-Net attends with openaimodel's AttentionBlock (qkv), not "
                          "SpatialTransformers: convert it with diffusers first")
  blocks = {int(m.group(1)) for k in state if (m := re.match(r"input_blocks\.(\d+)\.", k))}
  downsamples = [n for n in blocks if f"input_blocks.{n}.0.op.weight" in state]
  levels = len(downsamples) + 1
  num_res_blocks = (len(blocks) - 1 - len(downsamples)) // levels
  ch = conv_in.shape[0]
  firsts = [1 + i * (num_res_blocks + 1) for i in range(levels)]
  ch_mult = tuple(state[f"input_blocks.{n}.0.out_layers.3.weight"].shape[0] // ch
                  for n in firsts)
  attn_levels = tuple(i for i, n in enumerate(firsts) if f"input_blocks.{n}.1.proj_in.weight"
                      in state)
  to_k = [v for k, v in state.items() if k.endswith("attn2.to_k.weight")]
  if not to_k:
    raise ConversionError("no cross-attention (attn2) in this U-Net")
  context_dim = to_k[0].shape[1]
  depth_of = lambda prefix: 1 + max(
      (int(m.group(1)) for k in state
       if (m := re.match(re.escape(prefix) + r"\.transformer_blocks\.(\d+)\.", k))), default=0)
  middle = depth_of("middle_block.1")  # ours: the last level's depth
  depths = tuple(depth_of(f"input_blocks.{n}.1") if i in attn_levels
                 else middle if i == levels - 1 else 1 for i, n in enumerate(firsts))
  if depths[-1] != middle:
    raise ConversionError(f"the middle block's transformer depth {middle} is not the last "
                          f"level's ({depths[-1]}), which ours takes")
  if heads is None:
    if context_dim not in HEADS_BY_CONTEXT:
      raise ConversionError(f"a {context_dim}-wide context is neither SD 1.x's (768), 2.x's "
                            "(1024) nor XL's (2048): say the heads, heads={'num_heads': n} or "
                            "{'head_channels': c}")
    heads = HEADS_BY_CONTEXT[context_dim]
  added = {}
  if "label_emb.0.0.weight" in state:
    added = {"added_cond_dim": int(state["label_emb.0.0.weight"].shape[1]),
             "added_time_dim": int(added_time_dim)}
  elif any(k.startswith("label_emb.") for k in state):
    raise ConversionError("this U-Net's label_emb is not SDXL's pooled-text and size "
                          "conditioning (label_emb.0.0/0.2): not supported")
  return {"ch": ch, "ch_mult": ch_mult, "num_res_blocks": num_res_blocks, "attn_resolutions": (),
          "attn_levels": attn_levels, "dropout": 0.0, "in_channels": conv_in.shape[1],
          "learned_variance": False, "context_dim": int(context_dim),
          "transformer_depth": depths[0] if len(set(depths)) == 1 else depths,
          **({"output_channels": int(state["out.2.weight"].shape[0])}
             if "out.2.weight" in state and state["out.2.weight"].shape[0] != conv_in.shape[1]
             else {}),
          "num_heads": 1, "head_channels": 0, **heads, "norm_eps": 1e-5,
          "flip_sin_to_cos": True, "freq_shift": 0.0, "downsample_padding": "symmetric",
          **added}


def _inner(our_module: str, rest: str, key: str) -> list[str]:
  """Inside one module: openaimodel's sub-names -> ours."""
  if "_attn" in our_module:
    return _attention_path(rest, key)
  if our_module.endswith("downsample") and rest == "op":
    return ["conv"]
  if our_module.endswith("upsample") and rest == "conv":
    return ["conv"]
  if rest in RESBLOCK and "block" in our_module:
    return [RESBLOCK[rest]]
  if rest == "":
    return []
  raise ConversionError(f"unexpected parameter {key!r} in the U-Net")


def unet_params_from_ldm(state: Mapping[str, Any], fields: Mapping[str, Any]) -> dict:
  """Flax parameters of our U-Net from openaimodel weights."""
  modules = ldm_modules(fields["ch_mult"], fields["num_res_blocks"], fields["attn_levels"])
  by_prefix = sorted(((v, k) for k, v in modules.items()), key=lambda p: -len(p[0]))
  params: dict = {}
  for key, value in state.items():
    mod, leaf = key.rsplit(".", 1)
    match = next(((p, ours) for p, ours in by_prefix if mod == p or mod.startswith(p + ".")),
                 None)
    if match is None:
      raise ConversionError(f"unexpected parameter {key!r} in the U-Net")
    prefix, ours = match
    path = [ours] + _inner(ours, mod[len(prefix) + 1:], key)
    put_torch_tensor(params, path, leaf, key, value)
  return params


def ldm_state_dict(params: Mapping[str, Any], fields: Mapping[str, Any],
                   linear_proj: bool = False) -> dict:
  """Our U-Net's parameters in openaimodel's naming (under model.diffusion_model.), torch
  layouts (OIHW convs, [out, in] linears; the SpatialTransformer's proj_in/proj_out as 1x1
  convs, as SD 1.x has them, or with `linear_proj` linears, as SD 2.x and XL)."""
  from flax import traverse_util
  inverse = {v: k for k, v in RESBLOCK.items()}
  attn = {"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
  block = {"norm_1": "norm1", "norm_2": "norm2", "norm_3": "norm3", "ff_in": "ff.net.0.proj",
           "ff_out": "ff.net.2"}
  modules = ldm_modules(fields["ch_mult"], fields["num_res_blocks"], fields["attn_levels"])
  out = {}
  for path, value in traverse_util.flatten_dict(dict(params)).items():
    ours, *inner, name = path
    value = np.asarray(value, np.float32)
    if ours == "label_context":
      out[CLASS_EMBEDDER] = value
      continue
    if ours.endswith("sample"):  # down/upsample: conv
      sub = ["op"] if "down" in ours else ["conv"]
    elif "_attn" in ours and inner and inner[0].startswith("block_"):
      k = inner[0].split("_")[1]
      sub = ([f"transformer_blocks.{k}", f"attn{inner[1][-1]}", attn[inner[2]]]
             if inner[1].startswith("attn_") else [f"transformer_blocks.{k}", block[inner[1]]])
    elif "_attn" in ours:
      sub = inner  # norm, proj_in, proj_out
    else:
      sub = [inverse[inner[0]]] if inner else []
    if name == "kernel":
      leaf = "weight"
      if value.ndim == 4:
        value = value.transpose(3, 2, 0, 1)
      elif sub and sub[-1] in ("proj_in", "proj_out") and "_attn" in ours:
        value = value.T if linear_proj else value.T[:, :, None, None]
      else:
        value = value.T
    else:
      leaf = {"scale": "weight", "bias": "bias", "embedding": "weight"}[name]
    out[UNET_PREFIX + ".".join([modules[ours]] + sub + [leaf])] = value
  return out


def unet_state(state: Mapping[str, Any], ema: bool = False) -> dict:
  """The U-Net's weights of a checkpoint (prefix stripped): model.diffusion_model.* (what SD's
  and diffusers' loaders take), or with `ema` the EMA copy LDM keeps beside them (`model_ema.`
  + the name without dots; an error if the file has none)."""
  unet = _under(state, UNET_PREFIX)
  if not ema:
    return unet
  copy = {k: state.get("model_ema." + ("diffusion_model." + k).replace(".", "")) for k in unet}
  if not unet or any(v is None for v in copy.values()):
    raise ConversionError("ema: this file has no (complete) model_ema.* copy of the U-Net")
  return copy


def class_conditional_unet(state: Mapping[str, Any], heads: dict | None = None,
                           ema: bool = False):
  """(fields, parameters) of a class-conditional LDM's U-Net in one file (model.diffusion_model.*
  or, with `ema`, its EMA copy; the ClassEmbedder's table: num_classes = its rows - 1, the last
  row read as the null label of classifier-free guidance, as cin256-v2's 1001 rows)."""
  if CLASS_EMBEDDER not in state:
    raise ConversionError(f"no class embedding ({CLASS_EMBEDDER}): not a class-conditional "
                          "LDM checkpoint")
  unet = unet_state(state, ema)
  fields = unet_fields_from_ldm(unet, heads)
  table = np.asarray(state[CLASS_EMBEDDER], np.float32)
  if table.shape[1] != fields["context_dim"]:
    raise ConversionError(f"the class embedding is {table.shape[1]} wide; the U-Net attends to "
                          f"{fields['context_dim']}")
  params = unet_params_from_ldm(unet, fields)
  params["label_context"] = {"embedding": table}
  return dict(fields, num_classes=table.shape[0] - 1), params


def open_clip_text_params(state: Mapping[str, Any], penultimate_only: bool = True) -> dict:
  """CLIPTextEncoder parameters from OpenCLIP's text tower (prefix stripped): the blocks but
  the last (SD 2.x's penultimate layer), ln_final; or with `penultimate_only=False` all of
  them and the text projection (SDXL's ViT-bigG, whose pooled output counts)."""
  f32 = lambda k: np.asarray(state[k], np.float32)
  blocks = sorted({int(m.group(1)) for k in state
                   if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))})
  if len(blocks) < 2:
    raise ConversionError("OpenCLIP text tower with fewer than 2 blocks")
  params = {"token_embedding": {"embedding": f32("token_embedding.weight")},
            "position_embedding": f32("positional_embedding"),
            "final_norm": {"scale": f32("ln_final.weight"), "bias": f32("ln_final.bias")}}
  if not penultimate_only:
    if "text_projection" not in state:
      raise ConversionError("OpenCLIP text tower without its text_projection")
    params["text_projection"] = {"kernel": f32("text_projection")}  # x @ P: [width, dim]
  dense = lambda w, b: {"kernel": f32(w).T, "bias": f32(b)}
  for n, i in enumerate(blocks[:-1] if penultimate_only else blocks):
    p = f"transformer.resblocks.{i}."
    w, b = f32(p + "attn.in_proj_weight"), f32(p + "attn.in_proj_bias")
    d = w.shape[1]
    for j, name in enumerate("qkv"):
      rows = slice(j * d, (j + 1) * d)
      params[f"layer_{n}_{name}"] = {"kernel": w[rows].T, "bias": b[rows]}
    params[f"layer_{n}_out"] = dense(p + "attn.out_proj.weight", p + "attn.out_proj.bias")
    params[f"layer_{n}_fc1"] = dense(p + "mlp.c_fc.weight", p + "mlp.c_fc.bias")
    params[f"layer_{n}_fc2"] = dense(p + "mlp.c_proj.weight", p + "mlp.c_proj.bias")
    for ours, theirs in (("norm_1", "ln_1"), ("norm_2", "ln_2")):
      params[f"layer_{n}_{ours}"] = {"scale": f32(p + theirs + ".weight"),
                                     "bias": f32(p + theirs + ".bias")}
  return params


def _under(state: Mapping[str, Any], prefix: str) -> dict:
  return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def split_single_file(state: Mapping[str, Any], ema: bool = False) -> dict:
  """A Stable Diffusion checkpoint's parts: "unet" (prefix stripped), "vae" (its own prefix,
  which convert_autoencoder reads), "text" (CLIPTextEncoder parameters), "activation" (SD
  1.x's and XL's OpenAI CLIP: quick_gelu; SD 2.x's OpenCLIP: gelu) and, in an SDXL file,
  "text_2" (OpenCLIP bigG's parameters, all its blocks and its projection)."""
  from diffusion_jax.convert_clip import text_encoder_params
  parts = {"unet": unet_state(state, ema), "vae": {k: v for k, v in state.items()
                                              if k.startswith("first_stage_model.")}}
  if any(k.startswith(SDXL_PREFIX) for k in state):
    openai, bigg = _under(state, SDXL_TEXT_PREFIX), _under(state, SDXL_OPEN_CLIP_PREFIX)
    if not openai:
      raise ConversionError("this SDXL file has no OpenAI CLIP as its first text encoder "
                            f"({SDXL_TEXT_PREFIX}*): the SDXL refiner is not supported")
    if not bigg:
      raise ConversionError(f"no {SDXL_OPEN_CLIP_PREFIX}* weights: an SDXL file holds "
                            "OpenCLIP ViT-bigG as its second text encoder")
    parts.update(text=text_encoder_params(openai), activation="quick_gelu",
                 text_2=open_clip_text_params(bigg, penultimate_only=False))
  elif openai := _under(state, TEXT_PREFIX):
    parts.update(text=text_encoder_params(openai), activation="quick_gelu")
  elif open_clip := _under(state, OPEN_CLIP_PREFIX):
    parts.update(text=open_clip_text_params(open_clip), activation="gelu")
  for name, hint in (("unet", UNET_PREFIX), ("text", f"{TEXT_PREFIX}* or {OPEN_CLIP_PREFIX}"),
                     ("vae", "first_stage_model.")):
    if not parts.get(name):
      raise ConversionError(f"no {hint}* weights: not a Stable Diffusion checkpoint")
  return parts


def _header_keys(path: str) -> list[str]:
  """The tensor names of a .safetensors file (its header alone), or [] where it is none."""
  from safetensors import safe_open
  if not (path.endswith(".safetensors") and os.path.isfile(path)):
    return []
  try:
    with safe_open(path, "numpy") as f:
      return list(f.keys())
  except Exception:  # single_file_parts names what is wrong with the file
    return []


def is_sdxl_file(path: str) -> bool:
  """Whether a .safetensors file holds SDXL base's second text encoder."""
  return any(k.startswith(SDXL_OPEN_CLIP_PREFIX) for k in _header_keys(path))


# Empty tensors some single files carry to say how they were trained (ComfyUI's convention):
# "v_pred" v prediction, with "ztsnr" also zero terminal SNR (e.g. v-prediction SDXL finetunes)
SCHEDULE_MARKERS = ("v_pred", "ztsnr")


def schedule_markers(path: str) -> set[str]:
  """Which of SCHEDULE_MARKERS a single file holds."""
  return set(SCHEDULE_MARKERS) & set(_header_keys(path))


def single_file_parts(path: str, prediction_type: str = "epsilon", heads: dict | None = None,
                      text_heads: int | None = None, ema: bool = False) -> dict:
  """The parts of a Stable Diffusion 1.x/2.x/XL single file as
  stable_diffusion_loading.assemble takes them: "text", "unet" (fields, params), "vae"
  (fields, params, scaling) and SDXL's "text_2" (fields, params); the U-Net's native size 64
  latents (96 with v prediction, SD 2.x's 768-v; 128, SDXL's 1024 pixels)."""
  from diffusion_jax.convert_autoencoder import _read_safetensors, autoencoder_from_state
  from diffusion_jax.convert_clip import text_encoder_fields_from_params
  if not (path.endswith(".safetensors") and os.path.isfile(path)):
    raise ConversionError(f"{path!r} is not a .safetensors file")
  parts = split_single_file(_read_safetensors(path), ema)
  xl = "text_2" in parts
  unet_cfg = dict(unet_fields_from_ldm(parts["unet"], heads), name="unet",
                  image_size=128 if xl else 96 if prediction_type == "v_prediction" else 64)
  vae_cfg, vae_params = autoencoder_from_state(parts["vae"])
  out = {"text": (text_encoder_fields_from_params(parts["text"], parts["activation"],
                                                  text_heads), parts["text"]),
         "unet": (unet_cfg, unet_params_from_ldm(parts["unet"], unet_cfg)),
         "vae": (vae_cfg, vae_params, {"scale_factor": 0.13025 if xl else 0.18215,
                                       "shift_factor": 0.0})}
  if xl:
    fields_2 = text_encoder_fields_from_params(parts["text_2"], "gelu", text_heads)
    fields_2["projection_dim"] = int(parts["text_2"]["text_projection"]["kernel"].shape[1])
    if unet_cfg.get("added_cond_dim"):  # pooled text + 6 size ids of added_time_dim each
      unet_cfg["added_time_dim"] = (unet_cfg["added_cond_dim"] - fields_2["projection_dim"]) // 6
    out["text_2"] = (fields_2, parts["text_2"])
  return out
