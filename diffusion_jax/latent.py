"""Latent diffusion (Rombach et al. 2022, Sec. 3.2): the diffusion model learns the latents
z = s (E(x) - shift) of a frozen KL autoencoder instead of the pixels, and its samples are
decoded by D(z / s + shift).

`config.latent.autoencoder` names the first stage: the workdir of an autoencoder run
(stage "autoencoder"; its newest checkpoint, its layout from `config.autoencoder`), or public
weights (`convert_autoencoder.load_autoencoder`: a diffusers directory or one .safetensors
file), whose latent shape must then agree with `config.autoencoder`. z is a sample of the
posterior, as LDM's `get_first_stage_encoding`. The scale s is `config.latent.scale_factor`,
else the one published beside the weights (diffusers' config.json), else LDM's `scale_by_std`:
1 / std of the latents of the first training batch, kept in the checkpoints' metadata so
that resumed runs, sampling and evaluation use the same s.

The encoder and decoder run in their own compiled functions, with their weights as arguments
(not constants folded into the programs): a train step sees latents as its images, so the
diffusion step, the samplers and the checkpoints are the pixel-space ones.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import parallel, xla_options
from diffusion_jax.models.autoencoder import AutoencoderKL, sample_gaussian

SCALE_KEY = "latent_scale_factor"  # in the checkpoints' metadata


class FirstStageError(ValueError):
  pass


def latent_shape(config) -> tuple[int, int] | None:
  """(size, channels) of the latents `config` diffuses, or None in pixel space."""
  if not config.get("latent", {}).get("autoencoder"):
    return None
  a = config.autoencoder
  return config.data.image_size // 2 ** (len(a.ch_mult) - 1), a.z_channels


def model_input_shape(config) -> tuple[int, int]:
  """(size, channels) of what the diffusion model sees: latents, or the images."""
  return latent_shape(config) or (config.data.image_size, config.data.channels)


@dataclasses.dataclass
class FirstStage:
  """A frozen autoencoder on the mesh, and the latent scaling."""
  model: AutoencoderKL
  params: Any
  mesh: Any
  scale_factor: float | None = None
  shift_factor: float = 0.0

  def __post_init__(self):
    model, sharding = self.model, parallel.batch_sharding(self.mesh)

    # key None: the posterior's mean; a VQ first stage: h, before quantisation (LDM's)
    def encode(params, scale, shift, x, key=None):
      mean, logvar = model.apply({"params": params}, x, method=model.encode)
      z = mean if key is None or logvar is None else sample_gaussian(key, mean, logvar)
      return (z - shift) * scale

    def decode(params, scale, shift, z):
      x = model.apply({"params": params}, z / scale + shift, method=model.decode)
      return jnp.clip(x, -1.0, 1.0)
    self._encode = xla_options.jit(encode, out_shardings=sharding)
    # both traceable inside other programs (the samplers, the figures)
    self.encode_latents, self.decode_latents = encode, decode

  def scaling(self) -> tuple[float, float]:
    if self.scale_factor is None:
      raise FirstStageError("the latent scale factor is not known yet (set "
                            "--config.latent.scale_factor, or train: it is estimated then)")
    return float(self.scale_factor), float(self.shift_factor)

  def encode(self, images, key, scale: float | None = None):
    """Images (a global array or host array of the whole batch) -> scaled latents."""
    scale, shift = (scale, self.shift_factor) if scale is not None else self.scaling()
    return self._encode(self.params, jnp.float32(scale), jnp.float32(shift), images, key)

  def estimate_scale_factor(self, images, key) -> float:
    """LDM's scale_by_std: 1 / std of the unscaled latents of `images`."""
    z = parallel.to_host(self.encode(images, key, scale=1.0))
    return float(1.0 / np.std(z.astype(np.float64)))


def load_first_stage(config, mesh) -> FirstStage | None:
  """The first stage of `config.latent.autoencoder` on `mesh`, or None in pixel space."""
  src = config.get("latent", {}).get("autoencoder")
  if not src:
    return None
  src = os.path.expanduser(src)
  scaling = {"scale_factor": None, "shift_factor": 0.0}
  if os.path.isdir(os.path.join(src, "checkpoints")):  # an autoencoder run's workdir
    from diffusion_jax.train_autoencoder import restore_autoencoder
    trainer, _, params = restore_autoencoder(
        config, src, mesh=mesh, hint="train the autoencoder there first (--mode=train with "
        "its stage='autoencoder' config)")
    model = trainer.model
  else:
    from diffusion_jax.convert_autoencoder import load_autoencoder
    from diffusion_jax.models import DTYPES
    try:
      fields, params, scaling = load_autoencoder(src)
    except (OSError, ValueError) as e:
      raise FirstStageError(f"config.latent.autoencoder={src!r}: {e}") from None
    m = config.model
    model = AutoencoderKL(**fields, dtype=DTYPES[m.dtype], attention=m.attention,
                          conv=m.get("conv", "auto"), upsample_conv=m.get("upsample_conv", "auto"))
    a = config.autoencoder
    have = (model.downsampling_factor, model.embed_dim)
    want = (2 ** (len(a.ch_mult) - 1), a.z_channels)
    if have != want or model.in_channels != config.data.channels:
      raise FirstStageError(
          f"{src}: an autoencoder with f={have[0]}, {have[1]} latent channels and "
          f"{model.in_channels} image channels; the config describes f={want[0]}, {want[1]} and "
          f"{config.data.channels}: set --config.autoencoder.ch_mult (len {len(model.ch_mult)}), "
          f"--config.autoencoder.z_channels={have[1]}, --config.data.channels="
          f"{model.in_channels}")
  scale = config.latent.scale_factor
  if scale is None:
    scale = scaling["scale_factor"]
  params = jax.device_put(params, parallel.replicated(mesh))
  return FirstStage(model, params, mesh, scale, float(scaling.get("shift_factor") or 0.0))
