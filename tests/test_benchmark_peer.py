"""benchmarks/peer.py: the PyTorch model that benchmarks/run.py times against ours is our model
(each config's peer loads our parameters strictly and gives our outputs, labels and learned
variance included), latent configs are measured on latents, and the peer's hybrid loss computes
our bound term."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from benchmarks import peer  # noqa: E402
from diffusion_jax import diffusion as dm  # noqa: E402

pytestmark = pytest.mark.parity


def small(name: str):
  """configs/<name>.py, narrowed (the layout kept: levels, attention, labels, variance)."""
  config = importlib.import_module(f"configs.{name}").get_config()
  m = config.model
  if m.name == "dit":
    m.depth, m.hidden_size, m.num_heads = 2, 64, 2
  else:
    m.ch, m.num_res_blocks = 32, 1
  return config


def perturbed(params, seed=0):
  """Our initial parameters plus noise: adaLN-Zero and zero-initialised output layers would
  otherwise hide a wrong mapping behind zeros."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: np.asarray(p) + 0.05 * rng.standard_normal(p.shape).astype(
      np.float32), params)


@pytest.mark.parametrize("name,space", [("fashion_mnist_dit", "latents"),
                                        ("fashion_mnist_ldm", "latents"),
                                        ("cifar10_ddpm", "pixels")])
def test_benchmark_peer_is_our_model_in_the_measured_space(name, space):
  from diffusion_jax.convert_dit import dit_state_dict
  from diffusion_jax.export import unet_state_dict
  from diffusion_jax.models import build_model
  config = small(name)
  assert peer.measured_space(config) == space
  assert config.latent.get("autoencoder") is None  # no first stage to load
  size, c = config.data.image_size, config.data.channels
  assert (size, c) == ((8, 4) if space == "latents" else (32, 3))
  model, m = build_model(config), config.model
  x = np.random.default_rng(1).standard_normal((3, size, size, c)).astype(np.float32)
  t = np.array([0, 500, 999])
  y = np.array([0, 3, m.num_classes]) if m.num_classes else None  # the null label too
  params = perturbed(model.init(jax.random.PRNGKey(0), jnp.asarray(x), jnp.asarray(t),
                                None if y is None else jnp.asarray(y))["params"])
  state = (dit_state_dict(params, {"hidden_size": m.hidden_size, "depth": m.depth})
           if m.name == "dit" else unet_state_dict(params, len(m.ch_mult)))
  net = peer.diffusers_model(config).eval()
  net.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
  with torch.no_grad():
    want = peer.forward(net, config)(
        torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
        None if y is None else torch.from_numpy(y)).numpy().transpose(0, 2, 3, 1)
  got = np.asarray(model.apply({"params": params}, jnp.asarray(x), jnp.asarray(t),
                               None if y is None else jnp.asarray(y)))
  learned = config.diffusion.var_type.startswith("learned")
  assert got.shape == want.shape == (3, size, size, c * (2 if learned else 1))
  diff = np.abs(got - want).max()
  print(f"{name}: the benchmark's diffusers peer vs ours: {diff:.2g} (scale "
        f"{np.abs(want).max():.2g})")
  assert diff < 2e-4 * max(1.0, np.abs(want).max())


def test_benchmark_peer_refuses_text_conditional_configs():
  config = small("fashion_mnist_ldm_text")
  with pytest.raises(ValueError, match="text_to_image.py"):
    peer.measured_space(config)


def test_benchmark_peer_vlb_term_is_our_bound_term():
  config = small("fashion_mnist_dit")  # linear betas, learned range, hybrid loss
  d = dm.from_config(config.diffusion)
  rng = np.random.default_rng(0)
  x0 = rng.uniform(-1, 1, (4, 6, 6, 2)).astype(np.float32)
  noise = rng.standard_normal(x0.shape).astype(np.float32)
  t = np.array([1, 10, 400, 999])
  x_t = np.asarray(d.q_sample(jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise)))
  tables = peer.schedule_tables(torch, config, "cpu", torch.float64)
  out = np.concatenate([noise + 0.3 * rng.standard_normal(x0.shape),
                        rng.uniform(-1, 1, x0.shape)], -1).astype(np.float32)
  ours = float(jnp.mean(d.vb_terms_bpd(jnp.asarray(out), jnp.asarray(x0), jnp.asarray(x_t),
                                       jnp.asarray(t))[0]))
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
  np.testing.assert_allclose(  # and the peer's x_t is ours
      peer.q_sample(tables, nchw(x0).double(), torch.from_numpy(t), nchw(noise).double()),
      nchw(x_t).double(), atol=1e-6)
  theirs = float(peer.vlb_term(torch, nchw(out).double(), nchw(x0).double(),
                               nchw(x_t).double(), torch.from_numpy(t), tables, 2))
  print(f"bound term: ours {ours:.6f} bits/dim, the peer's {theirs:.6f}")
  assert ours > 0.01 and theirs == pytest.approx(ours, rel=1e-4)
