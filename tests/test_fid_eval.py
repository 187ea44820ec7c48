"""Eval mode's FID and IS: streamed samples.npz, cached reference statistics, generated samples,
and the message when the Inception weights are missing. Inception has random weights here."""
import json
import os

import numpy as np
import pytest
from flax import traverse_util

from diffusion_jax import convert_inception, data, fid_eval
from diffusion_jax.evaluate import run_eval_mode
from diffusion_jax.images import to_uint8
from diffusion_jax.inception import variable_shapes
from helpers import tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
  # He-scaled random kernels (flax's default init gives near-constant pool3 features), identity
  # BatchNorm; drawn in numpy from the variable shapes, nothing compiled
  rng = np.random.RandomState(0)
  flat = {}
  for name, shape in variable_shapes().items():
    if name.endswith("kernel"):
      flat[name] = rng.normal(0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
    else:
      flat[name] = np.ones(shape) if name.endswith(("scale", "var")) else np.zeros(shape)
  variables = traverse_util.unflatten_dict(flat, sep="/")
  path = str(tmp_path_factory.mktemp("inception") / "inception_fid.safetensors")
  convert_inception.save_safetensors(variables, path)
  return path


def _config(tmp_path, inception_file, **eval_overrides):
  config = tiny_config(tmp_path, num_steps=2, checkpoint_every=2)
  config.eval.metrics = "fid,is"
  config.eval.inception_path = inception_file
  config.eval.ref_split = "train"
  config.eval.ref_num_examples = 24
  config.eval.is_splits = 2
  for k, v in eval_overrides.items():
    setattr(config.eval, k, v)
  return config


def test_npz_images_stream_in_batches(tmp_path):
  images = np.random.RandomState(0).randint(0, 256, (10, 4, 5, 3)).astype(np.uint8)
  for save in (np.savez, np.savez_compressed):
    path = str(tmp_path / f"{save.__name__}.npz")
    save(path, arr_0=images)
    batches = list(fid_eval.iter_npz_images(path, 4))
    assert [b.shape[0] for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(batches), images)
  np.savez(tmp_path / "float.npz", arr_0=images.astype(np.float32))
  with pytest.raises(data.DataError, match="must be uint8"):
    list(fid_eval.iter_npz_images(str(tmp_path / "float.npz"), 4))
  np.savez(tmp_path / "other.npz", images=images)
  with pytest.raises(data.DataError, match="no array 'arr_0'"):
    list(fid_eval.iter_npz_images(str(tmp_path / "other.npz"), 4))
  (tmp_path / "junk.npz").write_bytes(b"not a zip")
  with pytest.raises(data.DataError, match="cannot read"):
    list(fid_eval.iter_npz_images(str(tmp_path / "junk.npz"), 4))


def test_scoring_a_samples_npz_caches_the_reference_statistics(tmp_path, inception_file,
                                                               monkeypatch):
  config = _config(tmp_path, inception_file, batch_size=8)
  train = to_uint8(np.concatenate(list(data.eval_images(config, "train", 24, 24))))
  np.savez(tmp_path / "same.npz", arr_0=train)  # the reference images themselves: FID ~ 0
  noise = np.random.RandomState(1).randint(0, 256, train.shape).astype(np.uint8)
  np.savez(tmp_path / "noise.npz", arr_0=noise)
  workdir = str(tmp_path / "run")

  config.eval.samples_npz = str(tmp_path / "same.npz")
  same = json.load(open(run_eval_mode(config, workdir)))
  cache = os.path.join(workdir, "eval", "ref_stats_fashion_mnist_train_16px_24.npz")
  assert os.path.exists(cache)
  assert same["num_scored"] == 24 and abs(same["fid"]) < 1e-2, same["fid"]
  assert same["inception_score"] >= 1.0 and same["settings"]["metrics"] == ["fid", "is"]

  # the second run reads the cache: the data set is not read again
  monkeypatch.setattr(data, "eval_images", lambda *a, **k: pytest.fail("data read again"))
  config.eval.samples_npz = str(tmp_path / "noise.npz")
  noisy = json.load(open(run_eval_mode(config, workdir)))
  assert noisy["fid"] > 1e-3 and noisy["fid"] > 1e4 * abs(same["fid"]), noisy["fid"]

  # given reference statistics (an npz of mu, sigma) are used as they are
  mu, sigma = np.load(cache)["mu"], np.load(cache)["sigma"]
  np.savez(tmp_path / "ref.npz", mu=mu + 1.0, sigma=sigma)
  config.eval.ref_stats = str(tmp_path / "ref.npz")
  shifted = json.load(open(run_eval_mode(config, workdir)))
  assert shifted["fid"] != pytest.approx(noisy["fid"])


def test_eval_mode_generates_and_scores_samples(tmp_path, inception_file):
  from diffusion_jax.train import train_and_evaluate
  config = _config(tmp_path, inception_file, batch_size=8, num_examples=16)
  workdir = str(tmp_path / "run")
  train_and_evaluate(config, workdir)
  result = json.load(open(run_eval_mode(config, workdir)))
  assert result["step"] == 2 and result["num_scored"] == 16
  assert np.isfinite(result["fid"]) and result["fid"] > 0
  assert result["inception_score"] >= 1.0
  assert result["settings"]["sampling"]["method"] == "ddim"
  assert os.path.exists(os.path.join(workdir, "eval", "2.json"))


def test_missing_inception_weights_say_what_to_get(tmp_path):
  config = _config(tmp_path, str(tmp_path / "nowhere.safetensors"))
  with pytest.raises(convert_inception.InceptionWeightsError) as e:
    run_eval_mode(config, str(tmp_path / "run"))  # before looking for a checkpoint
  assert "pt_inception-2015-12-05" in str(e.value)
  assert "diffusion_jax.convert_inception" in str(e.value)
