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
"""A training step of `torch.compile(model)` equals the eager one, on the PyTorch path (`kernel_backend="torch"`).

The Triton path under compile is tested in `test_kernel_backend.py`. Here the CPU path: its fast decode code works
in place, which autograd rejects, so compiled training must take the plain formulas (it once did not).
"""

from __future__ import annotations

import pytest
import torch

from transformers_mhc import DecayLinearAttnConfig, DecayLinearAttnForCausalLM, MHCConfig, MHCForCausalLM

SMALL = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
CASES = {
    "mhc": (MHCForCausalLM, MHCConfig(**SMALL, num_streams=4, kernel_backend="torch")),
    "hc": (MHCForCausalLM, MHCConfig(**SMALL, num_streams=2, hyper_connection="hc", kernel_backend="torch")),
    "mhc_recompute": (
        MHCForCausalLM,
        MHCConfig(**SMALL, num_streams=4, hc_recompute=True, kernel_backend="torch"),
    ),
    "decay_mhc": (
        DecayLinearAttnForCausalLM,
        DecayLinearAttnConfig(
            **SMALL, chunk_size=16, hyper_connection="mhc", num_streams=2, kernel_backend="torch"
        ),
    ),
}


def _step(model, forward, ids):
    model.zero_grad(set_to_none=True)
    output = forward(ids, labels=ids)
    output.loss.backward()
    return output.loss.detach(), {
        name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None
    }


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_training_step_matches_eager(case):
    model_class, config = CASES[case]
    torch.manual_seed(0)
    model = model_class(config).train()
    ids = torch.randint(0, 32, (2, 20), generator=torch.Generator().manual_seed(0))
    loss, grads = _step(model, model, ids)
    torch.compiler.reset()
    loss_c, grads_c = _step(model, torch.compile(model, backend="aot_eager"), ids)
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
