"""DiT (models/dit.py): against diffusers' DiTTransformer2DModel and DiTPipeline (random weights),
its conversion both ways, and trained, sampled and imported through main.py's workdirs."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusion_jax.convert_diffusers import ConversionError  # noqa: E402
from diffusion_jax.convert_dit import (dit_fields, dit_params_from_diffusers,  # noqa: E402
                                       dit_state_dict, load_diffusers_dit)
from diffusion_jax.models.dit import DiT, sincos_2d  # noqa: E402
from test_parity import randomise  # noqa: E402

pytestmark = pytest.mark.parity
MINI = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
            num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)


def reference_dit(**overrides):
  """A DiTTransformer2DModel miniature, random weights; every block's timestep-and-label
  embedder equal to block 0's, as in the paper's converted checkpoints."""
  ref = randomise(diffusers.DiTTransformer2DModel(**dict(MINI, **overrides)), 1).eval()
  first = ref.transformer_blocks[0].norm1.emb.state_dict()
  for block in ref.transformer_blocks[1:]:
    block.norm1.emb.load_state_dict(first)
  return ref


def test_dit_matches_diffusers_and_converts_both_ways(tmp_path):
  ref = reference_dit()
  ref.save_pretrained(str(tmp_path / "transformer"))
  fields, params = load_diffusers_dit(str(tmp_path))  # a pipeline directory's transformer/
  assert fields == dict(patch_size=2, hidden_size=32, depth=2, num_heads=2, mlp_ratio=4.0,
                        in_channels=4, learned_variance=True, num_classes=10, norm_eps=1e-5,
                        freq_shift=1.0, image_size=8)
  model = DiT(**dit_fields(fields))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 4, 8, 8)).astype(np.float32)
  t = np.array([0, 17, 500, 999])
  y = np.array([3, 10, 0, 9])  # 10: the null label
  with torch.no_grad():
    want = ref(torch.from_numpy(x), timestep=torch.from_numpy(t),
               class_labels=torch.from_numpy(y)).sample.numpy().transpose(0, 2, 3, 1)
  got = np.asarray(model.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)),
                               jnp.asarray(t), jnp.asarray(y)))
  diff = np.abs(got - want).max()
  print(f"DiT vs DiTTransformer2DModel: max |diff| = {diff:.3g} (outputs' scale "
        f"{np.abs(want).max():.3g})")
  assert got.shape == (4, 8, 8, 8) and diff < 2e-5
  # rematerialised blocks: the same values and gradients
  loss = lambda m: jax.value_and_grad(lambda p: jnp.sum(m.apply(
      {"params": p}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(y)) ** 2))
  (v1, g1), (v2, g2) = loss(model)(params), loss(DiT(**dit_fields(fields), remat=True))(params)
  np.testing.assert_allclose(v1, v2, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g2)
  # the fixed positions are diffusers' (a buffer, not in the weights)
  np.testing.assert_allclose(sincos_2d(32, 4), ref.pos_embed.pos_embed[0].numpy(), atol=1e-6)
  # our parameters back to diffusers' names and shapes, and a model of ours read by diffusers
  state = {k: v.numpy() for k, v in ref.state_dict().items()}
  back = dit_state_dict(params, fields)
  assert sorted(back) == sorted(state)
  for key in state:
    np.testing.assert_array_equal(back[key], state[key], err_msg=key)
  ours = DiT(**dit_fields(fields)).init(jax.random.PRNGKey(1), jnp.zeros((1, 8, 8, 4)),
                                        jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32))
  jax.tree.map(np.testing.assert_array_equal, dit_params_from_diffusers(
      dit_state_dict(ours["params"], fields), fields), jax.tree.map(np.asarray, ours["params"]))


def test_dit_initialisation_and_refusals(tmp_path):
  model = DiT(patch_size=2, hidden_size=32, depth=2, num_heads=2, in_channels=4,
              num_classes=10)
  x, t, y = jnp.ones((2, 8, 8, 4)), jnp.array([5, 900]), jnp.array([1, 2])
  params = model.init(jax.random.PRNGKey(0), x, t, y)["params"]
  # adaLN-Zero: the blocks and the output layer start at zero, so the network outputs zeros
  assert not np.any(np.asarray(model.apply({"params": params}, x, t, y)))
  assert np.asarray(params["y_embed"]["embedding"]).shape == (11, 32)
  with pytest.raises(ValueError, match="multiple of patch_size=2"):
    model.apply({"params": params}, jnp.ones((2, 7, 7, 4)), t, y)
  with pytest.raises(ValueError, match="takes no context"):
    model.apply({"params": params}, x, t, y, context=jnp.ones((2, 3, 8)))
  # blocks whose embedders differ are not a DiT's
  ref = randomise(diffusers.DiTTransformer2DModel(**MINI), 1)
  state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  fields = load_fields(ref, tmp_path)
  with pytest.raises(ConversionError, match="differs from block 0's"):
    dit_params_from_diffusers(state, fields)
  state = {k: v.numpy() for k, v in reference_dit().state_dict().items()}
  with pytest.raises(ConversionError, match="does not have"):
    dit_params_from_diffusers(dict(state, **{"extra.weight": np.zeros(1)}), fields)
  with pytest.raises(ConversionError, match="depth 3"):
    dit_params_from_diffusers(state, dict(fields, depth=3))
  cfg = json.loads((tmp_path / "transformer" / "config.json").read_text())
  (tmp_path / "transformer" / "config.json").write_text(json.dumps(dict(cfg, norm_type="layer_norm")))
  with pytest.raises(ConversionError, match="norm_type='layer_norm' is not supported"):
    load_diffusers_dit(str(tmp_path))


def load_fields(ref, tmp_path):
  ref.save_pretrained(str(tmp_path / "transformer"))
  from diffusion_jax.convert_dit import dit_fields_from_diffusers
  return dit_fields_from_diffusers(json.loads((tmp_path / "transformer" / "config.json")
                                              .read_text()))


def dit_pipeline(directory, scaling_factor=0.5):
  """A DiTPipeline miniature (facebook/DiT-XL-2-256's parts): the DiT above on 8x8x4 latents of
  a KL autoencoder for 16x16x1 images, DDIM as diffusers' DiT conversion writes it."""
  vae = randomise(diffusers.AutoencoderKL(
      in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=1,
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
      latent_channels=4, norm_num_groups=32, scaling_factor=scaling_factor), 2).eval()
  sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                  clip_sample=False)
  # 1,000 classes: the pipeline's null label is 1000, whatever the model's count
  pipe = diffusers.DiTPipeline(transformer=reference_dit(num_embeds_ada_norm=1000), vae=vae,
                               scheduler=sched)
  pipe.save_pretrained(str(directory), safe_serialization=True)
  return pipe


def dit_config(tmp_path, **kw):
  """The tiny Fashion-MNIST config with the miniature DiT as its network."""
  from helpers import tiny_config, tiny_dit
  config = tiny_dit(tiny_config(tmp_path, **kw))
  config.model.num_classes = 10
  d = config.diffusion
  d.num_timesteps, d.var_type, d.loss_type = 1000, "learned_range", "hybrid"
  config.sampling.clip_denoised = False
  return config


def test_dit_pipeline_imports_and_samples_like_diffusers(tmp_path):
  """A diffusers DiT pipeline imported by our command into a latent DiT config: its guided DDIM
  chain, decoded through the VAE, equals diffusers' DiTPipeline's images."""
  from diffusers.utils.torch_utils import randn_tensor
  from diffusion_jax import samplers
  from diffusion_jax.convert import import_diffusers_unet
  from diffusion_jax.models import denoiser
  from diffusion_jax.sample import restore_ema_params
  from diffusion_jax.train import Trainer
  pipe = dit_pipeline(tmp_path / "dit-mini")
  src = str(tmp_path / "dit-mini")
  config = dit_config(tmp_path)  # 16x16x1 images -> 8x8x4 latents
  config.model.num_classes = 1000
  a = config.autoencoder
  a.ch, a.ch_mult, a.num_res_blocks, a.z_channels = 32, (1, 2), 1, 4
  with pytest.raises(ConversionError, match="--config.latent.autoencoder=.*vae"):
    import_diffusers_unet(src, config, str(tmp_path / "refused"))
  config.latent.autoencoder = src + "/vae"
  m = config.model
  m.hidden_size, m.norm_eps = 64, 1e-6
  config.diffusion.beta_end = 0.01
  with pytest.raises(ConversionError, match=r"--config.model.hidden_size=32 "
                     r"--config.model.norm_eps=1e-05 --config.diffusion.beta_end=0.02"):
    import_diffusers_unet(src, config, str(tmp_path / "refused"))
  m.hidden_size, m.norm_eps, config.diffusion.beta_end = 32, 1e-5, 0.02
  workdir = str(tmp_path / "imported")
  import_diffusers_unet(src, config, workdir)
  _, step, params = restore_ema_params(config, workdir)
  tr = Trainer(config)
  assert step == 0 and tr.first_stage.scaling() == (0.5, 0.0)

  labels = [1, 777]
  want = pipe(class_labels=labels, guidance_scale=4.0, generator=torch.Generator().manual_seed(0),
              num_inference_steps=4, output_type="np").images
  x_T = randn_tensor((2, 4, 8, 8), generator=torch.Generator().manual_seed(0)).numpy()
  z = samplers.ddim_sample(
      tr.diffusion, denoiser(tr.model, params, jnp.asarray(labels), guidance_scale=4.0),
      jnp.asarray(x_T.transpose(0, 2, 3, 1)), jax.random.PRNGKey(0), 4, clip_denoised=False)
  fs = tr.first_stage
  images = (np.asarray(fs.decode_latents(fs.params, 0.5, 0.0, z)) + 1) / 2
  diff = np.abs(images - want).max()
  print(f"DiT pipeline (guidance 4, 4 DDIM steps): max |ours - diffusers| = {diff:.3g}")
  assert diff < 1e-4
  # exported back (diffusion_jax/export.py): the same tensors, the VAE and its scale
  from diffusion_jax.export import export_workdir
  export_workdir(config, workdir, str(tmp_path / "exported"))
  again = diffusers.DiTPipeline.from_pretrained(str(tmp_path / "exported"))
  for module in ("transformer", "vae"):  # the VAE written from our parameters
    theirs = getattr(again, module).state_dict()
    for key, value in getattr(pipe, module).state_dict().items():
      np.testing.assert_array_equal(theirs[key].numpy(), value.numpy(), err_msg=key)
  assert again.vae.config.scaling_factor == 0.5 and isinstance(again.scheduler,
                                                               diffusers.DDIMScheduler)
  again_images = again(class_labels=labels, guidance_scale=4.0, num_inference_steps=4,
                       generator=torch.Generator().manual_seed(0), output_type="np").images
  np.testing.assert_allclose(again_images, want, atol=1e-6)


def test_dit_trains_and_samples_through_main(tmp_path):
  """DiT as config.model.name: the hybrid loss (learned variance) falls on Fashion-MNIST-like
  images in pixel space, labels dropped for guidance; guided sampling writes the classes."""
  import os
  from helpers import read_metrics
  from diffusion_jax.sample import run_sample_mode
  from diffusion_jax.train import train_and_evaluate
  from diffusion_jax.validate import ConfigError, validate_config
  config = dit_config(tmp_path, num_steps=40, checkpoint_every=40)
  config.data.image_size = 8  # 16 tokens of 2x2 pixels
  config.model.label_dropout = 0.2
  config.model.depth = 1
  config.training.lr, config.training.warmup_steps, config.training.ema_decay = 3e-3, 1, 0.0
  config.sampling.guidance_scale, config.sampling.clip_denoised = 2.0, True
  config.sampling.figures = False
  validate_config(config)
  workdir = str(tmp_path / "run")
  train_and_evaluate(config, workdir)
  losses = read_metrics(workdir)
  first, last = np.mean([losses[s] for s in range(1, 6)]), np.mean(
      [losses[s] for s in range(36, 41)])
  print(f"DiT hybrid loss: steps 1-5 {first:.3f}, steps 36-40 {last:.3f}")
  assert last < 0.5 * first
  out = run_sample_mode(config, workdir)
  samples = np.load(os.path.join(out, "samples.npz"))
  assert samples["arr_0"].shape == (10, 8, 8, 1)
  np.testing.assert_array_equal(samples["arr_1"], np.arange(10))
  config.model.patch_size = 3
  with pytest.raises(ConfigError, match="model.patch_size=3.*divisor of the 8x8"):
    validate_config(config)
  config.model.patch_size, config.model.context_dim = 2, 16
  with pytest.raises(ConfigError, match="DiT is conditioned on class labels"):
    validate_config(config)


def test_the_papers_checkpoint_imports_as_the_papers_model(tmp_path):
  """facebookresearch/DiT's own naming (the released DiT-XL-2-*.pt, re-saved as safetensors) in
  miniature, written from a diffusers DiT by diffusers' DiT conversion mapping run backwards:
  imported by our command (the paper's constants named as overrides), it gives the outputs of
  that diffusers model set to the paper's constants (frequency shift 0, MLP LayerNorm eps 1e-6)."""
  from safetensors.numpy import save_file
  from diffusion_jax.convert import import_diffusers_unet
  from diffusion_jax.sample import restore_ema_params
  from diffusion_jax.train import Trainer
  pipe = dit_pipeline(tmp_path / "dit-mini")  # for its VAE; its transformer is the reference
  ref = pipe.transformer
  sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  emb = "transformer_blocks.0.norm1.emb."
  renames = {"x_embedder.proj": "pos_embed.proj", "final_layer.linear": "proj_out_2",
             "final_layer.adaLN_modulation.1": "proj_out_1",
             "t_embedder.mlp.0": emb + "timestep_embedder.linear_1",
             "t_embedder.mlp.2": emb + "timestep_embedder.linear_2"}
  for i in range(2):
    b = f"transformer_blocks.{i}."
    renames.update({f"blocks.{i}.adaLN_modulation.1": b + "norm1.linear",
                    f"blocks.{i}.attn.proj": b + "attn1.to_out.0",
                    f"blocks.{i}.mlp.fc1": b + "ff.net.0.proj",
                    f"blocks.{i}.mlp.fc2": b + "ff.net.2"})
    for leaf in ("weight", "bias"):
      sd[f"blocks.{i}.attn.qkv.{leaf}"] = np.concatenate([sd[f"{b}attn1.to_{x}.{leaf}"]
                                                          for x in "qkv"])
  paper = {f"{ours}.{leaf}": sd[f"{theirs}.{leaf}"] for ours, theirs in renames.items()
           for leaf in ("weight", "bias")}
  paper.update({k: v for k, v in sd.items() if k.startswith("blocks.")})
  paper["y_embedder.embedding_table.weight"] = sd[emb + "class_embedder.embedding_table.weight"]
  paper["pos_embed"] = ref.pos_embed.pos_embed.numpy()  # MAE's fixed table, [1, 16, 32]
  src = str(tmp_path / "DiT-mini.safetensors")
  save_file(paper, src)
  for block in ref.transformer_blocks:  # diffusers' DiT set to the paper's constants
    block.norm1.emb.time_proj.downscale_freq_shift = 0
    block.norm3.eps = 1e-6

  config = dit_config(tmp_path)
  config.model.num_classes, config.model.hidden_size = 1000, 32
  a = config.autoencoder  # the miniature VAE's layout: 16x16x1 images -> 8x8x4 latents
  a.ch, a.ch_mult, a.num_res_blocks, a.z_channels = 32, (1, 2), 1, 4
  with pytest.raises(ConversionError, match="--config.latent.autoencoder="):
    import_diffusers_unet(src, config, str(tmp_path / "refused"))
  config.latent.autoencoder = str(tmp_path / "dit-mini" / "vae")
  with pytest.raises(ConversionError, match=r"--config.model.norm_eps=1e-06 "
                     r"--config.model.freq_shift=0.0"):
    import_diffusers_unet(src, config, str(tmp_path / "refused"))
  config.model.norm_eps, config.model.freq_shift = 1e-6, 0.0
  import_diffusers_unet(src, config, str(tmp_path / "paper"))
  _, _, params = restore_ema_params(config, str(tmp_path / "paper"))
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, 4, 8, 8)).astype(np.float32)
  t, y = np.array([1, 400, 999]), np.array([7, 1000, 999])
  with torch.no_grad():
    want = ref(torch.from_numpy(x), timestep=torch.from_numpy(t),
               class_labels=torch.from_numpy(y)).sample.numpy().transpose(0, 2, 3, 1)
  got = np.asarray(Trainer(config).model.apply({"params": params}, x.transpose(0, 2, 3, 1), t, y))
  diff = np.abs(got - want).max()
  print(f"the paper's DiT naming: max |ours - reference| {diff:.3g} "
        f"(scale {np.abs(want).max():.3g})")
  assert diff < 2e-5
  from diffusion_jax.convert_dit import dit_from_original
  with pytest.raises(ConversionError, match="pos_embed is not the fixed 2-D sin-cos"):
    dit_from_original(dict(paper, pos_embed=paper["pos_embed"] * 2), 2)
  with pytest.raises(ConversionError, match="1 tensors that a DiT of the paper's code does not"):
    dit_from_original(dict(paper, extra=paper["pos_embed"]), 2)
  with pytest.raises(ConversionError, match="num_heads=3 does not divide the width 32"):
    dit_from_original(paper, 3)
