"""Models, chosen by name from `config.model.name`."""
import jax
import jax.numpy as jnp

from diffusion_jax.models.autoencoder import AutoencoderKL
from diffusion_jax.models.layers import UPSAMPLE_CONV
from diffusion_jax.models.unet import UNet

MODELS = {"unet": UNet}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ATTENTION = ("auto", "xla", "cudnn")


def denoiser(model, params, y=None, guidance_scale: float = 1.0):
  """The network in inference mode as the diffusion sees it: denoise_fn(x_t, t).

  y: class labels [B] of a class-conditional model (None: its null label, unconditional).
  guidance_scale s != 1: classifier-free guidance (Ho & Salimans 2022, Eq. 6 with s = 1 + w),
  eps_u + s (eps_c - eps_u), the conditional and the unconditional pass as one batch; a learned
  variance is the conditional pass's.
  """
  if y is None or guidance_scale == 1.0:
    return lambda x, t: model.apply({"params": params}, x, t, y)

  def guided(x, t):
    b, c = x.shape[0], x.shape[-1]
    t = jnp.broadcast_to(jnp.asarray(t), (b,))
    null = jnp.full_like(y, model.num_classes)
    out = model.apply({"params": params}, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                      jnp.concatenate([y, null]))
    cond, uncond = out[:b], out[b:]
    eps = uncond[..., :c] + guidance_scale * (cond[..., :c] - uncond[..., :c])
    return jnp.concatenate([eps, cond[..., c:]], axis=-1)
  return guided


def drop_labels(key, y, num_classes: int, rate: float):
  """Each label replaced by the null label (index num_classes) with probability `rate`: the
  unconditional model that classifier-free guidance needs, trained in the same network."""
  if rate <= 0:
    return y
  return jnp.where(jax.random.bernoulli(key, rate, y.shape), num_classes, y)


def build_model(config):
  """The network of `config.model`, its channels (the images' or, for latent diffusion, the
  latents') and variance output from data/latent/diffusion."""
  from diffusion_jax.latent import model_input_shape
  m = config.model
  return MODELS[m.name](
      ch=m.ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
      attn_resolutions=tuple(m.attn_resolutions), dropout=m.dropout,
      in_channels=model_input_shape(config)[1],
      learned_variance=config.diffusion.var_type in ("learned", "learned_range"),
      num_classes=m.num_classes, dtype=DTYPES[m.dtype], attention=m.attention, remat=m.remat,
      conv=m.get("conv", "auto"), upsample_conv=m.get("upsample_conv", "auto"))


def build_autoencoder(config):
  """The KL autoencoder of `config.autoencoder` (latent channels = embed_dim = z_channels), for
  `config.data`'s channels, with `config.model`'s compute options."""
  a, m = config.autoencoder, config.model
  return AutoencoderKL(
      ch=a.ch, ch_mult=tuple(a.ch_mult), num_res_blocks=a.num_res_blocks,
      attn_levels=tuple(a.attn_levels), in_channels=config.data.channels,
      out_channels=config.data.channels, z_channels=a.z_channels, embed_dim=a.z_channels,
      dropout=a.dropout, dtype=DTYPES[m.dtype], attention=m.attention, remat=m.remat,
      conv=m.get("conv", "auto"), upsample_conv=m.get("upsample_conv", "auto"))
