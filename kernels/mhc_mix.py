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
"""Stream-mixing kernels of mHC (paper §5.4-5.5), in Triton.

References: `hc_pre_mix` and `hc_res_post_mix` in `transformers_mhc.models.mhc_ops`.

- `hc_pre_mix_triton`: `Σ_j h_pre_j x_j`, reading `nC` and writing `C` per token.
- `hc_res_post_mix_triton`: `h_res · x + h_postᵀ · f` in one pass, reading `(n+1)C` and writing `nC` per
  token (unfused: `(3n+1)C` reads, `3nC` writes).

Tokens are flattened to `T` rows; each program owns a `[BLOCK_T, BLOCK_C]` slab of hidden units and walks the
`n` streams with an unrolled loop, so each stream row is loaded exactly once and accumulated in fp32. The
coefficient gradients (reductions over C) are written as per-C-block partials and summed on the host, which
keeps them deterministic without atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import H100_SM_COUNT, device_guard, sm_count

# A program's tile: BLOCK_T tokens x NP (n padded) stream rows x BLOCK_C hidden units, which both kernels hold in
# registers (res+post: the fp32 accumulator; pre: the n unrolled stream loads). 4096 elements with 8 warps is 16 per
# thread and BLOCK_C up to 1024 gives 16-byte bf16 loads; no kernel spills on sm_90 up to n = 16 (the old cap,
# 1024 elements and BLOCK_C <= 128, read 4 bytes per thread and row). Small inputs (decode) get smaller tiles, down
# to _MIN_TILE, until the grid covers the device's SMs (`runtime.sm_count`).
_MAX_TILE = 4096
_MIN_TILE = 1024
_MAX_BLOCK_C = 1024


def _blocks(num_tokens: int, C: int, rows: int, tile: int = _MAX_TILE) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_C) with BLOCK_T · rows · BLOCK_C <= tile (BLOCK_C >= 16)."""
    block_c = min(_MAX_BLOCK_C, triton.next_power_of_2(max(C, 1)), max(16, tile // rows))
    block_t = max(1, min(tile // (rows * block_c), triton.next_power_of_2(max(num_tokens, 1))))
    return block_t, block_c


def _launch(num_tokens: int, C: int, n: int, programs: int) -> tuple[dict, dict, tuple[int, int]]:
    """(BLOCK_T/BLOCK_C constexprs, launch options, grid) of both mix kernels for `[num_tokens, n, C]` streams,
    shrinking the tile until the grid has at least `programs` programs (the device's SM count) or the tile its
    floor."""
    rows = triton.next_power_of_2(n)
    tile = _MAX_TILE
    while True:
        block_t, block_c = _blocks(num_tokens, C, rows, tile)
        grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(C, block_c))
        if tile <= _MIN_TILE or grid[0] * grid[1] >= programs:
            break
        tile //= 2
    num_warps = 8 if block_t * rows * block_c >= _MAX_TILE else 4
    return dict(BLOCK_T=block_t, BLOCK_C=block_c), {"num_warps": num_warps}, grid


@triton.jit
def _slab(num_tokens, C, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return t, c, (t < num_tokens)[:, None] & (c < C)[None, :]


# --------------------------------------------------------------------------------------------------
# h_pre · x
# --------------------------------------------------------------------------------------------------
@triton.jit
def _pre_mix_fwd_kernel(
    h_ptr, x_ptr, out_ptr, num_tokens, C, N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr
):
    t, c, mask = _slab(num_tokens, C, BLOCK_T, BLOCK_C)
    t_ok = t < num_tokens
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for j in tl.static_range(N):
        h_j = tl.load(h_ptr + t * N + j, mask=t_ok, other=0.0).to(tl.float32)
        x_j = tl.load(x_ptr + (t[:, None] * N + j) * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += h_j[:, None] * x_j
    tl.store(out_ptr + t[:, None] * C + c[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pre_mix_bwd_kernel(
    h_ptr,
    x_ptr,
    grad_out_ptr,
    grad_x_ptr,
    part_h_ptr,
    num_tokens,
    C,
    N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    t, c, mask = _slab(num_tokens, C, BLOCK_T, BLOCK_C)
    t_ok = t < num_tokens
    g = tl.load(grad_out_ptr + t[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
    part = part_h_ptr + tl.program_id(1).to(tl.int64) * num_tokens * N
    for j in tl.static_range(N):
        offs = (t[:, None] * N + j) * C + c[None, :]
        h_j = tl.load(h_ptr + t * N + j, mask=t_ok, other=0.0).to(tl.float32)
        x_j = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(grad_x_ptr + offs, (h_j[:, None] * g).to(grad_x_ptr.dtype.element_ty), mask=mask)
        tl.store(part + t * N + j, tl.sum(g * x_j, axis=1), mask=t_ok)


# Registered ops (not autograd.Functions), so torch.compile and selective checkpointing take each launch whole.
@torch.library.custom_op("transformers_mhc::hc_pre_mix_fwd", mutates_args=())
def hc_pre_mix_fwd(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`Σ_j h_j x_j` on flattened tokens: `h [T, n]`, `x [T, n, C]` -> `[T, C]` in `x.dtype`."""
    h, x = h.contiguous(), x.contiguous()
    T, n, C = x.shape
    out = x.new_empty(T, C)
    if out.numel() > 0:
        with device_guard(x):
            blocks, options, grid = _launch(T, C, n, sm_count(x.device))
            _pre_mix_fwd_kernel[grid](h, x, out, T, C, N=n, **blocks, **options)
    return out


@hc_pre_mix_fwd.register_fake
def _(h, x):
    return x.new_empty(x.shape[0], x.shape[2])


@torch.library.custom_op("transformers_mhc::hc_pre_mix_bwd", mutates_args=())
def hc_pre_mix_bwd(
    h: torch.Tensor, x: torch.Tensor, grad_out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(grad_h, grad_x)`; `grad_h` in fp32, summed over the per-C-block partials."""
    h, x, grad_out = h.contiguous(), x.contiguous(), grad_out.contiguous()
    T, n, C = x.shape
    grad_x = torch.empty_like(x)
    blocks, options, grid = _launch(T, C, n, sm_count(x.device))
    part_h = torch.zeros(grid[1], T, n, device=x.device, dtype=torch.float32)
    if x.numel() > 0:
        with device_guard(x):
            _pre_mix_bwd_kernel[grid](h, x, grad_out, grad_x, part_h, T, C, N=n, **blocks, **options)
    return part_h.sum(0), grad_x


@hc_pre_mix_bwd.register_fake
def _(h, x, grad_out):
    return h.new_empty(h.shape, dtype=torch.float32), torch.empty_like(x)


def _save_inputs(ctx, inputs, output) -> None:
    """`setup_context` of both mix ops: their backward reads every input and nothing else."""
    ctx.save_for_backward(*inputs)


def _pre_mix_backward(ctx, grad_out: torch.Tensor):
    h, x = ctx.saved_tensors
    grad_h, grad_x = hc_pre_mix_bwd(h, x, grad_out)
    return grad_h.to(h.dtype), grad_x


hc_pre_mix_fwd.register_autograd(_pre_mix_backward, setup_context=_save_inputs)


def _flatten_tokens(*pairs: tuple[torch.Tensor, int]) -> tuple[torch.Size, list[torch.Tensor]]:
    """Broadcasts the leading (token) dims of each `(tensor, num_trailing_dims)` and flattens them to one.

    Goes through `expand` + `reshape`, which autograd differentiates (summing gradients over broadcast dims),
    so coefficients shared by all tokens (e.g. `[1, 1, n]` when they are static) just work.
    """
    batch = torch.broadcast_shapes(*(t.shape[: t.dim() - k] for t, k in pairs))
    flat = []
    for t, k in pairs:
        trailing = t.shape[t.dim() - k :]
        flat.append(t.expand(*batch, *trailing).reshape(-1, *trailing))
    return batch, flat


def hc_pre_mix_triton(h_pre: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`Σ_j h_pre_j · x_j`: the sub-layer input read from the streams, in a Triton kernel.

    Same semantics as `transformers_mhc.models.mhc_ops.hc_pre_mix`.

    Args:
        h_pre: `[..., n]` (fp32; may broadcast over tokens).
        x: `[..., n, C]` streams.

    Returns:
        `[..., C]` in `x.dtype`, accumulated in fp32.
    """
    if x.dim() < 2 or h_pre.dim() < 1 or h_pre.shape[-1] != x.shape[-2]:
        raise ValueError(
            f"h_pre [..., n] and x [..., n, C] disagree: {tuple(h_pre.shape)} vs {tuple(x.shape)}"
        )
    batch, (h, xx) = _flatten_tokens((h_pre, 1), (x, 2))
    return hc_pre_mix_fwd(h, xx).view(*batch, x.shape[-1])


# --------------------------------------------------------------------------------------------------
# h_res · x + h_postᵀ · f
# --------------------------------------------------------------------------------------------------
@triton.jit
def _res_post_mix_fwd_kernel(
    h_res_ptr,
    x_ptr,
    h_post_ptr,
    f_ptr,
    out_ptr,
    num_tokens,
    C,
    N: tl.constexpr,
    NP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    t, c, mask = _slab(num_tokens, C, BLOCK_T, BLOCK_C)
    t_ok = t < num_tokens
    i = tl.arange(0, NP)  # output stream (padded to a power of two)
    ti_ok = t_ok[:, None] & (i < N)[None, :]
    acc = tl.zeros([BLOCK_T, NP, BLOCK_C], dtype=tl.float32)
    for j in tl.static_range(N):
        # Column j of h_res times input stream j: every x row is read once.
        h_col = tl.load(h_res_ptr + t[:, None] * (N * N) + i[None, :] * N + j, mask=ti_ok, other=0.0)
        x_j = tl.load(x_ptr + (t[:, None] * N + j) * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += h_col.to(tl.float32)[:, :, None] * x_j[:, None, :]
    h_post = tl.load(h_post_ptr + t[:, None] * N + i[None, :], mask=ti_ok, other=0.0).to(tl.float32)
    f = tl.load(f_ptr + t[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
    acc += h_post[:, :, None] * f[:, None, :]
    offs = (t[:, None, None] * N + i[None, :, None]) * C + c[None, None, :]
    out_mask = mask[:, None, :] & (i < N)[None, :, None]
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _res_post_mix_bwd_kernel(
    h_res_ptr,
    x_ptr,
    h_post_ptr,
    f_ptr,
    grad_out_ptr,
    grad_x_ptr,
    grad_f_ptr,
    part_res_ptr,
    part_post_ptr,
    num_tokens,
    C,
    N: tl.constexpr,
    NP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    t, c, mask = _slab(num_tokens, C, BLOCK_T, BLOCK_C)
    t_ok = t < num_tokens
    j = tl.arange(0, NP)  # input stream (padded)
    tj_ok = t_ok[:, None] & (j < N)[None, :]
    tile_offs = (t[:, None, None] * N + j[None, :, None]) * C + c[None, None, :]
    tile_mask = mask[:, None, :] & (j < N)[None, :, None]
    x = tl.load(x_ptr + tile_offs, mask=tile_mask, other=0.0).to(tl.float32)
    f = tl.load(f_ptr + t[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
    grad_x = tl.zeros([BLOCK_T, NP, BLOCK_C], dtype=tl.float32)
    grad_f = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    cb = tl.program_id(1).to(tl.int64)
    part_res = part_res_ptr + cb * num_tokens * (N * N)
    part_post = part_post_ptr + cb * num_tokens * N
    for i in tl.static_range(N):
        # Output stream i's gradient feeds: dx += h_res[i, :]ᵀ g_i, df += h_post_i g_i,
        # dh_res[i, :] = Σ_c g_i x, dh_post_i = Σ_c g_i f.
        g_i = tl.load(grad_out_ptr + (t[:, None] * N + i) * C + c[None, :], mask=mask, other=0.0)
        g_i = g_i.to(tl.float32)
        h_row = tl.load(h_res_ptr + t[:, None] * (N * N) + i * N + j[None, :], mask=tj_ok, other=0.0)
        grad_x += h_row.to(tl.float32)[:, :, None] * g_i[:, None, :]
        h_post_i = tl.load(h_post_ptr + t * N + i, mask=t_ok, other=0.0).to(tl.float32)
        grad_f += h_post_i[:, None] * g_i
        d_row = tl.sum(g_i[:, None, :] * x, axis=2)
        tl.store(part_res + t[:, None] * (N * N) + i * N + j[None, :], d_row, mask=tj_ok)
        tl.store(part_post + t * N + i, tl.sum(g_i * f, axis=1), mask=t_ok)
    tl.store(grad_x_ptr + tile_offs, grad_x.to(grad_x_ptr.dtype.element_ty), mask=tile_mask)
    tl.store(grad_f_ptr + t[:, None] * C + c[None, :], grad_f.to(grad_f_ptr.dtype.element_ty), mask=mask)


def compile_jobs(n: int, dtype: torch.dtype, hidden: int = 4096) -> list[tuple]:
    """`(kernel, constexprs, launch options)` the launchers use for `n` streams of `hidden` units, in training
    (many tokens: the largest tiles) and at decode (one token: the smallest); `dtype` is the streams' pointer type,
    which the caller sets."""
    jobs = []
    for num_tokens in (10**6, 1):
        blocks, options, _ = _launch(num_tokens, hidden, n, H100_SM_COUNT)
        pre = dict(N=n, **blocks)
        res_post = dict(pre, NP=triton.next_power_of_2(n))
        jobs += [
            (_pre_mix_fwd_kernel, pre, options),
            (_pre_mix_bwd_kernel, pre, options),
            (_res_post_mix_fwd_kernel, res_post, options),
            (_res_post_mix_bwd_kernel, res_post, options),
        ]
    return jobs


@torch.library.custom_op("transformers_mhc::hc_res_post_mix_fwd", mutates_args=())
def hc_res_post_mix_fwd(
    h_res: torch.Tensor, x: torch.Tensor, h_post: torch.Tensor, f: torch.Tensor
) -> torch.Tensor:
    """`h_res · x + h_postᵀ · f` on flattened tokens: `[T, n, n]`, `[T, n, C]`, `[T, n]`, `[T, C]` -> `[T, n, C]`."""
    h_res, x, h_post, f = (t.contiguous() for t in (h_res, x, h_post, f))
    T, n, C = x.shape
    out = torch.empty_like(x)
    if out.numel() > 0:
        with device_guard(x):
            blocks, options, grid = _launch(T, C, n, sm_count(x.device))
            _res_post_mix_fwd_kernel[grid](
                h_res, x, h_post, f, out, T, C, N=n, NP=triton.next_power_of_2(n), **blocks, **options
            )
    return out


@hc_res_post_mix_fwd.register_fake
def _(h_res, x, h_post, f):
    return torch.empty_like(x)


@torch.library.custom_op("transformers_mhc::hc_res_post_mix_bwd", mutates_args=())
def hc_res_post_mix_bwd(
    h_res: torch.Tensor, x: torch.Tensor, h_post: torch.Tensor, f: torch.Tensor, grad_out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(grad_h_res, grad_x, grad_h_post, grad_f)`; the coefficient gradients in fp32."""
    h_res, x, h_post, f, grad_out = (t.contiguous() for t in (h_res, x, h_post, f, grad_out))
    T, n, C = x.shape
    blocks, options, grid = _launch(T, C, n, sm_count(x.device))
    grad_x = torch.empty_like(x)
    grad_f = torch.empty_like(f)
    part_res = torch.zeros(grid[1], T, n, n, device=x.device, dtype=torch.float32)
    part_post = torch.zeros(grid[1], T, n, device=x.device, dtype=torch.float32)
    if x.numel() > 0:
        with device_guard(x):
            _res_post_mix_bwd_kernel[grid](
                h_res, x, h_post, f, grad_out, grad_x, grad_f, part_res, part_post, T, C,
                N=n, NP=triton.next_power_of_2(n), **blocks, **options,
            )  # fmt: skip
    return part_res.sum(0), grad_x, part_post.sum(0), grad_f


@hc_res_post_mix_bwd.register_fake
def _(h_res, x, h_post, f, grad_out):
    return (
        h_res.new_empty(h_res.shape, dtype=torch.float32),
        torch.empty_like(x),
        h_post.new_empty(h_post.shape, dtype=torch.float32),
        torch.empty_like(f),
    )


def _res_post_mix_backward(ctx, grad_out: torch.Tensor):
    h_res, x, h_post, f = ctx.saved_tensors
    grad_res, grad_x, grad_post, grad_f = hc_res_post_mix_bwd(h_res, x, h_post, f, grad_out)
    return grad_res.to(h_res.dtype), grad_x, grad_post.to(h_post.dtype), grad_f


hc_res_post_mix_fwd.register_autograd(_res_post_mix_backward, setup_context=_save_inputs)


def hc_res_post_mix_triton(
    h_res: torch.Tensor, x: torch.Tensor, h_post: torch.Tensor, f: torch.Tensor
) -> torch.Tensor:
    """`h_res · x + h_postᵀ · f`: the streams after a sub-layer, in one Triton pass.

    Same semantics as `transformers_mhc.models.mhc_ops.hc_res_post_mix`.

    Args:
        h_res: `[..., n, n]` (row `i` says how much of each stream flows into stream `i`; may broadcast).
        x: `[..., n, C]` streams before the sub-layer.
        h_post: `[..., n]` weights writing the sub-layer output into each stream (may broadcast).
        f: `[..., C]` sub-layer output.

    Returns:
        `[..., n, C]` in `x.dtype`, accumulated in fp32.
    """
    if x.dim() < 2:
        raise ValueError(f"x must be [..., n, C], got {tuple(x.shape)}")
    n, C = x.shape[-2:]
    if h_res.shape[-2:] != (n, n) or h_post.shape[-1:] != (n,) or f.shape[-1:] != (C,):
        raise ValueError(
            f"shapes disagree: h_res {tuple(h_res.shape)} (want [..., {n}, {n}]), x {tuple(x.shape)}, "
            f"h_post {tuple(h_post.shape)} (want [..., {n}]), f {tuple(f.shape)} (want [..., {C}])"
        )
    batch, (hr, xx, hp, ff) = _flatten_tokens((h_res, 2), (x, 2), (h_post, 1), (f, 1))
    # The output follows x's dtype (as the reference): if f has another dtype, the kernel casts on store.
    return hc_res_post_mix_fwd(hr, xx, hp, ff).view(*batch, n, C)


__all__ = [
    "compile_jobs",
    "hc_pre_mix_bwd",
    "hc_pre_mix_fwd",
    "hc_pre_mix_triton",
    "hc_res_post_mix_bwd",
    "hc_res_post_mix_fwd",
    "hc_res_post_mix_triton",
]
