"""FID and Inception Score in eval mode: images stream through Inception in batches.

Generated images (or the ones of a given samples.npz) never sit in memory all at once: each
batch goes through the FID Inception-v3 (`inception.py`), its pool3 features into a float64
running mean/covariance (`fid.FeatureStats`) and its logits into the IS list. The reference
statistics of the data set are computed the same way once and cached under workdir/eval/
(or read from a given npz of mu/sigma, e.g. the ones pytorch-fid or guided-diffusion publish).
"""
from __future__ import annotations

import os
import time
import zipfile
from typing import Iterator

import jax
import numpy as np
from absl import logging

from diffusion_jax import convert_inception, data, fid, parallel
from diffusion_jax.images import to_uint8
from diffusion_jax.inception import inception_fn


def load_inception(config):
  """The Inception variables of config.eval.inception_path (default: the converted file's
  usual place); a missing file raises one error saying what to download and convert."""
  return convert_inception.load_inception_variables(config.eval.inception_path)


class InceptionScorer:
  """Accumulates pool3 statistics and IS logits of uint8 image batches."""

  def __init__(self, variables, mesh=None):
    self._features = inception_fn(variables)
    self._mesh = mesh
    self.stats = fid.FeatureStats()
    self._logits: list[np.ndarray] = []
    self._t0 = time.time()

  def add(self, images_uint8: np.ndarray) -> None:
    b = images_uint8.shape[0]
    if self._mesh is not None:  # every process holds the batch: split it over all devices
      images_uint8 = parallel.replicated_to_global(
          parallel.pad_to_multiple(images_uint8, self._mesh.size), self._mesh)
    pool3, logits = (parallel.to_host(y)[:b] for y in self._features(images_uint8))
    self.stats.update(pool3)
    self._logits.append(logits.astype(np.float32))
    logging.log_every_n_seconds(logging.INFO, "Inception: %d images (%.1f img/s)", 30,
                                self.stats.count, self.stats.count / (time.time() - self._t0))

  @property
  def count(self) -> int:
    return self.stats.count

  def inception_score(self, splits: int = 10) -> tuple[float, float]:
    return fid.inception_score(np.concatenate(self._logits), splits=splits)


def iter_npz_images(path: str, batch_size: int, key: str = "arr_0") -> Iterator[np.ndarray]:
  """uint8 NHWC batches of the array `key` of an .npz, read piece by piece from the zip."""
  try:
    archive = zipfile.ZipFile(path)
  except (OSError, zipfile.BadZipFile) as e:
    raise data.DataError(f"cannot read samples file {path}: {e}") from e
  with archive:
    if f"{key}.npy" not in archive.namelist():
      raise data.DataError(f"{path} has no array '{key}' (it holds {archive.namelist()})")
    with archive.open(f"{key}.npy") as f:
      version = np.lib.format.read_magic(f)
      read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                     else np.lib.format.read_array_header_2_0)
      shape, fortran, dtype = read_header(f)
      if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3) or fortran:
        raise data.DataError(f"{path}: '{key}' must be uint8 [N, H, W, 1 or 3] (what sample mode "
                             f"writes), got {dtype} {shape}")
      per_image = int(np.prod(shape[1:]))
      for start in range(0, shape[0], batch_size):
        n = min(batch_size, shape[0] - start)
        buf = f.read(n * per_image)
        if len(buf) != n * per_image:
          raise data.DataError(f"{path}: '{key}' is truncated at image {start}")
        yield np.frombuffer(buf, np.uint8).reshape((n,) + tuple(shape[1:]))


def reference_stats(config, scorer_factory, cache_dir: str) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of the data set: config.eval.ref_stats if given, else computed over
  eval.ref_num_examples images of eval.ref_split once and cached in `cache_dir`."""
  e, d = config.eval, config.data
  if e.ref_stats:
    try:
      return fid.load_stats(e.ref_stats)
    except (OSError, ValueError) as err:
      raise data.DataError(f"eval.ref_stats: cannot use {e.ref_stats}: {err}. Give an npz with "
                           "mu [2048] and sigma [2048, 2048], or leave it unset to compute "
                           "the statistics from the data") from err
  name = f"ref_stats_{d.name}_{e.ref_split}_{d.image_size}px_{e.ref_num_examples}.npz"
  path = os.path.join(cache_dir, name)
  if os.path.exists(path):
    logging.info("Reference statistics from the cache %s", path)
    return fid.load_stats(path)
  logging.info("Reference statistics: %d %s images of %s through Inception (once; cached in %s)",
               e.ref_num_examples, e.ref_split, d.name, path)
  scorer = scorer_factory()
  for batch in data.eval_images(config, e.ref_split, e.ref_num_examples, e.batch_size):
    scorer.add(to_uint8(batch))
  if scorer.count < 2:
    raise data.DataError(f"{d.name} {e.ref_split}: {scorer.count} images, too few for FID")
  mu, sigma = scorer.stats.mean_and_cov()
  if jax.process_index() == 0:
    fid.save_stats(path + ".tmp.npz", mu, sigma)  # never leave a half-written cache
    os.replace(path + ".tmp.npz", path)
  return mu, sigma


def fid_and_is(config, metrics, images: Iterator[np.ndarray], variables, cache_dir: str,
               mesh=None) -> dict:
  """Score a stream of uint8 image batches with the Inception `variables`: {'fid',
  'inception_score', ...} as `metrics` asks; reference statistics cached in `cache_dir`."""
  scorer = InceptionScorer(variables, mesh)
  t0 = time.time()
  for batch in images:
    scorer.add(batch)
  out = {"num_scored": scorer.count, "inception_img_per_s": scorer.count / (time.time() - t0)}
  if "is" in metrics:
    mean, std = scorer.inception_score(splits=config.eval.is_splits)
    out.update(inception_score=mean, inception_score_std=std)
    logging.info("Inception Score %.3f +- %.3f over %d images", mean, std, scorer.count)
  if "fid" in metrics:
    ref_mu, ref_sigma = reference_stats(config, lambda: InceptionScorer(variables, mesh),
                                        cache_dir)
    mu, sigma = scorer.stats.mean_and_cov()
    out["fid"] = fid.frechet_distance(mu, sigma, ref_mu, ref_sigma)
    logging.info("FID %.3f (%d images against the %s statistics)", out["fid"], scorer.count,
                 config.eval.ref_stats or f"{config.data.name} {config.eval.ref_split}")
  return out
