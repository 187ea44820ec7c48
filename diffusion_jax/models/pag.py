"""Perturbed-attention guidance (Ahn et al. 2024, "Self-Rectifying Diffusion Sampling with
Perturbed-Attention Guidance"): a third pass of the U-Net in which chosen self-attention layers
see the identity as their attention map (each token its own value), and the guidance pushes
away from it: eps = eps_u + s (eps_c - eps_u) + s_pag (eps_c - eps_ptb) (without
classifier-free guidance eps_c + s_pag (eps_c - eps_ptb)), as diffusers' PAG pipelines.

The U-Net's `pag_layers` names the perturbed self-attentions; its context carries "pag_mask"
[B], 1 for the examples of the perturbed pass. `pag_layer_paths` chooses the layers as
diffusers' pag_applied_layers do: regular expressions searched in diffusers' module names.
"""
from __future__ import annotations

import re

from diffusion_jax.models.context import add_to_context, split_context

PAG_KEY = "pag_mask"


def split_pag(context):
  """(the context without the perturbation mask, the mask [B] or None)."""
  context, taken = split_context(context, (PAG_KEY,))
  return context, None if taken is None else taken[PAG_KEY]


def with_pag_mask(context, mask):
  """The context with the perturbation mask [B] added."""
  return add_to_context(context, **{PAG_KEY: mask})


def self_attention_names(unet) -> dict[str, tuple[str, int]]:
  """diffusers' module name of each self-attention of the U-Net -> (our SpatialTransformer's
  name, the block's index in it)."""
  return {f"{name}.attn1": (ours, d) for name, ours, d in unet.transformer_blocks()}


def pag_layer_paths(unet, applied_layers) -> tuple[tuple[str, int], ...]:
  """The self-attentions that diffusers' pag_applied_layers (e.g. "mid", ["down_blocks.2",
  "up_blocks.0.attentions.1"]) choose: each a regular expression searched in the module
  names; one that finds none is refused."""
  if not (unet.context_dim and unet.attn_levels):
    raise ValueError("perturbed-attention guidance needs a U-Net with transformer blocks")
  names = self_attention_names(unet)
  chosen = []
  for layer_id in [applied_layers] if isinstance(applied_layers, str) else applied_layers:
    found = [ours for name, ours in names.items() if re.search(layer_id, name)]
    if not found:
      raise ValueError(f"pag_applied_layers {layer_id!r} matches no self-attention of the U-Net "
                       f"(diffusers' names, e.g. {sorted(names)[0]!r}; 'mid' for the middle "
                       "block's)")
    chosen += [f for f in found if f not in chosen]
  return tuple(chosen)
