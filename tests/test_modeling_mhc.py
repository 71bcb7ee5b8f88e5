"""MHCConfig / MHCForCausalLM: equivalences, constraints, generation, remote code."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import BLOCK_PACKAGE
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import transformers_mhc
from transformers_mhc import MHCConfig, MHCForCausalLM, signal_gain
from transformers_mhc.models.hyper_connection import HyperConnection

TINY = dict(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    eos_token_id=None,  # generation runs its full length, so step-by-step references line up
)


def tiny_mhc(**overrides) -> MHCForCausalLM:
    torch.manual_seed(0)
    return MHCForCausalLM(MHCConfig(**{**TINY, **overrides})).eval()


def perturb_hc(model: MHCForCausalLM, scale: float = 0.5) -> MHCForCausalLM:
    """Moves the hyper-connection parameters away from their identity-like init, as training would."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, HyperConnection):
                for p in module.parameters():
                    p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value, message",
    [
        (
            "hyper_connection",
            "resnet",
            "`hyper_connection` must be one of ['mhc', 'hc', 'none'], got 'resnet'",
        ),
        ("hc_readout", "max", "`hc_readout` must be one of ['mean', 'sum', 'learned']"),
        ("hc_convention", "v3", "`hc_convention` must be one of ['paper', 'deepseek_v4']"),
        ("num_streams", 0, "`num_streams` must be an integer >= 1, got 0"),
        ("sinkhorn_iterations", 0, "`sinkhorn_iterations` must be an integer >= 1"),
        ("hc_symmetry_breaking", 1.5, "`hc_symmetry_breaking`"),
        ("hc_recompute_interval", 0, "`hc_recompute_interval`"),
    ],
)
def test_invalid_config_values_name_the_field(field, value, message):
    with pytest.raises(ValueError) as err:
        MHCConfig(**{**TINY, field: value})
    assert message in str(err.value)


def test_plain_residual_needs_one_stream():
    with pytest.raises(ValueError, match="num_streams"):
        MHCConfig(**TINY, hyper_connection="none", num_streams=4)


def test_config_round_trip_and_auto_registration(tmp_path):
    config = MHCConfig(**TINY, num_streams=3, hyper_connection="hc", hc_readout="sum")
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, MHCConfig)
    assert (loaded.num_streams, loaded.hyper_connection, loaded.hc_readout) == (3, "hc", "sum")
    assert type(AutoModelForCausalLM.from_config(loaded)) is MHCForCausalLM


# --------------------------------------------------------------------------------------------------
# Equivalences
# --------------------------------------------------------------------------------------------------
def test_plain_residual_reproduces_llama_random():
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    model = tiny_mhc(hyper_connection="none", num_streams=1)
    model.load_state_dict(llama.state_dict(), strict=True)
    ids = torch.randint(0, TINY["vocab_size"], (2, 17))
    with torch.no_grad():
        diff = (model(ids).logits - llama(ids).logits).abs().max()
    assert diff <= 1e-5


def test_plain_residual_reproduces_pretrained_llama(stories260k_path):
    llama = LlamaForCausalLM.from_pretrained(stories260k_path).eval()
    config = MHCConfig(**{**llama.config.to_dict(), "hyper_connection": "none", "num_streams": 1})
    model = MHCForCausalLM(config).eval()
    model.load_state_dict(llama.state_dict(), strict=True)
    ids = torch.randint(3, 512, (2, 40))
    with torch.no_grad():
        assert (model(ids).logits - llama(ids).logits).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "options",
    [
        dict(hyper_connection="mhc", hc_symmetry_breaking=0.2),  # h_pre = 1/n, h_post mean 1, h_res ≈ I
        dict(hyper_connection="mhc", hc_res_logit_gap=0.5),  # a small gap: h_res far from I, still exact
        dict(hyper_connection="hc"),  # one-hot h_pre, h_post = 1, h_res = I
        dict(hyper_connection="hc", hc_pre_bias_init=0.25, hc_symmetry_breaking=0.2),
    ],
)
def test_multi_stream_at_init_reproduces_llama_when_dynamic_terms_are_zero(options):
    """Identical streams, mean-preserving h_pre / h_post / h_res and a mean readout follow the plain residual."""
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    model = tiny_mhc(num_streams=4, hc_gate_init=0.0, **options)
    missing = model.load_state_dict(llama.state_dict(), strict=False).missing_keys
    assert all("_hc." in key for key in missing)
    ids = torch.randint(0, TINY["vocab_size"], (2, 11))
    with torch.no_grad():
        assert (model(ids).logits - llama(ids).logits).abs().max() <= 1e-5


# --------------------------------------------------------------------------------------------------
# Manifold constraint and diagnostics
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 4, 6])
def test_h_res_doubly_stochastic_at_init(n):
    model = tiny_mhc(num_streams=n)
    streams = torch.randn(2, 9, n, TINY["hidden_size"])
    for module in model.modules():
        if isinstance(module, HyperConnection):
            _, _, h_res = module.coefficients(streams)
            assert (h_res.sum(-1) - 1).abs().max() <= 1e-6
            assert (h_res.sum(-2) - 1).abs().max() <= 1e-3


def test_signal_gain_reports_the_column_error_of_badly_conditioned_h_res():
    model = tiny_mhc(num_streams=4, hc_dynamic=False)
    n = 4
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, HyperConnection):
                module.static_bias[2 * n :] = (torch.randint(0, 2, (n * n,)) * 2 - 1) * 1e4
    ids = torch.randint(0, TINY["vocab_size"], (1, 5))
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    gain = signal_gain(model, ids)
    composite = torch.eye(n)
    expected_forward, expected_backward = [], []
    for module in model.modules():
        if isinstance(module, HyperConnection):
            h_res = module.coefficients(torch.zeros(1, 1, n, TINY["hidden_size"]))[2][0, 0]
            assert (h_res.sum(-1) - 1).abs().max() <= 1e-6  # rows still exact
            composite = h_res @ composite
            expected_forward.append(composite.abs().sum(-1).max().item())
            expected_backward.append(composite.abs().sum(-2).max().item())
    assert gain["backward"] == pytest.approx(max(expected_backward), rel=1e-5)
    assert gain["forward"] == pytest.approx(max(expected_forward), rel=1e-5)
    assert gain["backward"] > 1.001  # the column error is visible
    assert len(gain["per_layer"]) == 2 * TINY["num_hidden_layers"]


def test_signal_gain_is_one_for_plain_residual_and_grows_for_hc():
    ids = torch.randint(0, TINY["vocab_size"], (1, 6))
    assert signal_gain(tiny_mhc(hyper_connection="none", num_streams=1), ids)["forward"] == 1.0
    hc = perturb_hc(tiny_mhc(hyper_connection="hc", num_streams=4), scale=0.5)
    assert signal_gain(hc, ids)["forward"] > 1.05
    mhc = perturb_hc(tiny_mhc(hyper_connection="mhc", num_streams=4), scale=0.5)
    assert signal_gain(mhc, ids)["forward"] == pytest.approx(1.0, abs=1e-5)


# --------------------------------------------------------------------------------------------------
# DeepSeek-V4 convention
# --------------------------------------------------------------------------------------------------
def test_deepseek_v4_convention_matches_transformers():
    from transformers import DeepseekV4Config
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import (
        DeepseekV4HyperConnection,
        DeepseekV4HyperHead,
    )

    n, c = 4, 32
    reference = DeepseekV4HyperConnection(DeepseekV4Config(hidden_size=c, hc_mult=n, rms_norm_eps=1e-6))
    head = DeepseekV4HyperHead(DeepseekV4Config(hidden_size=c, hc_mult=n, rms_norm_eps=1e-6))
    config = MHCConfig(
        **{**TINY, "hidden_size": c},
        num_streams=n,
        hc_convention="deepseek_v4",
        hc_readout="learned",
        rms_norm_eps=1e-6,
    )
    ours = HyperConnection(config, sublayer_idx=0)
    from transformers_mhc.models.hyper_connection import StreamReadout

    readout = StreamReadout(config)
    with torch.no_grad():
        for p in list(reference.parameters()) + list(head.parameters()):
            p.copy_(torch.randn_like(p) * 0.5)
        ours.phi.copy_(reference.fn)
        ours.static_bias.copy_(reference.base)
        ours.alpha.copy_(reference.scale)
        readout.phi.copy_(head.hc_fn)
        readout.static_bias.copy_(head.hc_base)
        readout.alpha.copy_(head.hc_scale)

    streams = torch.randn(2, 5, n, c)
    post, comb, collapsed = reference(streams)
    h_pre, h_post, h_res = ours.coefficients(streams)
    torch.testing.assert_close(h_post, post, atol=1e-5, rtol=0)
    torch.testing.assert_close(h_res, comb.transpose(-1, -2), atol=1e-5, rtol=0)
    from transformers_mhc.models.mhc_ops import hc_pre_mix, hc_res_post_mix

    torch.testing.assert_close(hc_pre_mix(h_pre, streams), collapsed, atol=1e-5, rtol=0)
    # The layer update: DSv4 computes post ⊗ F + combᵀ @ streams.
    f = torch.randn(2, 5, c)
    expected = post.unsqueeze(-1) * f.unsqueeze(-2) + torch.matmul(comb.transpose(-1, -2), streams)
    torch.testing.assert_close(hc_res_post_mix(h_res, streams, h_post, f), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(readout(streams), head(streams), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------
# Generation, padding, cache
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["mhc", "hc"])
def test_greedy_generate_with_cache_equals_step_by_step_full_forwards(mode):
    model = perturb_hc(tiny_mhc(hyper_connection=mode, num_streams=3), scale=0.3)
    prompt = torch.randint(0, TINY["vocab_size"], (1, 6))
    generated = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)
    ids = prompt
    with torch.no_grad():
        for _ in range(12):
            next_id = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=-1)
    assert torch.equal(generated, ids)


def test_prefill_then_decode_matches_full_forward_logits():
    model = perturb_hc(tiny_mhc(num_streams=4), scale=0.3)
    ids = torch.randint(0, TINY["vocab_size"], (2, 14))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :8], use_cache=True)
        steps = [out.logits]
        cache = out.cache
        for t in range(8, 14):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_left_padded_batch_equals_each_sample_alone():
    model = perturb_hc(tiny_mhc(num_streams=4, hc_readout="learned"), scale=0.3)
    a = torch.randint(1, TINY["vocab_size"], (1, 9))
    b = torch.randint(1, TINY["vocab_size"], (1, 5))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    with torch.no_grad():
        padded = model(batch, attention_mask=mask).logits
        torch.testing.assert_close(padded[0], model(a).logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(padded[1, 4:], model(b).logits[0], atol=1e-5, rtol=1e-5)
    generated = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    alone = model.generate(b, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(generated[1, 4:], alone[0])


def test_sampling_and_beam_search_run():
    model = tiny_mhc(num_streams=2)
    prompt = torch.randint(0, TINY["vocab_size"], (2, 4))
    sampled = model.generate(prompt, max_new_tokens=5, do_sample=True, top_k=10, pad_token_id=0)
    beams = model.generate(prompt, max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)
    assert sampled.shape == beams.shape == (2, 9)


def test_output_hidden_states_shapes():
    model = tiny_mhc(num_streams=4)
    ids = torch.randint(0, TINY["vocab_size"], (2, 7))
    out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == TINY["num_hidden_layers"] + 1
    assert all(h.shape == (2, 7, TINY["hidden_size"]) for h in out.hidden_states)


# --------------------------------------------------------------------------------------------------
# Training features
# --------------------------------------------------------------------------------------------------
def _grads(model, ids) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("interval", [None, 1, 2])
def test_selective_recomputation_gives_identical_gradients(interval):
    ids = torch.randint(0, TINY["vocab_size"], (2, 10))
    plain = perturb_hc(tiny_mhc(num_streams=4), 0.3).train()
    recomputed = perturb_hc(
        tiny_mhc(num_streams=4, hc_recompute=True, hc_recompute_interval=interval), 0.3
    ).train()
    expected, actual = _grads(plain, ids), _grads(recomputed, ids)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


def test_selective_recomputation_saves_less_for_backward():
    def saved_bytes(model) -> int:
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        ids = torch.randint(0, TINY["vocab_size"], (1, 64))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids, labels=ids)
        return total

    config = dict(num_streams=4, num_hidden_layers=4, hidden_size=128, intermediate_size=256)
    plain = saved_bytes(tiny_mhc(**config).train())
    recomputed = saved_bytes(tiny_mhc(**config, hc_recompute=True).train())
    assert recomputed < 0.8 * plain


def test_gradient_checkpointing_gives_identical_gradients():
    ids = torch.randint(0, TINY["vocab_size"], (2, 10))
    plain = perturb_hc(tiny_mhc(num_streams=4), 0.3).train()
    checkpointed = perturb_hc(tiny_mhc(num_streams=4), 0.3).train()
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    expected, actual = _grads(plain, ids), _grads(checkpointed, ids)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


def test_bf16_forward_backward_keeps_fp32_coefficients():
    model = tiny_mhc(num_streams=4).to(torch.bfloat16).train()
    ids = torch.randint(0, TINY["vocab_size"], (2, 8))
    seen = []
    hook = model.model.layers[0].attn_hc.register_forward_hook(
        lambda m, i, o: seen.append([t.dtype for t in o[1][:3]])
    )
    out = model(ids, labels=ids)
    hook.remove()
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    assert seen[0] == [torch.float32] * 3
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_torch_compile_traces_without_graph_breaks():
    model = tiny_mhc(num_streams=4)
    ids = torch.randint(0, TINY["vocab_size"], (1, 8))
    explanation = torch._dynamo.explain(lambda x: model(x, use_cache=False).logits)(ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_peft_modules_to_save_targets_hyper_connections():
    from peft import LoraConfig, get_peft_model

    model = tiny_mhc(num_streams=2).train()
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["attn_hc", "mlp_hc"])
    )
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert any("attn_hc.modules_to_save" in name and name.endswith("static_bias") for name in trainable)
    assert any("lora_A" in name for name in trainable)
    ids = torch.randint(0, TINY["vocab_size"], (2, 6))
    peft_model(ids, labels=ids).loss.backward()
    hc_param = dict(peft_model.named_parameters())[
        "base_model.model.model.layers.0.attn_hc.modules_to_save.default.static_bias"
    ]
    assert hc_param.grad is not None and hc_param.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# Save / remote code
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["mhc", "hc"])
def test_save_and_load_with_remote_code_in_a_fresh_process(tmp_path, mode):
    model = perturb_hc(tiny_mhc(hyper_connection=mode, num_streams=3, hc_readout="learned"), 0.3)
    model.save_pretrained(tmp_path / "ckpt")
    saved_config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved_config["auto_map"]["AutoModelForCausalLM"] == "modeling_mhc.MHCForCausalLM"
    for name in (
        "configuration_mhc.py",
        "modeling_mhc.py",
        "hyper_connection.py",
        "mhc_ops.py",
        "mhc_fused.py",
    ):
        assert (tmp_path / "ckpt" / name).is_file(), name

    ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        torch.save(model(ids).logits, tmp_path / "expected.pt")
    script = BLOCK_PACKAGE + textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        ids = torch.load({str(tmp_path / "ids.pt")!r})
        with torch.no_grad():
            logits = model(ids).logits
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        print("MAXDIFF", (logits - expected).abs().max().item())
        """
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MAXDIFF 0.0" in result.stdout


def test_reload_in_process_gives_identical_logits(tmp_path):
    model = perturb_hc(tiny_mhc(num_streams=4), 0.3)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is MHCForCausalLM
    ids = torch.randint(0, TINY["vocab_size"], (1, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_package_exports():
    for name in ("MHCConfig", "MHCForCausalLM", "MHCModel", "signal_gain"):
        assert hasattr(transformers_mhc, name)
