"""transformers-mhc: Manifold-Constrained Hyper-Connections and decay linear attention for 🤗 transformers.

Importing the package registers its configurations and models with `AutoConfig`, `AutoModel` and
`AutoModelForCausalLM`, and marks them so that `save_pretrained` writes an `auto_map` and the model code
(loadable with `trust_remote_code=True` where the package is not installed).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .diagnostics import decay_statistics, signal_gain
from .models.configuration_decay_linear_attn import DecayLinearAttnConfig
from .models.configuration_mhc import MHCConfig
from .models.modeling_decay_linear_attn import (
    DecayLinearAttnForCausalLM,
    DecayLinearAttnModel,
    DecayLinearAttnPreTrainedModel,
)
from .models.modeling_mhc import MHCForCausalLM, MHCModel, MHCPreTrainedModel

__version__ = "0.1.0.dev0"

# --- MHC -------------------------------------------------------------------------------------------
AutoConfig.register("mhc", MHCConfig, exist_ok=True)
AutoModel.register(MHCConfig, MHCModel, exist_ok=True)
AutoModelForCausalLM.register(MHCConfig, MHCForCausalLM, exist_ok=True)
MHCConfig.register_for_auto_class()
MHCModel.register_for_auto_class("AutoModel")
MHCForCausalLM.register_for_auto_class("AutoModelForCausalLM")

# --- Decay linear attention ------------------------------------------------------------------------
AutoConfig.register("decay_linear_attn", DecayLinearAttnConfig, exist_ok=True)
AutoModel.register(DecayLinearAttnConfig, DecayLinearAttnModel, exist_ok=True)
AutoModelForCausalLM.register(DecayLinearAttnConfig, DecayLinearAttnForCausalLM, exist_ok=True)
DecayLinearAttnConfig.register_for_auto_class()
DecayLinearAttnModel.register_for_auto_class("AutoModel")
DecayLinearAttnForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "DecayLinearAttnConfig",
    "DecayLinearAttnForCausalLM",
    "DecayLinearAttnModel",
    "DecayLinearAttnPreTrainedModel",
    "decay_statistics",
    "MHCConfig",
    "MHCForCausalLM",
    "MHCModel",
    "MHCPreTrainedModel",
    "signal_gain",
]
