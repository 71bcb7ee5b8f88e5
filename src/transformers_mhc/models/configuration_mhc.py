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
"""MHC model configuration: a Llama configuration plus the hyper-connection fields.

Both configurations of the package (this one and `configuration_decay_linear_attn.py`) are strict dataclasses
(`huggingface_hub.dataclasses.strict`, as transformers' own configs): every field is type-checked and range-checked
when it is set, the cross-field rules run as `validate_*` class validators after `__init__`, and the same checks run
when a `config.json` is loaded. The helpers below are shared by the two files, which travel together as remote code.
"""

import math
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any, Union, get_args, get_origin

from huggingface_hub.dataclasses import strict, validated_field
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
from transformers import LlamaConfig
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, RopeParameters

HYPER_CONNECTION_TYPES = ("mhc", "hc", "none")
HC_READOUTS = ("mean", "sum", "learned")
HC_CONVENTIONS = ("paper", "deepseek_v4")
KERNEL_BACKENDS = ("auto", "torch", "triton")

# Upper bounds far beyond any model trained so far, but low enough that a typo (`2**31` layers, `10**9` Sinkhorn
# iterations) fails at once instead of hanging a build, a forward or allocating without bound.
MAX_VOCAB_SIZE = 1 << 24
MAX_HIDDEN_SIZE = 1 << 16
MAX_INTERMEDIATE_SIZE = 1 << 20
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_HEAD_DIM = 4096
MAX_POSITIONS = 1 << 24
MAX_STREAMS = 64
MAX_SINKHORN_ITERATIONS = 1000
# Logits and gains beyond these saturate sigmoid/softmax anyway; larger ones can only overflow in low precision.
MAX_LOGIT = 100.0
MAX_GATE = 10.0


# --------------------------------------------------------------------------------------------------
# Field validators (each receives a value that already has the annotated type)
# --------------------------------------------------------------------------------------------------
def integer_in(minimum: int, maximum: int) -> Callable[[Any], None]:
    """Validator: an integer in `[minimum, maximum]` (`None` passes; the annotation decides if it is allowed)."""

    def check(value: Any) -> None:
        if value is None:
            return
        if value < minimum:
            raise ValueError(f"must be an integer >= {minimum}, got {value!r}.")
        if value > maximum:
            raise ValueError(
                f"must be an integer <= {maximum} (a bound that keeps a typo from hanging or exhausting memory), "
                f"got {value!r}."
            )

    return check


def number_in(
    minimum: float, maximum: float, exclude_minimum: bool = False, exclude_maximum: bool = False
) -> Callable[[Any], None]:
    """Validator: a finite number in the interval (closed unless excluded); `None` passes."""
    interval = f"{'(' if exclude_minimum else '['}{minimum:g}, {maximum:g}{')' if exclude_maximum else ']'}"

    def check(value: Any) -> None:
        if value is None:
            return
        inside = (
            math.isfinite(value)
            and (value > minimum if exclude_minimum else value >= minimum)
            and (value < maximum if exclude_maximum else value <= maximum)
        )
        if not inside:
            raise ValueError(f"must be a finite number in {interval}, got {value!r}.")

    return check


def one_of(allowed: tuple[str, ...]) -> Callable[[Any], None]:
    """Validator: one of the `allowed` strings."""

    def check(value: Any) -> None:
        if value not in allowed:
            raise ValueError(f"must be one of {list(allowed)}, got {value!r}.")

    return check


def activation(value: Any) -> None:
    """Validator: the name of an activation in transformers' `ACT2FN`."""
    if value not in ACT2FN:
        raise ValueError(f"must be an activation of transformers' ACT2FN ({sorted(ACT2FN)}), got {value!r}.")


def _describe_type(annotation: Any) -> str:
    """`int | None` -> "an integer or None", for error messages."""
    if get_origin(annotation) in (Union, type(int | None)):
        return " or ".join(_describe_type(arg) for arg in get_args(annotation))
    names = {int: "an integer", float: "a number", bool: "a bool (true/false)", str: "a string"}
    if annotation is type(None):
        return "None"
    if get_origin(annotation) is list:
        return f"a list of {_describe_type(get_args(annotation)[0]).removeprefix('a ').removeprefix('an ')}s"
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _is_float_field(annotation: Any) -> bool:
    return annotation is float or (
        get_origin(annotation) in (Union, type(int | None)) and float in get_args(annotation)
    )


def strict_config(cls: type) -> type:
    """`@strict` for a `PreTrainedConfig`, raising the plain `ValueError` / `TypeError` of the failing check.

    The message names the field, the value and what is allowed. An integer given for a float field is stored as the
    equal float (`hc_res_logit_gap=1` is `1.0`); a bool is never taken for a number.
    """
    cls = strict(cls)
    strict_init, strict_setattr = cls.__init__, cls.__setattr__

    def __setattr__(self, name: str, value: Any) -> None:
        field = type(self).__dataclass_fields__.get(name)
        if field is not None and type(value) is int and _is_float_field(field.type):
            value = float(value)
        try:
            strict_setattr(self, name, value)
        except StrictDataclassFieldValidationError as error:
            cause = error.__cause__
            if isinstance(cause, TypeError):
                message = (
                    f"`{name}` must be {_describe_type(field.type)}, got {value!r} ({type(value).__name__})."
                )
                raise TypeError(message) from None
            raise ValueError(f"`{name}` {cause}") from None

    @wraps(strict_init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            strict_init(self, *args, **kwargs)
        except StrictDataclassClassValidationError as error:
            raise error.__cause__ from None

    cls.__setattr__ = __setattr__
    cls.__init__ = __init__
    return cls


def check_model_type(config_class: type, config_dict: dict[str, Any]) -> None:
    """Refuses a `config.json` written for another architecture (hand-edited `model_type`, wrong class)."""
    found = config_dict.get("model_type")
    if found is not None and found != config_class.model_type:
        architectures = config_dict.get("architectures") or []
        saved_by = f" (saved by {', '.join(map(str, architectures))})" if architectures else ""
        raise ValueError(
            f"This config.json has `model_type`={found!r}{saved_by}, but {config_class.__name__} reads "
            f"`model_type`={config_class.model_type!r}: load it with `AutoModelForCausalLM.from_pretrained` (which "
            f"picks the class of {found!r}) or with that class, or fix `model_type` in config.json if it was edited."
        )


def validate_hyper_connection_fields(config) -> None:
    """Checks the rules between the `hc_*` fields shared by every config that can run hyper-connections.

    Raises `ValueError` naming the fields, the values and what is allowed. (Each field's own type and range are
    checked when it is set, see `HyperConnectionConfigMixin`.)
    """

    def choice(field: str, allowed: tuple[str, ...]) -> None:
        value = getattr(config, field)
        if value not in allowed:
            raise ValueError(f"`{field}` must be one of {list(allowed)}, got {value!r}.")

    choice("hyper_connection", HYPER_CONNECTION_TYPES)
    choice("hc_readout", HC_READOUTS)
    choice("hc_convention", HC_CONVENTIONS)
    num_streams = config.num_streams
    if (
        isinstance(num_streams, bool)
        or not isinstance(num_streams, int)
        or not 1 <= num_streams <= MAX_STREAMS
    ):
        raise ValueError(f"`num_streams` must be an integer in [1, {MAX_STREAMS}], got {num_streams!r}.")
    if config.hyper_connection == "none" and config.num_streams != 1:
        raise ValueError(
            f"`hyper_connection='none'` is a plain residual with a single stream, so `num_streams` must be 1 "
            f"(got {config.num_streams}); use `hyper_connection='mhc'` or `'hc'` for several streams."
        )
    if config.hc_convention == "deepseek_v4" and config.hyper_connection != "mhc":
        raise ValueError(
            f"`hc_convention='deepseek_v4'` describes a manifold-constrained variant and needs "
            f"`hyper_connection='mhc'`, got {config.hyper_connection!r}."
        )
    if config.hc_convention == "deepseek_v4" and not config.hc_dynamic:
        raise ValueError("`hc_convention='deepseek_v4'` is always dynamic: set `hc_dynamic=True`.")
    if config.hc_symmetry_breaking >= 1:
        raise ValueError(
            f"`hc_symmetry_breaking` spreads `h_post` over (1 - s, 1 + s) and must be < 1 so that every "
            f"`h_post` stays in (0, 2), got {config.hc_symmetry_breaking!r}."
        )


def validate_attention_heads(config) -> None:
    """The Llama attention rules transformers' `LlamaConfig` leaves to the forward (where they fail as size errors)."""
    if config.num_attention_heads % config.num_key_value_heads != 0:
        raise ValueError(
            f"`num_attention_heads` ({config.num_attention_heads}) must be a multiple of `num_key_value_heads` "
            f"({config.num_key_value_heads}): each key/value head serves a whole group of query heads."
        )
    if config.head_dim % 2 != 0:
        raise ValueError(
            f"`head_dim` ({config.head_dim}) must be even: rotary embeddings rotate pairs of channels."
        )


def validate_rope_and_padding(config) -> None:
    """What transformers only warns about but the model cannot build or run with: an unknown `rope_type`, a
    non-finite or non-positive `rope_theta` / scaling `factor`, a `pad_token_id` outside the embedding."""
    parameters = config.rope_parameters or {}
    nested = all(isinstance(value, dict) or value is None for value in parameters.values()) and parameters
    for per_layer in parameters.values() if nested else [parameters]:
        if not per_layer:
            continue
        rope_type = per_layer.get("rope_type", per_layer.get("type", "default"))
        if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(
                f"`rope_parameters` has rope_type={rope_type!r}; allowed: {['default', *ROPE_INIT_FUNCTIONS]}."
            )
        for key in ("rope_theta", "factor"):
            value = per_layer.get(key)
            if value is None:
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ValueError(f"`rope_parameters` has {key}={value!r}; it must be a finite number > 0.")
    pad = config.pad_token_id
    if pad is not None and not -config.vocab_size <= pad < config.vocab_size:
        raise ValueError(
            f"`pad_token_id` ({pad}) must be None or an index of the embedding, in [-{config.vocab_size}, "
            f"{config.vocab_size}) (`vocab_size={config.vocab_size}`)."
        )


# The docs of the hyper-connection fields; `document_hyper_connection_fields` fills in each config's defaults.
HYPER_CONNECTION_ARGS_DOC = """\
num_streams (`int`, *optional*, defaults to {num_streams}):
    Expansion rate `n`: how many residual streams each token carries.
hyper_connection (`str`, *optional*, defaults to {hyper_connection}):
    `"mhc"`: manifold-constrained hyper-connections (`h_res` projected onto doubly stochastic matrices by
    Sinkhorn-Knopp). `"hc"`: the unconstrained dynamic hyper-connections of Zhu et al. `"none"`: a plain
    residual (requires `num_streams=1`); an [`MHCForCausalLM`] with Llama weights then reproduces
    `LlamaForCausalLM`.
sinkhorn_iterations (`int`, *optional*, defaults to 20):
    Sinkhorn-Knopp iterations (one column then one row normalisation each; ending on rows makes row sums
    exact).
hc_gate_init (`float`, *optional*, defaults to 0.01):
    Initial value of the gates `alpha_pre`, `alpha_post`, `alpha_res` scaling the input-dependent terms
    (`s_alpha`, `s_beta` of HC).
hc_dynamic (`bool`, *optional*, defaults to `True`):
    Whether the coefficients depend on the input (`phi` projections); `False` keeps only the static biases.
hc_readout (`str`, *optional*, defaults to `"mean"`):
    How the streams collapse before the final norm: `"mean"`, `"sum"` (HC's choice; equal to the mean up to the
    scale-invariant final RMSNorm) or `"learned"` (input-dependent sigmoid weights).
hc_convention (`str`, *optional*, defaults to `"paper"`):
    `"paper"`: the mHC paper's formulation. `"deepseek_v4"`: the one of transformers'
    `DeepseekV4HyperConnection` (softmax + eps start, eps in the Sinkhorn normalisations, `In @ Comb`,
    `sigmoid + eps` pre weights and the learned sigmoid readout when `hc_readout="learned"`).
hc_res_logit_gap (`float`, *optional*, defaults to 4.0):
    Initial static logits of `h_res`: this value on the diagonal, 0 elsewhere, so `h_res` starts near the
    identity (off-diagonal weight about `exp(-gap)`). Large gaps approach the identity but saturate the
    Sinkhorn gradient, so `h_res` learns slowly. Unused by `"hc"`, whose `h_res` starts at exactly `I`.
hc_pre_bias_init (`float`, *optional*):
    Initial static logit of `h_pre`. Defaults to `logit(1/n)` so each stream is read with weight `1/n` (the
    mean of the streams). In `"hc"` mode the default is the HC paper's one-hot `e_{{k mod n}}`.
hc_post_bias_init (`float`, *optional*, defaults to 0.0):
    Initial static logit of `h_post`; 0 gives `h_post = 2 * sigmoid(0) = 1`.
hc_symmetry_breaking (`float`, *optional*, defaults to 0.0):
    Spreads the initial `h_post` linearly over `[1 - s, 1 + s]` across streams. The spread has zero mean, so
    with a mean readout the model at initialisation is unchanged, but streams copied from one embedding stop
    being identical (identical streams otherwise stay identical and `h_res` cannot learn to mix them).
hc_eps (`float`, *optional*, defaults to 1e-6):
    The `eps` of the `"deepseek_v4"` convention (added to the softmax, the Sinkhorn denominators and `h_pre`).
hc_recompute (`bool`, *optional*, defaults to `False`):
    Selective recomputation during training (torch's selective activation checkpointing): keep only the stream
    input of every `hc_recompute_interval`-th layer and the outputs of the matrix products and attention, and
    recompute everything between them (the hyper-connection arithmetic, norms, activations) in backward.
hc_recompute_interval (`int`, *optional*):
    Layers per recomputation segment `L_r`; defaults to `round(sqrt(n * L / (n + 2)))`.
"""
HYPER_CONNECTION_ARGS_MARKER = "{hyper_connection_args}"


def document_hyper_connection_fields(cls: type) -> type:
    """Puts `HYPER_CONNECTION_ARGS_DOC`, with the defaults of `cls`, in place of the line `{hyper_connection_args}`
    of the docstring of `cls`, so that `help(cls)` documents these fields too."""
    defaults = {}
    for name in ("num_streams", "hyper_connection"):
        value = cls.__dataclass_fields__[name].default
        defaults[name] = f'`"{value}"`' if isinstance(value, str) else repr(value)
    lines = cls.__doc__.splitlines(keepends=True)
    marker_lines = [i for i, line in enumerate(lines) if line.strip() == HYPER_CONNECTION_ARGS_MARKER]
    if len(marker_lines) != 1:
        raise ValueError(f"The docstring of {cls.__name__} needs one line {HYPER_CONNECTION_ARGS_MARKER}.")
    i = marker_lines[0]
    indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
    lines[i] = textwrap.indent(HYPER_CONNECTION_ARGS_DOC.format(**defaults), indent)
    cls.__doc__ = "".join(lines)
    return cls


@document_hyper_connection_fields
@dataclass(kw_only=True, init=False, repr=False, eq=False)
class HyperConnectionConfigMixin:
    r"""
    The hyper-connection fields of a configuration, their checks and `recompute_interval`: the residual stream is
    widened to `num_streams` streams joined by (manifold-constrained) hyper-connections around every token mixer
    (attention) and MLP sub-layer.

    Goes first in the bases of a `PreTrainedConfig` decorated with `@strict_config` (whose dataclass puts these fields
    after those of the other bases), e.g. `MHCConfig(HyperConnectionConfigMixin, LlamaConfig)`; the config also needs
    `num_hidden_layers`. A config with other defaults declares the field again, with the same validator.

    Args:
        {hyper_connection_args}
    """

    num_streams: int = validated_field(integer_in(1, MAX_STREAMS), default=4)
    hyper_connection: str = validated_field(one_of(HYPER_CONNECTION_TYPES), default="mhc")
    sinkhorn_iterations: int = validated_field(integer_in(1, MAX_SINKHORN_ITERATIONS), default=20)
    hc_gate_init: float = validated_field(number_in(0.0, MAX_GATE), default=0.01)
    hc_dynamic: bool = True
    hc_readout: str = validated_field(one_of(HC_READOUTS), default="mean")
    hc_convention: str = validated_field(one_of(HC_CONVENTIONS), default="paper")
    hc_res_logit_gap: float = validated_field(number_in(0.0, MAX_LOGIT), default=4.0)
    hc_pre_bias_init: float | None = validated_field(number_in(-MAX_LOGIT, MAX_LOGIT), default=None)
    hc_post_bias_init: float = validated_field(number_in(-MAX_LOGIT, MAX_LOGIT), default=0.0)
    hc_symmetry_breaking: float = validated_field(number_in(0.0, 1.0, exclude_maximum=True), default=0.0)
    hc_eps: float = validated_field(number_in(0.0, 1.0), default=1e-6)
    hc_recompute: bool = False
    hc_recompute_interval: int | None = validated_field(integer_in(1, MAX_LAYERS), default=None)

    def validate_hyper_connections(self) -> None:
        """Part of `@strict` validation: the rules between the `hc_*` fields."""
        validate_hyper_connection_fields(self)

    @property
    def recompute_interval(self) -> int:
        """Layers per selective-recomputation segment (`L_r ≈ sqrt(n·L/(n+2))`, at least 1)."""
        if self.hc_recompute_interval is not None:
            return self.hc_recompute_interval
        n, num_layers = self.num_streams, self.num_hidden_layers
        return max(1, round(math.sqrt(n * num_layers / (n + 2))))


@strict_config
@document_hyper_connection_fields
class MHCConfig(HyperConnectionConfigMixin, LlamaConfig):
    r"""
    Configuration of an [`MHCModel`]: a Llama decoder whose residual stream is widened to `num_streams` streams
    joined by (manifold-constrained) hyper-connections around every attention and MLP sub-layer.

    Every [`~transformers.LlamaConfig`] field is accepted with the same meaning; the fields below are added. Every
    field, the Llama ones included, is type- and range-checked when it is set (a `TypeError` / `ValueError` naming the
    field, the value and what is allowed; an int is accepted for a float, a bool never for a number), with upper
    bounds that keep a typo from hanging or exhausting memory (at most 1024 layers, 64 streams, 1000 Sinkhorn
    iterations, ...). The same checks run when a `config.json` is loaded, whose `model_type` must be `"mhc"`.

    Args:
        {hyper_connection_args}
        kernel_backend (`str`, *optional*, defaults to `"auto"`):
            Which implementation runs the hyper-connection ops: `"auto"` the Triton kernels wherever they support
            the inputs (CUDA tensors in fp32/bf16/fp16, not under `torch.compile`) and the pure-PyTorch path
            elsewhere; `"torch"` always the pure-PyTorch path; `"triton"` always the kernels (also on CPU tensors
            under `TRITON_INTERPRET=1`, for tests), with an error saying why when they cannot run.

    Example:

    ```python
    >>> from transformers_mhc import MHCConfig, MHCForCausalLM

    >>> config = MHCConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4)
    >>> model = MHCForCausalLM(config)
    ```"""

    model_type = "mhc"

    # Llama's fields with their Llama defaults, declared again only to add bounds.
    vocab_size: int = validated_field(integer_in(1, MAX_VOCAB_SIZE), default=32000)
    hidden_size: int = validated_field(integer_in(1, MAX_HIDDEN_SIZE), default=4096)
    intermediate_size: int = validated_field(integer_in(1, MAX_INTERMEDIATE_SIZE), default=11008)
    num_hidden_layers: int = validated_field(integer_in(1, MAX_LAYERS), default=32)
    num_attention_heads: int = validated_field(integer_in(1, MAX_HEADS), default=32)
    num_key_value_heads: int | None = validated_field(integer_in(1, MAX_HEADS), default=None)
    head_dim: int | None = validated_field(integer_in(1, MAX_HEAD_DIM), default=None)
    hidden_act: str = validated_field(activation, default="silu")
    max_position_embeddings: int = validated_field(integer_in(1, MAX_POSITIONS), default=2048)
    initializer_range: float = validated_field(number_in(0.0, 1.0), default=0.02)
    rms_norm_eps: float = validated_field(number_in(0.0, 1.0, exclude_minimum=True), default=1e-6)
    pretraining_tp: int | None = validated_field(integer_in(1, MAX_HEADS), default=1)
    rope_parameters: RopeParameters | dict | None = None
    attention_dropout: int | float | None = validated_field(number_in(0.0, 1.0), default=0.0)

    kernel_backend: str = validated_field(one_of(KERNEL_BACKENDS), default="auto")

    def __post_init__(self, **kwargs):
        # Checked before Llama derives `head_dim = hidden_size // num_attention_heads`, which could be 0.
        if self.head_dim is None and self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be a multiple of `num_attention_heads` "
                f"({self.num_attention_heads}), as in `LlamaConfig`."
            )
        super().__post_init__(**kwargs)

    def validate_architecture(self) -> None:
        """Part of `@strict` validation: Llama's head rules, with the field names."""
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be a multiple of `num_attention_heads` "
                f"({self.num_attention_heads}), as in `LlamaConfig`."
            )
        validate_attention_heads(self)
        validate_rope_and_padding(self)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> "MHCConfig":
        check_model_type(cls, config_dict)
        return super().from_dict(config_dict, **kwargs)


__all__ = ["HyperConnectionConfigMixin", "MHCConfig", "strict_config", "validate_hyper_connection_fields"]
