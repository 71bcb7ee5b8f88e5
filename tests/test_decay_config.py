"""DecayLinearAttnConfig: defaults, derived layer types, serialisation and clear errors for invalid combinations."""

from __future__ import annotations

import dataclasses

import pytest
from transformers import AutoConfig

from transformers_mhc import DecayLinearAttnConfig, MHCConfig
from transformers_mhc.models.configuration_decay_linear_attn import DECAY_TYPES

SMALL = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2)


def test_defaults_and_derived_fields():
    config = DecayLinearAttnConfig(**SMALL)
    assert config.model_type == "decay_linear_attn"
    assert config.decay_type == "simple" and config.decay_granularity == "scalar"
    assert config.simple_decay_init == 0.99 and not config.share_decay_with_key
    assert config.head_dim == 16 and config.num_key_value_heads == 2
    assert config.layer_types == ["linear_attention"] * 4
    assert config.hyper_connection == "none" and config.num_streams == 1
    assert config.key_dim == 16


def test_layer_types_follow_attention_layers():
    config = DecayLinearAttnConfig(**SMALL, attention_layers=[3, 1, 1])
    assert config.attention_layers == [1, 3]
    assert config.layer_types == ["linear_attention", "full_attention", "linear_attention", "full_attention"]


def test_rope_doubles_key_dim():
    assert DecayLinearAttnConfig(**SMALL, positional_encoding="rope").key_dim == 32


def test_round_trip_through_json_and_auto_config(tmp_path):
    config = DecayLinearAttnConfig(
        **SMALL,
        decay_type="mamba2",
        decay_granularity="vector",
        share_decay_with_key=True,
        short_conv_size=4,
        attention_layers=[2],
        positional_encoding="rope",
        use_delta_rule=True,
        hyper_connection="mhc",
        num_streams=4,
    )
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is DecayLinearAttnConfig
    for field in ("decay_type", "decay_granularity", "share_decay_with_key", "short_conv_size", "attention_layers",
                  "layer_types", "positional_encoding", "use_delta_rule", "hyper_connection", "num_streams"):  # fmt: skip
        assert getattr(loaded, field) == getattr(config, field), field


def test_hyper_connection_fields_mirror_mhc_config():
    """Same `hc_*` names and defaults as MHCConfig (only the residual type and stream count differ)."""
    mhc_fields = {f.name: f.default for f in dataclasses.fields(MHCConfig)}
    ours = {f.name: f.default for f in dataclasses.fields(DecayLinearAttnConfig)}
    hc_names = [name for name in mhc_fields if name.startswith("hc_") or name == "sinkhorn_iterations"]
    assert hc_names
    for name in hc_names:
        assert name in ours and ours[name] == mhc_fields[name], name
    assert ours["hyper_connection"] == "none" and ours["num_streams"] == 1


@pytest.mark.parametrize(
    "kwargs, fragments",
    [
        (dict(decay_type="mamba3"), ["decay_type", "mamba3", "simple"]),
        (dict(decay_granularity="matrix"), ["decay_granularity", "matrix", "vector"]),
        (dict(positional_encoding="alibi"), ["positional_encoding", "alibi", "tpe"]),
        (
            dict(decay_type="tnl", decay_granularity="vector"),
            ["decay_type='tnl'", "decay_granularity", "scalar"],
        ),
        (dict(decay_type="none", decay_granularity="vector"), ["decay_type='none'", "decay_granularity"]),
        (
            dict(decay_type="tnl_learnable", share_decay_with_key=True),
            ["share_decay_with_key", "tnl_learnable"],
        ),
        (
            dict(decay_type="gla", share_decay_with_key=True),
            ["share_decay_with_key", "decay_granularity", "vector"],
        ),
        (dict(decay_type="gla", hgrn2_lower_bound=True), ["hgrn2_lower_bound", "gla"]),
        (dict(simple_decay_init=1.0), ["simple_decay_init", "1.0", "(0, 1)"]),
        (dict(simple_decay_init=0.0), ["simple_decay_init"]),
        (dict(attention_layers=[4]), ["attention_layers", "[4]", "[0, 3]"]),
        (dict(attention_layers=[0, 1, 2, 3]), ["attention_layers", "at least one layer"]),
        (dict(layer_types=["full_attention"] * 4), ["layer_types", "attention_layers"]),
        (dict(short_conv_size=-1), ["short_conv_size", "-1"]),
        (dict(short_conv_size=1), ["short_conv_size=1"]),
        (dict(chunk_size=0), ["chunk_size", "0"]),
        (dict(gla_gate_normalizer=0.0), ["gla_gate_normalizer"]),
        (dict(mamba2_a_init_min=0.0), ["mamba2_a_init_min"]),
        (dict(mamba2_dt_min=0.5, mamba2_dt_max=0.1), ["mamba2_dt_min"]),
        (dict(hyper_connection="residual"), ["hyper_connection", "residual"]),
        (dict(num_streams=4), ["num_streams", "hyper_connection='none'"]),
        (dict(positional_encoding="tpe", hidden_size=33, head_dim=16), ["tpe", "hidden_size", "(33)"]),
    ],
)
def test_invalid_values_raise_value_error_naming_field(kwargs, fragments):
    with pytest.raises(ValueError) as error:
        DecayLinearAttnConfig(**{**SMALL, **kwargs})
    for fragment in fragments:
        assert fragment in str(error.value), (fragment, str(error.value))


def test_every_documented_decay_type_builds_in_each_valid_combination():
    built = 0
    for decay_type in DECAY_TYPES:
        for granularity in ("scalar", "vector"):
            for shared in (False, True):
                try:
                    DecayLinearAttnConfig(
                        **SMALL,
                        decay_type=decay_type,
                        decay_granularity=granularity,
                        share_decay_with_key=shared,
                    )
                    built += 1
                except ValueError:
                    continue
    # 8 input-dependent types x (scalar, vector, vector+shared) + tnl, tnl_learnable, none (scalar only)
    assert built == 8 * 3 + 3


@pytest.mark.parametrize(
    ("num_layers", "expected"),
    [(2, [1]), (3, [1, 2]), (4, [1, 3]), (12, [1, 7]), (24, [1, 13])],
)
def test_attention_layers_h3_places_softmax_attention_as_h3(num_layers, expected, tmp_path):
    """H3 §3: softmax attention in the 2nd layer and in layer 2 + N/2 (1-based); stored resolved, so it reloads."""
    config = DecayLinearAttnConfig(
        num_hidden_layers=num_layers, attention_layers="h3", hidden_size=32, num_attention_heads=2
    )
    assert config.attention_layers == expected
    assert [i for i, t in enumerate(config.layer_types) if t == "full_attention"] == expected
    config.save_pretrained(tmp_path)
    assert DecayLinearAttnConfig.from_pretrained(tmp_path).attention_layers == expected


def test_attention_layers_rejects_other_names_and_too_few_layers():
    with pytest.raises(ValueError, match="'h3'"):
        DecayLinearAttnConfig(attention_layers="h4")
    with pytest.raises(ValueError, match="num_hidden_layers"):
        DecayLinearAttnConfig(num_hidden_layers=1, attention_layers="h3")
