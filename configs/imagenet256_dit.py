"""DiT-XL/2 on ImageNet 256x256 (Peebles & Xie 2023, Tab. 4: FID 2.27 with classifier-free
guidance 1.5, 250 DDPM steps; 9.62 without): a 675M-parameter transformer over the 2x2
patches of Stable Diffusion's VAE latents (32x32x4, 256 tokens), conditioned on the class
(1000 + the null label) and the timestep through adaLN-Zero; learned variance (IDDPM's
hybrid loss), linear betas 1e-4 -> 0.02 over 1000 steps, AdamW 1e-4 without weight decay (Adam),
batch 256, no warmup or clipping, EMA 0.9999, horizontal flips, labels dropped 10 % of the time.

The first stage is the VAE the paper used, stabilityai/sd-vae-ft-ema (or -mse), as a local
diffusers directory (latent.autoencoder; its scaling factor 0.18215 comes with it).
ImageNet comes through tensorflow-datasets' imagenet2012 (prepared by hand; center-cropped
and resized to 256). A diffusers DiT pipeline (facebook/DiT-XL-2-256: transformer/, vae/,
scheduler/) imports as step 0:

  python -m diffusion_jax.convert --src=DiT-XL-2-256 --config=configs/imagenet256_dit.py \
      --workdir=runs/dit-xl-2-256 --config.latent.autoencoder=DiT-XL-2-256/vae
  python main.py --config=configs/imagenet256_dit.py --workdir=runs/dit-xl-2-256 \
      --config.latent.autoencoder=DiT-XL-2-256/vae --mode=sample --config.sampling.class_label=207

The paper's own checkpoint (facebookresearch/DiT's DiT-XL-2-256x256.pt, re-saved as
.safetensors; README "Public DiT weights") imports with its constants, below:

  python -m diffusion_jax.convert --src=DiT-XL-2-256x256.safetensors \
      --config=configs/imagenet256_dit.py --workdir=runs/dit-xl-2-256-paper \
      --config.model.freq_shift=0 --config.model.norm_eps=1e-6 \
      --config.latent.autoencoder=sd-vae-ft-ema

The paper's steps: 7M for FID 2.27 (400k for the scaling study); ours are set to 400k.
diffusers' DiT differs from the paper's code in two constants, kept here as diffusers has them
so that its weights import unchanged: model.freq_shift 1 (the paper's timestep frequencies:
0) and model.norm_eps 1e-5 for the MLP's LayerNorm (1e-6). Sampling as the paper's: 250
ancestral steps of the respaced process (IDDPM's respacing, timesteps round(linspace(0, 999,
250))) with the learned variance (samplers.respaced).
"""
from configs.base import get_config as base_config


def get_config():
  c = base_config()
  c.data.name = "imagenet2012"
  c.data.image_size = 256
  c.data.random_flip = True
  c.latent.autoencoder = "sd-vae-ft-ema"  # a local diffusers AutoencoderKL directory
  m = c.model
  m.name = "dit"
  m.patch_size, m.hidden_size, m.depth, m.num_heads, m.mlp_ratio = 2, 1152, 28, 16, 4.0
  m.num_classes, m.label_dropout, m.dropout = 1000, 0.1, 0.0
  m.norm_eps, m.freq_shift = 1e-5, 1.0
  d = c.diffusion
  d.beta_schedule, d.beta_start, d.beta_end = "linear", 1e-4, 0.02
  d.var_type, d.loss_type = "learned_range", "hybrid"
  t = c.training
  t.batch_size = 256
  t.lr = 1e-4
  t.warmup_steps = 0
  t.grad_clip = 0.0
  t.ema_decay = 0.9999
  t.num_steps = 400_000
  t.fsdp = True
  c.sampling.method = "ancestral"
  c.sampling.num_steps = 250
  c.sampling.spacing = "linspace"
  c.sampling.guidance_scale = 1.5
  c.sampling.clip_denoised = False
  c.sampling.batch_size = 64
  c.eval.metrics = "fid,is"
  return c
