"""Models, chosen by name from `config.model.name`."""
from diffusion_jax.models.unet import UNet

MODELS = {"unet": UNet}
