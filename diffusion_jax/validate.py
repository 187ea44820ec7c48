"""Config checks that run before anything compiles or loads: one message per problem,
naming the key and what is allowed."""
from __future__ import annotations

import jax

from diffusion_jax import diffusion as dm
from diffusion_jax import samplers
from diffusion_jax.models import ATTENTION, DTYPES, MODELS, UPSAMPLE_CONV, onednn_conv

DATASETS = ("fashion_mnist", "cifar10", "celeb_a_hq", "lsun_church", "folder")
METRICS = ("fid", "is", "nll")
MODES = ("train", "sample", "eval", "summary")


class ConfigError(ValueError):
  pass


def _check(ok: bool, key: str, value, allowed: str):
  if not ok:
    raise ConfigError(f"config.{key}={value!r} is not allowed: {allowed}")


def parse_metrics(metrics: str) -> tuple[str, ...]:
  return tuple(m.strip() for m in str(metrics).split(",") if m.strip())


def validate_config(config, mode: str = "train") -> None:
  """Raise ConfigError for the first impossible value in `config` (for `mode`)."""
  _check(mode in MODES, "mode", mode, f"one of {MODES}")
  d, m, f, t, s, e = (config.data, config.model, config.diffusion, config.training,
                      config.sampling, config.eval)
  n_dev, n_proc = jax.device_count(), jax.process_count()

  _check(d.name in DATASETS, "data.name", d.name, f"one of {DATASETS}")
  _check(d.channels in (1, 3), "data.channels", d.channels, "1 or 3")
  _check(d.name != "folder" or d.data_dir, "data.data_dir", d.data_dir,
         "data.name='folder' needs --config.data.data_dir=/path/to/images")

  _check(m.name in MODELS, "model.name", m.name, f"one of {tuple(MODELS)}")
  _check(m.dtype in DTYPES, "model.dtype", m.dtype, f"one of {tuple(DTYPES)}")
  _check(m.attention in ATTENTION, "model.attention", m.attention, f"one of {ATTENTION}")
  _check(m.attention != "cudnn" or (m.dtype == "bfloat16" and jax.default_backend() == "gpu"),
         "model.attention", m.attention, "'cudnn' needs model.dtype='bfloat16' on a GPU; "
         "'auto' picks it where it applies")
  _check(m.conv in onednn_conv.MODES, "model.conv", m.conv, f"one of {onednn_conv.MODES}")
  if m.conv == "onednn":
    _check(jax.default_backend() == "cpu" and m.dtype == "float32" and n_dev == 1, "model.conv",
           m.conv, "oneDNN convolutions are float32 on a single CPU device; 'auto' picks them "
           "where they apply")
    _check(not onednn_conv.unavailable_reason(), "model.conv", m.conv,
           onednn_conv.unavailable_reason())
  upsample_conv = m.get("upsample_conv", "auto")
  _check(upsample_conv in UPSAMPLE_CONV, "model.upsample_conv", upsample_conv,
         f"one of {UPSAMPLE_CONV}")
  _check(len(m.ch_mult) >= 1 and all(k >= 1 for k in m.ch_mult), "model.ch_mult", m.ch_mult,
         "a non-empty tuple of positive multipliers")
  for k in m.ch_mult:
    _check((m.ch * k) % 32 == 0, "model.ch", m.ch,
           f"every level's channels (ch * ch_mult = {m.ch * k}) must divide into GroupNorm's 32 groups")
  down = 2 ** (len(m.ch_mult) - 1)
  _check(d.image_size % down == 0 and d.image_size >= down, "data.image_size", d.image_size,
         f"a multiple of {down}: the U-Net halves it {len(m.ch_mult) - 1} times (model.ch_mult)")
  sizes = [d.image_size // 2 ** i for i in range(len(m.ch_mult))]
  for r in m.attn_resolutions:
    _check(r in sizes, "model.attn_resolutions", tuple(m.attn_resolutions),
           f"resolutions the U-Net visits at image_size {d.image_size}: {sizes}")
  _check(0.0 <= m.dropout < 1.0, "model.dropout", m.dropout, "in [0, 1)")
  _check(m.num_classes >= 0, "model.num_classes", m.num_classes, ">= 0")

  _check(f.beta_schedule in dm.SCHEDULES, "diffusion.beta_schedule", f.beta_schedule,
         f"one of {dm.SCHEDULES}")
  _check(f.num_timesteps >= 2, "diffusion.num_timesteps", f.num_timesteps, ">= 2")
  _check(0 < f.beta_start < f.beta_end < 1, "diffusion.beta_end", f.beta_end,
         f"0 < beta_start ({f.beta_start}) < beta_end < 1")
  _check(f.mean_type in dm.MEAN_TYPES, "diffusion.mean_type", f.mean_type, f"one of {dm.MEAN_TYPES}")
  _check(f.var_type in dm.VAR_TYPES, "diffusion.var_type", f.var_type, f"one of {dm.VAR_TYPES}")
  _check(f.loss_type in dm.LOSS_TYPES, "diffusion.loss_type", f.loss_type, f"one of {dm.LOSS_TYPES}")
  learned = f.var_type.startswith("learned")
  _check(not (learned and f.loss_type == "mse"), "diffusion.loss_type", f.loss_type,
         f"var_type={f.var_type!r} is only trained by the bound: use 'kl' or 'hybrid'")
  _check(f.loss_type != "hybrid" or learned, "diffusion.loss_type", f.loss_type,
         "'hybrid' needs var_type 'learned' or 'learned_range'")

  _check(t.batch_size >= 1 and t.batch_size % n_dev == 0, "training.batch_size", t.batch_size,
         f"a positive multiple of the device count ({n_dev})")
  _check(t.batch_size % n_proc == 0, "training.batch_size", t.batch_size,
         f"a multiple of the process count ({n_proc})")
  _check(t.grad_accum_steps >= 1 and t.batch_size % (t.grad_accum_steps * n_dev) == 0,
         "training.grad_accum_steps", t.grad_accum_steps,
         f"divides batch_size ({t.batch_size}) into micro-batches that split over {n_dev} devices")
  _check(t.lr > 0, "training.lr", t.lr, "> 0")
  _check(t.warmup_steps >= 0, "training.warmup_steps", t.warmup_steps, ">= 0")
  _check(t.grad_clip >= 0, "training.grad_clip", t.grad_clip, ">= 0 (0 disables clipping)")
  _check(0.0 <= t.ema_decay < 1.0, "training.ema_decay", t.ema_decay, "in [0, 1)")
  for key in ("num_steps", "checkpoint_every", "log_every", "sample_every", "keep_checkpoints",
              "steps_per_dispatch"):
    _check(t[key] >= 1, f"training.{key}", t[key], ">= 1")

  _check(s.method in samplers.METHODS, "sampling.method", s.method, f"one of {samplers.METHODS}")
  spacings = {"ddim": ("uniform", "quadratic"), "dpm_solver": ("logsnr", "uniform")}.get(s.method)
  _check(s.spacing is None or spacings is None or s.spacing in spacings, "sampling.spacing",
         s.spacing, f"for {s.method}: one of {spacings}")
  if s.method != "ancestral":
    _check(1 <= s.num_steps < f.num_timesteps + (s.method == "ddim"), "sampling.num_steps",
           s.num_steps, f"in [1, {f.num_timesteps}] for {s.method}")
  _check(s.batch_size >= 1 and s.batch_size % n_dev == 0, "sampling.batch_size", s.batch_size,
         f"a positive multiple of the device count ({n_dev})")
  _check(s.num_samples >= 1, "sampling.num_samples", s.num_samples, ">= 1")
  _check(0 <= s.interp_t < f.num_timesteps, "sampling.interp_t", s.interp_t,
         f"in [0, {f.num_timesteps - 1}]")
  _check(all(0 <= k < f.num_timesteps for k in s.progressive_steps), "sampling.progressive_steps",
         tuple(s.progressive_steps), f"timesteps in [0, {f.num_timesteps - 1}]")

  metrics = parse_metrics(e.metrics)
  _check(set(metrics) <= set(METRICS) and len(metrics) > 0, "eval.metrics", e.metrics,
         f"comma-separated names from {METRICS}")
  _check(not (e.samples_npz and "nll" in metrics), "eval.metrics", e.metrics,
         "fid and/or is when eval.samples_npz is given (NLL needs the test set and a model)")
  _check(e.is_splits >= 1, "eval.is_splits", e.is_splits, ">= 1")
  _check(e.ref_num_examples >= 2, "eval.ref_num_examples", e.ref_num_examples, ">= 2")
  _check(e.num_examples >= 1, "eval.num_examples", e.num_examples, ">= 1")
  _check(e.batch_size >= 1 and e.batch_size % n_dev == 0, "eval.batch_size", e.batch_size,
         f"a positive multiple of the device count ({n_dev})")

