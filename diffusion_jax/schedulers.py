"""diffusers' schedulers, as a pipeline's scheduler_config.json describes them
(`scheduler_settings`), run by our samplers: which method a config means, which of its options
ours cannot follow, and the chain itself.

- "ddim": DDIMScheduler (its betas, steps_offset, set_alpha_to_one, clip_sample, and the
  "leading", "linspace" or "trailing" timesteps, each step to t - T // n as diffusers' steps);
- "euler": EulerDiscreteScheduler (SDXL's), DDIM with eta = 0 written in
  sigma = sqrt((1 - alphabar) / alphabar), its last step to sigma = 0, the network at
  fractional timesteps where the spacing or Karras' sigmas put them; "euler_ancestral"
  (EulerAncestralDiscreteScheduler, e.g. SDXL-Turbo's) the same with eta = 1 (its sigma_up is
  DDIM's eta = 1 noise, its sigma_down the rest);
- "dpm_solver": DPM-Solver++(2M) as DPMSolverMultistepScheduler made from the same config, the
  last step first order to sigma = 0; "dpm_solver_karras" the same over Karras' noise levels
  whatever the config says ("DPM++ 2M Karras");
- "lcm": LCMScheduler, Latent Consistency Models' few-step sampler (lcm.py; LCM-LoRA's, with a
  guidance scale of 1-2 and 2-8 steps).
rescale_betas_zero_snr (Lin et al. 2023; v-prediction models): the betas rescaled so that
alphabar_T = 0 (`make_diffusion`), which DDIM and LCM read as it is and Euler and DPM-Solver as 2^-24,
as diffusers' schedulers do (noise_levels.alphas_cumprod).
By default the method is the config's class where it is one of these, else DDIM; where the
config sets an option ours do not implement, the default is DDIM (with a warning) and asking
for the method by name is refused.
"""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
from absl import logging

from diffusion_jax import diffusion as dm
from diffusion_jax import noise_levels, samplers
from diffusion_jax.convert_diffusers import ConversionError

METHODS = ("ddim", "euler", "euler_ancestral", "dpm_solver", "dpm_solver_karras", "lcm")
SCHEDULER_METHODS = {"DDIMScheduler": "ddim", "EulerDiscreteScheduler": "euler",
                     "EulerAncestralDiscreteScheduler": "euler_ancestral",
                     "DPMSolverMultistepScheduler": "dpm_solver", "LCMScheduler": "lcm"}
LCM_WHOLE_CHAINS = ("LCM runs whole chains here (and img2img): inpainting with a plain U-Net "
                    "and denoising_start / _end need another method")


def scheduler_settings_file(path: str) -> dict:
  """scheduler_settings of a scheduler_config.json file."""
  with open(path) as f:
    return scheduler_settings(json.load(f))


PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear",
                  "squaredcos_cap_v2": "cosine"}  # diffusers' -> ours


def scheduler_settings(cfg: dict) -> dict:
  """The diffusion and sampler conventions of a diffusers scheduler_config.json
  (rescale_betas_zero_snr: `make_diffusion` rescales the betas)."""
  prediction = cfg.get("prediction_type", "epsilon")
  if prediction not in PREDICTION_TYPES:
    raise ConversionError(f"prediction_type={prediction!r}: one of {tuple(PREDICTION_TYPES)}")
  spacing = cfg.get("timestep_spacing")  # absent: each scheduler class's default
  if spacing not in ("leading", "linspace", "trailing", None):
    raise ConversionError(f"timestep_spacing={spacing!r}: one of leading, linspace, trailing")
  if cfg.get("trained_betas") is not None:
    raise ConversionError("trained_betas in scheduler_config.json are not supported")
  schedule = cfg.get("beta_schedule", "linear")
  if schedule not in BETA_SCHEDULES:
    raise ConversionError(f"beta_schedule={schedule!r}: one of {tuple(BETA_SCHEDULES)}")
  if cfg.get("thresholding"):
    raise ConversionError("scheduler thresholding=True is not implemented")
  zero_snr = bool(cfg.get("rescale_betas_zero_snr"))
  if zero_snr and prediction != "v_prediction":
    raise ConversionError(
        f"rescale_betas_zero_snr=True with prediction_type={prediction!r}: at zero terminal SNR "
        "the last step sees pure noise, from which only a v-prediction model gives x_0 (Lin et "
        "al. 2023); such checkpoints are v_prediction: set prediction_type so")
  return {"beta_schedule": BETA_SCHEDULES[schedule],  # diffusers' defaults where absent
          "beta_start": float(cfg.get("beta_start", 1e-4)),
          "beta_end": float(cfg.get("beta_end", 0.02)),
          "clip_sample": bool(cfg.get("clip_sample", True)),
          "num_timesteps": int(cfg.get("num_train_timesteps", 1000)),
          "mean_type": PREDICTION_TYPES[prediction],
          "steps_offset": int(cfg.get("steps_offset", 0)),
          "alpha_one_at_end": bool(cfg.get("set_alpha_to_one", True)),
          "timestep_spacing": spacing, "scheduler": cfg.get("_class_name"),
          "karras": bool(cfg.get("use_karras_sigmas")), "zero_snr": zero_snr,
          "lcm": {"original_steps": int(cfg.get("original_inference_steps", 50)),
                  "timestep_scaling": float(cfg.get("timestep_scaling", 10.0))},
          "unsupported": _unsupported_solver_options(cfg), "config": dict(cfg)}


# Euler's and DPM-Solver++(2M)'s settings as ours run them (diffusers' defaults)
SOLVER_DEFAULTS = {"interpolation_type": "linear", "final_sigmas_type": "zero",
                   "timestep_type": "discrete", "algorithm_type": "dpmsolver++",
                   "solver_order": 2, "solver_type": "midpoint", "euler_at_final": False,
                   "use_lu_lambdas": False, "variance_type": None}


def _unsupported_solver_options(cfg: dict) -> str | None:
  """The scheduler config's options that make diffusers' Euler or DPM-Solver steps differ from
  ours (other noise levels: exponential, beta sigmas; another solver), or None. (Karras'
  sigmas: DPM-Solver's "karras" spacing.)"""
  found = [f"use_{kind}_sigmas" for kind in ("exponential", "beta")
           if cfg.get(f"use_{kind}_sigmas")]
  found += [f"{k}={cfg[k]!r}" for k, v in SOLVER_DEFAULTS.items()
            if cfg.get(k, v) != v]
  return ", ".join(found) or None


def make_diffusion(schedule: dict) -> dm.GaussianDiffusion:
  """The schedule's diffusion: its betas (with zero_snr, diffusers' rescale_betas_zero_snr,
  rescaled to zero terminal SNR: diffusion.rescale_zero_terminal_snr) and prediction."""
  b = dm.get_beta_schedule(schedule["beta_schedule"], schedule["num_timesteps"],
                           schedule["beta_start"], schedule["beta_end"])
  if schedule.get("zero_snr"):
    b = dm.rescale_zero_terminal_snr(b)
  return dm.GaussianDiffusion(b, mean_type=schedule["mean_type"])


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
  if (method.startswith("euler") or method == "lcm") and eta:
    raise ValueError(f"method {method!r} is diffusers' {method} scheduler, whose noise is its "
                     f"own: eta (DDIM's) must be 0, got {eta}")


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


def levels(schedule: dict, diffusion, method: str, num_steps: int):
  """(the timesteps the network sees [n], decreasing; the noise levels sigma / alpha [n + 1]
  of Euler's and DPM-Solver's chains, None for DDIM's)."""
  if method.startswith("euler"):
    return noise_levels.euler_levels(diffusion, num_steps, spacing(schedule, method),
                                     schedule["steps_offset"],
                                     method == "euler" and schedule.get("karras"))
  if method == "lcm":
    raise ValueError(LCM_WHOLE_CHAINS)
  if method != "ddim":
    ts, alpha, sigma = samplers.dpm_solver_levels(diffusion, num_steps, dpm_spacing(
        schedule, method), schedule["steps_offset"])
    return ts, sigma / alpha
  return noise_levels.diffusers_timesteps(diffusion.num_timesteps, num_steps,
                                          spacing(schedule, "ddim"),
                                          schedule["steps_offset"]).round(), None


def network_timesteps(schedule: dict, diffusion, method: str, num_steps: int, skip: int = 0,
                      stop: int | None = None, strength: float = 1.0) -> np.ndarray:
  """The timesteps the network sees in the chain's steps [skip, stop), in order (strength:
  LCM's, span's)."""
  if method == "lcm":
    from diffusion_jax.lcm import lcm_timesteps
    return np.asarray(lcm_timesteps(diffusion.num_timesteps, num_steps,
                                    schedule["lcm"]["original_steps"], strength))[skip:stop]
  return np.asarray(levels(schedule, diffusion, method, num_steps)[0])[skip:stop]


def dpm_spacing(schedule: dict, method: str) -> str:
  karras = schedule.get("karras") or method == "dpm_solver_karras"
  return "karras" if karras else spacing(schedule, method)


def span(schedule: dict, diffusion, method: str, num_steps: int, strength: float = 1.0,
         denoising_start: float | None = None, denoising_end: float | None = None,
         lcm_strength: bool = False):
  """(skip, stop): the chain's steps [skip, stop) that run (stop None: to the end), as
  diffusers counts them: strength s keeps the last int(n s) steps (LCM with lcm_strength, an
  LCM-distilled U-Net's: all n, over the first int(original_steps s) of its timesteps, the
  strength given to the chain); denoising_start / _end
  (SDXL's ensemble of experts: the base stops where the refiner starts) cut at the timestep
  round(T (1 - fraction))."""
  if not 0.0 < strength <= 1.0:
    raise ValueError(f"strength={strength}: in (0, 1]")
  if method == "lcm" and (denoising_start is not None or denoising_end is not None):
    raise ValueError(LCM_WHOLE_CHAINS)
  if method == "lcm" and lcm_strength:
    return 0, None  # all num_steps run, over fewer timesteps (lcm.lcm_timesteps)
  skip = num_steps - min(int(num_steps * strength), num_steps)
  stop = None
  if denoising_start is not None or denoising_end is not None:
    ts, _ = levels(schedule, diffusion, method, num_steps)
    cut = lambda f: int(round(diffusion.num_timesteps * (1.0 - f)))
    for name, f in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
      if f is not None and not 0.0 < f < 1.0:
        raise ValueError(f"{name}={f}: in (0, 1)")
    if denoising_start is not None:  # strength is then ignored, as diffusers does
      skip = num_steps - int((ts < cut(denoising_start)).sum())
    if denoising_end is not None:
      stop = int((ts >= cut(denoising_end)).sum())
  if skip >= (num_steps if stop is None else stop):
    raise ValueError(f"no step of {num_steps} is left to run (strength {strength}, "
                     f"denoising_start {denoising_start}, denoising_end {denoising_end})")
  return skip, stop


def run_chain(schedule: dict, diffusion, method: str, denoise_fn, x_T, key, num_steps: int,
              eta: float = 0.0, skip: int = 0, stop: int | None = None, callback=None,
              strength: float = 1.0):
  """The latents after the chain's steps [skip, stop) from x_T (unit noise, or with `skip`
  the latents at its (skip + 1)-th step: start_latents); with `stop` those at its stop-th
  level, in diffusers' scale (end_latents). callback(x, i): x after step i of the chain
  (e.g. known_region's blend); strength: LCM's (span)."""
  if callback is not None and skip:
    callback = (lambda cb: lambda x, i: cb(x, i + skip))(callback)
  if method.startswith("euler"):
    ts, sigmas = levels(schedule, diffusion, method, num_steps)
    if not skip:
      x_T = x_T * noise_levels.euler_start_scale(sigmas, spacing(schedule, method))
    return end_latents(noise_levels.euler_sample(
        diffusion, denoise_fn, x_T, key, ts[skip:stop], sigmas[skip:None if stop is None
                                                                else stop + 1],
        eta=1.0 if method == "euler_ancestral" else 0.0, callback=callback), sigmas, stop)
  if method == "lcm":
    from diffusion_jax.lcm import lcm_sample
    if stop is not None or callback is not None:
      raise ValueError(LCM_WHOLE_CHAINS)
    return lcm_sample(diffusion, denoise_fn, x_T, key, num_steps, clip_denoised=schedule[
        "clip_sample"], strength=strength, skip=skip, **schedule["lcm"])
  if method == "ddim":
    ts, _ = levels(schedule, diffusion, method, num_steps)
    return samplers.ddim_sample(
        diffusion, denoise_fn, x_T, key, num_steps, eta, skip=skip, timesteps=ts[:stop],
        clip_denoised=schedule["clip_sample"], steps_offset=schedule["steps_offset"],
        alpha_one_at_end=schedule["alpha_one_at_end"], callback=callback)
  return samplers.dpm_solver_sample(diffusion, denoise_fn, x_T, key, num_steps,
                                    spacing=dpm_spacing(schedule, method), clip_denoised=False,
                                    steps_offset=schedule["steps_offset"], skip=skip, stop=stop,
                                    callback=callback)


def end_latents(z, sigmas, stop):
  """Euler's latents at level `stop` as diffusers keeps them (x / alpha, its scheduler's
  sigma-scaled x); at the chain's end (sigma 0) the same."""
  return z if stop is None else z * float(np.sqrt(1.0 + sigmas[stop] ** 2))


def noising(schedule: dict, diffusion, method: str, num_steps: int, strength: float = 1.0):
  """(a, b) [n + 1]: the chain's k-th step starts from a_k x_0 + b_k eps (diffusers'
  scheduler.add_noise at its timesteps[k]); after the last, (1, 0). strength: LCM's (span)."""
  ts, sigmas = ((network_timesteps(schedule, diffusion, method, num_steps, strength=strength),
                 None) if method == "lcm" else levels(schedule, diffusion, method, num_steps))
  if sigmas is None:
    ab = np.append(np.asarray(diffusion.coefs["alphas_cumprod"])[ts.astype(int)], 1.0)
    return np.sqrt(ab), np.sqrt(1.0 - ab)
  sigmas = np.append(np.asarray(sigmas, np.float64)[:-1], 0.0)  # the end: the clean latents
  a = 1.0 / np.sqrt(1.0 + sigmas ** 2)
  return a, sigmas * a


def start_latents(schedule: dict, diffusion, method: str, init, noise, num_steps: int,
                  skip: int, add_noise: bool = True, strength: float = 1.0):
  """Where a chain that skips `skip` steps starts: clean latents noised to the (skip + 1)-th
  step's level (img2img), or without add_noise latents already there (denoising_start: the
  base's end_latents; Euler's in its sigma-scaled form)."""
  a, b = noising(schedule, diffusion, method, num_steps, strength)
  if not add_noise:
    return init * float(a[skip]) if method.startswith("euler") else init
  return float(a[skip]) * init + float(b[skip]) * noise


def known_region(schedule: dict, diffusion, method: str, num_steps: int, mask, init, noise,
                 stop: int | None = None, strength: float = 1.0):
  """Inpainting with a plain U-Net (diffusers' 4-channel inpainting): after each step the
  latents where `mask` is 0 are replaced by the known image's latents `init` noised with
  `noise` to the next step's level (clean after the chain's last step run)."""
  a, b = noising(schedule, diffusion, method, num_steps, strength)
  end = num_steps if stop is None else stop
  a[end:], b[end:] = 1.0, 0.0
  a, b = jnp.asarray(a, init.dtype), jnp.asarray(b, init.dtype)
  return lambda x, i: (1 - mask) * (a[i + 1] * init + b[i + 1] * noise) + mask * x
