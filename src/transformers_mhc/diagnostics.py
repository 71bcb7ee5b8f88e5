"""Diagnostics that users run on any checkpoint of ours during or after training.

- `signal_gain`: the mHC paper's "Amax gain magnitude" of the composite residual mixing.
- `decay_statistics`: per-layer distribution of the decay λ of a linear-attention model.
"""

from __future__ import annotations

import torch
from torch import nn

from .models.hyper_connection import HyperConnection


@torch.no_grad()
def signal_gain(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> dict:
    """The mHC paper's "Amax gain magnitude" of the residual mixing, for any model with hyper-connections.

    Runs one forward pass, collects every sub-layer's `h_res` (in order of depth) and forms the composite
    `P_l = h_res_l ⋯ h_res_1` per token. For each depth `l` the forward gain is the largest absolute row sum of
    `P_l` and the backward gain the largest absolute column sum, each averaged over the (unpadded) tokens.

    Returns:
        `{"forward": max_l forward gain, "backward": max_l backward gain,
          "per_layer": [{"forward": ..., "backward": ...}, ...] (one entry per sub-layer)}`.
        A plain residual (no hyper-connections) has gain 1 everywhere and an empty `per_layer`.
        For mHC, a doubly stochastic `h_res` has gain exactly 1; whatever Sinkhorn leaves of the column-sum error
        shows up here as a backward gain above 1.
    """
    hc_modules = [m for m in model.modules() if isinstance(m, HyperConnection)]
    captured: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: captured.append(out[2].float())) for m in hc_modules]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()

    batch, seq = input_ids.shape
    weights = torch.ones(batch, seq) if attention_mask is None else attention_mask.float().cpu()
    per_layer = []
    composite = None
    for h_res in captured:
        h_res = h_res.cpu().expand(batch, seq, *h_res.shape[-2:])
        composite = h_res if composite is None else h_res @ composite
        forward_gain = composite.abs().sum(dim=-1).amax(dim=-1)  # max absolute row sum, per token
        backward_gain = composite.abs().sum(dim=-2).amax(dim=-1)  # max absolute column sum, per token
        per_layer.append(
            {
                "forward": float((forward_gain * weights).sum() / weights.sum()),
                "backward": float((backward_gain * weights).sum() / weights.sum()),
            }
        )
    return {
        "forward": max((p["forward"] for p in per_layer), default=1.0),
        "backward": max((p["backward"] for p in per_layer), default=1.0),
        "per_layer": per_layer,
    }
