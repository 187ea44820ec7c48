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
      "diffusers", "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0")
  assert kohya_module("text_model_encoder_layers_11_self_attn_q_proj") == (
      "diffusers", "text_model.encoder.layers.11.self_attn.q_proj")
  assert kohya_module("output_blocks_2_1_transformer_blocks_0_attn1_to_out_0") == (
      "ldm", "output_blocks.2.1.transformer_blocks.0.attn1.to_out.0")
  assert kohya_module("input_blocks_1_0_emb_layers_1") == ("ldm", "input_blocks.1.0.emb_layers.1")
  assert kohya_module("out_2") == ("ldm", "out.2")
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


# the SDXL miniature's modules (test_sdxl.unet_config: 2 levels, 1 block each, attention at
# level 1) in Stability's (LDM) naming, as kohya's SDXL trainer names them
SDXL_LDM_MODULES = {
    "conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1":
    "time_embed.0", "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1":
    "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2", "down_blocks.0.resnets.0":
    "input_blocks.1.0", "down_blocks.0.downsamplers.0.conv": "input_blocks.2.0.op",
    "down_blocks.1.resnets.0": "input_blocks.3.0", "down_blocks.1.attentions.0":
    "input_blocks.3.1", "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0":
    "middle_block.1", "mid_block.resnets.1": "middle_block.2", "up_blocks.0.resnets.0":
    "output_blocks.0.0", "up_blocks.0.attentions.0": "output_blocks.0.1",
    "up_blocks.0.resnets.1": "output_blocks.1.0", "up_blocks.0.attentions.1": "output_blocks.1.1",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.1.2.conv", "up_blocks.1.resnets.0":
    "output_blocks.2.0", "up_blocks.1.resnets.1": "output_blocks.3.0"}
SDXL_LDM_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj":
                   "emb_layers.1", "conv_shortcut": "skip_connection"}


def test_kohya_sdxl_lora_in_ldm_names_gives_diffusers_latents(tmp_path_factory):
  """kohya's SDXL LoRAs name the U-Net's modules as Stability's U-Net (input_blocks_4_1_...):
  a random LoRA on every kind of layer (attention, feed-forward, projections, res-block and
  sampling convolutions, the time and pooled-text embeddings) and on both text encoders,
  merged into the SDXL miniature, gives diffusers' load_lora_weights latents."""
  from peft.utils import get_peft_model_state_dict
  from safetensors.numpy import save_file
  from test_sdxl import build_sdxl_dir, run
  src, pipe = build_sdxl_dir(tmp_path_factory)
  torch.manual_seed(0)
  targets = UNET_TARGETS + ["proj_out", "ff.net.2", "conv2", "conv_shortcut", "conv",
                            "linear_1", "linear_2", "conv_in", "conv_out"]
  pipe.unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                        init_lora_weights=False))
  unet_sd = get_peft_model_state_dict(pipe.unet)
  pipe.unet.delete_adapters("default")
  kohya, g = {}, torch.Generator().manual_seed(1)
  for key, value in unet_sd.items():
    module, part = key.rsplit(".lora_", 1)
    prefix = max((p for p in SDXL_LDM_MODULES if module == p or module.startswith(p + ".")),
                 key=len)
    rest = module[len(prefix) + 1:]
    ldm = ".".join(filter(None, [SDXL_LDM_MODULES[prefix], SDXL_LDM_RESNET.get(rest, rest)]))
    name = "lora_unet_" + ldm.replace(".", "_")
    kohya[f"{name}.lora_{'up' if part == 'B.weight' else 'down'}.weight"] = value.numpy()
    kohya[f"{name}.alpha"] = np.asarray(8.0, np.float32)
  assert {"lora_unet_input_blocks_2_0_op.alpha", "lora_unet_label_emb_0_2.alpha",
          "lora_unet_output_blocks_1_1_transformer_blocks_1_ff_net_2.alpha"} <= set(kohya)
  for prefix, encoder in (("lora_te1_", pipe.text_encoder), ("lora_te2_", pipe.text_encoder_2)):
    for name, module in encoder.named_modules():
      if name.rsplit(".", 1)[-1] in TEXT_TARGETS:
        body = prefix + ("text_model." + name.removeprefix("text_model.")).replace(".", "_")
        kohya[f"{body}.lora_down.weight"] = (torch.randn((2, module.in_features), generator=g)
                                             * 0.3).numpy()
        kohya[f"{body}.lora_up.weight"] = (torch.randn((module.out_features, 2), generator=g)
                                           * 0.3).numpy()
        kohya[f"{body}.alpha"] = np.asarray(3.0, np.float32)
  path = str(src / "kohya_xl.safetensors")
  save_file(kohya, path)
  x_T = np.random.default_rng(0).normal(size=(2, 8, 8, 4)).astype(np.float32)
  plain = run(pipe, PROMPTS, x_T)
  pipe.load_lora_weights(path)
  try:
    want = run(pipe, PROMPTS, x_T)
  finally:
    pipe.unload_lora_weights()
  got = StableDiffusion.load(str(src)).with_lora(path).generate(
      PROMPTS, num_steps=4, guidance_scale=5.0, latents=x_T, decode=False)
  diff, effect = np.abs(got - want).max(), np.abs(plain - want).max()
  print(f"kohya SDXL LoRA (LDM names): max |ours - diffusers| = {diff:.3g}; the LoRA moves the "
        f"latents {effect:.3g}")
  assert diff < effect / 100
