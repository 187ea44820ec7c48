"""The sampler's network in inference mode, variants side by side in one process.

  python benchmarks/forward_ab.py --config=configs/cifar10_ddpm.py --precision=bf16 \
      --variants=resize:2048,subpixel:2048,resize:4096,subpixel:4096

A 1,000-step sampler spends its time in 1,000 calls of the network at the sampling batch, so
the network's images/s at that batch, timed here for model variants (`model.upsample_conv`) and
batch sizes in interleaved rounds (benchmarks/timing.py), predicts the sampler's time and picks
what the full run (`run.py --full_sample_batch`) should measure. Each variant compiles its own
forward; the parameters are shared (the variants compute the same function, checked on
the inputs they share: `max_abs_diff_vs_first`). Writes
<out>/<device>_<config>_forward_ab.json and prints the fastest variant as `BEST upsample batch`.
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import timing  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from diffusion_jax.models import build_model, denoiser  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config.")
flags.DEFINE_enum("precision", "bf16", ["fp32", "bf16"], "Compute precision (params stay fp32).")
flags.DEFINE_list("variants", ["resize:256", "subpixel:256"], "upsample_conv:batch, ...")
flags.DEFINE_integer("calls", 10, "Network calls per timed round.")
flags.DEFINE_integer("rounds", 5, "Interleaved rounds (ABBA order, medians).")
flags.DEFINE_integer("sampler_steps", 1000, "Steps of the sampler the figures are scaled to.")
flags.DEFINE_string("out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                    "Folder of the result JSON.")


def parse_variant(spec: str) -> tuple[str, int]:
  upsample, _, batch = spec.partition(":")
  if not batch.isdigit() or int(batch) < 1:
    raise app.UsageError(f"--variants: {spec!r} is not upsample_conv:batch (e.g. subpixel:2048)")
  return upsample, int(batch)


def variant_timer(config, params, upsample: str, x):
  """The jitted network of `config` with `model.upsample_conv=upsample`, compiled for `x`."""
  config = config.copy_and_resolve_references()
  config.model.upsample_conv = upsample
  model = build_model(config)
  t = jnp.full((x.shape[0],), 500, jnp.int32)
  fn = jax.jit(lambda p, x, t: denoiser(model, p)(x, t))
  t0 = time.perf_counter()
  compiled = fn.lower(params, x, t).compile()
  compile_s = time.perf_counter() - t0
  out = jax.block_until_ready(compiled(params, x, t))
  timer = timing.Timer(lambda: compiled(params, x, t), FLAGS.calls, jax.block_until_ready)
  timer.warm()
  return timer, compile_s, out


def main(argv):
  del argv
  config = FLAGS.config
  config.model.dtype = "bfloat16" if FLAGS.precision == "bf16" else "float32"
  variants = [parse_variant(v) for v in FLAGS.variants]
  size, ch = config.data.image_size, config.data.channels
  init_model = build_model(config)
  params = init_model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, ch)),
                           jnp.zeros((1,), jnp.int32))["params"]
  # the output conv starts at zero (as the paper's): perturb every weight so outputs can differ
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.02 * jax.random.normal(k, p.shape, p.dtype)
                                     for p, k in zip(leaves, keys)])
  x = jax.random.normal(jax.random.PRNGKey(1), (max(b for _, b in variants), size, size, ch))
  timers, res, outs = {}, {}, {}
  for upsample, batch in variants:
    name = f"{upsample}:{batch}"
    timers[name], compile_s, outs[name] = variant_timer(config, params, upsample, x[:batch])
    res[name] = {"upsample_conv": upsample, "batch": batch, "compile_s": compile_s}
  medians, samples = timing.interleave(timers, FLAGS.rounds)
  ref = next(iter(outs.values()))
  for name, (upsample, batch) in zip(res, variants):
    img_s = batch / medians[name]
    n = min(batch, ref.shape[0])  # same inputs up to the smaller batch: same outputs expected
    res[name].update({
        "network_img_per_s": img_s, "round_s": samples[name],
        "sample_50k_minutes": 50_000 * FLAGS.sampler_steps / img_s / 60,
        "max_abs_diff_vs_first": float(jnp.max(jnp.abs(
            outs[name][:n].astype(jnp.float32) - ref[:n].astype(jnp.float32))))})
    print(f"RESULT {name}: {img_s:,.0f} network img/s -> 50k x {FLAGS.sampler_steps} steps in "
          f"{res[name]['sample_50k_minutes']:.1f} min (compile {res[name]['compile_s']:.1f} s)")
  best = max(res, key=lambda k: res[k]["network_img_per_s"])
  kind = timing.device_kind(jax.devices()[0])
  path = timing.result_path(FLAGS.out, kind, timing.config_name(
      FLAGS["config"].config_filename), "forward_ab")
  os.makedirs(FLAGS.out, exist_ok=True)
  with open(path, "w") as f:
    json.dump({"device": kind, "precision": FLAGS.precision, "jax_version": jax.__version__,
               "calls_per_round": FLAGS.calls, "rounds": FLAGS.rounds, "best": best,
               "variants": res}, f, indent=1)
  print(f"wrote {path}")
  print("BEST", res[best]["upsample_conv"], res[best]["batch"])


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
