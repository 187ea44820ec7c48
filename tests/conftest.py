"""Test setup: 8 fake CPU devices (before jax is imported), markers, shared fixtures."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line("markers", "parity: compares with a reference implementation (torch)")
  config.addinivalue_line("markers", "multihost: launches several jax.distributed processes")
  config.addinivalue_line("markers", "slow: end-to-end runs of several seconds")
