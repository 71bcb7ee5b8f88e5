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
"""Sinkhorn-Knopp in Triton (mHC paper §5.3): forward and an exact, recomputing backward.

Reference: `sinkhorn_knopp` in `transformers_mhc.models.mhc_ops`. Each program keeps a block of `n × n`
matrices in registers (padded to the next power of two, masked) and runs every iteration on chip in log space,
so logits of ±1e4 stay finite. Only the logits are saved for backward; the backward kernel recomputes the
iterates it needs from them on chip (O(T^1.5) half-steps of an `n × n` tile for T iterations, using one
checkpoint tile), so neither saved tensors nor HBM traffic grow with the iteration count.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import device_guard

# Elements of the padded [BLOCK_B, NP, NP] tile a program holds: 4 per thread at the default 4 warps. The backward
# keeps four such tiles live across its nested replay loops; at 8 per thread ptxas (sm_90, triton 3.9) caps it
# at 72 registers and spills 8-32 bytes for every n, at 4 per thread it needs 30-48 and spills nothing.
_TILE_ELEMENTS = 512


@triton.jit
def _log_iterate(z, mask, num_half_steps):
    """The log-space iterate after `num_half_steps` normalisations of `z` (columns first, then alternating).

    Each normalisation is `z - logsumexp(z)` over the valid entries; padded entries stay 0 and never produce
    inf/nan. (Both directions are written out: a nested jit helper is re-patched on every call by the
    interpreter, which made the tests several times slower.)
    """
    for h in range(num_half_steps):
        # Distinct names per branch: compiled Triton requires a name bound in both branches to keep its shape.
        if h % 2 == 0:  # columns: reduce over the rows, axis 1 of [B, i, j]
            mc = tl.max(tl.where(mask, z, float("-inf")), axis=1)
            # Fully padded lines have max -inf: use 0 so `z - m` stays finite (masked out anyway).
            mc = tl.where(mc == float("-inf"), 0.0, mc)[:, None, :]
            # Exponentiate -inf (not the raw value) at padded entries: exp(0 - m) could overflow there.
            sc = tl.sum(tl.exp(tl.where(mask, z - mc, float("-inf"))), axis=1)
            z = tl.where(mask, z - (mc + tl.log(tl.where(sc > 0.0, sc, 1.0))[:, None, :]), 0.0)
        else:  # rows: reduce over the columns, axis 2
            mr = tl.max(tl.where(mask, z, float("-inf")), axis=2)
            mr = tl.where(mr == float("-inf"), 0.0, mr)[:, :, None]
            sr = tl.sum(tl.exp(tl.where(mask, z - mr, float("-inf"))), axis=2)
            z = tl.where(mask, z - (mr + tl.log(tl.where(sr > 0.0, sr, 1.0))[:, :, None]), 0.0)
    return z


@triton.jit
def _tile(num_matrices, N: tl.constexpr, NP: tl.constexpr, BLOCK_B: tl.constexpr):
    """Offsets and mask of this program's [BLOCK_B, NP, NP] tile in a contiguous [B, N, N] tensor."""
    b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    i = tl.arange(0, NP)
    j = tl.arange(0, NP)
    b3 = b[:, None, None]
    i3 = i[None, :, None]
    j3 = j[None, None, :]
    offsets = b3 * (N * N) + i3 * N + j3
    mask = (b3 < num_matrices) & (i3 < N) & (j3 < N)
    return offsets, mask


@triton.jit
def _sinkhorn_fwd_kernel(
    logits_ptr,
    result_ptr,
    num_matrices,
    num_iterations,
    N: tl.constexpr,
    NP: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    offsets, mask = _tile(num_matrices, N, NP, BLOCK_B)
    logits = tl.load(logits_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    z = _log_iterate(logits, mask, 2 * num_iterations)
    tl.store(result_ptr + offsets, tl.exp(z), mask=mask)


@triton.jit
def _sinkhorn_bwd_kernel(
    logits_ptr,
    grad_result_ptr,
    grad_in_ptr,
    num_matrices,
    num_iterations,
    segment,
    N: tl.constexpr,
    NP: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    offsets, mask = _tile(num_matrices, N, NP, BLOCK_B)
    logits = tl.load(logits_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad_result_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    num_half_steps = 2 * num_iterations
    if num_half_steps == 0:
        g = tl.where(mask, g * tl.exp(logits), 0.0)
    # Walk the normalisations backwards. Half-step `step` (1-based) normalised columns if odd, rows if even;
    # for `y = x - logsumexp_d(x)`: dx = dy - exp(y) * sum_d(dy). The iterates `y` are recomputed, never
    # stored: the walk goes by segments of `segment` (even) half-steps, keeping one extra tile `zc` (the
    # iterate at the segment start, recomputed from the logits) and replaying each step from it. That costs
    # O(H^1.5) half-steps for H = 2·num_iterations instead of O(H²), and the replayed iterates are bitwise
    # those of the forward (same operations in the same order), so the gradient is exact.
    num_segments = tl.cdiv(num_half_steps, segment)
    for seg in range(num_segments):
        seg_end = num_half_steps - seg * segment
        seg_start = tl.maximum(seg_end - segment, 0)  # even: H and segment are even
        zc = _log_iterate(logits, mask, seg_start)
        for k in range(seg_end - seg_start):
            step = seg_end - k
            p = tl.where(mask, tl.exp(_log_iterate(zc, mask, step - seg_start)), 0.0)
            if step == num_half_steps:
                g = tl.where(mask, g * p, 0.0)  # through the final exp
            if step % 2 == 1:
                g = g - p * tl.expand_dims(tl.sum(g, axis=1), 1)
            else:
                g = g - p * tl.expand_dims(tl.sum(g, axis=2), 2)
    tl.store(grad_in_ptr + offsets, g, mask=mask)


def _backward_segment(num_iterations: int) -> int:
    """Even segment length near sqrt(2·num_iterations): minimises the replayed half-steps."""
    return max(2, 2 * round((2 * num_iterations) ** 0.5 / 2))


def _launch_config(num_matrices: int, n: int) -> tuple[int, int, tuple[int]]:
    np2 = triton.next_power_of_2(n)
    block_b = max(1, min(_TILE_ELEMENTS // (np2 * np2), triton.next_power_of_2(num_matrices)))
    return np2, block_b, (triton.cdiv(num_matrices, block_b),)


def compile_jobs(n: int, dtype: torch.dtype) -> list[tuple]:
    """`(kernel, constexprs, launch options)` the launchers use for many `n × n` matrices (fp32 whatever `dtype`)."""
    np2, block_b, _ = _launch_config(10**6, n)
    meta = dict(N=n, NP=np2, BLOCK_B=block_b)
    return [(_sinkhorn_fwd_kernel, meta, {}), (_sinkhorn_bwd_kernel, meta, {})]


# Registered ops (not an autograd.Function), so torch.compile and selective checkpointing take each launch whole.
@torch.library.custom_op("transformers_mhc::sinkhorn_knopp_fwd", mutates_args=())
def sinkhorn_knopp_fwd(logits: torch.Tensor, num_iterations: int) -> torch.Tensor:
    """`[..., n, n]` fp32 Sinkhorn-Knopp of `logits` (any float dtype)."""
    n = logits.shape[-1]
    flat = logits.float().contiguous().view(-1, n, n)
    out = torch.empty_like(flat)
    if flat.shape[0] > 0:
        with device_guard(flat):
            np2, block_b, grid = _launch_config(flat.shape[0], n)
            _sinkhorn_fwd_kernel[grid](flat, out, flat.shape[0], num_iterations, N=n, NP=np2, BLOCK_B=block_b)
    return out.view(logits.shape)


@sinkhorn_knopp_fwd.register_fake
def _(logits, num_iterations):
    return logits.new_empty(logits.shape, dtype=torch.float32)


@torch.library.custom_op("transformers_mhc::sinkhorn_knopp_bwd", mutates_args=())
def sinkhorn_knopp_bwd(logits: torch.Tensor, grad_out: torch.Tensor, num_iterations: int) -> torch.Tensor:
    """The fp32 gradient with respect to `logits`, recomputing the iterates from them on chip."""
    n = logits.shape[-1]
    flat = logits.float().contiguous().view(-1, n, n)
    grad_flat = grad_out.float().contiguous().view(-1, n, n)  # contiguous: sum().backward() hands stride 0
    grad_in = torch.empty_like(flat)
    if flat.shape[0] > 0:
        with device_guard(flat):
            np2, block_b, grid = _launch_config(flat.shape[0], n)
            _sinkhorn_bwd_kernel[grid](
                flat, grad_flat, grad_in, flat.shape[0], num_iterations, _backward_segment(num_iterations),
                N=n, NP=np2, BLOCK_B=block_b,
            )  # fmt: skip
    return grad_in.view(logits.shape)


@sinkhorn_knopp_bwd.register_fake
def _(logits, grad_out, num_iterations):
    return logits.new_empty(logits.shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    logits, num_iterations = inputs
    ctx.save_for_backward(logits)  # only the logits: the backward kernel recomputes the iterates
    ctx.num_iterations = num_iterations


def _backward(ctx, grad_out: torch.Tensor):
    (logits,) = ctx.saved_tensors
    return sinkhorn_knopp_bwd(logits, grad_out, ctx.num_iterations).to(logits.dtype), None


sinkhorn_knopp_fwd.register_autograd(_backward, setup_context=_setup_context)


def sinkhorn_knopp_triton(logits: torch.Tensor, num_iterations: int = 20) -> torch.Tensor:
    """Projects `exp(logits)` (`[..., n, n]`) towards the doubly stochastic matrices, in a Triton kernel.

    Same semantics as `transformers_mhc.models.mhc_ops.sinkhorn_knopp`: log-space fp32 iterations, each
    normalising the columns then the rows (so row sums are exact), result in fp32. The backward is exact and
    saves only the logits, so its memory does not grow with `num_iterations`.

    Args:
        logits: `[..., n, n]` logits (any float dtype; computed in fp32).
        num_iterations: number of (column, row) normalisation rounds.

    Returns:
        `[..., n, n]` fp32 matrix with rows summing to 1 and columns approximately summing to 1.
    """
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(
            f"sinkhorn_knopp_triton expects logits of shape [..., n, n], got {tuple(logits.shape)}"
        )
    if num_iterations < 0:
        raise ValueError(f"num_iterations must be >= 0, got {num_iterations}")
    return sinkhorn_knopp_fwd(logits, int(num_iterations))


__all__ = ["compile_jobs", "sinkhorn_knopp_bwd", "sinkhorn_knopp_fwd", "sinkhorn_knopp_triton"]
