"""Triton kernels for linear attention with scalar or vector decay.

* ``chunk_decay_linear_attn_triton``: chunked forward and backward, for training and prefill
  (``decay_chunk.py``).
* ``fused_recurrent_decay_triton``: fused token-by-token forward, for decoding (``decay_recurrent.py``).

Both take ``q, k [B, H, T, Dk]``, ``v [B, H, T, Dv]``, ``log_decay [B, H, T]`` or ``[B, H, T, Dk]``
(``<= 0``) and compute ``S_t = diag(exp(log_decay_t)) S_{t-1} + k_t v_t^T``, ``o_t = scale * q_t^T S_t``.
Their PyTorch references live in ``transformers_mhc.models.decay_ops``, which dispatches here as
``kernel_backend`` says. These modules import only torch and triton.

Both run as torch custom ops (``transformers_mhc::chunk_decay_fwd``, ``transformers_mhc::fused_recurrent_decay_fwd``,
with the backward ``transformers_mhc::chunk_decay_bwd``), so ``torch.compile(fullgraph=True)`` and selective
activation checkpointing treat each kernel launch as a single op.
"""

from .decay_chunk import MAX_HEAD_DIM_K, SUB_CHUNK, chunk_decay_linear_attn_triton
from .decay_recurrent import fused_recurrent_decay_triton
from .runtime import can_launch_on

__all__ = [
    "MAX_HEAD_DIM_K",
    "SUB_CHUNK",
    "can_launch_on",
    "chunk_decay_linear_attn_triton",
    "fused_recurrent_decay_triton",
]
