"""Class-conditional latent diffusion on Fashion-MNIST, the labels entering through
cross-attention as in LDM's class-conditional ImageNet model (Rombach et al. 2022, Sec. 3.3):
configs/fashion_mnist_ldm.py with SpatialTransformer blocks at both latent levels that attend
to a learned [B, 1, 128] label context instead of a label embedding added to the time's.

  python main.py --config=configs/fashion_mnist_kl.py --workdir=runs/fashion_mnist_kl   # first
  python main.py --config=configs/fashion_mnist_ldm_xattn.py --workdir=runs/fashion_mnist_xattn
  python main.py --config=configs/fashion_mnist_ldm_xattn.py --workdir=runs/fashion_mnist_xattn \
      --mode=sample
"""
from configs.fashion_mnist_ldm import get_config as label_embedding


def get_config():
  c = label_embedding()
  c.model.context_dim = 128      # the label context's width (LDM's ImageNet model: 512)
  c.model.head_channels = 32     # channels per attention head (LDM: 32)
  c.model.attn_resolutions = ()
  c.model.attn_levels = (0, 1)   # 8x8 and 4x4 latents, and the middle
  c.model.transformer_depth = 1
  return c
