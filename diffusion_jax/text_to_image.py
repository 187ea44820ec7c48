"""Text-to-image, img2img and inpainting from the command line with a Stable Diffusion (1.x, 2.x,
XL) pipeline directory you have on disk (stable_diffusion.py runs it in JAX).

  python -m diffusion_jax.text_to_image --src=/path/to/stable-diffusion-v1-5 \
      --prompt="a photograph of an astronaut riding a horse" --num_images=4 --out=astronaut.png
  # img2img: --init_image=photo.png --strength=0.6
  # inpainting (an inpainting pipeline): --init_image=photo.png --mask_image=mask.png
  # ControlNet: --controlnet=sd-controlnet-canny --control_image=edges.png
  # SDXL base + refiner: --src=stable-diffusion-xl-base-1.0 --refiner=...-refiner-1.0

--src is a diffusers pipeline directory (model_index.json beside text_encoder/, tokenizer/,
unet/, vae/, scheduler/, each with safetensors weights; SDXL's also text_encoder_2/ and
tokenizer_2/), or a Stable Diffusion 1.x/2.x/XL single-file checkpoint (CompVis' or Stability's
naming, .safetensors; convert_ldm.py) with --tokenizer=DIR (and SDXL's --tokenizer_2=DIR).
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np
from absl import app, flags, logging

from diffusion_jax.convert_diffusers import ConversionError
from diffusion_jax.models.freeu import check_freeu
from diffusion_jax.schedulers import METHODS
from diffusion_jax.stable_diffusion import StableDiffusion

FLAGS = flags.FLAGS


def main(argv):
  del argv
  from diffusion_jax.images import read_image, save_grid
  try:
    if FLAGS.src.endswith(".safetensors"):
      if FLAGS.controlnet:
        raise ValueError("--controlnet runs with a pipeline directory as --src")
      if not FLAGS.tokenizer:
        raise ConversionError("a single-file checkpoint holds no tokenizer: add "
                              "--tokenizer=DIR (vocab.json + merges.txt of CLIP's, e.g. a "
                              "Stable Diffusion pipeline's tokenizer/)")
      pipe = StableDiffusion.load_single_file(FLAGS.src, FLAGS.tokenizer, FLAGS.prediction_type,
                                              FLAGS.dtype, ema=FLAGS.ema,
                                              tokenizer_2=FLAGS.tokenizer_2,
                                              zero_snr=FLAGS.zero_snr)
    else:
      pipe = StableDiffusion.load(FLAGS.src, FLAGS.dtype, controlnet=FLAGS.controlnet)
      if FLAGS.zero_snr is not None:
        pipe = pipe.with_schedule(rescale_betas_zero_snr=FLAGS.zero_snr)
    if FLAGS.timestep_spacing:
      pipe = pipe.with_schedule(timestep_spacing=FLAGS.timestep_spacing)
    for path in FLAGS.lora or ():
      pipe = pipe.with_lora(path, FLAGS.lora_weight)
    if FLAGS.clip_skip:
      pipe = pipe.with_clip_skip(FLAGS.clip_skip)
    if FLAGS.freeu:
      pipe = pipe.with_freeu(*check_freeu(FLAGS.freeu))
    if FLAGS.pag_scale:
      pipe = pipe.with_pag(FLAGS.pag_layers)
    adapters, ip_images = FLAGS.ip_adapter or [], FLAGS.ip_adapter_image or []
    if len(adapters) != len(ip_images) or (adapters and not FLAGS.image_encoder):
      raise ValueError("image prompts take --ip_adapter=FILE.safetensors, --image_encoder=DIR "
                       "and --ip_adapter_image=IMAGE (one image for each --ip_adapter)")
    ip = {}
    if adapters:
      pipe = pipe.with_ip_adapter(adapters, FLAGS.image_encoder)
      images = [read_image(path, 1) for path in ip_images]
      ip = dict(ip_adapter_image=images if len(images) > 1 else images[0],
                ip_adapter_scale=FLAGS.ip_adapter_scale)
    for spec in FLAGS.embedding or ():  # FILE or FILE:TOKEN
      path, token = (spec, None) if spec.endswith(".safetensors") else spec.rsplit(":", 1)
      pipe = pipe.with_textual_inversion(path, token)
    prompts = [p for p in FLAGS.prompt for _ in range(FLAGS.num_images)]
    start = time.perf_counter()
    common = dict(negative_prompt=FLAGS.negative_prompt, num_steps=FLAGS.steps,
                  guidance_scale=FLAGS.guidance, seed=FLAGS.seed, eta=FLAGS.eta,
                  guidance_rescale=FLAGS.guidance_rescale, pag_scale=FLAGS.pag_scale,
                  pag_adaptive_scale=FLAGS.pag_adaptive_scale)
    if FLAGS.mask_image and not FLAGS.init_image:
      raise ValueError("--mask_image needs --init_image, the image to repaint")
    f = pipe.first_stage.model.downsampling_factor
    if FLAGS.init_image:
      init = read_image(FLAGS.init_image, f * 2 ** (len(pipe.unet.ch_mult) - 1), FLAGS.height,
                        FLAGS.width)
      inits = np.stack([init] * len(prompts))
    control = None
    one = lambda values: values if len(values) > 1 else values[0]
    controls = dict(control_scale=one(FLAGS.control_scale) if FLAGS.control_scale else None,
                    guess_mode=FLAGS.guess_mode,
                    control_guidance=(one(FLAGS.control_guidance_start),
                                      one(FLAGS.control_guidance_end)))
    if FLAGS.control_image:  # resized to the output's size
      _, h, w, _ = pipe.latent_shape(1, *(init.shape[:2] if FLAGS.init_image else
                                          (FLAGS.height, FLAGS.width)))
      control = [read_image(path, 1, h * f, w * f) for path in FLAGS.control_image]
    if FLAGS.mask_image:
      rgb = read_image(FLAGS.mask_image, 1, init.shape[0], init.shape[1])
      mask = rgb @ np.array([0.299, 0.587, 0.114]) >= 127.5  # PIL's "L", binarised
      images = pipe.inpaint(prompts, inits, np.stack([mask] * len(prompts)),
                            strength=1.0 if FLAGS.strength is None else FLAGS.strength,
                            method=FLAGS.method, control_image=control, **controls, **ip,
                            **common)
    elif FLAGS.init_image:
      images = pipe.img2img(prompts, images=inits,
                            strength=0.8 if FLAGS.strength is None else FLAGS.strength,
                            method=FLAGS.method, control_image=control, **controls, **ip,
                            **common)
    elif FLAGS.refiner:  # SDXL's ensemble of experts: the base, then the refiner
      refiner = StableDiffusion.load(FLAGS.refiner, FLAGS.dtype)
      refiner = refiner.with_pag(FLAGS.pag_layers) if FLAGS.pag_scale else refiner
      z = pipe.generate(prompts, height=FLAGS.height, width=FLAGS.width, method=FLAGS.method,
                        decode=False, denoising_end=FLAGS.refiner_start, **ip, **common)
      images = refiner.img2img(prompts, latents=z, denoising_start=FLAGS.refiner_start,
                               method=FLAGS.method, **common)
    else:
      images = pipe.generate(prompts, height=FLAGS.height, width=FLAGS.width,
                             method=FLAGS.method, control_image=control, **controls, **ip,
                             **common)
  except (ConversionError, ValueError, OSError) as e:
    sys.exit(f"{type(e).__name__}: {e}")
  logging.info("%d images in %.1f s (with compilation)", len(images), time.perf_counter() - start)
  save_grid(images, FLAGS.out, ncols=FLAGS.num_images)
  np.savez(os.path.splitext(FLAGS.out)[0] + ".npz", images)
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  flags.DEFINE_string("src", None, "Local diffusers Stable Diffusion pipeline directory, or a "
                      "SD 1.x/2.x/XL single-file .safetensors checkpoint.")
  flags.DEFINE_string("tokenizer", None, "With a single file: the model's CLIP tokenizer folder "
                      "(SD 2.x: its own, which pads with '!').")
  flags.DEFINE_string("tokenizer_2", None, "With an SDXL single file: its second tokenizer "
                      "folder (OpenCLIP bigG's, e.g. an SDXL pipeline's tokenizer_2/).")
  flags.DEFINE_bool("ema", False, "With a single file: its model_ema.* U-Net.")
  flags.DEFINE_enum("prediction_type", None, ["epsilon", "v_prediction"],
                    "With a single file: what its U-Net predicts (default: v_prediction where "
                    "the file holds a 'v_pred' marker, else epsilon).")
  flags.DEFINE_bool("zero_snr", None, "Betas rescaled to zero terminal SNR (diffusers' "
                    "rescale_betas_zero_snr; v-prediction models; default: the scheduler "
                    "config's, or a single file's 'ztsnr' marker; a single file then samples "
                    "with trailing timesteps, a pipeline keeps its config's spacing: see "
                    "--timestep_spacing).")
  flags.DEFINE_enum("timestep_spacing", None, ["leading", "linspace", "trailing"],
                    "The scheduler's timestep spacing (default: the scheduler config's).")
  flags.DEFINE_multi_string("prompt", None, "Prompt (repeat the flag for several).")
  flags.DEFINE_string("negative_prompt", None, "The unconditional prompt of guidance (default: "
                      "the empty prompt; SDXL: zeros, as its pipeline).")
  flags.DEFINE_integer("num_images", 1, "Images per prompt.")
  flags.DEFINE_integer("steps", 50, "Sampler steps (network evaluations).")
  flags.DEFINE_float("guidance", 7.5, "Classifier-free guidance scale (1: none).")
  flags.DEFINE_float("guidance_rescale", 0.0, "Rescale the guided prediction towards the "
                     "conditional one's std (Lin et al. 2024; e.g. 0.7; 0: off).")
  flags.DEFINE_integer("clip_skip", 0, "Read the prompts' text states this many layers "
                       "earlier (diffusers' clip_skip; A1111's 'clip skip 2' is 1).")
  flags.DEFINE_list("freeu", None, "FreeU's s1,s2,b1,b2 (diffusers' enable_freeu), e.g. "
                    "0.9,0.2,1.2,1.4 for SD 1.x, 0.9,0.2,1.1,1.2 for 2.x, 0.6,0.4,1.1,1.2 for XL.")
  flags.DEFINE_float("pag_scale", 0.0, "Perturbed-attention guidance's scale (diffusers' PAG "
                     "pipelines; e.g. 3.0; 0: none).")
  flags.DEFINE_list("pag_layers", ["mid"], "With --pag_scale: the self-attentions to perturb, "
                    "regular expressions over diffusers' module names (pag_applied_layers).")
  flags.DEFINE_float("pag_adaptive_scale", 0.0, "With --pag_scale: PAG's scale lowered by this "
                     "times (1000 - t) (diffusers' pag_adaptive_scale).")
  flags.DEFINE_multi_string("ip_adapter", None, "IP-Adapter weights (.safetensors, e.g. "
                            "h94/IP-Adapter's models/ip-adapter_sd15.safetensors; repeat the "
                            "flag for several).")
  flags.DEFINE_string("image_encoder", None, "With --ip_adapter: its CLIP image encoder "
                      "directory (CLIPVisionModelWithProjection, e.g. models/image_encoder/).")
  flags.DEFINE_multi_string("ip_adapter_image", None, "With --ip_adapter: the image prompt "
                            "(one for each --ip_adapter).")
  flags.DEFINE_multi_float("ip_adapter_scale", [1.0], "The image prompts' weight (diffusers' "
                           "set_ip_adapter_scale; e.g. 0.5 to let the text speak more): one, "
                           "or one per adapter.")
  flags.DEFINE_integer("seed", 0, "Random seed of the starting latents.")
  flags.DEFINE_integer("height", None, "Image height (default: the U-Net's native size).")
  flags.DEFINE_integer("width", None, "Image width.")
  flags.DEFINE_enum("method", None, METHODS, "Sampler (default: the pipeline scheduler's class "
                    "where it is one of these, else ddim).")
  flags.DEFINE_float("eta", 0.0, "DDIM eta (0: deterministic).")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
  flags.DEFINE_string("init_image", None, "img2img (SDEdit): start from this image.")
  flags.DEFINE_string("mask_image", None, "Inpainting (an inpainting pipeline): repaint "
                      "--init_image where this image is white.")
  flags.DEFINE_float("strength", None, "img2img (default 0.8) and inpainting (default 1): the "
                     "share of the DDIM steps run (1: all of them, from the noisiest step, "
                     "where little of the image survives).")
  flags.DEFINE_multi_string("lora", None, "LoRA weights to merge (.safetensors, diffusers' or "
                            "kohya's format; repeat the flag for several).")
  flags.DEFINE_multi_string("embedding", None, "A textual inversion embedding to add "
                            "(.safetensors; FILE:TOKEN names its token where the file does "
                            "not; repeat the flag for several). Use the token in the prompt.")
  flags.DEFINE_float("lora_weight", 1.0, "The LoRA changes' weight (diffusers' lora_scale).")
  flags.DEFINE_multi_string("controlnet", None, "A diffusers ControlNetModel directory (e.g. "
                            "sd-controlnet-canny) to guide the U-Net with --control_image "
                            "(repeat both flags for several, in the same order).")
  flags.DEFINE_multi_string("control_image", None, "A ControlNet's hint image (edges, "
                            "depth, pose, ...; resized to the output's size), one per "
                            "--controlnet.")
  flags.DEFINE_multi_float("control_scale", None, "The ControlNet residuals' weight (one, "
                           "or one per --controlnet; default: diffusers' pipeline's, 1, 0.8 "
                           "with --init_image, 0.5 with --mask_image (SDXL: 1)).")
  flags.DEFINE_multi_float("control_guidance_start", [0.0], "The share of the steps after "
                           "which a ControlNet starts acting (one, or one per --controlnet).")
  flags.DEFINE_multi_float("control_guidance_end", [1.0], "The share of the steps after which "
                           "it stops (one, or one per --controlnet).")
  flags.DEFINE_bool("guess_mode", False, "ControlNets condition the prompt's half of "
                    "guidance alone, their residuals 0.1 -> 1 from the first skip to the middle "
                    "block: a hint steers without a prompt that describes it.")
  flags.DEFINE_string("refiner", None, "An SDXL refiner pipeline directory: the base denoises "
                      "to --refiner_start, the refiner the rest (text-to-image).")
  flags.DEFINE_float("refiner_start", 0.8, "With --refiner: the share of the chain the base "
                     "runs (diffusers' denoising_end / denoising_start).")
  flags.DEFINE_string("out", "text_to_image.png", "PNG grid (one row per prompt); .npz beside.")
  flags.mark_flags_as_required(["src", "prompt"])
  app.run(main)
