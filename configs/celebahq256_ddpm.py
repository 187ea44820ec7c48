"""CelebA-HQ 256x256 (Ho et al. 2020, Appendix B): 114M parameters, lr 2e-5, batch 64."""
from configs.base import get_config as base_config


def get_config():
  c = base_config()
  c.data.name = "celeb_a_hq"
  c.data.image_size = 256
  c.model.ch_mult = (1, 1, 2, 2, 4, 4)
  c.model.attn_resolutions = (16,)
  c.model.dropout = 0.0
  c.training.lr = 2e-5
  c.training.batch_size = 64
  c.training.num_steps = 500_000
  c.training.fsdp = True
  c.sampling.batch_size = 64
  return c
