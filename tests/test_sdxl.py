"""Stable Diffusion XL in JAX: a diffusers StableDiffusionXLPipeline directory in miniature
(random weights, SDXL's layout: two CLIP text encoders, one with a projection, a U-Net with a
transformer depth per level, no attention at full size, pooled-text and size conditioning,
Euler's scheduler) converted and run end to end gives diffusers' latents and images."""
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffusion_jax.convert_clip import load_text_encoder  # noqa: E402
from diffusion_jax.convert_diffusers import ConversionError  # noqa: E402
from diffusion_jax.models.clip_text import CLIPTextEncoder  # noqa: E402
from diffusion_jax.stable_diffusion import StableDiffusion  # noqa: E402
from helpers import open_clip_state, write_tokenizer  # noqa: E402
from test_parity import build, randomise  # noqa: E402

pytestmark = pytest.mark.parity
PROMPTS = ["the man on a photo", "an orange cat!"]


def close(got, want, moved_by):
  """Within float32 rounding of latents that random weights make large (|z| ~ 20), and far
  below what the inputs under test move them by."""
  diff = float(np.abs(got - want).max())
  return diff < min(1e-4 * float(np.abs(want).max()), moved_by / 100)


def clip_config(vocab, eos, act):
  return transformers.CLIPTextConfig(
      vocab_size=vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
      num_attention_heads=4, max_position_embeddings=77, hidden_act=act, projection_dim=32,
      bos_token_id=vocab - 2, eos_token_id=eos, pad_token_id=vocab - 1)


def unet_config():
  return dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
              layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
              use_linear_projection=True, transformer_layers_per_block=(1, 2),
              cross_attention_dim=64, addition_embed_type="text_time",
              addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8)


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
  return build_sdxl_dir(tmp_path_factory)


def build_sdxl_dir(tmp_path_factory):
  """SDXL base's pipeline in miniature: 16x16 images, 8x8x4 latents. The first encoder finds
  the end of text by its id, the second by transformers' legacy rule (eos_token_id 2: the
  largest id) and pads with "!", as SDXL's OpenCLIP tokenizer."""
  src = tmp_path_factory.mktemp("sdxl")
  vocab = write_tokenizer(str(src / "tokenizer"))
  text = randomise(transformers.CLIPTextModel(clip_config(vocab, vocab - 1, "quick_gelu")), 3)
  text_2 = randomise(transformers.CLIPTextModelWithProjection(clip_config(vocab, 2, "gelu")), 4)
  unet = randomise(diffusers.UNet2DConditionModel(**unet_config()), 2)
  with torch.no_grad():  # cross-attention and the pooled text strong enough to show
    for name, p in unet.named_parameters():
      if ".attn2." in name:
        p.mul_(4.0)
  vae = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
      latent_channels=4, sample_size=16, scaling_factor=0.13025)
  scheduler = diffusers.EulerDiscreteScheduler(
      beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
      timestep_spacing="leading", interpolation_type="linear")
  tokenizer = transformers.CLIPTokenizer.from_pretrained(str(src / "tokenizer"))
  tokenizer_2 = transformers.CLIPTokenizer.from_pretrained(str(src / "tokenizer"), pad_token="!")
  pipe = diffusers.StableDiffusionXLPipeline(
      vae=randomise(vae, 1), text_encoder=text.eval(), text_encoder_2=text_2.eval(),
      tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet.eval(), scheduler=scheduler,
      force_zeros_for_empty_prompt=True, add_watermarker=False)
  pipe.save_pretrained(str(src), safe_serialization=True)
  return src, pipe


def run(pipe, prompts, latents, output_type="latent", steps=4, **kw):
  out = pipe(prompts, num_inference_steps=steps, guidance_scale=5.0, output_type=output_type,
             latents=torch.from_numpy(latents.transpose(0, 3, 1, 2)), **kw).images
  return out.numpy().transpose(0, 2, 3, 1) if output_type == "latent" else out


def test_text_encoders_give_transformers_penultimate_and_pooled_states(sdxl_dir):
  src, pipe = sdxl_dir
  ids = np.asarray(pipe.tokenizer_2(PROMPTS, padding="max_length", max_length=77,
                                    return_tensors="np").input_ids)
  assert ids[0, -1] != pipe.tokenizer_2.eos_token_id  # padded with "!", not end-of-text
  for name, ref in (("text_encoder", pipe.text_encoder), ("text_encoder_2", pipe.text_encoder_2)):
    fields, params = load_text_encoder(str(src / name))
    with torch.no_grad():
      want = ref(torch.from_numpy(ids), output_hidden_states=True)
    enc = CLIPTextEncoder(**fields)
    hidden, pooled = enc.apply({"params": params}, jnp.asarray(ids, jnp.int32),
                               penultimate=True, pooled=True)
    alone = enc.apply({"params": params}, jnp.asarray(ids, jnp.int32), penultimate=True)
    want_pooled = want.text_embeds if name == "text_encoder_2" else want.pooler_output
    diffs = (np.abs(np.asarray(hidden) - want.hidden_states[-2].numpy()).max(),
             np.abs(np.asarray(alone) - want.hidden_states[-2].numpy()).max(),
             np.abs(np.asarray(pooled) - want_pooled.numpy()).max())
    print(f"{name}: max |ours - transformers| penultimate {diffs[0]:.3g} (without the last "
          f"layer {diffs[1]:.3g}), pooled {diffs[2]:.3g}")
    assert max(diffs) < 1e-4
  assert fields["projection_dim"] == 32 and fields["eos_token_id"] == 2


def test_unet_with_size_conditioning_gives_diffusers_outputs():
  unet, ours, params, fields = build(unet_config(), diffusers.UNet2DConditionModel)
  assert fields["transformer_depth"] == (1, 2) and fields["attn_levels"] == (1,)
  assert (fields["added_cond_dim"], fields["added_time_dim"]) == (80, 8)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
  text, pooled = rng.normal(size=(2, 77, 64)), rng.normal(size=(2, 32))
  time_ids = np.array([[1024, 1024, 0, 0, 1024, 1024], [512, 768, 16, 8, 1024, 1024]], float)
  t = np.array([999, 10])
  f32 = lambda a: torch.from_numpy(np.asarray(a, np.float32))
  with torch.no_grad():
    want = unet(f32(x.transpose(0, 3, 1, 2)), torch.from_numpy(t), f32(text),
                added_cond_kwargs={"text_embeds": f32(pooled), "time_ids": f32(time_ids)}
                ).sample.numpy().transpose(0, 2, 3, 1)
  context = {"text": jnp.asarray(text, jnp.float32), "text_embeds": jnp.asarray(pooled,
             jnp.float32), "time_ids": jnp.asarray(time_ids, jnp.float32)}
  got = np.asarray(ours.apply(params, x, t, context=context))
  moved = np.asarray(ours.apply(params, x, t, context=dict(context, time_ids=context[
      "time_ids"][::-1])))
  diff, effect = np.abs(got - want).max(), np.abs(moved - got).max()
  print(f"SDXL U-Net: max |ours - diffusers| = {diff:.3g}; swapping the size ids moves it "
        f"{effect:.3g}")
  assert diff < 1e-4 < effect
  with pytest.raises(ValueError, match="takes context="):
    ours.apply(params, x, t, context=context["text"])


def test_pipeline_gives_diffusers_euler_latents_and_images(sdxl_dir):
  src, pipe = sdxl_dir
  ours = StableDiffusion.load(str(src))
  assert ours.zero_negative and ours.default_method() == "euler"
  latents = np.random.default_rng(0).normal(size=(2, 8, 8, 4)).astype(np.float32)
  want = run(pipe, PROMPTS, latents)
  got = ours.generate(PROMPTS, num_steps=4, guidance_scale=5.0, latents=latents, decode=False)
  effect = np.abs(run(pipe, PROMPTS[::-1], latents) - want).max()
  diff = np.abs(got - want).max()
  print(f"SDXL Euler latents: max |ours - diffusers| = {diff:.3g}; swapping the prompts moves "
        f"them {effect:.3g}")
  assert close(got, want, effect)
  # a negative prompt (encoded, not zeros) and SDXL's size conditioning
  kw = dict(negative_prompt="blurry", original_size=(32, 24), crops_coords_top_left=(4, 0))
  want_2 = run(pipe, PROMPTS, latents, **kw)
  got_2 = ours.generate(PROMPTS, "blurry", num_steps=4, guidance_scale=5.0, latents=latents,
                        decode=False, original_size=(32, 24), crops_coords_top_left=(4, 0))
  diff_2, effect_2 = np.abs(got_2 - want_2).max(), np.abs(want_2 - want).max()
  print(f"with a negative prompt and size ids: {diff_2:.3g} (they move diffusers' {effect_2:.3g})")
  assert close(got_2, want_2, effect_2)
  # the negative prompts' own size ids: used where both sizes are given (diffusers' rule).
  # One prompt: StableDiffusionXLPipeline repeats the [negative, prompt] pair of ids per image,
  # which gives the rows of a larger batch each other's ids
  neg = dict(negative_original_size=(16, 40), negative_crops_coords_top_left=(8, 8),
             negative_target_size=(20, 12))
  want_1 = run(pipe, PROMPTS[:1], latents[:1], **kw)
  for given in (neg, {"negative_original_size": (16, 40)}):
    want_n = run(pipe, PROMPTS[:1], latents[:1], **kw, **given)
    got_n = ours.generate(PROMPTS[:1], num_steps=4, guidance_scale=5.0, latents=latents[:1],
                          decode=False, **kw, **given)
    moved = np.abs(want_n - want_1).max()
    print(f"negative size ids {sorted(given)}: {np.abs(got_n - want_n).max():.3g} (they move "
          f"diffusers' {moved:.3g})")
    assert close(got_n, want_n, moved) if len(given) == 3 else moved == 0 and close(
        got_n, want_n, effect_2)
  with pytest.raises(TypeError, match="negative_original_sizes"):
    ours.generate(PROMPTS, num_steps=1, negative_original_sizes=(8, 8))
  # clip_skip 1: both encoders' states a layer before the penultimate (the negative prompt's
  # and the pooled embedding as they were, as diffusers)
  want_s = run(pipe, PROMPTS, latents, negative_prompt="blurry", clip_skip=1)
  got_s = ours.with_clip_skip(1).generate(PROMPTS, "blurry", num_steps=4, guidance_scale=5.0,
                                          latents=latents, decode=False)
  print(f"clip_skip 1: {np.abs(got_s - want_s).max():.3g} (it moves diffusers' "
        f"{np.abs(want_s - want_2).max():.3g})")
  assert close(got_s, want_s, np.abs(want_s - want_2).max())
  # one negative prompt each
  negatives = ["blurry", "a dog"]
  want_3 = run(pipe, PROMPTS, latents, negative_prompt=negatives)
  got_3 = ours.generate(PROMPTS, negatives, num_steps=4, guidance_scale=5.0, latents=latents,
                        decode=False)
  one = run(pipe, PROMPTS, latents, negative_prompt="blurry")
  assert close(got_3, want_3, np.abs(want_3 - one).max())
  # decoded (scaling_factor 0.13025): the same 8-bit images
  images = ours.generate(PROMPTS, num_steps=4, guidance_scale=5.0, latents=latents)
  diff = np.abs(images / 255.0 - run(pipe, PROMPTS, latents, "np")).max()
  assert images.shape == (2, 16, 16, 3) and diff <= 1.5 / 255, diff * 255
  # inpainting with the base's own U-Net, as StableDiffusionXLInpaintPipeline
  rng = np.random.default_rng(6)
  image_latents = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
  masks = np.zeros((2, 16, 16), bool)
  masks[:, 4:12, 2:10] = True
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
  want_i = diffusers.StableDiffusionXLInpaintPipeline(**pipe.components)(
      PROMPTS, image=nchw(image_latents), mask_image=nchw(masks[..., None].astype(np.float32)),
      masked_image_latents=nchw(image_latents), latents=nchw(latents), strength=1.0,
      height=16, width=16, num_inference_steps=4, guidance_scale=5.0, output_type="latent"
      ).images.numpy().transpose(0, 2, 3, 1)
  got_i = ours.inpaint(PROMPTS, np.zeros((2, 16, 16, 3), np.uint8), masks, image_latents,
                       num_steps=4, guidance_scale=5.0, latents=latents, decode=False)
  print(f"SDXL inpainting with the base U-Net: {np.abs(got_i - want_i).max():.3g}")
  assert close(got_i, want_i, np.abs(want_i - want).max())
  # DDIM and DPM-Solver++ from the same scheduler config, as diffusers' from_config
  for method, cls in (("ddim", diffusers.DDIMScheduler),
                      ("dpm_solver", diffusers.DPMSolverMultistepScheduler)):
    other = diffusers.StableDiffusionXLPipeline(
        **dict(pipe.components, scheduler=cls.from_config(pipe.scheduler.config)))
    want_m = run(other, PROMPTS, latents, steps=5)
    got_m = ours.generate(PROMPTS, num_steps=5, guidance_scale=5.0, latents=latents,
                          method=method, decode=False)
    print(f"{method}: max |ours - diffusers| = {np.abs(got_m - want_m).max():.3g}")
    assert close(got_m, want_m, effect)


@pytest.mark.parametrize("method", ["ddim", None])
def test_img2img_gives_diffusers_sdxl_img2img_latents(sdxl_dir, method):
  """SDEdit from latents with SDXL's conditioning, as StableDiffusionXLImg2ImgPipeline with
  DDIM from the pipeline's config, or by default the pipeline's Euler (the latents noised to
  the first step's sigma; the size ids: the image's), the same noise."""
  from diffusers.utils.torch_utils import randn_tensor
  src, pipe = sdxl_dir
  ours = StableDiffusion.load(str(src))
  sched = (diffusers.DDIMScheduler.from_config(pipe.scheduler.config) if method
           else pipe.scheduler)
  ref = diffusers.StableDiffusionXLImg2ImgPipeline(**dict(pipe.components, scheduler=sched))
  init = np.random.default_rng(4).normal(size=(2, 4, 8, 8)).astype(np.float32)
  run_ref = lambda strength, **kw: ref(
      PROMPTS, image=torch.from_numpy(init), strength=strength, num_inference_steps=5,
      guidance_scale=5.0, output_type="latent", generator=torch.Generator().manual_seed(3),
      **kw).images.numpy().transpose(0, 2, 3, 1)
  noise = randn_tensor((2, 4, 8, 8), generator=torch.Generator().manual_seed(3)).numpy()
  got = ours.img2img(PROMPTS, latents=init.transpose(0, 2, 3, 1), strength=0.6, num_steps=5,
                     guidance_scale=5.0, noise=noise.transpose(0, 2, 3, 1), decode=False,
                     method=method)
  want = run_ref(0.6)
  print(f"SDXL img2img ({method or 'euler'}) latents: max |ours - diffusers| = "
        f"{np.abs(got - want).max():.3g}")
  assert close(got, want, np.abs(run_ref(0.8) - want).max())
  if method is None:  # img2img's size ids: the negative prompts' sizes, the prompts' crop
    sizes = dict(crops_coords_top_left=(4, 0), negative_original_size=(16, 40),
                 negative_crops_coords_top_left=(8, 8))
    want_s = run_ref(0.6, **sizes)
    got_s = ours.img2img(PROMPTS, latents=init.transpose(0, 2, 3, 1), strength=0.6,
                         num_steps=5, guidance_scale=5.0, noise=noise.transpose(0, 2, 3, 1),
                         decode=False, **sizes)
    moved = np.abs(want_s - want).max()
    print(f"with size ids: {np.abs(got_s - want_s).max():.3g} (they move diffusers' "
          f"{moved:.3g})")
    assert close(got_s, want_s, moved)


def test_euler_spacings_karras_and_refusals(sdxl_dir, tmp_path, caplog):
  """Euler with "linspace" timesteps (fractional: the U-Net at t = 856.4, ...) and with Karras'
  sigmas gives diffusers' latents; options ours do not implement are refused when the method
  is asked for by name, and by default the pipeline samples with DDIM, with a warning."""
  src, ref_pipe = sdxl_dir
  copy = tmp_path / "linspace"
  shutil.copytree(src, copy)
  path = copy / "scheduler" / "scheduler_config.json"
  cfg = json.loads(path.read_text())
  latents = np.random.default_rng(3).normal(size=(2, 8, 8, 4)).astype(np.float32)
  leading = StableDiffusion.load(str(src)).generate(PROMPTS, num_steps=5, guidance_scale=5.0,
                                                    latents=latents, decode=False)
  for name, option in (("linspace", {"timestep_spacing": "linspace"}),
                       ("Karras", {"use_karras_sigmas": True})):
    path.write_text(json.dumps(dict(cfg, **option)))
    pipe = StableDiffusion.load(str(copy))
    assert pipe.default_method() == "euler"
    ref = diffusers.StableDiffusionXLPipeline(**dict(ref_pipe.components, scheduler=(
        diffusers.EulerDiscreteScheduler.from_config(dict(cfg, **option)))))
    want = run(ref, PROMPTS, latents, steps=5)
    got = pipe.generate(PROMPTS, num_steps=5, guidance_scale=5.0, latents=latents,
                        decode=False)
    print(f"Euler {name}: max |ours - diffusers| = {np.abs(got - want).max():.3g} (the "
          f"leading spacing's: {np.abs(leading - want).max():.3g})")
    assert close(got, want, np.abs(leading - want).max())
  path.write_text(json.dumps(dict(cfg, _class_name="EulerAncestralDiscreteScheduler",
                                  timestep_spacing="trailing")))  # SDXL-Turbo's
  pipe = StableDiffusion.load(str(copy))
  assert pipe.default_method() == "euler_ancestral"
  # SDXL-Turbo's guidance 0: no guidance, the prompts' prediction alone (diffusers' rule)
  turbo = diffusers.StableDiffusionXLPipeline(**dict(ref_pipe.components, scheduler=(
      diffusers.EulerDiscreteScheduler.from_config(dict(cfg, timestep_spacing="trailing")))))
  want_t = turbo(PROMPTS, num_inference_steps=1, guidance_scale=0.0, output_type="latent",
                 latents=torch.from_numpy(latents.transpose(0, 3, 1, 2))
                 ).images.numpy().transpose(0, 2, 3, 1)
  got_t = pipe.generate(PROMPTS, num_steps=1, guidance_scale=0.0, latents=latents,
                        decode=False, method="euler")
  guided = pipe.generate(PROMPTS, num_steps=1, guidance_scale=2.0, latents=latents,
                         decode=False, method="euler")
  print(f"guidance 0: max |ours - diffusers| = {np.abs(got_t - want_t).max():.3g}")
  assert close(got_t, want_t, np.abs(guided - want_t).max())
  x_T = latents[:1]
  ancestral, plain = (pipe.generate("a cat", num_steps=3, latents=x_T, method=m, decode=False)
                      for m in (None, "euler"))
  assert np.isfinite(ancestral).all() and np.abs(ancestral - plain).max() > 0.1  # new noise
  with pytest.raises(ValueError, match="'euler_ancestral'.*eta .* must be 0"):
    pipe.generate("a cat", num_steps=2, method="euler_ancestral", eta=0.5)
  path.write_text(json.dumps(dict(cfg, final_sigmas_type="sigma_min")))
  pipe = StableDiffusion.load(str(copy))
  with pytest.raises(ValueError, match="sets final_sigmas_type"):
    pipe.generate("a cat", num_steps=2, method="euler")
  assert pipe.default_method() == "ddim" and "sampling with DDIM instead" in caplog.text
  for option in ({"final_sigmas_type": "sigma_min"}, {"algorithm_type": "sde-dpmsolver++"},
                 {"solver_order": 3}, {"use_exponential_sigmas": True}):
    path.write_text(json.dumps(dict(cfg, **option)))
    pipe = StableDiffusion.load(str(copy))
    with pytest.raises(ValueError, match=f"sets {next(iter(option))}"):
      pipe.generate("a cat", num_steps=2, method="dpm_solver")
  assert pipe.generate("a cat", num_steps=2).shape == (1, 16, 16, 3)  # DDIM
  # "DPM++ 2M Karras": DPM-Solver over Karras' levels, as diffusers'
  karras = dict(cfg, use_karras_sigmas=True, timestep_spacing="leading")
  path.write_text(json.dumps(karras))
  pipe = StableDiffusion.load(str(copy))
  ref = diffusers.StableDiffusionXLPipeline(**dict(
      sdxl_dir[1].components, scheduler=diffusers.DPMSolverMultistepScheduler.from_config(karras)))
  want = run(ref, PROMPTS, latents, steps=6)
  got = pipe.generate(PROMPTS, num_steps=6, guidance_scale=5.0, latents=latents,
                      method="dpm_solver", decode=False)
  plain = StableDiffusion.load(str(src)).generate(PROMPTS, num_steps=6, guidance_scale=5.0,
                                                  latents=latents, method="dpm_solver",
                                                  decode=False)
  print(f"DPM-Solver++ Karras latents: max |ours - diffusers| = {np.abs(got - want).max():.3g}")
  assert close(got, want, np.abs(plain - want).max())
  with pytest.raises(ValueError, match="3 negative prompts for 1 prompts"):
    pipe.generate("a cat", ["a", "b", "c"], num_steps=2)


def test_half_pipelines_and_training_are_refused(sdxl_dir, tmp_path):
  src, _ = sdxl_dir
  refiner = tmp_path / "refiner"  # two text encoders and the refiner's conditioning
  shutil.copytree(src, refiner)
  index = json.loads((refiner / "model_index.json").read_text())
  (refiner / "model_index.json").write_text(json.dumps(dict(index,
                                                            requires_aesthetics_score=True)))
  with pytest.raises(ConversionError, match="has 2 and requires_aesthetics_score=True"):
    StableDiffusion.load(str(refiner))
  half = tmp_path / "half"
  shutil.copytree(src, half)
  shutil.rmtree(half / "text_encoder_2")
  with pytest.raises(ConversionError, match="needs text_encoder_2"):
    StableDiffusion.load(str(half))
  # the refiner's single file: OpenCLIP bigG as its only text encoder
  from safetensors.numpy import save_file
  one = np.ones(2, np.float32)
  save_file({"conditioner.embedders.0.model.ln_final.weight": one,
             "model.diffusion_model.out.0.weight": one}, str(tmp_path / "xl.safetensors"))
  with pytest.raises(ConversionError, match="SDXL refiner is not supported"):
    StableDiffusion.load_single_file(str(tmp_path / "xl.safetensors"), tokenizer=None)
  # training an imported SDXL U-Net is refused before anything is written
  from diffusion_jax.convert import import_diffusers_unet
  with pytest.raises(ConversionError, match="training it is not supported"):
    import_diffusers_unet(str(src), None, str(tmp_path / "work"))
  assert not os.path.exists(tmp_path / "work")


def test_single_file_in_stabilitys_naming_gives_the_pipelines_latents(sdxl_dir, tmp_path):
  """The miniature as one SDXL file (sgm's names: model.diffusion_model.* with label_emb and
  linear proj_in/out, conditioner.embedders.0.transformer.* and OpenCLIP's
  conditioner.embedders.1.model.*, first_stage_model.*): each part loads strictly through
  diffusers' own single-file converters, and load_single_file with the two tokenizers gives
  the pipeline's Euler latents and images."""
  from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint,
                                                   convert_open_clip_checkpoint)
  from safetensors.numpy import save_file
  from diffusion_jax.convert_diffusers import load_diffusers_unet
  from diffusion_jax.convert_ldm import ldm_state_dict
  src, pipe = sdxl_dir
  fields, params = load_diffusers_unet(str(src / "unet"))
  state = ldm_state_dict(params, fields, linear_proj=True)
  assert "model.diffusion_model.label_emb.0.2.weight" in state
  bigg = {"conditioner.embedders.1.model." + k: v for k, v in open_clip_state(
      {k: v.numpy() for k, v in pipe.text_encoder_2.state_dict().items()
       if k != "text_projection.weight"},
      projection=pipe.text_encoder_2.text_projection.weight.detach().numpy()).items()}
  for ours, convert, ref in (
      (state, lambda sd: convert_ldm_unet_checkpoint(sd, dict(pipe.unet.config)), pipe.unet),
      (bigg, lambda sd: convert_open_clip_checkpoint(
          type(pipe.text_encoder_2)(pipe.text_encoder_2.config), sd,
          prefix="conditioner.embedders.1.model."), pipe.text_encoder_2)):
    fresh = type(ref)(ref.config) if hasattr(ref.config, "to_dict") else type(ref)(**ref.config)
    fresh.load_state_dict(convert({k: torch.from_numpy(np.ascontiguousarray(v))
                                   for k, v in ours.items()}), strict=True)
    for name, value in ref.state_dict().items():
      np.testing.assert_array_equal(fresh.state_dict()[name].numpy(), value.numpy(), name)
  state.update(bigg)
  state.update({"conditioner.embedders.0.transformer.text_model." + k.removeprefix(
      "text_model."): v.numpy() for k, v in pipe.text_encoder.state_dict().items()})
  state.update({"first_stage_model." + k: v.numpy() for k, v in pipe.vae.state_dict().items()})
  path = str(tmp_path / "sdxl-mini.safetensors")
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path)
  with pytest.raises(ConversionError, match="needs its second tokenizer"):
    StableDiffusion.load_single_file(path, str(src / "tokenizer"))
  ours = StableDiffusion.load_single_file(path, str(src / "tokenizer"), heads={
      "head_channels": 16}, text_heads=4, tokenizer_2=str(src / "tokenizer_2"))
  assert ours.schedule["scheduler"] == "EulerDiscreteScheduler" and ours.sample_size == 128
  latents = np.random.default_rng(1).normal(size=(2, 8, 8, 4)).astype(np.float32)
  want, want_images = (run(pipe, PROMPTS, latents, output_type=kind) for kind in ("latent", "np"))
  got = ours.generate(PROMPTS, num_steps=4, guidance_scale=5.0, latents=latents, height=16,
                      width=16, decode=False)
  images = ours.generate(PROMPTS, num_steps=4, guidance_scale=5.0, latents=latents, height=16,
                         width=16)
  moved = ours.generate(PROMPTS[::-1], num_steps=4, guidance_scale=5.0, latents=latents,
                        height=16, width=16, decode=False)
  print(f"SDXL single file: max |ours - diffusers| latents {np.abs(got - want).max():.3g} "
        f"(the prompts swapped move them {np.abs(moved - want).max():.3g}), images "
        f"{np.abs(images / 255.0 - want_images).max() * 255:.2f} / 255")
  assert close(got, want, np.abs(moved - want).max())
  assert np.abs(images / 255.0 - want_images).max() <= 1.5 / 255
  from test_text_to_image import text_to_image_command
  args = (f"--src={path}", f"--tokenizer={src / 'tokenizer'}", "--prompt=an orange cat!",
          "--steps=2", "--height=16", "--width=16", f"--out={tmp_path / 'xl.png'}")
  proc = text_to_image_command(*args)
  assert "needs its second tokenizer" in proc.stderr and proc.returncode != 0
  proc = text_to_image_command(*args, f"--tokenizer_2={src / 'tokenizer_2'}")
  assert "context is neither" in proc.stderr  # the miniature's heads are not SDXL's
