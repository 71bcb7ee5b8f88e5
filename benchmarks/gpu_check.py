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
"""One-call check of the Triton kernels on a GPU: correctness against the torch path, timings, both models.

    python benchmarks/gpu_check.py benchmarks/results/gpu_check.json     # on a GPU: fits one 8-minute call (H100)
    python benchmarks/gpu_check.py /tmp/gpu_check.json --cpu             # no GPU: interpreter, tiny shapes (CI)

Sections, each case recorded as it finishes (the JSON is rewritten after every case, so a run stopped by a time
limit still leaves what it measured):

1. `kernels`: every kernel against the torch path (what `kernel_backend="torch"` runs) on the same inputs:
   forward outputs and the gradients of every input (relative error and a pass/fail against the tolerance of the
   dtype), then forward + backward time of both paths.
2. `models`: both models' training step (forward + backward, loss and gradient agreement, time) and greedy
   `generate` (tokens, wall time of one call), Triton vs torch; the MHC row also times the plain residual model (`num_streams=1`),
   the baseline of the mHC paper's training overhead.
3. `compiled`: the kernels under `torch.compile(fullgraph=True)` (they are registered custom ops): one hyper-connection
   sub-layer's four mHC ops chained, and the decay chunk op, against the same functions run eagerly.
4. `peers`: our chunk kernel against flash-linear-attention's `chunk_simple_gla` / `chunk_gla` at head dim 128,
   where `fla` is importable (forward + backward, or forward only where fla refuses its backward on the installed
   Triton and GPU, which is recorded). Last, because fla autotunes for minutes on first use.

On a GPU (the default when CUDA is available) timings are `triton.testing.do_bench` medians in ms. With `--cpu`
(or without CUDA) the kernels run through the Triton interpreter on tiny shapes: that checks the script and the
kernels' results, and its times say nothing about speed. The exit code is 1 when a comparison fails. The output
never replaces an existing file unless `--overwrite` (it is written beside it as NAME-2.json, ...).
"""

from __future__ import annotations

import argparse
import inspect
import os
import platform
import re
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

# The interpreter flag is read when the kernels are imported, and the imports below reach them: decide first.
if "--cpu" in sys.argv[1:] or not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(
    0, str(Path(__file__).resolve().parent)
)  # run as a script or imported: its sibling benchmarks
from bench_mhc_kernels import mhc_op_cases, write_json  # noqa: E402

# Relative error allowed between the kernels and the torch path: fp32 is the same math in another order; bf16
# products are rounded to bf16 in the kernels (tensor cores) and not in the torch path (fp32 compute).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------------------------------
# Shapes: one set for a GPU (sized for one H100 in well under 8 minutes), one tiny set for the interpreter
# --------------------------------------------------------------------------------------------------
def _shapes(cpu: bool) -> dict:
    if cpu:
        return {
            "mhc": [dict(tokens=12, hidden=24, n=n, dtype=dtype) for n, dtype in [(4, "fp32"), (2, "bf16")]],
            "decay": [
                dict(B=1, H=2, T=20, K=16, V=24, vector=False, dtype="fp32", chunk_size=16),
                dict(B=1, H=1, T=20, K=24, V=16, vector=True, dtype="bf16", chunk_size=16),
            ],
            "decode": [dict(B=1, H=2, K=16, V=16, vector=True, dtype="fp32")],
            "models": dict(batch=1, seq=20, new_tokens=3, steps=1, dtype="fp32"),
            "compiled": dict(
                mhc=dict(tokens=12, hidden=24, n=4, dtype="fp32"),
                decay=dict(B=1, H=2, T=20, K=16, V=16, vector=True, dtype="fp32", chunk_size=16),
            ),
            "peers": [],  # flash-linear-attention needs CUDA
        }
    decay = [
        dict(B=4, H=16, T=2048, K=K, V=K, vector=vector, dtype="bf16", chunk_size=64)
        for vector in (False, True)
        for K in (64, 128, 256)
    ]
    # Correctness at awkward shapes: T not a multiple of the chunk, head dim 24 / 80, fp32.
    decay += [
        dict(B=2, H=4, T=1000, K=24, V=80, vector=vector, dtype="fp32", chunk_size=64)
        for vector in (False, True)
    ]
    return {
        "mhc": [
            dict(tokens=8192, hidden=2048, n=n, dtype=dtype)
            for n, dtype in [(4, "bf16"), (4, "fp32"), (6, "bf16")]
        ],
        "decay": decay,
        "decode": [dict(B=8, H=16, K=128, V=128, vector=vector, dtype="bf16") for vector in (False, True)],
        "models": dict(batch=4, seq=1024, new_tokens=64, steps=10, dtype="bf16"),
        "compiled": dict(
            mhc=dict(tokens=8192, hidden=2048, n=4, dtype="bf16"),
            decay=dict(B=4, H=16, T=2048, K=128, V=128, vector=True, dtype="bf16", chunk_size=64),
        ),
        # fla autotunes ~50 configurations per kernel on first use (~40 s each on an H100): head dim 128 only.
        "peers": [
            dict(B=4, H=16, T=2048, K=128, V=128, vector=vector, dtype="bf16", chunk_size=64)
            for vector in (False, True)
        ],
    }


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------
def _rel_error(x: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> float:
    """Max-abs relative error for fp32, RMS relative error for 16-bit inputs (fla's test practice)."""
    x, ref = x.double(), ref.double()
    if dtype == torch.float32:
        return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    return ((x - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def _fwd_bwd(fn: Callable, inputs: list[torch.Tensor], cotangents: list[torch.Tensor] | None = None):
    outputs = fn(*inputs)
    outputs = [o for o in (outputs if isinstance(outputs, tuple) else (outputs,)) if o is not None]
    if cotangents is None:
        cotangents = [torch.randn_like(o) for o in outputs]
    grads = torch.autograd.grad(outputs, inputs, cotangents, allow_unused=True)
    return outputs, grads, cotangents


def _timer(cuda: bool) -> Callable[[Callable[[], object]], float]:
    if cuda:
        from triton.testing import do_bench

        return lambda fn: float(do_bench(fn, warmup=10, rep=40))

    def once(fn):  # the interpreter: one run, a figure of the script's cost only
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    return once


def _wall_ms(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def _compare(kernel: Callable, reference: Callable, inputs: list[torch.Tensor], dtype: torch.dtype) -> dict:
    out_r, grads_r, cotangents = _fwd_bwd(reference, inputs)
    out_k, grads_k, _ = _fwd_bwd(kernel, inputs, cotangents)
    errors = {f"out{i}": _rel_error(a, b, dtype) for i, (a, b) in enumerate(zip(out_k, out_r))}
    for i, (a, b) in enumerate(zip(grads_k, grads_r)):
        if b is not None:
            errors[f"grad{i}"] = _rel_error(a, b, dtype) if a is not None else float("inf")
    finite = all(torch.isfinite(t).all() for t in [*out_k, *(g for g in grads_k if g is not None)])
    worst = max(errors.values())
    return {"max_rel_error": worst, "errors": errors, "ok": bool(finite and worst <= TOLERANCE[dtype])}


# --------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------
def _mhc_cases(shape: dict, device: torch.device):
    """Every mHC kernel against the torch path (the cases of `bench_mhc_kernels.py`)."""
    dtype = DTYPES[shape["dtype"]]
    cases = mhc_op_cases(shape["tokens"], shape["hidden"], shape["n"], dtype, iterations=20, device=device)
    for name, (kernel, reference, inputs, kwargs) in cases.items():
        yield (
            dict(kernel=name, **shape),
            partial(kernel, **kwargs),
            partial(reference, **kwargs),
            inputs,
            dtype,
        )


def _decay_inputs(shape: dict, device: torch.device, T: int):
    B, H, K, V, dtype = shape["B"], shape["H"], shape["K"], shape["V"], DTYPES[shape["dtype"]]
    q = torch.randn(B, H, T, K, dtype=dtype, device=device) * K**-0.5
    k = torch.randn(B, H, T, K, dtype=dtype, device=device) * K**-0.5
    v = torch.randn(B, H, T, V, dtype=dtype, device=device)
    g_shape = (B, H, T, K) if shape["vector"] else (B, H, T)
    log_decay = torch.nn.functional.logsigmoid(4 + torch.randn(g_shape, device=device))  # decays around 0.98
    state = torch.randn(B, H, K, V, device=device)
    return [t.requires_grad_(True) for t in (q, k, v, log_decay, state)]


def _fla_chunk(vector: bool):
    """`(q, k, v, g, h0) -> o`, all in our `[B, H, T, ·]` layout, through flash-linear-attention (which takes and
    returns `[B, T, H, ·]`), or None."""
    try:
        if vector:
            from fla.ops.gla import chunk_gla as op
        else:
            from fla.ops.simple_gla import chunk_simple_gla as op
    except Exception:  # noqa: BLE001 - fla is optional; any import failure means "not compared"
        return None

    # fla's layout is [B, T, H, K]; older releases defaulted to head-first, so say it where it is an argument.
    layout = {"head_first": False} if "head_first" in inspect.signature(op).parameters else {}

    def run(q, k, v, g, h0):
        def to_bthk(t):
            return t.transpose(1, 2).contiguous()

        o, _ = op(
            to_bthk(q),
            to_bthk(k),
            to_bthk(v),
            to_bthk(g),
            scale=1.0,
            initial_state=h0,
            output_final_state=True,
            **layout,
        )
        return o.transpose(1, 2)

    return run


def _decay_chunk(q, k, v, g, h0, chunk_size: int, backend: str):
    """Our chunked decay op (scale 1, from the state `h0`, returning the final state) through `backend`."""
    from transformers_mhc.models import decay_ops

    return decay_ops.chunk_decay_linear_attn(
        q, k, v, g, 1.0, h0, True, chunk_size=chunk_size, kernel_backend=backend
    )


def _decay_cases(shapes: dict, device: torch.device):
    from transformers_mhc.models import decay_ops

    for shape in shapes["decay"]:
        inputs = _decay_inputs(shape, device, shape["T"])
        kernel = "chunk_gla_vector" if shape["vector"] else "chunk_simple_scalar"
        yield (
            dict(kernel=kernel, **shape),
            partial(_decay_chunk, chunk_size=shape["chunk_size"], backend="triton"),
            partial(_decay_chunk, chunk_size=shape["chunk_size"], backend="torch"),
            inputs,
            DTYPES[shape["dtype"]],
        )
    for shape in shapes["decode"]:
        inputs = _decay_inputs(shape, device, 1)

        def step(q, k, v, g, h0, backend):
            return decay_ops.recurrent_decay_linear_attn(q, k, v, g, 1.0, h0, True, kernel_backend=backend)

        yield (
            dict(kernel="recurrent_decode", T=1, **shape),
            partial(step, backend="triton"),
            partial(step, backend="torch"),
            inputs,
            DTYPES[shape["dtype"]],
        )


def _check_kernel(case, timer) -> dict:
    meta, kernel, reference, inputs, dtype = case
    row = dict(meta, **_compare(kernel, reference, inputs, dtype))
    _, _, cotangents = _fwd_bwd(reference, inputs)
    row["torch_ms"] = timer(lambda: _fwd_bwd(reference, inputs, cotangents))
    row["triton_ms"] = timer(lambda: _fwd_bwd(kernel, inputs, cotangents))
    row["speedup_vs_torch"] = row["torch_ms"] / row["triton_ms"]
    return row


def _check_compiled(
    name: str, kernel: Callable, inputs: list[torch.Tensor], dtype, cuda: bool, timer
) -> dict:
    """The public kernel functions under `torch.compile(fullgraph=True)` (they are registered custom ops, so the
    graph holds them whole) against the same functions eagerly: forward, gradients and time."""
    compiled = torch.compile(kernel, fullgraph=True, backend="inductor" if cuda else "aot_eager")
    start = time.perf_counter()
    row = {
        "case": name,
        "dtype": str(dtype).removeprefix("torch."),
        **_compare(compiled, kernel, inputs, dtype),
    }
    row["first_call_s"] = time.perf_counter() - start  # compilation included
    _, _, cotangents = _fwd_bwd(kernel, inputs)
    row["eager_ms"] = timer(lambda: _fwd_bwd(kernel, inputs, cotangents))
    row["compiled_ms"] = timer(lambda: _fwd_bwd(compiled, inputs, cotangents))
    return row


def _compiled_cases(shapes: dict, device: torch.device):
    """(name, function of tensors, inputs, dtype): one sub-layer's four mHC ops chained, and the decay chunk op."""
    from transformers_mhc.kernels.mhc import (
        hc_pre_mix_triton,
        hc_res_post_mix_triton,
        mhc_coefficients_triton,
        sinkhorn_knopp_triton,
    )

    shape = shapes["compiled"]["mhc"]
    n, C, dtype = shape["n"], shape["hidden"], DTYPES[shape["dtype"]]
    width = n * n + 2 * n

    def hyper_connection(x, phi, alpha, static_bias):
        h_pre, h_post, res_logits = mhc_coefficients_triton(x.flatten(-2), phi, alpha, static_bias, 1e-6)
        h_res = sinkhorn_knopp_triton(res_logits, num_iterations=20)
        layer_input = hc_pre_mix_triton(h_pre, x)
        f = torch.tanh(layer_input)  # stands in for the sub-layer
        return hc_res_post_mix_triton(h_res, x, h_post, f)

    mhc_inputs = [
        torch.randn(shape["tokens"], n, C, dtype=dtype, device=device),
        torch.randn(width, n * C, device=device) / (n * C) ** 0.5,
        torch.full((3,), 0.01, device=device),
        torch.randn(width, device=device),
    ]
    yield (
        "mhc_sublayer " + " ".join(f"{k}={v}" for k, v in shape.items()),
        hyper_connection,
        [t.requires_grad_(True) for t in mhc_inputs],
        dtype,
    )
    shape = shapes["compiled"]["decay"]
    yield (
        "chunk_decay " + " ".join(f"{k}={v}" for k, v in shape.items()),
        partial(_decay_chunk, chunk_size=shape["chunk_size"], backend="triton"),
        _decay_inputs(shape, device, shape["T"]),
        DTYPES[shape["dtype"]],
    )


def _check_peer(shape: dict, device: torch.device, timer) -> dict:
    """Our chunk kernel against flash-linear-attention's on the same inputs: forward + backward time, or forward
    only (both sides) where fla refuses its backward on this Triton and GPU."""
    fla = _fla_chunk(shape["vector"])
    row = dict(kernel="chunk_gla_vector" if shape["vector"] else "chunk_simple_scalar", **shape)
    if fla is None:
        return dict(row, ok=True, fla="not installed")
    inputs = _decay_inputs(shape, device, shape["T"])

    def ours(q, k, v, g, h0):  # the output only, as fla's side returns
        return _decay_chunk(q, k, v, g, h0, chunk_size=shape["chunk_size"], backend="triton")[0]

    dtype = DTYPES[shape["dtype"]]
    with torch.no_grad():
        row["fla_out_rel_error"] = _rel_error(fla(*inputs), ours(*inputs), dtype)
    try:
        fla_cot = [torch.randn_like(o) for o in _fwd_bwd(fla, inputs)[0]]
        row["mode"] = "forward+backward"
        row["fla_ms"] = timer(lambda: _fwd_bwd(fla, inputs, fla_cot))
        row["triton_ms"] = timer(lambda: _fwd_bwd(ours, inputs, fla_cot))
    except Exception as error:  # noqa: BLE001 - fla guards known-bad Triton/GPU pairs in its backward
        row["fla_backward_error"] = f"{type(error).__name__}: {error}"
        row["mode"] = "forward only"
        with torch.no_grad():
            row["fla_ms"] = timer(lambda: fla(*inputs))
            row["triton_ms"] = timer(lambda: ours(*inputs))
    row["throughput_vs_fla"] = row["fla_ms"] / row["triton_ms"]
    row["ok"] = row["fla_out_rel_error"] <= TOLERANCE[dtype]
    return row


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------
def _model_configs(cpu: bool) -> dict[str, tuple[type, dict]]:
    from transformers_mhc import DecayLinearAttnForCausalLM, MHCForCausalLM

    if cpu:
        mhc = dict(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
        decay = dict(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=1,
            chunk_size=16,
            decay_granularity="vector",
            hyper_connection="mhc",
            num_streams=2,
        )
    else:
        mhc = dict(
            vocab_size=32000,
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=4,
            num_attention_heads=16,
        )
        decay = dict(
            vocab_size=32000,
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=4,
            num_attention_heads=8,
            decay_granularity="vector",
            hyper_connection="mhc",
            num_streams=4,
        )
    return {
        "mhc_n4": (MHCForCausalLM, dict(mhc, num_streams=4, hyper_connection="mhc")),
        "plain_residual": (MHCForCausalLM, dict(mhc, num_streams=1, hyper_connection="none")),
        "decay_vector_mhc_n4" if not cpu else "decay_vector_mhc_n2": (DecayLinearAttnForCausalLM, decay),
    }


def _profile(step: Callable[[], object], device: torch.device, top: int = 12) -> dict:
    """One `step` under torch.profiler: its wall time, the summed device time of its kernels (far below the wall
    time: the host issuing ops is the bound), and the ops with the most self host and self device time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        wall_ms = _wall_ms(step, device)
    averages = prof.key_averages()

    def device_us(event) -> float:  # `self_device_time_total` since torch 2.4; before, `self_cuda_time_total`
        return float(getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)))

    def table(key) -> list[dict]:
        ranked = sorted(averages, key=key, reverse=True)[:top]
        return [
            dict(
                op=e.key,
                calls=e.count,
                self_host_ms=e.self_cpu_time_total / 1e3,
                self_device_ms=device_us(e) / 1e3,
            )
            for e in ranked
        ]

    return {
        "wall_ms": wall_ms,
        "device_ms": sum(device_us(e) for e in averages) / 1e3,
        "ops_issued": sum(e.count for e in averages if e.key.startswith(("aten::", "transformers_mhc::"))),
        "top_by_device": table(device_us) if device.type == "cuda" else [],
        "top_by_host": table(lambda e: e.self_cpu_time_total),
    }


def _run_model(model_class, config_kwargs: dict, backend: str, ids, setup: dict, timer, row: dict):
    """One backend: its training step and greedy generation, timed into `row`; returns (loss, grads, tokens)."""
    torch.manual_seed(0)
    config = model_class.config_class(**config_kwargs, kernel_backend=backend)
    model = model_class(config).to(ids.device, DTYPES[setup["dtype"]]).train()

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss

    loss = step().detach().float()
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
    row[f"{backend}_train_step_ms"] = timer(step)
    if setup.get("profile"):
        row[f"{backend}_profile"] = _profile(step, ids.device)
    if setup.get("compile"):
        # The whole model under torch.compile (the kernels are registered ops): it removes the per-op host
        # overhead that bounds a small model's eager step on a GPU.
        compiled = torch.compile(model, backend="inductor" if ids.is_cuda else "aot_eager")

        def compiled_step():
            model.zero_grad(set_to_none=True)
            compiled(ids, labels=ids).loss.backward()

        start = time.perf_counter()
        compiled_step()
        row[f"{backend}_compile_s"] = time.perf_counter() - start
        row[f"{backend}_compiled_train_step_ms"] = timer(compiled_step)
    model.zero_grad(set_to_none=True)
    model.eval()
    prompt = ids[:1, : min(32, ids.shape[1] // 2)]
    generate = partial(
        model.generate, prompt, max_new_tokens=setup["new_tokens"], do_sample=False, pad_token_id=0
    )
    with torch.no_grad():
        tokens = generate()[0, prompt.shape[1] :]  # also the warm-up of the timed run
        row[f"{backend}_generate_ms"] = _wall_ms(generate, ids.device)  # seconds long: one run is enough
    return loss, grads, tokens


def _fp32_gradients(model_class, config_kwargs: dict, ids) -> torch.Tensor:
    """Every parameter gradient of one fp32 training step on the torch path, flattened (same init as `_run_model`)."""
    torch.manual_seed(0)
    model = (
        model_class(model_class.config_class(**config_kwargs, kernel_backend="torch")).to(ids.device).train()
    )
    model(ids, labels=ids).loss.backward()
    return torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])


def _check_model(name: str, model_class, config_kwargs: dict, setup: dict, device, timer) -> dict:
    dtype = DTYPES[setup["dtype"]]
    ids = torch.randint(0, config_kwargs["vocab_size"], (setup["batch"], setup["seq"]), device=device)
    row: dict = {"model": name, **{k: setup[k] for k in ("batch", "seq", "dtype")}, "config": config_kwargs}
    results = {
        backend: _run_model(model_class, config_kwargs, backend, ids, setup, timer, row)
        for backend in ("torch", "triton")
    }
    (loss_t, grads_t, tokens_t), (loss_k, grads_k, tokens_k) = results["torch"], results["triton"]
    row["loss_rel_error"] = abs(loss_k - loss_t).item() / abs(loss_t).item()
    row["grad_rel_error"] = ((grads_k - grads_t).norm() / grads_t.norm()).item()
    row["generated_tokens_equal"] = int((tokens_t == tokens_k).sum())
    row["generated_tokens"] = int(tokens_t.numel())
    row["train_step_speedup"] = row["torch_train_step_ms"] / row["triton_train_step_ms"]
    finite = bool(torch.isfinite(grads_k).all())
    if dtype == torch.float32:  # the same math in another order: close agreement and the same greedy tokens
        bound = TOLERANCE[dtype]
        row["ok"] = finite and row["loss_rel_error"] <= bound and row["grad_rel_error"] <= bound
        row["ok"] = row["ok"] and row["generated_tokens_equal"] == row["generated_tokens"]
        return row
    # 16-bit: both paths round, differently, and a deep model's gradients carry that rounding (the decay model's
    # torch path in bf16 is ~5.5 % off its own fp32 gradients on CPU). Judge each against fp32 (torch path): the
    # kernels must not round materially worse than the torch path. Greedy tokens may diverge after a near-tie.
    reference = _fp32_gradients(model_class, config_kwargs, ids)
    row["torch_grad_error_vs_fp32"] = ((grads_t - reference).norm() / reference.norm()).item()
    row["triton_grad_error_vs_fp32"] = ((grads_k - reference).norm() / reference.norm()).item()
    row["ok"] = finite and row["triton_grad_error_vs_fp32"] <= 1.25 * row["torch_grad_error_vs_fp32"] + 1e-3
    return row


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------
def _environment(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    for package in ("triton", "transformers", "fla"):
        try:
            env[package] = __import__(package).__version__
        except Exception:  # noqa: BLE001
            env[package] = None
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = "cpu (Triton interpreter)"
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output", type=Path, help="JSON file to write")
    parser.add_argument(
        "--cpu", action="store_true", help="run through the Triton interpreter on tiny shapes"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=360.0,
        help="start no case after this many seconds (default leaves 2 of 8 minutes)",
    )
    parser.add_argument("--skip-models", action="store_true", help="kernels only")
    parser.add_argument(
        "--profile-models",
        action="store_true",
        help="also profile one training step of each model (host vs device time, the costliest ops)",
    )
    parser.add_argument(
        "--compile-models",
        action="store_true",
        help="also time each model's training step under torch.compile (inductor on a GPU: about a minute each)",
    )
    parser.add_argument(
        "--cases",
        type=re.compile,
        default=None,
        help="run only the cases whose label matches this regular expression (e.g. 'chunk|model')",
    )
    args = parser.parse_args(argv)

    cpu = args.cpu or not torch.cuda.is_available()
    if cpu and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error(
            "--cpu needs TRITON_INTERPRET=1 before the kernels are imported (run this file as a script)"
        )
    from transformers_mhc.outputs import fresh_path

    output = fresh_path(args.output, overwrite=args.overwrite)
    device = torch.device("cpu" if cpu else "cuda")
    timer = _timer(cuda=not cpu)
    shapes = _shapes(cpu)
    start = time.perf_counter()
    payload = {
        "benchmark": "gpu_check",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "mode": "cpu-interpreter" if cpu else "cuda",
        "timing": "interpreter: one run, not a speed figure" if cpu else "triton.testing.do_bench median, ms",
        "environment": _environment(device),
        "kernels": [],
        "models": [],
        "compiled": [],
        "peers": [],
        "skipped": [],
        "failures": [],
    }

    def record(section: str, label: str, run: Callable[[], dict]) -> None:
        if args.cases is not None and not args.cases.search(label):
            return
        if time.perf_counter() - start > args.budget_s:
            payload["skipped"].append(label)
            return
        try:
            row = run()
        except Exception as error:  # noqa: BLE001 - one failing case must not hide the others
            row = {"case": label, "ok": False, "error": f"{type(error).__name__}: {error}"}
            row["traceback"] = traceback.format_exc(limit=6)
        payload[section].append(row)
        if not row.get("ok", False):
            payload["failures"].append(label)
        payload["elapsed_s"] = time.perf_counter() - start
        write_json(output, payload)
        print(f"{'ok  ' if row.get('ok') else 'FAIL'} {label} {row.get('error', '')}", flush=True)

    torch.manual_seed(0)
    cases = [case for shape in shapes["mhc"] for case in _mhc_cases(shape, device)]
    cases += list(_decay_cases(shapes, device))
    for case in cases:
        label = "kernel " + " ".join(f"{k}={v}" for k, v in case[0].items())
        record("kernels", label, partial(_check_kernel, case, timer))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not args.skip_models:
        for name, (model_class, config_kwargs) in _model_configs(cpu).items():
            record(
                "models",
                f"model {name}",
                partial(
                    _check_model,
                    name,
                    model_class,
                    config_kwargs,
                    dict(shapes["models"], compile=args.compile_models, profile=args.profile_models),
                    device,
                    timer,
                ),
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for name, kernel, inputs, dtype in _compiled_cases(shapes, device):
        record(
            "compiled",
            f"compiled {name}",
            partial(_check_compiled, name, kernel, inputs, dtype, device.type == "cuda", timer),
        )
    for shape in shapes["peers"]:
        label = "peer fla " + " ".join(f"{k}={v}" for k, v in shape.items())
        record("peers", label, partial(_check_peer, shape, device, timer))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    plain = next((row for row in payload["models"] if row.get("model") == "plain_residual"), None)
    mhc = next((row for row in payload["models"] if row.get("model") == "mhc_n4"), None)
    if plain and mhc and "triton_train_step_ms" in plain and "triton_train_step_ms" in mhc:
        # The mHC paper's figure: training-step time of n = 4 streams over the plain residual model.
        payload["mhc_overhead_vs_plain"] = mhc["triton_train_step_ms"] / plain["triton_train_step_ms"]
        if "triton_compiled_train_step_ms" in mhc and "triton_compiled_train_step_ms" in plain:
            payload["mhc_overhead_vs_plain_compiled"] = (
                mhc["triton_compiled_train_step_ms"] / plain["triton_compiled_train_step_ms"]
            )
    payload["elapsed_s"] = time.perf_counter() - start
    payload["all_ok"] = not payload["failures"]
    write_json(output, payload)
    print(f"wrote {output} in {payload['elapsed_s']:.0f} s; failures: {payload['failures'] or 'none'}")
    return 0 if payload["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
