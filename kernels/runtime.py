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
"""Where the Triton kernels can launch, and the device guard every launcher uses (torch and triton only).

`triton.jit` decides at decoration time whether a kernel is compiled for the GPU or interpreted on the host
(`TRITON_INTERPRET=1`), so the mode is read once, when the kernel modules are imported.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton

# The kernels need triton >= 3.4 (`triton.knobs`, and the language features they use). A CUDA build of torch brings
# its own triton, which may be older: an ImportError then makes the ops take the torch path, as without triton.
if not hasattr(triton, "knobs"):
    raise ImportError(f"transformers-mhc's Triton kernels need triton >= 3.4, found {triton.__version__}")
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)


def can_launch_on(device: torch.device) -> bool:
    """Whether kernels compiled in this process run on tensors of `device`: CUDA tensors when compiled for the
    GPU, CPU tensors under the interpreter (which only the tests and `benchmarks/gpu_check.py --cpu` use)."""
    if device.type == "cuda":
        return not INTERPRETED and torch.cuda.is_available()
    return device.type == "cpu" and INTERPRETED


# An H100's streaming multiprocessors: the launch heuristics' program count for the interpreter and for offline
# compiles (`benchmarks/ptxas_spills.py` targets sm_90), where there is no GPU to ask.
H100_SM_COUNT = 132


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device`, which the launchers aim to give at least one program each (split-K of
    the mHC coefficients at decode, the mix kernels' tiles); `H100_SM_COUNT` off the GPU."""
    if device.type != "cuda":
        return H100_SM_COUNT
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def device_guard(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Makes `tensor`'s GPU current while launching: Triton launches on the current device, so a tensor on
    `cuda:1` while `cuda:0` is current would otherwise be read from the wrong device. No-op on CPU tensors
    (interpreter)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def dot_precision(dtype: torch.dtype) -> str:
    """`input_precision` for `tl.dot` on operands of `dtype`, as torch's own matmuls would choose it.

    16-bit operands go to the tensor cores whatever the flag says. fp32 operands use TF32 tensor cores only when the
    user allowed it for torch's matmuls (`torch.set_float32_matmul_precision("high")` or `"medium"`); torch's
    default, `"highest"`, keeps exact fp32 products ("ieee"), which is what the tests compare against.
    """
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


__all__ = ["H100_SM_COUNT", "INTERPRETED", "can_launch_on", "device_guard", "dot_precision", "sm_count"]
