"""Shared test fixtures: where `../shared` lives and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors through the interpreter. The flag is read when a
# kernel is decorated, so it must be set before anything imports `transformers_mhc.kernels`. With a GPU
# the kernels are compiled and the kernel tests put their tensors on it (`KERNEL_DEVICE`).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
KERNEL_DEVICE = torch.device(
    "cuda" if os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available() else "cpu"
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("TRANSFORMERS_MHC_SHARED", REPO_ROOT.parent / "shared"))
STORIES260K = SHARED_DIR / "models" / "stories260k"
DATA_DIR = SHARED_DIR / "data"


@pytest.fixture
def kernel_device() -> torch.device:
    """Where the Triton kernels run in this process: the GPU, or the CPU through the interpreter."""
    return KERNEL_DEVICE


# Prepended to the scripts that tests run in a fresh interpreter where `transformers_mhc` must not be importable,
# as on a machine with transformers only: a checkpoint there can only use the code that travelled with it.
BLOCK_PACKAGE = """\
import sys
from importlib.abc import MetaPathFinder


class BlockPackage(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "transformers_mhc" or name.startswith("transformers_mhc."):
            raise ModuleNotFoundError(f"{name} is blocked in this test")
        return None


sys.meta_path.insert(0, BlockPackage())
"""


@pytest.fixture
def stories260k_path() -> Path:
    """The real pretrained Llama checkpoint from `../shared/models/stories260k`."""
    if not (STORIES260K / "config.json").is_file():
        pytest.skip(f"real checkpoint not found at {STORIES260K} (set TRANSFORMERS_MHC_SHARED)")
    return STORIES260K


@pytest.fixture
def data_dir() -> Path:
    """The evaluation/training data folder from `../shared/data`."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"data folder not found at {DATA_DIR} (set TRANSFORMERS_MHC_SHARED)")
    return DATA_DIR


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
