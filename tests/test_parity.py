"""Parity with diffusers on shared random weights: the U-Net and one scheduler step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusion_jax import diffusion as dm  # noqa: E402
from diffusion_jax import samplers  # noqa: E402
from diffusion_jax.convert_diffusers import (model_config_from_diffusers,  # noqa: E402
                                             unet_fields, unet_params_from_diffusers)
from diffusion_jax.models import UNet  # noqa: E402

pytestmark = pytest.mark.parity

CIFAR = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
             down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
             layers_per_block=2, attention_head_dim=None, norm_eps=1e-6, downsample_padding=0,
             flip_sin_to_cos=False, freq_shift=1)


def randomise(module, seed=0):
  """diffusers zero-initialises nothing we could miss; still, give every weight a scale."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(torch.randn(p.shape, generator=g) * (0.5 / max(1, p[0].numel()) ** 0.5) + 0.01)
  return module


def build(cfg, cls=None):
  unet = randomise((cls or diffusers.UNet2DModel)(**cfg)).eval()
  mcfg = model_config_from_diffusers(dict(unet.config, _class_name=type(unet).__name__))
  ours = UNet(**unet_fields(mcfg))
  state = {k: v.numpy() for k, v in unet.state_dict().items()}
  return unet, ours, {"params": unet_params_from_diffusers(state, mcfg)}, mcfg


def test_unet_matches_diffusers_in_the_ddpm_cifar_layout():
  unet, ours, params, mcfg = build(CIFAR)
  assert mcfg["attn_levels"] == (1,) and mcfg["ch_mult"] == (1, 2, 2, 2)
  # every parameter of our model is filled, with the right shape
  ref = jax.eval_shape(lambda: ours.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                         jnp.zeros((1,))))
  assert jax.tree.structure(ref) == jax.tree.structure(params)
  assert jax.tree.map(lambda a, b: a.shape == b.shape, ref, params)
  x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
  t = np.array([10, 800])
  with torch.no_grad():
    want = unet(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy()
  got = ours.apply(params, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t))
  diff = np.abs(np.asarray(got).transpose(0, 3, 1, 2) - want).max()
  print(f"U-Net max |ours - diffusers| = {diff:.3g} (output scale {np.abs(want).max():.3g})")
  assert diff < 1e-4


def test_learned_variance_layout_converts():
  cfg = dict(CIFAR, out_channels=6, block_out_channels=(32, 64), layers_per_block=1,
             down_block_types=("AttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "AttnUpBlock2D"), sample_size=16)
  unet, ours, params, mcfg = build(cfg)
  assert mcfg["learned_variance"] and mcfg["attn_levels"] == (0,)
  x = np.random.default_rng(1).normal(size=(1, 3, 16, 16)).astype(np.float32)
  with torch.no_grad():
    want = unet(torch.from_numpy(x), 5).sample.numpy()
  got = ours.apply(params, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.array([5]))
  assert np.abs(np.asarray(got).transpose(0, 3, 1, 2) - want).max() < 1e-4


def test_ldm_unconditional_layout_matches_diffusers():
  """LDM's unconditional U-Nets (CompVis/ldm-celebahq-256's layout): heads of 32 channels, the
  flipped timestep embedding, symmetric down-sampling padding, GroupNorm eps 1e-5."""
  cfg = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(64, 128),
             layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
             up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=32)
  unet, ours, params, mcfg = build(cfg)
  assert (mcfg["head_channels"], mcfg["flip_sin_to_cos"], mcfg["freq_shift"],
          mcfg["downsample_padding"], mcfg["norm_eps"]) == (32, True, 0.0, "symmetric", 1e-5)
  x = np.random.default_rng(2).normal(size=(2, 3, 16, 16)).astype(np.float32)
  t = np.array([3, 700])
  with torch.no_grad():
    want = unet(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy()
  got = ours.apply(params, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t))
  assert np.abs(np.asarray(got).transpose(0, 3, 1, 2) - want).max() < 1e-4


def test_unsupported_configs_are_refused():
  from diffusion_jax.convert_diffusers import ConversionError
  with pytest.raises(ConversionError, match="attention_head_dim=48 does not divide"):
    model_config_from_diffusers(dict(CIFAR, attention_head_dim=48))
  with pytest.raises(ConversionError, match="resnet_time_scale_shift"):
    model_config_from_diffusers(dict(CIFAR, resnet_time_scale_shift="scale_shift"))
  with pytest.raises(ConversionError, match="downsample_padding=2"):
    model_config_from_diffusers(dict(CIFAR, downsample_padding=2))


def float64(sched):
  """diffusers builds its coefficients in float32, which loses 1 - alphabar_t at small t; we
  compare against its step() with the same coefficients computed in float64."""
  betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
  sched.betas, sched.alphas = betas, 1.0 - betas
  sched.alphas_cumprod = torch.cumprod(sched.alphas, 0)
  if hasattr(sched, "final_alpha_cumprod"):
    sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
  return sched


@pytest.mark.parametrize("t", [999, 500, 1, 0])
@pytest.mark.parametrize("clip", [True, False])
def test_ddpm_scheduler_step(t, clip):
  sched = float64(diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                          variance_type="fixed_small", clip_sample=clip))
  d = dm.GaussianDiffusion(dm.get_beta_schedule("linear", 1000), var_type="fixedsmall")
  rng = np.random.default_rng(t)
  x = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
  eps = rng.normal(size=x.shape).astype(np.float32)
  g = torch.Generator().manual_seed(0)
  noise = torch.randn(x.shape, generator=g, dtype=torch.float64).numpy().astype(np.float32)
  torch64 = lambda a: torch.from_numpy(a.astype(np.float64))
  want = sched.step(torch64(eps), t, torch64(x),
                    generator=torch.Generator().manual_seed(0)).prev_sample.numpy()
  nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))
  tb = jnp.full((2,), t)
  got, _ = d.p_sample(nhwc(eps), nhwc(x), tb, nhwc(noise), clip_denoised=clip)
  diff = np.abs(np.asarray(got).transpose(0, 3, 1, 2) - want).max()
  print(f"DDPMScheduler.step t={t} clip={clip}: max diff {diff:.3g}")
  assert diff < 1e-5


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("index", [0, 25, 49])
def test_ddim_scheduler_step(eta, index):
  sched = float64(diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                          clip_sample=False, set_alpha_to_one=True))
  sched.set_timesteps(50)
  t = int(sched.timesteps[index])
  seq = samplers.ddim_timesteps(1000, 50, "uniform")
  np.testing.assert_array_equal(sched.timesteps.numpy(), seq[::-1])
  t_prev = int(seq[::-1][index + 1]) if index + 1 < 50 else -1
  d = dm.GaussianDiffusion(dm.get_beta_schedule("linear", 1000))
  rng = np.random.default_rng(index)
  x = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
  eps = rng.normal(size=x.shape).astype(np.float32)
  noise = rng.normal(size=x.shape).astype(np.float32)
  torch64 = lambda a: torch.from_numpy(a.astype(np.float64))
  want = sched.step(torch64(eps), t, torch64(x), eta=eta,
                    variance_noise=torch64(noise)).prev_sample.numpy()
  nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))
  got, _ = samplers.ddim_step(d, nhwc(eps), nhwc(x), jnp.full((2,), t), jnp.full((2,), t_prev),
                              eta, nhwc(noise))
  diff = np.abs(np.asarray(got).transpose(0, 3, 1, 2) - want).max()
  print(f"DDIMScheduler.step t={t} eta={eta}: max diff {diff:.3g}")
  assert diff < 1e-5


def test_import_command_then_sampler_step_equals_diffusers(tmp_path):
  """A diffusers UNet2DModel saved to a directory, imported by our command, gives the same
  first DDIM step as diffusers' own pipeline pieces on the same inputs."""
  from helpers import tiny_config
  from diffusion_jax.convert import import_diffusers_unet
  from diffusion_jax.sample import restore_ema_params
  cfg = dict(CIFAR, sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64),
             layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
             up_block_types=("AttnUpBlock2D", "UpBlock2D"))
  unet = randomise(diffusers.UNet2DModel(**cfg)).eval()
  src = tmp_path / "ddpm-tiny"
  unet.save_pretrained(str(src), safe_serialization=True)
  config = tiny_config(tmp_path)
  config.diffusion.num_timesteps = 1000
  workdir = str(tmp_path / "imported")
  import_diffusers_unet(str(src), config, workdir)
  _, step, params = restore_ema_params(config, workdir)
  assert step == 0
  from diffusion_jax.models import build_model
  model = build_model(config)
  sched = float64(diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                          clip_sample=False))
  sched.set_timesteps(50)
  t = int(sched.timesteps[0])
  x = np.random.default_rng(0).normal(size=(2, 1, 16, 16)).astype(np.float32)
  with torch.no_grad():
    eps = unet(torch.from_numpy(x), t).sample
  want = sched.step(eps.double(), t, torch.from_numpy(x).double()).prev_sample.numpy()
  d = dm.GaussianDiffusion(dm.get_beta_schedule("linear", 1000))
  xh = jnp.asarray(x.transpose(0, 2, 3, 1))
  out = model.apply({"params": params}, xh, jnp.full((2,), t))
  got, _ = samplers.ddim_step(d, out, xh, jnp.full((2,), t), jnp.full((2,), t - 20), 0.0,
                              jnp.zeros_like(xh))
  diff = np.abs(np.asarray(got).transpose(0, 3, 1, 2) - want).max()
  print(f"imported checkpoint, first DDIM step: max diff {diff:.3g}")
  assert diff < 1e-4
  with pytest.raises(Exception, match="add --config.model.ch=32|does not describe"):
    config.model.ch = 64
    import_diffusers_unet(str(src), config, str(tmp_path / "other"))


def test_ldm_pipeline_imports_and_samples_like_diffusers(tmp_path):
  """LDM's unconditional latent pipeline (CompVis/ldm-celebahq-256's layout in miniature: an
  LDM U-Net on a VQ first stage's latents): the U-Net imported by our command into a latent
  config, its DDIM chain decoded through the VQ decoder, equals diffusers' LDMPipeline."""
  from diffusers.utils.torch_utils import randn_tensor
  from helpers import tiny_config
  from diffusion_jax.convert import import_diffusers_unet
  from diffusion_jax.convert_diffusers import ConversionError
  from diffusion_jax.models import denoiser
  from diffusion_jax.sample import restore_ema_params
  from diffusion_jax.train import Trainer
  unet = randomise(diffusers.UNet2DModel(
      sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64),
      layers_per_block=1, attention_head_dim=16, down_block_types=("DownBlock2D",
      "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))).eval()
  vqvae = randomise(diffusers.VQModel(
      in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=1,
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
      latent_channels=3, num_vq_embeddings=32, scaling_factor=1.0), 1).eval()
  sched = diffusers.DDIMScheduler(beta_start=0.0015, beta_end=0.0195,
                                  beta_schedule="scaled_linear", clip_sample=False)
  pipe = diffusers.LDMPipeline(vqvae=vqvae, unet=unet, scheduler=sched)
  src = tmp_path / "ldm-tiny"
  pipe.save_pretrained(str(src), safe_serialization=True)

  config = tiny_config(tmp_path)  # 16x16x1 images -> 8x8x3 VQ latents
  config.latent.autoencoder = str(src)  # its vqvae/
  a = config.autoencoder
  a.ch, a.ch_mult, a.num_res_blocks, a.z_channels, a.codebook_size = 32, (1, 2), 1, 3, 32
  with pytest.raises(ConversionError, match=r"attn_resolutions=\(\) --config.model.attn_levels="
                     r"\(1,\).*head_channels=16.*--config.diffusion.beta_schedule="
                     "'scaled_linear'.*--config.diffusion.beta_end=0.0195.*clip_denoised=False"):
    import_diffusers_unet(str(src), config, str(tmp_path / "refused"))
  m = config.model
  m.ch_mult, m.attn_resolutions, m.attn_levels = (1, 2), (), (1,)
  m.head_channels, m.norm_eps = 16, 1e-5
  m.flip_sin_to_cos, m.freq_shift, m.downsample_padding = True, 0.0, "symmetric"
  d = config.diffusion
  d.num_timesteps, d.beta_schedule = 1000, "scaled_linear"
  d.beta_start, d.beta_end = 0.0015, 0.0195
  config.sampling.clip_denoised = False
  workdir = str(tmp_path / "imported")
  import_diffusers_unet(str(src), config, workdir)
  _, step, params = restore_ema_params(config, workdir)
  tr = Trainer(config)
  assert step == 0 and tr.first_stage.scaling() == (1.0, 0.0)

  want = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=4,
              output_type="np").images
  x_T = randn_tensor((2, 3, 8, 8), generator=torch.Generator().manual_seed(0)).numpy()
  z = samplers.ddim_sample(tr.diffusion, denoiser(tr.model, params),
                           jnp.asarray(x_T.transpose(0, 2, 3, 1)), jax.random.PRNGKey(0), 4,
                           clip_denoised=False)
  fs = tr.first_stage
  images = (np.asarray(fs.decode_latents(fs.params, 1.0, 0.0, z)) + 1) / 2
  diff = np.abs(images - want).max()
  print(f"LDM pipeline (VQ, 4 DDIM steps): max |ours - diffusers| = {diff:.3g}")
  assert diff < 1e-4
  # exported back (diffusion_jax/export.py): an LDMPipeline of the same tensors and images
  from diffusion_jax.export import export_workdir
  export_workdir(config, workdir, str(tmp_path / "exported"))
  again = diffusers.LDMPipeline.from_pretrained(str(tmp_path / "exported"))
  assert isinstance(again.scheduler, diffusers.DDIMScheduler)
  for module in ("unet", "vqvae"):
    theirs, ref = getattr(again, module), getattr(pipe, module)
    assert sorted(theirs.state_dict()) == sorted(ref.state_dict())
    for key, value in ref.state_dict().items():
      np.testing.assert_array_equal(theirs.state_dict()[key].numpy(), value.numpy(), err_msg=key)
  for key in ("num_vq_embeddings", "vq_embed_dim", "latent_channels", "scaling_factor"):
    assert again.vqvae.config[key] == (pipe.vqvae.config[key] or 3), key
  again_images = again(batch_size=2, generator=torch.Generator().manual_seed(0),
                       num_inference_steps=4, output_type="np").images
  np.testing.assert_allclose(again_images, want, atol=1e-6)
