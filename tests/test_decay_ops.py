"""Pure-PyTorch decay linear-attention ops: chunked and recurrent forms against the naive float64 recurrence."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from transformers_mhc.models import decay_ops
from transformers_mhc.models.decay_ops import (
    chunk_decay_linear_attn,
    chunk_delta_rule_decay,
    naive_decay_linear_attn,
    naive_delta_rule_decay,
    recurrent_decay_linear_attn,
    recurrent_delta_rule_decay,
)

ATOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny tensors: one intra-op thread is faster, and avoids oversubscribing the shared CPU cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_inputs(batch=2, heads=3, length=63, dk=16, dv=8, vector=False, decay_scale=1.0, dtype=torch.float32):
    q = torch.randn(batch, heads, length, dk)
    k = torch.randn(batch, heads, length, dk) / dk**0.5
    v = torch.randn(batch, heads, length, dv)
    shape = (batch, heads, length, dk) if vector else (batch, heads, length)
    log_decay = F.logsigmoid(torch.randn(shape) + 2) * decay_scale
    initial_state = torch.randn(batch, heads, dk, dv)
    return [t.to(dtype) for t in (q, k, v, log_decay, initial_state)]


def run_with_grads(fn, tensors, **kwargs):
    tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
    out, state = fn(*tensors[:-1], initial_state=tensors[-1], output_final_state=True, **kwargs)
    # A random projection of both outputs, so every gradient path is exercised.
    torch.manual_seed(123)
    loss = (out.float() * torch.randn_like(out.float())).sum() + (state * torch.randn_like(state)).sum()
    loss.backward()
    return out, state, [t.grad for t in tensors]


def assert_close(actual, expected, atol=ATOL):
    diff = (actual.double() - expected.double()).abs().max().item()
    assert diff <= atol, f"max abs diff {diff:.3g} > {atol}"


@pytest.mark.parametrize("vector", [False, True], ids=["scalar", "vector"])
@pytest.mark.parametrize("length", [63, 257])
def test_chunk_matches_naive_outputs_and_grads(vector, length):
    tensors = make_inputs(length=length, vector=vector)
    out, state, grads = run_with_grads(chunk_decay_linear_attn, tensors, scale=0.5)
    ref_out, ref_state, ref_grads = run_with_grads(naive_decay_linear_attn, tensors, scale=0.5)
    assert out.dtype == torch.float32 and state.dtype == torch.float32
    assert_close(out, ref_out)
    assert_close(state, ref_state)
    for grad, ref_grad in zip(grads, ref_grads):
        assert_close(grad, ref_grad)


@pytest.mark.parametrize("vector", [False, True], ids=["scalar", "vector"])
@pytest.mark.parametrize("chunk_size", [1, 16, 48, 64])
def test_chunk_sizes_including_non_power_of_two(vector, chunk_size):
    tensors = make_inputs(length=50, vector=vector)
    out, state = chunk_decay_linear_attn(
        *tensors[:-1], initial_state=tensors[-1], output_final_state=True, chunk_size=chunk_size
    )
    ref_out, ref_state = naive_decay_linear_attn(
        *tensors[:-1], initial_state=tensors[-1], output_final_state=True
    )
    assert_close(out, ref_out)
    assert_close(state, ref_state)


@pytest.mark.parametrize("vector", [False, True], ids=["scalar", "vector"])
@pytest.mark.parametrize("length", [63, 257])
def test_delta_rule_chunk_matches_naive_outputs_and_grads(vector, length):
    q, k, v, log_decay, state0 = make_inputs(length=length, vector=vector)
    k = F.normalize(k, dim=-1)
    beta = 2 * torch.rand(q.shape[:3])
    tensors = [q, k, v, beta, log_decay, state0]
    out, state, grads = run_with_grads(chunk_delta_rule_decay, tensors)
    ref_out, ref_state, ref_grads = run_with_grads(naive_delta_rule_decay, tensors)
    assert_close(out, ref_out)
    assert_close(state, ref_state)
    for grad, ref_grad in zip(grads, ref_grads):
        assert_close(grad, ref_grad)


@pytest.mark.parametrize("vector", [False, True], ids=["scalar", "vector"])
def test_recurrent_matches_naive(vector):
    q, k, v, log_decay, state0 = make_inputs(length=9, vector=vector)
    out, state = recurrent_decay_linear_attn(q, k, v, log_decay, 0.7, state0, True)
    ref_out, ref_state = naive_decay_linear_attn(q, k, v, log_decay, 0.7, state0, True)
    assert_close(out, ref_out)
    assert_close(state, ref_state)

    beta = 2 * torch.rand(q.shape[:3])
    k = F.normalize(k, dim=-1)
    out, state = recurrent_delta_rule_decay(q, k, v, beta, log_decay, 0.7, state0, True)
    ref_out, ref_state = naive_delta_rule_decay(q, k, v, beta, log_decay, 0.7, state0, True)
    assert_close(out, ref_out)
    assert_close(state, ref_state)


@pytest.mark.parametrize("vector", [False, True], ids=["scalar", "vector"])
def test_prefix_then_continuation_equals_one_pass(vector):
    """The returned state lets a second call continue exactly (prefill in pieces, then decode)."""
    q, k, v, log_decay, _ = make_inputs(length=70, vector=vector)
    full, full_state = chunk_decay_linear_attn(q, k, v, log_decay, output_final_state=True)
    first, state = chunk_decay_linear_attn(
        q[:, :, :45], k[:, :, :45], v[:, :, :45], log_decay[:, :, :45], output_final_state=True
    )
    second, state = chunk_decay_linear_attn(
        q[:, :, 45:-1],
        k[:, :, 45:-1],
        v[:, :, 45:-1],
        log_decay[:, :, 45:-1],
        initial_state=state,
        output_final_state=True,
    )
    last, state = recurrent_decay_linear_attn(
        q[:, :, -1:],
        k[:, :, -1:],
        v[:, :, -1:],
        log_decay[:, :, -1:],
        initial_state=state,
        output_final_state=True,
    )
    assert_close(torch.cat([first, second, last], dim=2), full)
    assert_close(state, full_state)


@pytest.mark.parametrize("vector", [False, True], ids=["scalar", "vector"])
@pytest.mark.parametrize("decay_scale", [10.0, 1e3])
def test_strong_decay_is_finite_and_exact(vector, decay_scale):
    """log λ <= -10 (and far below -88, where exp(-log λ) overflows fp32): no NaN/inf in outputs or gradients."""
    tensors = make_inputs(length=130, vector=vector)
    tensors[3] = tensors[3] - decay_scale  # every log λ <= -decay_scale
    out, state, grads = run_with_grads(chunk_decay_linear_attn, tensors, chunk_size=64)
    ref_out, ref_state, ref_grads = run_with_grads(naive_decay_linear_attn, tensors)
    for t in (out, state, *grads):
        assert torch.isfinite(t).all()
    assert_close(out, ref_out)
    for grad, ref_grad in zip(grads, ref_grads):
        assert_close(grad, ref_grad)

    q, k, v, log_decay, state0 = tensors
    beta = 2 * torch.rand(q.shape[:3])
    delta_out, _ = chunk_delta_rule_decay(q, F.normalize(k, dim=-1), v, beta, log_decay, initial_state=state0)
    ref_delta, _ = naive_delta_rule_decay(q, F.normalize(k, dim=-1), v, beta, log_decay, initial_state=state0)
    assert torch.isfinite(delta_out).all()
    assert_close(delta_out, ref_delta)


def test_mixed_weak_and_strong_decay_in_one_chunk():
    """Weak decays right after strong ones: segment sums must not come from differences of large cumsums."""
    q, k, v, _, state0 = make_inputs(length=64, vector=True)
    log_decay = torch.where(
        torch.rand(q.shape) < 0.3, torch.full(q.shape, -500.0), torch.full(q.shape, -0.01)
    )
    out, _ = chunk_decay_linear_attn(q, k, v, log_decay, initial_state=state0)
    ref, _ = naive_decay_linear_attn(q, k, v, log_decay, initial_state=state0)
    assert_close(out, ref)


@pytest.mark.parametrize("vector", [False, True], ids=["scalar", "vector"])
def test_minus_inf_log_decay_resets_the_state(vector):
    """A saturated gate (log λ = -inf) is a decay of exactly 0: the vector form's local sums used to meet
    0 * -inf = NaN; the chunked forms now match the recurrence, with finite gradients."""
    tensors = make_inputs(length=40, vector=vector)
    tensors[3][:, :, 5] = float("-inf")
    if vector:  # one head, some channels of token 21
        tensors[3][:, 1, 21, :3] = float("-inf")
    ref_out, ref_state, ref_grads = run_with_grads(naive_decay_linear_attn, tensors)
    for fn in (partial(chunk_decay_linear_attn, chunk_size=16), recurrent_decay_linear_attn):
        out, state, grads = run_with_grads(fn, tensors)
        assert_close(out, ref_out)
        assert_close(state, ref_state)
        for grad, ref_grad in zip(grads, ref_grads):
            assert torch.isfinite(grad).all()
            assert_close(grad, ref_grad)


@pytest.mark.parametrize("vector", [False, True], ids=["scalar", "vector"])
def test_gradcheck_chunked_float64(vector):
    """Gradients of the chunked form (several chunks, a partial last one) against finite differences."""
    shape_qk = (1, 2, 7, 4)
    q, k = (torch.randn(shape_qk, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.randn(1, 2, 7, 3, dtype=torch.float64, requires_grad=True)
    log_decay = (
        -torch.rand(shape_qk if vector else shape_qk[:3], dtype=torch.float64) - 0.1
    ).requires_grad_()
    state0 = torch.randn(1, 2, 4, 3, dtype=torch.float64, requires_grad=True)

    def fn(q, k, v, log_decay, state0):
        return chunk_decay_linear_attn(q, k, v, log_decay, 0.5, state0, True, chunk_size=4)

    assert torch.autograd.gradcheck(fn, (q, k, v, log_decay, state0))

    beta = torch.rand(1, 2, 7, dtype=torch.float64, requires_grad=True)

    def delta_fn(q, k, v, beta, log_decay, state0):
        return chunk_delta_rule_decay(q, k, v, beta, log_decay, 0.5, state0, True, chunk_size=4)

    assert torch.autograd.gradcheck(delta_fn, (q, k, v, beta, log_decay, state0))


def test_half_precision_inputs_keep_fp32_state():
    q, k, v, log_decay, _ = make_inputs(length=40, vector=True, dtype=torch.bfloat16)
    out, state = chunk_decay_linear_attn(q, k, v, log_decay, output_final_state=True)
    assert out.dtype == torch.bfloat16 and state.dtype == torch.float32
    ref, _ = naive_decay_linear_attn(q, k, v, log_decay)
    assert (out.float() - ref.float()).abs().max() < 0.05 * ref.float().abs().max()


def test_output_final_state_false_returns_none():
    q, k, v, log_decay, _ = make_inputs(length=5)
    assert chunk_decay_linear_attn(q, k, v, log_decay)[1] is None
    assert recurrent_decay_linear_attn(q, k, v, log_decay)[1] is None


def test_shape_errors_name_the_argument():
    q, k, v, log_decay, _ = make_inputs(length=5)
    with pytest.raises(ValueError, match="log_decay"):
        chunk_decay_linear_attn(q, k, v, log_decay[..., :4])
    with pytest.raises(ValueError, match="v must be"):
        chunk_decay_linear_attn(q, k, v[:, :, :4], log_decay)
    with pytest.raises(ValueError, match="beta"):
        chunk_delta_rule_decay(q, k, v, torch.rand(2, 3, 4), log_decay)


def test_cpu_tensors_never_reach_triton(monkeypatch):
    """The Triton kernels are only dispatched for CUDA tensors (launching one without a GPU raises)."""

    def boom(*args, **kwargs):
        raise AssertionError("Triton kernel called on CPU tensors")

    monkeypatch.setattr(decay_ops, "chunk_decay_linear_attn_triton", boom)
    monkeypatch.setattr(decay_ops, "fused_recurrent_decay_triton", boom)
    q, k, v, log_decay, _ = make_inputs(length=5)
    chunk_decay_linear_attn(q, k, v, log_decay)
    recurrent_decay_linear_attn(q, k, v, log_decay)
