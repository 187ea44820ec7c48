"""The Inception-v3 network of FID and IS, as pytorch-fid runs it, in Flax (NHWC, float32).

This is pytorch-fid's `InceptionV3(use_fid_inception=True)`: torchvision's Inception3 with
the blocks patched to behave like the TensorFlow graph `inception-2015-12-05` that the
original FID and IS code use: the average pools of the A, C and E blocks ignore the zero
padding (count_include_pad=False), the last E block (Mixed_7c) max-pools its pool branch,
and the classifier is 1008-way. BatchNorm (eps=1e-3) always uses its frozen statistics.

Module and parameter names follow torchvision's (Conv2d_1a_3x3/conv, Mixed_5b/branch1x1/bn,
fc, ...) so that `convert_inception` is a renaming plus transposes. Weights: see
`convert_inception.load_inception_variables`.

Input: images in [0, 1], [B, H, W, 3], any H and W. They are resized to 299x299 like
`F.interpolate(x, (299, 299), mode='bilinear', align_corners=False)`, that is bilinear without
antialiasing also when down-sampling, then mapped to [-1, 1].
Output: {'pool3': [B, 2048] the FID features, 'logits': [B, 1008] = fc(pool3) with its bias,
'logits_unbiased': [B, 1008] = pool3 @ fc.kernel, what the original Inception Score softmaxes}.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from diffusion_jax import xla_options

INPUT_SIZE = 299
NUM_CLASSES = 1008
FEATURE_DIM = 2048
# float32 convolutions and matmuls also on GPUs/TPUs, whose default would be TF32 or bfloat16
PRECISION = jax.lax.Precision.HIGHEST


def resize_bilinear(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
  """[B, H, W, C] -> [B, size, size, C] like torch's bilinear interpolate, align_corners=False.

  `antialias=False` matters when down-sampling: torch reads the two nearest input pixels
  whatever the scale, while jax's default would widen the kernel.
  """
  if images.shape[1:3] == (size, size):
    return images
  shape = (images.shape[0], size, size, images.shape[3])
  return jax.image.resize(images, shape, method="bilinear", antialias=False)


class BasicConv2d(nn.Module):
  """Conv (no bias) -> BatchNorm with frozen statistics (eps=1e-3) -> ReLU."""
  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] = (1, 1)
  padding: Sequence[int] = (0, 0)  # symmetric (height, width) padding, as torch's Conv2d

  @nn.compact
  def __call__(self, x):
    pad_h, pad_w = self.padding
    x = nn.Conv(self.features, tuple(self.kernel_size), strides=tuple(self.strides),
                padding=((pad_h, pad_h), (pad_w, pad_w)), use_bias=False, precision=PRECISION,
                name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def conv(features: int, kernel_size, name: str, strides=(1, 1), padding=(0, 0)) -> Callable:
  """A BasicConv2d; an int `kernel_size` or `padding` means the same for height and width."""
  if isinstance(kernel_size, int):
    kernel_size = (kernel_size, kernel_size)
  if isinstance(padding, int):
    padding = (padding, padding)
  return BasicConv2d(features, kernel_size, strides, padding, name=name)


def avg_pool_3x3_same(x):
  """TensorFlow's 3x3/1 SAME average pool: padded positions are not counted."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def max_pool_3x3(x, stride: int, pad: int = 0):
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
  """Mixed_5b..5d (pytorch-fid's FIDInceptionA)."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    branch1x1 = conv(64, 1, "branch1x1")(x)
    branch5x5 = conv(48, 1, "branch5x5_1")(x)
    branch5x5 = conv(64, 5, "branch5x5_2", padding=2)(branch5x5)
    branch3x3dbl = conv(64, 1, "branch3x3dbl_1")(x)
    branch3x3dbl = conv(96, 3, "branch3x3dbl_2", padding=1)(branch3x3dbl)
    branch3x3dbl = conv(96, 3, "branch3x3dbl_3", padding=1)(branch3x3dbl)
    branch_pool = conv(self.pool_features, 1, "branch_pool")(avg_pool_3x3_same(x))
    return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: 35x35 -> 17x17."""

  @nn.compact
  def __call__(self, x):
    branch3x3 = conv(384, 3, "branch3x3", strides=(2, 2))(x)
    branch3x3dbl = conv(64, 1, "branch3x3dbl_1")(x)
    branch3x3dbl = conv(96, 3, "branch3x3dbl_2", padding=1)(branch3x3dbl)
    branch3x3dbl = conv(96, 3, "branch3x3dbl_3", strides=(2, 2))(branch3x3dbl)
    return jnp.concatenate([branch3x3, branch3x3dbl, max_pool_3x3(x, 2)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b..6e (pytorch-fid's FIDInceptionC): factorised 7x7 convolutions."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    branch1x1 = conv(192, 1, "branch1x1")(x)
    branch7x7 = conv(c7, 1, "branch7x7_1")(x)
    branch7x7 = conv(c7, (1, 7), "branch7x7_2", padding=(0, 3))(branch7x7)
    branch7x7 = conv(192, (7, 1), "branch7x7_3", padding=(3, 0))(branch7x7)
    branch7x7dbl = conv(c7, 1, "branch7x7dbl_1")(x)
    branch7x7dbl = conv(c7, (7, 1), "branch7x7dbl_2", padding=(3, 0))(branch7x7dbl)
    branch7x7dbl = conv(c7, (1, 7), "branch7x7dbl_3", padding=(0, 3))(branch7x7dbl)
    branch7x7dbl = conv(c7, (7, 1), "branch7x7dbl_4", padding=(3, 0))(branch7x7dbl)
    branch7x7dbl = conv(192, (1, 7), "branch7x7dbl_5", padding=(0, 3))(branch7x7dbl)
    branch_pool = conv(192, 1, "branch_pool")(avg_pool_3x3_same(x))
    return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a: 17x17 -> 8x8."""

  @nn.compact
  def __call__(self, x):
    branch3x3 = conv(192, 1, "branch3x3_1")(x)
    branch3x3 = conv(320, 3, "branch3x3_2", strides=(2, 2))(branch3x3)
    branch7x7x3 = conv(192, 1, "branch7x7x3_1")(x)
    branch7x7x3 = conv(192, (1, 7), "branch7x7x3_2", padding=(0, 3))(branch7x7x3)
    branch7x7x3 = conv(192, (7, 1), "branch7x7x3_3", padding=(3, 0))(branch7x7x3)
    branch7x7x3 = conv(192, 3, "branch7x7x3_4", strides=(2, 2))(branch7x7x3)
    return jnp.concatenate([branch3x3, branch7x7x3, max_pool_3x3(x, 2)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b (average pool, FIDInceptionE_1) and Mixed_7c (max pool, FIDInceptionE_2)."""
  pool: str  # 'avg' or 'max': the FID graph max-pools in its last block

  @nn.compact
  def __call__(self, x):
    branch1x1 = conv(320, 1, "branch1x1")(x)
    branch3x3 = conv(384, 1, "branch3x3_1")(x)
    branch3x3 = jnp.concatenate([
        conv(384, (1, 3), "branch3x3_2a", padding=(0, 1))(branch3x3),
        conv(384, (3, 1), "branch3x3_2b", padding=(1, 0))(branch3x3)], axis=-1)
    branch3x3dbl = conv(448, 1, "branch3x3dbl_1")(x)
    branch3x3dbl = conv(384, 3, "branch3x3dbl_2", padding=1)(branch3x3dbl)
    branch3x3dbl = jnp.concatenate([
        conv(384, (1, 3), "branch3x3dbl_3a", padding=(0, 1))(branch3x3dbl),
        conv(384, (3, 1), "branch3x3dbl_3b", padding=(1, 0))(branch3x3dbl)], axis=-1)
    if self.pool == "avg":
      pooled = avg_pool_3x3_same(x)
    elif self.pool == "max":
      pooled = max_pool_3x3(x, 1, pad=1)  # pads with -inf, as torch's max_pool2d
    else:
      raise ValueError(f"pool must be 'avg' or 'max', got {self.pool!r}")
    branch_pool = conv(192, 1, "branch_pool")(pooled)
    return jnp.concatenate([branch1x1, branch3x3, branch3x3dbl, branch_pool], axis=-1)


class FIDInceptionV3(nn.Module):
  """pytorch-fid's FID Inception-v3; images in [0, 1], NHWC -> pool3, logits (see module doc)."""

  @nn.compact
  def __call__(self, images) -> dict[str, jax.Array]:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected images [B, H, W, 3], got shape {images.shape}")
    x = resize_bilinear(images.astype(jnp.float32))
    x = 2.0 * x - 1.0
    x = conv(32, 3, "Conv2d_1a_3x3", strides=(2, 2))(x)  # 149x149
    x = conv(32, 3, "Conv2d_2a_3x3")(x)  # 147x147
    x = conv(64, 3, "Conv2d_2b_3x3", padding=1)(x)
    x = max_pool_3x3(x, 2)  # 73x73
    x = conv(80, 1, "Conv2d_3b_1x1")(x)
    x = conv(192, 3, "Conv2d_4a_3x3")(x)  # 71x71
    x = max_pool_3x3(x, 2)  # 35x35
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)  # 17x17
    x = InceptionC(128, name="Mixed_6b")(x)
    x = InceptionC(160, name="Mixed_6c")(x)
    x = InceptionC(160, name="Mixed_6d")(x)
    x = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)  # 8x8
    x = InceptionE("avg", name="Mixed_7b")(x)
    x = InceptionE("max", name="Mixed_7c")(x)
    pool3 = jnp.mean(x, axis=(1, 2))
    fc = nn.Dense(NUM_CLASSES, precision=PRECISION, name="fc")
    logits = fc(pool3)
    logits_unbiased = jnp.dot(pool3, fc.variables["params"]["kernel"], precision=PRECISION)
    return {"pool3": pool3, "logits": logits, "logits_unbiased": logits_unbiased}


@functools.lru_cache(maxsize=None)
def variable_shapes() -> dict[str, tuple[int, ...]]:
  """{'params/Conv2d_1a_3x3/conv/kernel': (3, 3, 3, 32), 'batch_stats/.../bn/mean': ...}.

  Every variable of the network, flattened with '/', found by tracing (no computation).
  """
  images = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  shapes = jax.eval_shape(FIDInceptionV3().init, jax.random.key(0), images)
  flat = traverse_util.flatten_dict(flax.core.unfreeze(shapes), sep="/")
  return {name: tuple(s.shape) for name, s in flat.items()}


@functools.cache
def _compiled_features():
  return xla_options.jit(_features_from_uint8)


def _features_from_uint8(variables, images_uint8):
  out = FIDInceptionV3().apply(variables, images_uint8.astype(jnp.float32) / 255.0)
  return out["pool3"], out["logits_unbiased"]


def inception_fn(variables) -> Callable[[Any], tuple[jax.Array, jax.Array]]:
  """A jit-compiled `images uint8 [B, H, W, 3 or 1] -> (pool3 [B, 2048], logits [B, 1008])`.

  uint8 images are divided by 255 (pytorch-fid's ToTensor) and grayscale ones repeated to
  three channels. The logits are the bias-free ones of the original Inception Score code
  (`logits_unbiased`), the ones to give `fid.inception_score`. The variables are arguments of
  the compiled function, not constants folded into it, and one compilation per input shape
  is shared by every `inception_fn`.
  """
  variables = jax.device_put(variables)

  def features(images):
    if images.dtype != jnp.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise ValueError("expected uint8 images [B, H, W, 3] or [B, H, W, 1], got "
                       f"{images.dtype} {tuple(images.shape)}")
    if images.shape[-1] == 1:
      images = jnp.repeat(jnp.asarray(images), 3, axis=-1)
    return _compiled_features()(variables, images)

  return features
