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
"""PyTorch MHC model: a Llama decoder with (manifold-constrained) hyper-connections (arXiv 2512.24880)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)
from transformers.utils import can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_mhc import MHCConfig
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

logger = logging.get_logger(__name__)


class MHCDecoderLayer(GradientCheckpointingLayer):
    """A Llama decoder layer whose two residual connections are hyper-connections over `n` streams.

    With `hyper_connection="none"` both are a plain `Residual` and the layer is exactly `LlamaDecoderLayer`.
    """

    def __init__(self, config: MHCConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = LlamaAttention(config=config, layer_idx=layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # Attention and MLP are separate sub-layers, each with its own coefficients.
        self.attn_hc = hyper_connection(config, sublayer_idx=2 * layer_idx)
        self.mlp_hc = hyper_connection(config, sublayer_idx=2 * layer_idx + 1)

    def forward(
        self,
        hidden_streams: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """`hidden_streams`: `[batch, seq, num_streams, hidden]`; returns the streams after the layer."""
        # Self Attention
        attn_input, attn_read = self.attn_hc(hidden_streams, self.input_layernorm)
        attn_output, _ = self.self_attn(
            hidden_states=attn_input,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_streams = self.attn_hc.write(attn_read, attn_output)

        # Fully Connected
        mlp_input, mlp_read = self.mlp_hc(hidden_streams, self.post_attention_layernorm)
        hidden_streams = self.mlp_hc.write(mlp_read, self.mlp(mlp_input))
        return hidden_streams


class MHCPreTrainedModel(HubMixin, PreTrainedModel):
    """Weight initialisation and the shared class attributes of the MHC models."""

    config_class = MHCConfig
    config: MHCConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MHCDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True
    # Attention weights are recorded from the attention modules by `capture_outputs`; hidden states are not: a decoder
    # layer outputs `n` streams, so `MHCModel` returns their readout per layer itself.
    _can_record_outputs = {"attentions": LlamaAttention}

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, (HyperConnection, StreamReadout)):
            module.reset_parameters()


class MHCModel(MHCPreTrainedModel):
    """The bare MHC decoder: embeddings copied into `num_streams` streams, `MHCDecoderLayer`s, a stream readout
    and the final RMSNorm. Returns the normalised hidden states `[batch, seq, hidden]`.

    `output_hidden_states=True` returns, per layer, the streams collapsed by the readout (`[batch, seq, hidden]`,
    like any decoder), the embeddings first and the final normalised states last.
    """

    def __init__(self, config: MHCConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size

        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [MHCDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.stream_readout = StreamReadout(config)
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False

        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
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
            attention_mask (`torch.Tensor` of shape `[batch, past + seq]`, *optional*): 1 for tokens, 0 for padding.
            position_ids (`torch.LongTensor` of shape `[batch, seq]`, *optional*): RoPE positions; by default they skip
                left padding and continue from the cache.
            cache (`Cache`, *optional*): the key/value cache of earlier tokens (`past_key_values` before 5.24).
            use_cache (`bool`, *optional*): create and return a cache (defaults to `config.use_cache`).
            output_hidden_states (`bool`, *optional*): also return the readout of the streams after every layer.
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)

        recompute_interval = selective_recompute_interval(self)
        if recompute_interval is not None:
            # As with gradient checkpointing: the recomputed attention would append its keys to the cache again.
            if cache is not None:
                logger.warning_once(
                    "`hc_recompute=True` in training cannot update a cache: the cache is ignored."
                )
            use_cache, cache = False, None
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)

        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = position_ids_skipping_padding(
                attention_mask, inputs_embeds.shape[1], past_seen_tokens, inputs_embeds.device
            )

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)

        # Stream creation: the embedding is copied into every stream. Materialised once: the flattened copy the
        # first coefficients need would cost as much memory, and batched matmuls over a stride-0 view copy it per
        # token (several times slower).
        hidden_streams = expand_streams(inputs_embeds, self.config.num_streams).contiguous()
        all_hidden_states = (inputs_embeds,) if output_hidden_states else None

        layer_kwargs = dict(
            attention_mask=causal_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
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

        # Stream collapse, then the final norm.
        hidden_states = self.norm(self.stream_readout(hidden_streams))
        if output_hidden_states:
            all_hidden_states = all_hidden_states[:-1] + (hidden_states,)

        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
            hidden_states=all_hidden_states,
        )


class MHCForCausalLM(MHCPreTrainedModel, GenerationMixin):
    """The MHC decoder with a language-modelling head, loadable with `AutoModelForCausalLM`.

    Example:

    ```python
    >>> import torch
    >>> from transformers_mhc import MHCConfig, MHCForCausalLM

    >>> model = MHCForCausalLM(MHCConfig(vocab_size=512, hidden_size=64, intermediate_size=172,
    ...                                  num_hidden_layers=2, num_attention_heads=4))
    >>> out = model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]]))
    >>> out.logits.shape
    torch.Size([1, 3, 512])
    ```"""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # As `LlamaForCausalLM`: the decoder keeps Llama's plans (the hyper-connection coefficients are tiny and stay
    # replicated); the head gathers its vocabulary shards.
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: MHCConfig):
        super().__init__(config)
        self.model = MHCModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
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
                (shifted inside; -100 is ignored). The other arguments are those of [`MHCModel`].
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


__all__ = ["MHCForCausalLM", "MHCModel", "MHCPreTrainedModel", "MHCDecoderLayer"]
