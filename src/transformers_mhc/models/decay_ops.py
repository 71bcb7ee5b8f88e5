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
"""Pure-PyTorch linear attention with decay: chunked (training / prefill), recurrent (decoding), naive (tests).

All functions take heads-first tensors

    q, k: [B, H, T, Dk]    v: [B, H, T, Dv]    log_decay: [B, H, T] (scalar decay) or [B, H, T, Dk] (vector decay)

with `log_decay <= 0`, and compute

    S_t = diag(exp(log_decay_t)) S_{t-1} + k_t v_t^T        o_t = scale * q_t^T S_t

(the delta-rule variant: `S_t = (I - beta_t k_t k_t^T) diag(exp(log_decay_t)) S_{t-1} + k_t v_t^T`, which has no
Triton kernel: its ops always run here, and `kernel_backend="triton"` is refused with a `ValueError`).
They return `(o, final_state)`: `o` is `[B, H, T, Dv]` in `q.dtype`; the state `[B, H, Dk, Dv]` is kept in float32
(float64 when the inputs are float64, so `gradcheck` can run on the chunked form).

Numerics of the chunked form. Inside a chunk every decay product `prod_{j<m<=i} lambda_m` is computed as
`exp(segment sum of log_decay)` where the segment sum is never positive:

- scalar decay: the `[C, C]` matrix of segment sums is built by a masked cumulative sum (exact: no difference of two
  large cumulative sums), masked to `-inf` above the diagonal *before* `exp`, so neither `exp` nor its gradient
  overflows;
- vector decay: the `[C, C]` matrix is built over a binary tree of blocks. Each lower-left block (rows `i` in the
  right half, columns `j` in the left half) splits the factor at the last position `r` of the left half,
  `exp(b_i - b_j) = exp(b_i - b_r) * exp(b_r - b_j)`; both exponents are <= 0 because `j <= r < i`, and each is a
  local sum of log decays (never a difference of two large cumulative sums).

So strong decays (`log_decay <= -10`, or `-inf`-like values from saturated gates) underflow to 0 instead of
overflowing to `inf`/`NaN`, for any chunk size. The state is carried across chunks in a Python loop over
`unbind`-ed chunks; everything parallel over chunks is computed in batched matmuls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .mhc_ops import use_triton_kernels

# The Triton kernels live in a subpackage that does not travel with remote-code checkpoints, so they are optional.
try:
    from transformers_mhc.kernels.decay_linear_attn import (
        MAX_HEAD_DIM_K,
        SUB_CHUNK,
        can_launch_on,
        chunk_decay_linear_attn_triton,
        fused_recurrent_decay_triton,
    )
except ImportError:
    can_launch_on = chunk_decay_linear_attn_triton = fused_recurrent_decay_triton = None
    MAX_HEAD_DIM_K, SUB_CHUNK = 256, 16


__all__ = [
    "chunk_decay_linear_attn",
    "recurrent_decay_linear_attn",
    "naive_decay_linear_attn",
    "chunk_delta_rule_decay",
    "recurrent_delta_rule_decay",
    "naive_delta_rule_decay",
]


def _use_decay_kernels(
    kernel_backend: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor,
    initial_state: Tensor | None,
    chunk_size,
) -> bool:
    """The dispatch decision of the decay ops (see `mhc_ops.use_triton_kernels`), with the kernels' own limits."""
    if kernel_backend == "torch":  # before any check: the reference path never depends on the kernels
        return False
    tensors = (q, k, v, log_decay) + (() if initial_state is None else (initial_state,))
    unsupported = None
    if q.shape[-1] > MAX_HEAD_DIM_K:
        unsupported = f"key head dim {q.shape[-1]} > {MAX_HEAD_DIM_K} (the kernels hold it in one tile)"
    elif len({q.dtype, k.dtype, v.dtype}) > 1:
        unsupported = f"q, k, v of different dtypes {q.dtype}, {k.dtype}, {v.dtype}"
    elif q.shape[2] == 0:
        unsupported = "an empty sequence"
    elif (
        q.shape[0] * q.shape[1] > 65535
    ):  # the kernels put batch x heads on a grid axis that CUDA caps at 65535
        unsupported = f"batch x heads = {q.shape[0] * q.shape[1]} > 65535"
    elif chunk_size is not None and (chunk_size < SUB_CHUNK or chunk_size & (chunk_size - 1)):
        unsupported = f"chunk_size {chunk_size} (the kernels need a power of two >= {SUB_CHUNK})"
    return use_triton_kernels("decay", kernel_backend, tensors, can_launch_on, unsupported)


# Why the delta-rule ops never take the Triton path (the dispatch's "unsupported" reason, naming the config field).
_NO_DELTA_RULE_KERNEL = (
    "`use_delta_rule=True` has no Triton kernel (the delta rule runs the pure-PyTorch path)"
)


def _check_delta_rule_backend(
    kernel_backend: str, q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor
) -> None:
    """The dispatch decision of the delta-rule ops, which have no kernel: through `mhc_ops.use_triton_kernels` like
    every op, with the missing kernel as the unsupported input. So `"torch"` is silent, `"auto"` takes the torch path
    and logs why once, `"triton"` raises `ValueError` naming `kernel_backend` and `use_delta_rule`, and an unknown
    backend raises as everywhere."""
    # Called for its checks, errors and log only: with a reason given it never answers True.
    use_triton_kernels(
        "delta-rule", kernel_backend, (q, k, v, log_decay), can_launch_on, _NO_DELTA_RULE_KERNEL
    )


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half / bfloat16 / float32 inputs, float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor) -> bool:
    """Validates shapes and returns whether the decay is per key channel (vector) or per head (scalar)."""
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, H, T, Dk], got {tuple(q.shape)} and {tuple(k.shape)}.")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, H, T, Dv] matching q {tuple(q.shape)}, got {tuple(v.shape)}.")
    if log_decay.shape == q.shape[:3]:
        return False
    if log_decay.shape == q.shape:
        return True
    raise ValueError(
        f"log_decay must be [B, H, T] (scalar decay) or [B, H, T, Dk] (vector decay) for q of shape "
        f"{tuple(q.shape)}, got {tuple(log_decay.shape)}."
    )


def _initial_state(initial_state: Tensor | None, q: Tensor, v: Tensor, dtype: torch.dtype) -> Tensor:
    batch, heads, _, dk = q.shape
    if initial_state is None:
        return q.new_zeros(batch, heads, dk, v.shape[-1], dtype=dtype)
    return initial_state.to(dtype)


def _reverse_exclusive_cumsum(x: Tensor, dim: int) -> Tensor:
    """`out_j = sum_{m > j} x_m` along `dim`, accumulated from the end (no subtraction of two large sums)."""
    shifted = torch.cat([x.narrow(dim, 1, x.shape[dim] - 1), torch.zeros_like(x.narrow(dim, 0, 1))], dim=dim)
    return shifted.flip(dim).cumsum(dim).flip(dim)


def _segment_sum(x: Tensor) -> Tensor:
    """Exact segment sums over the last dim (length `L`).

    Returns `[..., L, L]` with `out[..., i, j] = sum_{j < m <= i} x[..., m]` for `j <= i` and `-inf` above the
    diagonal, computed by a masked cumulative sum (as transformers' Mamba2 does) so there is no cancellation.
    """
    length = x.shape[-1]
    x = x[..., None].expand(*x.shape, length)  # [..., m, j]
    strictly_lower = torch.ones(length, length, dtype=torch.bool, device=x.device).tril(-1)
    x = x.masked_fill(~strictly_lower, 0.0)  # keep x_m for m > j
    segsum = torch.cumsum(x, dim=-2)  # [..., i, j] = sum_{j < m <= i} x_m
    lower = torch.ones(length, length, dtype=torch.bool, device=x.device).tril(0)
    return segsum.masked_fill(~lower, float("-inf"))


def _intra_chunk_scores_scalar(q: Tensor, k: Tensor, g: Tensor, strict: bool) -> Tensor:
    """`A[i, j] = (q_i . k_j) * prod_{j<m<=i} exp(g_m)` for `j <= i` (`j < i` if `strict`), 0 elsewhere.

    q, k: [..., C, Dk]; g: [..., C] (log decay within the chunk).
    """
    decay = torch.exp(_segment_sum(g))  # 0 above the diagonal
    scores = (q @ k.transpose(-1, -2)) * decay
    if strict:
        scores = scores.tril(-1)
    return scores


def _intra_chunk_scores_vector(q: Tensor, k: Tensor, g: Tensor, strict: bool) -> Tensor:
    """`A[i, j] = sum_d q_id k_jd prod_{j<m<=i} exp(g_md)` for `j <= i` (`j < i` if `strict`), 0 elsewhere.

    q, k, g: [..., C, Dk] with C a power of two. Built over a binary tree of blocks: the lower-left quarter of every
    `[2s, 2s]` diagonal block pairs rows `i` of its right half with columns `j` of its left half, and splits the decay
    at the last position `r` of the left half, `exp(b_i - b_j) = exp(b_i - b_r) * exp(b_r - b_j)`. Both exponents
    are sums of log decays (<= 0) over `(r, i]` and `(j, r]`, computed as cumulative sums and as a product with a
    0/1 triangular matrix (exact sums of same-sign terms, no difference of two large sums). The cost is `log2(C)`
    batched matmuls and elementwise work on `[C, Dk]` tensors; nothing of size `[C, C, Dk]` is materialised.
    """
    *lead, chunk, dk = q.shape
    diagonal = q.new_zeros(*lead, chunk) if strict else (q * k).sum(-1)  # i == j: no decay
    scores = torch.diag_embed(diagonal)
    size = 1
    while size < chunk:
        pairs = chunk // (2 * size)
        q_left, q_right = q.reshape(*lead, pairs, 2, size, dk).unbind(-3)
        k_left, k_right = k.reshape(*lead, pairs, 2, size, dk).unbind(-3)
        g_left, g_right = g.reshape(*lead, pairs, 2, size, dk).unbind(-3)
        after = torch.ones(size, size, dtype=g.dtype, device=g.device).triu(1)  # after[j, m] = 1 for m > j
        q_right = q_right * torch.exp(g_right.cumsum(-2))  # decay over (r, i]
        k_left = k_left * torch.exp(after @ g_left)  # decay over (j, r]
        if size <= 2:  # tiny blocks: a broadcast product beats thousands of 2x2 matmuls
            cross = (q_right[..., :, None, :] * k_left[..., None, :, :]).sum(-1)
        else:
            cross = q_right @ k_left.transpose(-1, -2)  # [..., pairs, size, size]
        # Write the lower-left quarters of the `pairs` diagonal blocks of size 2s (a strided view of `scores`).
        blocks = scores.view(*lead, pairs, 2 * size, pairs, 2 * size).diagonal(dim1=-4, dim2=-2)
        blocks[..., size:, :size, :] = cross.movedim(-3, -1)
        size *= 2
    return scores


def _intra_chunk_scores(q: Tensor, k: Tensor, g: Tensor, strict: bool) -> Tensor:
    """Decay-weighted causal `Q K^T` inside each chunk; `g` is `[..., C]` (scalar) or `[..., C, Dk]` (vector)."""
    if g.dim() == q.dim() - 1:
        return _intra_chunk_scores_scalar(q, k, g, strict)
    chunk = q.shape[-2]
    padded = 1 << (chunk - 1).bit_length()
    if padded == chunk:
        return _intra_chunk_scores_vector(q, k, g, strict)
    # The binary tree needs a power of two: pad with inert positions (zero q, k and log decay) and crop.
    q, k, g = (F.pad(t, (0, 0, 0, padded - chunk)) for t in (q, k, g))
    return _intra_chunk_scores_vector(q, k, g, strict)[..., :chunk, :chunk]


def _to_chunks(x: Tensor, chunk_size: int, pad: int) -> Tensor:
    """[B, H, T, ...] -> [B, H, N, C, ...], zero-padding T at the end (zero k, v and log decay: a no-op step)."""
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, pad))
    batch, heads, length = x.shape[:3]
    return x.reshape(batch, heads, length // chunk_size, chunk_size, *x.shape[3:])


# A log decay of -inf (a saturated gate) is taken as this floor: its decay exp(-1e4) is exactly 0 in fp32 and fp64
# alike, and the vector form's local sums (a 0/1 matrix times the log decays) would otherwise meet 0 * -inf = NaN.
_LOG_DECAY_FLOOR = -1e4


def _chunk_prepare(q, k, v, log_decay, chunk_size, extra=()):
    """Casts to the compute dtype, pads and splits into chunks. Returns chunked tensors and the padding."""
    dtype = _compute_dtype(q.dtype)
    length = q.shape[2]
    pad = (-length) % chunk_size
    log_decay = log_decay.clamp_min(_LOG_DECAY_FLOOR)
    tensors = [t.to(dtype) for t in (q, k, v, log_decay, *extra)]
    return [_to_chunks(t, chunk_size, pad) for t in tensors], pad


def _chunk_decay_factors(g: Tensor, vector: bool):
    """From chunked log decay: factors for the inter-chunk terms.

    Returns `(to_q, to_state, chunk_decay)`:
      to_q[i] = exp(b_i) (decay from chunk start to i, inclusive), shape [..., C, 1 or Dk];
      to_state[j] = exp(b_C - b_j) (decay from j to the chunk end), shape [..., C, 1 or Dk];
      chunk_decay = exp(b_C), shape [..., 1 or Dk].
    """
    if not vector:
        g = g[..., None]
    cumulative = g.cumsum(-2)
    to_q = torch.exp(cumulative)
    to_state = torch.exp(_reverse_exclusive_cumsum(g, dim=-2))
    chunk_decay = to_q[..., -1, :]
    return to_q, to_state, chunk_decay


def _torch_chunk_decay_linear_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor,
    scale: float,
    initial_state: Tensor | None,
    output_final_state: bool,
    chunk_size: int,
) -> tuple[Tensor, Tensor | None]:
    vector = _check_inputs(q, k, v, log_decay)
    length = q.shape[2]
    (qc, kc, vc, gc), pad = _chunk_prepare(q, k, v, log_decay, chunk_size)
    state = _initial_state(initial_state, q, v, qc.dtype)

    # Everything that does not depend on the carried state, for all chunks at once.
    to_q, to_state, chunk_decay = _chunk_decay_factors(gc, vector)
    intra = _intra_chunk_scores(qc, kc, gc, strict=False) @ vc  # [B, H, N, C, Dv]
    q_inter = qc * to_q  # [B, H, N, C, Dk]
    chunk_kv = (kc * to_state).transpose(-1, -2) @ vc  # [B, H, N, Dk, Dv]: the chunk's own contribution

    # Carry the state across chunks (sequential, one small update per chunk).
    states = []
    for kv, decay in zip(chunk_kv.unbind(2), chunk_decay.unbind(2)):
        states.append(state)
        state = decay[..., None] * state + kv
    start_states = torch.stack(states, dim=2)  # state before each chunk: [B, H, N, Dk, Dv]

    out = (intra + q_inter @ start_states) * scale
    out = out.reshape(*out.shape[:2], -1, out.shape[-1])[:, :, :length]
    return out.to(q.dtype), (state if output_final_state else None)


def chunk_decay_linear_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    kernel_backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Chunked parallel linear attention with scalar or vector decay.

    Args:
        q (`torch.Tensor` of shape `[B, H, T, Dk]`): queries.
        k (`torch.Tensor` of shape `[B, H, T, Dk]`): keys.
        v (`torch.Tensor` of shape `[B, H, T, Dv]`): values.
        log_decay (`torch.Tensor` of shape `[B, H, T]` or `[B, H, T, Dk]`): `log(lambda_t) <= 0`, per head (scalar
            decay) or per key channel (vector decay).
        scale (`float`, *optional*, defaults to 1.0): multiplies the output.
        initial_state (`torch.Tensor` of shape `[B, H, Dk, Dv]`, *optional*): state before the first token.
        output_final_state (`bool`, *optional*, defaults to `False`): whether to return the state after the last token.
        chunk_size (`int`, *optional*, defaults to 64): tokens per chunk; `T` need not be a multiple of it.
        kernel_backend (`str`, *optional*, defaults to `"auto"`): `"auto"`, `"torch"` or `"triton"`, see
            `mhc_ops.use_triton_kernels` (`"auto"`: the Triton kernel where it supports the inputs).

    Returns:
        `(o, final_state)`: `o` of shape `[B, H, T, Dv]` in `q.dtype`, and the float32 state `[B, H, Dk, Dv]` (or
        `None` when `output_final_state=False`).
    """
    if _use_decay_kernels(kernel_backend, q, k, v, log_decay, initial_state, chunk_size):
        return chunk_decay_linear_attn_triton(
            q,
            k,
            v,
            log_decay,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            chunk_size=chunk_size,
        )
    return _torch_chunk_decay_linear_attn(
        q, k, v, log_decay, scale, initial_state, output_final_state, chunk_size
    )


def recurrent_decay_linear_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    kernel_backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Token-by-token recurrence, used for decoding (typically `T = 1` with the cached state).

    Same arguments and returns as [`chunk_decay_linear_attn`] without `chunk_size`; the Triton kernel it dispatches
    to is the fused decode kernel.
    """
    if _use_decay_kernels(kernel_backend, q, k, v, log_decay, initial_state, None):
        return fused_recurrent_decay_triton(
            q,
            k,
            v,
            log_decay,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
        )
    vector = _check_inputs(q, k, v, log_decay)
    dtype = _compute_dtype(q.dtype)
    state = _initial_state(initial_state, q, v, dtype)
    decay = torch.exp(log_decay.to(dtype))
    if not vector:
        decay = decay[..., None]
    outputs = []
    for q_t, k_t, v_t, decay_t in zip(
        q.to(dtype).unbind(2), k.to(dtype).unbind(2), v.to(dtype).unbind(2), decay.unbind(2)
    ):
        state = decay_t[..., None] * state + k_t[..., :, None] * v_t[..., None, :]
        outputs.append((q_t[..., None, :] @ state).squeeze(-2))
    out = torch.stack(outputs, dim=2) * scale
    return out.to(q.dtype), (state if output_final_state else None)


def naive_decay_linear_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    kernel_backend: str = "torch",
) -> tuple[Tensor, Tensor | None]:
    """Reference for tests only: the literal recurrence, one token at a time, in float64.

    Returns `o` in `q.dtype` and the final state in the compute dtype of the other functions. `kernel_backend` is
    accepted (and ignored: there is no kernel for it) so it can stand in for the other forms inside a model.
    """
    vector = _check_inputs(q, k, v, log_decay)
    batch, heads, length, dk = q.shape
    state = torch.zeros(batch, heads, dk, v.shape[-1], dtype=torch.float64, device=q.device)
    if initial_state is not None:
        state = initial_state.to(torch.float64)
    q64, k64, v64, g64 = (t.to(torch.float64) for t in (q, k, v, log_decay))
    out = []
    for t in range(length):
        lam = torch.exp(g64[:, :, t])
        lam = lam[..., :, None] if vector else lam[..., None, None]
        state = lam * state + torch.einsum("bhk,bhv->bhkv", k64[:, :, t], v64[:, :, t])
        out.append(scale * torch.einsum("bhk,bhkv->bhv", q64[:, :, t], state))
    o = torch.stack(out, dim=2).to(q.dtype)
    return o, (state.to(_compute_dtype(q.dtype)) if output_final_state else None)


# --- Delta rule with decay (DPLR): S_t = (I - beta_t k_t k_t^T) diag(lambda_t) S_{t-1} + k_t v_t^T -------------------


def chunk_delta_rule_decay(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    log_decay: Tensor,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    kernel_backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Chunked delta rule with scalar or vector decay (the DPLR extension of the decay paper).

    Writing `S_t = D_t S_{t-1} + k_t u_t^T` with `u_t = v_t - beta_t S_{t-1}^T D_t k_t` turns the delta rule into
    plain decayed linear attention over pseudo-values `u`. Inside a chunk `u` solves the unit lower-triangular system
    `(I + diag(beta) A_kk) U = V - diag(beta) (K * exp(b)) S_0`, where `A_kk` is the strictly causal decayed `K K^T`
    (same safe factorisation as the plain op). The solve is done once for all chunks; only `U = W_v - W_k S_0` and
    the state update run in the sequential loop.

    Args:
        q, k, v, log_decay, scale, initial_state, output_final_state, chunk_size: as in [`chunk_decay_linear_attn`]
            (the model passes L2-normalised `k`).
        beta (`torch.Tensor` of shape `[B, H, T]`): the delta-rule step size, in `(0, 2)` for a contraction.
        kernel_backend (`str`, *optional*, defaults to `"auto"`): the delta rule has no Triton kernel, so this is
            always the pure-PyTorch path: `"torch"` silently, `"auto"` logging the fallback once, and `"triton"` raises
            `ValueError` (as for any input the kernels cannot take).
    """
    _check_delta_rule_backend(kernel_backend, q, k, v, log_decay)
    vector = _check_inputs(q, k, v, log_decay)
    if beta.shape != q.shape[:3]:
        raise ValueError(f"beta must be [B, H, T] = {tuple(q.shape[:3])}, got {tuple(beta.shape)}.")
    length = q.shape[2]
    (qc, kc, vc, gc, bc), pad = _chunk_prepare(q, k, v, log_decay, chunk_size, extra=(beta,))
    state = _initial_state(initial_state, q, v, qc.dtype)

    to_q, to_state, chunk_decay = _chunk_decay_factors(gc, vector)
    scores_qk = _intra_chunk_scores(qc, kc, gc, strict=False)  # [B, H, N, C, C]
    scores_kk = _intra_chunk_scores(kc, kc, gc, strict=True) * bc[..., None]
    eye = torch.eye(chunk_size, dtype=qc.dtype, device=qc.device)
    rhs = torch.cat([vc, bc[..., None] * kc * to_q], dim=-1)
    solved = torch.linalg.solve_triangular(eye + scores_kk, rhs, upper=False, unitriangular=True)
    w_v, w_k = solved.split([vc.shape[-1], kc.shape[-1]], dim=-1)  # U = w_v - w_k @ S_0
    q_inter = qc * to_q
    k_state = (kc * to_state).transpose(-1, -2)  # [B, H, N, Dk, C]

    outputs = []
    for wv, wk, qi, sqk, ks, decay in zip(
        w_v.unbind(2),
        w_k.unbind(2),
        q_inter.unbind(2),
        scores_qk.unbind(2),
        k_state.unbind(2),
        chunk_decay.unbind(2),
    ):
        pseudo_values = wv - wk @ state
        outputs.append(qi @ state + sqk @ pseudo_values)
        state = decay[..., None] * state + ks @ pseudo_values

    out = torch.stack(outputs, dim=2) * scale
    out = out.reshape(*out.shape[:2], -1, out.shape[-1])[:, :, :length]
    return out.to(q.dtype), (state if output_final_state else None)


def recurrent_delta_rule_decay(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    log_decay: Tensor,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    kernel_backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Token-by-token delta rule with decay, used for decoding. Arguments as in [`chunk_delta_rule_decay`] (so
    `kernel_backend="triton"` raises: there is no kernel)."""
    _check_delta_rule_backend(kernel_backend, q, k, v, log_decay)
    vector = _check_inputs(q, k, v, log_decay)
    dtype = _compute_dtype(q.dtype)
    state = _initial_state(initial_state, q, v, dtype)
    decay = torch.exp(log_decay.to(dtype))
    if not vector:
        decay = decay[..., None]
    outputs = []
    for q_t, k_t, v_t, b_t, decay_t in zip(
        *(t.to(dtype).unbind(2) for t in (q, k, v, beta)), decay.unbind(2)
    ):
        state = decay_t[..., None] * state
        state = state - b_t[..., None, None] * k_t[..., :, None] * (k_t[..., None, :] @ state)
        state = state + k_t[..., :, None] * v_t[..., None, :]
        outputs.append((q_t[..., None, :] @ state).squeeze(-2))
    out = torch.stack(outputs, dim=2) * scale
    return out.to(q.dtype), (state if output_final_state else None)


def naive_delta_rule_decay(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    log_decay: Tensor,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    kernel_backend: str = "torch",
) -> tuple[Tensor, Tensor | None]:
    """Reference for tests only: `S_t = (I - beta_t k_t k_t^T) diag(lambda_t) S_{t-1} + k_t v_t^T` in float64.

    `kernel_backend` is accepted and ignored, as in `naive_decay_linear_attn`, so it can stand in inside a model."""
    vector = _check_inputs(q, k, v, log_decay)
    batch, heads, length, dk = q.shape
    state = torch.zeros(batch, heads, dk, v.shape[-1], dtype=torch.float64, device=q.device)
    if initial_state is not None:
        state = initial_state.to(torch.float64)
    q64, k64, v64, b64, g64 = (t.to(torch.float64) for t in (q, k, v, beta, log_decay))
    out = []
    for t in range(length):
        lam = torch.exp(g64[:, :, t])
        state = (lam[..., :, None] if vector else lam[..., None, None]) * state  # diag(lambda_t) S_{t-1}
        k_t = k64[:, :, t]
        # (I - beta k k^T) applied to the decayed state, then the write k v^T
        k_state = torch.einsum("bhk,bhkv->bhv", k_t, state)  # k^T S
        state = state - b64[:, :, t, None, None] * torch.einsum("bhk,bhv->bhkv", k_t, k_state)
        state = state + torch.einsum("bhk,bhv->bhkv", k_t, v64[:, :, t])
        out.append(scale * torch.einsum("bhk,bhkv->bhv", q64[:, :, t], state))
    o = torch.stack(out, dim=2).to(q.dtype)
    return o, (state.to(_compute_dtype(q.dtype)) if output_final_state else None)
