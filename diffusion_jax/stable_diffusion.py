"""A Stable Diffusion (1.x, 2.x, XL and its refiner; text-to-image, img2img, inpainting) pipeline
in JAX: CLIP text encoder(s), cross-attention U-Net and KL decoder converted from a diffusers
pipeline directory (or an SD 1.x/2.x/XL single file), the whole chain (text encoding, DDIM, Euler or
DPM-Solver++ with classifier-free guidance, decoding) one compiled program, the batch sharded
over the devices. stable_diffusion_loading.py reads and assembles it; text_to_image.py is its
command line.

Sampling follows the pipeline's scheduler_config.json (its betas, prediction, offsets, spacing
and class: DDIM, Euler, Euler ancestral or DPM-Solver++; schedulers.py). SDXL's conditioning:
sdxl.py (its invisible watermark is not applied). Tokenising needs the `transformers` package
(its CLIPTokenizer reads tokenizer/); nothing else of torch or transformers runs.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion as dm
from diffusion_jax import parallel, schedulers, sdxl, xla_options
from diffusion_jax.control import control_inputs, controlled_unet
from diffusion_jax.convert_clip import clip_token_ids
from diffusion_jax.images import binary_masks
from diffusion_jax.models.context import add_to_context
from diffusion_jax.stable_diffusion_variants import PipelineVariants


@dataclasses.dataclass
class StableDiffusion(PipelineVariants):
  """The converted pipeline; `generate(prompts)` -> uint8 images [B, H, W, 3]; its with_*
  methods (stable_diffusion_variants.py) give it with LoRA, textual inversion, another
  schedule, clip skip or FreeU."""
  tokenizer: Any
  text_encoder: Any
  unet: Any
  first_stage: Any  # latent.FirstStage: the KL decoder and the latent scaling
  diffusion: dm.GaussianDiffusion
  schedule: dict
  params: dict  # {"text": ..., ["text_2": ...,] "unet": ...} (the decoder's: first_stage's)
  mesh: Any
  sample_size: int  # the U-Net's native latent size
  tokenizer_2: Any = None  # SDXL's second tokenizer and text encoder (OpenCLIP bigG)
  text_encoder_2: Any = None
  zero_negative: bool = False  # SDXL: no negative prompt -> zeros (force_zeros_for_empty_prompt)
  controlnet: Any = None  # ControlNets, a tuple (their parameters: params["controlnet"])
  aesthetic: bool = False  # the SDXL refiner: size ids end with an aesthetic score
  clip_skip: int = 0  # the prompts' text states this many layers earlier (with_clip_skip)
  image_encoder: Any = None  # IP-Adapters' CLIP image encoder and projections, a tuple
  image_projection: Any = None  # (with_ip_adapter; params["image_encoder"], ["image_proj"])

  def __post_init__(self):
    self._run = xla_options.jit(self._chain, static_argnames=(
        "num_steps", "guidance", "method", "eta", "decode", "span", "zero_null", "control"),
        out_shardings=parallel.batch_sharding(self.mesh))

  @classmethod
  def load(cls, src: str, dtype: str = "float32", mesh=None, tokenizer=None,
           attention: str = "auto", controlnet=None) -> "StableDiffusion":
    """A local diffusers pipeline directory (stable_diffusion_loading.load_pipeline)."""
    from diffusion_jax.stable_diffusion_loading import load_pipeline
    return load_pipeline(src, dtype, mesh, tokenizer, attention, controlnet)

  @classmethod
  def load_single_file(cls, path: str, tokenizer, prediction_type: str | None = None,
                       dtype: str = "float32", mesh=None, heads: dict | None = None,
                       text_heads: int | None = None, ema: bool = False,
                       tokenizer_2=None, zero_snr: bool | None = None) -> "StableDiffusion":
    """An SD 1.x/2.x/XL single-file checkpoint (stable_diffusion_loading.load_single_file)."""
    from diffusion_jax.stable_diffusion_loading import load_single_file
    return load_single_file(path, tokenizer, prediction_type, dtype, mesh, heads, text_heads,
                            ema, tokenizer_2, zero_snr)

  def tokenize(self, prompts: list[str]) -> np.ndarray:
    """Token ids [B, 77], padded as the pipeline pads them (to the encoder's positions); SDXL's:
    [B, 2, 77], each tokenizer's (the refiner's [B, 1, 77]). A multi-vector embedding's token
    stands for all its tokens."""
    from diffusion_jax.textual_inversion import expand_prompt
    ids = lambda tok, enc: clip_token_ids(tok, [expand_prompt(p, tok) for p in prompts],
                                          enc.max_length)
    if self.text_encoder_2 is None:
      return ids(self.tokenizer, self.text_encoder)
    encoders = [(self.tokenizer, self.text_encoder)] if self.text_encoder else []
    return np.stack([ids(*pair) for pair in encoders + [(self.tokenizer_2,
                                                          self.text_encoder_2)]], axis=1)

  def _encode(self, params, ids, time_ids, zero: bool = False, skip: int = 0):
    """The U-Net's context of token ids (SDXL's: a dict with the pooled text and size ids);
    skip: clip_skip's layers."""
    if self.text_encoder_2 is None:
      return self.text_encoder.apply({"params": params["text"]}, ids, skip=skip)
    return sdxl.prompt_context(self.text_encoder, self.text_encoder_2, params.get("text"),
                               params["text_2"], ids, time_ids, zero, skip)

  def latent_shape(self, num_images: int, height: int | None, width: int | None):
    f = self.first_stage.model.downsampling_factor
    levels = 2 ** (len(self.unet.ch_mult) - 1)
    height, width = height or self.sample_size * f, width or self.sample_size * f
    if height % (f * levels) or width % (f * levels):
      raise ValueError(f"height and width must be multiples of {f * levels} (the decoder's "
                       f"x{f} and the U-Net's {levels}x down-sampling); got {height}x{width}")
    return (num_images, height // f, width // f, self.first_stage.model.embed_dim)

  @property
  def inpainting(self) -> bool:
    """An inpainting U-Net (SD's 9 input channels): it runs through inpaint()."""
    return self.unet.in_channels != self.first_stage.model.embed_dim

  def _chain(self, params, vae_params, scaling, ids, null_ids, time_ids, null_time_ids, x_T,
             key, init, inpaint, hint, ip, *, num_steps, guidance, method, eta, decode, span,
             zero_null, control):
    """Text encodings, the sampler, the decoder; span = (skip, stop, add_noise, strength): the
    chain's steps [skip, stop) run (schedulers.span; strength: LCM's); with `init` (img2img:
    clean latents, or images [B, H, W, 3] in [-1, 1] to encode; add_noise False: latents at the
    skip-th level already) x_T is the noise that takes them to the first step run. time_ids,
    null_time_ids: SDXL's size ids [B, k] of the prompts and of the negative prompts (else
    unused);
    zero_null: the unconditional context zeros (SDXL's default); inpaint: (mask [B, h, w, 1],
    masked images [B, H, W, 3] to encode, or their latents), the inpainting U-Net's inputs (a
    plain U-Net's: the whole images, the known region); ip: IP-Adapter's (image prompts'
    normalised pixels, scales [B])."""
    from diffusion_jax.models import denoiser
    context = self._encode(params, ids, time_ids, skip=self.clip_skip)
    null = self._encode(params, null_ids, null_time_ids, zero_null)
    if ip is not None:
      context, null = self._ip_contexts(params, context, null, *ip)
    if self.unet.time_cond_dim:  # LCM-distilled: the guidance scale embedded, no guidance
      from diffusion_jax.models.layers import timestep_embedding
      w = jnp.full((x_T.shape[0],), (guidance[0] - 1.0) * 1000.0)
      cond = timestep_embedding(w, self.unet.time_cond_dim)  # diffusers' guidance embedding
      context = add_to_context(context, timestep_cond=cond)
      guidance = (1.0,) + tuple(guidance[1:])
    x_cond = known = None
    if inpaint is not None:
      mask, masked = inpaint
      if masked.shape[1] != x_T.shape[1]:  # images: a posterior sample, as diffusers'
        masked = self.first_stage.encode_latents(vae_params, *scaling, masked,
                                                 jax.random.fold_in(key, 3))
      if self.inpainting:
        x_cond = jnp.concatenate([mask, masked], axis=-1)
      else:  # a plain U-Net: the known region put back after each step
        known = schedulers.known_region(self.schedule, self.diffusion, method, num_steps,
                                        mask, masked, x_T, span[1], span[3])
        init = None if init is None else masked
    model, model_params = self.unet, params["unet"]
    if hint is not None:  # the ControlNets' residuals (control.py)
      model = controlled_unet(self.unet, self.controlnet, control, schedulers.network_timesteps(
          self.schedule, self.diffusion, method, num_steps, *span[:2], span[3]))
      model_params = {"unet": params["unet"], **{
          f"controlnets_{i}": p for i, p in enumerate(params["controlnet"])}}
      on = {"cond": jnp.ones(x_T.shape[0])} if control.guess_mode else {}
      context = {"context": context, "hints": hint, **on}
      null = {"context": null, "hints": hint, **{k: v * 0 for k, v in on.items()}}
    # diffusers' pipelines guide only above 1 (SDXL-Turbo's 0: the prompts' prediction alone)
    denoise = denoiser(model, model_params, guidance_scale=max(guidance[0], 1.0),
                       context=context, guidance_rescale=guidance[1], null_context=null,
                       x_cond=x_cond, pag_scale=guidance[2], pag_adaptive_scale=guidance[3])
    if init is not None:
      if init.shape[1] != x_T.shape[1]:  # images: the posterior sampled, as diffusers does
        init = self.first_stage.encode_latents(vae_params, *scaling, init,
                                               jax.random.fold_in(key, 2))
      x_T = schedulers.start_latents(self.schedule, self.diffusion, method, init, x_T,
                                     num_steps, span[0], span[2], span[3])
    z = schedulers.run_chain(self.schedule, self.diffusion, method, denoise, x_T, key,
                             num_steps, eta, *span[:2], callback=known, strength=span[3])
    z = z.astype(jnp.float32)
    return self.first_stage.decode_latents(vae_params, *scaling, z) if decode else z

  def default_method(self, eta: float = 0.0) -> str:
    """The sampler of the pipeline's scheduler class (schedulers.default_method)."""
    return schedulers.default_method(self.schedule, eta)

  def generate(self, prompts, negative_prompt: str | None = None, num_steps: int = 50,
               guidance_scale: float = 7.5, seed: int = 0, height: int | None = None,
               width: int | None = None, method: str | None = None, eta: float = 0.0,
               latents=None, decode: bool = True, control_image=None,
               control_scale: float = 1.0, control_guidance=(0.0, 1.0), guess_mode: bool = False,
               guidance_rescale: float = 0.0, denoising_end: float | None = None,
               ip_adapter_image=None, ip_adapter_scale: float = 1.0, pag_scale: float = 0.0,
               pag_adaptive_scale: float = 0.0, **sizes):
    """Images (uint8 [B, H, W, 3]) for `prompts`; latents: x_T [B, h, w, 4] to start from
    (else drawn from `seed`); decode=False: the final latents [B, h, w, 4] as the U-Net sees
    them (float32; diffusers' output_type="latent") instead of images. negative_prompt: one for
    all prompts or one each; None: the empty prompt (SDXL: zeros, where the pipeline says so).
    method None: default_method(). sizes: SDXL's size conditioning (sdxl.SIZE_OPTIONS:
    original_size, crops_coords_top_left, target_size, their negative_* counterparts; default:
    the output's size, no crop; sdxl.time_ids). control_image:
    a ControlNet pipeline's hint, uint8 [B or 1, H, W, 3] at the output's size (its residuals
    times control_scale; with several ControlNets a list of hints, and of scales or one);
    control_guidance: diffusers' (control_guidance_start, _end), guess_mode (control.py).
    guidance_rescale: models.denoiser's (diffusers'; e.g. 0.7). ip_adapter_image: with an
    IP-Adapter (with_ip_adapter), the image prompt, uint8 [H, W, 3] or one per prompt (or
    CLIP-normalised pixels [B or 1, S, S, 3], float32), its tokens weighed by ip_adapter_scale;
    with several adapters a list of those, and of scales (or one). pag_scale,
    pag_adaptive_scale: perturbed-attention guidance of the layers with_pag chose (diffusers'
    PAG pipelines; e.g. 3.0).
    denoising_end f (with decode=False): stop at timestep round(T (1 - f)), the
    latents (in diffusers' scale) for a refiner's img2img(latents=, denoising_start=f)."""
    if self.aesthetic:
      raise ValueError("an SDXL refiner refines latents or images: use img2img (e.g. "
                       "strength=0.3, or the base's latents with denoising_start)")
    method = schedulers.resolve_method(self.schedule, method, eta)
    if denoising_end is not None and decode:
      raise ValueError("denoising_end leaves noisy latents for a refiner: pass decode=False")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    shape = self.latent_shape(len(prompts), height, width)
    span = schedulers.span(self.schedule, self.diffusion, method, num_steps,
                           denoising_end=denoising_end)
    return self._run_batch(prompts, negative_prompt, shape, latents, None, seed, num_steps,
                           (guidance_scale, guidance_rescale, pag_scale, pag_adaptive_scale),
                           method, eta, decode, span + (True, 1.0), sizes, control=self._control(
                               control_image, control_scale, control_guidance, guess_mode,
                               shape), ip=self._ip_inputs(ip_adapter_image, ip_adapter_scale,
                                                          len(prompts)))

  def _control(self, image, scale, guidance, guess_mode, shape, inpaint: bool = False):
    if scale is None:  # diffusers' ControlNet inpainting pipelines' defaults
      scale = 1.0 if self.text_encoder_2 is not None or not inpaint else 0.5
    return control_inputs(self.controlnet, image, scale, guidance, guess_mode, shape,
                          self.first_stage.model.downsampling_factor)

  def img2img(self, prompts, images=None, latents=None, strength: float = 0.8,
              negative_prompt: str | None = None, num_steps: int = 50,
              guidance_scale: float = 7.5, seed: int = 0, eta: float = 0.0, noise=None,
              decode: bool = True, control_image=None, control_scale: float | None = None,
              control_guidance=(0.0, 1.0), guess_mode: bool = False,
              guidance_rescale: float = 0.0, method: str | None = None,
              denoising_start: float | None = None, ip_adapter_image=None,
              ip_adapter_scale: float = 1.0, pag_scale: float = 0.0,
              pag_adaptive_scale: float = 0.0, **sizes):
    """SDEdit (Meng et al. 2022) as diffusers' StableDiffusion(XL)Img2ImgPipeline: the inputs'
    latents noised to the int(num_steps * strength)-th last step's level, then those steps
    (by default with the scheduler's sampler, as diffusers' set_begin_index). images: uint8
    [B, H, W, 3] (encoded: a posterior sample); or latents [B, h, w, 4], already scaled; noise:
    that of the noising (else drawn from `seed`). denoising_start f (SDXL's ensemble of
    experts): `latents` are a base's generate(..., denoising_end=f, decode=False), run on from
    timestep round(T (1 - f)) without noising (strength ignored). control_image,
    control_scale, control_guidance (of the steps that run), guess_mode: generate's (diffusers'
    StableDiffusion(XL)ControlNetImg2ImgPipeline, whose default scale, 0.8, is None's);
    guidance_rescale, ip_adapter_image, ip_adapter_scale, pag_*: generate's. sizes: SDXL's
    (generate's, as its img2img pipeline takes them; the refiner's: aesthetic_score 6 and
    negative_aesthetic_score 2.5 by default, of the prompts and the negative prompts)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    shape, init = self._inputs(prompts, images, latents)
    method = schedulers.resolve_method(self.schedule, method, eta)
    return self._run_batch(prompts, negative_prompt, shape, noise, init, seed, num_steps,
                           (guidance_scale, guidance_rescale, pag_scale, pag_adaptive_scale),
                           method, eta, decode,
                           self._span(method, num_steps, strength, denoising_start), sizes,
                           img2img=True,
                           control=self._control(control_image, 0.8 if control_scale is None
                                                 else control_scale, control_guidance,
                                                 guess_mode, shape),
                           ip=self._ip_inputs(ip_adapter_image, ip_adapter_scale, len(prompts)))

  def inpaint(self, prompts, images, masks, masked_image_latents=None, strength: float = 1.0,
              negative_prompt: str | None = None, num_steps: int = 50,
              guidance_scale: float = 7.5, seed: int = 0, method: str | None = None,
              eta: float = 0.0, latents=None, decode: bool = True,
              guidance_rescale: float = 0.0, control_image=None,
              control_scale: float | None = None, control_guidance=(0.0, 1.0),
              guess_mode: bool = False, ip_adapter_image=None, ip_adapter_scale: float = 1.0,
              pag_scale: float = 0.0, pag_adaptive_scale: float = 0.0, **sizes):
    """Repaint the images where `masks` are set, as diffusers' StableDiffusion(XL)InpaintPipeline:
    an inpainting U-Net reads x_t, the mask at latent size (every f-th pixel, torch's nearest)
    and the masked image's latents (images where the mask is off, encoded: a posterior sample;
    or masked_image_latents [B, h, w, 4], already scaled); with a plain U-Net the images'
    latents (or masked_image_latents: those) noised to each step's level replace the latents
    outside the mask after each step (schedulers.known_region; clean after the last).
    images: uint8 [B, H, W, 3]; masks [B, H, W] (or [..., 1]), set where >= 0.5 (floats) or
    >= 128 (uint8: white). strength 1: from noise (latents: x_T, else drawn from `seed`);
    below 1: from the images' latents noised as in img2img (latents: that noise).
    control_image, control_scale, control_guidance, guess_mode: img2img's (diffusers'
    StableDiffusion(XL)ControlNetInpaintPipeline: None is its default scale, 0.5 (SDXL: 1));
    ip_adapter_image, ip_adapter_scale, pag_*: generate's; sizes: SDXL's, as img2img's."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    shape, init = self._inputs(prompts, images, None)
    keep = ~binary_masks(masks, init.shape[:3])
    f = self.first_stage.model.downsampling_factor
    mask = (~keep[:, ::f, ::f, None]).astype(np.float32)  # torch's nearest, to latent size
    if not self.inpainting:  # the known image whole (its latents put back after each step)
      masked = init if masked_image_latents is None else masked_image_latents
      masked = np.asarray(masked, np.float32)
    elif masked_image_latents is None:
      masked = init * keep[..., None]
    else:
      masked = np.asarray(masked_image_latents, np.float32)
      if masked.shape != shape:
        raise ValueError(f"masked_image_latents of shape {masked.shape}; expected {shape}")
    method = schedulers.resolve_method(self.schedule, method, eta)
    init = None if strength == 1.0 else init
    span = self._span(method, num_steps, strength)
    return self._run_batch(prompts, negative_prompt, shape, latents, init, seed, num_steps,
                           (guidance_scale, guidance_rescale, pag_scale, pag_adaptive_scale),
                           method, eta, decode, span, sizes, img2img=True,
                           inpaint=(mask, masked),
                           control=self._control(control_image, control_scale, control_guidance,
                                                 guess_mode, shape, inpaint=True),
                           ip=self._ip_inputs(ip_adapter_image, ip_adapter_scale, len(prompts)))

  def _span(self, method, num_steps, strength, denoising_start=None) -> tuple:
    """(skip, stop, add_noise, LCM's strength) of img2img / inpaint (schedulers.span): LCM's
    strength as LatentConsistencyModelImg2ImgPipeline takes it for an LCM-distilled U-Net (all
    steps, over fewer timesteps), else (LCM-LoRA) as StableDiffusionImg2ImgPipeline (skipped
    steps)."""
    truncate = method == "lcm" and bool(self.unet.time_cond_dim)
    skip, stop = schedulers.span(self.schedule, self.diffusion, method, num_steps, strength,
                                 denoising_start, lcm_strength=truncate)
    return skip, stop, denoising_start is None, strength if truncate else 1.0

  def _inputs(self, prompts, images, latents):
    """(latent shape, images in [-1, 1] or latents) of img2img's and inpaint's inputs."""
    if (images is None) == (latents is None):
      raise ValueError("give either images or latents")
    f = self.first_stage.model.downsampling_factor
    if images is not None:
      images = np.asarray(images)
      if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images: uint8 [B, H, W, 3]; got {images.dtype} {images.shape}")
      shape = self.latent_shape(len(prompts), images.shape[1], images.shape[2])
      init = images.astype(np.float32) / 127.5 - 1.0
    else:
      init = np.asarray(latents, np.float32)
      if init.ndim != 4:
        raise ValueError(f"latents: [B, h, w, C]; got {init.shape}")
      shape = self.latent_shape(len(prompts), init.shape[1] * f, init.shape[2] * f)
      if init.shape != shape:
        raise ValueError(f"latents of shape {init.shape}; expected {shape}")
    if len(init) != len(prompts):
      raise ValueError(f"{len(init)} inputs for {len(prompts)} prompts")
    return shape, init

  def _run_batch(self, prompts, negative_prompt, shape, x_T, init, seed, num_steps,
                 guidance, method, eta, decode, span, sizes: dict, img2img: bool = False,
                 inpaint=None, control=(None, None), ip=None):
    n = len(prompts)
    hint, control = control
    if self.inpainting and inpaint is None:
      raise ValueError("this pipeline's U-Net is an inpainting one (latents, mask and masked "
                       "image as inputs): use inpaint(prompts, images, masks) (command line: "
                       "--init_image and --mask_image)")
    if guidance[2] and not self.unet.pag_layers:
      raise ValueError("pag_scale needs the layers to perturb: pipe.with_pag('mid') (command "
                       "line: --pag_layers)")
    zero_null = negative_prompt is None and self.zero_negative
    f = self.first_stage.model.downsampling_factor
    sdxl.check_size_options(sizes)
    if sizes and self.text_encoder_2 is None:
      raise ValueError(f"{sorted(sizes)}: size conditioning is SDXL's")
    time_ids, null_time_ids = (np.tile(ids, (n, 1)) for ids in sdxl.time_ids(
        shape[1] * f, shape[2] * f, sizes, img2img, self.aesthetic))
    negatives = [negative_prompt or ""] if negative_prompt is None or isinstance(
        negative_prompt, str) else list(negative_prompt)
    if len(negatives) == 1:
      negatives *= n
    if len(negatives) != n:
      raise ValueError(f"{len(negatives)} negative prompts for {n} prompts: give one, or one "
                       "each")
    key = jax.random.PRNGKey(seed)
    if x_T is None:
      x_T = jax.random.normal(jax.random.fold_in(key, 1), shape)
    elif tuple(x_T.shape) != tuple(shape):
      raise ValueError(f"latents or noise of shape {tuple(x_T.shape)}; expected {shape}")
    # the batch padded to a multiple of the devices (the padding's images are dropped)
    n_dev = self.mesh.shape[parallel.DATA]
    batch = parallel.batch_sharding(self.mesh)
    put = lambda a: jax.device_put(parallel.pad_to_multiple(np.asarray(a), n_dev), batch)
    scaling = tuple(jnp.float32(v) for v in self.first_stage.scaling())
    out = self._run(self.params, self.first_stage.params, scaling, put(self.tokenize(prompts)),
                    put(self.tokenize(negatives)), put(time_ids), put(null_time_ids), put(x_T),
                    key, None if init is None else put(init),
                    None if inpaint is None else tuple(put(a) for a in inpaint),
                    None if hint is None else tuple(put(h) for h in hint),
                    None if ip is None else tuple(put(a) for a in ip), control=control,
                    num_steps=num_steps,
                    guidance=tuple(map(float, guidance)), method=method, eta=float(eta),
                    decode=decode, span=span, zero_null=zero_null)[:n]
    if not decode:
      return np.asarray(out)
    return np.asarray(jnp.round((jnp.clip(out, -1, 1) + 1) * 127.5).astype(jnp.uint8))
