"""The diffusion process of Ho, Jain & Abbeel (2020): plain JAX, no Flax, no I/O.

Notation follows the paper: beta_t, alpha_t = 1 - beta_t, alphabar_t = prod_{s<=t} alpha_s,
and timesteps are 0-indexed (index t here is the paper's t + 1). Every coefficient is computed
once in float64 with numpy and cast to the input's dtype when used.

The model is only ever seen through ``denoise_fn(x_t, t) -> model_output``; what the output
means is said by ``mean_type`` ('eps', 'x0' or 'mean', Table 2) and ``var_type``
('fixedlarge', 'fixedsmall', 'learned', 'learned_range').
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

MEAN_TYPES = ("eps", "x0", "mean", "v")  # v: Salimans & Ho 2022 (Stable Diffusion 2 768)
VAR_TYPES = ("fixedlarge", "fixedsmall", "learned", "learned_range")
LOSS_TYPES = ("mse", "kl", "hybrid")
SCHEDULES = ("linear", "cosine", "quadratic", "scaled_linear")

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]


# ----------------------------------------------------------------------------- schedules
def get_beta_schedule(name: str, num_timesteps: int = 1000, beta_start: float = 1e-4,
                      beta_end: float = 0.02) -> np.ndarray:
  """Forward-process variances beta_1..beta_T in float64."""
  if name == "linear":  # the paper's: 1e-4 -> 0.02
    betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
  elif name == "quadratic":
    betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=np.float64) ** 2
  elif name == "scaled_linear":  # Stable Diffusion's; LDM uses beta_start=0.00085, end=0.012
    betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=np.float64) ** 2
  elif name == "cosine":  # Nichol & Dhariwal 2021, eq. 17, s = 0.008, betas clipped at 0.999
    s = 0.008
    f = lambda t: np.cos((t / num_timesteps + s) / (1 + s) * np.pi / 2) ** 2
    t = np.arange(num_timesteps + 1, dtype=np.float64)
    betas = np.minimum(1 - f(t[1:]) / f(t[:-1]), 0.999)
  else:
    raise ValueError(f"unknown beta schedule {name!r}; choose one of {SCHEDULES}")
  assert betas.shape == (num_timesteps,)
  return betas


def rescale_zero_terminal_snr(betas) -> np.ndarray:
  """Betas whose alphabar_T is exactly 0 (Lin et al. 2023, Algorithm 1): sqrt(alphabar) shifted
  so that its last value is 0 and scaled so that its first is unchanged; beta_T becomes 1. The
  last step then sees pure noise, as sampling starts (the sampler must read v predictions)."""
  sqrt_ab = np.sqrt(np.cumprod(1.0 - np.asarray(betas, np.float64)))
  first, last = sqrt_ab[0], sqrt_ab[-1]
  ab = ((sqrt_ab - last) * first / (first - last)) ** 2
  return 1.0 - np.append(ab[0], ab[1:] / ab[:-1])


# ----------------------------------------------------------------------------- Gaussians
def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
  """The tanh approximation of the standard normal CDF used by the original code."""
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
  """log p(x) of the discretised Gaussian decoder L_0 (eq. 13) for x in [-1, 1] on 256 bins.

  The outermost bins extend to -inf and +inf so that the 256 probabilities sum to one.
  """
  assert x.shape == means.shape == log_scales.shape
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  log_probs = jnp.where(x < -0.999, log_cdf_plus,
                        jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))
  assert log_probs.shape == x.shape
  return log_probs


def mean_flat(x):
  """Mean over every axis but the batch axis."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


# ----------------------------------------------------------------------------- the process
@dataclasses.dataclass(frozen=True, eq=False)
class GaussianDiffusion:
  """Coefficients of q and p for one beta schedule, and the paper's operations on them."""
  betas: np.ndarray
  mean_type: str = "eps"
  var_type: str = "fixedlarge"
  loss_type: str = "mse"
  hybrid_lambda: float = 0.001  # weight of L_vlb in the hybrid loss (Improved DDPM)

  def __post_init__(self):
    betas = np.asarray(self.betas, dtype=np.float64)
    if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
      raise ValueError("betas must be a 1-d array in (0, 1]")
    for name, value, allowed in (("mean_type", self.mean_type, MEAN_TYPES),
                                 ("var_type", self.var_type, VAR_TYPES),
                                 ("loss_type", self.loss_type, LOSS_TYPES)):
      if value not in allowed:
        raise ValueError(f"diffusion {name}={value!r}; allowed: {allowed}")
    c = {}
    c["betas"] = betas
    alphas = 1.0 - betas
    c["alphas_cumprod"] = ac = np.cumprod(alphas)
    c["alphas_cumprod_prev"] = ac_prev = np.append(1.0, ac[:-1])
    c["sqrt_alphas_cumprod"] = np.sqrt(ac)
    c["sqrt_one_minus_alphas_cumprod"] = np.sqrt(1.0 - ac)
    c["log_one_minus_alphas_cumprod"] = np.log(1.0 - ac)
    with np.errstate(divide="ignore"):  # inf at alphabar_T = 0 (zero terminal SNR)
      c["sqrt_recip_alphas_cumprod"] = np.sqrt(1.0 / ac)
      c["sqrt_recipm1_alphas_cumprod"] = np.sqrt(1.0 / ac - 1)
    # posterior q(x_{t-1} | x_t, x_0), eqs. 6-7
    c["posterior_variance"] = pv = betas * (1.0 - ac_prev) / (1.0 - ac)
    # log of the posterior variance, clipped because it is 0 at the start of the chain
    c["posterior_log_variance_clipped"] = np.log(np.append(pv[1], pv[1:]))
    c["posterior_mean_coef1"] = betas * np.sqrt(ac_prev) / (1.0 - ac)
    c["posterior_mean_coef2"] = (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)
    # fixed reverse-process variances (Sec. 3.2): beta_t ("large") or beta~_t ("small")
    large = np.append(pv[1], betas[1:])
    c["fixedlarge_variance"], c["fixedlarge_log_variance"] = large, np.log(large)
    c["fixedsmall_variance"] = pv
    c["fixedsmall_log_variance"] = c["posterior_log_variance_clipped"]
    for v in c.values():
      v.setflags(write=False)
    object.__setattr__(self, "coefs", c)

  @property
  def num_timesteps(self) -> int:
    return int(self.betas.shape[0])

  def _extract(self, name: str, t, shape, dtype=jnp.float32):
    """coefs[name][t] for a batch of timesteps, broadcastable against `shape`."""
    a = jnp.asarray(self.coefs[name], dtype=dtype)[t]
    return a.reshape(a.shape + (1,) * (len(shape) - a.ndim))

  # --------------------------------------------------------------------------- forward
  def q_mean_variance(self, x_start, t):
    """Mean, variance and log variance of q(x_t | x_0), eq. 4."""
    mean = self._extract("sqrt_alphas_cumprod", t, x_start.shape, x_start.dtype) * x_start
    var = self._extract("sqrt_one_minus_alphas_cumprod", t, x_start.shape, x_start.dtype) ** 2
    log_var = self._extract("log_one_minus_alphas_cumprod", t, x_start.shape, x_start.dtype)
    return mean, jnp.broadcast_to(var, x_start.shape), jnp.broadcast_to(log_var, x_start.shape)

  def q_sample(self, x_start, t, noise):
    """x_t = sqrt(alphabar_t) x_0 + sqrt(1 - alphabar_t) eps, eq. 4."""
    assert noise.shape == x_start.shape
    e = lambda n: self._extract(n, t, x_start.shape, x_start.dtype)
    return e("sqrt_alphas_cumprod") * x_start + e("sqrt_one_minus_alphas_cumprod") * noise

  def q_posterior_mean_variance(self, x_start, x_t, t):
    """Mean, variance, clipped log variance of q(x_{t-1} | x_t, x_0), eqs. 6-7."""
    assert x_start.shape == x_t.shape
    e = lambda n: self._extract(n, t, x_t.shape, x_t.dtype)
    mean = e("posterior_mean_coef1") * x_start + e("posterior_mean_coef2") * x_t
    var = jnp.broadcast_to(e("posterior_variance"), x_t.shape)
    log_var = jnp.broadcast_to(e("posterior_log_variance_clipped"), x_t.shape)
    return mean, var, log_var

  def predict_start_from_eps(self, x_t, t, eps):
    """x_0 = (x_t - sqrt(1 - alphabar_t) eps) / sqrt(alphabar_t)."""
    e = lambda n: self._extract(n, t, x_t.shape, x_t.dtype)
    return e("sqrt_recip_alphas_cumprod") * x_t - e("sqrt_recipm1_alphas_cumprod") * eps

  def predict_eps_from_start(self, x_t, t, x_start):
    e = lambda n: self._extract(n, t, x_t.shape, x_t.dtype)
    return (e("sqrt_recip_alphas_cumprod") * x_t - x_start) / e("sqrt_recipm1_alphas_cumprod")

  def predict_start_from_v(self, x_t, t, v):
    """x_0 = sqrt(alphabar_t) x_t - sqrt(1 - alphabar_t) v, for v = sqrt(alphabar_t) eps -
    sqrt(1 - alphabar_t) x_0 (Salimans & Ho 2022, Sec. 4 and Appendix D)."""
    e = lambda n: self._extract(n, t, x_t.shape, x_t.dtype)
    return e("sqrt_alphas_cumprod") * x_t - e("sqrt_one_minus_alphas_cumprod") * v

  def v_target(self, x_start, t, noise):
    e = lambda n: self._extract(n, t, x_start.shape, x_start.dtype)
    return e("sqrt_alphas_cumprod") * noise - e("sqrt_one_minus_alphas_cumprod") * x_start

  def predict_start_from_mean(self, x_t, t, mean):
    """Invert eq. 7 for x_0 given the posterior mean mu~_t."""
    e = lambda n: self._extract(n, t, x_t.shape, x_t.dtype)
    return (mean - e("posterior_mean_coef2") * x_t) / e("posterior_mean_coef1")

  # --------------------------------------------------------------------------- reverse
  def split_model_output(self, model_output, x_t):
    """(mean part, variance part or None): learned variances double the channel axis."""
    if self.var_type in ("learned", "learned_range"):
      if model_output.shape[-1] != 2 * x_t.shape[-1]:
        raise ValueError(f"var_type={self.var_type!r} needs the model to output "
                         f"{2 * x_t.shape[-1]} channels, got {model_output.shape[-1]}")
      return jnp.split(model_output, 2, axis=-1)
    if model_output.shape != x_t.shape:
      raise ValueError(f"model output shape {model_output.shape} != input {x_t.shape}")
    return model_output, None

  def p_mean_variance(self, model_output, x_t, t, clip_denoised: bool = False):
    """Mean, variance, log variance of p(x_{t-1} | x_t), eq. 1, and the predicted x_0.

    `model_output` is denoise_fn(x_t, t), read according to mean_type and var_type.
    """
    out, var_out = self.split_model_output(model_output, x_t)
    out = out.astype(x_t.dtype)
    e = lambda n: self._extract(n, t, x_t.shape, x_t.dtype)
    if self.var_type == "learned":  # the network outputs log Sigma directly
      log_var = var_out.astype(x_t.dtype)
    elif self.var_type == "learned_range":  # Improved DDPM eq. 15: v in [-1, 1] -> [0, 1]
      frac = (var_out.astype(x_t.dtype) + 1.0) / 2.0
      log_var = frac * jnp.log(e("betas")) + (1.0 - frac) * e("posterior_log_variance_clipped")
    else:
      log_var = jnp.broadcast_to(e(f"{self.var_type}_log_variance"), x_t.shape)
    variance = jnp.exp(log_var)

    maybe_clip = (lambda x: jnp.clip(x, -1.0, 1.0)) if clip_denoised else (lambda x: x)
    if self.mean_type == "mean":  # the network predicts mu~ (Table 2, "mu~ prediction")
      pred_x0 = maybe_clip(self.predict_start_from_mean(x_t, t, out))
      mean = out
    else:
      if self.mean_type == "x0":
        pred_x0 = maybe_clip(out)
      elif self.mean_type == "v":
        pred_x0 = maybe_clip(self.predict_start_from_v(x_t, t, out))
      else:  # eps, eq. 11
        pred_x0 = maybe_clip(self.predict_start_from_eps(x_t, t, out))
      mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
    assert mean.shape == log_var.shape == pred_x0.shape == x_t.shape
    return mean, variance, log_var, pred_x0

  def predict_eps_and_start(self, model_output, x_t, t, clip_denoised: bool = False):
    """(eps, x_0) implied by the model output, whatever mean_type the model was trained with.

    When clipping, x_0 is clipped to [-1, 1] and eps is left as the model gave it (the
    convention of DDIM and diffusers' schedulers).
    """
    out, _ = self.split_model_output(model_output, x_t)
    out = out.astype(x_t.dtype)
    if self.mean_type == "eps":
      eps, x0 = out, self.predict_start_from_eps(x_t, t, out)
    elif self.mean_type == "v":  # both directly (as diffusers' schedulers), not through x_0
      e = lambda n: self._extract(n, t, x_t.shape, x_t.dtype)
      x0 = self.predict_start_from_v(x_t, t, out)
      eps = e("sqrt_one_minus_alphas_cumprod") * x_t + e("sqrt_alphas_cumprod") * out
    else:
      x0 = {"x0": lambda: out, "mean": lambda: self.predict_start_from_mean(x_t, t, out),
            "v": lambda: self.predict_start_from_v(x_t, t, out)}[self.mean_type]()
      eps = self.predict_eps_from_start(x_t, t, x0)
    return eps, (jnp.clip(x0, -1.0, 1.0) if clip_denoised else x0)

  def p_sample(self, model_output, x_t, t, noise, clip_denoised: bool = False):
    """One step of Algorithm 2: x_{t-1} ~ p(x_{t-1} | x_t); no noise is added at t = 0."""
    mean, _, log_var, pred_x0 = self.p_mean_variance(model_output, x_t, t, clip_denoised)
    nonzero = (t != 0).astype(x_t.dtype).reshape((-1,) + (1,) * (x_t.ndim - 1))
    return mean + nonzero * jnp.exp(0.5 * log_var) * noise, pred_x0

  # --------------------------------------------------------------------------- objectives
  def prior_bpd(self, x_start):
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim, per example."""
    t = jnp.full((x_start.shape[0],), self.num_timesteps - 1, dtype=jnp.int32)
    mean, _, log_var = self.q_mean_variance(x_start, t)
    kl = normal_kl(mean, log_var, jnp.zeros_like(mean), jnp.zeros_like(log_var))
    return mean_flat(kl) / math.log(2.0)

  def vb_terms_bpd(self, model_output, x_start, x_t, t, clip_denoised: bool = False):
    """L_{t-1} (KL to the posterior, t > 0) or L_0 (decoder NLL, t = 0), in bits/dim.

    Returns (per-example term, predicted x_0).
    """
    true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
    mean, _, log_var, pred_x0 = self.p_mean_variance(model_output, x_t, t, clip_denoised)
    kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
    decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
        x_start, means=mean, log_scales=0.5 * log_var)) / math.log(2.0)
    return jnp.where(t == 0, decoder_nll, kl), pred_x0

  def training_losses(self, denoise_fn: DenoiseFn, x_start, t, noise):
    """Per-example loss at timesteps t: L_simple (eq. 14), the bound term L_{t-1}, or hybrid."""
    x_t = self.q_sample(x_start, t, noise)
    model_output = denoise_fn(x_t, t)
    if self.loss_type == "kl":
      return self.vb_terms_bpd(model_output, x_start, x_t, t)[0]
    out, var_out = self.split_model_output(model_output, x_t)
    target = {"eps": lambda: noise, "x0": lambda: x_start,
              "mean": lambda: self.q_posterior_mean_variance(x_start, x_t, t)[0],
              "v": lambda: self.v_target(x_start, t, noise)}[self.mean_type]()
    mse = mean_flat(jnp.square(target - out.astype(jnp.float32)))
    if self.loss_type == "mse":
      return mse
    if var_out is None:
      raise ValueError("loss_type='hybrid' needs a learned variance (var_type learned*)")
    # hybrid (Improved DDPM): the bound trains only the variance; lambda * T * L_{t-1}
    frozen = jnp.concatenate([jax.lax.stop_gradient(out), var_out], axis=-1)
    vb = self.vb_terms_bpd(frozen, x_start, x_t, t)[0]
    return mse + self.hybrid_lambda * self.num_timesteps * vb

  def calc_bpd_loop(self, denoise_fn: DenoiseFn, x_start, key, clip_denoised: bool = False):
    """The whole variational bound L = L_T + sum_t L_{t-1} + L_0 (eq. 5) in bits/dim.

    One lax.scan over all T timesteps. Returns a dict of per-example `total_bpd`,
    `prior_bpd`, and per-timestep [B, T] `vb_bpd`, `x0_mse` (squared error of the
    predicted x_0, on the [-1, 1] scale) and `eps_mse`.
    """
    b = x_start.shape[0]

    def body(_, inputs):
      t_idx, k = inputs
      t = jnp.full((b,), t_idx, dtype=jnp.int32)
      noise = jax.random.normal(k, x_start.shape, x_start.dtype)
      x_t = self.q_sample(x_start, t, noise)
      model_output = denoise_fn(x_t, t)
      vb, pred_x0 = self.vb_terms_bpd(model_output, x_start, x_t, t, clip_denoised)
      eps = self.predict_eps_from_start(x_t, t, pred_x0)
      return None, (vb, mean_flat(jnp.square(pred_x0 - x_start)),
                    mean_flat(jnp.square(eps - noise)))

    ts = jnp.arange(self.num_timesteps - 1, -1, -1, dtype=jnp.int32)
    keys = jax.random.split(key, self.num_timesteps)
    _, (vb, x0_mse, eps_mse) = jax.lax.scan(body, None, (ts, keys))
    # scan ran from t = T-1 down to 0: flip back to increasing t, batch first
    vb, x0_mse, eps_mse = (jnp.flip(a, 0).T for a in (vb, x0_mse, eps_mse))
    prior = self.prior_bpd(x_start)
    return {"total_bpd": jnp.sum(vb, axis=1) + prior, "prior_bpd": prior,
            "vb_bpd": vb, "x0_mse": x0_mse, "eps_mse": eps_mse}


def from_config(cfg) -> GaussianDiffusion:
  """Build the process from a `config.diffusion` block."""
  betas = get_beta_schedule(cfg.beta_schedule, cfg.num_timesteps, cfg.beta_start, cfg.beta_end)
  return GaussianDiffusion(betas, mean_type=cfg.mean_type, var_type=cfg.var_type,
                           loss_type=cfg.loss_type,
                           hybrid_lambda=cfg.get("hybrid_lambda", 0.001))
