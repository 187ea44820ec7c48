"""Timing two frameworks fairly in one process: interleaved rounds, each side's own peak RSS.

A shared CPU's speed drifts by 10-50 % within minutes (measured on the 2-core CI machine), so
timing one framework and then the other puts the drift into their ratio. `interleave` runs the
sides' timers in turn, reversing the order every other round (A B, B A, ...), and keeps each
side's median. On CPU both sides live in one process, whose lifetime peak RSS would charge the
second side for the first's memory; `PeakRSS` measures the growth during one side's phase.
`device_kind`, `config_name` and `result_path` name the benchmarks' result files alike.
"""
from __future__ import annotations

import dataclasses
import os
import re
import resource
import sys
import time
from typing import Any, Callable

import numpy as np


@dataclasses.dataclass
class Timer:
  """Seconds per unit of `repeats` calls of `fn`, waiting (`block`) for the last result only."""
  fn: Callable[[], Any]
  repeats: int
  block: Callable[[Any], Any] = lambda out: out
  units_per_call: int = 1  # e.g. training steps per compiled call

  def warm(self):
    """One untimed call (compilation, autotuning, first-touch of memory)."""
    return self.block(self.fn())

  def __call__(self) -> float:
    t0 = time.perf_counter()
    for _ in range(self.repeats):
      out = self.fn()
    self.block(out)
    return (time.perf_counter() - t0) / (self.repeats * self.units_per_call)


def interleave(timers: dict[str, Timer], rounds: int) -> tuple[dict[str, float], dict]:
  """Median seconds per unit of each timer over `rounds` rounds in ABBA order, and the samples."""
  if rounds < 1:
    raise ValueError(f"interleave: rounds must be >= 1, got {rounds}")
  names = list(timers)
  samples = {n: [] for n in names}
  for r in range(rounds):
    for n in (names if r % 2 == 0 else names[::-1]):
      samples[n].append(timers[n]())
  return {n: float(np.median(s)) for n, s in samples.items()}, samples


def _status_kb(field: str) -> int | None:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    return None
  return None


class PeakRSS:
  """Peak resident-memory growth (bytes) over a `with` block.

  Linux: resets the high-water mark (VmHWM) through /proc/self/clear_refs at the start, so
  the result is the block's own peak above the RSS it started from (library imports before the
  block are not counted). Elsewhere: the process's lifetime peak (`exact` is False).
  """

  def __enter__(self):
    self.start_kb = _status_kb("VmRSS")
    self.exact = False
    if self.start_kb is not None:
      try:
        with open("/proc/self/clear_refs", "w") as f:
          f.write("5")  # resets VmHWM to the current RSS
        self.exact = True
      except OSError:
        pass
    return self

  def __exit__(self, *exc):
    peak_kb = _status_kb("VmHWM") if self.exact else None
    if peak_kb is None:
      maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
      self.bytes = maxrss if sys.platform == "darwin" else maxrss * 1024  # macOS: bytes
    else:
      self.bytes = max(peak_kb - self.start_kb, 0) * 1024
    return False


def device_kind(device) -> str:
  """A jax device's kind ("NVIDIA H100 80GB HBM3"), or "cpu-<cores>cores"."""
  return device.device_kind if device.platform != "cpu" else f"cpu-{os.cpu_count()}cores"


def config_name(config_filename: str) -> str:
  """configs/fashion_mnist.py -> fashion_mnist."""
  return os.path.splitext(os.path.basename(config_filename))[0]


def result_path(out_dir: str, kind: str, config: str, suffix: str = "") -> str:
  """<out_dir>/<device slug>_<config>[_<suffix>].json."""
  slug = re.sub(r"[^A-Za-z0-9]+", "_", kind).strip("_").lower()
  return os.path.join(out_dir, f"{slug}_{config}{'_' + suffix if suffix else ''}.json")
