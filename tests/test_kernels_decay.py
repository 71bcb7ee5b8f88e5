"""The decay linear-attention Triton kernels against the float64 token-by-token reference.

On a GPU the kernels run on CUDA tensors; without one on CPU tensors under `TRITON_INTERPRET=1` (both set up in
`conftest.py`, `KERNEL_DEVICE`). Every
comparison is kernel vs `naive_decay_linear_attn` (the literal recurrence in float64), for the outputs, the
final state and the gradients of q, k, v, log_decay and the initial state. The interpreter is slow (the
vector-decay kernels loop over 16-row sub-chunks), so shapes are small and the wider sweep is `slow`.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from conftest import KERNEL_DEVICE  # noqa: E402

from transformers_mhc.kernels.decay_linear_attn import (  # noqa: E402
    chunk_decay_linear_attn_triton,
    fused_recurrent_decay_triton,
)
from transformers_mhc.models.decay_ops import naive_decay_linear_attn  # noqa: E402

pytestmark = pytest.mark.triton

SCALE = 0.5
FP32_TOL = 1e-4  # max abs error / max |reference|
BF16_TOL = 1e-2  # relative RMS error (fla's test practice: 0.005-0.01 for 16-bit inputs)
DECAYS = {"moderate": (-1.0, 0.0), "near_one": (-1e-3, 0.0), "strong": (-12.0, -10.0)}


def _inputs(B, H, T, K, V, vector, decay="moderate", seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, T, K, generator=gen) for _ in range(2))
    v = torch.randn(B, H, T, V, generator=gen)
    lo, hi = DECAYS[decay]
    log_decay = lo + (hi - lo) * torch.rand((B, H, T, K) if vector else (B, H, T), generator=gen)
    h0 = torch.randn(B, H, K, V, generator=gen)
    return tuple(t.to(KERNEL_DEVICE) for t in (q, k, v, log_decay, h0))


def _run(fn, inputs, dtype, with_state=True, **kwargs):
    """Outputs and gradients of `fn` for the loss <o, do> + <final_state, dstate> (cotangents seeded)."""
    q, k, v, log_decay, h0 = inputs
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (q, k, v)]
    leaves.append(log_decay.detach().to(state_dtype).clone().requires_grad_())
    leaves.append(h0.detach().to(state_dtype).clone().requires_grad_() if with_state else None)
    o, ht = fn(*leaves[:4], scale=SCALE, initial_state=leaves[4], output_final_state=with_state, **kwargs)
    gen = torch.Generator().manual_seed(1)
    loss = (o.to(torch.float64) * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device)).sum()
    if with_state:
        cotangent = torch.randn(ht.shape, generator=gen, dtype=torch.float64).to(ht.device)
        loss = loss + (ht.to(torch.float64) * cotangent).sum()
    loss.backward()
    grads = [t.grad if t is not None else None for t in leaves]
    return o, ht, grads


def _reference(inputs, dtype=torch.float32, with_state=True):
    """The float64 recurrence on the inputs as the kernel sees them (rounded to `dtype` first)."""
    rounded = [t.to(dtype).to(torch.float64) for t in inputs[:3]] + [inputs[3].double(), inputs[4].double()]
    return _run(naive_decay_linear_attn, rounded, torch.float64, with_state)


def _max_rel(x, ref):
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def _rms_rel(x, ref):
    return ((x.double() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-300)).item()


def _check(got, ref, err, tol):
    """Outputs, final state and every gradient: finite, with the reference's shape, within `tol`."""
    names = ["o", "final_state", "dq", "dk", "dv", "dlog_decay", "dinitial_state"]
    pairs = [got[0], got[1], *got[2]], [ref[0], ref[1], *ref[2]]
    for name, x, r in zip(names, *pairs):
        assert (x is None) == (r is None), name
        if x is None:
            continue
        assert x.shape == r.shape, name
        assert torch.isfinite(x).all(), f"{name} has NaN/inf"
        e = err(x, r)
        assert math.isfinite(e) and e <= tol, f"{name}: relative error {e:.2e} > {tol:.0e}"


# B, H, T, K, V, chunk_size: T not a multiple of the chunk, several chunks and a single partial one,
# head dims 16 and 32, K and V that are not powers of two, V split over two value tiles (V = 80 > 64).
SHAPES = [
    pytest.param(2, 2, 63, 16, 32, 16, id="T63-c16-B2H2-K16V32"),
    pytest.param(1, 2, 63, 32, 16, 64, id="T63-c64-B1H2-K32V16"),
    pytest.param(2, 1, 40, 24, 80, 32, id="T40-c32-B2H1-K24V80"),
    pytest.param(1, 1, 17, 16, 16, 64, id="T17"),
    pytest.param(1, 1, 1, 16, 16, 64, id="T1"),
    # Key dims over the kernels' key tile (64): two key tiles, the second partly masked (K = 80) or full (K = 128).
    pytest.param(1, 1, 20, 80, 16, 16, id="T20-c16-K80V16"),
    pytest.param(1, 1, 20, 128, 24, 16, id="T20-c16-K128V24"),
]


@pytest.mark.parametrize("vector", [False, True], ids=["scalar", "vector"])
@pytest.mark.parametrize(("B", "H", "T", "K", "V", "chunk_size"), SHAPES)
def test_chunk_matches_naive_fp32(B, H, T, K, V, chunk_size, vector):
    inputs = _inputs(B, H, T, K, V, vector)
    got = _run(chunk_decay_linear_attn_triton, inputs, torch.float32, chunk_size=chunk_size)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    _check(got, _reference(inputs), _max_rel, FP32_TOL)


@pytest.mark.parametrize("vector", [False, True], ids=["scalar", "vector"])
@pytest.mark.parametrize("decay", ["near_one", "strong"])
def test_chunk_extreme_decays(decay, vector):
    # Strong decay (log λ in [-12, -10]) over a chunk of 64 drives the cumulative log-decay to about -750:
    # any positive exponent would overflow. The log-decay gradient is then ~e^-10 and must stay accurate.
    inputs = _inputs(1, 2, 63, 16, 16, vector, decay=decay)
    got = _run(chunk_decay_linear_attn_triton, inputs, torch.float32, chunk_size=64)
    _check(got, _reference(inputs), _max_rel, FP32_TOL)


# Head dims of real models (RoPE doubles the key dim: 128 + RoPE is 256). Minutes through the interpreter, so in the
# default run on a GPU only.
_SLOW_ON_CPU = pytest.mark.slow if KERNEL_DEVICE.type == "cpu" else ()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("vector", [False, True], ids=["scalar", "vector"])
@pytest.mark.parametrize(
    ("K", "V"),
    [pytest.param(K, V, marks=_SLOW_ON_CPU) for K, V in [(80, 80), (128, 128), (256, 64), (256, 256)]],
)
def test_chunk_large_head_dims(K, V, vector, dtype):
    inputs = _inputs(1, 2, 100, K, V, vector)
    got = _run(chunk_decay_linear_attn_triton, inputs, dtype, chunk_size=64)
    if dtype == torch.float32:
        _check(got, _reference(inputs), _max_rel, FP32_TOL)
    else:
        _check(got, _reference(inputs, dtype), _rms_rel, BF16_TOL)


@pytest.mark.parametrize("vector", [False, True], ids=["scalar", "vector"])
def test_minus_inf_log_decay(vector):
    """A saturated gate (log decay -inf) resets the state: the chunk kernels take it at a finite floor, so their
    differences of cumulative sums never meet -inf - -inf (NaN in the interpreter, silently 0 on a GPU)."""
    q, k, v, log_decay, h0 = _inputs(1, 2, 40, 16, 16, vector)
    log_decay[:, :, 5] = float("-inf")  # every channel of token 5
    if vector:  # one head, some channels of token 21
        log_decay[:, 1, 21, :3] = float("-inf")
    inputs = (q, k, v, log_decay, h0)
    for fn, kwargs in [
        (chunk_decay_linear_attn_triton, {"chunk_size": 16}),
        (fused_recurrent_decay_triton, {}),
    ]:
        _check(_run(fn, inputs, torch.float32, **kwargs), _reference(inputs), _max_rel, FP32_TOL)


def test_chunk_without_states():
    """No initial state, no final state: the state gradient is None, the rest still matches."""
    inputs = _inputs(2, 1, 33, 16, 32, vector=True)
    got = _run(chunk_decay_linear_attn_triton, inputs, torch.float32, with_state=False, chunk_size=16)
    assert got[1] is None and got[2][4] is None
    _check(got, _reference(inputs, with_state=False), _max_rel, FP32_TOL)


@pytest.mark.parametrize("vector", [False, True], ids=["scalar", "vector"])
def test_chunk_bf16(vector):
    inputs = _inputs(2, 1, 63, 32, 32, vector)
    got = _run(chunk_decay_linear_attn_triton, inputs, torch.bfloat16, chunk_size=32)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    assert got[2][0].dtype == torch.bfloat16 and got[2][3].dtype == torch.float32
    _check(got, _reference(inputs, torch.bfloat16), _rms_rel, BF16_TOL)


@pytest.mark.parametrize("vector", [False, True], ids=["scalar", "vector"])
@pytest.mark.parametrize("T", [1, 5])
def test_recurrent_matches_naive(T, vector):
    """A decode step (T = 1) and a few steps from a given state; gradients through the chunked backward."""
    inputs = _inputs(2, 2, T, 16, 80, vector)
    got = _run(fused_recurrent_decay_triton, inputs, torch.float32)
    _check(got, _reference(inputs), _max_rel, FP32_TOL)


MATMUL_KERNELS = (
    "_chunk_state_fwd_kernel",
    "_chunk_output_fwd_kernel",
    "_chunk_state_bwd_kernel",
    "_chunk_dv_bwd_kernel",
    "_chunk_dqk_bwd_kernel",
)


class _RecordPrecision:
    """Stands in for a kernel: records the ``PREC`` each launch passes, then launches the real kernel."""

    def __init__(self, kernel, name, seen):
        self.kernel, self.name, self.seen = kernel, name, seen

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.seen.append((self.name, kwargs["PREC"]))
            return launch(*args, **kwargs)

        return run


@pytest.fixture
def matmul_precision():
    """Sets torch's float32 matmul precision for one test and restores it afterwards."""
    previous = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("precision", ["highest", "high"])
def test_chunk_dot_precision(precision, dtype, matmul_precision, monkeypatch):
    """The matrix-product kernels, forward and backward, get TF32 products only for fp32 inputs and only when torch's
    float32 matmul precision allows them ("high"); torch's default "highest" stays exact, as do the dv and dq/dk
    kernels. (The interpreter multiplies exactly whatever the flag, so the flag is what is checked here; on a GPU
    the tolerance below is TF32's.)"""
    from transformers_mhc.kernels import decay_chunk as dc

    seen = []
    for name in MATMUL_KERNELS:
        monkeypatch.setattr(dc, name, _RecordPrecision(getattr(dc, name), name, seen))
    matmul_precision(precision)
    inputs = _inputs(1, 2, 40, 24, 16, vector=False)
    got = _run(chunk_decay_linear_attn_triton, inputs, dtype, chunk_size=16)
    expected = "tf32" if dtype == torch.float32 and precision == "high" else "ieee"
    # The dv and dq/dk kernels stay exact (TF32 made them spill); the states are computed twice.
    exact = {"_chunk_dv_bwd_kernel", "_chunk_dqk_bwd_kernel"}
    assert set(seen) == {(name, "ieee" if name in exact else expected) for name in MATMUL_KERNELS}
    if dtype == torch.bfloat16:
        _check(got, _reference(inputs, dtype), _rms_rel, BF16_TOL)
    else:
        _check(got, _reference(inputs), _max_rel, FP32_TOL if precision == "highest" else 1e-2)


def test_recurrent_autotune_candidates():
    """The recurrent kernel's launch candidates: on a GPU only those whose fp32 state tile stays within 64 elements
    per thread (a [256, 64] tile on 4 warps spilled on sm_90), no value tile wider than Dv needs; a single one
    under the interpreter."""
    from transformers_mhc.kernels import decay_recurrent as dr
    from transformers_mhc.kernels.decay_autotune import admitted_configs, pruner

    grid = [triton.Config({"BV": bv}, num_warps=w) for bv in (16, 32, 64) for w in (2, 4, 8)]
    kept = admitted_configs(grid, dr.recurrent_config_fits, 256, 256, torch.bfloat16)
    assert {(c.kwargs["BV"], c.num_warps) for c in kept} == {
        (16, 2),
        (16, 4),
        (16, 8),
        (32, 4),
        (32, 8),
        (64, 8),
    }
    assert {
        c.kwargs["BV"] for c in admitted_configs(grid, dr.recurrent_config_fits, 24, 16, torch.float32)
    } == {16}
    assert len(admitted_configs(grid, dr.recurrent_config_fits, 64, 64, torch.float32)) == len(grid)
    # The autotuner's pruning hook sees the launch's constexprs and positional tensors (it runs on a GPU only).
    prune = pruner(dr.recurrent_config_fits)
    pruned = prune(grid, {"q_ptr": torch.empty(0, dtype=torch.bfloat16)}, K=256, V=256, GK=256, HAS_H0=False)
    assert pruned == kept
    if KERNEL_DEVICE.type == "cpu":
        assert len(dr.RECURRENT_CONFIGS) == 1


def test_chunk_autotune_candidates():
    """The launch candidates of the autotuned chunk state kernels: value tiles per warp no wider than on 8 warps at the
    sizes the sm_90 ptxas reports allow (64 up to K = 64; then 32 for 16-bit inputs, 16 for fp32), at most two
    stages; a single candidate under the interpreter."""
    from transformers_mhc.kernels import decay_chunk as dc
    from transformers_mhc.kernels.decay_autotune import admitted_configs

    grid = [
        triton.Config({"BV": bv}, num_warps=w, num_stages=s)
        for bv in (16, 32, 64)
        for w in (4, 8)
        for s in (1, 2, 3)
    ]

    def admitted(K, dtype):
        return {
            (c.kwargs["BV"], c.num_warps) for c in admitted_configs(grid, dc.matmul_config_fits, K, K, dtype)
        }

    assert admitted(64, torch.float32) == {(16, 4), (32, 4), (16, 8), (32, 8), (64, 8)}
    assert admitted(128, torch.bfloat16) == {(16, 4), (16, 8), (32, 8)}
    assert admitted(256, torch.float32) == {(16, 8)}
    assert all(
        c.num_stages <= 2 for c in admitted_configs(grid, dc.matmul_config_fits, 64, 64, torch.float32)
    )
    if KERNEL_DEVICE.type == "cpu":
        assert len(dc.STATE_CONFIGS) == 1


@pytest.mark.parametrize("vector", [False, True], ids=["scalar", "vector"])
def test_recurrent_large_head_dims(vector):
    """Dk = 128 (one state tile of 128 key rows), Dv = 72: value tiles over several programs, the last one masked."""
    inputs = _inputs(1, 2, 3, 128, 72, vector)
    got = _run(fused_recurrent_decay_triton, inputs, torch.float32)
    _check(got, _reference(inputs), _max_rel, FP32_TOL)


@pytest.mark.parametrize("vector", [False, True], ids=["scalar", "vector"])
def test_prefill_then_decode_equals_full(vector):
    """Chunked prefill, then one recurrent step per token from the carried state == the whole sequence."""
    q, k, v, log_decay, h0 = _inputs(1, 2, 21, 16, 32, vector)
    ref_o, ref_ht = naive_decay_linear_attn(
        *(t.double() for t in (q, k, v, log_decay)), SCALE, h0.double(), output_final_state=True
    )
    o, state = chunk_decay_linear_attn_triton(
        q[:, :, :16], k[:, :, :16], v[:, :, :16], log_decay[:, :, :16], SCALE, h0, True, chunk_size=16
    )
    outs = [o]
    for t in range(16, 21):
        o_t, state = fused_recurrent_decay_triton(
            *(x[:, :, t : t + 1] for x in (q, k, v, log_decay)), SCALE, state, output_final_state=True
        )
        outs.append(o_t)
    assert _max_rel(torch.cat(outs, dim=2), ref_o) <= FP32_TOL
    assert _max_rel(state, ref_ht) <= FP32_TOL


def test_bad_inputs_raise():
    q, k, v, log_decay, h0 = _inputs(1, 1, 8, 16, 16, vector=False)
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_decay_linear_attn_triton(q, k, v, log_decay, chunk_size=48)
    with pytest.raises(ValueError, match="log_decay"):
        chunk_decay_linear_attn_triton(q, k, v, log_decay[..., :4])
    with pytest.raises(ValueError, match="initial_state"):
        fused_recurrent_decay_triton(q, k, v, log_decay, initial_state=h0[..., :8])
    with pytest.raises(ValueError, match="dtype"):
        fused_recurrent_decay_triton(q, k.double(), v, log_decay)
    with pytest.raises(ValueError, match="Dk=300"):
        big = torch.zeros(1, 1, 8, 300, device=KERNEL_DEVICE)
        chunk_decay_linear_attn_triton(big, big, v, log_decay)


@pytest.mark.slow
@pytest.mark.parametrize("vector", [False, True], ids=["scalar", "vector"])
@pytest.mark.parametrize("chunk_size", [16, 32, 64, 128])
@pytest.mark.parametrize("decay", list(DECAYS))
def test_chunk_sweep(decay, chunk_size, vector):
    inputs = _inputs(2, 2, 130, 32, 48, vector, decay=decay, seed=chunk_size)
    got = _run(chunk_decay_linear_attn_triton, inputs, torch.float32, chunk_size=chunk_size)
    _check(got, _reference(inputs), _max_rel, FP32_TOL)


_COMPILE_FOR_CUDA = """
import inspect
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from transformers_mhc.kernels import decay_chunk as dc, decay_recurrent as dr

for vector in (False, True):
    K = V = BK = BV = 64
    GK, GBK = (K, BK) if vector else (1, 1)
    tiles = dict(K=K, V=V, GK=GK, BK=BK, BV=BV, GBK=GBK)
    mm = dict(MM=tl.bfloat16, PREC="ieee")
    chunk = dict(tiles, BT=64, BR=16 if vector else 64, VECTOR=vector, **mm)
    jobs = [
        (dc._chunk_cumsum_kernel, dict(GK=GK, BT=64, GBK=GBK)),
        (dc._chunk_state_fwd_kernel, dict(tiles, BT=64, HAS_H0=True, STORE_HT=True, **mm)),
        (dc._chunk_output_fwd_kernel, dict(chunk, NK=1)),
        (dc._chunk_state_bwd_kernel, dict(tiles, BT=64, HAS_DHT=True, STORE_DH0=True, **mm)),
        (dc._chunk_dv_bwd_kernel, dict(chunk, NK=1)),
        (dc._chunk_dqk_bwd_kernel, dict(chunk, NV=2)),
        (dc._chunk_dlog_decay_bwd_kernel, dict(tiles, BT=64, NV=2, VECTOR=vector)),
        (dr._fused_recurrent_fwd_kernel, dict(tiles, HAS_H0=True, STORE_HT=True)),
    ]
    for fn, consts in jobs:
        if isinstance(fn, triton.runtime.Autotuner):  # compile the kernel under the autotuner, tiles given above
            fn = fn.fn
        signature = {}
        for name in inspect.signature(fn.fn).parameters:
            if name in consts:
                signature[name] = "constexpr"
            elif name in ("T", "NT"):
                signature[name] = "i32"
            elif name == "scale":
                signature[name] = "fp32"
            elif name in ("q_ptr", "k_ptr", "v_ptr", "do_ptr", "o_ptr", "dq_ptr", "dk_ptr", "dv_ptr"):
                signature[name] = "*bf16"
            else:
                signature[name] = "*fp32"
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=consts)
        triton.compile(src, target=GPUTarget("cuda", 80, 32))
        print("compiled", fn.fn.__name__, "vector" if vector else "scalar", flush=True)
"""


@pytest.mark.slow
def test_kernels_compile_for_cuda():
    """The interpreter is lenient (shapes, dtypes, loop-carried types): compile every kernel for sm_80
    offline with Triton's bundled ptxas, as a GPU would (minutes on a CPU)."""
    pytest.importorskip("triton.backends.nvidia")
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_CUDA], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("compiled") == 16


# ----------------------------------------------------------------------------------------------------
# The kernels as torch custom ops: opcheck, torch.compile, selective activation checkpointing
# ----------------------------------------------------------------------------------------------------
OPS = torch.ops.transformers_mhc


def _op_inputs(vector, with_state, requires_grad=True):
    """Small fp32 leaves for the ops: q, k, v, log_decay and the initial state (or None)."""
    q, k, v, log_decay, h0 = _inputs(1, 2, 20, 16, 24, vector)
    leaves = [t.clone().requires_grad_(requires_grad) for t in (q, k, v, log_decay)]
    return (*leaves, h0.clone().requires_grad_(requires_grad) if with_state else None)


@pytest.mark.parametrize("with_state", [False, True], ids=["no_state", "state"])
@pytest.mark.parametrize("vector", [False, True], ids=["scalar", "vector"])
@pytest.mark.parametrize("op", ["chunk_decay_fwd", "fused_recurrent_decay_fwd"])
def test_forward_ops_opcheck(op, vector, with_state):
    """Schema, autograd registration, fake tensors and AOT dispatch (forward and backward) of the forward ops."""
    q, k, v, log_decay, h0 = _op_inputs(vector, with_state)
    extra = (16,) if op == "chunk_decay_fwd" else ()  # chunk_size
    torch.library.opcheck(getattr(OPS, op), (q, k, v, log_decay, SCALE, h0, with_state, *extra))


@pytest.mark.parametrize("with_state", [False, True], ids=["no_state", "state"])
@pytest.mark.parametrize("vector", [False, True], ids=["scalar", "vector"])
def test_backward_op_opcheck(vector, with_state):
    """The backward op, with and without an initial state and a final-state gradient (it has no autograd)."""
    q, k, v, log_decay, h0 = _op_inputs(vector, with_state, requires_grad=False)
    do = torch.randn_like(v)
    dht = torch.randn(1, 2, 16, 24, device=KERNEL_DEVICE) if with_state else None
    torch.library.opcheck(OPS.chunk_decay_bwd, (q, k, v, log_decay, SCALE, h0, do, dht, 16))


def _loss_and_grads(fn, leaves, **kwargs):
    """Output, final state and gradients for the loss sum(o) + sum(final_state): `sum` hands the backward stride-0
    expanded gradients."""
    q, k, v, log_decay, h0 = (t.detach().clone().requires_grad_() if t is not None else None for t in leaves)
    o, ht = fn(q, k, v, log_decay, SCALE, h0, True, **kwargs)
    (o.sum() + ht.sum()).backward()
    return o.detach(), ht.detach(), [t.grad for t in (q, k, v, log_decay, h0) if t is not None]


def _assert_same(got, expected):
    o, ht, grads = got
    o_ref, ht_ref, grads_ref = expected
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(ht, ht_ref)
    assert len(grads) == len(grads_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


DECAY_FUNCTIONS = [
    pytest.param(chunk_decay_linear_attn_triton, {"chunk_size": 16}, id="chunk"),
    pytest.param(fused_recurrent_decay_triton, {}, id="recurrent"),
]


def test_sum_loss_matches_naive():
    """Stride-0 gradients from `sum()` reach the kernels as contiguous memory: the gradients match the reference."""
    leaves = _op_inputs(vector=True, with_state=True)
    got = _loss_and_grads(chunk_decay_linear_attn_triton, leaves, chunk_size=16)
    ref = _loss_and_grads(naive_decay_linear_attn, [t.double() for t in leaves])
    for x, r in zip([got[0], got[1], *got[2]], [ref[0], ref[1], *ref[2]]):
        assert _max_rel(x, r) <= FP32_TOL


@pytest.mark.parametrize("vector", [False, True], ids=["scalar", "vector"])
@pytest.mark.parametrize(("fn", "kwargs"), DECAY_FUNCTIONS)
def test_compile_fullgraph_aot_eager(fn, kwargs, vector):
    """torch.compile sees each kernel as one op (no graph break): same outputs and gradients as eager."""
    torch.compiler.reset()
    leaves = _op_inputs(vector, with_state=True)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    _assert_same(_loss_and_grads(compiled, leaves, **kwargs), _loss_and_grads(fn, leaves, **kwargs))


def test_compile_fullgraph_inductor():
    """Inductor compiles the torch code around the op (here a projection of q and a sigmoid gate)."""
    torch.compiler.reset()

    def layer(q, k, v, log_decay, scale, h0, output_final_state, chunk_size):
        gate = torch.nn.functional.logsigmoid(log_decay)
        return chunk_decay_linear_attn_triton(
            q * 2 - 1, k, v, gate, scale, h0, output_final_state, chunk_size
        )

    leaves = _op_inputs(vector=False, with_state=True)
    compiled = torch.compile(layer, backend="inductor", fullgraph=True)
    _assert_same(
        _loss_and_grads(compiled, leaves, chunk_size=16), _loss_and_grads(layer, leaves, chunk_size=16)
    )


def _save_decay_outputs(ctx, op, *args, **kwargs):
    """Selective checkpointing policy: keep the decay ops' outputs, recompute everything else."""
    from torch.utils.checkpoint import CheckpointPolicy

    decay_ops = (OPS.chunk_decay_fwd.default, OPS.fused_recurrent_decay_fwd.default)
    return CheckpointPolicy.MUST_SAVE if op in decay_ops else CheckpointPolicy.PREFER_RECOMPUTE


@pytest.mark.parametrize(("fn", "kwargs"), DECAY_FUNCTIONS)
def test_selective_activation_checkpointing(fn, kwargs):
    """Selective checkpointing that saves the ops' outputs (the kernels write only into their own fresh outputs,
    so nothing SAC cached is mutated) gives the gradients of the plain run."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    def layer(q, k, v, log_decay, scale, h0, output_final_state, **kw):
        o, ht = fn(q.sin(), k, v, log_decay * 0.5, scale, h0, output_final_state, **kw)
        return o * 2, ht

    def checkpointed(*args, **kw):
        context_fn = partial(create_selective_checkpoint_contexts, _save_decay_outputs)
        return checkpoint(layer, *args, use_reentrant=False, context_fn=context_fn, **kw)

    leaves = _op_inputs(vector=True, with_state=True)
    _assert_same(_loss_and_grads(checkpointed, leaves, **kwargs), _loss_and_grads(layer, leaves, **kwargs))
