"""Samplers on a toy problem whose optimal eps is known in closed form: Gaussian data."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from diffusion_jax import diffusion as dm
from diffusion_jax import noise_levels, samplers

MU, S = 0.3, 0.5  # data ~ N(MU, S^2) in every dimension
SHAPE = (1024, 4, 4, 2)


def optimal_eps(d, x, t):
  """E[eps | x_t] for Gaussian data: sqrt(1-ab) (x - sqrt(ab) mu) / (ab s^2 + 1 - ab)."""
  ab = jnp.asarray(d.coefs["alphas_cumprod"], jnp.float32)[t].reshape(-1, 1, 1, 1)
  return jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * MU) / (ab * S ** 2 + 1 - ab)


@pytest.fixture(scope="module")
def setup():
  d = dm.GaussianDiffusion(dm.get_beta_schedule("linear", 1000), var_type="fixedsmall")
  return d, functools.partial(optimal_eps, d)


def run(method, d, fn, key=0, **kw):
  x_T = jax.random.normal(jax.random.PRNGKey(100 + key), SHAPE)
  f = jax.jit(lambda x, k: samplers.sample(method, d, fn, x, k, clip_denoised=False, **kw))
  return np.asarray(f(x_T, jax.random.PRNGKey(key)))


CASES = {  # (sampler, relative tolerance on the std)
    "ancestral": (dict(method="ancestral"), 0.03),
    # respaced: under-dispersed as DDIM eta 1 is with few steps (0.467 at 100 steps; below)
    "ancestral_250": (dict(method="ancestral", num_steps=250), 0.03),
    "ddim_eta1_all": (dict(method="ddim", num_steps=1000, eta=1.0), 0.03),
    "ddim_eta0_all": (dict(method="ddim", num_steps=1000), 0.03),
    "ddim_eta0_100": (dict(method="ddim", num_steps=100), 0.04),  # first order: 1/S error
    "dpm_solver20": (dict(method="dpm_solver", num_steps=20), 0.03),
    "dpm_solver10": (dict(method="dpm_solver", num_steps=10), 0.05),
    "dpm_solver20_uniform": (dict(method="dpm_solver", num_steps=20, spacing="uniform"), 0.25),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_sampler_lands_on_the_data_gaussian(setup, case):
  d, fn = setup
  kw, rtol = CASES[case]
  kw = dict(kw)
  x = run(kw.pop("method"), d, fn, **kw)
  assert x.shape == SHAPE and x.dtype == np.float32
  np.testing.assert_allclose(x.mean(), MU, atol=0.015)
  np.testing.assert_allclose(x.std(), S, rtol=rtol)


@pytest.mark.parametrize("num_steps,spacing", [(10, "uniform"), (50, "uniform"),
                                               (20, "quadratic")])
def test_ddim_gain_has_its_closed_form(setup, num_steps, spacing):
  """eta = 0 on Gaussian data is linear in x_T; per step the deviation from the mean scales by
  (sqrt(a' a) s^2 + sqrt((1 - a')(1 - a))) / (a s^2 + 1 - a), a' the next alphabar."""
  d, fn = setup
  ab = d.coefs["alphas_cumprod"]
  seq = samplers.ddim_timesteps(1000, num_steps, spacing)
  a, a_next = ab[seq[::-1]], np.append(ab[seq[:-1]][::-1], 1.0)
  gain = np.prod((np.sqrt(a_next * a) * S ** 2 + np.sqrt((1 - a_next) * (1 - a)))
                 / (a * S ** 2 + 1 - a))
  x_T = jax.random.normal(jax.random.PRNGKey(100), SHAPE)
  x = run("ddim", d, fn, num_steps=num_steps, spacing=spacing)
  np.testing.assert_allclose(x.std() / np.std(np.asarray(x_T)), gain, rtol=1e-4)


def test_ddim_eta1_all_steps_is_the_ancestral_chain(setup):
  """Song et al.: eta = 1 over all T steps is Algorithm 2 with sigma^2 = beta~_t."""
  d, fn = setup
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 4, 4, 2))
  z = jax.random.normal(jax.random.PRNGKey(1), x.shape)
  for t in (999, 500, 1, 0):
    tb = jnp.full((8,), t)
    a, _ = d.p_sample(fn(x, tb), x, tb, z)
    b, _ = samplers.ddim_step(d, fn(x, tb), x, tb, tb - 1, 1.0, z)
    np.testing.assert_allclose(a, b, atol=2e-5)
  anc, ddim = run("ancestral", d, fn, key=3), run("ddim", d, fn, key=4, num_steps=1000, eta=1.0)
  np.testing.assert_allclose([anc.mean(), anc.std()], [ddim.mean(), ddim.std()], atol=0.02)


@pytest.mark.parametrize("method", ["ancestral", "ddim", "dpm_solver"])
def test_same_key_same_samples(setup, method):
  d, fn = setup
  kw = {} if method == "ancestral" else {"num_steps": 10, "eta": 1.0} if method == "ddim" else {"num_steps": 10}
  a, b = run(method, d, fn, key=5, **kw), run(method, d, fn, key=5, **kw)
  np.testing.assert_array_equal(a, b)
  if method != "dpm_solver":  # deterministic given x_T
    assert not np.array_equal(a, run(method, d, fn, key=6, **kw))


def test_progressive_records_predicted_x0(setup):
  d, fn = setup
  x_T = jax.random.normal(jax.random.PRNGKey(0), (16, 4, 4, 2))
  steps = [999, 750, 500, 250, 0]
  x0, rec = jax.jit(lambda x, k: samplers.progressive_sample(d, fn, x, k, steps, False))(
      x_T, jax.random.PRNGKey(1))
  assert rec.shape == (5,) + x_T.shape
  np.testing.assert_allclose(rec[-1], x0, atol=1e-6)  # x^_0 at t = 0 is the sample itself
  # early predictions are the posterior mean E[x0 | x_T] ~ MU: far less spread than late ones
  assert float(rec[0].std()) < 0.1 < float(rec[-1].std())
  with pytest.raises(ValueError, match="record_steps"):
    samplers.progressive_sample(d, fn, x_T, jax.random.PRNGKey(1), [1000])


def test_progressive_and_interpolation_run_the_respaced_chain(setup):
  """With num_steps < T the figures' chain is the sampler's respaced one: the same sample from
  the same key, each recorded step at the chain's nearest timestep (two steps on one timestep
  share it), the interpolation decoded from the timestep nearest to t_interp."""
  d, fn = setup
  x_T = jax.random.normal(jax.random.PRNGKey(0), (16, 4, 4, 2))
  key = jax.random.PRNGKey(1)
  x0, rec = jax.jit(lambda x, k: samplers.progressive_sample(
      d, fn, x, k, [999, 990, 500, 0], False, 5, "linspace"))(x_T, key)
  want = jax.jit(lambda x, k: samplers.ancestral_sample(d, fn, x, k, False, 5, "linspace"))(
      x_T, key)
  np.testing.assert_allclose(x0, want, atol=1e-6)
  np.testing.assert_allclose(rec[-1], x0, atol=1e-6)
  np.testing.assert_array_equal(rec[0], rec[1])  # 999 and 990: the chain's 999
  assert not np.allclose(rec[1], rec[2])
  full = samplers.progressive_sample(d, fn, x_T, key, [999, 0], False)[0]
  assert np.abs(np.asarray(full) - np.asarray(x0)).max() > 0.1  # 1000 steps: another sample
  lam = [0.0, 1.0]
  xa, xb = jnp.full((2, 4, 4, 2), -0.5), jnp.full((2, 4, 4, 2), 0.8)
  out = samplers.interpolate(d, fn, xa, xb, key, 12, lam, False, 100, "uniform")  # from t = 10
  m = np.asarray(out).mean(axis=(0, 2, 3, 4))
  assert abs(m[0] + 0.5) < 0.15 and abs(m[1] - 0.8) < 0.15
  assert samplers.chain_index(samplers.ancestral_timesteps(1000, 100, "uniform"), 12) == 1


def test_interpolation(setup):
  d, fn = setup
  xa = jnp.full((2, 4, 4, 2), -0.5)
  xb = jnp.full((2, 4, 4, 2), 0.8)
  lam = [0.0, 0.5, 1.0]
  out = jax.jit(lambda a, b, k: samplers.interpolate(d, fn, a, b, k, 10, lam, False))(
      xa, xb, jax.random.PRNGKey(0))
  assert out.shape == (2, 3, 4, 4, 2)
  # t = 10 keeps the endpoints close to their sources; the middle lies between them
  m = np.asarray(out).mean(axis=(0, 2, 3, 4))
  assert m[0] < m[1] < m[2] and abs(m[0] + 0.5) < 0.15 and abs(m[2] - 0.8) < 0.15


def test_timestep_grids():
  np.testing.assert_array_equal(samplers.ddim_timesteps(1000, 10, "uniform"),
                                np.arange(0, 1000, 100))
  q = samplers.ddim_timesteps(1000, 10, "quadratic")
  np.testing.assert_array_equal(q, (np.linspace(0, np.sqrt(800), 10) ** 2).astype(int))
  d = dm.GaussianDiffusion(dm.get_beta_schedule("linear", 1000))
  for n in (5, 20, 200, 999):
    for spacing in ("logsnr", "uniform"):
      ts = samplers.dpm_solver_timesteps(d, n, spacing)
      assert ts[0] == 999 and ts[-1] == 0 and len(ts) == n + 1 and np.all(np.diff(ts) < 0)
  for n in range(1, 1000, 3):  # diffusers' spacings: n evaluations, then the end (-1)
    for spacing in ("leading", "linspace", "trailing"):
      ts = samplers.dpm_solver_timesteps(d, n, spacing, 1 if spacing == "leading" else 0)
      assert len(ts) == n + 1 and ts[-1] == -1 and np.all(np.diff(ts) < 0) and ts[0] < 1000
  with pytest.raises(ValueError, match="steps_offset=1 reaches timestep 1000"):
    samplers.dpm_solver_timesteps(d, 999, "leading", 1)
  with pytest.raises(ValueError, match="spacing"):
    samplers.ddim_timesteps(1000, 10, "cubic")
  with pytest.raises(ValueError, match="num_steps"):
    samplers.ddim_timesteps(1000, 0)
  with pytest.raises(ValueError, match="unknown sampling method"):
    samplers.sample("euler", None, None, None, None)


def test_sampling_a_sharded_batch(setup):
  """The batch sharded over 8 devices: same numbers, and the output stays sharded."""
  d, fn = setup
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  x_T = jax.random.normal(jax.random.PRNGKey(0), (16, 4, 4, 2))
  f = jax.jit(lambda x, k: samplers.ddim_sample(d, fn, x, k, 10, 1.0, clip_denoised=True))
  ref = f(x_T, jax.random.PRNGKey(1))
  out = f(jax.device_put(x_T, sharding), jax.random.PRNGKey(1))
  assert out.sharding.is_equivalent_to(sharding, out.ndim)
  np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.parity
@pytest.mark.parametrize("spacing,num_steps,offset", [("leading", 10, 1), ("leading", 20, 1),
                                                      ("linspace", 7, 0), ("trailing", 8, 0)])
def test_dpm_solver_is_diffusers_multistep_scheduler(spacing, num_steps, offset):
  """DPM-Solver++(2M) with diffusers' spacings against DPMSolverMultistepScheduler (its
  defaults: dpmsolver++, order 2, final sigma 0) step for step, on Stable Diffusion's betas and
  the Gaussian data's optimal eps."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  d = dm.GaussianDiffusion(dm.get_beta_schedule("scaled_linear", 1000, 0.00085, 0.012))
  fn = functools.partial(optimal_eps, d)
  sched = diffusers.DPMSolverMultistepScheduler(
      beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
      timestep_spacing=spacing, steps_offset=offset)
  sched.set_timesteps(num_steps)
  want_ts = np.append(sched.timesteps.numpy(), -1)
  np.testing.assert_array_equal(samplers.dpm_solver_timesteps(d, num_steps, spacing, offset),
                                want_ts)
  x_T = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (4, 4, 4, 2)))
  x = torch.from_numpy(x_T.astype(np.float64))
  for t in sched.timesteps:
    eps = np.asarray(fn(jnp.asarray(x.numpy(), jnp.float32), jnp.full((4,), int(t))))
    x = sched.step(torch.from_numpy(eps.astype(np.float64)), t, x).prev_sample
  ours = samplers.dpm_solver_sample(d, fn, jnp.asarray(x_T), None, num_steps, spacing,
                                    clip_denoised=False, steps_offset=offset)
  diff = np.abs(np.asarray(ours) - x.numpy()).max()
  print(f"DPM-Solver++(2M) {spacing} {num_steps}: max |ours - diffusers| = {diff:.3g}")
  assert diff < 1e-4
  # part of the chain, [3, 6): x at level 3 in, the first step first order (set_begin_index)
  sched.set_timesteps(num_steps)
  sched.set_begin_index(3)
  x = torch.from_numpy(x_T.astype(np.float64))
  for t in sched.timesteps[3:6]:
    eps = np.asarray(fn(jnp.asarray(x.numpy(), jnp.float32), jnp.full((4,), int(t))))
    x = sched.step(torch.from_numpy(eps.astype(np.float64)), t, x).prev_sample
  part = samplers.dpm_solver_sample(d, fn, jnp.asarray(x_T), None, num_steps, spacing,
                                    clip_denoised=False, steps_offset=offset, skip=3, stop=6)
  assert np.abs(np.asarray(part) - x.numpy()).max() < 1e-4


@pytest.mark.parity
@pytest.mark.parametrize("num_steps,mean_type", [(7, "eps"), (20, "eps"), (25, "v")])
def test_dpm_solver_karras_is_diffusers_use_karras_sigmas(num_steps, mean_type):
  """"DPM++ 2M Karras": Karras' noise levels, the network at the rounded nearest timestep,
  against DPMSolverMultistepScheduler(use_karras_sigmas=True) step for step."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  d = dm.GaussianDiffusion(dm.get_beta_schedule("scaled_linear", 1000, 0.00085, 0.012),
                           mean_type=mean_type)
  eps_fn = functools.partial(optimal_eps, d)
  # the optimal eps, written as the model's output of its mean type at the rounded timestep
  fn = eps_fn if mean_type == "eps" else lambda x, t: (
      d._extract("sqrt_alphas_cumprod", t, x.shape, x.dtype) * eps_fn(x, t)
      - d._extract("sqrt_one_minus_alphas_cumprod", t, x.shape, x.dtype) * x)
  sched = diffusers.DPMSolverMultistepScheduler(
      beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", use_karras_sigmas=True,
      prediction_type="epsilon" if mean_type == "eps" else "v_prediction")
  sched.set_timesteps(num_steps)
  ts, levels = noise_levels.karras_timesteps(d, num_steps)
  np.testing.assert_array_equal(ts, sched.timesteps.numpy())
  np.testing.assert_allclose(levels, sched.sigmas.numpy(), rtol=1e-4)  # theirs: float32
  x_T = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (4, 4, 4, 2)))
  x = torch.from_numpy(x_T.astype(np.float64))
  for t in sched.timesteps:
    out = np.asarray(fn(jnp.asarray(x.numpy(), jnp.float32), jnp.full((4,), int(t))))
    x = sched.step(torch.from_numpy(out.astype(np.float64)), t, x).prev_sample
  ours = samplers.dpm_solver_sample(d, fn, jnp.asarray(x_T), None, num_steps, "karras",
                                    clip_denoised=False)
  plain = samplers.dpm_solver_sample(d, fn, jnp.asarray(x_T), None, num_steps, "linspace",
                                     clip_denoised=False)
  diff = np.abs(np.asarray(ours) - x.numpy()).max()
  other = np.abs(np.asarray(plain) - x.numpy()).max()
  print(f"DPM-Solver++(2M) Karras {num_steps} ({mean_type}): max |ours - diffusers| = "
        f"{diff:.3g} (linspace spacing's: {other:.3g})")
  assert diff < 1e-4 and other > 100 * diff


def test_karras_levels_need_a_prediction_they_can_convert(tmp_path):
  from diffusion_jax.validate import ConfigError, validate_config
  from helpers import tiny_config
  c = tiny_config(tmp_path)
  c.sampling.method, c.sampling.spacing, c.sampling.num_steps = "dpm_solver", "karras", 5
  validate_config(c)
  c.diffusion.mean_type = "mean"
  with pytest.raises(ConfigError, match="sampling.spacing.*eps, v or x0"):
    validate_config(c)


def optimal_eps_between(d, x, t):
  """optimal_eps at fractional timesteps: alphabar = 1 / (1 + sigma^2), sigma interpolated
  linearly in t (as diffusers' Euler schedulers place their levels)."""
  levels = jnp.asarray(noise_levels.noise_levels(d), jnp.float32)
  sigma = jnp.interp(t.astype(jnp.float32), jnp.arange(len(levels), dtype=jnp.float32), levels)
  ab = (1.0 / (1.0 + sigma ** 2)).reshape(-1, 1, 1, 1)
  return jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * MU) / (ab * S ** 2 + 1 - ab)


@pytest.mark.parity
@pytest.mark.parametrize("ancestral,spacing,karras", [
    (False, "leading", False), (True, "leading", False), (False, "linspace", False),
    (True, "linspace", False), (True, "trailing", False), (False, "trailing", True),
    (False, "linspace", True)])
def test_euler_schedulers_are_ddim_written_in_sigma(ancestral, spacing, karras):
  """diffusers' EulerDiscreteScheduler is DDIM at eta 0 to sigma = 0, EulerAncestral DDIM at
  eta 1 (its sigma_up is eq. 16's sigma / sqrt(alphabar_prev)), between its noise levels: the
  same timesteps (fractional with "linspace" or Karras' sigmas) and levels, and the same chain
  step for step (SD's betas; the ancestral one given our noise draws)."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  import unittest.mock
  d = dm.GaussianDiffusion(dm.get_beta_schedule("scaled_linear", 1000, 0.00085, 0.012))
  fn = functools.partial(optimal_eps_between, d)
  cls = (diffusers.EulerAncestralDiscreteScheduler if ancestral
         else diffusers.EulerDiscreteScheduler)
  offset = 1 if spacing == "leading" else 0
  sched = cls(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
              timestep_spacing=spacing, steps_offset=offset,
              **({"use_karras_sigmas": True} if karras else {}))
  num_steps, key = 8, jax.random.PRNGKey(5)
  sched.set_timesteps(num_steps)
  ts, sigmas = noise_levels.euler_levels(d, num_steps, spacing, offset, karras)
  np.testing.assert_allclose(ts, sched.timesteps.numpy(), rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(sigmas, sched.sigmas.numpy(), rtol=5e-5)  # theirs: float32
  assert (ts != np.round(ts)).any() == (spacing == "linspace" or karras)
  x_T = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (4, 4, 4, 2)))
  draws = iter([np.asarray(jax.random.normal(k, x_T.shape)) for k in
                jax.random.split(key, num_steps)])  # euler_sample's, in order
  module = type(sched).__module__
  with unittest.mock.patch(f"{module}.randn_tensor",
                           lambda *a, **k: torch.from_numpy(next(draws).astype(np.float64))):
    x = torch.from_numpy(x_T.astype(np.float64)) * sched.init_noise_sigma
    for t in sched.timesteps:
      scaled = sched.scale_model_input(x, t).numpy()
      eps = np.asarray(fn(jnp.asarray(scaled, jnp.float32), jnp.full((4,), float(t))))
      x = sched.step(torch.from_numpy(eps.astype(np.float64)), t, x).prev_sample
  scale = noise_levels.euler_start_scale(sigmas, spacing)  # init_noise_sigma in our scale
  np.testing.assert_allclose(scale * np.sqrt(sigmas[0] ** 2 + 1), sched.init_noise_sigma,
                             rtol=5e-5)
  ours = noise_levels.euler_sample(d, fn, jnp.asarray(x_T) * scale, key, ts, sigmas,
                               eta=1.0 if ancestral else 0.0)
  diff = np.abs(np.asarray(ours) - x.numpy()).max()
  print(f"Euler{' ancestral' if ancestral else ''} {spacing}{' karras' if karras else ''}: "
        f"max |ours - diffusers| {diff:.3g}")
  assert diff < 1e-4
  if spacing == "leading" and not karras:  # leading's integer levels: DDIM's own chain
    ddim = samplers.ddim_sample(d, fn, jnp.asarray(x_T), key, num_steps, float(ancestral),
                                clip_denoised=False, steps_offset=1, alpha_one_at_end=True)
    assert np.abs(np.asarray(ddim) - np.asarray(ours)).max() < 1e-4


@pytest.mark.parity
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_zero_terminal_snr_noise_levels_are_diffusers(spacing):
  """With alphabar_T = 0 (rescale_betas_zero_snr), Euler's levels and start scale, and
  DPM-Solver's alpha and sigma, are diffusers' (alphabar_T read as 2^-24: sigma_T = 4096)."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  betas = dm.rescale_zero_terminal_snr(dm.get_beta_schedule("scaled_linear", 1000, 0.00085,
                                                            0.012))
  from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr
  theirs = rescale_zero_terminal_snr(torch.from_numpy(dm.get_beta_schedule(
      "scaled_linear", 1000, 0.00085, 0.012))).numpy()
  np.testing.assert_allclose(betas, theirs, rtol=0, atol=1e-13)
  d = dm.GaussianDiffusion(betas, mean_type="v")
  kw = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            timestep_spacing=spacing, steps_offset=int(spacing == "leading"),
            rescale_betas_zero_snr=True, prediction_type="v_prediction")
  euler = diffusers.EulerDiscreteScheduler(**kw)
  euler.set_timesteps(6)
  ts, sigmas = noise_levels.euler_levels(d, 6, spacing, kw["steps_offset"])
  np.testing.assert_allclose(ts, euler.timesteps.numpy(), atol=1e-3)
  np.testing.assert_allclose(sigmas, euler.sigmas.numpy(), rtol=5e-5)
  scale = noise_levels.euler_start_scale(sigmas, spacing)
  np.testing.assert_allclose(scale * np.sqrt(sigmas[0] ** 2 + 1), euler.init_noise_sigma,
                             rtol=5e-5)
  assert (sigmas[0] > 4000) == (spacing == "trailing")  # trailing starts at t = 999
  dpm = diffusers.DPMSolverMultistepScheduler(**kw)
  dpm.set_timesteps(6)
  ts, alpha, sigma = samplers.dpm_solver_levels(d, 6, spacing, kw["steps_offset"])
  np.testing.assert_array_equal(ts, dpm.timesteps.numpy())
  np.testing.assert_allclose(alpha[:-1], dpm.alpha_t[ts].numpy(), rtol=1e-5)
  np.testing.assert_allclose(sigma[:-1], dpm.sigma_t[ts].numpy(), rtol=1e-5)
  assert np.isfinite(np.log(alpha[:-1])).all()


@pytest.mark.parity
@pytest.mark.parametrize("spacing,num_steps,eta", [("leading", 7, 0.0), ("linspace", 7, 0.0),
                                                   ("trailing", 7, 1.0), ("trailing", 6, 0.0)])
def test_ddim_with_diffusers_spacings_is_ddim_scheduler(spacing, num_steps, eta):
  """ddim_sample over diffusers_timesteps (rounded) is DDIMScheduler with that timestep_spacing
  (SD's betas, steps_offset 1 where leading, set_alpha_to_one False), step for step, each step
  to t - T // n as its (also where trailing's rounding puts the next timestep elsewhere)."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  d = dm.GaussianDiffusion(dm.get_beta_schedule("scaled_linear", 1000, 0.00085, 0.012))
  fn = functools.partial(optimal_eps, d)
  offset = 1 if spacing == "leading" else 0
  sched = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", clip_sample=False,
                                  set_alpha_to_one=False, steps_offset=offset,
                                  timestep_spacing=spacing)
  sched.set_timesteps(num_steps)
  ts = noise_levels.diffusers_timesteps(1000, num_steps, spacing, offset).round()
  np.testing.assert_array_equal(ts, sched.timesteps.numpy())
  key = jax.random.PRNGKey(2)
  x_T = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (4, 4, 4, 2)))
  draws = [np.asarray(jax.random.normal(k, x_T.shape)) for k in jax.random.split(key, num_steps)]
  x = torch.from_numpy(x_T.astype(np.float64))
  for t, noise in zip(sched.timesteps, draws):
    eps = np.asarray(fn(jnp.asarray(x.numpy(), jnp.float32), jnp.full((4,), int(t))))
    x = sched.step(torch.from_numpy(eps.astype(np.float64)), t, x, eta=eta,
                   variance_noise=torch.from_numpy(noise.astype(np.float64))).prev_sample
  ours = samplers.ddim_sample(d, fn, jnp.asarray(x_T), key, num_steps, eta, clip_denoised=False,
                              alpha_one_at_end=False, timesteps=ts)
  diff = np.abs(np.asarray(ours) - x.numpy()).max()
  print(f"DDIM {spacing} {num_steps} eta {eta}: max |ours - diffusers| {diff:.3g}")
  assert diff < 1e-4


@pytest.mark.parity
def test_lcm_img2img_timesteps_are_lcm_schedulers():
  """lcm_timesteps with strength: LCMScheduler.set_timesteps(n, strength=s)'s (its img2img)."""
  diffusers = pytest.importorskip("diffusers")
  from diffusion_jax.lcm import lcm_timesteps
  sched = diffusers.LCMScheduler(beta_start=0.00085, beta_end=0.012,
                                 beta_schedule="scaled_linear")
  for n, strength in ((1, 0.5), (4, 0.5), (4, 0.3), (6, 0.8), (4, 1.0)):
    sched.set_timesteps(n, strength=strength)
    np.testing.assert_array_equal(lcm_timesteps(1000, n, 50, strength), sched.timesteps.numpy())
  with pytest.raises(ValueError, match="original_inference_steps=50 x strength 0.1\\) = 5"):
    lcm_timesteps(1000, 6, 50, 0.1)


@pytest.mark.parity
@pytest.mark.parametrize("num_steps,mean_type", [(4, "eps"), (8, "v")])
def test_lcm_is_diffusers_lcm_scheduler(num_steps, mean_type):
  """Latent Consistency Models' multistep sampler against LCMScheduler step for step (its
  skipping timesteps from 50 original steps, the boundary scalings, the re-noising given our
  noise draws)."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  import unittest.mock
  from diffusion_jax import lcm
  d = dm.GaussianDiffusion(dm.get_beta_schedule("scaled_linear", 1000, 0.00085, 0.012),
                           mean_type=mean_type)
  eps_fn = functools.partial(optimal_eps, d)
  if mean_type == "v":  # the optimal v of the same data
    fn = lambda x, t: (lambda e, ab: jnp.sqrt(ab) * e - jnp.sqrt(1 - ab) * (
        x - jnp.sqrt(1 - ab) * e) / jnp.sqrt(ab))(eps_fn(x, t), jnp.asarray(
            d.coefs["alphas_cumprod"], jnp.float32)[t].reshape(-1, 1, 1, 1))
  else:
    fn = eps_fn
  sched = diffusers.LCMScheduler(beta_start=0.00085, beta_end=0.012,
                                 beta_schedule="scaled_linear", prediction_type={
                                     "eps": "epsilon", "v": "v_prediction"}[mean_type])
  sched.set_timesteps(num_steps)
  np.testing.assert_array_equal(lcm.lcm_timesteps(1000, num_steps), sched.timesteps.numpy())
  key = jax.random.PRNGKey(7)
  x_T = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (4, 4, 4, 2)))
  draws = iter([np.asarray(jax.random.normal(k, x_T.shape)) for k in
                jax.random.split(key, num_steps)])  # lcm_sample's, in order
  with unittest.mock.patch("diffusers.schedulers.scheduling_lcm.randn_tensor",
                           lambda *a, **k: torch.from_numpy(next(draws).astype(np.float64))):
    x = torch.from_numpy(x_T.astype(np.float64))
    for t in sched.timesteps:
      out = np.asarray(fn(jnp.asarray(x.numpy(), jnp.float32), jnp.full((4,), int(t))))
      x = sched.step(torch.from_numpy(out.astype(np.float64)), t, x).prev_sample
  ours = lcm.lcm_sample(d, fn, jnp.asarray(x_T), key, num_steps)
  diff = np.abs(np.asarray(ours) - x.numpy()).max()
  print(f"LCM {num_steps} steps ({mean_type}): max |ours - diffusers| {diff:.3g}")
  assert diff < 1e-4
  with pytest.raises(ValueError, match="original_inference_steps=50"):
    lcm.lcm_timesteps(1000, 51)


@pytest.mark.parity
@pytest.mark.parametrize("spacing,var_type", [("uniform", "learned_range"),
                                              ("linspace", "learned_range"),
                                              ("uniform", "fixedlarge"), ("trailing", "fixedsmall")])
def test_respaced_ancestral_is_ddpm_scheduler(spacing, var_type):
  """The ancestral chain of num_steps < T (IDDPM's respacing, DiT's sampler) is diffusers'
  DDPMScheduler with num_inference_steps, step for step on the same noise: each step's beta from
  the alphabars of its timestep and the next, the learned range between that beta and the
  posterior variance, the fixed variances."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  from diffusers.utils.torch_utils import randn_tensor
  d = dm.GaussianDiffusion(dm.get_beta_schedule("linear", 1000), var_type=var_type)
  learned = var_type == "learned_range"
  sched = diffusers.DDPMScheduler(
      beta_schedule="linear", clip_sample=False,
      variance_type={"learned_range": "learned_range", "fixedlarge": "fixed_large",
                     "fixedsmall": "fixed_small"}[var_type],
      timestep_spacing="leading" if spacing == "uniform" else spacing)
  n = 9
  sched.set_timesteps(n)
  ts = samplers.ancestral_timesteps(1000, n, spacing)
  np.testing.assert_array_equal(ts[::-1], sched.timesteps.numpy())
  sub = samplers.respaced(d, ts)
  x = torch.from_numpy(np.asarray(jax.random.normal(jax.random.PRNGKey(0), (4, 2, 4, 4)),
                                  np.float64))
  nhwc = lambda a: jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1), jnp.float32)
  worst = 0.0
  for i, t in zip(range(n - 1, -1, -1), sched.timesteps):
    eps = optimal_eps(d, nhwc(x), jnp.full((4,), int(t)))
    out = jnp.concatenate([eps, 0.9 * jnp.tanh(3 * eps)], -1) if learned else eps
    noise = randn_tensor((4, 2, 4, 4), generator=torch.Generator().manual_seed(i),
                         dtype=torch.float64)
    ours, _ = sub.p_sample(out, nhwc(x), jnp.full((4,), i), nhwc(noise))
    x = sched.step(torch.from_numpy(np.asarray(out, np.float64).transpose(0, 3, 1, 2)), t, x,
                   generator=torch.Generator().manual_seed(i)).prev_sample
    worst = max(worst, float(np.abs(np.asarray(ours) - nhwc(x)).max()))
  print(f"respaced ancestral, {spacing}, {var_type}: max |ours - DDPMScheduler| {worst:.3g}")
  assert worst < 1e-4


def test_respaced_ancestral_is_ddim_eta1(setup):
  """With the posterior variance, the respaced chain's step is DDIM's with eta = 1 (Song et al.
  2021, eq. 16): the same samples from the same key."""
  d, fn = setup
  anc = run("ancestral", d, fn, key=3, num_steps=100)
  ddim = run("ddim", d, fn, key=3, num_steps=100, eta=1.0)
  np.testing.assert_allclose(anc, ddim, atol=2e-5)
  assert abs(anc.std() / S - 1) > 0.05  # and far from the full chain's spread at 100 steps


def test_respaced_ancestral_runs_the_config_chain(tmp_path):
  """sampling.num_steps < T makes the ancestral sampler respaced (and main's log and the
  benchmark count its steps); >= T runs all T."""
  d = dm.GaussianDiffusion(dm.get_beta_schedule("linear", 1000), var_type="fixedsmall")
  assert samplers.network_evaluations("ancestral", d, 250) == 250
  assert samplers.network_evaluations("ancestral", d, 5000) == 1000
  sub = samplers.respaced(d, samplers.ancestral_timesteps(1000, 250, "linspace"))
  np.testing.assert_allclose(sub.coefs["alphas_cumprod"],
                             d.coefs["alphas_cumprod"][np.round(np.linspace(0, 999, 250))
                                                       .astype(int)], rtol=1e-12)
  calls = []
  fn = lambda x, t: (calls.append(t.shape), jnp.zeros_like(x))[1]
  samplers.sample("ancestral", d, fn, jnp.zeros((2, 4, 4, 1)), jax.random.PRNGKey(0),
                  num_steps=7)
  assert calls == [(2,)]  # one traced step, scanned
  with pytest.raises(ValueError, match="ancestral spacing 'quadratic'"):
    samplers.ancestral_timesteps(1000, 7, "quadratic")
  # the sample mode's figures take the config's chain
  from configs import cifar10_ddpm, imagenet256_dit
  from diffusion_jax.sample import figure_chain
  assert figure_chain(imagenet256_dit.get_config()) == (250, "linspace")
  config = cifar10_ddpm.get_config()
  assert figure_chain(config) == (None, "uniform")
  s = config.sampling
  s.method, s.num_steps, s.spacing = "ddim", 50, "quadratic"
  assert figure_chain(config) == (50, "uniform")
