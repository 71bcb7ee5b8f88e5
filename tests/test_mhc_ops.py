"""The pure-PyTorch hyper-connection arithmetic: Sinkhorn-Knopp, coefficients, stream mixing."""

from __future__ import annotations

import pytest
import torch

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
