"""Textual inversion embeddings (Gal et al. 2023): learned input vectors for new tokens of a
pipeline's CLIP text encoder(s), as diffusers' load_textual_inversion adds them.

A file (.safetensors) holds one embedding of n vectors: {"<token>": [n, width]} (diffusers'
format, the key is the token), {"emb_params": [n, width]} (A1111's; name the token) or SDXL's
{"clip_l": [n, 768], "clip_g": [n, 1280]}, one part per text encoder (name the token). Its n
tokens ("<token>", "<token>_1", ...) are added to the tokenizer(s) and their vectors appended
to the token embedding table; a prompt's "<token>" is expanded to all n before tokenising
(diffusers' maybe_convert_prompt). Pickled files (.bin, .pt) are not read: save the tensors
with safetensors first.
"""
from __future__ import annotations

import copy
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.convert_diffusers import ConversionError

SDXL_PARTS = ("clip_l", "clip_g")  # -> the first and the second text encoder


def read_embedding(path: str, token: str | None = None) -> tuple[str, list[np.ndarray]]:
  """(token, [vectors [n, width] per text encoder: one, or SDXL's two]) of a file."""
  from safetensors.numpy import load_file
  if not (path.endswith(".safetensors") and os.path.isfile(path)):
    raise ConversionError(f"{path!r} is not a .safetensors file (a textual inversion "
                          "embedding; pickled .bin/.pt files: load them with torch and save "
                          "the tensors with safetensors.torch.save_file)")
  state = {k: np.asarray(v, np.float32) for k, v in load_file(path).items()}
  if set(state) == set(SDXL_PARTS):
    parts = [state[k] for k in SDXL_PARTS]
  elif len(state) == 1:
    (key, vectors), = state.items()
    token = token or (None if key == "emb_params" else key)
    parts = [vectors]
  else:
    raise ConversionError(f"{path}: keys {sorted(state)}; a textual inversion file holds one "
                          "embedding ({token: vectors}, {'emb_params': ...} or SDXL's "
                          "{'clip_l': ..., 'clip_g': ...})")
  if not token:
    raise ConversionError(f"{path} does not name its token: pass token='<name>' "
                          "(--embedding=FILE:TOKEN)")
  parts = [v[None] if v.ndim == 1 else v for v in parts]
  if any(v.ndim != 2 for v in parts) or len({len(v) for v in parts}) != 1:
    raise ConversionError(f"{path}: vectors of shapes {[v.shape for v in parts]}; expected "
                          "[n, width], the same n for each text encoder")
  return token, parts


def token_names(token: str, n: int) -> list[str]:
  """The n tokens of an n-vector embedding: token, token_1, ..., token_{n-1}."""
  return [token] + [f"{token}_{i}" for i in range(1, n)]


def expand_prompt(prompt: str, tokenizer) -> str:
  """An added token of a multi-vector embedding replaced by all of its tokens."""
  added = tokenizer.added_tokens_encoder
  for token in set(tokenizer.tokenize(prompt)):
    if token in added:
      names, i = [token], 1
      while f"{token}_{i}" in added:
        names.append(f"{token}_{i}")
        i += 1
      prompt = prompt.replace(token, " ".join(names))
  return prompt


def _extend(tokenizer, encoder, params, token: str, vectors: np.ndarray):
  """(tokenizer copy, encoder module, its parameters) with the embedding's tokens added."""
  table = params["token_embedding"]["embedding"]
  if vectors.shape[1] != table.shape[1]:
    raise ConversionError(f"the embedding's vectors are {vectors.shape[1]} wide; the text "
                          f"encoder's tokens {table.shape[1]}")
  names = token_names(token, len(vectors))
  vocab = tokenizer.get_vocab()
  if any(name in vocab for name in names):
    raise ConversionError(f"token {token!r} is already in the tokenizer's vocabulary: name "
                          "the embedding's token otherwise (token=...)")
  tokenizer = copy.deepcopy(tokenizer)
  tokenizer.add_tokens(names)
  ids = tokenizer.convert_tokens_to_ids(names)
  if ids != list(range(table.shape[0], table.shape[0] + len(names))):
    raise ConversionError(f"the tokenizer gives the new tokens ids {ids}; the text encoder "
                          f"has {table.shape[0]} rows (a tokenizer made for another encoder?)")
  new = jnp.concatenate([table, jnp.asarray(vectors, table.dtype)])
  params = dict(params, token_embedding={"embedding": jax.device_put(new, table.sharding)})
  return tokenizer, encoder.clone(vocab_size=new.shape[0]), params


def with_embedding(pipe, path: str, token: str | None = None):
  """The StableDiffusion pipeline `pipe` with the file's embedding added (the first text
  encoder's, or SDXL's two); `pipe` is left as it was."""
  token, parts = read_embedding(path, token)
  if len(parts) == 2 and pipe.text_encoder_2 is None:
    raise ConversionError(f"{path} is an SDXL embedding (clip_l, clip_g); this pipeline has "
                          "one text encoder")
  if pipe.text_encoder is None and len(parts) != 2:
    raise ConversionError(f"the SDXL refiner reads OpenCLIP bigG's tokens: {path} has no "
                          "clip_g part")
  changes = {"params": dict(pipe.params)}
  if pipe.text_encoder is not None:  # (the refiner has bigG alone)
    tokenizer, encoder, changes["params"]["text"] = _extend(
        pipe.tokenizer, pipe.text_encoder, pipe.params["text"], token, parts[0])
    changes.update(tokenizer=tokenizer, text_encoder=encoder)
  if len(parts) == 2:
    tokenizer_2, encoder_2, text_2 = _extend(pipe.tokenizer_2, pipe.text_encoder_2,
                                             pipe.params["text_2"], token, parts[1])
    changes.update(tokenizer_2=tokenizer_2, text_encoder_2=encoder_2)
    changes["params"]["text_2"] = text_2
  return dataclasses.replace(pipe, **changes)
