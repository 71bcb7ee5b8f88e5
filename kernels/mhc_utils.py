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
"""Helpers shared by the mHC Triton kernels (torch and triton only: no package imports)."""

from __future__ import annotations

import contextlib

import torch


def device_guard(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Makes `tensor`'s GPU current while launching: Triton launches on the current device, so a tensor on
    `cuda:1` while `cuda:0` is current would otherwise be read from the wrong device. No-op on CPU tensors
    (interpreter)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
