"""torch LPIPS-VGG weights -> the safetensors file of `lpips.LPIPS` (once; torch only here).

  python -m diffusion_jax.convert_lpips --src=vgg16-397923af.pth,/path/to/lpips/weights/v0.1/vgg.pth

--src: comma-separated .pth/.safetensors files whose union holds the VGG16 convolutions and
the five lin layers, in any of these namings:
  torchvision's vgg16: features.<i>.weight/bias (classifier.* is ignored);
  the lpips package's LPIPS state dict: net.slice<s>.<i>.weight/bias, lin<k>.model.1.weight;
  taming-transformers / an LDM autoencoder checkpoint: the same under loss.perceptual_loss.
--dst defaults to $DIFFUSION_JAX_LPIPS, else ~/.cache/diffusion_jax/lpips_vgg.safetensors.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from diffusion_jax.convert_inception import save_safetensors, shape_problems
from diffusion_jax.lpips import LPIPSWeightsError, default_lpips_path, param_shapes

PREFIXES = ("first_stage_model.loss.perceptual_loss.", "loss.perceptual_loss.",
            "perceptual_loss.")


def flax_name(key: str) -> str | None:
  """A torch key -> our '/'-joined parameter name; None for what LPIPS does not use."""
  for prefix in PREFIXES:
    if key.startswith(prefix):
      key = key[len(prefix):]
  m = re.fullmatch(r"(?:features|net\.slice\d)\.(\d+)\.(weight|bias)", key)
  if m:
    return f"vgg/vgg_{m.group(1)}/" + ("kernel" if m.group(2) == "weight" else "bias")
  m = re.fullmatch(r"lin(\d)\.model\.\d\.weight", key)
  if m:
    return f"lin_{m.group(1)}/kernel"
  return None  # classifier.*, scaling_layer.*, the duplicate lins.<k>.*, anything else


def torch_state_to_params(state: Mapping[str, Any]) -> dict:
  """Merged torch state dicts (numpy values) -> LPIPS parameters; all checked."""
  flat = {}
  for key, value in state.items():
    name = flax_name(key)
    if name is None:
      continue
    value = np.asarray(value, np.float32)
    if value.ndim == 4:  # OIHW -> HWIO; the lin layers' [1, C, 1, 1] -> Dense [C, 1]
      value = value.transpose(2, 3, 1, 0)
      if name.startswith("lin_"):
        value = value[0, 0]
    flat[name] = np.ascontiguousarray(value)
  shapes = param_shapes()
  problems = shape_problems(shapes, {k: v.shape for k, v in flat.items()}, [])
  if problems:
    raise LPIPSWeightsError("the files do not hold LPIPS-VGG's weights (names in our layout): "
                            + "; ".join(problems))
  return traverse_util.unflatten_dict(flat, sep="/")


def read_state(path: str) -> dict:
  """One .pth (torch, weights only) or .safetensors file -> name -> numpy array."""
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise LPIPSWeightsError(f"{path} does not exist")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    return dict(load_file(path))
  try:
    import torch
  except ImportError as e:
    raise LPIPSWeightsError("reading a .pth needs torch (pip install torch); only this "
                            "conversion does") from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  state = state.get("state_dict", state) if isinstance(state, Mapping) else state
  if not isinstance(state, Mapping):
    raise LPIPSWeightsError(f"{path} holds a {type(state).__name__}, not a state dict")
  return {k: v.detach().cpu().numpy() for k, v in state.items() if hasattr(v, "detach")}


def convert_files(sources: list[str], dst: str) -> int:
  """Read and merge `sources`, write `dst`; returns the number of weights."""
  state: dict = {}
  for src in sources:
    state.update(read_state(src))
  params = torch_state_to_params(state)
  save_safetensors(params, dst, {"format": "diffusion_jax.lpips.LPIPS",
                                 "source": ",".join(os.path.basename(s) for s in sources)})
  return sum(int(v.size) for v in traverse_util.flatten_dict(params).values())


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--src", required=True, help="comma-separated .pth/.safetensors files")
  parser.add_argument("--dst", default=default_lpips_path(),
                      help="the safetensors file to write (default: %(default)s)")
  args = parser.parse_args(argv)
  try:
    count = convert_files([s for s in args.src.split(",") if s], args.dst)
  except LPIPSWeightsError as e:
    sys.exit(f"LPIPSWeightsError: {e}")
  print(f"wrote {count:,} LPIPS weights to {os.path.expanduser(args.dst)}")


if __name__ == "__main__":
  main()
