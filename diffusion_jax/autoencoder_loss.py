"""The KL autoencoder's objective (Rombach et al. 2022, App. G; CompVis' LPIPSWithDiscriminator).

Generator (the autoencoder), per batch of B images:
  rec   = |x - x^| + w_p LPIPS(x, x^)            per pixel (LPIPS, one value per image, is
                                                  added to every pixel, as in theirs)
  nll   = sum(rec / exp(logvar) + logvar) / B    logvar a scalar (0: CompVis' optimiser never
                                                  updates it)
  kl    = sum KL(q(z|x) || N(0, I)) / B
  g     = -mean D(x^)
  loss  = nll + w_kl kl + lambda f(step) g,      lambda = w_d ||d nll/dW|| / (||d g/dW|| + 1e-4)
                                                  at the decoder's last conv W, clipped to
                                                  [0, 1e4], not differentiated
Discriminator: f(step) (hinge or vanilla loss of D(x), D(x^)); f(step) = disc_factor once
step >= disc_start, else 0. Plain JAX: the networks come in as functions.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.models.autoencoder import kl_to_standard_normal


def hinge_d_loss(logits_real, logits_fake):
  """0.5 (E[relu(1 - D(x))] + E[relu(1 + D(x^))])."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real, logits_fake):
  """0.5 (E[softplus(-D(x))] + E[softplus(D(x^))]), the non-saturating GAN's."""
  return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def nll_loss(x, x_rec, perceptual, logvar=0.0, perceptual_weight: float = 1.0):
  """sum over pixels of (|x - x^| + w_p LPIPS) / exp(logvar) + logvar, averaged over the batch.

  perceptual: [B] LPIPS distances (None: no perceptual term).
  """
  rec = jnp.abs(x - x_rec)
  if perceptual is not None and perceptual_weight > 0:
    rec = rec + perceptual_weight * perceptual.reshape((-1,) + (1,) * (x.ndim - 1))
  nll = rec / jnp.exp(logvar) + logvar
  return jnp.sum(nll) / x.shape[0]


def vq_loss(h, z_q, commitment: float = 0.25):
  """VQ-VAE's codebook and commitment terms (van den Oord et al. 2017, Eq. 3), batch means:
  ||sg(h) - z_q||^2 moves the chosen codebook vectors, beta ||h - sg(z_q)||^2 the encoder.
  (taming-transformers' `legacy` quantiser, LDM's vq-f4, puts beta on the first term.)"""
  sg = jax.lax.stop_gradient
  return (jnp.mean(jnp.square(sg(h) - z_q))
          + commitment * jnp.mean(jnp.square(h - sg(z_q))))


def codebook_usage(indices, codebook_size: int):
  """The share of the codebook's vectors chosen anywhere in the batch (a collapse shows as a
  small share)."""
  counts = jnp.bincount(indices.reshape(-1), length=codebook_size)
  return jnp.mean((counts > 0).astype(jnp.float32))


def kl_loss(mean, logvar):
  """The posterior's KL to the prior, summed over the latent, averaged over the batch."""
  return jnp.mean(kl_to_standard_normal(mean, logvar))


def adaptive_weight(nll_grad, g_grad, disc_weight: float = 1.0):
  """w_d ||grad nll|| / (||grad g|| + 1e-4), clipped to [0, 1e4], without gradient: balances
  the GAN term against the reconstruction at the decoder's last layer (taming's)."""
  ratio = jnp.linalg.norm(nll_grad) / (jnp.linalg.norm(g_grad) + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, 1e4) * disc_weight)
