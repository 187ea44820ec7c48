"""Throughput of training and sampling, ours and diffusers/PyTorch's, in one process.

  python benchmarks/run.py --config=configs/fashion_mnist.py
  python benchmarks/run.py --config=configs/cifar10_ddpm.py --batch_size=128 --precision=bf16

Measures, after compilation and blocking on results: training images/s (loss, grads, Adam,
EMA), sampling images/s for one denoising step and for DDIM-50, first-step compile time, peak
memory, FLOPs per image from XLA's cost analysis, achieved TFLOP/s and the share of the
device's peak. The same model in PyTorch (diffusers' UNet2DModel or DiTTransformer2DModel in
the same layout: the one diffusion_jax.export writes; same batch, labels, loss, Adam, same
precision; torch.compile where it works: GPU, and CPU with a C++ compiler)
is measured in the same run, the two taking turns (benchmarks/timing.py: rounds in ABBA order,
medians; on CPU each side's own peak RSS). Writes benchmarks/results/<device>_<config>.json
(first with one round of ours alone, marked provisional, in case the peer takes the process down).
Latent configs are measured in latent space (measured_space).
"""
from __future__ import annotations

import json
import os
import platform
import traceback
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import peer, timing  # noqa: E402
from diffusion_jax import huge_pages  # noqa: E402

huge_pages.reexec_if_useful()  # as main.py: both frameworks then run with malloc on huge pages
# JAX takes 75 % of GPU memory up front; leave room for PyTorch measured in the same process
if not {"--nopeer", "--peer=false", "--peer=False", "--peer=0"} & set(sys.argv):
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from diffusion_jax import parallel, samplers, summary, train, xla_options  # noqa: E402
from diffusion_jax.models import DTYPES, build_model, denoiser, fast_ops, onednn_conv  # noqa: E402
from diffusion_jax.sample import Sampler  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config.")
flags.DEFINE_integer("batch_size", None, "Global batch (default: config.training.batch_size).")
flags.DEFINE_enum("precision", "fp32", ["fp32", "bf16"], "Compute precision (params stay fp32).")
flags.DEFINE_integer("train_steps", 10, "Timed training steps per round.")
flags.DEFINE_integer("ddim_steps", 50, "DDIM steps in the sampling measurement.")
flags.DEFINE_integer("sample_repeats", 2, "Timed DDIM runs per round.")
flags.DEFINE_integer("rounds", 3, "Timing rounds; ours and the peer take turns (ABBA), and "
                     "each figure is the median round: the machine's drift falls on both.")
flags.DEFINE_bool("xla_options", True, "diffusion_jax/xla_options.py's compiler options (CPU: "
                  "Eigen convolutions and matmuls); off = XLA's defaults, to measure the lever.")
flags.DEFINE_bool("fast_group_norm", True, "diffusion_jax's GroupNorm (off: flax's; lever).")
flags.DEFINE_bool("native_group_norm", True, "GroupNorm by csrc/group_norm.cc where the CPU "
                  "kernels run (model.conv; off: XLA's; lever).")
flags.DEFINE_enum("gn_swish_vjp", "off", ["off", "on", "cpu"], "swish(GroupNorm) with its own "
                  "backward (fast_ops.group_norm_swish): off = autodiff (default), on, CPU only.")
flags.DEFINE_bool("peer", True, "Also measure diffusers/PyTorch.")
flags.DEFINE_bool("ours", True, "Measure diffusion_jax (off: the peer alone).")
flags.DEFINE_bool("sample", True, "Also measure sampling (one step, DDIM).")
flags.DEFINE_bool("train", True, "Measure training (off: sampling alone, from initial params).")
flags.DEFINE_enum("attention", None, ["auto", "xla", "cudnn", "per_head"], "model.attention override.")
flags.DEFINE_bool("remat", None, "model.remat override.")
flags.DEFINE_enum("conv", None, ["auto", "xla", "onednn"], "model.conv override.")
flags.DEFINE_enum("upsample_conv", None, ["auto", "subpixel", "resize"],
                  "model.upsample_conv override.")
flags.DEFINE_bool("donate", True, "Donate the train state's buffers to the step (lever).")
flags.DEFINE_integer("steps_per_dispatch", 1, "Training steps per compiled call (lax.scan).")
flags.DEFINE_enum("prng", "threefry2x32", ["threefry2x32", "rbg", "unsafe_rbg"],
                  "jax_default_prng_impl: the dropout masks' and noise's generator (lever).")
flags.DEFINE_integer("full_sample_batch", 0, "> 0: time the configured sampler (ancestral, "
                     "1000 steps) on one batch of this size; extrapolate to 50,000 images.")
flags.DEFINE_string("tag", "", "Suffix of the result file (lever runs).")
flags.DEFINE_bool("compile_only", False, "Compile the train step, print its compile time and "
                  "stop: with JAX_COMPILATION_CACHE_DIR set, runs compiled side by side fill "
                  "the cache that later runs, timed one at a time, load (benchmarks/gpu.sh warm).")
flags.DEFINE_enum("torch_compile", "auto", ["auto", "on", "off"],
                  "auto: on GPU, and on CPU where a C++ compiler is found (inductor needs one).")
flags.DEFINE_string("out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                    "Where the JSON goes.")
flags.mark_flags_as_required(["config"])

# dense peak TFLOP/s by device kind: (bf16, fp32 as XLA runs it). On GPU, fp32 convs and matmuls
# run on TF32 tensor cores (JAX's default precision); TPUs take bf16 passes for fp32 by default.
PEAKS = {"H100": (989.0, 494.7), "H200": (989.0, 494.7), "A100": (312.0, 156.0),
         "TPU v3": (123.0, 123.0), "TPU v4": (275.0, 275.0), "TPU v5 lite": (197.0, 197.0),
         "TPU v5e": (197.0, 197.0), "TPU v5p": (459.0, 459.0), "TPU v5": (459.0, 459.0)}


def peak_tflops(kind: str, precision: str):
  for name, (bf16, fp32) in PEAKS.items():
    if name.lower() in kind.lower():
      return bf16 if precision == "bf16" else fp32
  return None


def device_peak_bytes(device) -> int | None:
  """The device allocator's peak (GPU/TPU); None on CPU, where RSS is measured instead."""
  stats = device.memory_stats() if device.platform != "cpu" else None
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def bench_ours(config, batch):
  """Figures that need no timing (compile time, FLOPs, memory) and the timers of the others.

  Everything is compiled and run once here; main() times the sides in interleaved rounds.
  """
  device = jax.devices()[0]
  res, timers = {}, {}
  with timing.PeakRSS() as rss:
    tr = train.Trainer(config)
    state = tr.init()
    host = _host_batch(config, batch)
    # a copy: the train timer donates the state's buffers, its EMA parameters included
    params = jax.tree.map(jnp.copy, state.ema_params)
    if FLAGS.train:
      res, timers["train"] = training_timer(tr, state, host)
    if FLAGS.compile_only:
      return res, timers
    if FLAGS.sample:
      apply, ddim, x, t = _sampling_fns(tr, host)
      timers["one_step"] = timing.Timer(lambda: apply(params, x, t), 5, jax.block_until_ready)
      timers["ddim"] = timing.Timer(lambda: ddim(params, x, jax.random.PRNGKey(0)),
                                    FLAGS.sample_repeats, jax.block_until_ready)
      timers["one_step"].warm()
      timers["ddim"].warm()
    if FLAGS.full_sample_batch:
      res.update(bench_full_sampling(config, tr, params, FLAGS.full_sample_batch))
  res["peak_mem_bytes"] = device_peak_bytes(device) or rss.bytes
  return res, timers


def _host_batch(config, batch):
  shape = (batch, config.data.image_size, config.data.image_size, config.data.channels)
  return {"image": np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32),
          "label": np.zeros((batch,), np.int32)}


def _train_fn(tr, k: int):
  """The jitted step, or k steps per call (lax.scan over a [k, B, ...] batch)."""
  return tr.step_fn if k == 1 and FLAGS.donate else tr.jit_step(FLAGS.donate, k)


def training_timer(tr, state, host):
  """The real train step compiled and run once, its FLOPs, and its timer (seconds per step)."""
  k = FLAGS.steps_per_dispatch
  # k > 1: the same batch k times (the data pipeline is not what is measured)
  b = (parallel.global_batch(parallel.stack_batches([host] * k), tr.mesh, stacked=True) if k > 1
       else parallel.global_batch(host, tr.mesh))
  t0 = time.perf_counter()
  fn = _train_fn(tr, k).lower(state, b).compile()
  compile_s = time.perf_counter() - t0
  if FLAGS.compile_only:
    return {"compile_s": compile_s}, None
  mem = fn.memory_analysis()  # XLA's buffer assignment: what the step needs beyond its inputs
  flops_step = summary.matmul_flops(tr.train_step, state,
                                    jax.tree.map(lambda x: x[0], b) if k > 1 else b)
  holder = {"s": state}

  def step():
    holder["s"], metrics = fn(holder["s"], b)
    return metrics["loss"]

  timer = timing.Timer(step, max(FLAGS.train_steps // k, 1), jax.block_until_ready, k)
  timer.warm()
  return {"compile_s": compile_s, "flops_per_train_step": flops_step,
          "train_temp_bytes": getattr(mem, "temp_size_in_bytes", None),
          "train_compiled_peak_bytes": getattr(mem, "peak_memory_in_bytes", None)}, timer


def _sampling_fns(tr, host):
  """One denoising step and DDIM, jitted, with their inputs."""
  apply = xla_options.jit(lambda p, x, t: denoiser(tr.model, p)(x, t), tr.model)
  ddim = xla_options.jit(lambda p, x, k: samplers.ddim_sample(
      tr.diffusion, denoiser(tr.model, p), x, k, FLAGS.ddim_steps, 0.0, clip_denoised=True),
      tr.model)
  x = jax.device_put(jnp.asarray(host["image"]), parallel.batch_sharding(tr.mesh))
  return apply, ddim, x, jnp.full((x.shape[0],), 500, jnp.int32)


def bench_full_sampling(config, tr, params, n: int):
  """The sample mode's own compiled sampler (config.sampling: 1000 ancestral steps) on n images."""
  sampler = Sampler(config, tr.model, tr.diffusion, tr.mesh, n)
  key = jax.random.PRNGKey(0)
  t0 = time.perf_counter()
  run = sampler._run.lower(params, key, None, None).compile()
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  x = jax.block_until_ready(run(params, key, None, None))
  dt = time.perf_counter() - t0
  steps = samplers.network_evaluations(config.sampling.method, tr.diffusion,
                                       config.sampling.num_steps)
  return {"full_sample_batch": n, "full_sample_steps": steps, "full_sample_s": dt,
          "full_sample_compile_s": compile_s, "full_sample_finite": bool(np.isfinite(x).all()),
          "sample_50k_minutes": 50_000 / n * dt / 60,
          "network_img_per_s_in_sampling": n * steps / dt}


def bench_peer(config, batch, precision):
  """bench_ours for diffusers/PyTorch: its untimed figures and its timers."""
  import torch
  from diffusers import DDIMScheduler
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  with timing.PeakRSS() as rss:
    res, timers = _peer(torch, DDIMScheduler, dev, config, batch, precision)
  res["peer_peak_mem_bytes"] = int(torch.cuda.max_memory_allocated()) if dev == "cuda" else (
      rss.bytes)
  return res, timers


def _peer(torch, DDIMScheduler, dev, config, batch, precision):  # noqa: N803 - a class
  # as XLA on GPU: tf32 tensor cores for float32 matmuls and convs; cuDNN picks its fastest
  torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
  torch.backends.cudnn.benchmark = True
  torch.manual_seed(0)
  net = peer.diffusers_model(config).to(dev).to(memory_format=torch.channels_last)
  ema = [p.detach().clone() for p in net.parameters()]
  opt = torch.optim.Adam(net.parameters(), lr=config.training.lr)
  use_compile = FLAGS.torch_compile == "on" or (
      FLAGS.torch_compile == "auto" and (dev == "cuda" or shutil.which("c++") is not None))
  fwd = peer.forward(torch.compile(net) if use_compile else net, config)
  amp = torch.autocast(dev, dtype=torch.bfloat16, enabled=precision == "bf16")
  c = config.data.channels
  shape = (batch, c, config.data.image_size, config.data.image_size)
  x0 = torch.rand(shape, device=dev) * 2 - 1
  tables = peer.schedule_tables(torch, config, dev)
  m = config.model
  # labels as _host_batch's; the null label (num_classes) for label dropout and for sampling.
  # diffusers' DiT drops labels itself in train mode (10 %); the U-Net's are dropped here.
  labels = torch.zeros((batch,), dtype=torch.long, device=dev) if m.num_classes else None
  null = torch.full((batch,), m.num_classes, device=dev) if m.num_classes else None
  drop = m.get("label_dropout", 0.0) if m.name != "dit" and m.num_classes else 0.0
  learned = config.diffusion.var_type.startswith("learned")

  def step():
    t = torch.randint(0, config.diffusion.num_timesteps, (batch,), device=dev)
    noise = torch.randn_like(x0)
    x_t = peer.q_sample(tables, x0, t, noise)
    y = labels if not drop else torch.where(torch.rand(batch, device=dev) < drop, null, labels)
    with amp:
      out = fwd(x_t, t, y).float()
    loss = torch.mean((out[:, :c] - noise) ** 2)
    if learned:
      d = config.diffusion  # ours: mse + lambda T L_vlb (diffusion.py)
      loss = loss + d.hybrid_lambda * d.num_timesteps * peer.vlb_term(
          torch, out, x0, x_t, t, tables, c)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if config.training.grad_clip > 0:  # as ours: 0 is no clipping
      torch.nn.utils.clip_grad_norm_(net.parameters(), config.training.grad_clip)
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, [p.detach() for p in net.parameters()],
                           1 - config.training.ema_decay)
    return loss

  def train_step():  # the timers take turns: back to train mode after sampling's eval
    net.train()
    return step()

  sync = (lambda out: torch.cuda.synchronize()) if dev == "cuda" else (lambda out: out)
  timers = {"train": timing.Timer(train_step, FLAGS.train_steps, sync)}
  t0 = time.perf_counter()
  timers["train"].warm()
  res = {"peer_compile_s": time.perf_counter() - t0, "peer_torch_compile": use_compile,
         "torch_version": torch.__version__,
         "peer_threads": torch.get_num_threads() if dev == "cpu" else None}
  if not FLAGS.sample:
    return res, timers
  sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)

  @torch.no_grad()
  def one():
    net.eval()
    with amp:
      return fwd(x0, torch.full((batch,), 500, device=dev), null)

  @torch.no_grad()
  def ddim():
    net.eval()
    sched.set_timesteps(FLAGS.ddim_steps)
    x = torch.randn(shape, device=dev)
    for t in sched.timesteps:
      with amp:
        eps = fwd(x, t.to(dev).expand(batch), null)[:, :c]
      x = sched.step(eps.float(), t, x).prev_sample
    return x

  timers.update(one_step=timing.Timer(one, 5, sync),
                ddim=timing.Timer(ddim, FLAGS.sample_repeats, sync))
  for timer in timers.values():  # torch.compile's eval-mode graphs; train mode is cached
    timer.warm()
  return res, timers


def conv_kernels(config) -> str:
  """Whose convolutions model.conv resolved to here, e.g. 'onednn (brgconv:avx2)' or 'xla'."""
  if onednn_conv.use_onednn(config.model.conv, DTYPES[config.model.dtype]):
    return f"onednn ({onednn_conv.implementation()})"
  return "xla"


def main(argv):
  del argv
  config = FLAGS.config
  batch = FLAGS.batch_size or config.training.batch_size
  config.training.batch_size = batch
  config.model.dtype = "bfloat16" if FLAGS.precision == "bf16" else "float32"
  if FLAGS.attention is not None:
    config.model.attention = FLAGS.attention
  if FLAGS.remat is not None:
    config.model.remat = FLAGS.remat
  if FLAGS.conv is not None:
    config.model.conv = FLAGS.conv
  if FLAGS.upsample_conv is not None:
    config.model.upsample_conv = FLAGS.upsample_conv
  try:
    space = peer.measured_space(config)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  jax.config.update("jax_default_prng_impl", FLAGS.prng)
  xla_options.ENABLED = FLAGS.xla_options
  fast_ops.FAST_GROUP_NORM = FLAGS.fast_group_norm
  fast_ops.SWISH_VJP = FLAGS.gn_swish_vjp
  fast_ops.NATIVE_GROUP_NORM = FLAGS.native_group_norm
  device = jax.devices()[0]
  kind = timing.device_kind(device)
  cfg_name = timing.config_name(FLAGS["config"].config_filename)
  res = {"device": kind, "platform": device.platform, "num_devices": jax.device_count(),
         "config": cfg_name, "batch_size": batch, "precision": FLAGS.precision,
         "model": config.model.name, "space": space,
         "input_shape": [config.data.image_size, config.data.image_size, config.data.channels],
         "attention": config.model.attention, "remat": config.model.remat,
         "conv": config.model.conv, "conv_kernels": conv_kernels(config),
         "upsample_conv": config.model.upsample_conv,
         "donate": FLAGS.donate, "steps_per_dispatch": FLAGS.steps_per_dispatch,
         "prng": FLAGS.prng, "xla_options": xla_options.compiler_options(build_model(config)),
         "fast_group_norm": FLAGS.fast_group_norm, "gn_swish_vjp": FLAGS.gn_swish_vjp,
         "native_group_norm": FLAGS.native_group_norm,
         "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax_version": jax.__version__,
         "python": platform.python_version(), "tag": FLAGS.tag,
         "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
         # set: compile_s may be a load from this cache (gpu.sh warm prints the compile times)
         "compilation_cache": os.environ.get("JAX_COMPILATION_CACHE_DIR")}
  if FLAGS.compile_only and not (FLAGS.ours and FLAGS.train):
    raise app.UsageError("--compile_only compiles our train step: drop --notrain / --noours")
  path = timing.result_path(FLAGS.out, kind, cfg_name, FLAGS.tag)
  os.makedirs(FLAGS.out, exist_ok=True)
  sides = {}
  if FLAGS.ours:
    ours, sides["ours"] = bench_ours(config, batch)
    if FLAGS.compile_only:
      print(f"COMPILED {cfg_name} b{batch} {FLAGS.tag or 'default'}: {ours['compile_s']:.1f} s")
      return
    res.update(ours)
    if FLAGS.peer:  # ours alone, one round, kept on disk in case the peer takes the process down
      _write(path, dict(res, **timed_rounds(sides, batch, 1), provisional=True))
  if FLAGS.peer:
    try:
      theirs, sides["peer"] = bench_peer(config, batch, FLAGS.precision)
      res.update(theirs)
    except Exception:  # noqa: BLE001 -- record why, keep our figures
      res["peer_error"] = traceback.format_exc(limit=3)
      print(res["peer_error"], file=sys.stderr)
  res.update(timed_rounds(sides, batch, FLAGS.rounds))
  if FLAGS.ours and FLAGS.train:
    res["final_loss"] = float(np.mean(sides["ours"]["train"].fn()))  # ~1 on noise: it computed
    peak = peak_tflops(kind, FLAGS.precision)
    res["peak_tflops"] = peak
    flops_img = res["flops_per_train_step"] / batch
    res["train_flops_per_image"] = flops_img
    res["tflops"] = res["train_img_per_s"] * flops_img / 1e12
    res["mfu"] = res["tflops"] / peak if peak else None
  if "train_img_per_s" in res and "peer_train_img_per_s" in res:
    res["train_speedup"] = res["train_img_per_s"] / res["peer_train_img_per_s"]
  if "sample_img_per_s" in res and "peer_sample_img_per_s" in res:
    res["sample_speedup"] = res["sample_img_per_s"] / res["peer_sample_img_per_s"]
  _write(path, res)
  if FLAGS.ours and FLAGS.train:
    print(markdown_row(res))
  print(f"wrote {path}")
  print(summary_line(res))


# result keys of each timer's images/s, by side
RESULT_KEYS = {"train": "train_img_per_s", "one_step": "one_step_img_per_s",
               "ddim": "sample_img_per_s"}


def timed_rounds(sides: dict, batch: int, rounds: int) -> dict:
  """Images/s of every timer, the sides taking turns (timing.interleave), and each round's."""
  res = {"rounds": rounds, "round_img_per_s": {}}
  for name, key in RESULT_KEYS.items():
    timers = {side: t[name] for side, t in sides.items() if name in t}
    if not timers:
      continue
    medians, samples = timing.interleave(timers, rounds)
    for side, seconds in medians.items():
      res[("peer_" if side == "peer" else "") + key] = batch / seconds
    res["round_img_per_s"][name] = {side: [round(batch / s, 3) for s in ss]
                                    for side, ss in samples.items()}
    print(f"{name}: " + ", ".join(f"{side} {batch / s:,.2f} img/s"
                                  for side, s in medians.items()) + f" (median of {rounds})",
          flush=True)
  if "train_img_per_s" in res:
    res["step_s"] = batch / res["train_img_per_s"]
  return res


def summary_line(r) -> str:
  """One line per run, for lever tables."""
  get = lambda k, scale=1.0, p=1: "-" if r.get(k) is None else f"{r[k] * scale:,.{p}f}"
  return (f"RESULT {r['config']} b{r['batch_size']} {r['precision']} {FLAGS.tag or 'default'}: "
          f"train {get('train_img_per_s')} img/s (peer {get('peer_train_img_per_s')}), "
          f"one-step {get('one_step_img_per_s')} (peer {get('peer_one_step_img_per_s')}), "
          f"DDIM {get('sample_img_per_s', p=2)} (peer {get('peer_sample_img_per_s', p=2)}), "
          f"compile {get('compile_s')} s, mem {get('peak_mem_bytes', 1e-9, 2)} GB "
          f"(peer {get('peer_peak_mem_bytes', 1e-9, 2)}), step temp "
          f"{get('train_temp_bytes', 1e-9, 2)} GB, {get('tflops', p=1)} TFLOP/s, "
          f"MFU {get('mfu', 100)} %, 50k x 1000 steps {get('sample_50k_minutes')} min"
          + (" PEER ERROR" if "peer_error" in r else ""))


def _write(path, res):
  with open(path, "w") as f:
    json.dump(res, f, indent=1)


def markdown_row(r) -> str:
  fmt = lambda v, p=1: "-" if v is None else f"{v:,.{p}f}"
  mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"
  head = ("| device | config | batch | precision | train img/s (ours / diffusers) | DDIM-50 img/s "
          "(ours / diffusers) | compile s | TFLOP/s | MFU |\n|---|---|---|---|---|---|---|---|---|")
  row = (f"| {r['device']} | {r['config']} | {r['batch_size']} | {r['precision']} | "
         f"{fmt(r['train_img_per_s'])} / {fmt(r.get('peer_train_img_per_s'))} | "
         f"{fmt(r.get('sample_img_per_s'), 2)} / {fmt(r.get('peer_sample_img_per_s'), 2)} | "
         f"{fmt(r['compile_s'])} | {fmt(r['tflops'], 3)} | "
         f"{mfu} |")
  return head + "\n" + row


if __name__ == "__main__":
  app.run(main)
