"""The mHC Triton kernels against their pure-PyTorch references (forward and gradients).

On a GPU the kernels run on CUDA tensors; without one on CPU tensors under `TRITON_INTERPRET=1` (both set up in
`conftest.py`; every tensor here is made on `KERNEL_DEVICE`). The references are the plain formulas of `mhc_ops`,
so every comparison here is kernel vs torch on any device.
The interpreter is slow: shapes are small, and the wider sweep is marked `slow`.

Note on bf16: the Triton 3.9 interpreter truncates fp32 -> bf16 casts (a GPU rounds to nearest), so bf16
outputs may differ from torch by one bf16 ulp; their tolerance allows that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
from conftest import KERNEL_DEVICE  # noqa: E402

from transformers_mhc.kernels import mhc_coefficients as coefficients_module  # noqa: E402
from transformers_mhc.kernels import mhc_mix as mix_module  # noqa: E402
from transformers_mhc.kernels import mhc_sinkhorn as sinkhorn_module  # noqa: E402
from transformers_mhc.kernels.mhc import (  # noqa: E402
    hc_pre_mix_triton,
    hc_res_post_mix_triton,
    mhc_coefficients_triton,
    sinkhorn_knopp_triton,
)
from transformers_mhc.kernels.runtime import H100_SM_COUNT, sm_count  # noqa: E402

pytestmark = pytest.mark.triton

# The references: the paper's formulas in plain torch, whatever the device.
from transformers_mhc.models.mhc_ops import (  # noqa: E402
    hc_pre_mix,
    hc_res_post_mix,
    mhc_coefficients,
    sinkhorn_knopp,
)


@pytest.fixture(autouse=True)
def _tensors_on_the_kernel_device():
    with torch.device(KERNEL_DEVICE):
        yield


STREAMS = [1, 2, 4, 6]  # 6 is not a power of two: exercises the padded, masked tiles
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def _tol(dtype: torch.dtype) -> dict:
    # fp32: the kernels do the same fp32 math in another order. bf16: one ulp (2^-8 relative) plus headroom.
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}


# The coefficient kernel on 16-bit streams: its tensor-core matmuls take the fp32 weights and gradients as two
# 16-bit terms (`mhc_coefficients._dot`): ~2^-17 relative per term on a GPU, 2^-15 under the interpreter (which
# truncates the split), summed over up to hundreds of terms (dphi sums over tokens), so its fp32 outputs and
# gradients get this tolerance. A plain bf16 cast of the weights (2^-9 per term) is off by ~1e-2 here.
SPLIT16_TOL = {"rtol": 1e-3, "atol": 1e-3}


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


def _compare(
    kernel,
    reference,
    inputs: list[torch.Tensor],
    grad_dtype: torch.dtype,
    fp32_tol: dict | None = None,
    **kwargs,
) -> None:
    """Forward outputs and `autograd.grad` w.r.t. every input of `kernel` and `reference` must agree (fp32 values
    within `fp32_tol` when given, else `_tol`)."""

    def tol(dtype):
        return fp32_tol if fp32_tol is not None and dtype == torch.float32 else _tol(dtype)

    out_k = kernel(*inputs, **kwargs)
    out_r = reference(*inputs, **kwargs)
    out_k = out_k if isinstance(out_k, tuple) else (out_k,)
    out_r = out_r if isinstance(out_r, tuple) else (out_r,)
    assert len(out_k) == len(out_r)
    for a, b in zip(out_k, out_r):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol(b.dtype))
    cotangents = [torch.randn_like(o) for o in out_r]
    grads_k = torch.autograd.grad(out_k, inputs, cotangents)
    grads_r = torch.autograd.grad(out_r, inputs, cotangents)
    for x, a, b in zip(inputs, grads_k, grads_r):
        assert a.shape == x.shape and a.dtype == b.dtype == x.dtype
        torch.testing.assert_close(a, b, **tol(grad_dtype if x.dtype == grad_dtype else torch.float32))


# --------------------------------------------------------------------------------------------------
# Sinkhorn-Knopp
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", STREAMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sinkhorn_matches_reference(n, dtype):
    # fp32 on batch dims [2, 5], with the default 20 iterations where the matrices are non-trivial; bf16 on 7
    # matrices with fewer iterations (the dtype only changes the input cast; the interpreter is slow).
    if dtype == torch.float32:
        shape, iterations = (2, 5), (20 if n >= 4 else 10)
    else:
        shape, iterations = (7,), 6
    logits = _leaf((2 * torch.randn(*shape, n, n)).to(dtype))
    _compare(sinkhorn_knopp_triton, sinkhorn_knopp, [logits], dtype, num_iterations=iterations)
    out = sinkhorn_knopp_triton(logits, iterations)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.sum(-1), torch.ones(shape + (n,)), rtol=0, atol=1e-6)


def test_sinkhorn_many_programs_and_non_contiguous():
    # 40 matrices of 6x6 need three programs (16 padded 8x8 tiles each); a transposed view as input.
    base = _leaf(torch.randn(40, 6, 6))
    logits = base.transpose(-1, -2)
    assert not logits.is_contiguous()
    out_k, out_r = sinkhorn_knopp_triton(logits, 3), sinkhorn_knopp(logits, 3)
    torch.testing.assert_close(out_k, out_r, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out_r)
    (grad_k,) = torch.autograd.grad(out_k, base, g)
    (grad_r,) = torch.autograd.grad(out_r, base, g)
    torch.testing.assert_close(grad_k, grad_r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("n", "dtype"),
    [(4, torch.float32), (6, torch.float32), (6, torch.bfloat16)],
    ids=["4-fp32", "6-fp32", "6-bf16"],
)
def test_sinkhorn_extreme_logits_stay_finite(n, dtype):
    signs = torch.randint(0, 2, (3, n, n)).float() * 2 - 1
    logits = _leaf((signs * 1e4 + torch.randn(3, n, n)).to(dtype))
    out = sinkhorn_knopp_triton(logits, 20)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.sum(-1), torch.ones(3, n), rtol=0, atol=1e-6)  # exact row sums
    ref = sinkhorn_knopp(logits, 20)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, logits, g)
    (grad_ref,) = torch.autograd.grad(ref, logits, g)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, grad_ref, **_tol(dtype))


def test_sinkhorn_backward_saves_only_the_logits():
    """Saved memory must not grow with the iteration count: the backward recomputes the iterates."""
    saved_bytes = {}
    for iterations in (1, 5, 20):
        logits = _leaf(torch.randn(2, 3, 4, 4))
        sizes = []

        def pack(t, sizes=sizes):
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = sinkhorn_knopp_triton(logits, iterations)
        saved_bytes[iterations] = sum(sizes)
        assert out.grad_fn is not None and len(out.grad_fn.saved_tensors) == 1
    assert saved_bytes[1] == saved_bytes[5] == saved_bytes[20] == 2 * 3 * 4 * 4 * 4, saved_bytes


# --------------------------------------------------------------------------------------------------
# Coefficients
# --------------------------------------------------------------------------------------------------
def _coefficient_inputs(n: int, C: int, tokens: tuple[int, ...], dtype: torch.dtype) -> list[torch.Tensor]:
    width = n * n + 2 * n
    x = _leaf(torch.randn(*tokens, n * C).to(dtype))
    phi = _leaf(torch.randn(width, n * C) / (n * C) ** 0.5)
    alpha = _leaf(torch.tensor([0.7, 1.3, 2.1]))  # far from 0 so every gate matters in the gradients
    bias = _leaf(torch.randn(width))
    return [x, phi, alpha, bias]


def _coefficient_tol(dtype: torch.dtype) -> dict | None:
    return None if dtype == torch.float32 else SPLIT16_TOL


@pytest.mark.parametrize("n", STREAMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_coefficients_match_reference(n, dtype):
    # Under torch's default matmul precision ("highest") fp32 stays exact: fp32 tolerance.
    assert torch.get_float32_matmul_precision() == "highest"
    tokens = (7,) if dtype == torch.float32 else (2, 5)
    inputs = _coefficient_inputs(n, 33, tokens, dtype)
    _compare(mhc_coefficients_triton, mhc_coefficients, inputs, dtype, _coefficient_tol(dtype), eps=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "C", "tokens"), [(4, 130, (1,)), (6, 100, (3,)), (2, 300, (1, 1))])
def test_coefficients_split_k_at_decode(n, C, tokens, dtype):
    # Decode shapes: one token block, nC spans >= 8 K blocks, so the reduction is split across programs (forward:
    # partial sums + reduce kernel; backward: dx by K range) and must still match the reference.
    inputs = _coefficient_inputs(n, C, tokens, dtype)
    mp = max(16, triton.next_power_of_2(n * n + 2 * n))
    splits, per_split = coefficients_module._k_split(1, n * C, coefficients_module._block_k(mp), 132)
    assert splits >= 2 and per_split * (splits - 1) < n * C <= per_split * splits
    _compare(mhc_coefficients_triton, mhc_coefficients, inputs, dtype, _coefficient_tol(dtype), eps=1e-6)


def test_coefficients_fp16_streams():
    # fp16 takes the same split-16 tensor-core path as bf16 (with 11-bit halves), with and without split-K.
    for n, C, tokens in [(4, 33, (5,)), (4, 130, (1,))]:
        inputs = _coefficient_inputs(n, C, tokens, torch.float16)
        _compare(mhc_coefficients_triton, mhc_coefficients, inputs, torch.float16, SPLIT16_TOL, eps=1e-6)


def test_coefficients_split_k_uneven_splits(monkeypatch):
    # One K block per split: 9 splits over nC = 520 (the last one 8 columns wide), at T = 1 and T = 17 (two token
    # blocks, the second with one row).
    monkeypatch.setattr(coefficients_module, "_MIN_BLOCKS_PER_SPLIT", 1)
    assert coefficients_module._k_split(17, 520, 64, 132) == (9, 64)
    for tokens in [(1,), (17,)]:
        inputs = _coefficient_inputs(4, 130, tokens, torch.float32)
        _compare(mhc_coefficients_triton, mhc_coefficients, inputs, torch.float32, eps=1e-6)


def test_coefficients_split_choice():
    # No split once the token blocks fill the SMs, or when nC is too short to give each split 4 K blocks.
    assert coefficients_module._k_split(132 * 16, 16384, 64, 132) == (1, 16384)
    assert coefficients_module._k_split(1, 200, 64, 132) == (1, 256)
    # Decode at n = 4, C = 4096: 64 splits of 4 blocks each. 3 token blocks: 132 // 3 = 44 splits wanted, whole
    # blocks per split (6) make it 43.
    assert coefficients_module._k_split(1, 16384, 64, 132) == (64, 256)
    assert coefficients_module._k_split(40, 16384, 64, 132) == (43, 384)


@pytest.mark.parametrize(("setting", "expected"), [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")])
def test_coefficients_dot_precision_follows_torch(monkeypatch, setting, expected):
    """fp32 streams use TF32 only when torch's matmul precision allows it (the compile test checks what each
    precision compiles to)."""
    launched = []
    real_kernels = {
        name: getattr(coefficients_module, name)
        for name in ("_coefficients_fwd_kernel", "_coefficients_bwd_x_kernel", "_coefficients_bwd_phi_kernel")
    }

    class Spy:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append((self.name, kwargs["DOT_PRECISION"]))
                return real_kernels[self.name][grid](*args, **kwargs)

            return launch

    for name in real_kernels:
        monkeypatch.setattr(coefficients_module, name, Spy(name))
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(setting)
    try:
        inputs = _coefficient_inputs(2, 8, (3,), torch.float32)
        outputs = mhc_coefficients_triton(*inputs, 1e-6)
        torch.autograd.grad(outputs, inputs, [torch.ones_like(o) for o in outputs])
    finally:
        torch.set_float32_matmul_precision(previous)
    assert launched == [(name, expected) for name in real_kernels]


@pytest.mark.parametrize("tokens", [(1,), (40,)])
def test_coefficients_edge_token_counts_non_contiguous(tokens):
    # One token (decode) and 40 tokens (3 token blocks of 16: partial bias/gate sums, looped dphi); x is a
    # strided view.
    x, phi, alpha, bias = _coefficient_inputs(4, 17, tokens, torch.float32)
    wide = _leaf(torch.randn(*tokens, 2 * x.shape[-1]))
    x = wide[..., ::2]
    assert not x.is_contiguous()
    out_k = mhc_coefficients_triton(x, phi, alpha, bias, 1e-6)
    out_r = mhc_coefficients(x, phi, alpha, bias, 1e-6)
    cot = [torch.randn_like(o) for o in out_r]
    grads_k = torch.autograd.grad(out_k, [wide, phi, alpha, bias], cot)
    grads_r = torch.autograd.grad(out_r, [wide, phi, alpha, bias], cot)
    for a, b in zip(out_k + grads_k, out_r + grads_r):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


class _MustNotLaunch:
    """Stands in for a kernel that must not be launched: indexing it with a grid fails the test."""

    def __getitem__(self, grid):
        raise AssertionError("a skipped kernel was launched")


def test_coefficients_frozen_phi(monkeypatch):
    # phi without grad (frozen projection): the registered backward reads `ctx.needs_input_grad` and never launches
    # the dphi reduction over tokens; the other gradients still match.
    x, phi, alpha, bias = _coefficient_inputs(2, 8, (5,), torch.float32)
    phi = phi.detach()
    monkeypatch.setattr(coefficients_module, "_coefficients_bwd_phi_kernel", _MustNotLaunch())
    out_k = mhc_coefficients_triton(x, phi, alpha, bias, 1e-6)
    out_r = mhc_coefficients(x, phi, alpha, bias, 1e-6)
    cot = [torch.randn_like(o) for o in out_r]
    for a, b in zip(
        torch.autograd.grad(out_k, [x, alpha, bias], cot), torch.autograd.grad(out_r, [x, alpha, bias], cot)
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_coefficients_reject_bad_shapes():
    x, phi, alpha, bias = _coefficient_inputs(2, 8, (3,), torch.float32)
    with pytest.raises(ValueError, match="n\\*n \\+ 2n"):
        mhc_coefficients_triton(x[:, :15], phi[:7, :15], alpha, bias[:7], 1e-6)
    with pytest.raises(ValueError, match="disagree"):
        mhc_coefficients_triton(x[:, :15], phi, alpha, bias, 1e-6)


# --------------------------------------------------------------------------------------------------
# Stream mixing
# --------------------------------------------------------------------------------------------------
def _streams(
    tokens: tuple[int, ...], n: int, C: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """A leaf `[..., C, n]` and its non-contiguous `[..., n, C]` transpose."""
    leaf = _leaf(torch.randn(*tokens, C, n).to(dtype))
    return leaf, leaf.transpose(-1, -2)


# Coefficients per token ([2, 5] tokens), or static ones shared by all tokens ([1, 1, ...], over [1, 7] tokens).
LAYOUTS = [((2, 5), (2, 5)), ((1, 7), (1, 1))]


@pytest.mark.parametrize("n", STREAMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["per_token", "static"])
def test_pre_mix_matches_reference(n, dtype, layout):
    tokens, coeff = layout
    leaf, x = _streams(tokens, n, 33, dtype)
    h_pre = _leaf(torch.rand(*coeff, n))
    out = hc_pre_mix_triton(h_pre, x)
    assert out.shape == tokens + (33,) and out.dtype == dtype
    _compare(hc_pre_mix_triton, hc_pre_mix, [h_pre, x], dtype)
    # The gradient reaches the original (transposed) leaf too.
    g = torch.randn(*tokens, 33).to(dtype)
    (gk,) = torch.autograd.grad(hc_pre_mix_triton(h_pre, x), leaf, g)
    (gr,) = torch.autograd.grad(hc_pre_mix(h_pre, x), leaf, g)
    torch.testing.assert_close(gk, gr, **_tol(dtype))


@pytest.mark.parametrize("n", STREAMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["per_token", "static"])
def test_res_post_mix_matches_reference(n, dtype, layout):
    tokens, coeff = layout
    _, x = _streams(tokens, n, 33, dtype)
    h_res = _leaf(torch.rand(*coeff, n, n))
    h_post = _leaf(2 * torch.rand(*coeff, n))
    f = _leaf(torch.randn(*tokens, 33).to(dtype))
    out = hc_res_post_mix_triton(h_res, x, h_post, f)
    assert out.shape == x.shape and out.dtype == dtype
    _compare(hc_res_post_mix_triton, hc_res_post_mix, [h_res, x, h_post, f], dtype)


def test_mix_kernels_several_channel_blocks():
    # C = 257 spans three 128-wide channel blocks (few tokens: the smallest tiles): the per-block partial sums of
    # the coefficient gradients must add up; one token exercises the decode shape.
    for tokens in [(3,), (1,)]:
        x = _leaf(torch.randn(*tokens, 6, 257))
        f = _leaf(torch.randn(*tokens, 257))
        h_pre, h_post, h_res = (
            _leaf(torch.rand(*tokens, 6)),
            _leaf(torch.rand(*tokens, 6)),
            _leaf(torch.rand(*tokens, 6, 6)),
        )
        _compare(hc_pre_mix_triton, hc_pre_mix, [h_pre, x], torch.float32)
        _compare(hc_res_post_mix_triton, hc_res_post_mix, [h_res, x, h_post, f], torch.float32)


def test_mix_tiles_by_shape():
    # Training shapes: 4096-element tiles with 8 warps, BLOCK_C up to 1024 (16-byte bf16 loads per thread).
    assert mix_module._launch(10**6, 4096, 4, H100_SM_COUNT) == (
        {"BLOCK_T": 1, "BLOCK_C": 1024},
        {"num_warps": 8},
        (10**6, 4),
    )
    assert mix_module._launch(10**6, 4096, 1, H100_SM_COUNT) == (
        {"BLOCK_T": 4, "BLOCK_C": 1024},
        {"num_warps": 8},
        (250000, 4),
    )
    assert mix_module._launch(10**6, 4096, 16, H100_SM_COUNT)[0] == {
        "BLOCK_T": 1,
        "BLOCK_C": 256,
    }  # 16 stream rows
    # Decode: tiles shrink (to 1024 elements) while the grid has fewer programs than an H100 has SMs.
    assert mix_module._launch(1, 4096, 4, H100_SM_COUNT) == (
        {"BLOCK_T": 1, "BLOCK_C": 256},
        {"num_warps": 4},
        (1, 16),
    )
    assert mix_module._launch(70, 1100, 2, H100_SM_COUNT) == (
        {"BLOCK_T": 1, "BLOCK_C": 1024},
        {"num_warps": 4},
        (70, 2),
    )
    # A GPU with fewer SMs stops shrinking sooner (one SM-count heuristic for every launcher: `runtime.sm_count`).
    assert mix_module._launch(1, 4096, 4, 8)[2] == (1, 8)
    assert sm_count(torch.device("cpu")) == H100_SM_COUNT


def test_mix_kernels_wide_tiles():
    # 70 tokens of C = 1100 at n = 2 take 1024-wide channel tiles, the second one 76 wide (masked): forward and
    # gradients, including the per-channel-block partial sums of the coefficient gradients.
    x = _leaf(torch.randn(70, 2, 1100))
    f = _leaf(torch.randn(70, 1100))
    h_pre, h_post, h_res = _leaf(torch.rand(70, 2)), _leaf(torch.rand(70, 2)), _leaf(torch.rand(70, 2, 2))
    _compare(hc_pre_mix_triton, hc_pre_mix, [h_pre, x], torch.float32)
    _compare(hc_res_post_mix_triton, hc_res_post_mix, [h_res, x, h_post, f], torch.float32)


def test_mix_kernels_reject_bad_shapes():
    x = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="disagree"):
        hc_pre_mix_triton(torch.rand(2, 3), x)
    with pytest.raises(ValueError, match="shapes disagree"):
        hc_res_post_mix_triton(torch.rand(2, 4, 3), x, torch.rand(2, 4), torch.randn(2, 8))
    with pytest.raises(ValueError, match="shapes disagree"):
        hc_res_post_mix_triton(torch.rand(2, 4, 4), x, torch.rand(2, 4), torch.randn(2, 7))


def test_all_kernels_accept_zero_tokens():
    # An empty batch launches nothing and gives empty outputs and zero parameter gradients.
    n, C = 4, 8
    logits = _leaf(torch.randn(0, n, n))
    _compare(sinkhorn_knopp_triton, sinkhorn_knopp, [logits], torch.float32, num_iterations=5)
    _compare(
        mhc_coefficients_triton,
        mhc_coefficients,
        _coefficient_inputs(n, C, (0,), torch.float32),
        torch.float32,
        eps=1e-6,
    )
    x, f = _leaf(torch.randn(0, n, C)), _leaf(torch.randn(0, C))
    h_pre, h_post, h_res = _leaf(torch.rand(0, n)), _leaf(torch.rand(0, n)), _leaf(torch.rand(0, n, n))
    _compare(hc_pre_mix_triton, hc_pre_mix, [h_pre, x], torch.float32)
    _compare(hc_res_post_mix_triton, hc_res_post_mix, [h_res, x, h_post, f], torch.float32)


# --------------------------------------------------------------------------------------------------
# One hyper-connected sub-layer, all four kernels chained
# --------------------------------------------------------------------------------------------------
def _sublayer(coefficients, sinkhorn, pre_mix, res_post_mix, streams, phi, alpha, bias, weight):
    """streams -> coefficients -> h_res -> sub-layer input -> (a tanh 'sub-layer') -> new streams."""
    n, C = streams.shape[-2:]
    h_pre, h_post, res_logits = coefficients(streams.flatten(-2), phi, alpha, bias, 1e-6)
    h_res = sinkhorn(res_logits, 20)
    f = torch.tanh(pre_mix(h_pre, streams) @ weight)
    return res_post_mix(h_res, streams, h_post, f)


def test_chained_sublayer_matches_torch_path():
    n, C = 6, 9
    streams = _leaf(torch.randn(1, 2, n, C))  # batch 1, two tokens
    phi, alpha, bias = _coefficient_inputs(n, C, (1,), torch.float32)[1:]
    weight = _leaf(torch.randn(C, C) / C**0.5)
    params = [streams, phi, alpha, bias, weight]
    triton_fns = (mhc_coefficients_triton, sinkhorn_knopp_triton, hc_pre_mix_triton, hc_res_post_mix_triton)
    torch_fns = (mhc_coefficients, sinkhorn_knopp, hc_pre_mix, hc_res_post_mix)
    out_k = _sublayer(*triton_fns, *params)
    out_r = _sublayer(*torch_fns, *params)
    torch.testing.assert_close(out_k, out_r, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out_r)
    for a, b in zip(torch.autograd.grad(out_k, params, g), torch.autograd.grad(out_r, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Registered ops: torch.compile and selective checkpointing see each kernel launch as one op
# --------------------------------------------------------------------------------------------------
def _op_cases(dtype: torch.dtype, n: int = 4, C: int = 8, tokens: int = 5) -> dict[str, tuple]:
    """`{name: (op overload, args)}` for every mHC op, forward and backward, on small inputs."""
    ops = torch.ops.transformers_mhc
    x, phi, alpha, bias = _coefficient_inputs(n, C, (tokens,), dtype)
    streams = _leaf(torch.randn(tokens, n, C).to(dtype))
    h = _leaf(torch.rand(tokens, n))
    h_res = _leaf(torch.rand(tokens, n, n))
    f = _leaf(torch.randn(tokens, C).to(dtype))
    logits = _leaf(torch.randn(tokens, n, n))
    _, _, _, proj, inv_rms = ops.mhc_coefficients_fwd(x, phi, alpha, bias, 1e-6)
    grads = [torch.randn(tokens, n), torch.randn(tokens, n), torch.randn(tokens, n, n)]
    return {
        "coefficients_fwd": (ops.mhc_coefficients_fwd.default, (x, phi, alpha, bias, 1e-6)),
        "sinkhorn_fwd": (ops.sinkhorn_knopp_fwd.default, (logits, 20)),
        "pre_mix_fwd": (ops.hc_pre_mix_fwd.default, (h, streams)),
        "res_post_mix_fwd": (ops.hc_res_post_mix_fwd.default, (h_res, streams, h, f)),
        "coefficients_bwd": (
            ops.mhc_coefficients_bwd.default,
            (x.detach(), phi.detach(), alpha.detach(), bias.detach(), proj, inv_rms, *grads, True),
        ),
        "coefficients_bwd_frozen_phi": (
            ops.mhc_coefficients_bwd.default,
            (x.detach(), phi.detach(), alpha.detach(), bias.detach(), proj, inv_rms, *grads, False),
        ),
        "sinkhorn_bwd": (ops.sinkhorn_knopp_bwd.default, (logits.detach(), torch.randn(tokens, n, n), 20)),
        "pre_mix_bwd": (ops.hc_pre_mix_bwd.default, (h.detach(), streams.detach(), torch.randn_like(f))),
        "res_post_mix_bwd": (
            ops.hc_res_post_mix_bwd.default,
            (h_res.detach(), streams.detach(), h.detach(), f.detach(), torch.randn_like(streams)),
        ),
    }


@pytest.mark.parametrize("dtype", DTYPES)
def test_ops_pass_opcheck(dtype):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of every op agree with eager."""
    for name, (op, args) in _op_cases(dtype).items():
        result = torch.library.opcheck(op, args)
        assert all(outcome == "SUCCESS" for outcome in result.values()), (name, result)


def _sublayer_inputs() -> list[torch.Tensor]:
    n, C = 4, 9
    streams = _leaf(torch.randn(2, 3, n, C))
    phi, alpha, bias = _coefficient_inputs(n, C, (1,), torch.float32)[1:]
    return [streams, phi, alpha, bias, _leaf(torch.randn(C, C) / C**0.5)]


def _triton_sublayer(*params):
    return _sublayer(
        mhc_coefficients_triton, sinkhorn_knopp_triton, hc_pre_mix_triton, hc_res_post_mix_triton, *params
    )


def _assert_same_forward_and_grads(fn, reference, params):
    out, expected = fn(*params), reference(*params)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(expected)
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(expected, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_sublayer_matches_eager(backend):
    """`torch.compile(fullgraph=True)` traces the four ops (no graph break) and gives eager's values and gradients."""
    torch.compiler.reset()
    compiled = torch.compile(_triton_sublayer, backend=backend, fullgraph=True)
    _assert_same_forward_and_grads(compiled, _triton_sublayer, _sublayer_inputs())


def test_selective_checkpointing_of_the_ops():
    """Selective activation checkpointing may save the ops' outputs or recompute them: same gradients either way."""
    from functools import partial

    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    saved = {
        torch.ops.transformers_mhc.mhc_coefficients_fwd.default,
        torch.ops.transformers_mhc.hc_pre_mix_fwd.default,
    }

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    def checkpointed(*params):
        context_fn = partial(create_selective_checkpoint_contexts, policy)
        return checkpoint(_triton_sublayer, *params, use_reentrant=False, context_fn=context_fn)

    _assert_same_forward_and_grads(checkpointed, _triton_sublayer, _sublayer_inputs())


# --------------------------------------------------------------------------------------------------
# Compilation for a real GPU
# --------------------------------------------------------------------------------------------------
# The interpreter runs kernel bodies as Python and misses what only the compiler checks (a name bound in both
# branches of an `if` with different shapes, tl.dot shape rules, register pressure, which instructions a dot
# becomes). Triton compiles for a CUDA target without a GPU, so every variant the launchers use
# (`kernels.mhc.compile_jobs`) is compiled here for sm_90 in a subprocess without TRITON_INTERPRET, and its PTX
# assembled by the ptxas Triton ships (`benchmarks/ptxas_spills.py`'s helpers) for its registers and spills.
_COMPILE_SCRIPT = """
import importlib
import json
import re
import sys
import types

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

kernel_dir, benchmarks_dir, dtypes, streams = sys.argv[1:5]
# The kernel files import only torch, triton and each other: load them as a bare package, skipping
# `transformers_mhc`'s heavy imports (transformers, ...).
package = types.ModuleType("_mhc_kernels")
package.__path__ = [kernel_dir]
sys.modules["_mhc_kernels"] = package
mhc = importlib.import_module("_mhc_kernels.mhc")
sys.path.insert(0, benchmarks_dir)
import ptxas_spills

rows = []
for dtype in dtypes.split(","):
    for n in map(int, streams.split(",")):
        for fn, constexprs, options in mhc.compile_jobs(n, {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]):
            signature = ptxas_spills._signature(fn, constexprs, mhc.STREAM_POINTERS, dtype)
            source = ASTSource(fn, signature, constexprs)
            ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
            row = dict(kernel=fn.fn.__name__, dtype=dtype, n=n, precision=constexprs.get("DOT_PRECISION"))
            row["mma"] = sorted(set(re.findall(r"\\S*mma\\S*", ptx)))
            row.update(ptxas_spills._ptxas_report(ptx, 90))
            print(json.dumps(row), flush=True)
"""


def _compile_for_gpu(dtypes: list[str], streams: list[int]) -> list[dict]:
    triton = pytest.importorskip("triton")
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("this Triton build has no CUDA backend to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    kernel_dir = os.path.dirname(sinkhorn_module.__file__)
    benchmarks_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _COMPILE_SCRIPT,
            kernel_dir,
            benchmarks_dir,
            ",".join(dtypes),
            ",".join(map(str, streams)),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    # Every kernel, for every dtype and stream count (the script stops at the first that does not compile).
    assert {(row["kernel"], row["dtype"], row["n"]) for row in rows} == {
        (kernel, dtype, n) for kernel in _KERNELS for dtype in dtypes for n in streams
    }, proc.stdout[-4000:]
    return rows


_KERNELS = [
    "_sinkhorn_fwd_kernel",
    "_sinkhorn_bwd_kernel",
    "_coefficients_fwd_kernel",
    "_coefficients_fwd_reduce_kernel",
    "_coefficients_bwd_x_kernel",
    "_coefficients_bwd_phi_kernel",
    "_pre_mix_fwd_kernel",
    "_pre_mix_bwd_kernel",
    "_res_post_mix_fwd_kernel",
    "_res_post_mix_bwd_kernel",
]


def _check_compiled(rows: list[dict]) -> None:
    """No spills; the coefficient matmuls on tensor cores (bf16 operands for bf16 streams, TF32 only when asked)."""
    spilling = [row for row in rows if row["spill_store_bytes"] or row["spill_load_bytes"]]
    assert not spilling, spilling
    assert all(0 < row["registers"] <= 255 for row in rows), rows
    for row in rows:
        if row["kernel"] not in (
            "_coefficients_fwd_kernel",
            "_coefficients_bwd_x_kernel",
            "_coefficients_bwd_phi_kernel",
        ):
            continue
        n2 = row["n"] * row["n"] + 2 * row["n"]
        if row["precision"] == "ieee" and row["dtype"] == "fp32":
            assert row["mma"] == [], row  # exact fp32: no tensor cores
        elif row["dtype"] == "bf16" and row["kernel"] == "_coefficients_bwd_x_kernel" and n2 > 128:
            assert row["mma"] == [], row  # documented fallback to fp32 dots for n >= 11
        else:
            # The multiplies (fences and waits carry no types) take the expected operand type.
            multiplies = [op for op in row["mma"] if ".f32" in op]
            kind = ".tf32" if row["dtype"] == "fp32" else ".bf16"
            assert multiplies and all(kind in op for op in multiplies), row


def test_kernels_compile_for_gpu_without_spills():
    _check_compiled(_compile_for_gpu(["bf16", "fp32"], [4]))


@pytest.mark.slow
def test_kernels_compile_for_gpu_all_stream_counts():
    _check_compiled(_compile_for_gpu(["bf16", "fp32"], [1, 2, 6, 8, 16]))


# --------------------------------------------------------------------------------------------------
# Wider sweep (minutes under the interpreter)
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sweep_all_kernels(n, dtype):
    for iterations in (0, 1, 20):
        logits = _leaf((3 * torch.randn(2, 3, n, n)).to(dtype))
        _compare(sinkhorn_knopp_triton, sinkhorn_knopp, [logits], dtype, num_iterations=iterations)
    for tokens, C in [((1,), 1), ((3, 11), 65), ((37,), 130)]:
        _compare(
            mhc_coefficients_triton,
            mhc_coefficients,
            _coefficient_inputs(n, C, tokens, dtype),
            dtype,
            _coefficient_tol(dtype),
            eps=1e-5,
        )
        _, x = _streams(tokens, n, C, dtype)
        h = [_leaf(torch.rand(*tokens, n)), _leaf(torch.rand(*tokens, n, n)), _leaf(torch.rand(*tokens, n))]
        f = _leaf(torch.randn(*tokens, C).to(dtype))
        _compare(hc_pre_mix_triton, hc_pre_mix, [h[0], x], dtype)
        _compare(hc_res_post_mix_triton, hc_res_post_mix, [h[1], x, h[2], f], dtype)
