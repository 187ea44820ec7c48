"""Models, chosen by name from `config.model.name`."""
import jax.numpy as jnp

from diffusion_jax.models.autoencoder import AutoencoderKL
from diffusion_jax.models.layers import UPSAMPLE_CONV
from diffusion_jax.models.unet import UNet

MODELS = {"unet": UNet}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ATTENTION = ("auto", "xla", "cudnn")


def denoiser(model, params):
  """The network in inference mode as the diffusion sees it: denoise_fn(x_t, t)."""
  return lambda x, t: model.apply({"params": params}, x, t)


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
