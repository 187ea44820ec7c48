"""diffusers U-Net weights (config.json + safetensors) -> our U-Net's fields and parameters.

Pure numpy: reading the safetensors file needs no torch. The mapping covers
- `UNet2DModel`: the public DDPM checkpoints (google/ddpm-cifar10-32, google/ddpm-celebahq-256,
  google/ddpm-church-256 and their ema- variants, with the older attention names
  query/key/value/proj_attn) and LDM's unconditional U-Nets (CompVis/ldm-celebahq-256:
  multi-head attention, symmetric down-sampling padding, the flipped timestep embedding);
- `UNet2DConditionModel`: LDM's and Stable Diffusion's (1.x, 2.x, XL) cross-attention U-Nets,
  which our U-Net runs with `context_dim` (SpatialTransformer blocks) and a `context` [B, L, d]
  from the caller's text encoder (SDXL's: with its pooled text and size ids, UNet's docstring).
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import numpy as np

ATTN_RENAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
                "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out",
                "norm": "norm", "proj_in": "proj_in", "proj_out": "proj_out"}
TRANSFORMER_RENAMES = {"norm1": "norm_1", "norm2": "norm_2", "norm3": "norm_3",
                       "ff.net.0.proj": "ff_in", "ff.net.2": "ff_out"}
RESNET_RENAMES = {"norm1": "norm_1", "conv1": "conv_1", "time_emb_proj": "temb_proj",
                  "norm2": "norm_2", "conv2": "conv_2", "conv_shortcut": "nin_shortcut"}
# what our U-Net hard-codes, and the diffusers config values that agree with it
REQUIRED = {"act_fn": "silu", "norm_num_groups": 32, "time_embedding_type": "positional",
            "resnet_time_scale_shift": "default", "center_input_sample": False,
            "class_embed_type": None, "mid_block_scale_factor": 1,
            "add_attention": True, "attn_norm_num_groups": None}
LABEL_TABLE = "class_embedding.weight"  # a UNet2DModel's num_class_embeds rows: our label_emb
REQUIRED_CONDITIONAL = {
    "act_fn": "silu", "norm_num_groups": 32, "time_embedding_type": "positional",
    "resnet_time_scale_shift": "default", "center_input_sample": False,
    "class_embed_type": None, "num_class_embeds": None, "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
    "dual_cross_attention": False, "encoder_hid_dim": None,
    "conv_in_kernel": 3, "conv_out_kernel": 3,
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "attention_type": "default",
    "reverse_transformer_layers_per_block": None, "cross_attention_norm": None,
    "class_embeddings_concat": False, "mid_block_only_cross_attention": None}
DOWNSAMPLE_PADDING = {0: "same", 1: "symmetric"}  # torch padding -> ours (layers.Downsample)


class ConversionError(ValueError):
  pass


def require_files(paths, hint: str) -> None:
  """ConversionError "<path> not found: <hint>" for the first of `paths` that is missing."""
  for path in paths:
    if not os.path.exists(path):
      raise ConversionError(f"{path} not found: {hint}")


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


def _levels(cfg: Mapping[str, Any], attention: str) -> tuple[int, list[int], list[int]]:
  """(ch, ch_mult, levels with attention) from block_out_channels and the block types (a
  block type starting with `attention` has attention; up blocks must mirror down blocks)."""
  boc = list(cfg["block_out_channels"])
  ch = boc[0]
  if any(c % ch for c in boc):
    raise ConversionError(f"block_out_channels {boc} are not multiples of {ch}")
  down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
  attn_levels = [i for i, t in enumerate(down) if t.startswith(attention)]
  if sorted(len(up) - 1 - i for i, t in enumerate(up) if t.startswith(attention)) != attn_levels:
    raise ConversionError(f"attention in down blocks {down} and up blocks {up} do not mirror")
  return ch, [c // ch for c in boc], attn_levels


def _common(cfg: Mapping[str, Any], ch: int, ch_mult: list[int]) -> dict:
  """The fields both diffusers U-Nets describe the same way."""
  size = cfg["sample_size"]
  size = size[0] if isinstance(size, (list, tuple)) else size
  in_ch, out_ch = cfg["in_channels"], cfg["out_channels"]
  inpainting = in_ch == 2 * out_ch + 1  # latents, mask, masked image's latents
  if out_ch not in (in_ch, 2 * in_ch) and not inpainting:
    raise ConversionError(f"out_channels={out_ch} must be in_channels ({in_ch}) or twice it "
                          "(or in_channels = 2 out_channels + 1, an inpainting U-Net)")
  padding = cfg.get("downsample_padding", 1)
  if padding not in DOWNSAMPLE_PADDING:
    raise ConversionError(f"downsample_padding={padding} is not supported (0 or 1)")
  return {"name": "unet", "ch": ch, "ch_mult": tuple(ch_mult),
          "num_res_blocks": cfg["layers_per_block"], "dropout": float(cfg.get("dropout", 0.0)),
          "in_channels": in_ch, "learned_variance": out_ch == 2 * in_ch, "image_size": size,
          **({"output_channels": out_ch} if inpainting else {}),
          "norm_eps": float(cfg.get("norm_eps", 1e-5)),
          "flip_sin_to_cos": bool(cfg.get("flip_sin_to_cos", True)),
          "freq_shift": float(cfg.get("freq_shift", 0)),
          "downsample_padding": DOWNSAMPLE_PADDING[padding]}


def model_config_from_diffusers(cfg: Mapping[str, Any]) -> dict:
  """Our U-Net's fields (`config.model`'s, plus image_size) for a diffusers UNet2DModel or
  UNet2DConditionModel config.json."""
  if cfg.get("_class_name") == "UNet2DConditionModel":
    return conditional_model_config_from_diffusers(cfg)
  check_diffusers_config(cfg, "UNet2DModel", REQUIRED, "the DDPM U-Net")
  ch, ch_mult, attn_levels = _levels(cfg, "Attn")
  out = _common(cfg, ch, ch_mult)
  # channels per head; null: one head over all channels; absent: diffusers' default, 8
  head_dim = cfg["attention_head_dim"] if "attention_head_dim" in cfg else 8
  for i in attn_levels + [len(ch_mult) - 1]:
    if head_dim and (ch * ch_mult[i]) % head_dim:
      raise ConversionError(f"attention_head_dim={head_dim} does not divide the "
                            f"{ch * ch_mult[i]} channels of level {i}")
  return dict(out, attn_resolutions=(), attn_levels=tuple(attn_levels), num_heads=1,
              head_channels=int(head_dim or 0), num_classes=_num_classes(cfg))


def _num_classes(cfg: Mapping[str, Any]) -> int:
  """Our model.num_classes for a UNet2DModel's num_class_embeds: one row fewer, since our
  table's last row is the null label of classifier-free guidance (as export.py writes it)."""
  rows = cfg.get("num_class_embeds")
  if rows is None:
    return 0
  if rows < 2:
    raise ConversionError(f"num_class_embeds={rows}: a label table needs at least two rows "
                          "(classes, then the null label)")
  return int(rows) - 1


def conditional_model_config_from_diffusers(cfg: Mapping[str, Any]) -> dict:
  """Our U-Net's fields for a UNet2DConditionModel (LDM's and Stable Diffusion 1.x/2.x
  layout: SpatialTransformers that cross-attend to `cross_attention_dim` features)."""
  check_diffusers_config(cfg, "UNet2DConditionModel", REQUIRED_CONDITIONAL,
                         "the U-Net's cross-attention layout")
  ch, ch_mult, attn_levels = _levels(cfg, "CrossAttn")
  out = _common(cfg, ch, ch_mult)
  levels = len(ch_mult)
  # diffusers' legacy naming: attention_head_dim is the number of heads when
  # num_attention_heads is not given
  heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
  heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * levels
  if any((ch * ch_mult[i]) % heads[i] for i in range(levels)):
    raise ConversionError(f"attention heads {heads} do not divide the channels "
                          f"{[ch * k for k in ch_mult]}")
  per_head = {ch * ch_mult[i] // heads[i] for i in range(levels)}
  if len(set(heads)) == 1:
    out.update(num_heads=int(heads[0]), head_channels=0)
  elif len(per_head) == 1:
    out.update(num_heads=1, head_channels=int(per_head.pop()))
  else:
    raise ConversionError(f"attention heads {heads} per level are neither one number nor one "
                          "width per head")
  depth = cfg.get("transformer_layers_per_block", 1)
  if isinstance(depth, (list, tuple)):  # one per level (SDXL: 1, 2, 10)
    if len(depth) != levels or not all(isinstance(d, int) for d in depth):
      raise ConversionError(f"transformer_layers_per_block={depth}: one depth per level "
                            f"({levels})")
    depth = int(depth[0]) if len(set(depth)) == 1 else tuple(int(d) for d in depth)
  else:
    depth = int(depth)
  context_dim = cfg.get("cross_attention_dim", 1280)
  if isinstance(context_dim, (list, tuple)):
    if len(set(context_dim)) != 1:
      raise ConversionError(f"cross_attention_dim={context_dim}: one width for all levels")
    context_dim = context_dim[0]
  if not attn_levels:
    raise ConversionError("no CrossAttn blocks: convert a UNet2DModel instead")
  return dict(out, attn_resolutions=(), attn_levels=tuple(attn_levels),
              context_dim=int(context_dim), transformer_depth=depth, **_added_conditioning(cfg),
              **({"time_cond_dim": int(cfg["time_cond_proj_dim"])}
                 if cfg.get("time_cond_proj_dim") else {}))


def _added_conditioning(cfg: Mapping[str, Any]) -> dict:
  """SDXL's micro-conditioning (addition_embed_type "text_time"), or none."""
  kind = cfg.get("addition_embed_type")
  if kind is None:
    return {}
  if kind != "text_time":
    raise ConversionError(f"addition_embed_type={kind!r} is not supported (None, or SDXL's "
                          "'text_time')")
  return {"added_cond_dim": int(cfg["projection_class_embeddings_input_dim"]),
          "added_time_dim": int(cfg["addition_time_embed_dim"])}


def unet_fields(model_cfg: Mapping[str, Any]) -> dict:
  """The keyword arguments of `models.UNet` in a converted model config."""
  return {k: v for k, v in model_cfg.items() if k not in ("name", "image_size")}


def _target(key: str, levels: int) -> tuple[list[str], str]:
  """diffusers key -> (our module path, parameter name in the diffusers module)."""
  mod, leaf = key.rsplit(".", 1)
  fixed = {"conv_in": ["conv_in"], "conv_out": ["conv_out"], "conv_norm_out": ["norm_out"],
           "time_embedding.linear_1": ["temb_dense_0"],
           "time_embedding.linear_2": ["temb_dense_1"],
           "time_embedding.cond_proj": ["temb_cond_proj"],
           "add_embedding.linear_1": ["add_embed_dense_0"],
           "add_embedding.linear_2": ["add_embed_dense_1"],
           "mid_block.resnets.0": ["mid_block_1"], "mid_block.resnets.1": ["mid_block_2"]}
  for prefix, path in fixed.items():
    if mod == prefix:
      return path, leaf
    if mod.startswith(prefix + "."):
      return path + [RESNET_RENAMES[mod[len(prefix) + 1:]]], leaf
  control = {"controlnet_cond_embedding.conv_in": "control_embed_in",
             "controlnet_cond_embedding.conv_out": "control_embed_out",
             "controlnet_mid_block": "control_mid"}  # a ControlNetModel's own modules
  if mod in control:
    return [control[mod]], leaf
  m = re.fullmatch(r"controlnet_(cond_embedding\.blocks|down_blocks)\.(\d+)", mod)
  if m:
    kind = "embed" if m.group(1) != "down_blocks" else "zero"
    return [f"control_{kind}_{m.group(2)}"], leaf
  m = re.fullmatch(r"mid_block\.attentions\.0\.(.+)", mod)
  if m:
    return ["mid_attn"] + _attention_path(m.group(1), key), leaf
  m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)"
                   r"\.(\d+)\.(.+)", mod)
  if not m:
    raise ConversionError(f"unexpected parameter {key!r} in the diffusers checkpoint")
  side, block, kind, j, rest = m.groups()
  level = int(block) if side == "down" else levels - 1 - int(block)
  if kind == "resnets":
    return [f"{side}_{level}_block_{j}", RESNET_RENAMES[rest]], leaf
  if kind == "attentions":
    return [f"{side}_{level}_attn_{j}"] + _attention_path(rest, key), leaf
  return [f"{side}_{level}_{kind[:-len('rs')]}", "conv"], leaf


def _attention_path(rest: str, key: str) -> list[str]:
  """Inside an attention block: a self-attention's module, or a SpatialTransformer's
  (transformer_blocks.K.attn1.to_q -> block_K/attn_1/q)."""
  if rest in ATTN_RENAMES:
    return [ATTN_RENAMES[rest]]
  m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", rest)
  if m:
    k, sub = m.groups()
    if sub in TRANSFORMER_RENAMES:
      return [f"block_{k}", TRANSFORMER_RENAMES[sub]]
    m = re.fullmatch(r"attn([12])\.(to_q|to_k|to_v|to_out\.0)", sub)
    if m:
      return [f"block_{k}", f"attn_{m.group(1)}", ATTN_RENAMES[m.group(2)]]
  raise ConversionError(f"unexpected parameter {key!r} in the diffusers checkpoint")


def put_torch_tensor(params: dict, path: list[str], leaf: str, key: str, value) -> None:
  """Store one torch parameter (`leaf` "weight"/"bias" of module `key`) at `path` of a Flax
  tree: conv OIHW -> HWIO kernel, linear (out, in) -> (in, out), norm weight -> scale. The
  attention projections (q, k, v, proj_out) are Dense in ours, 1x1 convs in some checkpoints."""
  value = np.asarray(value, dtype=np.float32)
  if leaf == "weight" and value.ndim == 4:
    name, value = "kernel", value.transpose(2, 3, 1, 0)
    if path[-1] in ("q", "k", "v", "proj_in", "proj_out") and "attn" in path[-2]:
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
  state = dict(state)
  table = state.pop(LABEL_TABLE, None)
  classes = model_cfg.get("num_classes", 0)
  rows, have = classes + 1 if classes else 0, 0 if table is None else len(table)
  if have != rows:
    raise ConversionError(f"{LABEL_TABLE}: {have or 'absent'} rows, the config.json's "
                          f"num_class_embeds says {rows or 'none'}")
  if table is not None:
    params["label_emb"] = {"embedding": np.asarray(table, np.float32)}
  for key, value in state.items():
    path, leaf = _target(key, levels)
    put_torch_tensor(params, path, leaf, key, value)
  return params


def controlnet_config_from_diffusers(cfg: Mapping[str, Any]) -> dict:
  """models.controlnet.ControlNet's fields for a diffusers ControlNetModel config.json (the
  U-Net layout it copies, and its hint encoder's channels)."""
  if cfg.get("_class_name", "ControlNetModel") != "ControlNetModel":
    raise ConversionError(f"expected a ControlNetModel's config.json, got "
                          f"{cfg.get('_class_name')!r}")
  if cfg.get("controlnet_conditioning_channel_order", "rgb") != "rgb":
    raise ConversionError("controlnet_conditioning_channel_order='bgr' is not supported")
  if cfg.get("conditioning_channels", 3) != 3:
    raise ConversionError(f"conditioning_channels={cfg['conditioning_channels']}: the hint is "
                          "an RGB image (3)")
  if cfg.get("global_pool_conditions"):
    raise ConversionError("global_pool_conditions=True (pooled residuals) is not supported")
  up = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
  down = list(cfg["down_block_types"])
  if any(t not in up for t in down):
    raise ConversionError(f"down_block_types {down}: CrossAttnDownBlock2D or DownBlock2D")
  as_unet = dict(cfg, _class_name="UNet2DConditionModel", out_channels=cfg["in_channels"],
                 up_block_types=[up[t] for t in reversed(down)],
                 sample_size=cfg.get("sample_size") or 64)
  fields = conditional_model_config_from_diffusers(as_unet)
  channels = cfg.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)
  return dict(fields, name="controlnet", embedding_channels=tuple(int(c) for c in channels))


def load_diffusers_controlnet(directory: str) -> tuple[dict, dict]:
  """(ControlNet fields, parameters) from a local diffusers ControlNetModel directory (e.g.
  lllyasviel/sd-controlnet-canny: config.json, diffusion_pytorch_model.safetensors)."""
  return load_model_dir(directory, None, "point at a diffusers ControlNetModel directory "
                        "holding config.json and diffusion_pytorch_model.safetensors",
                        controlnet_config_from_diffusers, unet_params_from_diffusers)


def read_model_dir(directory: str, hint: str,
                   weights_name: str = "diffusion_pytorch_model.safetensors") -> tuple[dict, str]:
  """(its config.json, the path of its weights) of a diffusers model directory (transformers':
  weights_name="model.safetensors"); `hint` says what to point at where either is missing."""
  cfg_path = os.path.join(directory, "config.json")
  weights = os.path.join(directory, weights_name)
  require_files((cfg_path, weights), hint)
  with open(cfg_path) as f:
    return json.load(f), weights


def load_model_dir(directory: str, subfolder: str | None, hint: str, fields_from_config,
                   params_from_state) -> tuple[dict, dict]:
  """(fields, parameters) of a diffusers model directory, or of a pipeline directory's
  `subfolder`: fields_from_config(config.json) checks the layout before the weights are read,
  then params_from_state(safetensors state, fields)."""
  if subfolder and not os.path.exists(os.path.join(directory, "config.json")) and os.path.isdir(
      os.path.join(directory, subfolder)):
    directory = os.path.join(directory, subfolder)  # a whole pipeline directory
  from safetensors.numpy import load_file
  cfg, weights = read_model_dir(directory, hint)
  fields = fields_from_config(cfg)
  return fields, params_from_state(load_file(weights), fields)


def load_diffusers_unet(directory: str) -> tuple[dict, dict]:
  """(our model config fields, parameters) from a local diffusers UNet2DModel or
  UNet2DConditionModel directory (or a pipeline directory with a unet/ folder).

    fields, params = load_diffusers_unet("stable-diffusion-v1-5")
    unet = UNet(**unet_fields(fields))
    eps = unet.apply({"params": params}, z_t, t, context=text_embeddings)  # NHWC latents
  """
  return load_model_dir(directory, "unet", "point at a diffusers U-Net directory holding "
                        "config.json and diffusion_pytorch_model.safetensors (e.g. a local copy "
                        "of google/ddpm-cifar10-32; a .bin file can be re-saved with safetensors)",
                        model_config_from_diffusers, unet_params_from_diffusers)
