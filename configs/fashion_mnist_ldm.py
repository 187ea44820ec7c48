"""Class-conditional latent diffusion on Fashion-MNIST: a DDPM U-Net on the 8x8x4 latents of
configs/fashion_mnist_kl.py's autoencoder, with classifier-free guidance.

  python main.py --config=configs/fashion_mnist_kl.py --workdir=runs/fashion_mnist_kl   # first
  python main.py --config=configs/fashion_mnist_ldm.py --workdir=runs/fashion_mnist_ldm
  python main.py --config=configs/fashion_mnist_ldm.py --workdir=runs/fashion_mnist_ldm \
      --mode=sample

The autoencoder is frozen; the U-Net learns z = s E(x) with s = 1/std(z) of the first batch
(LDM's scale_by_std, kept in the checkpoints), and its samples are decoded by D(z / s). It
sees the null label for 10 % of the images (model.label_dropout), so one network is both the
conditional and the unconditional model that guidance mixes (sampling.guidance_scale; 1: none).
The sample grids have 10 columns: one class each (sampling.class_label=k: class k only).
"""
from configs.fashion_mnist_kl import get_config as first_stage


def get_config():
  c = first_stage()  # the data (32x32) and the autoencoder's layout
  c.stage = "diffusion"
  c.latent.autoencoder = "runs/fashion_mnist_kl"
  c.model.ch = 64
  c.model.ch_mult = (1, 2)       # 8x8 -> 4x4 latents
  c.model.num_res_blocks = 2
  c.model.attn_resolutions = (4,)
  c.model.dropout = 0.0
  c.model.num_classes = 10
  c.model.label_dropout = 0.1
  c.training.batch_size = 64
  c.training.num_steps = 2000
  c.training.lr = 1e-3
  c.training.warmup_steps = 100
  c.training.ema_decay = 0.995
  c.training.checkpoint_every = 500
  c.training.log_every = 50
  c.training.sample_every = 1000
  c.training.num_train_samples = 100
  c.sampling.clip_denoised = False  # latents are not bounded to [-1, 1]
  c.sampling.guidance_scale = 2.0
  c.sampling.num_samples = 100
  c.sampling.batch_size = 100
  c.eval.metrics = "fid"         # needs the Inception weights (README)
  c.eval.num_examples = 10_000
  return c
