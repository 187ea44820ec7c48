"""Text-conditional training and sampling (Rombach et al. 2022, Sec. 3.3): captions -> CLIP token
ids (in the data pipeline) -> a frozen text encoder tau(y) -> the context [B, 77, width] the
U-Net cross-attends to (Eq. 3), as Stable Diffusion is trained and fine-tuned.

config.text:
  encoder: "learned" (LDM's: a transformer trained with the U-Net on byte tokens; text.layers,
    text.max_length; width model.context_dim), or
    a local directory with a CLIP text encoder and its tokenizer: a diffusers Stable
    Diffusion pipeline (text_encoder/, tokenizer/), or a transformers CLIPTextModel directory
    (config.json, model.safetensors) with the tokenizer's vocab.json and merges.txt beside it.
    Frozen; read at every start (not part of the checkpoints). model.context_dim must be its
    width (768 for SD 1.x's, 1024 for SD 2.x's).
  caption_template: captions of labelled data, "a photo of a {}" with the class names
    (Fashion-MNIST's, CIFAR-10's, a folder's class subfolders); an image folder's own captions
    (metadata.jsonl or <image>.txt, data.py) take precedence.
  dropout: the probability that a training caption is replaced by the empty one (classifier-free
    guidance: the unconditional model in the same network; SD: 0.1).
Sampling cycles through sampling.prompts (or, when empty, the captions of the classes) and
guides with sampling.guidance_scale against the empty prompt.
"""
from __future__ import annotations

import functools
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from diffusion_jax import parallel, xla_options


LEARNED = "learned"  # text.encoder: a transformer trained with the model (LearnedText)


class TextConditioningError(ValueError):
  pass


def _part(directory: str, name: str) -> str:
  """The pipeline's sub-folder `name` (tokenizer/, text_encoder/) if there is one, else the
  directory itself."""
  sub = os.path.join(directory, name)
  return sub if os.path.isdir(sub) else directory


class TextEncoder:
  """A frozen CLIP text encoder with its tokenizer, its weights replicated over the mesh.
  tokenize(captions) -> int32 ids [B, L] (host); encode(ids) -> the context [B, L, width]."""

  def __init__(self, directory: str, mesh, dtype=jnp.float32):
    from diffusion_jax.convert_clip import load_text_encoder
    from diffusion_jax.models.clip_text import CLIPTextEncoder
    from diffusion_jax.convert_clip import load_tokenizer
    if not os.path.isdir(directory):
      raise TextConditioningError(
          f"text.encoder={directory!r} is not a directory: point it at a local Stable Diffusion "
          "pipeline (text_encoder/, tokenizer/) or a CLIPTextModel directory with its tokenizer")
    fields, params = load_text_encoder(_part(directory, "text_encoder"))
    self.tokenizer = load_tokenizer(_part(directory, "tokenizer"))
    self.module = CLIPTextEncoder(**fields, dtype=dtype)
    self.width, self.max_length = int(fields["width"]), int(fields["max_length"])
    self._compile(mesh, jax.device_put(params, parallel.replicated(mesh)))

  def _compile(self, mesh, params):
    """The jitted encoders (and the empty caption's ids) on `mesh`."""
    self.mesh, self.params = mesh, params
    batch, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    self._apply = xla_options.jit(self._context, out_shardings=batch)
    self._apply_replicated = xla_options.jit(self._context, out_shardings=replicated)
    self._apply_dropped = xla_options.jit(self._dropped_context, out_shardings=batch)
    self._lock = threading.Lock()  # grain's reader threads share the tokenizer
    self._cached = functools.lru_cache(maxsize=65536)(self._tokenize_one)
    self.null_ids = self._cached("")  # the empty caption (and the tokenizer set up, at once)

  def _tokenize_one(self, caption: str) -> np.ndarray:
    from diffusion_jax.convert_clip import clip_token_ids
    with self._lock:
      self._check_length(caption, len(self.tokenizer(caption).input_ids))
      return clip_token_ids(self.tokenizer, [caption], self.max_length)[0]

  def _check_length(self, caption: str, tokens: int) -> None:
    """A warning (the first time) that captions are cut to the encoder's positions."""
    if tokens > self.max_length and not getattr(self, "_warned", False):
      self._warned = True
      logging.warning("captions longer than the text encoder's %d positions are truncated "
                      "(e.g. %d tokens: %r)", self.max_length, tokens, caption[:200])

  def _context(self, params, ids):
    return self.module.apply({"params": params}, ids).astype(jnp.float32)

  def _dropped_context(self, params, ids, key, rate):
    drop = jax.random.bernoulli(key, rate, (ids.shape[0],))
    return self._context(params, jnp.where(drop[:, None], self.null_ids[None], ids))

  def tokenize(self, captions) -> np.ndarray:
    """Token ids [B, L] of `captions` (padded and truncated to the encoder's positions)."""
    return np.stack([self._cached(str(c)) for c in captions])

  def encode(self, ids, key=None, dropout: float = 0.0):
    """The context [B, L, width] of token ids [B, L] (on the mesh, batch-sharded); with a key,
    each caption is the empty one with probability `dropout` (classifier-free guidance)."""
    if key is not None and dropout > 0:
      return self._apply_dropped(self.params, ids, key, jnp.float32(dropout))
    return self._apply(self.params, ids)

  def null_context(self) -> jax.Array:
    """The empty caption's context [1, L, width], replicated over the mesh."""
    ids = jax.device_put(self.null_ids[None], parallel.replicated(self.mesh))
    return self._apply_replicated(self.params, ids)

  def contexts(self, prompts) -> jax.Array:
    """The context of host prompts, batch-sharded (len(prompts) a multiple of the devices)."""
    return self.encode(parallel.replicated_to_global(self.tokenize(prompts), self.mesh))

  @property
  def context_spec(self) -> jax.ShapeDtypeStruct:
    """What the model receives per caption: the encodings [L, width]."""
    return jax.ShapeDtypeStruct((self.max_length, self.width), jnp.float32)


class LearnedText(TextEncoder):
  """text.encoder = "learned": LDM's text-to-image setting (Sec. 4.3.1), a transformer tau_theta
  trained with the U-Net (models/text_unet.py), so no weights or vocabulary files are needed:
  captions become their UTF-8 bytes between a begin and an end token, padded to max_length
  (vocabulary 259; LDM used BERT's tokenizer). Here encode() only drops captions; the model
  encodes the ids itself."""
  vocab_size = 259
  BOS, EOS, PAD = 256, 257, 258

  def __init__(self, width: int, max_length: int, mesh):
    self.width, self.max_length = int(width), int(max_length)
    self._compile(mesh, None)

  def _tokenize_one(self, caption: str) -> np.ndarray:
    body = list(caption.encode("utf-8"))
    self._check_length(caption, len(body) + 2)  # text.max_length counts begin and end
    body = body[: self.max_length - 2]
    ids = [self.BOS] + body + [self.EOS]
    return np.asarray(ids + [self.PAD] * (self.max_length - len(ids)), np.int32)

  def _context(self, params, ids):
    return ids

  @property
  def context_spec(self) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((self.max_length,), jnp.int32)


def load_text_encoder(config, mesh) -> TextEncoder | None:
  """config.text.encoder's TextEncoder (None without one), its width checked against the
  U-Net's model.context_dim."""
  text = config.get("text", {})
  if not text.get("encoder"):
    return None
  if text.encoder == LEARNED:
    return LearnedText(config.model.context_dim, text.max_length, mesh)
  from diffusion_jax.models import DTYPES
  encoder = TextEncoder(text.encoder, mesh, DTYPES[config.model.dtype])
  if config.model.context_dim != encoder.width:
    raise TextConditioningError(
        f"the text encoder in {text.encoder} gives {encoder.width} features per token; the "
        f"U-Net attends to model.context_dim={config.model.context_dim}: set "
        f"--config.model.context_dim={encoder.width}")
  return encoder


def class_captions(template: str, class_names) -> list[str]:
  """template.format(name) for each class name ("a photo of a {}" -> "a photo of a sneaker")."""
  if "{}" not in template:
    raise TextConditioningError(f"text.caption_template={template!r} needs a '{{}}' where the "
                                "class name goes, e.g. 'a photo of a {}'")
  return [template.format(name) for name in class_names]
