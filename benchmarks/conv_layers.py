"""The kernels under the CPU figures: one 3x3 convolution, XLA:CPU's vs PyTorch's (oneDNN).

  python benchmarks/conv_layers.py --config=configs/fashion_mnist.py

Convolutions are ~80 % of the U-Net's forward pass on CPU (GroupNorm's statistics ~7 %, swish
~5 %: measured by removing each), so the model can only be as fast as the convolution kernels
the framework calls. For each 3x3 convolution shape of the config's U-Net at its training batch,
times the forward pass and the kernel gradient, XLA:CPU (Eigen, this library's compiler options)
against torch (oneDNN, NCHW and channels-last) and, where it builds, oneDNN called from XLA
(models/onednn_conv.py, model.conv='onednn'), plus a 2048^3 matmul as each side's peak; the
sides take turns (timing.interleave). Prints a table, writes
benchmarks/results/<device>_<config>_conv_layers.json.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from jax import lax  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks import timing  # noqa: E402
from diffusion_jax import xla_options  # noqa: E402
from diffusion_jax.models import onednn_conv  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config.")
flags.DEFINE_integer("rounds", 5, "Timing rounds (the sides take turns).")
flags.DEFINE_integer("repeats", 5, "Calls per round.")
flags.DEFINE_string("out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                    "Where the JSON goes.")
flags.mark_flags_as_required(["config"])


def conv_shapes(config) -> list[tuple[int, int, int, int]]:
  """(batch, size, in, out channels) of each level's ResBlock 3x3 convolutions."""
  m, b, size = config.model, config.training.batch_size, config.data.image_size
  shapes, ch_in = [], m.ch
  for level, mult in enumerate(m.ch_mult):
    ch = m.ch * mult
    shapes += [(b, size >> level, ch_in, ch), (b, size >> level, ch, ch)]
    ch_in = ch
  return list(dict.fromkeys(shapes))


def jax_timers(n, size, cin, cout, reps, conv_general_dilated=lax.conv_general_dilated):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(n, size, size, cin)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, cin, cout)) / np.sqrt(9 * cin), jnp.float32)
  g = jnp.asarray(rng.normal(size=(n, size, size, cout)), jnp.float32)
  conv = lambda x, w: conv_general_dilated(x, w, (1, 1), "SAME",
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
  fwd = xla_options.jit(conv)
  kernel_grad = xla_options.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
  block = jax.block_until_ready
  return {"forward": timing.Timer(lambda: fwd(x, w), reps, block),
          "kernel_grad": timing.Timer(lambda: kernel_grad(x, w, g), reps, block)}


def torch_timers(torch, n, size, cin, cout, reps, channels_last: bool):
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  x = torch.randn(n, cin, size, size).contiguous(memory_format=fmt)
  w = (torch.randn(cout, cin, 3, 3) / np.sqrt(9 * cin)).contiguous(memory_format=fmt)
  g = torch.randn(n, cout, size, size).contiguous(memory_format=fmt)
  conv = torch.nn.functional.conv2d
  grad = torch.nn.grad.conv2d_weight
  return {"forward": timing.Timer(lambda: conv(x, w, padding=1), reps),
          "kernel_grad": timing.Timer(lambda: grad(x, w.shape, g, padding=1), reps)}


def main(argv):
  del argv
  import torch
  config = FLAGS.config
  rows, reps = [], FLAGS.repeats
  onednn = not onednn_conv.unavailable_reason()
  if not onednn:
    print(f"no oneDNN-in-XLA column: {onednn_conv.unavailable_reason()}")
  for n, size, cin, cout in conv_shapes(config):
    flops = 2 * n * size * size * 9 * cin * cout
    sides = {"xla": jax_timers(n, size, cin, cout, reps),
             "torch_nchw": torch_timers(torch, n, size, cin, cout, reps, False),
             "torch_nhwc": torch_timers(torch, n, size, cin, cout, reps, True)}
    if onednn:
      sides["xla_onednn"] = jax_timers(n, size, cin, cout, reps, onednn_conv.conv_general_dilated)
    row = {"shape": [n, size, size, cin, cout], "gflop": flops / 1e9}
    for op in ("forward", "kernel_grad"):
      timers = {side: t[op] for side, t in sides.items()}
      for t in timers.values():
        t.warm()
      medians, _ = timing.interleave(timers, FLAGS.rounds)
      row[op] = {side: {"ms": 1e3 * s, "gflop_per_s": flops / s / 1e9}
                 for side, s in medians.items()}
    rows.append(row)
  a = jnp.ones((2048, 2048), jnp.float32)
  at = torch.ones(2048, 2048)
  mm = xla_options.jit(lambda a: a @ a)
  matmul = {"xla": timing.Timer(lambda: mm(a), reps, jax.block_until_ready),
            "torch": timing.Timer(lambda: at @ at, reps)}
  for t in matmul.values():
    t.warm()
  medians, _ = timing.interleave(matmul, FLAGS.rounds)
  peak = {side: 2 * 2048**3 / s / 1e9 for side, s in medians.items()}
  print(f"2048^3 matmul GFLOP/s: XLA {peak['xla']:.1f}, torch {peak['torch']:.1f} "
        f"({torch.get_num_threads()} threads)")
  print("| shape [B,H,W,Cin,Cout] | op | XLA ms | oneDNN in XLA ms | torch NCHW ms | "
        "torch NHWC ms | XLA speed / best torch's |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    for op in ("forward", "kernel_grad"):
      ms = {side: v["ms"] for side, v in r[op].items()}
      best = min(ms["torch_nchw"], ms["torch_nhwc"])
      in_xla = f"{ms['xla_onednn']:.2f}" if "xla_onednn" in ms else "-"
      print(f"| {r['shape']} | {op} | {ms['xla']:.2f} | {in_xla} | {ms['torch_nchw']:.2f} | "
            f"{ms['torch_nhwc']:.2f} | {best / ms['xla']:.2f}x |")
  kind = timing.device_kind(jax.devices()[0])
  cfg = timing.config_name(FLAGS["config"].config_filename)
  path = timing.result_path(FLAGS.out, kind, cfg, "conv_layers")
  os.makedirs(FLAGS.out, exist_ok=True)
  with open(path, "w") as f:
    json.dump({"device": kind, "config": cfg, "jax_version": jax.__version__,
               "torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
               "onednn_in_xla": onednn_conv.implementation() if onednn else None,
               "matmul_2048_gflop_per_s": peak, "layers": rows}, f, indent=1)
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
