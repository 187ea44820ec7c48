"""Text-to-image throughput, ours (diffusion_jax.text_to_image) and diffusers'
StableDiffusionPipeline, on Stable Diffusion 1.5's network layout with random weights (no
download: both load the same pipeline directory, written once with safetensors; ~4.3 GB of
temporary files for sd15).

  python benchmarks/text_to_image.py --layout=sd15 --batch=8 --steps=50 --dtype=bfloat16
  python benchmarks/text_to_image.py --layout=tiny --batch=2 --steps=4   # a smoke run

Measures, in one process, after compilation (ours) / warm-up (theirs), blocking on results:
images/s of the whole pipeline (both prompts' text encodings, `steps` DDIM steps with
classifier-free guidance as one batch of 2B, the decoder), the first call's time (ours:
compilation), peak device memory; diffusers with bf16/fp16 weights (`torch_dtype`), with
torch.compile on the U-Net where --torch_compile. Writes
benchmarks/results/<device>_<layout>_text_to_image.json.
"""
from __future__ import annotations

import json
import os
import shutil
import string
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")  # room for PyTorch beside us

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks import timing  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("layout", "sd15", ["sd15", "tiny"], "Network sizes (sd15: 860M U-Net).")
flags.DEFINE_integer("batch", 8, "Images per call.")
flags.DEFINE_integer("steps", 50, "DDIM steps.")
flags.DEFINE_integer("calls", 2, "Timed calls per side (the median is reported).")
flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16", "float16"], "Compute dtype "
                  "(ours: float16 runs as bfloat16, params stay float32).")
flags.DEFINE_bool("peer", True, "Also measure diffusers/PyTorch.")
flags.DEFINE_enum("attention", "auto", ["auto", "xla", "cudnn", "per_head"],
                  "Our attention implementation (models/attention.py; a lever).")
flags.DEFINE_string("tag", "", "Suffix of the result file (lever runs).")
flags.DEFINE_bool("torch_compile", True, "torch.compile diffusers' U-Net (GPU).")
flags.DEFINE_string("out", "benchmarks/results", "Result directory.")
flags.DEFINE_string("pipeline_dir", "", "Where the random-weight pipeline is written and kept "
                    "(read if it is there already); empty: a temporary directory.")

LAYOUTS = {
    "sd15": {
        "unet": dict(sample_size=64, in_channels=4, out_channels=4,
                     block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                     cross_attention_dim=768, attention_head_dim=8,
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
        "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12),
        "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                    down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)},
    "tiny": {
        "unet": dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                     layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
        "text": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                     num_attention_heads=4),
        "vae": dict(block_out_channels=(32, 64), layers_per_block=1,
                    down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16)},
}
PROMPT = "a photograph of an astronaut riding a horse"


def write_pipeline(layout: str, directory: str):
  """A Stable Diffusion pipeline directory with random weights (a character-level CLIP
  tokenizer: the ids differ from the real one's, the work does not)."""
  import diffusers
  import torch
  import transformers
  tok_dir = os.path.join(directory, "tokenizer")
  os.makedirs(tok_dir)
  tokens = list(string.ascii_lowercase + string.digits + " ,.!'")
  tokens = tokens + [t + "</w>" for t in tokens] + ["<|startoftext|>", "<|endoftext|>"]
  with open(os.path.join(tok_dir, "vocab.json"), "w") as f:
    json.dump({t: i for i, t in enumerate(tokens)}, f)
  with open(os.path.join(tok_dir, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n")
  with open(os.path.join(tok_dir, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77}, f)
  cfg = LAYOUTS[layout]
  torch.manual_seed(0)
  text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
      bos_token_id=len(tokens) - 2, eos_token_id=len(tokens) - 1, pad_token_id=len(tokens) - 1,
      **cfg["text"]))
  pipe = diffusers.StableDiffusionPipeline(
      vae=diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                                  **cfg["vae"]),
      text_encoder=text, tokenizer=transformers.CLIPTokenizer.from_pretrained(tok_dir),
      unet=diffusers.UNet2DConditionModel(**cfg["unet"]),
      scheduler=diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012,
                                        beta_schedule="scaled_linear", clip_sample=False,
                                        set_alpha_to_one=False, steps_offset=1),
      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  pipe.save_pretrained(directory, safe_serialization=True)
  del pipe, text
  return directory


def bench_ours(src: str) -> dict:
  from diffusion_jax.stable_diffusion import StableDiffusion
  dtype = "float32" if FLAGS.dtype == "float32" else "bfloat16"
  pipe = StableDiffusion.load(src, dtype, attention=FLAGS.attention)
  prompts = [PROMPT] * FLAGS.batch
  start = time.perf_counter()
  pipe.generate(prompts, num_steps=FLAGS.steps)
  first = time.perf_counter() - start
  times = []
  for i in range(FLAGS.calls):
    start = time.perf_counter()
    pipe.generate(prompts, num_steps=FLAGS.steps, seed=i + 1)  # returns host arrays: blocked
    times.append(time.perf_counter() - start)
  return {"first_call_s": first, "call_s": float(np.median(times)), "dtype": dtype,
          "attention": FLAGS.attention, "peak_mem_bytes": device_peak_bytes(jax.devices()[0])}


def device_peak_bytes(device) -> int | None:
  """The device allocator's peak (GPU/TPU); None on the CPU."""
  stats = device.memory_stats() if device.platform != "cpu" else None
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def bench_peer(src: str) -> dict:
  import diffusers
  import torch
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16}[FLAGS.dtype]
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(src, torch_dtype=dtype).to(dev)
  pipe.set_progress_bar_config(disable=True)
  compiled = FLAGS.torch_compile and dev == "cuda"
  if compiled:
    pipe.unet = torch.compile(pipe.unet)
  run = lambda seed: pipe([PROMPT] * FLAGS.batch, num_inference_steps=FLAGS.steps,
                          generator=torch.Generator(dev).manual_seed(seed), output_type="np")
  if dev == "cuda":
    torch.cuda.reset_peak_memory_stats()
  start = time.perf_counter()
  run(0)
  first = time.perf_counter() - start
  times = []
  for i in range(FLAGS.calls):
    start = time.perf_counter()
    run(i + 1)
    times.append(time.perf_counter() - start)
  return {"first_call_s": first, "call_s": float(np.median(times)), "torch_compile": compiled,
          "dtype": FLAGS.dtype,
          "torch_version": torch.__version__, "diffusers_version": diffusers.__version__,
          "peak_mem_bytes": torch.cuda.max_memory_allocated() if dev == "cuda" else None}


def main(argv):
  del argv
  device = jax.devices()[0]
  res = {"device": timing.device_kind(device), "layout": FLAGS.layout, "batch": FLAGS.batch,
         "steps": FLAGS.steps, "calls": FLAGS.calls, "dtype": FLAGS.dtype,
         "guidance": "7.5 (one batch of 2B)",
         "jax_version": jax.__version__,
         # set: "ours" first_call_s may be a load from this cache (gpu.sh warm)
         "compilation_cache": os.environ.get("JAX_COMPILATION_CACHE_DIR")}
  with tempfile.TemporaryDirectory() as tmp:
    src = FLAGS.pipeline_dir or os.path.join(tmp, "sd")
    if not os.path.isdir(src):  # written beside it, then renamed: never read half-written
      shutil.rmtree(src + ".partial", ignore_errors=True)
      os.rename(write_pipeline(FLAGS.layout, src + ".partial"), src)
    res["ours"] = bench_ours(src)
    print("ours", res["ours"], flush=True)
    if FLAGS.peer:
      res["peer"] = bench_peer(src)
      print("diffusers", res["peer"], flush=True)
  for side in ("ours", "peer"):
    if side in res:
      res[side]["img_per_s"] = FLAGS.batch / res[side]["call_s"]
  if "peer" in res:
    res["speedup"] = res["ours"]["img_per_s"] / res["peer"]["img_per_s"]
  os.makedirs(FLAGS.out, exist_ok=True)
  path = timing.result_path(FLAGS.out, res["device"], FLAGS.layout,
                            "text_to_image" + (f"_{FLAGS.tag}" if FLAGS.tag else ""))
  with open(path, "w") as f:
    json.dump(res, f, indent=1)
  print("RESULT", json.dumps({k: res.get(k) for k in ("device", "layout", "speedup")}),
        "ours %.3f img/s" % res["ours"]["img_per_s"],
        "diffusers %.3f img/s" % res["peer"]["img_per_s"] if "peer" in res else "")
  print("wrote", path)


if __name__ == "__main__":
  app.run(main)
