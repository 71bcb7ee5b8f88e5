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
"""The token mixer of `DecayLinearAttnForCausalLM`: linear attention with a configurable decay ("Elucidating the
Design Space of Decay in Linear Attention", Qin, Shen, Zhong, 2025) and H3's short convolution; the decay
parameterisations, HGRN2's lower bounds, TPE and the cosine RoPE of linear attention.

Differences from the paper's own code (Doraemonzzz/xmixers), each fixed on purpose:

1. TNL slopes: that code scales the ALiBi slopes of layer `l` by `1 - l / (L - 1)`, which is 0 in the last layer and
   negative (a decay > 1, an exploding state) once TPE shifts the layer indices by one. Here the factor is
   `1 - l / L` with `l` the decoder-layer index in `[0, L - 1]` (TPE never shifts it), so it lies in `[1/L, 1]` and
   every `log lambda` is strictly negative. TNL-L's learnable values are parameterised as `-exp(log_rate)`, so
   training cannot push them above 0 either.
2. Sharing with the key: several paths of that code leave `k` undefined (HGRN2 without a lower bound) or read a
   projection that does not exist when the decay is shared (the Mamba2 variants without `A`). Here every decay type
   that can be shared defines `k` explicitly (see `DecayLinearAttnDecay`), and the invalid combinations (sharing
   with an input-independent decay, sharing with scalar granularity) are rejected by the config.
3. Parameters named `bias` on custom modules can be mistaken for a `Linear` bias by Hugging Face tooling; the
   decay's learnable offsets are named `dt_bias` (as in transformers' Mamba2) and `delta` (Simple Decay).
4. LightNet: that code prepends a phantom token (`z_0 = 0`) to the running log-normaliser. Here the normaliser
   starts empty (`z_t = logcumsumexp(f)_t`, as the reference formula says), and is computed without subtracting two
   large numbers (`log lambda_t = -softplus(f_t - z_{t-1})`, `k_t = sigmoid(f_t - z_{t-1})`).

Padding: at padded positions the key and the log decay are zeroed (`k = 0`, `lambda = 1`), so the recurrent state is
untouched, and padded inputs are zeroed before the short convolution, so a left-padded batch equals each sample run
alone.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from .configuration_decay_linear_attn import DecayLinearAttnConfig, cache_state_indices
from .decay_ops import (
    chunk_decay_linear_attn,
    chunk_delta_rule_decay,
    recurrent_decay_linear_attn,
    recurrent_delta_rule_decay,
)

# "Nothing seen yet" for LightNet's log-normaliser: finite (so no inf - inf = NaN, in forward or backward) and so
# negative that exp() of it is exactly 0 in fp32.
_EMPTY_LOG_NORMALISER = -1e4


def read_state(cache: Cache | None, layer_idx: int, state_idx: int) -> torch.Tensor | None:
    """The recurrent state `state_idx` that a previous forward stored in layer `layer_idx`'s cache slot, or `None`.

    Read from the layer's `recurrent_states` rather than with `Cache.get_recurrent_state`, which answers `None` until a
    *conv* state of the same index was written (a decay without short conv has none). After `Cache.reset()` the states
    read as zeros, which for the recurrent and TPE states means "nothing seen" (LightNet's normaliser restarts at 0).
    """
    if cache is None:
        return None
    layer = cache.layers[layer_idx]
    return layer.recurrent_states[state_idx] if layer.is_recurrent_states_initialized[state_idx] else None


def causal_depthwise_conv(
    inputs: torch.Tensor, weight: torch.Tensor, cache: Cache | None, layer_idx: int, state_idx: int
) -> torch.Tensor:
    """Causal depthwise convolution over `[B, T, C]` (H3's shift SSM, the short conv), continuing from the last inputs
    kept in the cache (conv state `state_idx` of layer `layer_idx`) when there is one."""
    length, kernel_size = inputs.shape[1], weight.shape[-1]
    inputs = inputs.transpose(1, 2)
    if cache is not None:
        # Returns the cached inputs followed by the new ones (or the new ones alone on prefill).
        inputs = cache.update_conv_state(inputs, layer_idx, state_idx=state_idx, conv_kernel_size=kernel_size)
    out = F.conv1d(inputs.to(weight.dtype), weight, padding=kernel_size - 1, groups=weight.shape[0])
    return out[..., : inputs.shape[-1]][..., -length:].transpose(1, 2)


def _on_meta_device(module: nn.Module) -> bool:
    return any(
        t.device.type == "meta" for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    )


def _alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's geometric head slopes `2^(-8 h / n)` (interleaved for a head count that is not a power of two)."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two(closest)
    if closest < num_heads:
        slopes += power_of_two(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def _tnl_log_decay(num_heads: int, layer_idx: int, num_layers: int) -> torch.Tensor:
    """TNL's fixed decay: `log lambda_h = -slope_h (1 - l / L)`, in `[-slope_h, -slope_h / L]` (fix 1 in the module
    docstring: never 0, never positive)."""
    return -_alibi_slopes(num_heads) * (1.0 - layer_idx / num_layers)


def _cosine_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The paper code's RoPE for linear attention: `[x cos(t theta), x sin(t theta)]` (doubles the last dim).

    `q_t . k_s = sum_i q_i k_i cos((t - s) theta_i)` depends only on `t - s`. x: [B, H, T, D]; cos, sin: [B, T, D].
    """
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return torch.cat([x * cos, x * sin], dim=-1)


class DecayLinearAttnCosineRope(nn.Module):
    """Angles `t * theta_i` with `theta_i = rope_theta^(-i / head_dim)`, one frequency per channel."""

    def __init__(self, config: DecayLinearAttnConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.base = float(config.rope_parameters["rope_theta"])
        self.inv_freq = nn.Buffer(self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        return self.base ** (-torch.arange(self.head_dim, dtype=torch.float32) / self.head_dim)

    @torch.no_grad()
    def forward(self, position_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = position_ids[..., None].float() * self.inv_freq.to(position_ids.device)
        return angles.cos(), angles.sin()


class DecayLinearAttnDecay(nn.Module):
    r"""
    The decay parameterisation of one linear-attention layer: computes `log lambda_t <= 0` (fp32) and the key `k_t`.

    It owns every decay parameter (`f_proj`, `A_log`, `dt_bias`, Simple Decay's `delta`, TNL-L's `log_rate`), so
    PEFT's `modules_to_save=["decay_proj"]` trains and saves them, and forward hooks on it see every decay (used by
    `transformers_mhc.decay_statistics`).

    `f = f_proj(x)` (or the key projection when `share_decay_with_key`), then per `decay_type`:

    | decay_type | log lambda | k when shared |
    |---|---|---|
    | mamba2 (no_a / no_dt / no_a_no_dt) | `-exp(A_log) * softplus(f + dt_bias)` (drop `A` / `dt_bias`) | `softplus(f + dt_bias)` |
    | gla | `logsigmoid(f / gla_gate_normalizer)` | `1 - lambda` |
    | hgrn2 | `logsigmoid(f)`, or `log(lb + (1 - lb) sigmoid(f))` with a lower bound | `1 - lambda` |
    | lightnet | `z_{t-1} - z_t`, `z_t = logcumsumexp(f)_t` | `1 - lambda` |
    | simple | `logsigmoid(f + delta)`, `delta = logit(simple_decay_init)` | `1 - lambda` |
    | tnl / tnl_learnable | `-slope_h (1 - l / L)` fixed / learnable | - |
    | none | 0 | - |

    Without sharing `k = silu(W_k x)`. Returns `log_decay` of shape `[B, T, heads]` (scalar) or
    `[B, T, heads * head_dim]` (vector).
    """

    def __init__(self, config: DecayLinearAttnConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.decay_type = config.decay_type
        self.shared = config.share_decay_with_key
        self.vector = config.decay_granularity == "vector"
        self.num_heads = config.num_attention_heads
        self.decay_dim = config.num_attention_heads * (config.head_dim if self.vector else 1)

        if self.decay_type not in ("tnl", "tnl_learnable", "none") and not self.shared:
            if self.vector:
                self.f_proj = nn.Sequential(
                    nn.Linear(config.hidden_size, config.decay_low_rank_dim, bias=False),
                    nn.Linear(config.decay_low_rank_dim, self.decay_dim, bias=False),
                )
            else:
                self.f_proj = nn.Linear(config.hidden_size, self.decay_dim, bias=False)
        if self.decay_type in ("mamba2", "mamba2_no_dt"):
            self.A_log = nn.Parameter(torch.empty(self.decay_dim))
        if self.decay_type in ("mamba2", "mamba2_no_a"):
            self.dt_bias = nn.Parameter(torch.empty(self.decay_dim))
        if self.decay_type == "simple":
            self.delta = nn.Parameter(torch.empty(self.decay_dim))
        if self.decay_type == "tnl_learnable":
            self.log_rate = nn.Parameter(torch.empty(self.num_heads))
        if self.decay_type == "tnl":
            self.tnl_log_decay = nn.Buffer(torch.empty(self.num_heads), persistent=False)
        if not _on_meta_device(self):  # `from_pretrained` builds on meta; `_init_weights` fills in afterwards
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialises the decay parameters (`transformers.initialization` leaves loaded weights untouched)."""
        config = self.config
        if getattr(self, "A_log", None) is not None:
            a = torch.empty(self.decay_dim).uniform_(config.mamba2_a_init_min, config.mamba2_a_init_max)
            init.copy_(self.A_log, torch.log(a))
        if getattr(self, "dt_bias", None) is not None:
            log_min, log_max = math.log(config.mamba2_dt_min), math.log(config.mamba2_dt_max)
            dt = torch.exp(torch.rand(self.decay_dim) * (log_max - log_min) + log_min)
            dt = dt.clamp(min=config.mamba2_dt_init_floor)
            init.copy_(self.dt_bias, dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        if getattr(self, "delta", None) is not None:
            p = config.simple_decay_init
            init.constant_(self.delta, math.log(p / (1 - p)))
        tnl = _tnl_log_decay(self.num_heads, self.layer_idx, config.num_hidden_layers)
        if getattr(self, "log_rate", None) is not None:
            init.copy_(self.log_rate, torch.log(-tnl))
        if getattr(self, "tnl_log_decay", None) is not None:
            init.copy_(self.tnl_log_decay, tnl)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_states: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        lower_bound: torch.Tensor | None = None,
        log_normaliser: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `[B, T, hidden]`): the (normalised) layer input.
            key_states (`torch.Tensor` of shape `[B, T, heads * head_dim]`): the key projection, before activation.
            padding_mask (`torch.BoolTensor` of shape `[B, T]`, *optional*): False at padded positions.
            lower_bound (`torch.Tensor` of shape `[decay_dim]`, *optional*): HGRN2's lower bound of this layer.
            log_normaliser (`torch.Tensor` of shape `[B, decay_dim]`, *optional*): LightNet's cached `z`.

        Returns:
            `(log_decay, key, log_normaliser)`: fp32 `log lambda`, the key in the input dtype, and LightNet's new `z`
            (`None` for the other decay types).
        """
        batch, length = hidden_states.shape[:2]
        if self.decay_type in ("tnl", "tnl_learnable", "none"):
            if self.decay_type == "tnl":
                per_head = self.tnl_log_decay.float()
            elif self.decay_type == "tnl_learnable":
                per_head = -torch.exp(self.log_rate.float())
            else:
                per_head = hidden_states.new_zeros(self.num_heads, dtype=torch.float32)
            log_decay = per_head.expand(batch, length, self.num_heads)
            return log_decay, F.silu(key_states), None

        f = (key_states if self.shared else self.f_proj(hidden_states)).float()
        new_normaliser = None
        if self.decay_type.startswith("mamba2"):
            if getattr(self, "dt_bias", None) is not None:
                f = f + self.dt_bias.float()
            step = F.softplus(f)  # Mamba2's dt
            log_decay = (
                -step if getattr(self, "A_log", None) is None else -torch.exp(self.A_log.float()) * step
            )
            shared_key = step
        elif self.decay_type == "lightnet":
            if padding_mask is not None:
                # Padded tokens must not enter the running normaliser.
                f = f.masked_fill(~padding_mask[..., None], _EMPTY_LOG_NORMALISER)
            if log_normaliser is None:
                log_normaliser = f.new_full((batch, self.decay_dim), _EMPTY_LOG_NORMALISER)
            z = torch.logcumsumexp(torch.cat([log_normaliser[:, None].float(), f], dim=1), dim=1)
            logit = f - z[:, :-1]  # f_t - z_{t-1}
            log_decay = F.logsigmoid(-logit)  # = z_{t-1} - z_t
            shared_key = torch.sigmoid(logit)  # = exp(f_t - z_t) = 1 - lambda_t
            new_normaliser = z[:, -1]
        else:
            if self.decay_type == "gla":
                logit = f / self.config.gla_gate_normalizer
            elif self.decay_type == "simple":
                logit = f + self.delta.float()
            else:  # hgrn2
                logit = f
            log_decay = F.logsigmoid(logit)
            shared_key = torch.sigmoid(-logit)  # 1 - lambda, without cancellation
            if lower_bound is not None:
                # lambda = lb + (1 - lb) sigmoid(f); every term finite because 0 < lb < 1 here.
                lower_bound = lower_bound.float()
                log_decay = torch.logaddexp(torch.log(lower_bound), torch.log1p(-lower_bound) + log_decay)
                shared_key = (1 - lower_bound) * shared_key

        key = shared_key.to(key_states.dtype) if self.shared else F.silu(key_states)
        return log_decay, key, new_normaliser


class DecayLinearAttnLowerBounds(nn.Module):
    """HGRN2's depth-dependent lower bounds `lb_l = sum_{m=1..l} softmax(lower_bounds, over layers)_m`.

    `lb_0 = 0` and `lb_l` rises with depth towards 1 (exclusive): deeper layers keep more of their state.
    """

    def __init__(self, config: DecayLinearAttnConfig):
        super().__init__()
        heads, head_dim = config.num_attention_heads, config.head_dim
        decay_dim = heads * head_dim if config.decay_granularity == "vector" else heads
        self.lower_bounds = nn.Parameter(torch.zeros(config.num_hidden_layers, decay_dim))

    def forward(self) -> torch.Tensor:
        weights = torch.softmax(self.lower_bounds.float(), dim=0)
        return torch.cumsum(weights, dim=0) - weights[0]


class DecayLinearAttnTPE(nn.Module):
    """TPE: one linear-attention pass over the embeddings with data-independent q and k and a learnable per-head
    decay (initialised to ALiBi slopes), added to the embeddings. Per head, q and k are scalars, so the pass is a
    decayed running sum of the head's embedding channels; `query` starts at 0 so the pass starts as the identity.
    """

    def __init__(self, config: DecayLinearAttnConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.query = nn.Parameter(torch.empty(self.num_heads, 1))
        self.key = nn.Parameter(torch.empty(self.num_heads, 1))
        self.log_rate = nn.Parameter(torch.empty(self.num_heads))
        self.chunk_size = config.chunk_size
        self.config = config
        if not _on_meta_device(self):
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        init.zeros_(self.query)
        init.ones_(self.key)
        init.copy_(self.log_rate, torch.log(_alibi_slopes(self.num_heads)))

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        state: torch.Tensor | None = None,
        output_final_state: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length, hidden = inputs_embeds.shape
        values = inputs_embeds.view(batch, length, self.num_heads, -1).transpose(1, 2)
        shape = (batch, self.num_heads, length, 1)
        query = self.query.to(values.dtype)[None, :, None].expand(shape)
        key = self.key.to(values.dtype)[None, :, None].expand(shape)
        log_decay = (-torch.exp(self.log_rate.float()))[None, :, None].expand(batch, self.num_heads, length)
        if padding_mask is not None:
            keep = padding_mask[:, None, :]
            values = values * keep[..., None].to(values.dtype)
            key = key * keep[..., None].to(key.dtype)
            log_decay = log_decay * keep
        op = (
            recurrent_decay_linear_attn
            if length == 1
            else partial(chunk_decay_linear_attn, chunk_size=self.chunk_size)
        )
        out, state = op(
            query,
            key,
            values,
            log_decay,
            initial_state=state,
            output_final_state=output_final_state,
            kernel_backend=self.config.kernel_backend,
        )
        return inputs_embeds + out.transpose(1, 2).reshape(batch, length, hidden), state


class DecayLinearAttention(nn.Module):
    r"""
    Linear attention with decay (the token mixer of the `"linear_attention"` layers):

        q = silu(W_q x), k, log lambda = decay_proj(x, W_k x), v = W_v x
        (optional) q, k, v <- causal depthwise short conv (H3's shift SSM), SiLU on v
        (optional) cosine RoPE on q, k; L2-normalised k and beta = 2 sigmoid(W_beta x) for the delta rule
        S_t = diag(lambda_t) S_{t-1} + k_t v_t^T      (delta rule: (I - beta k k^T) diag(lambda_t) S_{t-1} + k v^T)
        o_t = q_t^T S_t
        out = o_proj(RMSNorm_per_head(o) * sigmoid(output_gate(x)))

    Training and prefill use the chunked form, single-token decoding the recurrence; the recurrent state, the
    short-conv state and LightNet's normaliser live in the `DynamicCache` slot of the layer.
    """

    def __init__(self, config: DecayLinearAttnConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.chunk_size = config.chunk_size
        self.use_rope = config.positional_encoding == "rope"
        self.use_delta_rule = config.use_delta_rule
        self.vector_decay = config.decay_granularity == "vector"
        self.states = cache_state_indices(config)
        inner = self.num_heads * self.head_dim

        self.q_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.o_proj = nn.Linear(inner, config.hidden_size, bias=False)
        self.decay_proj = DecayLinearAttnDecay(config, layer_idx)
        self.short_conv_size = config.short_conv_size
        if self.short_conv_size:
            # One depthwise filter per channel of q, k and v (fused in one conv for speed).
            self.short_conv = nn.Conv1d(
                3 * inner, 3 * inner, kernel_size=self.short_conv_size, groups=3 * inner, bias=False
            )
        if self.use_delta_rule:
            self.beta_proj = nn.Linear(config.hidden_size, self.num_heads, bias=False)
        self.o_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)  # per-head (group) RMSNorm
        if config.use_output_gate:
            self.output_gate = nn.Sequential(
                nn.Linear(config.hidden_size, config.output_gate_low_rank_dim, bias=False),
                nn.Linear(config.output_gate_low_rank_dim, inner, bias=False),
            )

    def _short_conv(self, mixed: torch.Tensor, cache: Cache | None) -> torch.Tensor:
        return causal_depthwise_conv(
            mixed, self.short_conv.weight, cache, self.layer_idx, self.states["recurrent"]
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        rope_angles: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        lower_bound: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        state = read_state(cache, self.layer_idx, self.states["recurrent"])
        log_normaliser = None
        if "lightnet_normaliser" in self.states:
            log_normaliser = read_state(cache, self.layer_idx, self.states["lightnet_normaliser"])
        if padding_mask is not None:
            padding_mask = padding_mask.bool()
            # Padded inputs become zeros, so they also contribute nothing to the short conv of later tokens.
            hidden_states = hidden_states * padding_mask[..., None].to(hidden_states.dtype)

        # 1. Projections (and H3's shift SSM on q, k, v)
        query_states = self.q_proj(hidden_states)
        key_states = self.k_proj(hidden_states)
        value_states = self.v_proj(hidden_states)
        if self.short_conv_size:
            mixed = self._short_conv(torch.cat([query_states, key_states, value_states], dim=-1), cache)
            query_states, key_states, value_states = mixed.chunk(3, dim=-1)
            value_states = F.silu(value_states)
        query_states = F.silu(query_states)

        # 2. Decay (and the key: either silu(W_k x) or derived from the decay when shared)
        log_decay, key_states, log_normaliser = self.decay_proj(
            hidden_states, key_states, padding_mask, lower_bound, log_normaliser
        )

        # 3. Heads first: [B, H, T, D]; log_decay [B, H, T] (scalar) or [B, H, T, D] (vector)
        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, length, self.num_heads, -1).transpose(1, 2)

        query_states, key_states, value_states = heads(query_states), heads(key_states), heads(value_states)
        log_decay = heads(log_decay) if self.vector_decay else log_decay.transpose(1, 2)

        if self.use_rope:
            cos, sin = rope_angles
            query_states = _cosine_rope(query_states, cos, sin)
            key_states = _cosine_rope(key_states, cos, sin)
            if self.vector_decay:
                log_decay = torch.cat([log_decay, log_decay], dim=-1)  # one decay per doubled channel
        beta = None
        if self.use_delta_rule:
            key_states = F.normalize(key_states.float(), dim=-1).to(key_states.dtype)
            beta = 2 * torch.sigmoid(self.beta_proj(hidden_states).float()).transpose(1, 2)

        # 4. Padding: k = 0 and lambda = 1 leave the state untouched.
        if padding_mask is not None:
            keep = padding_mask[:, None, :]
            key_states = key_states * keep[..., None].to(key_states.dtype)
            log_decay = log_decay * (keep[..., None] if log_decay.dim() == 4 else keep)

        # 5. Linear attention: recurrence for single-token decoding, chunked form otherwise.
        # (the delta rule has no Triton kernel: `kernel_backend="triton"` makes its ops raise, "auto" runs torch)
        op_kwargs = dict(
            initial_state=state,
            output_final_state=cache is not None,
            kernel_backend=self.config.kernel_backend,
        )
        if self.use_delta_rule:
            op = recurrent_delta_rule_decay if length == 1 else chunk_delta_rule_decay
            op_args = (query_states, key_states, value_states, beta, log_decay)
        else:
            op = recurrent_decay_linear_attn if length == 1 else chunk_decay_linear_attn
            op_args = (query_states, key_states, value_states, log_decay)
        if length > 1:
            op_kwargs["chunk_size"] = self.chunk_size
        attn_output, state = op(*op_args, **op_kwargs)
        if cache is not None:
            cache.update_recurrent_state(state, self.layer_idx, state_idx=self.states["recurrent"])
            if log_normaliser is not None:
                cache.update_recurrent_state(
                    log_normaliser, self.layer_idx, state_idx=self.states["lightnet_normaliser"]
                )

        # 6. Per-head RMSNorm, output gate, output projection
        attn_output = self.o_norm(attn_output.transpose(1, 2))  # [B, T, H, Dv]
        attn_output = attn_output.reshape(batch, length, -1)
        if self.config.use_output_gate:
            attn_output = attn_output * torch.sigmoid(self.output_gate(hidden_states))
        return self.o_proj(attn_output)


__all__ = [
    "causal_depthwise_conv",
    "DecayLinearAttention",
    "DecayLinearAttnCosineRope",
    "DecayLinearAttnDecay",
    "DecayLinearAttnLowerBounds",
    "DecayLinearAttnTPE",
]
