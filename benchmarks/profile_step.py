"""Where a training step's device time goes: a jax.profiler trace of a few steps, summed by kernel.

  python benchmarks/profile_step.py --config=configs/cifar10_ddpm.py --batch_size=128 --precision=bf16

Prints the wall time per step, the time the device was busy, the top kernels (ms per step, share)
and the same grouped into convolutions/matmuls, attention, XLA fusions, copies and the rest.
On CPU the kernels are XLA:CPU's thunks (the events of its Eigen worker threads), custom calls
named by their target (e.g. OnednnConvBackwardWeights, GroupNormForward).
`--hlo_out=DIR` also writes the optimised HLO of the step (to read the fusion decisions).
"""
from __future__ import annotations

import collections
import glob
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks import peer  # noqa: E402
from diffusion_jax import parallel, train  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config.")
flags.DEFINE_integer("batch_size", None, "Global batch (default: the config's).")
flags.DEFINE_enum("precision", "fp32", ["fp32", "bf16"], "Compute precision.")
flags.DEFINE_integer("steps", 5, "Traced steps.")
flags.DEFINE_integer("top", 25, "Kernels listed.")
flags.DEFINE_string("hlo_out", None, "Write the optimised HLO of the step here.")
flags.mark_flags_as_required(["config"])

GROUPS = (  # first match wins; lower-case substrings of kernel or HLO op names
    ("attention", ("flash", "fmha", "attention", "cudnn$fmha", "sdpa")),
    ("group norm (native)", ("groupnorm",)),
    ("conv/matmul", ("conv", "xmma", "gemm", "cutlass", "sm90_", "sm80_", "dot", "wgmma",
                     "cublas", "implicit", "winograd", "nchw", "nhwc")),
    ("copy/transpose", ("copy", "memcpy", "memset", "transpose", "dynamic-update-slice")),
    ("reduction fusion", ("reduce", "reduction")),
    ("elementwise fusion", ("fusion", "loop_", "input_", "triton")),
)


def group_of(name: str) -> str:
  low = name.lower()
  for group, keys in GROUPS:
    if any(k in low for k in keys):
      return group
  return "other"


def device_events(xplane_path: str, hlo_text: str = ""):
  """(name, hlo_op, duration_ns) of every kernel on the accelerator planes; on CPU, of every
  thunk XLA:CPU ran (custom calls named by their target, from the optimised HLO)."""
  from jax.profiler import ProfileData
  pd = ProfileData.from_file(xplane_path)
  out, thunks = [], []
  for plane in pd.planes:
    for line in plane.lines:
      if plane.name.startswith("/device:") and "stream" in line.name.lower():
        for ev in line.events:
          out.append((ev.name, str(dict(ev.stats).get("hlo_op", "")), float(ev.duration_ns)))
      elif plane.name.startswith("/host:") and "XLAEigen" in line.name:
        thunks += [ev for ev in line.events if not ev.name.startswith(("ThunkExecutor", "end:"))]
  if out:
    return out
  target = dict(re.findall(r"%([\w.\-]+) = [^\n]*custom_call_target=\"(\w+)\"", hlo_text))
  return [(target.get(ev.name, ev.name), ev.name, float(ev.duration_ns)) for ev in thunks]


def main(argv):
  del argv
  config = FLAGS.config
  batch = FLAGS.batch_size or config.training.batch_size
  config.training.batch_size = batch
  config.model.dtype = "bfloat16" if FLAGS.precision == "bf16" else "float32"
  peer.measured_space(config)  # latent configs: the network on latents, as run.py measures
  tr = train.Trainer(config)
  state = tr.init()
  shape = (batch, config.data.image_size, config.data.image_size, config.data.channels)
  host = {"image": np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32),
          "label": np.zeros((batch,), np.int32)}
  b = parallel.global_batch(host, tr.mesh)
  compiled = tr.step_fn.lower(state, b).compile()
  if FLAGS.hlo_out:
    os.makedirs(FLAGS.hlo_out, exist_ok=True)
    with open(os.path.join(FLAGS.hlo_out, "train_step.hlo.txt"), "w") as f:
      f.write(compiled.as_text())
  for _ in range(3):
    state, m = tr.step_fn(state, b)
  jax.block_until_ready(m)
  trace_dir = tempfile.mkdtemp(prefix="trace_")
  t0 = time.perf_counter()
  with jax.profiler.trace(trace_dir):
    for _ in range(FLAGS.steps):
      state, m = tr.step_fn(state, b)
    jax.block_until_ready(m)
  wall = (time.perf_counter() - t0) / FLAGS.steps
  events = device_events(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0],
                         compiled.as_text())
  if not events:
    print(f"no device kernels in the trace (platform {jax.default_backend()}); wall "
          f"{wall * 1e3:.2f} ms/step")
    return
  per_kernel, per_group = collections.Counter(), collections.Counter()
  count = collections.Counter()
  for name, hlo_op, ns in events:
    key = f"{name[:70]} [{hlo_op[:40]}]" if hlo_op else name[:100]
    per_kernel[key] += ns
    count[key] += 1
    per_group[group_of(name + " " + hlo_op)] += ns
  busy = sum(per_group.values()) / FLAGS.steps / 1e6
  print(f"batch {batch} {FLAGS.precision}: wall {wall * 1e3:.2f} ms/step (traced), device busy "
        f"{busy:.2f} ms/step ({100 * busy / (wall * 1e3):.0f} %), "
        f"{len(events) // FLAGS.steps} kernels/step")
  print("| group | ms/step | share |\n|---|---|---|")
  for g, ns in per_group.most_common():
    print(f"| {g} | {ns / FLAGS.steps / 1e6:.3f} | {100 * ns / FLAGS.steps / 1e6 / busy:.1f} % |")
  print("| kernel [hlo op] | calls/step | ms/step | share |\n|---|---|---|---|")
  for k, ns in per_kernel.most_common(FLAGS.top):
    ms = ns / FLAGS.steps / 1e6
    print(f"| {k} | {count[k] // FLAGS.steps} | {ms:.3f} | {100 * ms / busy:.1f} % |")


if __name__ == "__main__":
  app.run(main)
