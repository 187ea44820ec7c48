"""Textual inversion embeddings added to Stable Diffusion pipelines give diffusers'
load_textual_inversion results: a random 2-vector embedding in diffusers' and A1111's formats
on the SD miniature, and SDXL's two-part file on the SDXL miniature."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusion_jax.convert_diffusers import ConversionError  # noqa: E402
from diffusion_jax.stable_diffusion import StableDiffusion  # noqa: E402
from test_sdxl import build_sdxl_dir, run  # noqa: E402
from test_text_to_image import build_pipeline_dir, text_to_image_command  # noqa: E402

pytestmark = pytest.mark.parity
PROMPTS = ["a <cat-toy> on a photo", "an orange cat!"]


def test_embedding_gives_diffusers_load_textual_inversion_latents(tmp_path_factory, tmp_path):
  from safetensors.numpy import save_file
  src, pipe = build_pipeline_dir("epsilon", tmp_path_factory)
  vectors = np.random.default_rng(0).normal(size=(2, 32)).astype(np.float32) * 2.0
  path, a1111 = str(tmp_path / "cat-toy.safetensors"), str(tmp_path / "a1111.safetensors")
  save_file({"<cat-toy>": vectors}, path)
  save_file({"emb_params": vectors}, a1111)
  x_T = np.random.default_rng(1).normal(size=(2, 8, 8, 4)).astype(np.float32)
  base = StableDiffusion.load(str(src))
  plain = run(pipe, PROMPTS, x_T, negative_prompt=["<cat-toy>"] * 2)  # BPE pieces
  pipe.load_textual_inversion(path)
  try:
    want = run(pipe, PROMPTS, x_T, negative_prompt=["<cat-toy>"] * 2)
    assert pipe.maybe_convert_prompt("a <cat-toy>", pipe.tokenizer) == "a <cat-toy> <cat-toy>_1"
  finally:
    pipe.unload_textual_inversion()
  for file, token in ((path, None), (a1111, "<cat-toy>")):
    ours = base.with_textual_inversion(file, token)
    got = ours.generate(PROMPTS, "<cat-toy>", num_steps=4, guidance_scale=5.0, latents=x_T,
                        decode=False)
    diff, effect = np.abs(got - want).max(), np.abs(plain - want).max()
    print(f"textual inversion ({'A1111' if token else 'diffusers'}): max |ours - diffusers| = "
          f"{diff:.3g}; the embedding moves the latents {effect:.3g}")
    assert diff < effect / 100
  assert ours.tokenize(["<cat-toy>"])[0, 1:4].tolist() == [ours.text_encoder.vocab_size - 2,
                                                            ours.text_encoder.vocab_size - 1,
                                                            pipe.tokenizer.eos_token_id]
  assert "<cat-toy>" not in base.tokenizer.get_vocab()  # the base pipeline is untouched
  assert ours.params["text"]["token_embedding"]["embedding"].shape[0] == (
      base.text_encoder.vocab_size + 2)
  with pytest.raises(ConversionError, match="does not name its token"):
    base.with_textual_inversion(a1111)
  with pytest.raises(ConversionError, match="already in the tokenizer"):
    ours.with_textual_inversion(path)
  save_file({"clip_l": vectors, "clip_g": vectors}, str(tmp_path / "xl.safetensors"))
  with pytest.raises(ConversionError, match="SDXL embedding"):
    base.with_textual_inversion(str(tmp_path / "xl.safetensors"), "<x>")
  # the command line: FILE:TOKEN
  proc = text_to_image_command(f"--src={src}", "--prompt=a <cat-toy>", "--steps=2",
                               f"--embedding={a1111}:<cat-toy>", f"--out={tmp_path / 'ti.png'}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  proc = text_to_image_command(f"--src={src}", "--prompt=a <cat-toy>", "--steps=2",
                               f"--embedding={a1111}", f"--out={tmp_path / 'ti.png'}")
  assert proc.returncode != 0 and "does not name its token" in proc.stderr


def test_sdxl_embedding_adds_to_both_text_encoders(tmp_path_factory, tmp_path):
  """SDXL's files hold a part per encoder (clip_l: the first, clip_g: OpenCLIP bigG), which
  diffusers loads by two load_textual_inversion calls."""
  from safetensors.numpy import save_file
  src, pipe = build_sdxl_dir(tmp_path_factory)
  rng = np.random.default_rng(2)
  parts = {k: rng.normal(size=(3, 32)).astype(np.float32) * 2.0 for k in ("clip_l", "clip_g")}
  path = str(tmp_path / "xl.safetensors")
  save_file(parts, path)
  x_T = np.random.default_rng(1).normal(size=(2, 8, 8, 4)).astype(np.float32)
  plain = run(pipe, PROMPTS, x_T)
  for key, encoder, tokenizer in (("clip_l", pipe.text_encoder, pipe.tokenizer),
                                  ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2)):
    pipe.load_textual_inversion(torch.from_numpy(parts[key]), token="<cat-toy>",
                                text_encoder=encoder, tokenizer=tokenizer)
  try:
    want = run(pipe, PROMPTS, x_T)
  finally:
    pipe.unload_textual_inversion("<cat-toy>", pipe.tokenizer, pipe.text_encoder)
    pipe.unload_textual_inversion("<cat-toy>", pipe.tokenizer_2, pipe.text_encoder_2)
  ours = StableDiffusion.load(str(src)).with_textual_inversion(path, "<cat-toy>")
  got = ours.generate(PROMPTS, num_steps=4, guidance_scale=5.0, latents=x_T, decode=False)
  diff, effect = np.abs(got - want).max(), np.abs(plain - want).max()
  print(f"SDXL textual inversion: max |ours - diffusers| = {diff:.3g}; the embedding moves the "
        f"latents {effect:.3g}")
  assert diff < effect / 100
