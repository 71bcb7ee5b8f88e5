# Copyright 2026 The transformers-mhc contributors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Hyper-connection modules shared by every model of the package.

A token's residual state is `n` streams, `[batch, seq, n, hidden]`. Around each sub-layer `F`:

    h_pre, h_post, h_res = hyper_connection(streams)             # HyperConnection below
    f = F(hc_pre_mix(h_pre, streams))                            # read:  Σ_j h_pre_j x_j
    streams = hc_res_post_mix(h_res, streams, h_post, f)         # write: h_res · x + h_postᵀ · f

`HyperConnection` only computes the coefficients (in fp32), so forward hooks on it see every
`h_res` (used by `transformers_mhc.signal_gain`) and PEFT's `modules_to_save` can target it by name.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy
from transformers import initialization as init

from .mhc_ops import mhc_coefficients, sinkhorn_knopp, sinkhorn_knopp_deepseek_v4

# sigmoid(20) rounds to exactly 1.0 in fp32: the largest logit we ever need for "weight 1".
_MAX_LOGIT = 20.0


def _logit(p: float) -> float:
    p = min(max(p, 1e-9), 1 - 1e-9)
    return max(-_MAX_LOGIT, min(_MAX_LOGIT, math.log(p / (1 - p))))


def _rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


class HyperConnection(nn.Module):
    r"""
    Computes the hyper-connection coefficients of one sub-layer (attention or MLP) from the `n` streams.

    - `"mhc"`, paper convention: the flattened streams are RMS-normalised, one fused projection `phi`
      (`nC -> n² + 2n`) gives the dynamic logits, gated by `alpha` and shifted by `static_bias`;
      `h_pre = sigmoid`, `h_post = 2·sigmoid`, `h_res = SinkhornKnopp`.
    - `"mhc"`, `"deepseek_v4"` convention: as transformers' `DeepseekV4HyperConnection` (same parameter layout:
      `phi` ≙ `fn`, `static_bias` ≙ `base`, `alpha` ≙ `scale`).
    - `"hc"`: dynamic HC of Zhu et al. — per-stream RMSNorm, a per-stream projection `C -> n + 2`, `tanh`, no
      Sinkhorn; stream `i`'s projection gives `h_pre_i`, `h_post_i` and column `i` of `h_res`.

    Returns `(h_pre [..., n], h_post [..., n], h_res [..., n, n])` in fp32. Without `hc_dynamic` only the static
    biases remain and the coefficients broadcast over tokens (shape `[1, 1, ...]`).

    Args:
        config: an `MHCConfig` (or any config carrying the `hc_*` fields).
        sublayer_idx (`int`): index of the sub-layer in the network (attention and MLP count separately); HC's
            initial `h_pre` reads stream `sublayer_idx mod n`.
    """

    def __init__(self, config, sublayer_idx: int):
        super().__init__()
        self.num_streams = n = config.num_streams
        self.mode = config.hyper_connection
        self.convention = config.hc_convention
        self.dynamic = config.hc_dynamic
        self.sinkhorn_iterations = config.sinkhorn_iterations
        self.norm_eps = config.rms_norm_eps
        self.hc_eps = config.hc_eps
        self.sublayer_idx = sublayer_idx
        self.config = config
        width = n * n + 2 * n
        if self.dynamic:
            # mHC projects the flattened streams (nC); HC projects each stream (C) to its own n + 2 numbers.
            in_features = n * config.hidden_size if self.mode == "mhc" else config.hidden_size
            out_features = width if self.mode == "mhc" else n + 2
            self.phi = nn.Parameter(torch.empty(out_features, in_features))
            self.alpha = nn.Parameter(torch.empty(3))
        # Static logits (pre, post, res) — named `static_bias`, not `bias`, so no tool mistakes it for a Linear's.
        self.static_bias = nn.Parameter(torch.empty(width))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialisation documented in `MHCConfig` (called by `_init_weights`).

        Uses `transformers.initialization`, which leaves parameters loaded from a checkpoint untouched.
        """
        config, n = self.config, self.num_streams
        spread = torch.linspace(-1.0, 1.0, n) if n > 1 else torch.zeros(1)
        post = (
            2
            * torch.sigmoid(torch.tensor(float(config.hc_post_bias_init)))
            * (1 + config.hc_symmetry_breaking * spread)
        )
        eye = torch.eye(n)
        if self.mode == "mhc":
            pre_logit = config.hc_pre_bias_init if config.hc_pre_bias_init is not None else _logit(1.0 / n)
            pre = torch.full((n,), float(pre_logit))
            post = torch.logit(post / 2).clamp(-_MAX_LOGIT, _MAX_LOGIT)
            res = config.hc_res_logit_gap * eye
        else:  # HC: the coefficients are used as they are, no sigmoid; step 0 equals a Pre-Norm residual.
            if config.hc_pre_bias_init is not None:
                pre = torch.full((n,), float(config.hc_pre_bias_init))
            else:
                pre = eye[self.sublayer_idx % n]
            res = eye
        init.copy_(self.static_bias, torch.cat([pre, post, res.flatten()]))
        if self.dynamic:
            if self.mode == "mhc":
                init.normal_(self.phi, mean=0.0, std=config.initializer_range)
            else:
                init.zeros_(self.phi)  # HC paper: W = 0
            init.constant_(self.alpha, config.hc_gate_init)

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, backend = self.num_streams, self.config.kernel_backend
        pre_bias, post_bias, res_bias = self.static_bias.float().split([n, n, n * n])
        res_bias = res_bias.view(n, n)

        if not self.dynamic:
            pre_logits = pre_bias.view(1, 1, n)
            post_logits = post_bias.view(1, 1, n)
            res_logits = res_bias.view(1, 1, n, n)
            if self.mode == "hc":
                return pre_logits, post_logits, res_logits
            h_pre, h_post = torch.sigmoid(pre_logits), 2 * torch.sigmoid(post_logits)
            return h_pre, h_post, sinkhorn_knopp(res_logits, self.sinkhorn_iterations, backend)

        if self.mode == "hc":
            normed = _rms_normalize(streams.float(), self.norm_eps)
            proj = torch.tanh(F.linear(normed, self.phi.float()))  # [..., n (source stream), n + 2]
            alpha = self.alpha.float()
            h_pre = pre_bias + alpha[0] * proj[..., 0]
            h_post = post_bias + alpha[1] * proj[..., 1]
            h_res = res_bias + alpha[2] * proj[..., 2:].transpose(-1, -2)
            return h_pre, h_post, h_res

        if self.convention == "paper":
            h_pre, h_post, res_logits = mhc_coefficients(
                streams.flatten(-2), self.phi, self.alpha, self.static_bias, self.norm_eps, backend
            )
            return h_pre, h_post, sinkhorn_knopp(res_logits, self.sinkhorn_iterations, backend)

        # deepseek_v4 convention
        mixes = F.linear(_rms_normalize(streams.flatten(-2).float(), self.norm_eps), self.phi.float())
        pre_mix, post_mix, res_mix = mixes.split([n, n, n * n], dim=-1)
        alpha = self.alpha.float()
        h_pre = torch.sigmoid(pre_mix * alpha[0] + pre_bias) + self.hc_eps
        h_post = 2 * torch.sigmoid(post_mix * alpha[1] + post_bias)
        res_logits = res_mix.unflatten(-1, (n, n)) * alpha[2] + res_bias
        return h_pre, h_post, sinkhorn_knopp_deepseek_v4(res_logits, self.sinkhorn_iterations, self.hc_eps)


class StreamReadout(nn.Module):
    r"""
    Collapses the `n` streams into one hidden state before the final norm.

    `"mean"` and `"sum"` have no parameters. `"learned"` weighs the streams by `sigmoid(alpha · (x̂ phi) + b)`
    from the RMS-normalised flattened streams (plus `hc_eps` in the `"deepseek_v4"` convention, as transformers'
    `DeepseekV4HyperHead`), initialised to weights `1/n`.
    """

    def __init__(self, config):
        super().__init__()
        self.num_streams = n = config.num_streams
        self.readout = config.hc_readout
        self.norm_eps = config.rms_norm_eps
        self.eps = config.hc_eps if config.hc_convention == "deepseek_v4" else 0.0
        self.config = config
        if self.readout == "learned":
            self.phi = nn.Parameter(torch.empty(n, n * config.hidden_size))
            self.alpha = nn.Parameter(torch.empty(1))
            self.static_bias = nn.Parameter(torch.empty(n))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.readout == "learned":
            init.normal_(self.phi, mean=0.0, std=self.config.initializer_range)
            init.constant_(self.alpha, self.config.hc_gate_init)
            init.constant_(self.static_bias, _logit(1.0 / self.num_streams - self.eps))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        if self.readout == "mean":
            return streams.mean(dim=-2)
        if self.readout == "sum":
            return streams.sum(dim=-2)
        flat = _rms_normalize(streams.flatten(-2).float(), self.norm_eps)
        weights = torch.sigmoid(
            F.linear(flat, self.phi.float()) * self.alpha.float() + self.static_bias.float()
        )
        return ((weights + self.eps).unsqueeze(-1) * streams).sum(dim=-2).to(streams.dtype)


def expand_streams(hidden_states: torch.Tensor, num_streams: int) -> torch.Tensor:
    """Copies `[..., C]` into `num_streams` identical streams `[..., n, C]` (HC and mHC's stream creation)."""
    return hidden_states.unsqueeze(-2).expand(*hidden_states.shape[:-1], num_streams, hidden_states.shape[-1])


def position_ids_skipping_padding(
    attention_mask: torch.Tensor | None, seq_len: int, past_seen_tokens: int, device: torch.device
) -> torch.LongTensor:
    """Positions that skip left padding, so a padded sample sees the same RoPE phases as when run alone."""
    if attention_mask is None or attention_mask.dim() != 2:
        return (torch.arange(seq_len, device=device) + past_seen_tokens).unsqueeze(0)
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)[:, -seq_len:]


# Selective checkpointing for models whose layer segments run under `torch.utils.checkpoint` with the
# policy below (used by `modeling_decay_linear_attn`): ops inside a sub-layer (marked by
# `inside_sublayer()`) are saved, the hyper-connection arithmetic around them is recomputed.
_SUBLAYER_DEPTH = 0


@contextlib.contextmanager
def inside_sublayer():
    global _SUBLAYER_DEPTH
    _SUBLAYER_DEPTH += 1
    try:
        yield
    finally:
        _SUBLAYER_DEPTH -= 1


# Selective checkpointing rejects a cached tensor that is mutated after it was cached, so buffers written in place
# after they are made are recomputed, never cached: uninitialised ones, which a Triton kernel (invisible to the
# dispatcher) fills, and the `diag_embed` that `decay_ops`' vector-decay scores fill block by block; so are the
# in-place writes themselves and views (which alias such a buffer). None of them costs more than an allocation.
_FILLED_LATER = {
    torch.ops.aten.empty.memory_format,
    torch.ops.aten.empty_like.default,
    torch.ops.aten.empty_strided.default,
    torch.ops.aten.new_empty.default,
    torch.ops.aten.new_empty_strided.default,
    torch.ops.aten.diag_embed.default,
}


def _cheap_or_mutating(op) -> bool:
    """Allocations filled later, in-place ops and views (which alias a buffer that may be written later)."""
    schema = op._schema
    return op in _FILLED_LATER or schema.is_mutable or any(r.alias_info is not None for r in schema.returns)


def keep_sublayer_activations(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if _SUBLAYER_DEPTH > 0 and not _cheap_or_mutating(op):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def run_layers(layers, hidden_streams: torch.Tensor, layer_kwargs: dict) -> torch.Tensor:
    for decoder_layer in layers:
        hidden_streams = decoder_layer(hidden_streams, **layer_kwargs)
    return hidden_streams


__all__ = [
    "HyperConnection",
    "StreamReadout",
    "expand_streams",
    "inside_sublayer",
    "keep_sublayer_activations",
    "position_ids_skipping_padding",
    "run_layers",
]
