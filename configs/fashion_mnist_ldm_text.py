"""Text-to-image latent diffusion on Fashion-MNIST, offline: LDM's text-conditional setting
(Rombach et al. 2022, Sec. 3.3 and 4.3.1), a transformer tau_theta trained with the U-Net on
the captions' bytes (no pretrained weights or vocabulary), the captions made from the labels
("a photo of a sneaker", ...), 10 % empty captions for classifier-free guidance.
configs/fashion_mnist_ldm_xattn.py's U-Net (cross-attention at both latent levels) attending to
the caption's 77 token encodings instead of a label embedding.

  python main.py --config=configs/fashion_mnist_kl.py --workdir=runs/fashion_mnist_kl   # first
  python main.py --config=configs/fashion_mnist_ldm_text.py --workdir=runs/fashion_mnist_text
  python main.py --config=configs/fashion_mnist_ldm_text.py --workdir=runs/fashion_mnist_text \
      --mode=sample --config.sampling.prompts="('a photo of a sneaker', 'a photo of a bag')"
"""
from configs.fashion_mnist_ldm_xattn import get_config as label_xattn


def get_config():
  c = label_xattn()
  c.model.num_classes = 0          # the captions condition the model instead
  c.model.label_dropout = 0.0
  c.text.encoder = "learned"
  c.text.layers = 2                # the text transformer: 2 blocks, width model.context_dim
  c.text.max_length = 32           # "a photo of a ankle boot" is 23 bytes + begin/end
  c.text.caption_template = "a photo of a {}"
  c.text.dropout = 0.1
  return c
