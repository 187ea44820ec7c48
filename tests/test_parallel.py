"""Evaluation data that every process holds whole is split over all devices of all hosts."""
import os
import socket
import subprocess
import sys

import pytest

from helpers import REPO

# Runs in each of 2 processes x 4 CPU devices: the images every process holds go through a
# jitted function (with uncommitted weights, as the Inception scorer's) split over the 8
# devices, each device computing only its own rows, and every process gets all the results.
SCRIPT = r"""
import sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import numpy as np
from diffusion_jax import parallel
mesh = parallel.make_mesh()
assert jax.device_count() == 8 and jax.local_device_count() == 4
x = np.arange(13 * 3, dtype=np.float32).reshape(13, 3)  # the same on both processes
g = parallel.replicated_to_global(parallel.pad_to_multiple(x, mesh.size), mesh)
assert g.shape == (16, 3) and not g.is_fully_addressable
rows = sorted(int(s.index[0].start) for s in g.addressable_shards)
assert rows == ([0, 2, 4, 6] if jax.process_index() == 0 else [8, 10, 12, 14]), rows
for s in g.addressable_shards:
  np.testing.assert_array_equal(np.asarray(s.data), parallel.pad_to_multiple(x, 8)[s.index])
weights = jax.device_put(np.float32([1.0, 2.0, 3.0]))  # uncommitted, on this process's device
out = parallel.to_host(jax.jit(lambda w, a: a * w)(weights, g))[:13]
np.testing.assert_array_equal(out, x * [1.0, 2.0, 3.0])
print("ok", jax.process_index())
"""


@pytest.mark.multihost
def test_replicated_data_is_split_over_every_device_of_every_process():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, f"127.0.0.1:{port}", str(i)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0 and f"ok {i}" in out, out[-3000:]
