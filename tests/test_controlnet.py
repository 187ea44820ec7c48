"""ControlNet in JAX: diffusers' ControlNetModel (random weights, copied from a miniature Stable
Diffusion U-Net) converted gives its residuals, the U-Net takes them as diffusers' does, and a
StableDiffusionControlNetPipeline directory runs to diffusers' latents."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffusion_jax.convert_diffusers import (ConversionError,  # noqa: E402
                                             controlnet_config_from_diffusers, unet_fields,
                                             unet_params_from_diffusers)
from diffusion_jax.models.controlnet import ControlNet  # noqa: E402
from diffusion_jax.stable_diffusion import StableDiffusion  # noqa: E402
from test_parity import build, randomise  # noqa: E402
from test_sdxl import build_sdxl_dir  # noqa: E402
from test_text_to_image import (SD_UNET, build_pipeline_dir,  # noqa: E402
                                text_to_image_command)

pytestmark = pytest.mark.parity
PROMPTS = ["the man on a photo", "an orange cat!"]


def controlnet_for(unet, seed=5):
  """diffusers' ControlNet copied from `unet`, every weight (the zero convolutions too) random."""
  net = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
  return randomise(net, seed).eval()


def nchw(a):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32).transpose(0, 3, 1, 2)))


def test_controlnet_residuals_and_the_unet_with_them_match_diffusers():
  unet, ours, params, _ = build(SD_UNET, diffusers.UNet2DConditionModel)
  net = controlnet_for(unet)
  fields = controlnet_config_from_diffusers(dict(net.config, _class_name="ControlNetModel"))
  assert fields["embedding_channels"] == (16, 32)
  state = {k: v.numpy() for k, v in net.state_dict().items()}
  control = ControlNet(**unet_fields(fields))
  cparams = {"params": unet_params_from_diffusers(state, fields)}
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
  hint = rng.uniform(size=(2, 16, 16, 3)).astype(np.float32)
  text = rng.normal(size=(2, 77, 32)).astype(np.float32)
  t = np.array([999, 10])
  with torch.no_grad():
    down, mid = net(nchw(x), torch.from_numpy(t), torch.from_numpy(text), nchw(hint),
                    conditioning_scale=0.7, return_dict=False)
    want = unet(nchw(x), torch.from_numpy(t), torch.from_numpy(text),
                down_block_additional_residuals=down,
                mid_block_additional_residual=mid).sample.numpy().transpose(0, 2, 3, 1)
  skips, middle = control.apply(cparams, x, t, context=text, hint=hint, scale=0.7)
  assert len(skips) == len(down) == 4  # conv_in, level 0 block and down-sampling, level 1
  diffs = [np.abs(np.asarray(a) - b.numpy().transpose(0, 2, 3, 1)).max()
           for a, b in zip(skips + [middle], list(down) + [mid])]
  got = np.asarray(ours.apply(params, x, t, context=text, residuals=(skips, middle)))
  alone = np.asarray(ours.apply(params, x, t, context=text))
  diff, effect = np.abs(got - want).max(), np.abs(alone - want).max()
  print(f"ControlNet residuals: max |ours - diffusers| = {max(diffs):.3g}; the U-Net with them "
        f"{diff:.3g} (without them it differs by {effect:.3g})")
  assert max(diffs) < 1e-4 and diff < min(1e-4, effect / 100)
  with pytest.raises(ValueError, match="reads 16x16 for 8x8 latents"):
    control.apply(cparams, x, t, context=text, hint=hint[:, :8, :8])
  with pytest.raises(ConversionError, match="bgr"):
    controlnet_config_from_diffusers(dict(net.config, controlnet_conditioning_channel_order="bgr"))


@pytest.fixture(scope="module")
def controlnet_dir(tmp_path_factory):
  return build_pipeline_dir("epsilon", tmp_path_factory, cross_gain=1.0,
                            pipeline_cls=diffusers.StableDiffusionControlNetPipeline,
                            controlnet=controlnet_for)


def test_controlnet_pipeline_gives_diffusers_latents(controlnet_dir):
  src, pipe = controlnet_dir
  ours = StableDiffusion.load(str(src))  # its controlnet/ folder, found
  rng = np.random.default_rng(1)
  hints = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  x_T = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
  run = lambda h, scale=0.8: pipe(
      PROMPTS, image=nchw(h / 255.0), latents=nchw(x_T), num_inference_steps=4,
      guidance_scale=5.0, controlnet_conditioning_scale=scale,
      output_type="latent").images.numpy().transpose(0, 2, 3, 1)
  want = run(hints)
  got = ours.generate(PROMPTS, num_steps=4, guidance_scale=5.0, latents=x_T, decode=False,
                      control_image=hints, control_scale=0.8)
  effect = np.abs(run(hints[::-1]) - want).max()
  diff = np.abs(got - want).max()
  print(f"ControlNet pipeline latents: max |ours - diffusers| = {diff:.3g}; swapping the hints "
        f"moves them {effect:.3g}")
  assert diff < effect / 100
  with pytest.raises(ValueError, match="pass control_image"):
    ours.generate(PROMPTS, num_steps=2)
  with pytest.raises(ValueError, match="control_image: uint8"):
    ours.generate(PROMPTS, num_steps=2, control_image=hints[:, :8])
  # img2img with the hint, as StableDiffusionControlNetImg2ImgPipeline (the same noise)
  from diffusers.utils.torch_utils import randn_tensor
  ref = diffusers.StableDiffusionControlNetImg2ImgPipeline(**pipe.components)
  z0 = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
  run_i2i = lambda h: ref(
      PROMPTS, image=nchw(z0), control_image=nchw(h / 255.0), strength=0.5,
      num_inference_steps=6, guidance_scale=5.0, controlnet_conditioning_scale=0.8,
      output_type="latent", generator=torch.Generator().manual_seed(3)
  ).images.numpy().transpose(0, 2, 3, 1)
  noise = randn_tensor((2, 4, 8, 8), generator=torch.Generator().manual_seed(3)).numpy()
  want = run_i2i(hints)
  got = ours.img2img(PROMPTS, latents=z0, strength=0.5, num_steps=6, guidance_scale=5.0,
                     noise=noise.transpose(0, 2, 3, 1), decode=False, control_image=hints,
                     control_scale=0.8)
  diff, effect = np.abs(got - want).max(), np.abs(run_i2i(hints[::-1]) - want).max()
  print(f"ControlNet img2img latents: max |ours - diffusers| = {diff:.3g}; swapping the hints "
        f"moves them {effect:.3g}")
  assert diff < effect / 100
  with pytest.raises(ValueError, match="pass control_image"):
    ours.img2img(PROMPTS, latents=z0, num_steps=2)


def test_control_guidance_and_guess_mode_give_diffusers_latents(controlnet_dir):
  """control_guidance (diffusers' control_guidance_start / _end: the ControlNet in steps 2-3
  of 4, and of the steps img2img runs) and guess_mode (the prompts' half alone, residuals
  0.1 -> 1 over the blocks) as diffusers' ControlNet pipelines run them."""
  src, pipe = controlnet_dir
  ours = StableDiffusion.load(str(src))
  rng = np.random.default_rng(7)
  hints = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  x_T = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
  run = lambda **kw: pipe(PROMPTS, image=nchw(hints / 255.0), latents=nchw(x_T),
                          num_inference_steps=4, guidance_scale=5.0, output_type="latent",
                          **kw).images.numpy().transpose(0, 2, 3, 1)
  full = run()
  for theirs, mine in (
      ({"control_guidance_start": 0.25, "control_guidance_end": 0.75},
       {"control_guidance": (0.25, 0.75)}),
      ({"guess_mode": True}, {"guess_mode": True}),
      ({"guess_mode": True, "control_guidance_end": 0.5},
       {"guess_mode": True, "control_guidance": (0.0, 0.5)})):
    want = run(**theirs)
    got = ours.generate(PROMPTS, num_steps=4, guidance_scale=5.0, latents=x_T, decode=False,
                        control_image=hints, **mine)
    diff, moved = np.abs(got - want).max(), np.abs(want - full).max()
    print(f"ControlNet {mine}: max |ours - diffusers| = {diff:.3g} (it moves diffusers' "
          f"{moved:.3g})")
    assert diff < moved / 100
  from diffusers.utils.torch_utils import randn_tensor
  ref = diffusers.StableDiffusionControlNetImg2ImgPipeline(**pipe.components)
  z0 = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
  noise = randn_tensor((2, 4, 8, 8), generator=torch.Generator().manual_seed(3)).numpy()
  run_i2i = lambda **kw: ref(
      PROMPTS, image=nchw(z0), control_image=nchw(hints / 255.0), strength=0.5,
      num_inference_steps=8, guidance_scale=5.0, output_type="latent",
      generator=torch.Generator().manual_seed(3), **kw).images.numpy().transpose(0, 2, 3, 1)
  want, full = run_i2i(control_guidance_start=0.5), run_i2i()
  got = ours.img2img(PROMPTS, latents=z0, strength=0.5, num_steps=8, guidance_scale=5.0,
                     noise=noise.transpose(0, 2, 3, 1), decode=False, control_image=hints,
                     control_guidance=(0.5, 1.0))
  diff, moved = np.abs(got - want).max(), np.abs(want - full).max()
  print(f"ControlNet img2img from half its 4 steps: {diff:.3g} (it moves diffusers' "
        f"{moved:.3g})")
  assert diff < moved / 100
  with pytest.raises(ValueError, match="0 <= start < end <= 1"):
    ours.generate(PROMPTS, num_steps=2, control_image=hints, control_guidance=(0.6, 0.4))


def test_two_controlnets_give_diffusers_multicontrolnet_latents(controlnet_dir, tmp_path):
  """Two ControlNets, each with its hint and scale, their residuals summed, as diffusers'
  MultiControlNetModel; and on the command line (the flags repeated)."""
  src, pipe = controlnet_dir
  second = controlnet_for(pipe.unet, seed=9)
  second.save_pretrained(str(tmp_path / "second"))
  ours = StableDiffusion.load(str(src), controlnet=[str(src / "controlnet"),
                                                   str(tmp_path / "second")])
  assert len(ours.controlnet) == 2
  ref = diffusers.StableDiffusionControlNetPipeline(**dict(
      pipe.components, controlnet=[pipe.controlnet, second]))
  rng = np.random.default_rng(4)
  hints = [rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8) for _ in range(2)]
  x_T = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
  run = lambda h, scales: ref(
      PROMPTS, image=[nchw(a / 255.0) for a in h], latents=nchw(x_T), num_inference_steps=4,
      guidance_scale=5.0, controlnet_conditioning_scale=scales,
      output_type="latent").images.numpy().transpose(0, 2, 3, 1)
  want = run(hints, [0.8, 1.3])
  got = ours.generate(PROMPTS, num_steps=4, guidance_scale=5.0, latents=x_T, decode=False,
                      control_image=hints, control_scale=[0.8, 1.3])
  first_only = run(hints, [0.8, 0.0])
  diff, effect = np.abs(got - want).max(), np.abs(first_only - want).max()
  print(f"two ControlNets: max |ours - diffusers| = {diff:.3g}; the second moves them "
        f"{effect:.3g}")
  assert diff < effect / 100
  with pytest.raises(ValueError, match="1 control images for 2 ControlNets"):
    ours.generate(PROMPTS, num_steps=2, control_image=hints[0])
  with pytest.raises(ValueError, match="3 control scales for 2 ControlNets"):
    ours.generate(PROMPTS, num_steps=2, control_image=hints, control_scale=[1, 1, 1])
  from PIL import Image
  for i, h in enumerate(hints):
    Image.fromarray(h[0]).save(tmp_path / f"hint{i}.png")
  proc = text_to_image_command(
      f"--src={src}", f"--controlnet={src / 'controlnet'}", f"--controlnet={tmp_path / 'second'}",
      f"--control_image={tmp_path / 'hint0.png'}", f"--control_image={tmp_path / 'hint1.png'}",
      "--control_scale=0.5", "--control_scale=0.7", "--prompt=a cat", "--steps=2",
      f"--out={tmp_path / 'two.png'}")
  assert proc.returncode == 0, proc.stderr[-2000:]


def test_controlnet_inpainting_gives_diffusers_latents(controlnet_dir):
  """A ControlNet guiding inpainting with the plain U-Net (the known region put back after
  each step), as StableDiffusionControlNetInpaintPipeline; the ControlNet reads the latents."""
  src, pipe = controlnet_dir
  ours = StableDiffusion.load(str(src))
  ref = diffusers.StableDiffusionControlNetInpaintPipeline(**pipe.components)
  rng = np.random.default_rng(6)
  hints = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  image_latents = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
  x_T = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
  masks = np.zeros((2, 16, 16), bool)
  masks[:, 2:14, 4:12] = True
  # (this pipeline encodes images only: its encoder gives our image latents)
  ref._encode_vae_image = lambda image, generator: nchw(image_latents)
  run = lambda h, **kw: ref(
      PROMPTS, image=nchw(np.zeros((2, 16, 16, 3))), mask_image=nchw(masks[..., None]),
      control_image=nchw(h / 255.0), latents=nchw(x_T), height=16, width=16,
      num_inference_steps=4, guidance_scale=5.0, output_type="latent",
      **kw).images.numpy().transpose(0, 2, 3, 1)
  want = run(hints, controlnet_conditioning_scale=0.8)
  inpaint = lambda **kw: ours.inpaint(
      PROMPTS, np.zeros((2, 16, 16, 3), np.uint8), masks, image_latents, num_steps=4,
      guidance_scale=5.0, latents=x_T, decode=False, control_image=hints, **kw)
  got = inpaint(control_scale=0.8)
  diff = np.abs(got - want).max()
  effect = np.abs(run(hints[::-1], controlnet_conditioning_scale=0.8) - want).max()
  print(f"ControlNet inpainting latents: max |ours - diffusers| = {diff:.3g}; swapping the "
        f"hints moves them {effect:.3g}")
  assert diff < effect / 100
  # the default scale, diffusers' pipeline's (0.5 here)
  want_d = run(hints)
  assert np.abs(inpaint() - want_d).max() < np.abs(want_d - want).max() / 100


def test_the_command_guides_with_a_control_image(controlnet_dir, tmp_path):
  from PIL import Image
  src, _ = controlnet_dir
  Image.fromarray(np.random.default_rng(2).integers(0, 256, (24, 20, 3), np.uint8)).save(
      tmp_path / "edges.png")
  out = tmp_path / "guided.png"
  proc = text_to_image_command(f"--src={src}", f"--controlnet={src / 'controlnet'}",
                               f"--control_image={tmp_path / 'edges.png'}", "--prompt=a cat",
                               "--steps=2", "--control_scale=0.5", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert np.load(str(out).replace(".png", ".npz"))["arr_0"].shape == (1, 16, 16, 3)
  bad = text_to_image_command(f"--src={src}", "--prompt=a cat", "--steps=2", f"--out={out}")
  assert bad.returncode != 0 and "pass control_image" in bad.stderr
  # img2img guided by the hint, resized to the init image's (rounded) size
  Image.fromarray(np.full((20, 18, 3), 200, np.uint8)).save(tmp_path / "init.png")
  proc = text_to_image_command(f"--src={src}", f"--control_image={tmp_path / 'edges.png'}",
                               f"--init_image={tmp_path / 'init.png'}", "--prompt=a cat",
                               "--steps=4", "--strength=0.5", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert np.load(str(out).replace(".png", ".npz"))["arr_0"].shape == (1, 20, 16, 3)


def test_sdxl_controlnet_pipeline_gives_diffusers_latents(tmp_path_factory, tmp_path):
  """A ControlNet copied from SDXL's U-Net (its pooled-text and size conditioning too)
  against StableDiffusionXLControlNetPipeline."""
  src, pipe = build_sdxl_dir(tmp_path_factory)
  net = randomise(diffusers.ControlNetModel.from_unet(
      pipe.unet, conditioning_embedding_out_channels=(16, 32)), 6).eval()
  net.save_pretrained(str(tmp_path / "controlnet"), safe_serialization=True)
  ref = diffusers.StableDiffusionXLControlNetPipeline(
      **{k: v for k, v in pipe.components.items()
         if k not in ("image_encoder", "feature_extractor")},
      controlnet=net, add_watermarker=False)
  ours = StableDiffusion.load(str(src), controlnet=str(tmp_path / "controlnet"))
  rng = np.random.default_rng(7)
  hints = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  x_T = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
  run = lambda h: ref(PROMPTS, image=nchw(h / 255.0), latents=nchw(x_T), num_inference_steps=4,
                      guidance_scale=5.0, controlnet_conditioning_scale=0.8,
                      output_type="latent").images.numpy().transpose(0, 2, 3, 1)
  want = run(hints)
  got = ours.generate(PROMPTS, num_steps=4, guidance_scale=5.0, latents=x_T, decode=False,
                      control_image=hints, control_scale=0.8)
  diff, effect = np.abs(got - want).max(), np.abs(run(hints[::-1]) - want).max()
  print(f"SDXL ControlNet latents: max |ours - diffusers| = {diff:.3g}; swapping the hints "
        f"moves them {effect:.3g}")
  assert diff < effect / 100
