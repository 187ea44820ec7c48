"""ControlNet conditioning of a Stable Diffusion pipeline, as diffusers' StableDiffusion(XL)
ControlNet(Img2Img, Inpaint)Pipeline and MultiControlNetModel take it: the hints, one weight
per ControlNet, the part of the chain each acts in (control_guidance_start / _end) and guess
mode.

- control_guidance (start, end), fractions of the steps that run: the i-th of n steps uses a
  ControlNet where i / n >= start and (i + 1) / n <= end (diffusers' controlnet_keep; one pair,
  or one per ControlNet);
- guess_mode: the ControlNets condition the prompts' half of a guided batch alone (the negative
  prompts' gets no residuals), their residuals scaled from 0.1 at the first skip to 1 at the
  middle block (logspace), so that a hint steers without a prompt that describes it.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from diffusion_jax.images import unit_range


@dataclasses.dataclass(frozen=True)
class ControlOptions:
  """What a call asks of its ControlNets (hashable: a static argument of the compiled chain)."""
  scales: tuple[float, ...]
  starts: tuple[float, ...]
  ends: tuple[float, ...]
  guess_mode: bool = False

  def keep(self, num_steps: int) -> tuple[tuple[float, ...], ...]:
    """Per ControlNet, 1.0 at the steps (of the num_steps that run) it acts in, else 0.0."""
    i = np.arange(num_steps)
    return tuple(tuple(float(v) for v in 1.0 - ((i / num_steps < s) | ((i + 1) / num_steps > e)))
                 for s, e in zip(self.starts, self.ends))


def _per_controlnet(value, n: int, name: str) -> tuple[float, ...]:
  values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * n
  if len(values) != n:
    raise ValueError(f"{len(values)} {name} for {n} ControlNets")
  return tuple(float(v) for v in values)


def control_inputs(controlnets, image, scale, guidance, guess_mode: bool, shape,
                   factor: int) -> tuple[tuple | None, ControlOptions | None]:
  """(the hints, [B, H, W, 3] in [0, 1] each at the output's size, diffusers' control image
  processing; the options), or (None, None) without ControlNets and an image. image: one per
  ControlNet (a list where there are several); scale: one, or one per ControlNet; guidance:
  (start, end), each one or one per ControlNet; shape: the latents' [B, h, w, C], factor the
  autoencoder's downsampling."""
  if image is None and controlnets is None:
    if guess_mode or tuple(guidance) != (0.0, 1.0):
      raise ValueError("guess_mode, control_guidance: this pipeline has no ControlNet")
    return None, None
  if controlnets is None:
    raise ValueError("control_image: this pipeline has no ControlNet (load(..., controlnet=))")
  if image is None:
    raise ValueError("this pipeline has a ControlNet: pass control_image")
  n = len(controlnets)
  images = list(image) if isinstance(image, (list, tuple)) else [image]
  if len(images) != n:
    raise ValueError(f"{len(images)} control images for {n} ControlNets")
  hints = tuple(unit_range(a, shape[0], shape[1] * factor, shape[2] * factor, "control_image")
                for a in images)
  if len(guidance) != 2:
    raise ValueError(f"control_guidance: (start, end); got {guidance!r}")
  starts, ends = (_per_controlnet(v, n, name) for v, name in zip(
      guidance, ("control_guidance starts", "control_guidance ends")))
  for s, e in zip(starts, ends):
    if not 0.0 <= s < e <= 1.0:
      raise ValueError(f"control_guidance ({s}, {e}): 0 <= start < end <= 1 (fractions of the "
                       "steps)")
  return hints, ControlOptions(_per_controlnet(scale, n, "control scales"), starts, ends,
                               bool(guess_mode))


def controlled_unet(unet, controlnets, options: ControlOptions, timesteps):
  """models.controlnet.ControlledUNet for a chain whose network sees `timesteps` in order."""
  from diffusion_jax.models.controlnet import ControlledUNet
  keep = options.keep(len(timesteps))
  if all(min(k) == 1.0 for k in keep):  # every ControlNet at every step
    timesteps, keep = (), ()
  return ControlledUNet(unet, tuple(controlnets), options.scales, options.guess_mode,
                        tuple(float(t) for t in timesteps), keep)
