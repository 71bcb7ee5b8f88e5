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
"""`kernel_backend`: the dispatch decision, and both models run through the Triton kernels vs the torch path.

The model-level comparisons run on `KERNEL_DEVICE` (`conftest.py`): CUDA tensors on a GPU, CPU tensors through
the Triton interpreter otherwise (tiny shapes: the interpreter runs a 1-layer model's forward and backward in a few
seconds). Between them they reach every kernel: the four mHC ops (coefficients, Sinkhorn, pre-mix, res/post mix),
the chunked decay kernels (forward and backward, scalar and vector decay) and the fused recurrent decode kernel
(`generate`).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from conftest import KERNEL_DEVICE  # noqa: E402

from transformers_mhc import (  # noqa: E402
    DecayLinearAttnConfig,
    DecayLinearAttnForCausalLM,
    MHCConfig,
    MHCForCausalLM,
)
from transformers_mhc.models import decay_ops, hyper_connection, mhc_ops  # noqa: E402

pytestmark = pytest.mark.triton

VOCAB = 32
TINY_MHC = dict(
    vocab_size=VOCAB,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_streams=4,
)
# One head of dim 16, T = 20 tokens over chunks of 16 (not a multiple), mHC with n = 2 around the mixer and the MLP.
TINY_DECAY = dict(
    vocab_size=VOCAB,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=1,
    chunk_size=16,
    hyper_connection="mhc",
    num_streams=2,
)
FP32_RTOL = (
    1e-4  # relative error of the loss, the logits and every parameter gradient (same math, other order)
)


# --------------------------------------------------------------------------------------------------
# The config field and the dispatch decision
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config_class", [MHCConfig, DecayLinearAttnConfig])
def test_config_field(config_class, tmp_path):
    assert config_class().kernel_backend == "auto"
    config = config_class(kernel_backend="torch")
    config.save_pretrained(tmp_path)
    assert config_class.from_pretrained(tmp_path).kernel_backend == "torch"
    with pytest.raises(ValueError, match="kernel_backend"):
        config_class(kernel_backend="cuda")


def test_torch_backend_never_consults_the_kernels(monkeypatch):
    """`"torch"` decides before anything else: it runs where the kernels are absent or broken."""

    def boom(*args, **kwargs):
        raise AssertionError("a kernel was called")

    monkeypatch.setattr(hyper_connection, "can_launch_on", boom)
    monkeypatch.setattr(decay_ops, "can_launch_on", boom)
    x = torch.randn(3, 2, 8, device=KERNEL_DEVICE)
    assert hyper_connection.mhc_implementation("torch", x) is hyper_connection.TORCH_OPS
    q = torch.randn(1, 1, 4, 8, device=KERNEL_DEVICE)
    decay_ops.chunk_decay_linear_attn(
        q, q, q, -torch.rand(1, 1, 4, device=KERNEL_DEVICE), kernel_backend="torch"
    )


def test_auto_takes_the_torch_path_off_cuda(caplog):
    """The interpreter is for tests only: `"auto"` sends only CUDA tensors to the kernels, and says why once."""
    assert not mhc_ops.use_triton_kernels("mhc", "auto", (torch.randn(3, 2),), hyper_connection.can_launch_on)
    x = torch.randn(3, 2, 8, device="meta")  # a device no other test uses: its message is logged here first
    with caplog.at_level(logging.INFO, logger=mhc_ops.__name__):
        for _ in range(3):
            assert not mhc_ops.use_triton_kernels("mhc", "auto", (x,), hyper_connection.can_launch_on)
    messages = [r.getMessage() for r in caplog.records if "meta tensors" in r.getMessage()]
    assert len(messages) == 1 and "torch path" in messages[0]


@pytest.mark.parametrize(
    ("tensors", "unsupported", "match"),
    [
        (lambda d: (torch.randn(2, 2, device=d, dtype=torch.float64),), None, "float64"),
        (lambda d: (torch.randn(2, 2, device=d),), "key head dim 300 > 256", "head dim"),
    ],
    ids=["fp64", "unsupported"],
)
def test_triton_backend_says_why_it_cannot_run(tensors, unsupported, match):
    if hyper_connection.can_launch_on is None or not hyper_connection.can_launch_on(KERNEL_DEVICE):
        pytest.skip("the kernels cannot launch in this process")
    with pytest.raises(ValueError, match=match):
        mhc_ops.use_triton_kernels(
            "mhc", "triton", tensors(KERNEL_DEVICE), hyper_connection.can_launch_on, unsupported
        )
    # `"auto"` falls back instead (on CPU tensors it would anyway).
    assert not mhc_ops.use_triton_kernels(
        "mhc", "auto", tensors(KERNEL_DEVICE), hyper_connection.can_launch_on, unsupported
    )


def test_decay_limits_fall_back():
    """Head dims beyond the kernels' tile and chunk sizes they cannot tile: an error for `"triton"`."""
    q = torch.randn(1, 1, 4, 300, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="key head dim 300"):
        decay_ops.chunk_decay_linear_attn(
            q, q, q, -torch.rand(1, 1, 4, device=KERNEL_DEVICE), kernel_backend="triton"
        )
    q = torch.randn(1, 1, 4, 8, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="chunk_size 8"):
        decay_ops.chunk_decay_linear_attn(
            q, q, q, -torch.rand(1, 1, 4, device=KERNEL_DEVICE), chunk_size=8, kernel_backend="triton"
        )


def test_mhc_stream_limit():
    """More streams than the kernels are compiled and tested for: `"triton"` says so (`"auto"` falls back)."""
    n = mhc_ops.MAX_TRITON_STREAMS + 1
    x = torch.randn(2, n, 8, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match=f"{n} streams"):
        hyper_connection.mhc_implementation("triton", x)
    assert hyper_connection.mhc_implementation("auto", x) is hyper_connection.TORCH_OPS


def test_decay_grid_limit():
    """Batch x heads beyond CUDA's 65535 on the kernels' grid axis: `"triton"` says so (`"auto"` falls back)."""
    q = torch.zeros(65536, 1, 1, 16, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="65535"):
        decay_ops.chunk_decay_linear_attn(q, q, q, q[..., 0], kernel_backend="triton")


def test_same_decision_under_compile(monkeypatch):
    """The kernels are registered ops, so compiling changes nothing: `"auto"` and `"triton"` decide as in eager."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    x = torch.randn(2, 2, device=KERNEL_DEVICE)
    runs = hyper_connection.can_launch_on is not None and hyper_connection.can_launch_on(KERNEL_DEVICE)
    assert mhc_ops.use_triton_kernels("mhc", "triton", (x,), hyper_connection.can_launch_on) == runs
    assert mhc_ops.use_triton_kernels("mhc", "auto", (x,), hyper_connection.can_launch_on) == (
        runs and x.is_cuda
    )


def test_unknown_backend():
    with pytest.raises(ValueError, match="kernel_backend"):
        hyper_connection.mhc_implementation("fast", torch.randn(2, 2, 2))


# --------------------------------------------------------------------------------------------------
# Both models: Triton kernels vs the torch path
# --------------------------------------------------------------------------------------------------
def _build(model_class, config_kwargs, kernel_backend, dtype=torch.float32):
    torch.manual_seed(0)
    config = model_class.config_class(**config_kwargs, kernel_backend=kernel_backend)
    return model_class(config).to(KERNEL_DEVICE, dtype).train()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _train_step(model, ids, forward=None):
    """Loss, logits and the gradients of `model`'s parameters by name, from one step through `forward` (default:
    the model itself; e.g. its compiled form, whose parameter names carry a prefix)."""
    output = (model if forward is None else forward)(ids, labels=ids)
    output.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return output.loss.detach(), output.logits.detach(), grads


def _assert_same_step(model_class, config_kwargs, ids, rtol=FP32_RTOL, **triton_kwargs):
    loss_t, logits_t, grads_t = _train_step(_build(model_class, config_kwargs, "torch"), ids)
    loss_k, logits_k, grads_k = _train_step(
        _build(model_class, {**config_kwargs, **triton_kwargs}, "triton"), ids
    )
    assert grads_k.keys() == grads_t.keys() and len(grads_t) > 0
    assert _rel(loss_k, loss_t) <= rtol and _rel(logits_k, logits_t) <= rtol
    errors = {name: _rel(grads_k[name], grads_t[name]) for name in grads_t}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= rtol, f"gradient of {worst}: relative error {errors[worst]:.2e}"


def _ids(length: int, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1)).to(
        KERNEL_DEVICE
    )


def test_mhc_model_triton_matches_torch():
    """Every mHC kernel, forward and backward, inside the model (also its selective recomputation)."""
    _assert_same_step(MHCForCausalLM, TINY_MHC, _ids(7), hc_recompute=True)


@pytest.mark.parametrize("granularity", ["scalar", "vector"])
def test_decay_model_triton_matches_torch(granularity):
    """The chunked decay kernels and the mHC mix kernels; the vector case also with `hc_recompute`, whose
    selective checkpointing used to reject the buffers the kernels fill ("cached tensor has been mutated")."""
    config = {**TINY_DECAY, "decay_granularity": granularity}
    _assert_same_step(
        DecayLinearAttnForCausalLM, config, _ids(20, batch=1), hc_recompute=granularity == "vector"
    )


class _CountingLaunches:
    """Stands in for a Triton kernel and counts its launches (`kernel[grid](...)`)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def test_selective_recomputation_keeps_the_decay_kernel(monkeypatch):
    """`hc_recompute` recomputes the hyper-connection arithmetic in backward but keeps the chunk kernel's outputs, as
    it keeps attention's: per training step the decay output kernel runs once per layer either way, while the mHC
    coefficient kernel runs twice as often."""
    from transformers_mhc.kernels import decay_chunk, mhc_coefficients

    launches = {}
    for recompute in (False, True):
        decay_kernel = _CountingLaunches(decay_chunk._chunk_output_fwd_kernel)
        mhc_kernel = _CountingLaunches(mhc_coefficients._coefficients_fwd_kernel)
        monkeypatch.setattr(decay_chunk, "_chunk_output_fwd_kernel", decay_kernel)
        monkeypatch.setattr(mhc_coefficients, "_coefficients_fwd_kernel", mhc_kernel)
        config = {
            **TINY_DECAY,
            "decay_granularity": "vector",
            "num_hidden_layers": 2,
            "hc_recompute": recompute,
        }
        _train_step(_build(DecayLinearAttnForCausalLM, config, "triton"), _ids(20, batch=1))
        launches[recompute] = (decay_kernel.launches, mhc_kernel.launches)
        monkeypatch.undo()
    assert launches[False][0] == launches[True][0] == 2, launches
    assert launches[True][1] == 2 * launches[False][1] > 0, launches


@pytest.mark.parametrize(
    ("model_class", "config_kwargs"),
    [(MHCForCausalLM, TINY_MHC), (DecayLinearAttnForCausalLM, {**TINY_DECAY, "decay_granularity": "vector"})],
    ids=["mhc", "decay"],
)
def test_generate_triton_matches_torch(model_class, config_kwargs):
    """Greedy decoding with the cache: the decay model's steps run the fused recurrent kernel (T = 1)."""
    prompt = _ids(5, batch=1)
    sequences = []
    for backend in ("torch", "triton"):
        model = _build(model_class, config_kwargs, backend).eval()
        with torch.no_grad():
            logits = model(prompt).logits
            out = model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
        sequences.append((logits, out))
    (logits_t, out_t), (logits_k, out_k) = sequences
    assert _rel(logits_k, logits_t) <= FP32_RTOL
    assert torch.equal(out_k, out_t)


def _kernel_ops_in_graph(model, ids, backend: str) -> tuple[set[str], tuple]:
    """Compiles `model` with a backend that notes the `transformers_mhc` ops in each captured graph, then hands the
    graph to `backend`; returns those op names and the compiled training step's loss, logits and gradients."""
    seen: set[str] = set()

    def noting_backend(graph_module, example_inputs):
        for node in graph_module.graph.nodes:
            if node.op == "call_function" and str(node.target).startswith("transformers_mhc."):
                seen.add(str(node.target).split(".")[1])
        return torch.compile(graph_module, backend=backend)

    return seen, _train_step(model, ids, forward=torch.compile(model, backend=noting_backend))


@pytest.mark.parametrize(
    ("model_class", "config_kwargs", "expected"),
    [
        (MHCForCausalLM, TINY_MHC, "mhc"),
        (DecayLinearAttnForCausalLM, {**TINY_DECAY, "decay_granularity": "vector"}, "chunk_decay"),
    ],
    ids=["mhc", "decay"],
)
def test_compiled_model_runs_the_kernels(model_class, config_kwargs, expected):
    """Under `torch.compile` the Triton path is traced, each kernel one op of the graph (aot_eager through the
    interpreter here, inductor on a GPU), and the training step equals the eager one."""
    backend = "inductor" if KERNEL_DEVICE.type == "cuda" else "aot_eager"
    ids = _ids(20, batch=1)
    loss_e, logits_e, grads_e = _train_step(_build(model_class, config_kwargs, "triton"), ids)
    torch.compiler.reset()
    seen, (loss_c, logits_c, grads_c) = _kernel_ops_in_graph(
        _build(model_class, config_kwargs, "triton"), ids, backend
    )
    assert any(name.startswith(expected) for name in seen), seen
    assert _rel(loss_c, loss_e) <= FP32_RTOL and _rel(logits_c, logits_e) <= FP32_RTOL
    assert grads_c.keys() == grads_e.keys()
    for name in grads_e:
        assert _rel(grads_c[name], grads_e[name]) <= FP32_RTOL, name


# Slow through the interpreter (and the interpreter's bf16 is not the GPU's anyway): in the default run on a GPU only.
_SLOW_ON_CPU = pytest.mark.slow if KERNEL_DEVICE.type == "cpu" else ()


@pytest.mark.parametrize(
    "model_class",
    [
        pytest.param(MHCForCausalLM, marks=_SLOW_ON_CPU),
        pytest.param(DecayLinearAttnForCausalLM, marks=_SLOW_ON_CPU),
    ],
    ids=["mhc", "decay"],
)
def test_bf16_model_triton_close_to_torch(model_class):
    """bf16 parameters and activations: the kernels round differently (and the interpreter widens bf16 products to
    fp32), so the two paths agree to bf16 precision, not bit for bit."""
    config_kwargs = (
        TINY_MHC if model_class is MHCForCausalLM else {**TINY_DECAY, "decay_granularity": "vector"}
    )
    ids = _ids(20)
    results = []
    for backend in ("torch", "triton"):
        results.append(_train_step(_build(model_class, config_kwargs, backend, torch.bfloat16), ids))
    (loss_t, logits_t, grads_t), (loss_k, logits_k, grads_k) = results
    assert _rel(logits_k, logits_t) <= 2e-2
    grads = torch.cat([g.float().flatten() for g in grads_k.values()])
    reference = torch.cat([grads_t[name].float().flatten() for name in grads_k])
    assert torch.isfinite(grads).all() and _rel(grads, reference) <= 5e-2


def test_triton_older_than_3_4_takes_the_torch_path():
    """A CUDA torch may bring a triton without `triton.knobs` (< 3.4): the kernels then count as absent."""
    code = """
import triton
del triton.knobs  # what triton 3.2 / 3.3 look like to the kernels
import torch
from transformers_mhc.models import decay_ops, hyper_connection
assert hyper_connection.can_launch_on is None and decay_ops.can_launch_on is None
x = torch.randn(3, 2, 8)
assert hyper_connection.mhc_implementation("auto", x).name == "torch"
try:
    hyper_connection.mhc_implementation("triton", x)
except ValueError as error:
    assert "triton >= 3.4" in str(error), error
    print("ok")
"""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
