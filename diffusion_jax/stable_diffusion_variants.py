"""The with_* methods of the Stable Diffusion pipeline (stable_diffusion.StableDiffusion): each
gives a new pipeline (LoRA, textual inversion, another scheduler config, clip skip, FreeU) and
leaves the one it was called on as it was."""
from __future__ import annotations

import dataclasses

from diffusion_jax import schedulers


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

  def with_freeu(self, s1: float, s2: float, b1: float, b2: float):
    """This pipeline with FreeU (models/freeu.py) in its U-Net, as diffusers'
    pipe.enable_freeu(s1, s2, b1, b2); with_freeu(0, 0, 0, 0) turns it off."""
    from diffusion_jax.models.freeu import check_freeu
    factors = check_freeu((s1, s2, b1, b2))
    return dataclasses.replace(self, unet=self.unet.clone(freeu=factors if all(factors) else ()))
