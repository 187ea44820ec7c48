"""LPIPS-VGG against the lpips package (its real lin weights, a random VGG16 trunk), the weight
converter end to end, and the metric's properties."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import lpips as ours


def _images(seed, n=2, size=64):
  rng = np.random.default_rng(seed)
  return rng.uniform(-1, 1, (n, 3, size, size)).astype(np.float32)


def _reference():
  torch = pytest.importorskip("torch")
  lpips = pytest.importorskip("lpips")
  torch.manual_seed(0)
  # pnet_rand: torchvision's VGG16 randomly initialised (no download); pretrained: the lin
  # layers calibrated on human judgements, shipped inside the lpips package
  ref = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
  with torch.no_grad():  # torchvision zeroes the biases: give them values to convert
    for module in ref.net.modules():
      if isinstance(module, torch.nn.Conv2d):
        module.bias.normal_(0.0, 0.05)
  return torch, lpips, ref


def _nhwc(a):
  return jnp.asarray(a.transpose(0, 2, 3, 1))


@pytest.mark.parity
def test_matches_the_lpips_package():
  torch, _, ref = _reference()
  from diffusion_jax.convert_lpips import torch_state_to_params
  params = torch_state_to_params({k: v.numpy() for k, v in ref.state_dict().items()})
  x0, x1 = _images(0), _images(1)
  x1[1] = x0[1] + 0.05 * _images(2, 1)[0]  # one close pair, one far apart
  with torch.no_grad():
    want = ref(torch.from_numpy(x0), torch.from_numpy(x1)).numpy().reshape(-1)
  got = np.asarray(jax.jit(ours.LPIPS().apply)({"params": params}, _nhwc(x0), _nhwc(x1)))
  print(f"LPIPS ours {got} vs lpips {want}")
  np.testing.assert_allclose(got, want, rtol=1e-4)
  assert want[1] < want[0]


@pytest.mark.parity
def test_converter_reads_torchvision_and_lpips_files_and_the_loader_checks_them(tmp_path):
  torch, lpips, ref = _reference()
  import os

  from diffusion_jax.convert_lpips import main
  # torchvision's naming (features.<i>.*), as in vgg16-397923af.pth, from the reference's trunk
  trunk = {f"features.{k.split('.', 2)[1]}.{k.split('.', 2)[2]}": v
           for k, v in ref.net.state_dict().items()}
  trunk["classifier.0.weight"] = torch.zeros(4, 2)  # torchvision's head: ignored
  torch.save(trunk, tmp_path / "vgg16.pth")
  lins = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth")
  dst = tmp_path / "lpips.safetensors"
  main([f"--src={tmp_path / 'vgg16.pth'},{lins}", f"--dst={dst}"])
  params = ours.load_lpips_params(str(dst))
  x0, x1 = _images(3), _images(4)
  with torch.no_grad():
    want = ref(torch.from_numpy(x0), torch.from_numpy(x1)).numpy().reshape(-1)
  got = jax.jit(ours.LPIPS().apply)({"params": params}, _nhwc(x0), _nhwc(x1))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4)

  with pytest.raises(SystemExit, match="missing: lin_0/kernel"):
    main([f"--src={tmp_path / 'vgg16.pth'}", f"--dst={tmp_path / 'partial.safetensors'}"])
  with pytest.raises(ours.LPIPSWeightsError, match="convert_lpips"):
    ours.load_lpips_params(str(tmp_path / "absent.safetensors"))
  (tmp_path / "bad.safetensors").write_bytes(b"garbage")
  with pytest.raises(ours.LPIPSWeightsError, match="not a readable safetensors"):
    ours.load_lpips_params(str(tmp_path / "bad.safetensors"))


def test_is_a_symmetric_distance_with_gradients():
  x = jnp.zeros((1, 32, 32, 3))
  params = ours.LPIPS().init(jax.random.PRNGKey(0), x, x)["params"]
  # the lin layers are non-negative in the real weights: make the random ones so too
  params = {k: ({"kernel": jnp.abs(v["kernel"])} if k.startswith("lin_") else v)
            for k, v in params.items()}
  a = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3), minval=-1, maxval=1)
  b = jax.random.uniform(jax.random.PRNGKey(2), (2, 32, 32, 3), minval=-1, maxval=1)
  d = jax.jit(lambda u, v: ours.LPIPS().apply({"params": params}, u, v))
  np.testing.assert_allclose(d(a, b), d(b, a), rtol=1e-6)
  assert np.all(np.asarray(d(a, a)) < 1e-12) and np.all(np.asarray(d(a, b)) > 1e-3)
  g = jax.grad(lambda u: d(u, b).sum())(a)
  assert g.shape == a.shape and bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0
  with pytest.raises(ValueError, match=r"two \[B, H, W, 3\] batches"):
    d(a, b[:, :16])
