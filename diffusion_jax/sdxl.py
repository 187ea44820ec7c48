"""Stable Diffusion XL's conditioning (Podell et al. 2023, Sec. 2.1-2.2) as diffusers'
StableDiffusionXLPipeline computes it, for stable_diffusion.StableDiffusion:

- the context [B, 77, 768 + 1280]: the penultimate layer's states of two text encoders, OpenAI's
  CLIP ViT-L and OpenCLIP's ViT-bigG, side by side (each with its own tokenizer);
- "text_embeds" [B, 1280]: bigG's pooled, projected embedding of the prompt;
- "time_ids" [B, 6]: the micro-conditioning on sizes, (original height, width, crop top, left,
  target height, width), by default the output's size and no crop;
- the negative prompt: by default (no negative prompt and the pipeline's
  force_zeros_for_empty_prompt) zeros, not the empty prompt's encoding.

The refiner (requires_aesthetics_score) has bigG alone (context [B, 77, 1280]) and 5 time ids,
(original height, width, crop top, left, aesthetic score), the prompts' score (6 by default)
and the negative prompts' (2.5) apart; it runs as img2img, on images or on the base's latents
part way (denoising_end / denoising_start).
"""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np

from diffusion_jax.convert_diffusers import ConversionError, require_files


def is_sdxl(src: str) -> bool:
  """A pipeline directory with a second text encoder (SDXL base's layout)."""
  return os.path.isdir(os.path.join(src, "text_encoder_2"))


def pipeline_options(src: str) -> dict:
  """What model_index.json says about SDXL's conditioning: force_zeros_for_empty_prompt,
  requires_aesthetics_score (the refiner's), and whether there is a first text encoder."""
  path = os.path.join(src, "model_index.json")
  require_files([path], "an SDXL pipeline directory holds model_index.json")
  with open(path) as f:
    index = json.load(f)
  aesthetic = bool(index.get("requires_aesthetics_score", False))
  first = os.path.isdir(os.path.join(src, "text_encoder"))
  if first == aesthetic:
    raise ConversionError("an SDXL pipeline has two text encoders (the base) or one with "
                          "requires_aesthetics_score (the refiner); this one has "
                          f"{2 if first else 1} and requires_aesthetics_score={aesthetic}")
  return {"zero_negative": bool(index.get("force_zeros_for_empty_prompt", True)),
          "aesthetic": aesthetic}


def size_ids(height: int, width: int, original_size=None, crops_coords_top_left=(0, 0),
             target_size=None, aesthetic_score: float | None = None) -> np.ndarray:
  """SDXL's time_ids [6] (diffusers' _get_add_time_ids): original_size and target_size
  (height, width) default to the output's; with aesthetic_score the refiner's [5], the score
  in place of the target size."""
  original = tuple(original_size or (height, width))
  target = tuple(target_size or (height, width))
  ids = original + tuple(crops_coords_top_left) + target
  if len(ids) != 6:
    raise ValueError(f"original_size, crops_coords_top_left, target_size: pairs; got {ids}")
  if aesthetic_score is not None:
    ids = ids[:4] + (aesthetic_score,)
  return np.asarray(ids, np.float32)


# SDXL's size conditioning as its pipelines take it (keyword arguments of generate, img2img,
# inpaint); the aesthetic scores are the refiner's
SIZE_OPTIONS = ("original_size", "crops_coords_top_left", "target_size",
                "negative_original_size", "negative_crops_coords_top_left",
                "negative_target_size", "aesthetic_score", "negative_aesthetic_score")


def check_size_options(options: dict) -> None:
  """TypeError for keyword arguments that are none of SIZE_OPTIONS."""
  unknown = sorted(set(options) - set(SIZE_OPTIONS))
  if unknown:
    raise TypeError(f"unexpected keyword arguments {unknown}; SDXL's size conditioning: "
                    f"{SIZE_OPTIONS}")


def time_ids(height: int, width: int, options: dict, img2img: bool = False,
             aesthetic: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """SDXL's time ids of the prompts and of the negative prompts, as diffusers' pipelines make
  them from `options` (SIZE_OPTIONS; sizes (height, width), default the output's, crops (0, 0)):
  text-to-image (StableDiffusionXLPipeline): the negative prompts' from negative_original_size,
  _crops_coords_top_left and _target_size where both sizes are given, else the prompts';
  img2img / inpainting: negative_original_size and _target_size (default: the prompts') with
  the prompts' crop; the refiner (aesthetic): original size, crop and aesthetic score each,
  the negative prompts' from the negative_* options (defaults: the prompts' size, (0, 0),
  2.5; the prompts' score 6)."""
  check_size_options(options)
  get = options.get
  if not aesthetic and {"aesthetic_score", "negative_aesthetic_score"} & set(options):
    raise ValueError("aesthetic_score, negative_aesthetic_score: the SDXL refiner's "
                     "conditioning (requires_aesthetics_score)")
  original, crop, target = (get("original_size"), get("crops_coords_top_left", (0, 0)),
                            get("target_size"))
  neg_original, neg_crop, neg_target = (get("negative_original_size"),
                                        get("negative_crops_coords_top_left", (0, 0)),
                                        get("negative_target_size"))
  ids = size_ids(height, width, original, crop, target,
                 get("aesthetic_score", 6.0) if aesthetic else None)
  if aesthetic:
    return ids, size_ids(height, width, neg_original or original, neg_crop, None,
                         get("negative_aesthetic_score", 2.5))
  if img2img:
    return ids, size_ids(height, width, neg_original or original, crop, neg_target or target)
  if neg_original is not None and neg_target is not None:
    return ids, size_ids(height, width, neg_original, neg_crop, neg_target)
  return ids, ids


def prompt_context(encoder, encoder_2, params, params_2, ids, time_ids, zero: bool = False,
                   skip: int = 0):
  """The U-Net's context dict of token ids [B, 2, 77] (the two tokenizers'; the refiner's
  [B, 1, 77], encoder None); zero: zeros for the text and pooled embedding (the time ids
  stay), the encoders not run; skip: diffusers' clip_skip (the states that many layers before
  the penultimate; the pooled embedding stays the last layer's)."""
  if zero:
    b, length = ids.shape[0], ids.shape[-1]
    pooled = encoder_2.projection_dim or encoder_2.width
    width = encoder_2.width + (encoder.width if encoder is not None else 0)
    return {"text": jnp.zeros((b, length, width), jnp.float32),
            "text_embeds": jnp.zeros((b, pooled), jnp.float32), "time_ids": time_ids}
  h_2, pooled = encoder_2.apply({"params": params_2}, ids[:, -1], penultimate=True, pooled=True,
                               skip=skip)
  if encoder is not None:
    h = encoder.apply({"params": params}, ids[:, 0], penultimate=True, skip=skip)
    h_2 = jnp.concatenate([h, h_2], axis=-1)
  return {"text": h_2, "text_embeds": pooled, "time_ids": time_ids}


def check_layout(unet_cfg: dict, text_fields: dict | None, text_fields_2: dict,
                 aesthetic: bool = False) -> None:
  """The U-Net's widths against the encoders': context = both widths (the refiner's: bigG's),
  added features = the pooled embedding + 6 size ids (the refiner's: 5)."""
  width = text_fields_2["width"] + (text_fields["width"] if text_fields else 0)
  if unet_cfg["context_dim"] != width:
    raise ConversionError(f"the U-Net attends to {unet_cfg['context_dim']} features; the two "
                          f"text encoders give {width}")
  pooled = text_fields_2.get("projection_dim") or text_fields_2["width"]
  n = 5 if aesthetic else 6
  added = pooled + n * unet_cfg.get("added_time_dim", 0)
  if unet_cfg.get("added_cond_dim") != added:
    raise ConversionError(f"the U-Net's added conditioning takes {unet_cfg.get('added_cond_dim')}"
                          f" features; a pooled text embedding of {pooled} and {n} size ids give "
                          f"{added}")
