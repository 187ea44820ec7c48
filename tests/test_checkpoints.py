"""Checkpointer: round trip, no overwrite, fallback past damage, config mismatch, signals."""
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from diffusion_jax.checkpoints import CheckpointError, Checkpointer, PreemptionGuard


def make_state(scale=1.0):
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  params = {"w": jnp.arange(32.0).reshape(8, 4) * scale, "b": jnp.ones((4,)) * scale}
  params = {"w": jax.device_put(params["w"], NamedSharding(mesh, P("data"))),
            "b": jax.device_put(params["b"], NamedSharding(mesh, P()))}
  return {"params": params, "opt_state": optax.adam(1e-3).init(params),
          "step": jnp.array(3, jnp.int32), "rng": jax.random.key_data(jax.random.PRNGKey(7))}


def abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def test_round_trip_is_exact_and_keeps_sharding(tmp_path):
  ck = Checkpointer(str(tmp_path), max_to_keep=2)
  state = make_state()
  assert ck.save(1, state, {"config": "x"})
  ck.wait()
  step, got, meta = ck.restore(abstract(state))
  assert step == 1 and meta == {"config": "x"}
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), state, got)
  assert got["params"]["w"].sharding.spec == P("data")
  for s in (2, 3):
    ck.save(s, make_state(s))
  ck.wait()
  assert ck.all_steps() == [2, 3]  # max_to_keep
  assert not ck.save(3, make_state(99.0))  # never overwritten
  ck.wait()
  _, got, _ = ck.restore(abstract(state), step=3)
  np.testing.assert_array_equal(got["params"]["b"], 3.0)
  with pytest.raises(CheckpointError, match="no checkpoint at step 7"):
    ck.restore(abstract(state), step=7)


def test_relative_directory_saves_and_restores(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # `make demo` passes --workdir=runs/fashion_mnist
  ck = Checkpointer(os.path.join("runs", "checkpoints"))
  state = make_state(5.0)
  assert ck.save(4, state)
  ck.wait()
  step, got, _ = Checkpointer(os.path.join("runs", "checkpoints")).restore(abstract(state))
  assert step == 4
  np.testing.assert_array_equal(got["params"]["b"], 5.0)
  assert os.path.isdir(tmp_path / "runs" / "checkpoints" / "4")


def test_damaged_newest_falls_back(tmp_path):
  ck = Checkpointer(str(tmp_path))
  state = make_state()
  ck.save(1, state)
  ck.save(2, make_state(2.0))
  ck.wait()
  for root, _, files in os.walk(tmp_path / "2"):
    for f in files:
      if not f.endswith(".json"):
        open(os.path.join(root, f), "wb").close()
  os.makedirs(tmp_path / "3.orbax-checkpoint-tmp-123")  # a save killed half-way
  ck2 = Checkpointer(str(tmp_path))
  step, got, _ = ck2.restore(abstract(state))
  assert step == 1
  np.testing.assert_array_equal(got["params"]["b"], 1.0)


@pytest.mark.parametrize("reopen", [False, True])
def test_other_config_is_a_clear_error(tmp_path, reopen):
  """Also through a freshly opened Checkpointer, as when a run resumes."""
  ck = Checkpointer(str(tmp_path))
  state = make_state()
  ck.save(1, state)
  ck.wait()
  if reopen:
    ck.close()
    ck = Checkpointer(str(tmp_path))
  w = abstract(state)["params"]["w"]
  target = abstract(state)
  target["params"]["w"] = jax.ShapeDtypeStruct((8, 5), jnp.float32, sharding=w.sharding)
  with pytest.raises(CheckpointError, match=r"params/w is stored with shape \(8, 4\).*\(8, 5\)"):
    ck.restore(target)
  target["params"]["w"] = jax.ShapeDtypeStruct((8, 4), jnp.bfloat16, sharding=w.sharding)
  with pytest.raises(CheckpointError, match=r"params/w is stored as float32.*bfloat16"):
    ck.restore(target)


def test_preemption_guard_turns_sigterm_into_a_flag():
  before = signal.getsignal(signal.SIGTERM)
  with PreemptionGuard() as guard:
    assert not guard.requested
    os.kill(os.getpid(), signal.SIGTERM)
    assert guard.requested
  assert signal.getsignal(signal.SIGTERM) is before
