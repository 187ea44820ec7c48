"""Models, chosen by name from `config.model.name`."""
import jax.numpy as jnp

from diffusion_jax.models.layers import UPSAMPLE_CONV
from diffusion_jax.models.unet import UNet

MODELS = {"unet": UNet}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ATTENTION = ("auto", "xla", "cudnn")


def denoiser(model, params):
  """The network in inference mode as the diffusion sees it: denoise_fn(x_t, t)."""
  return lambda x, t: model.apply({"params": params}, x, t)


def build_model(config):
  """The network of `config.model`, its channels and variance output from data/diffusion."""
  m = config.model
  return MODELS[m.name](
      ch=m.ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
      attn_resolutions=tuple(m.attn_resolutions), dropout=m.dropout,
      in_channels=config.data.channels,
      learned_variance=config.diffusion.var_type in ("learned", "learned_range"),
      num_classes=m.num_classes, dtype=DTYPES[m.dtype], attention=m.attention, remat=m.remat,
      conv=m.get("conv", "auto"), upsample_conv=m.get("upsample_conv", "auto"))
