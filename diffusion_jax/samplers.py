"""Samplers: each one a single lax.scan over timesteps, deterministic for a PRNG key.

Every sampler takes a `GaussianDiffusion`, a `denoise_fn(x_t, t)` and the starting noise
x_T (whose sharding over devices jit carries through the whole chain), and returns images
on the [-1, 1] scale. Wrap them in `jax.jit` with the parameters as an argument (as
`diffusion_jax.sample.Sampler` does) so that the whole chain is one compiled program.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import DenoiseFn, GaussianDiffusion
from diffusion_jax.noise_levels import (after_step, alphas_cumprod, ddim_update,
                                        diffusers_timesteps, karras_timesteps, start_at_level)

METHODS = ("ancestral", "ddim", "dpm_solver")
SPACINGS = ("uniform", "quadratic")  # DDIM's (DPM-Solver's: DPM_SPACINGS)
ANCESTRAL_SPACINGS = ("uniform", "linspace", "trailing")  # a respaced chain's (num_steps < T)


def _batch_t(t, x):
  return jnp.full((x.shape[0],), t, dtype=jnp.int32)


# ----------------------------------------------------------------------------- Algorithm 2
def reverse_chain(diffusion: GaussianDiffusion, denoise_fn: DenoiseFn, x_t, key, t_start: int,
                  clip_denoised: bool = True, record_steps: Sequence[int] = ()):
  """Run p(x_{t-1} | x_t) from timestep `t_start` down to 0 (Algorithm 2, lines 2-5).

  Returns (x_0, recorded) where `recorded` is [len(record_steps), *x.shape] holding the
  predicted x_0 at those timesteps (progressive generation, Sec. 4.3), or None.
  """
  record_steps = [int(s) for s in record_steps]
  if any(not 0 <= s <= t_start for s in record_steps):
    raise ValueError(f"record_steps {record_steps} must lie in [0, {t_start}]")
  slot = np.full((t_start + 1,), -1, dtype=np.int32)
  slot[record_steps] = np.arange(len(record_steps), dtype=np.int32)
  buf = jnp.zeros((len(record_steps),) + x_t.shape, x_t.dtype)

  def body(carry, inputs):
    x, buf = carry
    t, k, s = inputs
    tb = _batch_t(t, x)
    x_prev, pred_x0 = diffusion.p_sample(denoise_fn(x, tb), x, tb,
                                         jax.random.normal(k, x.shape, x.dtype), clip_denoised)
    if record_steps:
      buf = jnp.where(s >= 0, buf.at[jnp.maximum(s, 0)].set(pred_x0), buf)
    return (x_prev, buf), None

  ts = jnp.arange(t_start, -1, -1, dtype=jnp.int32)
  keys = jax.random.split(key, t_start + 1)
  (x0, buf), _ = jax.lax.scan(body, (x_t, buf), (ts, keys, jnp.asarray(slot)[ts]))
  return x0, (buf if record_steps else None)


def respaced(diffusion: GaussianDiffusion, timesteps) -> GaussianDiffusion:
  """The process on the increasing `timesteps` alone, its index i standing for timestep t_i
  (Nichol & Dhariwal 2021, Sec. 4's respacing): beta_i = 1 - alphabar_{t_i} / alphabar_{t_{i-1}}
  (alphabar = 1 before t_0), so that q(x_{t_i} | x_0) is unchanged, and p's mean, its fixed
  variances and the learned range between them all follow from these betas."""
  ab = diffusion.coefs["alphas_cumprod"][np.asarray(timesteps)]
  return dataclasses.replace(diffusion, betas=1.0 - ab / np.append(1.0, ab[:-1]))


def ancestral_timesteps(num_timesteps: int, num_steps: int, spacing: str = "uniform"):
  """The increasing timesteps of a respaced chain: "uniform" k * (T // n) (diffusers'
  "leading"), or diffusers' "linspace" (the n rounded points over [0, T - 1]: IDDPM's and DiT's
  respacing) or "trailing"."""
  if spacing not in ANCESTRAL_SPACINGS:
    raise ValueError(f"ancestral spacing {spacing!r}: one of {ANCESTRAL_SPACINGS}")
  ts = diffusers_timesteps(num_timesteps, num_steps, "leading" if spacing == "uniform" else
                           spacing)
  return ts.round().astype(np.int32)[::-1]


def ancestral_sample(diffusion, denoise_fn, x_T, key, clip_denoised: bool = True,
                     num_steps: int | None = None, spacing: str = "uniform"):
  """Algorithm 2 from pure noise x_T ~ N(0, I): T network evaluations, or num_steps < T on the
  respaced process (`respaced`: IDDPM's and DiT's 250 steps with their learned variance;
  diffusers' DDPMScheduler with num_inference_steps)."""
  chain, fn, ts = ancestral_chain(diffusion, denoise_fn, num_steps, spacing)
  return reverse_chain(chain, fn, x_T, key, len(ts) - 1, clip_denoised)[0]


def ancestral_chain(diffusion, denoise_fn, num_steps: int | None = None,
                    spacing: str = "uniform"):
  """(process, denoise_fn, timesteps) of Algorithm 2: all T steps (num_steps None or >= T), or
  the respaced process on `ancestral_timesteps` with denoise_fn called at their timesteps (the
  chain's index i stands for timestep timesteps[i])."""
  T = diffusion.num_timesteps
  if num_steps is None or num_steps >= T:
    return diffusion, denoise_fn, np.arange(T)
  ts = ancestral_timesteps(T, num_steps, spacing)
  table = jnp.asarray(ts)
  return respaced(diffusion, ts), lambda x, i: denoise_fn(x, table[i]), ts


def chain_index(timesteps: np.ndarray, t: int) -> int:
  """The index of the chain's timestep nearest to `t`."""
  return int(np.abs(np.asarray(timesteps) - int(t)).argmin())


def progressive_sample(diffusion, denoise_fn, x_T, key, record_steps: Sequence[int],
                       clip_denoised: bool = True, num_steps: int | None = None,
                       spacing: str = "uniform"):
  """Algorithm 2 that also returns x^_0 predicted at `record_steps` (Fig. 6); with num_steps < T
  on the respaced chain, each recorded at the chain's nearest timestep."""
  T = diffusion.num_timesteps
  if any(not 0 <= int(s) < T for s in record_steps):
    raise ValueError(f"record_steps {list(record_steps)} must lie in [0, {T - 1}]")
  chain, fn, ts = ancestral_chain(diffusion, denoise_fn, num_steps, spacing)
  index = [chain_index(ts, s) for s in record_steps]
  recorded = sorted(set(index), reverse=True)  # a short chain may give two steps one index
  x0, rec = reverse_chain(chain, fn, x_T, key, len(ts) - 1, clip_denoised, recorded)
  return x0, rec[np.asarray([recorded.index(i) for i in index], np.int32)]


def interpolate(diffusion, denoise_fn, x0_a, x0_b, key, t_interp: int, lambdas: Sequence[float],
                clip_denoised: bool = True, num_steps: int | None = None,
                spacing: str = "uniform"):
  """Interpolation in the noised space (Sec. 4.3, Fig. 8).

  Encode both images with q(x_t | x_0) at t = `t_interp` (the stochastic encoder, eq. 4),
  mix the latents (1 - lambda) x_t + lambda x_t', and decode each mix with the reverse chain
  (with num_steps < T the respaced one, from its timestep nearest to t_interp).
  Returns [B, len(lambdas), H, W, C].
  """
  chain, fn, ts = ancestral_chain(diffusion, denoise_fn, num_steps, spacing)
  start = chain_index(ts, t_interp)
  k_a, k_b, k_rev = jax.random.split(key, 3)
  t = _batch_t(ts[start], x0_a)
  xt_a = diffusion.q_sample(x0_a, t, jax.random.normal(k_a, x0_a.shape, x0_a.dtype))
  xt_b = diffusion.q_sample(x0_b, t, jax.random.normal(k_b, x0_b.shape, x0_b.dtype))
  lam = jnp.asarray(lambdas, x0_a.dtype).reshape((1, -1) + (1,) * (x0_a.ndim - 1))
  mixed = (1.0 - lam) * xt_a[:, None] + lam * xt_b[:, None]
  b, n = mixed.shape[:2]
  flat = mixed.reshape((b * n,) + x0_a.shape[1:])
  out, _ = reverse_chain(chain, fn, flat, k_rev, start, clip_denoised)
  return out.reshape(mixed.shape)


# ----------------------------------------------------------------------------- DDIM
def ddim_timesteps(num_timesteps: int, num_steps: int, spacing: str = "uniform") -> np.ndarray:
  """The increasing subsequence tau of Song et al. (2021), Appendix D.2."""
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"num_steps={num_steps} must be in [1, {num_timesteps}]")
  if spacing == "uniform":  # also diffusers' "leading" spacing
    seq = np.arange(0, num_steps) * (num_timesteps // num_steps)
  elif spacing == "quadratic":
    seq = (np.linspace(0, np.sqrt(num_timesteps * 0.8), num_steps) ** 2).astype(np.int64)
    if len(np.unique(seq)) != num_steps:
      raise ValueError(f"quadratic spacing repeats timesteps at num_steps={num_steps}; "
                       "use spacing='uniform' or fewer steps")
  else:
    raise ValueError(f"unknown DDIM spacing {spacing!r}; choose one of {SPACINGS}")
  return seq.astype(np.int32)


def _alphabar_with_end(diffusion, dtype):
  """alphabar at index t + 1, with alphabar = 1 at t = -1 (the clean end of the chain)."""
  return jnp.asarray(np.append(1.0, diffusion.coefs["alphas_cumprod"]), dtype)


def ddim_step(diffusion, model_output, x_t, t, t_prev, eta, noise, clip_denoised=False):
  """x_{t_prev} from x_t by the generalised (eta) DDIM update, Song et al. eq. 12.

  t_prev = -1 means the clean end (alphabar = 1). eta = 1 with t_prev = t - 1 is the
  ancestral step with variance beta~_t.
  """
  eps, x0 = diffusion.predict_eps_and_start(model_output, x_t, t, clip_denoised)
  ab = _alphabar_with_end(diffusion, x_t.dtype)
  shape = (-1,) + (1,) * (x_t.ndim - 1)
  a_t, a_prev = ab[t + 1].reshape(shape), ab[t_prev + 1].reshape(shape)
  return ddim_update(x0, eps, a_t, a_prev, eta, noise), x0


def ddim_sample(diffusion, denoise_fn, x_T, key, num_steps: int = 50, eta: float = 0.0,
                spacing: str = "uniform", clip_denoised: bool = True, steps_offset: int = 0,
                alpha_one_at_end: bool = True, skip: int = 0, timesteps=None, callback=None):
  """DDIM with `num_steps` network evaluations; eta = 0 is deterministic.

  timesteps: the num_steps evaluated, decreasing, instead of `spacing` + steps_offset
  (diffusers_timesteps'), each step to t - T // num_steps as diffusers' DDIMScheduler steps;
  fewer than num_steps: the chain stops after them (SDXL's denoising_end). callback(x, i):
  x after the i-th step run (after_step).

  skip > 0: the first `skip` (noisiest) steps left out, x_T being x at the timestep after them
  (SDEdit / img2img: a noised image enters the chain part way).

  steps_offset, alpha_one_at_end: diffusers' DDIMScheduler `steps_offset` and
  `set_alpha_to_one` (Stable Diffusion's scheduler configs: 1 and False: timesteps 1, 21, ...,
  and the last step lands at t = 0, alphabar_0 < 1, instead of the clean end).
  """
  end = -1 if alpha_one_at_end else 0
  if timesteps is None:
    seq = ddim_timesteps(diffusion.num_timesteps, num_steps, spacing) + steps_offset
    if seq[-1] >= diffusion.num_timesteps:
      raise ValueError(f"steps_offset={steps_offset} puts timestep {seq[-1]} past the chain's "
                       f"{diffusion.num_timesteps}")
    down, prev = seq[::-1], np.append(end, seq[:-1])[::-1]
  else:
    down = np.asarray(timesteps, np.int32)
    prev = down - diffusion.num_timesteps // num_steps
    prev = np.where(prev >= 0, prev, end)
  if not 0 <= skip < len(down):
    raise ValueError(f"skip={skip}: in [0, {len(down) - 1}]")
  ts = jnp.asarray(down[skip:].astype(np.int32))
  prevs = jnp.asarray(prev[skip:].astype(np.int32))

  def body(x, inputs):
    t, t_prev, k, i = inputs
    tb = _batch_t(t, x)
    x_prev, _ = ddim_step(diffusion, denoise_fn(x, tb), x, tb, _batch_t(t_prev, x), eta,
                          jax.random.normal(k, x.shape, x.dtype), clip_denoised)
    return after_step(callback, x_prev, i), None

  keys = jax.random.split(key, num_steps)[skip:len(down)]
  x0, _ = jax.lax.scan(body, x_T, (ts, prevs, keys, jnp.arange(len(keys))))
  return x0


# ----------------------------------------------------------------------------- DPM-Solver++
DPM_SPACINGS = ("logsnr", "uniform", "leading", "linspace", "trailing", "karras")


def dpm_solver_timesteps(diffusion, num_steps: int, spacing: str = "logsnr",
                         steps_offset: int = 0) -> np.ndarray:
  """num_steps + 1 distinct decreasing integer timesteps: the num_steps evaluated, then the end.

  "logsnr": from T - 1 down to 0, uniform in lambda = log(alpha/sigma) (rounded to the nearest
  timestep), the spacing DPM-Solver recommends for pixel-space models; "uniform": uniform in t.
  "leading" (+ steps_offset), "linspace", "trailing": diffusers' DPMSolverMultistepScheduler's
  timesteps, and its end, sigma = 0 (final_sigmas_type "zero"), written -1 (alphabar = 1).
  """
  T = diffusion.num_timesteps
  if not 1 <= num_steps < T:
    raise ValueError(f"num_steps={num_steps} must be in [1, {T - 1}]")
  if spacing == "uniform":
    return np.linspace(T - 1, 0, num_steps + 1).round().astype(np.int32)
  diffusers = {  # the evaluated timesteps, decreasing
      "leading": lambda: np.arange(num_steps, 0, -1) * (T // (num_steps + 1)) + steps_offset,
      "linspace": lambda: np.linspace(0, T - 1, num_steps + 1).round()[::-1][:-1],
      "trailing": lambda: np.round(T - np.arange(num_steps) * T / num_steps) - 1}
  if spacing in diffusers:
    ts = diffusers[spacing]()
    if ts.max() >= T:
      raise ValueError(f"num_steps={num_steps} with steps_offset={steps_offset} reaches "
                       f"timestep {int(ts.max())} of {T}: fewer steps or a smaller offset")
    return np.append(ts, -1).astype(np.int32)
  if spacing != "logsnr":
    raise ValueError(f"unknown DPM-Solver spacing {spacing!r}; choose one of {DPM_SPACINGS}")
  ab = alphas_cumprod(diffusion)
  lam = 0.5 * (np.log(ab) - np.log1p(-ab))  # increasing as t decreases
  grid = np.linspace(lam[-1], lam[0], num_steps + 1)
  ts = np.abs(lam[None, :] - grid[:, None]).argmin(axis=1)
  ts = np.minimum(ts, T - 1 - np.arange(num_steps + 1))
  for i in range(num_steps - 1, -1, -1):  # keep them distinct near t = 0
    ts[i] = max(ts[i], ts[i + 1] + 1)
  return ts.astype(np.int32)


def dpm_solver_levels(diffusion, num_steps: int, spacing: str = "logsnr",
                      steps_offset: int = 0):
  """(the timesteps the network sees [n], alpha [n + 1], sigma [n + 1]) of DPM-Solver's chain:
  dpm_solver_timesteps' levels, or with "karras" karras_timesteps' (x = alpha x_0 + sigma eps;
  the end alpha = 1, sigma = 0 for diffusers' spacings and Karras')."""
  if spacing == "karras":
    ts, levels = karras_timesteps(diffusion, num_steps)
    alpha = 1.0 / np.sqrt(1.0 + levels ** 2)
    return ts, alpha, levels * alpha
  ts = dpm_solver_timesteps(diffusion, num_steps, spacing, steps_offset)
  ab = np.append(1.0, alphas_cumprod(diffusion))[ts + 1]  # alphabar(-1) = 1
  return ts[:-1], np.sqrt(ab), np.sqrt(1.0 - ab)


def dpm_solver_sample(diffusion, denoise_fn, x_T, key=None, num_steps: int = 20,
                      spacing: str = "logsnr", clip_denoised: bool = True,
                      steps_offset: int = 0, skip: int = 0, stop: int | None = None,
                      callback=None):
  """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) in data prediction; num_steps evaluations.

  Multistep second order in lambda = log(alpha_t / sigma_t) (the first step is first order)
  over dpm_solver_timesteps: with "logsnr" and "uniform" from t = T - 1 to t = 0, the result x
  at t = 0 (sigma_0 = sqrt(beta_1)); with diffusers' spacings ("leading" + steps_offset,
  "linspace", "trailing") the last step goes to sigma = 0 and is first order (the prediction of
  x_0), as DPMSolverMultistepScheduler's. "karras": over karras_timesteps' noise levels, the
  network at the nearest timestep, x_0 from its output at the level itself (diffusers'
  use_karras_sigmas; eps, v or x0 prediction). skip, stop: only the steps [skip, stop) run,
  x_T at level skip (img2img; diffusers' set_begin_index: the first of them first order).
  """
  del key  # deterministic given x_T
  # x_0 at the chain's own levels: Karras', or a zero-terminal-SNR schedule's (alpha_T = 2^-12,
  # as diffusers'); else from the timestep's alphabar
  own_levels = spacing == "karras" or diffusion.coefs["alphas_cumprod"][-1] == 0.0
  ts, alpha, sigma = dpm_solver_levels(diffusion, num_steps, spacing, steps_offset)
  if not 0 <= skip < (num_steps if stop is None else stop) <= num_steps:
    raise ValueError(f"steps [{skip}, {stop}) of {num_steps}")
  ts, alpha, sigma = ts[skip:stop], alpha[skip:None if stop is None else stop + 1], sigma[
      skip:None if stop is None else stop + 1]
  with np.errstate(divide="ignore"):  # sigma = 0 at the end: lambda = inf
    lam = np.log(alpha) - np.log(sigma)
  h = lam[1:] - lam[:-1]
  second = (np.arange(len(ts)) > 0) & np.isfinite(h)  # first order where h is infinite
  with np.errstate(invalid="ignore"):
    r = np.where(second, np.append(1.0, h[:-1] / h[1:]), 1.0)  # h_{i-1} / h_i
  sigma_ratio = sigma[1:] / sigma[:-1]
  phi = alpha[1:] * -np.expm1(-h)  # alpha_t (1 - e^{-h})
  dt = x_T.dtype
  consts = tuple(jnp.asarray(a, dt) for a in (sigma_ratio, phi, r)) + (jnp.asarray(second),)
  consts += (jnp.asarray(alpha[:-1], dt), jnp.asarray(sigma[:-1], dt))

  def body(carry, inputs):
    x, x0_prev = carry
    t, s_ratio, ph, ri, use_second, alpha_t, sigma_t, i = inputs
    tb = _batch_t(t, x)
    if own_levels:
      x0 = start_at_level(diffusion, denoise_fn(x, tb), x, alpha_t, sigma_t, clip_denoised)
    else:
      _, x0 = diffusion.predict_eps_and_start(denoise_fn(x, tb), x, tb, clip_denoised)
    d = jnp.where(use_second, (1 + 0.5 / ri) * x0 - (0.5 / ri) * x0_prev, x0)
    return (after_step(callback, s_ratio * x + ph * d, i), x0), None

  (x, _), _ = jax.lax.scan(body, (x_T, jnp.zeros_like(x_T)),
                          (jnp.asarray(ts),) + consts + (jnp.arange(len(ts)),))
  return x


# ----------------------------------------------------------------------------- one entry
def network_evaluations(method: str, diffusion, num_steps: int) -> int:
  """The chain's steps: num_steps, or all T for an ancestral chain of num_steps >= T."""
  return min(num_steps, diffusion.num_timesteps) if method == "ancestral" else num_steps


def sample(method: str, diffusion, denoise_fn, x_T, key, num_steps: int | None = None,
           eta: float = 0.0, spacing: str | None = None, clip_denoised: bool = True,
           steps_offset: int = 0, alpha_one_at_end: bool = True):
  """Dispatch to one sampler by name (`config.sampling.method`).

  spacing=None takes each method's default: "uniform" for DDIM and a respaced ancestral chain
  (num_steps < T), "logsnr" for DPM-Solver.
  steps_offset: DDIM's, and DPM-Solver's with "leading" spacing; alpha_one_at_end: DDIM's.
  """
  if method == "ancestral":
    return ancestral_sample(diffusion, denoise_fn, x_T, key, clip_denoised, num_steps,
                            spacing or "uniform")
  if method == "ddim":
    return ddim_sample(diffusion, denoise_fn, x_T, key, num_steps or 50, eta,
                       spacing or "uniform", clip_denoised, steps_offset, alpha_one_at_end)
  if method == "dpm_solver":
    return dpm_solver_sample(diffusion, denoise_fn, x_T, key, num_steps or 20,
                             spacing or "logsnr", clip_denoised, steps_offset)
  raise ValueError(f"unknown sampling method {method!r}; choose one of {METHODS}")
