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
"""Times each mHC Triton kernel against its PyTorch reference (forward + backward) and writes JSON.

    python benchmarks/bench_mhc_kernels.py                       # defaults: n=4, C=2048, 8192 tokens
    python benchmarks/bench_mhc_kernels.py --tokens 4096 --hidden 1024 --streams 4 6 --dtypes bf16

Needs a CUDA GPU: the kernels only launch there (on CPU they run only through the slow Triton interpreter, which
says nothing about speed). Without one the script says so and writes a JSON recording that no timing was taken.

For every kernel, both sides run in the same process on the same inputs: the reference is the torch path of
the models' torch path (`hyper_connection.TORCH_OPS`: what `kernel_backend="torch"` runs), timed eagerly. Reported per
row: median milliseconds of forward + backward (`triton.testing.do_bench`), the speed-up, peak memory of one
forward + backward, and the largest difference between the two outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from transformers_mhc.outputs import fresh_path

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "bench_mhc_kernels.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def write_json(path: Path, payload: dict) -> None:
    # Write to a temporary file and rename, so an interrupted run never leaves a half-written result.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".json.tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(payload, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)


def _environment() -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
    else:
        env["device"] = "cpu"
    return env


def mhc_op_cases(
    tokens: int, hidden: int, n: int, dtype: torch.dtype, iterations: int, device: str = "cuda"
) -> dict[str, tuple]:
    """Per mHC op: (Triton kernel, the torch path's op, inputs needing grad, extra kwargs). Also used by
    `gpu_check.py`. (The torch path equals the plain formulas of `mhc_ops`: `tests/test_mhc_ops.py`.)"""
    from transformers_mhc.kernels.mhc import (
        hc_pre_mix_triton,
        hc_res_post_mix_triton,
        mhc_coefficients_triton,
        sinkhorn_knopp_triton,
    )
    from transformers_mhc.models.hyper_connection import TORCH_OPS

    width = n * n + 2 * n

    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.to(device).requires_grad_(True)

    x = leaf(torch.randn(tokens, n, hidden, dtype=dtype))
    return {
        "sinkhorn_knopp": (
            sinkhorn_knopp_triton,
            TORCH_OPS.sinkhorn_knopp,
            [leaf(torch.randn(tokens, n, n))],
            {"num_iterations": iterations},
        ),
        "mhc_coefficients": (
            mhc_coefficients_triton,
            TORCH_OPS.mhc_coefficients,
            [
                leaf(torch.randn(tokens, n * hidden, dtype=dtype)),
                leaf(torch.randn(width, n * hidden) / (n * hidden) ** 0.5),
                leaf(torch.full((3,), 0.01)),
                leaf(torch.randn(width)),
            ],
            {"eps": 1e-6},
        ),
        "hc_pre_mix": (hc_pre_mix_triton, TORCH_OPS.hc_pre_mix, [leaf(torch.rand(tokens, n)), x], {}),
        "hc_res_post_mix": (
            hc_res_post_mix_triton,
            TORCH_OPS.hc_res_post_mix,
            [
                leaf(torch.rand(tokens, n, n)),
                x,
                leaf(torch.rand(tokens, n)),
                leaf(torch.randn(tokens, hidden, dtype=dtype)),
            ],
            {},
        ),
    }


def _fwd_bwd(fn: Callable, inputs: list[torch.Tensor], kwargs: dict, cotangents: list[torch.Tensor] | None):
    outputs = fn(*inputs, **kwargs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    if cotangents is None:
        return outputs
    torch.autograd.grad(outputs, inputs, cotangents)
    return outputs


def _peak_mb(run: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _bench_case(kernel, reference, inputs, kwargs) -> dict:
    from triton.testing import do_bench

    ref_out = _fwd_bwd(reference, inputs, kwargs, None)
    cotangents = [torch.randn_like(o) for o in ref_out]
    tri_out = _fwd_bwd(kernel, inputs, kwargs, None)
    max_diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(tri_out, ref_out))
    del ref_out, tri_out

    def run_triton():
        return _fwd_bwd(kernel, inputs, kwargs, cotangents)

    def run_torch():
        return _fwd_bwd(reference, inputs, kwargs, cotangents)

    torch_ms = do_bench(run_torch)
    triton_ms = do_bench(run_triton)
    return {
        "torch_ms": torch_ms,
        "triton_ms": triton_ms,
        "speedup": torch_ms / triton_ms,
        "torch_peak_mb": _peak_mb(run_torch),
        "triton_peak_mb": _peak_mb(run_triton),
        "max_abs_diff_forward": max_diff,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=8192, help="tokens (batch × sequence) per call")
    parser.add_argument("--hidden", type=int, default=2048, help="hidden size C")
    parser.add_argument("--streams", type=int, nargs="+", default=[4], help="stream counts n")
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    parser.add_argument("--sinkhorn-iterations", type=int, default=20)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing result file (default: write beside it as NAME-2.json, ...)",
    )
    args = parser.parse_args(argv)
    args.output = fresh_path(args.output, overwrite=args.overwrite)

    config = {
        "tokens": args.tokens,
        "hidden": args.hidden,
        "streams": args.streams,
        "dtypes": args.dtypes,
        "sinkhorn_iterations": args.sinkhorn_iterations,
        "measure": "forward + backward, median ms (triton.testing.do_bench); eager torch reference",
    }
    payload = {"benchmark": "mhc_kernels", "environment": _environment(), "config": config}
    if not torch.cuda.is_available():
        message = (
            "No CUDA GPU found: the mHC Triton kernels only launch on GPUs (on CPU they run solely through the "
            "Triton interpreter, which is a correctness tool, not a speed one). No timings were taken."
        )
        print(message)
        payload.update(status="skipped", reason=message, results=[])
        write_json(args.output, payload)
        print(f"wrote {args.output}")
        return payload

    torch.manual_seed(0)
    results = []
    for n in args.streams:
        for dtype_name in args.dtypes:
            cases = mhc_op_cases(args.tokens, args.hidden, n, DTYPES[dtype_name], args.sinkhorn_iterations)
            for name, (kernel, reference, inputs, kwargs) in cases.items():
                row = {"kernel": name, "streams": n, "dtype": dtype_name}
                row.update(_bench_case(kernel, reference, inputs, kwargs))
                results.append(row)
                print(
                    f"{name:18s} n={n} {dtype_name}: torch {row['torch_ms']:.3f} ms, triton {row['triton_ms']:.3f} ms "
                    f"({row['speedup']:.2f}x), peak MB {row['torch_peak_mb']:.1f} -> {row['triton_peak_mb']:.1f}"
                )
            del cases
            torch.cuda.empty_cache()
    payload.update(status="ok", results=results)
    write_json(args.output, payload)
    print(f"wrote {args.output}")
    return payload


if __name__ == "__main__":
    main()
