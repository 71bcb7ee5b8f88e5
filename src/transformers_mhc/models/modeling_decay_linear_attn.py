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
"""PyTorch decay linear-attention model: decoder layers (linear attention, or softmax attention in a hybrid's
attention layers, each followed by a SwiGLU MLP) joined by plain residuals or hyper-connections, and the causal LM.

The token mixer and the decay parameterisations live in `decay_linear_attention.py` (with the defects of the paper's
code that we fixed, listed in its docstring).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, StaticCache
from transformers.masking_utils import create_causal_mask, create_recurrent_attention_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.output_capturing import capture_outputs

from .configuration_decay_linear_attn import DecayLinearAttnConfig, cache_state_indices
from .decay_linear_attention import (
    DecayLinearAttention,
    DecayLinearAttnCosineRope,
    DecayLinearAttnDecay,
    DecayLinearAttnLowerBounds,
    DecayLinearAttnTPE,
    read_state,
)
from .h3 import DiagonalSSM, H3Attention, S4DMixer
from .hub_mixin import HubMixin
from .hyper_connection import (
    HyperConnection,
    StreamReadout,
    expand_streams,
    hyper_connection,
    position_ids_skipping_padding,
    run_layers,
    selective_recompute_interval,
)


def tokens_seen(cache: Cache | None, config: DecayLinearAttnConfig) -> int:
    """How many positions (padding included) the cache holds, for a hybrid or an all-linear model.

    A hybrid answers from its softmax-attention layers. A linear-attention cache layer has no sequence axis, so an
    all-linear model counts the tokens itself, in `cache.decay_tokens_seen` (an int, set by `DecayLinearAttnModel`).
    """
    if cache is None:
        return 0
    if "full_attention" in config.layer_types:
        return cache.get_seq_length()
    first_linear = config.layer_types.index("linear_attention")
    if read_state(cache, first_linear, 0) is None:
        return 0
    return getattr(cache, "decay_tokens_seen", 0)


class DecayLinearAttnDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: token mixer (linear attention, or `LlamaAttention` in a hybrid's attention layers) and a
    SwiGLU MLP, joined to the residual stream by plain residuals or by (m)HC hyper-connections over `n` streams.
    """

    def __init__(self, config: DecayLinearAttnConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.layer_type = config.layer_types[layer_idx]
        if self.layer_type == "linear_attention":
            mixer = {"decay": DecayLinearAttention, "h3": H3Attention, "s4d": S4DMixer}[config.token_mixer]
            self.linear_attn = mixer(config, layer_idx)
        else:
            self.self_attn = LlamaAttention(config=config, layer_idx=layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # Token mixer and MLP are separate sub-layers, each with its own coefficients (as in `MHCDecoderLayer`).
        self.attn_hc = hyper_connection(config, sublayer_idx=2 * layer_idx)
        self.mlp_hc = hyper_connection(config, sublayer_idx=2 * layer_idx + 1)

    def _mix_tokens(
        self,
        hidden_states: torch.Tensor,
        attention_mask: dict[str, torch.Tensor | None],
        cache: Cache | None,
        rope_angles: tuple[torch.Tensor, torch.Tensor] | None,
        decay_lower_bounds: torch.Tensor | None,
        **attention_kwargs,
    ) -> torch.Tensor:
        if self.layer_type == "linear_attention":
            # HGRN2's lower bound is 0 in the first layer: no bound at all (and no log(0)).
            lower_bound = None
            if decay_lower_bounds is not None and self.layer_idx > 0:
                lower_bound = decay_lower_bounds[self.layer_idx]
            return self.linear_attn(
                hidden_states,
                padding_mask=attention_mask.get("linear_attention"),
                rope_angles=rope_angles,
                cache=cache,
                lower_bound=lower_bound,
            )
        attn_output, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask.get("full_attention"),
            cache=cache,
            **attention_kwargs,
        )
        return attn_output

    def forward(
        self,
        hidden_streams: torch.Tensor,
        attention_mask: dict[str, torch.Tensor | None] | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        rope_angles: tuple[torch.Tensor, torch.Tensor] | None = None,
        decay_lower_bounds: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """`hidden_streams`: `[batch, seq, num_streams, hidden]`; `attention_mask` maps a layer type to its mask."""
        # Token mixer
        mixer_input, mixer_read = self.attn_hc(hidden_streams, self.input_layernorm)
        mixer_output = self._mix_tokens(
            mixer_input,
            attention_mask or {},
            cache,
            rope_angles,
            decay_lower_bounds,
            position_ids=position_ids,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_streams = self.attn_hc.write(mixer_read, mixer_output)

        # MLP
        mlp_input, mlp_read = self.mlp_hc(hidden_streams, self.post_attention_layernorm)
        hidden_streams = self.mlp_hc.write(mlp_read, self.mlp(mlp_input))
        return hidden_streams


class DecayLinearAttnPreTrainedModel(HubMixin, PreTrainedModel):
    """Weight initialisation and the shared class attributes of the decay linear-attention models."""

    config_class = DecayLinearAttnConfig
    config: DecayLinearAttnConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecayLinearAttnDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # The recurrent state cannot be rolled back to an earlier token (no assisted generation).
    _is_stateful = True
    # Attention weights of a hybrid's softmax-attention layers, recorded by `capture_outputs` (linear attention has
    # no attention matrix to return).
    _can_record_outputs = {"attentions": LlamaAttention}

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(
            module, (DecayLinearAttnDecay, DecayLinearAttnTPE, DiagonalSSM, HyperConnection, StreamReadout)
        ):
            module.reset_parameters()
        elif isinstance(module, DecayLinearAttention) and module.short_conv_size:
            # PyTorch's default conv init: the std-0.02 normal of `_init_weights` would start a K-tap filter at ~0.
            init.kaiming_uniform_(module.short_conv.weight, a=math.sqrt(5))
        elif isinstance(module, DecayLinearAttnLowerBounds):
            init.zeros_(module.lower_bounds)
        elif isinstance(module, DecayLinearAttnCosineRope):
            init.copy_(module.inv_freq, module.compute_inv_freq())  # non-persistent: not in the checkpoint


class DecayLinearAttnModel(DecayLinearAttnPreTrainedModel):
    """The bare decoder: embeddings (+ TPE), `DecayLinearAttnDecoderLayer`s over `num_streams` streams, a stream
    readout and the final RMSNorm. Returns the normalised hidden states `[batch, seq, hidden]`.

    `output_hidden_states=True` returns the embeddings, then the readout of the streams after each layer (the last
    one replaced by the final normalised states), as `MHCModel` does.
    """

    def __init__(self, config: DecayLinearAttnConfig):
        super().__init__(config)
        # Again here: `rope_parameters` may have been assigned after the config was built (the config's own
        # validators run when it is built or loaded).
        config.validate_rope_scaling()
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.first_linear_layer = config.layer_types.index("linear_attention")

        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        if config.positional_encoding == "tpe":
            self.tpe = DecayLinearAttnTPE(config)
        if config.positional_encoding == "rope":
            self.cosine_rope = DecayLinearAttnCosineRope(config)
        if config.hgrn2_lower_bound:
            self.decay_lower_bounds = DecayLinearAttnLowerBounds(config)
        self.layers = nn.ModuleList(
            [DecayLinearAttnDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.stream_readout = StreamReadout(config)
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if "full_attention" in config.layer_types:
            self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False

        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @deprecate_kwarg("cache_params", "5.40.0", new_name="cache")  # the old name of recurrent models (Mamba)
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | dict | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `[batch, seq]`): token ids (or pass `inputs_embeds`).
            attention_mask (`torch.Tensor` of shape `[batch, past + seq]`, *optional*): 1 for tokens, 0 for
                (left) padding; or a dict of prepared masks keyed by layer type, as `generate` passes.
            position_ids (`torch.LongTensor` of shape `[batch, seq]`, *optional*): positions for RoPE; by default they
                skip left padding and continue from the cache.
            cache (`Cache`, *optional*): a `DynamicCache(config=...)` holding the recurrent states (and the keys/values
                of a hybrid's attention layers); `past_key_values` before transformers 5.24.
            use_cache (`bool`, *optional*): create and return a cache (defaults to `config.use_cache` in eval mode).
            output_hidden_states (`bool`, *optional*): also return the hidden states after every layer.
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        if self.gradient_checkpointing and self.training:
            use_cache = False  # the recomputed forward would update the recurrent state twice
        recompute_interval = selective_recompute_interval(self)
        if recompute_interval is not None:
            use_cache, cache = False, None  # the same for the recomputed segments of `hc_recompute`

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        length = inputs_embeds.shape[1]

        if isinstance(cache, StaticCache):
            raise ValueError(
                f"{type(self).__name__} does not support a static cache (`cache_implementation='static'`): its "
                "forward is not compilable yet. Use the default dynamic cache; linear-attention states are "
                "fixed-size already."
            )
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)

        past_length = tokens_seen(cache, self.config)
        if position_ids is None:
            padding_mask_2d = attention_mask if isinstance(attention_mask, torch.Tensor) else None
            position_ids = position_ids_skipping_padding(
                padding_mask_2d, length, past_length, inputs_embeds.device
            )

        # Masks per layer type: a 2D padding mask (or None) for linear attention, a causal mask for softmax attention.
        if isinstance(attention_mask, dict):
            mask_mapping = dict(attention_mask)
        else:
            mask_kwargs = dict(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                cache=cache,
                position_ids=position_ids,
            )
            mask_mapping = {"linear_attention": create_recurrent_attention_mask(**mask_kwargs)}
            if "full_attention" in self.config.layer_types:
                mask_mapping["full_attention"] = create_causal_mask(**mask_kwargs)
        linear_mask = mask_mapping.get("linear_attention")
        if linear_mask is not None:
            linear_mask = linear_mask.bool()
            mask_mapping["linear_attention"] = linear_mask

        hidden_states = inputs_embeds
        if self.config.positional_encoding == "tpe":
            tpe_slot = cache_state_indices(self.config)["tpe"]
            tpe_state = read_state(cache, self.first_linear_layer, tpe_slot)
            hidden_states, tpe_state = self.tpe(hidden_states, linear_mask, tpe_state, cache is not None)
            if cache is not None:
                cache.update_recurrent_state(tpe_state, self.first_linear_layer, state_idx=tpe_slot)
        if cache is not None and "full_attention" not in self.config.layer_types:
            cache.decay_tokens_seen = past_length + length  # see `tokens_seen`

        position_embeddings = (
            self.rotary_emb(hidden_states, position_ids) if hasattr(self, "rotary_emb") else None
        )
        rope_angles = self.cosine_rope(position_ids) if hasattr(self, "cosine_rope") else None
        lower_bounds = self.decay_lower_bounds() if hasattr(self, "decay_lower_bounds") else None

        # Stream creation: the embedding is copied into every stream (one stream for a plain residual).
        hidden_streams = expand_streams(hidden_states, self.config.num_streams)
        all_hidden_states = (hidden_states,) if output_hidden_states else None

        layer_kwargs = dict(
            attention_mask=mask_mapping,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            rope_angles=rope_angles,
            decay_lower_bounds=lower_bounds,
            **kwargs,
        )
        hidden_streams, layer_states = run_layers(
            self.layers[: self.config.num_hidden_layers],
            hidden_streams,
            layer_kwargs,
            recompute_interval=recompute_interval,
            readout=self.stream_readout if output_hidden_states else None,
        )
        if output_hidden_states:
            all_hidden_states += layer_states

        hidden_states = self.norm(self.stream_readout(hidden_streams))
        if output_hidden_states:
            all_hidden_states = all_hidden_states[:-1] + (hidden_states,)

        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
            hidden_states=all_hidden_states,
        )


class DecayLinearAttnForCausalLM(DecayLinearAttnPreTrainedModel, GenerationMixin):
    """The decay linear-attention decoder with a language-modelling head, loadable with `AutoModelForCausalLM`.

    Example:

    ```python
    >>> import torch
    >>> from transformers_mhc import DecayLinearAttnConfig, DecayLinearAttnForCausalLM

    >>> config = DecayLinearAttnConfig(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
    ...                                num_attention_heads=4, decay_type="simple", short_conv_size=4)
    >>> model = DecayLinearAttnForCausalLM(config)
    >>> out = model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]]))
    >>> out.logits.shape
    torch.Size([1, 3, 512])
    ```"""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # No tensor-parallel plan yet (the fused short conv and the decay projections have no sharded form), so the tied
    # head stays replicated like the embedding; pipeline stages hand the head the hidden states.
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: DecayLinearAttnConfig):
        super().__init__(config)
        self.model = DecayLinearAttnModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

        self.post_init()

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: Cache | None = None,
        attention_mask: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ) -> dict:
        # `generate` cuts the tokens already in the cache off a continued prompt only when some layer is softmax
        # attention; an all-linear model would otherwise feed the cached tokens into its recurrent state twice. A
        # prompt is the full sequence when it is as long as its attention mask (or has no mask).
        all_linear = "full_attention" not in self.config.layer_types
        if is_first_iteration and next_sequence_length is None and all_linear:
            length = (inputs_embeds if inputs_embeds is not None else input_ids).shape[1]
            seen = tokens_seen(cache, self.config)
            full_sequence = attention_mask is None or attention_mask.shape[-1] == length
            if 0 < seen < length and full_sequence:
                next_sequence_length = length - seen
        return super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            cache=cache,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @deprecate_kwarg("cache_params", "5.40.0", new_name="cache")  # the old name of recurrent models (Mamba)
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | dict | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        Args:
            labels (`torch.LongTensor` of shape `[batch, seq]`, *optional*): targets for the language-modelling loss
                (shifted inside; -100 is ignored). The other arguments are those of [`DecayLinearAttnModel`].
            logits_to_keep (`int` or `torch.Tensor`, *optional*, defaults to 0): compute logits only for the last
                `logits_to_keep` positions (0: all), or for the given indices.
        """
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )

        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            # `loss_function` honours `num_items_in_batch` from Trainer, so gradient accumulation is exact.
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = [
    "DecayLinearAttnForCausalLM",
    "DecayLinearAttnModel",
    "DecayLinearAttnPreTrainedModel",
    "DecayLinearAttnDecoderLayer",
    "DecayLinearAttention",
    "DecayLinearAttnDecay",
]
