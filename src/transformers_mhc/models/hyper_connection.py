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

A token's residual state is `n` streams, `[batch, seq, n, hidden]`. Around each sub-layer `F` (attention, MLP):

    sublayer_input, read = hc(streams, norm)     # the read: norm(Σ_j h_pre_j x_j), and h_pre, h_post, h_res
    streams = hc.write(read, F(sublayer_input))  # the write: h_res · x + h_postᵀ · F(...)

`HyperConnection` does this for HC and mHC, `Residual` for a plain residual (`hyper_connection="none"`, one
stream: `x + F(norm(x))`), so a decoder layer reads the same in every mode. Forward hooks on a `HyperConnection`
see the coefficients (`output[1].h_res`, used by `transformers_mhc.signal_gain`), and PEFT's `modules_to_save`
can target it by name.

The arithmetic is in `mhc_ops` (the paper's formulas, the references), `mhc_fused` (the torch path) and the Triton
kernels; `mhc_implementation` picks one. `run_layers` runs a stack of decoder layers, with the selective
recomputation of `hc_recompute` when asked.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
from transformers import initialization as init

from . import mhc_ops
from .mhc_fused import (
    hc_pre_mix_fused,
    hc_res_post_mix_fused,
    mhc_coefficients_fused,
    mhc_read_fused,
    sinkhorn_knopp_fused,
)
from .mhc_ops import sinkhorn_knopp_deepseek_v4, use_triton_kernels

try:  # The Triton fast path is optional: absent where the package is not installed (remote code).
    from transformers_mhc.kernels.mhc import (
        can_launch_on,
        hc_pre_mix_triton,
        hc_res_post_mix_triton,
        mhc_coefficients_triton,
        sinkhorn_knopp_triton,
    )
except ImportError:
    can_launch_on = hc_pre_mix_triton = hc_res_post_mix_triton = mhc_coefficients_triton = None
    sinkhorn_knopp_triton = None

try:  # Compiled, the torch path's Sinkhorn runs as one registered op; remote code, without it, compiles the formulas.
    from transformers_mhc.sinkhorn_op import sinkhorn_knopp_torch_path
except ImportError:
    sinkhorn_knopp_torch_path = sinkhorn_knopp_fused


class HCRead(NamedTuple):
    """What the read of a sub-layer hands to its write: the coefficients (fp32; `None` for a plain residual), the
    streams the write adds to (the read's input, passed on as the read's output: see `mhc_fused.mhc_read_fused`) and
    the implementation the read chose (the write takes the same one, without deciding again)."""

    h_pre: torch.Tensor | None
    h_post: torch.Tensor | None
    h_res: torch.Tensor | None
    streams: torch.Tensor
    ops: HCOps | None = None


class HCOps(NamedTuple):
    """One implementation of the hyper-connection ops, each with the signature of its reference."""

    name: str
    mhc_read: Callable  # reference: `compose_read` of the two below
    mhc_coefficients: Callable  # reference: `mhc_ops.mhc_coefficients`
    sinkhorn_knopp: Callable  # reference: `mhc_ops.sinkhorn_knopp`
    hc_pre_mix: Callable  # reference: `mhc_ops.hc_pre_mix`
    hc_res_post_mix: Callable  # reference: `mhc_ops.hc_res_post_mix`


def normed_pre_mix(
    norm: nn.Module, pre_mix: Callable, h_pre: torch.Tensor, streams: torch.Tensor
) -> torch.Tensor:
    """`norm(pre_mix(h_pre, streams))`, the sub-layer input. In training it is recomputed in backward rather than
    kept: backward keeps the streams anyway, and the mixed input and the norm's intermediates are cheap to redo from
    them (one sub-layer width less per sub-layer; the same numbers either way)."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return checkpoint(
            _normed_pre_mix,
            norm,
            pre_mix,
            h_pre,
            streams,
            use_reentrant=False,
            preserve_rng_state=False,  # deterministic: nothing random to replay
            determinism_check="none",
        )
    return _normed_pre_mix(norm, pre_mix, h_pre, streams)


def _normed_pre_mix(norm, pre_mix, h_pre, streams):
    return norm(pre_mix(h_pre, streams))


def compose_read(coefficients: Callable, pre_mix: Callable) -> Callable:
    """The read of an mHC sub-layer from its parts: `(norm(pre_mix(h_pre, x)), h_pre, h_post, h_res logits, x)`."""

    def mhc_read(x, phi, alpha, static_bias, eps, norm):
        h_pre, h_post, res_logits = coefficients(x.flatten(-2), phi, alpha, static_bias, eps)
        return normed_pre_mix(norm, pre_mix, h_pre, x), h_pre, h_post, res_logits, x

    return mhc_read


REFERENCE_OPS = HCOps(
    "reference",
    compose_read(mhc_ops.mhc_coefficients, mhc_ops.hc_pre_mix),
    mhc_ops.mhc_coefficients,
    mhc_ops.sinkhorn_knopp,
    mhc_ops.hc_pre_mix,
    mhc_ops.hc_res_post_mix,
)
TORCH_OPS = HCOps(
    "torch",
    mhc_read_fused,
    mhc_coefficients_fused,
    sinkhorn_knopp_torch_path,
    hc_pre_mix_fused,
    hc_res_post_mix_fused,
)
TRITON_OPS = HCOps(
    "triton",
    compose_read(mhc_coefficients_triton, hc_pre_mix_triton),
    mhc_coefficients_triton,
    sinkhorn_knopp_triton,
    hc_pre_mix_triton,
    hc_res_post_mix_triton,
)


def mhc_implementation(kernel_backend: str, streams: torch.Tensor, *params: torch.Tensor) -> HCOps:
    """The one dispatch point of the hyper-connection ops: the implementation that runs on `streams` (`[..., n, C]`)
    with `params`. `kernel_backend` (the config field): `"torch"` the torch path, `"triton"` the Triton kernels,
    `"auto"` the kernels where they support the inputs (see `mhc_ops.use_triton_kernels`)."""
    n = streams.shape[-2]
    unsupported = f"{n} streams > {mhc_ops.MAX_TRITON_STREAMS}" if n > mhc_ops.MAX_TRITON_STREAMS else None
    if use_triton_kernels("mhc", kernel_backend, (streams, *params), can_launch_on, unsupported):
        return TRITON_OPS
    return TORCH_OPS


# sigmoid(20) rounds to exactly 1.0 in fp32: the largest logit we ever need for "weight 1".
_MAX_LOGIT = 20.0


def _logit(p: float) -> float:
    p = min(max(p, 1e-9), 1 - 1e-9)
    return max(-_MAX_LOGIT, min(_MAX_LOGIT, math.log(p / (1 - p))))


def _rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


class HyperConnection(nn.Module):
    r"""
    The hyper-connection of one sub-layer (attention or MLP): reads its input from the `n` streams, writes its output
    back (`write`).

    - `"mhc"`, paper convention: the flattened streams are RMS-normalised, one fused projection `phi`
      (`nC -> n² + 2n`) gives the dynamic logits, gated by `alpha` and shifted by `static_bias`;
      `h_pre = sigmoid`, `h_post = 2·sigmoid`, `h_res = SinkhornKnopp`.
    - `"mhc"`, `"deepseek_v4"` convention: as transformers' `DeepseekV4HyperConnection` (same parameter layout:
      `phi` ≙ `fn`, `static_bias` ≙ `base`, `alpha` ≙ `scale`).
    - `"hc"`: dynamic HC of Zhu et al. — per-stream RMSNorm, a per-stream projection `C -> n + 2`, `tanh`, no
      Sinkhorn; stream `i`'s projection gives `h_pre_i`, `h_post_i` and column `i` of `h_res`.

    Called as `hc(streams, norm)`, returns the sub-layer's input `norm(Σ_j h_pre_j x_j)` and `(h_pre
    [..., n], h_post [..., n], h_res [..., n, n])` in fp32. Without `hc_dynamic` only the static biases remain and
    the coefficients broadcast over tokens (shape `[1, 1, ...]`).

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

    def forward(self, streams: torch.Tensor, norm: nn.Module) -> tuple[torch.Tensor, HCRead]:
        """The read of the sub-layer: its input `norm(Σ_j h_pre_j x_j)`, and what `write` needs."""
        ops = self.ops(streams)
        if self.mode == "mhc" and self.convention == "paper" and self.dynamic:
            sublayer_input, h_pre, h_post, res_logits, streams = ops.mhc_read(
                streams, self.phi, self.alpha, self.static_bias, self.norm_eps, norm
            )
            h_res = ops.sinkhorn_knopp(res_logits, self.sinkhorn_iterations)
            return sublayer_input, HCRead(h_pre, h_post, h_res, streams, ops)
        h_pre, h_post, h_res = self.coefficients(streams, ops)
        return normed_pre_mix(norm, ops.hc_pre_mix, h_pre, streams), HCRead(
            h_pre, h_post, h_res, streams, ops
        )

    def write(self, read: HCRead, output: torch.Tensor) -> torch.Tensor:
        """The streams after the sub-layer: `h_res · x + h_postᵀ · output`."""
        ops = read.ops if read.ops is not None else self.ops(read.streams)
        return ops.hc_res_post_mix(read.h_res, read.streams, read.h_post, output)

    def ops(self, streams: torch.Tensor) -> HCOps:
        """The implementation of the ops for these streams (`config.kernel_backend` is read at call time)."""
        return mhc_implementation(
            self.config.kernel_backend, streams, self.static_bias
        )  # its parameters' device

    def coefficients(
        self, streams: torch.Tensor, ops: HCOps | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The coefficients alone (fp32), as the read computes them."""
        ops = ops or self.ops(streams)
        n = self.num_streams
        if self.mode == "mhc" and self.convention == "paper" and self.dynamic:
            h_pre, h_post, res_logits = ops.mhc_coefficients(
                streams.flatten(-2), self.phi, self.alpha, self.static_bias, self.norm_eps
            )
            return (h_pre, h_post, ops.sinkhorn_knopp(res_logits, self.sinkhorn_iterations))
        pre_bias, post_bias, res_bias = self.static_bias.float().split([n, n, n * n])
        res_bias = res_bias.view(n, n)

        if not self.dynamic:
            pre_logits = pre_bias.view(1, 1, n)
            post_logits = post_bias.view(1, 1, n)
            res_logits = res_bias.view(1, 1, n, n)
            if self.mode == "hc":
                return (pre_logits, post_logits, res_logits)
            h_pre, h_post = torch.sigmoid(pre_logits), 2 * torch.sigmoid(post_logits)
            return (h_pre, h_post, ops.sinkhorn_knopp(res_logits, self.sinkhorn_iterations))

        if self.mode == "hc":
            normed = _rms_normalize(streams.float(), self.norm_eps)
            proj = torch.tanh(F.linear(normed, self.phi.float()))  # [..., n (source stream), n + 2]
            alpha = self.alpha.float()
            h_pre = pre_bias + alpha[0] * proj[..., 0]
            h_post = post_bias + alpha[1] * proj[..., 1]
            h_res = res_bias + alpha[2] * proj[..., 2:].transpose(-1, -2)
            return (h_pre, h_post, h_res)

        # deepseek_v4 convention
        mixes = F.linear(_rms_normalize(streams.flatten(-2).float(), self.norm_eps), self.phi.float())
        pre_mix, post_mix, res_mix = mixes.split([n, n, n * n], dim=-1)
        alpha = self.alpha.float()
        h_pre = torch.sigmoid(pre_mix * alpha[0] + pre_bias) + self.hc_eps
        h_post = 2 * torch.sigmoid(post_mix * alpha[1] + post_bias)
        res_logits = res_mix.unflatten(-1, (n, n)) * alpha[2] + res_bias
        h_res = sinkhorn_knopp_deepseek_v4(res_logits, self.sinkhorn_iterations, self.hc_eps)
        return (h_pre, h_post, h_res)


class Residual(nn.Module):
    """A plain residual connection behind the interface of `HyperConnection` (`hyper_connection="none"`): one
    stream, the read is `norm(x)`, the write `x + output` — exactly a Llama layer. No parameters."""

    def forward(self, streams: torch.Tensor, norm: nn.Module) -> tuple[torch.Tensor, HCRead]:
        return norm(streams.squeeze(-2)), HCRead(None, None, None, streams)

    def write(self, read: HCRead, output: torch.Tensor) -> torch.Tensor:
        return read.streams + output.unsqueeze(-2)


def hyper_connection(config, sublayer_idx: int) -> HyperConnection | Residual:
    """The connection of one sub-layer for `config.hyper_connection` (`"mhc"`, `"hc"` or `"none"`)."""
    return Residual() if config.hyper_connection == "none" else HyperConnection(config, sublayer_idx)


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


# Selective recomputation (`config.hc_recompute`, mHC paper §5.6), by torch's selective activation checkpointing:
# per segment of `config.recompute_interval` layers, only the segment's input streams and the outputs of the
# matrix products and attention are kept; everything between them — the hyper-connection arithmetic, norms,
# activations, RoPE — is recomputed in backward. The kept outputs are never written in place afterwards (which
# the checkpoint would reject). The Triton kernels are registered ops (`torch.ops.transformers_mhc`): the mHC ones
# are recomputed like the arithmetic they replace, the decay chunk kernel is kept like attention.
_KEPT_OPS = {
    getattr(torch.ops.aten, name).default
    for name in (
        "mm",
        "addmm",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    if hasattr(torch.ops.aten, name)
}


# By name: the kernels are an optional part of the package, and this file travels with remote code without them.
_KEPT_KERNEL_OPS = {"transformers_mhc.chunk_decay_fwd.default"}


def _keep_products(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    kept = op in _KEPT_OPS or str(op) in _KEPT_KERNEL_OPS
    return CheckpointPolicy.MUST_SAVE if kept else CheckpointPolicy.PREFER_RECOMPUTE


def _run_segment(layers, hidden_streams: torch.Tensor, layer_kwargs: dict, readout):
    states = []
    for decoder_layer in layers:
        hidden_streams = decoder_layer(hidden_streams, **layer_kwargs)
        if readout is not None:
            states.append(readout(hidden_streams))
    return hidden_streams, tuple(states)


def run_layers(
    layers,
    hidden_streams: torch.Tensor,
    layer_kwargs: dict,
    recompute_interval: int | None = None,
    readout=None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Runs `layers` on the streams; returns the final streams and, with a `readout`, its output after every layer.

    `recompute_interval`: run the layers in checkpointed segments of that many layers (selective recomputation);
    `None` runs them plainly.
    """
    if recompute_interval is None:
        return _run_segment(layers, hidden_streams, layer_kwargs, readout)
    states = ()
    for start in range(0, len(layers), recompute_interval):
        hidden_streams, segment_states = checkpoint(
            _run_segment,
            layers[start : start + recompute_interval],
            hidden_streams,
            layer_kwargs,
            readout,
            use_reentrant=False,
            context_fn=partial(create_selective_checkpoint_contexts, _keep_products),
        )
        states += segment_states
    return hidden_streams, states


def selective_recompute_interval(model: nn.Module) -> int | None:
    """`config.recompute_interval` when `hc_recompute` applies to this forward of `model` (training with gradients,
    hyper-connections on, no whole-layer gradient checkpointing, which recomputes everything already), else `None`."""
    config = model.config
    if (
        config.hc_recompute
        and config.hyper_connection != "none"
        and model.training
        and torch.is_grad_enabled()
        and not model.gradient_checkpointing
    ):
        return max(config.recompute_interval, 1)
    return None


__all__ = [
    "HCRead",
    "HCOps",
    "HyperConnection",
    "REFERENCE_OPS",
    "Residual",
    "StreamReadout",
    "TORCH_OPS",
    "TRITON_OPS",
    "expand_streams",
    "compose_read",
    "hyper_connection",
    "normed_pre_mix",
    "mhc_implementation",
    "position_ids_skipping_padding",
    "run_layers",
    "selective_recompute_interval",
]
