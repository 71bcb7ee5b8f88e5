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
"""Configuration of linear attention with a configurable decay (the design space of Qin et al., 2025)."""

from typing import Any

from huggingface_hub.dataclasses import validated_field
from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

from .configuration_mhc import (
    HYPER_CONNECTION_TYPES,
    KERNEL_BACKENDS,
    MAX_HEAD_DIM,
    MAX_HEADS,
    MAX_HIDDEN_SIZE,
    MAX_INTERMEDIATE_SIZE,
    MAX_LAYERS,
    MAX_POSITIONS,
    MAX_STREAMS,
    MAX_VOCAB_SIZE,
    HyperConnectionConfigMixin,
    activation,
    check_model_type,
    document_hyper_connection_fields,
    integer_in,
    number_in,
    one_of,
    strict_config,
    validate_attention_heads,
    validate_rope_and_padding,
)

DECAY_TYPES = (
    "mamba2",
    "mamba2_no_a",
    "mamba2_no_dt",
    "mamba2_no_a_no_dt",
    "gla",
    "hgrn2",
    "lightnet",
    "tnl",
    "tnl_learnable",
    "simple",
    "none",
)
# Decays without an input-dependent projection `f`: one value per head, so no vector granularity and no sharing.
SCALAR_ONLY_DECAY_TYPES = ("tnl", "tnl_learnable", "none")
DECAY_GRANULARITIES = ("scalar", "vector")
POSITIONAL_ENCODINGS = ("none", "rope", "tpe")
TOKEN_MIXERS = ("decay", "h3", "s4d")
MAX_H3_STATE_SIZE = 1024
# H3 uses 4 taps; a kernel this long is already far beyond any shift SSM and costs O(size) per token.
MAX_SHORT_CONV_SIZE = 64
# The chunked form materialises chunk x chunk scores per head.
MAX_CHUNK_SIZE = 2048
# Mamba2's A and dt: beyond these the decay is 0 within one token in any precision.
MAX_MAMBA2_VALUE = 1000.0


def h3_attention_layers(num_hidden_layers: int) -> list[int]:
    """H3's hybrid placement (§3 of the paper: softmax attention in the 2nd layer and in layer 2 + N/2, 1-based) as
    0-based indices for `num_hidden_layers` = N; with N = 2 only the 2nd layer (the other would not exist)."""
    if num_hidden_layers < 2:
        raise ValueError(
            f"`attention_layers='h3'` puts softmax attention in the 2nd layer and keeps the 1st linear: it needs "
            f"`num_hidden_layers` >= 2, got {num_hidden_layers}."
        )
    return sorted({1, 1 + num_hidden_layers // 2} & set(range(num_hidden_layers)))


@strict_config
@document_hyper_connection_fields
class DecayLinearAttnConfig(HyperConnectionConfigMixin, PreTrainedConfig):
    r"""
    Configuration of a [`DecayLinearAttnModel`]: a decoder whose token mixer is linear attention with a decay
    `S_t = diag(lambda_t) S_{t-1} + k_t v_t^T`, configurable along the four axes of "Elucidating the Design Space of
    Decay in Linear Attention" (Qin et al., 2025): parameterisation, sharing with the key, granularity and positional
    encoding; plus H3's short convolution, softmax-attention layers for a hybrid, the delta rule (DPLR) and
    (manifold-constrained) hyper-connections around every sub-layer.

    The Llama-style fields (`vocab_size`, `hidden_size`, `intermediate_size`, `num_hidden_layers`,
    `num_attention_heads`, `num_key_value_heads`, `head_dim`, `hidden_act`, `max_position_embeddings`,
    `initializer_range`, `rms_norm_eps`, `use_cache`, `tie_word_embeddings`, `rope_parameters`, `attention_bias`,
    `attention_dropout`, `mlp_bias`) mean what they mean in [`~transformers.LlamaConfig`]; the softmax-attention layers
    of a hybrid are transformers' `LlamaAttention`. Linear-attention layers use `num_attention_heads` heads of
    `head_dim` channels for q, k and v.

    Every field is type- and range-checked as in [`MHCConfig`] (bounds shared with it, plus `short_conv_size <= 64`
    and `chunk_size <= 2048`), and a loaded `config.json` must have `model_type="decay_linear_attn"`.

    Args:
        decay_type (`str`, *optional*, defaults to `"simple"`):
            How `log lambda_t` is computed from `f = f_proj(x)` (all values are `<= 0`):
            `"mamba2"`: `-exp(A_log) * softplus(f + dt_bias)`; `"mamba2_no_a"` / `"mamba2_no_dt"` /
            `"mamba2_no_a_no_dt"`: the same without `A` and/or `dt_bias`; `"gla"`: `logsigmoid(f / gla_gate_normalizer)`;
            `"hgrn2"`: `logsigmoid(f)`, optionally with a lower bound rising with depth; `"lightnet"`:
            `z_{t-1} - z_t` with `z_t = logcumsumexp(f)_t`; `"tnl"`: fixed ALiBi-like slopes per head, decreasing with
            depth; `"tnl_learnable"`: the TNL values as learnable parameters; `"simple"` (Simple Decay, the paper's
            proposal): `logsigmoid(f + delta)` with `delta = logit(simple_decay_init)`; `"none"`: no decay (`lambda=1`).
        decay_granularity (`str`, *optional*, defaults to `"scalar"`):
            `"scalar"`: one decay per head (`f_proj = Linear(hidden, heads)`); `"vector"`: one decay per key channel
            (`f_proj` is the low-rank `Linear(hidden, decay_low_rank_dim) -> Linear(decay_low_rank_dim, heads * head_dim)`).
        share_decay_with_key (`bool`, *optional*, defaults to `False`):
            Derive the decay from the key projection instead of a separate `f_proj`: `k = 1 - lambda` (GLA, HGRN2,
            LightNet, Simple Decay) or `k = softplus(W_k x + dt_bias)`, `log lambda = -A k` (Mamba2 family). Needs
            vector granularity (the key has one value per channel).
        simple_decay_init (`float`, *optional*, defaults to 0.99):
            `p` in (0, 1): Simple Decay's `delta` starts at `logit(p)`, so the median decay at initialisation is `p`.
        decay_low_rank_dim (`int`, *optional*):
            Rank of the vector-decay projection; defaults to `head_dim`.
        gla_gate_normalizer (`float`, *optional*, defaults to 16.0):
            GLA's `log lambda = logsigmoid(f / gla_gate_normalizer)`, as in the decay paper's code. (fla's GLA layer uses
            `logsigmoid(f) / 16` instead, a different function; we follow the paper we reproduce.)
        hgrn2_lower_bound (`bool`, *optional*, defaults to `False`):
            HGRN2's learnable lower bound `lb_l` rising with depth: `lambda = lb_l + (1 - lb_l) sigmoid(f)`.
        mamba2_a_init_min (`float`, *optional*, defaults to 1.0), mamba2_a_init_max (`float`, *optional*, defaults to 16.0):
            `A ~ U(min, max)` at initialisation.
        mamba2_dt_min (`float`, *optional*, defaults to 0.001), mamba2_dt_max (`float`, *optional*, defaults to 0.1),
        mamba2_dt_init_floor (`float`, *optional*, defaults to 1e-4):
            `dt` is log-uniform in `[dt_min, dt_max]` (floored), and `dt_bias = inverse_softplus(dt)`.
        positional_encoding (`str`, *optional*, defaults to `"none"`):
            `"rope"`: the cosine variant of the paper's code, `q -> [q cos(t theta), q sin(t theta)]` (same for k), which
            doubles the key dimension and keeps `q_t . k_s` a function of `t - s`; the vector decay is repeated over the
            doubled channels. `"tpe"`: one extra linear-attention pass with data-independent q/k and a per-head decay
            over the embeddings before the first layer.
        short_conv_size (`int`, *optional*, defaults to 0):
            Kernel size of H3's shift SSM, implemented as a causal depthwise convolution on q, k and v (followed by the
            usual activations, and SiLU on v); 0 disables it. 4 is the usual choice. (H3's shift SSM is exactly this
            operator: its state is a shift register of the last `short_conv_size - 1` inputs, its output a learned
            combination of them, i.e. a causal convolution; H3 applies it to k only.)
        token_mixer (`str`, *optional*, defaults to `"decay"`):
            The mixer of the layers that are not softmax attention: `"decay"` (linear attention with the decay above),
            `"h3"` (H3: `Q ⊙ SSM_diag(SSM_shift(K) ⊙ V)`, with `short_conv_size` as the shift SSM — 0 drops it — and
            an S4D diagonal SSM) or `"s4d"` (the diagonal SSM alone, per channel: `o_proj(gelu(SSM_diag(W x)))`). The
            decay fields do not apply to `"h3"` and `"s4d"`.
        h3_state_size (`int`, *optional*, defaults to 64):
            `N` of H3's diagonal SSM: `N/2` complex modes per key channel.
        h3_dt_min (`float`, *optional*, defaults to 0.001), h3_dt_max (`float`, *optional*, defaults to 0.1):
            Range of the initial discretisation steps `Δ` of H3's diagonal SSM (log-uniform, one per key channel).
        attention_layers (`list[int]` or `"h3"`, *optional*):
            Indices (0-based) of layers that use softmax attention (`LlamaAttention`) instead of linear attention, for
            a hybrid. `"h3"` places them as H3 does: the 2nd layer and the one at 2 + N/2 (1-based, N layers), i.e.
            `[1, 1 + N // 2]`; the config stores the resolved list. At least one layer must stay linear.
        use_delta_rule (`bool`, *optional*, defaults to `False`):
            The DPLR extension `S_t = (I - beta_t k_t k_t^T) diag(lambda_t) S_{t-1} + k_t v_t^T` with L2-normalised k and
            `beta = 2 sigmoid(beta_proj(x))` in (0, 2).
        use_output_gate (`bool`, *optional*, defaults to `True`):
            Multiply the normalised mixer output by `sigmoid(output_gate(x))`, a low-rank gate of rank
            `output_gate_low_rank_dim` (defaults to `head_dim`).
        chunk_size (`int`, *optional*, defaults to 64):
            Chunk length of the chunked parallel form used for training and prefill.
        layer_types (`list[str]`, *optional*):
            Derived: `"full_attention"` at `attention_layers`, `"linear_attention"` elsewhere. `DynamicCache` reads it.
        {hyper_connection_args}
        kernel_backend (`str`, *optional*, defaults to `"auto"`):
            As in [`MHCConfig`], for the linear-attention ops too: `"auto"` runs the Triton kernels where they support
            the inputs (CUDA, fp32/bf16/fp16, key head dim <= 256 after RoPE, a power-of-two `chunk_size` >= 16, not
            compiling), `"torch"` the pure-PyTorch path, `"triton"` the kernels or an error. The delta rule has no
            kernel and always runs the pure-PyTorch path.

    Example:

    ```python
    >>> from transformers_mhc import DecayLinearAttnConfig, DecayLinearAttnForCausalLM

    >>> config = DecayLinearAttnConfig(
    ...     hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
    ...     decay_type="simple", decay_granularity="vector", short_conv_size=4, attention_layers="h3",
    ... )
    >>> model = DecayLinearAttnForCausalLM(config)
    ```"""

    model_type = "decay_linear_attn"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    @property
    def number_of_conv_states(self) -> int:
        """How many states `DynamicCache(config=...)` reserves per linear-attention layer (`cache_state_indices`)."""
        return len(cache_state_indices(self))

    vocab_size: int = validated_field(integer_in(1, MAX_VOCAB_SIZE), default=32000)
    hidden_size: int = validated_field(integer_in(1, MAX_HIDDEN_SIZE), default=768)
    intermediate_size: int = validated_field(integer_in(1, MAX_INTERMEDIATE_SIZE), default=2048)
    num_hidden_layers: int = validated_field(integer_in(1, MAX_LAYERS), default=12)
    num_attention_heads: int = validated_field(integer_in(1, MAX_HEADS), default=12)
    num_key_value_heads: int | None = validated_field(integer_in(1, MAX_HEADS), default=None)
    head_dim: int | None = validated_field(integer_in(1, MAX_HEAD_DIM), default=None)
    hidden_act: str = validated_field(activation, default="silu")
    max_position_embeddings: int = validated_field(integer_in(1, MAX_POSITIONS), default=2048)
    initializer_range: float = validated_field(number_in(0.0, 1.0), default=0.02)
    rms_norm_eps: float = validated_field(number_in(0.0, 1.0, exclude_minimum=True), default=1e-6)
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_dropout: int | float = validated_field(number_in(0.0, 1.0), default=0.0)
    mlp_bias: bool = False

    decay_type: str = validated_field(one_of(DECAY_TYPES), default="simple")
    decay_granularity: str = validated_field(one_of(DECAY_GRANULARITIES), default="scalar")
    share_decay_with_key: bool = False
    simple_decay_init: float = validated_field(
        number_in(0.0, 1.0, exclude_minimum=True, exclude_maximum=True), default=0.99
    )
    decay_low_rank_dim: int | None = validated_field(integer_in(1, MAX_HIDDEN_SIZE), default=None)
    gla_gate_normalizer: float = validated_field(number_in(0.0, 1e4, exclude_minimum=True), default=16.0)
    hgrn2_lower_bound: bool = False
    mamba2_a_init_min: float = validated_field(
        number_in(0.0, MAX_MAMBA2_VALUE, exclude_minimum=True), default=1.0
    )
    mamba2_a_init_max: float = validated_field(
        number_in(0.0, MAX_MAMBA2_VALUE, exclude_minimum=True), default=16.0
    )
    mamba2_dt_min: float = validated_field(
        number_in(0.0, MAX_MAMBA2_VALUE, exclude_minimum=True), default=0.001
    )
    mamba2_dt_max: float = validated_field(
        number_in(0.0, MAX_MAMBA2_VALUE, exclude_minimum=True), default=0.1
    )
    mamba2_dt_init_floor: float = validated_field(
        number_in(0.0, MAX_MAMBA2_VALUE, exclude_minimum=True), default=1e-4
    )
    positional_encoding: str = validated_field(one_of(POSITIONAL_ENCODINGS), default="none")
    short_conv_size: int = validated_field(integer_in(0, MAX_SHORT_CONV_SIZE), default=0)
    token_mixer: str = validated_field(one_of(TOKEN_MIXERS), default="decay")
    h3_state_size: int = validated_field(integer_in(2, MAX_H3_STATE_SIZE), default=64)
    h3_dt_min: float = validated_field(number_in(0.0, 1.0, exclude_minimum=True), default=1e-3)
    h3_dt_max: float = validated_field(number_in(0.0, 1.0, exclude_minimum=True), default=1e-1)
    attention_layers: list[int] | str | None = None
    use_delta_rule: bool = False
    use_output_gate: bool = True
    output_gate_low_rank_dim: int | None = validated_field(integer_in(1, MAX_HIDDEN_SIZE), default=None)
    chunk_size: int = validated_field(integer_in(1, MAX_CHUNK_SIZE), default=64)
    layer_types: list[str] | None = None

    # The hyper-connection fields of `HyperConnectionConfigMixin`, with a plain residual by default.
    num_streams: int = validated_field(integer_in(1, MAX_STREAMS), default=1)
    hyper_connection: str = validated_field(one_of(HYPER_CONNECTION_TYPES), default="none")
    kernel_backend: str = validated_field(one_of(KERNEL_BACKENDS), default="auto")

    def __post_init__(self, **kwargs):
        if self.head_dim is None and self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be a multiple of `num_attention_heads` "
                f"({self.num_attention_heads}) when `head_dim` is derived from them; or set `head_dim` explicitly."
            )
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.decay_low_rank_dim is None:
            self.decay_low_rank_dim = self.head_dim
        if self.output_gate_low_rank_dim is None:
            self.output_gate_low_rank_dim = self.head_dim
        if self.attention_layers == "h3":
            self.attention_layers = h3_attention_layers(self.num_hidden_layers)
        elif isinstance(self.attention_layers, str):
            raise ValueError(
                f"`attention_layers` must be a list of layer indices or 'h3' (H3's placement), "
                f"got {self.attention_layers!r}."
            )
        self.attention_layers = sorted(set(self.attention_layers or []))
        self._validate_decay_fields()
        derived = [
            "full_attention" if i in self.attention_layers else "linear_attention"
            for i in range(self.num_hidden_layers)
        ]
        if self.layer_types is not None and list(self.layer_types) != derived:
            raise ValueError(
                f"`layer_types` is derived from `attention_layers` ({self.attention_layers}) and "
                f"`num_hidden_layers` ({self.num_hidden_layers}) as {derived}, got {self.layer_types}; set "
                f"`attention_layers` instead."
            )
        self.layer_types = derived
        super().__post_init__(**kwargs)

    def validate_attention_layers(self) -> None:
        """Part of `@strict` validation: the softmax-attention layers of a hybrid are Llama's."""
        if self.attention_layers:
            validate_attention_heads(self)
        validate_rope_and_padding(self)

    def validate_rope_scaling(self) -> None:
        """Part of `@strict` validation: RoPE scaling acts on the Llama RoPE of a hybrid's softmax layers only, so it
        is refused where nothing would apply it (rather than silently not scaling)."""
        parameters = self.rope_parameters or {}
        rope_type = parameters.get("rope_type", parameters.get("type", "default"))
        if rope_type == "default":
            return
        if not self.attention_layers:
            raise ValueError(
                f"`rope_parameters` asks for rope_type={rope_type!r}, but this model has no softmax-attention layer "
                f"(`attention_layers={self.attention_layers}`), so nothing would be scaled; use rope_type 'default'."
            )
        if self.positional_encoding == "rope":
            raise ValueError(
                f"`rope_parameters` asks for rope_type={rope_type!r}, which would scale the softmax-attention layers "
                "but not the cosine RoPE of the linear-attention layers (`positional_encoding='rope'`); use rope_type "
                "'default', or `positional_encoding` 'none' / 'tpe'."
            )

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> "DecayLinearAttnConfig":
        check_model_type(cls, config_dict)
        return super().from_dict(config_dict, **kwargs)

    def _validate_decay_fields(self) -> None:
        """Raises `ValueError` naming the field, the value and what is allowed."""

        def choice(field: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(f"`{field}` must be one of {list(allowed)}, got {value!r}.")

        choice("decay_type", DECAY_TYPES)
        choice("decay_granularity", DECAY_GRANULARITIES)
        choice("positional_encoding", POSITIONAL_ENCODINGS)
        choice("token_mixer", TOKEN_MIXERS)
        if self.token_mixer in ("h3", "s4d"):
            unsupported = {
                "positional_encoding": (self.positional_encoding, "none"),
                "use_delta_rule": (self.use_delta_rule, False),
            }
            if self.token_mixer == "s4d":  # the diagonal SSM alone: no shift SSM either
                unsupported["short_conv_size"] = (self.short_conv_size, 0)
            for field, (value, needed) in unsupported.items():
                if value != needed:
                    raise ValueError(
                        f"`token_mixer={self.token_mixer!r}` has no {field.replace('_', ' ')}: `{field}` must be "
                        f"{needed!r}, "
                        f"got {value!r}."
                    )
            if self.h3_state_size % 2:
                raise ValueError(
                    f"`h3_state_size` counts the real and imaginary parts of H3's complex modes and must be even, "
                    f"got {self.h3_state_size}."
                )
            if not self.h3_dt_min <= self.h3_dt_max:
                raise ValueError(
                    f"`h3_dt_min` / `h3_dt_max` must satisfy min <= max, got {self.h3_dt_min!r} / {self.h3_dt_max!r}."
                )
        if self.short_conv_size == 1:
            raise ValueError(
                "`short_conv_size=1` is a per-channel scale, not a shift over previous tokens: use 0 (off) or >= 2."
            )

        vector_only = self.decay_granularity == "vector"
        if self.decay_type in SCALAR_ONLY_DECAY_TYPES and vector_only:
            raise ValueError(
                f"`decay_type={self.decay_type!r}` has one fixed or learned value per head, so "
                f"`decay_granularity` must be 'scalar', got {self.decay_granularity!r}."
            )
        if self.share_decay_with_key:
            if self.decay_type in SCALAR_ONLY_DECAY_TYPES:
                raise ValueError(
                    f"`share_decay_with_key=True` derives the decay from the key projection, but "
                    f"`decay_type={self.decay_type!r}` does not depend on the input; allowed decay types: "
                    f"{[t for t in DECAY_TYPES if t not in SCALAR_ONLY_DECAY_TYPES]}."
                )
            if not vector_only:
                raise ValueError(
                    "`share_decay_with_key=True` ties one decay to each key channel (`k = 1 - lambda`), so "
                    f"`decay_granularity` must be 'vector', got {self.decay_granularity!r}."
                )
        if self.hgrn2_lower_bound and self.decay_type != "hgrn2":
            raise ValueError(
                f"`hgrn2_lower_bound=True` is HGRN2's depth-dependent lower bound and needs `decay_type='hgrn2'`, "
                f"got {self.decay_type!r}."
            )
        if not self.mamba2_a_init_min <= self.mamba2_a_init_max:
            raise ValueError(
                f"`mamba2_a_init_min` / `mamba2_a_init_max` must satisfy min <= max, got "
                f"{self.mamba2_a_init_min!r} / {self.mamba2_a_init_max!r}."
            )
        if not self.mamba2_dt_min <= self.mamba2_dt_max:
            raise ValueError(
                f"`mamba2_dt_min` / `mamba2_dt_max` / `mamba2_dt_init_floor` must satisfy min <= max, got {self.mamba2_dt_min!r} / {self.mamba2_dt_max!r} / {self.mamba2_dt_init_floor!r}."
            )
        bad = [
            i for i in self.attention_layers if not isinstance(i, int) or not 0 <= i < self.num_hidden_layers
        ]
        if bad:
            raise ValueError(
                f"`attention_layers` must hold layer indices in [0, {self.num_hidden_layers - 1}] "
                f"(`num_hidden_layers={self.num_hidden_layers}`), got {bad}."
            )
        if len(self.attention_layers) == self.num_hidden_layers:
            raise ValueError(
                f"`attention_layers` lists every layer ({self.attention_layers}): at least one layer must be linear "
                f"attention (use `LlamaForCausalLM` for a pure softmax-attention model)."
            )
        if self.positional_encoding == "tpe" and self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"`positional_encoding='tpe'` splits the embeddings over heads: `hidden_size` ({self.hidden_size}) "
                f"must be a multiple of `num_attention_heads` ({self.num_attention_heads})."
            )
        if self.attention_layers and self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must be a multiple of `num_key_value_heads` "
                f"({self.num_key_value_heads}) for the softmax-attention layers."
            )

    @property
    def key_dim(self) -> int:
        """Key/query channels per head seen by the linear-attention op (doubled by the cosine RoPE)."""
        return 2 * self.head_dim if self.positional_encoding == "rope" else self.head_dim


def cache_state_indices(config: DecayLinearAttnConfig) -> dict[str, int]:
    """The states each linear-attention layer keeps in its `LinearAttentionLayer` cache slot, by `state_idx`.

    `"recurrent"` is always there: the recurrent state S (and, as the conv state of the same index, the short
    convolution's last inputs). LightNet adds its running log-normaliser, TPE its own recurrent state (used in the first
    linear-attention layer's slot only).
    """
    names = ["recurrent"]
    if config.decay_type == "lightnet":
        names.append("lightnet_normaliser")
    if config.positional_encoding == "tpe":
        names.append("tpe")
    return {name: index for index, name in enumerate(names)}


__all__ = [
    "DecayLinearAttnConfig",
    "cache_state_indices",
    "DECAY_TYPES",
    "DECAY_GRANULARITIES",
    "POSITIONAL_ENCODINGS",
    "TOKEN_MIXERS",
    "h3_attention_layers",
]
