"""Sample mode: EMA parameters of a checkpoint -> samples.npz, a PNG grid, and the paper's
progressive-generation (Fig. 6) and interpolation (Fig. 8) figures."""
from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from diffusion_jax import parallel, samplers, xla_options
from diffusion_jax.images import save_grid, to_uint8
from diffusion_jax.latent import model_input_shape
from diffusion_jax.models import denoiser


def _per_device_multiple(n: int, mesh) -> int:
  """n rounded up to a multiple of the mesh's device count."""
  d = mesh.shape[parallel.DATA]
  return int(math.ceil(n / d) * d)


class Sampler:
  """The configured sampler compiled once for a fixed global batch, noise drawn on device.
  With a first stage (latent diffusion) it samples latents and decodes them in the same
  program; a class-conditional model samples the classes of `labels(i)` (sampling.class_label,
  or all classes in turn), a text-conditional one (`text`: text_conditioning.TextEncoder) the
  captions of `prompts(i)`, with sampling.guidance_scale; `_run(params, key,
  first_stage_args(), labels, contexts)`."""

  def __init__(self, config, model, diffusion, mesh, batch_size: int, first_stage=None,
               text=None):
    s = config.sampling
    size, channels = model_input_shape(config)
    self.batch_size = _per_device_multiple(batch_size, mesh)
    self.shape = (self.batch_size, size, size, channels)
    self.mesh, self.first_stage, self.text = mesh, first_stage, text
    self.num_classes, self.class_label = model.num_classes, s.get("class_label", -1)
    self.prompt_list = prompt_list(config) if text is not None else None
    sharding = parallel.batch_sharding(mesh)

    def run(params, key, first_stage_args, y, contexts=None):
      noise_key, chain_key = jax.random.split(key)
      x_T = jax.lax.with_sharding_constraint(jax.random.normal(noise_key, self.shape), sharding)
      context, null = (None, None) if contexts is None else contexts
      denoise_fn = denoiser(model, params, y, s.get("guidance_scale", 1.0), context=context,
                            null_context=null)
      x = samplers.sample(s.method, diffusion, denoise_fn, x_T,
                          chain_key, num_steps=s.num_steps, eta=s.eta, spacing=s.spacing,
                          clip_denoised=s.clip_denoised,
                          steps_offset=s.get("steps_offset", 0),
                          alpha_one_at_end=s.get("alpha_one_at_end", True))
      if first_stage_args is not None:
        x = first_stage.decode_latents(*first_stage_args, x)
      return x

    self._run = xla_options.jit(run, model, out_shardings=sharding)

  def first_stage_args(self):
    """The decoder's weights and scaling as arguments of `_run` (None in pixel space)."""
    return _first_stage_args(self.first_stage)

  def labels(self, i: int) -> np.ndarray | None:
    """The classes of batch i: sampling.class_label, or 0, 1, ..., K-1, 0, ... counted over all
    batches (None for an unconditional model)."""
    if not self.num_classes:
      return None
    if self.class_label >= 0:
      return np.full((self.batch_size,), self.class_label, np.int32)
    return ((i * self.batch_size + np.arange(self.batch_size)) % self.num_classes).astype(np.int32)

  def _device_labels(self, i: int):
    y = self.labels(i)
    return None if y is None else parallel.replicated_to_global(y, self.mesh)

  def prompts(self, i: int, count: int | None = None) -> list[str] | None:
    """The captions of batch i (its first `count` images): the prompt list in turn, counted
    over all batches (None for a model without text conditioning)."""
    if self.prompt_list is None:
      return None
    start, k = i * self.batch_size, len(self.prompt_list)
    return [self.prompt_list[j % k] for j in range(start, start + (count or self.batch_size))]

  def contexts(self, i: int):
    """(context, the empty prompt's) of batch i's prompts, on the mesh (None without text)."""
    if self.text is None:
      return None
    return self.text.contexts(self.prompts(i)), self.null_context

  @functools.cached_property
  def null_context(self):
    """The empty prompt's context [1, L, width], replicated (the unconditional model's)."""
    return self.text.null_context()

  def batches(self, params, num: int, seed: int = 0):
    """`num` images as uint8 NHWC batches; image i depends only on (seed, i // batch)."""
    base = jax.random.PRNGKey(seed)
    for i in range(int(math.ceil(num / self.batch_size))):
      x = self._run(params, jax.random.fold_in(base, i), self.first_stage_args(),
                    self._device_labels(i), self.contexts(i))
      yield to_uint8(parallel.to_host(x))[:num - i * self.batch_size]
      logging.log_every_n_seconds(logging.INFO, "sampled %d / %d", 30,
                                  min((i + 1) * self.batch_size, num), num)

  def __call__(self, params, num: int, seed: int = 0) -> np.ndarray:
    """`num` images as one uint8 NHWC array."""
    return np.concatenate(list(self.batches(params, num, seed)))


def prompt_list(config) -> list[str]:
  """A text-conditional model's prompts: sampling.prompts, else the captions of the classes
  (text.caption_template); one message when there are neither."""
  from diffusion_jax import data
  from diffusion_jax.text_conditioning import TextConditioningError, class_captions
  if config.sampling.get("prompts"):
    return [str(p) for p in config.sampling.prompts]
  template = config.text.get("caption_template")
  names = data.class_names(config.data) if template else None
  if not names:
    raise TextConditioningError(
        "a text-conditional model samples from prompts: set --config.sampling.prompts="
        "\"('a photo of a cat', 'a photo of a dog')\""
        + (f" ({config.data.name} has no class names for text.caption_template)" if template
           else " (or text.caption_template, for labelled data, the captions of the classes)"))
  return class_captions(template, names)


def _decoded(first_stage, fs_args, x):
  """Latents [..., h, w, c] -> images (any leading axes); images pass through."""
  if fs_args is None:
    return x
  lead = x.shape[:-3]
  out = first_stage.decode_latents(*fs_args, x.reshape((-1,) + x.shape[-3:]))
  return out.reshape(lead + out.shape[1:])


def _first_stage_args(first_stage):
  if first_stage is None:
    return None
  scale, shift = first_stage.scaling()
  return first_stage.params, jnp.float32(scale), jnp.float32(shift)


def figure_chain(config) -> tuple[int | None, str]:
  """(num_steps, spacing) of the figures' ancestral chain: config.sampling.num_steps, when fewer
  than T, on the respaced process (its spacing where an ancestral one, else "uniform"); None:
  all T steps."""
  s, T = config.sampling, config.diffusion.num_timesteps
  num_steps = int(s.num_steps) if s.get("num_steps") and s.num_steps < T else None
  spacing = s.get("spacing") if s.get("spacing") in samplers.ANCESTRAL_SPACINGS else "uniform"
  return num_steps, spacing


def progressive_figure(config, model, diffusion, params, mesh, path: str, num: int = 8,
                       first_stage=None, sampler=None):
  """Rows: samples; columns: x^_0 predicted at config.sampling.progressive_steps (Fig. 6) along
  `figure_chain`'s ancestral chain (respaced when sampling.num_steps < T); for latent
  diffusion, the predicted latents decoded; a text-conditional model's rows follow `sampler`'s
  first prompts (unguided)."""
  s = config.sampling
  size, channels = model_input_shape(config)
  n = _per_device_multiple(num, mesh)
  steps = sorted(set(int(k) for k in s.progressive_steps), reverse=True)
  sharding = parallel.batch_sharding(mesh)

  context = None
  if sampler is not None and sampler.text is not None:
    context = sampler.text.contexts(sampler.prompts(0, n))

  @functools.partial(xla_options.jit, model=model)
  def run(params, key, fs_args, context):
    k1, k2 = jax.random.split(key)
    x_T = jax.lax.with_sharding_constraint(
        jax.random.normal(k1, (n, size, size, channels)), sharding)
    _, rec = samplers.progressive_sample(diffusion, denoiser(model, params, context=context),
                                         x_T, k2, steps, s.clip_denoised, *figure_chain(config))
    return _decoded(first_stage, fs_args, rec)

  rec = parallel.to_host(run(params, jax.random.PRNGKey(s.seed + 1),
                             _first_stage_args(first_stage), context))  # [steps, n, H, W, C]
  rows = np.swapaxes(rec, 0, 1)[:num].reshape((-1,) + rec.shape[2:])
  return save_grid(rows, path, ncols=len(steps))


def interpolation_figure(config, model, diffusion, params, mesh, path: str, x_a, x_b,
                         first_stage=None, context=None):
  """Rows: pairs of source images; columns: decoded mixes along config.sampling.interp_lambdas.
  Latent diffusion: the sources' latents (the posterior's mean, scaled) are mixed, and each
  result decoded. context: a text-conditional model's, [1, L, d] (the empty prompt's)."""
  s = config.sampling
  lam = tuple(float(v) for v in s.interp_lambdas)
  fs_args = _first_stage_args(first_stage)

  @functools.partial(xla_options.jit, model=model)
  def run(params, a, b, key, fs_args, context):
    if fs_args is not None:
      a, b = (first_stage.encode_latents(*fs_args, v) for v in (a, b))  # the means
    out = samplers.interpolate(diffusion, denoiser(model, params, context=context), a, b, key,
                               int(s.interp_t), lam, s.clip_denoised, *figure_chain(config))
    return _decoded(first_stage, fs_args, out)

  rep = NamedSharding(mesh, P())
  out = run(params, jax.device_put(jnp.asarray(x_a), rep), jax.device_put(jnp.asarray(x_b), rep),
            jax.random.PRNGKey(s.seed + 2), fs_args, context)
  out = parallel.to_host(out)  # [pairs, L, H, W, C]
  # show the sources at both ends of each row
  rows = np.concatenate([np.asarray(x_a)[:, None], out, np.asarray(x_b)[:, None]], axis=1)
  return save_grid(rows.reshape((-1,) + rows.shape[2:]), path, ncols=len(lam) + 2)


def restore_ema_params(config, workdir: str, step: int | None = None):
  """(trainer, step, EMA parameters) of the newest (or the given) checkpoint in workdir."""
  from diffusion_jax import checkpoints
  from diffusion_jax.train import Trainer
  trainer = Trainer(config)
  step, state, meta = checkpoints.restore_trained(
      workdir, trainer.abstract_state, step, "train first (--mode=train with this "
      "--workdir), or import weights with python -m diffusion_jax.convert")
  trainer.use_latent_scale(meta)
  return trainer, step, state.ema_params


def run_sample_mode(config, workdir: str) -> str:
  """Write workdir/samples/<step>/{samples.npz, samples.png, progressive.png, interpolation.png}."""
  s = config.sampling
  trainer, step, params = restore_ema_params(config, workdir, s.checkpoint_step)
  out_dir = os.path.join(workdir, "samples", str(step))
  os.makedirs(out_dir, exist_ok=True)
  logging.info("Sampling %d images with %s (%s network evaluations each) from step %d",
               s.num_samples, s.method,
               samplers.network_evaluations(s.method, trainer.diffusion, s.num_steps), step)
  sampler = Sampler(config, trainer.model, trainer.diffusion, trainer.mesh,
                    min(s.batch_size, s.num_samples), trainer.first_stage, trainer.text)
  images = sampler(params, s.num_samples, s.seed)
  if jax.process_index() == 0:  # guided-diffusion's format: arr_0 images, arr_1 their classes
    num_batches = -(-s.num_samples // sampler.batch_size)
    labels = ({} if not sampler.num_classes else {"arr_1": np.concatenate(
        [sampler.labels(i) for i in range(num_batches)])[:s.num_samples]})
    np.savez(os.path.join(out_dir, "samples.npz"), arr_0=images, **labels)
    if sampler.text is not None:  # line i: the prompt of image i
      prompts = sum((sampler.prompts(i) for i in range(num_batches)), [])[:s.num_samples]
      with open(os.path.join(out_dir, "prompts.txt"), "w", encoding="utf-8") as f:
        f.write("".join(p.replace("\n", " ") + "\n" for p in prompts))
    logging.info("Wrote %s", save_grid(images[:100], os.path.join(out_dir, "samples.png")))
  if s.figures:
    path = progressive_figure(config, trainer.model, trainer.diffusion, params, trainer.mesh,
                              os.path.join(out_dir, "progressive.png"),
                              first_stage=trainer.first_stage, sampler=sampler)
    logging.info("Wrote %s", path)
    x_a, x_b = _interpolation_sources(config, images)
    path = interpolation_figure(config, trainer.model, trainer.diffusion, params, trainer.mesh,
                                os.path.join(out_dir, "interpolation.png"), x_a, x_b,
                                trainer.first_stage,
                                None if sampler.text is None else sampler.null_context)
    logging.info("Wrote %s", path)
  return out_dir


def _interpolation_sources(config, samples, pairs: int = 4):
  """Test-set images when the data is at hand (as in the paper), else our own samples."""
  from diffusion_jax import data
  try:
    x = next(data.eval_images(config, config.eval.split, 2 * pairs, 2 * pairs))
  except Exception as e:  # noqa: BLE001 -- the figure must not fail for lack of data
    logging.warning("interpolating between samples (no %s data: %s)", config.eval.split, e)
    x = samples[: 2 * pairs].astype(np.float32) / 127.5 - 1.0
  pairs = x.shape[0] // 2
  return x[:pairs], x[pairs: 2 * pairs]
