"""What benchmarks/run.py compares: the space a config is measured in, and the PyTorch side:
diffusers' network in our model's layout, its forward, and the hybrid loss's bound term as ours
computes it (a module without side effects on import: tests check the peer of each config)."""
from __future__ import annotations

import numpy as np


def measured_space(config) -> str:
  """'pixels', or 'latents': a latent config is measured in latent space, the diffusion network
  on latents of its first stage's shape (the frozen encoder and decoder untimed, as LDM's and
  DiT's throughput figures; no autoencoder checkpoint needed). Text-conditional configs have
  their own benchmark, benchmarks/text_to_image.py."""
  if config.get("text", {}).get("encoder") or config.model.get("context_dim"):
    raise ValueError("a text-conditional (cross-attention) config: measure it with "
                     "benchmarks/text_to_image.py")
  from diffusion_jax import latent
  shape = latent.latent_shape(config)
  if shape is None:
    return "pixels"
  config.data.image_size, config.data.channels = shape
  config.latent.autoencoder = None
  return "latents"


def diffusers_model(config):
  """diffusers' network in our model's layout, random weights: the UNet2DModel or
  DiTTransformer2DModel that diffusion_jax.export writes for `config` (its config.json)."""
  import diffusers
  from diffusion_jax import export
  dit = config.model.name == "dit"
  cfg = export.dit_config(config) if dit else export.unet_config(config)
  cls = diffusers.DiTTransformer2DModel if dit else diffusers.UNet2DModel
  return cls.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})


def forward(net, config):
  """(x, t, labels) -> the network's output; labels None for an unconditional model."""
  if config.model.name == "dit":
    return lambda x, t, y: net(x, timestep=t, class_labels=y).sample
  return lambda x, t, y: net(x, t, class_labels=y).sample


def vlb_term(torch, out, x0, x_t, t, abar, channels: int):
  """The hybrid loss's bound term for a learned (range) variance, as ours computes it: the KL
  of q(x_{t-1} | x_t, x_0) from the model's Gaussian, its mean from the stopped eps (t = 0's
  decoder term aside: the cost is the same)."""
  eps, v = out[:, :channels].detach(), out[:, channels:]
  abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
  beta = 1 - abar / abar_prev
  post_var = beta * (1 - abar_prev) / (1 - abar)
  log_post = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
  view = lambda a: a[t].view(-1, 1, 1, 1)
  c0 = view(beta * abar_prev.sqrt() / (1 - abar))  # x_0's weight in the posterior mean
  x0_pred = (x_t - view((1 - abar).sqrt()) * eps) / view(abar.sqrt())
  frac = (v + 1) / 2
  log_var = frac * view(torch.log(beta)) + (1 - frac) * view(log_post)
  diff = c0 * (x0 - x0_pred)  # the posterior mean minus the model's
  kl = 0.5 * (-1 + log_var - view(log_post) + torch.exp(view(log_post) - log_var)
              + diff ** 2 * torch.exp(-log_var))
  return kl.mean() / float(np.log(2.0))
