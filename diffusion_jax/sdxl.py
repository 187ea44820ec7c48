"""Stable Diffusion XL's conditioning (Podell et al. 2023, Sec. 2.1-2.2) as diffusers'
StableDiffusionXLPipeline computes it, for stable_diffusion.StableDiffusion:

- the context [B, 77, 768 + 1280]: the penultimate layer's states of two text encoders, OpenAI's
  CLIP ViT-L and OpenCLIP's ViT-bigG, side by side (each with its own tokenizer);
- "text_embeds" [B, 1280]: bigG's pooled, projected embedding of the prompt;
- "time_ids" [B, 6]: the micro-conditioning on sizes, (original height, width, crop top, left,
  target height, width), by default the output's size and no crop;
- the negative prompt: by default (no negative prompt and the pipeline's
  force_zeros_for_empty_prompt) zeros, not the empty prompt's encoding.
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
  """What model_index.json says about SDXL's conditioning: force_zeros_for_empty_prompt; the
  refiner's layout (one text encoder, aesthetic-score ids) is refused."""
  path = os.path.join(src, "model_index.json")
  require_files([path], "an SDXL pipeline directory holds model_index.json")
  with open(path) as f:
    index = json.load(f)
  if index.get("requires_aesthetics_score") or not os.path.isdir(
      os.path.join(src, "text_encoder")):
    raise ConversionError("this is an SDXL refiner (one text encoder, aesthetic-score "
                          "conditioning), which is not supported: use the SDXL base pipeline")
  return {"zero_negative": bool(index.get("force_zeros_for_empty_prompt", True))}


def size_ids(height: int, width: int, original_size=None, crops_coords_top_left=(0, 0),
             target_size=None) -> np.ndarray:
  """SDXL's time_ids [6] (diffusers' _get_add_time_ids): original_size and target_size
  (height, width) default to the output's."""
  original = tuple(original_size or (height, width))
  target = tuple(target_size or (height, width))
  ids = original + tuple(crops_coords_top_left) + target
  if len(ids) != 6:
    raise ValueError(f"original_size, crops_coords_top_left, target_size: pairs; got {ids}")
  return np.asarray(ids, np.float32)


def prompt_context(encoder, encoder_2, params, params_2, ids, time_ids, zero: bool = False):
  """The U-Net's context dict of token ids [B, 2, 77] (the two tokenizers'); zero: zeros for
  the text and pooled embedding (the time ids stay), the encoders not run."""
  if zero:
    b, length = ids.shape[0], ids.shape[-1]
    pooled = encoder_2.projection_dim or encoder_2.width
    return {"text": jnp.zeros((b, length, encoder.width + encoder_2.width), jnp.float32),
            "text_embeds": jnp.zeros((b, pooled), jnp.float32), "time_ids": time_ids}
  h = encoder.apply({"params": params}, ids[:, 0], penultimate=True)
  h_2, pooled = encoder_2.apply({"params": params_2}, ids[:, 1], penultimate=True, pooled=True)
  return {"text": jnp.concatenate([h, h_2], axis=-1), "text_embeds": pooled,
          "time_ids": time_ids}


def check_layout(unet_cfg: dict, text_fields: dict, text_fields_2: dict) -> None:
  """The U-Net's widths against the two encoders': context = both widths, added features =
  the pooled embedding + 6 size ids."""
  width = text_fields["width"] + text_fields_2["width"]
  if unet_cfg["context_dim"] != width:
    raise ConversionError(f"the U-Net attends to {unet_cfg['context_dim']} features; the two "
                          f"text encoders give {width}")
  pooled = text_fields_2.get("projection_dim") or text_fields_2["width"]
  added = pooled + 6 * unet_cfg.get("added_time_dim", 0)
  if unet_cfg.get("added_cond_dim") != added:
    raise ConversionError(f"the U-Net's added conditioning takes {unet_cfg.get('added_cond_dim')}"
                          f" features; a pooled text embedding of {pooled} and 6 size ids give "
                          f"{added}")
