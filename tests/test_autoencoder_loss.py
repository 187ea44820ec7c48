"""The KL autoencoder's objective against its closed forms, the PatchGAN, and the train steps:
the discriminator idle before disc_start, the adaptive weight equal to its definition after,
and a few steps that fit a batch."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import autoencoder_loss as L
from diffusion_jax import train_autoencoder as T
from diffusion_jax.models.autoencoder import AutoencoderKL
from diffusion_jax.models.discriminator import PatchDiscriminator


def test_discriminator_losses_match_their_formulas():
  real, fake = jnp.array([2.0, 0.5, -1.0]), jnp.array([-2.0, 0.0, 0.5])
  # hinge: relu(1 - real) = (0, .5, 2); relu(1 + fake) = (0, 1, 1.5)
  np.testing.assert_allclose(L.hinge_d_loss(real, fake), 0.5 * (2.5 / 3 + 2.5 / 3), rtol=1e-6)
  want = 0.5 * (np.mean(np.log1p(np.exp(-np.array(real)))) + np.mean(np.log1p(np.exp(fake))))
  np.testing.assert_allclose(L.vanilla_d_loss(real, fake), want, rtol=1e-6)
  cfg = T.LossConfig(disc_start=10, disc_factor=0.7)
  assert [T.uses_gan(s, cfg) for s in (0, 9, 10, 11)] == [False, False, True, True]
  assert not T.uses_gan(10, T.LossConfig(disc_start=10, disc_factor=0.0))
  with pytest.raises(ValueError, match="disc_loss='wgan': expected one of"):
    T.LossConfig(disc_loss="wgan")
  with pytest.raises(ValueError, match="kl_weight=-1"):
    T.LossConfig(kl_weight=-1)


def test_nll_adds_lpips_to_every_pixel_and_weights_by_logvar():
  rng = np.random.default_rng(0)
  x, r = rng.normal(size=(2, 4, 4, 3)), rng.normal(size=(2, 4, 4, 3))
  p = np.array([0.1, 0.3])
  l1 = np.abs(x - r).sum() / 2
  np.testing.assert_allclose(L.nll_loss(x, r, None), l1, rtol=1e-6)
  np.testing.assert_allclose(L.nll_loss(x, r, p, perceptual_weight=2.0),
                             l1 + 2.0 * p.mean() * 4 * 4 * 3, rtol=1e-6)
  np.testing.assert_allclose(L.nll_loss(x, r, p, logvar=0.5),
                             (l1 + p.mean() * 48) / np.exp(0.5) + 0.5 * 48, rtol=1e-6)


def test_adaptive_weight_is_the_clipped_gradient_ratio_without_gradient():
  a, b = jnp.array([3.0, 4.0]), jnp.array([0.0, 10.0])
  np.testing.assert_allclose(L.adaptive_weight(a, b, 0.5), 0.5 * 5.0 / (10.0 + 1e-4), rtol=1e-6)
  assert float(L.adaptive_weight(a, jnp.zeros(2))) == 1e4  # clipped
  assert float(jax.grad(lambda s: L.adaptive_weight(s * a, b))(1.0)) == 0.0


def test_patch_discriminator_shapes_and_batch_norm_modes():
  d = PatchDiscriminator(ndf=8)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 40, 40, 3))
  v = d.init(jax.random.PRNGKey(1), x, train=False)
  evaluate = jax.jit(lambda v, x: d.apply(v, x, train=False))
  assert evaluate(v, x).shape == (2, 3, 3, 1)  # H/8 - 2: overlapping 70x70 patches
  _, upd = jax.jit(lambda v, x: d.apply(v, x, train=True, mutable=["batch_stats"]))(v, x + 3.0)
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), upd["batch_stats"],
                       v["batch_stats"])
  assert min(jax.tree.leaves(moved)) > 0  # running statistics updated in training
  # evaluation normalises by the running statistics: each example is scored on its own
  np.testing.assert_allclose(evaluate(v, x)[:1], evaluate(v, x[:1]), rtol=1e-5, atol=1e-6)
  kernels = [v["params"][f"conv_{i}"]["kernel"] for i in range(4)]
  assert all(abs(float(jnp.std(k)) - 0.02) < 0.005 for k in kernels)
  assert "bias" not in v["params"]["conv_1"] and "bias" in v["params"]["conv_out"]


def _mse_perceptual(x, r):  # a stand-in perceptual distance, [B]
  return jnp.mean(jnp.square(x - r), axis=(1, 2, 3))


def test_train_step_idle_discriminator_then_adaptive_gan_then_fits_a_batch():
  """The two compiled steps (without and with the GAN), the discriminator starting at 5."""
  ae = AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=2, embed_dim=2)
  disc = PatchDiscriminator(ndf=8, n_layers=2)
  tx, dtx = T.make_optimizer(1e-3), T.make_optimizer(1e-3)
  cfg = T.LossConfig(disc_start=5, kl_weight=1e-3, disc_factor=0.7)
  x = jax.random.uniform(jax.random.PRNGKey(0), (4, 16, 16, 3), minval=-1, maxval=1)
  state0 = T.init_state(jax.random.PRNGKey(1), x[:1], ae, disc, tx, dtx)
  steps = {gan: jax.jit(functools.partial(
      T.train_step, autoencoder=ae, discriminator=disc, perceptual=_mse_perceptual, tx=tx,
      disc_tx=dtx, loss=cfg, gan=gan)) for gan in (False, True)}
  step = lambda state, batch: steps[T.uses_gan(int(state.step), cfg)](state, batch)

  # before disc_start: no discriminator, no adaptive weight; the autoencoder alone trains
  new, m = step(state0, {"image": x})
  assert float(m["disc_factor"]) == 0 and float(m["d_weight"]) == 0 and float(m["d_loss"]) == 0
  jax.tree.map(np.testing.assert_array_equal, new.disc_params, state0.disc_params)
  jax.tree.map(np.testing.assert_array_equal, new.disc_stats, state0.disc_stats)
  np.testing.assert_allclose(m["loss"], m["nll"] + cfg.kl_weight * m["kl"], rtol=1e-6)
  assert int(new.step) == 1
  assert not np.allclose(new.params["decoder"]["conv_out"]["kernel"],
                         state0.params["decoder"]["conv_out"]["kernel"])

  # from disc_start: both networks train, lambda as defined, from gradients over all params
  state = state0.replace(step=jnp.array(cfg.disc_start, jnp.int32))
  new, m = step(state, {"image": x})
  assert float(m["disc_factor"]) == np.float32(0.7)
  assert not np.allclose(new.disc_params["conv_out"]["kernel"],
                         state.disc_params["conv_out"]["kernel"])
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), cfg.disc_start)
  d_vars = {"params": state.disc_params, "batch_stats": state.disc_stats}

  def nll_and_g(params):
    rec, _, _ = ae.apply({"params": params}, x, key, train=True)
    nll = L.nll_loss(x, rec, _mse_perceptual(x, rec))
    logits, _ = disc.apply(d_vars, rec, train=True, mutable=["batch_stats"])
    return nll, -jnp.mean(logits)

  @jax.jit
  def reference(params):
    last = lambda g: g["decoder"]["conv_out"]["kernel"]
    grads = tuple(last(jax.grad(lambda q: nll_and_g(q)[i])(params)) for i in (0, 1))
    rec, _, _ = ae.apply({"params": params}, x, key, train=True)  # D's loss: real, then fake
    real, upd = disc.apply(d_vars, x, train=True, mutable=["batch_stats"])
    fake, _ = disc.apply({"params": d_vars["params"], **upd}, rec, train=True,
                         mutable=["batch_stats"])
    return grads, L.hinge_d_loss(real, fake)

  (g_nll, g_gan), hinge = reference(state.params)
  want = cfg.disc_weight * np.linalg.norm(g_nll) / (np.linalg.norm(g_gan) + 1e-4)
  np.testing.assert_allclose(m["d_weight"], want, rtol=1e-4)
  np.testing.assert_allclose(m["loss"], m["nll"] + cfg.kl_weight * m["kl"]
                             + 0.7 * m["d_weight"] * m["g_loss"], rtol=1e-5)
  np.testing.assert_allclose(m["d_loss"], 0.7 * hinge, rtol=1e-5)

  # 25 steps from the start, the last 20 with the discriminator: the batch is fitted
  state, first = state0, None
  for _ in range(25):
    state, m = step(state, {"image": x})
    first = float(m["rec_l1"]) if first is None else first
    assert np.isfinite(float(m["loss"]))
  assert float(m["rec_l1"]) < 0.6 * first, (first, float(m["rec_l1"]))
  assert int(state.step) == 25 and float(m["disc_factor"]) > 0


def test_lpips_perceptual_compares_grey_images_as_rgb():
  from diffusion_jax.lpips import LPIPS
  z = jnp.zeros((1, 16, 16, 3))
  params = LPIPS().init(jax.random.PRNGKey(0), z, z)["params"]
  f = T.lpips_perceptual(params)  # eagerly: cheaper than compiling for two shapes
  a = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 1), minval=-1, maxval=1)
  grey = f(a, a[::-1])
  rgb = f(jnp.repeat(a, 3, -1), jnp.repeat(a[::-1], 3, -1))
  assert grey.shape == (2,) and float(jnp.abs(grey).min()) > 0
  np.testing.assert_allclose(grey, rgb, rtol=1e-6)
