"""Stable Diffusion pipelines (stable_diffusion.StableDiffusion) from weights on disk: a
diffusers pipeline directory (SD 1.x/2.x/XL, inpainting, with a ControlNet) or an SD 1.x/2.x/XL
single file, its parts converted (convert_clip, convert_diffusers, convert_autoencoder,
convert_ldm), checked against each other and put together on the mesh.
"""
from __future__ import annotations

import os

import jax

from diffusion_jax import parallel, schedulers, sdxl
from diffusion_jax.convert_autoencoder import load_autoencoder
from diffusion_jax.convert_clip import load_text_encoder, load_tokenizer
from diffusion_jax.convert_diffusers import (ConversionError, load_diffusers_controlnet,
                                             load_diffusers_unet, require_files, unet_fields)
from diffusion_jax.convert_ldm import is_sdxl_file, schedule_markers, single_file_parts
from diffusion_jax.latent import FirstStage
from diffusion_jax.models import DTYPES, UNet
from diffusion_jax.models.autoencoder import AutoencoderKL
from diffusion_jax.models.clip_text import CLIPTextEncoder
from diffusion_jax.models.controlnet import ControlNet
from diffusion_jax.stable_diffusion import StableDiffusion


def load_pipeline(src: str, dtype: str = "float32", mesh=None, tokenizer=None,
                  attention: str = "auto", controlnet=None) -> StableDiffusion:
  """Read a local diffusers pipeline directory (stable_diffusion's docstring; SDXL's when it
  has text_encoder_2/); attention: models/attention.py's implementation for the U-Net and the
  decoder; controlnet: a diffusers ControlNetModel directory, or a list of them (by default
  the pipeline's controlnet/ folder, where it has one)."""
  sched_path = os.path.join(src, "scheduler", "scheduler_config.json")
  require_files([sched_path], "--src must be a diffusers Stable Diffusion pipeline directory "
                "(text_encoder/, tokenizer/, unet/, vae/, scheduler/) or a single "
                ".safetensors checkpoint")
  schedule = schedulers.scheduler_settings_file(sched_path)
  parts = sdxl.pipeline_options(src) if sdxl.is_sdxl(src) else {}  # and SDXL's second encoder
  refiner = parts.get("aesthetic", False)  # bigG alone
  text = None if refiner else load_text_encoder(os.path.join(src, "text_encoder"))
  unet = load_diffusers_unet(os.path.join(src, "unet"))
  vae = load_autoencoder(os.path.join(src, "vae"))
  if not refiner:
    tokenizer = tokenizer or load_tokenizer(os.path.join(src, "tokenizer"))
  if parts:
    parts.update(text_2=load_text_encoder(os.path.join(src, "text_encoder_2")),
                 tokenizer_2=load_tokenizer(os.path.join(src, "tokenizer_2")))
  saved = os.path.join(src, "controlnet")  # a saved ControlNet pipeline's
  controlnet = controlnet or (saved if os.path.isdir(saved) else None)
  if controlnet:
    dirs = [controlnet] if isinstance(controlnet, str) else list(controlnet)
    parts["controlnet"] = [load_diffusers_controlnet(d) for d in dirs]
  return assemble(tokenizer, text, unet, vae, schedule, dtype, mesh, attention, **parts)


# the schedulers of SD 1.x/2.x (DDIM / PNDM) and of SDXL base (Euler) as their pipelines ship
SD_SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
               "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False}
SDXL_SCHEDULE = dict(SD_SCHEDULE, _class_name="EulerDiscreteScheduler",
                     timestep_spacing="leading", interpolation_type="linear")


def load_single_file(path: str, tokenizer, prediction_type: str | None = None,
                     dtype: str = "float32", mesh=None, heads: dict | None = None,
                     text_heads: int | None = None, ema: bool = False,
                     tokenizer_2=None, zero_snr: bool | None = None) -> StableDiffusion:
  """A Stable Diffusion 1.x/2.x/XL single-file checkpoint (CompVis' or Stability's naming,
  .safetensors) with the tokenizer (a CLIPTokenizer, or the path of its vocab.json/merges.txt
  folder), and for SDXL (conditioner.embedders.*) tokenizer_2, OpenCLIP bigG's (pads with
  "!"). The scheduler is the model's: SD 1.x/2.x's DDIM (scaled_linear 0.00085 -> 0.012,
  steps_offset 1, set_alpha_to_one False), SDXL's Euler; `prediction_type` "epsilon" or
  "v_prediction", and `zero_snr` (the betas rescaled to zero terminal SNR, diffusers'
  rescale_betas_zero_snr, with "trailing" timesteps, as Lin et al. sample): None reads them from
  the file's "v_pred" / "ztsnr" markers (convert_ldm.SCHEDULE_MARKERS), else epsilon without;
  pipe.with_schedule changes the rest; heads, text_heads: the attention heads
  where they are not Stable Diffusion's (convert_ldm); ema: the file's model_ema.* U-Net
  instead of model.diffusion_model.*. The native size is 512 (768 for v prediction, SD 2.x's 768-v;
  1024 for SDXL). The tokenizers must be the model's own (SD 2.x's pads with "!", 1.x's with
  <|endoftext|>)."""
  load = lambda t: load_tokenizer(t) if isinstance(t, str) else t
  if tokenizer_2 is None and is_sdxl_file(path):
    raise ConversionError("an SDXL single file needs its second tokenizer too (OpenCLIP "
                          "bigG's, e.g. an SDXL pipeline's tokenizer_2/): tokenizer_2=DIR, "
                          "--tokenizer_2=DIR")
  markers = schedule_markers(path)
  if prediction_type is None:
    prediction_type = "v_prediction" if "v_pred" in markers else "epsilon"
  parts = single_file_parts(path, prediction_type, heads, text_heads, ema)
  xl = {}
  if "text_2" in parts:
    xl = {"text_2": parts["text_2"], "tokenizer_2": load(tokenizer_2), "zero_negative": True}
  zero_snr = "ztsnr" in markers if zero_snr is None else zero_snr
  schedule = schedulers.scheduler_settings(dict(  # zero SNR: from the last timestep on
      SDXL_SCHEDULE if xl else SD_SCHEDULE, prediction_type=prediction_type,
      rescale_betas_zero_snr=zero_snr, **({"timestep_spacing": "trailing"} if zero_snr else {})))
  return assemble(load(tokenizer), parts["text"], parts["unet"], parts["vae"], schedule, dtype,
                  mesh, **xl)


def assemble(tokenizer, text, unet, vae, schedule: dict, dtype: str = "float32",
             mesh=None, attention: str = "auto", text_2=None, tokenizer_2=None,
             zero_negative: bool = False, controlnet=None,
             aesthetic: bool = False) -> StableDiffusion:
  """The pipeline from converted parts: text = (fields, params), unet = (fields, params),
  vae = (fields, params, scaling), schedule = schedulers.scheduler_settings(...);
  SDXL's: text_2 = (fields, params) and tokenizer_2, its second encoder; aesthetic: the
  refiner's conditioning, text and tokenizer None; controlnet = [(fields, params)] of the
  ControlNets (convert_diffusers.load_diffusers_controlnet)."""
  (text_fields, text_params), (unet_cfg, unet_params) = text or (None, None), unet
  vae_fields, vae_params, scaling = vae
  if not unet_cfg.get("context_dim"):
    raise ConversionError("the U-Net is not a cross-attention U-Net (UNet2DConditionModel)")
  if unet_cfg["in_channels"] not in (vae_fields["embed_dim"], 2 * vae_fields["embed_dim"] + 1):
    raise ConversionError(f"the U-Net takes {unet_cfg['in_channels']} input channels, the "
                          f"latents have {vae_fields['embed_dim']}: only inpainting U-Nets "
                          "(latents, mask, masked image) take more; depth U-Nets are not "
                          "supported")
  if text_2 is not None:
    sdxl.check_layout(unet_cfg, text_fields, text_2[0], aesthetic)
  elif unet_cfg.get("added_cond_dim"):
    raise ConversionError("the U-Net takes SDXL's pooled text and size conditioning: the "
                          "pipeline needs text_encoder_2/ and tokenizer_2/")
  elif unet_cfg["context_dim"] != text_fields["width"]:
    raise ConversionError(f"the U-Net attends to {unet_cfg['context_dim']} features; the text "
                          f"encoder gives {text_fields['width']}")
  mesh = mesh or parallel.make_mesh()
  compute = DTYPES[dtype]
  diffusion = schedulers.make_diffusion(schedule)
  replicate = lambda tree: jax.device_put(tree, parallel.replicated(mesh))
  first_stage = FirstStage(AutoencoderKL(**vae_fields, dtype=compute, attention=attention),
                           replicate(vae_params), mesh, scaling["scale_factor"] or 0.18215,
                           float(scaling.get("shift_factor") or 0.0))
  params = {"unet": unet_params} if text is None else {"text": text_params, "unet": unet_params}
  if text_2 is not None:
    params["text_2"] = text_2[1]
  control = None
  if controlnet:
    for fields, _ in controlnet:
      if (fields["context_dim"], fields["in_channels"], fields.get("added_cond_dim")) != (
          unet_cfg["context_dim"], vae_fields["embed_dim"], unet_cfg.get("added_cond_dim")):
        raise ConversionError("the ControlNet was made for another U-Net (its context width, "
                              "input channels or added conditioning differ; it reads the "
                              "latents alone)")
    params["controlnet"] = tuple(p for _, p in controlnet)
    control = tuple(ControlNet(**unet_fields(f), dtype=compute, attention=attention)
                    for f, _ in controlnet)
  text_encoder_2 = None if text_2 is None else CLIPTextEncoder(**text_2[0], dtype=compute)
  encoder = None if text is None else CLIPTextEncoder(**text_fields, dtype=compute)
  return StableDiffusion(tokenizer, encoder,
                         UNet(**unet_fields(unet_cfg), dtype=compute, attention=attention),
                         first_stage, diffusion, schedule, replicate(params), mesh,
                         unet_cfg["image_size"], tokenizer_2, text_encoder_2, zero_negative,
                         control, aesthetic)
