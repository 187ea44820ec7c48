"""Class-conditional latent diffusion with a transformer (DiT, Peebles & Xie 2023) on
Fashion-MNIST: a 5.5M-parameter DiT (hidden 192, 8 blocks, 3 heads) over the 2x2 patches of
configs/fashion_mnist_kl.py's 8x8x4 latents (16 tokens), the DiT recipe's learned variance and
hybrid loss, labels dropped 10 % of the time for classifier-free guidance.

  python main.py --config=configs/fashion_mnist_kl.py --workdir=runs/fashion_mnist_kl   # first
  python main.py --config=configs/fashion_mnist_dit.py --workdir=runs/fashion_mnist_dit
  python main.py --config=configs/fashion_mnist_dit.py --workdir=runs/fashion_mnist_dit \
      --mode=sample

configs/fashion_mnist_ldm.py is the same experiment with LDM's U-Net.
"""
from configs.fashion_mnist_ldm import get_config as latent_unet


def get_config():
  c = latent_unet()  # data, first stage, training and sampling
  m = c.model
  m.name = "dit"
  m.patch_size, m.hidden_size, m.depth, m.num_heads, m.mlp_ratio = 2, 192, 8, 3, 4.0
  m.norm_eps, m.freq_shift = 1e-5, 1.0  # diffusers' constants: exports as a DiTPipeline
  c.diffusion.var_type, c.diffusion.loss_type = "learned_range", "hybrid"
  c.training.lr = 3e-4
  c.training.grad_clip = 1.0
  return c
