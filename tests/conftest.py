"""Test setup: 8 fake CPU devices (before jax is imported), markers, shared fixtures."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def pytest_configure(config):
  config.addinivalue_line("markers", "parity: compares with a reference implementation (torch)")
  config.addinivalue_line("markers", "multihost: launches several jax.distributed processes")
  config.addinivalue_line("markers", "slow: end-to-end runs of several seconds")

# compiled programs are cached across the test processes (main.py subprocesses included)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
