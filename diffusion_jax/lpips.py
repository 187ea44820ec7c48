"""LPIPS (Zhang et al. 2018), the VGG16 variant: the perceptual term of the LDM autoencoder's
loss (Rombach et al. 2022, App. G: rec = |x - x^| + LPIPS(x, x^)).

d(x0, x1) = sum_l mean_hw w_l . (f0_l - f1_l)^2, where f_l are the unit-normalised (over
channels) activations of VGG16 at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of the
scaled input, and w_l >= 0 the learned per-channel weights ("lin" layers). The same network
as the `lpips` package (v0.1, net='vgg') and taming-transformers' LPIPS. Inputs NHWC in
[-1, 1]; gradients flow to both inputs, the weights are fixed.

Weights: torchvision's ImageNet VGG16 plus the lin layers, converted once by
`python -m diffusion_jax.convert_lpips` into a safetensors file (keys: the Flax paths joined
with '/', e.g. 'vgg_0/kernel', 'lin_0/kernel'), loaded by `load_lpips_params`.
"""
from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

# VGG16 `features`: (index of the conv in torchvision's Sequential, output channels); a
# 2x2 max-pool precedes each stage after the first; the last ReLU of each stage is tapped.
VGG16_STAGES = (((0, 64), (2, 64)), ((5, 128), (7, 128)), ((10, 256), (12, 256), (14, 256)),
                ((17, 512), (19, 512), (21, 512)), ((24, 512), (26, 512), (28, 512)))
SHIFT = (-0.030, -0.088, -0.188)  # lpips' ScalingLayer: ImageNet statistics in [-1, 1] units
SCALE = (0.458, 0.448, 0.450)
ENV_VAR = "DIFFUSION_JAX_LPIPS"
DEFAULT_FILE = os.path.join("~", ".cache", "diffusion_jax", "lpips_vgg.safetensors")


class LPIPSWeightsError(ValueError):
  pass


def normalize_channels(f, eps: float = 1e-10):
  """f / (||f||_2 over channels + eps), as lpips' normalize_tensor."""
  return f / (jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True)) + eps)


class VGG16Features(nn.Module):
  """The five tapped ReLU outputs of VGG16's convolutional part (NHWC)."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    taps = []
    for s, stage in enumerate(VGG16_STAGES):
      if s:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      for index, features in stage:
        x = nn.relu(nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                            name=f"vgg_{index}")(x))
      taps.append(x)
    return taps


class LPIPS(nn.Module):
  """d(x0, x1) per example: [B] (x0, x1: [B, H, W, 3] in [-1, 1])."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x0, x1):
    if x0.shape != x1.shape or x0.ndim != 4 or x0.shape[-1] != 3:
      raise ValueError(f"LPIPS compares two [B, H, W, 3] batches; got {x0.shape}, {x1.shape}")
    x = (jnp.concatenate([x0, x1]) - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)
    taps = VGG16Features(self.dtype, name="vgg")(x.astype(self.dtype))
    total = 0.0
    for k, f in enumerate(taps):
      f0, f1 = jnp.split(normalize_channels(f.astype(jnp.float32)), 2)
      w = nn.Dense(1, use_bias=False, name=f"lin_{k}")(jnp.square(f0 - f1))  # 1x1 conv
      total = total + jnp.mean(w, axis=(1, 2, 3))
    return total


def param_shapes() -> dict[str, tuple[int, ...]]:
  """Flat '/'-joined parameter names -> shapes (what a weights file must hold)."""
  x = jnp.zeros((1, 32, 32, 3))
  shapes = jax.eval_shape(lambda: LPIPS().init(jax.random.PRNGKey(0), x, x))["params"]
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes, sep="/").items()}


def default_lpips_path() -> str:
  return os.path.expanduser(os.environ.get(ENV_VAR) or DEFAULT_FILE)


def conversion_instructions(path: str) -> str:
  return ("Convert torchvision's VGG16 weights (https://download.pytorch.org/models/"
          "vgg16-397923af.pth) and the lpips package's lin layers (lpips/weights/v0.1/vgg.pth, "
          "inside `pip install lpips`) once, with torch installed:\n"
          "  python -m diffusion_jax.convert_lpips --src=vgg16-397923af.pth,"
          f"$(python -c 'import lpips, os; print(os.path.dirname(lpips.__file__))')"
          f"/weights/v0.1/vgg.pth --dst={path}\n(${ENV_VAR} chooses another location; an LDM "
          "autoencoder checkpoint holding loss.perceptual_loss.* also works as --src)")


def load_lpips_params(path: str | None = None) -> dict:
  """LPIPS parameters from a converted safetensors file; every name and shape checked."""
  from safetensors.numpy import load_file

  from diffusion_jax.convert_inception import shape_problems
  path = os.path.expanduser(path or default_lpips_path())
  if not os.path.isfile(path):
    raise LPIPSWeightsError(f"the LPIPS weights are not at {path}. "
                            + conversion_instructions(path))
  try:
    flat = load_file(path)
  except Exception as e:  # noqa: BLE001 -- safetensors' own error types
    raise LPIPSWeightsError(f"{path} is not a readable safetensors file ({e}). Re-create it. "
                            + conversion_instructions(path)) from e
  shapes = param_shapes()
  problems = shape_problems(shapes, {k: v.shape for k, v in flat.items()},
                            sorted(k for k in flat if k not in shapes))
  if problems:
    raise LPIPSWeightsError(f"{path} does not hold LPIPS-VGG weights: " + "; ".join(problems))
  return traverse_util.unflatten_dict({k: np.asarray(v, np.float32) for k, v in flat.items()},
                                      sep="/")
