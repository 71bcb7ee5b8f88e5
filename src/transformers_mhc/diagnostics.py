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
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: captured.append(out[1].h_res.float())) for m in hc_modules
    ]
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


def _quantile(sorted_values: torch.Tensor, q: float) -> float:
    """Linear-interpolated quantile of a sorted 1-D tensor (no size limit, unlike `torch.quantile`)."""
    position = q * (sorted_values.numel() - 1)
    low = int(position)
    high = min(low + 1, sorted_values.numel() - 1)
    return float(sorted_values[low] + (position - low) * (sorted_values[high] - sorted_values[low]))


@torch.no_grad()
def decay_statistics(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> dict:
    """Distribution of the decay λ of every linear-attention layer, for any `DecayLinearAttn*` checkpoint.

    Runs one forward pass with forward hooks on the decay modules (`DecayLinearAttnDecay`, matched by class name so
    checkpoints loaded with `trust_remote_code` work too) and collects `λ = exp(log λ)` over every unpadded token,
    head and (for vector decay) key channel; for a diagonal SSM (`token_mixer="h3"` / `"s4d"`), `|ā|` of every mode
    and channel (it does not depend on the input). The decay paper finds that the median λ should sit around 0.8.

    Returns:
        `{"per_layer": {layer_idx: stats}, "overall": stats}` where `stats` is
        `{"median", "q1", "q3", "mean", "min", "max"}` (q1 / q3: the 25% / 75% quantiles) as floats.
    """
    decay_modules = [m for m in model.modules() if type(m).__name__ == "DecayLinearAttnDecay"]
    ssm_modules = [m for m in model.modules() if type(m).__name__ == "DiagonalSSM"]
    if not decay_modules and not ssm_modules:
        raise ValueError(
            f"{type(model).__name__} has no `DecayLinearAttnDecay` or `DiagonalSSM` module: not a decay "
            "linear-attention model."
        )
    # A diagonal SSM (H3, S4D) decays by |ā| per mode and channel, whatever the input.
    captured: dict[int, torch.Tensor] = {
        m.layer_idx: m.modes()[0].abs().reshape(-1).cpu() for m in ssm_modules
    }

    def hook(module, _inputs, outputs):
        log_decay = outputs[0].float()  # [B, T, heads] or [B, T, heads * head_dim]
        if attention_mask is not None:
            keep = attention_mask.to(log_decay.device).bool()[:, -log_decay.shape[1] :]
            log_decay = log_decay[keep]
        captured[module.layer_idx] = log_decay.reshape(-1).exp().cpu()

    hooks = [m.register_forward_hook(hook) for m in decay_modules]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for handle in hooks:
            handle.remove()

    def stats(values: torch.Tensor) -> dict:
        values = values.double().sort().values
        return {
            "median": _quantile(values, 0.5),
            "q1": _quantile(values, 0.25),
            "q3": _quantile(values, 0.75),
            "mean": float(values.mean()),
            "min": float(values[0]),
            "max": float(values[-1]),
        }

    per_layer = {layer_idx: stats(captured[layer_idx]) for layer_idx in sorted(captured)}
    overall = stats(torch.cat([captured[i] for i in sorted(captured)]))
    return {"per_layer": per_layer, "overall": overall}
