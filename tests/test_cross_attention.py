"""Cross-attention conditioning (LDM's SpatialTransformer): parity with diffusers'
UNet2DConditionModel (Stable Diffusion 1.x and 2.x layouts) on random weights, loading such a
directory, guidance with a context, and class labels through cross-attention in training."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import denoiser
from diffusion_jax.models.transformer import SpatialTransformer
from diffusion_jax.models.unet import UNet
from helpers import tiny_config

SD1 = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64),
           layers_per_block=2, cross_attention_dim=24, attention_head_dim=4,  # 4 heads (legacy)
           down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
# 2.x: heads of one width (attention_head_dim per level), linear proj_in/out; two blocks deep
SD2 = dict(SD1, attention_head_dim=(2, 4, 4), use_linear_projection=True,
           transformer_layers_per_block=2, layers_per_block=1)


def perturbed(params, scale=0.05, seed=2):
  """params + scale N(0, 1), drawn in numpy (jax.random would compile a program per shape:
  16 s of a cold run)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(
      np.asarray(p) + scale * rng.standard_normal(p.shape).astype(np.float32)), params)


@pytest.mark.parity
@pytest.mark.parametrize("layout,freeu", [("sd1", ()), ("sd2", ()), ("sd1", (0.9, 0.2, 1.2, 1.4))],
                         ids=["sd1", "sd2", "sd1_freeu"])
def test_unet_matches_diffusers_unet2d_condition_model(layout, freeu, tmp_path):
  """freeu: diffusers' unet.enable_freeu(s1, s2, b1, b2) (models/freeu.py), at a power-of-two
  size and at another (whose FFT diffusers runs in float32)."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  from diffusion_jax.convert_diffusers import load_diffusers_unet, unet_fields
  from test_parity import randomise
  ref = randomise(diffusers.UNet2DConditionModel(**{"sd1": SD1, "sd2": SD2}[layout])).eval()
  ref.save_pretrained(str(tmp_path / "unet"), safe_serialization=True)
  fields, params = load_diffusers_unet(str(tmp_path))  # a pipeline directory: its unet/
  assert fields["attn_levels"] == (0, 1) and fields["context_dim"] == 24
  assert (fields["num_heads"], fields["head_channels"]) == ((4, 0) if layout == "sd1" else (1, 16))
  ours = UNet(**unet_fields(fields), freeu=freeu)
  if freeu:
    ref.enable_freeu(*freeu)
  rng = np.random.default_rng(0)
  for size in (16, 24):  # attention stays at its levels at another input size
    x = rng.normal(size=(2, 4, size, size)).astype(np.float32)
    ctx = rng.normal(size=(2, 7, 24)).astype(np.float32)
    t = np.array([999, 20])
    with torch.no_grad():
      want = ref(torch.from_numpy(x), torch.from_numpy(t),
                 encoder_hidden_states=torch.from_numpy(ctx)).sample.numpy()
    got = ours.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t),
                     context=jnp.asarray(ctx))
    diff = np.abs(np.asarray(got).transpose(0, 3, 1, 2) - want).max()
    print(f"{layout} {size}x{size} freeu={freeu}: max |ours - diffusers| = {diff:.3g} "
          f"(output scale {np.abs(want).max():.3g})")
    assert diff < 1e-4
    if freeu:  # FreeU changes the output
      plain = ours.clone(freeu=()).apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)),
                                         jnp.asarray(t), context=jnp.asarray(ctx))
      moved = np.abs(np.asarray(plain) - np.asarray(got)).max()
      print(f"  FreeU moves the output by {moved:.3g}")
      assert moved > 0.05


@pytest.mark.parity
def test_a_cross_attention_unet_import_needs_the_text_encoder(tmp_path):
  pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  from diffusion_jax.convert import import_diffusers_unet
  from diffusion_jax.convert_diffusers import ConversionError, model_config_from_diffusers
  diffusers.UNet2DConditionModel(**SD1).save_pretrained(str(tmp_path / "sd"))
  with pytest.raises(ConversionError, match="text encoder's output.*--config.text.encoder="):
    import_diffusers_unet(str(tmp_path / "sd"), tiny_config(tmp_path), str(tmp_path / "w"))
  bad = dict(SD1, _class_name="UNet2DConditionModel", class_embed_type="timestep")
  with pytest.raises(ConversionError, match="class_embed_type"):
    model_config_from_diffusers(bad)
  with pytest.raises(ConversionError, match="neither one number nor one width"):
    model_config_from_diffusers(dict(SD1, _class_name="UNet2DConditionModel",
                                     attention_head_dim=(2, 2, 4)))


def test_spatial_transformer_starts_as_the_identity_and_attends_to_the_context():
  block = SpatialTransformer(heads=2, depth=2)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 32))
  ctx = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 8))
  params = block.init(jax.random.PRNGKey(2), x, ctx)["params"]
  np.testing.assert_array_equal(block.apply({"params": params}, x, ctx), x)  # proj_out = 0
  params = perturbed(params)
  out = block.apply({"params": params}, x, ctx)
  other = block.apply({"params": params}, x, ctx.at[1].set(0.0))
  np.testing.assert_allclose(other[0], out[0], atol=1e-6)  # each image its own context
  assert float(jnp.abs(other[1] - out[1]).max()) > 1e-3
  with pytest.raises(ValueError, match=r"context must be \[B=2, L, d\]"):
    block.apply({"params": params}, x, ctx[:1])


def test_unet_context_errors_say_what_to_pass():
  x, t = jnp.zeros((2, 8, 8, 4)), jnp.array([1, 2])
  text = UNet(ch=32, ch_mult=(1,), num_res_blocks=1, in_channels=4, context_dim=16,
              attn_levels=(0,), dropout=0.0)
  with pytest.raises(ValueError, match=r"cross-attends to a context \[B=2, L, 16\]; got None"):
    text.init(jax.random.PRNGKey(0), x, t)
  with pytest.raises(ValueError, match="without cross-attention"):
    UNet(ch=32, ch_mult=(1,), in_channels=4).init(jax.random.PRNGKey(0), x, t,
                                                   context=jnp.zeros((2, 1, 16)))
  labels = text.clone(num_classes=3)
  with pytest.raises(ValueError, match="its class labels.*pass y"):
    labels.init(jax.random.PRNGKey(0), x, t, context=jnp.zeros((2, 1, 16)))
  with pytest.raises(ValueError, match="do not split into 3 attention heads"):
    text.clone(num_heads=3).init(jax.random.PRNGKey(0), x, t, context=jnp.zeros((2, 1, 16)))


def test_guidance_with_a_context_is_uncond_plus_scale_times_the_difference():
  model = UNet(ch=32, ch_mult=(1,), num_res_blocks=1, in_channels=2, context_dim=8,
               attn_levels=(0,), num_heads=2, dropout=0.0)
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 2))
  t = jnp.array([3, 50, 7])
  ctx = jax.random.normal(jax.random.PRNGKey(1), (3, 5, 8))
  null = jnp.zeros((1, 5, 8))
  params = perturbed(model.init(jax.random.PRNGKey(1), x, t, context=ctx)["params"])
  cond = model.apply({"params": params}, x, t, context=ctx)
  uncond = model.apply({"params": params}, x, t, context=jnp.broadcast_to(null, ctx.shape))
  assert float(jnp.abs(cond - uncond).max()) > 1e-3
  got = denoiser(model, params, guidance_scale=3.0, context=ctx, null_context=null)(x, t)
  np.testing.assert_allclose(got, uncond + 3.0 * (cond - uncond), atol=2e-5)
  np.testing.assert_allclose(denoiser(model, params, context=ctx)(x, t), cond, atol=1e-6)
  with pytest.raises(ValueError, match="needs null_context"):
    denoiser(model, params, guidance_scale=2.0, context=ctx)


def test_class_labels_through_cross_attention_train_and_sample(tmp_path):
  """LDM's class-conditional layout (labels as a [B, 1, d] context) through main's pipeline:
  the label embedding trains, guided sampling writes the classes in turn."""
  from diffusion_jax.sample import restore_ema_params, run_sample_mode
  from diffusion_jax.train import Trainer, train_and_evaluate
  from diffusion_jax.validate import ConfigError, validate_config
  config = tiny_config(tmp_path, num_steps=6, checkpoint_every=6)
  m = config.model
  m.num_classes, m.label_dropout, m.context_dim, m.head_channels = 10, 0.2, 32, 16
  m.attn_resolutions, m.attn_levels = (), (1,)
  m.norm_eps, m.flip_sin_to_cos, m.freq_shift, m.downsample_padding = 1e-5, True, 0.0, "symmetric"
  config.sampling.guidance_scale = 2.0
  config.training.ema_decay = 0.0
  validate_config(config)
  init = Trainer(config).init().params
  assert "label_context" in init and "label_emb" not in init
  assert "attn_2" in init["mid_attn"]["block_0"] and "up_1_attn_0" in init
  workdir = str(tmp_path / "run")
  train_and_evaluate(config, workdir)
  _, step, params = restore_ema_params(config, workdir)
  assert step == 6
  assert float(jnp.abs(params["label_context"]["embedding"]
                       - init["label_context"]["embedding"]).max()) > 1e-4
  out = run_sample_mode(config, workdir)
  samples = np.load(os.path.join(out, "samples.npz"))
  assert samples["arr_0"].shape == (10, 16, 16, 1)
  np.testing.assert_array_equal(samples["arr_1"], np.arange(10))
  m.num_classes = 0
  with pytest.raises(ConfigError, match="context_dim.*num_classes > 0"):
    validate_config(config)
  m.num_classes, m.head_channels = 10, 24
  with pytest.raises(ConfigError, match="head_channels=24.*must divide"):
    validate_config(config)


def test_celebahq_ldm_config_describes_the_published_unet():
  """configs/celebahq256_ldm.py against the diffusers config.json of LDM's CelebA-HQ U-Net
  (CompVis' ffhq/celebahq-ldm-vq-4 layout in diffusers' names, as CompVis/ldm-celebahq-256
  has it): the import command would ask for no override."""
  from configs.celebahq256_ldm import get_config
  from diffusion_jax.convert import config_mismatches
  from diffusion_jax.convert_diffusers import model_config_from_diffusers
  published = {
      "_class_name": "UNet2DModel", "act_fn": "silu", "attention_head_dim": 32,
      "block_out_channels": [224, 448, 672, 896], "center_input_sample": False,
      "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D",
                           "AttnDownBlock2D"],
      "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 3,
      "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
      "norm_num_groups": 32, "out_channels": 3, "sample_size": 64,
      "time_embedding_type": "positional",
      "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}
  schedule = {"num_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.0015,
              "beta_end": 0.0195, "mean_type": "eps", "clip_sample": False, "steps_offset": 0,
              "alpha_one_at_end": True}
  config = get_config()
  assert config_mismatches(config, model_config_from_diffusers(published), schedule) == []
  config.model.attn_levels = (2, 3)
  assert config_mismatches(config, model_config_from_diffusers(published), schedule) == [
      "--config.model.attn_resolutions=() --config.model.attn_levels=(1,2,3)"]


def test_class_conditional_ldm_single_file_imports_into_a_workdir(tmp_path):
  """CompVis' class-conditional LDM file (cin256's naming, in miniature): the U-Net and its
  ClassEmbedder table become step 0 of a latent config's workdir, parameter for parameter; with
  ema=True the EMA copy LDM keeps beside the U-Net (sampling such a model: the class-label test
  above)."""
  from safetensors.numpy import save_file
  from diffusion_jax.convert import import_diffusers_unet
  from diffusion_jax.convert_diffusers import ConversionError
  from diffusion_jax.convert_ldm import class_conditional_unet, ldm_state_dict
  from diffusion_jax.models import build_model
  from diffusion_jax.sample import restore_ema_params
  from diffusion_jax.train import train_and_evaluate
  from helpers import ae_config
  first = ae_config(tmp_path, num_steps=1)
  train_and_evaluate(first, str(tmp_path / "ae"))
  config = ae_config(tmp_path, num_steps=1)
  config.stage, config.latent.autoencoder = "diffusion", str(tmp_path / "ae")
  config.latent.scale_factor = 1.0  # as LDM's VQ models (the imported U-Net records none)
  config.sampling.clip_denoised, config.sampling.guidance_scale = False, 2.0
  config.eval.metrics = "fid"
  m = config.model
  m.ch_mult, m.attn_resolutions, m.attn_levels, m.head_channels = (1, 2), (), (1,), 32
  m.context_dim, m.num_classes, m.label_dropout = 16, 10, 0.1
  m.norm_eps, m.flip_sin_to_cos, m.freq_shift, m.downsample_padding = 1e-5, True, 0.0, "symmetric"
  model = build_model(config)
  x, t, y = jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)
  raw = perturbed(model.init(jax.random.PRNGKey(0), x, t, y)["params"])
  ema = perturbed(raw, seed=5)
  fields = {"ch_mult": m.ch_mult, "num_res_blocks": m.num_res_blocks, "attn_levels": (1,)}
  state = ldm_state_dict(raw, fields)
  assert state["cond_stage_model.embedding.weight"].shape == (11, 16)
  for key, value in ldm_state_dict(ema, fields).items():
    if key.startswith("model.diffusion_model."):
      state["model_ema." + key[len("model."):].replace(".", "")] = value
  src = str(tmp_path / "cin-mini.safetensors")
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, src)
  config.model.num_classes = 9
  with pytest.raises(ConversionError, match="--config.model.num_classes=10"):
    import_diffusers_unet(src, config, str(tmp_path / "refused"))
  config.model.num_classes = 10
  same = lambda a, b: jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, a),
                                   jax.tree.map(np.asarray, b))
  same(class_conditional_unet(state, {"head_channels": 32})[1], raw)  # model.diffusion_model.*
  workdir = str(tmp_path / "imported")
  import_diffusers_unet(src, config, workdir, ema=True)
  _, step, params = restore_ema_params(config, workdir)
  assert step == 0
  same(params, dict(ema, label_context=raw["label_context"]))  # LDM's EMA: the U-Net only
