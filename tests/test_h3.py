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
"""H3's token mixer (`token_mixer="h3"`): the attention-like quadratic form == the FFT long convolution == the
recurrence == the definition written out, gradients and the final state included, on awkward lengths, in fp32 and bf16; the model around it (the generation contract, left padding, remote code and
PEFT are covered by `test_model_contract.py` and `test_modeling_decay_linear_attn.py`)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from transformers_mhc import DecayLinearAttnConfig, DecayLinearAttnForCausalLM, decay_statistics
from transformers_mhc.models import h3
from transformers_mhc.models.h3 import (
    H3Attention,
    S4DMixer,
    h3_fft_conv,
    h3_quadratic,
    h3_recurrent,
    s4d_conv,
    s4d_modes,
)


def _inputs(batch=2, heads=3, length=13, dim=4, modes=3, seed=0, state=False):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    q, k, v = randn(3, batch, heads, length, dim).unbind(0)
    params = dict(
        log_dt=torch.log(torch.rand(dim, generator=generator) * 0.2 + 0.01),
        a_real_log=randn(dim, modes) * 0.3 - 0.7,
        a_imag=randn(dim, modes) * 3,
        c=randn(dim, modes, 2),
    )
    skip = randn(dim)
    initial = torch.complex(*randn(2, batch, heads, dim, dim, modes).unbind(0)) if state else None
    return q, k, v, params, skip, initial


def _definition(q, k, v, a_bar, c_b, skip, initial=None):
    """The layer as the paper writes it, term by term: y_t[j] = Σ_i q_t[i] (Σ_{s≤t} K[i, t-s] k_s[i] v_s[j]
    + D[i] k_t[i] v_t[j] + 2 Re Σ_n C b̄ ā^(t+1) S0[i, j, n]), with K[i, τ] = 2 Re Σ_n (C b̄)[i, n] ā[i, n]^τ."""
    a_bar, c_b = a_bar.to(torch.complex128), c_b.to(torch.complex128)
    q, k, v = q.double(), k.double(), v.double()
    length = q.shape[2]
    y = torch.zeros_like(v)
    for t in range(length):
        mixed = skip.double()[:, None] * (k[:, :, t, :, None] * v[:, :, t, None, :])
        for s in range(t + 1):
            kernel = 2 * (c_b * a_bar ** (t - s)).sum(-1).real  # [Dk]
            mixed = mixed + kernel[:, None] * (k[:, :, s, :, None] * v[:, :, s, None, :])
        if initial is not None:
            mixed = (
                mixed + 2 * torch.einsum("dn,bhden->bhde", c_b * a_bar ** (t + 1), initial.to(c_b.dtype)).real
            )
        y[:, :, t] = torch.einsum("bhi,bhij->bhj", q[:, :, t], mixed)
    return y


# 63 with dim 4 splits the quadratic form's batch into blocks with a remainder; 130 is past the FFT's powers of two.
@pytest.mark.parametrize("length", [1, 2, 5, 13, 63, 130])
@pytest.mark.parametrize("with_state", [False, True], ids=["from-zero", "from-a-state"])
def test_quadratic_and_fft_and_recurrence_equal_the_definition(length, with_state):
    q, k, v, params, skip, initial = _inputs(length=length, state=with_state)
    a_bar, c_b = s4d_modes(**params)
    expected = _definition(q, k, v, a_bar, c_b, skip, initial)
    y_quad, state_quad = h3_quadratic(q, k, v, a_bar, c_b, skip, initial, output_final_state=True)
    y_fft, state_fft = h3_fft_conv(q, k, v, a_bar, c_b, skip, initial, output_final_state=True)
    y_rec, state_rec = h3_recurrent(q, k, v, a_bar, c_b, skip, initial)
    scale, state_scale = expected.abs().max().item(), state_rec.abs().max().item()
    for y in (y_quad, y_fft, y_rec):
        torch.testing.assert_close(y.double(), expected, atol=2e-5 * scale, rtol=1e-4)
    for state in (state_quad, state_fft):
        torch.testing.assert_close(state, state_rec, atol=2e-5 * state_scale, rtol=1e-4)


def _gradients(op, q, k, v, params, skip, initial):
    """Gradients of a loss on the output and on the final state, w.r.t. every input and parameter."""
    leaves = [t.requires_grad_() for t in (q, k, v, skip, *params.values(), initial)]
    if op is h3_recurrent:
        y, state = op(q, k, v, *s4d_modes(**params), skip, initial)
    else:
        y, state = op(q, k, v, *s4d_modes(**params), skip, initial, output_final_state=True)
    loss = y.float().square().sum() + torch.view_as_real(state).square().sum()
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("length", [5, 63])
def test_quadratic_fft_and_recurrence_have_the_same_gradients(length):
    inputs = _inputs(length=length, state=True)
    names = ["q", "k", "v", "skip", *inputs[3], "initial_state"]
    expected = _gradients(h3_recurrent, *inputs)
    for op in (h3_quadratic, h3_fft_conv):
        for name, a, b in zip(names, _gradients(op, *inputs), expected, strict=True):
            torch.testing.assert_close(
                a, b, atol=1e-4 * b.abs().max().item(), rtol=1e-4, msg=f"{op.__name__}: {name}"
            )


@pytest.mark.parametrize("length", [5, 63])
def test_quadratic_equals_fft_in_bf16(length):
    """bf16 activations: both forms compute in fp32, so they agree to fp32 accuracy on the same bf16 inputs and
    return bf16 gradients for bf16 leaves."""
    q, k, v, params, skip, _ = _inputs(length=length)
    q, k, v = (t.bfloat16().requires_grad_() for t in (q, k, v))
    results = []
    for op in (h3_quadratic, h3_fft_conv):
        y, _ = op(q, k, v, *s4d_modes(**params), skip)
        results.append((y, *torch.autograd.grad(y.square().sum(), (q, k, v))))
    (y_quad, *grads_quad), (y_fft, *grads_fft) = results
    assert y_quad.dtype == torch.float32 and all(g.dtype == torch.bfloat16 for g in grads_quad)
    torch.testing.assert_close(y_quad, y_fft, atol=2e-5 * y_fft.abs().max().item(), rtol=1e-4)
    for a, b in zip(grads_quad, grads_fft, strict=True):
        # The gradients are rounded to bf16 at the end: one bf16 step of difference is allowed.
        torch.testing.assert_close(a.float(), b.float(), atol=1e-2 * b.abs().max().item(), rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_layer_picks_the_quadratic_form_up_to_the_threshold(monkeypatch, dtype):
    """The layer gives the same output and cached state whichever form it runs (forced by the threshold), with left
    padding; and it runs the quadratic form up to `QUADRATIC_MAX_LENGTH` tokens and the FFT beyond."""
    model = _tiny().to(dtype)
    layer = model.model.layers[0].linear_attn
    hidden = torch.randn(2, 13, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
    padding_mask = torch.ones(2, 13, dtype=torch.long)
    padding_mask[1, :4] = 0
    outputs = {}
    for threshold in (13, 12):  # quadratic, then FFT
        monkeypatch.setattr(h3, "QUADRATIC_MAX_LENGTH", threshold)
        cache = DynamicCache(config=model.config)
        outputs[threshold] = (
            layer(hidden, padding_mask=padding_mask, cache=cache),
            layer.ssm.read_state(cache),
        )
    (y_quad, state_quad), (y_fft, state_fft) = outputs[13], outputs[12]
    tolerance = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(y_quad, y_fft, **tolerance)
    torch.testing.assert_close(state_quad, state_fft, **tolerance)

    calls = []
    for name in ("h3_quadratic", "h3_fft_conv"):
        original = getattr(h3, name)
        monkeypatch.setattr(
            h3, name, lambda *a, _name=name, _op=original, **kw: calls.append(_name) or _op(*a, **kw)
        )
    monkeypatch.setattr(h3, "QUADRATIC_MAX_LENGTH", 13)
    layer(hidden)
    layer(torch.cat([hidden, hidden[:, :1]], dim=1))
    assert calls == ["h3_quadratic", "h3_fft_conv"]


def test_long_sequence_fft_matches_the_recurrence():
    """FFT numerics at T = 1024 (zero-padded to 2T, fp32): the same as stepping through every token."""
    q, k, v, params, skip, _ = _inputs(batch=1, heads=1, length=1024, dim=2, modes=4)
    a_bar, c_b = s4d_modes(**params)
    y_fft, _ = h3_fft_conv(q, k, v, a_bar, c_b, skip)
    y_rec, _ = h3_recurrent(q, k, v, a_bar, c_b, skip)
    torch.testing.assert_close(y_fft, y_rec, atol=1e-4 * y_rec.abs().max().item(), rtol=1e-4)


def _tiny(**overrides) -> DecayLinearAttnForCausalLM:
    torch.manual_seed(0)
    settings = dict(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        token_mixer="h3",
        short_conv_size=4,
        h3_state_size=16,
    )
    return DecayLinearAttnForCausalLM(DecayLinearAttnConfig(**{**settings, **overrides})).eval()


def test_s4d_lin_initialisation_and_decay_statistics():
    model = _tiny()
    mixer = model.model.layers[0].linear_attn
    assert isinstance(mixer, H3Attention)
    ssm = mixer.ssm
    a = torch.complex(-torch.exp(ssm.a_real_log), ssm.a_imag)
    torch.testing.assert_close(a[0], torch.complex(torch.full((8,), -0.5), torch.pi * torch.arange(8.0)))
    assert 1e-3 <= ssm.log_dt.exp().min() and ssm.log_dt.exp().max() <= 0.1
    stats = decay_statistics(model, torch.randint(3, 40, (1, 8)))
    # |ā| = exp(-Δ/2) with Δ in [1e-3, 0.1]: slow decays, as S4D starts.
    assert set(stats["per_layer"]) == {0, 1}
    assert torch.exp(torch.tensor(-0.05)) <= stats["overall"]["min"] <= stats["overall"]["max"] < 1


def test_without_the_shift_ssm_and_in_bf16():
    """`short_conv_size=0` is H3 without its shift SSM; bf16 weights run (the SSM itself computes in fp32)."""
    model = _tiny(short_conv_size=0)
    assert not hasattr(model.model.layers[0].linear_attn, "shift_conv")
    ids = torch.randint(3, 40, (2, 10))
    logits = model.to(torch.bfloat16)(ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(positional_encoding="rope"), "positional_encoding"),
        (dict(use_delta_rule=True), "use_delta_rule"),
        (dict(h3_state_size=7), "even"),
        (dict(h3_dt_min=0.2, h3_dt_max=0.1), "h3_dt_min"),
        (dict(token_mixer="s5"), "token_mixer"),
        (dict(token_mixer="s4d", short_conv_size=4), "short_conv_size"),
    ],
)
def test_config_errors_name_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        DecayLinearAttnConfig(**{"token_mixer": "h3", **overrides})


@pytest.mark.parametrize("length", [2, 13, 65])
def test_s4d_alone_fft_equals_stepping_token_by_token(length):
    """`token_mixer="s4d"` (the diagonal SSM alone): the FFT form equals the one-token recurrence, from a state too."""
    generator = torch.Generator().manual_seed(length)
    channels = 5
    a_bar, c_b = s4d_modes(
        torch.log(torch.rand(channels, generator=generator) * 0.2 + 0.01),
        torch.randn(channels, 3, generator=generator) * 0.3 - 0.7,
        torch.randn(channels, 3, generator=generator) * 3,
        torch.randn(channels, 3, 2, generator=generator),
    )
    skip, u = (
        torch.randn(channels, generator=generator),
        torch.randn(2, length, channels, generator=generator),
    )
    initial = torch.complex(*torch.randn(2, 2, channels, 3, generator=generator).unbind(0))
    y_fft, state_fft = s4d_conv(u, a_bar, c_b, skip, initial, output_final_state=True)
    state, steps = initial, []
    for t in range(length):
        y_t, state = s4d_conv(u[:, t : t + 1], a_bar, c_b, skip, state)
        steps.append(y_t)
    y_rec = torch.cat(steps, dim=1)
    torch.testing.assert_close(y_fft, y_rec, atol=2e-5 * y_rec.abs().max().item(), rtol=1e-4)
    torch.testing.assert_close(state_fft, state, atol=2e-5 * state.abs().max().item(), rtol=1e-4)


def test_s4d_alone_model():
    model = _tiny(token_mixer="s4d", short_conv_size=0)
    assert isinstance(model.model.layers[0].linear_attn, S4DMixer)
    stats = decay_statistics(model, torch.randint(3, 40, (1, 8)))
    assert 0 < stats["overall"]["min"] <= stats["overall"]["max"] < 1
