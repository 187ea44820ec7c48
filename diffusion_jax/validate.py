"""Config checks that run before anything compiles or loads: one message per problem,
naming the key and what is allowed."""
from __future__ import annotations

import math
import os

import jax

from diffusion_jax import diffusion as dm
from diffusion_jax import samplers
from diffusion_jax.models import ATTENTION, DTYPES, LAYOUT, MODELS, UPSAMPLE_CONV, onednn_conv
from diffusion_jax.models.layers import DOWNSAMPLE_PADDING
from diffusion_jax.text_conditioning import LEARNED

DATASETS = ("fashion_mnist", "cifar10", "celeb_a_hq", "lsun_church", "imagenet2012", "folder")
# autoencoder: of its reconstructions of the test split (fid: rFID, against the originals)
METRICS = {"diffusion": ("fid", "is", "nll"), "autoencoder": ("psnr", "lpips", "fid")}
MODES = ("train", "sample", "eval", "summary")
STAGES = ("diffusion", "autoencoder")


class ConfigError(ValueError):
  pass


def _check(ok: bool, key: str, value, allowed: str):
  if not ok:
    raise ConfigError(f"config.{key}={value!r} is not allowed: {allowed}")


def parse_metrics(metrics: str) -> tuple[str, ...]:
  return tuple(m.strip() for m in str(metrics).split(",") if m.strip())


def validate_config(config, mode: str = "train") -> None:
  """Raise ConfigError for the first impossible value in `config` (for `mode`)."""
  _check(mode in MODES, "mode", mode, f"one of {MODES}")
  d, m, f, t, s, e = (config.data, config.model, config.diffusion, config.training,
                      config.sampling, config.eval)
  n_dev, n_proc = jax.device_count(), jax.process_count()

  _check(d.name in DATASETS, "data.name", d.name, f"one of {DATASETS}")
  _check(d.channels in (1, 3), "data.channels", d.channels, "1 or 3")
  _check(d.name != "folder" or d.data_dir, "data.data_dir", d.data_dir,
         "data.name='folder' needs --config.data.data_dir=/path/to/images")

  stage = config.get("stage", "diffusion")
  _check(stage in STAGES, "stage", stage, f"one of {STAGES}")
  _check(m.dtype in DTYPES, "model.dtype", m.dtype, f"one of {tuple(DTYPES)}")
  _check(m.attention in ATTENTION, "model.attention", m.attention, f"one of {ATTENTION}")
  _check(m.attention != "cudnn" or (m.dtype == "bfloat16" and jax.default_backend() == "gpu"),
         "model.attention", m.attention, "'cudnn' needs model.dtype='bfloat16' on a GPU; "
         "'auto' picks it where it applies")
  _check(m.conv in onednn_conv.MODES, "model.conv", m.conv, f"one of {onednn_conv.MODES}")
  if m.conv == "onednn":
    _check(jax.default_backend() == "cpu" and m.dtype == "float32" and n_dev == 1, "model.conv",
           m.conv, "oneDNN convolutions are float32 on a single CPU device; 'auto' picks them "
           "where they apply")
    _check(not onednn_conv.unavailable_reason(), "model.conv", m.conv,
           onednn_conv.unavailable_reason())
  upsample_conv = m.get("upsample_conv", "auto")
  _check(upsample_conv in UPSAMPLE_CONV, "model.upsample_conv", upsample_conv,
         f"one of {UPSAMPLE_CONV}")
  _check_training(t, n_dev, n_proc)
  if stage == "autoencoder":
    _check(mode in ("train", "eval", "summary"), "stage", stage,
           f"--mode={mode} needs a diffusion config; an autoencoder trains, evaluates (its "
           "reconstructions) and summarises")
    _check_autoencoder(config.autoencoder, d.image_size)
    _check_eval(e, stage, n_dev)
    return
  _check(m.name in MODELS, "model.name", m.name, f"one of {tuple(MODELS)}")
  dit = m.name == "dit"
  if not dit and not config.get("latent", {}).get("autoencoder"):  # else _check_latent
    _check_levels("model", m.ch, m.ch_mult, d.image_size)
    sizes = [d.image_size // 2 ** i for i in range(len(m.ch_mult))]
    for r in m.attn_resolutions:
      _check(r in sizes, "model.attn_resolutions", tuple(m.attn_resolutions),
             f"resolutions the U-Net visits at image_size {d.image_size}: {sizes}")
  _check(0.0 <= m.dropout < 1.0, "model.dropout", m.dropout, "in [0, 1)")
  _check(m.num_classes >= 0, "model.num_classes", m.num_classes, ">= 0")
  from diffusion_jax.latent import model_input_shape
  if dit:
    _check_dit(m, model_input_shape(config)[0], config.get("text", {}).get("encoder"))
  else:
    _check_layout(m, model_input_shape(config)[0], config.get("text", {}).get("encoder"))
  _check(0.0 <= m.get("label_dropout", 0.0) < 1.0, "model.label_dropout",
         m.get("label_dropout"), "in [0, 1)")
  _check(-1 <= s.get("class_label", -1) < max(m.num_classes, 0), "sampling.class_label",
         s.get("class_label"), f"-1 (all in turn) or a class in [0, {m.num_classes - 1}] of a "
         "class-conditional model (model.num_classes > 0)" if m.num_classes else
         "-1 for an unconditional model (model.num_classes = 0)")
  text = config.get("text", {})
  conditional = m.num_classes > 0 or bool(text.get("encoder"))
  guidance = s.get("guidance_scale", 1.0)
  _check(guidance >= 0 and (guidance == 1.0 or conditional), "sampling.guidance_scale",
         guidance, ">= 0, and 1 unless the model is class-conditional (model.num_classes > 0, "
         "trained with model.label_dropout > 0) or text-conditional (text.encoder)")
  if text.get("encoder"):
    if text.encoder == LEARNED:
      _check(text.get("layers", 1) >= 1, "text.layers", text.get("layers"), ">= 1")
      _check(text.get("max_length", 77) >= 3, "text.max_length", text.get("max_length"),
             ">= 3 (the begin and end tokens and at least one byte)")
    _check(0.0 <= text.get("dropout", 0.0) < 1.0, "text.dropout", text.get("dropout"),
           "in [0, 1)")
    _check(m.num_classes == 0, "model.num_classes", m.num_classes,
           "0 with text.encoder (the captions condition the model; text.caption_template "
           "turns labels into captions)")
    _check(not text.get("caption_template") or "{}" in text.caption_template,
           "text.caption_template", text.get("caption_template"),
           "a caption with {} where the class name goes, e.g. 'a photo of a {}'")
    _check(bool(s.get("prompts")) or bool(text.get("caption_template")), "sampling.prompts",
           s.get("prompts"), "the prompts that the training grids, sample and eval modes "
           "sample, e.g. \"('a photo of a cat', 'a photo of a dog')\" (or "
           "text.caption_template: the captions of the classes)")
    _check(mode != "eval" or "nll" not in parse_metrics(e.metrics), "eval.metrics", e.metrics,
           "fid and is for a text-conditional model (its bits/dim would need each test "
           "image's caption; not computed)")

  _check(f.beta_schedule in dm.SCHEDULES, "diffusion.beta_schedule", f.beta_schedule,
         f"one of {dm.SCHEDULES}")
  _check(f.num_timesteps >= 2, "diffusion.num_timesteps", f.num_timesteps, ">= 2")
  _check(0 < f.beta_start < f.beta_end < 1, "diffusion.beta_end", f.beta_end,
         f"0 < beta_start ({f.beta_start}) < beta_end < 1")
  _check(f.mean_type in dm.MEAN_TYPES, "diffusion.mean_type", f.mean_type, f"one of {dm.MEAN_TYPES}")
  _check(f.var_type in dm.VAR_TYPES, "diffusion.var_type", f.var_type, f"one of {dm.VAR_TYPES}")
  _check(f.loss_type in dm.LOSS_TYPES, "diffusion.loss_type", f.loss_type, f"one of {dm.LOSS_TYPES}")
  learned = f.var_type.startswith("learned")
  _check(not (learned and f.loss_type == "mse"), "diffusion.loss_type", f.loss_type,
         f"var_type={f.var_type!r} is only trained by the bound: use 'kl' or 'hybrid'")
  _check(f.loss_type != "hybrid" or learned, "diffusion.loss_type", f.loss_type,
         "'hybrid' needs var_type 'learned' or 'learned_range'")

  _check_sampling(s, f, n_dev)
  _check_eval(e, stage, n_dev)
  if mode == "train":
    _check_dreambooth(config, n_proc)
  if config.get("latent", {}).get("autoencoder"):
    _check_latent(config)


def _check_dreambooth(config, n_proc: int):
  db = config.get("dreambooth", {})
  if not db.get("instance_prompt"):
    _check(not db.get("class_prompt"), "dreambooth.class_prompt", db.get("class_prompt"),
           "prior preservation is part of DreamBooth: set dreambooth.instance_prompt too")
    return
  _check(bool(config.get("text", {}).get("encoder")), "dreambooth.instance_prompt",
         db.instance_prompt, "a text-conditional model (text.encoder), e.g. "
         "configs/sd15_dreambooth.py")
  _check(config.data.name == "folder", "data.name", config.data.name,
         "'folder' for DreamBooth: the subject's images in data.data_dir")
  if db.get("class_prompt"):
    _check(bool(db.get("class_data_dir")), "dreambooth.class_data_dir", db.get("class_data_dir"),
           "a folder for the class images (those missing are generated there first), e.g. "
           "--config.dreambooth.class_data_dir=runs/class_dog")
    inside = os.path.join(os.path.abspath(config.data.data_dir or ""), "")
    _check(not os.path.join(os.path.abspath(db.class_data_dir), "").startswith(inside),
           "dreambooth.class_data_dir", db.class_data_dir, "a folder outside data.data_dir "
           "(whose subfolders are read as instance images)")
    _check(db.num_class_images >= 1, "dreambooth.num_class_images", db.num_class_images, ">= 1")
    _check(db.prior_loss_weight >= 0, "dreambooth.prior_loss_weight", db.prior_loss_weight,
           ">= 0")
    per_process = config.training.batch_size // n_proc
    _check(per_process % 2 == 0, "training.batch_size", config.training.batch_size,
           f"even per process ({n_proc}): half instance images, half class images")


def _check_layout(m, size: int, text_encoder=None):
  """The keys of LDM's layouts (models.LAYOUT); `size`: the U-Net's input size."""
  get = lambda key: m.get(key, LAYOUT[key])
  context_dim, levels = get("context_dim"), len(m.ch_mult)
  _check(context_dim >= 0 and (context_dim == 0 or m.num_classes > 0 or bool(text_encoder)),
         "model.context_dim", context_dim, "0, or > 0 with model.num_classes > 0 (the "
         "cross-attention conditioned on class labels) or with text.encoder (on captions)")
  _check(context_dim > 0 or not text_encoder, "model.context_dim", context_dim,
         "the text encoder's width (768 for SD 1.x's CLIP, 1024 for SD 2.x's) with text.encoder")
  _check(get("transformer_depth") >= 1, "model.transformer_depth", get("transformer_depth"),
         ">= 1")
  _check(all(0 <= k < levels for k in get("attn_levels")), "model.attn_levels",
         tuple(get("attn_levels")), f"level indices in [0, {levels - 1}] (0: full size)")
  heads, width = get("num_heads"), get("head_channels")
  _check(heads >= 1 and width >= 0, "model.num_heads", (heads, width),
         "num_heads >= 1 and head_channels >= 0")
  attn = set(get("attn_levels")) or {i for i in range(levels)
                                     if size // 2 ** i in m.attn_resolutions}
  for i in sorted(attn | {levels - 1}):  # and the middle, at the last level's width
    c = m.ch * m.ch_mult[i]
    _check(c % (width or heads) == 0, "model.head_channels" if width else "model.num_heads",
           width or heads, f"must divide the {c} channels of each level with attention")
  _check(get("norm_eps") > 0, "model.norm_eps", get("norm_eps"), "> 0")
  _check(get("downsample_padding") in DOWNSAMPLE_PADDING, "model.downsample_padding",
         get("downsample_padding"), f"one of {DOWNSAMPLE_PADDING}")


def _check_dit(m, size: int, text_encoder=None):
  """DiT's keys (models/dit.py); `size`: its input's side (image or latents)."""
  _check(m.patch_size >= 1 and size % m.patch_size == 0, "model.patch_size", m.patch_size,
         f"a divisor of the {size}x{size} input (data.image_size, or its latents' side)")
  _check(m.depth >= 1, "model.depth", m.depth, ">= 1")
  _check(m.num_heads >= 1 and m.hidden_size % 4 == 0 and m.hidden_size % m.num_heads == 0,
         "model.hidden_size", m.hidden_size,
         f"a multiple of 4 (the 2-D positions' sin-cos halves) and of model.num_heads="
         f"{m.num_heads}")
  _check(m.mlp_ratio > 0, "model.mlp_ratio", m.mlp_ratio, "> 0")
  _check(m.norm_eps > 0, "model.norm_eps", m.norm_eps, "> 0")
  _check(m.get("context_dim", 0) == 0 and not text_encoder, "model.name", m.name,
         "'unet' for cross-attention (model.context_dim, text.encoder); DiT is conditioned on "
         "class labels (model.num_classes) through adaLN")


def _check_latent(config):
  """Latent diffusion: the latents the U-Net must halve, and what makes no sense for them."""
  a, m = config.autoencoder, config.model
  _check_levels("autoencoder", a.ch, a.ch_mult, config.data.image_size)
  size = config.data.image_size // 2 ** (len(a.ch_mult) - 1)
  if m.name != "dit":
    down = 2 ** (len(m.ch_mult) - 1)
    _check(size % down == 0, "model.ch_mult", tuple(m.ch_mult),
           f"levels that halve the {size}x{size} latents (image_size / f) evenly: at most "
           f"{(size & -size).bit_length()} levels")
    sizes = [size // 2 ** i for i in range(len(m.ch_mult))]
    _check(all(r in sizes for r in m.attn_resolutions), "model.attn_resolutions",
           tuple(m.attn_resolutions), f"latent resolutions the U-Net visits: {sizes}")
  _check(not config.sampling.clip_denoised, "sampling.clip_denoised", True,
         "False for latent diffusion: latents are not bounded to [-1, 1]")
  _check("nll" not in parse_metrics(config.eval.metrics), "eval.metrics", config.eval.metrics,
         "fid and/or is: the bound of a latent model is in latent space, not the images' bits/dim")
  scale = config.latent.scale_factor
  _check(scale is None or scale > 0, "latent.scale_factor", scale, "> 0, or None (estimated)")


def _check_levels(key: str, ch: int, ch_mult, image_size: int):
  """A network that halves image_size at each level after the first, GroupNorm(32) at each."""
  _check(len(ch_mult) >= 1 and all(k >= 1 for k in ch_mult), f"{key}.ch_mult", ch_mult,
         "a non-empty tuple of positive multipliers")
  for k in ch_mult:
    _check((ch * k) % 32 == 0, f"{key}.ch", ch,
           f"every level's channels (ch * ch_mult = {ch * k}) must divide into GroupNorm's "
           "32 groups")
  down = 2 ** (len(ch_mult) - 1)
  _check(image_size % down == 0 and image_size >= down, "data.image_size", image_size,
         f"a multiple of {down}: the {key} halves it {len(ch_mult) - 1} times ({key}.ch_mult)")


def _check_autoencoder(a, image_size: int):
  from diffusion_jax.train_autoencoder import LossConfig
  _check_levels("autoencoder", a.ch, a.ch_mult, image_size)
  levels = len(a.ch_mult)
  _check(all(0 <= k < levels for k in a.attn_levels), "autoencoder.attn_levels",
         tuple(a.attn_levels), f"level indices in [0, {levels - 1}] (0: full size)")
  _check(a.z_channels >= 1, "autoencoder.z_channels", a.z_channels, ">= 1")
  _check(a.get("codebook_size", 0) >= 0, "autoencoder.codebook_size", a.get("codebook_size"),
         ">= 0 (0: KL; > 0: VQ with that many codebook vectors)")
  _check(0.0 <= a.dropout < 1.0, "autoencoder.dropout", a.dropout, "in [0, 1)")
  _check(a.lr > 0, "autoencoder.lr", a.lr, "> 0")
  _check(a.disc_layers >= 1 and image_size >= 2 ** (a.disc_layers + 2), "autoencoder.disc_layers",
         a.disc_layers, f">= 1, and at most log2(image_size) - 2 = "
         f"{int(math.log2(image_size)) - 2} (each strided layer halves the image)")
  _check(a.disc_ndf >= 1, "autoencoder.disc_ndf", a.disc_ndf, ">= 1")
  try:
    LossConfig(**a.loss.to_dict())
  except (TypeError, ValueError) as err:
    raise ConfigError(f"config.autoencoder.loss: {err}") from None


def _check_training(t, n_dev: int, n_proc: int):
  _check(t.batch_size >= 1 and t.batch_size % n_dev == 0, "training.batch_size", t.batch_size,
         f"a positive multiple of the device count ({n_dev})")
  _check(t.batch_size % n_proc == 0, "training.batch_size", t.batch_size,
         f"a multiple of the process count ({n_proc})")
  _check(t.grad_accum_steps >= 1 and t.batch_size % (t.grad_accum_steps * n_dev) == 0,
         "training.grad_accum_steps", t.grad_accum_steps,
         f"divides batch_size ({t.batch_size}) into micro-batches that split over {n_dev} devices")
  _check(t.lr > 0, "training.lr", t.lr, "> 0")
  _check(t.warmup_steps >= 0, "training.warmup_steps", t.warmup_steps, ">= 0")
  _check(t.grad_clip >= 0, "training.grad_clip", t.grad_clip, ">= 0 (0 disables clipping)")
  _check(0.0 <= t.ema_decay < 1.0, "training.ema_decay", t.ema_decay, "in [0, 1)")
  for key in ("num_steps", "checkpoint_every", "log_every", "sample_every", "keep_checkpoints",
              "steps_per_dispatch"):
    _check(t[key] >= 1, f"training.{key}", t[key], ">= 1")


def _check_sampling(s, f, n_dev: int):
  _check(s.method in samplers.METHODS, "sampling.method", s.method, f"one of {samplers.METHODS}")
  spacings = {"ddim": ("uniform", "quadratic"), "dpm_solver": samplers.DPM_SPACINGS,
              "ancestral": samplers.ANCESTRAL_SPACINGS}[s.method]
  _check(s.spacing is None or s.spacing in spacings, "sampling.spacing",
         s.spacing, f"for {s.method}: one of {spacings}")
  if s.method != "ancestral":
    _check(1 <= s.num_steps < f.num_timesteps + (s.method == "ddim"), "sampling.num_steps",
           s.num_steps, f"in [1, {f.num_timesteps}] for {s.method}")
  else:
    _check(s.num_steps >= 1, "sampling.num_steps", s.num_steps, ">= 1 for ancestral (< "
           f"diffusion.num_timesteps={f.num_timesteps}: a respaced chain; more: all of them)")
  if s.method == "dpm_solver" and s.spacing == "karras":
    _check(f.mean_type in ("eps", "v", "x0") and s.num_steps >= 2, "sampling.spacing",
           s.spacing, "for a model predicting eps, v or x0, with sampling.num_steps >= 2")
  _check(s.get("steps_offset", 0) >= 0, "sampling.steps_offset", s.get("steps_offset"), ">= 0")
  _check(s.batch_size >= 1 and s.batch_size % n_dev == 0, "sampling.batch_size", s.batch_size,
         f"a positive multiple of the device count ({n_dev})")
  _check(s.num_samples >= 1, "sampling.num_samples", s.num_samples, ">= 1")
  _check(0 <= s.interp_t < f.num_timesteps, "sampling.interp_t", s.interp_t,
         f"in [0, {f.num_timesteps - 1}]")
  _check(all(0 <= k < f.num_timesteps for k in s.progressive_steps), "sampling.progressive_steps",
         tuple(s.progressive_steps), f"timesteps in [0, {f.num_timesteps - 1}]")


def _check_eval(e, stage: str, n_dev: int):
  metrics, allowed = parse_metrics(e.metrics), METRICS[stage]
  _check(set(metrics) <= set(allowed) and len(metrics) > 0, "eval.metrics", e.metrics,
         f"comma-separated names from {allowed} (stage {stage!r})")
  _check(not (e.samples_npz and "nll" in metrics), "eval.metrics", e.metrics,
         "fid and/or is when eval.samples_npz is given (NLL needs the test set and a model)")
  _check(e.is_splits >= 1, "eval.is_splits", e.is_splits, ">= 1")
  _check(e.ref_num_examples >= 2, "eval.ref_num_examples", e.ref_num_examples, ">= 2")
  _check(e.num_examples >= 1, "eval.num_examples", e.num_examples, ">= 1")
  _check(e.batch_size >= 1 and e.batch_size % n_dev == 0, "eval.batch_size", e.batch_size,
         f"a positive multiple of the device count ({n_dev})")

