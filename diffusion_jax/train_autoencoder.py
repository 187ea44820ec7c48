"""One compiled training step of the KL autoencoder and its PatchGAN (autoencoder_loss.py).

Both updates happen in one step, as CompVis' two optimizer_idx passes do: the autoencoder
(Adam, betas (0.5, 0.9)) on nll + w_kl kl + lambda f g, then the discriminator on f times its
loss of D(x) against the reconstruction the autoencoder's update saw, held fixed (theirs
recomputes it after that update: one Adam step apart, for one more forward pass).

Before disc_start (f = 0) the step runs neither the discriminator nor the adaptive weight,
which is most of a run in the paper's recipe (the discriminator starts at step 50,001): `gan`
is static, so there are two compiled steps and the loop picks one by the step number
(`uses_gan`). A `lax.cond` between them inside one program measured 8x slower on XLA:CPU,
whose convolutions inside a conditional take a slow path (2.9 s vs 0.37 s a step for a small
autoencoder). The step is a pure function of (state, batch): the posterior noise comes from
the state's key folded with the step number.

Other differences from CompVis' (PyTorch Lightning 1.4, one global_step per batch, which
disc_start counts): the discriminator's Adam starts fresh at disc_start, where theirs has
taken ~50k zero-gradient steps (its first updates ~1.6x larger under betas (0.5, 0.9)); the
BatchNorm statistics of the generator pass's D(x^) are not kept; LPIPS's lin layers run
without their Dropout(0.5) (same expectation, less variance).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from diffusion_jax import autoencoder_loss as L
from diffusion_jax import data, parallel, xla_options
from diffusion_jax.images import grid, save_grid, to_uint8


@dataclass(frozen=True)
class LossConfig:
  kl_weight: float = 1e-6
  perceptual_weight: float = 1.0
  logvar: float = 0.0
  disc_start: int = 50_001
  disc_factor: float = 1.0
  disc_weight: float = 0.5
  disc_loss: str = "hinge"
  codebook_weight: float = 1.0  # VQ first stages: the codebook term's weight (VQGAN: 1)
  commitment: float = 0.25      # ... and beta, the commitment term's, inside it

  def __post_init__(self):
    if self.disc_loss not in L.D_LOSSES:
      raise ValueError(f"disc_loss={self.disc_loss!r}: expected one of {tuple(L.D_LOSSES)}")
    for name in ("kl_weight", "perceptual_weight", "disc_factor", "disc_weight", "disc_start",
                 "codebook_weight", "commitment"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name}={getattr(self, name)!r} must be >= 0")


@flax.struct.dataclass
class AutoencoderState:
  step: jax.Array
  params: Any
  opt_state: Any
  disc_params: Any
  disc_stats: Any  # the discriminator's BatchNorm running statistics
  disc_opt_state: Any
  rng: jax.Array  # raw key data (uint32)


def make_optimizer(lr: float) -> optax.GradientTransformation:
  """Adam(lr, b1=0.5, b2=0.9), the LDM autoencoder's and its discriminator's."""
  return optax.adam(lr, b1=0.5, b2=0.9)


def init_state(key, x, autoencoder, discriminator, tx, disc_tx) -> AutoencoderState:
  """Parameters of both networks for images shaped like x ([1, H, W, C])."""
  ae_key, d_key, state_key = jax.random.split(key, 3)
  params = autoencoder.init(ae_key, x)["params"]
  d_vars = discriminator.init(d_key, x, train=False)
  return AutoencoderState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), disc_params=d_vars["params"],
                          disc_stats=d_vars["batch_stats"],
                          disc_opt_state=disc_tx.init(d_vars["params"]),
                          rng=jax.random.key_data(state_key))


def _with_last_kernel(params, kernel):
  dec = dict(params["decoder"], conv_out=dict(params["decoder"]["conv_out"], kernel=kernel))
  return dict(params, decoder=dec)


def uses_gan(step: int, loss: LossConfig) -> bool:
  """Whether the step numbered `step` (0-based) has the GAN terms (f(step) > 0)."""
  return step >= loss.disc_start and loss.disc_factor > 0


def train_step(state: AutoencoderState, batch, *, autoencoder, discriminator,
               perceptual: Callable | None, tx, disc_tx, loss: LossConfig, gan: bool):
  """One update: the autoencoder, and with `gan` (= uses_gan(state.step)) the adaptive GAN
  term and the discriminator's update. perceptual(x, x_rec) -> [B] (LPIPS), or None.

  Returns (state, metrics): loss, nll, rec_l1, kl (a VQ model: vq, codebook_usage), g_loss,
  d_weight, disc_factor, d_loss, logits_real, logits_fake, grad_norm.
  """
  x = batch["image"]
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  factor = loss.disc_factor if gan else 0.0
  d_vars = {"params": state.disc_params, "batch_stats": state.disc_stats}

  def parts(params):
    rec, mean, third = autoencoder.apply({"params": params}, x, key, train=True,
                                         rngs={"dropout": jax.random.fold_in(key, 1)})
    p = perceptual(x, rec) if perceptual is not None and loss.perceptual_weight > 0 else None
    nll = L.nll_loss(x, rec, p, loss.logvar, loss.perceptual_weight)
    g = jnp.zeros(())
    if gan:  # the discriminator in training mode, as theirs (its statistics not kept)
      logits, _ = discriminator.apply(d_vars, rec, train=True, mutable=["batch_stats"])
      g = -jnp.mean(logits)
    aux = {"nll": nll, "g_loss": g, "rec_l1": jnp.mean(jnp.abs(x - rec))}
    if autoencoder.codebook_size:  # third: the chosen codebook vectors and their indices
      aux["vq"] = L.vq_loss(mean, third[0], loss.commitment)
      aux["codebook_usage"] = L.codebook_usage(third[1], autoencoder.codebook_size)
    else:  # third: the posterior's log-variance
      aux["kl"] = L.kl_loss(mean, third)
    return nll, g, aux, rec

  d_weight = jnp.zeros(())
  if gan:  # gradients at the last conv only: XLA shares the forward pass with the step's
    last = state.params["decoder"]["conv_out"]["kernel"]
    part = lambda i: jax.grad(lambda k: parts(_with_last_kernel(state.params, k))[i])(last)
    d_weight = L.adaptive_weight(part(0), part(1), loss.disc_weight)

  def total(p):
    nll, g, aux, rec = parts(p)
    reg = (loss.codebook_weight * aux["vq"] if "vq" in aux else loss.kl_weight * aux["kl"])
    return nll + reg + d_weight * factor * g, (aux, rec)

  (value, (aux, rec)), grads = jax.value_and_grad(total, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  disc_params, disc_stats, disc_opt = state.disc_params, state.disc_stats, state.disc_opt_state
  zero = jnp.zeros(())
  d_metrics = {"d_loss": zero, "logits_real": zero, "logits_fake": zero}
  if gan:
    rec = jax.lax.stop_gradient(rec)
    d_loss_fn = L.D_LOSSES[loss.disc_loss]

    def objective(dp):
      real, upd = discriminator.apply({"params": dp, "batch_stats": disc_stats}, x,
                                      train=True, mutable=["batch_stats"])
      fake, upd = discriminator.apply({"params": dp, "batch_stats": upd["batch_stats"]}, rec,
                                      train=True, mutable=["batch_stats"])
      return factor * d_loss_fn(real, fake), (upd["batch_stats"], jnp.mean(real),
                                              jnp.mean(fake))

    (d_loss, (disc_stats, real, fake)), d_grads = jax.value_and_grad(
        objective, has_aux=True)(disc_params)
    d_updates, disc_opt = disc_tx.update(d_grads, disc_opt, disc_params)
    disc_params = optax.apply_updates(disc_params, d_updates)
    d_metrics = {"d_loss": d_loss, "logits_real": real, "logits_fake": fake}

  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            disc_params=disc_params, disc_stats=disc_stats,
                            disc_opt_state=disc_opt)
  metrics = dict(aux, **d_metrics, loss=value, d_weight=d_weight,
                 disc_factor=jnp.asarray(factor, jnp.float32), grad_norm=optax.tree.norm(grads))
  return new_state, metrics


def restore_autoencoder(config, workdir: str, step: int | None = None, mesh=None,
                        hint: str = "train first (--mode=train with this config and --workdir)"):
  """(trainer, step, autoencoder parameters) of the newest (or the given) checkpoint of an
  autoencoder run; no LPIPS weights are loaded."""
  from diffusion_jax import checkpoints
  trainer = AutoencoderTrainer(config, mesh, lpips=False)
  step, state, _ = checkpoints.restore_trained(workdir, trainer.abstract_state, step, hint)
  return trainer, step, state.params


def lpips_perceptual(lpips_params, dtype=jnp.float32) -> Callable:
  """perceptual(x, x_rec) from LPIPS weights; grey images are compared as RGB."""
  from diffusion_jax.lpips import LPIPS
  net = LPIPS(dtype)

  def perceptual(x, x_rec):
    if x.shape[-1] == 1:
      x, x_rec = jnp.repeat(x, 3, axis=-1), jnp.repeat(x_rec, 3, axis=-1)
    return net.apply({"params": lpips_params}, x, x_rec)
  return perceptual


class AutoencoderTrainer:
  """The autoencoder and its discriminator built from `config` (stage "autoencoder"), with the
  diffusion Trainer's interface, so that train.train_and_evaluate runs either: mesh, state
  shardings, init, run_steps, write_images.

  The two compiled steps (with and without the GAN, `uses_gan`) take the LPIPS weights as an
  argument rather than as constants folded into the program.
  """
  steps_per_dispatch = 1

  def __init__(self, config, mesh=None, lpips: bool = True):
    """lpips=False: no LPIPS weights loaded (evaluation; the step then leaves LPIPS out)."""
    from diffusion_jax.models import DTYPES, build_autoencoder
    from diffusion_jax.models.discriminator import PatchDiscriminator
    self.config, a = config, config.autoencoder
    self.mesh = mesh or parallel.make_mesh()
    dtype = DTYPES[config.model.dtype]
    self.model = build_autoencoder(config)
    reg = ("vq", "codebook_usage") if self.model.codebook_size else ("kl",)
    self.log_keys = ("rec_l1",) + reg + ("g_loss", "d_weight", "d_loss", "logits_real",
                                         "logits_fake", "grad_norm")
    self.discriminator = PatchDiscriminator(a.disc_ndf, a.disc_layers, dtype)
    self.loss = LossConfig(**a.loss.to_dict())
    self.tx = self.disc_tx = make_optimizer(a.lr)
    self.lpips_params = None
    if lpips and self.loss.perceptual_weight > 0:
      from diffusion_jax.lpips import LPIPSWeightsError, load_lpips_params
      try:
        weights = load_lpips_params(a.lpips_path)
      except LPIPSWeightsError as e:
        raise LPIPSWeightsError(f"{e}\nOr train without the perceptual loss: "
                                "--config.autoencoder.loss.perceptual_weight=0") from None
      self.lpips_params = jax.device_put(weights, parallel.replicated(self.mesh))
    size, ch = config.data.image_size, config.data.channels
    x = jnp.zeros((1, size, size, ch), jnp.float32)
    init = functools.partial(init_state, x=x, autoencoder=self.model,
                             discriminator=self.discriminator, tx=self.tx, disc_tx=self.disc_tx)
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    self.state_sharding = parallel.state_shardings(abstract, self.mesh, config.training.fsdp)
    self.abstract_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract,
        self.state_sharding)
    self._init = xla_options.jit(init, out_shardings=self.state_sharding)
    self._key = jax.random.PRNGKey(config.training.seed)

    def step(state, batch, lpips_params, gan):
      perceptual = None if lpips_params is None else lpips_perceptual(lpips_params, dtype)
      return train_step(state, batch, autoencoder=self.model, discriminator=self.discriminator,
                        perceptual=perceptual, tx=self.tx, disc_tx=self.disc_tx,
                        loss=self.loss, gan=gan)
    self.train_step = step  # unjitted

  @functools.cache  # noqa: B019 -- two entries, for the trainer's lifetime
  def step_fn(self, gan: bool):
    """The compiled step with or without the GAN terms (compiled on first use)."""
    return xla_options.jit(
        functools.partial(self.train_step, gan=gan),
        in_shardings=(self.state_sharding, parallel.batch_sharding(self.mesh),
                      parallel.replicated(self.mesh)),
        out_shardings=(self.state_sharding, None), donate_argnums=(0,))

  def init(self) -> AutoencoderState:
    return self._init(self._key)

  def num_params(self) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.abstract_state.params))

  def steps_to_dispatch(self, step: int) -> int:
    del step
    return 1

  def run_steps(self, state, host_batches: list[dict], step: int):
    """One step (the one numbered `step`) -> (state, metrics, loss)."""
    (batch,) = host_batches
    fn = self.step_fn(uses_gan(step, self.loss))
    state, metrics = fn(state, parallel.global_batch(batch, self.mesh), self.lpips_params)
    return state, metrics, metrics["loss"]

  @functools.cached_property
  def _reconstruct(self):
    return xla_options.jit(lambda p, x: self.model.apply({"params": p}, x)[0])

  @functools.cached_property
  def fixed_images(self) -> np.ndarray:
    """The images reconstructed at every sample_every: the first of the test split."""
    n = self.config.training.num_train_samples
    return np.concatenate(list(data.eval_images(self.config, "test", n, n)))

  def reconstruct(self, params, images: np.ndarray) -> np.ndarray:
    """Images [N, H, W, C] in [-1, 1] -> D(E(x)) (the posterior's mean), on this host."""
    x = parallel.replicated_to_global(parallel.pad_to_multiple(images, jax.device_count()),
                                      self.mesh)
    return parallel.to_host(self._reconstruct(params, x))[: len(images)]

  def write_images(self, state, workdir: str, step: int, writer=None):
    """Each fixed image beside its reconstruction (PNG, and in TensorBoard)."""
    x = self.fixed_images
    rec = np.clip(self.reconstruct(state.params, x), -1.0, 1.0)
    pairs = np.stack([x, rec], axis=1).reshape((-1,) + x.shape[1:])
    cols = 2 * int(np.ceil(np.sqrt(len(x))))
    if jax.process_index() == 0:
      path = save_grid(pairs, os.path.join(workdir, "reconstructions", f"step_{step:08d}.png"),
                       cols)
      logging.info("Reconstructions at step %d: %s", step, path)
      if writer:
        writer.add_image("reconstructions", grid(to_uint8(pairs), cols), step,
                         dataformats="HWC")
