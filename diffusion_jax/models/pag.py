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

PAG_KEY = "pag_mask"


def split_pag(context):
  """(the context without the perturbation mask, the mask [B] or None)."""
  if not (isinstance(context, dict) and PAG_KEY in context):
    return context, None
  rest = {k: v for k, v in context.items() if k != PAG_KEY}
  return (rest["text"] if set(rest) == {"text"} else rest), context[PAG_KEY]


def with_pag_mask(context, mask):
  """The context with the perturbation mask [B] added."""
  base = dict(context) if isinstance(context, dict) else {"text": context}
  return dict(base, **{PAG_KEY: mask})


def self_attention_names(unet) -> dict[str, tuple[str, int]]:
  """diffusers' module name of each self-attention of the U-Net -> (our SpatialTransformer's
  name, the block's index in it)."""
  levels, names = len(unet.ch_mult), {}
  blocks = lambda prefix, ours, level: {
      f"{prefix}.transformer_blocks.{d}.attn1": (ours, d) for d in range(unet._depth(level))}
  for i in range(levels):
    if i in unet.attn_levels:
      for j in range(unet.num_res_blocks):
        names.update(blocks(f"down_blocks.{i}.attentions.{j}", f"down_{i}_attn_{j}", i))
      for j in range(unet.num_res_blocks + 1):
        names.update(blocks(f"up_blocks.{levels - 1 - i}.attentions.{j}", f"up_{i}_attn_{j}", i))
  names.update(blocks("mid_block.attentions.0", "mid_attn", levels - 1))
  return names


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
