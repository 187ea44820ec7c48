"""End to end through main.py: kill -9 and resume, SIGTERM, corrupt checkpoints, config errors,
CIFAR-10 through tfds, and 2 processes x 4 devices against 1 process x 8 devices."""
import json
import os
import signal
import socket
import time

import numpy as np
import pytest

from helpers import main_py, read_metrics, tiny_config_file

pytestmark = pytest.mark.slow


def wait_for(predicate, proc, timeout=240):
  t0 = time.time()
  while time.time() - t0 < timeout:
    if predicate():
      return True
    if proc.poll() is not None:
      return False
    time.sleep(0.05)
  return False


def finish(proc, timeout=300):
  out, _ = proc.communicate(timeout=timeout)
  return proc.returncode, out


def ckpt_dir(workdir, step):
  return os.path.join(workdir, "checkpoints", str(step))


def test_kill_9_then_resume_gives_the_uninterrupted_losses(tmp_path):
  cfg = tiny_config_file(tmp_path, num_steps=60, checkpoint_every=10)
  ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
  code, out = finish(main_py(f"--config={cfg}", f"--workdir={ref}"))
  assert code == 0, out
  p = main_py(f"--config={cfg}", f"--workdir={run}")
  assert wait_for(lambda: os.path.isdir(ckpt_dir(run, 20)), p), "no checkpoint before the kill"
  p.send_signal(signal.SIGKILL)
  p.wait()
  killed_at = max(read_metrics(run))
  assert killed_at < 60, "the run finished before it was killed"
  code, out = finish(main_py(f"--config={cfg}", f"--workdir={run}"))
  assert code == 0, out
  assert "Resumed from checkpoint at step" in out
  a, b = read_metrics(ref), read_metrics(run)
  assert sorted(a) == sorted(b) == list(range(1, 61))
  assert [a[s] for s in a] == [b[s] for s in a]  # bit for bit


def test_sigterm_saves_the_current_step_and_exits(tmp_path):
  cfg = tiny_config_file(tmp_path, num_steps=100_000, checkpoint_every=10_000)
  run = str(tmp_path / "run")
  p = main_py(f"--config={cfg}", f"--workdir={run}")
  metrics = os.path.join(run, "metrics.jsonl")
  assert wait_for(lambda: os.path.exists(metrics) and len(open(metrics).readlines()) >= 5, p)
  p.send_signal(signal.SIGTERM)
  code, out = finish(p)
  assert code == 0, out
  assert "Preemption signal" in out
  steps = sorted(int(d) for d in os.listdir(os.path.join(run, "checkpoints")) if d.isdigit())
  assert steps and steps[-1] == max(read_metrics(run)) and steps[-1] >= 5


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path):
  cfg = tiny_config_file(tmp_path, num_steps=6, checkpoint_every=2)
  run = str(tmp_path / "run")
  code, out = finish(main_py(f"--config={cfg}", f"--workdir={run}"))
  assert code == 0, out
  newest = ckpt_dir(run, 6)
  damaged = 0
  for root, _, files in os.walk(newest):  # truncate every data file of step 6
    for f in files:
      if "metadata" not in f and not f.endswith(".json"):
        open(os.path.join(root, f), "wb").close()
        damaged += 1
  assert damaged
  cfg8 = tiny_config_file(tmp_path, num_steps=8, checkpoint_every=2)
  code, out = finish(main_py(f"--config={cfg8}", f"--workdir={run}"))
  assert code == 0, out
  assert "Resumed from checkpoint at step 4" in out
  assert "6" in out and ("fall" in out.lower() or "could not restore" in out.lower())


def test_config_errors_are_one_clear_line(tmp_path):
  cfg = tiny_config_file(tmp_path)
  for args, expect in ((["--config.training.batchsize=8"], 'Did you mean "batch_size"'),
                       (["--config.training.batch_size=12"], "multiple of the device count"),
                       (["--config.data.image_size=15"], "config.data.image_size=15"),
                       (["--config.diffusion.var_type=learned"], "config.diffusion.loss_type")):
    code, out = finish(main_py(f"--config={cfg}", f"--workdir={tmp_path / 'w'}", *args,
                               env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}))
    assert code != 0 and expect in out, out
    assert "Traceback" not in out, out
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_cifar10_through_tfds_mock_data(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  from configs.cifar10_ddpm import get_config
  from diffusion_jax.sample import run_sample_mode
  from diffusion_jax.train import train_and_evaluate
  c = get_config()
  c.model.ch, c.model.ch_mult, c.model.num_res_blocks = 32, (1, 2), 1
  c.model.attn_resolutions = (16,)
  c.diffusion.num_timesteps = 50
  c.training.batch_size, c.training.num_steps, c.training.sample_every = 8, 3, 1000
  c.training.checkpoint_every, c.training.log_every = 3, 1
  c.sampling.method, c.sampling.num_steps, c.sampling.num_samples = "dpm_solver", 4, 8
  c.sampling.batch_size, c.sampling.figures = 8, False
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    result = train_and_evaluate(c, str(tmp_path))
    assert result["step"] == 3 and np.isfinite(result["loss"])
    out = run_sample_mode(c, str(tmp_path))
  arr = np.load(os.path.join(out, "samples.npz"))["arr_0"]
  assert arr.shape == (8, 32, 32, 3) and arr.dtype == np.uint8


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.multihost
def test_two_processes_match_one_process_of_eight_devices(tmp_path):
  cfg = tiny_config_file(tmp_path, num_steps=4, checkpoint_every=2)
  cfg6 = tiny_config_file(tmp_path, num_steps=6, checkpoint_every=2)
  single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
  eight = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  code, out = finish(main_py(f"--config={cfg6}", f"--workdir={single}", env=eight))
  assert code == 0, out

  def launch(config):
    port = free_port()
    procs = [main_py(f"--config={config}", f"--workdir={multi}", env={
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
        "JAX_PROCESS_ID": str(i)}) for i in range(2)]
    for code, out in [finish(p, timeout=400) for p in procs]:
      assert code == 0, out

  launch(cfg)  # steps 1-4, checkpoints at 2 and 4 written by both processes
  assert os.path.isdir(ckpt_dir(multi, 4))
  launch(cfg6)  # restore step 4 on 2 processes, continue to 6
  with open(os.path.join(multi, "metrics.jsonl")) as f:  # steps 1-4 were not trained again
    assert [json.loads(line)["step"] for line in f] == list(range(1, 7))
  a, b = read_metrics(single), read_metrics(multi)
  assert sorted(b) == list(range(1, 7))
  np.testing.assert_allclose([b[s] for s in range(1, 7)], [a[s] for s in range(1, 7)], rtol=1e-5)
