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
"""H3's token mixer ("Hungry Hungry Hippos", Fu, Dao et al., arXiv 2212.14052), per head:

    y = Q ⊙ SSM_diag( SSM_shift(K) ⊙ V )

- `SSM_shift` is a learned causal filter over the last few inputs: a causal depthwise convolution on k (the same
  operator as the decay model's `short_conv_size`; its state is the last `short_conv_size - 1` inputs).
- `SSM_diag` is S4D: for every key channel `i` (shared by all heads, as in the paper's code) `N/2` complex modes
  `a_n = -exp(a_real_log) + i·a_imag` (S4D-Lin initialisation: `-1/2 + iπn`), discretised with a learned step `Δ_i`
  (zero-order hold: `ā = exp(Δa)`, `b̄ = (ā - 1)/a`), read out by `C` and a skip `D`:

      S_t[i, j, n] = ā[i, n] S_{t-1}[i, j, n] + k_t[i] v_t[j]         (one state per key channel, value channel, mode)
      y_t[j] = Σ_i q_t[i] (2 Re Σ_n C[i, n] b̄[i, n] S_t[i, j, n] + D[i] k_t[i] v_t[j])

  In the terms of the decay design space this is linear attention whose state `S` (key × value) decays per key
  channel — a vector decay — but as a sum of `N/2` damped oscillations instead of one exponential `λ^t`, and
  independent of the input. `decay_statistics` reports `|ā|`.

`S4DMixer` (`token_mixer="s4d"`) is the diagonal SSM alone, one per channel, for H3's ablation. It keeps the FFT
at every length: it convolves `[B, T, C]` directly, with no outer products. (A `[C, T, T]` Toeplitz matmul measured
1.6-1.9x faster at T = 32-64 but slower at 256, and S4D is already cheap next to the rest of the model.)

Training and prefill compute `y_t[j] = Σ_{s≤t} (Σ_i q_t[i] K[i, t-s] k_s[i]) v_s[j] + ...` with the kernel
`K[i, τ] = 2 Re Σ_n C b̄ ā^τ`, in one of two exact forms chosen by the length (`QUADRATIC_MAX_LENGTH`):

- up to 256 tokens, the attention-like form (`h3_quadratic`): scores `[T, T]` per head (O(T² Dk)), then a
  `[T, T] @ [T, Dv]` product;
- beyond, a long convolution through the FFT (FlashConv's algorithm, `h3_fft_conv`, O(T log T) per channel) of the
  per-token products `k_s v_sᵀ` (`T · Dk · Dv` per head).

Measured forward + backward on one CPU thread (batch 32, 2 heads, head_dim 32, 32 modes; a loaded 2-core machine, so
ratios only): quadratic / FFT 51 / 783 ms at T = 16, 92 / 1723 at 32, 327 / 3562 at 64, 1860 / 6174 at 128, 5281 /
12850 at 256, 24.9 / 27.5 s at 384. There is no chunked form (quadratic within chunks, the state passed between
them): its state per chunk (`Dk · Dv · N/2` complex) is as large as the `k v` products of 64 tokens, so at chunk 64
it kept more activation memory than the FFT (1034 vs 789 MiB saved for backward at T = 512) and was not worth it.
Prefill also returns the state after the last token (`h3_final_state`). Decoding runs the recurrence with the state
in the `DynamicCache` slot of the layer (O(1) per token).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from transformers import initialization as init
from transformers.cache_utils import Cache

from .configuration_decay_linear_attn import DecayLinearAttnConfig, cache_state_indices
from .decay_linear_attention import causal_depthwise_conv, read_state

# Up to this many tokens the attention-like form (`h3_quadratic`, O(T² D) per head) is used for training and prefill,
# beyond it the FFT (`h3_fft_conv`, O(T log T · D²)). Measured (module docstring): the quadratic form is faster up to
# about 384 tokens and keeps far less for backward; 256 leaves a margin.
QUADRATIC_MAX_LENGTH = 256


# --------------------------------------------------------------------------------------------------
# The diagonal SSM in its three forms (naive recurrence for tests: `tests/test_h3.py`)
# --------------------------------------------------------------------------------------------------
def s4d_modes(
    log_dt: torch.Tensor, a_real_log: torch.Tensor, a_imag: torch.Tensor, c: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The discretised modes: `ā` (`[D, N/2]` complex) and the read-out `C b̄` (same shape), in complex64."""
    a = torch.complex(-torch.exp(a_real_log.float()), a_imag.float())
    dt_a = torch.exp(log_dt.float())[:, None] * a
    a_bar = torch.exp(dt_a)
    b_bar = (a_bar - 1) / a  # zero-order hold with B = 1
    return a_bar, torch.view_as_complex(c.float().contiguous()) * b_bar


def mode_powers(a_bar: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
    """`ā^e` for every mode and every exponent in `exponents` (integers): `[D, N/2, len(exponents)]` complex."""
    return torch.exp(torch.log(a_bar)[..., None] * exponents.to(a_bar.device))


def s4d_kernel(a_bar: torch.Tensor, c_b: torch.Tensor, length: int) -> torch.Tensor:
    """`K[i, τ] = 2 Re Σ_n (C b̄)[i, n] ā[i, n]^τ` for `τ < length`: `[D, length]` fp32 (a Vandermonde product)."""
    powers = mode_powers(a_bar, torch.arange(length))
    return 2 * torch.einsum("dn,dnt->dt", c_b, powers).real


def h3_final_state(
    k: torch.Tensor, v: torch.Tensor, a_bar: torch.Tensor, initial_state: torch.Tensor | None = None
) -> torch.Tensor:
    """The state after the last token, `S_{T-1}[i, j, n] = Σ_s ā[i, n]^(T-1-s) k_s[i] v_s[j] + ā^T S0[i, j, n]`
    (`[B, H, Dk, Dv, N/2]` complex), for prefill."""
    length = k.shape[2]
    powers = mode_powers(a_bar, torch.arange(length - 1, -1, -1))  # [Dk, N/2, T]
    # Writing the output in this layout dominates; real matmuls over s measured no faster than the einsum.
    state = torch.einsum("int,bhti,bhtj->bhijn", powers, k.to(powers.dtype), v.to(powers.dtype))
    if initial_state is not None:
        state = state + a_bar[:, None, :] ** length * initial_state
    return state


def initial_state_readout(
    q: torch.Tensor, a_bar: torch.Tensor, c_b: torch.Tensor, initial_state: torch.Tensor
) -> torch.Tensor:
    """What a state carried in from earlier tokens adds to every output: it decays into position `t` as
    `y_t[j] += 2 Re Σ_{i,n} q_t[i] (C b̄)[i, n] ā[i, n]^(t+1) S0[i, j, n]` (`[B, H, T, Dv]`, fp32)."""
    read_out = c_b[..., None] * mode_powers(a_bar, torch.arange(1, q.shape[2] + 1))  # [Dk, N/2, T]
    return (
        2 * torch.einsum("bhti,int,bhijn->bhtj", q.float().to(read_out.dtype), read_out, initial_state).real
    )


def h3_fft_conv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a_bar: torch.Tensor,
    c_b: torch.Tensor,
    skip: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`y_t[j] = Σ_i q_t[i] (Σ_{s≤t} K[i, t-s] k_s[i] v_s[j] + D[i] k_t[i] v_t[j])` (plus the decayed initial state)
    by FFT over time, in fp32.

    `q`, `k`, `v`: `[B, H, T, D]`; `a_bar`, `c_b`: `[D, N/2]` complex; `skip`: `[D]`; `initial_state`: `[B, H, D, D,
    N/2]` complex. Returns `y` (`[B, H, T, D]`, fp32) and, if asked, the state after the last token.
    """
    length = q.shape[2]
    kv = k.float()[..., :, None] * v.float()[..., None, :]  # [B, H, T, Dk, Dv]
    kernel = s4d_kernel(a_bar, c_b, length)  # [Dk, T]
    n_fft = 2 * length  # zero-padded: a linear (causal), not circular, convolution
    kv_f = torch.fft.rfft(kv, n=n_fft, dim=2)
    kernel_f = torch.fft.rfft(kernel, n=n_fft, dim=-1).transpose(0, 1)[:, :, None]  # [F, Dk, 1]
    mixed = torch.fft.irfft(kv_f * kernel_f, n=n_fft, dim=2)[:, :, :length]
    mixed = mixed + skip.float()[:, None] * kv
    y = torch.einsum("bhti,bhtij->bhtj", q.float(), mixed)
    if initial_state is not None:
        y = y + initial_state_readout(q, a_bar, c_b, initial_state)
    final_state = h3_final_state(k, v, a_bar, initial_state) if output_final_state else None
    return y, final_state


def lag_matrix(kernel: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """The kernel laid out by lag: `M[t, s, i] = K[i, t - s]` for `s ≤ t` (plus `D[i]` at `s = t`), 0 above the
    diagonal. `kernel`: `[D, T]`, `skip`: `[D]`; returns `[T, T, D]` fp32."""
    length = kernel.shape[-1]
    lags = torch.arange(length, device=kernel.device)
    lags = lags[:, None] - lags[None, :]  # t - s
    by_lag = kernel.float().T.clone()  # [T, D]
    by_lag[0] += skip.float()  # the skip D acts at lag 0
    return by_lag[lags.clamp(min=0)] * (lags >= 0)[..., None]


class LaggedScores(torch.autograd.Function):
    """`A[n, t, s] = Σ_i q[n, t, i] M[t, s, i] k[n, s, i]` for `q`, `k`: `[N, T, D]` and `M`: `[T, T, D]` (fp32).

    No pair of the three operands shares only summed indices, so this is not a matmul: it is elementwise work over a
    `[N, T, T, D]` volume. Done for all `n` at once (as `torch.einsum` does) every pass streams that volume through
    memory; done a few `n` at a time it stays in cache, which measured 3-5x faster forward + backward at T = 32-64,
    and autograd keeps only `q`, `k` and `M`.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, lagged: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(q, k, lagged)
        # About 256 KiB of the [T, T, D] volume per block.
        ctx.block = block = max(1, 2**16 // lagged.numel())
        scores = q.new_empty(q.shape[0], q.shape[1], k.shape[1])
        for start in range(0, q.shape[0], block):
            q_block, k_block = q[start : start + block], k[start : start + block]
            scores[start : start + block] = (q_block[:, :, None] * lagged * k_block[:, None]).sum(-1)
        return scores

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, lagged = ctx.saved_tensors
        grad_q, grad_k, grad_lagged = torch.empty_like(q), torch.empty_like(k), torch.zeros_like(lagged)
        for start in range(0, q.shape[0], ctx.block):
            end = start + ctx.block
            grad_block = grad[start:end, :, :, None]
            weighted = grad_block * lagged  # [n, T, S, D]
            grad_q[start:end] = (weighted * k[start:end, None]).sum(2)
            grad_k[start:end] = (weighted * q[start:end, :, None]).sum(1)
            grad_lagged += (grad_block * q[start:end, :, None] * k[start:end, None]).sum(0)
        return grad_q, grad_k, grad_lagged


def h3_quadratic(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a_bar: torch.Tensor,
    c_b: torch.Tensor,
    skip: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`h3_fft_conv`'s output and state, in the attention-like form: scores `A[t, s] = Σ_i q_t[i] K[i, t-s] k_s[i]`
    (`O(T² D)` per head) then `y = A @ v`, in fp32. No per-token `Dk × Dv` product is ever formed, which makes it
    the fastest form for short sequences (see `QUADRATIC_MAX_LENGTH`).
    """
    length = q.shape[2]
    q, k, v = q.float(), k.float(), v.float()
    lagged = lag_matrix(s4d_kernel(a_bar, c_b, length), skip)  # [T, T, Dk]
    scores = LaggedScores.apply(q.flatten(0, 1), k.flatten(0, 1), lagged).view(*q.shape[:3], length)
    y = scores @ v
    if initial_state is not None:
        y = y + initial_state_readout(q, a_bar, c_b, initial_state)
    final_state = h3_final_state(k, v, a_bar, initial_state) if output_final_state else None
    return y, final_state


def h3_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a_bar: torch.Tensor,
    c_b: torch.Tensor,
    skip: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence, one token at a time (decoding; O(1) per token): the same `y` and final state as `h3_fft_conv`."""
    batch, heads, length, dim = q.shape
    state = initial_state
    if state is None:
        state = torch.zeros(batch, heads, dim, dim, a_bar.shape[-1], dtype=a_bar.dtype, device=q.device)
    outputs = []
    for t in range(length):
        kv = k[:, :, t].float()[..., :, None] * v[:, :, t].float()[..., None, :]  # [B, H, Dk, Dv]
        state = a_bar[:, None, :] * state + kv[..., None]
        mixed = 2 * torch.einsum("dn,bhden->bhde", c_b, state).real + skip.float()[:, None] * kv
        outputs.append(torch.einsum("bhi,bhij->bhj", q[:, :, t].float(), mixed))
    return torch.stack(outputs, dim=2), state


class DiagonalSSM(nn.Module):
    r"""
    The parameters of an S4D diagonal SSM over `channels` channels with `N/2 = h3_state_size / 2` complex modes each:
    `log_dt` (the step Δ per channel), `a_real_log` and `a_imag` (`a = -exp(a_real_log) + i a_imag`), `c` (the
    complex read-out, as real pairs) and the skip `skip` (`D`). `modes()` discretises them (zero-order hold).
    """

    def __init__(self, config: DecayLinearAttnConfig, channels: int, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        modes = config.h3_state_size // 2
        self.log_dt = nn.Parameter(torch.empty(channels))
        self.a_real_log = nn.Parameter(torch.empty(channels, modes))
        self.a_imag = nn.Parameter(torch.empty(channels, modes))
        self.c = nn.Parameter(torch.empty(channels, modes, 2))
        self.skip = nn.Parameter(torch.empty(channels))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """S4D-Lin: `a_n = -1/2 + iπn`, `Δ` log-uniform in `[h3_dt_min, h3_dt_max]`, `C ~ N(0, 1/2)` per part."""
        config, (channels, modes) = self.config, self.a_imag.shape
        log_dt = torch.rand(channels) * (math.log(config.h3_dt_max) - math.log(config.h3_dt_min))
        init.copy_(self.log_dt, log_dt + math.log(config.h3_dt_min))
        init.constant_(self.a_real_log, math.log(0.5))
        init.copy_(self.a_imag, math.pi * torch.arange(modes).float().expand(channels, modes))
        init.normal_(self.c, mean=0.0, std=0.5**0.5)
        init.ones_(self.skip)

    def modes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(ā, C b̄)`, each `[channels, N/2]` complex."""
        return s4d_modes(self.log_dt, self.a_real_log, self.a_imag, self.c)

    def read_state(self, cache: Cache | None) -> torch.Tensor | None:
        """The complex state kept (as real pairs) in the layer's `DynamicCache` slot, or `None` before any token."""
        state = read_state(cache, self.layer_idx, cache_state_indices(self.config)["recurrent"])
        return torch.view_as_complex(state) if state is not None else None

    def write_state(self, cache: Cache, state: torch.Tensor) -> None:
        state_idx = cache_state_indices(self.config)["recurrent"]
        cache.update_recurrent_state(
            torch.view_as_real(state.contiguous()), self.layer_idx, state_idx=state_idx
        )


class H3Attention(nn.Module):
    r"""
    H3's token mixer (`token_mixer="h3"`): `o_proj(Q ⊙ SSM_diag(SSM_shift(K) ⊙ V))` per head, see the module
    docstring. `short_conv_size` is the shift SSM's length (0: H3 without it); `ssm` is the diagonal SSM, one per
    key channel shared by the heads. The state (`[B, H, D, D, N/2]` complex, kept as real pairs) and the shift
    SSM's last inputs live in the layer's `DynamicCache` slot.
    """

    def __init__(self, config: DecayLinearAttnConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.states = cache_state_indices(config)
        inner = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.o_proj = nn.Linear(inner, config.hidden_size, bias=False)
        self.short_conv_size = config.short_conv_size
        if self.short_conv_size:
            self.shift_conv = nn.Conv1d(
                inner, inner, kernel_size=self.short_conv_size, groups=inner, bias=False
            )
        self.ssm = DiagonalSSM(config, self.head_dim, layer_idx)

    def forward(
        self,
        hidden_states: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        if padding_mask is not None:
            # Padded inputs become zeros: k v = 0 there, so the state and the shift SSM of later tokens see nothing.
            hidden_states = hidden_states * padding_mask.bool()[..., None].to(hidden_states.dtype)
        state = self.ssm.read_state(cache)

        # 1. Projections and the shift SSM on K
        query_states = self.q_proj(hidden_states)
        key_states = self.k_proj(hidden_states)
        value_states = self.v_proj(hidden_states)
        if self.short_conv_size:
            key_states = causal_depthwise_conv(
                key_states, self.shift_conv.weight, cache, self.layer_idx, self.states["recurrent"]
            )

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        # 2. The diagonal SSM over the key-value products, read out by Q: FFT for training and prefill, recurrence
        # for single-token decoding.
        a_bar, c_b = self.ssm.modes()
        args = (heads(query_states), heads(key_states), heads(value_states), a_bar, c_b, self.ssm.skip, state)
        if length == 1:
            attn_output, state = h3_recurrent(*args)
        elif length <= QUADRATIC_MAX_LENGTH:
            attn_output, state = h3_quadratic(*args, output_final_state=cache is not None)
        else:
            attn_output, state = h3_fft_conv(*args, output_final_state=cache is not None)
        if cache is not None:
            self.ssm.write_state(cache, state)

        # 3. Output projection
        attn_output = attn_output.transpose(1, 2).reshape(batch, length, -1).to(hidden_states.dtype)
        return self.o_proj(attn_output)


def s4d_conv(
    u: torch.Tensor,
    a_bar: torch.Tensor,
    c_b: torch.Tensor,
    skip: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The diagonal SSM alone on `u` (`[B, T, C]`, one SSM per channel): `y_t = Σ_{s≤t} K[:, t-s] u_s + D u_t`, by
    FFT for `T > 1` and by the recurrence `S_t = ā S_{t-1} + u_t`, `y_t = 2 Re Σ_n C b̄ S_t + D u_t` for one token.
    `initial_state` / the returned state: `[B, C, N/2]` complex."""
    length = u.shape[1]
    u = u.float()
    if length == 1:
        state = (
            initial_state
            if initial_state is not None
            else torch.zeros(u.shape[0], *a_bar.shape, dtype=a_bar.dtype, device=u.device)
        )
        state = a_bar * state + u[:, 0, :, None]
        y = 2 * torch.einsum("cn,bcn->bc", c_b, state).real + skip.float() * u[:, 0]
        return y[:, None], state
    kernel = s4d_kernel(a_bar, c_b, length)  # [C, T]
    y = torch.fft.irfft(
        torch.fft.rfft(u, n=2 * length, dim=1) * torch.fft.rfft(kernel, n=2 * length, dim=-1).T,
        n=2 * length,
        dim=1,
    )[:, :length]
    y = y + skip.float() * u
    if initial_state is not None:
        powers = mode_powers(a_bar, torch.arange(1, length + 1))  # ā^(t+1)
        y = y + 2 * torch.einsum("cn,cnt,bcn->btc", c_b, powers, initial_state).real
    final_state = None
    if output_final_state:
        powers = mode_powers(a_bar, torch.arange(length - 1, -1, -1))  # ā^(T-1-s)
        final_state = torch.einsum("cnt,btc->bcn", powers, u.to(powers.dtype))
        if initial_state is not None:
            final_state = final_state + a_bar**length * initial_state
    return y, final_state


class S4DMixer(nn.Module):
    r"""
    The diagonal SSM alone (`token_mixer="s4d"`, S4D-like; no Q, K or shift SSM): `o_proj(gelu(SSM_diag(W_in x)))`
    with one SSM per channel. H3's ablation of what a diagonal SSM can do without comparing tokens.
    """

    def __init__(self, config: DecayLinearAttnConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        inner = config.num_attention_heads * config.head_dim
        self.in_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.o_proj = nn.Linear(inner, config.hidden_size, bias=False)
        self.ssm = DiagonalSSM(config, inner, layer_idx)

    def forward(
        self,
        hidden_states: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if padding_mask is not None:  # padded inputs become zeros: the state sees nothing of them
            hidden_states = hidden_states * padding_mask.bool()[..., None].to(hidden_states.dtype)
        state = self.ssm.read_state(cache)
        a_bar, c_b = self.ssm.modes()
        y, state = s4d_conv(self.in_proj(hidden_states), a_bar, c_b, self.ssm.skip, state, cache is not None)
        if cache is not None:
            self.ssm.write_state(cache, state)
        return self.o_proj(F.gelu(y).to(hidden_states.dtype))


__all__ = [
    "DiagonalSSM",
    "H3Attention",
    "S4DMixer",
    "h3_fft_conv",
    "h3_recurrent",
    "mode_powers",
    "s4d_conv",
    "s4d_kernel",
    "s4d_modes",
]
