"""benchmarks/timing.py: the sides take turns (ABBA), medians; each side's own peak RSS."""
import numpy as np
import pytest

from benchmarks import timing


def test_interleave_alternates_the_order_and_keeps_each_sides_median():
  calls = []
  seconds = {"ours": iter([3.0, 1.0, 2.0]), "peer": iter([10.0, 30.0, 20.0])}

  def side(name):
    def timer():
      calls.append(name)
      return next(seconds[name])
    return timer

  medians, samples = timing.interleave({"ours": side("ours"), "peer": side("peer")}, 3)
  assert calls == ["ours", "peer", "peer", "ours", "ours", "peer"]
  assert medians == {"ours": 2.0, "peer": 20.0}
  assert samples == {"ours": [3.0, 1.0, 2.0], "peer": [10.0, 30.0, 20.0]}
  with pytest.raises(ValueError, match="rounds"):
    timing.interleave({"ours": side("ours")}, 0)


def test_timer_waits_once_per_round_and_divides_by_the_units():
  made, blocked = [], []
  timer = timing.Timer(lambda: made.append(1) or len(made), repeats=4, block=blocked.append,
                       units_per_call=2)
  assert timer() >= 0.0
  assert len(made) == 4 and blocked == [4]  # waits on the last result only


def test_peak_rss_charges_a_phase_for_its_own_memory_only():
  with timing.PeakRSS() as first:
    big = np.ones(300 * 2**20 // 8)  # 300 MiB, touched
    del big
  if not first.exact:
    pytest.skip("no /proc/self/clear_refs: the lifetime peak is all there is")
  assert first.bytes > 250 * 2**20
  with timing.PeakRSS() as second:
    small = np.ones(10 * 2**20 // 8)
    del small
  assert second.bytes < 100 * 2**20  # the first phase's peak is not charged to the second
