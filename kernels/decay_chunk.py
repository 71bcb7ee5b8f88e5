"""Chunked Triton kernels (forward and backward) for linear attention with scalar or vector decay.

Recurrence, per batch and head (state ``S`` is ``[Dk, Dv]`` in fp32, ``a_t = log_decay_t <= 0``)::

    S_t = diag(exp(a_t)) S_{t-1} + k_t v_t^T            o_t = scale * q_t^T S_t

Chunked form. ``T`` is cut into chunks of ``BT`` rows. ``g`` is the inclusive cumulative sum of ``a``
inside a chunk, kept in fp32 and in log2 units (``g = log2(e) * cumsum(a)``) so that every decay factor
is a single ``exp2``. With ``H`` the state at the chunk start and ``gl`` the ``g`` of the chunk's last row::

    o_i    = scale * [ (q_i * 2^g_i) H + sum_{j <= i} A_ij v_j ]      A_ij = sum_c q_ic k_jc 2^(g_ic - g_jc)
    H_next = 2^gl * H + sum_j (k_j * 2^(gl - g_j)) v_j^T

Numerics. ``g`` only decreases inside a chunk, so every exponent used here is ``<= 0`` and no factor can
overflow, however strong the decay (``log λ <= -10`` over a chunk of 64 gives exponents near -900, which
``exp`` of a positive difference would turn into ``inf`` and then ``NaN``). Exponents are clamped at 0
(``_decay``) to guard padded rows and rounding. A difference ``g_i - g_j`` of two fp32 cumulative sums
carries an absolute error of about ``|g| * 2^-24``, so a factor's relative error stays below ~6e-5 while
``|g| < 1024`` (e.g. ``log λ = -11`` at every step of a chunk of 64). ``A`` needs a matrix product for vector decay, which means
splitting ``2^(g_i - g_j)`` into a row factor and a column factor; that is only safe around a reference
row between ``j`` and ``i``. So for vector decay the chunk is tiled into fp32 sub-chunks of 16 rows:
blocks strictly below the diagonal are factored around the row just before the row block, and the
diagonal sub-chunk forms each exponent ``g_i - g_j`` directly, one key row at a time. Scalar decay needs
no factoring: ``A = (Q K^T) * 2^(g_i - g_j)`` elementwise, on row blocks of up to 32 rows.

Kernels, each with one program per (row block or value block, key block where the terms are separate per
key channel, batch x head); key dims over 64 are split into tiles (``MAX_BLOCK_K``):

* forward:  ``_chunk_cumsum`` -> ``_chunk_state_fwd`` (sequential over chunks) -> ``_chunk_output_fwd``
* backward: ``_chunk_cumsum`` and ``_chunk_state_fwd`` again (recomputing keeps saved activations at the
  size of the inputs), ``_chunk_state_bwd`` (reverse over chunks), ``_chunk_dv_bwd``, ``_chunk_dqk_bwd``,
  ``_chunk_dlog_decay_bwd``.

Launch configurations. The two state kernels are autotuned over their value tile and ``num_warps``
(``STATE_CONFIGS``), per head dims, decay granularity, chunk rows, dtype and product precision, among candidates
that the sm_90 ptxas reports show free of register spills (``matmul_config_fits``, ``decay_autotune``); the
output, dv and dq/dk kernels keep one configuration per shape (other candidates spilled).

Scalar decay is handled as vector decay whose channel axis has length 1 (``GK = GBK = 1``): every decay
tile is ``[rows, 1]`` and broadcasts against ``[rows, Dk]`` tiles, so one kernel body serves both.

Matrix products. 16-bit inputs: operands in the input dtype (tensor cores), accumulation in fp32; operands
computed in fp32 inside the kernels (decayed keys, scores) are rounded to the input dtype first. fp32 inputs:
exact fp32 products (``input_precision="ieee"``) under torch's default ``torch.get_float32_matmul_precision()
== "highest"``, TF32 tensor cores (~1e-3 relative error) when the user allows them for torch's matmuls
(``"high"`` / ``"medium"``), as ``runtime.dot_precision`` decides at each call, except in the dv and dq/dk
kernels, which stay exact (with TF32 they spilled registers).

The PyTorch reference this kernel must match is ``chunk_decay_linear_attn`` in
``transformers_mhc.models.decay_ops``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .decay_autotune import AUTOTUNE_KEY, candidates, pruner
from .runtime import INTERPRETED, device_guard, dot_precision

LOG2E = tl.constexpr(1.4426950408889634)
# Floor of a log decay (natural log). The kernels take differences of within-chunk cumulative sums, so a -inf
# (a saturated gate) would make -inf - -inf = NaN; at the floor the decay is exp(-64) ~ 1.6e-28, far below fp32's
# resolution of anything it is added to, and the sums stay small enough to keep their precision.
LOG_DECAY_FLOOR = tl.constexpr(-64.0)
# Rows per fp32 sub-chunk for vector decay (the smallest tile `tl.dot` accepts).
SUB_CHUNK = 16
# Largest key head dimension.
MAX_HEAD_DIM_K = 256
# Key tile of the kernels with matrix products. A larger key dim is split over programs (state and dq/dk
# kernels: every term is separate per key channel) or looped over in one program (output and dv kernels:
# their scores sum over the key channels). A whole-K tile spilled registers from K = 128 on (12 KB in the
# dq/dk kernel at K = 256, bf16, sm_90).
MAX_BLOCK_K = 64
# Largest value tile (32 once the key dim exceeds 64, 16 then for fp32, on 8 warps: `_block_v_max`); larger value
# dims are split over programs or loops.
MAX_BLOCK_V = 64
# Largest row block for scalar decay with 16-bit inputs (a chunk is covered by several row blocks).
MAX_BLOCK_ROWS = 32
# Launch candidates of the autotuned state kernels (sequential over chunks, one program per value and key tile),
# admitted per shape by `matmul_config_fits`; the autotuner's key adds the chunk rows and the product precision to
# the head dims. 2 stages: 1 stage spilled where 2 did not (dv kernel, bf16, K = 128, 4 warps). Few candidates: each
# one is compiled on the first call of every shape.
STATE_CONFIGS = candidates(block_vs=(16, 32, 64), warps=(4, 8), stages=(2,), interpreted=(32, 4, 1))
MATMUL_KEY = [*AUTOTUNE_KEY, "BT", "PREC"]
# Launch options of the output and dv kernels (widest value tile that fits, `_block_v_max`) and of the dq/dk kernel.
# Not autotuned: they hold [rows, K] tiles besides the value tiles, and the sm_90 ptxas reports showed spills for
# other candidates (4 warps; narrower value tiles, where ptxas capped the kernel at 128 registers: output kernel,
# fp32, K = 64, BV = 32), and the dq/dk kernel runs at 236-255 registers.
_ROW_LAUNCH = {"num_warps": 8, "num_stages": 2}
_DQK_LAUNCH = {"num_warps": 8, "num_stages": 2}
# The dq/dk kernel holds the most tiles at once: value tiles of DQK_BLOCK_V in its loops, and one pipeline
# stage with 32-row blocks. The tiles and launch options here are chosen so that the sm_90 ptxas reports show
# no spill at Dk = Dv in {64, 128, 256}, bf16 and fp32 (benchmarks/ptxas_spills.py), not from GPU timings.
DQK_BLOCK_V = 16
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _block_v_max(BK: int, dtype: torch.dtype) -> int:
    """Widest value tile of the kernels with matrix products on 8 warps: exact fp32 products run on FMA units
    with both operands spread over registers, so fp32 needs smaller tiles than 16-bit inputs (sm_90 ptxas)."""
    return MAX_BLOCK_V if BK <= MAX_BLOCK_K else MAX_BLOCK_V // (4 if dtype == torch.float32 else 2)


def matmul_config_fits(config: triton.Config, BK: int, dtype: torch.dtype) -> bool:
    """Whether an autotune candidate of the state kernels stays free of spills: value tiles per warp no wider than
    ``_block_v_max`` on 8 warps, at most two pipeline stages."""
    return config.num_stages <= 2 and config.kwargs["BV"] * 8 <= _block_v_max(BK, dtype) * config.num_warps


def _autotune_state(kernel):
    """``triton.autotune`` over ``STATE_CONFIGS``, admitted by ``matmul_config_fits``. Safe to re-run while timing:
    the state kernels only store their results, never accumulate into them."""
    prune = {"early_config_prune": pruner(matmul_config_fits)}
    return triton.autotune(configs=STATE_CONFIGS, key=MATMUL_KEY, prune_configs_by=prune)(kernel)


# ----------------------------------------------------------------------------------------------------
# Small device helpers
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _decay(x):
    # 2^x for an exponent that is <= 0 in exact arithmetic; the clamp covers padded rows (loaded as 0)
    # and rounding, so a decay factor is never above 1.
    return tl.exp2(tl.minimum(x, 0.0))


@triton.jit
def _mm(a, b, MM: tl.constexpr, PREC: tl.constexpr):
    """``a @ b`` with fp32 accumulation; operands cast to ``MM`` (the input dtype, see ``_matmul_dtype``), fp32
    operands multiplied as ``PREC`` says (``runtime.dot_precision``: "tf32" or exact "ieee")."""
    return tl.dot(a.to(MM), b.to(MM), input_precision=PREC)


@triton.jit
def _load_rows(ptr, rows, cols, T, D: tl.constexpr):
    """Tile ``[rows, cols]`` of a row-major ``[T, D]`` matrix; rows >= T and columns >= D read as 0."""
    mask = (rows[:, None] < T) & (cols[None, :] < D)
    return tl.load(ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(ptr, x, rows, cols, T, D: tl.constexpr):
    mask = (rows[:, None] < T) & (cols[None, :] < D)
    tl.store(ptr + rows[:, None] * D + cols[None, :], x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_row(ptr, row, cols, T, D: tl.constexpr):
    """One row of a row-major ``[T, D]`` matrix; a row outside ``[0, T)`` reads as 0."""
    rows = row + 0 * cols  # a vector, so the mask is one even when `row` is a plain integer
    mask = (cols < D) & (rows < T) & (rows >= 0)
    return tl.load(ptr + rows * D + cols, mask=mask, other=0.0)


@triton.jit
def _state_offsets(i_bh, i_t, NT, ck, cv, K: tl.constexpr, V: tl.constexpr):
    """Offsets and mask of a ``[BK, BV]`` tile of chunk ``i_t``'s state in a ``[BH, NT, K, V]`` buffer."""
    offs = ((i_bh * NT + i_t) * K + ck[:, None]) * V + cv[None, :]
    return offs, (ck[:, None] < K) & (cv[None, :] < V)


@triton.jit
def _key_tile(i_k, BK: tl.constexpr, GBK: tl.constexpr):
    """Key channels of key tile ``i_k`` and their decay channels: the same (vector decay, ``GBK = BK``) or one."""
    ck = i_k * BK + tl.arange(0, BK)
    gc = tl.arange(0, GBK)
    if GBK == BK:
        gc = ck
    return ck, gc


@triton.jit
def _scores_offdiag(b_q, b_g, b_k, b_gk, b_gr, VECTOR: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr):
    """``A[i, j] = sum_c q_ic k_jc 2^(g_ic - g_jc)`` for a row block strictly after the column block.

    ``b_gr`` is ``g`` at the row just before the row block; every ``j`` <= that row < every ``i``.
    """
    if VECTOR:
        # 2^(g_i - g_j) = 2^(g_i - g_r) * 2^(g_r - g_j) with g_i <= g_r <= g_j: both factors <= 1.
        b_qd = b_q * _decay(b_g - b_gr[None, :])
        b_kd = b_k * _decay(b_gr[None, :] - b_gk)
        return _mm(b_qd, tl.trans(b_kd), MM, PREC)
    else:
        b_s = _mm(b_q, tl.trans(b_k), MM, PREC)
        return b_s * _decay(b_g - tl.trans(b_gk))


@triton.jit
def _scores_diag(
    b_q,
    b_g,
    b_k,
    k_ptr,
    g_ptr,
    r0,
    T,
    ck,
    K: tl.constexpr,
    GK: tl.constexpr,
    BR: tl.constexpr,
    VECTOR: tl.constexpr,
    MM: tl.constexpr,
    PREC: tl.constexpr,
):
    """Causal scores ``A[i, j]`` (zero for ``j > i``) inside the row block starting at row ``r0``, summed
    over the key channels ``ck``."""
    o_r = tl.arange(0, BR)
    if VECTOR:
        # No reference row keeps both factors <= 1 inside the block: form each g_i - g_j (<= 0 for
        # j <= i) directly, one key row per step, in fp32.
        # Loads and exp2 are written inline and pointers advance by one row: a short loop body.
        n_left = T - r0 - 0 * ck  # rows left in the sequence, as a vector so the mask is one
        p_k = k_ptr + r0 * K + ck
        p_g = g_ptr + r0 * GK + ck
        b_qf = b_q.to(tl.float32)
        b_A = tl.zeros([BR, BR], dtype=tl.float32)
        for j in range(BR):
            m_j = (ck < K) & (j < n_left)
            b_kj = tl.load(p_k, mask=m_j, other=0.0).to(tl.float32)
            b_gj = tl.load(p_g, mask=m_j, other=0.0)
            b_aj = tl.sum(b_qf * b_kj[None, :] * tl.exp2(tl.minimum(b_g - b_gj[None, :], 0.0)), axis=1)
            b_A = tl.where(o_r[None, :] == j, b_aj[:, None], b_A)
            p_k += K
            p_g += GK
    else:
        b_A = _mm(b_q, tl.trans(b_k), MM, PREC) * _decay(b_g - tl.trans(b_g))
    return tl.where(o_r[:, None] >= o_r[None, :], b_A, 0.0)


# ----------------------------------------------------------------------------------------------------
# Forward kernels
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _chunk_cumsum_kernel(a_ptr, g_ptr, T, GK: tl.constexpr, BT: tl.constexpr, GBK: tl.constexpr):
    """``g = log2(e) * cumsum(log_decay)`` inside each chunk, in fp32."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    base = i_bh.to(tl.int64) * T * GK
    rows = i_t * BT + tl.arange(0, BT)
    gc = tl.arange(0, GBK)
    b_a = tl.maximum(_load_rows(a_ptr + base, rows, gc, T, GK).to(tl.float32), LOG_DECAY_FLOOR)
    # Summing in natural-log units and scaling once keeps a single rounding of the log2 conversion.
    _store_rows(g_ptr + base, tl.cumsum(b_a, axis=0) * LOG2E, rows, gc, T, GK)


@_autotune_state
@triton.jit
def _chunk_state_fwd_kernel(
    k_ptr,
    v_ptr,
    g_ptr,
    h0_ptr,
    h_ptr,
    ht_ptr,
    T,
    NT,
    K: tl.constexpr,
    V: tl.constexpr,
    GK: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GBK: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE_HT: tl.constexpr,
    MM: tl.constexpr,
    PREC: tl.constexpr,
):
    """Walk the chunks in order, writing the state at each chunk start to ``h`` ([BH, NT, K, V], fp32).

    Each key channel's rows of the state evolve on their own, so programs split the key axis too.
    """
    i_v, i_k, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bh = i_bh.to(tl.int64)
    k_ptr += bh * T * K
    v_ptr += bh * T * V
    g_ptr += bh * T * GK
    ck, gc = _key_tile(i_k, BK, GBK)
    cv = i_v * BV + tl.arange(0, BV)
    s_offs, s_mask = _state_offsets(bh, 0, 1, ck, cv, K, V)
    if HAS_H0:
        b_h = tl.load(h0_ptr + s_offs, mask=s_mask, other=0.0).to(tl.float32)
    else:
        b_h = tl.zeros([BK, BV], dtype=tl.float32)
    for i_t in range(NT):
        h_offs, _ = _state_offsets(bh, i_t, NT, ck, cv, K, V)
        tl.store(h_ptr + h_offs, b_h, mask=s_mask)
        rows = i_t * BT + tl.arange(0, BT)
        b_k = _load_rows(k_ptr, rows, ck, T, K)
        b_v = _load_rows(v_ptr, rows, cv, T, V)
        b_g = _load_rows(g_ptr, rows, gc, T, GK)
        b_gl = _load_row(g_ptr, tl.minimum(i_t * BT + BT, T) - 1, gc, T, GK)
        # Keys decayed to the chunk end (2^(gl - g_j) <= 1), then one matrix product per chunk.
        b_kd = b_k * _decay(b_gl[None, :] - b_g)
        b_h = b_h * tl.exp2(b_gl)[:, None] + _mm(tl.trans(b_kd), b_v, MM, PREC)
    if STORE_HT:
        tl.store(ht_ptr + s_offs, b_h, mask=s_mask)


@triton.jit
def _chunk_output_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    h_ptr,
    o_ptr,
    scale,
    T,
    NT,
    K: tl.constexpr,
    V: tl.constexpr,
    GK: tl.constexpr,
    BT: tl.constexpr,
    BR: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GBK: tl.constexpr,
    NK: tl.constexpr,
    VECTOR: tl.constexpr,
    MM: tl.constexpr,
    PREC: tl.constexpr,
):
    """Outputs of one row block: through the chunk-start state, plus causal intra-chunk attention.

    Both terms are sums over key channels, taken over ``NK`` key tiles in turn: a whole-K tile spills
    registers from K = 128 on.
    """
    i_tr, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NR: tl.constexpr = BT // BR
    i_t, i_r = i_tr // NR, i_tr % NR
    c0 = i_t * BT
    r0 = c0 + i_r * BR
    if r0 >= T:
        return
    bh = i_bh.to(tl.int64)
    q_ptr += bh * T * K
    k_ptr += bh * T * K
    v_ptr += bh * T * V
    g_ptr += bh * T * GK
    o_ptr += bh * T * V
    cv = i_v * BV + tl.arange(0, BV)
    rows = r0 + tl.arange(0, BR)

    b_o = tl.zeros([BR, BV], dtype=tl.float32)
    for i_k in range(NK):
        ck, gc = _key_tile(i_k, BK, GBK)
        b_q = _load_rows(q_ptr, rows, ck, T, K)
        b_g = _load_rows(g_ptr, rows, gc, T, GK)
        h_offs, h_mask = _state_offsets(bh, i_t, NT, ck, cv, K, V)
        b_h = tl.load(h_ptr + h_offs, mask=h_mask, other=0.0)
        # Everything before the chunk, through its start state; 2^g_i <= 1.
        b_o += _mm(b_q * tl.exp2(b_g), b_h, MM, PREC)

        # Column blocks strictly before this row block (none when the row block is the whole chunk).
        b_gr = _load_row(g_ptr, r0 - 1, gc, T, GK)
        for i_b in range(0, i_r):
            rows_b = c0 + i_b * BR + tl.arange(0, BR)
            b_kb = _load_rows(k_ptr, rows_b, ck, T, K)
            b_vb = _load_rows(v_ptr, rows_b, cv, T, V)
            b_gb = _load_rows(g_ptr, rows_b, gc, T, GK)
            b_A = _scores_offdiag(b_q, b_g, b_kb, b_gb, b_gr, VECTOR, MM, PREC)
            b_o += _mm(b_A, b_vb, MM, PREC)

        b_k = _load_rows(k_ptr, rows, ck, T, K)
        b_v = _load_rows(v_ptr, rows, cv, T, V)
        b_A = _scores_diag(b_q, b_g, b_k, k_ptr, g_ptr, r0, T, ck, K, GK, BR, VECTOR, MM, PREC)
        b_o += _mm(b_A, b_v, MM, PREC)
    _store_rows(o_ptr, b_o * scale, rows, cv, T, V)


# ----------------------------------------------------------------------------------------------------
# Backward kernels
# ----------------------------------------------------------------------------------------------------
@_autotune_state
@triton.jit
def _chunk_state_bwd_kernel(
    q_ptr,
    do_ptr,
    g_ptr,
    dht_ptr,
    dh_ptr,
    dh0_ptr,
    scale,
    T,
    NT,
    K: tl.constexpr,
    V: tl.constexpr,
    GK: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GBK: tl.constexpr,
    HAS_DHT: tl.constexpr,
    STORE_DH0: tl.constexpr,
    MM: tl.constexpr,
    PREC: tl.constexpr,
):
    """Walk the chunks backwards, writing the gradient w.r.t. the state at each chunk END to ``dh``
    (split over key and value blocks like ``_chunk_state_fwd_kernel``)."""
    i_v, i_k, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bh = i_bh.to(tl.int64)
    q_ptr += bh * T * K
    do_ptr += bh * T * V
    g_ptr += bh * T * GK
    ck, gc = _key_tile(i_k, BK, GBK)
    cv = i_v * BV + tl.arange(0, BV)
    s_offs, s_mask = _state_offsets(bh, 0, 1, ck, cv, K, V)
    if HAS_DHT:
        b_dh = tl.load(dht_ptr + s_offs, mask=s_mask, other=0.0).to(tl.float32)
    else:
        b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    for i in range(NT):
        i_t = NT - 1 - i
        dh_offs, _ = _state_offsets(bh, i_t, NT, ck, cv, K, V)
        tl.store(dh_ptr + dh_offs, b_dh, mask=s_mask)
        rows = i_t * BT + tl.arange(0, BT)
        b_q = _load_rows(q_ptr, rows, ck, T, K)
        b_do = _load_rows(do_ptr, rows, cv, T, V)
        b_g = _load_rows(g_ptr, rows, gc, T, GK)
        b_gl = _load_row(g_ptr, tl.minimum(i_t * BT + BT, T) - 1, gc, T, GK)
        b_qd = b_q * tl.exp2(b_g) * scale
        b_dh = b_dh * tl.exp2(b_gl)[:, None] + _mm(tl.trans(b_qd), b_do, MM, PREC)
    if STORE_DH0:
        tl.store(dh0_ptr + s_offs, b_dh, mask=s_mask)


@triton.jit
def _chunk_dv_bwd_kernel(
    q_ptr,
    k_ptr,
    do_ptr,
    g_ptr,
    dh_ptr,
    dv_ptr,
    scale,
    T,
    NT,
    K: tl.constexpr,
    V: tl.constexpr,
    GK: tl.constexpr,
    BT: tl.constexpr,
    BR: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GBK: tl.constexpr,
    NK: tl.constexpr,
    VECTOR: tl.constexpr,
    MM: tl.constexpr,
    PREC: tl.constexpr,
):
    """``dv_j = scale * sum_{i >= j} A_ij do_i + (k_j * 2^(gl - g_j)) dH_end`` for one row block, summed
    over ``NK`` key tiles as in ``_chunk_output_fwd_kernel``."""
    i_tr, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NR: tl.constexpr = BT // BR
    i_t, i_r = i_tr // NR, i_tr % NR
    c0 = i_t * BT
    r0 = c0 + i_r * BR
    if r0 >= T:
        return
    nrv = tl.cdiv(tl.minimum(T - c0, BT), BR)  # row blocks of this chunk holding real rows
    bh = i_bh.to(tl.int64)
    q_ptr += bh * T * K
    k_ptr += bh * T * K
    do_ptr += bh * T * V
    g_ptr += bh * T * GK
    dv_ptr += bh * T * V
    cv = i_v * BV + tl.arange(0, BV)
    rows = r0 + tl.arange(0, BR)

    b_dv = tl.zeros([BR, BV], dtype=tl.float32)
    for i_k in range(NK):
        ck, gc = _key_tile(i_k, BK, GBK)
        b_k = _load_rows(k_ptr, rows, ck, T, K)
        b_g = _load_rows(g_ptr, rows, gc, T, GK)
        b_gl = _load_row(g_ptr, tl.minimum(c0 + BT, T) - 1, gc, T, GK)
        dh_offs, dh_mask = _state_offsets(bh, i_t, NT, ck, cv, K, V)
        b_dh = tl.load(dh_ptr + dh_offs, mask=dh_mask, other=0.0)
        b_dv += _mm(b_k * _decay(b_gl[None, :] - b_g), b_dh, MM, PREC)

        b_q = _load_rows(q_ptr, rows, ck, T, K)
        b_do = _load_rows(do_ptr, rows, cv, T, V)
        b_A = _scores_diag(b_q, b_g, b_k, k_ptr, g_ptr, r0, T, ck, K, GK, BR, VECTOR, MM, PREC)
        b_dv += scale * _mm(tl.trans(b_A), b_do, MM, PREC)
        # Row blocks after this one (queries that attend to this block's keys).
        for i_b in range(i_r + 1, nrv):
            rb0 = c0 + i_b * BR
            rows_b = rb0 + tl.arange(0, BR)
            b_qb = _load_rows(q_ptr, rows_b, ck, T, K)
            b_gb = _load_rows(g_ptr, rows_b, gc, T, GK)
            b_dob = _load_rows(do_ptr, rows_b, cv, T, V)
            b_gr = _load_row(g_ptr, rb0 - 1, gc, T, GK)
            b_A = _scores_offdiag(b_qb, b_gb, b_k, b_g, b_gr, VECTOR, MM, PREC)
            b_dv += scale * _mm(tl.trans(b_A), b_dob, MM, PREC)
    _store_rows(dv_ptr, b_dv, rows, cv, T, V)


@triton.jit
def _dqk_offdiag(
    b_dA,
    b_x,
    b_gx,
    b_ga,
    b_gr,
    VECTOR: tl.constexpr,
    FOR_DQ: tl.constexpr,
    MM: tl.constexpr,
    PREC: tl.constexpr,
):
    """Off-diagonal block of dq (``FOR_DQ``) or dk.

    dq_i = sum_j dA_ij k_j 2^(g_i - g_j), rows i of this block, keys j (``b_x``, ``b_gx``) of an earlier block.
    dk_j = sum_i dA_ij q_i 2^(g_i - g_j), keys j of this block, queries i (``b_x``, ``b_gx``) of a later block;
    here ``b_dA`` is indexed [i, j]. ``b_gr`` is ``g`` at the row just before the later block.
    """
    if VECTOR:
        if FOR_DQ:
            b_xd = b_x * _decay(b_gr[None, :] - b_gx)
            return _decay(b_ga - b_gr[None, :]) * _mm(b_dA, b_xd, MM, PREC)
        else:
            b_xd = b_x * _decay(b_gx - b_gr[None, :])
            return _decay(b_gr[None, :] - b_ga) * _mm(tl.trans(b_dA), b_xd, MM, PREC)
    else:
        if FOR_DQ:
            return _mm(b_dA * _decay(b_ga - tl.trans(b_gx)), b_x, MM, PREC)
        else:
            return _mm(tl.trans(b_dA * _decay(b_gx - tl.trans(b_ga))), b_x, MM, PREC)


@triton.jit
def _dqk_diag(
    b_dA,
    b_q,
    b_k,
    b_g,
    q_ptr,
    k_ptr,
    g_ptr,
    r0,
    T,
    ck,
    K: tl.constexpr,
    GK: tl.constexpr,
    BR: tl.constexpr,
    BK: tl.constexpr,
    VECTOR: tl.constexpr,
    MM: tl.constexpr,
    PREC: tl.constexpr,
):
    """Strictly causal pairs (j < i) of the diagonal block: its parts of dq and dk (without ``scale``) in the
    key channels ``ck``."""
    o_r = tl.arange(0, BR)
    if VECTOR:
        n_left = T - r0 - 0 * ck
        p_q = q_ptr + r0 * K + ck
        p_k = k_ptr + r0 * K + ck
        p_g = g_ptr + r0 * GK + ck
        b_dA = tl.where(o_r[:, None] > o_r[None, :], b_dA, 0.0)
        b_dq = tl.zeros([BR, BK], dtype=tl.float32)
        b_dk = tl.zeros([BR, BK], dtype=tl.float32)
        for m in range(BR):
            m_m = (ck < K) & (m < n_left)
            b_qm = tl.load(p_q, mask=m_m, other=0.0).to(tl.float32)
            b_km = tl.load(p_k, mask=m_m, other=0.0).to(tl.float32)
            b_gm = tl.load(p_g, mask=m_m, other=0.0)
            # Column m of dA feeds dq of the rows after m; row m feeds dk of the rows before m.
            b_col = tl.sum(tl.where(o_r[None, :] == m, b_dA, 0.0), axis=1)
            b_row = tl.sum(tl.where(o_r[:, None] == m, b_dA, 0.0), axis=0)
            b_dq += b_col[:, None] * b_km[None, :] * tl.exp2(tl.minimum(b_g - b_gm[None, :], 0.0))
            b_dk += b_row[:, None] * b_qm[None, :] * tl.exp2(tl.minimum(b_gm[None, :] - b_g, 0.0))
            p_q += K
            p_k += K
            p_g += GK
    else:
        b_D = tl.where(o_r[:, None] > o_r[None, :], _decay(b_g - tl.trans(b_g)), 0.0)
        b_dAd = b_dA * b_D
        b_dq = _mm(b_dAd, b_k, MM, PREC)
        b_dk = _mm(tl.trans(b_dAd), b_q, MM, PREC)
    return b_dq, b_dk


@triton.jit
def _chunk_dqk_bwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    g_ptr,
    h_ptr,
    dh_ptr,
    dq_ptr,
    dk_ptr,
    w_ptr,
    x_ptr,
    scale,
    T,
    NT,
    K: tl.constexpr,
    V: tl.constexpr,
    GK: tl.constexpr,
    BT: tl.constexpr,
    BR: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GBK: tl.constexpr,
    NV: tl.constexpr,
    VECTOR: tl.constexpr,
    MM: tl.constexpr,
    PREC: tl.constexpr,
):
    """dq and dk of one row block in one block of key channels, and the two per-row pieces ``w``, ``x`` of
    the log-decay gradient.

    dq_i = scale * [2^g_i (H do_i) + sum_{j <= i} dA_ij k_j 2^(g_i - g_j)],         dA = do v^T
    dk_j = 2^(gl - g_j) (dH_end v_j) + scale * sum_{i >= j} dA_ij q_i 2^(g_i - g_j)
    Every term is separate per key channel except dA, which sums over the value axis only: so the key axis
    is tiled over programs (a whole-K tile spills registers from K = 128 on), each program recomputing dA.
    Products over the value axis are accumulated over value tiles inside the program.
    """
    i_tr, i_k, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NR: tl.constexpr = BT // BR
    i_t, i_r = i_tr // NR, i_tr % NR
    c0 = i_t * BT
    r0 = c0 + i_r * BR
    if r0 >= T:
        return
    nrv = tl.cdiv(tl.minimum(T - c0, BT), BR)
    bh = i_bh.to(tl.int64)
    q_ptr += bh * T * K
    k_ptr += bh * T * K
    v_ptr += bh * T * V
    do_ptr += bh * T * V
    g_ptr += bh * T * GK
    ck, gc = _key_tile(i_k, BK, GBK)
    o_r = tl.arange(0, BR)
    rows = r0 + o_r

    b_q = _load_rows(q_ptr, rows, ck, T, K)
    b_k = _load_rows(k_ptr, rows, ck, T, K)
    b_g = _load_rows(g_ptr, rows, gc, T, GK)
    b_gl = _load_row(g_ptr, tl.minimum(c0 + BT, T) - 1, gc, T, GK)
    b_gr = _load_row(g_ptr, r0 - 1, gc, T, GK)

    # Through the states, and the diagonal block's dA, summed over value tiles.
    b_dq_h = tl.zeros([BR, BK], dtype=tl.float32)
    b_dk_h = tl.zeros([BR, BK], dtype=tl.float32)
    b_dA = tl.zeros([BR, BR], dtype=tl.float32)
    for i_v in range(NV):
        cv = i_v * BV + tl.arange(0, BV)
        b_do = _load_rows(do_ptr, rows, cv, T, V)
        b_v = _load_rows(v_ptr, rows, cv, T, V)
        s_offs, s_mask = _state_offsets(bh, i_t, NT, ck, cv, K, V)
        b_h = tl.load(h_ptr + s_offs, mask=s_mask, other=0.0)
        b_dh = tl.load(dh_ptr + s_offs, mask=s_mask, other=0.0)
        b_dq_h += _mm(b_do, tl.trans(b_h), MM, PREC)
        b_dk_h += _mm(b_v, tl.trans(b_dh), MM, PREC)
        b_dA += _mm(b_do, tl.trans(b_v), MM, PREC)
    b_dq_h = b_dq_h * tl.exp2(b_g) * scale
    b_dk_h = b_dk_h * _decay(b_gl[None, :] - b_g)

    # Strictly causal intra-chunk pairs (j < i). The pairs i = j are added separately below: their
    # shares of q*dq and k*dk are equal and cancel in the log-decay gradient, and leaving them out
    # of it keeps that gradient accurate when it is tiny (strong decay).
    b_dq, b_dk = _dqk_diag(
        b_dA, b_q, b_k, b_g, q_ptr, k_ptr, g_ptr, r0, T, ck, K, GK, BR, BK, VECTOR, MM, PREC
    )
    for i_b in range(0, i_r):  # earlier key blocks -> dq
        rows_b = c0 + i_b * BR + o_r
        b_kb = _load_rows(k_ptr, rows_b, ck, T, K)
        b_gb = _load_rows(g_ptr, rows_b, gc, T, GK)
        b_dAb = tl.zeros([BR, BR], dtype=tl.float32)
        for i_v in range(NV):
            cv = i_v * BV + tl.arange(0, BV)
            b_do = _load_rows(do_ptr, rows, cv, T, V)
            b_vb = _load_rows(v_ptr, rows_b, cv, T, V)
            b_dAb += _mm(b_do, tl.trans(b_vb), MM, PREC)
        b_dq += _dqk_offdiag(b_dAb, b_kb, b_gb, b_g, b_gr, VECTOR, True, MM, PREC)
    for i_b in range(i_r + 1, nrv):  # later query blocks -> dk
        rb0 = c0 + i_b * BR
        rows_b = rb0 + o_r
        b_qb = _load_rows(q_ptr, rows_b, ck, T, K)
        b_gb = _load_rows(g_ptr, rows_b, gc, T, GK)
        b_grb = _load_row(g_ptr, rb0 - 1, gc, T, GK)
        b_dAb = tl.zeros([BR, BR], dtype=tl.float32)
        for i_v in range(NV):
            cv = i_v * BV + tl.arange(0, BV)
            b_dob = _load_rows(do_ptr, rows_b, cv, T, V)
            b_v = _load_rows(v_ptr, rows, cv, T, V)
            b_dAb += _mm(b_dob, tl.trans(b_v), MM, PREC)
        b_dk += _dqk_offdiag(b_dAb, b_qb, b_gb, b_g, b_grb, VECTOR, False, MM, PREC)

    b_qf = b_q.to(tl.float32)
    b_kf = b_k.to(tl.float32)
    b_dd = tl.sum(tl.where(o_r[:, None] == o_r[None, :], b_dA, 0.0), axis=1)  # dA_ii
    # Log-decay gradient pieces (see _chunk_dlog_decay_bwd_kernel): w is reverse-cumsummed, x cumsummed.
    b_w = b_qf * (b_dq_h + scale * b_dq) - b_kf * (scale * b_dk)
    b_x = b_kf * b_dk_h
    b_dq = b_dq_h + scale * (b_dq + b_dd[:, None] * b_kf)
    b_dk = b_dk_h + scale * (b_dk + b_dd[:, None] * b_qf)
    _store_rows(dq_ptr + bh * T * K, b_dq, rows, ck, T, K)
    _store_rows(dk_ptr + bh * T * K, b_dk, rows, ck, T, K)
    wx = bh  # w and x are [BH, T, GK]; for scalar decay [NK, BH, T, 1], summed over key blocks by the caller
    if not VECTOR:  # one decay per head: sum its gradient over this block's channels
        b_w = tl.sum(b_w, axis=1, keep_dims=True)
        b_x = tl.sum(b_x, axis=1, keep_dims=True)
        wx += i_k * tl.num_programs(2)
    _store_rows(w_ptr + wx * T * GK, b_w, rows, gc, T, GK)
    _store_rows(x_ptr + wx * T * GK, b_x, rows, gc, T, GK)


@triton.jit
def _chunk_dlog_decay_bwd_kernel(
    g_ptr,
    h_ptr,
    dh_ptr,
    w_ptr,
    x_ptr,
    da_ptr,
    T,
    NT,
    K: tl.constexpr,
    V: tl.constexpr,
    GK: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GBK: tl.constexpr,
    NV: tl.constexpr,
    VECTOR: tl.constexpr,
):
    """Gradient of ``log_decay`` for one chunk, from quantities local to the chunk.

    dL/da_s = <dS_s, diag(exp(a_s)) S_{s-1}> summed over the value axis (and over channels for scalar
    decay). Expanding both states inside the chunk gives four sums, each a sum of decayed terms, so no
    large terms cancel (a global reverse cumsum of q*dq - k*dk would cancel the undecayed final-state
    terms and lose the gradient under strong decay):

        2^gl * sum_v H dH_end                      (state -> state)
      + sum_{i >= s} q_i * dq_state_i              (state -> outputs)            \\ reverse cumsum of w
      + sum_{i >= s > j} P_ij                      (intra pairs straddling s)    /
      + sum_{j < s} k_j * dk_state_j               (keys -> chunk-end state)     = exclusive cumsum of x
    """
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    bh = i_bh.to(tl.int64)
    g_ptr += bh * T * GK
    w_ptr += bh * T * GK
    x_ptr += bh * T * GK
    da_ptr += bh * T * GK
    c0 = i_t * BT
    rows = c0 + tl.arange(0, BT)
    ck = tl.arange(0, BK)
    gc = tl.arange(0, GBK)

    b_hdh = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(NV):
        cv = i_v * BV + tl.arange(0, BV)
        s_offs, s_mask = _state_offsets(bh, i_t, NT, ck, cv, K, V)
        b_h = tl.load(h_ptr + s_offs, mask=s_mask, other=0.0)
        b_dh = tl.load(dh_ptr + s_offs, mask=s_mask, other=0.0)
        b_hdh += tl.sum(b_h * b_dh, axis=1)
    b_gl = _load_row(g_ptr, tl.minimum(c0 + BT, T) - 1, gc, T, GK)
    if VECTOR:
        b_s = b_hdh * tl.exp2(b_gl)
    else:
        b_s = tl.sum(b_hdh, axis=0) * tl.exp2(b_gl)

    b_w = _load_rows(w_ptr, rows, gc, T, GK)
    # x shifted down one row (row c0 gets 0): an exact exclusive cumsum, no subtraction.
    prev = rows - 1
    x_mask = (prev[:, None] >= c0) & (prev[:, None] < T) & (gc[None, :] < GK)
    b_xp = tl.load(x_ptr + prev[:, None] * GK + gc[None, :], mask=x_mask, other=0.0)
    b_da = b_s[None, :] + tl.cumsum(b_w, axis=0, reverse=True) + tl.cumsum(b_xp, axis=0)
    _store_rows(da_ptr, b_da, rows, gc, T, GK)


# ----------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Geometry:
    """Shapes and tile sizes of one call."""

    B: int
    H: int
    T: int
    K: int
    V: int
    vector: bool
    BT: int  # chunk rows
    BR: int  # rows per program: a 16-row fp32 sub-chunk (vector decay), up to 32 rows (scalar)
    BK: int
    BV: int
    GK: int  # decay channels per row: K (vector) or 1 (scalar)
    GBK: int
    NT: int
    NV: int
    MM: tl.dtype  # matmul operand dtype
    PREC: str  # tl.dot input precision of fp32 operands ("ieee" or "tf32", see `runtime.dot_precision`)

    @property
    def BH(self) -> int:
        return self.B * self.H

    @property
    def NK(self) -> int:
        """Key tiles of the kernels with matrix products."""
        return self.BK // min(self.BK, MAX_BLOCK_K)

    def meta(self, matmul: bool = True) -> dict[str, int | tl.dtype]:
        """Compile-time arguments shared by the kernels; with ``matmul``, those of the kernels with matrix
        products: key tiles of at most ``MAX_BLOCK_K`` (``NK`` of them), ``MM`` and ``PREC``, and no value tile
        (the state kernels' autotuners pick it)."""
        if not matmul:
            return {"K": self.K, "V": self.V, "GK": self.GK, "BK": self.BK, "BV": self.BV, "GBK": self.GBK}
        bk = self.BK // self.NK
        gbk = bk if self.vector else 1
        return {
            "K": self.K,
            "V": self.V,
            "GK": self.GK,
            "BK": bk,
            "GBK": gbk,
            "MM": self.MM,
            "PREC": self.PREC,
        }

    def row_meta(self) -> dict[str, int | tl.dtype]:
        """``meta()`` plus the row blocks, key tiles, value tile and launch options of the output and dv kernels."""
        rows = {"BT": self.BT, "BR": self.BR, "NK": self.NK, "VECTOR": self.vector, "BV": self.BV}
        return {**self.meta(), **rows, **_ROW_LAUNCH}

    def dv_meta(self) -> dict[str, int | tl.dtype]:
        """``row_meta()`` with exact fp32 products even where TF32 is allowed: with TF32 the dv kernel spilled 8 bytes
        at K = 64, vector decay, BV = 16 (sm_90 ptxas capped it at 128 registers)."""
        return {**self.row_meta(), "PREC": "ieee"}

    def dqk_meta(self) -> dict[str, int | tl.dtype]:
        """``meta()`` with the value tiles and launch options of the dq/dk kernel (see ``DQK_BLOCK_V``)."""
        tiles = {"BV": DQK_BLOCK_V, "NV": triton.cdiv(self.V, DQK_BLOCK_V)}
        stages = 1 if self.BR > SUB_CHUNK else _DQK_LAUNCH["num_stages"]
        # Exact fp32 products even where TF32 is allowed: TF32's operand layouts took this kernel from 169 to 255
        # registers and spilled at K = 64, vector decay (sm_90 ptxas).
        return {**self.meta(), **tiles, **_DQK_LAUNCH, "num_stages": stages, "PREC": "ieee"}

    def value_blocks(self, meta: dict) -> int:
        """Value tiles of an autotuned kernel's launch (``meta`` holds the ``BV`` its autotuner picked)."""
        return triton.cdiv(self.V, meta["BV"])


def check_decay_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    initial_state: torch.Tensor | None,
) -> None:
    """Raise ``ValueError`` naming the argument when shapes, dtypes or devices do not fit the kernels."""
    if q.dim() != 4:
        raise ValueError(f"q must be [B, H, T, Dk]; got shape {tuple(q.shape)}")
    B, H, T, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}; got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, H, T, Dv] = [{B}, {H}, {T}, Dv]; got shape {tuple(v.shape)}")
    if tuple(log_decay.shape) not in ((B, H, T), (B, H, T, K)):
        raise ValueError(
            f"log_decay must be [B, H, T] = {(B, H, T)} (scalar decay) or [B, H, T, Dk] = {(B, H, T, K)}"
            f" (vector decay); got {tuple(log_decay.shape)}"
        )
    if T < 1:
        raise ValueError("the sequence length T must be at least 1")
    if K > MAX_HEAD_DIM_K:
        raise ValueError(f"key head dim Dk={K} exceeds {MAX_HEAD_DIM_K}, the largest the kernels tile")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype among {_DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not log_decay.is_floating_point():
        raise ValueError(f"log_decay must be floating point; got {log_decay.dtype}")
    V = v.shape[-1]
    if initial_state is not None and tuple(initial_state.shape) != (B, H, K, V):
        raise ValueError(
            f"initial_state must be [B, H, Dk, Dv] = {(B, H, K, V)}; got {tuple(initial_state.shape)}"
        )
    tensors = [q, k, v, log_decay] + ([initial_state] if initial_state is not None else [])
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"all inputs must be on one device; got {[str(t.device) for t in tensors]}")


def _matmul_dtype(dtype: torch.dtype) -> tl.dtype:
    """Operand dtype of the kernels' matrix products: the input dtype (bf16/fp16 tensor cores, exact fp32).

    Under ``TRITON_INTERPRET=1`` bf16 operands are widened to fp32: the Triton 3.9 interpreter's ``tl.dot``
    multiplies the raw bits of bf16 tiles. The operands are already rounded to bf16 there, so the widened
    product equals the GPU's bf16 x bf16 -> fp32 product up to summation order.
    """
    if dtype == torch.bfloat16 and INTERPRETED:
        return tl.float32
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def check_chunk_size(chunk_size: int) -> None:
    if chunk_size < SUB_CHUNK or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= {SUB_CHUNK}; got {chunk_size}")


def _geometry(q: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, chunk_size: int) -> _Geometry:
    check_chunk_size(chunk_size)
    B, H, T, K = q.shape
    V = v.shape[-1]
    vector = log_decay.dim() == 4
    # A short sequence needs no chunk longer than itself (the math does not depend on the chunking).
    BT = min(chunk_size, max(SUB_CHUNK, triton.next_power_of_2(T)))
    BK = max(16, triton.next_power_of_2(K))
    # Exact fp32 products run on FMA units with both operands spread over registers: smaller row and value tiles
    # than for 16-bit inputs keep them from spilling (sm_90 ptxas reports). BV: the value tile of the output, dv
    # and log-decay kernels (the state kernels' is autotuned).
    fp32 = q.dtype == torch.float32
    BV = min(_block_v_max(BK, q.dtype), max(16, triton.next_power_of_2(V)))
    return _Geometry(
        B=B,
        H=H,
        T=T,
        K=K,
        V=V,
        vector=vector,
        BT=BT,
        BR=SUB_CHUNK if vector or fp32 else min(BT, MAX_BLOCK_ROWS),
        BK=BK,
        BV=BV,
        GK=K if vector else 1,
        GBK=BK if vector else 1,
        NT=triton.cdiv(T, BT),
        NV=triton.cdiv(V, BV),
        MM=_matmul_dtype(q.dtype),
        PREC=dot_precision(q.dtype),
    )


def _chunk_cumsum(log_decay: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    g = torch.empty(log_decay.shape, device=log_decay.device, dtype=torch.float32)
    _chunk_cumsum_kernel[(geo.NT, geo.BH)](log_decay, g, geo.T, GK=geo.GK, BT=geo.BT, GBK=geo.GBK)
    return g


def _chunk_states(
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None,
    geo: _Geometry,
    final_state: torch.Tensor | None,
) -> torch.Tensor:
    """States at every chunk start ``[B, H, NT, Dk, Dv]``; the state after the last token goes to ``final_state``
    when given (``[B, H, Dk, Dv]`` fp32)."""
    h = torch.empty(geo.B, geo.H, geo.NT, geo.K, geo.V, device=k.device, dtype=torch.float32)
    _chunk_state_fwd_kernel[lambda meta: (geo.value_blocks(meta), geo.NK, geo.BH)](
        k,
        v,
        g,
        initial_state if initial_state is not None else h,
        h,
        final_state if final_state is not None else h,
        geo.T,
        geo.NT,
        BT=geo.BT,
        HAS_H0=initial_state is not None,
        STORE_HT=final_state is not None,
        **geo.meta(),
    )
    return h


# ----------------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------------
# The kernels run inside `torch.library.custom_op`s, so torch.compile and selective activation checkpointing (SAC)
# see each launch as one opaque op whose outputs are fresh tensors (`register_fake` gives their shapes): they can
# trace it, save its outputs or recompute it, which they could not do through a `torch.autograd.Function`. Ops cannot
# return None, so an output the caller did not ask for (final state, initial-state gradient) is an empty tensor that
# the wrappers turn back into None. The kernels index row-major memory: the public wrappers pass contiguous tensors
# (so the backward saves those), and each op body makes sure again for direct callers of `torch.ops.transformers_mhc`.


def make_contiguous(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Each tensor contiguous (itself when it already is); None stays None."""
    return [t.contiguous() if t is not None else None for t in tensors]


def _absent(like: torch.Tensor) -> torch.Tensor:
    """Stands for a None output: an empty fp32 tensor on ``like``'s device."""
    return like.new_empty(0, dtype=torch.float32)


def final_state_buffer(q: torch.Tensor, v: torch.Tensor, output_final_state: bool) -> torch.Tensor:
    """The final state's buffer ``[B, H, Dk, Dv]`` fp32, or ``_absent`` when the caller did not ask for it."""
    if not output_final_state:
        return _absent(q)
    return q.new_empty(*q.shape[:2], q.shape[-1], v.shape[-1], dtype=torch.float32)


@torch.library.custom_op("transformers_mhc::chunk_decay_fwd", mutates_args=())
def chunk_decay_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked forward: ``(o, final_state)``, the final state empty unless ``output_final_state``."""
    q, k, v, log_decay, initial_state = make_contiguous(q, k, v, log_decay, initial_state)
    geo = _geometry(q, v, log_decay, chunk_size)
    o = q.new_empty(v.shape)
    ht = final_state_buffer(q, v, output_final_state)
    with device_guard(q):
        g = _chunk_cumsum(log_decay, geo)
        h = _chunk_states(k, v, g, initial_state, geo, ht if output_final_state else None)
        n_row_blocks = geo.NT * (geo.BT // geo.BR)
        _chunk_output_fwd_kernel[(n_row_blocks, geo.NV, geo.BH)](
            q, k, v, g, h, o, scale, geo.T, geo.NT, **geo.row_meta()
        )
    return o, ht


@chunk_decay_fwd.register_fake
def _(q, k, v, log_decay, scale, initial_state, output_final_state, chunk_size):
    """The outputs' shapes, dtypes and devices, for tracing (torch.compile, SAC, meta tensors)."""
    return q.new_empty(v.shape), final_state_buffer(q, v, output_final_state)


@torch.library.custom_op("transformers_mhc::chunk_decay_bwd", mutates_args=())
def chunk_decay_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    do: torch.Tensor,
    dht: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv, dlog_decay, dinitial_state)``, the last empty without an initial state, from ``do``
    (``q.dtype``) and ``dht`` (fp32, or None when no gradient reaches the final state).

    Exact gradients of the recurrence, so they also serve the fused recurrent kernel.
    """
    q, k, v, log_decay, initial_state, do, dht = make_contiguous(q, k, v, log_decay, initial_state, do, dht)
    geo = _geometry(q, v, log_decay, chunk_size)
    with device_guard(q):
        g = _chunk_cumsum(log_decay, geo)
        h = _chunk_states(k, v, g, initial_state, geo, final_state=None)

        dh = torch.empty_like(h)
        dh0 = torch.empty_like(initial_state, dtype=torch.float32) if initial_state is not None else None
        _chunk_state_bwd_kernel[lambda meta: (geo.value_blocks(meta), geo.NK, geo.BH)](
            q,
            do,
            g,
            dht if dht is not None else dh,
            dh,
            dh0 if dh0 is not None else dh,
            scale,
            geo.T,
            geo.NT,
            BT=geo.BT,
            HAS_DHT=dht is not None,
            STORE_DH0=dh0 is not None,
            **geo.meta(),
        )

        n_row_blocks = geo.NT * (geo.BT // geo.BR)
        dv = torch.empty_like(v)
        _chunk_dv_bwd_kernel[(n_row_blocks, geo.NV, geo.BH)](
            q, k, do, g, dh, dv, scale, geo.T, geo.NT, **geo.dv_meta()
        )

        dq = torch.empty_like(q)
        dk = torch.empty_like(k)
        # Scalar decay: one slice of channel sums per key block, added up here.
        w = torch.empty((1 if geo.vector else geo.NK, *g.shape), device=g.device, dtype=g.dtype)
        x = torch.empty_like(w)
        _chunk_dqk_bwd_kernel[(n_row_blocks, geo.NK, geo.BH)](
            q,
            k,
            v,
            do,
            g,
            h,
            dh,
            dq,
            dk,
            w,
            x,
            scale,
            geo.T,
            geo.NT,
            BT=geo.BT,
            BR=geo.BR,
            VECTOR=geo.vector,
            **geo.dqk_meta(),
        )
        w, x = w.sum(0), x.sum(0)

        dlog_decay = torch.empty_like(log_decay)
        dlog_meta = {"BT": geo.BT, "NV": geo.NV, "VECTOR": geo.vector, **geo.meta(False)}
        _chunk_dlog_decay_bwd_kernel[(geo.NT, geo.BH)](g, h, dh, w, x, dlog_decay, geo.T, geo.NT, **dlog_meta)
    dh0 = dh0.to(initial_state.dtype) if dh0 is not None else _absent(q)
    return dq, dk, dv, dlog_decay, dh0


@chunk_decay_bwd.register_fake
def _(q, k, v, log_decay, scale, initial_state, do, dht, chunk_size):
    """The gradients' shapes, dtypes and devices, for tracing."""
    dh0 = initial_state.new_empty(initial_state.shape) if initial_state is not None else _absent(q)
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
        log_decay.new_empty(log_decay.shape),
        dh0,
    )


def save_decay_inputs(ctx, inputs: tuple, output_final_state: bool, chunk_size: int) -> None:
    """``setup_context`` shared by the decay ops, whose inputs start ``(q, k, v, log_decay, scale, initial_state)``:
    the backward recomputes the states from the inputs, so only they are saved."""
    q, k, v, log_decay, scale, initial_state = inputs[:6]
    ctx.save_for_backward(q, k, v, log_decay, initial_state)
    ctx.scale = scale
    ctx.output_final_state = output_final_state
    ctx.chunk_size = chunk_size


def decay_backward(ctx, do: torch.Tensor | None, dht: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Gradients ``(dq, dk, dv, dlog_decay, dinitial_state or None)`` through ``chunk_decay_bwd``, from the
    gradients of ``(o, final_state)``; either may come as None or zeros when the loss does not use it."""
    q, k, v, log_decay, initial_state = ctx.saved_tensors
    # `sum().backward()` hands stride-0 expanded gradients: the kernels index row-major memory.
    do = do.to(q.dtype).contiguous() if do is not None else q.new_zeros(v.shape)
    # A final state the caller did not ask for was an empty placeholder: its gradient is nothing.
    dht = dht.float().contiguous() if ctx.output_final_state and dht is not None else None
    dq, dk, dv, dlog_decay, dh0 = chunk_decay_bwd(
        q, k, v, log_decay, ctx.scale, initial_state, do, dht, ctx.chunk_size
    )
    return dq, dk, dv, dlog_decay, dh0 if initial_state is not None else None


def _chunk_setup_context(ctx, inputs: tuple, output: tuple) -> None:
    output_final_state, chunk_size = inputs[6:]
    save_decay_inputs(ctx, inputs, output_final_state, chunk_size)


def _chunk_autograd_backward(
    ctx, do: torch.Tensor | None, dht: torch.Tensor | None
) -> tuple[torch.Tensor | None, ...]:
    dq, dk, dv, dlog_decay, dh0 = decay_backward(ctx, do, dht)
    return dq, dk, dv, dlog_decay, None, dh0, None, None


chunk_decay_fwd.register_autograd(_chunk_autograd_backward, setup_context=_chunk_setup_context)


def chunk_decay_linear_attn_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked linear attention with decay, Triton forward and backward (op ``transformers_mhc::chunk_decay_fwd``).

    ``S_t = diag(exp(log_decay_t)) S_{t-1} + k_t v_t^T``, ``o_t = scale * q_t^T S_t``.

    Args:
        q, k: ``[B, H, T, Dk]`` (fp32, bf16 or fp16; ``Dk <= 256``).
        v: ``[B, H, T, Dv]``, same dtype.
        log_decay: ``[B, H, T]`` (one decay per head) or ``[B, H, T, Dk]`` (per key channel); finite and
            ``<= 0`` (not checked: that would synchronise the device; positive values are not supported).
        scale: multiplies the outputs.
        initial_state: optional ``[B, H, Dk, Dv]`` state before the first token; it receives a gradient.
        output_final_state: also return the state after the last token.
        chunk_size: rows per chunk, a power of two >= 16.

    Returns:
        ``(o, final_state)``: ``o`` is ``[B, H, T, Dv]`` in ``q.dtype``; ``final_state`` is
        ``[B, H, Dk, Dv]`` fp32, or ``None`` unless ``output_final_state``.
    """
    check_decay_inputs(q, k, v, log_decay, initial_state)
    check_chunk_size(chunk_size)
    # Contiguous here rather than only inside the op, so the backward saves (and reuses) the contiguous copies.
    q, k, v, log_decay, initial_state = make_contiguous(q, k, v, log_decay, initial_state)
    o, ht = chunk_decay_fwd(
        q, k, v, log_decay, float(scale), initial_state, bool(output_final_state), int(chunk_size)
    )
    return o, ht if output_final_state else None
