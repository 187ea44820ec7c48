"""LoRA files merged into a Stable Diffusion pipeline give diffusers' load_lora_weights results:
a miniature pipeline (random weights) with a random LoRA (PEFT) on the U-Net's attention,
feed-forward, projections and convolutions and on the text encoder, saved in diffusers' format
and rewritten in kohya's."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from diffusion_jax.convert_diffusers import ConversionError  # noqa: E402
from diffusion_jax.lora import kohya_module  # noqa: E402
from diffusion_jax.stable_diffusion import StableDiffusion  # noqa: E402
from test_text_to_image import build_pipeline_dir  # noqa: E402

pytestmark = pytest.mark.parity
PROMPTS = ["the man on a photo", "an orange cat!"]
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.0.proj", "conv1",
                "time_emb_proj"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
  """(pipeline dir, diffusers pipeline, diffusers-format file, kohya-format file)."""
  from peft.utils import get_peft_model_state_dict
  from safetensors.numpy import save_file
  src, pipe = build_pipeline_dir("epsilon", tmp_path_factory)  # a pipeline of our own
  torch.manual_seed(0)
  unet_cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS,
                             init_lora_weights=False)
  pipe.unet.add_adapter(unet_cfg)
  unet_sd = get_peft_model_state_dict(pipe.unet)
  pipe.unet.delete_adapters("default")
  # the text encoder's, written as PEFT names them (rank 2)
  g = torch.Generator().manual_seed(1)
  text_sd = {}
  for name, module in pipe.text_encoder.named_modules():
    if name.rsplit(".", 1)[-1] in TEXT_TARGETS:
      text_sd[f"{name}.lora_A.weight"] = torch.randn((2, module.in_features), generator=g) * 0.3
      text_sd[f"{name}.lora_B.weight"] = torch.randn((module.out_features, 2), generator=g) * 0.3
  out = tmp_path_factory.mktemp("lora")
  diffusers.StableDiffusionPipeline.save_lora_weights(
      str(out), unet_lora_layers=unet_sd, text_encoder_lora_layers=text_sd,
      unet_lora_adapter_metadata=unet_cfg.to_dict(),
      text_encoder_lora_adapter_metadata=peft.LoraConfig(
          r=2, lora_alpha=3, target_modules=TEXT_TARGETS).to_dict())
  # the same LoRA as kohya writes it: underscores, lora_down / lora_up, alpha per module
  kohya = {}
  for prefix, sd, alpha in (("lora_unet_", unet_sd, 8.0), ("lora_te_", text_sd, 3.0)):
    for key, value in sd.items():
      module, part = key.rsplit(".lora", 1)
      name = prefix + module.replace(".", "_")
      up = part in ("_B.weight", ".up.weight")
      kohya[f"{name}.lora_{'up' if up else 'down'}.weight"] = value.float().numpy()
      kohya[f"{name}.alpha"] = np.asarray(alpha, np.float32)
  save_file(kohya, str(out / "kohya.safetensors"))
  save_file({k: v for k, v in kohya.items() if k.startswith("lora_unet_")},
            str(out / "unet_only.safetensors"))
  return src, pipe, str(out / "pytorch_lora_weights.safetensors"), str(out / "kohya.safetensors")


def latents_of(pipe, x_T):
  return pipe(PROMPTS, num_inference_steps=4, guidance_scale=5.0, output_type="latent",
              latents=torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy())
              ).images.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("kind", ["diffusers", "kohya"])
def test_lora_gives_diffusers_load_lora_weights_latents(lora_files, kind):
  src, pipe, diffusers_file, kohya_file = lora_files
  path = diffusers_file if kind == "diffusers" else kohya_file
  x_T = np.random.default_rng(0).normal(size=(2, 8, 8, 4)).astype(np.float32)
  plain = latents_of(pipe, x_T)
  pipe.load_lora_weights(path, adapter_name=kind)
  try:
    want = latents_of(pipe, x_T)
  finally:
    pipe.unload_lora_weights()
  base = StableDiffusion.load(str(src))
  ours = base.with_lora(path)
  got = ours.generate(PROMPTS, num_steps=4, guidance_scale=5.0, latents=x_T, decode=False)
  diff, effect = np.abs(got - want).max(), np.abs(plain - want).max()
  print(f"LoRA ({kind}): max |ours - diffusers| = {diff:.3g}; the LoRA moves the latents "
        f"{effect:.3g}")
  assert diff < effect / 100
  unet_only = base.with_lora(path.rsplit("/", 1)[0] + "/unet_only.safetensors").generate(
      PROMPTS, num_steps=4, guidance_scale=5.0, latents=x_T, decode=False)
  assert np.abs(unet_only - want).max() > 100 * diff  # the text encoder's LoRA counts too
  # the base pipeline is untouched; weight 0 is the base
  again = base.generate(PROMPTS, num_steps=4, guidance_scale=5.0, latents=x_T, decode=False)
  assert np.abs(again - plain).max() < effect / 100
  zero = base.with_lora(path, 0.0).generate(PROMPTS, num_steps=4, guidance_scale=5.0,
                                            latents=x_T, decode=False)
  np.testing.assert_allclose(zero, again, atol=1e-6)


def test_kohya_names_and_refusals(lora_files, tmp_path):
  from safetensors.numpy import save_file
  assert kohya_module("down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_out_0") == (
      "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0")
  assert kohya_module("text_model_encoder_layers_11_self_attn_q_proj") == (
      "text_model.encoder.layers.11.self_attn.q_proj")
  with pytest.raises(ConversionError, match="LDM's U-Net layout"):
    kohya_module("input_blocks_1_1_proj_in")
  src = lora_files[0]
  base = StableDiffusion.load(str(src))
  conv = "lora_unet_down_blocks_9_resnets_0_conv1"  # no such level
  save_file({f"{conv}.lora_down.weight": np.ones((2, 32, 3, 3), np.float32),
             f"{conv}.lora_up.weight": np.ones((32, 2, 1, 1), np.float32)},
            str(tmp_path / "bad.safetensors"))
  with pytest.raises(ConversionError, match="which the model does not have"):
    base.with_lora(str(tmp_path / "bad.safetensors"))
  fc1 = "text_encoder_2.text_model.encoder.layers.0.mlp.fc1"
  save_file({f"{fc1}.lora_A.weight": np.ones((2, 32), np.float32),
             f"{fc1}.lora_B.weight": np.ones((37, 2), np.float32)},
            str(tmp_path / "xl.safetensors"), metadata={"lora_adapter_metadata": json.dumps({})})
  with pytest.raises(ConversionError, match="adapts text_encoder_2"):
    base.with_lora(str(tmp_path / "xl.safetensors"))
