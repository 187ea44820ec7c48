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


SCHEDULE_KEYS = ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "posterior_mean_coef1",
                 "posterior_log_variance_clipped")


def schedule_tables(torch, config, device, dtype=None) -> dict:
  """Our process's coefficients (diffusion.py's, of config.diffusion) that the peer's step reads,
  as torch tensors on `device`, computed once outside the timed step; with log(beta_t)."""
  from diffusion_jax import diffusion as dm
  coefs = dm.from_config(config.diffusion).coefs
  tables = {k: np.asarray(coefs[k]) for k in SCHEDULE_KEYS}
  tables["log_betas"] = np.log(np.asarray(coefs["betas"]))
  return {k: torch.tensor(v, dtype=dtype or torch.float32, device=device)
          for k, v in tables.items()}


def q_sample(tables, x0, t, noise):
  """x_t = sqrt(alphabar_t) x_0 + sqrt(1 - alphabar_t) eps (eq. 4), NCHW."""
  view = lambda k: tables[k][t].view(-1, 1, 1, 1)
  return view("sqrt_alphas_cumprod") * x0 + view("sqrt_one_minus_alphas_cumprod") * noise


def vlb_term(torch, out, x0, x_t, t, tables, channels: int):
  """The hybrid loss's bound term for a learned (range) variance, as ours computes it: the KL
  of q(x_{t-1} | x_t, x_0) from the model's Gaussian, its mean from the stopped eps (t = 0's
  decoder term aside: the cost is the same). tables: `schedule_tables`."""
  eps, v = out[:, :channels].detach(), out[:, channels:]
  view = lambda k: tables[k][t].view(-1, 1, 1, 1)
  log_post = view("posterior_log_variance_clipped")
  x0_pred = (x_t - view("sqrt_one_minus_alphas_cumprod") * eps) / view("sqrt_alphas_cumprod")
  frac = (v + 1) / 2
  log_var = frac * view("log_betas") + (1 - frac) * log_post
  diff = view("posterior_mean_coef1") * (x0 - x0_pred)  # the posterior mean minus the model's
  kl = 0.5 * (-1 + log_var - log_post + torch.exp(log_post - log_var)
              + diff ** 2 * torch.exp(-log_var))
  return kl.mean() / float(np.log(2.0))
