"""pytorch-fid's Inception weights (.pth) -> a safetensors file for `inception.FIDInceptionV3`.

Once, on a machine with torch (the library itself never needs it):

  wget https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
  python -m diffusion_jax.convert_inception --src=pt_inception-2015-12-05-6726825d.pth \
      --dst=~/.cache/diffusion_jax/inception_fid.safetensors

--dst defaults to `default_inception_path()`: $DIFFUSION_JAX_INCEPTION, else
~/.cache/diffusion_jax/inception_fid.safetensors. The safetensors keys are the Flax variable
paths joined with '/' ('params/Conv2d_1a_3x3/conv/kernel', 'batch_stats/Mixed_5b/branch1x1/bn/mean',
'params/fc/kernel', ...): float32, in the Flax layout.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from diffusion_jax.inception import variable_shapes

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_SHA256_PREFIX = "6726825d"  # torch.hub's convention: the name carries the hash
ENV_VAR = "DIFFUSION_JAX_INCEPTION"
DEFAULT_FILE = os.path.join("~", ".cache", "diffusion_jax", "inception_fid.safetensors")
# torch BatchNorm's sample counter: not a weight, and absent from old checkpoints
IGNORED_TORCH_SUFFIXES = (".num_batches_tracked",)


class InceptionWeightsError(ValueError):
  pass


class MissingInceptionWeights(InceptionWeightsError, FileNotFoundError):
  """No weights file: the message says what to download and the command that converts it."""


def default_inception_path() -> str:
  """Where the converted weights are looked for: $DIFFUSION_JAX_INCEPTION or the cache."""
  return os.path.expanduser(os.environ.get(ENV_VAR) or DEFAULT_FILE)


def conversion_instructions(path: str) -> str:
  """What to download and the one command that writes `path`."""
  return (f"Download {FID_WEIGHTS_URL} (pytorch-fid's, about 95 MB) and convert it once, with "
          "torch installed:\n"
          f"  python -m diffusion_jax.convert_inception --src={FID_WEIGHTS_FILE} --dst={path}\n"
          f"(${ENV_VAR} chooses another location)")


def missing_weights_message(path: str) -> str:
  """The message of a missing weights file: what to download and the one command to run."""
  return f"the Inception weights for FID/IS are not at {path}. {conversion_instructions(path)}"


def torch_name(flax_name: str) -> tuple[str, tuple[int, ...] | None]:
  """'params/Mixed_5b/branch1x1/conv/kernel' -> ('Mixed_5b.branch1x1.conv.weight', transpose).

  The transpose (None: none) takes the torch array to the Flax layout: conv kernels
  [out, in, h, w] -> [h, w, in, out], the fc weight [out, in] -> [in, out].
  """
  collection, *path, leaf = flax_name.split("/")
  module = ".".join(path)
  if collection == "batch_stats":
    return f"{module}.running_{leaf}", None  # mean, var
  if path[-1] == "conv" and leaf == "kernel":
    return f"{module}.weight", (2, 3, 1, 0)
  if path[-1] == "fc" and leaf == "kernel":
    return f"{module}.weight", (1, 0)
  if leaf == "scale":  # BatchNorm's gamma
    return f"{module}.weight", None
  return f"{module}.{leaf}", None  # BatchNorm's beta, the fc bias


def shape_problems(shapes: Mapping[str, tuple], found: Mapping[str, tuple],
                   unexpected: list[str]) -> list[str]:
  """Missing names, wrong shapes and unexpected names, one line each (at most 10 of a kind)."""
  missing = [name for name in shapes if name not in found]
  wrong = [f"{name} has shape {found[name]}, expected {shapes[name]}" for name in shapes
           if name in found and tuple(found[name]) != tuple(shapes[name])]
  out = []
  for what, items in (("missing", missing), ("wrong shape", wrong), ("unexpected", unexpected)):
    if items:
      more = f" (and {len(items) - 10} more)" if len(items) > 10 else ""
      out.append(f"{what}: {', '.join(items[:10])}{more}")
  return out


def torch_state_dict_to_flax(state_dict: Mapping[str, Any]) -> dict:
  """pytorch-fid's `fid_inception_v3()` state dict (name -> array) -> Flax variables (numpy)."""
  shapes = variable_shapes()
  flat, found, used = {}, {}, set()
  for name, shape in shapes.items():
    source, transpose = torch_name(name)
    if source not in state_dict:
      continue
    value = np.asarray(state_dict[source], dtype=np.float32)
    if transpose is not None and value.ndim == len(transpose):
      value = value.transpose(transpose)
    used.add(source)
    found[name] = value.shape
    flat[name] = np.ascontiguousarray(value)
  unexpected = sorted(k for k in state_dict
                      if k not in used and not k.endswith(IGNORED_TORCH_SUFFIXES))
  problems = shape_problems(shapes, found, unexpected)
  if problems:
    raise InceptionWeightsError("this is not pytorch-fid's FID Inception state dict (names in "
                                "the Flax layout): " + "; ".join(problems))
  return traverse_util.unflatten_dict(flat, sep="/")


def save_safetensors(variables, path: str, metadata: Mapping[str, str] | None = None) -> None:
  """Write the variables as one flat float32 safetensors file (atomically); keys are the Flax
  paths joined with '/'."""
  from safetensors.numpy import save_file
  flat = traverse_util.flatten_dict(variables, sep="/")
  tensors = {name: np.ascontiguousarray(np.asarray(v, dtype=np.float32))
             for name, v in flat.items()}
  path = os.path.expanduser(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  save_file(tensors, tmp, metadata=dict(metadata or {
      "format": "diffusion_jax.inception.FIDInceptionV3", "source": FID_WEIGHTS_URL}))
  os.replace(tmp, path)


def load_inception_variables(path: str | None = None) -> dict:
  """The Flax variables of `FIDInceptionV3` from a file written by this module's converter.

  Every expected name and shape is checked; anything wrong raises one InceptionWeightsError
  naming the file (MissingInceptionWeights, with what to do, when there is no file).
  """
  from safetensors.numpy import load_file
  path = os.path.expanduser(path or default_inception_path())
  if not os.path.isfile(path):
    raise MissingInceptionWeights(missing_weights_message(path))
  try:
    flat = load_file(path)
  except Exception as e:  # safetensors raises its own error types for damaged files
    raise InceptionWeightsError(f"{path} is not a readable safetensors file ({e}). "
                                f"Re-create it. {conversion_instructions(path)}") from e
  shapes = variable_shapes()
  unexpected = sorted(k for k in flat if k not in shapes)
  problems = shape_problems(shapes, {k: v.shape for k, v in flat.items()}, unexpected)
  problems += [f"{k} is {v.dtype}, expected float32" for k, v in flat.items()
               if k in shapes and v.dtype != np.float32][:10]
  if problems:
    raise InceptionWeightsError(f"{path} does not hold the FID Inception weights: "
                                + "; ".join(problems) + ". Re-create it. "
                                + conversion_instructions(path))
  return traverse_util.unflatten_dict(flat, sep="/")


def sha256_of(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def convert_file(src: str, dst: str) -> int:
  """Read pytorch-fid's .pth with torch, write `dst`; returns the number of weights."""
  try:
    import torch
  except ImportError as e:
    raise InceptionWeightsError("reading the .pth needs torch (pip install torch); only this "
                                "conversion does") from e
  src = os.path.expanduser(src)
  if not os.path.isfile(src):
    raise InceptionWeightsError(f"{src} does not exist; download {FID_WEIGHTS_URL}")
  state = torch.load(src, map_location="cpu", weights_only=True)
  if not isinstance(state, Mapping):
    raise InceptionWeightsError(f"{src} holds a {type(state).__name__}, not a state dict")
  state_dict = {k: v.detach().cpu().numpy() for k, v in state.items()}
  try:
    variables = torch_state_dict_to_flax(state_dict)
  except InceptionWeightsError as e:
    raise InceptionWeightsError(f"{src}: {e}") from e
  digest = sha256_of(src)
  if not digest.startswith(FID_WEIGHTS_SHA256_PREFIX):
    print(f"note: {src} has sha256 {digest[:16]}..., not pytorch-fid's file "
          f"({FID_WEIGHTS_SHA256_PREFIX}...): its FID/IS are not comparable to published ones")
  save_safetensors(variables, dst)
  return sum(int(np.prod(v.shape)) for v in traverse_util.flatten_dict(variables).values())


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--src", required=True, help=f"pytorch-fid's {FID_WEIGHTS_FILE}")
  parser.add_argument("--dst", default=default_inception_path(),
                      help="the safetensors file to write (default: %(default)s)")
  args = parser.parse_args(argv)
  try:
    count = convert_file(args.src, args.dst)
  except InceptionWeightsError as e:
    sys.exit(f"InceptionWeightsError: {e}")
  print(f"wrote {count:,} Inception weights to {os.path.expanduser(args.dst)}")


if __name__ == "__main__":
  main()
