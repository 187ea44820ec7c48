"""LDM-4 on CelebA-HQ 256x256 (Rombach et al. 2022, Tab. 1: FID 5.11): a 274M-parameter U-Net
on the 64x64x3 latents of a VQ-f4 first stage (8192 codebook vectors), the layout of CompVis'
celebahq/ffhq-ldm-vq-4 configs: ch 224, ch_mult (1, 2, 3, 4), attention at the 32, 16 and 8
latent sizes with heads of 32 channels, LDM's "linear" schedule (sqrt-linear, 0.0015 ->
0.0195, our scaled_linear), Adam at 2e-6 x batch 48 = 9.6e-5, no warm-up, EMA 0.9999,
410k steps (LDM's hyper-parameter table for CelebA-HQ).

The first stage: a diffusers VQModel directory (e.g. the vqvae/ of CompVis/ldm-celebahq-256,
LDM's vq-f4) or an autoencoder run of this layout (--config.stage=autoencoder trains one:
codebook_size 8192, z 3, no attention but the middle's). LDM diffuses the latents before
quantisation, unscaled (scale 1 for a VQModel's weights).

  python main.py --config=configs/celebahq256_ldm.py --workdir=runs/celebahq256_ldm \
      --config.latent.autoencoder=/path/to/ldm-celebahq-256/vqvae
  # or LDM's published U-Net as step 0 (then --mode=sample / --mode=eval):
  python -m diffusion_jax.convert --src=/path/to/ldm-celebahq-256 \
      --config=configs/celebahq256_ldm.py --workdir=runs/ldm-celebahq-imported \
      --config.latent.autoencoder=/path/to/ldm-celebahq-256/vqvae
"""
from configs.base import get_config as base_config


def get_config():
  c = base_config()
  c.data.name = "celeb_a_hq"
  c.data.image_size = 256
  a = c.autoencoder  # vq-f4
  a.ch, a.ch_mult, a.num_res_blocks, a.attn_levels = 128, (1, 2, 4), 2, ()
  a.z_channels, a.codebook_size = 3, 8192
  c.latent.autoencoder = "runs/celebahq256_vq_f4"
  c.latent.scale_factor = 1.0      # LDM diffuses VQ latents unscaled
  m = c.model
  m.ch, m.ch_mult, m.num_res_blocks = 224, (1, 2, 3, 4), 2
  m.attn_resolutions, m.attn_levels, m.head_channels = (), (1, 2, 3), 32
  m.dropout = 0.0
  m.norm_eps, m.flip_sin_to_cos, m.freq_shift = 1e-5, True, 0.0  # openaimodel's conventions
  m.downsample_padding = "symmetric"
  c.diffusion.beta_schedule = "scaled_linear"
  c.diffusion.beta_start, c.diffusion.beta_end = 0.0015, 0.0195
  c.training.batch_size = 48
  c.training.lr = 9.6e-5
  c.training.warmup_steps = 0
  c.training.grad_clip = 0.0
  c.training.num_steps = 410_000
  c.training.fsdp = True
  c.sampling.method = "ddim"       # LDM's Tab. 1 samples: DDIM, 500 steps for CelebA-HQ
  c.sampling.num_steps = 500
  c.sampling.clip_denoised = False
  c.sampling.batch_size = 64
  c.eval.metrics = "fid"
  return c
