"""DecayLinearAttnModel / DecayLinearAttnForCausalLM: equivalences (chunked == naive, prefill + decode == full,
left padding == alone, cache == no cache), initialisation, diagnostics, remote code, bf16, checkpointing, PEFT."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import BLOCK_PACKAGE
from transformers import DynamicCache

from transformers_mhc import (
    DecayLinearAttnConfig,
    DecayLinearAttnForCausalLM,
    DecayLinearAttnModel,
    decay_statistics,
    signal_gain,
)
from transformers_mhc.models import decay_linear_attention as mixer
from transformers_mhc.models.configuration_decay_linear_attn import DECAY_TYPES, cache_state_indices
from transformers_mhc.models.decay_ops import naive_decay_linear_attn, naive_delta_rule_decay
from transformers_mhc.models.modeling_decay_linear_attn import DecayLinearAttention, tokens_seen

VOCAB = 100


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny tensors: one intra-op thread is faster, and avoids oversubscribing the shared CPU cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**kwargs) -> DecayLinearAttnConfig:
    base = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        chunk_size=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    base.update(kwargs)
    return DecayLinearAttnConfig(**base)


@torch.no_grad()
def perturb(module: torch.nn.Module, scale: float = 0.1, seed: int = 1) -> None:
    """Moves every parameter off its (often symmetric or zero) initialisation, so equivalences are not trivial."""
    generator = torch.Generator().manual_seed(seed)
    for param in module.parameters():
        param.add_(scale * torch.randn(param.shape, generator=generator).to(param.dtype))


def make_model(**kwargs) -> DecayLinearAttnForCausalLM:
    model = DecayLinearAttnForCausalLM(tiny_config(**kwargs))
    perturb(model)
    return model.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# --------------------------------------------------------------------------------------------------------------------
# Every valid decay_type x granularity x sharing: chunked == naive recurrence, outputs and gradients
# --------------------------------------------------------------------------------------------------------------------
def valid_combinations() -> list[tuple[str, str, bool]]:
    combos = []
    for decay_type in DECAY_TYPES:
        for granularity in ("scalar", "vector"):
            for shared in (False, True):
                try:
                    tiny_config(
                        decay_type=decay_type, decay_granularity=granularity, share_decay_with_key=shared
                    )
                except ValueError:
                    continue
                combos.append((decay_type, granularity, shared))
    return combos


def op_outputs_and_grads(monkeypatch, layer, x, chunked: bool, lower_bound=None, rope_angles=None):
    """Runs the layer with the chunked (or naive) op and backpropagates a random projection of the op's output.

    The comparison is made on the op output rather than the layer output: the per-head RMSNorm after the op divides
    by each head's norm, which turns fp32 rounding of a large state into large relative errors for heads whose output
    happens to be near zero, in the chunked and recurrent forms alike.
    """
    outputs = []

    def recorder(op):
        def wrapped(*args, chunk_size=64, **kwargs):
            out, state = op(*args, chunk_size=chunk_size, **kwargs) if chunked else op(*args, **kwargs)
            outputs.append(out)
            return out, state

        return wrapped

    with monkeypatch.context() as patch:
        plain, delta = mixer.chunk_decay_linear_attn, mixer.chunk_delta_rule_decay
        if not chunked:
            plain, delta = naive_decay_linear_attn, naive_delta_rule_decay
        patch.setattr(mixer, "chunk_decay_linear_attn", recorder(plain))
        patch.setattr(mixer, "chunk_delta_rule_decay", recorder(delta))
        layer.zero_grad()
        x = x.detach().clone().requires_grad_(True)
        layer(x, lower_bound=lower_bound, rope_angles=rope_angles)
    (out,) = outputs
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(7)))
    grads = {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


def check_layer_chunked_equals_naive(monkeypatch, config, length, lower_bound=None, rope_angles=None):
    layer = DecayLinearAttention(config, layer_idx=1)
    # Init-sized weights and a unit-RMS input: the scale the mixer sees after its RMSNorm.
    perturb(layer, scale=0.02)
    x = torch.randn(2, length, config.hidden_size)
    out, x_grad, grads = op_outputs_and_grads(monkeypatch, layer, x, True, lower_bound, rope_angles)
    ref_out, ref_x_grad, ref_grads = op_outputs_and_grads(
        monkeypatch, layer, x, False, lower_bound, rope_angles
    )
    assert max_diff(out, ref_out) <= 1e-4
    # Gradients are sums over every token; fp32 rounding grows with their size, so 1e-4 is relative to it (>= 1).
    assert max_diff(x_grad, ref_x_grad) <= 1e-4 * max(1.0, ref_x_grad.abs().max().item())
    assert grads.keys() == ref_grads.keys()
    # Every decay parameter receives a gradient (for the shared Mamba2 variant without A and dt there is none).
    for name, _ in layer.decay_proj.named_parameters():
        if name != "tnl_log_decay":
            assert f"decay_proj.{name}" in grads, name
    for name in grads:
        scale = max(1.0, ref_grads[name].abs().max().item())
        assert max_diff(grads[name], ref_grads[name]) <= 1e-4 * scale, name


@pytest.mark.parametrize("length", [63, 257])
@pytest.mark.parametrize("decay_type, granularity, shared", valid_combinations())
def test_every_valid_decay_combination_chunked_equals_naive(
    monkeypatch, decay_type, granularity, shared, length
):
    config = tiny_config(
        decay_type=decay_type, decay_granularity=granularity, share_decay_with_key=shared, chunk_size=64
    )
    check_layer_chunked_equals_naive(monkeypatch, config, length)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(decay_type="hgrn2", hgrn2_lower_bound=True, decay_granularity="vector"),
        dict(decay_type="mamba2", positional_encoding="rope", decay_granularity="vector", short_conv_size=4),
        dict(decay_type="simple", use_delta_rule=True, decay_granularity="vector", share_decay_with_key=True),
        dict(decay_type="gla", use_delta_rule=True, positional_encoding="rope", decay_granularity="scalar"),
    ],
    ids=["hgrn2-lower-bound", "rope-conv", "delta-shared", "delta-rope"],
)
def test_layer_variants_chunked_equals_naive(monkeypatch, kwargs):
    config = tiny_config(**kwargs, chunk_size=64)
    length = 63
    lower_bound = torch.rand(2 * 16) * 0.9 if kwargs.get("hgrn2_lower_bound") else None
    rope_angles = None
    if kwargs.get("positional_encoding") == "rope":
        # The model computes the RoPE angles once and hands them to every layer.
        rope_angles = mixer.DecayLinearAttnCosineRope(config)(torch.arange(length)[None])
    check_layer_chunked_equals_naive(monkeypatch, config, length, lower_bound, rope_angles)


# --------------------------------------------------------------------------------------------------------------------
# Cache: prefill then decode == one full forward; left padding == alone; generate with cache == without
# --------------------------------------------------------------------------------------------------------------------
DECODE_CONFIGS = {
    "simple-scalar": dict(),
    "mamba2-vector-conv": dict(decay_type="mamba2", decay_granularity="vector", short_conv_size=4),
    "lightnet-shared-conv": dict(
        decay_type="lightnet", decay_granularity="vector", share_decay_with_key=True, short_conv_size=3
    ),
    "hybrid-conv-rope": dict(
        num_hidden_layers=3, attention_layers=[1], short_conv_size=4, positional_encoding="rope"
    ),
    "tpe-delta-hgrn2lb": dict(
        positional_encoding="tpe",
        use_delta_rule=True,
        decay_type="hgrn2",
        hgrn2_lower_bound=True,
        decay_granularity="vector",
    ),
    "tnl-rope": dict(decay_type="tnl", positional_encoding="rope"),
    "gla-mhc": dict(decay_type="gla", decay_granularity="vector", hyper_connection="mhc", num_streams=3),
}


@pytest.mark.parametrize("kwargs", DECODE_CONFIGS.values(), ids=DECODE_CONFIGS.keys())
@torch.no_grad()
def test_prefill_then_decode_equals_full_forward(kwargs):
    model = make_model(**kwargs)
    ids = torch.randint(3, VOCAB, (2, 24))
    full = model(ids).logits

    cache = DynamicCache(config=model.config)
    pieces = [model(ids[:, :11], cache=cache, use_cache=True).logits]
    pieces.append(model(ids[:, 11:17], cache=cache, use_cache=True).logits)  # chunked continuation
    for t in range(17, 24):
        pieces.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    assert max_diff(torch.cat(pieces, dim=1), full) <= 1e-4
    assert tokens_seen(cache, model.config) == 24


@pytest.mark.parametrize(
    "kwargs",
    [
        DECODE_CONFIGS[name]
        for name in ("lightnet-shared-conv", "hybrid-conv-rope", "tpe-delta-hgrn2lb", "gla-mhc")
    ],
    ids=["lightnet-shared-conv", "hybrid-conv-rope", "tpe-delta-hgrn2lb", "gla-mhc"],
)
@torch.no_grad()
def test_left_padded_batch_equals_each_sample_alone(kwargs):
    model = make_model(**kwargs)
    lengths = [21, 13]
    samples = [torch.randint(3, VOCAB, (1, n)) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    mask = torch.zeros(len(samples), width, dtype=torch.long)
    for row, sample in enumerate(samples):
        ids[row, width - sample.shape[1] :] = sample[0]
        mask[row, width - sample.shape[1] :] = 1

    batched = model(ids, attention_mask=mask).logits
    for row, sample in enumerate(samples):
        alone = model(sample).logits
        assert max_diff(batched[row, width - sample.shape[1] :], alone[0]) <= 1e-4

    # Generation continues from the padded state exactly as from each sample alone.
    generated = model.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    for row, sample in enumerate(samples):
        alone = model.generate(sample, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert torch.equal(generated[row, width:], alone[0, sample.shape[1] :])


@pytest.mark.parametrize(
    "kwargs",
    [DECODE_CONFIGS[name] for name in ("simple-scalar", "mamba2-vector-conv", "hybrid-conv-rope")],
    ids=["linear", "short-conv", "hybrid-attention"],
)
@torch.no_grad()
def test_generate_with_cache_equals_without(kwargs):
    model = make_model(**kwargs)
    prompt = torch.randint(3, VOCAB, (2, 7))
    mask = torch.ones_like(prompt)
    common = dict(attention_mask=mask, max_new_tokens=10, min_new_tokens=10)

    greedy = model.generate(prompt, do_sample=False, **common)
    assert torch.equal(greedy, model.generate(prompt, do_sample=False, use_cache=False, **common))

    torch.manual_seed(5)
    sampled = model.generate(prompt, do_sample=True, top_k=20, **common)
    torch.manual_seed(5)
    assert torch.equal(sampled, model.generate(prompt, do_sample=True, top_k=20, use_cache=False, **common))

    beam = model.generate(prompt, num_beams=3, do_sample=False, **common)
    assert torch.equal(beam, model.generate(prompt, num_beams=3, do_sample=False, use_cache=False, **common))


@torch.no_grad()
def test_generate_accepts_a_user_dynamic_cache():
    """A plain `DynamicCache(config=...)` works too: `generate` needs its length even when every layer is linear."""

    model = make_model()
    prompt = torch.randint(3, VOCAB, (1, 5))
    expected = model.generate(prompt, max_new_tokens=5, do_sample=False)
    out = model.generate(prompt, cache=DynamicCache(config=model.config), max_new_tokens=5, do_sample=False)
    assert torch.equal(out, expected)


# --------------------------------------------------------------------------------------------------------------------
# Initialisation and diagnostics
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["scalar", "vector"])
@pytest.mark.parametrize("p", [0.8, 0.9, 0.95, 0.99])
def test_simple_decay_initial_median_is_p(p, granularity):
    model = DecayLinearAttnForCausalLM(
        tiny_config(hidden_size=64, decay_type="simple", simple_decay_init=p, decay_granularity=granularity)
    ).eval()
    stats = decay_statistics(model, torch.randint(3, VOCAB, (2, 64)))
    for layer_stats in stats["per_layer"].values():
        assert abs(layer_stats["median"] - p) <= 0.01
    assert abs(stats["overall"]["median"] - p) <= 0.01


def test_decay_statistics_reports_quartiles_and_skips_padding():
    model = make_model(
        decay_type="mamba2", decay_granularity="vector", num_hidden_layers=3, attention_layers=[1]
    )
    ids = torch.randint(3, VOCAB, (2, 20))
    mask = torch.ones_like(ids)
    mask[1, :8] = 0
    stats = decay_statistics(model, ids, attention_mask=mask)
    assert sorted(stats["per_layer"]) == [0, 2]  # layer 1 is softmax attention
    for s in [*stats["per_layer"].values(), stats["overall"]]:
        assert set(s) == {"median", "q1", "q3", "mean", "min", "max"}
        assert 0 < s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"] <= 1

    # Only unpadded tokens count: the same statistics as the unpadded rows alone.
    unpadded = decay_statistics(model, ids[:1])
    row_two = decay_statistics(model, ids[1:, 8:])
    count = lambda n: n * 2 * 16  # noqa: E731 - tokens x heads x channels
    mean = (unpadded["overall"]["mean"] * count(40) + row_two["overall"]["mean"] * count(24)) / count(64)
    assert abs(stats["overall"]["mean"] - mean) < 1e-5

    with pytest.raises(ValueError, match="DecayLinearAttnDecay"):
        decay_statistics(torch.nn.Linear(2, 2), ids)


def test_tnl_decays_stay_below_one_in_every_layer():
    """The paper code's TNL slopes reach 0 (and > 0 with TPE) in the last layer; ours are strictly negative."""
    for kwargs in (dict(decay_type="tnl"), dict(decay_type="tnl", positional_encoding="tpe")):
        num_layers = 4
        model = DecayLinearAttnForCausalLM(tiny_config(num_hidden_layers=num_layers, **kwargs)).eval()
        stats = decay_statistics(model, torch.randint(3, VOCAB, (1, 8)))
        slopes = mixer._alibi_slopes(2)
        for layer_idx, s in stats["per_layer"].items():
            expected = torch.exp(-slopes * (1 - layer_idx / num_layers))
            assert s["max"] < 1.0
            assert (
                abs(s["min"] - expected.min().item()) < 1e-6 and abs(s["max"] - expected.max().item()) < 1e-6
            )

    model = DecayLinearAttnForCausalLM(tiny_config(decay_type="tnl_learnable")).train()
    decay = model.model.layers[1].linear_attn.decay_proj
    with torch.no_grad():
        decay.log_rate.fill_(-30.0)  # even a huge step towards "no decay" keeps log lambda < 0
    log_decay, _, _ = decay(torch.randn(1, 3, 32), torch.randn(1, 3, 32))
    assert (log_decay < 0).all()


def test_lightnet_normaliser_and_conv_state_live_in_the_cache():
    model = make_model(decay_type="lightnet", decay_granularity="vector", short_conv_size=4)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.randint(3, VOCAB, (2, 9)), cache=cache, use_cache=True)
    states = cache_state_indices(model.config)
    assert states == {"recurrent": 0, "lightnet_normaliser": 1}
    layer = cache.layers[0]
    assert layer.number_of_states == 2
    assert layer.recurrent_states[states["recurrent"]].shape == (2, 2, 16, 16)
    assert layer.recurrent_states[states["recurrent"]].dtype == torch.float32
    assert layer.recurrent_states[states["lightnet_normaliser"]].shape == (2, 32)
    assert layer.conv_states[states["recurrent"]].shape == (2, 3 * 32, 4)
    assert tokens_seen(cache, model.config) == 9


# --------------------------------------------------------------------------------------------------------------------
# Hugging Face integration: remote code, bf16, gradient checkpointing, PEFT, Trainer loss, hyper-connections
# --------------------------------------------------------------------------------------------------------------------
REMOTE_LOAD_SCRIPT = BLOCK_PACKAGE + textwrap.dedent(
    """
    import json
    try:
        import transformers_mhc  # noqa: F401
        raise SystemExit("transformers_mhc is still importable")
    except ImportError:
        pass

    import torch
    from transformers import AutoModelForCausalLM

    path = sys.argv[1]
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    assert not type(model).__module__.startswith("transformers_mhc"), type(model).__module__
    ids = torch.tensor(json.load(open(path + "/ids.json")))
    with torch.no_grad():
        logits = model(ids).logits
        generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    json.dump({"logits": logits.tolist(), "generated": generated.tolist(), "class": type(model).__name__},
              open(path + "/out.json", "w"))
    """
)


REMOTE_VARIANTS = {
    "decay": dict(
        attention_layers=[1], positional_encoding="rope", decay_type="mamba2", decay_granularity="vector"
    ),
    "h3": dict(attention_layers="h3", token_mixer="h3", h3_state_size=8),  # layers [1, 2]: softmax attention
}


@pytest.mark.parametrize("variant", REMOTE_VARIANTS)
def test_save_with_remote_code_and_load_where_package_is_absent(tmp_path, variant):
    model = make_model(
        num_hidden_layers=3,
        short_conv_size=4,
        hyper_connection="mhc",
        num_streams=2,
        **REMOTE_VARIANTS[variant],
    )
    ids = torch.randint(3, VOCAB, (2, 12))
    with torch.no_grad():
        expected = model(ids).logits
        expected_generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    model.save_pretrained(tmp_path)
    (tmp_path / "ids.json").write_text(json.dumps(ids.tolist()))

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"].endswith("DecayLinearAttnForCausalLM")
    for name in (
        "modeling_decay_linear_attn.py",
        "configuration_decay_linear_attn.py",
        "decay_ops.py",
        "h3.py",
    ):
        assert (tmp_path / name).is_file(), name

    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"}
    script = tmp_path / "load.py"
    script.write_text(REMOTE_LOAD_SCRIPT)
    result = subprocess.run(
        [sys.executable, "-I", str(script), str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["class"] == "DecayLinearAttnForCausalLM"
    assert torch.equal(torch.tensor(out["logits"]), expected)
    assert torch.equal(torch.tensor(out["generated"]), expected_generated)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(decay_type="tnl", positional_encoding="rope"),
        dict(decay_type="tnl_learnable", positional_encoding="tpe"),
        dict(decay_type="hgrn2", hgrn2_lower_bound=True, decay_granularity="vector", short_conv_size=2),
    ],
    ids=["tnl-rope", "tnl_learnable-tpe", "hgrn2-lower-bound"],
)
def test_from_pretrained_refills_non_persistent_buffers(tmp_path, kwargs):
    """`from_pretrained` builds on the meta device; TNL's slopes and the RoPE frequencies are not in the checkpoint."""
    from transformers import AutoModelForCausalLM

    model = make_model(**kwargs)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is DecayLinearAttnForCausalLM
    ids = torch.randint(3, VOCAB, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_bf16_forward_and_generate():
    model = make_model(decay_type="gla", decay_granularity="vector", short_conv_size=4, attention_layers=[1])
    ids = torch.randint(3, VOCAB, (2, 40))
    with torch.no_grad():
        reference = model(ids).logits
        model.to(torch.bfloat16)
        logits = model(ids).logits
        generated = model.generate(ids[:, :5], max_new_tokens=5, do_sample=False)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert max_diff(logits, reference) < 0.05 * reference.abs().max().item()
    assert generated.shape == (2, 10)


def test_delta_rule_model_follows_kernel_backend():
    """The delta rule has no kernel: "auto" and "torch" give the same logits (the torch path), while "triton" stops
    with an error naming both fields instead of silently running PyTorch."""
    model = make_model(use_delta_rule=True, decay_granularity="vector")
    ids = torch.randint(3, VOCAB, (1, 9))
    with torch.no_grad():
        model.config.kernel_backend = "torch"
        reference = model(ids).logits
        model.config.kernel_backend = "auto"
        assert torch.equal(model(ids).logits, reference)
        model.config.kernel_backend = "triton"
        with pytest.raises(ValueError, match=r"kernel_backend='triton'.*use_delta_rule"):
            model(ids)


def test_gradient_checkpointing_matches_plain_backward():
    model = make_model(short_conv_size=4, decay_granularity="vector", attention_layers=[1]).train()
    ids = torch.randint(3, VOCAB, (2, 20))

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.activation_checkpointing_enable()  # the v5 name of `gradient_checkpointing_enable`
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert max_diff(plain[name], checkpointed[name]) <= 1e-6, name


def test_peft_lora_with_decay_module_in_modules_to_save(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file

    torch.manual_seed(0)
    base = DecayLinearAttnForCausalLM(tiny_config(decay_type="mamba2", decay_granularity="vector"))
    original_a_log = base.model.layers[0].linear_attn.decay_proj.A_log.detach().clone()
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        modules_to_save=["decay_proj"],
    )
    model = get_peft_model(base, lora)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("decay_proj" in n and "A_log" in n for n in trainable)
    assert any("lora_A" in n and "q_proj" in n for n in trainable)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, VOCAB, (2, 16))
    model.train()
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    trained_decay = model.base_model.model.model.layers[0].linear_attn.decay_proj
    assert not torch.equal(trained_decay.modules_to_save["default"].A_log, original_a_log)

    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any("decay_proj" in key and "A_log" in key for key in saved)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits

    torch.manual_seed(0)
    fresh = DecayLinearAttnForCausalLM(tiny_config(decay_type="mamba2", decay_granularity="vector"))
    reloaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    with torch.no_grad():
        assert max_diff(reloaded(input_ids=ids).logits, expected) <= 1e-6


def test_loss_uses_num_items_in_batch_like_trainer():
    model = make_model()
    ids = torch.randint(3, VOCAB, (2, 10))
    mean_loss = model(ids, labels=ids).loss
    summed = model(ids, labels=ids, num_items_in_batch=torch.tensor(9)).loss
    assert torch.allclose(summed * 9, mean_loss * 18, atol=1e-4)  # 2 x 9 shifted targets


def test_hidden_states_and_base_model():
    model = make_model(num_hidden_layers=3, attention_layers=[2])
    ids = torch.randint(3, VOCAB, (1, 6))
    out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == 4
    assert torch.equal(out.hidden_states[-1], model.model(ids).last_hidden_state)
    assert isinstance(model.model, DecayLinearAttnModel)


def test_hyper_connections_wrap_mixer_and_mlp():
    model = make_model(hyper_connection="mhc", num_streams=4)
    layer = model.model.layers[0]
    assert (
        type(layer.attn_hc).__name__ == "HyperConnection" and type(layer.mlp_hc).__name__ == "HyperConnection"
    )
    gain = signal_gain(model, torch.randint(3, VOCAB, (1, 8)))
    assert len(gain["per_layer"]) == 4 and gain["forward"] >= 1 - 1e-4

    # One stream without hyper-connections is the plain residual model: parameter-free `Residual` connections.
    plain = make_model()
    assert type(plain.model.layers[0].attn_hc).__name__ == "Residual"
    assert not any("_hc." in name for name, _ in plain.named_parameters())


def test_hc_recompute_gives_the_same_gradients():
    kwargs = dict(hyper_connection="mhc", num_streams=2, num_hidden_layers=3, short_conv_size=4)
    model = make_model(**kwargs).train()
    ids = torch.randint(3, VOCAB, (2, 12))

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.config.hc_recompute = True
    recomputed = grads()
    for name in plain:
        assert max_diff(plain[name], recomputed[name]) <= 1e-6, name
