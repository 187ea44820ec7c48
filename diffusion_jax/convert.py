"""Import public weights: a diffusers UNet2DModel directory -> an Orbax checkpoint in a workdir.

  python -m diffusion_jax.convert --src=/path/to/ddpm-cifar10-32 \
      --config=configs/cifar10_ddpm.py --workdir=runs/ddpm-cifar10-imported
  python main.py --config=configs/cifar10_ddpm.py --workdir=runs/ddpm-cifar10-imported --mode=sample

No network: --src is a local directory with config.json and diffusion_pytorch_model.safetensors
(for a whole pipeline directory, its unet/ subfolder is used, and its scheduler/ config is
checked against config.diffusion). The imported weights become both the parameters and the
EMA parameters of step 0, so sample/eval use them as they are and train fine-tunes from them.

Stable Diffusion 1.x/2.x pipelines, to fine-tune on captioned images (configs/sd15_finetune.py):
the config's text.encoder and latent.autoencoder name the pipeline and its vae/.

Latent models (LDM's unconditional pipelines, e.g. CompVis/ldm-celebahq-256): the config's
latent.autoencoder names the first stage (that pipeline's vqvae/):
  python -m diffusion_jax.convert --src=/path/to/ldm-celebahq-256 \
      --config=configs/celebahq256_ldm.py --workdir=runs/ldm-celebahq-imported \
      --config.latent.autoencoder=/path/to/ldm-celebahq-256/vqvae
LDM's class-conditional checkpoints (one .safetensors file in CompVis' naming: U-Net,
ClassEmbedder, first stage) the same way, latent.autoencoder the same file:
  python -m diffusion_jax.convert --src=cin256-v2.safetensors \
      --config=configs/imagenet256_ldm.py --workdir=runs/cin256-imported \
      --config.latent.autoencoder=cin256-v2.safetensors
DiT pipelines (facebook/DiT-XL-2-256's layout: transformer/, vae/, scheduler/; convert_dit)
into a DiT config, latent.autoencoder its vae/:
  python -m diffusion_jax.convert --src=/path/to/DiT-XL-2-256 \
      --config=configs/imagenet256_dit.py --workdir=runs/dit-xl-2-256 \
      --config.latent.autoencoder=/path/to/DiT-XL-2-256/vae
The paper's own DiT checkpoints (facebookresearch/DiT's DiT-XL-2-256x256.pt, re-saved once as
.safetensors with torch) with the paper's constants and its VAE:
  python -m diffusion_jax.convert --src=DiT-XL-2-256x256.safetensors \
      --config=configs/imagenet256_dit.py --workdir=runs/dit-xl-2-256-paper \
      --config.model.freq_shift=0 --config.model.norm_eps=1e-6 \
      --config.latent.autoencoder=/path/to/sd-vae-ft-ema
"""
from __future__ import annotations

import os
import sys

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from diffusion_jax import checkpoints
from diffusion_jax.convert_diffusers import ConversionError, load_diffusers_unet
from diffusion_jax.convert_dit import is_dit_dir, load_diffusers_dit
from diffusion_jax.schedulers import scheduler_settings_file

FLAGS = flags.FLAGS


def config_mismatches(config, model_cfg: dict, schedule: dict | None = None) -> list[str]:
  """`--config.*` overrides that make `config` describe the imported network (and the
  diffusion of its pipeline's scheduler_config.json, when given)."""
  from diffusion_jax.latent import latent_shape, model_input_shape
  want = {f"model.{k}": v for k, v in model_cfg.items() if k in config.model
          and k not in ("dropout", "attn_resolutions", "attn_levels")}
  out = []
  size, channels = model_input_shape(config)
  m = config.model
  if "ch_mult" in model_cfg and m.name == "unet":
    levels = len(model_cfg["ch_mult"])
    ours = tuple(m.attn_levels) or tuple(i for i in range(len(m.ch_mult))
                                         if size // 2 ** i in m.attn_resolutions)
    theirs = tuple(model_cfg["attn_levels"]) or tuple(
        i for i in range(levels)
        if model_cfg["image_size"] // 2 ** i in model_cfg["attn_resolutions"])
    if ours != theirs:  # where attention is, however the config says it
      out.append(f"--config.model.attn_resolutions=() --config.model.attn_levels={theirs!r}"
                 .replace(", ", ","))
  if latent_shape(config) is None:
    want.update({"data.image_size": model_cfg["image_size"],
                 "data.channels": model_cfg["in_channels"]})
  elif (size, channels) != (model_cfg["image_size"], model_cfg["in_channels"]):
    u_size, u_ch = model_cfg["image_size"], model_cfg["in_channels"]
    if size != u_size:
      out.append(f"--config.data.image_size={u_size * config.data.image_size // size}")
    if channels != u_ch:
      out.append(f"--config.autoencoder.z_channels={u_ch}")
    out[-1] += (f" (the U-Net takes {u_size}x{u_size}x{u_ch} latents; the first stage gives "
                f"{size}x{size}x{channels})")
  for key, value in want.items():
    section, name = key.split(".")
    have = config[section][name]
    if (tuple(have) if isinstance(value, tuple) else have) != value:
      out.append(f"--config.{key}={value!r}".replace(" ", ""))
  compare = {"diffusion.num_timesteps": "num_timesteps",
             "diffusion.beta_schedule": "beta_schedule", "diffusion.beta_start": "beta_start",
             "diffusion.beta_end": "beta_end", "diffusion.mean_type": "mean_type",
             "sampling.clip_denoised": "clip_sample", "sampling.steps_offset": "steps_offset",
             "sampling.alpha_one_at_end": "alpha_one_at_end"}
  if schedule and schedule["beta_schedule"] == "cosine":  # no start and end
    compare = {k: v for k, v in compare.items() if v not in ("beta_start", "beta_end")}
  for key, theirs in compare.items():
    section, name = key.split(".")
    have = config[section].get(name)
    if schedule and (abs(have - schedule[theirs]) > 1e-9 if isinstance(have, float)
                     else have != schedule[theirs]):
      out.append(f"--config.{key}={schedule[theirs]!r}".replace(" ", ""))
  learned = config.diffusion.var_type in ("learned", "learned_range")
  if learned != model_cfg["learned_variance"]:
    out.append("--config.diffusion.var_type=" + ("learned_range" if model_cfg["learned_variance"]
                                                 else "fixedlarge"))
  return out


def pipeline_schedule(src: str) -> dict | None:
  """The diffusion of a pipeline directory's scheduler/ (or a U-Net folder's sibling one)."""
  for path in (os.path.join(src, "scheduler", "scheduler_config.json"),
               os.path.join(src, "..", "scheduler", "scheduler_config.json")):
    if os.path.exists(path):
      schedule = scheduler_settings_file(path)
      if schedule["zero_snr"]:
        raise ConversionError(f"{path}: rescale_betas_zero_snr=True, a schedule the trainer's "
                              "config.diffusion cannot describe; run such a text-to-image "
                              "pipeline with diffusion_jax.text_to_image")
      return schedule
  return None


def _single_file(src: str, config, ema: bool = False):
  """(model fields, parameters, None) of one .safetensors file: the paper's DiT (a re-saved
  DiT-XL-2-*.pt) or a class-conditional LDM checkpoint; the heads, which the weights do not
  record, are the config's."""
  from diffusion_jax.convert_autoencoder import _read_safetensors
  from diffusion_jax.convert_dit import dit_from_original, is_original_dit
  from diffusion_jax.convert_ldm import class_conditional_unet
  from diffusion_jax.latent import model_input_shape
  if not os.path.isfile(src):
    raise ConversionError(f"{src} not found")
  m, state = config.model, _read_safetensors(src)
  if is_original_dit(state):
    if not config.get("latent", {}).get("autoencoder"):
      raise ConversionError("this DiT denoises a VAE's latents: name the VAE, e.g. "
                            "--config.latent.autoencoder=/path/to/sd-vae-ft-ema (the paper's)")
    fields, params = dit_from_original(state, m.num_heads)
    return dict(fields, name="dit"), params, None
  fields, params = class_conditional_unet(
      state, {"num_heads": m.num_heads, "head_channels": m.head_channels}, ema)
  return dict(fields, image_size=model_input_shape(config)[0]), params, None


def import_diffusers_unet(src: str, config, workdir: str, ema: bool = False) -> int:
  """Write step 0 of `workdir/checkpoints` from the diffusers weights in `src` (a U-Net or a
  DiT), or from one .safetensors file: a class-conditional LDM checkpoint (CompVis naming;
  convert_ldm; `ema`: its model_ema.* copy of the U-Net instead of model.diffusion_model.*) or
  the paper's DiT (facebookresearch/DiT naming; convert_dit)."""
  from diffusion_jax.train import Trainer
  if src.endswith(".safetensors"):
    model_cfg, params, schedule = _single_file(src, config, ema)
  elif is_dit_dir(src):
    model_cfg, params = load_diffusers_dit(src)
    model_cfg = dict(model_cfg, name="dit")
    schedule = pipeline_schedule(src)
    if os.path.isdir(os.path.join(src, "vae")) and not config.get("latent", {}).get(
        "autoencoder"):
      raise ConversionError("this DiT denoises a VAE's latents: name the VAE, "
                            f"--config.latent.autoencoder={os.path.join(src, 'vae')}")
  else:
    model_cfg, params = load_diffusers_unet(src)
    kind = None
    if model_cfg.get("added_cond_dim") or not isinstance(model_cfg.get("transformer_depth", 1),
                                                         int):
      kind = "an SDXL U-Net (pooled-text and size conditioning, a transformer depth per level)"
    elif model_cfg.get("output_channels"):
      kind = "an inpainting U-Net (mask and masked image as inputs)"
    elif model_cfg.get("time_cond_dim"):
      kind = "an LCM-distilled U-Net (the guidance scale embedded)"
    if kind:
      raise ConversionError(f"{kind}: python -m diffusion_jax.text_to_image runs it; training "
                            "it is not supported")
    schedule = pipeline_schedule(src)
    root = src if os.path.isdir(os.path.join(src, "unet")) else os.path.dirname(
        os.path.abspath(src))  # the pipeline's directory
    if model_cfg.get("context_dim") and not config.get("text", {}).get("encoder"):
      raise ConversionError(
          "this U-Net cross-attends to a text encoder's output: name the encoder, "
          f"--config.text.encoder={root} (a Stable Diffusion pipeline directory, text_encoder/ "
          f"and tokenizer/ inside), and its VAE, --config.latent.autoencoder={root}/vae "
          "(configs/sd15_finetune.py)")
    if model_cfg.get("context_dim") and not config.get("latent", {}).get("autoencoder"):
      raise ConversionError("this U-Net denoises a VAE's latents: name the VAE, "
                            f"--config.latent.autoencoder={root}/vae")
  bad = config_mismatches(config, model_cfg, schedule)
  if bad:
    raise ConversionError("the config does not describe this network; add " + " ".join(bad))
  trainer = Trainer(config)
  state = trainer.init()
  expected = jax.tree.map(lambda x: x.shape, state.params)
  got = jax.tree.map(lambda x: x.shape, params)
  if expected != got:
    raise ConversionError(f"parameter shapes differ from the config's model: {got} vs {expected}")
  placed = jax.tree.map(lambda v, ref: jax.device_put(np.asarray(v), ref.sharding), params,
                        state.params)
  state = state.replace(params=placed, ema_params=placed,
                        opt_state=trainer.tx.init(placed))
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"))
  if ckpt.latest_step() is not None:
    raise ConversionError(f"{workdir} already holds checkpoints; import into a fresh --workdir")
  ckpt.save(0, state, {"config": config.to_json_best_effort(), "imported_from": src},
            force=True)
  ckpt.wait()
  ckpt.close()
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  logging.info("Imported %s parameters from %s into %s (step 0)", f"{n:,}", src, workdir)
  return n


def main(argv):
  del argv
  try:
    import_diffusers_unet(FLAGS.src, FLAGS.config, FLAGS.workdir, FLAGS.ema)
  except (ConversionError, checkpoints.CheckpointError) as e:
    sys.exit(f"{type(e).__name__}: {e}")


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "The experiment config of the network.")
  flags.DEFINE_string("src", None, "Local diffusers UNet2DModel (or pipeline) directory, a DiT "
                      "pipeline directory, or one .safetensors file: a class-conditional LDM "
                      "checkpoint (CompVis naming) or the paper's DiT (facebookresearch/DiT).")
  flags.DEFINE_bool("ema", False, "With a single file: its model_ema.* copy of the U-Net.")
  flags.DEFINE_string("workdir", None, "New workdir to write the checkpoint into.")
  flags.mark_flags_as_required(["config", "src", "workdir"])
  app.run(main)
