"""FreeU (Si et al. 2023, "FreeU: Free Lunch in Diffusion U-Net"): at inference, the two
deepest levels of a U-Net's up path amplify half of the backbone's channels by b and damp the
lowest frequencies of the skip features by s, with no training. As diffusers'
`unet.enable_freeu(s1, s2, b1, b2)` (its apply_freeu and fourier_filter) computes it, so that
images match; the FreeU authors suggest e.g. s1, s2, b1, b2 = 0.9, 0.2, 1.2, 1.4 for SD 1.x,
0.9, 0.2, 1.1, 1.2 for SD 2.x and 0.6, 0.4, 1.1, 1.2 for SDXL.
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp


def check_freeu(freeu: Sequence[float]) -> tuple[float, ...]:
  """The four factors (s1, s2, b1, b2) as floats, or () for none; anything else is refused."""
  freeu = tuple(freeu or ())
  try:
    if len(freeu) in (0, 4):
      return tuple(float(v) for v in freeu)
  except (TypeError, ValueError):
    pass
  raise ValueError(f"freeu={freeu}: give four numbers, s1, s2, b1, b2 (e.g. 0.9, 0.2, 1.2, 1.4 "
                   "for SD 1.x), or none")


def fourier_filter(x, threshold: int, scale: float):
  """x [B, H, W, C] with its 2*threshold x 2*threshold lowest spatial frequencies (centred as
  fftshift centres them, so the -threshold..threshold-1 band) times `scale`, in float32."""
  h, w = x.shape[1:3]
  freq = jnp.fft.fftshift(jnp.fft.fft2(x.astype(jnp.float32), axes=(1, 2)), axes=(1, 2))
  rows = jnp.abs(jnp.arange(h) - h // 2 + 0.5) < threshold  # h//2 - t <= row < h//2 + t
  cols = jnp.abs(jnp.arange(w) - w // 2 + 0.5) < threshold
  mask = jnp.where(rows[:, None] & cols[None, :], scale, 1.0)[None, :, :, None]
  freq = jnp.fft.ifftshift(freq * mask, axes=(1, 2))
  return jnp.fft.ifft2(freq, axes=(1, 2)).real.astype(x.dtype)


def apply_freeu(stage: int, h, skip, freeu: Sequence[float]):
  """(h, skip) before the up path concatenates them; stage: 0 for the deepest level, 1 for the
  next (the others pass unchanged), freeu = (s1, s2, b1, b2)."""
  if not freeu or stage > 1 or not all(freeu):  # diffusers: a factor of 0 turns it off
    return h, skip
  s, b = freeu[stage], freeu[2 + stage]
  half = h.shape[-1] // 2
  h = jnp.concatenate([h[..., :half] * jnp.asarray(b, h.dtype), h[..., half:]], axis=-1)
  return h, fourier_filter(skip, 1, s)
