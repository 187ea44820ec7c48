"""Class conditioning: classifier-free guidance against its formula, label dropout's rate."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import denoiser, drop_labels
from diffusion_jax.models.unet import UNet


@pytest.mark.parametrize("learned_variance", [False, True])
def test_guidance_is_uncond_plus_scale_times_the_difference(learned_variance):
  # ch 64: with 32 channels each GroupNorm group holds one channel, which normalises the
  # per-channel shift of the time and label embedding away
  model = UNet(ch=64, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
               in_channels=2, num_classes=3, learned_variance=learned_variance)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 2))
  t = jnp.array([3, 50, 7, 99])
  y = jnp.array([0, 2, 1, 2])
  params = model.init(jax.random.PRNGKey(1), x, t, y)["params"]
  # the output conv starts at zero: perturb every weight so that labels change the output
  rng = np.random.default_rng(2)  # numpy: no program compiled per shape
  params = jax.tree.map(lambda p: jnp.asarray(
      np.asarray(p) + 0.05 * rng.standard_normal(p.shape).astype(np.float32)), params)
  cond = model.apply({"params": params}, x, t, y)
  uncond = model.apply({"params": params}, x, t, jnp.full((4,), 3))
  assert float(jnp.max(jnp.abs(cond - uncond))) > 1e-3
  for s in (0.0, 1.0, 3.0):
    got = denoiser(model, params, y, s)(x, t)
    want = uncond[..., :2] + s * (cond[..., :2] - uncond[..., :2])
    np.testing.assert_allclose(got[..., :2], want, atol=2e-5)
    if learned_variance:  # the variance output is the conditional pass's
      np.testing.assert_allclose(got[..., 2:], cond[..., 2:], atol=2e-5)
  np.testing.assert_allclose(denoiser(model, params)(x, t), uncond, atol=1e-6)  # null label


def test_label_dropout_replaces_labels_by_the_null_label_at_its_rate():
  y = jnp.arange(200_000) % 10
  dropped = drop_labels(jax.random.PRNGKey(0), y, 10, 0.1)
  is_null = np.asarray(dropped == 10)
  assert abs(is_null.mean() - 0.1) < 0.003
  np.testing.assert_array_equal(np.asarray(dropped)[~is_null], np.asarray(y)[~is_null])
  assert drop_labels(jax.random.PRNGKey(0), y, 10, 0.0) is y
