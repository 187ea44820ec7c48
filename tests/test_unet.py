"""The U-Net: the paper's parameter counts, shapes, options."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import UNet


def count(model, size, channels=3):
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, size, size, channels)), jnp.zeros((1,))))
  return sum(x.size for x in jax.tree.leaves(shapes))


def test_paper_parameter_counts():
  assert count(UNet(ch_mult=(1, 2, 2, 2), dropout=0.1), 32) == 35_746_307
  assert count(UNet(ch_mult=(1, 1, 2, 2, 4, 4), dropout=0.0), 256) == 113_673_219


def small(**kw):
  return UNet(**{**dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                        dropout=0.1, in_channels=1), **kw})


def test_forward_shapes_dropout_and_zero_init():
  m = small()
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 1))
  t = jnp.array([3, 700])
  params = m.init(jax.random.PRNGKey(1), x, t)
  out = m.apply(params, x, t)
  assert out.shape == x.shape and out.dtype == jnp.float32
  np.testing.assert_array_equal(out, 0.0)  # conv_out starts at zero, as in the original
  params = jax.tree.map(lambda p: p + 0.01, params)
  a = m.apply(params, x, t)
  b = m.apply(params, x, t, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
  assert not np.allclose(a, b)  # dropout only in training
  assert not np.allclose(a, m.apply(params, x, t + 1))  # depends on t


def test_learned_variance_class_conditioning_and_bf16():
  m = small(learned_variance=True, num_classes=10, dtype=jnp.bfloat16)
  x = jnp.ones((2, 8, 8, 1))
  params = m.init(jax.random.PRNGKey(0), x, jnp.zeros((2,)), jnp.array([1, 2]))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  assert params["params"]["label_emb"]["embedding"].shape == (11, 128)  # + the null label
  params = jax.tree.map(lambda p: p + 0.01, params)
  out = m.apply(params, x, jnp.zeros((2,)), jnp.array([1, 2]))
  assert out.shape == (2, 8, 8, 2) and out.dtype == jnp.float32
  null = m.apply(params, x, jnp.zeros((2,)))
  assert not np.allclose(out, null)
  f32 = small(learned_variance=True, num_classes=10).apply(params, x, jnp.zeros((2,)),
                                                           jnp.array([1, 2]))
  np.testing.assert_allclose(out, f32, atol=0.1)


def test_shape_errors_are_clear():
  with pytest.raises(ValueError, match="not divisible by 2"):
    small().init(jax.random.PRNGKey(0), jnp.zeros((1, 7, 7, 1)), jnp.zeros((1,)))
  with pytest.raises(ValueError, match="expects 1 channels"):
    small().init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,)))


def _saved_activation_bytes(fn, *args, capsys) -> int:
  """Bytes the backward pass keeps from the forward (not counting the arguments)."""
  import re
  from jax.ad_checkpoint import print_saved_residuals
  capsys.readouterr()
  print_saved_residuals(fn, *args)
  total = 0
  for dtype, shape, rest in re.findall(r"^(\w+)\[([\d,]*)\] (.*)$", capsys.readouterr().out, re.M):
    if "argument" not in rest:
      itemsize = int(re.sub(r"\D", "", dtype) or 8) // 8  # f32 -> 4, bf16 -> 2, bool -> 1
      total += int(np.prod([int(d) for d in shape.split(",") if d])) * max(itemsize, 1)
  return total


def test_remat_same_parameters_outputs_and_gradients_less_memory(capsys):
  """remat trades compute for memory: the same parameter tree, outputs and gradients (the same
  dropout masks), and far fewer activations kept for the backward pass."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 1))
  t = jnp.array([3, 700])
  plain, remat = small(), small(remat=True)
  params = jax.jit(plain.init)(jax.random.PRNGKey(1), x, t)
  assert jax.tree.structure(jax.eval_shape(remat.init, jax.random.PRNGKey(1), x, t)) == \
      jax.tree.structure(params)
  params = jax.tree.map(lambda p: p + 0.01, params)
  loss = lambda m: lambda p: jnp.sum(m.apply(p, x, t, train=True,
                                             rngs={"dropout": jax.random.PRNGKey(2)}) ** 2)
  (la, ga), (lb, gb) = (jax.jit(jax.value_and_grad(loss(m)))(params) for m in (plain, remat))
  np.testing.assert_allclose(la, lb, rtol=1e-5)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6), ga, gb)
  kept = [_saved_activation_bytes(loss(m), params, capsys=capsys) for m in (plain, remat)]
  assert kept[1] < kept[0] / 3, kept  # the CIFAR layout at batch 8: 708 -> 106 MiB


def test_attention_implementations_agree():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 1))
  t = jnp.array([3, 700])
  params = jax.tree.map(lambda p: p + 0.01, jax.jit(small().init)(jax.random.PRNGKey(1), x, t))
  apply = lambda impl: jax.jit(small(attention=impl).apply)(params, x, t)
  np.testing.assert_allclose(apply("xla"), apply("auto"), atol=1e-6)
  with pytest.raises(Exception):  # cuDNN flash attention needs a GPU
    apply("cudnn")


def test_attention_choice_is_validated_before_anything_compiles():
  from configs.cifar10_ddpm import get_config
  from diffusion_jax.validate import ConfigError, validate_config
  config = get_config()
  config.model.attention = "flash"
  with pytest.raises(ConfigError, match="model.attention='flash'.*auto"):
    validate_config(config)
  config.model.attention = "cudnn"  # this CPU has no cuDNN
  with pytest.raises(ConfigError, match="bfloat16' on a GPU"):
    validate_config(config)


@pytest.mark.parametrize("shape", [(2, 4, 4, 8), (1, 7, 5, 3), (3, 1, 1, 2)])
def test_subpixel_upsample_conv_is_resize_conv(shape):
  """Nearest x2 then 3x3 "SAME" conv, computed as one 2x2 conv of the low-resolution input:
  the same values and gradients (x and kernel), odd and 1-pixel sizes included."""
  from jax import lax

  from diffusion_jax.models.layers import subpixel_upsample_conv
  kx, kw = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(kx, shape)
  w = jax.random.normal(kw, (3, 3, shape[-1], 6))

  def resize_conv(x, w):
    up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return lax.conv_general_dilated(up, w, (1, 1), "SAME",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))

  want, got = resize_conv(x, w), subpixel_upsample_conv(x, w)
  assert got.shape == (shape[0], 2 * shape[1], 2 * shape[2], 6)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  cot = jax.random.normal(jax.random.PRNGKey(1), want.shape)
  grads = [jax.grad(lambda x, w, f=f: jnp.sum(f(x, w) * cot), argnums=(0, 1))(x, w)
           for f in (resize_conv, subpixel_upsample_conv)]
  for a, b in zip(*grads):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


def test_upsample_conv_choices_agree_with_fewer_flops():
  """upsample_conv="subpixel" and "resize": one parameter tree, the same outputs and gradients;
  subpixel runs 2.25 (h / (h + 1))^2 times fewer multiply-adds in the up path's convolutions."""
  from diffusion_jax import summary
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 1))
  t = jnp.array([3, 700])
  models = {k: small(attn_resolutions=(), dropout=0.0, upsample_conv=k)
            for k in ("resize", "subpixel")}
  params = jax.jit(models["resize"].init)(jax.random.PRNGKey(1), x, t)
  assert jax.tree.structure(jax.eval_shape(models["subpixel"].init, jax.random.PRNGKey(1), x, t)
                            ) == jax.tree.structure(params)
  params = jax.tree.map(lambda p: p + 0.01, params)  # no zero-initialised layer hides a path
  loss = lambda m: lambda p: jnp.sum(m.apply(p, x, t) ** 2)
  (la, ga), (lb, gb) = (jax.jit(jax.value_and_grad(loss(m)))(params) for m in models.values())
  np.testing.assert_allclose(lb, la, rtol=1e-5)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(v, u, rtol=1e-4, atol=1e-5), ga, gb)
  flops = {k: summary.matmul_flops(m.apply, params, x, t) for k, m in models.items()}
  # the up-path conv (64 ch, 4x4 -> 8x8, batch 2): 9 taps per output pixel become 4 taps on
  # the padded (h + 1) x (w + 1) low-resolution grid, with 4x the channels
  resize = 2 * 9 * 64 * 64 * 2 * 8 * 8
  subpixel = 2 * 4 * 64 * 4 * 64 * 2 * 5 * 5
  assert flops["resize"] - flops["subpixel"] == resize - subpixel
  with pytest.raises(ValueError, match="upsample_conv='nearest'.*subpixel"):
    small(upsample_conv="nearest").init(jax.random.PRNGKey(1), x, t)


def test_upsample_conv_choice_is_validated():
  from configs.cifar10_ddpm import get_config
  from diffusion_jax.validate import ConfigError, validate_config
  config = get_config()
  config.model.upsample_conv = "pixelshuffle"
  with pytest.raises(ConfigError, match="model.upsample_conv='pixelshuffle'.*resize"):
    validate_config(config)
