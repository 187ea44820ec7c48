"""Training: the state, one compiled train step, and the loop with checkpoints and logging.

The step is a pure function of (state, batch): its randomness is derived from the state's
key folded with the step number, and the data order is a function of (seed, step), so a
run resumed from a checkpoint continues exactly as the uninterrupted run would have.
"""
from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from diffusion_jax import checkpoints, data, dreambooth, latent, parallel, xla_options
from diffusion_jax import diffusion as dm
from diffusion_jax.models import build_model, drop_labels
from diffusion_jax.images import grid, save_curves, save_grid
from diffusion_jax.sample import Sampler
from diffusion_jax.text_conditioning import load_text_encoder


class TrainingError(RuntimeError):
  pass


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array  # raw key data (uint32), so that checkpoints hold plain arrays


def make_optimizer(t) -> optax.GradientTransformation:
  """Adam with linear warmup to lr (then constant) and global-norm clipping (Appendix B)."""
  warmup = max(int(t.warmup_steps), 1)
  schedule = lambda step: t.lr * jnp.minimum((step + 1) / warmup, 1.0)
  chain = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip > 0 else []
  return optax.chain(*chain, optax.adam(schedule))


def init_state(config, model, tx, key, context_spec=None) -> TrainState:
  """Step 0; context_spec: what a text-conditional model gets per caption (ShapeDtypeStruct)."""
  size, ch = latent.model_input_shape(config)
  init_key, state_key = jax.random.split(key)
  x = jnp.zeros((1, size, size, ch), jnp.float32)
  y = jnp.zeros((1,), jnp.int32) if config.model.num_classes else None
  context = None if context_spec is None else jnp.zeros((1,) + context_spec.shape,
                                                         context_spec.dtype)
  params = model.init(init_key, x, jnp.zeros((1,), jnp.int32), y, context=context)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                    opt_state=tx.init(params), rng=jax.random.key_data(state_key))


def loss_fn(params, model, diffusion, batch, dropout_key, train: bool = True,
            label_dropout: float = 0.0):
  """Mean of `diffusion.training_losses` on a batch holding image, t, noise (and label; a
  class-conditional model sees the null label instead with probability label_dropout; and
  context: a text-conditional model's text encodings; and loss_weight: each example's weight,
  DreamBooth's prior preservation)."""
  y = batch.get("label") if model.num_classes else None
  if y is not None and train:
    y = drop_labels(jax.random.fold_in(dropout_key, 0xC1A55), y, model.num_classes,
                    label_dropout)
  context = batch.get("context")
  denoise_fn = lambda x, tt: model.apply({"params": params}, x, tt, y, train=train,
                                         context=context, rngs={"dropout": dropout_key})
  losses = diffusion.training_losses(denoise_fn, batch["image"], batch["t"], batch["noise"])
  weights = batch.get("loss_weight")
  return jnp.mean(losses if weights is None else weights * losses)


def train_step(state: TrainState, batch, *, model, diffusion, tx, ema_decay: float,
               accum_steps: int = 1, label_dropout: float = 0.0):
  """One optimiser update: grads (over micro-batches), Adam, EMA. Returns (state, metrics).

  t ~ Uniform{0..T-1} and the noise are drawn for the whole batch before it is split into
  micro-batches, so accumulation changes the memory use, not the result.
  """
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  t_key, noise_key, dropout_key = jax.random.split(key, 3)
  x0 = batch["image"]
  batch = dict(batch, t=jax.random.randint(t_key, (x0.shape[0],), 0, diffusion.num_timesteps),
               noise=jax.random.normal(noise_key, x0.shape, x0.dtype))
  grad_fn = jax.value_and_grad(functools.partial(loss_fn, label_dropout=label_dropout))
  if accum_steps == 1:
    loss, grads = grad_fn(state.params, model, diffusion, batch, dropout_key)
  else:  # the same batch in `accum_steps` sequential pieces, averaged
    micro = jax.tree.map(lambda x: x.reshape((accum_steps, -1) + x.shape[1:]), batch)

    def body(carry, inputs):
      i, mb = inputs
      l, g = grad_fn(state.params, model, diffusion, mb, jax.random.fold_in(dropout_key, i))
      return jax.tree.map(jnp.add, carry, (l, g)), None

    zero = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params))
    (loss, grads), _ = jax.lax.scan(body, zero, (jnp.arange(accum_steps), micro),
                                    unroll=xla_options.scan_unroll())
    loss, grads = jax.tree.map(lambda x: x / accum_steps, (loss, grads))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = optax.incremental_update(params, state.ema_params, step_size=1.0 - ema_decay)
  new_state = state.replace(step=state.step + 1, params=params, ema_params=ema,
                            opt_state=opt_state)
  return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


def scan_steps(step_fn, state: TrainState, batches):
  """`step_fn` once per leading slice of `batches` ([k, B, ...]) in one lax.scan: k optimiser
  steps per compiled call, the same updates as k calls. Metrics come back stacked, [k]."""
  return jax.lax.scan(step_fn, state, batches, unroll=xla_options.scan_unroll())


def event_periods(t) -> tuple[int, int, int]:
  """The periods, in steps, of the loop's events: log, checkpoint, sample grid."""
  return t.log_every, t.checkpoint_every, t.sample_every


class Trainer:
  """Everything a run needs, built once from the config: mesh, model, state shardings, step."""
  log_keys = ("grad_norm",)  # the last step's metrics logged beside the window's mean loss

  def __init__(self, config, mesh=None):
    self.config = config
    self.mesh = mesh or parallel.make_mesh()
    self.first_stage = latent.load_first_stage(config, self.mesh)  # None in pixel space
    self.text = load_text_encoder(config, self.mesh)  # None unless text-conditional
    self._latent_key = jax.random.fold_in(jax.random.PRNGKey(config.training.seed), 0x1A7E)
    self.model = build_model(config)
    self.diffusion = dm.from_config(config.diffusion)
    self.tx = make_optimizer(config.training)
    key = jax.random.PRNGKey(config.training.seed)
    init = functools.partial(init_state, config, self.model, self.tx, context_spec=None if (
        self.text is None) else self.text.context_spec)
    abstract = jax.eval_shape(init, key)
    self.state_sharding = parallel.state_shardings(abstract, self.mesh, config.training.fsdp)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
        self.state_sharding)
    self._init = xla_options.jit(init, out_shardings=self.state_sharding)
    self._key = key
    # unjitted: to trace, scan or call inside another jit
    self.train_step = functools.partial(
        train_step, model=self.model, diffusion=self.diffusion, tx=self.tx,
        ema_decay=config.training.ema_decay, accum_steps=config.training.grad_accum_steps,
        label_dropout=config.model.get("label_dropout", 0.0))
    self.steps_per_dispatch = int(config.training.steps_per_dispatch)
    self.step_fn = self.jit_step()

  def jit_step(self, donate: bool = True, steps: int = 1):
    """The compiled step on the mesh; steps > 1: that many steps per call over a stacked
    [steps, B, ...] batch (`scan_steps`). donate=False keeps the input state alive (a lever)."""
    fn, batch_sharding = self.train_step, parallel.batch_sharding(self.mesh)
    if steps > 1:
      fn = functools.partial(scan_steps, self.train_step)
      batch_sharding = parallel.stacked_batch_sharding(self.mesh)
    return xla_options.jit(
        fn, self.model, in_shardings=(self.state_sharding, batch_sharding),
        out_shardings=(self.state_sharding, None), donate_argnums=(0,) if donate else ())

  @functools.cached_property
  def multi_step_fn(self):
    """`steps_per_dispatch` steps per compiled call; compiled on first use."""
    return self.jit_step(steps=self.steps_per_dispatch)

  def steps_to_dispatch(self, step: int) -> int:
    """steps_per_dispatch, or 1 where a log, checkpoint, sample or the end would fall inside
    the next call (so every event still happens at its exact step)."""
    t, k = self.config.training, self.steps_per_dispatch
    if k == 1 or step + k > t.num_steps:
      return 1
    inside = lambda every: (step + k - 1) // every > step // every
    return 1 if any(inside(e) for e in event_periods(t)) else k

  def run_steps(self, state: TrainState, host_batches: list[dict], step: int | None = None):
    """len(host_batches) steps (1 or steps_per_dispatch) from `step` -> (state, metrics of the
    last step, summed loss)."""
    if len(host_batches) == 1:
      state, metrics = self.step_fn(state, self.device_batch(host_batches[0], step))
      return state, metrics, metrics["loss"]
    if self.first_stage is None and self.text is None:
      batch = parallel.global_batch(parallel.stack_batches(host_batches), self.mesh, stacked=True)
    else:
      per_step = [self.device_batch(b, step + i) for i, b in enumerate(host_batches)]
      batch = jax.device_put(jax.tree.map(lambda *x: jnp.stack(x), *per_step),
                             parallel.stacked_batch_sharding(self.mesh))
    state, metrics = self.multi_step_fn(state, batch)
    return state, jax.tree.map(lambda m: m[-1], metrics), jnp.sum(metrics["loss"])

  def device_batch(self, host_batch: dict, step: int | None) -> dict:
    """A host batch on the mesh; for latent diffusion its images encoded (the posterior
    sampled with a key of the step, so a resumed run draws the same latents); for text
    conditioning its token ids encoded as "context" (each caption the empty one with
    probability text.dropout, drawn with a key of the step)."""
    batch = parallel.global_batch(host_batch, self.mesh)
    key = jax.random.fold_in(self._latent_key, step or 0)
    if self.first_stage is not None:
      batch = dict(batch, image=self.first_stage.encode(batch["image"], key))
    if self.text is not None:
      batch = dict(batch, context=self.text.encode(batch.pop("tokens"),
                                                   jax.random.fold_in(key, 0x7E47),
                                                   self.config.text.dropout))
    return batch

  def use_latent_scale(self, metadata: dict | None, estimate_from=None):
    """Latent diffusion: the scale factor of the config, else the checkpoint's (metadata),
    else the published one, else 1/std of the latents of the host batch `estimate_from()`
    returns; returns the factor (None in pixel space)."""
    fs = self.first_stage
    if fs is None:
      return None
    stored = (metadata or {}).get(latent.SCALE_KEY)
    if self.config.latent.scale_factor is None and stored is not None:
      fs.scale_factor = float(stored)
    if fs.scale_factor is None and estimate_from is not None:
      images = parallel.global_batch(estimate_from(), self.mesh)["image"]
      fs.scale_factor = fs.estimate_scale_factor(images, self._latent_key)
      logging.info("Latent scale factor 1/std(z) = %.5f (first training batch)",
                   fs.scale_factor)
    fs.scaling()  # says what to do when it is still unknown
    return fs.scale_factor

  @functools.cached_property
  def sampler(self) -> Sampler:
    """The EMA-sample grid's sampler, compiled once for the whole run."""
    return Sampler(self.config, self.model, self.diffusion, self.mesh,
                   self.config.training.num_train_samples, self.first_stage, self.text)

  def init(self) -> TrainState:
    return self._init(self._key)

  def write_images(self, state, workdir: str, step: int, writer=None):
    """A grid of EMA samples with the configured sampler, as PNG and in TensorBoard."""
    cfg = self.config
    images = self.sampler(state.ema_params, cfg.training.num_train_samples,
                          seed=cfg.training.seed)
    if jax.process_index() == 0:
      path = save_grid(images, os.path.join(workdir, "train_samples", f"step_{step:08d}.png"))
      logging.info("EMA samples at step %d: %s", step, path)
      if writer:
        writer.add_image("samples", grid(images), step, dataformats="HWC")

  def num_params(self) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.abstract_state.params))


def make_trainer(config, mesh=None):
  """The trainer of `config.stage`: the diffusion model's, or the autoencoder's
  (train_autoencoder.AutoencoderTrainer, same interface)."""
  if config.get("stage", "diffusion") == "autoencoder":
    from diffusion_jax.train_autoencoder import AutoencoderTrainer
    return AutoencoderTrainer(config, mesh)
  return Trainer(config, mesh)


def _host_log(workdir, record):
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
      f.write(json.dumps(record) + "\n")


def _any_process(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.array(flag))))


def summary_writer(logdir: str):
  """tensorboardX's SummaryWriter for logdir. tensorboardX imports torch wherever it is
  installed, only to accept torch.Tensor values: ~4 s and ~0.6 GB at every start on 2 cores. We
  log numpy, so unless torch is already loaded it is hidden while tensorboardX loads."""
  hide = "torch" not in sys.modules
  if hide:
    sys.modules["torch"] = None  # `import torch` raises ImportError meanwhile
  try:
    from tensorboardX import SummaryWriter
  finally:
    if hide:
      del sys.modules["torch"]
  return SummaryWriter(logdir)


def train_and_evaluate(config, workdir: str) -> dict:
  """Train `config` in `workdir`, resuming from its newest checkpoint. Returns final metrics."""
  t = config.training
  trainer = make_trainer(config)
  os.makedirs(workdir, exist_ok=True)
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), t.keep_checkpoints)
  restored_meta = None
  if ckpt.latest_step() is not None:
    step, state, restored_meta = ckpt.restore(trainer.abstract_state)
    logging.info("Resumed from checkpoint at step %d", step)
  else:
    state, step = trainer.init(), 0
    logging.info("Initialised %s parameters", f"{trainer.num_params():,}")
  if step >= t.num_steps:
    logging.info("Already trained to step %d (num_steps=%d)", step, t.num_steps)
    ckpt.close()
    return {"step": step}

  writer = None
  if jax.process_index() == 0:
    writer = summary_writer(os.path.join(workdir, "tensorboard"))
  if dreambooth.enabled(config):  # a pre-trained model; the class images before they are read
    dreambooth.ensure_class_images(config, trainer, state.ema_params, step, restored_meta)
  tokenize = trainer.text.tokenize if getattr(trainer, "text", None) is not None else None
  batches = data.train_batches(config, start_step=step, tokenize=tokenize)
  k = trainer.steps_per_dispatch
  if k > 1 and any(e % k for e in event_periods(t)):
    logging.warning("training.steps_per_dispatch=%d does not divide log_every, checkpoint_every "
                    "and sample_every: steps around those events run one per call (a second "
                    "compile)", k)
  meta = {"config": config.to_json_best_effort()}
  if getattr(trainer, "first_stage", None) is not None:
    meta[latent.SCALE_KEY] = trainer.use_latent_scale(
        restored_meta, lambda: next(data.train_batches(config, start_step=0, tokenize=tokenize)))
  last_saved = step if ckpt.latest_step() is not None else None
  window_loss, window_n, t0, t_start, step0 = jnp.zeros(()), 0, time.time(), time.time(), step
  result = {}
  with checkpoints.PreemptionGuard() as guard:
    while step < t.num_steps:
      n = trainer.steps_to_dispatch(step)
      state, metrics, loss_sum = trainer.run_steps(state, [next(batches) for _ in range(n)],
                                                   step)
      step += n
      window_loss, window_n = window_loss + loss_sum, window_n + n
      at_log = step % t.log_every == 0 or step == t.num_steps
      at_ckpt = step % t.checkpoint_every == 0 or step == t.num_steps
      stop = _any_process(guard.requested) if at_log or jax.process_count() == 1 else False
      if at_log or at_ckpt or stop:
        loss = float(window_loss) / window_n  # host sync
        if not math.isfinite(loss):
          ckpt.wait()
          raise TrainingError(
              f"loss became {loss} between steps {step - window_n} and {step}; stopped without "
              f"saving. The last good checkpoint (step {ckpt.latest_step()}) is untouched. "
              "Lower --config.training.lr, keep training.grad_clip > 0, or check the data.")
        now = time.time()
        ips = window_n * t.batch_size / max(now - t0, 1e-9)
        eta = (t.num_steps - step) * (now - t_start) / max(step - step0, 1)
        last = {k: float(metrics[k]) for k in trainer.log_keys}
        logging.info("step %d/%d  loss %.5f  %s  %.1f img/s  ETA %s", step, t.num_steps, loss,
                     "  ".join(f"{k} {v:.4g}" for k, v in last.items()), ips,
                     time.strftime("%H:%M:%S", time.gmtime(eta)))
        result = {"step": step, "loss": loss, "img_per_s": ips, **last}
        _host_log(workdir, result)
        if writer:
          for k, v in result.items():
            if k != "step":
              writer.add_scalar(f"train/{k}", v, step)
        window_loss, window_n, t0 = jnp.zeros(()), 0, time.time()
      if at_ckpt or stop:
        ckpt.save(step, state, meta)
        last_saved = step
      if step % t.sample_every == 0 or step == t.num_steps:
        trainer.write_images(state, workdir, step, writer)
      if stop:
        logging.warning("Preemption signal: saved step %d; exiting.", step)
        break
  if last_saved != step:
    ckpt.save(step, state, meta)
  ckpt.wait()
  ckpt.close()
  if writer:
    writer.close()
  _write_loss_curve(workdir)
  return result


def _write_loss_curve(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if jax.process_index() != 0 or not os.path.exists(path):
    return
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  if len(records) >= 2:
    save_curves(os.path.join(workdir, "loss.png"), [r["step"] for r in records],
                {"loss": [r["loss"] for r in records]}, "step", "training loss", logy=True)
