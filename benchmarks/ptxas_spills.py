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
"""Registers and spills of every Triton kernel compiled offline for a GPU (default sm_90, the H100), no GPU needed.

    python benchmarks/ptxas_spills.py /tmp/ptxas.json              # K = V in {64, 128, 256}, bf16, fp32, fp32 + TF32
    python benchmarks/ptxas_spills.py /tmp/ptxas.json --head-dims 64 --dtypes bf16

Each kernel is compiled by Triton (`triton.compile` with a `GPUTarget`, the launch options the wrappers use) with
the tile sizes the wrappers derive for that shape, and once per launch configuration its autotuner may pick there
(`kernels/decay_autotune.py`); its PTX is then assembled again by the `ptxas` that Triton ships, with `-v`, whose
report gives the registers per thread and the bytes spilled to local memory. The decay kernels are compiled per
key/value head dim, decay granularity and dtype; the mHC kernels per dtype for `--streams` streams. Takes a second
or a few per kernel on a CPU (a few hundred compiles with the defaults).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Compiled kernels, not interpreted ones: must be decided before the kernels are imported.
os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

# Input dtypes and the pointer type they compile with: "tf32" is fp32 inputs with TF32 matrix products (the decay
# chunk kernels under `torch.set_float32_matmul_precision("high")`; the mHC kernels' fp32 jobs include their TF32
# variants already, so they are not compiled again for "tf32").
TL_DTYPE_NAMES = {"bf16": "bf16", "fp32": "fp32", "tf32": "fp32"}
# The decay kernels' pointers that carry the model dtype; every other pointer is fp32 (decay, states, ...).
DECAY_TYPED = {"q_ptr", "k_ptr", "v_ptr", "do_ptr", "o_ptr", "dq_ptr", "dk_ptr", "dv_ptr"}
PTXAS_INFO = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")


def _jit_function(fn):
    """The `triton.jit` function under a `triton.autotune` wrapper (or `fn` itself)."""
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn


def _signature(fn, constexprs: dict, typed: set[str], dtype: str) -> dict[str, str]:
    signature = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + (TL_DTYPE_NAMES.get(dtype, dtype) if name in typed else "fp32")
        elif name in ("scale", "eps"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def _decay_jobs(head_dim: int, vector: bool, dtype: str):
    """The decay kernels with the tiles and launch options `decay_chunk._geometry` gives K = V = head_dim and
    chunks of 64, the autotuned ones once per candidate their autotuner admits there."""
    import torch

    from transformers_mhc.kernels import decay_chunk as dc
    from transformers_mhc.kernels import decay_recurrent as dr

    K = V = head_dim
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    qk = torch.empty(1, 1, 64, K, device="meta", dtype=torch_dtype)
    log_decay = torch.empty((1, 1, 64, K) if vector else (1, 1, 64), device="meta")
    # The wrappers read torch's float32 matmul setting when they launch: "tf32" compiles the TF32 variant.
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if dtype == "tf32" else "highest")
    try:
        geo = dc._geometry(qk, qk.new_empty(1, 1, 64, V), log_decay, chunk_size=64)
    finally:
        torch.set_float32_matmul_precision(previous)

    def split(meta):  # (constexprs, launch options)
        launch = {key: meta.pop(key) for key in ("num_warps", "num_stages")}
        return meta, launch

    matmul = geo.meta()
    rows = dict(BT=geo.BT, BR=geo.BR, VECTOR=vector)
    GK, GBK = geo.GK, geo.GBK
    recurrent = dict(K=K, V=V, GK=GK, BK=triton.next_power_of_2(K), GBK=GBK, HAS_H0=True, STORE_HT=True)

    def chunk(kernel, constexprs):
        return _autotuned(kernel, constexprs, dc.matmul_config_fits, torch_dtype)

    return [
        (dc._chunk_cumsum_kernel, dict(GK=GK, BT=geo.BT, GBK=GBK), {}),
        *chunk(dc._chunk_state_fwd_kernel, dict(matmul, BT=geo.BT, HAS_H0=True, STORE_HT=True)),
        (dc._chunk_output_fwd_kernel, *split(geo.row_meta())),
        *chunk(dc._chunk_state_bwd_kernel, dict(matmul, BT=geo.BT, HAS_DHT=True, STORE_DH0=True)),
        (dc._chunk_dv_bwd_kernel, *split(geo.dv_meta())),
        (dc._chunk_dqk_bwd_kernel, *split(dict(geo.dqk_meta(), **rows))),
        (dc._chunk_dlog_decay_bwd_kernel, dict(geo.meta(False), BT=geo.BT, NV=geo.NV, VECTOR=vector), {}),
        *_autotuned(dr._fused_recurrent_fwd_kernel, recurrent, dr.recurrent_config_fits, torch_dtype),
    ]


def _autotuned(kernel, constexprs: dict, fits, dtype) -> list[tuple]:
    """One job per config the autotuner of `kernel` may pick for these head dims and dtype."""
    from transformers_mhc.kernels.decay_autotune import admitted_configs

    configs = admitted_configs(kernel.configs, fits, constexprs["K"], constexprs["V"], dtype)
    return [
        (
            kernel,
            {**constexprs, **config.kwargs},
            {"num_warps": config.num_warps, "num_stages": config.num_stages},
        )
        for config in configs
    ]


def _mhc_jobs(n: int, dtype: str):
    """Every mHC kernel variant its launchers compile for `n` streams of `dtype` (`kernels.mhc.compile_jobs`: many
    tokens, hidden size 4096; training and decode tiles, split-K, each matmul precision)."""
    import torch

    from transformers_mhc.kernels.mhc import compile_jobs

    return compile_jobs(n, {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype])


def _mhc_stream_pointers() -> frozenset[str]:
    """The mHC kernels' pointers that carry the model dtype (the others are fp32)."""
    from transformers_mhc.kernels.mhc import STREAM_POINTERS

    return STREAM_POINTERS


def _ptxas_report(ptx: str, arch: int) -> dict:
    # The ptxas Triton itself uses for this architecture (the bundled one that understands its PTX version).
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as fh:
        fh.write(ptx)
        fh.flush()
        result = subprocess.run(
            [get_ptxas(arch).path, f"-arch=sm_{arch}a", "-v", "-o", os.devnull, fh.name],
            capture_output=True,
            text=True,
            check=True,
        )
    report = result.stdout + result.stderr
    stack, stores, loads = map(int, PTXAS_INFO.search(report).groups())
    return {
        "registers": int(PTXAS_REGISTERS.search(report).group(1)),
        "stack_bytes": stack,
        "spill_store_bytes": stores,
        "spill_load_bytes": loads,
    }


def compile_and_report(fn, constexprs: dict, options: dict, typed: set[str], dtype: str, arch: int) -> dict:
    fn = _jit_function(fn)
    source = ASTSource(fn=fn, signature=_signature(fn, constexprs, typed, dtype), constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    return {
        "num_warps": compiled.metadata.num_warps,
        "num_stages": compiled.metadata.num_stages,
        "shared_bytes": compiled.metadata.shared,
        **_ptxas_report(compiled.asm["ptx"], arch),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output", type=Path, help="JSON file to write")
    parser.add_argument(
        "--arch", type=int, default=90, help="compute capability, e.g. 90 (H100) or 80 (A100)"
    )
    parser.add_argument(
        "--head-dims", type=int, nargs="+", default=[64, 128, 256], help="K = V of the decay kernels"
    )
    parser.add_argument(
        "--dtypes", nargs="+", default=["bf16", "fp32", "tf32"], choices=sorted(TL_DTYPE_NAMES)
    )
    parser.add_argument("--streams", type=int, default=4, help="n of the mHC kernels")
    parser.add_argument("--skip-mhc", action="store_true")
    parser.add_argument("--kernels", nargs="+", help="compile only the kernels with these names")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    args = parser.parse_args(argv)
    from transformers_mhc.outputs import fresh_path

    output = fresh_path(args.output, overwrite=args.overwrite)

    jobs = []
    for dtype in args.dtypes:
        for head_dim in args.head_dims:
            for vector in (False, True):
                meta = {"family": "decay", "dtype": dtype, "head_dim": head_dim, "vector": vector}
                jobs += [(meta, job, DECAY_TYPED) for job in _decay_jobs(head_dim, vector, dtype)]
        if not args.skip_mhc and dtype != "tf32":
            meta = {"family": "mhc", "dtype": dtype, "streams": args.streams}
            jobs += [(meta, job, _mhc_stream_pointers()) for job in _mhc_jobs(args.streams, dtype)]

    if args.kernels:
        jobs = [job for job in jobs if _jit_function(job[1][0]).fn.__name__ in args.kernels]

    rows = []
    start = time.perf_counter()
    for meta, (fn, constexprs, options), typed in jobs:
        launch = ", ".join(
            [
                f"{key}={constexprs[key]}"
                for key in ("BV", "BLOCK_T", "BLOCK_C", "DOT_PRECISION", "SPLIT")
                if key in constexprs
            ]
            + [f"{key}={value}" for key, value in options.items()]
        )
        row = {"kernel": _jit_function(fn).fn.__name__, **meta, "launch": launch}
        try:
            row.update(compile_and_report(fn, constexprs, options, typed, meta["dtype"], args.arch))
        except Exception as error:  # noqa: BLE001 - a kernel that does not compile is a finding, not a crash
            row["error"] = f"{type(error).__name__}: {str(error)[-500:]}"
        rows.append(row)
        shape = (
            f"K=V={meta['head_dim']} {'vector' if meta['vector'] else 'scalar'}" if "head_dim" in meta else ""
        )
        figures = (
            f"{row['registers']:3d} regs, spill {row['spill_store_bytes']} B st / {row['spill_load_bytes']} B ld"
            if "registers" in row
            else row["error"]
        )
        print(f"{row['kernel']:32s} {meta['dtype']} {shape:20s} {launch:32s} {figures}", flush=True)

    spilling = [row for row in rows if row.get("spill_store_bytes", 0) or row.get("spill_load_bytes", 0)]
    payload = {
        "benchmark": "ptxas_spills",
        "arch": f"sm_{args.arch}a",
        "triton": triton.__version__,
        "elapsed_s": time.perf_counter() - start,
        "kernels": rows,
        "spilling": [
            f"{r['kernel']} {r['dtype']} {r.get('head_dim', '')} {r.get('vector', '')} {r['launch']}"
            for r in spilling
        ],
        "errors": [row for row in rows if "error" in row],
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {output}: {len(rows)} kernels, {len(spilling)} spilling, {len(payload['errors'])} errors")
    return 1 if payload["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
