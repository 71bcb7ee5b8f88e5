"""The pure-PyTorch hyper-connection arithmetic: Sinkhorn-Knopp, coefficients, stream mixing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from transformers_mhc.models.mhc_ops import (
    hc_pre_mix,
    hc_res_post_mix,
    mhc_coefficients,
    sinkhorn_knopp,
    sinkhorn_knopp_backward,
)


def _sinkhorn_autograd_reference(logits: torch.Tensor, num_iterations: int) -> torch.Tensor:
    """Plain multiplicative Sinkhorn-Knopp differentiated by autograd (stores every iterate)."""
    m = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
    for _ in range(num_iterations):
        m = m / m.sum(dim=-2, keepdim=True)
        m = m / m.sum(dim=-1, keepdim=True)
    return m


def test_sinkhorn_gradcheck_float64():
    logits = torch.randn(3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: sinkhorn_knopp(x, 20), (logits,))
    odd = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: sinkhorn_knopp(x, 5), (odd,))


@pytest.mark.parametrize("n", [1, 2, 4, 6])
def test_sinkhorn_matches_autograd_of_the_plain_algorithm(n):
    logits = (torch.rand(5, n, n, dtype=torch.float64) * 6 - 3).requires_grad_()
    expected = _sinkhorn_autograd_reference(logits, 20)
    actual = sinkhorn_knopp(logits, 20)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
    grad_out = torch.randn_like(expected)
    (g_expected,) = torch.autograd.grad(expected, logits, grad_out)
    (g_actual,) = torch.autograd.grad(actual, logits, grad_out)
    torch.testing.assert_close(g_actual, g_expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("n", [2, 4, 6])
def test_sinkhorn_doubly_stochastic_for_training_sized_logits(n):
    # Logits of the size seen in training: static biases plus small dynamic terms, |logit| <= 3.
    logits = torch.randn(4096, n, n).clamp(-3, 3)
    h_res = sinkhorn_knopp(logits, 20)
    assert (h_res >= 0).all()
    assert (h_res.sum(-1) - 1).abs().max() <= 1e-6  # rows: exact (last normalisation)
    col_err = (h_res.sum(-2) - 1).abs()
    if n >= 4:
        assert col_err.max() <= 1e-3
    else:
        # n = 2 converges more slowly: a few matrices keep a larger column error after 20 iterations.
        assert col_err.mean() <= 1e-4 and (col_err.amax(-1) > 1e-3).float().mean() <= 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sinkhorn_badly_conditioned_logits_stay_finite(dtype):
    logits = (torch.randint(0, 2, (64, 4, 4)) * 2 - 1).to(dtype) * 1e4
    logits.requires_grad_()
    h_res = sinkhorn_knopp(logits, 20)
    assert h_res.dtype == torch.float32  # coefficients are fp32 whatever the input
    assert torch.isfinite(h_res).all()
    assert (h_res.sum(-1) - 1).abs().max() <= 1e-6
    h_res.square().sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_sinkhorn_backward_saves_only_the_logits():
    """Saved-for-backward memory must not grow with the number of iterations."""

    def saved_bytes(iterations: int) -> int:
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        logits = torch.randn(128, 4, 4, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            sinkhorn_knopp(logits, iterations)
        return total

    assert saved_bytes(10) == saved_bytes(40) == 128 * 16 * 4


def test_sinkhorn_backward_helper_matches_autograd():
    logits = torch.randn(7, 4, 4, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(7, 4, 4, dtype=torch.float64)
    (expected,) = torch.autograd.grad(_sinkhorn_autograd_reference(logits, 20), logits, grad_out)
    torch.testing.assert_close(sinkhorn_knopp_backward(logits.detach(), grad_out, 20), expected)


@pytest.mark.parametrize("n", [1, 3, 4])
def test_mhc_coefficients_match_the_paper_formulas(n):
    c = 5
    x = torch.randn(2, 7, n * c, dtype=torch.float64)
    phi = torch.randn(n * n + 2 * n, n * c, dtype=torch.float64)
    alpha = torch.tensor([0.3, 0.5, 0.7], dtype=torch.float64)
    bias = torch.randn(n * n + 2 * n, dtype=torch.float64)
    h_pre, h_post, res_logits = mhc_coefficients(x, phi, alpha, bias, 1e-6)
    # Paper §3 written out: RMSNorm first, then the three projections.
    x_norm = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    proj = x_norm @ phi.T
    torch.testing.assert_close(h_pre, torch.sigmoid(0.3 * proj[..., :n] + bias[:n]).float())
    torch.testing.assert_close(
        h_post, 2 * torch.sigmoid(0.5 * proj[..., n : 2 * n] + bias[n : 2 * n]).float()
    )
    expected_res = (0.7 * proj[..., 2 * n :] + bias[2 * n :]).unflatten(-1, (n, n))
    torch.testing.assert_close(res_logits, expected_res.float())


def test_stream_mixing_matches_einsum():
    n, c = 4, 9
    x = torch.randn(2, 3, n, c)
    f = torch.randn(2, 3, c)
    h_pre = torch.rand(2, 3, n)
    h_post = torch.rand(2, 3, n) * 2
    h_res = torch.rand(2, 3, n, n)
    torch.testing.assert_close(hc_pre_mix(h_pre, x), torch.einsum("btj,btjc->btc", h_pre, x))
    expected = torch.einsum("btij,btjc->btic", h_res, x) + h_post[..., None] * f[..., None, :]
    torch.testing.assert_close(hc_res_post_mix(h_res, x, h_post, f), expected)
    # bf16 streams: output keeps the stream dtype.
    assert hc_res_post_mix(h_res, x.bfloat16(), h_post, f.bfloat16()).dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------------
# The torch path (`mhc_fused`, what the models run off CUDA) against the formulas above
# --------------------------------------------------------------------------------------------------
def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


def _op_inputs(op: str, n: int, dtype: torch.dtype, lead=(2, 5), c: int = 7, broadcast: bool = False):
    """Inputs of `op` on `lead` tokens; `broadcast`: coefficients shared by every token (`hc_dynamic=False`)."""
    generator = torch.Generator().manual_seed(n)

    def rand(*shape, scale=1.0):
        return _leaf(torch.randn(*shape, generator=generator) * scale)

    coefficient_lead = (1,) * len(lead) if broadcast else lead
    if op == "mhc_coefficients":
        width = n * n + 2 * n
        return [rand(*lead, n * c).to(dtype), rand(width, n * c, scale=0.1), rand(3), rand(width)], (1e-6,)
    if op == "sinkhorn_knopp":
        return [rand(*coefficient_lead, n, n, scale=2.0)], (20,)
    if op == "hc_pre_mix":
        return [_leaf(torch.rand(*coefficient_lead, n, generator=generator)), rand(*lead, n, c).to(dtype)], ()
    h_res = _leaf(torch.rand(*coefficient_lead, n, n, generator=generator))
    h_post = _leaf(2 * torch.rand(*coefficient_lead, n, generator=generator))
    return [h_res, rand(*lead, n, c).to(dtype), h_post, rand(*lead, c).to(dtype)], ()


# (op, coefficients shared by every token as with `hc_dynamic=False`): the coefficients are per token by definition.
CASES = [("mhc_coefficients", False)] + [
    (op, broadcast)
    for op in ("sinkhorn_knopp", "hc_pre_mix", "hc_res_post_mix")
    for broadcast in (False, True)
]


@pytest.mark.parametrize(
    ("op", "broadcast"), CASES, ids=[f"{op}-{'shared' if b else 'per-token'}" for op, b in CASES]
)
@pytest.mark.parametrize("n", [1, 2, 4, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_path_matches_the_formulas(op, broadcast, n, dtype):
    from transformers_mhc.models.hyper_connection import REFERENCE_OPS, TORCH_OPS

    inputs, extra = _op_inputs(op, n, dtype, broadcast=broadcast)
    fused = getattr(TORCH_OPS, op)(*inputs, *extra)
    reference = getattr(REFERENCE_OPS, op)(*inputs, *extra)
    fused, reference = (fused, reference) if isinstance(fused, tuple) else ((fused,), (reference,))
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    _assert_same(fused, reference, inputs, tol, {"rtol": 1e-4, "atol": 1e-5}, dtype)


def _assert_same_outputs(fused, reference, tol):
    """Same outputs: shape, dtype and values."""
    for a, b in zip(fused, reference, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)


def _assert_same(fused, reference, inputs, tol, fp32_input_tol=None, dtype=None):
    """Same outputs (shape, dtype, values) and the same gradients w.r.t. `inputs` for one random cotangent."""
    _assert_same_outputs(fused, reference, tol)
    cotangents = [
        torch.randn(o.shape, generator=torch.Generator().manual_seed(7)).to(o.dtype) for o in reference
    ]
    grads_fused = torch.autograd.grad(fused, inputs, cotangents)
    grads_reference = torch.autograd.grad(reference, inputs, cotangents)
    for x, a, b in zip(inputs, grads_fused, grads_reference, strict=True):
        assert a.shape == b.shape == x.shape and a.dtype == b.dtype == x.dtype
        # fp32 inputs (coefficients, parameters) of a bf16 op get fp32 gradients, as precise as fp32 math allows.
        torch.testing.assert_close(a, b, **(fp32_input_tol if fp32_input_tol and x.dtype != dtype else tol))


@pytest.mark.parametrize("spread", [4.0, 1e4], ids=["multiplicative", "log-space"])
def test_torch_path_sinkhorn_gradcheck_and_wide_logits(spread):
    """The fused Sinkhorn switches to the log-space form when the logits are too wide for `exp`: same function."""
    from transformers_mhc.models.mhc_fused import MultiplicativeSinkhornFunction, sinkhorn_knopp_fused

    logits = (torch.rand(16, 4, 4) * 2 - 1) * spread
    torch.testing.assert_close(
        sinkhorn_knopp_fused(logits, 20), sinkhorn_knopp(logits, 20), rtol=1e-5, atol=1e-6
    )
    z = torch.randn(3, 3, 5, dtype=torch.float64, requires_grad=True)  # [n, n, N]: the batch-last layout
    assert torch.autograd.gradcheck(lambda t: MultiplicativeSinkhornFunction.apply(t, 7), (z,))


def _norm(kind: str, c: int, dtype: torch.dtype) -> nn.Module:
    """A sub-layer norm with a weight away from 1: `llama` a stock `LlamaRMSNorm` (the read's closed-form
    backward; `llama-frozen` with its weight frozen, as under LoRA), `hooked` one whose forward hook rescales its
    output, `layernorm` another norm (both: autograd)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = nn.LayerNorm(c) if kind == "layernorm" else LlamaRMSNorm(c, eps=1e-6)
    if kind == "hooked":
        norm.register_forward_hook(lambda module, args, out: out * 1.5)
    with torch.no_grad():
        norm.weight.add_(torch.randn(c, generator=torch.Generator().manual_seed(3)))
    norm.weight.requires_grad_(kind != "llama-frozen")
    return norm.to(dtype)


@pytest.mark.parametrize("n", [1, 2, 4, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["contiguous", "expanded"])
@pytest.mark.parametrize("norm_kind", ["llama", "llama-frozen", "hooked", "layernorm"])
def test_torch_path_read_matches_the_formulas(n, dtype, layout, norm_kind):
    """The fused read (coefficients, pre-mix and the norm in one Function) against its parts composed plainly,
    gradients of the norm's weight included; `expanded`: the streams as `expand_streams` makes them (stride 0).
    A stock `LlamaRMSNorm` takes the closed-form backward, any other norm autograd's."""
    from transformers_mhc.models.hyper_connection import REFERENCE_OPS, TORCH_OPS
    from transformers_mhc.models.mhc_fused import _is_plain_rms_norm

    c = 7
    (x, phi, alpha, bias), (eps,) = _op_inputs("mhc_coefficients", n, dtype, c=c)
    if layout == "expanded":
        x = _leaf(torch.randn(2, 5, 1, c).to(dtype)).expand(2, 5, n, c)
    else:
        x = _leaf(x.view(2, 5, n, c))
    norm = _norm(norm_kind, c, dtype)
    assert _is_plain_rms_norm(norm) == norm_kind.startswith("llama")
    params = [x, phi, alpha, bias] + ([norm.weight] if norm.weight.requires_grad else [])
    fused = TORCH_OPS.mhc_read(x, phi, alpha, bias, eps, norm)
    reference = REFERENCE_OPS.mhc_read(x, phi, alpha, bias, eps, norm)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    _assert_same(fused, reference, [p for p in params if p.is_leaf] + ([] if x.is_leaf else [x]), tol)


@pytest.mark.parametrize("op", ["mhc_read", *(op for op, broadcast in CASES if not broadcast)])
@pytest.mark.parametrize("lead", [(1, 1), (3, 200)], ids=["one-token", "600-tokens"])
@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_path_without_gradients_matches_the_formulas(op, lead, n, dtype):
    """Without gradients (decoding, prefill) the torch path takes its own, leaner forms: the coefficients in fewer
    kernels, Sinkhorn in log space up to `LOG_SPACE_MAX_MATRICES` matrices (one token here) and multiplicative
    beyond it (600 tokens). Each gives the formulas' outputs."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from transformers_mhc.models.hyper_connection import REFERENCE_OPS, TORCH_OPS
    from transformers_mhc.models.mhc_fused import LOG_SPACE_MAX_MATRICES

    assert lead[0] * lead[1] > LOG_SPACE_MAX_MATRICES or lead == (1, 1)
    c = 7
    if op == "mhc_read":
        (x, phi, alpha, bias), extra = _op_inputs("mhc_coefficients", n, dtype, lead=lead, c=c)
        inputs = [x.view(*lead, n, c), phi, alpha, bias]
        extra = (*extra, LlamaRMSNorm(c, eps=1e-6).to(dtype))
    else:
        inputs, extra = _op_inputs(op, n, dtype, lead=lead, c=c)
    with torch.no_grad():
        fused = getattr(TORCH_OPS, op)(*inputs, *extra)
        reference = getattr(REFERENCE_OPS, op)(*inputs, *extra)
    fused, reference = (fused, reference) if isinstance(fused, tuple) else ((fused,), (reference,))
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    _assert_same_outputs(fused, reference, tol)


@pytest.mark.parametrize(
    ("op", "broadcast"),
    [(op, b) for op, b in CASES if op in ("hc_pre_mix", "hc_res_post_mix")],
    ids=lambda v: v if isinstance(v, str) else ("shared" if v else "per-token"),
)
def test_torch_path_under_compile_matches_the_formulas(op, broadcast):
    """Under `torch.compile` the torch path writes the stream mixes as broadcast products summed over the streams
    (what inductor fuses into one pass): traced whole (`fullgraph`, through autograd), they give the formulas'
    outputs and gradients."""
    from transformers_mhc.models.hyper_connection import REFERENCE_OPS, TORCH_OPS

    torch.compiler.reset()
    inputs, extra = _op_inputs(op, 4, torch.float32, broadcast=broadcast)
    compiled = torch.compile(getattr(TORCH_OPS, op), backend="aot_eager", fullgraph=True)
    _assert_same((compiled(*inputs, *extra),), (getattr(REFERENCE_OPS, op)(*inputs, *extra),), inputs, {})


@pytest.mark.parametrize("spread", [4.0, 1e4], ids=["multiplicative", "log-space"])
def test_compiled_training_runs_the_torch_path_sinkhorn_as_one_op(spread):
    """Compiled with gradients, the torch path's Sinkhorn is the registered op `transformers_mhc::sinkhorn_knopp_torch`
    (the eager implementation, opaque to the compiler): it passes `opcheck`, appears in the traced graph, and gives the
    formulas' outputs and gradients in both of its forms. Without gradients the formulas are traced (inductor fuses
    them)."""
    from transformers_mhc.models.hyper_connection import REFERENCE_OPS, TORCH_OPS

    logits = _leaf((torch.rand(3, 5, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1) * spread)
    op = torch.ops.transformers_mhc.sinkhorn_knopp_torch.default
    torch.library.opcheck(op, (logits, 20))
    grad = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    torch.library.opcheck(
        torch.ops.transformers_mhc.sinkhorn_knopp_torch_backward.default, (logits.detach(), grad, 20)
    )

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    torch.compiler.reset()
    compiled = torch.compile(TORCH_OPS.sinkhorn_knopp, backend=capture, fullgraph=True)
    _assert_same(
        (compiled(logits, 20),),
        (REFERENCE_OPS.sinkhorn_knopp(logits, 20),),
        [logits],
        {"rtol": 1e-5, "atol": 1e-6},
    )
    assert "sinkhorn_knopp_torch" in graphs[-1]
    with torch.no_grad():
        compiled(logits, 20)
    assert "sinkhorn_knopp_torch" not in graphs[-1] and "log_softmax" in graphs[-1]
