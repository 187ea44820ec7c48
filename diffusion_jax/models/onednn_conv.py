"""oneDNN's convolutions inside XLA:CPU programs (`csrc/onednn_conv.cc` through `jax.ffi`).

PyTorch convolves on the CPU with oneDNN, XLA:CPU with its own Eigen kernels, which run a 3x3
convolution at 0.63-1.02x of oneDNN's speed and its kernel gradient at 0.74-0.87x
(benchmarks/conv_layers.py, 2 AVX2 cores). This module gives the U-Net oneDNN's kernels: a
float32 NHWC/HWIO 2-D convolution whose forward, input gradient and kernel gradient are oneDNN
primitives, and a drop-in for `lax.conv_general_dilated` that flax's
`nn.Conv(conv_general_dilated=...)` takes, so parameters and checkpoints are unchanged.

`model.conv` chooses: "auto" (default) = oneDNN for float32 on a single CPU device where it
builds, else XLA; "xla"; "onednn" (an error that says what is missing when it cannot run).
Several devices keep XLA's convolution: the SPMD partitioner cannot split a custom call, it
would gather the batch onto every device.

The handlers, with csrc/group_norm.cc's GroupNorm (fast_ops.native_group_norm) in the same
library, are compiled on first use into $DIFFUSION_JAX_CACHE (default ~/.cache/diffusion_jax),
one shared library per (sources, jaxlib, oneDNN, compiler, flags: AVX2/FMA where the CPU has
them; OpenMP, the threads oneDNN's convolutions use). They need
the pip packages onednn-cpu-gomp and onednn-devel-cpu-gomp 2023.2.0 (requirements.txt, Linux
x86-64; $DNNL_ROOT points at another oneDNN 3.x) and a C++17 compiler ($CXX, default g++).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from absl import logging
from jax import lax

MODES = ("auto", "xla", "onednn")
SOURCES = tuple(Path(__file__).parent / "csrc" / f for f in ("onednn_conv.cc", "group_norm.cc"))
TARGETS = {"forward": "OnednnConvForward", "backward_data": "OnednnConvBackwardData",
           "backward_weights": "OnednnConvBackwardWeights"}
GROUP_NORM_TARGETS = {"forward": "GroupNormForward", "backward": "GroupNormBackward"}
_NHWC = ("NHWC", "HWIO", "NHWC")


class OnednnUnavailable(RuntimeError):
  """The oneDNN convolution cannot be built or loaded here; the message says what to install."""


def _onednn_root() -> Path:
  """The prefix holding include/oneapi/dnnl/dnnl.hpp and lib/libdnnl.so."""
  candidates = [os.environ.get("DNNL_ROOT"), sys.prefix, sysconfig.get_paths()["data"]]
  for root in filter(None, candidates):
    root = Path(root)
    if (root / "include/oneapi/dnnl/dnnl.hpp").exists() and any(root.glob("lib/libdnnl.so*")):
      return root
  raise OnednnUnavailable(
      "oneDNN headers and library not found under $DNNL_ROOT or " + sys.prefix + ": "
      "pip install onednn-cpu-gomp==2023.2.0 onednn-devel-cpu-gomp==2023.2.0, "
      "or set model.conv='xla'")


def cache_dir() -> Path:
  return Path(os.environ.get("DIFFUSION_JAX_CACHE", Path.home() / ".cache" / "diffusion_jax"))


def _cpu_flags() -> list[str]:
  """AVX2 + FMA code where this CPU has them (8 floats a vector in group_norm.cc's loops)."""
  try:
    with open("/proc/cpuinfo") as f:
      flags = next((line.split() for line in f if line.startswith("flags")), [])
  except OSError:
    flags = []
  return ["-mavx2", "-mfma"] if {"avx2", "fma"} <= set(flags) else []


def build() -> Path:
  """Compiles the handlers (once per source/jaxlib/oneDNN/compiler/flags); returns the .so."""
  root = _onednn_root()
  compiler = os.environ.get("CXX", "g++")
  if shutil.which(compiler) is None:
    raise OnednnUnavailable(f"no C++ compiler ({compiler!r}) to build the oneDNN convolution: "
                            "install g++ (or set $CXX), or set model.conv='xla'")
  flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-w", "-fopenmp", "-fno-math-errno",
           "-fno-trapping-math"] + _cpu_flags()
  key = hashlib.sha256(b"\0".join([*(s.read_bytes() for s in SOURCES), jaxlib.__version__.encode(),
                                   str(root).encode(), compiler.encode(), *map(str.encode, flags)])
                       ).hexdigest()[:16]
  library = cache_dir() / f"onednn_conv_{key}.so"
  if library.exists():
    return library
  library.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
    partial = Path(tmp) / library.name
    command = [compiler, *flags, f"-I{jax.ffi.include_dir()}", f"-I{root / 'include'}",
               *map(str, SOURCES), "-o", str(partial), f"-L{root / 'lib'}", "-ldnnl",
               f"-Wl,-rpath,{root / 'lib'}"]
    logging.info("building the oneDNN convolution: %s", " ".join(command))
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
      names = ", ".join(s.name for s in SOURCES)
      raise OnednnUnavailable(f"building {names} failed ({' '.join(command)}):\n"
                              f"{done.stderr[-2000:]}\nset model.conv='xla' to go on without it")
    os.replace(partial, library)  # atomic: a concurrent process sees all of it or nothing
  return library


@functools.cache
def load() -> ctypes.CDLL:
  """Builds if needed, loads, and registers the handlers with XLA:CPU."""
  library = ctypes.CDLL(str(build()))
  for target in (*TARGETS.values(), *GROUP_NORM_TARGETS.values()):
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, target)),
                                platform="cpu")
  library.OnednnConvImplementation.restype = ctypes.c_char_p
  return library


@functools.cache
def unavailable_reason() -> str:
  """'' when the oneDNN convolution loads here, else why not."""
  try:
    load()
  except (OnednnUnavailable, OSError) as e:
    return str(e)
  return ""


def implementation(n: int = 64, size: int = 28, c_in: int = 32, c_out: int = 32) -> str:
  """oneDNN's kernel for a 3x3 "SAME" convolution of that shape, e.g. 'brgconv:avx2'."""
  return load().OnednnConvImplementation(n, size, size, c_in, c_out).decode()


def use_onednn(mode: str, dtype) -> bool:
  """Whether `model.conv` = mode gives oneDNN convolutions for this dtype, backend, devices."""
  if mode not in MODES:
    raise ValueError(f"model.conv={mode!r}: expected one of {MODES}")
  if mode == "xla":
    return False
  if mode == "onednn":
    if jax.default_backend() != "cpu" or jnp.dtype(dtype) != jnp.float32:
      raise ValueError(f"model.conv='onednn' is float32 on the CPU; this is "
                       f"{jnp.dtype(dtype).name} on {jax.default_backend()}: use 'auto' or 'xla'")
    if reason := unavailable_reason():
      raise OnednnUnavailable(reason)
    return True
  if (jax.default_backend() != "cpu" or jnp.dtype(dtype) != jnp.float32
      or jax.device_count() != 1):
    return False
  if reason := unavailable_reason():
    logging.log_first_n(logging.WARNING, "model.conv='auto' uses XLA's convolution: %s", 1,
                        reason)
    return False
  return True


def flops(target: str, in_avals, out_avals) -> float:
  """2 x the multiply-adds of one handler call (each does a forward convolution's worth)."""
  if target == TARGETS["backward_weights"]:  # (x, dy) -> dw
    y, w = in_avals[1], out_avals[0]
  elif target == TARGETS["backward_data"]:  # (dy, w) -> dx
    y, w = in_avals
  else:  # (x, w) -> y
    y, w = out_avals[0], in_avals[1]
  return 2.0 * math.prod(y.shape) * math.prod(w.shape[:3])


def _call(name: str, shape, a, b, strides, padding):
  load()
  out = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.ffi.ffi_call(TARGETS[name], out, vmap_method="sequential")(
      a, b, strides=np.asarray(strides, np.int64),
      padding=np.asarray([p for pair in padding for p in pair], np.int64))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x, w, strides, padding):
  """float32 x [N,H,W,C] conv w [KH,KW,C,O] -> [N,OH,OW,O]; strides (sh, sw), padding
  ((top, bottom), (left, right)) -- lax.conv_general_dilated's, computed by oneDNN."""
  (n, h, wd, _), (kh, kw, _, o) = x.shape, w.shape
  (pt, pb), (pl, pr) = padding
  shape = (n, (h + pt + pb - kh) // strides[0] + 1, (wd + pl + pr - kw) // strides[1] + 1, o)
  return _call("forward", shape, x, w, strides, padding)


def _conv2d_fwd(x, w, strides, padding):
  return conv2d(x, w, strides, padding), (x, w)


def _conv2d_bwd(strides, padding, residuals, dy):
  x, w = residuals
  return (_call("backward_data", x.shape, dy, w, strides, padding),
          _call("backward_weights", w.shape, x, dy, strides, padding))


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, **kwargs):
  """`lax.conv_general_dilated` with 2-D NHWC/HWIO float32 convolutions sent to oneDNN; any
  other convolution (dilated, grouped, another layout or dtype) stays XLA's."""
  plain = (lhs.ndim == 4 and lhs.dtype == rhs.dtype == jnp.float32 and feature_group_count == 1
           and not kwargs and all(d == 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))
           and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
           == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
  if not plain:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count,
                                    precision=precision, **kwargs)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  return conv2d(lhs, rhs, tuple(window_strides), tuple(tuple(p) for p in padding))
