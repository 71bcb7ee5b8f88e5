"""The delta rule has no Triton kernel: what its ops do for each `kernel_backend`.

`"torch"` and `"auto"` run the pure-PyTorch path (`"auto"` saying so once), `"triton"` is refused with a
`ValueError` naming the field, as the dispatch treats any input the kernels cannot take
(`mhc_ops.use_triton_kernels`), and an unknown backend is refused too.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from conftest import KERNEL_DEVICE  # noqa: E402

from transformers_mhc.models import decay_ops, mhc_ops  # noqa: E402

OPS = [decay_ops.chunk_delta_rule_decay, decay_ops.recurrent_delta_rule_decay]


def _inputs(length=5, dk=8, dv=4):
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, length, dk, generator=gen) for _ in range(2))
    v = torch.randn(1, 2, length, dv, generator=gen)
    beta = 2 * torch.rand(1, 2, length, generator=gen)
    log_decay = -torch.rand(1, 2, length, dk, generator=gen)
    state = torch.randn(1, 2, dk, dv, generator=gen)
    return tuple(t.to(KERNEL_DEVICE) for t in (q, F.normalize(k, dim=-1), v, beta, log_decay, state))


@pytest.mark.parametrize("op", OPS, ids=["chunk", "recurrent"])
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_torch_and_auto_run_the_torch_path(op, backend):
    q, k, v, beta, log_decay, state = _inputs()
    out, final = op(q, k, v, beta, log_decay, 0.5, state, True, kernel_backend=backend)
    ref_out, ref_final = decay_ops.naive_delta_rule_decay(q, k, v, beta, log_decay, 0.5, state, True)
    torch.testing.assert_close(out, ref_out.to(out.dtype), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, ref_final, rtol=1e-5, atol=1e-5)


def test_auto_logs_the_fallback_once(caplog):
    q, k, v, beta, log_decay, state = _inputs()
    # The messages are logged once per process: forget the ones earlier tests may have logged.
    logging.Logger.info_once.cache_clear()
    logging.Logger.warning_once.cache_clear()
    with caplog.at_level(logging.INFO, logger=mhc_ops.__name__):
        for _ in range(3):
            for op in OPS:
                op(q, k, v, beta, log_decay, kernel_backend="auto")
    messages = [r.getMessage() for r in caplog.records if "delta-rule" in r.getMessage()]
    assert len(messages) == 1 and "torch path" in messages[0], messages


@pytest.mark.parametrize("op", OPS, ids=["chunk", "recurrent"])
def test_triton_is_refused(op):
    q, k, v, beta, log_decay, state = _inputs()
    # On a GPU, or on CPU under the interpreter (the tests), the missing kernel is the reason given.
    with pytest.raises(ValueError, match=r"kernel_backend='triton'.*use_delta_rule=True.* no Triton kernel"):
        op(q, k, v, beta, log_decay, kernel_backend="triton")


@pytest.mark.parametrize("op", OPS, ids=["chunk", "recurrent"])
def test_unknown_backend_is_refused(op):
    q, k, v, beta, log_decay, state = _inputs()
    with pytest.raises(ValueError, match="kernel_backend"):
        op(q, k, v, beta, log_decay, kernel_backend="cuda")
