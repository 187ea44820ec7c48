"""Devices: one mesh with a "data" axis, from one CPU to a multi-host TPU pod; no pmap.

The batch is split over the data axis; parameters are replicated, or (FSDP) each large
parameter is split over the same axis along its largest divisible dimension.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

DATA = "data"


def maybe_initialize_distributed():
  """jax.distributed.initialize() when launched as one of several processes.

  On TPU pods and SLURM/GPU clusters JAX finds the coordinator itself; elsewhere set
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
  """
  env = os.environ
  explicit = "JAX_COORDINATOR_ADDRESS" in env and int(env.get("JAX_NUM_PROCESSES", "1")) > 1
  cluster = any(k in env for k in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"))
  if not (explicit or cluster) or jax.distributed.is_initialized():
    return
  if explicit:
    if env.get("JAX_PLATFORMS", "") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], int(env["JAX_NUM_PROCESSES"]),
                               int(env["JAX_PROCESS_ID"]))
  else:
    jax.distributed.initialize()
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """A 1-d mesh over all (or the first `num_devices`) devices, axis name "data"."""
  devices = jax.devices()[: num_devices or jax.device_count()]
  return jax.sharding.Mesh(np.asarray(devices), (DATA,))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


def fsdp_spec(shape, n: int, min_size: int = 2 ** 14) -> P:
  """Split the largest dimension divisible by n; small arrays stay replicated."""
  if n == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % n == 0:
      return P(*([None] * dim + [DATA]))
  return P()


def state_shardings(abstract_state, mesh, fsdp: bool):
  """Shardings for a pytree of ShapeDtypeStructs: replicated, or FSDP over the data axis."""
  n = mesh.shape[DATA]
  return jax.tree.map(
      lambda x: NamedSharding(mesh, fsdp_spec(x.shape, n) if fsdp else P()), abstract_state)


def stacked_batch_sharding(mesh) -> NamedSharding:
  """[steps, batch, ...]: several steps' batches, each split over the data axis."""
  return NamedSharding(mesh, P(None, DATA))


def global_batch(local: dict, mesh, stacked: bool = False) -> dict:
  """This process's share of the batch -> global arrays sharded over the data axis.

  stacked: `local` holds several steps' batches along a leading axis ([steps, batch, ...]).
  """
  sharding = stacked_batch_sharding(mesh) if stacked else batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local)


def stack_batches(batches: list[dict]) -> dict:
  """Host batches of consecutive steps -> one [steps, batch, ...] batch (`global_batch`)."""
  return {k: np.stack([np.asarray(b[k]) for b in batches]) for k in batches[0]}


def replicated_to_global(x, mesh) -> jax.Array:
  """An array that every process holds whole (the same rows everywhere, e.g. evaluation
  images) -> one global array split over the data axis: each device gets its own rows, so
  all devices of all hosts share the work and none repeats another's. Rows: a multiple of
  the device count (`pad_to_multiple`)."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, batch_sharding(mesh), lambda index: x[index])


def pad_to_multiple(batch: np.ndarray, n: int) -> np.ndarray:
  """A short batch padded with zeros to a multiple of n rows (drop them from the outputs)."""
  pad = (-batch.shape[0]) % n
  if not pad:
    return batch
  return np.concatenate([batch, np.zeros((pad,) + batch.shape[1:], batch.dtype)])


def to_host(x) -> np.ndarray:
  """A (possibly multi-host sharded) array fully on this host, as numpy."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)
