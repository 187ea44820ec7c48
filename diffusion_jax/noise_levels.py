"""Noise levels sigma = sqrt((1 - alphabar) / alphabar), the variance-exploding view of the
chain (x / alpha = x_0 + sigma eps) that diffusers' Euler and Karras schedulers step in:
diffusers' timestep spacings, Karras et al.'s (2022) levels, fractional timesteps between the
schedule's, and the Euler samplers, which are DDIM's eq. 12 between such levels.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0):
  """Karras et al. (2022), Eq. 5: num_steps noise levels from sigma_max to sigma_min, even in
  sigma^(1/rho)."""
  if num_steps < 2:
    raise ValueError(f"num_steps={num_steps}: Karras' levels need at least 2")
  lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
  return (hi + np.linspace(0.0, 1.0, num_steps) * (lo - hi)) ** rho


# alphabar_T of a zero-terminal-SNR schedule (0) as diffusers' Euler and DPM-Solver schedulers
# take it (rescale_betas_zero_snr): sigma_T = 4096, not infinite
ZERO_SNR_ALPHABAR = 2.0 ** -24


def alphas_cumprod(diffusion) -> np.ndarray:
  """alphabar_t (float64) for the samplers that work in noise levels or log-SNR, an alphabar of
  exactly 0 (zero terminal SNR) taken as ZERO_SNR_ALPHABAR; DDIM and LCM read it as it is."""
  ab = np.asarray(diffusion.coefs["alphas_cumprod"], np.float64)
  return np.where(ab == 0.0, ZERO_SNR_ALPHABAR, ab)


def noise_levels(diffusion) -> np.ndarray:
  """sigma_t = sqrt((1 - alphabar_t) / alphabar_t), increasing in t (float64)."""
  ab = alphas_cumprod(diffusion)
  return np.sqrt((1.0 - ab) / ab)


def timesteps_of(diffusion, sigmas) -> np.ndarray:
  """The (fractional) timesteps of noise levels: t linear in log sigma between the schedule's
  (diffusers' _sigma_to_t)."""
  levels = noise_levels(diffusion)
  return np.interp(np.log(sigmas), np.log(levels), np.arange(len(levels)))


def karras_timesteps(diffusion, num_steps: int, rho: float = 7.0):
  """diffusers' use_karras_sigmas for DPM-Solver: num_steps noise levels from the schedule's
  largest to its smallest (karras_sigmas), then 0; and the timesteps the network sees, each
  level's rounded. Returns (timesteps [n], sigmas [n + 1])."""
  levels = noise_levels(diffusion)
  sigmas = karras_sigmas(levels[0], levels[-1], num_steps, rho)
  return np.round(timesteps_of(diffusion, sigmas)).astype(np.int32), np.append(sigmas, 0.0)


def diffusers_timesteps(num_timesteps: int, num_steps: int, spacing: str,
                        steps_offset: int = 0) -> np.ndarray:
  """The num_steps decreasing timesteps of diffusers' DDIM and Euler schedulers (float:
  "linspace"'s are fractional, which DDIM rounds): "leading" k * (T // n) + steps_offset,
  "linspace" n points over [0, T - 1], "trailing" T - 1 - k * T / n, rounded."""
  T = num_timesteps
  if not 1 <= num_steps <= T:
    raise ValueError(f"num_steps={num_steps} must be in [1, {T}]")
  if spacing == "leading":
    ts = (np.arange(num_steps) * (T // num_steps)).round()[::-1] + steps_offset
  elif spacing == "linspace":
    ts = np.linspace(0, T - 1, num_steps)[::-1]
  elif spacing == "trailing":
    ts = np.round(np.arange(T, 0, -T / num_steps)) - 1
  else:
    raise ValueError(f"timestep spacing {spacing!r}: one of leading, linspace, trailing")
  if len(ts) != num_steps or ts.max() >= T:
    raise ValueError(f"{spacing} spacing of {num_steps} steps (steps_offset {steps_offset}) "
                     f"does not fit {T} timesteps")
  return ts.astype(np.float64)


def euler_levels(diffusion, num_steps: int, spacing: str = "leading", steps_offset: int = 0,
                 karras: bool = False):
  """diffusers' EulerDiscreteScheduler's chain (interpolation_type "linear", final sigma 0):
  the timesteps the network sees [n] (fractional with "linspace" or Karras') and the noise
  levels [n + 1], each timestep's sigma interpolated linearly in t; karras: Karras' levels
  between the spacing's first and last, at their timesteps."""
  ts = diffusers_timesteps(diffusion.num_timesteps, num_steps, spacing, steps_offset)
  levels = noise_levels(diffusion)
  sigmas = np.interp(ts, np.arange(len(levels)), levels)
  if karras:
    sigmas = karras_sigmas(sigmas[-1], sigmas[0], num_steps)
    ts = timesteps_of(diffusion, sigmas)
  return ts, np.append(sigmas, 0.0)


def euler_start_scale(sigmas, spacing: str) -> float:
  """What diffusers' Euler schedulers start from, as a multiple of unit noise in our (VP) scale:
  their init_noise_sigma is sqrt(sigma_0^2 + 1) with "leading" spacing (1 here) but sigma_0
  with "linspace" and "trailing" (sigma_0 / sqrt(sigma_0^2 + 1) here, e.g. 0.9977 for SD's
  betas)."""
  if spacing == "leading":
    return 1.0
  return float(sigmas[0] / np.sqrt(sigmas[0] ** 2 + 1.0))


def ddim_update(x0, eps, a_t, a_prev, eta, noise):
  """Song et al.'s eq. 12 from alphabar a_t to a_prev given x_0 and eps, the noise's std eta
  times eq. 16's (eta 0: deterministic; 1: the ancestral step)."""
  sigma = eta * jnp.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))  # eq. 16
  direction = jnp.sqrt(jnp.maximum(1 - a_prev - sigma ** 2, 0.0)) * eps
  return jnp.sqrt(a_prev) * x0 + direction + sigma * noise


def after_step(callback, x, i):
  """callback(x, i) after the i-th step run (e.g. inpainting's blend of the known region),
  or x."""
  return x if callback is None else callback(x, i)


def euler_sample(diffusion, denoise_fn, x_T, key, timesteps, sigmas, eta: float = 0.0,
                 callback=None):
  """Euler (eta 0) and Euler ancestral (eta 1) over noise levels sigmas [n + 1] (euler_levels),
  the network at `timesteps` [n]: DDIM's eq. 12 between the levels, alphabar = 1 / (1 +
  sigma^2) (Karras et al.'s Euler step on x / alpha is DDIM's; its ancestral sigma_up is eq.
  16's noise, sigma_down the rest); x_T at the first level, in the VP scale (unit variance);
  callback(x, i): x after the i-th step (after_step)."""
  ab = 1.0 / (1.0 + np.asarray(sigmas, np.float64) ** 2)
  dt = x_T.dtype
  a_t, a_prev = jnp.asarray(ab[:-1], dt), jnp.asarray(ab[1:], dt)
  n = len(timesteps)

  def body(x, inputs):
    t, a, a_next, k, i = inputs
    x0 = start_at_level(diffusion, denoise_fn(x, jnp.full((x.shape[0],), t, jnp.float32)), x,
                         jnp.sqrt(a), jnp.sqrt(1 - a), False)
    eps = (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
    x = ddim_update(x0, eps, a, a_next, eta, jax.random.normal(k, x.shape, x.dtype))
    return after_step(callback, x, i), None

  x, _ = jax.lax.scan(body, x_T, (jnp.asarray(timesteps, jnp.float32), a_t, a_prev,
                                  jax.random.split(key, n), jnp.arange(n)))
  return x


def start_at_level(diffusion, model_output, x, alpha, sigma, clip_denoised: bool):
  """x_0 from the network's output where x = alpha x_0 + sigma eps (a level between the
  schedule's timesteps)."""
  out, _ = diffusion.split_model_output(model_output, x)
  out = out.astype(x.dtype)
  rules = {"eps": lambda: (x - sigma * out) / alpha, "v": lambda: alpha * x - sigma * out,
           "x0": lambda: out}
  if diffusion.mean_type not in rules:
    raise ValueError(f"Karras' levels need eps, v or x0 prediction; got {diffusion.mean_type}")
  x0 = rules[diffusion.mean_type]()
  return jnp.clip(x0, -1.0, 1.0) if clip_denoised else x0
