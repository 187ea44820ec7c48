"""models/attention.py: every implementation is softmax(q k^T / sqrt(d)) v, values and gradients."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import parallel
from diffusion_jax.models.attention import dot_product_attention


def _reference(q, k, v):
  """Attention written out in numpy, float64."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum("btnd,bsnd->bnts", q, k) / np.sqrt(q.shape[-1])
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnd->btnd", weights, v)


def _qkv(b, t, s, n, d, seed=0, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(kq, (b, t, n, d), dtype), jax.random.normal(kk, (b, s, n, d), dtype),
          jax.random.normal(kv, (b, s, n, d), dtype))


@pytest.mark.parametrize("impl", ["per_head", "xla", "auto"])
@pytest.mark.parametrize("shape", [(2, 16, 16, 1, 8), (3, 12, 5, 4, 6), (1, 64, 77, 2, 16)])
def test_values_match_the_definition(impl, shape):
  q, k, v = _qkv(*shape)
  out = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, impl))(q, k, v)
  chex.assert_shape(out, q.shape)
  np.testing.assert_allclose(out, _reference(q, k, v), atol=2e-6, rtol=1e-5)


def test_each_item_and_head_attends_only_to_its_own_keys():
  q, k, v = _qkv(2, 8, 8, 3, 4)
  out = dot_product_attention(q, k, v, "per_head")
  v2 = v.at[1, :, 2].set(100.0)  # item 1, head 2
  out2 = dot_product_attention(q, k, v2, "per_head")
  changed = np.abs(np.asarray(out2 - out)).max(axis=(1, 3))  # [B, N]
  assert changed[1, 2] > 1.0
  assert np.delete(changed.ravel(), 1 * 3 + 2).max() == 0.0


def test_gradients_match_jax():
  q, k, v = _qkv(2, 10, 7, 2, 8, seed=1)
  w = jax.random.normal(jax.random.PRNGKey(2), q.shape)
  loss = lambda impl: lambda q, k, v: jnp.sum(w * dot_product_attention(q, k, v, impl) ** 2)
  ours = jax.grad(loss("per_head"), argnums=(0, 1, 2))(q, k, v)
  theirs = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(ours, theirs):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_bfloat16_keeps_its_dtype_and_stays_close():
  q, k, v = _qkv(2, 32, 32, 2, 16, dtype=jnp.bfloat16)
  out = dot_product_attention(q, k, v, "per_head")
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), _reference(q, k, v), atol=3e-2)


def test_sharded_batch_gives_the_same_result():
  q, k, v = _qkv(jax.device_count(), 16, 16, 2, 8, seed=3)
  sharding = parallel.batch_sharding(parallel.make_mesh())
  q, k, v = (jax.device_put(x, sharding) for x in (q, k, v))
  out = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, "per_head"))(q, k, v)
  np.testing.assert_allclose(out, _reference(q, k, v), atol=2e-6, rtol=1e-5)


def test_auto_keeps_a_sharded_batch_on_its_devices():
  """With several devices "auto" attends in place: no gather of q, k, v onto every device."""
  q, k, v = _qkv(jax.device_count(), 16, 16, 2, 8, seed=4)
  sharding = parallel.batch_sharding(parallel.make_mesh())
  q, k, v = (jax.device_put(x, sharding) for x in (q, k, v))
  f = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, "auto"))
  hlo = f.lower(q, k, v).compile().as_text()
  assert "all-gather" not in hlo and "all-to-all" not in hlo
  np.testing.assert_allclose(f(q, k, v), _reference(q, k, v), atol=2e-6, rtol=1e-5)


def test_unknown_implementation_is_refused():
  with pytest.raises(ValueError, match="one of"):
    dot_product_attention(*_qkv(1, 4, 4, 1, 4), "flash")


@pytest.mark.parametrize("t, s, d, dtype, flash", [
    (4096, 4096, 40, jnp.bfloat16, True),    # Stable Diffusion 1.5's 64x64 level
    (1024, 1024, 80, jnp.float16, True),     # its 32x32 level
    (4096, 77, 40, jnp.bfloat16, False),     # cross-attention to the prompt: small logits
    (256, 256, 256, jnp.bfloat16, False),    # the CIFAR-10 U-Net's one wide head
    (256, 256, 160, jnp.bfloat16, False),    # head wider than 128
    (4096, 4096, 40, jnp.float32, False),    # float32: no flash attention
])
def test_auto_on_gpu_takes_cudnn_flash_attention_for_long_self_attention(
    monkeypatch, t, s, d, dtype, flash):
  from diffusion_jax.models import attention
  calls = []
  monkeypatch.setattr(attention.jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(attention, "flash_capable", lambda: True)
  monkeypatch.setattr(attention.jax.nn, "dot_product_attention",
                      lambda q, k, v, implementation=None: calls.append(implementation) or q)
  q = jax.ShapeDtypeStruct((2, t, 8, d), dtype)
  k = jax.ShapeDtypeStruct((2, s, 8, d), dtype)
  attention.dot_product_attention(q, k, k, "auto")
  assert calls == (["cudnn"] if flash else ["xla"])


def test_auto_on_gpu_falls_back_to_xla_where_cudnn_refuses(monkeypatch):
  from diffusion_jax.models import attention
  calls = []

  def fake(q, k, v, implementation=None):
    calls.append(implementation)
    if implementation == "cudnn":
      raise NotImplementedError("no cuDNN flash attention here")
    return q
  monkeypatch.setattr(attention.jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(attention, "flash_capable", lambda: True)
  monkeypatch.setattr(attention.jax.nn, "dot_product_attention", fake)
  q = jax.ShapeDtypeStruct((1, 4096, 8, 40), jnp.bfloat16)
  attention.dot_product_attention(q, q, q, "auto")
  assert calls == ["cudnn", "xla"]
  # a card before Ampere (cuDNN would fail only when XLA compiles): XLA's from the start
  calls.clear()
  monkeypatch.setattr(attention, "flash_capable", lambda: False)
  attention.dot_product_attention(q, q, q, "auto")
  assert calls == ["xla"]


def test_flash_capable_reads_the_compute_capability(monkeypatch):
  from diffusion_jax.models import attention
  for capability, want in (("9.0", True), ("8.0", True), ("7.5", False), (None, False)):
    device = type("Device", (), {"compute_capability": capability})()
    monkeypatch.setattr(attention.jax, "devices", lambda: [device])
    assert attention.flash_capable() == want
