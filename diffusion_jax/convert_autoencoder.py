"""Public KL and VQ autoencoder weights -> `models.autoencoder.AutoencoderKL` parameters.

Two namings, both read as safetensors with numpy (no torch):
- diffusers `AutoencoderKL` (a directory with config.json + diffusion_pytorch_model.safetensors,
  or a pipeline directory with vae/): stabilityai/sd-vae-ft-mse, the SD/SDXL/SD3/FLUX VAEs;
  diffusers `VQModel` (or a pipeline's vqvae/): LDM's vq-f4/vq-f8 first stages (e.g. the one
  of CompVis/ldm-celebahq-256), whose codebook `quantize.embedding.weight` becomes `codebook`;
- CompVis `ldm` (`encoder.down.0.block.0.norm1.weight`, ...): the kl-f4/kl-f8 first stages, the
  original sd-vae-ft-mse-840000-ema-pruned file, or a whole LDM/SD checkpoint, whose
  `first_stage_model.` (or `vae.`) part is taken; an autoencoder's own training checkpoint
  also holds `loss.*` (LPIPS, discriminator) and `model_ema.*`, which are left out.
The network's shape (channels, levels, blocks, attention, latent width) is read from the
parameters themselves; diffusers' config.json adds the latent scaling (scaling_factor,
shift_factor) and is checked for what our network hard-codes.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np

from diffusion_jax.convert_diffusers import (ATTN_RENAMES, RESNET_RENAMES, ConversionError,
                                             check_diffusers_config, put_torch_tensor,
                                             read_model_dir)

LDM_PREFIXES = ("first_stage_model.", "vae.")
LDM_RENAMES = {"norm1": "norm_1", "conv1": "conv_1", "norm2": "norm_2", "conv2": "conv_2",
               "nin_shortcut": "nin_shortcut"}
# what our network hard-codes, and the diffusers config values that agree with it
REQUIRED = {"act_fn": "silu", "norm_num_groups": 32}
DIFFUSERS_BLOCKS = {"DownEncoderBlock2D", "AttnDownEncoderBlock2D", "UpDecoderBlock2D",
                    "AttnUpDecoderBlock2D"}


def _diffusers_target(key: str, levels: int) -> tuple[list[str], str]:
  """diffusers AutoencoderKL key -> (our module path, torch leaf name)."""
  mod, leaf = key.rsplit(".", 1)
  if mod in ("quant_conv", "post_quant_conv"):
    return [mod], leaf
  m = re.fullmatch(r"(encoder|decoder)\.(.+)", mod)
  if not m:
    raise ConversionError(f"unexpected parameter {key!r} in the diffusers autoencoder")
  half, rest = m.groups()
  fixed = {"conv_in": "conv_in", "conv_out": "conv_out", "conv_norm_out": "norm_out"}
  if rest in fixed:
    return [half, fixed[rest]], leaf
  m = re.fullmatch(r"mid_block\.resnets\.([01])\.(\w+)", rest)
  if m and m.group(2) in RESNET_RENAMES:
    return [half, f"mid_block_{int(m.group(1)) + 1}", RESNET_RENAMES[m.group(2)]], leaf
  m = re.fullmatch(r"mid_block\.attentions\.0\.(.+)", rest)
  if m and m.group(1) in ATTN_RENAMES:
    return [half, "mid_attn", ATTN_RENAMES[m.group(1)]], leaf
  m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)"
                   r"\.(\d+)\.(.+)", rest)
  allowed = {"resnets": RESNET_RENAMES, "attentions": ATTN_RENAMES, "downsamplers": {"conv": 0},
             "upsamplers": {"conv": 0}}
  if not m or m.group(5) not in allowed[m.group(3)]:
    raise ConversionError(f"unexpected parameter {key!r} in the diffusers autoencoder")
  side, block, kind, j, name = m.groups()
  level = int(block) if side == "down" else levels - 1 - int(block)
  if kind == "resnets":
    return [half, f"{side}_{level}_block_{j}", RESNET_RENAMES[name]], leaf
  if kind == "attentions":
    return [half, f"{side}_{level}_attn_{j}", ATTN_RENAMES[name]], leaf
  return [half, f"{side}_{level}_{kind[:-len('rs')]}", "conv"], leaf


def _ldm_target(key: str) -> tuple[list[str], str]:
  """CompVis ldm key -> (our module path, torch leaf name)."""
  mod, leaf = key.rsplit(".", 1)
  if mod in ("quant_conv", "post_quant_conv"):
    return [mod], leaf
  m = re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out|norm_out)", mod)
  if m:
    return [m.group(1), m.group(2)], leaf
  m = re.fullmatch(r"(encoder|decoder)\.mid\.(block_[12])\.(\w+)", mod)
  if m and m.group(3) in LDM_RENAMES:
    return [m.group(1), f"mid_{m.group(2)}", LDM_RENAMES[m.group(3)]], leaf
  m = re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)", mod)
  if m:
    return [m.group(1), "mid_attn", m.group(2)], leaf
  m = re.fullmatch(r"(encoder|decoder)\.(down|up)\.(\d+)\.(block|attn)\.(\d+)\.(\w+)", mod)
  if m:
    half, side, level, kind, j, name = m.groups()
    renames = LDM_RENAMES if kind == "block" else {n: n for n in ("norm", "q", "k", "v",
                                                                  "proj_out")}
    if name in renames:
      return [half, f"{side}_{level}_{kind}_{j}", renames[name]], leaf
  m = re.fullmatch(r"(encoder|decoder)\.(down|up)\.(\d+)\.(downsample|upsample)\.conv", mod)
  if m:
    return [m.group(1), f"{m.group(2)}_{m.group(3)}_{m.group(4)}", "conv"], leaf
  raise ConversionError(f"unexpected parameter {key!r} in the ldm autoencoder")


def autoencoder_state(state: Mapping[str, Any]) -> tuple[dict, str]:
  """The autoencoder's own entries of a state dict, and their naming ("diffusers" or "ldm")."""
  keys = list(state)
  for prefix in LDM_PREFIXES:
    if any(k.startswith(prefix) for k in keys):
      state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
      break
  # an autoencoder's training checkpoint: LPIPS and discriminator; EMA bookkeeping
  state = {k: v for k, v in state.items() if not k.startswith(("loss.", "model_ema."))}
  vq = {k for k in state if k.startswith("quantize.")}
  if vq - {"quantize.embedding.weight"}:
    raise ConversionError(f"VQ parameters {sorted(vq)}: only a plain codebook "
                          "(quantize.embedding.weight) is supported, no remapping")
  if not any(k.startswith(("encoder.", "decoder.")) for k in state):
    raise ConversionError("no autoencoder parameters (encoder.*/decoder.*, or under "
                          f"{' / '.join(LDM_PREFIXES)}) in this file")
  naming = "diffusers" if any(".down_blocks." in k or ".mid_block." in k for k in state) else (
      "ldm")
  return state, naming


def autoencoder_params(state: Mapping[str, Any]) -> dict:
  """Flax parameter tree of `AutoencoderKL` from a state dict in either naming."""
  state, naming = autoencoder_state(state)
  levels = 1 + max([int(m.group(1)) for k in state
                    if (m := re.match(r"encoder\.down(?:_blocks)?\.(\d+)\.", k))], default=0)
  params: dict = {}
  for key, value in state.items():
    if key == "quantize.embedding.weight":  # [codebook_size, embed_dim], as it is
      params["codebook"] = np.asarray(value, np.float32)
      continue
    path, leaf = (_diffusers_target(key, levels) if naming == "diffusers" else _ldm_target(key))
    put_torch_tensor(params, path, leaf, key, value)
  return params


def autoencoder_config_from_params(params: Mapping[str, Any]) -> dict:
  """`AutoencoderKL` fields that describe this parameter tree (read from its shapes)."""
  if "encoder" not in params or "decoder" not in params:
    raise ConversionError("the file holds only part of an autoencoder (needs both encoder.* "
                          "and decoder.*)")
  enc, dec = params["encoder"], params["decoder"]
  try:
    ch = enc["conv_in"]["kernel"].shape[-1]
    levels = 1 + max(int(k.split("_")[1]) for k in enc if k.startswith("down_"))
    ch_mult = tuple(enc[f"down_{i}_block_0"]["conv_1"]["kernel"].shape[-1] // ch
                    for i in range(levels))
    num_res_blocks = sum(1 for k in enc if re.fullmatch(r"down_0_block_\d+", k))
    attn_levels = tuple(i for i in range(levels) if f"down_{i}_attn_0" in enc)
    z2 = enc["conv_out"]["kernel"].shape[-1]
  except (KeyError, ValueError) as e:
    raise ConversionError(f"the encoder lacks a parameter of the kl autoencoder layout ({e})")
  vq = "codebook" in params
  moments = 1 if vq else 2  # KL: mean and log-variance
  if z2 % moments:
    raise ConversionError(f"the encoder's output has {z2} channels: not a KL autoencoder's mean "
                          "and log-variance (and no VQ codebook)")
  dec_attn = tuple(i for i in range(levels) if f"up_{i}_attn_0" in dec)
  if dec_attn != attn_levels or ("mid_attn" in dec) != ("mid_attn" in enc):
    raise ConversionError(f"attention at levels {attn_levels} of the encoder but {dec_attn} of "
                          "the decoder (or in one middle block only): our network puts it in "
                          "the same places in both halves")
  quant = "quant_conv" in params
  post = "post_quant_conv" in params
  embed = (params["quant_conv"]["kernel"].shape[-1] if quant else z2) // moments
  return {"codebook_size": params["codebook"].shape[0] if vq else 0, "ch": ch,
          "ch_mult": ch_mult, "num_res_blocks": num_res_blocks,
          "attn_levels": attn_levels, "mid_attn": "mid_attn" in enc,
          "in_channels": enc["conv_in"]["kernel"].shape[-2],
          "out_channels": dec["conv_out"]["kernel"].shape[-1], "z_channels": z2 // moments,
          "embed_dim": embed, "use_quant_conv": quant, "use_post_quant_conv": post}


def autoencoder_from_state(state: Mapping[str, Any]) -> tuple[dict, dict]:
  """(AutoencoderKL fields, parameters) of a state dict in either naming, every parameter
  checked against the network its shapes describe."""
  params = autoencoder_params(state)
  config = autoencoder_config_from_params(params)
  check_params(config, params)
  return config, params


def latent_scaling_from_diffusers(cfg: Mapping[str, Any]) -> dict:
  """Refuse what our network cannot be; return the latent scaling the config records (a
  VQModel without one: 1, as LDM diffuses VQ latents unscaled; diffusers' LDMPipeline divides
  by the scaling_factor its config.json holds)."""
  if cfg.get("_class_name") == "VQModel":
    check_diffusers_config(cfg, "VQModel", dict(REQUIRED, norm_type="group",
                                                lookup_from_codebook=False), "the VQ autoencoder")
  else:
    check_diffusers_config(cfg, "AutoencoderKL", REQUIRED, "the KL autoencoder")
  blocks = set(cfg.get("down_block_types", ())) | set(cfg.get("up_block_types", ()))
  if blocks - DIFFUSERS_BLOCKS:
    raise ConversionError(f"block types {sorted(blocks - DIFFUSERS_BLOCKS)} are not supported")
  if cfg.get("_class_name") == "VQModel":
    return {"scale_factor": float(cfg.get("scaling_factor") or 1.0), "shift_factor": 0.0}
  return {"scale_factor": float(cfg.get("scaling_factor") or 0.18215),
          "shift_factor": float(cfg.get("shift_factor") or 0.0)}


def check_params(config: Mapping[str, Any], params: Mapping[str, Any]) -> None:
  """Every parameter of `AutoencoderKL(**config)` present with its shape, and nothing else."""
  import jax
  import jax.numpy as jnp
  from flax import traverse_util

  from diffusion_jax.convert_inception import shape_problems
  from diffusion_jax.models.autoencoder import AutoencoderKL
  f = 2 ** (len(config["ch_mult"]) - 1)
  x = jnp.zeros((1, f, f, config["in_channels"]))
  want = jax.eval_shape(lambda: AutoencoderKL(**config).init(jax.random.PRNGKey(0), x))
  want = {k: v.shape for k, v in traverse_util.flatten_dict(want["params"], sep="/").items()}
  got = {k: v.shape for k, v in traverse_util.flatten_dict(params, sep="/").items()}
  problems = shape_problems(want, got, sorted(k for k in got if k not in want))
  if problems:
    raise ConversionError("the weights do not form one autoencoder (names in our layout): "
                          + "; ".join(problems))


def _read_safetensors(path: str) -> dict:
  """name -> array; bfloat16 files (which safetensors' numpy reader refuses) via its flax one."""
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  try:
    return dict(load_file(path))
  except (SafetensorError, OSError, ValueError, KeyError) as e:
    try:
      from safetensors.flax import load_file as load_jax
      return {k: np.asarray(v, np.float32) for k, v in load_jax(path).items()}
    except Exception:  # noqa: BLE001 -- report the first reader's error
      raise ConversionError(f"cannot read {path}: {e!r}; is it a complete safetensors "
                            "file?") from e


def load_autoencoder(src: str) -> tuple[dict, dict, dict]:
  """(AutoencoderKL fields, parameters, latent scaling) from a diffusers directory or one
  .safetensors file (either naming), every parameter checked against the network.

  The scaling is {"scale_factor", "shift_factor"} from diffusers' config.json; a single file
  records none: scale_factor is then None (take the model's published one, e.g. 0.18215 for
  SD 1.x, 0.13025 for SDXL, or 1 / std of its latents on your data, as LDM does)."""
  scaling = {"scale_factor": None, "shift_factor": 0.0}
  if os.path.isdir(src):
    vae_dir = next((os.path.join(src, sub) for sub in ("vae", "vqvae")
                    if os.path.isdir(os.path.join(src, sub))), src)
    diffusers_cfg, weights = read_model_dir(
        vae_dir, "point at a diffusers AutoencoderKL or VQModel directory (config.json + "
        "diffusion_pytorch_model.safetensors) or at one .safetensors file")
    scaling = latent_scaling_from_diffusers(diffusers_cfg)
  elif src.endswith(".safetensors") and os.path.isfile(src):
    weights, diffusers_cfg = src, {}
  else:
    raise ConversionError(
        f"{src!r} is neither a diffusers directory nor a .safetensors file. A .ckpt can be "
        "re-saved once with torch: sd = torch.load(p, map_location='cpu', weights_only=True); "
        "sd = sd.get('state_dict', sd); safetensors.torch.save_file({k: v.contiguous() for k, "
        "v in sd.items() if hasattr(v, 'contiguous')}, 'model.safetensors')")
  config, params = autoencoder_from_state(_read_safetensors(weights))
  said = {"block_out_channels": [config["ch"] * k for k in config["ch_mult"]],
          "layers_per_block": config["num_res_blocks"], "latent_channels": config["z_channels"]}
  if config["codebook_size"]:
    said["num_vq_embeddings"] = config["codebook_size"]
  for key, value in said.items():
    if key in diffusers_cfg and list(np.atleast_1d(diffusers_cfg[key])) != list(
        np.atleast_1d(value)):
      raise ConversionError(f"config.json says {key}={diffusers_cfg[key]} but the weights "
                            f"have {value}: the directory mixes two models")
  return config, params, scaling
