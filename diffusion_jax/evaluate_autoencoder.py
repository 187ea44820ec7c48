"""Eval mode of an autoencoder (stage "autoencoder"): how well it reconstructs the test split.

The LDM paper's first-stage figures (Rombach et al. 2022, Tab. 8): PSNR, LPIPS and rFID, each
of D(E(x)) (the posterior's mean) against x over eval.num_examples images of eval.split.
PSNR is per image on the 8-bit images (both quantised as a PNG would be), then averaged; LPIPS
(VGG, lpips v0.1) is the mean distance; rFID is the Frechet distance between the Inception
statistics of the reconstructions and of the same originals. Written to workdir/eval/<step>.json
with a PNG of the first images beside their reconstructions.
"""
from __future__ import annotations

import os
import time

import jax
import numpy as np
from absl import logging

from diffusion_jax import data, fid, parallel, xla_options
from diffusion_jax.images import save_grid, to_uint8
from diffusion_jax.train_autoencoder import lpips_perceptual, restore_autoencoder
from diffusion_jax.validate import parse_metrics


def psnr_uint8(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """PSNR in dB of each uint8 image pair [B, H, W, C] (infinite where they are equal)."""
  mse = np.mean(np.square(x.astype(np.float64) - y.astype(np.float64)), axis=(1, 2, 3))
  with np.errstate(divide="ignore"):
    return 10.0 * np.log10(255.0 ** 2 / mse)


def _lpips_fn(config, mesh):
  """LPIPS distances [B] of two image batches, as the training loss computes them."""
  from diffusion_jax.lpips import load_lpips_params
  params = jax.device_put(load_lpips_params(config.autoencoder.lpips_path),
                          parallel.replicated(mesh))
  # the weights as an argument, not as constants in the program
  fn = xla_options.jit(lambda p, x, y: lpips_perceptual(p)(x, y))
  return lambda x, y: fn(params, x, y)


def run_autoencoder_eval(config, workdir: str) -> str:
  """Score the newest (or sampling.checkpoint_step's) autoencoder; returns the JSON's path."""
  from diffusion_jax import fid_eval
  from diffusion_jax.evaluate import _write_result
  e = config.eval
  metrics = parse_metrics(e.metrics)
  # missing weight files are said before any work
  inception = fid_eval.load_inception(config) if "fid" in metrics else None
  trainer, step, params = restore_autoencoder(config, workdir, config.sampling.checkpoint_step)
  lpips = _lpips_fn(config, trainer.mesh) if "lpips" in metrics else None
  scorers = ({k: fid_eval.InceptionScorer(inception, trainer.mesh) for k in ("orig", "rec")}
             if inception is not None else {})
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  psnrs, dists, t0, n_dev = [], [], time.time(), trainer.mesh.size
  for i, batch in enumerate(data.eval_images(config, e.split, e.num_examples, e.batch_size)):
    rec = np.clip(trainer.reconstruct(params, batch), -1.0, 1.0)
    orig8, rec8 = to_uint8(batch), to_uint8(rec)
    psnrs.append(psnr_uint8(orig8, rec8))
    if lpips is not None:
      b = batch.shape[0]
      pair = [parallel.replicated_to_global(parallel.pad_to_multiple(a, n_dev), trainer.mesh)
              for a in (batch, rec)]
      dists.append(parallel.to_host(lpips(*pair))[:b])
    for name, images in (("orig", orig8), ("rec", rec8)):
      if name in scorers:
        scorers[name].add(images)
    if i == 0 and jax.process_index() == 0:
      pairs = np.stack([orig8, rec8], axis=1).reshape((-1,) + orig8.shape[1:])[:64]
      save_grid(pairs, os.path.join(out_dir, f"{step}_reconstructions.png"), 8)
    logging.log_every_n_seconds(logging.INFO, "Reconstructed %d / %d images (%.1f img/s)", 30,
                                sum(map(len, psnrs)), e.num_examples,
                                sum(map(len, psnrs)) / (time.time() - t0))
  if not psnrs:
    raise data.DataError(f"no {e.split} images to evaluate")
  psnr = np.concatenate(psnrs)
  result = {"step": step, "num_examples": int(psnr.size), "settings": {
      "metrics": list(metrics), "split": e.split, "autoencoder": config.autoencoder.to_dict()}}
  if "psnr" in metrics:
    finite = psnr[np.isfinite(psnr)]
    result.update(psnr=float(np.mean(finite)) if finite.size else float("inf"),
                  psnr_std=float(np.std(finite)) if finite.size else 0.0,
                  exact_reconstructions=int(psnr.size - finite.size))
  if dists:
    result["lpips"] = float(np.mean(np.concatenate(dists)))
  if scorers:
    mu_r, sigma_r = scorers["rec"].stats.mean_and_cov()
    mu_o, sigma_o = scorers["orig"].stats.mean_and_cov()
    result["rfid"] = fid.frechet_distance(mu_r, sigma_r, mu_o, sigma_o)
  logging.info("Autoencoder at step %d on %d %s images: %s", step, psnr.size, e.split,
               ", ".join(f"{k} {result[k]:.4f}" for k in ("psnr", "lpips", "rfid") if k in result))
  return _write_result(result, os.path.join(out_dir, f"{step}.json"))
