"""Inpainting in JAX: a diffusers StableDiffusionInpaintPipeline directory in miniature (random
weights; the U-Net reads 9 channels: latents, mask, masked image's latents) converted and run
gives diffusers' latents; the command line repaints an image file under a mask file."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffusion_jax.stable_diffusion import StableDiffusion  # noqa: E402
from test_text_to_image import build_pipeline_dir, text_to_image_command  # noqa: E402

pytestmark = pytest.mark.parity
PROMPTS = ["the man on a photo", "an orange cat!"]


@pytest.fixture(scope="module")
def inpaint_dir(tmp_path_factory):
  return build_pipeline_dir("epsilon", tmp_path_factory, in_channels=9,
                            pipeline_cls=diffusers.StableDiffusionInpaintPipeline)


def inputs(seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  masks = np.zeros((2, 16, 16), bool)
  masks[0, 4:12, 2:10] = True  # repaint a square of the first image,
  masks[1, :, 8:] = True       # the right half of the second
  masked_latents = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
  x_T = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
  return images, masks, masked_latents, x_T


def diffusers_latents(pipe, images, masks, masked_latents, x_T, steps=4):
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
  out = pipe(PROMPTS, image=nchw(images.astype(np.float32) / 255),
             mask_image=nchw(masks[..., None].astype(np.float32)),
             masked_image_latents=nchw(masked_latents), latents=nchw(x_T), height=16, width=16,
             num_inference_steps=steps, guidance_scale=5.0, output_type="latent").images
  return out.numpy().transpose(0, 2, 3, 1)


def test_inpainting_gives_diffusers_latents(inpaint_dir):
  src, pipe = inpaint_dir
  ours = StableDiffusion.load(str(src))
  assert ours.inpainting and ours.unet.out_channels == 4
  images, masks, masked_latents, x_T = inputs()
  want = diffusers_latents(pipe, images, masks, masked_latents, x_T)
  got = ours.inpaint(PROMPTS, images, masks, masked_image_latents=masked_latents, num_steps=4,
                     guidance_scale=5.0, latents=x_T, decode=False)
  other_mask = diffusers_latents(pipe, images, ~masks, masked_latents, x_T)
  diff, effect = np.abs(got - want).max(), np.abs(other_mask - want).max()
  print(f"inpainting latents: max |ours - diffusers| = {diff:.3g}; inverting the masks moves "
        f"them {effect:.3g}")
  assert diff < effect / 100
  # from the images themselves (their masked latents a posterior sample), and with strength < 1
  for strength in (1.0, 0.5):
    out = ours.inpaint(PROMPTS, images, masks.astype(np.uint8) * 255, strength=strength,
                       num_steps=4, guidance_scale=5.0)
    assert out.shape == (2, 16, 16, 3) and out.dtype == np.uint8
  with pytest.raises(ValueError, match="use inpaint"):
    ours.generate(PROMPTS, num_steps=2)
  with pytest.raises(ValueError, match="masks of shape"):
    ours.inpaint(PROMPTS, images, masks[:, :8], num_steps=2)


def test_the_command_repaints_under_a_mask(inpaint_dir, tmp_path):
  from PIL import Image
  src, _ = inpaint_dir
  images, masks, _, _ = inputs(1)
  Image.fromarray(images[0]).save(tmp_path / "photo.png")
  Image.fromarray(masks[1].astype(np.uint8) * 255).save(tmp_path / "mask.png")
  out = tmp_path / "repainted.png"
  proc = text_to_image_command(f"--src={src}", "--prompt=a cat", "--steps=2", f"--out={out}",
                               f"--init_image={tmp_path / 'photo.png'}",
                               f"--mask_image={tmp_path / 'mask.png'}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert np.load(str(out).replace(".png", ".npz"))["arr_0"].shape == (1, 16, 16, 3)
  bad = text_to_image_command(f"--src={src}", "--prompt=a cat", f"--out={out}",
                              f"--mask_image={tmp_path / 'mask.png'}")
  assert bad.returncode != 0 and "--mask_image needs --init_image" in bad.stderr


def test_single_file_inpainting_unet_reads_back(inpaint_dir):
  """An inpainting U-Net in CompVis' names (sd-v1-5-inpainting's single file): 9 inputs, 4
  outputs, the same parameters."""
  import jax
  from diffusion_jax import convert_ldm
  from diffusion_jax.convert_diffusers import load_diffusers_unet
  src, _ = inpaint_dir
  fields, params = load_diffusers_unet(str(src / "unet"))
  state = convert_ldm.unet_state(convert_ldm.ldm_state_dict(params, fields))
  back = convert_ldm.unet_fields_from_ldm(state, {"num_heads": fields["num_heads"]})
  assert (back["in_channels"], back["output_channels"]) == (9, 4)
  again = convert_ldm.unet_params_from_ldm(state, dict(back, name="unet", image_size=8))
  assert jax.tree.structure(again) == jax.tree.structure(params)


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "EulerDiscreteScheduler"])
def test_plain_unet_inpainting_gives_diffusers_latents(tmp_path_factory, scheduler):
  """A plain (4-channel) U-Net repaints as diffusers' StableDiffusionInpaintPipeline does with
  one: after each step the latents outside the mask are the image's, noised to the next step's
  level (DDIM's timestep, Euler's sigma), and the image's own after the last."""
  src, base = build_pipeline_dir("epsilon", tmp_path_factory)
  sched = getattr(diffusers, scheduler).from_config(base.scheduler.config)
  pipe = diffusers.StableDiffusionInpaintPipeline(**dict(base.components, scheduler=sched))
  sched.save_pretrained(str(src / "scheduler"))
  ours = StableDiffusion.load(str(src))
  assert not ours.inpainting
  images, masks, image_latents, x_T = inputs(2)
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
  run = lambda m: pipe(PROMPTS, image=nchw(image_latents), mask_image=nchw(
      m[..., None].astype(np.float32)), latents=nchw(x_T), height=16, width=16,
      masked_image_latents=nchw(image_latents),  # (unread by a plain U-Net)
      num_inference_steps=4, guidance_scale=5.0, output_type="latent"
      ).images.numpy().transpose(0, 2, 3, 1)
  want = run(masks)
  got = ours.inpaint(PROMPTS, images, masks, masked_image_latents=image_latents, num_steps=4,
                     guidance_scale=5.0, latents=x_T, decode=False)
  diff, effect = np.abs(got - want).max(), np.abs(run(~masks) - want).max()
  print(f"plain U-Net inpainting ({scheduler}): max |ours - diffusers| = {diff:.3g}; "
        f"inverting the masks moves them {effect:.3g}")
  assert diff < effect / 100
  keep = ~masks[:, ::2, ::2]
  np.testing.assert_allclose(got[keep], image_latents[keep], atol=1e-6)  # the known region
  out = ours.inpaint(PROMPTS, images, masks, strength=0.6, num_steps=4, guidance_scale=5.0)
  assert out.shape == (2, 16, 16, 3) and out.dtype == np.uint8
