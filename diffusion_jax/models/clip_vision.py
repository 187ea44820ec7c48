"""CLIP's vision transformer (Radford et al. 2021; transformers' CLIPVisionModelWithProjection),
the image encoder of IP-Adapter (ip_adapter.py): images [B, 224, 224, 3], normalised as
CLIP's image processor does (`preprocess`), -> the projected embedding of the class token
[B, projection_dim] and the hidden states before the last layer [B, 1 + patches, width].

Patches (a strided convolution, no bias) after a learned class token, learned positions, a
LayerNorm ("pre_layrnorm"), the text tower's pre-LayerNorm layers without the causal mask
(models/clip_text.clip_layer), the class token's final state through a LayerNorm and the
projection. Parameter names: convert_clip.vision_encoder_params.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models.clip_text import ACTIVATIONS, clip_layer

MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIPImageProcessor's image_mean / image_std
STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPVisionEncoder(nn.Module):
  width: int = 1024
  layers: int = 24
  heads: int = 16
  mlp_width: int = 4096
  image_size: int = 224
  patch_size: int = 14
  activation: str = "gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int = 1024
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels):
    """(image_embeds [B, projection_dim], hidden_states[-2] [B, 1 + patches, width]) of
    normalised pixels [B, image_size, image_size, 3], both float32."""
    b, h, w, c = pixels.shape
    if (h, w, c) != (self.image_size, self.image_size, 3):
      raise ValueError(f"the image encoder takes [B, {self.image_size}, {self.image_size}, 3] "
                       f"images; got {pixels.shape}")
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                dtype=self.dtype, name="patch_embedding")(pixels.astype(self.dtype))
    x = x.reshape(b, -1, self.width)
    cls = self.param("class_embedding", nn.initializers.normal(0.02), (self.width,))
    positions = self.param("position_embedding", nn.initializers.normal(0.01),
                           (x.shape[1] + 1, self.width))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, self.width)), x], 1)
    x = x + positions.astype(x.dtype)
    norm = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name=name)
    x = norm("pre_norm")(x)
    penultimate = x
    for i in range(self.layers):
      penultimate = x
      x = clip_layer(x, i, self.heads, self.mlp_width, ACTIVATIONS[self.activation],
                     self.layer_norm_eps, self.dtype, causal=False)
    pooled = norm("post_norm")(x[:, 0])
    embeds = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype,
                      name="visual_projection")(pooled)
    return embeds.astype(jnp.float32), penultimate.astype(jnp.float32)


def preprocess(images, size: int = 224) -> np.ndarray:
  """uint8 images [B, H, W, 3] (or a list of differently sized ones) as transformers'
  CLIPImageProcessor prepares them: the shorter side resized to `size` (PIL, bicubic), the
  centre size x size crop, scaled to [0, 1] and normalised by CLIP's mean and std ->
  float32 [B, size, size, 3]."""
  from PIL import Image
  out = []
  for image in images:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f"image prompts: uint8 [H, W, 3] images; got {image.dtype} "
                       f"{image.shape}")
    h, w = image.shape[:2]
    short, long = (h, w) if h <= w else (w, h)
    resized_long = int(size * long / short)  # transformers' get_resize_output_image_size
    new_h, new_w = (size, resized_long) if h <= w else (resized_long, size)
    image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    image = image[top:top + size, left:left + size].astype(np.float32) / 255.0
    out.append((image - np.array(MEAN, np.float32)) / np.array(STD, np.float32))
  return np.stack(out)
