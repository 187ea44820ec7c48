"""transformers `CLIPTextModel` weights (config.json + model.safetensors, e.g. a Stable
Diffusion pipeline's text_encoder/; or `CLIPTextModelWithProjection`'s, SDXL's text_encoder_2/)
-> models.clip_text.CLIPTextEncoder's fields and parameters; `CLIPVisionModelWithProjection`'s
(IP-Adapter's image_encoder/) -> models.clip_vision.CLIPVisionEncoder's.

Pure numpy (no torch, no transformers); keys with or without the "text_model." prefix.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np

from diffusion_jax.convert_diffusers import ConversionError, put_torch_tensor, read_model_dir

LAYER_RENAMES = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v",
                 "self_attn.out_proj": "out", "layer_norm1": "norm_1", "layer_norm2": "norm_2",
                 "mlp.fc1": "fc1", "mlp.fc2": "fc2"}


def _activation(cfg: Mapping[str, Any]) -> str:
  """A CLIP tower config's hidden_act, one that models/clip_text.py computes."""
  act = cfg.get("hidden_act", "quick_gelu")
  if act not in ("quick_gelu", "gelu"):
    raise ConversionError(f"hidden_act={act!r} is not supported (quick_gelu or gelu)")
  return act


def text_encoder_fields(cfg: Mapping[str, Any]) -> dict:
  """CLIPTextEncoder's fields from a CLIPTextConfig's config.json (or a CLIPConfig's
  text_config)."""
  cfg = cfg.get("text_config", cfg)
  act = _activation(cfg)
  return {"vocab_size": int(cfg["vocab_size"]), "width": int(cfg["hidden_size"]),
          "layers": int(cfg["num_hidden_layers"]), "heads": int(cfg["num_attention_heads"]),
          "mlp_width": int(cfg["intermediate_size"]),
          "max_length": int(cfg.get("max_position_embeddings", 77)), "activation": act,
          "layer_norm_eps": float(cfg.get("layer_norm_eps", 1e-5)),
          "eos_token_id": int(cfg.get("eos_token_id", 2))}


def text_encoder_params(state: Mapping[str, np.ndarray]) -> dict:
  """Flax parameters of CLIPTextEncoder from a CLIPTextModel state dict (numpy)."""
  params: dict = {}
  for key, value in state.items():
    name = key.removeprefix("text_model.")
    value = np.asarray(value, np.float32)
    if name == "embeddings.position_ids":  # a buffer in older checkpoints
      continue
    if name == "embeddings.token_embedding.weight":
      params["token_embedding"] = {"embedding": value}
      continue
    if name == "embeddings.position_embedding.weight":
      params["position_embedding"] = value
      continue
    if name == "text_projection.weight":  # CLIPTextModelWithProjection's (no bias)
      params["text_projection"] = {"kernel": value.T}
      continue
    target = _layer_target(name)
    n = re.fullmatch(r"final_layer_norm\.(weight|bias)", name)
    if target:
      module, leaf = target
    elif n:
      module, leaf = "final_norm", n.group(1)
    else:
      raise ConversionError(f"unexpected parameter {key!r} in the CLIP text encoder")
    put_torch_tensor(params, [module], leaf, key, value)  # Dense kernel / LayerNorm scale
  return params


def _layer_target(name: str):
  """(module, leaf) of an encoder layer's parameter (encoder.layers.i.*), else None."""
  m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
  if m and m.group(2) in LAYER_RENAMES:
    return f"layer_{m.group(1)}_{LAYER_RENAMES[m.group(2)]}", m.group(3)
  return None


def vision_encoder_fields(cfg: Mapping[str, Any]) -> dict:
  """CLIPVisionEncoder's fields from a CLIPVisionConfig's config.json (or a CLIPConfig's
  vision_config)."""
  cfg = cfg.get("vision_config", cfg)
  act = _activation(cfg)
  return {"width": int(cfg["hidden_size"]), "layers": int(cfg["num_hidden_layers"]),
          "heads": int(cfg["num_attention_heads"]), "mlp_width": int(cfg["intermediate_size"]),
          "image_size": int(cfg.get("image_size", 224)),
          "patch_size": int(cfg.get("patch_size", 32)), "activation": act,
          "layer_norm_eps": float(cfg.get("layer_norm_eps", 1e-5)),
          "projection_dim": int(cfg.get("projection_dim", 512))}


def vision_encoder_params(state: Mapping[str, np.ndarray]) -> dict:
  """Flax parameters of CLIPVisionEncoder from a CLIPVisionModelWithProjection state dict."""
  params: dict = {}
  fixed = {"embeddings.patch_embedding": "patch_embedding", "pre_layrnorm": "pre_norm",
           "post_layernorm": "post_norm", "visual_projection": "visual_projection"}
  for key, value in state.items():
    name = key.removeprefix("vision_model.")
    if name == "embeddings.position_ids":
      continue
    if name in ("embeddings.class_embedding", "embeddings.position_embedding.weight"):
      params[name.split(".")[1]] = np.asarray(value, np.float32)
      continue
    target = _layer_target(name)
    module, _, leaf = name.rpartition(".")
    if target is None and module in fixed:
      target = fixed[module], leaf
    if target is None:
      raise ConversionError(f"unexpected parameter {key!r} in the CLIP image encoder")
    put_torch_tensor(params, [target[0]], target[1], key, value)
  return params


def load_vision_encoder(directory: str) -> tuple[dict, dict]:
  """(CLIPVisionEncoder fields, parameters) from a local CLIPVisionModelWithProjection
  directory (e.g. IP-Adapter's models/image_encoder/)."""
  from safetensors.numpy import load_file
  cfg, weights = read_model_dir(directory, "point at a transformers "
                                "CLIPVisionModelWithProjection directory (config.json, "
                                "model.safetensors), e.g. IP-Adapter's models/image_encoder/",
                                "model.safetensors")
  return vision_encoder_fields(cfg), vision_encoder_params(load_file(weights))


def load_text_encoder(directory: str) -> tuple[dict, dict]:
  """(CLIPTextEncoder fields, parameters) from a local CLIPTextModel directory."""
  from safetensors.numpy import load_file
  cfg, weights = read_model_dir(directory, "point at a transformers CLIPTextModel directory "
                                "(config.json, model.safetensors), e.g. a Stable Diffusion "
                                "pipeline's text_encoder/", "model.safetensors")
  fields = text_encoder_fields(cfg)
  params = text_encoder_params(load_file(weights))
  if "text_projection" in params:
    fields["projection_dim"] = int(params["text_projection"]["kernel"].shape[1])
  return fields, params


def text_encoder_fields_from_params(params: Mapping[str, Any], activation: str = "quick_gelu",
                                    heads: int | None = None) -> dict:
  """CLIPTextEncoder's fields read from its parameters (a checkpoint without config.json);
  heads: by default of 64 channels each, as OpenAI's and OpenCLIP's text towers."""
  vocab, width = params["token_embedding"]["embedding"].shape
  layers = sum(1 for k in params if re.fullmatch(r"layer_\d+_q", k))
  return {"vocab_size": int(vocab), "width": int(width), "layers": layers,
          "heads": heads or max(1, int(width) // 64), "mlp_width": int(params["layer_0_fc1"]["kernel"].shape[1]),
          "max_length": int(params["position_embedding"].shape[0]), "activation": activation,
          "layer_norm_eps": 1e-5}


def clip_token_ids(tokenizer, texts, max_length: int) -> np.ndarray:
  """int32 token ids [B, max_length] of `texts`, padded and truncated as diffusers' pipelines do."""
  return np.asarray(tokenizer(list(texts), padding="max_length", truncation=True,
                              max_length=max_length, return_tensors="np").input_ids, np.int32)


def load_tokenizer(directory: str):
  """transformers' CLIPTokenizer from a pipeline's tokenizer/ (vocab.json, merges.txt)."""
  try:
    from transformers import CLIPTokenizer
  except ImportError:
    raise ConversionError("tokenising prompts needs the transformers package: "
                          "pip install 'transformers>=5,<6'") from None
  if not os.path.isdir(directory):
    raise ConversionError(f"{directory} not found: the pipeline's tokenizer/ folder")
  return CLIPTokenizer.from_pretrained(directory)
