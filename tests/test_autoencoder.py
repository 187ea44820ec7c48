"""The LDM first-stage autoencoder: the Gaussian posterior's math, and parity with diffusers'
AutoencoderKL on shared random weights, in diffusers' and CompVis' (ldm) naming."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.convert_diffusers import ConversionError
from diffusion_jax.models import autoencoder as ae


def test_kl_matches_monte_carlo_and_is_zero_at_the_prior():
  mean = jnp.array([[0.5, -1.0, 2.0]])
  logvar = jnp.array([[0.3, -0.7, 1.1]])
  z = jax.vmap(lambda k: ae.sample_gaussian(k, mean, logvar))(
      jax.random.split(jax.random.PRNGKey(0), 200_000))  # [N, 1, 3]
  log_q = jax.scipy.stats.norm.logpdf(z, mean, jnp.exp(0.5 * logvar)).sum(-1)
  log_p = jax.scipy.stats.norm.logpdf(z).sum(-1)
  mc = float(jnp.mean(log_q - log_p))
  exact = float(ae.kl_to_standard_normal(mean, logvar)[0])
  assert abs(mc - exact) < 0.02 * exact, (mc, exact)
  np.testing.assert_allclose(z.mean(0), mean, atol=0.01)
  np.testing.assert_allclose(z.var(0), jnp.exp(logvar), rtol=0.02)
  assert float(ae.kl_to_standard_normal(jnp.zeros((2, 4, 4, 3)), jnp.zeros((2, 4, 4, 3)))[1]) == 0


def test_moments_split_into_mean_and_clamped_logvar():
  moments = jnp.concatenate([jnp.full((1, 2, 2, 2), 3.0), jnp.array([-50.0, 40.0]) *
                             jnp.ones((1, 2, 2, 2))], axis=-1)
  mean, logvar = ae.gaussian_from_moments(moments)
  assert mean.shape == logvar.shape == (1, 2, 2, 2) and float(mean.min()) == 3.0
  np.testing.assert_array_equal(logvar[0, 0, 0], [-30.0, 20.0])


def test_autoencoder_shapes_sampling_and_bad_input():
  model = ae.AutoencoderKL(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=3,
                           embed_dim=3)
  assert model.downsampling_factor == 4
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 24, 3), minval=-1, maxval=1)
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), x)
  rec, mean, logvar = jax.jit(model.apply)(variables, x)
  assert rec.shape == x.shape and mean.shape == logvar.shape == (2, 4, 6, 3)
  sampled = jax.jit(lambda k: model.apply(variables, x, k)[0])
  rec_a, rec_b = sampled(jax.random.PRNGKey(2)), sampled(jax.random.PRNGKey(3))
  assert not np.allclose(rec_a, rec_b)  # z sampled from the posterior when given an rng
  with pytest.raises(ValueError, match="divisible by 4"):
    model.apply(variables, x[:, :, :22])
  with pytest.raises(ValueError, match=r"\[B, h, w, 3\] latents"):
    model.apply(variables, jnp.zeros((1, 4, 4, 4)), method=model.decode)
  with pytest.raises(ValueError, match="z_channels=4 and embed_dim=3"):
    ae.AutoencoderKL(ch=32, ch_mult=(1,), z_channels=4, embed_dim=3,
                     use_quant_conv=False).init(jax.random.PRNGKey(0), x)


def test_remat_gives_the_same_gradients():
  kw = dict(ch=32, ch_mult=(1,), num_res_blocks=1, attn_levels=(0,))
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 8, 3))
  params = ae.AutoencoderKL(**kw).init(jax.random.PRNGKey(1), x)

  def grads(model):
    return jax.jit(jax.grad(lambda p: jnp.sum(model.apply(p, x, jax.random.PRNGKey(2))[0] ** 2)))(
        params)

  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               grads(ae.AutoencoderKL(**kw)), grads(ae.AutoencoderKL(**kw, remat=True)))


# -- parity with diffusers (random weights) -----------------------------------------------------

def _diffusers():
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  return torch, diffusers


SMALL = dict(in_channels=3, out_channels=3, block_out_channels=(32, 64, 64), layers_per_block=1,
             down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
             latent_channels=4, norm_num_groups=32, sample_size=32)


def _random_vae(diffusers, torch, **cfg):
  vae = diffusers.AutoencoderKL(**{**SMALL, **cfg})
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for p in vae.parameters():
      p.copy_(torch.randn(p.shape, generator=g) * (0.7 / max(1, p[0].numel()) ** 0.5) + 0.01)
  return vae.eval()


def _compare(vae, config, params, torch, size=32):
  """Posterior moments, decoding and the whole forward pass (posterior mean) agree."""
  model = ae.AutoencoderKL(**config)
  x = np.random.default_rng(0).uniform(-1, 1, (2, 3, size, size)).astype(np.float32)
  with torch.no_grad():
    dist = vae.encode(torch.from_numpy(x)).latent_dist
    z = torch.from_numpy(np.random.default_rng(1).normal(size=dist.mean.shape).astype(np.float32))
    want = {"mean": dist.mean, "logvar": dist.logvar, "decode": vae.decode(z).sample,
            "forward": vae(torch.from_numpy(x)).sample}
  nhwc = lambda a: jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))
  mean, logvar = model.apply({"params": params}, nhwc(x), method=model.encode)
  got = {"mean": mean, "logvar": logvar,
         "decode": model.apply({"params": params}, nhwc(z.numpy()), method=model.decode),
         "forward": model.apply({"params": params}, nhwc(x))[0]}
  _assert_matches(got, want)


def _assert_matches(got, want, label=""):
  """Each of our NHWC outputs against diffusers' NCHW one: within 2e-4 of its scale."""
  for name, ref in want.items():
    ref = ref.numpy().transpose(0, 2, 3, 1)
    diff = float(np.abs(np.asarray(got[name]) - ref).max())
    print(f"{label}{name}: max |ours - diffusers| = {diff:.3g} (scale {np.abs(ref).max():.3g})")
    assert diff < 2e-4 * max(1.0, float(np.abs(ref).max())), name


@pytest.mark.parity
def test_matches_diffusers_autoencoder_kl():
  torch, diffusers = _diffusers()
  from diffusion_jax.convert_autoencoder import autoencoder_config_from_params, autoencoder_params
  vae = _random_vae(diffusers, torch)
  params = autoencoder_params({k: v.numpy() for k, v in vae.state_dict().items()})
  config = autoencoder_config_from_params(params)
  assert config == {"codebook_size": 0, "ch": 32, "ch_mult": (1, 2, 2), "num_res_blocks": 1,
                    "attn_levels": (),
                    "mid_attn": True, "in_channels": 3, "out_channels": 3, "z_channels": 4,
                    "embed_dim": 4, "use_quant_conv": True, "use_post_quant_conv": True}
  ref = jax.eval_shape(lambda: ae.AutoencoderKL(**config).init(jax.random.PRNGKey(0),
                                                               jnp.zeros((1, 32, 32, 3))))
  assert jax.tree.map(lambda a: a.shape, ref["params"]) == jax.tree.map(lambda a: a.shape, params)
  _compare(vae, config, params, torch)


@pytest.mark.parity
def test_matches_diffusers_with_level_attention_and_no_quant_convs():
  """The SD3/FLUX-style variant (no quant convs, 16-channel latent) with attention in the
  second level of both halves, on a 16x16 image."""
  torch, diffusers = _diffusers()
  from diffusion_jax.convert_autoencoder import autoencoder_config_from_params, autoencoder_params
  vae = _random_vae(diffusers, torch, block_out_channels=(32, 64), latent_channels=16,
                    down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                    up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
                    use_quant_conv=False, use_post_quant_conv=False, layers_per_block=2)
  params = autoencoder_params({k: v.numpy() for k, v in vae.state_dict().items()})
  config = autoencoder_config_from_params(params)
  assert config["attn_levels"] == (1,) and config["z_channels"] == config["embed_dim"] == 16
  assert not config["use_quant_conv"] and config["num_res_blocks"] == 2
  _compare(vae, config, params, torch, size=16)


def _ldm_key(path: tuple[str, ...], leaf: str) -> str:
  """Our parameter path -> CompVis' name (this test's own mapping, checked by diffusers'
  ldm converter loading the result strictly)."""
  s = ".".join(path)
  s = re.sub(r"(down|up)_(\d+)_block_(\d+)", r"\1.\2.block.\3", s)
  s = re.sub(r"(down|up)_(\d+)_(downsample|upsample)", r"\1.\2.\3", s)
  s = s.replace("mid_block_", "mid.block_").replace("mid_attn", "mid.attn_1")
  s = re.sub(r"norm_(\d)", r"norm\1", s)
  s = re.sub(r"conv_(\d)", r"conv\1", s)
  return s + "." + {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]


@pytest.mark.parity
def test_ldm_checkpoint_converts_like_diffusers_own_converter():
  """A CompVis-named first stage inside an LDM checkpoint (with loss.* and U-Net entries):
  diffusers' convert_ldm_vae_checkpoint builds its model from the same file, and ours must
  compute the same functions."""
  torch, diffusers = _diffusers()
  from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
  from diffusion_jax.convert_autoencoder import autoencoder_config_from_params, autoencoder_params
  cfg = dict(SMALL, block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=2)
  config = {"codebook_size": 0, "ch": 32, "ch_mult": (1, 2), "num_res_blocks": 2, "attn_levels": (),
            "mid_attn": True, "in_channels": 3, "out_channels": 3, "z_channels": 4,
            "embed_dim": 4, "use_quant_conv": True, "use_post_quant_conv": True}
  shapes = jax.eval_shape(lambda: ae.AutoencoderKL(**config).init(jax.random.PRNGKey(0),
                                                                  jnp.zeros((1, 16, 16, 3))))
  rng = np.random.default_rng(0)
  ckpt = {"model.diffusion_model.out.2.weight": np.zeros((3, 4, 3, 3), np.float32),
          "first_stage_model.loss.logvar": np.zeros((), np.float32),
          "first_stage_model.model_ema.decay": np.zeros((), np.float32)}
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes["params"])[0]:
    names = tuple(p.key for p in path)
    shape = leaf.shape
    if names[-1] == "kernel":  # HWIO -> OIHW; ldm's attention projections are 1x1 convs
      shape = (shape[-1], shape[-2], 1, 1) if len(shape) == 2 else (
          shape[3], shape[2], shape[0], shape[1])
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    value = rng.normal(size=shape) * 0.7 / fan_in ** 0.5 + 0.01
    ckpt["first_stage_model." + _ldm_key(names[:-1], names[-1])] = value.astype(np.float32)
  assert "first_stage_model.encoder.mid.attn_1.q.weight" in ckpt
  assert "first_stage_model.decoder.up.1.upsample.conv.weight" in ckpt
  vae = diffusers.AutoencoderKL(**cfg).eval()
  converted = convert_ldm_vae_checkpoint({k: torch.from_numpy(v) for k, v in ckpt.items()}, cfg)
  vae.load_state_dict(converted, strict=True)
  params = autoencoder_params(ckpt)
  assert autoencoder_config_from_params(params) == config
  _compare(vae, config, params, torch, size=16)


@pytest.mark.parity
def test_load_autoencoder_reads_a_diffusers_directory_and_a_single_file(tmp_path):
  torch, diffusers = _diffusers()
  from safetensors.numpy import save_file
  from diffusion_jax.convert_autoencoder import latent_scaling_from_diffusers, load_autoencoder
  vae = _random_vae(diffusers, torch, block_out_channels=(32,), down_block_types=(
      "DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), scaling_factor=0.3611,
      shift_factor=0.1159)
  vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
  config, params, scaling = load_autoencoder(str(tmp_path))  # a pipeline directory: its vae/
  assert config["ch_mult"] == (1,) and scaling == {"scale_factor": 0.3611, "shift_factor": 0.1159}
  state = {k: v.numpy() for k, v in vae.state_dict().items()}
  save_file(state, str(tmp_path / "vae.safetensors"))
  config2, params2, scaling2 = load_autoencoder(str(tmp_path / "vae.safetensors"))
  assert config2 == config and scaling2["scale_factor"] is None  # a file records no scaling
  jax.tree.map(np.testing.assert_array_equal, params, params2)
  # every parameter is checked against the network it describes
  partial = {k: v for k, v in state.items() if "decoder.up_blocks.0.resnets.1" not in k}
  save_file(partial, str(tmp_path / "partial.safetensors"))
  with pytest.raises(ConversionError, match="missing: decoder/up_0_block_1/conv_1/bias"):
    load_autoencoder(str(tmp_path / "partial.safetensors"))
  # a codebook of the wrong width beside a KL encoder
  save_file({**state, "quantize.embedding.weight": np.zeros((8, 4), np.float32)},
            str(tmp_path / "vq.safetensors"))
  with pytest.raises(ConversionError, match="do not form one autoencoder.*codebook"):
    load_autoencoder(str(tmp_path / "vq.safetensors"))
  cfg_path = tmp_path / "vae" / "config.json"
  cfg_path.write_text(cfg_path.read_text().replace('"layers_per_block": 1',
                                                   '"layers_per_block": 2'))
  with pytest.raises(ConversionError, match="layers_per_block=2 but the weights have 1"):
    load_autoencoder(str(tmp_path))
  with pytest.raises(ConversionError, match="neither a diffusers directory"):
    load_autoencoder(str(tmp_path / "missing.ckpt"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ConversionError, match="config.json not found"):
    load_autoencoder(str(tmp_path / "empty"))
  save_file({"model.diffusion_model.x": np.zeros(2, np.float32)},
            str(tmp_path / "unet.safetensors"))
  with pytest.raises(ConversionError, match="no autoencoder parameters"):
    load_autoencoder(str(tmp_path / "unet.safetensors"))
  (tmp_path / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
  with pytest.raises(ConversionError, match="cannot read"):
    load_autoencoder(str(tmp_path / "broken.safetensors"))

  with pytest.raises(ConversionError, match="act_fn='gelu'"):
    latent_scaling_from_diffusers({"_class_name": "AutoencoderKL", "act_fn": "gelu"})
  with pytest.raises(ConversionError, match="config.json of a AutoencoderKL, got .Asymm"):
    latent_scaling_from_diffusers({"_class_name": "AsymmetricAutoencoderKL"})
  with pytest.raises(ConversionError, match="norm_type='spatial'"):
    latent_scaling_from_diffusers({"_class_name": "VQModel", "norm_type": "spatial"})


@pytest.mark.parity
def test_vq_first_stage_matches_diffusers_vq_model(tmp_path):
  """LDM's VQ first stage (vq-f4's layout in miniature) from a pipeline's vqvae/ folder: the
  latents h, the codebook indices, decoding (quantised) and the whole pass; scale 1."""
  torch, diffusers = _diffusers()
  from diffusion_jax.convert_autoencoder import load_autoencoder
  vq = diffusers.VQModel(in_channels=3, out_channels=3, block_out_channels=(32, 64),
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                         latent_channels=3, num_vq_embeddings=64, norm_num_groups=32,
                         scaling_factor=1.0)
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in vq.named_parameters():
      scale = 1.0 if "quantize" in name else 0.7 / max(1, p[0].numel()) ** 0.5
      p.copy_(torch.randn(p.shape, generator=g) * scale + 0.01)
  vq.eval().save_pretrained(tmp_path / "vqvae", safe_serialization=True)
  config, params, scaling = load_autoencoder(str(tmp_path))
  assert (config["codebook_size"], config["z_channels"], config["embed_dim"]) == (64, 3, 3)
  assert scaling == {"scale_factor": 1.0, "shift_factor": 0.0}
  model = ae.AutoencoderKL(**config)
  x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
  nhwc = lambda a: jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))
  with torch.no_grad():
    h = vq.encode(torch.from_numpy(x)).latents
    _, _, (_, _, idx) = vq.quantize(h)
    want = {"h": h, "decode": vq.decode(h).sample, "forward": vq(torch.from_numpy(x)).sample}
  got_h, logvar = model.apply({"params": params}, nhwc(x), method=model.encode)
  assert logvar is None
  _, got_idx = model.apply({"params": params}, got_h, method=model.quantize)
  np.testing.assert_array_equal(np.asarray(got_idx).reshape(-1), idx.numpy().reshape(-1))
  got = {"h": got_h, "decode": model.apply({"params": params}, nhwc(h.numpy()),
                                           method=model.decode),
         "forward": model.apply({"params": params}, nhwc(x))[0]}
  _assert_matches(got, want, "VQ ")
