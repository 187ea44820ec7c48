"""Small configs and data for the end-to-end tests."""
import gzip
import json
import os
import string
import struct
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_idx(directory, n_train=96, n_test=32, seed=0):
  """Fashion-MNIST-shaped IDX files (gzip) with simple class-dependent patterns."""
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  for split, n in (("train", n_train), ("t10k", n_test)):
    labels = rng.integers(0, 10, n).astype(np.uint8)
    yy, xx = np.mgrid[:28, :28]
    images = np.stack([((np.abs(yy - 14) < 4 + l) & (np.abs(xx - 14) < 10 - l)) * 200
                       for l in labels]).astype(np.uint8)
    images = np.clip(images + rng.integers(0, 30, images.shape), 0, 255).astype(np.uint8)
    with gzip.open(os.path.join(directory, f"{split}-images-idx3-ubyte.gz"), "wb") as f:
      f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
    with gzip.open(os.path.join(directory, f"{split}-labels-idx1-ubyte.gz"), "wb") as f:
      f.write(struct.pack(">II", 2049, n) + labels.tobytes())
  return directory


TINY = """
from configs.fashion_mnist import get_config as quickstart


def get_config():
  c = quickstart()
  c.data.data_dir = {data_dir!r}
  c.data.image_size = 16
  c.model.ch = 32
  c.model.ch_mult = (1, 2)
  c.model.num_res_blocks = 1
  c.model.attn_resolutions = (8,)
  c.model.dropout = 0.1
  c.diffusion.num_timesteps = 100
  c.training.batch_size = 16
  c.training.num_steps = {num_steps}
  c.training.warmup_steps = 2
  c.training.lr = 1e-3
  c.training.checkpoint_every = {checkpoint_every}
  c.training.log_every = 1
  c.training.sample_every = 1000
  c.training.num_train_samples = 8
  c.sampling.method = "ddim"
  c.sampling.num_steps = 5
  c.sampling.num_samples = 10
  c.sampling.batch_size = 8
  c.sampling.progressive_steps = (99, 50, 0)
  c.sampling.interp_t = 20
  c.sampling.interp_lambdas = (0.0, 0.5, 1.0)
  c.eval.num_examples = 16
  c.eval.batch_size = 8
  return c
"""


def tiny_config_file(tmp_path, num_steps=6, checkpoint_every=2):
  data_dir = write_idx(str(tmp_path / "fmnist"))
  path = tmp_path / "tiny_config.py"
  path.write_text(TINY.format(data_dir=data_dir, num_steps=num_steps,
                              checkpoint_every=checkpoint_every))
  return str(path)


def tiny_config(tmp_path, **kw):
  """The same config as an object, for in-process tests."""
  import importlib.util
  path = tiny_config_file(tmp_path, **kw)
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  spec = importlib.util.spec_from_file_location("tiny_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def small_graph(config):
  """A config with one U-Net level and no attention: the same train step, less to compile."""
  config.model.ch_mult, config.model.attn_resolutions = (1,), ()
  return config


def tiny_dit(config, hidden_size: int = 32):
  """`config` with a miniature DiT (2x2 patches, 2 blocks, 2 heads) as its network."""
  m = config.model
  m.name, m.patch_size, m.hidden_size, m.depth, m.num_heads = "dit", 2, hidden_size, 2, 2
  m.norm_eps, m.dropout = 1e-5, 0.0
  return config


def main_py(*args, env=None, **kw):
  """Start main.py in a subprocess (returns the Popen)."""
  e = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
  e.update(env or {})
  return subprocess.Popen([sys.executable, os.path.join(REPO, "main.py"), *args], cwd=REPO,
                          env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def read_metrics(workdir):
  """step -> loss from metrics.jsonl (a resumed run's later record wins)."""
  import json
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      out[r["step"]] = r["loss"]
  return out


def ae_config(tmp_path, num_steps=4, **kw):
  """16x16 Fashion-MNIST-like images -> 8x8x4 latents; the GAN from the third step (index 2)."""
  c = tiny_config(tmp_path, num_steps=num_steps, checkpoint_every=2, **kw)
  c.stage = "autoencoder"
  a = c.autoencoder
  a.ch, a.ch_mult, a.num_res_blocks, a.attn_levels, a.z_channels = 32, (1, 2), 1, (), 4
  a.disc_ndf, a.disc_layers, a.lr = 8, 2, 1e-3
  a.loss.perceptual_weight, a.loss.disc_start = 0.0, 2
  c.training.sample_every, c.training.num_train_samples = num_steps, 4
  c.eval.metrics, c.eval.num_examples, c.eval.batch_size = "psnr", 12, 8
  return c


def write_tokenizer(directory):
  """A CLIP BPE tokenizer in Stable Diffusion's files (vocab.json, merges.txt): single
  characters, their word-final forms and a few merges. Returns the vocabulary size."""
  os.makedirs(directory, exist_ok=True)
  chars = list(string.ascii_lowercase + string.digits + "!,.'")
  merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("o", "n</w>")]
  tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges]
  tokens += ["<|startoftext|>", "<|endoftext|>"]
  with open(os.path.join(directory, "vocab.json"), "w") as f:
    json.dump({t: i for i, t in enumerate(tokens)}, f)
  with open(os.path.join(directory, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77}, f)
  return len(tokens)


def open_clip_state(hf_state, extra_blocks=(), projection=None):
  """A transformers CLIPTextModel's state dict (numpy, with or without "text_model.") in
  OpenCLIP's text-tower naming (fused in_proj, resblocks, ln_final), as SD 2.x and XL files
  hold it; extra_blocks: more resblocks (dicts in transformers' layer names) after the model's
  own; projection: CLIPTextModelWithProjection's text_projection.weight, stored transposed."""
  sd = {k.removeprefix("text_model."): v for k, v in hf_state.items()}
  clip = {"token_embedding.weight": sd["embeddings.token_embedding.weight"],
          "positional_embedding": sd["embeddings.position_embedding.weight"],
          "ln_final.weight": sd["final_layer_norm.weight"],
          "ln_final.bias": sd["final_layer_norm.bias"]}
  layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
  blocks = [{k.split(".", 3)[3]: v for k, v in sd.items() if k.startswith(f"encoder.layers.{i}.")}
            for i in range(layers)] + list(extra_blocks)
  for i, layer in enumerate(blocks):
    p = f"transformer.resblocks.{i}."
    for kind in ("weight", "bias"):
      clip[p + f"attn.in_proj_{kind}"] = np.concatenate(
          [layer[f"self_attn.{x}_proj.{kind}"] for x in "qkv"])
      for theirs, hf in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                         ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                         ("mlp.c_proj", "mlp.fc2")):
        clip[p + f"{theirs}.{kind}"] = layer[f"{hf}.{kind}"]
  if projection is not None:
    clip["text_projection"] = np.ascontiguousarray(projection.T)
  return clip
