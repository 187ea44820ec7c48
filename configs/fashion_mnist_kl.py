"""Latent diffusion's first stage on Fashion-MNIST: a KL autoencoder, 32x32 -> 8x8x4 (f = 4).

  python main.py --config=configs/fashion_mnist_kl.py --workdir=runs/fashion_mnist_kl
  python main.py --config=configs/fashion_mnist_kl.py --workdir=runs/fashion_mnist_kl --mode=eval

The LDM recipe (Rombach et al. 2022, App. G: L1 + KL 1e-6, Adam(0.5, 0.9)) at the quickstart's
size, trained on 2 CPU cores; the images are resized 28 -> 32 so that the 8x8 latents can be
halved by configs/fashion_mnist_ldm.py's U-Net. Two parts of the recipe are off here:
- the PatchGAN: disc_start is past the run. Started at step 1001 of 2000 (at 28x28) it took
  the test PSNR from 23.9 dB (step 1000) to 16.1 (1500) and 19.3 (2000): at this scale its
  adaptive weight (~1e3) makes its early, uninformed gradients as large as half the L1's.
  --config.autoencoder.loss.disc_start=N turns it on (LDM: after 50k steps).
- LPIPS: its VGG weights are not on a machine without internet (README: LPIPS), and on 32x32
  grey images its deeper features are 2-4 pixels wide; with them:
  --config.autoencoder.loss.perceptual_weight=1.
"""
from configs.fashion_mnist import get_config as quickstart


def get_config():
  c = quickstart()
  c.stage = "autoencoder"
  c.data.image_size = 32
  a = c.autoencoder
  a.ch = 32
  a.ch_mult = (1, 2, 2)          # 28 -> 14 -> 7
  a.num_res_blocks = 1
  a.attn_levels = ()
  a.z_channels = 4
  a.lr = 1e-3
  a.disc_ndf = 32
  a.disc_layers = 2              # 32 -> 16 -> 8: 6x6 logits, each seeing 34x34 pixels
  a.loss.perceptual_weight = 0.0
  a.loss.disc_start = 2001       # after the run: see above
  c.training.batch_size = 64
  c.training.num_steps = 2000
  c.training.checkpoint_every = 500
  c.training.log_every = 50
  c.training.sample_every = 500
  c.training.num_train_samples = 32
  c.eval.metrics = "psnr"        # fid (rFID) and lpips need their weights (README)
  c.eval.num_examples = 10_000
  c.eval.batch_size = 500
  return c
