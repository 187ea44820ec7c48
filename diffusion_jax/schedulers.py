"""diffusers' schedulers, as a pipeline's scheduler_config.json describes them
(convert_diffusers.scheduler_settings), run by our samplers: which method a config means, which
of its options ours cannot follow, and the chain itself.

- "ddim": DDIMScheduler (its betas, steps_offset, set_alpha_to_one, clip_sample, and the
  "leading", "linspace" or "trailing" timesteps, each step to t - T // n as diffusers' steps);
- "euler": EulerDiscreteScheduler (SDXL's), DDIM with eta = 0 written in
  sigma = sqrt((1 - alphabar) / alphabar), its last step to sigma = 0, the network at
  fractional timesteps where the spacing or Karras' sigmas put them; "euler_ancestral"
  (EulerAncestralDiscreteScheduler, e.g. SDXL-Turbo's) the same with eta = 1 (its sigma_up is
  DDIM's eta = 1 noise, its sigma_down the rest);
- "dpm_solver": DPM-Solver++(2M) as DPMSolverMultistepScheduler made from the same config, the
  last step first order to sigma = 0; "dpm_solver_karras" the same over Karras' noise levels
  whatever the config says ("DPM++ 2M Karras").
By default the method is the config's class where it is one of these, else DDIM; where the
config sets an option ours do not implement, the default is DDIM (with a warning) and asking
for the method by name is refused.
"""
from __future__ import annotations

import jax.numpy as jnp
from absl import logging

from diffusion_jax import samplers

METHODS = ("ddim", "euler", "euler_ancestral", "dpm_solver", "dpm_solver_karras")
SCHEDULER_METHODS = {"DDIMScheduler": "ddim", "EulerDiscreteScheduler": "euler",
                     "EulerAncestralDiscreteScheduler": "euler_ancestral",
                     "DPMSolverMultistepScheduler": "dpm_solver"}


def spacing(schedule: dict, method: str) -> str:
  """The config's timestep_spacing, or where it has none the default of the method's diffusers
  class (DDIM's "leading", Euler's and DPM-Solver's "linspace"), as `from_config` has it."""
  return schedule["timestep_spacing"] or ("leading" if method == "ddim" else "linspace")


def check_method(schedule: dict, method: str, eta: float) -> None:
  """A ValueError where `method` cannot follow the config (or eta)."""
  if method not in METHODS:
    raise ValueError(f"method {method!r}: one of {METHODS}")
  unsupported = schedule.get("unsupported")
  if method != "ddim" and unsupported:
    raise ValueError(f"the scheduler config sets {unsupported}, which method {method!r} does "
                     "not implement: use method 'ddim'")
  if method.startswith("euler") and eta:
    raise ValueError(f"method {method!r} is diffusers' Euler (ancestral) scheduler, whose "
                     f"noise is its own: eta (DDIM's) must be 0, got {eta}")


def default_method(schedule: dict, eta: float = 0.0) -> str:
  """The sampler of the config's scheduler class; DDIM where it is none of METHODS' or uses
  options ours do not implement (with a warning)."""
  method = SCHEDULER_METHODS.get(schedule.get("scheduler"), "ddim")
  try:
    check_method(schedule, method, eta)
  except ValueError as e:
    logging.warning("%s; sampling with DDIM instead", e)
    return "ddim"
  return method


def resolve_method(schedule: dict, method: str | None, eta: float) -> str:
  """`method`, checked against the config, or by default the config's (default_method)."""
  if method is None:
    return default_method(schedule, eta)
  check_method(schedule, method, eta)
  return method


def ddim_timesteps(schedule: dict, num_timesteps: int, num_steps: int):
  """DDIMScheduler's num_steps timesteps (decreasing integers); img2img noises to the first
  one it runs."""
  return samplers.diffusers_timesteps(num_timesteps, num_steps, spacing(schedule, "ddim"),
                                      schedule["steps_offset"]).round()


def run_chain(schedule: dict, diffusion, method: str, denoise_fn, x_T, key, num_steps: int,
              eta: float = 0.0, skip: int = 0):
  """The latents at the chain's end from x_T (unit noise, or with `skip`, DDIM only, the
  noised latents at its (skip + 1)-th step)."""
  offset = schedule["steps_offset"]
  if method.startswith("euler"):
    space = spacing(schedule, method)
    ts, sigmas = samplers.euler_levels(diffusion, num_steps, space, offset,
                                       method == "euler" and schedule.get("karras"))
    return samplers.euler_sample(diffusion, denoise_fn,
                                 x_T * samplers.euler_start_scale(sigmas, space), key, ts,
                                 sigmas, eta=1.0 if method == "euler_ancestral" else 0.0)
  if method == "ddim":
    return samplers.ddim_sample(
        diffusion, denoise_fn, x_T, key, num_steps, eta, skip=skip,
        timesteps=ddim_timesteps(schedule, diffusion.num_timesteps, num_steps),
        clip_denoised=schedule["clip_sample"], steps_offset=offset,
        alpha_one_at_end=schedule["alpha_one_at_end"])
  karras = schedule.get("karras") or method == "dpm_solver_karras"
  return samplers.dpm_solver_sample(diffusion, denoise_fn, x_T, key, num_steps,
                                    spacing="karras" if karras else spacing(schedule, method),
                                    clip_denoised=False, steps_offset=offset)


def noise_to(diffusion, schedule: dict, init, noise, num_steps: int, skip: int):
  """img2img's start: clean latents noised to the (skip + 1)-th DDIM timestep."""
  t = int(ddim_timesteps(schedule, diffusion.num_timesteps, num_steps)[skip])
  return diffusion.q_sample(init, jnp.full((init.shape[0],), t), noise)
