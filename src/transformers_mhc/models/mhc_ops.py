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
"""Pure-PyTorch hyper-connection arithmetic (mHC paper §3 and §5), and dispatch to the Triton kernels.

These are the references of the kernels in `transformers_mhc.kernels.mhc`; every function here takes the
same arguments as its kernel plus `kernel_backend`, and is what runs on CPU tensors (and in checkpoints loaded with
`trust_remote_code` where the package is not installed).

Shapes: `N` is any number of leading token dimensions, `n` the number of streams, `C` the hidden size.

- `mhc_coefficients(x, phi, alpha, static_bias, eps)`: (h_pre, h_post, h_res logits) from the streams
- `sinkhorn_knopp(logits, num_iterations)`: doubly stochastic `h_res`, exact row sums, recomputing backward
- `hc_pre_mix(h_pre, x)`: the sub-layer input `Σ_j h_pre_j x_j`
- `hc_res_post_mix(h_res, x, h_post, f)`: the new streams `h_res · x + h_postᵀ · f`

`use_triton_kernels` is the one place that decides between a kernel and its torch reference (`decay_ops` uses it
too): `kernel_backend="torch"` always runs the references, `"triton"` always the kernels (an error says why when
they cannot run), `"auto"` the kernels wherever they support the inputs.
"""

from __future__ import annotations

import contextlib

import torch
from transformers.utils import logging

from .configuration_mhc import KERNEL_BACKENDS

try:  # The Triton fast path is optional: absent where the package is not installed (remote code).
    from transformers_mhc.kernels.mhc import (
        can_launch_on,
        hc_pre_mix_triton,
        hc_res_post_mix_triton,
        mhc_coefficients_triton,
        sinkhorn_knopp_triton,
    )
except ImportError:
    can_launch_on = hc_pre_mix_triton = hc_res_post_mix_triton = mhc_coefficients_triton = None
    sinkhorn_knopp_triton = None

logger = logging.get_logger(__name__)

# What every kernel loads (fp64 stays on the torch path, which keeps it: gradcheck runs there).
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The most streams the mHC kernels are compiled and tested for (their tiles grow with n² + 2n).
MAX_TRITON_STREAMS = 16


def _mhc_unsupported(n: int) -> str | None:
    return f"{n} streams > {MAX_TRITON_STREAMS}" if n > MAX_TRITON_STREAMS else None


def _unsupported_inputs(launcher, tensors: tuple[torch.Tensor, ...], cuda_only: bool) -> str | None:
    """Why the kernels cannot take these tensors, or `None` when they can (the checks every kernel shares)."""
    if launcher is None:
        return "the Triton kernels cannot be imported (triton >= 3.4 missing: `pip install 'transformers-mhc[triton]'`)"
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        return f"the inputs are on several devices {sorted(str(d) for d in devices)}"
    (device,) = devices
    if cuda_only and device.type != "cuda":
        return f"{device.type} tensors"
    if not launcher(device):
        if device.type == "cpu":
            return "CPU tensors (Triton runs them only under TRITON_INTERPRET=1, set before the kernels are imported)"
        return f"{device.type} tensors in a process whose kernels were built for another device"
    dtypes = {t.dtype for t in tensors if t.is_floating_point()}
    if not dtypes <= set(TRITON_DTYPES):
        return (
            f"dtype {sorted(str(d) for d in dtypes - set(TRITON_DTYPES))} (the kernels take {TRITON_DTYPES})"
        )
    return None


def use_triton_kernels(
    family: str,
    kernel_backend: str,
    tensors: tuple[torch.Tensor, ...],
    launcher=None,
    unsupported: str | None = None,
) -> bool:
    """Whether the Triton kernels of `family` run on `tensors`: the single dispatch decision of every op.

    Args:
        family: the kernel family, for messages (`"mhc"`, `"decay"`).
        kernel_backend: `"auto"`, `"torch"` or `"triton"` (the config field of both models).
        tensors: the op's tensor inputs (device and dtype decide).
        launcher: the family's `can_launch_on` (`None` when the kernels are not installed).
        unsupported: a family-specific reason the kernels cannot take these inputs (head dim, chunk size), if any.

    `"auto"` picks the kernels on CUDA tensors only (the interpreter, which runs them on CPU tensors, is for tests and
    is slow) and logs its choice once per family and reason. Under `torch.compile` the kernels, which are not
    registered ops, are not traced: `"auto"` takes the torch path and `"triton"` is an error.
    """
    if kernel_backend == "torch":
        return False
    if kernel_backend not in KERNEL_BACKENDS:
        raise ValueError(f"`kernel_backend` must be one of {list(KERNEL_BACKENDS)}, got {kernel_backend!r}.")
    if torch.compiler.is_compiling():
        if kernel_backend == "triton":
            raise RuntimeError(
                f"`kernel_backend='triton'`: the {family} Triton kernels are not registered ops and cannot run "
                "under torch.compile; use kernel_backend='auto' (torch path when compiling) or 'torch'."
            )
        return False
    reason = _unsupported_inputs(launcher, tensors, cuda_only=kernel_backend == "auto") or unsupported
    if reason is None:
        if kernel_backend == "auto":
            logger.info_once(f"kernel_backend='auto': the {family} ops run the Triton kernels.")
        return True
    if kernel_backend == "triton":
        raise ValueError(
            f"`kernel_backend='triton'` but the {family} Triton kernels cannot run here: {reason}. "
            "Use kernel_backend='auto' to fall back to the torch path."
        )
    # A fallback on a GPU is worth a warning (it is slower than expected); on CPU it is the normal case.
    log = logger.warning_once if any(t.is_cuda for t in tensors) else logger.info_once
    log(f"kernel_backend='auto': the {family} ops run the torch path: {reason}.")
    return False


# --------------------------------------------------------------------------------------------------
# Sinkhorn-Knopp
# --------------------------------------------------------------------------------------------------
def _sinkhorn_log_iterates(logits: torch.Tensor, num_iterations: int, keep: bool) -> list[torch.Tensor]:
    """Log-space Sinkhorn-Knopp. Returns the final log-matrix, or every iterate when `keep` (for backward).

    Working in log space (each normalisation subtracts a logsumexp) keeps every step finite even for
    logits of ±1e4, where `exp` would under- or overflow.
    """
    z = logits
    iterates = [z] if keep else []
    for _ in range(num_iterations):
        z = z - torch.logsumexp(z, dim=-2, keepdim=True)  # columns sum to 1
        if keep:
            iterates.append(z)
        z = z - torch.logsumexp(z, dim=-1, keepdim=True)  # rows sum to 1 (last, so rows are exact)
        if keep:
            iterates.append(z)
    return iterates if keep else [z]


def sinkhorn_knopp_backward(
    logits: torch.Tensor, grad_out: torch.Tensor, num_iterations: int
) -> torch.Tensor:
    """Exact gradient of `sinkhorn_knopp` w.r.t. its (fp32) logits, recomputing the iterations.

    For a normalisation `y = x - logsumexp_d(x)`, `dL/dx = g - exp(y) · Σ_d g`; the iterates are
    recomputed here instead of being stored by the forward, so saved memory does not grow with the
    number of iterations.
    """
    iterates = _sinkhorn_log_iterates(logits, num_iterations, keep=True)
    grad = grad_out * iterates[-1].exp()  # through the final exp
    # iterates[1:] alternate column (odd index) and row (even index) normalisations.
    for step in range(len(iterates) - 1, 0, -1):
        dim = -2 if step % 2 == 1 else -1
        grad = grad - iterates[step].exp() * grad.sum(dim=dim, keepdim=True)
    return grad


# The multiplicative form `m / m.sum(d)` needs 2 small kernels per normalisation where the log-space one needs ~8,
# but its `exp` can underflow. When every matrix's logits lie within this range of each other, the smallest entry
# of any iterate stays far above fp32's smallest normal number (the cross-ratios m_ij m_kl / (m_il m_kj) do not
# change under row and column scaling, which bounds every entry below by about exp(-2 * range) / n^4), so the two
# forms agree to rounding. Wider logits (up to ±1e4 and beyond) take the log-space form.
_MULTIPLICATIVE_LOGIT_RANGE = 30.0


def _batch_last(matrices: torch.Tensor) -> torch.Tensor:
    """`[..., n, n]` -> `[n, n, N]`: the batch contiguous and innermost, so that on CPU every reduction over `i` or
    `j` and every broadcasting division runs over contiguous length-`N` vectors (a few µs each), instead of
    strided size-`n` dimensions (several times slower) or tiny matmuls (which pay a thread handshake each)."""
    n = matrices.shape[-1]
    return matrices.reshape(-1, n, n).permute(1, 2, 0).contiguous()


def _from_batch_last(matrices: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    # Contiguous again: batched matmuls over batch-strided matrices fall back to one small matmul per token.
    return matrices.permute(2, 0, 1).contiguous().view(shape)


def _multiplicative_is_safe(z: torch.Tensor) -> bool:
    """Whether every matrix of `z` (`[n, n, N]`) spans at most `_MULTIPLICATIVE_LOGIT_RANGE`.

    A data-dependent choice, so eager only: compiled code keeps the branch-free log-space form.
    """
    if torch.compiler.is_compiling() or z.numel() == 0:
        return False
    spread = z.amax(dim=(0, 1)) - z.amin(dim=(0, 1))
    return bool(spread.max() <= _MULTIPLICATIVE_LOGIT_RANGE)


def _sinkhorn_multiplicative(z: torch.Tensor, num_iterations: int, keep: bool):
    """`exp(z - max)`, then alternate column and row normalisations by division, on `[n (i), n (j), N]`.

    Returns the result, the first matrix and, with `keep` (for backward), every normalisation's `(output, sums)`.
    """
    m = torch.exp(z - z.amax(dim=(0, 1), keepdim=True))
    first, steps = m, []
    for step in range(2 * num_iterations):  # columns (sum over i), then rows (sum over j; last: exact rows)
        sums = m.sum(dim=step % 2, keepdim=True)
        if keep:
            m = m / sums
            steps.append((m, sums))
        else:
            m = m.div_(sums)
    return m, first, steps


def _sinkhorn_multiplicative_backward(
    z: torch.Tensor, grad: torch.Tensor, num_iterations: int
) -> torch.Tensor:
    """Exact gradient of the multiplicative form on `[n, n, N]`, recomputing its iterates from `z`.

    For `y = m / s` with `s = Σ_d m`: `dL/dm = (g - Σ_d g·y) / s`; through `m = exp(z - max)`, `dL/dz = m · dL/dm`
    (the max is a constant shift that the normalisations cancel, so it carries no gradient).
    """
    _, first, steps = _sinkhorn_multiplicative(z, num_iterations, keep=True)
    for step in range(len(steps) - 1, -1, -1):
        y, sums = steps[step]
        grad = (grad - (grad * y).sum(dim=step % 2, keepdim=True)).div_(sums)
    return grad.mul_(first)


class SinkhornKnoppFunction(torch.autograd.Function):
    """Sinkhorn-Knopp in fp32 whose backward recomputes the iterations (only the logits are saved).

    Runs the multiplicative form (fewer, cheaper kernels) when every matrix's logits span at most
    `_MULTIPLICATIVE_LOGIT_RANGE`, the log-space form otherwise: the same function either way.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, num_iterations: int) -> torch.Tensor:
        # fp32 at least (float64 is kept, for gradcheck)
        logits = logits if logits.dtype == torch.float64 else logits.float()
        ctx.save_for_backward(logits)
        ctx.num_iterations = num_iterations
        z = _batch_last(logits)
        ctx.multiplicative = _multiplicative_is_safe(z)
        if ctx.multiplicative:
            return _from_batch_last(_sinkhorn_multiplicative(z, num_iterations, keep=False)[0], logits.shape)
        return _sinkhorn_log_iterates(logits, num_iterations, keep=False)[0].exp()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (logits,) = ctx.saved_tensors
        grad_out = grad_out.to(logits.dtype)
        if ctx.multiplicative:
            grad = _sinkhorn_multiplicative_backward(
                _batch_last(logits), _batch_last(grad_out), ctx.num_iterations
            )
            return _from_batch_last(grad, logits.shape), None
        return sinkhorn_knopp_backward(logits, grad_out, ctx.num_iterations), None


def sinkhorn_knopp(
    logits: torch.Tensor, num_iterations: int = 20, kernel_backend: str = "auto"
) -> torch.Tensor:
    """Projects `exp(logits)` (`[..., n, n]`) towards the doubly stochastic matrices (the Birkhoff polytope).

    Each iteration normalises the columns, then the rows, so the row sums of the result are exact and the column
    sums converge. Computed in fp32 whatever the input dtype. `kernel_backend`: see `use_triton_kernels`.
    """
    if use_triton_kernels(
        "mhc", kernel_backend, (logits,), can_launch_on, _mhc_unsupported(logits.shape[-1])
    ):
        return sinkhorn_knopp_triton(logits, num_iterations)
    return SinkhornKnoppFunction.apply(logits, num_iterations)


def sinkhorn_knopp_deepseek_v4(logits: torch.Tensor, num_iterations: int, eps: float) -> torch.Tensor:
    """The Sinkhorn variant of transformers' `DeepseekV4HyperConnection`, returned as our `h_res`.

    There, `comb = softmax(logits, -1) + eps`, then a column normalisation and `num_iterations - 1` (row, column)
    rounds, each denominator `+ eps`; the result is applied as `In @ Comb`, i.e. `h_res = combᵀ`.
    """
    comb = torch.softmax(logits.float(), dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(num_iterations - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb.transpose(-1, -2)


# --------------------------------------------------------------------------------------------------
# One gradient buffer for a sub-layer's streams (torch path)
# --------------------------------------------------------------------------------------------------
class _StreamGradSink:
    """Sums the stream-gradient terms of one sub-layer's hyper-connection in a single buffer.

    A sub-layer's streams `x` feed three ops: the coefficients, the pre-mix and the res/post mix. Left to autograd,
    each materialises its own `[N, n, C]` gradient and autograd adds them up: two extra full-width buffers and two
    extra passes per sub-layer. While a sink `collect`s, the coefficients' forward registers as its consumer and the
    mixes taking the same `x` register as producers (each gets a slot); in backward, producers put their `x` term
    (`h_preᵀ g` or `h_resᵀ g`) in their slot instead of returning it, and the coefficients' backward adds the terms
    in place into its own gradient. Autograd always runs the coefficients' backward after the producers' (it needs
    the gradients they produce for `h_pre`, `h_post` and `h_res`); when it does not run, no gradient reaches `x`.
    Eager torch path only (not under `torch.compile`, not with the Triton kernels).
    """

    active: list[_StreamGradSink] = []

    def __init__(self):
        self.key = None  # (data_ptr, numel, dtype) of the consumer's x
        self.slots: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        self._forced_slot: int | None = None

    @contextlib.contextmanager
    def collect(self, slot: int | None = None):
        """Makes this the sink of the ops run inside. `slot`: the producer inside is the one registered under that
        slot already (a backward recomputation, whose streams may live at another address); skip the matching."""
        type(self).active.append(self)
        self._forced_slot = slot
        try:
            yield
        finally:
            self._forced_slot = None
            type(self).active.pop()

    @staticmethod
    def _key(x: torch.Tensor):
        return (x.data_ptr(), x.numel(), x.dtype)

    @classmethod
    def consumer(cls, x: torch.Tensor) -> _StreamGradSink | None:
        sink = cls.active[-1] if cls.active else None
        if sink is None or sink.key is not None or torch.compiler.is_compiling() or not x.is_contiguous():
            return None
        sink.key = cls._key(x)
        return sink

    @classmethod
    def producer(cls, x: torch.Tensor) -> tuple[_StreamGradSink, int] | None:
        """`(sink, slot)` if `x` is the consumer's input (so its gradient term can go to the sink), else `None`."""
        sink = cls.active[-1] if cls.active else None
        if sink is None or sink.key is None or torch.compiler.is_compiling() or not x.is_contiguous():
            return None
        if sink._forced_slot is not None:
            return sink, sink._forced_slot
        if sink.key != cls._key(x):
            return None
        sink.slots.append(None)
        return sink, len(sink.slots) - 1

    @staticmethod
    def put(target: tuple[_StreamGradSink, int], coefficients: torch.Tensor, grad: torch.Tensor) -> None:
        sink, slot = target
        sink.slots[slot] = (
            coefficients,
            grad,
        )  # a repeated backward (retain_graph) overwrites, never adds up

    def add_to(self, grad_x: torch.Tensor) -> None:
        """Adds every `coefficientsᵀ g` term into `grad_x` (`[N, n, C]`, fp32) in place, and empties the slots."""
        for slot, term in enumerate(self.slots):
            if term is None:
                continue
            coefficients, grad = term
            if coefficients.dim() == 2:  # h_pre [N, n], grad [N, C]: an outer product
                grad_x.addcmul_(coefficients.unsqueeze(-1), grad.unsqueeze(-2))
            else:  # h_res [N, n, n], grad [N, n, C]
                grad_x.baddbmm_(coefficients.transpose(1, 2), grad)
            self.slots[slot] = None


# --------------------------------------------------------------------------------------------------
# Coefficients (paper §3, §5.1-5.2)
# --------------------------------------------------------------------------------------------------
def mhc_coefficients(
    x: torch.Tensor,
    phi: torch.Tensor,
    alpha: torch.Tensor,
    static_bias: torch.Tensor,
    eps: float,
    kernel_backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mHC coefficients from the flattened streams.

    Args:
        x: `[N, n*C]` flattened streams (any dtype; computed in fp32).
        phi: `[n*n + 2n, n*C]` fused projection, rows ordered (pre, post, res).
        alpha: `[3]` gates (pre, post, res).
        static_bias: `[n*n + 2n]` static logits, same order.
        eps: RMSNorm epsilon.
        kernel_backend: `"auto"`, `"torch"` or `"triton"`, see `use_triton_kernels`.

    Returns:
        `h_pre = sigmoid(·)` `[N, n]`, `h_post = 2·sigmoid(·)` `[N, n]` and the `h_res` logits `[N, n, n]`
        (fed to `sinkhorn_knopp`). The RMSNorm division is applied after the matmul (§5.1): `(x φ) / r`.
    """
    n = _num_streams(phi.shape[0])
    if use_triton_kernels(
        "mhc", kernel_backend, (x, phi, alpha, static_bias), can_launch_on, _mhc_unsupported(n)
    ):
        return mhc_coefficients_triton(x, phi, alpha, static_bias, eps)
    lead = x.shape[:-1]
    h_pre, h_post, res = MHCCoefficientsFunction.apply(
        x.reshape(-1, x.shape[-1]), phi, alpha, static_bias, eps
    )
    return h_pre.view(*lead, n), h_post.view(*lead, n), res.view(*lead, n, n)


class MHCCoefficientsFunction(torch.autograd.Function):
    """`mhc_coefficients` on `[N, nC]` streams with a hand-written backward.

    Autograd of the plain formulas makes several full passes over the `nC`-wide input in backward (`pow`, `mean`
    and the matmul each get their own); here the sum of squares is one reduction (`vector_norm`), nothing
    `nC`-wide is saved except the input itself (which the stream mixing saves anyway), and the input gradient is
    one matmul plus one fused multiply-add: `dx = (g/r) φ - (Σ g·(xφ)) / (r³ nC) · x` with `1/r` the inverse RMS.
    """

    @staticmethod
    def forward(ctx, x, phi, alpha, static_bias, eps):
        n = _num_streams(phi.shape[0])
        xf, phi_f = x.float(), phi.float()
        width = x.shape[-1]
        inv_rms = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(width).add_(eps).rsqrt_()
        raw = xf @ phi_f.t()
        alpha_f = alpha.float()
        gates = torch.cat([alpha_f[0].expand(n), alpha_f[1].expand(n), alpha_f[2].expand(n * n)])
        logits = (raw * inv_rms) * gates + static_bias.float()
        h_pre = torch.sigmoid(logits[:, :n])
        h_post = 2 * torch.sigmoid(logits[:, n : 2 * n])
        res = logits[:, 2 * n :].contiguous()
        ctx.save_for_backward(x, phi, inv_rms, raw, gates, h_pre, h_post)
        ctx.meta = (n, width, alpha.dtype, static_bias.dtype)
        ctx.sink = _StreamGradSink.consumer(x)
        return h_pre, h_post, res

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_pre, grad_post, grad_res):
        x, phi, inv_rms, raw, gates, h_pre, h_post = ctx.saved_tensors
        n, width, alpha_dtype, bias_dtype = ctx.meta
        zeros = raw.new_zeros(raw.shape[0], n)
        grad_logits = torch.cat(
            [
                grad_pre.float() * h_pre * (1 - h_pre) if grad_pre is not None else zeros,
                grad_post.float() * h_post * (1 - h_post / 2) if grad_post is not None else zeros,
                grad_res.float() if grad_res is not None else raw.new_zeros(raw.shape[0], n * n),
            ],
            dim=-1,
        )
        grad_x = grad_phi = grad_alpha = grad_bias = None
        grad_proj = grad_logits * gates
        grad_raw = grad_proj * inv_rms
        if ctx.needs_input_grad[0]:
            xf = x.float()
            # d(1/r)/dx = -(1/r)³ x / nC
            coef = (grad_proj * raw).sum(dim=-1, keepdim=True) * inv_rms.pow(3) / -width
            grad_x = (grad_raw @ phi.float()).addcmul_(xf, coef)
            if ctx.sink is not None:  # the stream mixes' x-terms, added in place (see `_StreamGradSink`)
                ctx.sink.add_to(grad_x.view(grad_x.shape[0], n, width // n))
            grad_x = grad_x.to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_phi = (grad_raw.t() @ x.float()).to(phi.dtype)
        if ctx.needs_input_grad[2]:
            per_gate = (grad_logits * (raw * inv_rms)).sum(dim=0)
            grad_alpha = torch.stack(
                [per_gate[:n].sum(), per_gate[n : 2 * n].sum(), per_gate[2 * n :].sum()]
            ).to(alpha_dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = grad_logits.sum(dim=0).to(bias_dtype)
        return grad_x, grad_phi, grad_alpha, grad_bias, None


def _num_streams(width: int) -> int:
    # width = n*n + 2n  =>  n = sqrt(width + 1) - 1
    n = round((width + 1) ** 0.5) - 1
    if n * n + 2 * n != width:
        raise ValueError(f"a fused hyper-connection projection has n*n + 2n rows, got {width}")
    return n


# --------------------------------------------------------------------------------------------------
# Stream mixing (paper §5.4-5.5)
# --------------------------------------------------------------------------------------------------
def hc_pre_mix(h_pre: torch.Tensor, x: torch.Tensor, kernel_backend: str = "auto") -> torch.Tensor:
    """`Σ_j h_pre_j · x_j`: the sub-layer input read from the streams.

    Args:
        h_pre: `[..., n]` (fp32; may broadcast over tokens).
        x: `[..., n, C]` streams.
        kernel_backend: `"auto"`, `"torch"` or `"triton"`, see `use_triton_kernels`.

    Returns:
        `[..., C]` in `x.dtype`, accumulated in fp32.
    """
    if use_triton_kernels("mhc", kernel_backend, (h_pre, x), can_launch_on, _mhc_unsupported(x.shape[-2])):
        return hc_pre_mix_triton(h_pre, x)
    lead, (n, width) = x.shape[:-2], x.shape[-2:]
    h_pre = h_pre.float().expand(*lead, n).reshape(-1, n)  # broadcast: expand's backward sums the gradient
    return HCPreMixFunction.apply(h_pre, x.reshape(-1, n, width)).view(*lead, width)


class HCPreMixFunction(torch.autograd.Function):
    """`hc_pre_mix` on `[N, n]` (fp32) and `[N, n, C]`: batched `[1, n] @ [n, C]` products, saving only the inputs."""

    @staticmethod
    def forward(ctx, h_pre, x):
        ctx.save_for_backward(h_pre, x)
        ctx.sink = _StreamGradSink.producer(x)
        return torch.bmm(h_pre.unsqueeze(1), x.float()).squeeze(1).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        h_pre, x = ctx.saved_tensors
        grad = grad.float().contiguous()
        grad_h = grad_x = None
        if ctx.needs_input_grad[0]:
            grad_h = torch.bmm(grad.unsqueeze(1), x.float().transpose(1, 2)).squeeze(1)
        if ctx.needs_input_grad[1]:
            if ctx.sink is not None:
                _StreamGradSink.put(ctx.sink, h_pre, grad)
            else:
                grad_x = (h_pre.unsqueeze(2) * grad.unsqueeze(1)).to(x.dtype)  # outer product, one pass
        return grad_h, grad_x


def hc_res_post_mix(
    h_res: torch.Tensor, x: torch.Tensor, h_post: torch.Tensor, f: torch.Tensor, kernel_backend: str = "auto"
) -> torch.Tensor:
    """`h_res · x + h_postᵀ · f`: the streams after a sub-layer, in one pass.

    Args:
        h_res: `[..., n, n]` (row `i` says how much of each stream flows into stream `i`).
        x: `[..., n, C]` streams before the sub-layer.
        h_post: `[..., n]` weights writing the sub-layer output into each stream.
        f: `[..., C]` sub-layer output.
        kernel_backend: `"auto"`, `"torch"` or `"triton"`, see `use_triton_kernels`.

    Returns:
        `[..., n, C]` in `x.dtype`, accumulated in fp32.
    """
    unsupported = _mhc_unsupported(x.shape[-2])
    if use_triton_kernels("mhc", kernel_backend, (h_res, x, h_post, f), can_launch_on, unsupported):
        return hc_res_post_mix_triton(h_res, x, h_post, f)
    lead, (n, width) = x.shape[:-2], x.shape[-2:]
    lead = torch.broadcast_shapes(lead, f.shape[:-1])
    # Broadcast coefficients are expanded per token (the backward of `expand` sums their gradients).
    h_res = h_res.float().expand(*lead, n, n).reshape(-1, n, n)
    h_post = h_post.float().expand(*lead, n).reshape(-1, n)
    x = x.expand(*lead, n, width).reshape(-1, n, width)
    f = f.expand(*lead, width).reshape(-1, width)
    return HCResPostMixFunction.apply(h_res, x, h_post, f).view(*lead, n, width)


class HCResPostMixFunction(torch.autograd.Function):
    """`hc_res_post_mix` on `[N, ...]` tensors: one batched matmul plus one fused multiply-add in forward, four
    batched matmuls (no `[N, n, C]` temporaries besides the input gradient) in backward; saves only the inputs."""

    @staticmethod
    def forward(ctx, h_res, x, h_post, f):
        ctx.save_for_backward(h_res, x, h_post, f)
        ctx.sink = _StreamGradSink.producer(x)
        mixed = torch.bmm(h_res, x.float())
        return mixed.addcmul_(h_post.unsqueeze(-1), f.float().unsqueeze(-2)).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        h_res, x, h_post, f = ctx.saved_tensors
        # Contiguous: e.g. the mean readout's gradient is a stride-0 broadcast, on which batched matmuls fall back to
        # one small matmul (and copy) per token.
        grad = grad.float().contiguous()
        grad_res = grad_x = grad_post = grad_f = None
        if ctx.needs_input_grad[0]:
            grad_res = torch.bmm(grad, x.float().transpose(1, 2))
        if ctx.needs_input_grad[1]:
            if ctx.sink is not None:
                _StreamGradSink.put(ctx.sink, h_res, grad)
            else:
                grad_x = torch.bmm(h_res.transpose(1, 2), grad).to(x.dtype)
        if ctx.needs_input_grad[2]:
            grad_post = torch.bmm(grad, f.float().unsqueeze(-1)).squeeze(-1)
        if ctx.needs_input_grad[3]:
            grad_f = torch.bmm(h_post.unsqueeze(1), grad).squeeze(1).to(f.dtype)
        return grad_res, grad_x, grad_post, grad_f


__all__ = [
    "HCPreMixFunction",
    "HCResPostMixFunction",
    "MHCCoefficientsFunction",
    "SinkhornKnoppFunction",
    "hc_pre_mix",
    "hc_res_post_mix",
    "mhc_coefficients",
    "sinkhorn_knopp",
    "sinkhorn_knopp_backward",
    "sinkhorn_knopp_deepseek_v4",
    "use_triton_kernels",
]
