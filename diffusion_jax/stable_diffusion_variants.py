"""The with_* methods of the Stable Diffusion pipeline (stable_diffusion.StableDiffusion): each
gives a new pipeline (LoRA, textual inversion, another scheduler config, clip skip, FreeU,
IP-Adapter) and leaves the one it was called on as it was."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import parallel, schedulers
from diffusion_jax.models.ip_adapter import with_ip_context

if TYPE_CHECKING:
  from diffusion_jax.stable_diffusion import StableDiffusion


class PipelineVariants:
  """Mixed into the StableDiffusion dataclass."""

  def with_lora(self, path: str, weight: float = 1.0) -> "StableDiffusion":
    """This pipeline with a LoRA file's changes merged into its U-Net and text encoder(s),
    times `weight` (lora.py: diffusers' and kohya's formats); this one is left as it was."""
    from diffusion_jax import lora
    from diffusion_jax.convert_clip import text_encoder_params
    from diffusion_jax.convert_diffusers import unet_params_from_diffusers
    from diffusion_jax.convert_ldm import unet_params_from_ldm
    layout = {"ch_mult": self.unet.ch_mult, "num_res_blocks": self.unet.num_res_blocks,
              "attn_levels": self.unet.attn_levels}
    converters = {"unet": lambda state: unet_params_from_diffusers(state, layout),
                  "unet_ldm": lambda state: unet_params_from_ldm(state, layout),
                  "text_encoder": text_encoder_params, "text_encoder_2": text_encoder_params}
    deltas = lora.lora_deltas(*lora.read_lora(path))
    return dataclasses.replace(self, params=lora.merged_params(self.params, deltas, converters,
                                                               weight))

  def with_textual_inversion(self, path: str, token: str | None = None) -> "StableDiffusion":
    """This pipeline with a textual inversion embedding's tokens added (textual_inversion.py:
    diffusers', A1111's and SDXL's files; `token`: its name where the file does not say it);
    this one is left as it was."""
    from diffusion_jax.textual_inversion import with_embedding
    return with_embedding(self, path, token)

  def with_schedule(self, **options) -> "StableDiffusion":
    """This pipeline with its scheduler config's options changed, as diffusers'
    pipe.scheduler = Scheduler.from_config(pipe.scheduler.config, **options), e.g.
    timestep_spacing="trailing", use_karras_sigmas=True, rescale_betas_zero_snr=True,
    _class_name="EulerDiscreteScheduler" (the default method)."""
    schedule = schedulers.scheduler_settings(dict(self.schedule["config"], **options))
    return dataclasses.replace(self, schedule=schedule,
                               diffusion=schedulers.make_diffusion(schedule))

  def with_clip_skip(self, layers: int) -> "StableDiffusion":
    """This pipeline with the prompts read `layers` layers before the usual text states
    (diffusers' clip_skip, A1111's "clip skip" minus 1; as diffusers, not the negative
    prompts')."""
    if layers < 0:
      raise ValueError(f"clip_skip={layers}: 0 or more layers")
    return dataclasses.replace(self, clip_skip=int(layers))

  def with_freeu(self, s1: float, s2: float, b1: float, b2: float) -> "StableDiffusion":
    """This pipeline with FreeU (models/freeu.py) in its U-Net, as diffusers'
    pipe.enable_freeu(s1, s2, b1, b2); with_freeu(0, 0, 0, 0) turns it off."""
    from diffusion_jax.models.freeu import check_freeu
    factors = check_freeu((s1, s2, b1, b2))
    return dataclasses.replace(self, unet=self.unet.clone(freeu=factors if all(factors) else ()))

  def with_pag(self, applied_layers="mid") -> "StableDiffusion":
    """This pipeline able to take perturbed-attention guidance (generate's pag_scale, e.g. 3) in
    the self-attentions that `applied_layers` choose (models/pag.py: diffusers'
    pag_applied_layers, regular expressions over its module names; "mid" by default, as its
    PAG pipelines)."""
    from diffusion_jax.models.pag import pag_layer_paths
    if self.controlnet:
      raise ValueError("perturbed-attention guidance with ControlNets is not supported")
    return dataclasses.replace(self, unet=self.unet.clone(
        pag_layers=pag_layer_paths(self.unet, applied_layers)))

  def with_ip_adapter(self, paths, image_encoder: str) -> "StableDiffusion":
    """This pipeline with IP-Adapters (models/ip_adapter.py), as diffusers'
    pipe.load_ip_adapter: `paths` the .safetensors weights of one or several (e.g. h94/
    IP-Adapter's models/ip-adapter_sd15.safetensors or ip-adapter-plus_sd15.safetensors; they
    replace any loaded before), `image_encoder` the CLIPVisionModelWithProjection directory
    they were trained with (models/image_encoder/; SDXL's: sdxl_models/image_encoder/). Image
    prompts then go to generate / img2img / inpaint as ip_adapter_image=."""
    from diffusion_jax.convert_clip import load_vision_encoder
    from diffusion_jax.convert_diffusers import ConversionError
    from diffusion_jax.convert_ip_adapter import ip_adapter_params, read_ip_adapter
    from diffusion_jax.models.clip_vision import CLIPVisionEncoder
    paths = [paths] if isinstance(paths, str) else list(paths)
    fields, encoder_params = load_vision_encoder(image_encoder)
    put = lambda tree: jax.device_put(tree, parallel.replicated(self.mesh))
    unet = dict(self.params["unet"])  # copies along each path: this pipeline keeps its own
    modules, projections = [], []
    for a, path in enumerate(paths):
      module, projection, layers = ip_adapter_params(read_ip_adapter(path), self.unet, a)
      hidden = module.reads_hidden_states  # Plus: the patch states; else the embedding
      reads = projection["proj_in" if hidden else "proj"]["kernel"].shape[0]
      gives = fields["width" if hidden else "projection_dim"]
      if reads != gives:
        raise ConversionError(f"{path}: the IP-Adapter reads {reads} image features; the "
                              f"image encoder gives {gives}: it was trained with another image "
                              "encoder")
      for attn_path, layer in layers.items():
        node = unet
        for name in attn_path:
          node[name] = dict(node[name])
          node = node[name]
        if a == 0:  # the adapters loaded before
          for name in [k for k in node if k.startswith(("k_ip_", "v_ip_"))]:
            del node[name]
        node.update(put(layer))
      modules.append(module)
      projections.append(put(projection))
    params = dict(self.params, unet=unet, image_encoder=put(encoder_params),
                  image_proj=tuple(projections))
    return dataclasses.replace(
        self, params=params, image_encoder=CLIPVisionEncoder(**fields, dtype=self.unet.dtype),
        image_projection=tuple(modules))

  def _ip_contexts(self, params, context, null, pixels, scale):
    """The contexts with the IP-Adapters' image tokens (pixels [B, A, S, S, 3], scale [B, A];
    the unconditional tokens, as diffusers': of a zero embedding; Plus: of zero pixels)."""
    encode = lambda x: self.image_encoder.apply({"params": params["image_encoder"]}, x)
    tokens, null_tokens = [], []
    for a, module in enumerate(self.image_projection):
      project = lambda e: module.apply({"params": params["image_proj"][a]}, e)
      if module.reads_hidden_states:
        states, null_states = encode(pixels[:, a])[1], encode(jnp.zeros_like(pixels[:, a]))[1]
      else:
        states = encode(pixels[:, a])[0]
        null_states = jnp.zeros_like(states)
      tokens.append(project(states))
      null_tokens.append(project(null_states))
    return with_ip_context(context, tokens, scale), with_ip_context(null, null_tokens, scale)

  def _ip_inputs(self, images, scale, n: int):
    """(normalised pixels [n, adapters, S, S, 3], scales [n, adapters]) of generate's
    ip_adapter_image (with several adapters a list, one entry each) and ip_adapter_scale (one,
    or one per adapter), or None."""
    if images is None:
      return None
    if self.image_encoder is None:
      raise ValueError("ip_adapter_image needs an IP-Adapter: pipe.with_ip_adapter(weights, "
                       "image_encoder_dir) (command line: --ip_adapter, --image_encoder)")
    count = len(self.image_projection)
    if count > 1 and (not isinstance(images, (list, tuple)) or len(images) != count):
      raise ValueError(f"{count} IP-Adapters: ip_adapter_image must be a list of {count} image "
                       "prompts, one for each")
    scales = np.asarray(scale, np.float32).reshape(-1)
    scales = np.repeat(scales, count) if scales.size == 1 else scales
    if scales.shape != (count,):
      raise ValueError(f"ip_adapter_scale {scale}: one, or one per adapter ({count})")
    each = images if count > 1 else [images]
    pixels = np.stack([self._ip_pixels(image, n) for image in each], axis=1)
    return pixels, np.tile(scales, (n, 1))

  def _ip_pixels(self, images, n: int):
    """One adapter's image prompt(s) as normalised pixels [n, S, S, 3]."""
    from diffusion_jax.models.clip_vision import preprocess
    size = self.image_encoder.image_size
    if isinstance(images, np.ndarray) and images.dtype == np.float32 and images.ndim == 4:
      pixels = images  # already CLIP-normalised, as diffusers takes a tensor
      if pixels.shape[1:] != (size, size, 3):
        raise ValueError(f"ip_adapter_image pixels [B, {size}, {size}, 3]; got {pixels.shape}")
    else:
      one = isinstance(images, np.ndarray) and images.ndim == 3
      pixels = preprocess([images] if one else list(images), size)
    if len(pixels) == 1:
      pixels = np.repeat(pixels, n, axis=0)
    if len(pixels) != n:
      raise ValueError(f"{len(pixels)} image prompts for {n} prompts: give one, or one each")
    return pixels
