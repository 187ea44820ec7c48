"""LSUN Church 256x256 (Ho et al. 2020, Appendix B): the CelebA-HQ layout, 1.2M steps."""
from configs.celebahq256_ddpm import get_config as celebahq_config


def get_config():
  c = celebahq_config()
  c.data.name = "lsun_church"
  c.training.num_steps = 1_200_000
  return c
