"""Text-conditional training and sampling (text_conditioning.py): captions from image folders and
class templates, a frozen CLIP text encoder (random weights, transformers' layout), the
classifier-free-guidance dropout, a model that learns to follow its captions, and main.py's
train / sample / summary modes on a text-conditional config."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from diffusion_jax import data, parallel
from diffusion_jax.text_conditioning import (LearnedText, TextConditioningError, TextEncoder,
                                             class_captions)
from diffusion_jax.validate import ConfigError, validate_config
from configs.base import get_config  # noqa: E402
from helpers import main_py, tiny_config_file, write_tokenizer

WIDTH = 32


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  """A CLIPTextModel directory (config.json, model.safetensors) with its tokenizer files."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  directory = str(tmp_path_factory.mktemp("clip"))
  vocab = write_tokenizer(directory)
  torch.manual_seed(0)
  cfg = transformers.CLIPTextConfig(
      vocab_size=vocab, hidden_size=WIDTH, intermediate_size=37, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab - 2,
      eos_token_id=vocab - 1, pad_token_id=vocab - 1)
  transformers.CLIPTextModel(cfg).eval().save_pretrained(directory, safe_serialization=True)
  return directory


def write_folder(root, captions: dict, size=8, metadata=True):
  """PNG images under root, bright for captions with 'white', dark otherwise; captions in
  metadata.jsonl (or one .txt per image)."""
  os.makedirs(root, exist_ok=True)
  lines = []
  for name, caption in captions.items():
    value = 230 if "white" in caption else 25
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(os.path.join(root, name))
    if metadata:
      lines.append(json.dumps({"file_name": name, "text": caption}))
    else:
      with open(os.path.join(root, os.path.splitext(name)[0] + ".txt"), "w") as f:
        f.write(caption + "\n")
  if metadata:
    with open(os.path.join(root, "metadata.jsonl"), "w") as f:
      f.write("\n".join(lines) + "\n")
  return root


def squares(n):
  """n image names captioned in turn 'a black square', 'a white square'."""
  return {f"{i}.png": ("a white square" if i % 2 else "a black square") for i in range(n)}


def folder_config(root, clip, steps=6):
  c = get_config()
  c.data.name, c.data.data_dir, c.data.image_size, c.data.channels = "folder", root, 8, 3
  c.data.random_flip = False
  c.model.ch, c.model.ch_mult, c.model.num_res_blocks = 32, (1, 2), 1
  c.model.attn_resolutions, c.model.attn_levels = (), (1,)
  c.model.context_dim, c.model.head_channels, c.model.dropout = WIDTH, 32, 0.0
  c.text.encoder = clip
  if clip == "learned":  # the captions' bytes fit 16 tokens; a 2-layer transformer reads them
    c.text.max_length, c.text.layers = 16, 2
  c.diffusion.num_timesteps = 100  # DDPM's schedule in 100 steps: alphabar_T ~ 4e-5
  c.diffusion.beta_start, c.diffusion.beta_end = 1e-3, 0.2
  c.training.batch_size, c.training.num_steps, c.training.warmup_steps = 16, steps, 1
  c.training.lr, c.training.ema_decay = 2e-3, 0.9
  c.training.log_every = c.training.checkpoint_every = c.training.sample_every = steps
  c.training.num_train_samples = 8
  c.sampling.method, c.sampling.num_steps = "ddim", 10
  c.sampling.num_samples, c.sampling.batch_size = 8, 8
  c.sampling.progressive_steps, c.sampling.interp_t = (99, 50, 0), 20
  c.sampling.interp_lambdas = (0.0, 0.5, 1.0)
  c.sampling.prompts = ("a white square", "a black square")
  c.eval.metrics = "fid"
  return c


def test_folder_captions_from_metadata_and_text_files(tmp_path):
  caps = {"a.png": "a white square", "b.png": "a black square"}
  for meta in (True, False):
    root = write_folder(str(tmp_path / f"m{meta}"), caps, metadata=meta)
    cfg = folder_config(root, "unused")
    source = data.load_source(cfg.data)
    fn = data.caption_fn(cfg, source)
    assert sorted(fn(i, source[i]) for i in range(len(source))) == sorted(caps.values())


def test_images_without_a_caption_are_refused(tmp_path):
  root = write_folder(str(tmp_path / "f"), {"a.png": "a white square"})
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(os.path.join(root, "b.png"))
  cfg = folder_config(root, "unused")
  source = data.load_source(cfg.data)  # without text conditioning the captions are not read
  assert len(source) == 2 and source[1]["image"].shape == (8, 8, 3)
  with pytest.raises(data.DataError, match="1 of 2 images .* have no caption"):
    data.caption_fn(cfg, source)
  with open(os.path.join(root, "metadata.jsonl"), "w") as f:
    f.write('{"file": "a.png"}\n')
  with pytest.raises(data.DataError, match="line 1"):
    data.caption_fn(cfg, data.load_source(cfg.data))


def test_class_captions_and_the_message_without_captions(tmp_path):
  assert class_captions("a photo of a {}", data.CLASS_NAMES["fashion_mnist"])[7] == (
      "a photo of a sneaker")
  with pytest.raises(TextConditioningError, match="needs a '{}'"):
    class_captions("a photo", ("cat",))
  c = get_config()
  c.data.name, c.data.image_size, c.data.channels = "fashion_mnist", 28, 1
  c.data.data_dir = os.path.dirname(tiny_config_file(tmp_path)) + "/fmnist"
  source = data.load_source(c.data)
  with pytest.raises(data.DataError, match="caption_template"):
    data.caption_fn(c, source)
  c.text.caption_template = "a photo of a {}"
  ex = source[0]
  assert data.caption_fn(c, source)(0, ex) == "a photo of a " + data.CLASS_NAMES[
      "fashion_mnist"][ex["label"]]


def test_wordnet_ids_are_not_class_names():
  class Source:  # tfds imagenet2012's label names
    source = type("S", (), {"dataset_info": type("I", (), {
        "features": {"label": type("L", (), {"names": ["n01440764", "n01443537"]})}})})
  c = get_config()
  c.data.name = "imagenet2012"
  assert data.class_names(c.data, Source()) is None


def test_encoder_matches_transformers_and_dropout_gives_the_empty_caption(clip_dir, caplog):
  import torch
  import transformers
  enc = TextEncoder(clip_dir, parallel.make_mesh())
  prompts = ["a white square", "a black square"] * (jax.device_count() // 2 or 1)
  ids = enc.tokenize(prompts)
  assert ids.shape == (len(prompts), 77) and ids.dtype == np.int32
  assert "truncated" not in caplog.text
  assert enc.tokenize(["x " * 80]).shape == (1, 77) and "truncated (e.g. 82 tokens" in caplog.text
  ours = np.asarray(enc.contexts(prompts))
  model = transformers.CLIPTextModel.from_pretrained(clip_dir).eval()
  with torch.no_grad():
    theirs = model(torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
  np.testing.assert_allclose(ours, theirs, atol=2e-5)
  put = lambda a: jax.device_put(a, parallel.batch_sharding(enc.mesh))
  key = jax.random.PRNGKey(0)
  np.testing.assert_array_equal(np.asarray(enc.encode(put(ids), key, 0.0)), ours)
  empty = np.asarray(enc.contexts([""] * len(prompts)))
  np.testing.assert_allclose(np.asarray(enc.encode(put(ids), key, 0.999999)), empty, atol=1e-6)


def test_config_checks(clip_dir):
  for section, key, value, mode, match in [
      ("model", "context_dim", 0, "train", "text encoder's width"),
      ("model", "num_classes", 10, "train", "model.num_classes"),
      ("eval", "metrics", "fid,nll", "eval", "bits/dim"),
      ("sampling", "prompts", (), "train", "sampling.prompts")]:
    c = folder_config("/nonexistent", clip_dir)
    c[section][key] = value
    with pytest.raises(ConfigError, match=match):
      validate_config(c, mode)
  c = folder_config("/nonexistent", clip_dir)
  c.model.context_dim = 64
  from diffusion_jax.train import Trainer
  with pytest.raises(TextConditioningError, match="context_dim=32"):
    Trainer(c)


def test_the_trainer_drops_captions_as_a_function_of_the_step(tmp_path, clip_dir):
  """text.dropout: each caption the empty one with that probability, the same draw when the
  step is repeated (a resumed run), another at another step."""
  from diffusion_jax.train import Trainer
  caps = squares(16)
  cfg = folder_config(write_folder(str(tmp_path / "sq"), caps), clip_dir)
  cfg.text.dropout = 0.5
  trainer = Trainer(cfg)
  host = next(data.train_batches(cfg, tokenize=trainer.text.tokenize))
  empty = np.asarray(trainer.sampler.null_context)[0]
  dropped = lambda step: np.array([np.allclose(c, empty, atol=1e-5) for c in np.asarray(
      trainer.device_batch(dict(host), step)["context"])])
  first = dropped(3)
  np.testing.assert_array_equal(dropped(3), first)
  assert 0 < first.sum() < 16 and not np.array_equal(dropped(4), first)
  cfg.text.dropout = 0.0
  assert not dropped(3).any()


def test_several_steps_per_call_encode_each_steps_captions(tmp_path, clip_dir):
  """training.steps_per_dispatch = 2 with text conditioning (each step's captions encoded and
  dropped with that step's key) gives the parameters of single steps."""
  from diffusion_jax.train import Trainer
  caps = squares(16)
  cfg = folder_config(write_folder(str(tmp_path / "sq"), caps), clip_dir, steps=2)
  cfg.text.dropout = 0.5
  states = []
  for k in (1, 2):
    cfg.training.steps_per_dispatch = k
    trainer = Trainer(cfg)
    batches = data.train_batches(cfg, tokenize=trainer.text.tokenize)
    state, step = trainer.init(), 0
    while step < 2:
      n = 2 if k == 2 else 1
      state, _, _ = trainer.run_steps(state, [next(batches) for _ in range(n)], step)
      step += n
    states.append(state.params)
  for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
    np.testing.assert_allclose(a, b, atol=2e-5)


def test_learned_text_tokens_and_model(caplog):
  """text.encoder = "learned": UTF-8 bytes between begin and end, padded, truncated (with a
  warning, once); the model takes token ids and refuses encodings."""
  from diffusion_jax.models import build_model
  enc = LearnedText(32, 8, parallel.make_mesh())
  np.testing.assert_array_equal(enc.tokenize(["ab", "é", "abcdef"]), [
      [256, 97, 98, 257, 258, 258, 258, 258], [256, 0xC3, 0xA9, 257, 258, 258, 258, 258],
      [256, 97, 98, 99, 100, 101, 102, 257]])
  assert "truncated" not in caplog.text  # 6 bytes + begin + end fill the 8 positions
  np.testing.assert_array_equal(enc.tokenize(["abcdefghij", "abcdefghijk"]),
                                [[256, 97, 98, 99, 100, 101, 102, 257]] * 2)
  assert caplog.text.count("truncated") == 1 and "e.g. 12 tokens: 'abcdefghij'" in caplog.text
  assert enc.context_spec.shape == (8,) and enc.context_spec.dtype == jnp.int32
  c = folder_config("/nonexistent", "learned")
  c.text.max_length, c.text.layers = 8, 1
  validate_config(c)
  model = build_model(c)
  x, t = jnp.zeros((2, 8, 8, 3)), jnp.zeros((2,), jnp.int32)
  params = model.init(jax.random.PRNGKey(0), x, t, context=jnp.asarray(enc.tokenize(["a", "b"])))
  assert set(params["params"]) == {"unet", "text"}
  with pytest.raises(ValueError, match="token ids"):
    model.apply(params, x, t, context=jnp.zeros((2, 8, 32)))


@pytest.mark.slow
@pytest.mark.parametrize("encoder", ["clip", "learned"])
def test_the_model_learns_to_follow_its_captions(tmp_path, request, encoder):
  """White squares captioned 'a white square', black ones 'a black square': after training,
  guided samples of each prompt have that brightness, through a frozen CLIP or LDM's text
  transformer trained with the U-Net. x0-prediction (Table 2): its loss weighs the high noise
  levels, where only the caption tells the colours apart (an eps-predicting model learns the
  same, in many more steps)."""
  from diffusion_jax.train import Trainer
  caps = squares(16)
  label, encoder = encoder, request.getfixturevalue("clip_dir") if encoder == "clip" else encoder
  cfg = folder_config(write_folder(str(tmp_path / "sq"), caps), encoder, steps=150)
  cfg.diffusion.mean_type = "x0"
  cfg.sampling.guidance_scale = 3.0
  trainer = Trainer(cfg)
  state = trainer.init()
  batches = data.train_batches(cfg, tokenize=trainer.text.tokenize)
  first = next(batches)
  assert first["tokens"].shape == (16, 16 if label == "learned" else 77)
  losses = []
  for step in range(cfg.training.num_steps):
    state, metrics, _ = trainer.run_steps(state, [first if step == 0 else next(batches)], step)
    losses.append(float(metrics["loss"]))
  early, late = np.mean(losses[:10]), np.mean(losses[-20:])  # each step's t is random
  images = trainer.sampler(state.ema_params, 8, seed=1)  # prompts alternate white, black
  brightness = images.reshape(8, -1).mean(-1)
  print(f"{label}: loss of steps 1-10 {early:.3f}, of the last 20 {late:.3f}; mean brightness "
        "of the samples (prompts white, black, ...):", brightness.round(1))
  assert late < 0.1 and late < 0.5 * early
  assert brightness[0::2].min() > 150 and brightness[1::2].max() < 100, brightness


def config_file(tmp_path, root, encoder, steps=4):
  """folder_config(root, encoder) as a config file for main.py."""
  path = tmp_path / "text_config.py"
  path.write_text(
      "import sys\nsys.path.insert(0, %r)\nfrom test_text_conditioning import folder_config\n\n"
      "def get_config():\n  return folder_config(%r, %r, steps=%d)\n"
      % (os.path.dirname(__file__), root, encoder, steps))
  return str(path)


@pytest.mark.multihost
@pytest.mark.slow
def test_two_processes_train_and_sample_a_learned_text_model(tmp_path):
  """2 processes x 4 devices: captions tokenised on each host, contexts and the empty prompt's
  made global, training grid, sample mode with both figures."""
  from test_e2e import free_port
  root = write_folder(str(tmp_path / "sq"), squares(16))
  cfg_path, work = config_file(tmp_path, root, "learned"), str(tmp_path / "work")
  for mode in ("train", "sample"):
    port = free_port()
    procs = [main_py(f"--config={cfg_path}", f"--workdir={work}", f"--mode={mode}", env={
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
        "JAX_PROCESS_ID": str(i)}) for i in range(2)]
    for p in procs:
      out = p.communicate(timeout=600)[0]
      assert p.returncode == 0, out[-3000:]
  assert os.path.exists(os.path.join(work, "train_samples", "step_00000004.png"))
  for name in ("samples.png", "progressive.png", "interpolation.png"):
    assert os.path.exists(os.path.join(work, "samples", "4", name)), name
  with open(os.path.join(work, "samples", "4", "prompts.txt")) as f:
    assert f.read().splitlines() == ["a white square", "a black square"] * 4


@pytest.mark.slow
def test_main_trains_samples_and_summarises_a_text_conditional_config(tmp_path, clip_dir):
  root = write_folder(str(tmp_path / "sq"), squares(8), metadata=False)
  cfg_path = config_file(tmp_path, root, clip_dir)
  work = str(tmp_path / "work")
  for mode in ("train", "sample", "summary"):
    proc = main_py(f"--config={cfg_path}", f"--workdir={work}", f"--mode={mode}")
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
  assert "cross-attention" not in out and "total" in out  # the summary's table
  sample_dir = os.path.join(work, "samples", "4")
  for name in ("samples.png", "progressive.png", "interpolation.png", "samples.npz"):
    assert os.path.exists(os.path.join(sample_dir, name)), name
  with open(os.path.join(sample_dir, "prompts.txt")) as f:
    assert f.read().splitlines() == ["a white square", "a black square"] * 4
  assert os.path.exists(os.path.join(work, "train_samples", "step_00000004.png"))
