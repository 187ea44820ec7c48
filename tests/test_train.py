"""Training in-process: the step on 1 vs 8 devices, accumulation, NaN guard, NLL, sampling."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import checkpoints, data, parallel
from diffusion_jax.train import Trainer, TrainingError, train_and_evaluate
from helpers import REPO, small_graph, tiny_config, tiny_dit


def batch_for(config, step=0):
  return next(data.train_batches(config, start_step=step, process_index=0, process_count=1))


def test_eight_devices_give_the_loss_of_one(tmp_path):
  config = tiny_config(tmp_path)
  losses = {}
  for n in (1, 8):
    tr = Trainer(config, mesh=parallel.make_mesh(n))
    state = tr.init()
    out = []
    for step in range(3):
      state, m = tr.step_fn(state, parallel.global_batch(batch_for(config, step), tr.mesh))
      out.append(float(m["loss"]))
    losses[n] = (out, jax.tree.map(np.asarray, state.ema_params))
  np.testing.assert_allclose(losses[1][0], losses[8][0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), losses[1][1], losses[8][1])


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
  config = tiny_config(tmp_path)
  config.model.dropout = 0.0
  config.training.grad_accum_steps = 1
  full = Trainer(config, mesh=parallel.make_mesh(1))
  config.training.grad_accum_steps = 2
  acc = Trainer(config, mesh=parallel.make_mesh(1))
  b = batch_for(config)
  s_full, m_full = full.step_fn(full.init(), parallel.global_batch(b, full.mesh))
  s_acc, m_acc = acc.step_fn(acc.init(), parallel.global_batch(b, acc.mesh))
  assert int(s_acc.step) == 1
  np.testing.assert_allclose(float(m_full["loss"]), float(m_acc["loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(m_full["grad_norm"]), float(m_acc["grad_norm"]), rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), s_full.params,
               s_acc.params)


def test_steps_per_dispatch_gives_the_single_steps_and_keeps_every_event(tmp_path):
  """4 steps per compiled call over 8 steps: logs (every 4), the checkpoint and the sample grid
  (step 8) where one step per call puts them, and the same parameters and losses."""
  from helpers import read_metrics
  config = small_graph(tiny_config(tmp_path, num_steps=8, checkpoint_every=8))
  config.training.log_every, config.training.sample_every = 4, 8
  config.training.steps_per_dispatch = 4
  tr = Trainer(config)
  assert [tr.steps_to_dispatch(s) for s in (0, 4, 1, 5)] == [4, 4, 1, 1]
  config.training.num_steps = 10  # an event or the end inside the next call: one step at a time
  assert [Trainer(config).steps_to_dispatch(s) for s in (5, 6, 8, 9)] == [1, 1, 1, 1]
  config.training.num_steps = 8
  workdir = str(tmp_path / "run")
  train_and_evaluate(config, workdir)
  logged = read_metrics(workdir)
  assert sorted(logged) == [4, 8]
  ck = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"))
  assert ck.all_steps() == [8]
  assert os.listdir(os.path.join(workdir, "train_samples")) == ["step_00000008.png"]
  step, state4, _ = ck.restore(tr.abstract_state)

  config.training.steps_per_dispatch = 1
  one = Trainer(config)
  state, losses = one.init(), []
  for s in range(8):  # dropout on: each step's keys must match as well
    state, m = one.step_fn(state, parallel.global_batch(batch_for(config, s), one.mesh))
    losses.append(float(m["loss"]))
  assert step == int(state4.step) == 8
  np.testing.assert_allclose([logged[4], logged[8]], [np.mean(losses[:4]), np.mean(losses[4:])],
                             rtol=1e-5)
  # Adam divides by sqrt(v): rounding in near-zero gradients moves a few weights by ~1e-5
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-4), state.params,
               state4.params)


@pytest.mark.parametrize("network", ["unet", "dit"])
def test_bfloat16_compute_keeps_float32_parameters_and_tracks_float32(tmp_path, network):
  config = tiny_config(tmp_path)
  config.model.dropout = 0.0
  if network == "dit":
    tiny_dit(config)
  f32 = Trainer(config, mesh=parallel.make_mesh(1))
  config.model.dtype = "bfloat16"
  bf16 = Trainer(config, mesh=parallel.make_mesh(1))
  s32, s16 = f32.init(), bf16.init()
  losses = {32: [], 16: []}
  for step in range(4):
    b = batch_for(config, step)
    s32, m32 = f32.step_fn(s32, parallel.global_batch(b, f32.mesh))
    s16, m16 = bf16.step_fn(s16, parallel.global_batch(b, bf16.mesh))
    losses[32].append(float(m32["loss"]))
    losses[16].append(float(m16["loss"]))
  dtypes = {a.dtype for a in jax.tree.leaves((s16.params, s16.ema_params, s16.opt_state))
            if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)}
  assert dtypes == {jnp.dtype(jnp.float32)}, dtypes  # master weights and Adam moments
  assert all(np.isfinite(losses[16]))
  np.testing.assert_allclose(losses[16], losses[32], rtol=0.05)  # bf16 rounding, same descent
  assert losses[16] != losses[32]  # the compute really ran in bfloat16


@pytest.mark.parametrize("network", ["unet", "dit"])
def test_fsdp_shards_large_parameters(tmp_path, network):
  config = tiny_config(tmp_path)
  if network == "dit":
    tiny_dit(config, hidden_size=64)  # its MLP kernels, 64 x 256, are large enough to shard
  config.training.fsdp = True
  tr = Trainer(config, mesh=parallel.make_mesh(8))
  state = tr.init()
  specs = [x.sharding.spec for x in jax.tree.leaves(state.params)]
  assert any("data" in tuple(s) for s in specs)
  state, m = tr.step_fn(state, parallel.global_batch(batch_for(config), tr.mesh))
  config.training.fsdp = False
  ref = Trainer(config, mesh=parallel.make_mesh(8))
  _, m_ref = ref.step_fn(ref.init(), parallel.global_batch(batch_for(config), ref.mesh))
  np.testing.assert_allclose(float(m["loss"]), float(m_ref["loss"]), rtol=1e-5)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  config = tiny_config(tmp_path, num_steps=8, checkpoint_every=2)
  real = data.train_batches

  def poisoned(config, start_step, **kw):
    for step, b in enumerate(real(config, start_step, **kw), start=start_step):
      if step >= 4:  # the 5th step sees a NaN image
        b = dict(b, image=np.full_like(b["image"], np.nan))
      yield b

  monkeypatch.setattr(data, "train_batches", poisoned)
  workdir = str(tmp_path / "run")
  with pytest.raises(TrainingError, match="last good checkpoint \\(step 4\\) is untouched"):
    train_and_evaluate(config, workdir)
  ck = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"))
  assert ck.latest_step() == 4
  step, state, _ = ck.restore(Trainer(config).abstract_state)
  assert step == 4 and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))


def test_train_sample_and_nll(tmp_path):
  """A few steps on Fashion-MNIST-shaped data; bits/dim falls; sample mode writes its files."""
  from diffusion_jax.evaluate import nll_bits_per_dim, rate_distortion
  from diffusion_jax.sample import run_sample_mode
  config = tiny_config(tmp_path, num_steps=30, checkpoint_every=30)
  tr = Trainer(config)
  before = nll_bits_per_dim(config, tr.model, tr.diffusion, tr.init().ema_params, tr.mesh, 16)
  workdir = str(tmp_path / "run")
  config.training.ema_decay = 0.0  # evaluate the trained weights themselves
  train_and_evaluate(config, workdir)
  from diffusion_jax.sample import restore_ema_params
  _, step, params = restore_ema_params(config, workdir)
  after = nll_bits_per_dim(config, tr.model, tr.diffusion, params, tr.mesh, 16)
  assert step == 30 and after["bits_per_dim"] < before["bits_per_dim"] - 0.5, (before, after)
  rd = rate_distortion(after)
  np.testing.assert_allclose(rd["final_rate_bpd"] + rd["final_distortion_bpd"],
                             after["bits_per_dim"], rtol=1e-5)
  assert len(after["vb_bpd"]) == 100
  # eval.clip_denoised (the default): x^_0 stays in [-1, 1], so the RMSE is at most 255
  assert max(rd["distortion_rmse"]) <= 255.0 and after["x0_mse"][-1] > 0.01
  out = run_sample_mode(config, workdir)
  arr = np.load(os.path.join(out, "samples.npz"))["arr_0"]
  assert arr.shape == (10, 16, 16, 1) and arr.dtype == np.uint8
  for name in ("samples.png", "progressive.png", "interpolation.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0
  assert os.path.exists(os.path.join(workdir, "loss.png"))
  assert os.path.exists(os.path.join(workdir, "train_samples", "step_00000030.png"))


def test_tensorboard_events_are_written_without_loading_torch(tmp_path):
  """tensorboardX imports torch where it is installed (seconds, ~0.6 GB); the trainer's writer
  keeps it out and leaves torch importable."""
  code = f"""
import importlib.util, sys
from diffusion_jax.train import summary_writer
writer = summary_writer({str(tmp_path)!r})
writer.add_scalar("train/loss", 0.25, 7)
writer.close()
assert "torch" not in sys.modules, "loading tensorboardX loaded torch"
if importlib.util.find_spec("torch") is not None:
  import torch
  assert torch.ones(2).sum().item() == 2.0
"""
  run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert run.returncode == 0, run.stderr
  events = [f for f in os.listdir(tmp_path) if f.startswith("events.out.tfevents")]
  assert len(events) == 1 and b"train/loss" in (tmp_path / events[0]).read_bytes()
