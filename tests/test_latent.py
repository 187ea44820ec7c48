"""Latent diffusion: a U-Net trained on a frozen autoencoder run's latents through main's loop,
its scale factor (estimated, kept, reused), decoded samples, and its config checks."""
import os

import jax
import numpy as np
import pytest

from diffusion_jax import checkpoints, data, latent, parallel
from diffusion_jax.validate import ConfigError, validate_config
from helpers import ae_config, small_graph


@pytest.fixture(scope="module")
def autoencoder_run(tmp_path_factory):
  """Two steps of the tiny autoencoder (16x16x1 -> 8x8x4): a first stage to diffuse on."""
  from diffusion_jax.train import train_and_evaluate
  tmp = tmp_path_factory.mktemp("first_stage")
  config = ae_config(tmp, num_steps=2)
  workdir = str(tmp / "ae")
  train_and_evaluate(config, workdir)
  return tmp, workdir


def ldm_config(autoencoder_run):
  tmp, workdir = autoencoder_run
  c = ae_config(tmp, num_steps=2)  # its data and autoencoder layout
  c.stage = "diffusion"
  c.latent.autoencoder = workdir
  small_graph(c)  # one U-Net level on the 8x8 latents
  c.sampling.clip_denoised = False
  c.model.num_classes, c.model.label_dropout = 10, 0.1  # class-conditional, with guidance
  c.sampling.guidance_scale = 2.0
  c.training.sample_every = 2
  c.eval.metrics = "fid"
  return c


def test_conditional_latent_diffusion_trains_keeps_its_scale_and_samples_images(
    autoencoder_run, tmp_path):
  from diffusion_jax.sample import run_sample_mode
  from diffusion_jax.train import Trainer, train_and_evaluate
  config = ldm_config(autoencoder_run)
  validate_config(config, "train")
  workdir = str(tmp_path / "ldm")
  train_and_evaluate(config, workdir)
  tr = Trainer(config)
  step, _, meta = checkpoints.restore_trained(workdir, tr.abstract_state)
  scale = meta[latent.SCALE_KEY]
  # s = 1/std(z) of the first batch: the latents the U-Net saw first have unit std
  assert step == 2 and tr.model.in_channels == 4 and tr.use_latent_scale(meta) == scale
  first = parallel.global_batch(next(data.train_batches(config, 0)), tr.mesh)["image"]
  z = np.asarray(tr.first_stage.encode(first, tr._latent_key))
  assert z.shape == (16, 8, 8, 4)
  np.testing.assert_allclose(z.std(), 1.0, rtol=1e-4)
  # the decoded EMA samples of training, and the sample mode's
  assert os.path.exists(os.path.join(workdir, "train_samples", "step_00000002.png"))
  out = run_sample_mode(config, workdir)  # guided, the classes in turn
  npz = np.load(os.path.join(out, "samples.npz"))
  images = npz["arr_0"]
  assert images.shape == (10, 16, 16, 1) and images.dtype == np.uint8
  assert len(np.unique(images)) > 10  # decoded images, not a constant
  np.testing.assert_array_equal(npz["arr_1"], np.arange(10))
  for figure in ("samples.png", "progressive.png", "interpolation.png"):  # decoded figures
    assert os.path.getsize(os.path.join(out, figure)) > 0

  # exported for diffusers: the U-Net on the latents (labels, null label included) and the
  # autoencoder as AutoencoderKL with the run's scale (diffusion_jax/export.py)
  torch, diffusers = pytest.importorskip("torch"), pytest.importorskip("diffusers")
  from diffusion_jax.export import export_workdir
  from diffusion_jax.sample import restore_ema_params
  exported = str(tmp_path / "exported")
  export_workdir(config, workdir, exported)
  assert sorted(os.listdir(exported)) == ["scheduler", "unet", "vae"]  # no pipeline pairs them
  unet = diffusers.UNet2DModel.from_pretrained(exported + "/unet").eval()
  vae = diffusers.AutoencoderKL.from_pretrained(exported + "/vae").eval()
  assert (unet.config.sample_size, unet.config.in_channels, unet.config.num_class_embeds) == (
      8, 4, 11)
  assert vae.config.scaling_factor == pytest.approx(scale)
  _, _, params = restore_ema_params(config, workdir)
  z = np.random.default_rng(0).standard_normal((3, 8, 8, 4)).astype(np.float32)
  t, y = np.array([0, 500, 999]), np.array([0, 9, 10])
  with torch.no_grad():
    want = unet(torch.from_numpy(z.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                class_labels=torch.from_numpy(y)).sample.numpy().transpose(0, 2, 3, 1)
  got = np.asarray(tr.model.apply({"params": params}, z, t, y))
  scale_out = np.abs(want).max()  # small after 2 steps from a zero-initialised conv_out
  assert np.abs(got - want).max() < 1e-3 * scale_out and scale_out > 1e-5
  with torch.no_grad():
    decoded = vae.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample.numpy()
  ours = np.asarray(tr.first_stage.model.apply({"params": tr.first_stage.params}, z,
                                               method=tr.first_stage.model.decode))
  np.testing.assert_allclose(decoded.transpose(0, 2, 3, 1), ours, atol=1e-4)


def test_latent_scale_comes_from_the_config_else_the_checkpoint(autoencoder_run):
  from diffusion_jax.train import Trainer
  config = ldm_config(autoencoder_run)
  tr = Trainer(config)
  with pytest.raises(latent.FirstStageError, match="scale factor is not known"):
    tr.use_latent_scale({})
  assert tr.use_latent_scale({latent.SCALE_KEY: 0.7}) == 0.7
  config.latent.scale_factor = 0.25
  assert Trainer(config).use_latent_scale({latent.SCALE_KEY: 0.7}) == 0.25


def test_public_weights_must_match_the_configured_latents(autoencoder_run, monkeypatch):
  from diffusion_jax import convert_autoencoder
  config = ldm_config(autoencoder_run)
  fields = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, in_channels=1, out_channels=1,
                z_channels=4, embed_dim=4)
  monkeypatch.setattr(convert_autoencoder, "load_autoencoder", lambda src: (
      fields, {}, {"scale_factor": 0.5, "shift_factor": 0.0}))
  config.latent.autoencoder = "vae.safetensors"
  with pytest.raises(latent.FirstStageError, match=r"f=4.*f=2.*autoencoder.ch_mult \(len 3\)"):
    latent.load_first_stage(config, parallel.make_mesh(1))
  config.autoencoder.ch_mult = (1, 2, 2)
  fs = latent.load_first_stage(config, parallel.make_mesh(1))
  assert fs.scaling() == (0.5, 0.0)  # the published scale


@pytest.mark.parametrize("key, value, match", [
    ("sampling.clip_denoised", True, "clip_denoised.*not bounded"),
    ("eval.metrics", "nll", "eval.metrics.*latent space"),
    ("model.ch_mult", (1, 2, 2, 2, 2), r"halve the 8x8 latents.*at most 4 levels"),
    ("model.attn_resolutions", (16,), r"latent resolutions.*\[8\]"),
    ("latent.scale_factor", -1.0, "scale_factor"),
])
def test_latent_config_errors_name_the_key(autoencoder_run, key, value, match):
  config = ldm_config(autoencoder_run)
  section, name = key.split(".")
  config[section][name] = value
  with pytest.raises(ConfigError, match=match):
    validate_config(config, "train")


def test_several_steps_per_call_encode_each_steps_batch(autoencoder_run, tmp_path):
  """steps_per_dispatch = 4 (each step's batch encoded with its own key, then stacked) trains
  the same weights as one step per call."""
  from diffusion_jax.train import Trainer, train_and_evaluate
  params = {}
  for k in (1, 4):
    config = ldm_config(autoencoder_run)
    config.training.num_steps = config.training.checkpoint_every = 4
    config.training.log_every, config.training.sample_every = 4, 1000
    config.training.steps_per_dispatch = k
    workdir = str(tmp_path / f"dispatch_{k}")
    train_and_evaluate(config, workdir)
    _, state, _ = checkpoints.restore_trained(workdir, Trainer(config).abstract_state)
    params[k] = jax.tree.map(np.asarray, state.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), params[1], params[4])
