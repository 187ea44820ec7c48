"""ControlNet (Zhang, Rao & Agrawala 2023): a trainable copy of the U-Net's down path and middle
block that reads a conditioning image (edges, depth, pose, ...) and adds its features, through
zero-initialised 1x1 convolutions, to the frozen U-Net's skip connections and middle output.

  ControlNet(x_t, t, context, hint) -> ([one residual per skip], middle residual), each
  times `scale`; the hint [B, H, W, 3] in [0, 1] at image size, brought to the latents' by a
  small convolutional encoder (stride-2 convs, SiLU; its last conv zero-initialised) and
  added after conv_in.
  ControlledUNet: the U-Net with those residuals, summed over one or more ControlNets, each
  with its hint and scale, the steps it acts in and guess mode (diffusers'
  StableDiffusionControlNetPipeline and MultiControlNetModel; control.py).

Parameter names are the U-Net's for the copied blocks (conv_in, temb_dense_*, down_*, mid_*)
plus control_embed_* (the hint's encoder), control_zero_* (one per skip) and control_mid;
convert_diffusers maps diffusers' ControlNetModel onto them.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.ip_adapter import split_ip_context
from diffusion_jax.models.layers import default_init, zero_init
from diffusion_jax.models.unet import UNet


class ControlNet(UNet):
  """UNet's fields (the copied layout) and the hint encoder's channels."""
  embedding_channels: Sequence[int] = (16, 32, 96, 256)

  @nn.compact
  def __call__(self, x, t, y=None, train: bool = False, context=None, hint=None,
               scale: float = 1.0):
    if hint is None or hint.ndim != 4:
      raise ValueError(f"a ControlNet needs its hint image [B, H, W, C]; got "
                       f"{None if hint is None else hint.shape}")
    temb, context = self._embeddings(x, t, y, context)
    h, hs = self._down_and_middle(x, temb, context, train, self._hint_embedding(hint, x))
    zero_conv = lambda a, name: nn.Conv(a.shape[-1], (1, 1), kernel_init=zero_init,
                                        dtype=self.dtype, name=name)(a) * scale
    return ([zero_conv(s, f"control_zero_{k}") for k, s in enumerate(hs)],
            zero_conv(h, "control_mid"))

  def _hint_embedding(self, hint, x):
    """The hint at the latents' size and conv_in's width (diffusers'
    ControlNetConditioningEmbedding: conv, then per step a conv and a stride-2 conv, SiLU after
    each; a zero-initialised conv out)."""
    chans = list(self.embedding_channels)
    f = 2 ** (len(chans) - 1)
    if hint.shape[1] != x.shape[1] * f or hint.shape[2] != x.shape[2] * f:
      raise ValueError(f"the hint is {hint.shape[1]}x{hint.shape[2]}; this ControlNet reads "
                       f"{x.shape[1] * f}x{x.shape[2] * f} for {x.shape[1]}x{x.shape[2]} latents")
    pad = ((1, 1), (1, 1))  # torch's padding=1, also at stride 2
    c = lambda n, name, stride=1, init=default_init: nn.Conv(
        n, (3, 3), strides=(stride, stride), padding=pad, kernel_init=init, dtype=self.dtype,
        name=name)
    h = nn.silu(c(chans[0], "control_embed_in")(hint.astype(self.dtype)))
    for i in range(len(chans) - 1):
      h = nn.silu(c(chans[i], f"control_embed_{2 * i}")(h))
      h = nn.silu(c(chans[i + 1], f"control_embed_{2 * i + 1}", 2)(h))
    return c(self.ch, "control_embed_out", init=zero_init)(h)


class ControlledUNet(nn.Module):
  """The U-Net guided by ControlNets: params {"unet", "controlnets_0", ...}; context
  {"context": the U-Net's context, "hints": one [B, H, W, 3] per ControlNet} (so that
  guidance's doubled batch carries the hints in both halves; with guess_mode also "cond": [B],
  1 for the prompts' half, 0 for the negative prompts', which gets no residuals). scales: one
  per ControlNet; timesteps, keep: the chain's timesteps in order and, per ControlNet, 1 or 0
  at each (control_guidance_start / _end; empty: always on); guess_mode: residuals scaled by
  10^-1 ... 10^0 from the first skip to the middle block, as diffusers'. The ControlNets read
  the latents alone (an inpainting U-Net's mask and masked image after them are the U-Net's),
  as diffusers' inpainting ControlNet pipelines."""
  unet: UNet
  controlnets: Sequence[ControlNet]
  scales: Sequence[float] = ()
  guess_mode: bool = False
  timesteps: Sequence[float] = ()
  keep: Sequence[Sequence[float]] = ()

  @property
  def num_classes(self) -> int:
    return self.unet.num_classes

  def __call__(self, x, t, y=None, train: bool = False, context: Any = None):
    inner, hints = context["context"], context["hints"]
    t_b = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
    step = None
    if self.timesteps:  # the step each example is at: the nearest of the chain's timesteps
      step = jnp.argmin(jnp.abs(jnp.asarray(self.timesteps, jnp.float32)[None]
                                - t_b[:, None]), axis=1)
    residuals = None
    for k, (net, hint, scale) in enumerate(zip(self.controlnets, hints, self.scales,
                                               strict=True)):
      # (the latents; the text alone, as diffusers' pipelines give it with an IP-Adapter)
      down, mid = net(x[..., :net.in_channels], t, y, train, split_ip_context(inner)[0], hint)
      w = jnp.full((x.shape[0],), scale, jnp.float32)
      if step is not None:
        w = w * jnp.asarray(self.keep[k], jnp.float32)[step]
      if self.guess_mode:
        w = w * context["cond"].astype(jnp.float32)
      levels = (jnp.logspace(-1.0, 0.0, len(down) + 1) if self.guess_mode
                else jnp.ones(len(down) + 1))
      weigh = lambda a, level: a * (w * level)[:, None, None, None].astype(a.dtype)
      r = ([weigh(a, levels[i]) for i, a in enumerate(down)], weigh(mid, levels[-1]))
      residuals = r if residuals is None else jax.tree.map(jnp.add, residuals, r)
    return self.unet(x, t, y, train, inner, residuals)
