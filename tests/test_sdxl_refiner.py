"""The SDXL refiner in JAX: a diffusers StableDiffusionXLImg2ImgPipeline refiner in miniature
(OpenCLIP bigG alone, aesthetic-score conditioning, Euler) refines latents as diffusers' does,
alone (img2img) and as the second expert after the base (denoising_end / denoising_start)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusion_jax.stable_diffusion import StableDiffusion  # noqa: E402
from test_parity import randomise  # noqa: E402
from test_sdxl import PROMPTS, build_sdxl_dir, close, run, unet_config  # noqa: E402

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def base_and_refiner(tmp_path_factory):
  """The SDXL miniature and a refiner beside it: bigG (the base's second encoder), a U-Net
  attending to its 32 features with 5 time ids, the same VAE and scheduler."""
  src, base = build_sdxl_dir(tmp_path_factory)
  cfg = dict(unet_config(), cross_attention_dim=32,
             projection_class_embeddings_input_dim=32 + 5 * 8)
  unet = randomise(diffusers.UNet2DConditionModel(**cfg), 5)
  with torch.no_grad():
    for name, p in unet.named_parameters():
      if ".attn2." in name or "add_embedding" in name:
        p.mul_(4.0)
  refiner = diffusers.StableDiffusionXLImg2ImgPipeline(
      vae=base.vae, text_encoder=None, text_encoder_2=base.text_encoder_2, tokenizer=None,
      tokenizer_2=base.tokenizer_2, unet=unet.eval(), scheduler=base.scheduler,
      requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
  out = tmp_path_factory.mktemp("refiner")
  refiner.save_pretrained(str(out), safe_serialization=True)
  return (src, base), (out, refiner)


def test_refiner_img2img_gives_diffusers_latents(base_and_refiner):
  from diffusers.utils.torch_utils import randn_tensor
  _, (src, refiner) = base_and_refiner
  ours = StableDiffusion.load(str(src))
  assert ours.text_encoder is None and ours.aesthetic and not ours.zero_negative
  init = np.random.default_rng(4).normal(size=(2, 4, 8, 8)).astype(np.float32)
  noise = randn_tensor((2, 4, 8, 8), generator=torch.Generator().manual_seed(3)).numpy()
  kw = dict(strength=0.6, num_steps=5, guidance_scale=5.0, decode=False)
  got = ours.img2img(PROMPTS, latents=init.transpose(0, 2, 3, 1),
                     noise=noise.transpose(0, 2, 3, 1), **kw)
  scored = ours.img2img(PROMPTS, latents=init.transpose(0, 2, 3, 1),
                        noise=noise.transpose(0, 2, 3, 1), aesthetic_score=2.0,
                        negative_aesthetic_score=7.0, **kw)
  want, want_scored = (refiner(
      PROMPTS, image=torch.from_numpy(init), strength=0.6, num_inference_steps=5,
      guidance_scale=5.0, output_type="latent", generator=torch.Generator().manual_seed(3),
      **a).images.numpy().transpose(0, 2, 3, 1) for a in (
      {}, {"aesthetic_score": 2.0, "negative_aesthetic_score": 7.0}))
  moved = np.abs(want_scored - want).max()
  print(f"refiner img2img: max |ours - diffusers| = {np.abs(got - want).max():.3g}, with "
        f"other aesthetic scores {np.abs(scored - want_scored).max():.3g} (the scores move the "
        f"latents {moved:.3g})")
  assert close(got, want, moved) and close(scored, want_scored, moved)
  # the refiner's crop: the negative prompts' is their own ((0, 0) unless given)
  for crops in ({"crops_coords_top_left": (4, 0)},
                {"crops_coords_top_left": (4, 0), "negative_crops_coords_top_left": (2, 6),
                 "negative_original_size": (16, 40)}):
    want_c = refiner(PROMPTS, image=torch.from_numpy(init), strength=0.6, num_inference_steps=5,
                     guidance_scale=5.0, output_type="latent",
                     generator=torch.Generator().manual_seed(3),
                     **crops).images.numpy().transpose(0, 2, 3, 1)
    got_c = ours.img2img(PROMPTS, latents=init.transpose(0, 2, 3, 1),
                         noise=noise.transpose(0, 2, 3, 1), **crops, **kw)
    moved_c = np.abs(want_c - want).max()
    print(f"refiner with {sorted(crops)}: {np.abs(got_c - want_c).max():.3g} (they move "
          f"diffusers' {moved_c:.3g})")
    assert close(got_c, want_c, moved_c)
  with pytest.raises(ValueError, match="refiner refines"):
    ours.generate(PROMPTS, num_steps=2)


def test_base_then_refiner_gives_diffusers_latents(base_and_refiner):
  """The ensemble of experts: the base denoises to timestep 400 (denoising_end 0.6), the
  refiner from there (denoising_start 0.6), as diffusers' pipelines hand the latents over."""
  (base_src, base), (src, refiner) = base_and_refiner
  x_T = np.random.default_rng(5).normal(size=(2, 8, 8, 4)).astype(np.float32)
  want_mid = run(base, PROMPTS, x_T, steps=6, denoising_end=0.6)
  ours_base = StableDiffusion.load(str(base_src))
  mid = ours_base.generate(PROMPTS, num_steps=6, guidance_scale=5.0, latents=x_T,
                           decode=False, denoising_end=0.6)
  full = ours_base.generate(PROMPTS, num_steps=6, guidance_scale=5.0, latents=x_T,
                            decode=False)
  print(f"base to denoising_end: max |ours - diffusers| = {np.abs(mid - want_mid).max():.3g} "
        f"(the whole chain's end is {np.abs(full - want_mid).max():.3g} away)")
  assert close(mid, want_mid, np.abs(full - want_mid).max())
  want = refiner(PROMPTS, image=torch.from_numpy(want_mid.transpose(0, 3, 1, 2)),
                 num_inference_steps=6, denoising_start=0.6, guidance_scale=5.0,
                 output_type="latent").images.numpy().transpose(0, 2, 3, 1)
  got = StableDiffusion.load(str(src)).img2img(PROMPTS, latents=mid, num_steps=6,
                                               guidance_scale=5.0, denoising_start=0.6,
                                               decode=False)
  print(f"refiner from denoising_start: max |ours - diffusers| = {np.abs(got - want).max():.3g}"
        f" (from the base's end instead: {np.abs(full - want).max():.3g})")
  assert close(got, want, np.abs(full - want).max())
  with pytest.raises(ValueError, match="pass decode=False"):
    ours_base.generate(PROMPTS, num_steps=6, denoising_end=0.6)
  with pytest.raises(ValueError, match="no step of 6 is left"):
    ours_base.generate(PROMPTS, num_steps=6, denoising_end=0.01, decode=False)


def test_the_command_runs_base_and_refiner(base_and_refiner, tmp_path):
  from test_text_to_image import text_to_image_command
  (base_src, _), (src, _) = base_and_refiner
  proc = text_to_image_command(f"--src={base_src}", f"--refiner={src}", "--prompt=a cat",
                               "--steps=5", "--refiner_start=0.6", "--num_images=2",
                               f"--out={tmp_path / 'xl.png'}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  images = np.load(str(tmp_path / "xl.npz"))["arr_0"]
  assert images.shape == (2, 16, 16, 3) and images.std() > 0
