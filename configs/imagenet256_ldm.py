"""LDM's class-conditional ImageNet 256x256 model (Rombach et al. 2022, Tab. 3: LDM-4-G, FID
3.60 with classifier-free guidance 1.5), CompVis' cin256-v2 layout: a 400M-parameter U-Net on
the 64x64x3 latents of a VQ-f4 first stage (8192 codebook vectors), the class label entering
through cross-attention (a ClassEmbedder of 1000 classes + the null label, 512 wide; one
SpatialTransformer block, one head, at the 32, 16 and 8 latent sizes), ch 192, ch_mult
(1, 2, 3, 5), LDM's sqrt-linear schedule 0.0015 -> 0.0195.

ImageNet comes through tensorflow-datasets' imagenet2012 (prepared by hand; center-cropped and
resized to 256). CompVis' checkpoint (one file holding U-Net, class table and first stage,
re-saved as .safetensors) imports as step 0:

  python -m diffusion_jax.convert --src=cin256-v2.safetensors \
      --config=configs/imagenet256_ldm.py --workdir=runs/cin256-imported \
      --config.latent.autoencoder=cin256-v2.safetensors
  python main.py --config=configs/imagenet256_ldm.py --workdir=runs/cin256-imported \
      --config.latent.autoencoder=cin256-v2.safetensors --mode=sample

Training hyper-parameters: base_learning_rate 1e-4 in cin256-v2.yaml (LDM scales it by the
batch); the batch and step count here are ours, not the paper's.
"""
from configs.base import get_config as base_config


def get_config():
  c = base_config()
  c.data.name = "imagenet2012"
  c.data.image_size = 256
  c.data.random_flip = False
  a = c.autoencoder  # vq-f4
  a.ch, a.ch_mult, a.num_res_blocks, a.attn_levels = 128, (1, 2, 4), 2, ()
  a.z_channels, a.codebook_size = 3, 8192
  c.latent.autoencoder = "runs/imagenet256_vq_f4"
  c.latent.scale_factor = 1.0      # LDM diffuses VQ latents unscaled
  m = c.model
  m.ch, m.ch_mult, m.num_res_blocks = 192, (1, 2, 3, 5), 2
  m.attn_resolutions, m.attn_levels = (), (1, 2, 3)
  m.num_heads, m.head_channels, m.transformer_depth = 1, 0, 1
  m.context_dim, m.num_classes, m.label_dropout = 512, 1000, 0.1
  m.dropout = 0.0
  m.norm_eps, m.flip_sin_to_cos, m.freq_shift = 1e-5, True, 0.0  # openaimodel's conventions
  m.downsample_padding = "symmetric"
  c.diffusion.beta_schedule = "scaled_linear"
  c.diffusion.beta_start, c.diffusion.beta_end = 0.0015, 0.0195
  c.training.batch_size = 64
  c.training.lr = 1e-4
  c.training.warmup_steps = 0
  c.training.grad_clip = 0.0
  c.training.num_steps = 500_000
  c.training.fsdp = True
  c.sampling.method = "ddim"
  c.sampling.num_steps = 250
  c.sampling.guidance_scale = 1.5
  c.sampling.clip_denoised = False
  c.sampling.batch_size = 50
  c.eval.metrics = "fid,is"
  return c
