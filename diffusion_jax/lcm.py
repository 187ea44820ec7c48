"""Latent Consistency Models' multistep sampler (Luo et al. 2023, Algorithm 3), as diffusers'
LCMScheduler runs it: the few-step sampler of LCM-LoRA and of LCM-distilled pipelines.

Each step evaluates the consistency function f(x, t) = c_skip(t) x + c_out(t) x0_pred(x, t)
(the boundary condition of Song et al. 2023, with sigma_data 0.5 and t scaled by
`timestep_scaling`, LCM's 10), then re-noises f to the next timestep with fresh noise; the last
step returns f. The timesteps are the distillation's skipping schedule: `original_steps` (50)
evenly spaced ones, t = k T / original_steps - 1, of which num_steps are taken at evenly
spaced indices from the noisiest.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SIGMA_DATA = 0.5


def lcm_timesteps(num_timesteps: int, num_steps: int, original_steps: int = 50,
                  strength: float = 1.0) -> np.ndarray:
  """The num_steps decreasing timesteps of LCMScheduler.set_timesteps: with strength s < 1
  (img2img) taken from the first int(original_steps s) of the distillation's timesteps."""
  n = int(original_steps * strength)
  if not 1 <= num_steps <= n or original_steps > num_timesteps:
    raise ValueError(f"LCM: num_steps={num_steps} must be in [1, int(original_inference_steps="
                     f"{original_steps} x strength {strength}) = {n}] (<= {num_timesteps})")
  k = num_timesteps // original_steps
  origin = (np.arange(1, n + 1) * k - 1)[::-1]
  return origin[np.floor(np.linspace(0, n, num_steps, endpoint=False)).astype(int)]


def boundary_scalings(t, timestep_scaling: float = 10.0):
  """(c_skip, c_out) of the consistency function at timestep t."""
  st = np.asarray(t, np.float64) * timestep_scaling
  return SIGMA_DATA ** 2 / (st ** 2 + SIGMA_DATA ** 2), st / np.sqrt(st ** 2 + SIGMA_DATA ** 2)


def lcm_sample(diffusion, denoise_fn, x_T, key, num_steps: int, original_steps: int = 50,
               timestep_scaling: float = 10.0, clip_denoised: bool = False,
               strength: float = 1.0, skip: int = 0):
  """Multistep consistency sampling from x_T (unit noise) in num_steps network evaluations;
  img2img, x_T latents noised to the first step's timestep: with strength < 1 over
  lcm_timesteps' fewer (LatentConsistencyModelImg2ImgPipeline's), with skip the steps after
  the first `skip` (StableDiffusionImg2ImgPipeline's with LCMScheduler, LCM-LoRA's)."""
  ts = lcm_timesteps(diffusion.num_timesteps, num_steps, original_steps, strength)[skip:]
  num_steps = len(ts)
  ab = np.asarray(diffusion.coefs["alphas_cumprod"], np.float64)
  c_skip, c_out = boundary_scalings(ts, timestep_scaling)
  a_next = ab[np.append(ts[1:], ts[-1])]  # the last step's is unused
  last = np.arange(num_steps) == num_steps - 1
  dt = x_T.dtype
  consts = tuple(jnp.asarray(a, dt) for a in (c_skip, c_out, np.sqrt(a_next),
                                              np.sqrt(1 - a_next)))

  def body(x, inputs):
    t, skip, out, alpha_next, sigma_next, is_last, k = inputs
    tb = jnp.full((x.shape[0],), t, jnp.int32)
    _, x0 = diffusion.predict_eps_and_start(denoise_fn(x, tb), x, tb, clip_denoised)
    f = out * x0 + skip * x  # the consistency function's value: the step's x_0
    noised = alpha_next * f + sigma_next * jax.random.normal(k, x.shape, x.dtype)
    return jnp.where(is_last, f, noised), None

  x, _ = jax.lax.scan(body, x_T, (jnp.asarray(ts, jnp.int32),) + consts + (
      jnp.asarray(last), jax.random.split(key, num_steps)))
  return x
