"""Fused recurrent Triton kernel for linear attention with decay: the decoding path.

One program owns a ``[Dk, BV]`` tile of one head's state in fp32 registers and walks the tokens in
order, so a decode step (``T = 1``) reads the state once, updates it and writes it once::

    S_t = diag(exp(a_t)) S_{t-1} + k_t v_t^T            o_t = scale * q_t^T S_t

The value axis is split over programs (``BV`` columns each, autotuned with ``num_warps``, see
``decay_autotune``): a thread holds at most 64 state elements, which keeps the kernel free of register spills
on sm_90 at Dk = 256 (a ``[256, 64]`` tile on 4 warps spilled ~140 bytes), and a decode step at batch 1
still launches ``Dv / BV`` programs per head.

Its gradient is that of the same recurrence, computed by the chunked backward kernels. The PyTorch
reference this kernel must match is ``recurrent_decay_linear_attn`` in
``transformers_mhc.models.decay_ops``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .decay_autotune import AUTOTUNE_KEY, candidates, pruner
from .decay_chunk import (
    check_decay_inputs,
    decay_backward,
    final_state_buffer,
    make_contiguous,
    save_decay_inputs,
)
from .runtime import device_guard

# fp32 state elements one thread may hold: 64 (a [256, 16] tile on 2 warps, [256, 32] on 4, [256, 64] on 8) uses
# about 165 registers on sm_90; twice that spills.
STATE_PER_THREAD = 64
RECURRENT_CONFIGS = candidates(block_vs=(16, 32, 64), warps=(2, 4, 8), stages=(1,), interpreted=(32, 4, 1))


def recurrent_config_fits(config: triton.Config, BK: int, dtype: torch.dtype) -> bool:
    """Whether ``config``'s ``[BK, BV]`` state tile stays within ``STATE_PER_THREAD`` per thread (any dtype:
    the state is fp32)."""
    return BK * config.kwargs["BV"] <= STATE_PER_THREAD * 32 * config.num_warps


@triton.autotune(
    configs=RECURRENT_CONFIGS,
    key=AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": pruner(recurrent_config_fits)},
)
@triton.jit
def _fused_recurrent_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    a_ptr,
    h0_ptr,
    o_ptr,
    ht_ptr,
    scale,
    T,
    K: tl.constexpr,
    V: tl.constexpr,
    GK: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GBK: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE_HT: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    bh = i_bh.to(tl.int64)
    q_ptr += bh * T * K
    k_ptr += bh * T * K
    v_ptr += bh * T * V
    o_ptr += bh * T * V
    a_ptr += bh * T * GK
    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    gc = tl.arange(0, GBK)
    mk = ck < K
    mv = cv < V
    s_offs = bh * K * V + ck[:, None] * V + cv[None, :]
    s_mask = mk[:, None] & mv[None, :]
    if HAS_H0:
        b_h = tl.load(h0_ptr + s_offs, mask=s_mask, other=0.0).to(tl.float32)
    else:
        b_h = tl.zeros([BK, BV], dtype=tl.float32)
    for t in range(T):
        b_q = tl.load(q_ptr + t * K + ck, mask=mk, other=0.0).to(tl.float32)
        b_k = tl.load(k_ptr + t * K + ck, mask=mk, other=0.0).to(tl.float32)
        b_v = tl.load(v_ptr + t * V + cv, mask=mv, other=0.0).to(tl.float32)
        # GBK = 1 for a scalar decay: its [1] tile broadcasts over the key channels.
        b_a = tl.load(a_ptr + t * GK + gc, mask=gc < GK, other=0.0).to(tl.float32)
        # exp(min(a, 0)) <= 1: the state can only shrink before the new key-value product is added.
        b_h = b_h * tl.exp(tl.minimum(b_a, 0.0))[:, None] + b_k[:, None] * b_v[None, :]
        b_o = tl.sum(b_h * b_q[:, None], axis=0) * scale
        tl.store(o_ptr + t * V + cv, b_o.to(o_ptr.dtype.element_ty), mask=mv)
    if STORE_HT:
        tl.store(ht_ptr + s_offs, b_h, mask=s_mask)


@torch.library.custom_op("transformers_mhc::fused_recurrent_decay_fwd", mutates_args=())
def fused_recurrent_decay_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recurrent forward: ``(o, final_state)``, the final state empty unless ``output_final_state``. Its backward
    is ``transformers_mhc::chunk_decay_bwd`` (see ``decay_chunk``'s custom ops)."""
    q, k, v, log_decay, initial_state = make_contiguous(q, k, v, log_decay, initial_state)
    B, H, T, K = q.shape
    V = v.shape[-1]
    vector = log_decay.dim() == 4
    BK = triton.next_power_of_2(K)
    o = q.new_empty(v.shape)
    ht = final_state_buffer(q, v, output_final_state)
    # Pure stores (no accumulation into o or ht), so the autotuner may run the kernel several times.
    with device_guard(q):
        _fused_recurrent_fwd_kernel[lambda meta: (triton.cdiv(V, meta["BV"]), B * H)](
            q,
            k,
            v,
            log_decay,
            initial_state if initial_state is not None else o,
            o,
            ht if output_final_state else o,
            scale,
            T,
            K=K,
            V=V,
            GK=K if vector else 1,
            BK=BK,
            GBK=BK if vector else 1,
            HAS_H0=initial_state is not None,
            STORE_HT=output_final_state,
        )
    return o, ht


@fused_recurrent_decay_fwd.register_fake
def _(q, k, v, log_decay, scale, initial_state, output_final_state):
    """The outputs' shapes, dtypes and devices, for tracing."""
    return q.new_empty(v.shape), final_state_buffer(q, v, output_final_state)


# The gradient of the recurrence does not depend on how the forward walked it: the chunked backward kernels, with
# chunks of this many rows, give it exactly.
BACKWARD_CHUNK_SIZE = 64


def _recurrent_setup_context(ctx, inputs: tuple, output: tuple) -> None:
    save_decay_inputs(ctx, inputs, output_final_state=inputs[6], chunk_size=BACKWARD_CHUNK_SIZE)


def _recurrent_backward(
    ctx, do: torch.Tensor | None, dht: torch.Tensor | None
) -> tuple[torch.Tensor | None, ...]:
    dq, dk, dv, dlog_decay, dh0 = decay_backward(ctx, do, dht)
    return dq, dk, dv, dlog_decay, None, dh0, None


fused_recurrent_decay_fwd.register_autograd(_recurrent_backward, setup_context=_recurrent_setup_context)


def fused_recurrent_decay_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token linear attention with decay in one Triton kernel (decoding; any ``T``; op
    ``transformers_mhc::fused_recurrent_decay_fwd``).

    Same arguments, shapes and results as ``chunk_decay_linear_attn_triton`` (without ``chunk_size``):
    ``q, k`` ``[B, H, T, Dk]``, ``v`` ``[B, H, T, Dv]``, ``log_decay`` ``[B, H, T]`` or ``[B, H, T, Dk]``
    (finite, ``<= 0``), optional ``initial_state`` ``[B, H, Dk, Dv]``. Returns ``(o, final_state)``
    with ``o`` in ``q.dtype`` and ``final_state`` fp32 (``None`` unless ``output_final_state``).
    Differentiable: the backward runs the chunked Triton backward kernels.
    """
    check_decay_inputs(q, k, v, log_decay, initial_state)
    q, k, v, log_decay, initial_state = make_contiguous(q, k, v, log_decay, initial_state)
    o, ht = fused_recurrent_decay_fwd(
        q, k, v, log_decay, float(scale), initial_state, bool(output_final_state)
    )
    return o, ht if output_final_state else None
