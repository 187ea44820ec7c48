"""Export a trained workdir as a diffusers pipeline directory (the reverse of convert.py):

  python -m diffusion_jax.export --config=configs/cifar10_ddpm.py --workdir=runs/cifar10 \
      --out=exported/ddpm-cifar10
  # then, in PyTorch: diffusers.DDPMPipeline.from_pretrained("exported/ddpm-cifar10")

What is written (safetensors and JSON only; the EMA parameters, or --noema the raw ones):
- a pixel-space DDPM U-Net: unet/ (UNet2DModel) + scheduler/ (DDPMScheduler) + model_index.json
  of a DDPMPipeline (a class-conditional one: no model_index.json, since DDPMPipeline passes no
  labels; its label table is the UNet2DModel's class_embedding, the null label last);
- a latent U-Net (no cross-attention) on a VQ first stage (LDM's, e.g. configs/celebahq256_ldm.py):
  unet/ + scheduler/ (DDIMScheduler) + vqvae/ (VQModel, scaling_factor the run's latent scale) +
  model_index.json of an LDMPipeline, as CompVis/ldm-celebahq-256 is laid out; on a KL first
  stage: unet/ + scheduler/ (DDPMScheduler) + vae/ (AutoencoderKL), no model_index.json (no
  diffusers pipeline pairs a UNet2DModel with an AutoencoderKL); class-conditional or with a
  learned variance: the parts, no model_index.json (LDMPipeline passes no labels and takes eps
  alone);
- a DiT: transformer/ (DiTTransformer2DModel) + scheduler/ (DDIMScheduler) + vae/ (its KL first
  stage, a diffusers VAE's or one trained here, scaling_factor the run's latent scale) +
  model_index.json of a DiTPipeline;
- a text-conditional (cross-attention) U-Net on a frozen CLIP text encoder, e.g. a Stable
  Diffusion fine-tune (configs/sd15_finetune.py): a StableDiffusionPipeline (export_text.py);
- an autoencoder run (stage "autoencoder"): its AutoencoderKL (VQ: VQModel) directory.

The diffusers names come from the import's own mappings (convert_diffusers, convert_autoencoder)
run backwards, each key checked to map back to its parameter. Refused, with a message: what
diffusers cannot describe (heads of several widths in a UNet2DModel, class labels as a
cross-attention context, LDM's learned text transformer) and parameters that are not finite.
"""
from __future__ import annotations

import json
import os
import re
import sys
from typing import Any, Mapping

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from diffusion_jax.convert_diffusers import (DOWNSAMPLE_PADDING, LABEL_TABLE, RESNET_RENAMES,
                                             ConversionError, _target)
from diffusion_jax.schedulers import BETA_SCHEDULES, PREDICTION_TYPES

FLAGS = flags.FLAGS
DIFFUSERS_VERSION = "0.30.0"  # the config format written; read by 0.30 and later
_FIXED = {"conv_in": "conv_in", "conv_out": "conv_out", "norm_out": "conv_norm_out",
          "temb_dense_0": "time_embedding.linear_1", "temb_dense_1": "time_embedding.linear_2",
          "mid_block_1": "mid_block.resnets.0", "mid_block_2": "mid_block.resnets.1",
          "mid_attn": "mid_block.attentions.0"}
_INNER = {**{ours: theirs for theirs, ours in RESNET_RENAMES.items()},
          **{"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
             "proj_out": "to_out.0"}}


def _module_name(path: tuple[str, ...], levels: int) -> str:
  """Our module path (without the parameter's name) -> diffusers' module name."""
  top, inner = path[0], list(path[1:])
  if top in _FIXED:
    head = _FIXED[top]
  else:
    m = re.fullmatch(r"(down|up)_(\d+)_(block|attn|downsample|upsample)(?:_(\d+))?", top)
    if not m:
      raise ConversionError(f"{'/'.join(path)}: no UNet2DModel module holds it")
    side, level, kind, j = m.groups()
    block = int(level) if side == "down" else levels - 1 - int(level)
    if kind in ("downsample", "upsample"):
      return f"{side}_blocks.{block}.{kind}rs.0.conv"
    head = f"{side}_blocks.{block}.{'resnets' if kind == 'block' else 'attentions'}.{j}"
  return ".".join([head] + [_INNER[p] for p in inner])


def _state_dict(params: Mapping[str, Any], name, target) -> dict:
  """A torch state dict (numpy, float32) of `params`: each module path through name(path), each
  key checked to come back to its path through the import's target(key)."""
  state = {}

  def visit(node, path):
    if not isinstance(node, Mapping):
      leaf, value = path[-1], np.asarray(node, np.float32)
      if leaf == "kernel":
        value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
      key = f"{name(path[:-1])}.{'bias' if leaf == 'bias' else 'weight'}"
      if target(key) != list(path[:-1]):
        raise ConversionError(f"{'/'.join(path)} -> {key} does not map back")
      state[key] = np.ascontiguousarray(value)
      return
    for k, v in node.items():
      visit(v, path + (k,))
  visit(params, ())
  return state


def unet_state_dict(params: Mapping[str, Any], levels: int) -> dict:
  """diffusers' UNet2DModel state dict of our DDPM-layout U-Net's parameters (a class-conditional
  one's label table as its class_embedding: both add the label's row to the time embedding)."""
  params = dict(params)
  labels = params.pop("label_emb", None)
  state = _state_dict(params, lambda path: _module_name(path, levels),
                      lambda key: _target(key, levels)[0])
  if labels is not None:
    state[LABEL_TABLE] = np.ascontiguousarray(labels["embedding"], np.float32)
  return state


def autoencoder_state_dict(params: Mapping[str, Any], levels: int) -> dict:
  """diffusers' AutoencoderKL (or, with a codebook, VQModel) state dict of our autoencoder's
  parameters (its encoder and decoder name their modules as the U-Net does)."""
  from diffusion_jax.convert_autoencoder import _diffusers_target
  params = dict(params)
  codebook = params.pop("codebook", None)
  if codebook is not None and not {"quant_conv", "post_quant_conv"} <= set(params):
    raise ConversionError("a VQ autoencoder without quant_conv and post_quant_conv: diffusers' "
                          "VQModel always has both")
  name = lambda path: path[0] if path[0] in ("quant_conv", "post_quant_conv") else (
      f"{path[0]}.{_module_name(path[1:], levels)}")
  state = _state_dict(params, name, lambda key: _diffusers_target(key, levels)[0])
  if codebook is not None:  # [codebook_size, embed_dim] in both
    state["quantize.embedding.weight"] = np.ascontiguousarray(codebook, np.float32)
  return state


def autoencoder_config(model, sample_size: int, scale: float, shift: float = 0.0) -> dict:
  """The config.json of the diffusers AutoencoderKL (a VQ model: VQModel) that our `model` is."""
  levels = len(model.ch_mult)
  attn = set(model.attn_levels)
  common = {"_diffusers_version": DIFFUSERS_VERSION,
            "in_channels": model.in_channels, "out_channels": model.out_channels,
            "down_block_types": ["AttnDownEncoderBlock2D" if i in attn else "DownEncoderBlock2D"
                                 for i in range(levels)],
            "up_block_types": ["AttnUpDecoderBlock2D" if i in attn else "UpDecoderBlock2D"
                               for i in reversed(range(levels))],
            "block_out_channels": [model.ch * k for k in model.ch_mult],
            "layers_per_block": model.num_res_blocks, "act_fn": "silu",
            "latent_channels": model.z_channels, "norm_num_groups": 32,
            "sample_size": sample_size, "scaling_factor": scale,
            "mid_block_add_attention": bool(model.mid_attn)}
  if model.codebook_size:
    if shift:
      raise ConversionError(f"latent shift {shift}: diffusers' VQModel and LDMPipeline only "
                            "divide by a scaling_factor")
    return {"_class_name": "VQModel", **common, "num_vq_embeddings": model.codebook_size,
            "vq_embed_dim": model.embed_dim, "norm_type": "group",
            "lookup_from_codebook": False, "force_upcast": False}
  if model.z_channels != model.embed_dim:
    raise ConversionError(f"z_channels {model.z_channels} != embed_dim {model.embed_dim}: "
                          "diffusers' AutoencoderKL has one latent width")
  return {"_class_name": "AutoencoderKL", **common, "shift_factor": shift or None,
          "use_quant_conv": bool(model.use_quant_conv),
          "use_post_quant_conv": bool(model.use_post_quant_conv)}


def unet_config(config) -> dict:
  """The config.json of the UNet2DModel that `config.model` describes (a cross-attention one:
  the UNet2DConditionModel, export_text)."""
  from diffusion_jax.latent import model_input_shape
  from diffusion_jax.models import LAYOUT
  m = config.model
  get = lambda key: m.get(key, LAYOUT[key])
  size, channels = model_input_shape(config)
  levels = len(m.ch_mult)
  attn = set(get("attn_levels")) or {i for i in range(levels)
                                     if size // 2 ** i in m.attn_resolutions}
  if get("context_dim"):  # cross-attention: a Stable Diffusion U-Net
    from diffusion_jax.export_text import conditional_unet_config
    return conditional_unet_config(config, attn)
  heads = {m.ch * m.ch_mult[i] // get("num_heads") for i in sorted(attn | {levels - 1})}
  if get("head_channels"):
    head_dim = get("head_channels")
  elif get("num_heads") == 1:
    head_dim = None  # one head over all channels
  elif len(heads) == 1:
    head_dim = heads.pop()
  else:
    raise ConversionError(f"model.num_heads={get('num_heads')} gives heads of {sorted(heads)} "
                          "channels; UNet2DModel has one head size (model.head_channels)")
  out = channels * (2 if config.diffusion.var_type.startswith("learned") else 1)
  return {"_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION,
          "sample_size": size, "in_channels": channels, "out_channels": out,
          "block_out_channels": [m.ch * k for k in m.ch_mult],
          "layers_per_block": m.num_res_blocks,
          "down_block_types": ["AttnDownBlock2D" if i in attn else "DownBlock2D"
                               for i in range(levels)],
          "up_block_types": ["AttnUpBlock2D" if i in attn else "UpBlock2D"
                             for i in reversed(range(levels))],
          "attention_head_dim": head_dim, "dropout": float(m.dropout),
          "norm_eps": float(get("norm_eps")), "flip_sin_to_cos": bool(get("flip_sin_to_cos")),
          "freq_shift": float(get("freq_shift")),
          "downsample_padding": {v: k for k, v in DOWNSAMPLE_PADDING.items()}[
              get("downsample_padding")],
          "act_fn": "silu", "norm_num_groups": 32, "time_embedding_type": "positional",
          "resnet_time_scale_shift": "default", "center_input_sample": False,
          "add_attention": True, "mid_block_scale_factor": 1,
          # the label table: num_classes + 1 rows, the null label (guidance's) last
          "num_class_embeds": m.num_classes + 1 if m.num_classes else None}


def dit_config(config) -> dict:
  """The config.json of the DiTTransformer2DModel that `config.model` (a DiT) describes."""
  from diffusion_jax.latent import model_input_shape
  m = config.model
  if m.num_classes == 0 or m.mlp_ratio != 4.0 or m.freq_shift != 1.0:
    raise ConversionError("diffusers' DiT is class-conditional (model.num_classes > 0) with "
                          "model.mlp_ratio 4 and model.freq_shift 1; this DiT is not")
  size, channels = model_input_shape(config)
  learned = config.diffusion.var_type.startswith("learned")
  return {"_class_name": "DiTTransformer2DModel", "_diffusers_version": DIFFUSERS_VERSION,
          "num_attention_heads": m.num_heads, "attention_head_dim": m.hidden_size // m.num_heads,
          "in_channels": channels, "out_channels": channels * (2 if learned else 1),
          "num_layers": m.depth, "sample_size": size, "patch_size": m.patch_size,
          "num_embeds_ada_norm": m.num_classes, "norm_eps": float(m.norm_eps),
          "norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate",
          "attention_bias": True, "norm_elementwise_affine": False, "dropout": 0.0}


def scheduler_config(config, ddim: bool = False) -> dict:
  """A DDPMScheduler (or DDIMScheduler) config.json of `config.diffusion` and its sampler's
  clipping. diffusers' DiTPipeline gives its scheduler eps alone (a learned variance split
  off), as DDPMScheduler's learned range cannot take: DiTs get DDIM, as diffusers' DiT
  conversion writes it."""
  d = config.diffusion
  schedules = {ours: theirs for theirs, ours in BETA_SCHEDULES.items()}
  schedules["quadratic"] = "scaled_linear"  # the same betas
  predictions = {ours: theirs for theirs, ours in PREDICTION_TYPES.items()}
  if d.mean_type not in predictions:
    raise ConversionError(f"diffusion.mean_type={d.mean_type!r}: diffusers' schedulers take "
                          f"one of {tuple(predictions)}")
  variance = {"fixedlarge": "fixed_large", "fixedsmall": "fixed_small", "learned": "learned",
              "learned_range": "learned_range"}[d.var_type]
  out = {"_class_name": "DDIMScheduler" if ddim else "DDPMScheduler",
         "_diffusers_version": DIFFUSERS_VERSION, "num_train_timesteps": int(d.num_timesteps),
         "beta_schedule": schedules[d.beta_schedule], "beta_start": float(d.beta_start),
         "beta_end": float(d.beta_end), "prediction_type": predictions[d.mean_type],
         "clip_sample": bool(config.sampling.clip_denoised), "clip_sample_range": 1.0,
         "timestep_spacing": "leading", "steps_offset": 0}
  if not ddim:
    return dict(out, variance_type=variance)
  s = config.sampling  # DDIM's own settings, as the run samples with them (SD's: 1, False)
  return dict(out, steps_offset=int(s.get("steps_offset", 0)),
              set_alpha_to_one=bool(s.get("alpha_one_at_end", True)))


def _write_model(directory: str, cfg: dict, state: dict) -> None:
  from safetensors.numpy import save_file
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2)
  save_file(state, os.path.join(directory, "diffusion_pytorch_model.safetensors"))


def _finite(params, step: int):
  """`params` on the host, refused if a value is not finite (a diverged run is not written)."""
  import jax
  from diffusion_jax import parallel
  params = jax.tree.map(parallel.to_host, params)
  bad = [jax.tree_util.keystr(path) for path, v in jax.tree_util.tree_leaves_with_path(params)
         if not np.isfinite(v).all()]
  if bad:
    raise ConversionError(f"step {step} has non-finite parameters ({len(bad)} arrays, e.g. "
                          f"{bad[0]}): export an earlier checkpoint with --step")
  return params


def export_workdir(config, workdir: str, out: str, step: int | None = None,
                   ema: bool = True) -> str:
  """Write `out` (a new directory): the diffusers pipeline of the workdir's checkpoint (an
  autoencoder run's: its AutoencoderKL directory)."""
  from diffusion_jax import checkpoints
  from diffusion_jax.convert_dit import dit_state_dict
  if os.path.exists(out) and os.listdir(out):
    raise ConversionError(f"{out} exists and is not empty: export into a new directory")
  if config.get("stage", "diffusion") == "autoencoder":
    from diffusion_jax.train_autoencoder import restore_autoencoder
    trainer, step, params = restore_autoencoder(config, workdir, step)
    scale = config.get("latent", {}).get("scale_factor") or 1.0
    kind = _write_vae(out, trainer.model, _finite(params, step), config.data.image_size,
                      scale)
    print(f"Exported step {step} of {workdir} as a diffusers {kind}: {out} "
          f"(scaling_factor {scale}: the latent diffusion run's is in its own config)")
    return out
  dit = config.model.name == "dit"
  model_cfg = dit_config(config) if dit else unet_config(config)
  scheduler_config(config)  # refusals before anything is read
  from diffusion_jax.train import Trainer
  trainer = Trainer(config)
  fs = trainer.first_stage
  vq = fs is not None and bool(fs.model.codebook_size)
  # LDMPipeline: unconditional, eps alone out of the U-Net, DDIM (as CompVis/ldm-celebahq-256)
  ldm = vq and not dit and not config.model.num_classes and not (
      config.diffusion.var_type.startswith("learned"))
  text = model_cfg["_class_name"] == "UNet2DConditionModel"  # Stable Diffusion's layout
  if text and (fs is None or vq or config.diffusion.var_type.startswith("learned")):
    raise ConversionError("a text-conditional U-Net is exported as a StableDiffusionPipeline, "
                          "which needs a KL first stage (latent.autoencoder) and a fixed "
                          "variance (its schedulers take eps alone)")
  scheduler = scheduler_config(config, ddim=dit or ldm or text)
  step, state, meta = checkpoints.restore_trained(
      workdir, trainer.abstract_state, step, "train first (--mode=train with this --workdir)")
  trainer.use_latent_scale(meta)
  params = _finite(state.ema_params if ema else state.params, step)
  if dit:
    m = config.model
    _write_model(os.path.join(out, "transformer"), model_cfg,
                 dit_state_dict(params, {"hidden_size": m.hidden_size, "depth": m.depth}))
    index = {"transformer": ["diffusers", "DiTTransformer2DModel"]}
  elif text:
    from diffusion_jax.export_text import conditional_unet_state_dict
    _write_model(os.path.join(out, "unet"), model_cfg, conditional_unet_state_dict(
        params, len(config.model.ch_mult), model_cfg["use_linear_projection"]))
    index = {"unet": ["diffusers", "UNet2DConditionModel"]}
  else:
    _write_model(os.path.join(out, "unet"), model_cfg,
                 unet_state_dict(params, len(config.model.ch_mult)))
    index = {"unet": ["diffusers", "UNet2DModel"]}
  os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
  with open(os.path.join(out, "scheduler", "scheduler_config.json"), "w") as f:
    json.dump(scheduler, f, indent=2)
  index["scheduler"] = ["diffusers", scheduler["_class_name"]]
  if fs is not None:  # the first stage with the run's latent scale
    sub = "vqvae" if vq else "vae"
    kind = _write_vae(os.path.join(out, sub), fs.model, _finite(fs.params, step),
                      config.data.image_size, *fs.scaling())
    index[sub] = ["diffusers", kind]
  if text:  # its frozen CLIP text encoder and tokenizer as they were
    from diffusion_jax.export_text import copy_text_encoder, text_encoder_directory
    index.update(copy_text_encoder(text_encoder_directory(config), out))
    index["requires_safety_checker"] = False
    pipeline = "StableDiffusionPipeline"
  elif ldm:
    pipeline = "LDMPipeline"
  elif dit and not vq:
    pipeline = "DiTPipeline"
  elif fs is None and not config.model.num_classes:
    pipeline = "DDPMPipeline"
  else:  # no diffusers pipeline takes these parts together: they are written for a user's loop
    pipeline = None
  if pipeline:
    with open(os.path.join(out, "model_index.json"), "w") as f:
      json.dump({"_class_name": pipeline, "_diffusers_version": DIFFUSERS_VERSION, **index}, f,
                indent=2)
  else:
    pipeline = "parts no pipeline takes together: " + ", ".join(
        f"{sub}/ {cls}" for sub, (_, cls) in index.items())
    if config.model.num_classes:
      pipeline += f" (class_labels; label {config.model.num_classes} is the null one)"
  print(f"Exported step {step} ({'EMA' if ema else 'raw'} parameters) of {workdir} as "
        f"diffusers' {pipeline}: {out}")
  return out


def _write_vae(directory: str, model, params, image_size: int, scale: float,
               shift: float = 0.0) -> str:
  """Write the first stage's diffusers directory; return its class (AutoencoderKL, VQModel)."""
  cfg = autoencoder_config(model, image_size, scale, shift)
  _write_model(directory, cfg, autoencoder_state_dict(params, len(model.ch_mult)))
  return cfg["_class_name"]


def main(argv):
  del argv
  from diffusion_jax import checkpoints
  try:
    export_workdir(FLAGS.config, FLAGS.workdir, FLAGS.out, FLAGS.step, FLAGS.ema)
  except (ConversionError, checkpoints.CheckpointError) as e:
    sys.exit(f"{type(e).__name__}: {e}")


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "The experiment config of the workdir.")
  flags.DEFINE_string("workdir", None, "The trained run's workdir.")
  flags.DEFINE_string("out", None, "New directory for the diffusers pipeline.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
  flags.DEFINE_bool("ema", True, "The EMA parameters (--noema: the raw ones).")
  flags.mark_flags_as_required(["config", "workdir", "out"])
  app.run(main)
