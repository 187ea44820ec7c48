"""CIFAR-10, L_simple, eps prediction: Table 1 of Ho et al. 2020 (FID 3.17, IS 9.46)."""
from configs.base import get_config as base_config


def get_config():
  return base_config()  # the defaults are this recipe
