"""Quickstart: Fashion-MNIST at its native 28x28, a small U-Net that trains on 2 CPU cores.

`make demo` trains it and writes samples; see README.md for its measured wall time on 2 cores.
"""
from configs.base import get_config as base_config


def get_config():
  c = base_config()
  c.data.name = "fashion_mnist"
  c.data.image_size = 28  # 28 -> 14 -> 7: divisible by 2^(levels-1)
  c.data.channels = 1
  c.data.random_flip = True
  c.model.ch = 32
  c.model.ch_mult = (1, 2, 2)
  c.model.num_res_blocks = 1
  c.model.attn_resolutions = (7,)
  c.model.dropout = 0.0
  c.training.batch_size = 64
  c.training.num_steps = 1000
  c.training.lr = 2e-3
  c.training.warmup_steps = 100
  c.training.ema_decay = 0.995
  c.training.checkpoint_every = 250
  c.training.log_every = 25
  c.training.sample_every = 500
  c.training.num_train_samples = 36
  c.sampling.method = "ddim"
  c.sampling.num_steps = 50
  c.sampling.num_samples = 64
  c.sampling.batch_size = 64
  c.sampling.interp_t = 400
  c.eval.metrics = "nll"
  c.eval.num_examples = 256
  return c
