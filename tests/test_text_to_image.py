"""Stable Diffusion in JAX: a diffusers pipeline directory (random weights, Stable Diffusion's
layout in miniature) converted and run end to end gives diffusers' StableDiffusionPipeline
images; the CLIP text encoder against transformers' CLIPTextModel."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffusion_jax.convert_clip import load_text_encoder  # noqa: E402
from diffusion_jax.models.clip_text import CLIPTextEncoder  # noqa: E402
from diffusion_jax.stable_diffusion import StableDiffusion  # noqa: E402
from helpers import REPO, open_clip_state, write_tokenizer  # noqa: E402
from test_parity import randomise  # noqa: E402

pytestmark = pytest.mark.parity


def text_encoder(vocab, act="quick_gelu", seed=0):
  cfg = transformers.CLIPTextConfig(
      vocab_size=vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=77, hidden_act=act,
      bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
  return randomise(transformers.CLIPTextModel(cfg), seed).eval()


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def pipeline_dir(request, tmp_path_factory):
  """A Stable Diffusion pipeline directory in miniature: 16x16 images, 8x8x4 latents (SD 1.x's
  epsilon prediction, or 2.x's v)."""
  return build_pipeline_dir(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def epsilon_pipeline_dir(tmp_path_factory):
  return build_pipeline_dir("epsilon", tmp_path_factory)


# Stable Diffusion's U-Net layout in miniature (8x8x4 latents, 32-wide text)
SD_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
               layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def build_pipeline_dir(prediction, tmp_path_factory, in_channels=4, cross_gain=4.0,
                       pipeline_cls=None, **extra):
  """A miniature pipeline saved to a new directory: (directory, the diffusers pipeline).
  in_channels 9: an inpainting U-Net; cross_gain: cross-attention weights scaled up so that
  the prompt shows in the latents; pipeline_cls (StableDiffusionPipeline) and extra
  components, each a function of the U-Net (a ControlNet)."""
  src = tmp_path_factory.mktemp(prediction)
  vocab = write_tokenizer(str(src / "tokenizer"))
  unet = diffusers.UNet2DConditionModel(**dict(SD_UNET, in_channels=in_channels))
  vae = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
      latent_channels=4, sample_size=16)
  scheduler = diffusers.DDIMScheduler(
      beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
      set_alpha_to_one=False, steps_offset=1, prediction_type=prediction)
  randomise(unet, 2)
  with torch.no_grad():  # cross-attention strong enough that the prompt shows in the latents
    for name, p in unet.named_parameters():
      if ".attn2." in name:
        p.mul_(cross_gain)
  pipe = (pipeline_cls or diffusers.StableDiffusionPipeline)(
      vae=randomise(vae, 1), text_encoder=text_encoder(vocab), unet=unet.eval(),
      tokenizer=transformers.CLIPTokenizer.from_pretrained(str(src / "tokenizer")),
      scheduler=scheduler, safety_checker=None, feature_extractor=None,
      requires_safety_checker=False, **{k: make(unet) for k, make in extra.items()})
  pipe.save_pretrained(str(src), safe_serialization=True)
  return src, pipe


def test_clip_text_encoder_matches_transformers(tmp_path):
  for act in ("quick_gelu", "gelu"):  # OpenAI's (SD 1.x) and OpenCLIP's (SD 2.x)
    ref = text_encoder(60, act, seed=3)
    ref.save_pretrained(str(tmp_path / act), safe_serialization=True)
    fields, params = load_text_encoder(str(tmp_path / act))
    assert fields["activation"] == act and fields["layers"] == 2
    ids = np.random.default_rng(0).integers(0, 60, (2, 77))
    with torch.no_grad():
      want = ref(torch.from_numpy(ids)).last_hidden_state.numpy()
    got = CLIPTextEncoder(**fields).apply({"params": params}, jnp.asarray(ids, jnp.int32))
    diff = np.abs(np.asarray(got) - want).max()
    print(f"CLIP text encoder ({act}): max |ours - transformers| = {diff:.3g}")
    assert diff < 1e-4


def test_pipeline_gives_diffusers_images(pipeline_dir):
  src, pipe = pipeline_dir
  ours = StableDiffusion.load(str(src))
  assert ours.schedule["steps_offset"] == 1 and not ours.schedule["alpha_one_at_end"]
  prompts = ["the man on a photo", "an orange cat!"]
  with pytest.raises(TypeError, match="unexpected keyword arguments \\['guidance'\\]"):
    ours.generate(prompts, num_steps=1, guidance=3.0)  # a misspelt option is named as such
  with pytest.raises(ValueError, match="size conditioning is SDXL's"):
    ours.generate(prompts, num_steps=1, original_size=(8, 8))
  latents = np.random.default_rng(0).normal(size=(2, 8, 8, 4)).astype(np.float32)
  run = lambda p, kind: pipe(p, num_inference_steps=4, guidance_scale=5.0, output_type=kind,
                             latents=torch.from_numpy(latents.transpose(0, 3, 1, 2))).images
  want = run(prompts, "np")
  got = ours.generate(prompts, num_steps=4, guidance_scale=5.0, latents=latents)
  assert got.shape == (2, 16, 16, 3) and got.dtype == np.uint8
  diff = np.abs(got / 255.0 - want).max()
  print(f"{ours.diffusion.mean_type}: images max |ours - diffusers| = {diff * 255:.2f} / 255")
  assert diff <= 1.5 / 255  # the 8-bit rounding
  # the final latents, against how much the prompts move them (random weights: little)
  want_z = run(prompts, "latent").numpy().transpose(0, 2, 3, 1)
  swapped_z = run(prompts[::-1], "latent").numpy().transpose(0, 2, 3, 1)
  got_z = ours.generate(prompts, num_steps=4, guidance_scale=5.0, latents=latents,
                        decode=False)
  diff, effect = np.abs(got_z - want_z).max(), np.abs(swapped_z - want_z).max()
  print(f"latents: max |ours - diffusers| = {diff:.3g}; swapping the prompts moves them "
        f"{effect:.3g}")
  assert diff < effect / 10
  # guidance_rescale (Lin et al.): the guided prediction's std pulled towards the conditional's
  want_r = pipe(prompts, num_inference_steps=4, guidance_scale=5.0, output_type="latent",
                guidance_rescale=0.7, latents=torch.from_numpy(latents.transpose(0, 3, 1, 2))
                ).images.numpy().transpose(0, 2, 3, 1)
  got_r = ours.generate(prompts, num_steps=4, guidance_scale=5.0, latents=latents,
                        decode=False, guidance_rescale=0.7)
  diff_r, effect_r = np.abs(got_r - want_r).max(), np.abs(want_r - want_z).max()
  print(f"guidance_rescale 0.7: max |ours - diffusers| = {diff_r:.3g}; it moves them "
        f"{effect_r:.3g}")
  assert diff_r < effect_r / 10
  # clip_skip 1: the prompts' states after the first of the two layers, then the final norm,
  # as diffusers' encode_prompt computes them (its own clip_skip path looks for text_model,
  # which transformers >= 5.6 no longer has); the negative prompt's as usual
  enc = pipe.text_encoder
  ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt")
  with torch.no_grad():
    states = enc(ids.input_ids, output_hidden_states=True).hidden_states[-2]
    norm = getattr(enc, "text_model", enc).final_layer_norm
    negative = enc(pipe.tokenizer([""] * 2, padding="max_length", max_length=77,
                                  return_tensors="pt").input_ids)[0]
    want_s = pipe(prompt_embeds=norm(states), negative_prompt_embeds=negative,
                  num_inference_steps=4, guidance_scale=5.0, output_type="latent",
                  latents=torch.from_numpy(latents.transpose(0, 3, 1, 2))
                  ).images.numpy().transpose(0, 2, 3, 1)
  got_s = ours.with_clip_skip(1).generate(prompts, num_steps=4, guidance_scale=5.0,
                                          latents=latents, decode=False)
  diff_s, effect_s = np.abs(got_s - want_s).max(), np.abs(want_s - want_z).max()
  print(f"clip_skip 1: max |ours - diffusers| = {diff_s:.3g}; it moves them {effect_s:.3g}")
  assert diff_s < effect_s / 10
  with pytest.raises(ValueError, match="this text encoder has 2 layers"):
    ours.with_clip_skip(2).generate(prompts, num_steps=2)
  with pytest.raises(ValueError, match="multiples of 4 .*got 18x16"):  # f 2, 2 U-Net levels
    ours.generate(prompts, num_steps=4, height=18)
  # bf16 compute (the GPU setting; parameters stay float32): the same images, give or take
  half = StableDiffusion.load(str(src), "bfloat16").generate(
      prompts, num_steps=4, guidance_scale=5.0, latents=latents)
  diff = np.abs(half.astype(int) - got)
  assert diff.max() <= 6 and diff.mean() < 1.0, (diff.max(), diff.mean())


def text_to_image_command(*args):
  """`python -m diffusion_jax.text_to_image ARGS` on the CPU (the finished process)."""
  return subprocess.run([sys.executable, "-m", "diffusion_jax.text_to_image", *args], cwd=REPO,
                        capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=600)


def test_the_command_writes_a_grid(epsilon_pipeline_dir, tmp_path):
  src, _ = epsilon_pipeline_dir
  out = tmp_path / "grid.png"
  proc = text_to_image_command(f"--src={src}", "--prompt=the man", "--prompt=a cat",
                               "--num_images=2", "--steps=3", "--method=dpm_solver",
                               "--pag_scale=2", "--pag_layers=mid,up_blocks", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert os.path.getsize(out) > 0
  assert np.load(str(out).replace(".png", ".npz"))["arr_0"].shape == (4, 16, 16, 3)
  from PIL import Image
  Image.fromarray(np.full((20, 18, 3), 200, np.uint8)).save(tmp_path / "init.png")
  proc = text_to_image_command(f"--src={src}", "--prompt=a cat", "--steps=4",
                               f"--init_image={tmp_path / 'init.png'}", "--strength=0.5",
                               "--freeu=0.9,0.2,1.2,1.4", f"--out={tmp_path / 'edit.png'}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  # 20 x 18 rounded down to multiples of 4 (the decoder's f 2 x the U-Net's 2 levels)
  assert np.load(str(tmp_path / "edit.npz"))["arr_0"].shape == (1, 20, 16, 3)
  bad = text_to_image_command(f"--src={tmp_path}", "--prompt=x")
  assert bad.returncode != 0 and "scheduler_config.json not found" in bad.stderr


def test_single_file_checkpoint_gives_the_pipelines_images(epsilon_pipeline_dir, tmp_path):
  """The same miniature as one Stable Diffusion 1.x file (CompVis names): our U-Net written in
  openaimodel's naming loads strictly through diffusers' own single-file converter, and the
  file run by load_single_file gives diffusers' pipeline images."""
  from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
  from safetensors.numpy import save_file
  from diffusion_jax import convert_ldm
  from diffusion_jax.convert_diffusers import load_diffusers_unet
  src, pipe = epsilon_pipeline_dir
  fields, params = load_diffusers_unet(str(src))
  unet_sd = convert_ldm.ldm_state_dict(params, fields)
  assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in unet_sd
  converted = convert_ldm_unet_checkpoint(unet_sd, dict(pipe.unet.config))
  fresh = diffusers.UNet2DConditionModel(**pipe.unet.config)
  fresh.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v))
                         for k, v in converted.items()}, strict=True)
  for name, value in pipe.unet.state_dict().items():
    np.testing.assert_array_equal(fresh.state_dict()[name].numpy(), value.numpy(), err_msg=name)
  state = dict(unet_sd)
  state.update({"cond_stage_model.transformer.text_model." + k: v.numpy()
                for k, v in pipe.text_encoder.state_dict().items()})
  state.update({"first_stage_model." + k: v.numpy() for k, v in pipe.vae.state_dict().items()})
  path = str(tmp_path / "sd-mini.safetensors")
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path)
  prediction = pipe.scheduler.config.prediction_type
  ours = StableDiffusion.load_single_file(path, str(src / "tokenizer"), prediction,
                                          heads={"num_heads": 4}, text_heads=4)
  assert ours.unet.attn_levels == (0,) and ours.text_encoder.layers == 2
  prompts = ["the man on a photo", "an orange cat!"]
  latents = np.random.default_rng(1).normal(size=(2, 8, 8, 4)).astype(np.float32)
  want = pipe(prompts, num_inference_steps=3, guidance_scale=5.0, output_type="np",
              latents=torch.from_numpy(latents.transpose(0, 3, 1, 2))).images
  got = ours.generate(prompts, num_steps=3, guidance_scale=5.0, latents=latents, height=16,
                      width=16)  # a single file says no size: SD 1.x's 512 by default
  assert np.abs(got / 255.0 - want).max() <= 1.5 / 255
  from diffusion_jax.convert_diffusers import ConversionError
  with pytest.raises(ConversionError, match="32-wide context is neither"):
    StableDiffusion.load_single_file(path, str(src / "tokenizer"))
  # ComfyUI's markers: "v_pred" (v prediction), "ztsnr" (zero terminal SNR), unless told
  marked = str(tmp_path / "sd-mini-vpred-ztsnr.safetensors")
  save_file(dict({k: np.ascontiguousarray(v) for k, v in state.items()},
                 v_pred=np.zeros(0, np.float32), ztsnr=np.zeros(0, np.float32)), marked)
  load = lambda **kw: StableDiffusion.load_single_file(
      marked, str(src / "tokenizer"), heads={"num_heads": 4}, text_heads=4, **kw)
  vz, v_only = load(), load(zero_snr=False)
  assert vz.diffusion.mean_type == v_only.diffusion.mean_type == "v"
  assert vz.diffusion.coefs["alphas_cumprod"][-1] == 0.0 < v_only.diffusion.coefs[
      "alphas_cumprod"][-1]
  assert (vz.schedule["timestep_spacing"], v_only.schedule["timestep_spacing"]) == (
      "trailing", None)  # zero SNR from the last timestep on; else DDIM's default, leading
  assert ours.diffusion.mean_type == "eps"  # no markers: as it was told


def test_img2img_gives_diffusers_img2img_images(pipeline_dir):
  """SDEdit from latents, strength 0.5 of 6 DDIM steps (the last 3 run), against diffusers'
  StableDiffusionImg2ImgPipeline with the same noise; images in, through the encoder."""
  from diffusers.utils.torch_utils import randn_tensor
  src, pipe = pipeline_dir
  ours = StableDiffusion.load(str(src))
  img2img = diffusers.StableDiffusionImg2ImgPipeline(**pipe.components)
  prompts = ["the man on a photo", "an orange cat!"]
  z0 = np.random.default_rng(2).normal(size=(2, 4, 8, 8)).astype(np.float32)
  want = img2img(prompts, image=torch.from_numpy(z0), strength=0.5, num_inference_steps=6,
                 guidance_scale=5.0, output_type="np",
                 generator=torch.Generator().manual_seed(3)).images
  noise = randn_tensor((2, 4, 8, 8), generator=torch.Generator().manual_seed(3)).numpy()
  got = ours.img2img(prompts, latents=z0.transpose(0, 2, 3, 1), strength=0.5, num_steps=6,
                     guidance_scale=5.0, noise=noise.transpose(0, 2, 3, 1))
  diff = np.abs(got / 255.0 - want).max()
  print(f"img2img ({ours.diffusion.mean_type}): max |ours - diffusers| = {diff * 255:.2f} / 255")
  assert diff <= 1.5 / 255
  # the latents, where an off-by-one noising step (steps_offset) would show
  want_z = img2img(prompts, image=torch.from_numpy(z0), strength=0.5, num_inference_steps=6,
                   guidance_scale=5.0, output_type="latent",
                   generator=torch.Generator().manual_seed(3)).images.numpy()
  got_z = ours.img2img(prompts, latents=z0.transpose(0, 2, 3, 1), strength=0.5, num_steps=6,
                       guidance_scale=5.0, noise=noise.transpose(0, 2, 3, 1), decode=False)
  assert np.abs(got_z.transpose(0, 3, 1, 2) - want_z).max() < 1e-4
  images = ours.img2img(prompts, images=got, strength=0.3, num_steps=10, guidance_scale=5.0)
  assert images.shape == got.shape and images.dtype == np.uint8
  # "DPM++ 2M Karras" from the 3rd of 6 levels (diffusers' set_begin_index), the same noise
  dpm = diffusers.StableDiffusionImg2ImgPipeline(**dict(
      pipe.components, scheduler=diffusers.DPMSolverMultistepScheduler.from_config(
          pipe.scheduler.config, use_karras_sigmas=True)))
  want_d = dpm(prompts, image=torch.from_numpy(z0), strength=0.7, num_inference_steps=6,
               guidance_scale=5.0, output_type="latent",
               generator=torch.Generator().manual_seed(3)).images.numpy()
  got_d = ours.img2img(prompts, latents=z0.transpose(0, 2, 3, 1), strength=0.7, num_steps=6,
                       guidance_scale=5.0, noise=noise.transpose(0, 2, 3, 1), decode=False,
                       method="dpm_solver_karras")
  ddim_d = ours.img2img(prompts, latents=z0.transpose(0, 2, 3, 1), strength=0.7, num_steps=6,
                        guidance_scale=5.0, noise=noise.transpose(0, 2, 3, 1), decode=False)
  diff_d = np.abs(got_d.transpose(0, 3, 1, 2) - want_d).max()
  moved = np.abs(ddim_d.transpose(0, 3, 1, 2) - want_d).max()
  print(f"img2img with DPM++ 2M Karras: max |ours - diffusers| = {diff_d:.3g} (DDIM's: "
        f"{moved:.3g})")
  assert diff_d < min(1e-4, moved / 100)
  with pytest.raises(ValueError, match="either images or latents"):
    ours.img2img(prompts)


def test_open_clip_text_tower_of_sd2_files_converts_like_diffusers():
  """SD 2.x single files hold OpenCLIP's text tower (fused in_proj, resblocks, ln_final), used
  at its penultimate layer: our conversion drops the last block, as diffusers' own converter
  (which drops block 23 of ViT-H's 24; here the last of 3) builds its CLIPTextModel."""
  from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
  from diffusion_jax.convert_clip import text_encoder_fields_from_params
  from diffusion_jax.convert_ldm import open_clip_text_params
  ref = text_encoder(60, "gelu", seed=4)  # 2 layers: the penultimate network
  sd = {k.removeprefix("text_model."): v.numpy() for k, v in ref.state_dict().items()}
  rng = np.random.default_rng(0)
  last = {k[len("encoder.layers.0."):]: rng.normal(size=v.shape).astype(np.float32)
          for k, v in sd.items() if k.startswith("encoder.layers.0.")}  # SD 2.x leaves it out
  clip = open_clip_state(sd, extra_blocks=[last])
  ckpt = {"cond_stage_model.model." + k: torch.from_numpy(v) for k, v in clip.items()
          if not k.startswith("transformer.resblocks.2.")}
  fresh = transformers.CLIPTextModel(ref.config)
  converted = convert_open_clip_checkpoint(fresh, ckpt)  # transformers 5 has no text_model.
  fresh.load_state_dict({k.removeprefix("text_model."): v for k, v in converted.items()},
                        strict=True)
  params = open_clip_text_params(clip)
  fields = text_encoder_fields_from_params(params, "gelu", heads=4)
  assert fields["layers"] == 2 and fields["width"] == 32
  ids = np.random.default_rng(1).integers(0, 60, (2, 77))
  with torch.no_grad():
    want = fresh.eval()(torch.from_numpy(ids)).last_hidden_state.numpy()
  got = CLIPTextEncoder(**fields).apply({"params": params}, jnp.asarray(ids, jnp.int32))
  assert np.abs(np.asarray(got) - want).max() < 1e-4


def test_pipeline_imports_and_fine_tunes_on_captioned_images(epsilon_pipeline_dir, tmp_path):
  """configs/sd15_finetune.py in the miniature's layout: the import refuses without the text
  encoder, then writes the pipeline's U-Net as step 0; training continues from it on captioned
  images (text encoder and VAE the pipeline's, frozen) and samples the configured prompts."""
  from PIL import Image
  from configs.sd15_finetune import get_config
  from diffusion_jax import checkpoints
  from diffusion_jax.convert import import_diffusers_unet
  from diffusion_jax.convert_diffusers import ConversionError, load_diffusers_unet
  from diffusion_jax.train import Trainer, train_and_evaluate
  from diffusion_jax.validate import validate_config
  src, _ = epsilon_pipeline_dir
  images = tmp_path / "images"
  images.mkdir()
  for i in range(4):
    Image.fromarray(np.full((24, 20, 3), 60 * i, np.uint8)).save(images / f"{i}.png")
    (images / f"{i}.txt").write_text(f"the shade {i}")
  c = get_config()
  c.data.data_dir, c.data.image_size = str(images), 16
  c.model.ch, c.model.ch_mult, c.model.num_res_blocks = 32, (1, 2), 1
  c.model.attn_levels, c.model.context_dim, c.model.num_heads = (0,), 32, 4
  c.autoencoder.ch, c.autoencoder.ch_mult = 32, (1, 2)
  c.training.batch_size, c.training.num_steps = 8, 2
  c.training.log_every = c.training.checkpoint_every = c.training.sample_every = 2
  c.training.num_train_samples = 8
  c.sampling.num_steps = 3
  work = str(tmp_path / "work")
  with pytest.raises(ConversionError, match="text.encoder"):
    import_diffusers_unet(str(src), c, work)
  c.text.encoder, c.latent.autoencoder = str(src), str(src / "vae")
  validate_config(c)
  import_diffusers_unet(str(src), c, work)
  train_and_evaluate(c, work)
  _, want = load_diffusers_unet(str(src))
  step, state, _ = checkpoints.restore_trained(work, Trainer(c).abstract_state, None, "")
  assert step == 2
  moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
           for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(want))]
  assert 0 < max(moved) < 1e-3  # fine-tuned (lr 1e-5), not re-initialised
  assert os.path.exists(os.path.join(work, "train_samples", "step_00000002.png"))

  # exported (diffusion_jax/export.py): a StableDiffusionPipeline of the fine-tuned U-Net, the
  # source's text encoder, tokenizer and VAE, and the config's DDIM settings
  from diffusion_jax.export import export_workdir
  from diffusion_jax.sample import restore_ema_params
  exported = str(tmp_path / "exported")
  export_workdir(c, work, exported)
  again = diffusers.StableDiffusionPipeline.from_pretrained(exported).to(torch.float32)
  src_pipe = epsilon_pipeline_dir[1]
  for module in ("unet", "text_encoder", "vae"):  # SD 1.x's layout: 1x1-conv projections
    theirs, ref = getattr(again, module).state_dict(), getattr(src_pipe, module).state_dict()
    assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in ref.items()}
  for module in ("text_encoder", "vae"):  # frozen: as they were
    for key, value in getattr(src_pipe, module).state_dict().items():
      np.testing.assert_array_equal(getattr(again, module).state_dict()[key].numpy(),
                                    value.numpy(), err_msg=key)
  sched = again.scheduler.config
  assert isinstance(again.scheduler, diffusers.DDIMScheduler)
  assert (sched.steps_offset, sched.set_alpha_to_one, sched.beta_schedule) == (
      1, False, "scaled_linear")
  _, _, ema = restore_ema_params(c, work)
  _, back = load_diffusers_unet(exported)  # the import reads the export as our parameters
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, ema))
  rng = np.random.default_rng(0)
  z, ctx = rng.standard_normal((2, 8, 8, 4)), rng.standard_normal((2, 5, 32))
  z, ctx, t = z.astype(np.float32), ctx.astype(np.float32), np.array([10, 900])
  with torch.no_grad():
    want = again.unet(torch.from_numpy(z.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                      torch.from_numpy(ctx)).sample.numpy().transpose(0, 2, 3, 1)
  got = np.asarray(Trainer(c).model.apply({"params": ema}, z, t, context=ctx))
  diff = np.abs(got - want).max()
  print(f"exported SD U-Net: max |ours - diffusers| {diff:.3g} (scale {np.abs(want).max():.3g})")
  assert diff < 1e-4 * np.abs(want).max()
  images = again("the shade 1", num_inference_steps=2, output_type="np").images
  assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()


def test_dpm_solver_gives_diffusers_multistep_scheduler_latents(epsilon_pipeline_dir):
  """--method=dpm_solver against the pipeline with DPMSolverMultistepScheduler read from its
  scheduler config ("leading" timesteps, steps_offset 1, final sigma 0)."""
  src, pipe = epsilon_pipeline_dir
  ours = StableDiffusion.load(str(src))
  sched = diffusers.DPMSolverMultistepScheduler.from_pretrained(str(src / "scheduler"))
  assert sched.config.timestep_spacing == "leading"
  dpm = diffusers.StableDiffusionPipeline(**dict(pipe.components, scheduler=sched))
  prompts = ["the man on a photo", "an orange cat!"]
  latents = np.random.default_rng(1).normal(size=(2, 8, 8, 4)).astype(np.float32)
  want = dpm(prompts, num_inference_steps=5, guidance_scale=5.0, output_type="latent",
             latents=torch.from_numpy(latents.transpose(0, 3, 1, 2))).images
  want = want.numpy().transpose(0, 2, 3, 1)
  got = ours.generate(prompts, num_steps=5, guidance_scale=5.0, latents=latents,
                      method="dpm_solver", decode=False)
  ddim = ours.generate(prompts, num_steps=5, guidance_scale=5.0, latents=latents, decode=False)
  diff, other = np.abs(got - want).max(), np.abs(ddim - want).max()
  print(f"DPM-Solver++(2M) latents: max |ours - diffusers| = {diff:.3g} (DDIM's: {other:.3g})")
  assert diff < 1e-4 < other
  # "DPM++ 2M Karras" over a config that does not ask for it, as from_config(...,
  # use_karras_sigmas=True)
  sched_k = diffusers.DPMSolverMultistepScheduler.from_pretrained(str(src / "scheduler"),
                                                                  use_karras_sigmas=True)
  want_k = diffusers.StableDiffusionPipeline(**dict(pipe.components, scheduler=sched_k))(
      prompts, num_inference_steps=5, guidance_scale=5.0, output_type="latent",
      latents=torch.from_numpy(latents.transpose(0, 3, 1, 2))).images
  got_k = ours.generate(prompts, num_steps=5, guidance_scale=5.0, latents=latents,
                        method="dpm_solver_karras", decode=False)
  diff_k = np.abs(got_k - want_k.numpy().transpose(0, 2, 3, 1)).max()
  print(f"DPM++ 2M Karras latents: max |ours - diffusers| = {diff_k:.3g}")
  assert diff_k < 1e-4 < np.abs(got_k - got).max()


def test_freeu_gives_diffusers_latents(epsilon_pipeline_dir):
  """with_freeu(s1, s2, b1, b2) against pipe.enable_freeu (models/freeu.py); the pipeline it
  was called on is left as it was."""
  from diffusion_jax.models.freeu import check_freeu
  src, pipe = epsilon_pipeline_dir
  ours = StableDiffusion.load(str(src))
  factors = (0.9, 0.2, 1.2, 1.4)
  free = ours.with_freeu(*factors)
  assert free.unet.freeu == factors and ours.unet.freeu == ()
  assert free.with_freeu(0, 0, 0, 0).unet.freeu == ()  # diffusers: a 0 turns it off
  for bad in ((0.9, 0.2), ("a", 1, 1, 1)):
    with pytest.raises(ValueError, match="four numbers"):
      check_freeu(bad)
  prompts = ["the man on a photo", "an orange cat!"]
  latents = np.random.default_rng(1).normal(size=(2, 8, 8, 4)).astype(np.float32)
  pipe.enable_freeu(*factors)
  try:
    want = pipe(prompts, num_inference_steps=3, guidance_scale=5.0, output_type="latent",
                latents=torch.from_numpy(latents.transpose(0, 3, 1, 2))).images
  finally:
    pipe.disable_freeu()
  want = want.numpy().transpose(0, 2, 3, 1)
  got = free.generate(prompts, num_steps=3, guidance_scale=5.0, latents=latents, decode=False)
  plain = ours.generate(prompts, num_steps=3, guidance_scale=5.0, latents=latents,
                        decode=False)
  diff, moved = np.abs(got - want).max(), np.abs(plain - got).max()
  print(f"FreeU latents: max |ours - diffusers| = {diff:.3g} (FreeU moves them {moved:.3g})")
  assert diff < 1e-4 and moved > 0.01


@pytest.mark.parametrize("layers,guidance,rescale,adaptive", [
    ("mid", 5.0, 0.0, 0.0), (["down_blocks.0", "up_blocks.1.attentions.1"], 5.0, 0.7, 0.002),
    ("mid", 1.0, 0.0, 0.0)], ids=["mid", "down_up_rescale_adaptive", "no_cfg"])
def test_pag_gives_diffusers_pag_pipeline_latents(epsilon_pipeline_dir, layers, guidance,
                                                  rescale, adaptive):
  """Perturbed-attention guidance (models/pag.py) against StableDiffusionPAGPipeline: its
  pag_applied_layers, with and without classifier-free guidance, guidance_rescale and the
  adaptive scale."""
  src, pipe = epsilon_pipeline_dir
  ours = StableDiffusion.load(str(src))
  pag = ours.with_pag(layers)
  assert ours.unet.pag_layers == ()
  assert len(pag.unet.pag_layers) == (1 if layers == "mid" else 2)
  ref = diffusers.StableDiffusionPAGPipeline(**pipe.components, pag_applied_layers=layers)
  prompts = ["the man on a photo", "an orange cat!"]
  latents = np.random.default_rng(1).normal(size=(2, 8, 8, 4)).astype(np.float32)
  kw = dict(guidance_scale=guidance, guidance_rescale=rescale)
  want = ref(prompts, num_inference_steps=3, output_type="latent", pag_scale=3.0,
             pag_adaptive_scale=adaptive, **kw,
             latents=torch.from_numpy(latents.transpose(0, 3, 1, 2))).images
  want = want.numpy().transpose(0, 2, 3, 1)
  run = lambda p, **more: p.generate(prompts, num_steps=3, latents=latents, decode=False,
                                     **kw, **more)
  got = run(pag, pag_scale=3.0, pag_adaptive_scale=adaptive)
  diff, moved = np.abs(got - want).max(), np.abs(run(ours) - want).max()
  print(f"PAG {layers} (guidance {guidance}, rescale {rescale}, adaptive {adaptive}): latents "
        f"max |ours - diffusers| = {diff:.3g} (PAG moves them {moved:.3g})")
  assert diff < min(1e-4, moved / 20)
  if layers == "mid" and guidance > 1:
    with pytest.raises(ValueError, match="with_pag"):
      run(ours, pag_scale=3.0)
    with pytest.raises(ValueError, match="matches no self-attention"):
      ours.with_pag("down_blocks.7")


def test_zero_terminal_snr_gives_diffusers_latents(pipeline_dir, tmp_path):
  """A scheduler config with rescale_betas_zero_snr and "trailing" timesteps (Lin et al.
  2023's recipe, with guidance_rescale 0.7): DDIM, Euler and DPM-Solver give diffusers'
  latents, the first step at alphabar_T = 0; an epsilon model's such config is refused."""
  import json
  import shutil
  from diffusion_jax.convert_diffusers import ConversionError
  src, pipe = pipeline_dir
  copy = tmp_path / "zsnr"
  shutil.copytree(src, copy)
  cfg = {k: v for k, v in pipe.scheduler.config.items()  # from_config resets those it names
         if k != "_use_default_values"}
  cfg.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
  (copy / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
  if cfg["prediction_type"] == "epsilon":
    with pytest.raises(ConversionError, match="rescale_betas_zero_snr=True with prediction"):
      StableDiffusion.load(str(copy))
    return
  ours = StableDiffusion.load(str(copy))
  assert ours.diffusion.coefs["alphas_cumprod"][-1] == 0.0
  prompts = ["the man on a photo", "an orange cat!"]
  latents = np.random.default_rng(3).normal(size=(2, 8, 8, 4)).astype(np.float32)
  kw = dict(num_inference_steps=4, guidance_scale=5.0, guidance_rescale=0.7,
            output_type="latent", latents=torch.from_numpy(latents.transpose(0, 3, 1, 2)))
  for cls, method in ((diffusers.DDIMScheduler, "ddim"),
                      (diffusers.EulerDiscreteScheduler, "euler"),
                      (diffusers.DPMSolverMultistepScheduler, "dpm_solver")):
    run = lambda **over: diffusers.StableDiffusionPipeline(**dict(
        pipe.components, scheduler=cls.from_config(cfg, **over)))(
            prompts, **kw).images.numpy().transpose(0, 2, 3, 1)
    want, plain = run(), run(rescale_betas_zero_snr=False)
    got = ours.generate(prompts, num_steps=4, guidance_scale=5.0, guidance_rescale=0.7,
                        latents=latents, method=method, decode=False)
    diff, moved = np.abs(got - want).max(), np.abs(plain - want).max()
    print(f"zero terminal SNR, {method}: max |ours - diffusers| = {diff:.3g} (without the "
          f"rescale diffusers' move {moved:.3g})")
    # Euler: diffusers' float32 step from sigma_T = 4096 keeps ~4096 * 6e-8 of the latents
    assert np.isfinite(got).all() and diff < (4e-4 if method == "euler" else 1e-4) < moved
    if method == "ddim":  # the same asked of the pipeline loaded as it was
      changed = StableDiffusion.load(str(src)).with_schedule(rescale_betas_zero_snr=True,
                                                             timestep_spacing="trailing")
      np.testing.assert_array_equal(changed.generate(
          prompts, num_steps=4, guidance_scale=5.0, guidance_rescale=0.7, latents=latents,
          decode=False), got)


def check_lcm_img2img(label, ref, ours, prompts, num_steps, guidance, strengths):
  """img2img latents (from the same latents and noise) within 1/100 of what strengths[1]
  instead of strengths[0] moves diffusers' `ref` pipeline's."""
  from diffusers.utils.torch_utils import randn_tensor
  z0 = np.random.default_rng(4).normal(size=(2, 8, 8, 4)).astype(np.float32)
  noise = randn_tensor((2, 4, 8, 8), generator=torch.Generator().manual_seed(3)).numpy()
  run = lambda strength: ref(
      prompts, image=torch.from_numpy(z0.transpose(0, 3, 1, 2)), strength=strength,
      num_inference_steps=num_steps, guidance_scale=guidance, output_type="latent",
      generator=torch.Generator().manual_seed(3)).images.numpy().transpose(0, 2, 3, 1)
  want = run(strengths[0])
  got = ours.img2img(prompts, latents=z0, strength=strengths[0], num_steps=num_steps,
                     guidance_scale=guidance, noise=noise.transpose(0, 2, 3, 1), decode=False)
  diff, effect = np.abs(got - want).max(), np.abs(run(strengths[1]) - want).max()
  print(f"{label}: max |ours - diffusers| = {diff:.3g} (strength {strengths[1]} instead of "
        f"{strengths[0]} moves them {effect:.3g})")
  assert diff < effect / 100


def test_lcm_scheduler_pipeline_gives_diffusers_latents(epsilon_pipeline_dir, tmp_path):
  """A pipeline whose scheduler is LCMScheduler (LCM-LoRA's recipe: guidance 1.5, few steps)
  samples with lcm by default; one step (no re-noising) gives diffusers' latents."""
  import json
  import shutil
  src, pipe = epsilon_pipeline_dir
  copy = tmp_path / "lcm"
  shutil.copytree(src, copy)
  lcm_sched = diffusers.LCMScheduler.from_config(pipe.scheduler.config)
  lcm_sched.save_pretrained(str(copy / "scheduler"))
  assert json.loads((copy / "scheduler" / "scheduler_config.json").read_text())[
      "_class_name"] == "LCMScheduler"
  ours = StableDiffusion.load(str(copy))
  assert ours.default_method() == "lcm"
  prompts = ["the man on a photo", "an orange cat!"]
  latents = np.random.default_rng(2).normal(size=(2, 8, 8, 4)).astype(np.float32)
  ref = diffusers.StableDiffusionPipeline(**dict(pipe.components, scheduler=lcm_sched))
  want = ref(prompts, num_inference_steps=1, guidance_scale=1.5, output_type="latent",
             latents=torch.from_numpy(latents.transpose(0, 3, 1, 2))
             ).images.numpy().transpose(0, 2, 3, 1)
  got = ours.generate(prompts, num_steps=1, guidance_scale=1.5, latents=latents, decode=False)
  ddim = ours.generate(prompts, num_steps=1, guidance_scale=1.5, latents=latents, decode=False,
                       method="ddim")
  diff, other = np.abs(got - want).max(), np.abs(ddim - want).max()
  print(f"LCM, 1 step: max |ours - diffusers| = {diff:.3g} (DDIM's: {other:.3g})")
  assert diff < other / 100
  four = ours.generate(prompts, num_steps=4, guidance_scale=1.5, seed=1)
  assert four.shape == (2, 16, 16, 3) and four.std() > 0
  # LCM-LoRA's img2img: StableDiffusionImg2ImgPipeline with LCMScheduler skips the first steps
  # (2 steps, strength 0.5: the second, timestep 499, alone; the latents noised there)
  check_lcm_img2img("LCM-LoRA img2img", diffusers.StableDiffusionImg2ImgPipeline(
      **dict(pipe.components, scheduler=lcm_sched)), ours, prompts, 2, 1.5, (0.5, 1.0))
  with pytest.raises(ValueError, match="LCM runs whole chains"):
    ours.img2img(prompts, images=four, num_steps=4, latents=None, denoising_start=0.5)


def test_lcm_distilled_pipeline_gives_diffusers_latents(epsilon_pipeline_dir, tmp_path):
  """An LCM-distilled U-Net (time_cond_proj_dim: the guidance scale embedded into the
  timestep's embedding, no classifier-free guidance), as LatentConsistencyModelPipeline: one
  step (no re-noising) against diffusers'; the guidance scale moves it."""
  from test_parity import randomise
  _, pipe = epsilon_pipeline_dir
  unet = randomise(diffusers.UNet2DConditionModel(**dict(SD_UNET, time_cond_proj_dim=8)), 3)
  with torch.no_grad():
    unet.time_embedding.cond_proj.weight.mul_(20.0)  # the embedded guidance strong enough
  lcm = diffusers.LatentConsistencyModelPipeline(
      vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=unet.eval(),
      scheduler=diffusers.LCMScheduler.from_config(pipe.scheduler.config), safety_checker=None,
      feature_extractor=None, requires_safety_checker=False)
  lcm.save_pretrained(str(tmp_path / "lcm"), safe_serialization=True)
  ours = StableDiffusion.load(str(tmp_path / "lcm"))
  assert ours.unet.time_cond_dim == 8 and ours.default_method() == "lcm"
  prompts = ["the man on a photo", "an orange cat!"]
  latents = np.random.default_rng(3).normal(size=(2, 8, 8, 4)).astype(np.float32)
  run = lambda g: lcm(prompts, num_inference_steps=1, guidance_scale=g, output_type="latent",
                      latents=torch.from_numpy(latents.transpose(0, 3, 1, 2))
                      ).images.numpy().transpose(0, 2, 3, 1)
  want = run(8.0)
  got = ours.generate(prompts, num_steps=1, guidance_scale=8.0, latents=latents, decode=False)
  diff, effect = np.abs(got - want).max(), np.abs(run(2.0) - want).max()
  print(f"LCM-distilled, 1 step: max |ours - diffusers| = {diff:.3g}; guidance 2 instead of 8 "
        f"moves them {effect:.3g}")
  assert diff < effect / 100
  # img2img as LatentConsistencyModelImg2ImgPipeline: strength 0.5 takes the timesteps from the
  # first half of the distillation's (one step: 499), the latents noised there
  check_lcm_img2img("LCM-distilled img2img", diffusers.LatentConsistencyModelImg2ImgPipeline(
      **lcm.components), ours, prompts, 1, 8.0, (0.5, 0.7))


def test_dreambooth_generates_class_images_and_weighs_the_prior_preservation_loss(
    epsilon_pipeline_dir, tmp_path):
  """configs/sd15_dreambooth.py in the miniature's layout: the class images are generated by
  the imported model before the first step (and kept), each batch is instance images with the
  instance prompt then class images with the class prompt, and the loss is the instance half's
  mean + prior_loss_weight x the class half's mean (Eq. 2). (Training steps on such batches:
  the fine-tuning test above.)"""
  from PIL import Image
  from configs.sd15_dreambooth import get_config
  from diffusion_jax import data, dreambooth
  from diffusion_jax.convert import import_diffusers_unet
  from diffusion_jax.sample import Sampler, restore_ema_params
  from diffusion_jax.train import Trainer, loss_fn, train_and_evaluate
  from diffusion_jax.validate import ConfigError, validate_config
  src, _ = epsilon_pipeline_dir
  images = tmp_path / "sks"
  images.mkdir()
  for i in range(3):
    Image.fromarray(np.full((20, 20, 3), 80 * i, np.uint8)).save(images / f"{i}.png")
  c = get_config()
  c.data.data_dir, c.data.image_size = str(images), 16
  c.model.ch, c.model.ch_mult, c.model.num_res_blocks = 32, (1, 2), 1
  c.model.attn_levels, c.model.context_dim, c.model.num_heads = (0,), 32, 4
  c.autoencoder.ch, c.autoencoder.ch_mult = 32, (1, 2)
  c.text.encoder, c.latent.autoencoder = str(src), str(src / "vae")
  c.dreambooth.num_class_images, c.dreambooth.prior_loss_weight = 3, 0.5
  c.training.batch_size, c.training.num_steps = 8, 2  # 4 instance + 4 class images
  c.training.log_every = c.training.checkpoint_every = c.training.sample_every = 2
  c.training.num_train_samples, c.sampling.batch_size, c.sampling.num_steps = 8, 8, 2
  with pytest.raises(ConfigError, match="dreambooth.class_data_dir"):
    validate_config(c)
  c.dreambooth.class_data_dir = str(images / "dog")  # inside: read as instance images too
  with pytest.raises(ConfigError, match="class_data_dir=.* outside data.data_dir"):
    validate_config(c)
  c.dreambooth.class_data_dir = str(tmp_path / "dog")
  validate_config(c)
  work = str(tmp_path / "work")
  with pytest.raises(data.DataError, match="import it first"):  # train's first act
    train_and_evaluate(c, work)
  import_diffusers_unet(str(src), c, work)
  _, _, imported = restore_ema_params(c, work)
  tr = Trainer(c)
  dreambooth.ensure_class_images(c, tr, imported, 0, {})  # what train does at the import's step 0

  made = dreambooth.class_images(c.dreambooth.class_data_dir)
  assert [os.path.basename(p) for p in made] == [f"class_{k:05d}.png" for k in range(3)]
  cfg = c.copy_and_resolve_references()
  cfg.sampling.prompts = (c.dreambooth.class_prompt,)
  want = Sampler(cfg, tr.model, tr.diffusion, tr.mesh, 8, tr.first_stage, tr.text)(
      imported, 3, seed=c.training.seed)  # the imported model's samples of the class prompt
  got = np.stack([np.asarray(Image.open(p)) for p in made])
  np.testing.assert_array_equal(got, want)
  stamp = [os.path.getmtime(p) for p in made]
  dreambooth.ensure_class_images(c, tr, imported, 2, {})  # a resumed run: kept as they are
  assert [os.path.getmtime(p) for p in made] == stamp
  os.remove(made[-1])  # and not generated by the fine-tuned model
  with pytest.raises(data.DataError, match="this run is at step 2; put the class images back"):
    dreambooth.ensure_class_images(c, tr, imported, 2, {})

  batch = next(data.train_batches(c, tokenize=tr.text.tokenize))
  ids = tr.text.tokenize([c.dreambooth.instance_prompt, c.dreambooth.class_prompt])
  np.testing.assert_array_equal(batch["tokens"], ids[[0] * 4 + [1] * 4])
  np.testing.assert_array_equal(batch["loss_weight"], [2.0] * 4 + [1.0] * 4)
  with pytest.raises(data.DataError, match=r"each process's batch \(1\) must split"):
    data.train_batches(c, process_index=0, process_count=8, tokenize=tr.text.tokenize)
  dev = tr.device_batch(batch, 0)
  n = 8
  dev = dict(dev, t=jnp.array([5, 500, 50, 900, 1, 300, 700, 999]),
             noise=jax.random.normal(jax.random.PRNGKey(1), dev["image"].shape))
  key = jax.random.PRNGKey(2)
  per_example = tr.diffusion.training_losses(
      lambda x, t: tr.model.apply({"params": imported}, x, t, context=dev["context"]),
      dev["image"], dev["t"], dev["noise"])
  want_loss = per_example[:n // 2].mean() + 0.5 * per_example[n // 2:].mean()
  got_loss = loss_fn(imported, tr.model, tr.diffusion, dev, key, train=False)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  # the compiled train step takes such a batch (traced, not run: the fine-tune test trains)
  _, metrics = jax.eval_shape(tr.step_fn, tr.abstract_state, tr.device_batch(batch, 0))
  assert metrics["loss"].shape == ()
