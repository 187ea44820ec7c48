"""The diffusion math against closed forms and the paper's figures."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffusion_jax import diffusion as dm


def make(mean_type="eps", var_type="fixedlarge", loss_type="mse", schedule="linear", T=1000):
  return dm.GaussianDiffusion(dm.get_beta_schedule(schedule, T), mean_type=mean_type,
                              var_type=var_type, loss_type=loss_type)


def test_schedules():
  lin = dm.get_beta_schedule("linear")
  assert lin.dtype == np.float64 and lin.shape == (1000,)
  np.testing.assert_allclose([lin[0], lin[-1]], [1e-4, 0.02])
  sl = dm.get_beta_schedule("scaled_linear", 1000, 0.00085, 0.012)
  np.testing.assert_allclose(np.sqrt(sl), np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000))
  cos = dm.get_beta_schedule("cosine", 1000)
  assert cos.max() <= 0.999 and np.all(np.diff(cos) >= 0)
  # cosine: alphabar_t = f(t)/f(0) with f(t) = cos^2(((t/T + s)/(1 + s)) pi/2), eq. 17
  f = lambda t: np.cos((t / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2
  np.testing.assert_allclose(np.cumprod(1 - cos)[:900], (f(np.arange(1, 1001)) / f(0))[:900],
                             rtol=1e-9)
  with pytest.raises(ValueError, match="unknown beta schedule"):
    dm.get_beta_schedule("sigmoid")


def test_zero_terminal_snr_rescale_is_lin_et_al_algorithm_1():
  """rescale_zero_terminal_snr: alphabar_T exactly 0, alphabar_1 unchanged, sqrt(alphabar) an
  affine map of the original's (Lin et al. 2023, Algorithm 1), beta_T = 1; the diffusion built
  from it reads v predictions at t = T (x_0 = -v, eps = x_T)."""
  b = dm.get_beta_schedule("scaled_linear", 1000, 0.00085, 0.012)
  z = dm.rescale_zero_terminal_snr(b)
  ab, ab_z = np.cumprod(1 - b), np.cumprod(1 - z)
  assert ab_z[-1] == 0.0 and z[-1] == 1.0 and np.all((z > 0) & (z <= 1))
  np.testing.assert_allclose(ab_z[0], ab[0], rtol=1e-12)
  slope, intercept = np.polyfit(np.sqrt(ab), np.sqrt(ab_z), 1)
  np.testing.assert_allclose(np.sqrt(ab_z), slope * np.sqrt(ab) + intercept, atol=1e-12)
  assert np.all(np.diff(ab_z) < 0)  # still a noising process
  d = dm.GaussianDiffusion(z, mean_type="v")
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 3, 1)), jnp.float32)
  v = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 3, 1)), jnp.float32)
  eps, x0 = d.predict_eps_and_start(v, x, jnp.full((2,), 999))
  np.testing.assert_array_equal(x0, -v)
  np.testing.assert_array_equal(eps, x)


def test_bad_options_are_named():
  with pytest.raises(ValueError, match="mean_type='velocity'"):
    make(mean_type="velocity")
  with pytest.raises(ValueError, match="var_type"):
    make(var_type="big")


def test_q_sample_marginal_matches_the_chain():
  """q(x_t|x_0) (eq. 4) equals running q(x_t|x_{t-1}) (eq. 2) t times."""
  d = make()
  key = jax.random.PRNGKey(0)
  x0 = jnp.full((20000, 1), 0.7)
  x = x0
  for s in range(50):
    key, k = jax.random.split(key)
    x = jnp.sqrt(1 - d.betas[s]) * x + jnp.sqrt(d.betas[s]) * jax.random.normal(k, x.shape)
  mean, var, logvar = d.q_mean_variance(x0, jnp.full((20000,), 49))
  np.testing.assert_allclose(np.mean(x), mean[0, 0], atol=0.01)
  np.testing.assert_allclose(np.var(x), var[0, 0], rtol=0.03)
  np.testing.assert_allclose(logvar[0, 0], np.log(var[0, 0]), rtol=1e-5)


@pytest.mark.parametrize("t", [0, 1, 10, 500, 999])
def test_posterior_is_bayes_rule(t):
  """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0), evaluated on a grid (eqs. 6-7)."""
  d = make()
  x0, xt = 0.3, -0.4
  ab = d.coefs["alphas_cumprod"]
  ab_prev = ab[t - 1] if t > 0 else 1.0
  grid = np.linspace(-6, 6, 200001)
  if t == 0:  # q(x_{-1}) is a point mass at x0: the posterior collapses to it
    mean, var, _ = d.q_posterior_mean_variance(jnp.array([[x0]]), jnp.array([[xt]]), jnp.array([0]))
    np.testing.assert_allclose(mean[0, 0], x0, atol=1e-6)
    assert float(var[0, 0]) == 0.0
    return
  log_p = (stats.norm.logpdf(xt, np.sqrt(1 - d.betas[t]) * grid, np.sqrt(d.betas[t]))
           + stats.norm.logpdf(grid, np.sqrt(ab_prev) * x0, np.sqrt(1 - ab_prev)))
  w = np.exp(log_p - log_p.max())
  w /= w.sum()
  num_mean = (w * grid).sum()
  num_var = (w * (grid - num_mean) ** 2).sum()
  mean, var, logvar = d.q_posterior_mean_variance(
      jnp.array([[x0]], jnp.float32), jnp.array([[xt]], jnp.float32), jnp.array([t]))
  np.testing.assert_allclose(mean[0, 0], num_mean, atol=2e-5)
  np.testing.assert_allclose(var[0, 0], num_var, rtol=2e-3)
  np.testing.assert_allclose(logvar[0, 0], np.log(d.coefs["posterior_variance"][t]), rtol=1e-5)


def test_normal_kl_matches_monte_carlo():
  m1, lv1, m2, lv2 = 0.3, math.log(0.5), -0.2, math.log(1.7)
  x = np.random.default_rng(0).normal(m1, math.sqrt(0.5), 2_000_000)
  mc = np.mean(stats.norm.logpdf(x, m1, math.sqrt(0.5)) - stats.norm.logpdf(x, m2, math.sqrt(1.7)))
  np.testing.assert_allclose(dm.normal_kl(m1, lv1, m2, lv2), mc, atol=2e-3)


@pytest.mark.parametrize("mean,log_scale", [(0.0, -3.0), (0.9, -5.0), (-1.0, -1.0), (0.37, -6.5)])
def test_discretized_decoder_sums_to_one(mean, log_scale):
  x = (jnp.arange(256, dtype=jnp.float32) / 255.0) * 2 - 1
  logp = dm.discretized_gaussian_log_likelihood(
      x, jnp.full_like(x, mean), jnp.full_like(x, log_scale))
  np.testing.assert_allclose(jnp.sum(jnp.exp(logp)), 1.0, atol=1e-4)


def test_prior_bpd_is_about_1e5_bits_per_dim():
  """L_T for the linear schedule (Sec. 4): KL(N(sqrt(ab_T) x0, 1 - ab_T) || N(0, 1))."""
  d = make()
  ab = d.coefs["alphas_cumprod"][-1]
  x0 = jax.random.uniform(jax.random.PRNGKey(0), (8, 32, 32, 3), minval=-1.0, maxval=1.0)
  closed = 0.5 * (-np.log(1 - ab) + (1 - ab) + ab * np.mean(np.asarray(x0) ** 2, (1, 2, 3)) - 1)
  got = d.prior_bpd(x0)
  np.testing.assert_allclose(got, closed / np.log(2), rtol=2e-2)
  assert np.all((got > 3e-6) & (got < 3e-5)), got  # about 1e-5 bits/dim


@pytest.mark.parametrize("mean_type", ["eps", "x0", "mean", "v"])
def test_parameterisations_round_trip(mean_type):
  """eps <-> x0 <-> mu~ <-> v: the same truth in every mean_type gives the posterior exactly."""
  d = make(mean_type=mean_type)
  k1, k2 = jax.random.split(jax.random.PRNGKey(1))
  x0 = jax.random.uniform(k1, (4, 8, 8, 3), minval=-1, maxval=1)
  eps = jax.random.normal(k2, x0.shape)
  t = jnp.array([0, 3, 400, 999])
  xt = d.q_sample(x0, t, eps)
  true_mean = d.q_posterior_mean_variance(x0, xt, t)[0]
  ab = d.coefs["alphas_cumprod"][np.asarray(t)].reshape(-1, 1, 1, 1)
  v = np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0  # Salimans & Ho 2022, Sec. 4
  out = {"eps": eps, "x0": x0, "mean": true_mean, "v": v}[mean_type]
  mean, var, logvar, pred_x0 = d.p_mean_variance(out, xt, t)
  tol = 2e-3 if mean_type == "mean" else 1e-4  # x0 from mu~ divides by a small coefficient
  np.testing.assert_allclose(pred_x0[1:], x0[1:], atol=tol)
  np.testing.assert_allclose(mean, true_mean, atol=1e-4)
  e, x = d.predict_eps_and_start(out, xt, t)
  np.testing.assert_allclose(x[1:], x0[1:], atol=tol)
  np.testing.assert_allclose(e[1:3], eps[1:3], atol=5e-3)
  np.testing.assert_allclose(d.predict_eps_from_start(xt, t, x0), eps, atol=1e-3)


def test_variances():
  d_large, d_small = make(var_type="fixedlarge"), make(var_type="fixedsmall")
  x = jnp.zeros((3, 2, 2, 1))
  t = jnp.array([0, 1, 999])
  _, var_l, _, _ = d_large.p_mean_variance(x, x, t)
  _, var_s, _, _ = d_small.p_mean_variance(x, x, t)
  np.testing.assert_allclose(var_l[:, 0, 0, 0], [d_large.coefs["posterior_variance"][1],
                                                 d_large.betas[1], d_large.betas[999]], rtol=1e-5)
  np.testing.assert_allclose(var_s[1:, 0, 0, 0], d_small.coefs["posterior_variance"][[1, 999]],
                             rtol=1e-5)
  # learned_range: v = 1 -> beta_t, v = -1 -> beta~_t (Improved DDPM eq. 15)
  d = make(var_type="learned_range")
  for v, want in ((1.0, d.betas), (-1.0, d.coefs["posterior_variance"])):
    out = jnp.concatenate([x, jnp.full_like(x, v)], -1)
    _, var, _, _ = d.p_mean_variance(out, x, t)
    np.testing.assert_allclose(var[1:, 0, 0, 0], want[[1, 999]], rtol=1e-4)
  d = make(var_type="learned")
  out = jnp.concatenate([x, jnp.full_like(x, -2.0)], -1)
  np.testing.assert_allclose(d.p_mean_variance(out, x, t)[1], np.exp(-2.0), rtol=1e-6)
  with pytest.raises(ValueError, match="needs the model to output 2 channels"):
    d.p_mean_variance(x, x, t)


def test_training_losses():
  d = make()
  x0 = jax.random.uniform(jax.random.PRNGKey(0), (4, 4, 4, 3), minval=-1, maxval=1)
  eps = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
  t = jnp.array([0, 10, 100, 999])
  perfect = d.training_losses(lambda x, t: eps, x0, t, eps)
  chex.assert_trees_all_close(perfect, jnp.zeros(4), atol=1e-12)
  dv = make(mean_type="v")
  v = dv.v_target(x0, t, eps)
  np.testing.assert_allclose(dv.training_losses(lambda x, t: v, x0, t, eps), 0.0, atol=1e-12)
  # v at t: sqrt(ab) eps - sqrt(1 - ab) x0, so x0 at t = 999 (ab ~ 4e-5) and eps at t = 0
  np.testing.assert_allclose(v[3], -x0[3], atol=3e-2)
  np.testing.assert_allclose(v[0], eps[0], atol=2e-2)
  zero = d.training_losses(lambda x, t: jnp.zeros_like(x), x0, t, eps)
  np.testing.assert_allclose(zero, jnp.mean(eps ** 2, (1, 2, 3)), rtol=1e-6)
  # the bound term is smallest at the true posterior mean and positive elsewhere
  dk = make(loss_type="kl", var_type="fixedsmall")
  vb_true = dk.training_losses(lambda x, t: eps[1:], x0[1:], t[1:], eps[1:])
  vb_wrong = dk.training_losses(lambda x, t: eps[1:] + 0.1, x0[1:], t[1:], eps[1:])
  np.testing.assert_allclose(vb_true, 0.0, atol=1e-5)
  assert np.all(vb_wrong > 1e-4)
  dh = make(var_type="learned_range", loss_type="hybrid")
  out = lambda x, t: jnp.concatenate([eps, jnp.zeros_like(eps)], -1)
  assert dh.training_losses(out, x0, t, eps).shape == (4,)


def test_calc_bpd_loop_matches_the_closed_form():
  """A model that predicts x_0 exactly: every L_{t-1} is a KL of equal means and L_0 is one
  Gaussian bin, so the whole bound has a closed form (fixed-large variances)."""
  T = 20
  d = dm.GaussianDiffusion(dm.get_beta_schedule("linear", T, 1e-3, 0.3), mean_type="x0",
                           var_type="fixedlarge")
  k = jax.random.randint(jax.random.PRNGKey(0), (3, 4, 4, 1), 1, 255)  # interior bins
  x0 = (k / 255.0) * 2 - 1
  out = d.calc_bpd_loop(lambda x, t: x0, x0, jax.random.PRNGKey(1))
  assert out["vb_bpd"].shape == (3, T) and out["total_bpd"].shape == (3,)
  var_p = d.coefs["fixedlarge_variance"]
  var_q = d.coefs["posterior_variance"]
  kl = 0.5 * (-1 + np.log(var_p[1:]) - np.log(var_q[1:]) + var_q[1:] / var_p[1:]) / np.log(2)
  sd = np.sqrt(var_p[0])
  l0 = -np.log(stats.norm.cdf(1 / 255 / sd) - stats.norm.cdf(-1 / 255 / sd)) / np.log(2)
  np.testing.assert_allclose(out["vb_bpd"][:, 1:], np.broadcast_to(kl, (3, T - 1)), rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(out["vb_bpd"][:, 0], l0, rtol=2e-3)
  ab = d.coefs["alphas_cumprod"][-1]
  prior = 0.5 * (-np.log(1 - ab) + (1 - ab) + ab * np.mean(np.asarray(x0) ** 2, (1, 2, 3)) - 1)
  np.testing.assert_allclose(out["prior_bpd"], prior / np.log(2), rtol=1e-3)
  np.testing.assert_allclose(out["total_bpd"], kl.sum() + l0 + prior / np.log(2), rtol=1e-3)
  np.testing.assert_allclose(out["x0_mse"], 0.0, atol=1e-12)
