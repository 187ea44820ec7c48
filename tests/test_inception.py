"""FID Inception: parity with pytorch-fid on random weights, weight files, FID and IS math."""
import os

import jax
import numpy as np
import pytest
from flax import traverse_util

from diffusion_jax import convert_inception as ci
from diffusion_jax import fid
from diffusion_jax.inception import FIDInceptionV3, inception_fn, resize_bilinear, variable_shapes


# ----------------------------------------------------------------------------- torch reference
def randomise_(net, torch, seed=0):
  """Give every weight and BatchNorm statistic its own random value, activations kept O(1)."""
  g = torch.Generator().manual_seed(seed)
  uniform = lambda shape, lo, hi: lo + (hi - lo) * torch.rand(shape, generator=g)
  normal = lambda shape, std: std * torch.randn(shape, generator=g)
  with torch.no_grad():
    for module in net.modules():
      if isinstance(module, torch.nn.Conv2d):
        module.weight.copy_(normal(module.weight.shape, (2 / module.weight[0].numel()) ** 0.5))
      elif isinstance(module, torch.nn.BatchNorm2d):
        module.weight.copy_(uniform(module.weight.shape, 0.5, 1.5))
        module.bias.copy_(normal(module.bias.shape, 0.1))
        module.running_mean.copy_(normal(module.running_mean.shape, 0.1))
        module.running_var.copy_(uniform(module.running_var.shape, 0.5, 1.5))
      elif isinstance(module, torch.nn.Linear):
        module.weight.copy_(normal(module.weight.shape, module.weight.shape[1] ** -0.5))
        module.bias.copy_(normal(module.bias.shape, 1.0))
  return net


@pytest.fixture(scope="module")
def torch_reference():
  """pytorch-fid's InceptionV3 (FID variant) with random weights, and its underlying net.

  `fid_inception_v3()` would download the weights: its torchvision constructor is recorded
  and the download replaced by the (randomised) state dict of that very net.
  """
  torch = pytest.importorskip("torch")
  pfi = pytest.importorskip("pytorch_fid.inception")
  torch.manual_seed(0)
  built = {}
  torchvision_inception_v3 = pfi._inception_v3

  def recording_inception_v3(*args, **kwargs):
    built["net"] = torchvision_inception_v3(*args, **kwargs)
    return built["net"]

  def random_state_dict(url, progress=True):
    assert url == pfi.FID_WEIGHTS_URL == ci.FID_WEIGHTS_URL
    return randomise_(built["net"], torch).state_dict()  # FID blocks already swapped in

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(pfi, "_inception_v3", recording_inception_v3)
    mp.setattr(pfi, "load_state_dict_from_url", random_state_dict)
    model = pfi.InceptionV3([3], resize_input=True, normalize_input=True,
                            use_fid_inception=True).eval()
  net = built["net"].eval()
  assert isinstance(net.Mixed_7c, pfi.FIDInceptionE_2) and net.fc.out_features == 1008

  def run(images_nhwc):  # floats in [0, 1] -> pool3, logits, logits without the fc bias
    with torch.no_grad():
      pool3 = model(torch.from_numpy(images_nhwc).permute(0, 3, 1, 2))[0].flatten(1)
      return {"pool3": pool3.numpy(), "logits": net.fc(pool3).numpy(),
              "logits_unbiased": (pool3 @ net.fc.weight.T).numpy()}

  state_dict = {k: v.numpy() for k, v in net.state_dict().items()}
  return torch, state_dict, run


@pytest.fixture(scope="module")
def converted(torch_reference):
  return ci.torch_state_dict_to_flax(torch_reference[1])


@pytest.fixture(scope="module")
def uint8_images():
  """Two 384x320 images: both sides are down-sampled to 299."""
  return np.random.default_rng(1).integers(0, 256, (2, 384, 320, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def uint8_reference(torch_reference, converted, uint8_images):
  expected = torch_reference[2](uint8_images.astype(np.float32) / 255)
  pool3, logits = inception_fn(converted)(uint8_images)
  return expected, np.asarray(pool3), np.asarray(logits)


def relative_max_diff(got, want, what):
  diff, scale = float(np.abs(np.asarray(got) - want).max()), float(np.abs(want).max())
  print(f"\n{what}: max |diff| {diff:.2e}, max |torch| {scale:.2e}, relative {diff / scale:.2e}")
  assert 1e-2 < scale < 1e3, f"{what}: degenerate random network (scale {scale})"
  return diff / scale


# ----------------------------------------------------------------------------- network parity
@pytest.mark.parity
@pytest.mark.parametrize("size", [(32, 32), (384, 320), (17, 600), (299, 299)])
def test_resize_matches_torch_bilinear(size):
  torch = pytest.importorskip("torch")
  images = np.random.default_rng(0).random((2, *size, 3), dtype=np.float32)
  want = torch.nn.functional.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2), (299, 299),
                                         mode="bilinear", align_corners=False)
  got = np.asarray(resize_bilinear(images))
  np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-6)


@pytest.mark.parity
def test_float_forward_matches_pytorch_fid(torch_reference, converted):
  images = np.random.default_rng(0).random((4, 32, 32, 3), dtype=np.float32)  # up-sampled
  expected = torch_reference[2](images)
  out = jax.jit(FIDInceptionV3().apply)(converted, images)
  assert out["pool3"].shape == (4, 2048) and out["logits"].shape == (4, 1008)
  for name in ("pool3", "logits", "logits_unbiased"):
    assert relative_max_diff(out[name], expected[name], f"float 32x32 {name}") < 1e-4
  assert np.abs(expected["logits"] - expected["logits_unbiased"]).max() > 0.1  # the bias shows


@pytest.mark.parity
def test_uint8_forward_matches_pytorch_fid(uint8_reference):
  expected, pool3, logits = uint8_reference
  assert pool3.dtype == logits.dtype == np.float32
  assert relative_max_diff(pool3, expected["pool3"], "uint8 384x320 pool3") < 1e-4
  assert relative_max_diff(logits, expected["logits_unbiased"], "uint8 384x320 logits") < 1e-4


@pytest.mark.parity
def test_grayscale_is_repeated_to_rgb(converted, uint8_images, uint8_reference):
  gray = uint8_images[..., :1]
  pool3, logits = inception_fn(converted)(gray)
  want_pool3, want_logits = inception_fn(converted)(np.repeat(gray, 3, axis=-1))
  np.testing.assert_array_equal(pool3, want_pool3)
  np.testing.assert_array_equal(logits, want_logits)
  assert np.abs(np.asarray(pool3) - uint8_reference[1]).max() > 1e-3  # not the RGB images'
  with pytest.raises(ValueError, match="uint8"):
    inception_fn(converted)(uint8_images.astype(np.float32))


# ----------------------------------------------------------------------------- weight files
@pytest.mark.parity
def test_convert_cli_round_trip(torch_reference, uint8_images, uint8_reference, tmp_path):
  torch, state_dict, _ = torch_reference
  src, dst = tmp_path / "random_inception.pth", tmp_path / "out" / "inception.safetensors"
  torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, src)
  ci.main([f"--src={src}", f"--dst={dst}"])
  variables = ci.load_inception_variables(str(dst))
  pool3, logits = inception_fn(variables)(uint8_images)
  np.testing.assert_array_equal(pool3, uint8_reference[1])
  np.testing.assert_array_equal(logits, uint8_reference[2])


def fake_torch_state_dict():
  """Zeros with the names and shapes of pytorch-fid's state dict (no torch needed)."""
  out = {"Conv2d_1a_3x3.bn.num_batches_tracked": np.zeros((), np.int64)}
  for name, shape in variable_shapes().items():
    torch_name, transpose = ci.torch_name(name)
    out[torch_name] = np.zeros(shape if transpose is None else
                               tuple(shape[transpose.index(i)] for i in range(len(shape))))
  return out


def test_converter_maps_every_weight_and_rejects_others():
  state_dict = fake_torch_state_dict()
  assert len(state_dict) == 473 and state_dict["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
  flat = traverse_util.flatten_dict(ci.torch_state_dict_to_flax(state_dict), sep="/")
  assert {k: v.shape for k, v in flat.items()} == variable_shapes() and len(flat) == 472
  del state_dict["Mixed_6b.branch7x7_2.bn.running_var"]
  state_dict["AuxLogits.fc.weight"] = np.zeros((1008, 768))
  state_dict["fc.weight"] = np.zeros((1000, 2048))
  with pytest.raises(ci.InceptionWeightsError) as info:
    ci.torch_state_dict_to_flax(state_dict)
  message = str(info.value)
  assert "missing: batch_stats/Mixed_6b/branch7x7_2/bn/var" in message
  assert "params/fc/kernel has shape (2048, 1000), expected (2048, 1008)" in message
  assert "unexpected: AuxLogits.fc.weight" in message


def test_missing_weights_file_says_what_to_do(tmp_path, monkeypatch):
  path = str(tmp_path / "nowhere" / "inception_fid.safetensors")
  with pytest.raises(FileNotFoundError) as info:
    ci.load_inception_variables(path)
  assert ci.FID_WEIGHTS_URL in str(info.value)
  assert (f"python -m diffusion_jax.convert_inception "
          f"--src=pt_inception-2015-12-05-6726825d.pth --dst={path}") in str(info.value)
  monkeypatch.setenv("DIFFUSION_JAX_INCEPTION", path)
  assert ci.default_inception_path() == path
  monkeypatch.delenv("DIFFUSION_JAX_INCEPTION")
  assert ci.default_inception_path() == os.path.expanduser(
      "~/.cache/diffusion_jax/inception_fid.safetensors")


def test_weights_file_with_a_wrong_shape_is_rejected(tmp_path):
  flat = {name: np.zeros(shape, np.float32) for name, shape in variable_shapes().items()}
  flat["params/Mixed_5b/branch_pool/conv/kernel"] = np.zeros((1, 1, 192, 16), np.float32)
  path = str(tmp_path / "bad.safetensors")
  ci.save_safetensors(traverse_util.unflatten_dict(flat, sep="/"), path)
  with pytest.raises(ci.InceptionWeightsError) as info:
    ci.load_inception_variables(path)
  assert path in str(info.value) and ci.FID_WEIGHTS_URL in str(info.value)
  assert ("params/Mixed_5b/branch_pool/conv/kernel has shape (1, 1, 192, 16), "
          "expected (1, 1, 192, 32)") in str(info.value)
  with open(path, "wb") as f:
    f.write(b"not a safetensors file")
  with pytest.raises(ci.InceptionWeightsError, match="not a readable safetensors file"):
    ci.load_inception_variables(path)


# ----------------------------------------------------------------------------- FID
def random_stats(rng, n, dim, offset=0.0):
  feats = rng.standard_normal((n, dim)) @ rng.standard_normal((dim, dim)) / dim ** 0.5 + offset
  return feats.mean(axis=0), np.cov(feats, rowvar=False)


@pytest.mark.parity
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pytorch-fid's sqrtm(disp=False)
@pytest.mark.parametrize("n", [500, 10])  # 10 samples of 64 dims: singular covariances
def test_frechet_distance_matches_pytorch_fid(n):
  reference = pytest.importorskip("pytorch_fid.fid_score").calculate_frechet_distance
  rng = np.random.default_rng(n)
  mu1, sigma1 = random_stats(rng, n, 64)
  mu2, sigma2 = random_stats(rng, n, 64, offset=0.3)
  got, want = fid.frechet_distance(mu1, sigma1, mu2, sigma2), reference(mu1, sigma1, mu2, sigma2)
  print(f"\nFID n={n}: ours {got:.12f}, pytorch-fid {want:.12f}, diff {abs(got - want):.1e}")
  assert abs(got - want) <= 1e-6 * max(1.0, abs(want)) and got > 1.0
  with pytest.raises(ValueError, match="Imaginary component"):
    reference(mu1, -np.eye(64), mu2, np.eye(64))
  with pytest.raises(ValueError, match="imaginary component"):
    fid.frechet_distance(mu1, -np.eye(64), mu2, np.eye(64))


def test_frechet_distance_of_a_set_with_itself_and_a_shift():
  mu, sigma = random_stats(np.random.default_rng(0), 2000, 256, offset=5.0)
  assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6
  shift = np.full(256, 0.1)
  np.testing.assert_allclose(fid.frechet_distance(mu, sigma, mu + shift, sigma), 256 * 0.01,
                             rtol=1e-8)
  with pytest.raises(ValueError, match="do not match"):
    fid.frechet_distance(mu, sigma, mu, sigma[:-1, :-1])


def test_frechet_distance_retries_a_singular_product_with_eps(monkeypatch):
  sqrtm, seen = fid.linalg.sqrtm, []

  def sqrtm_failing_once(product):
    seen.append(product)
    return np.full_like(product, np.nan) if len(seen) == 1 else sqrtm(product)

  monkeypatch.setattr(fid.linalg, "sqrtm", sqrtm_failing_once)
  sigma1, sigma2 = np.diag([1.0, 0.0]), np.diag([0.0, 4.0])
  value = fid.frechet_distance(np.zeros(2), sigma1, np.ones(2), sigma2, eps=1e-2)
  np.testing.assert_allclose(seen[1], (sigma1 + 1e-2 * np.eye(2)) @ (sigma2 + 1e-2 * np.eye(2)))
  want = 2 + 5 - 2 * (np.sqrt(1.01 * 0.01) + np.sqrt(0.01 * 4.01))  # traces without eps
  np.testing.assert_allclose(value, want, rtol=1e-12)


def test_feature_stats_streams_mean_and_cov():
  rng = np.random.default_rng(0)
  feats = rng.standard_normal((1003, 48)) @ rng.standard_normal((48, 48)) + 1e3  # large mean
  stats = fid.FeatureStats()
  for start, stop in [(0, 7), (7, 7), (7, 500), (500, 1003)]:
    stats.update(feats[start:stop].astype(np.float32) if start == 0 else feats[start:stop])
  feats[:7] = feats[:7].astype(np.float32)
  assert stats.count == 1003
  np.testing.assert_allclose(stats.mean(), feats.mean(axis=0), rtol=1e-12)
  want_cov = np.cov(feats, rowvar=False)
  assert np.abs(stats.cov() - want_cov).max() <= 1e-10 * np.abs(want_cov).max()
  with pytest.raises(ValueError, match="dimension"):
    stats.update(np.zeros((2, 47)))
  with pytest.raises(ValueError, match="at least 2"):
    one = fid.FeatureStats()
    one.update(feats[:1])
    one.cov()


def test_stats_npz_round_trip_and_errors(tmp_path):
  mu, sigma = random_stats(np.random.default_rng(0), 100, 16)
  path = str(tmp_path / "stats.npz")
  fid.save_stats(path, mu, sigma)
  got_mu, got_sigma = fid.load_stats(path)
  np.testing.assert_array_equal(got_mu, mu)
  np.testing.assert_array_equal(got_sigma, sigma)
  np.savez(tmp_path / "pytorch_fid.npz", mu=mu.astype(np.float32), sigma=sigma)  # their writer
  assert fid.load_stats(str(tmp_path / "pytorch_fid.npz"))[0].dtype == np.float64
  np.savez(tmp_path / "no_sigma.npz", mu=mu)
  with pytest.raises(ValueError, match="lacks \\['sigma'\\]"):
    fid.load_stats(str(tmp_path / "no_sigma.npz"))
  np.savez(tmp_path / "bad_shape.npz", mu=mu, sigma=sigma[:-1])
  with pytest.raises(ValueError, match="mu \\[D\\] and sigma \\[D, D\\]"):
    fid.load_stats(str(tmp_path / "bad_shape.npz"))


# ----------------------------------------------------------------------------- Inception Score
def reference_inception_score(logits, splits):
  """improved-gan's model.py, on scipy's softmax."""
  from scipy.special import softmax
  preds = softmax(np.asarray(logits, np.float64), axis=1)
  scores = []
  for i in range(splits):
    part = preds[(i * preds.shape[0] // splits):((i + 1) * preds.shape[0] // splits), :]
    kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
    scores.append(np.exp(np.mean(np.sum(kl, 1))))
  return np.mean(scores), np.std(scores)


def test_inception_score_of_one_hot_and_of_identical_predictions():
  classes, splits = 7, 4
  labels = np.tile(np.arange(classes), 3 * splits)  # every split holds each class 3 times
  one_hot = np.where(np.arange(1008) == labels[:, None], 0.0, -1e4)  # softmax: exactly one-hot
  mean, std = fid.inception_score(one_hot, splits=splits)
  np.testing.assert_allclose(mean, classes, rtol=1e-12)
  assert std < 1e-12
  same = np.tile(np.random.default_rng(0).standard_normal(1008), (40, 1))
  np.testing.assert_allclose(fid.inception_score(same, splits=splits), (1.0, 0.0), atol=1e-12)


def test_inception_score_matches_the_original_formula():
  logits = 3 * np.random.default_rng(0).standard_normal((103, 1008)).astype(np.float32)
  got, want = fid.inception_score(logits, splits=10), reference_inception_score(logits, 10)
  np.testing.assert_allclose(got, want, rtol=1e-10)
  assert got[0] > 2 and got[1] > 0
  with pytest.raises(ValueError, match="N >= splits"):
    fid.inception_score(logits[:5], splits=10)
