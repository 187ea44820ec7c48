"""Exporting a workdir as a diffusers pipeline (diffusion_jax/export.py): a U-Net trained here,
loaded by diffusers' own DDPMPipeline, gives our outputs; its scheduler is ours; importing the
export gives back the same parameters; what diffusers cannot hold is refused."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusion_jax import diffusion as dm  # noqa: E402
from diffusion_jax.convert_diffusers import ConversionError  # noqa: E402
from diffusion_jax.export import export_workdir  # noqa: E402

pytestmark = pytest.mark.parity


def test_trained_unet_exports_to_diffusers_ddpm_pipeline(tmp_path):
  from helpers import tiny_config
  from diffusion_jax.convert import import_diffusers_unet
  from diffusion_jax.sample import restore_ema_params
  from diffusion_jax.train import train_and_evaluate
  config = tiny_config(tmp_path, num_steps=2, checkpoint_every=2)  # 16x16x1, attention at 8
  config.diffusion.var_type, config.diffusion.loss_type = "learned_range", "hybrid"
  config.diffusion.beta_schedule = "cosine"
  config.model.num_heads = 2
  config.training.ema_decay = 0.5  # EMA != raw parameters after 2 steps
  config.training.sample_every = 100
  workdir, out = str(tmp_path / "run"), str(tmp_path / "exported")
  train_and_evaluate(config, workdir)
  trainer, step, params = restore_ema_params(config, workdir)
  export_workdir(config, workdir, out)
  with pytest.raises(ConversionError, match="not empty"):
    export_workdir(config, workdir, out)

  pipe = diffusers.DDPMPipeline.from_pretrained(out)
  unet, sched = pipe.unet.eval(), pipe.scheduler
  assert unet.config.attention_head_dim == 32 and unet.config.out_channels == 2
  from safetensors.numpy import load_file
  assert set(unet.state_dict()) == set(load_file(f"{out}/unet/diffusion_pytorch_model.safetensors"))
  x = np.random.default_rng(0).normal(size=(3, 1, 16, 16)).astype(np.float32)
  t = np.array([0, 40, 99])
  with torch.no_grad():
    want = unet(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy().transpose(0, 2, 3, 1)
  got = np.asarray(trainer.model.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)),
                                       jnp.asarray(t)))
  diff = np.abs(got - want).max()
  print(f"exported U-Net in diffusers vs ours: max |diff| {diff:.3g} (scale "
        f"{np.abs(want).max():.3g})")
  assert diff < 1e-4
  d = dm.from_config(config.diffusion)
  np.testing.assert_allclose(sched.betas.numpy(), d.betas, rtol=1e-6)
  assert (sched.config.variance_type, sched.config.prediction_type, sched.config.clip_sample) == (
      "learned_range", "epsilon", True)
  # and back: the export imports as the same parameters (the heads as the import names them)
  config.model.num_heads, config.model.head_channels = 1, 32
  import_diffusers_unet(out, config, str(tmp_path / "reimported"))
  _, _, back = restore_ema_params(config, str(tmp_path / "reimported"))
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, back),
               jax.tree.map(np.asarray, params))
  # the raw parameters differ from the EMA ones
  export_workdir(config, workdir, str(tmp_path / "raw"), ema=False)
  raw = diffusers.UNet2DModel.from_pretrained(str(tmp_path / "raw" / "unet"))
  assert not torch.equal(raw.conv_out.weight, unet.conv_out.weight)
  assert json.loads((tmp_path / "raw" / "model_index.json").read_text())["_class_name"] == (
      "DDPMPipeline")


def test_class_conditional_unet_exports_its_label_table_and_imports_back(tmp_path):
  """A class-conditional U-Net: UNet2DModel's class_embedding is our label table (both add the
  label's row to the time embedding), the null label last; no DDPMPipeline (it passes no
  labels). Importing it gives back the same parameters, num_classes from num_class_embeds."""
  from helpers import small_graph, tiny_config
  from diffusion_jax.sample import restore_ema_params
  from diffusion_jax.train import train_and_evaluate
  config = small_graph(tiny_config(tmp_path, num_steps=1, checkpoint_every=1))
  config.model.num_classes, config.model.label_dropout = 10, 0.1
  config.training.sample_every = 100
  workdir, out = str(tmp_path / "run"), str(tmp_path / "exported")
  train_and_evaluate(config, workdir)
  trainer, _, params = restore_ema_params(config, workdir)
  rng = np.random.default_rng(1)  # every weight far from its (zero) initialisation
  params = jax.tree.map(lambda p: jnp.asarray(
      np.asarray(p) + 0.1 * rng.standard_normal(p.shape).astype(np.float32)), params)
  from diffusion_jax import checkpoints
  ckpt = checkpoints.Checkpointer(str(tmp_path / "edited" / "checkpoints"))
  state = trainer.init().replace(ema_params=params)
  ckpt.save(0, state, {"config": config.to_json_best_effort()}, force=True)
  ckpt.wait()
  ckpt.close()
  export_workdir(config, str(tmp_path / "edited"), out)
  assert not (tmp_path / "exported" / "model_index.json").exists()
  unet = diffusers.UNet2DModel.from_pretrained(out + "/unet").eval()
  assert unet.config.num_class_embeds == 11
  x = rng.normal(size=(3, 1, 16, 16)).astype(np.float32)
  t, y = np.array([3, 50, 99]), np.array([0, 7, 10])  # 10: the null label
  with torch.no_grad():
    want = unet(torch.from_numpy(x), torch.from_numpy(t),
                class_labels=torch.from_numpy(y)).sample.numpy().transpose(0, 2, 3, 1)
  got = np.asarray(trainer.model.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)),
                                       jnp.asarray(t), jnp.asarray(y)))
  diff = np.abs(got - want).max()
  print(f"exported class-conditional U-Net: max |ours - diffusers| {diff:.3g} (scale "
        f"{np.abs(want).max():.3g})")
  assert diff < 1e-4 and np.abs(want).max() > 0.01

  from diffusion_jax.convert import import_diffusers_unet
  config.model.num_heads, config.model.head_channels = 1, 0  # one head, as the import names it
  config.model.num_classes = 0
  with pytest.raises(ConversionError, match="--config.model.num_classes=10"):
    import_diffusers_unet(out, config, str(tmp_path / "refused"))
  config.model.num_classes = 10
  import_diffusers_unet(out, config, str(tmp_path / "reimported"))
  _, _, back = restore_ema_params(config, str(tmp_path / "reimported"))
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, back),
               jax.tree.map(np.asarray, params))
  # a table whose rows disagree with num_class_embeds is refused
  from diffusion_jax.convert_diffusers import load_diffusers_unet
  cfg = json.loads((tmp_path / "exported" / "unet" / "config.json").read_text())
  (tmp_path / "exported" / "unet" / "config.json").write_text(
      json.dumps(dict(cfg, num_class_embeds=12)))
  with pytest.raises(ConversionError, match="11 rows, the config.json's num_class_embeds says 12"):
    load_diffusers_unet(out)


def test_what_diffusers_cannot_hold_is_refused(tmp_path):
  from helpers import tiny_config
  config = tiny_config(tmp_path)
  config.model.num_classes, config.model.context_dim = 10, 32  # LDM's class context
  with pytest.raises(ConversionError, match="num_classes=10: class labels as the cross-att"):
    export_workdir(config, str(tmp_path / "run"), str(tmp_path / "a"))
  config.model.num_classes, config.text.encoder = 0, "learned"  # LDM's own text transformer
  with pytest.raises(ConversionError, match="text.encoder='learned'.*StableDiffusionPipeline"):
    export_workdir(config, str(tmp_path / "run"), str(tmp_path / "a"))
  config.text.encoder = None
  config.model.num_classes, config.model.context_dim, config.model.num_heads = 0, 0, 3
  config.model.attn_resolutions = (16, 8)  # 32 and 64 channels: heads of 10 and 21
  with pytest.raises(ConversionError, match="one head size"):
    export_workdir(config, str(tmp_path / "run"), str(tmp_path / "b"))
  config.model.num_heads, config.diffusion.mean_type = 1, "mean"
  with pytest.raises(ConversionError, match="mean_type='mean'"):
    export_workdir(config, str(tmp_path / "run"), str(tmp_path / "c"))
  config.model.name, config.model.num_classes, config.model.freq_shift = "dit", 10, 0.0
  with pytest.raises(ConversionError, match="model.freq_shift 1; this DiT is not"):
    export_workdir(config, str(tmp_path / "run"), str(tmp_path / "d"))
  from diffusion_jax.export import _finite  # a diverged checkpoint is not written
  with pytest.raises(ConversionError, match=r"step 7 has non-finite parameters \(1 arrays, "
                     r"e.g. \['b'\]\['kernel'\]\): export an earlier checkpoint with --step"):
    _finite({"a": {"bias": np.zeros(2)}, "b": {"kernel": np.array([1.0, np.nan])}}, 7)


def test_autoencoder_with_attention_levels_round_trips(tmp_path):
  """diffusers' AutoencoderKL with attention in its down and up blocks (and no quant convs):
  imported by our loader, written back by the export, the same config and tensors."""
  from diffusion_jax.convert_autoencoder import load_autoencoder
  from diffusion_jax.export import _write_vae
  from diffusion_jax.models.autoencoder import AutoencoderKL
  from test_parity import randomise
  ref = randomise(diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, block_out_channels=(32, 64, 64), layers_per_block=1,
      down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D", "DownEncoderBlock2D"),
      up_block_types=("UpDecoderBlock2D", "AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
      latent_channels=4, norm_num_groups=32, scaling_factor=0.3, use_quant_conv=False,
      use_post_quant_conv=False), 4)
  ref.save_pretrained(str(tmp_path / "ref"))
  fields, params, scaling = load_autoencoder(str(tmp_path / "ref"))
  assert fields["attn_levels"] == (1,) and not fields["use_quant_conv"]
  _write_vae(str(tmp_path / "out"), AutoencoderKL(**fields), params, 32,
             scaling["scale_factor"])
  again = diffusers.AutoencoderKL.from_pretrained(str(tmp_path / "out"))
  for key in ("down_block_types", "up_block_types", "block_out_channels", "scaling_factor",
              "use_quant_conv", "use_post_quant_conv"):
    norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v
    assert norm(again.config[key]) == norm(ref.config[key]), key
  theirs = again.state_dict()
  assert sorted(theirs) == sorted(ref.state_dict())
  for key, value in ref.state_dict().items():
    np.testing.assert_array_equal(theirs[key].numpy(), value.detach().numpy(), err_msg=key)


def test_sd2_layout_unet_exports_as_it_was_imported(tmp_path):
  """Stable Diffusion 2.x's U-Net layout (linear proj_in/proj_out, one width per head, two
  transformer blocks per level, v-prediction): imported, then written back by the export's own
  functions: the same config and the same tensors, bit for bit."""
  from helpers import tiny_config
  from diffusion_jax.convert_diffusers import load_diffusers_unet
  from diffusion_jax.export import unet_config
  from diffusion_jax.export_text import conditional_unet_state_dict
  from test_parity import randomise
  ref = randomise(diffusers.UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
      layers_per_block=1, cross_attention_dim=24, attention_head_dim=[2, 4],
      use_linear_projection=True, transformer_layers_per_block=2, upcast_attention=True,
      down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")), 3)
  ref.save_pretrained(str(tmp_path / "sd2" / "unet"))
  fields, params = load_diffusers_unet(str(tmp_path / "sd2"))
  config = tiny_config(tmp_path)
  config.text.encoder = str(tmp_path / "sd2")  # its unet/config.json: the projections' form
  config.latent.autoencoder = "vae"  # latents of 8x8x4 (a f2 first stage)
  config.autoencoder.ch_mult, config.autoencoder.z_channels = (1, 2), 4
  config.diffusion.mean_type = "v"
  for key, value in fields.items():
    if key in config.model:
      config.model[key] = value
  cfg = unet_config(config)
  for key in ("attention_head_dim", "use_linear_projection", "upcast_attention",
              "transformer_layers_per_block", "cross_attention_dim", "down_block_types",
              "up_block_types", "block_out_channels", "sample_size", "in_channels"):
    norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v
    assert norm(cfg[key]) == norm(ref.config[key]), (key, cfg[key], ref.config[key])
  state = conditional_unet_state_dict(params, 2, cfg["use_linear_projection"])
  want = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  assert sorted(state) == sorted(want)
  for key, value in want.items():
    np.testing.assert_array_equal(state[key], value, err_msg=key)
