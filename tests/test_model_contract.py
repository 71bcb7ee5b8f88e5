"""The transformers model contract, for both models, in the four configurations users meet most.

What transformers' own common suites (`ModelTesterMixin`, `GenerationTesterMixin`, the causal-LM tester) check of a
built-in model, written as our own tests: generation with and without the cache in every decoding mode, continuing
from a returned cache, `inputs_embeds`, static cache and `torch.compile`, recorded outputs, tuple outputs, save/load,
resized embeddings, parallelism plans, attention backends, gradient checkpointing, left padding, and no FutureWarning
from our code. Where the decay model does not support a clause (assisted decoding, static cache), the test checks the
clear error instead.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, StaticCache

from transformers_mhc import DecayLinearAttnConfig, DecayLinearAttnForCausalLM, MHCConfig, MHCForCausalLM

VOCAB = 99
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=None,  # no early stop: every decoding runs its full length
)
CONFIGS = {
    "mhc-n4": (MHCForCausalLM, MHCConfig, dict(hyper_connection="mhc", num_streams=4)),
    "mhc-plain": (MHCForCausalLM, MHCConfig, dict(hyper_connection="none", num_streams=1)),
    "decay-linear": (DecayLinearAttnForCausalLM, DecayLinearAttnConfig, dict(decay_type="simple")),
    "decay-hybrid-conv": (
        DecayLinearAttnForCausalLM,
        DecayLinearAttnConfig,
        dict(decay_type="gla", short_conv_size=4, attention_layers=[1]),
    ),
    "decay-h3": (
        DecayLinearAttnForCausalLM,
        DecayLinearAttnConfig,
        dict(token_mixer="h3", short_conv_size=3, h3_state_size=8),
    ),
    "decay-s4d": (
        DecayLinearAttnForCausalLM,
        DecayLinearAttnConfig,
        dict(token_mixer="s4d", h3_state_size=8),
    ),
}
MHC_CONFIGS = [name for name in CONFIGS if name.startswith("mhc")]
DECAY_CONFIGS = [name for name in CONFIGS if name.startswith("decay")]


def make(name: str, **overrides) -> torch.nn.Module:
    model_class, config_class, extra = CONFIGS[name]
    kwargs = {**COMMON, **extra, **overrides}
    if config_class is DecayLinearAttnConfig:
        kwargs.pop("num_key_value_heads")  # linear attention has one key per head
    torch.manual_seed(0)
    return model_class(config_class(**kwargs)).eval()


def prompt(batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def greedy_by_full_forwards(model, ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding without any cache: one full forward per new token. Returns (sequences, last-step logits)."""
    logits = []
    for _ in range(steps):
        step = model(ids, use_cache=False).logits[:, -1]
        logits.append(step)
        ids = torch.cat([ids, step.argmax(-1, keepdim=True)], dim=1)
    return ids, torch.stack(logits, dim=1)


GENERATE = dict(max_new_tokens=6, pad_token_id=0)


# ---------------------------------------------------------------------------------------------------------------------
# Generation: cached == uncached, in every decoding mode
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_cached_greedy_generate_equals_step_by_step_full_forwards(name):
    model = make(name)
    ids = prompt()
    out = model.generate(ids, do_sample=False, output_logits=True, return_dict_in_generate=True, **GENERATE)
    expected, expected_logits = greedy_by_full_forwards(model, ids, GENERATE["max_new_tokens"])
    assert torch.equal(out.sequences, expected)
    torch.testing.assert_close(torch.stack(out.logits, dim=1), expected_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize(
    "mode",
    [dict(do_sample=False), dict(do_sample=True, top_k=5), dict(num_beams=3, do_sample=False)],
    ids=["greedy", "sample", "beam"],
)
@torch.no_grad()
def test_generate_with_cache_equals_without(name, mode):
    model = make(name)
    ids = prompt()
    torch.manual_seed(3)
    cached = model.generate(ids, use_cache=True, **mode, **GENERATE)
    torch.manual_seed(3)
    uncached = model.generate(ids, use_cache=False, **mode, **GENERATE)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("name", MHC_CONFIGS)
@torch.no_grad()
def test_assisted_decoding_equals_greedy(name):
    model = make(name)
    assistant = make(name, num_hidden_layers=1)
    ids = prompt(batch=1)
    expected = model.generate(ids, do_sample=False, **GENERATE)
    assisted = model.generate(ids, do_sample=False, assistant_model=assistant, **GENERATE)
    assert torch.equal(assisted, expected)


@pytest.mark.parametrize("name", DECAY_CONFIGS)
def test_assisted_decoding_is_refused_by_the_recurrent_model(name):
    # A recurrent state cannot be rolled back to the last accepted draft token.
    model = make(name)
    with pytest.raises(ValueError, match="stateful"):
        model.generate(prompt(batch=1), assistant_model=make("decay-linear"), **GENERATE)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("continuation", ["full_sequence", "new_tokens_only"])
@torch.no_grad()
def test_generation_continues_from_a_returned_cache(name, continuation):
    model = make(name)
    ids = prompt()
    expected, _ = greedy_by_full_forwards(model, ids, 6)
    first = model.generate(
        ids, do_sample=False, return_dict_in_generate=True, max_new_tokens=3, pad_token_id=0
    )
    if continuation == "full_sequence":
        resumed = model.generate(
            first.sequences, cache=first.cache, do_sample=False, max_new_tokens=3, pad_token_id=0
        )
        assert torch.equal(resumed, expected)
    else:
        # Only the tokens the cache has not seen; the attention mask still covers the whole sequence.
        resumed = model.generate(
            first.sequences[:, -1:],
            attention_mask=torch.ones_like(first.sequences),
            cache=first.cache,
            do_sample=False,
            max_new_tokens=3,
            pad_token_id=0,
        )
        assert torch.equal(resumed, expected[:, -4:])


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_generate_from_inputs_embeds(name):
    model = make(name)
    ids = prompt()
    embeds = model.get_input_embeddings()(ids)
    from_embeds = model.generate(inputs_embeds=embeds, do_sample=False, **GENERATE)
    from_ids = model.generate(ids, do_sample=False, **GENERATE)
    assert torch.equal(from_embeds, from_ids[:, ids.shape[1] :])  # only the new tokens come back


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_left_padded_batch_generates_as_each_sample_alone(name):
    model = make(name)
    short, long = prompt(1, 4), prompt(1, 7)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1), long])
    mask = (batch != 0).long()
    together = model.generate(batch, attention_mask=mask, do_sample=False, **GENERATE)
    alone_short = model.generate(short, do_sample=False, **GENERATE)
    alone_long = model.generate(long, do_sample=False, **GENERATE)
    assert torch.equal(together[0, 3:], alone_short[0])
    assert torch.equal(together[1], alone_long[0])


# ---------------------------------------------------------------------------------------------------------------------
# Static cache and torch.compile
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MHC_CONFIGS)
@torch.no_grad()
def test_static_cache_generate_equals_dynamic(name):
    model = make(name)
    ids = prompt()
    dynamic = model.generate(ids, do_sample=False, **GENERATE)
    static = model.generate(ids, do_sample=False, cache_implementation="static", **GENERATE)
    assert torch.equal(static, dynamic)


@pytest.mark.parametrize("name", MHC_CONFIGS)
@torch.no_grad()
def test_compiled_fullgraph_decode_with_static_cache_matches_eager(name):
    """The forward used in generation traces as ONE graph (fullgraph) with a static cache, and computes the same."""
    model = make(name)
    ids = prompt(batch=1, length=5)
    torch._dynamo.reset()
    compiled = torch.compile(model.forward, fullgraph=True, backend="eager")

    def decode(forward) -> torch.Tensor:
        cache = StaticCache(config=model.config, max_cache_len=16)
        logits = forward(input_ids=ids, cache=cache, use_cache=True).logits[:, -1:]
        steps = [logits]
        for position in range(ids.shape[1], ids.shape[1] + 4):
            token = steps[-1].argmax(-1)
            positions = torch.tensor([[position]])
            steps.append(forward(input_ids=token, cache=cache, position_ids=positions, use_cache=True).logits)
        return torch.cat(steps, dim=1)

    torch.testing.assert_close(decode(compiled), decode(model.forward), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", DECAY_CONFIGS)
def test_decay_model_refuses_a_static_cache_clearly(name):
    model = make(name)
    with pytest.raises(ValueError, match="does not support a static cache"):
        model.generate(prompt(), cache_implementation="static", **GENERATE)


# ---------------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CONFIGS)
def test_output_attentions_and_hidden_states_shapes_and_gradients(name):
    model = make(name)
    model.set_attn_implementation("eager")  # only eager attention materialises the weights
    model.train()
    ids = prompt(batch=2, length=6)
    out = model(ids, labels=ids, output_attentions=True, output_hidden_states=True)
    config = model.config
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    assert all(h.shape == (2, 6, config.hidden_size) for h in out.hidden_states)
    softmax_layers = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    assert len(out.attentions) == softmax_layers.count("full_attention")
    assert all(a.shape == (2, config.num_attention_heads, 6, 6) for a in out.attentions)
    for tensor in (*out.hidden_states, *out.attentions):
        tensor.retain_grad()
    out.loss.backward()
    # As transformers' own check: the gradient reaches the first hidden state (the embeddings) and the attention
    # weights. (MHC's per-layer hidden states are readouts of the streams, off the loss path but the last.)
    assert out.hidden_states[0].grad is not None and out.hidden_states[0].grad.abs().sum() > 0
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in out.attentions)


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_return_dict_false_gives_the_same_values_as_a_tuple(name):
    model = make(name)
    ids = prompt()
    as_dict = model(ids, labels=ids, output_hidden_states=True)
    as_tuple = model(ids, labels=ids, output_hidden_states=True, return_dict=False)
    assert isinstance(as_tuple, tuple)
    loss, logits = as_tuple[:2]
    assert torch.equal(loss, as_dict.loss) and torch.equal(logits, as_dict.logits)
    assert len(as_tuple) == len(as_dict.to_tuple())
    base = model.model(ids, return_dict=False)
    assert isinstance(base, tuple) and torch.equal(base[0], model.model(ids).last_hidden_state)


# ---------------------------------------------------------------------------------------------------------------------
# Save / load, embeddings, plans, attention backends, training
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize(
    "save_kwargs",
    [dict(), dict(max_shard_size="20KB")],
    ids=["single", "sharded"],
)
@torch.no_grad()
def test_save_load_round_trip(name, save_kwargs, tmp_path):
    model = make(name)
    ids = prompt()
    model.save_pretrained(tmp_path, **save_kwargs)
    shards = list(tmp_path.glob("*.safetensors"))
    assert shards and (len(shards) > 1) == bool(save_kwargs)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    assert torch.equal(reloaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_load_in_bfloat16(name, tmp_path):
    model = make(name)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert reloaded.dtype == torch.bfloat16
    ids = prompt()
    logits = reloaded(ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    torch.testing.assert_close(logits.float(), model(ids).logits, atol=0.15, rtol=0.05)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("tied", [True, False])
def test_resize_token_embeddings_keeps_tying(name, tied):
    model = make(name, tie_word_embeddings=tied)
    model.resize_token_embeddings(VOCAB + 13)
    assert model.config.vocab_size == VOCAB + 13
    assert model.get_input_embeddings().weight.shape[0] == VOCAB + 13
    assert model.get_output_embeddings().weight.shape[0] == VOCAB + 13
    same = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert same == tied
    ids = torch.tensor([[VOCAB + 12, 5, 6]])
    assert model(ids).logits.shape == (1, 3, VOCAB + 13)


def _matches_a_module(model: torch.nn.Module, pattern: str) -> bool:
    regex = re.compile("^" + re.escape(pattern).replace(r"\*", r"\d+") + "$")
    return any(regex.match(module_name) for module_name, _ in model.named_modules())


@pytest.mark.parametrize("name", CONFIGS)
def test_tensor_and_pipeline_parallel_plans_name_existing_modules(name):
    model = make(name)
    assert model._pp_plan["lm_head"] == (["hidden_states"], ["logits"])
    plans = {
        "tp_plan": (model, model.tp_plan or {}),
        "base_model_tp_plan": (model.model, model.config.base_model_tp_plan or {}),
        "base_model_pp_plan": (model.model, model.config.base_model_pp_plan or {}),
    }
    for plan_name, (root, plan) in plans.items():
        for pattern in plan:
            assert _matches_a_module(root, pattern), f"{plan_name} entry {pattern!r} names no module"
    # A tied head IS the embedding's weight: shard both or neither.
    assert ("lm_head" in model.tp_plan) == ("model.embed_tokens" in model.tp_plan)
    if name.startswith("mhc"):  # Llama's plan: sharded embedding, gathered head
        assert model.tp_plan["lm_head"] == "colwise_gather_output"


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_every_cpu_attention_backend_gives_the_same_logits(name):
    model = make(name)
    ids = prompt()
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    logits = {}
    for backend in ("eager", "sdpa"):
        model.set_attn_implementation(backend)
        assert model.config._attn_implementation == backend
        logits[backend] = model(ids, attention_mask=mask).logits
    # Padded positions attend to nothing, where backends legitimately differ: compare the real tokens.
    real = mask.bool()
    torch.testing.assert_close(logits["eager"][real], logits["sdpa"][real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
def test_gradient_checkpointing_gives_the_same_gradients(name):
    ids = prompt()
    grads = []
    for checkpointing in (False, True):
        model = make(name).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
def test_no_future_warning_from_forward_generate_or_train_step(name):
    model = make(name)
    ids = prompt()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        with torch.no_grad():
            model(ids, attention_mask=torch.ones_like(ids))
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, **GENERATE)
        model.train()
        model(ids, labels=ids).loss.backward()


@pytest.mark.parametrize(
    "name, old_name",
    [(name, "past_key_values") for name in CONFIGS] + [(name, "cache_params") for name in DECAY_CONFIGS],
)
@torch.no_grad()
def test_old_cache_names_are_deprecated_aliases_of_cache(name, old_name):
    # transformers' own models: `past_key_values`, and `cache_params` for recurrent ones (Mamba), until 5.40.
    model = make(name)
    ids = prompt()
    cache = DynamicCache(config=model.config)
    with pytest.warns(FutureWarning, match=old_name):
        old = model(ids, use_cache=True, **{old_name: cache})
    assert old.cache is cache
    torch.testing.assert_close(old.logits, model(ids).logits)


@pytest.mark.parametrize("rope_type", ["linear", "yarn"])
def test_rope_scaling_acts_on_the_hybrids_attention_or_is_refused(rope_type):
    scaling = {"rope_type": rope_type, "rope_theta": 10000.0, "factor": 4.0}
    ids = prompt(batch=1, length=40)
    plain, scaled = make("decay-hybrid-conv"), make("decay-hybrid-conv", rope_parameters=scaling)
    with torch.no_grad():
        assert not torch.allclose(plain(ids).logits, scaled(ids).logits, atol=1e-5)
    for name, extra in [("decay-linear", {}), ("decay-hybrid-conv", {"positional_encoding": "rope"})]:
        with pytest.raises(ValueError, match="rope_type"):
            make(name, rope_parameters=scaling, **extra)
