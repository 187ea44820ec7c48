"""The cross-attention context's extra entries. A U-Net's context is the text [B, L, d] or a
dict of it ("text") and entries the network reads elsewhere: SDXL's pooled text and size ids,
an LCM-distilled U-Net's "timestep_cond", IP-Adapter's "ip_tokens" / "ip_scale"
(models/ip_adapter.py), perturbed-attention guidance's "pag_mask" (models/pag.py). Each reader
takes its entries out; a dict left with "text" alone becomes that array."""
from __future__ import annotations


def split_context(context, keys) -> tuple:
  """(the context without `keys`, {key: value} of those, or None where it holds none)."""
  if not (isinstance(context, dict) and any(k in context for k in keys)):
    return context, None
  rest = {k: v for k, v in context.items() if k not in keys}
  taken = {k: context[k] for k in keys if k in context}
  return (rest["text"] if set(rest) == {"text"} else rest), taken


def add_to_context(context, **entries) -> dict:
  """The context (an array: its "text") as a dict with `entries` added."""
  base = dict(context) if isinstance(context, dict) else {"text": context}
  return dict(base, **entries)
