"""What people look at: image grids and curves, written as PNG (Pillow, matplotlib)."""
from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
from PIL import Image


def to_uint8(x) -> np.ndarray:
  """[-1, 1] floats -> uint8 in [0, 255] (the rounding of the original code)."""
  return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def grid(images: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
  """[N, H, W, C] uint8 -> one [rows*(H+pad)+pad, cols*(W+pad)+pad, C] uint8 image."""
  n, h, w, c = images.shape
  ncols = ncols or int(math.ceil(math.sqrt(n)))
  nrows = int(math.ceil(n / ncols))
  out = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, ncols)
    out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = img
  return out


def save_png(image: np.ndarray, path: str, min_size: int = 256) -> str:
  """Write a uint8 HWC image; small ones are enlarged (nearest) so they can be seen."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  scale = max(1, min_size // max(1, min(img.size)))
  if scale > 1:
    img = img.resize((img.size[0] * scale, img.size[1] * scale), Image.NEAREST)
  img.save(path)
  return path


def save_grid(images, path: str, ncols: int | None = None) -> str:
  """[-1, 1] float or uint8 [N, H, W, C] images -> a PNG grid."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    images = to_uint8(images)
  return save_png(grid(images, ncols), path)


def save_curves(path: str, x: Sequence[float], curves: dict, xlabel: str, ylabel: str,
                title: str = "", logy: bool = False) -> str:
  """Line plot of named curves against x as a PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
  for name, y in curves.items():
    ax.plot(x, y, label=name)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if logy:
    ax.set_yscale("log")
  if title:
    ax.set_title(title)
  if len(curves) > 1:
    ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path)
  plt.close(fig)
  return path


def read_image(path: str, multiple: int = 1, height: int | None = None,
               width: int | None = None) -> np.ndarray:
  """An image file as uint8 RGB [H, W, 3] (EXIF orientation applied), resized (bicubic) to
  height x width, by default its own size rounded down to a multiple of `multiple` (for
  img2img: what the decoder and the U-Net's levels divide evenly, 64 for SD; diffusers rounds
  to 8)."""
  from PIL import ImageOps
  with Image.open(path) as opened:
    img = ImageOps.exif_transpose(opened).convert("RGB")
  f = multiple
  size = (width or max(f, img.width // f * f), height or max(f, img.height // f * f))
  return np.asarray(img.resize(size, Image.BICUBIC) if size != img.size else img)


def binary_masks(masks, shape) -> np.ndarray:
  """bool masks of `shape` [B, H, W] from [B, H, W] or [B, H, W, 1]: set where >= 0.5 (floats,
  bools) or >= 128 (uint8: white), as diffusers binarises inpainting masks."""
  masks = np.asarray(masks)
  masks = masks[..., 0] if masks.ndim == 4 and masks.shape[-1] == 1 else masks
  if masks.shape != tuple(shape):
    raise ValueError(f"masks of shape {masks.shape}; the images need {tuple(shape)}")
  return (masks >= 128) if masks.dtype == np.uint8 else (masks >= 0.5)


def unit_range(images, batch: int, height: int, width: int, name: str) -> np.ndarray:
  """uint8 images [B or 1, height, width, 3] as float32 in [0, 1], [batch, ...] (e.g. a
  ControlNet's hint)."""
  images = np.asarray(images)
  images = images[None] if images.ndim == 3 else images
  want = (height, width, 3)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != want:
    raise ValueError(f"{name}: uint8 [B or 1, {height}, {width}, 3] (the output's size); got "
                     f"{images.dtype} {images.shape}")
  return np.broadcast_to(images.astype(np.float32) / 255.0, (batch,) + want)
