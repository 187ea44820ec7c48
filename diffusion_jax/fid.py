"""FID and Inception Score from Inception outputs: plain numpy/scipy, float64.

- `FeatureStats` accumulates the mean and covariance of pool3 features batch by batch, so no
  one holds all the features of 50k images.
- `frechet_distance` is pytorch-fid's `calculate_frechet_distance` (the same algorithm:
  scipy's sqrtm of sigma1 @ sigma2, a retry with eps on both diagonals when that square root
  is not finite, an error when its diagonal has an imaginary part above 1e-3).
- `inception_score` is the original one of Salimans et al. (improved-gan): softmax over the
  1008 logits, exp(E_x KL(p(y|x) || p(y))) in `splits` contiguous chunks, mean and std.
- `save_stats` / `load_stats`: pytorch-fid's precomputed-statistics format, an npz with
  `mu` and `sigma`.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
from absl import logging
from scipy import linalg


class FeatureStats:
  """Streaming mean and covariance (ddof=1, like `np.cov(feats, rowvar=False)`) in float64.

  Sums are kept about a shift, the mean of the first batch: sum(x - s) and sum((x - s)(x - s)^T).
  With s close to the mean, cov = (S2 - S1 S1^T / n) / (n - 1) does not lose the digits that
  the raw second moment would when features have a large mean compared to their spread.
  """

  def __init__(self):
    self.count = 0
    self.shift = None  # [D] float64
    self.sum = None  # [D] sum of (x - shift)
    self.sum_outer = None  # [D, D] sum of (x - shift)(x - shift)^T

  @property
  def dim(self) -> int | None:
    return None if self.shift is None else self.shift.shape[0]

  def update(self, feats) -> None:
    """Add a batch of features [N, D] (any float dtype; a jax array is fetched)."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2:
      raise ValueError(f"expected features [N, D], got shape {feats.shape}")
    if feats.shape[0] == 0:
      return
    if self.shift is None:
      self.shift = feats.mean(axis=0)
      self.sum = np.zeros_like(self.shift)
      self.sum_outer = np.zeros((self.dim, self.dim), np.float64)
    elif feats.shape[1] != self.dim:
      raise ValueError(f"features of dimension {feats.shape[1]} after ones of {self.dim}")
    centred = feats - self.shift
    self.count += feats.shape[0]
    self.sum += centred.sum(axis=0)
    self.sum_outer += centred.T @ centred

  def mean(self) -> np.ndarray:
    if self.count == 0:
      raise ValueError("no features were added")
    return self.shift + self.sum / self.count

  def cov(self) -> np.ndarray:
    if self.count < 2:
      raise ValueError(f"a covariance needs at least 2 features, got {self.count}")
    cov = (self.sum_outer - np.outer(self.sum, self.sum) / self.count) / (self.count - 1)
    return (cov + cov.T) / 2  # exactly symmetric, as np.cov's

  def mean_and_cov(self) -> tuple[np.ndarray, np.ndarray]:
    return self.mean(), self.cov()


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), as pytorch-fid does it."""
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape:
    raise ValueError(f"the means have different shapes: {mu1.shape} vs {mu2.shape}")
  if sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
    raise ValueError(f"covariances {sigma1.shape} and {sigma2.shape} do not match the means "
                     f"{mu1.shape}")
  diff = mu1 - mu2
  with warnings.catch_warnings():  # scipy warns about singular products; we check ourselves
    warnings.simplefilter("ignore", RuntimeWarning)
    sqrt_product = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(sqrt_product).all():  # the product is (almost) singular
      logging.warning("FID: sqrtm(sigma1 sigma2) is not finite; adding %g to the diagonals",
                      eps)
      offset = np.eye(sigma1.shape[0]) * eps
      sqrt_product = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(sqrt_product):  # rounding can leave a small imaginary part
    if not np.allclose(np.diagonal(sqrt_product).imag, 0, atol=1e-3):
      raise ValueError(f"FID: sqrtm(sigma1 sigma2) has an imaginary component of "
                       f"{np.max(np.abs(sqrt_product.imag)):g}")
    sqrt_product = sqrt_product.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(sqrt_product))


def softmax(logits) -> np.ndarray:
  """Row-wise softmax in float64."""
  logits = np.asarray(logits, np.float64)
  exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return exp / exp.sum(axis=-1, keepdims=True)


def inception_score_from_probs(probs, splits: int = 10) -> tuple[float, float]:
  """IS of class probabilities p(y|x) [N, C]: mean and std over `splits` contiguous chunks.

  Chunk i is probs[i N // splits : (i + 1) N // splits] and its score exp(mean_x KL(p(y|x) ||
  p(y))) with p(y) the chunk's mean, as in improved-gan's model.py; 0 log 0 counts as 0.
  """
  probs = np.asarray(probs, np.float64)
  n = probs.shape[0]
  if probs.ndim != 2 or n < splits or splits < 1:
    raise ValueError(f"need probabilities [N, C] with N >= splits={splits}, got {probs.shape}")
  scores = []
  for i in range(splits):
    part = probs[i * n // splits:(i + 1) * n // splits]
    marginal = part.mean(axis=0, keepdims=True)
    positive = part > 0  # where p(y|x) = 0 the term is 0 (and p(y) may be 0 too)
    log_ratio = np.log(np.where(positive, part, 1.0)) - np.log(np.where(positive, marginal, 1.0))
    kl = np.sum(np.where(positive, part * log_ratio, 0.0), axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
  """Inception Score (mean, std over splits) of 1008-way Inception logits [N, 1008].

  Like the original TensorFlow code, the softmax is over all 1008 outputs of the FID graph's
  classifier (not the 1000 ImageNet classes), and the logits to pass are that code's, without
  the classifier bias: `inception.inception_fn` returns those (FIDInceptionV3's
  'logits_unbiased'). N must be known before splitting, so the caller keeps the logits of all
  images (50k x 1008 float32 is 200 MB) and calls this once at the end.
  """
  logits = np.asarray(logits)
  if logits.ndim != 2:
    raise ValueError(f"expected logits [N, C], got shape {logits.shape}")
  probs = np.concatenate([softmax(logits[i:i + 4096]) for i in range(0, len(logits), 4096)])
  return inception_score_from_probs(probs, splits)


def save_stats(path: str, mu, sigma) -> None:
  """pytorch-fid's precomputed statistics: an npz with `mu` [D] and `sigma` [D, D]."""
  mu, sigma = _checked_stats(np.asarray(mu), np.asarray(sigma), path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:  # a file object, so that numpy does not append '.npz'
    np.savez(f, mu=mu, sigma=sigma)


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) in float64 from an npz written by `save_stats` or pytorch-fid."""
  with np.load(path, allow_pickle=False) as data:
    missing = [k for k in ("mu", "sigma") if k not in data.files]
    if missing:
      raise ValueError(f"{path} is not an FID statistics file: it lacks {missing} "
                       f"(it has {sorted(data.files)})")
    return _checked_stats(data["mu"], data["sigma"], path)


def _checked_stats(mu: np.ndarray, sigma: np.ndarray, where: str):
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f"{where}: FID statistics need mu [D] and sigma [D, D], got "
                     f"{mu.shape} and {sigma.shape}")
  return mu.astype(np.float64), sigma.astype(np.float64)
