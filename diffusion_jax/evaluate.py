"""Eval mode: test-set NLL through the full variational bound (Table 2) and the
rate-distortion curve (Sec. 4.3, Fig. 5), written as JSON and PNG under workdir/eval/."""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import logging

from diffusion_jax import data, parallel, xla_options
from diffusion_jax.images import save_curves
from diffusion_jax.models import denoiser
from diffusion_jax.validate import parse_metrics


def make_bpd_fn(model, diffusion, mesh, clip_denoised: bool = False):
  """jit(params, x0 [B,H,W,C] in [-1,1], key) -> calc_bpd_loop's dict; batch sharded."""
  sharding = parallel.batch_sharding(mesh)

  def run(params, x0, key):
    return diffusion.calc_bpd_loop(denoiser(model, params), x0, key, clip_denoised)

  return xla_options.jit(run, model, in_shardings=(None, sharding, None))


def nll_bits_per_dim(config, model, diffusion, params, mesh, num_examples: int | None = None):
  """Average bound terms over `num_examples` images of config.eval.split.

  Returns {"bits_per_dim", "prior_bpd", "vb_bpd" [T], "x0_mse" [T], "num_examples"}; the
  per-timestep terms are in bits/dim, index t = 0 being the decoder term L_0.
  """
  e = config.eval
  n = num_examples or e.num_examples
  fn = make_bpd_fn(model, diffusion, mesh, e.clip_denoised)
  n_dev = mesh.shape[parallel.DATA]
  sums, count, t0 = None, 0, time.time()
  key = jax.random.PRNGKey(config.training.seed + 7)
  for i, batch in enumerate(data.eval_images(config, e.split, n, e.batch_size)):
    b = batch.shape[0]
    x = parallel.pad_to_multiple(batch, n_dev)  # a short last batch; the padding is dropped
    # every process reads the same images: split them over all devices, none twice
    out = fn(params, parallel.replicated_to_global(x, mesh), jax.random.fold_in(key, i))
    out = {k: parallel.to_host(v)[:b].sum(axis=0) for k, v in out.items()}
    sums = out if sums is None else {k: sums[k] + out[k] for k in out}
    count += b
    logging.info("NLL: %d / %d images, %.4f bits/dim so far (%.1f img/s)", count, n,
                 sums["total_bpd"] / count, count / (time.time() - t0))
  if not count:
    raise data.DataError(f"no {e.split} images to evaluate")
  avg = {k: v / count for k, v in sums.items()}
  return {"bits_per_dim": float(avg["total_bpd"]), "prior_bpd": float(avg["prior_bpd"]),
          "vb_bpd": avg["vb_bpd"].tolist(), "x0_mse": avg["x0_mse"].tolist(),
          "num_examples": count}


def rate_distortion(nll: dict) -> dict:
  """Sec. 4.3: after receiving x_T..x_t, rate = L_T + sum_{s>t} L_s bits/dim, and the
  distortion is the RMSE of x^_0 predicted from x_t, on the 0-255 scale."""
  vb = np.asarray(nll["vb_bpd"])
  rate = nll["prior_bpd"] + np.concatenate([np.cumsum(vb[::-1])[::-1][1:], [0.0]])
  rmse = np.sqrt(np.asarray(nll["x0_mse"])) * 127.5  # [-1, 1] -> [0, 255]
  return {"rate_bpd": rate.tolist(), "distortion_rmse": rmse.tolist(),
          "final_rate_bpd": float(rate[0]), "final_distortion_bpd": float(vb[0]),
          "final_distortion_rmse": float(rmse[0])}


def write_nll_figures(nll: dict, rd: dict, prefix: str):
  t = np.arange(1, len(nll["vb_bpd"]) + 1)  # the paper's 1-indexed t
  save_curves(f"{prefix}_nll_terms.png", t, {"L_{t-1} (bits/dim)": nll["vb_bpd"]}, "t",
              "bits/dim", f"bound terms, total {nll['bits_per_dim']:.3f} bits/dim", logy=True)
  save_curves(f"{prefix}_rate_vs_t.png", t, {"rate": rd["rate_bpd"]}, "t", "rate (bits/dim)",
              "rate (Fig. 5)")
  save_curves(f"{prefix}_distortion_vs_t.png", t, {"distortion": rd["distortion_rmse"]}, "t",
              "distortion (RMSE, 0-255)", "distortion (Fig. 5)")
  save_curves(f"{prefix}_rate_distortion.png", rd["rate_bpd"],
              {"distortion": rd["distortion_rmse"]}, "rate (bits/dim)",
              "distortion (RMSE, 0-255)", "rate-distortion (Fig. 5)")


def run_eval_mode(config, workdir: str) -> str:
  """Evaluate the EMA parameters of the newest (or given) checkpoint, or a given samples.npz;
  write eval/<step>.json (eval/<npz name>.json) with the metrics and the settings used."""
  if config.get("stage", "diffusion") == "autoencoder":
    from diffusion_jax.evaluate_autoencoder import run_autoencoder_eval
    return run_autoencoder_eval(config, workdir)
  from diffusion_jax import fid_eval
  from diffusion_jax.sample import Sampler, restore_ema_params
  e, s = config.eval, config.sampling
  metrics = parse_metrics(e.metrics)
  scored = {"fid", "is"} & set(metrics)
  # a missing weight file is said before any sampling
  inception = fid_eval.load_inception(config) if scored else None
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  settings = {"metrics": list(metrics), "split": e.split, "num_examples": e.num_examples,
              "clip_denoised": e.clip_denoised, "diffusion": config.diffusion.to_dict()}
  if e.samples_npz:  # score given images: no model needed
    name = os.path.splitext(os.path.basename(e.samples_npz))[0]
    result = {"samples_npz": os.path.abspath(e.samples_npz), "settings": settings}
    result.update(fid_eval.fid_and_is(config, metrics,
                                      fid_eval.iter_npz_images(e.samples_npz, e.batch_size),
                                      inception, out_dir))
    return _write_result(result, os.path.join(out_dir, f"{name}.json"))

  trainer, step, params = restore_ema_params(config, workdir, s.checkpoint_step)
  result = {"step": step, "settings": settings}
  if scored:
    settings["sampling"] = s.to_dict()
    sampler = Sampler(config, trainer.model, trainer.diffusion, trainer.mesh,
                      min(s.batch_size, e.num_examples), trainer.first_stage, trainer.text)
    logging.info("Scoring %d samples (%s) of step %d", e.num_examples, s.method, step)
    result.update(fid_eval.fid_and_is(config, metrics,
                                      sampler.batches(params, e.num_examples, s.seed),
                                      inception, out_dir, trainer.mesh))
  if "nll" in metrics:
    nll = nll_bits_per_dim(config, trainer.model, trainer.diffusion, params, trainer.mesh)
    rd = rate_distortion(nll)
    result.update(bits_per_dim=nll["bits_per_dim"], nll=nll, rate_distortion=rd)
    logging.info("test NLL %.4f bits/dim over %d images (rate %.3f + distortion %.3f; RMSE %.2f)",
                 nll["bits_per_dim"], nll["num_examples"], rd["final_rate_bpd"],
                 rd["final_distortion_bpd"], rd["final_distortion_rmse"])
    if jax.process_index() == 0:
      write_nll_figures(nll, rd, os.path.join(out_dir, str(step)))
  return _write_result(result, os.path.join(out_dir, f"{step}.json"))


def _write_result(result: dict, path: str) -> str:
  if jax.process_index() == 0:
    with open(path, "w") as f:
      json.dump(result, f, indent=1)
    logging.info("Wrote %s", path)
  return path
