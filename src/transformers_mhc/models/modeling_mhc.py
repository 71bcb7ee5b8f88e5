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

import contextlib
import weakref

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
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_mhc import MHCConfig
from .hub_mixin import HubMixin
from .hyper_connection import HyperConnection, StreamReadout, expand_streams, position_ids_skipping_padding
from .mhc_ops import _StreamGradSink, hc_pre_mix, hc_res_post_mix


# ------------------------------------------------------------------------------------------------
# Training-memory savings. Both keep the numerics bit-for-bit: what is dropped in forward is recomputed
# in backward by the very same operations. (Speed: each sub-layer's stream gradient is summed in one
# buffer by a `_StreamGradSink`, see `mhc_ops`.)
#
# 1. A sub-layer's input `norm(Σ_j h_pre_j x_j)` is a cheap function of the streams, which the
#    hyper-connection keeps for backward anyway; `_SublayerInput` keeps only `h_pre` and the streams,
#    not the mixed input and the norm's intermediates (always on in training).
# 2. Selective recomputation (mHC paper §5.6, `config.hc_recompute`): per segment of
#    `config.recompute_interval` layers only the segment's input streams are kept; the streams produced
#    inside it are replaced, wherever autograd would save them, by a recipe: `x_{k+1} = h_res x_k + h_postᵀ f_k`
#    from the small coefficients and the sub-layer outputs `f_k` (saved anyway). The first backward
#    access recomputes the segment's streams (`_StreamRecomputation`).
# ------------------------------------------------------------------------------------------------
class _SublayerInput(torch.autograd.Function):
    """`norm(hc_pre_mix(h_pre, streams))`, saving only `h_pre` and `streams`; backward reruns it with autograd."""

    @staticmethod
    def forward(
        ctx,
        norm: nn.Module,
        sink,
        kernel_backend: str,
        h_pre: torch.Tensor,
        streams: torch.Tensor,
        *params: torch.Tensor,
    ):
        ctx.norm, ctx.params, ctx.kernel_backend = norm, params, kernel_backend
        # The pre-mix recomputed in backward hands its stream gradient to the sub-layer's sink, under this slot.
        ctx.sink = _StreamGradSink.producer(streams.reshape(-1)) if sink is not None else None
        ctx.save_for_backward(h_pre, streams)
        return norm(hc_pre_mix(h_pre, streams, kernel_backend=kernel_backend))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h_pre, streams = ctx.saved_tensors
        needs = ctx.needs_input_grad[3:]
        inputs = [h_pre.detach().requires_grad_(needs[0]), streams.detach().requires_grad_(needs[1])]
        sink = ctx.sink[0].collect(slot=ctx.sink[1]) if ctx.sink is not None else contextlib.nullcontext()
        with torch.enable_grad(), sink:
            output = ctx.norm(hc_pre_mix(*inputs, kernel_backend=ctx.kernel_backend))
        wrt = [t for t, need in zip([*inputs, *ctx.params], needs) if need]
        grads = iter(torch.autograd.grad(output, wrt, grad, allow_unused=True) if wrt else ())
        return (None, None, None, *(next(grads) if need else None for need in needs))


def _new_sink() -> _StreamGradSink | None:
    # One gradient buffer per sub-layer's streams (`_StreamGradSink`): eager training only.
    return _StreamGradSink() if torch.is_grad_enabled() and not torch.compiler.is_compiling() else None


def _collecting(sink: _StreamGradSink | None):
    return sink.collect() if sink is not None else contextlib.nullcontext()


class _StreamRecomputation:
    """Selective recomputation of the streams of one segment of layers, through saved-tensor hooks.

    `produced` registers each new stream tensor with the recipe that made it. While the segment runs, the pack
    hook swaps any saved tensor that lives in a registered stream's storage for a small token (the recipe's index
    and the view's geometry); the stream itself is then freed after forward. In backward, the first token to be
    unpacked recomputes the segment's streams from its input (kept), each stream is cached until its last saved
    reference has been unpacked.
    """

    active: list[_StreamRecomputation] = []

    def __init__(self, first: torch.Tensor, kernel_backend: str = "auto"):
        self.first = first.detach()
        self.kernel_backend = kernel_backend
        self.recipes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.storages: dict[int, tuple[int, weakref.ref, int]] = {}  # data_ptr -> (index, storage, offset)
        self.cache: dict[int, torch.Tensor] = {}
        self.pending: dict[int, int] = {}

    def produced(self, streams: torch.Tensor, h_res, h_post, f) -> None:
        self.recipes.append((h_res.detach(), h_post.detach(), f.detach()))
        storage = streams.untyped_storage()
        self.storages[storage.data_ptr()] = (
            len(self.recipes),
            weakref.ref(storage),
            streams.storage_offset(),
        )

    def pack(self, tensor: torch.Tensor):
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. some subclasses)
            return tensor
        entry = self.storages.get(storage.data_ptr())
        if entry is None or entry[1]() is not storage:  # not a stream (an address can be reused once freed)
            return tensor
        index, _, offset = entry
        self.pending[index] = self.pending.get(index, 0) + 1
        return (self, index, tensor.shape, tensor.stride(), tensor.storage_offset() - offset)

    @staticmethod
    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        self, index, shape, stride, offset = packed
        stream = self._stream(index)
        self.pending[index] -= 1
        if self.pending[index] <= 0:
            self.cache.pop(index, None)
        return stream.as_strided(shape, stride, stream.storage_offset() + offset)

    def _stream(self, index: int) -> torch.Tensor:
        if index in self.cache:
            return self.cache[index]
        start = max((k for k in self.cache if k < index), default=0)
        stream = self.cache[start] if start else self.first
        with torch.no_grad():
            for k in range(start + 1, index + 1):
                h_res, h_post, f = self.recipes[k - 1]
                stream = hc_res_post_mix(h_res, stream, h_post, f, kernel_backend=self.kernel_backend)
                if self.pending.get(k, 0) > 0:
                    self.cache[k] = stream
        return stream

    @contextlib.contextmanager
    def __call__(self):
        type(self).active.append(self)
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                yield
        finally:
            type(self).active.pop()


class MHCDecoderLayer(GradientCheckpointingLayer):
    """A Llama decoder layer whose two residual connections are hyper-connections over `n` streams.

    With `hyper_connection="none"` it is exactly `LlamaDecoderLayer` (one stream, `x + F(x)`).
    """

    def __init__(self, config: MHCConfig, layer_idx: int):
        super().__init__()
        self.config = config  # read at call time: `config.kernel_backend` may be changed after building
        self.hidden_size = config.hidden_size
        self.hyper_connection = config.hyper_connection

        self.self_attn = LlamaAttention(config=config, layer_idx=layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if self.hyper_connection != "none":
            # Attention and MLP are separate sub-layers, each with its own coefficients.
            self.attn_hc = HyperConnection(config, sublayer_idx=2 * layer_idx)
            self.mlp_hc = HyperConnection(config, sublayer_idx=2 * layer_idx + 1)

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
        if self.hyper_connection == "none":
            attn_input = self.input_layernorm(hidden_streams.squeeze(-2))
        else:
            sink = _new_sink()
            with _collecting(sink):
                h_pre, h_post, h_res = self.attn_hc(hidden_streams)
                attn_input = self._sublayer_input(self.input_layernorm, h_pre, hidden_streams, sink)
        attn_output, _ = self.self_attn(
            hidden_states=attn_input,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        if self.hyper_connection == "none":
            hidden_streams = hidden_streams + attn_output.unsqueeze(-2)
        else:
            with _collecting(sink):
                hidden_streams = self._write_streams(h_res, hidden_streams, h_post, attn_output)

        # Fully Connected
        if self.hyper_connection == "none":
            mlp_input = self.post_attention_layernorm(hidden_streams.squeeze(-2))
        else:
            sink = _new_sink()
            with _collecting(sink):
                h_pre, h_post, h_res = self.mlp_hc(hidden_streams)
                mlp_input = self._sublayer_input(self.post_attention_layernorm, h_pre, hidden_streams, sink)
        mlp_output = self.mlp(mlp_input)
        if self.hyper_connection == "none":
            hidden_streams = hidden_streams + mlp_output.unsqueeze(-2)
        else:
            with _collecting(sink):
                hidden_streams = self._write_streams(h_res, hidden_streams, h_post, mlp_output)
        return hidden_streams

    def _sublayer_input(
        self, norm: nn.Module, h_pre: torch.Tensor, streams: torch.Tensor, sink
    ) -> torch.Tensor:
        """`norm(Σ_j h_pre_j x_j)`; in training, recomputed in backward instead of being kept."""
        backend = self.config.kernel_backend
        if (
            torch.is_grad_enabled()
            and (h_pre.requires_grad or streams.requires_grad)
            and not torch.compiler.is_compiling()  # compiled graphs make their own recomputation choices
            and not (self.gradient_checkpointing and self.training)  # the whole layer is recomputed already
        ):
            return _SublayerInput.apply(norm, sink, backend, h_pre, streams, *norm.parameters())
        return norm(hc_pre_mix(h_pre, streams, kernel_backend=backend))

    def _write_streams(self, h_res, streams, h_post, f) -> torch.Tensor:
        streams = hc_res_post_mix(h_res, streams, h_post, f, kernel_backend=self.config.kernel_backend)
        if _StreamRecomputation.active:
            _StreamRecomputation.active[-1].produced(streams, h_res, h_post, f)
        return streams


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
        layers = self.layers[: self.config.num_hidden_layers]
        recompute = (
            self.config.hc_recompute
            and self.config.hyper_connection != "none"
            and self.training
            and torch.is_grad_enabled()
        )
        segment = self.config.recompute_interval if recompute else len(layers)
        for start in range(0, len(layers), max(segment, 1)):
            context = (
                _StreamRecomputation(hidden_streams, self.config.kernel_backend)()
                if recompute
                else contextlib.nullcontext()
            )
            with context:
                for decoder_layer in layers[start : start + segment]:
                    hidden_streams = decoder_layer(hidden_streams, **layer_kwargs)
                    if output_hidden_states:
                        all_hidden_states += (self.stream_readout(hidden_streams),)

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
