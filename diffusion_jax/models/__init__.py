"""Models, chosen by name from `config.model.name`."""
import jax
import jax.numpy as jnp

from diffusion_jax.models import attention
from diffusion_jax.models.autoencoder import AutoencoderKL
from diffusion_jax.models.dit import DiT
from diffusion_jax.models.layers import UPSAMPLE_CONV
from diffusion_jax.models.pag import with_pag_mask
from diffusion_jax.models.unet import UNet

MODELS = {"unet": UNet, "dit": DiT}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ATTENTION = attention.IMPLEMENTATIONS
# config.model keys of the LDM / Stable Diffusion layouts (UNet's docstring), with DDPM's values
LAYOUT = {"context_dim": 0, "transformer_depth": 1, "attn_levels": (), "num_heads": 1,
          "head_channels": 0, "norm_eps": 1e-6, "flip_sin_to_cos": False, "freq_shift": 1.0,
          "downsample_padding": "same"}


def denoiser(model, params, y=None, guidance_scale: float = 1.0, context=None,
             null_context=None, x_cond=None, guidance_rescale: float = 0.0,
             pag_scale: float = 0.0, pag_adaptive_scale: float = 0.0):
  """The network in inference mode as the diffusion sees it: denoise_fn(x_t, t).

  y: class labels [B] of a class-conditional model (None: its null label, unconditional).
  context: [B, L, d] for a U-Net that cross-attends to an outside context (a text encoder's
  output; SDXL's: a dict of such arrays, UNet's docstring); null_context: the unconditional one
  ([1 or B, L, d], e.g. the empty prompt's; the same structure).
  guidance_scale s != 1: classifier-free guidance (Ho & Salimans 2022, Eq. 6 with s = 1 + w),
  eps_u + s (eps_c - eps_u), the conditional and the unconditional pass as one batch; a learned
  variance is the conditional pass's. x_cond: channels [B, H, W, k] the network reads after
  x_t's (an inpainting U-Net's mask and masked image), the same in both passes.
  guidance_rescale phi > 0: the guided output rescaled towards the conditional one's standard
  deviation per example (Lin et al. 2024, Sec. 3.4: phi * out * std(cond) / std(out) +
  (1 - phi) * out), against the over-exposure of strong guidance.
  pag_scale > 0: perturbed-attention guidance (models/pag.py; the model's pag_layers perturbed
  in a third pass), + s_pag (eps_c - eps_ptb), s_pag = max(pag_scale - pag_adaptive_scale
  (1000 - t), 0) as diffusers'.
  """
  def apply(x, t, y, ctx, x_cond=x_cond):
    if x_cond is not None:
      x = jnp.concatenate([x, x_cond.astype(x.dtype)], axis=-1)
    return model.apply({"params": params}, x, t, y, context=ctx)
  cfg = not (y is None and context is None) and guidance_scale != 1.0
  if pag_scale:
    if context is None or (cfg and null_context is None):
      raise ValueError("perturbed-attention guidance needs a context (and with classifier-free "
                       "guidance null_context)")
  elif not cfg:
    return lambda x, t: apply(x, t, y, context)
  if context is not None and null_context is None:
    raise ValueError("guidance with a context needs null_context, the unconditional one "
                     "(e.g. the empty prompt's embedding)")

  def guided(x, t):
    b, c = x.shape[0], x.shape[-1]
    t = jnp.broadcast_to(jnp.asarray(t), (b,))
    joined = lambda *parts: None if parts[0] is None else jax.tree.map(  # SDXL's: a dict
        lambda a, *rest: jnp.concatenate([a] + [jnp.broadcast_to(r, a.shape).astype(a.dtype)
                                                for r in rest]), *parts)
    ys, contexts = [y, model.num_classes] if cfg else [y], [context, null_context][:1 + cfg]
    if pag_scale:  # the conditional pass again, its chosen self-attentions perturbed
      ys.append(y)
      contexts = [with_pag_mask(ctx, jnp.zeros(b)) for ctx in contexts] + [
          with_pag_mask(context, jnp.ones(b))]
    n = len(contexts)
    out = apply(jnp.concatenate([x] * n), jnp.concatenate([t] * n), joined(*ys),
                joined(*contexts), joined(*[x_cond] * n))
    cond = out[:b]
    eps = cond[..., :c]
    if cfg:
      eps = out[b:2 * b, ..., :c] + guidance_scale * (eps - out[b:2 * b, ..., :c])
    if pag_scale:
      s = pag_scale
      if pag_adaptive_scale:
        s = jnp.maximum(pag_scale - pag_adaptive_scale * (1000.0 - t), 0.0)[:, None, None, None]
      eps = eps + s * (cond[..., :c] - out[-b:, ..., :c])
    if guidance_rescale and cfg:
      axes = tuple(range(1, eps.ndim))
      ratio = jnp.std(cond[..., :c], axis=axes, keepdims=True) / jnp.std(eps, axis=axes,
                                                                          keepdims=True)
      eps = guidance_rescale * eps * ratio + (1.0 - guidance_rescale) * eps
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
  latents') and variance output from data/latent/diffusion; with text.encoder = "learned", the
  U-Net and its text transformer (models/text_unet.py)."""
  text = config.get("text", {})
  from diffusion_jax.text_conditioning import LEARNED, LearnedText
  if text.get("encoder") == LEARNED:
    from diffusion_jax.models.text_unet import text_conditioned_unet
    return text_conditioned_unet(_unet(config), text.layers, text.max_length,
                                 LearnedText.vocab_size)
  return _dit(config) if config.model.name == "dit" else _unet(config)


def _dit(config):
  from diffusion_jax.latent import model_input_shape
  m = config.model
  return DiT(patch_size=m.patch_size, hidden_size=m.hidden_size, depth=m.depth,
             num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, in_channels=model_input_shape(config)[1],
             learned_variance=config.diffusion.var_type in ("learned", "learned_range"),
             num_classes=m.num_classes, dropout=m.dropout, dtype=DTYPES[m.dtype],
             attention=m.attention, remat=m.remat, norm_eps=m.norm_eps, freq_shift=m.freq_shift)


def _unet(config):
  from diffusion_jax.latent import model_input_shape
  m = config.model
  return MODELS[m.name](
      ch=m.ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
      attn_resolutions=tuple(m.attn_resolutions), dropout=m.dropout,
      in_channels=model_input_shape(config)[1],
      learned_variance=config.diffusion.var_type in ("learned", "learned_range"),
      num_classes=m.num_classes, dtype=DTYPES[m.dtype], attention=m.attention, remat=m.remat,
      conv=m.get("conv", "auto"), upsample_conv=m.get("upsample_conv", "auto"),
      **{k: (tuple(v) if k == "attn_levels" else v) for k, v in m.items() if k in LAYOUT})


def build_autoencoder(config):
  """The KL (or VQ) autoencoder of `config.autoencoder` (latent channels = embed_dim =
  z_channels), for `config.data`'s channels, with `config.model`'s compute options."""
  a, m = config.autoencoder, config.model
  return AutoencoderKL(
      ch=a.ch, ch_mult=tuple(a.ch_mult), num_res_blocks=a.num_res_blocks,
      attn_levels=tuple(a.attn_levels), in_channels=config.data.channels,
      out_channels=config.data.channels, z_channels=a.z_channels, embed_dim=a.z_channels,
      dropout=a.dropout, dtype=DTYPES[m.dtype], attention=m.attention, remat=m.remat,
      conv=m.get("conv", "auto"), upsample_conv=m.get("upsample_conv", "auto"),
      codebook_size=a.get("codebook_size", 0))
