"""oneDNN convolutions (models/onednn_conv.py): XLA's values and gradients, the U-Net unchanged,
the choice of kernels, and the messages when it cannot be built."""
import platform
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from diffusion_jax import summary, validate
from diffusion_jax.models import onednn_conv
from diffusion_jax.models.unet import UNet
from configs.fashion_mnist import get_config

# requirements.txt installs oneDNN on Linux x86-64: there it must build (no silent skip)
pytestmark = pytest.mark.skipif(
    not (sys.platform == "linux" and platform.machine() == "x86_64"),
    reason="the onednn pip packages are for Linux x86-64")
NHWC = ("NHWC", "HWIO", "NHWC")


def _weighted_sum(y):  # every output element gets its own cotangent
  return jnp.sum(jnp.sin(y) * jnp.arange(1, y.size + 1).reshape(y.shape) / y.size)


def _value_and_grads(conv, x, w, strides, padding):
  loss = lambda x, w: _weighted_sum(conv(x, w, strides, padding, dimension_numbers=NHWC))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, w)


@pytest.mark.parametrize("x_shape, w_shape, strides, padding", [
    ((3, 8, 8, 16), (3, 3, 16, 32), (1, 1), "SAME"),            # ResBlock conv
    ((3, 8, 8, 16), (3, 3, 16, 16), (2, 2), "SAME"),            # Downsample: pad (0, 1)
    ((3, 8, 8, 16), (1, 1, 16, 8), (1, 1), "SAME"),             # NIN shortcut
    ((2, 9, 7, 3), (3, 3, 3, 5), (2, 1), ((1, 0), (2, 1))),     # odd sizes, uneven padding
    ((2, 6, 6, 4), (2, 3, 4, 6), (1, 2), "VALID"),              # non-square kernel
])
def test_conv_matches_xla_values_and_gradients(x_shape, w_shape, strides, padding):
  kx, kw = jax.random.split(jax.random.PRNGKey(0))
  x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape) / 3
  y = jax.jit(lambda x, w: onednn_conv.conv_general_dilated(x, w, strides, padding,
                                                           dimension_numbers=NHWC))(x, w)
  y_ref = lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)
  assert y.shape == y_ref.shape
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  (v1, (gx1, gw1)) = _value_and_grads(onednn_conv.conv_general_dilated, x, w, strides, padding)
  (v2, (gx2, gw2)) = _value_and_grads(lax.conv_general_dilated, x, w, strides, padding)
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  # y's float32 rounding (~1e-6 of |y| ~ 4) reaches the gradients through cos(y) in the
  # cotangent and sums over the kernel: ~5e-6 on entries of up to ~1, seen on an AMD EPYC
  np.testing.assert_allclose(gx1, gx2, rtol=1e-4, atol=2e-5)
  np.testing.assert_allclose(gw1, gw2, rtol=1e-4, atol=2e-5)


def _hlo(fn, *args):
  return jax.jit(fn).lower(*args).as_text()


def test_plain_convs_go_to_onednn_others_stay_xla():
  x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
  conv = lambda x, w, **kw: onednn_conv.conv_general_dilated(x, w, (1, 1), "SAME",
                                                             dimension_numbers=NHWC, **kw)
  assert onednn_conv.TARGETS["forward"] in _hlo(conv, x, w)
  grads = _hlo(jax.grad(lambda x, w: conv(x, w).sum(), (0, 1)), x, w)
  assert onednn_conv.TARGETS["backward_data"] in grads
  assert onednn_conv.TARGETS["backward_weights"] in grads
  others = {
      "bfloat16": lambda x, w: conv(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)),
      "dilated": lambda x, w: conv(x, w, rhs_dilation=(2, 2)),
      "grouped": lambda x, w: conv(x, w[:, :, :2], feature_group_count=2),
      "NCHW": lambda x, w: onednn_conv.conv_general_dilated(
          x.transpose(0, 3, 1, 2), w, (1, 1), "SAME", dimension_numbers=("NCHW", "HWIO", "NCHW")),
  }
  for name, fn in others.items():
    hlo = _hlo(fn, x, w)
    assert "custom_call" not in hlo, name
    assert "convolution" in hlo, name


def test_vmapped_conv():
  x, w = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 6, 6, 4)), jnp.ones((3, 3, 4, 2))
  f = lambda conv: jax.vmap(lambda x: conv(x, w, (1, 1), "SAME", dimension_numbers=NHWC))
  np.testing.assert_allclose(jax.jit(f(onednn_conv.conv_general_dilated))(x),
                             f(lax.conv_general_dilated)(x), rtol=1e-5, atol=1e-5)


def test_unet_with_onednn_convs_matches_xla():
  """Same parameters, same outputs and gradients: the choice of kernels is invisible."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  t = jnp.array([3, 500])
  models = {conv: UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                       dropout=0.0, conv=conv) for conv in ("xla", "onednn")}
  params = models["xla"].init(jax.random.PRNGKey(1), x, t)
  rng = np.random.default_rng(2)  # the zero-initialised convs too (numpy: nothing compiled)
  params = jax.tree.map(lambda p: jnp.asarray(
      np.asarray(p) + 0.05 * rng.standard_normal(p.shape).astype(np.float32)), params)
  loss = lambda model: jax.jit(jax.value_and_grad(
      lambda p: _weighted_sum(model.apply(p, x, t))))
  hlo = jax.jit(models["onednn"].apply).lower(params, x, t).as_text()
  assert hlo.count(onednn_conv.TARGETS["forward"]) >= 10  # every conv of the U-Net
  (v1, g1), (v2, g2) = loss(models["xla"])(params), loss(models["onednn"])(params)
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  chex.assert_trees_all_close(g1, g2, rtol=1e-3, atol=1e-5)


def test_which_kernels_each_mode_gives():
  assert onednn_conv.use_onednn("onednn", jnp.float32)
  assert not onednn_conv.use_onednn("xla", jnp.float32)
  # auto: oneDNN only on one CPU device, in float32 (the tests run 8 devices)
  assert jax.device_count() > 1 and not onednn_conv.use_onednn("auto", jnp.float32)
  assert not onednn_conv.use_onednn("auto", jnp.bfloat16)
  with pytest.raises(ValueError, match="float32 on the CPU"):
    onednn_conv.use_onednn("onednn", jnp.bfloat16)
  with pytest.raises(ValueError, match="expected one of"):
    onednn_conv.use_onednn("mkldnn", jnp.float32)
  assert onednn_conv.implementation() and "ref" not in onednn_conv.implementation()


def test_config_rejects_onednn_where_it_cannot_run():
  config = get_config()
  config.model.conv = "onednn"  # 8 devices here
  with pytest.raises(validate.ConfigError, match="single CPU device"):
    validate.validate_config(config, "train")
  config.model.conv = "cudnn"
  with pytest.raises(validate.ConfigError, match="model.conv"):
    validate.validate_config(config, "train")


def test_build_is_cached(tmp_path, monkeypatch):
  monkeypatch.setenv("DIFFUSION_JAX_CACHE", str(tmp_path))
  library = onednn_conv.build()
  assert library.parent == tmp_path and library.exists()
  built = library.stat().st_mtime_ns
  assert onednn_conv.build() == library and library.stat().st_mtime_ns == built
  assert [p.name for p in tmp_path.iterdir()] == [library.name]  # no partial files left


def test_build_says_what_is_missing(tmp_path, monkeypatch):
  monkeypatch.setenv("DIFFUSION_JAX_CACHE", str(tmp_path))
  monkeypatch.setenv("CXX", "no-such-compiler")
  with pytest.raises(onednn_conv.OnednnUnavailable, match="install g\\+\\+"):
    onednn_conv.build()
  monkeypatch.delenv("CXX")
  broken = tmp_path / "broken.cc"
  broken.write_text("this is not C++\n")
  monkeypatch.setattr(onednn_conv, "SOURCES", (onednn_conv.SOURCES[0], broken))
  with pytest.raises(onednn_conv.OnednnUnavailable, match="(?s)broken.cc failed.*model.conv='xla'"):
    onednn_conv.build()
  assert not list(tmp_path.glob("*.so"))  # nothing half-built is left to load
  monkeypatch.setattr(onednn_conv.sys, "prefix", str(tmp_path))
  monkeypatch.setattr(onednn_conv.sysconfig, "get_paths", lambda: {"data": str(tmp_path)})
  monkeypatch.delenv("DNNL_ROOT", raising=False)
  with pytest.raises(onednn_conv.OnednnUnavailable, match="pip install onednn-cpu-gomp"):
    onednn_conv.build()


def test_flop_count_sees_onednn_convs():
  """MFU's FLOPs (summary.matmul_flops) are the same whichever kernels run. (With "SAME"
  convolutions: XLA's input gradient of the subpixel upsample's padded 2x2 conv also counts its
  products with the padding, oneDNN's handler counts a forward's worth.)"""
  x, t = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32), jax.ShapeDtypeStruct((2,), jnp.int32)
  counts = []
  for conv in ("xla", "onednn"):
    model = UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), conv=conv,
                 upsample_conv="resize")
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(x.shape),
                                               jnp.zeros(t.shape, jnp.int32)))
    step = jax.grad(lambda p, x, t: model.apply(p, x, t).sum(), argnums=(0, 1))
    counts.append(summary.matmul_flops(step, params, x, t))
  assert counts[0] > 0 and counts[1] == pytest.approx(counts[0], rel=1e-9)
