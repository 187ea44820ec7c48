"""The autoencoder stage end to end: trained by main's loop (resumed exactly, the GAN from
disc_start, reconstructions written), on 1 vs 8 devices, evaluated (PSNR), its config checked."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import data, parallel
from diffusion_jax.validate import ConfigError, validate_config
from helpers import ae_config


def _params(workdir, config):
  from diffusion_jax.train_autoencoder import restore_autoencoder
  _, step, params = restore_autoencoder(config, workdir)
  return step, jax.tree.map(np.asarray, params)


def test_autoencoder_trains_resumes_exactly_and_is_evaluated(tmp_path):
  from diffusion_jax.evaluate import run_eval_mode
  from diffusion_jax.train import train_and_evaluate
  config = ae_config(tmp_path)
  straight = str(tmp_path / "straight")
  train_and_evaluate(config, straight)
  with open(os.path.join(straight, "metrics.jsonl")) as f:
    records = {r["step"]: r for r in map(json.loads, f)}
  assert sorted(records) == [1, 2, 3, 4]
  # steps 0 and 1 (records 1, 2) have no GAN; from disc_start = 2 the discriminator learns
  assert all(records[k]["d_loss"] == 0 and records[k]["d_weight"] == 0 for k in (1, 2))
  assert all(records[k]["d_loss"] > 0 and records[k]["d_weight"] > 0 for k in (3, 4))
  assert all(np.isfinite(r["loss"]) and r["rec_l1"] > 0 for r in records.values())
  assert os.path.exists(os.path.join(straight, "reconstructions", "step_00000004.png"))
  assert os.path.exists(os.path.join(straight, "loss.png"))

  resumed = str(tmp_path / "resumed")
  config.training.num_steps = 2
  train_and_evaluate(config, resumed)
  config.training.num_steps = 4
  train_and_evaluate(config, resumed)  # from the step-2 checkpoint, across disc_start
  (s1, p1), (s2, p2) = _params(straight, config), _params(resumed, config)
  assert s1 == s2 == 4
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), p1, p2)

  result = json.load(open(run_eval_mode(config, straight)))
  assert result["step"] == 4 and result["num_examples"] == 12
  assert 5.0 < result["psnr"] < 60.0 and "rfid" not in result and "lpips" not in result
  assert os.path.exists(os.path.join(straight, "eval", "4_reconstructions.png"))

  # exported (diffusion_jax/export.py), diffusers' AutoencoderKL decodes as ours
  diffusers, torch = pytest.importorskip("diffusers"), pytest.importorskip("torch")
  from diffusion_jax.export import export_workdir
  from diffusion_jax.train_autoencoder import restore_autoencoder
  export_workdir(config, straight, str(tmp_path / "vae"))
  vae = diffusers.AutoencoderKL.from_pretrained(str(tmp_path / "vae")).eval()
  trainer, _, params = restore_autoencoder(config, straight)
  z = np.random.default_rng(0).normal(size=(2, 4, 8, 8)).astype(np.float32)
  with torch.no_grad():
    want = vae.decode(torch.from_numpy(z)).sample.numpy().transpose(0, 2, 3, 1)
  got = np.asarray(trainer.model.apply({"params": params}, jnp.asarray(z.transpose(0, 2, 3, 1)),
                                       method=trainer.model.decode))
  diff = np.abs(got - want).max()
  print(f"exported autoencoder, decoder: max |ours - diffusers| {diff:.3g}")
  assert diff < 1e-4


def test_eight_devices_give_the_autoencoder_step_of_one(tmp_path):
  """Both networks' updates, the adaptive weight and the discriminator's BatchNorm over the
  global batch: the same on 1 and 8 devices. Two steps: without and with the GAN (beyond them
  the adaptive weight, ~800 this early, magnifies rounding: 1 % apart at the third step)."""
  from diffusion_jax.train_autoencoder import AutoencoderTrainer
  config = ae_config(tmp_path)
  config.autoencoder.loss.disc_start = 1
  out = {}
  for n in (1, 8):
    tr = AutoencoderTrainer(config, mesh=parallel.make_mesh(n))
    state, metrics = tr.init(), []
    for step in range(2):
      batch = next(data.train_batches(config, step, process_index=0, process_count=1))
      state, m, _ = tr.run_steps(state, [batch], step)
      metrics.append({k: float(v) for k, v in m.items()})
    out[n] = metrics, jax.tree.map(np.asarray, state.disc_stats)
  for m1, m8 in zip(out[1][0], out[8][0]):
    for k in m1:  # d_weight: a ratio of gradient norms with a small denominator, ~3e-4 apart
      np.testing.assert_allclose(m1[k], m8[k], rtol=1e-3, atol=1e-6, err_msg=k)
  assert out[1][0][0]["d_loss"] == 0 and out[1][0][1]["d_loss"] > 0
  # the BatchNorm statistics of the global batch; the weights are not compared: Adam moves
  # each by ~lr whatever its gradient's size, so rounding in a near-zero gradient moves a
  # weight by up to 2 lr
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), out[1][1],
               out[8][1])


def test_perceptual_loss_without_lpips_weights_says_what_to_do(tmp_path):
  from diffusion_jax.lpips import LPIPSWeightsError
  from diffusion_jax.train_autoencoder import AutoencoderTrainer
  config = ae_config(tmp_path)
  config.autoencoder.loss.perceptual_weight = 1.0
  config.autoencoder.lpips_path = str(tmp_path / "absent.safetensors")
  with pytest.raises(LPIPSWeightsError, match="(?s)convert_lpips.*perceptual_weight=0"):
    AutoencoderTrainer(config)
  AutoencoderTrainer(config, lpips=False)  # evaluation needs none


def test_psnr_of_known_differences():
  from diffusion_jax.evaluate_autoencoder import psnr_uint8
  x = np.zeros((3, 4, 4, 1), np.uint8)
  y = x.copy()
  y[0] += 1                 # MSE 1: 20 log10(255)
  y[1, :2] = 255            # half the pixels off by 255: MSE 255^2 / 2
  got = psnr_uint8(x, y)
  np.testing.assert_allclose(got[:2], [20 * np.log10(255.0), 10 * np.log10(2.0)], rtol=1e-12)
  assert got[2] == np.inf


@pytest.mark.parametrize("key, value, match", [
    ("stage", "vae", "stage='vae'.*one of"),
    ("autoencoder.attn_levels", (2,), r"attn_levels.*\[0, 1\]"),
    ("autoencoder.disc_layers", 3, "disc_layers.*at most log2"),
    ("autoencoder.ch", 48, "GroupNorm"),
    ("autoencoder.loss.disc_loss", "wgan", "autoencoder.loss: disc_loss='wgan'"),
    ("autoencoder.loss.kl_weight", -1.0, "autoencoder.loss: kl_weight"),
    ("eval.metrics", "psnr,nll", r"eval.metrics.*\('psnr', 'lpips', 'fid'\)"),
])
def test_autoencoder_config_errors_name_the_key(tmp_path, key, value, match):
  config = ae_config(tmp_path)
  *path, last = key.split(".")
  node = config
  for p in path:
    node = node[p]
  node[last] = value
  with pytest.raises(ConfigError, match=match):
    validate_config(config, "train")


def test_autoencoder_config_refuses_sampling_and_summarises(tmp_path):
  from diffusion_jax.summary import summary_text
  from diffusion_jax.train_autoencoder import AutoencoderTrainer
  config = ae_config(tmp_path)
  validate_config(config, "train")
  with pytest.raises(ConfigError, match="--mode=sample needs a diffusion config"):
    validate_config(config, "sample")
  text = summary_text(config)
  assert "encoder" in text and "quant_conv" in text
  assert f"{AutoencoderTrainer(config).num_params():,}" in text


def test_vq_loss_and_codebook_usage_closed_forms():
  from diffusion_jax import autoencoder_loss as L
  h = jax.numpy.array([[1.0, 2.0], [0.0, 0.0]])
  z_q = jax.numpy.array([[1.0, 0.0], [0.0, 1.0]])
  # mean squared distance 1.25; codebook term + 0.25 x commitment term
  np.testing.assert_allclose(L.vq_loss(h, z_q, 0.25), 1.25 * 1.25, rtol=1e-6)
  g_h, g_q = jax.grad(lambda a, b: L.vq_loss(a, b, 0.25), argnums=(0, 1))(h, z_q)
  np.testing.assert_allclose(g_h, 0.25 * 2 * (h - z_q) / 4, rtol=1e-6)  # commitment only
  np.testing.assert_allclose(g_q, 2 * (z_q - h) / 4, rtol=1e-6)  # codebook only
  assert float(L.codebook_usage(jax.numpy.array([[0, 3], [3, 3]]), 8)) == 0.25


def test_vq_autoencoder_trains_and_latent_diffusion_runs_on_it(tmp_path):
  """A VQ first stage (codebook_size > 0) through main's loop: the codebook learns, its use is
  logged, eval works; then a U-Net diffuses its latents h and samples decode them quantised."""
  from diffusion_jax.evaluate import run_eval_mode
  from diffusion_jax.sample import run_sample_mode
  from diffusion_jax.train import train_and_evaluate
  from diffusion_jax.train_autoencoder import AutoencoderTrainer
  from helpers import small_graph
  config = ae_config(tmp_path, num_steps=4)
  config.autoencoder.codebook_size = 32
  config.autoencoder.loss.disc_start = 100
  validate_config(config)
  init = jax.tree.map(np.asarray, AutoencoderTrainer(config, lpips=False).init().params)
  vq_run = str(tmp_path / "vq")
  train_and_evaluate(config, vq_run)
  with open(os.path.join(vq_run, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert all(r["vq"] > 0 and 0 < r["codebook_usage"] <= 1 and "kl" not in r for r in records)
  step, params = _params(vq_run, config)
  assert step == 4 and params["codebook"].shape == (32, 4)
  assert np.abs(params["codebook"] - init["codebook"]).max() > 1e-4
  assert json.load(open(run_eval_mode(config, vq_run)))["psnr"] > 5.0
  diffusers, torch = pytest.importorskip("diffusers"), pytest.importorskip("torch")
  from diffusion_jax.export import export_workdir
  from diffusion_jax.train_autoencoder import restore_autoencoder
  export_workdir(config, vq_run, str(tmp_path / "vqvae"))  # as diffusers' VQModel
  vq = diffusers.VQModel.from_pretrained(str(tmp_path / "vqvae")).eval()
  trainer, _, params = restore_autoencoder(config, vq_run)
  h = np.random.default_rng(0).normal(size=(2, 8, 8, 4)).astype(np.float32)
  with torch.no_grad():  # both quantise h to the codebook, then decode
    want = vq.decode(torch.from_numpy(h.transpose(0, 3, 1, 2))).sample.numpy()
  got = trainer.model.apply({"params": params}, jnp.asarray(h), method=trainer.model.decode)
  np.testing.assert_allclose(np.asarray(got), want.transpose(0, 2, 3, 1), atol=1e-4)

  config.stage, config.latent.autoencoder = "diffusion", vq_run
  small_graph(config)
  config.sampling.clip_denoised = False
  config.training.num_steps, config.training.sample_every = 2, 2
  config.eval.metrics = "fid"
  ldm = str(tmp_path / "ldm")
  train_and_evaluate(config, ldm)
  images = np.load(os.path.join(run_sample_mode(config, ldm), "samples.npz"))["arr_0"]
  assert images.shape == (10, 16, 16, 1) and len(np.unique(images)) > 10
  export_workdir(config, ldm, str(tmp_path / "pipeline"))  # LDM's layout: LDMPipeline
  pipe = diffusers.LDMPipeline.from_pretrained(str(tmp_path / "pipeline"))
  images = pipe(batch_size=1, num_inference_steps=2, output_type="np").images
  assert images.shape == (1, 16, 16, 1) and np.isfinite(images).all()
  from diffusion_jax import checkpoints, latent
  from diffusion_jax.train import Trainer
  meta = checkpoints.restore_trained(ldm, Trainer(config).abstract_state)[2]
  assert pipe.vqvae.config.scaling_factor == pytest.approx(meta[latent.SCALE_KEY])  # 1/std(h)
