"""IP-Adapter: CLIP's image encoder against transformers' CLIPVisionModelWithProjection, the
image preprocessing against CLIPImageProcessor, and an IP-Adapter file in h94/IP-Adapter's
format loaded into the miniature Stable Diffusion pipeline against diffusers'
load_ip_adapter (random weights)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from diffusion_jax.convert_clip import load_vision_encoder  # noqa: E402
from diffusion_jax.convert_diffusers import ConversionError  # noqa: E402
from diffusion_jax.models.clip_vision import CLIPVisionEncoder, preprocess  # noqa: E402
from diffusion_jax.stable_diffusion import StableDiffusion  # noqa: E402
from test_parity import randomise  # noqa: E402
from test_text_to_image import build_pipeline_dir, text_to_image_command  # noqa: E402

pytestmark = pytest.mark.parity


def image_encoder(directory, width=32, projection=24):
  """A CLIPVisionModelWithProjection miniature (28x28 images, 2x2 patches of 14) saved to
  `directory`."""
  cfg = transformers.CLIPVisionConfig(
      hidden_size=width, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
      image_size=28, patch_size=14, projection_dim=projection, hidden_act="gelu")
  model = randomise(transformers.CLIPVisionModelWithProjection(cfg), 3).eval()
  model.save_pretrained(str(directory))
  return model


def test_image_encoder_and_preprocessing_match_transformers(tmp_path):
  ref = image_encoder(tmp_path / "enc")
  fields, params = load_vision_encoder(str(tmp_path / "enc"))
  assert (fields["image_size"], fields["patch_size"], fields["projection_dim"]) == (28, 14, 24)
  x = np.random.default_rng(0).normal(size=(2, 3, 28, 28)).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(x), output_hidden_states=True)
  embeds, penultimate = CLIPVisionEncoder(**fields).apply(
      {"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)))
  diff = np.abs(np.asarray(embeds) - want.image_embeds.numpy()).max()
  diff_h = np.abs(np.asarray(penultimate) - want.hidden_states[-2].numpy()).max()
  print(f"image embeds: max |ours - transformers| = {diff:.3g}; hidden_states[-2]: {diff_h:.3g}")
  assert diff < 1e-5 and diff_h < 1e-5
  with pytest.raises(ValueError, match=r"\[B, 28, 28, 3\]"):
    CLIPVisionEncoder(**fields).apply({"params": params}, jnp.zeros((1, 32, 32, 3)))
  # the shorter side to 224 (bicubic), the centre crop, CLIP's mean and std
  processor = transformers.CLIPImageProcessor()
  level = 1 / 255 / min(processor.image_std)  # one grey level, normalised
  for shape in ((250, 301, 3), (301, 250, 3)):
    image = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    want = processor(image, return_tensors="np").pixel_values[0].transpose(1, 2, 0)
    got = preprocess([image])[0]
    diff = np.abs(got - want)
    print(f"{shape}: preprocessing max |ours - CLIPImageProcessor| = {diff.max():.3g} "
          f"(one grey level: {level:.3g}), mean {diff.mean():.2g}")
    assert got.shape == (224, 224, 3) and diff.max() <= level * 1.01 and diff.mean() < 1e-3


def ip_adapter_state(unet, embed_dim, seed=5, plus=False):
  """Random IP-Adapter tensors for a diffusers U-Net in h94/IP-Adapter's names (numpy); plus:
  IP-Adapter Plus's resampler (4 blocks, 1 head of 64, 6 queries 48 wide) of embed_dim-wide
  image encoder states."""
  rng = np.random.default_rng(seed)
  d = unet.config.cross_attention_dim
  r = lambda *shape, scale=0.3: rng.normal(size=shape) * scale
  state = {"image_proj.proj.weight": r(4 * d, embed_dim), "image_proj.proj.bias": r(4 * d),
           "image_proj.norm.weight": 1 + r(d), "image_proj.norm.bias": r(d)}
  if plus:
    h = 48
    state = {"image_proj.latents": r(1, 6, h, scale=1.0), "image_proj.proj_in.weight":
             r(h, embed_dim), "image_proj.proj_in.bias": r(h), "image_proj.proj_out.weight":
             r(d, h), "image_proj.proj_out.bias": r(d), "image_proj.norm_out.weight": 1 + r(d),
             "image_proj.norm_out.bias": r(d)}
    for i in range(4):
      for name, shape in (("0.to_q", (64, h)), ("0.to_kv", (128, h)), ("0.to_out", (h, 64)),
                          ("1.1", (4 * h, h)), ("1.3", (h, 4 * h))):
        state[f"image_proj.layers.{i}.{name}.weight"] = r(*shape, scale=h ** -0.5)
      for norm in ("0.norm1", "0.norm2", "1.0"):
        state[f"image_proj.layers.{i}.{norm}.weight"] = 1 + r(h, scale=0.1)
        state[f"image_proj.layers.{i}.{norm}.bias"] = r(h, scale=0.1)
  key_id = 1  # the cross-attentions in diffusers' order of the attention processors: 1, 3, ...
  for name in unet.attn_processors:
    if name.endswith("attn2.processor"):
      width = unet.get_submodule(name.removesuffix(".processor")).to_q.out_features
      for proj in ("to_k_ip", "to_v_ip"):
        state[f"ip_adapter.{key_id}.{proj}.weight"] = rng.normal(size=(width, d)) * 0.6
      key_id += 2
  return {k: np.asarray(v, np.float32) for k, v in state.items()}


@pytest.mark.parametrize("layout", ["sd2", "sdxl"])
def test_unet_with_ip_adapter_matches_diffusers(layout):
  """SD 2.x's layout in miniature (two transformer blocks per attention) and SDXL's (its
  context a dict, blocks 1 and 2 deep): the numbering of the cross-attentions over blocks,
  levels and the middle block (and the self-attentions' names, which PAG chooses by)."""
  import jax
  from diffusion_jax.convert_ip_adapter import ip_adapter_params
  from diffusion_jax.models.ip_adapter import ImageProjection
  from test_cross_attention import SD2
  from test_parity import build
  from test_sdxl import unet_config
  ref, ours, params, _ = build(SD2 if layout == "sd2" else unet_config(),
                               diffusers.UNet2DConditionModel)
  state = ip_adapter_state(ref, 12)
  ref._load_ip_adapter_weights([{
      group: {k.removeprefix(group + "."): torch.from_numpy(v) for k, v in state.items()
              if k.startswith(group + ".")} for group in ("image_proj", "ip_adapter")}])
  module, projection, layers = ip_adapter_params(state, ours)
  # PAG's names of the self-attentions (models/pag.py) are diffusers' too
  from diffusion_jax.models.pag import self_attention_names
  assert set(self_attention_names(ours)) == {
      name for name, _ in ref.named_modules() if name.endswith(".attn1")}
  # SD 2.x: 2 blocks x (2 down, 4 up attentions, the middle one); SDXL: 2 x (1 + 2 + 1)
  assert len(layers) == {"sd2": 14, "sdxl": 8}[layout]
  params = jax.tree.map(np.asarray, params)
  for path, layer in layers.items():
    node = params["params"]
    for name in path:
      node = node[name]
    node.update(layer)
  rng = np.random.default_rng(0)
  size, d = (16, 24) if layout == "sd2" else (8, 64)
  x = rng.normal(size=(2, 4, size, size)).astype(np.float32)
  ctx, embeds = rng.normal(size=(2, 7, d)).astype(np.float32), rng.normal(size=(2, 12))
  t = np.array([999, 20])
  added = {}
  if layout == "sdxl":  # the pooled text and the size ids
    added = {"text_embeds": rng.normal(size=(2, 32)).astype(np.float32),
             "time_ids": np.array([[512, 512, 0, 0, 512, 512]] * 2, np.float32)}
  with torch.no_grad():
    image_embeds = [torch.tensor(embeds[:, None], dtype=torch.float32)]  # one image each
    want = ref(torch.from_numpy(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(
        ctx), added_cond_kwargs={"image_embeds": image_embeds, **{
            k: torch.from_numpy(v) for k, v in added.items()}}).sample.numpy()
  assert module == ImageProjection(d, 4)
  tokens = module.apply({"params": projection}, jnp.asarray(embeds, jnp.float32))
  apply = lambda context: np.asarray(ours.apply(params, jnp.asarray(x.transpose(0, 2, 3, 1)),
                                                jnp.asarray(t), context=context))
  text = {"text": jnp.asarray(ctx), **added} if added else jnp.asarray(ctx)
  got = apply({"text": jnp.asarray(ctx), **added, "ip_tokens": (tokens,),
               "ip_scale": jnp.ones((2, 1))})
  diff = np.abs(got.transpose(0, 3, 1, 2) - want).max()
  moved = np.abs(apply(text) - got).max()
  print(f"{layout} U-Net with an IP-Adapter: max |ours - diffusers| = {diff:.3g} (the image "
        f"tokens move it {moved:.3g})")
  assert diff < 1e-4 and moved > 0.02


@pytest.fixture(scope="module")
def ip_pipeline(tmp_path_factory):
  """(the miniature SD pipeline's directory with an image encoder, the diffusers pipeline,
  {"plain": an IP-Adapter file written there, "plus": an IP-Adapter Plus one})."""
  from safetensors.numpy import save_file
  src, pipe = build_pipeline_dir("epsilon", tmp_path_factory)
  image_encoder(src / "image_encoder", projection=24)
  files = {"plain": src / "ip-adapter.safetensors", "plus": src / "ip-adapter-plus.safetensors"}
  save_file(ip_adapter_state(pipe.unet, 24), str(files["plain"]))
  save_file(ip_adapter_state(pipe.unet, 32, plus=True), str(files["plus"]))
  return src, pipe, files


@pytest.mark.parametrize("variant,scale", [("plain", 1.0), ("plus", 0.5),
                                           ("plain+plus", (0.6, 0.8))])
def test_ip_adapter_gives_diffusers_latents(ip_pipeline, variant, scale):
  """The plain adapter (the projected embedding; scale 1), IP-Adapter Plus (the resampled
  patch states; scale 0.5) and both at once (an image prompt each), loaded into both
  pipelines."""
  src, pipe, files = ip_pipeline
  paths = [files[v] for v in variant.split("+")]
  ours = StableDiffusion.load(str(src)).with_ip_adapter([str(p) for p in paths],
                                                        str(src / "image_encoder"))
  pipe.load_ip_adapter(str(src), subfolder="", weight_name=[p.name for p in paths],
                       image_encoder_folder="image_encoder")
  rng = np.random.default_rng(2)
  pixels = [rng.normal(size=(1, 28, 28, 3)).astype(np.float32) for _ in paths]
  latents = np.random.default_rng(1).normal(size=(1, 8, 8, 4)).astype(np.float32)
  pipe.set_ip_adapter_scale(list(scale) if len(paths) > 1 else scale)
  images = lambda xs: xs if len(paths) > 1 else xs[0]
  try:
    want = pipe("an orange cat!", num_inference_steps=3, guidance_scale=5.0,
                output_type="latent", ip_adapter_image=images(
                    [torch.from_numpy(x.transpose(0, 3, 1, 2)) for x in pixels]),
                latents=torch.from_numpy(latents.transpose(0, 3, 1, 2))).images
  finally:
    pipe.unload_ip_adapter()
  want = want.numpy().transpose(0, 2, 3, 1)
  run = lambda pipeline, **kw: pipeline.generate(["an orange cat!"], num_steps=3,
                                                 guidance_scale=5.0, latents=latents,
                                                 decode=False, **kw)
  got = run(ours, ip_adapter_image=images(pixels), ip_adapter_scale=scale)
  other = run(ours, ip_adapter_image=images([-x for x in pixels]), ip_adapter_scale=scale)
  diff, moved = np.abs(got - want).max(), np.abs(other - want).max()
  print(f"IP-Adapter {variant} (scale {scale}) latents: max |ours - diffusers| = {diff:.3g} "
        f"(other image prompts: {moved:.3g})")
  assert diff < 1e-4 and moved > 0.01
  if variant == "plain+plus":
    with pytest.raises(ValueError, match="a list of 2 image prompts"):
      run(ours, ip_adapter_image=pixels[0])
    with pytest.raises(ValueError, match="one per adapter"):
      run(ours, ip_adapter_image=pixels, ip_adapter_scale=(1.0, 1.0, 1.0))
  if variant == "plain":  # the pipeline without the adapter, and refusals
    pixels = pixels[0]
    plain = StableDiffusion.load(str(src))
    assert "image_encoder" not in plain.params
    with pytest.raises(ValueError, match="with_ip_adapter"):
      run(plain, ip_adapter_image=pixels)
    with pytest.raises(ValueError, match="2 image prompts for 1 prompts"):
      run(ours, ip_adapter_image=np.concatenate([pixels, pixels]))
    with pytest.raises(ConversionError, match="pickles"):
      plain.with_ip_adapter(str(paths[0]).replace(".safetensors", ".bin"),
                            str(src / "image_encoder"))


def test_ip_adapter_files_for_another_model_are_refused(ip_pipeline, tmp_path):
  from safetensors.numpy import load_file, save_file
  src, _, files = ip_pipeline
  path = files["plain"]
  plain = StableDiffusion.load(str(src))
  state = load_file(str(path))
  cases = {"another model": {k: v for k, v in state.items() if not k.startswith("ip_adapter.7")},
           "Full Face": {k.replace("image_proj.proj.", "image_proj.proj.0."): v
                         for k, v in state.items()},
           "another image encoder": load_file(str(files["plus"])) | {
               "image_proj.proj_in.weight": np.zeros((48, 24), np.float32)},
           "reads 16": {k: (v[:, :16] if ".to_" in k else v) for k, v in state.items()}}
  for message, bad in cases.items():
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ConversionError, match=message):
      plain.with_ip_adapter(str(tmp_path / "bad.safetensors"), str(src / "image_encoder"))


def test_the_command_takes_image_prompts(ip_pipeline, tmp_path):
  """Two adapters (plain and Plus), an image prompt and a scale each."""
  from PIL import Image
  src, _, files = ip_pipeline
  rng = np.random.default_rng(0)
  for name, size in (("style", (40, 30)), ("face", (20, 24))):
    image = rng.integers(0, 256, size + (3,), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / f"{name}.png")
  args = [f"--src={src}", "--prompt=a cat", "--steps=2", f"--out={tmp_path / 'grid.png'}",
          f"--ip_adapter={files['plain']}", f"--image_encoder={src / 'image_encoder'}",
          f"--ip_adapter_image={tmp_path / 'style.png'}"]
  proc = text_to_image_command(*args, f"--ip_adapter={files['plus']}",
                               f"--ip_adapter_image={tmp_path / 'face.png'}",
                               "--ip_adapter_scale=0.6", "--ip_adapter_scale=0.4")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert np.load(str(tmp_path / "grid.npz"))["arr_0"].shape == (1, 16, 16, 3)
  bad = text_to_image_command(*args, f"--ip_adapter={files['plus']}")
  assert bad.returncode != 0 and "one image for each --ip_adapter" in bad.stderr


def test_ip_adapter_with_a_controlnet_gives_diffusers_latents(tmp_path_factory):
  """The ControlNet reads the text alone, the U-Net the image prompt too (diffusers'
  StableDiffusionControlNetPipeline with load_ip_adapter)."""
  from safetensors.numpy import save_file
  from test_controlnet import controlnet_for, nchw
  src, pipe = build_pipeline_dir("epsilon", tmp_path_factory, cross_gain=1.0,
                                 pipeline_cls=diffusers.StableDiffusionControlNetPipeline,
                                 controlnet=controlnet_for)
  image_encoder(src / "image_encoder")
  save_file(ip_adapter_state(pipe.unet, 24), str(src / "ip.safetensors"))
  pipe.load_ip_adapter(str(src), subfolder="", weight_name="ip.safetensors",
                       image_encoder_folder="image_encoder")
  ours = StableDiffusion.load(str(src)).with_ip_adapter(str(src / "ip.safetensors"),
                                                         str(src / "image_encoder"))
  rng = np.random.default_rng(1)
  hint = rng.integers(0, 256, (1, 16, 16, 3), dtype=np.uint8)
  x_T = rng.normal(size=(1, 8, 8, 4)).astype(np.float32)
  pixels = rng.normal(size=(1, 28, 28, 3)).astype(np.float32)
  want = pipe("a cat", image=nchw(hint / 255.0), latents=nchw(x_T), num_inference_steps=3,
              guidance_scale=5.0, controlnet_conditioning_scale=0.8, output_type="latent",
              ip_adapter_image=nchw(pixels)).images.numpy().transpose(0, 2, 3, 1)
  run = lambda image: ours.generate(["a cat"], num_steps=3, guidance_scale=5.0, latents=x_T,
                                    decode=False, control_image=hint, control_scale=0.8,
                                    ip_adapter_image=image)
  got = run(pixels)
  diff, moved = np.abs(got - want).max(), np.abs(run(-pixels) - want).max()
  print(f"IP-Adapter + ControlNet latents: max |ours - diffusers| = {diff:.3g} (another image "
        f"prompt: {moved:.3g})")
  assert diff < 1e-4 and moved > 0.01
