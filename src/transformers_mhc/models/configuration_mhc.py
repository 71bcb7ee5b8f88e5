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
"""MHC model configuration: a Llama configuration plus the hyper-connection fields."""

from __future__ import annotations

import math

from transformers import LlamaConfig

HYPER_CONNECTION_TYPES = ("mhc", "hc", "none")
HC_READOUTS = ("mean", "sum", "learned")
HC_CONVENTIONS = ("paper", "deepseek_v4")


def validate_hyper_connection_fields(config) -> None:
    """Checks the `hc_*` fields shared by every config that can run hyper-connections.

    Raises `ValueError` naming the field, the value and what is allowed.
    """

    def choice(field: str, allowed: tuple[str, ...]) -> None:
        value = getattr(config, field)
        if value not in allowed:
            raise ValueError(f"`{field}` must be one of {list(allowed)}, got {value!r}.")

    choice("hyper_connection", HYPER_CONNECTION_TYPES)
    choice("hc_readout", HC_READOUTS)
    choice("hc_convention", HC_CONVENTIONS)
    if not isinstance(config.num_streams, int) or config.num_streams < 1:
        raise ValueError(f"`num_streams` must be an integer >= 1, got {config.num_streams!r}.")
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
    if not isinstance(config.sinkhorn_iterations, int) or config.sinkhorn_iterations < 1:
        raise ValueError(
            f"`sinkhorn_iterations` must be an integer >= 1, got {config.sinkhorn_iterations!r}."
        )
    for field in ("hc_gate_init", "hc_res_logit_gap", "hc_symmetry_breaking", "hc_eps"):
        value = getattr(config, field)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"`{field}` must be a finite number >= 0, got {value!r}.")
    if config.hc_symmetry_breaking >= 1:
        raise ValueError(
            f"`hc_symmetry_breaking` spreads `h_post` over (1 - s, 1 + s) and must be < 1 so that every "
            f"`h_post` stays in (0, 2), got {config.hc_symmetry_breaking!r}."
        )
    interval = config.hc_recompute_interval
    if interval is not None and (not isinstance(interval, int) or interval < 1):
        raise ValueError(
            f"`hc_recompute_interval` must be None (automatic) or an integer >= 1, got {interval!r}."
        )


class MHCConfig(LlamaConfig):
    r"""
    Configuration of an [`MHCModel`]: a Llama decoder whose residual stream is widened to `num_streams` streams
    joined by (manifold-constrained) hyper-connections around every attention and MLP sub-layer.

    Every [`~transformers.LlamaConfig`] field is accepted with the same meaning; the fields below are added.

    Args:
        num_streams (`int`, *optional*, defaults to 4):
            Expansion rate `n`: how many residual streams each token carries.
        hyper_connection (`str`, *optional*, defaults to `"mhc"`):
            `"mhc"`: manifold-constrained hyper-connections (`h_res` projected onto doubly stochastic matrices by
            Sinkhorn-Knopp). `"hc"`: the unconstrained dynamic hyper-connections of Zhu et al. `"none"`: a plain
            residual (requires `num_streams=1`); with Llama weights it reproduces `LlamaForCausalLM`.
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
            mean of the streams). In `"hc"` mode the default is the HC paper's one-hot `e_{k mod n}`.
        hc_post_bias_init (`float`, *optional*, defaults to 0.0):
            Initial static logit of `h_post`; 0 gives `h_post = 2 * sigmoid(0) = 1`.
        hc_symmetry_breaking (`float`, *optional*, defaults to 0.0):
            Spreads the initial `h_post` linearly over `[1 - s, 1 + s]` across streams. The spread has zero mean, so
            with a mean readout the model at initialisation is unchanged, but streams copied from one embedding stop
            being identical (identical streams otherwise stay identical and `h_res` cannot learn to mix them).
        hc_eps (`float`, *optional*, defaults to 1e-6):
            The `eps` of the `"deepseek_v4"` convention (added to the softmax, the Sinkhorn denominators and `h_pre`).
        hc_recompute (`bool`, *optional*, defaults to `False`):
            Selective recomputation during training: keep only the stream input of every `hc_recompute_interval`-th
            layer and each sub-layer's output, and recompute the hyper-connection arithmetic in backward.
        hc_recompute_interval (`int`, *optional*):
            Layers per recomputation segment `L_r`; defaults to `round(sqrt(n * L / (n + 2)))`.

    Example:

    ```python
    >>> from transformers_mhc import MHCConfig, MHCForCausalLM

    >>> config = MHCConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4)
    >>> model = MHCForCausalLM(config)
    ```"""

    model_type = "mhc"

    num_streams: int = 4
    hyper_connection: str = "mhc"
    sinkhorn_iterations: int = 20
    hc_gate_init: float = 0.01
    hc_dynamic: bool = True
    hc_readout: str = "mean"
    hc_convention: str = "paper"
    hc_res_logit_gap: float = 4.0
    hc_pre_bias_init: float | None = None
    hc_post_bias_init: float = 0.0
    hc_symmetry_breaking: float = 0.0
    hc_eps: float = 1e-6
    hc_recompute: bool = False
    hc_recompute_interval: int | None = None

    def __post_init__(self, **kwargs):
        validate_hyper_connection_fields(self)
        super().__post_init__(**kwargs)

    @property
    def recompute_interval(self) -> int:
        """Layers per selective-recomputation segment (`L_r ≈ sqrt(n·L/(n+2))`, at least 1)."""
        if self.hc_recompute_interval is not None:
            return self.hc_recompute_interval
        n, num_layers = self.num_streams, self.num_hidden_layers
        return max(1, round(math.sqrt(n * num_layers / (n + 2))))


__all__ = ["MHCConfig", "validate_hyper_connection_fields"]
