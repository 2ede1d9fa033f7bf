"""Fused kernels: hand-written forward passes that produce their own gradients, for speed only.

Each kernel sits next to its plain autograd version (``*_reference``), which states what it computes and
which the tests compare it against (values and gradients). The mathematical losses in :mod:`dgmrec.losses`
call these kernels; model code reads as maths and never sees them.

* :func:`cosine_nce`: InfoNCE of L2-normalised rows with in-batch negatives, averaged over the rows.
* :func:`triple_nce`: InfoNCE of L2-normalised rows against an explicit negative set, summed over the rows.
* :func:`linear_mse`: ``mean((x W^T + b - y)^2)`` without the decoded matrix.
* :func:`table_linear` with :func:`fused_table_gradients`: the two gradients of a trainable feature table
  (through its encoder ``x W^T + b``, and as a reconstruction target of :func:`linear_mse`) produced by one
  GEMM, optionally into a persistent buffer.

The kernels avoid whole ``n x n`` / ``n x d`` intermediates by working in row blocks that stay in cache; the
block sizes are class attributes (tests lower them to cover several blocks). They compute in float32 also
inside a mixed-precision (autocast) region (:func:`in_float32`): their inputs are cast, differentiably, so
gradients return to the callers in the callers' dtypes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

_F = TypeVar("_F", bound=Callable[..., Any])

#: the GEMM operand dtype of the kernel being run: the autocast dtype of its caller (``--precision bf16``), or
#: None (float32 GEMMs). Set by :func:`in_float32` for the duration of one kernel call.
_GEMM_DTYPE: ContextVar[torch.dtype | None] = ContextVar("gemm_dtype", default=None)


def _low(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``x`` as a GEMM operand: cast to the low-precision dtype when there is one."""
    return x if dtype is None else x.to(dtype)


def _as_float32(x: Any) -> Any:
    """Half-precision tensors as float32; float32 and float64 (the tests' gradient checks) as they are."""
    return x.float() if isinstance(x, torch.Tensor) and x.dtype in (torch.bfloat16, torch.float16) else x


def in_float32(fn: _F) -> _F:
    """Run ``fn`` with autocast off and its half-precision tensor arguments cast to float32.

    For hand-written autograd functions, which have one dtype path: under ``torch.autocast`` (``--precision
    bf16``) their callers hand over bfloat16 and float32 tensors together. The casts are ordinary autograd
    operations, so the gradients reach the callers' tensors in their own dtypes. Under autocast the kernel's
    GEMMs take their operands in the autocast dtype, as autocast's own matrix products do; sums, exponentials,
    differences and the returned gradients stay float32.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        device = next((a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), "cpu")
        low = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        token = _GEMM_DTYPE.set(low if low in (torch.bfloat16, torch.float16) else None)
        try:
            with torch.autocast(device_type=device, enabled=False):
                return fn(*(_as_float32(a) for a in args), **{k: _as_float32(v) for k, v in kwargs.items()})
        finally:
            _GEMM_DTYPE.reset(token)

    return wrapper  # type: ignore[return-value]


def _exp_logits(a: torch.Tensor, b: torch.Tensor, inv_tau: float, shift: torch.Tensor) -> torch.Tensor:
    """``exp((a b^T - 1) * inv_tau)`` in the operands' dtype, ``shift`` = ``-inv_tau`` in that dtype (every value is
    at most 1: ``a``, ``b`` unit rows).

    Scale and shift are applied to the float32 accumulators of the product, before any rounding to a low
    precision; the block then stays in the GEMM dtype, so the block-sized passes read and write half the bytes.
    """
    return torch.addmm(shift, a, b.T, alpha=inv_tau).exp_()


def _softmax_block(a_blk: torch.Tensor, b: torch.Tensor, inv_tau: float, shift: torch.Tensor,
                   same: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One row block's unnormalised ``E = exp((a_blk b^T - 1) / tau)`` (GEMM dtype, ``same`` entries zeroed) and
    its float32 row sums ``(rows, 1)``. The softmax ``P = E / sums`` is never formed: its products are ``E``'s,
    with the row scale applied to the small ``(rows, d)`` side (``P b = (E b) / s``, ``P^T a = E^T (a / s)``)."""
    expo = _exp_logits(a_blk, b, inv_tau, shift)
    if same is not None:
        expo.masked_fill_(same, 0.0)
    wide = torch.float32 if expo.dtype in (torch.bfloat16, torch.float16) else expo.dtype
    return expo, expo.sum(dim=1, keepdim=True, dtype=wide)


def _accumulate(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out += a @ b`` (``out`` float32; the product in the operands' dtype)."""
    if a.dtype == out.dtype:
        out.addmm_(a, b)
    else:
        out.add_(a @ b)


# ------------------------------------------------------------------------------------------ cosine InfoNCE


class _CosineNCE(torch.autograd.Function):
    """:func:`cosine_nce` with its gradient computed during the forward pass.

    The loss is a mean, so its gradient is a fixed ``(n, d)`` pair times the incoming scalar. Rows are processed
    in blocks that stay in cache: ``exp((a_blk . b - 1) / tau)`` (cosines are at most 1, so no max pass is
    needed), its row sums, and the block's share of both gradients. The ``n x n`` matrix is never stored.
    """

    block = 128  # rows per block with float32 GEMMs
    #: rows per block with low-precision GEMMs: on a CPU with AMX, one thread, 2,048 x 64 rows, forward and
    #: backward took 20.8 / 13.2 / 12.5 / 16.8 ms with blocks of 128 / 256 / 512 / 1,024 rows in bfloat16, and
    #: 20.1 / 21.8 / 20.2 / 23.8 ms in float32 (``benchmarks/infonce_blocks.py``)
    block_low = 512

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, inv_tau: float,  # type: ignore[override]
                ids_a: torch.Tensor | None = None, ids_b: torch.Tensor | None = None) -> torch.Tensor:
        n = a.shape[0]
        low = _GEMM_DTYPE.get()
        block = _CosineNCE.block if low is None else _CosineNCE.block_low
        a_g, b_g = _low(a, low), _low(b, low)
        shift = torch.full((1,), -inv_tau, dtype=a_g.dtype, device=a.device)  # in the GEMM dtype
        grad_a = torch.empty_like(a)
        grad_b = torch.zeros_like(b)
        log_denom = torch.empty(n, dtype=a.dtype, device=a.device)
        for s in range(0, n, block):
            e = min(n, s + block)
            same = None
            if ids_a is not None and ids_b is not None:
                # another row with the same id on either side is a false negative: leave it out
                same = (ids_a[s:e, None] == ids_a[None, :]) | (ids_b[s:e, None] == ids_b[None, :])
                rows = torch.arange(same.shape[0], device=same.device)
                same[rows, rows + s] = False
            expo, denom = _softmax_block(a_g[s:e], b_g, inv_tau, shift, same)
            log_denom[s:e] = denom.squeeze(1).log()
            torch.div(expo @ b_g, denom, out=grad_a[s:e])  # P b
            _accumulate(grad_b, expo.T, _low(a[s:e] / denom, low))  # P^T a
        positive = (a * b).sum(dim=1) * inv_tau
        loss = (inv_tau + log_denom - positive).mean()
        # d/da of mean(lse - positive) = (P - I) b * inv_tau / n, d/db = (P - I)^T a * inv_tau / n
        grad_a.sub_(b).mul_(inv_tau / n)
        grad_b.sub_(a).mul_(inv_tau / n)
        ctx.save_for_backward(grad_a, grad_b)
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad_a, grad_b = ctx.saved_tensors
        return grad_a * grad, grad_b * grad, None, None, None


@in_float32
def cosine_nce(a: torch.Tensor, b: torch.Tensor, inv_tau: float, ids_a: torch.Tensor | None = None,
               ids_b: torch.Tensor | None = None) -> torch.Tensor:
    """Fused :func:`cosine_nce_reference` (rows of ``a`` and ``b`` already L2-normalised)."""
    return _CosineNCE.apply(a, b, inv_tau, ids_a, ids_b)


def cosine_nce_reference(a: torch.Tensor, b: torch.Tensor, inv_tau: float, ids_a: torch.Tensor | None = None,
                         ids_b: torch.Tensor | None = None) -> torch.Tensor:
    """``mean_i [logsumexp_j (a_i . b_j) / tau - (a_i . b_i) / tau]``; with ids, every ``j != i`` sharing an id
    with row ``i`` on either side is left out of the sum."""
    logits = (a @ b.T) * inv_tau
    if ids_a is not None and ids_b is not None:
        same = (ids_a[:, None] == ids_a[None, :]) | (ids_b[:, None] == ids_b[None, :])
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    return (torch.logsumexp(logits, dim=1) - logits.diagonal()).mean()


# ----------------------------------------------------------------------- InfoNCE against explicit negatives


class _TripleNCE(torch.autograd.Function):
    """:func:`triple_nce` with its gradient computed during the forward pass.

    Like :class:`_CosineNCE`, rows are processed in cache-sized blocks and the gradient (a fixed set of
    tensors times the incoming scalar) is computed during the forward pass; the ``rows x negatives`` matrix is
    never stored.
    """

    block = 128

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, negatives: torch.Tensor,  # type: ignore[override]
                inv_tau: float) -> torch.Tensor:
        low = _GEMM_DTYPE.get()
        a_g, n_g = _low(a, low), _low(negatives, low)
        shift = torch.full((1,), -inv_tau, dtype=a_g.dtype, device=a.device)  # in the GEMM dtype
        grad_a = torch.empty_like(a)
        grad_n = torch.zeros_like(negatives)
        log_denom = torch.empty(a.shape[0], dtype=a.dtype, device=a.device)
        for s in range(0, a.shape[0], _TripleNCE.block):
            e = min(a.shape[0], s + _TripleNCE.block)
            expo, denom = _softmax_block(a_g[s:e], n_g, inv_tau, shift)  # exp((a.n - 1) / tau) <= 1
            log_denom[s:e] = denom.squeeze(1).log()
            torch.div(expo @ n_g, denom, out=grad_a[s:e])
            _accumulate(grad_n, expo.T, _low(a[s:e] / denom, low))
        loss = (inv_tau + log_denom - (a * b).sum(dim=1) * inv_tau).sum()
        # d/da = (P n - b) / tau, d/db = -a / tau, d/dn = P^T a / tau (sum over rows, no 1/n)
        grad_a.sub_(b).mul_(inv_tau)
        grad_n.mul_(inv_tau)
        ctx.save_for_backward(grad_a, a, grad_n)
        ctx.inv_tau = inv_tau
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad_a, a, grad_n = ctx.saved_tensors
        return grad_a * grad, a * (-ctx.inv_tau * grad), grad_n * grad, None


@in_float32
def triple_nce(a: torch.Tensor, b: torch.Tensor, negatives: torch.Tensor, inv_tau: float) -> torch.Tensor:
    """Fused :func:`triple_nce_reference` (rows already L2-normalised)."""
    return _TripleNCE.apply(a, b, negatives, inv_tau)


def triple_nce_reference(a: torch.Tensor, b: torch.Tensor, negatives: torch.Tensor, inv_tau: float) -> torch.Tensor:
    """``sum_i [logsumexp_n (a_i . n) / tau - (a_i . b_i) / tau]``."""
    return (torch.logsumexp((a @ negatives.T) * inv_tau, dim=1) - (a * b).sum(dim=1) * inv_tau).sum()


# ---------------------------------------------------------------- fused gradients of a trainable feature table


class TableGradient:
    """Hand-off of one step's reconstruction gradient to the encoder reading the same feature table.

    A trainable feature table ``X`` gets gradient from two places: the encoder ``X W^T + b`` (``dY W``) and a
    reconstruction loss whose target is ``X`` itself. Added by autograd, each is a fresh ``n x d`` tensor and
    their sum a third; with wide features (4,096-d) these passes dominate a training step. When both nodes share
    a ``TableGradient``, the reconstruction node leaves its unscaled gradient here and the encoder node adds
    ``dY W`` into that buffer in place, scaling it inside the same GEMM (no further ``n x d`` tensors).

    With ``table`` and a persistent ``buffer`` (same shape), the reconstruction writes into ``buffer`` and the
    encoder installs the finished sum as ``table.grad`` itself (adding to a gradient another node already
    left there), so no ``n x d`` memory is allocated per step. The buffer is only used while ``table.grad`` is
    unset (optimisers that zero gradients to ``None``); otherwise, and if autograd happens to run the encoder
    first, both nodes return their gradients as usual. The result is the same in every case.
    """

    def __init__(self, table: torch.Tensor, buffer: torch.Tensor | None = None) -> None:
        self.table = table
        self.buffer = buffer
        self.pending: torch.Tensor | None = None  # the unscaled reconstruction gradient ...
        self.scale = 1.0  # ... and its factor
        self.encoder_done = False
        self._low: torch.Tensor | None = None

    def low_copy(self, table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The table in ``dtype``, cast once for every encoder of this step that reads it."""
        if self._low is None or self._low.dtype != dtype:
            self._low = table.detach().to(dtype)
        return self._low

    def target_buffer(self, like: torch.Tensor) -> torch.Tensor:
        """Where the reconstruction writes its gradient: the persistent buffer when it may, else new memory."""
        b, t = self.buffer, self.table
        if b is not None and t.grad is None and b.shape == like.shape and b.dtype == like.dtype:
            return b
        return torch.empty_like(like)

    def install(self, grad: torch.Tensor) -> bool:
        """Make ``grad`` (the persistent buffer) the table's gradient; False when autograd should take it."""
        t = self.table
        if self.buffer is None or grad.data_ptr() != self.buffer.data_ptr():
            return False
        if t.grad is None:
            t.grad = grad
        else:
            t.grad.add_(grad)
        return True


_ACTIVE: list[list[TableGradient]] = []  # the hand-offs of the innermost fused_table_gradients context


@contextmanager
def fused_table_gradients(tables: Sequence[torch.Tensor],
                          buffers: Sequence[torch.Tensor] | None = None) -> Iterator[list[TableGradient]]:
    """Fuse each table's encoder and reconstruction gradients in the graph built inside the context.

    While the context is open, :func:`table_linear` reading one of ``tables`` (the same tensor object) and
    :func:`linear_mse` whose target is one of them share that table's :class:`TableGradient`; the backward pass
    may run after the context is closed. ``buffers`` (one per table, same shape) are persistent gradient buffers
    that become the tables' ``.grad``. Values and gradients are those of the plain operations.
    """
    hand_offs = [TableGradient(t, None if buffers is None else buffers[i]) for i, t in enumerate(tables)]
    _ACTIVE.append(hand_offs)
    try:
        yield hand_offs
    finally:
        _ACTIVE.pop()


def _hand_off(table: torch.Tensor) -> TableGradient | None:
    """The active hand-off of ``table`` (the same tensor object), if any."""
    if not _ACTIVE:
        return None
    return next((h for h in _ACTIVE[-1] if h.table is table), None)


class _TableLinear(torch.autograd.Function):
    """``x W^T + b`` whose input gradient absorbs a pending reconstruction gradient (see :class:`TableGradient`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,  # type: ignore[override]
                hand_off: TableGradient) -> torch.Tensor:
        ctx.hand_off = hand_off
        low = _GEMM_DTYPE.get()
        if low is None:
            ctx.save_for_backward(x, weight)
            return torch.addmm(bias, x, weight.T)
        # the products that reduce over the table's width (this one) and over its rows (the weight gradient)
        # take low-precision operands; one cast of the table per step serves every encoder reading it
        x_g = hand_off.low_copy(x, low)
        ctx.save_for_backward(x_g, weight)
        return torch.mm(x_g, weight.to(low).T).float().add_(bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors  # x possibly in low precision
        hand_off: TableGradient = ctx.hand_off
        grad_x = None
        if ctx.needs_input_grad[0]:  # a table-sized output: float32 (a low-precision product gains nothing)
            if hand_off.pending is not None:
                grad_x = hand_off.pending.addmm_(grad, weight, beta=hand_off.scale)
                hand_off.pending = None
                if hand_off.install(grad_x):
                    grad_x = None
            else:
                grad_x = grad @ weight
        hand_off.encoder_done = True
        grad_w = (grad.to(x.dtype).T @ x).float() if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


@in_float32
def table_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """:func:`table_linear_reference`; inside :func:`fused_table_gradients` for ``x`` its gradient is fused."""
    hand_off = _hand_off(x)
    if hand_off is None:
        return table_linear_reference(x, weight, bias)
    return _TableLinear.apply(x, weight, bias, hand_off)


def table_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x W^T + b``."""
    return F.linear(x, weight, bias)


# --------------------------------------------------------------------------------------- linear decoder MSE


class _LinearMSE(torch.autograd.Function):
    """:func:`linear_mse` computed in row blocks, producing every gradient during the forward pass.

    With wide targets (e.g. 4,096-d image features) the decoded matrix, the difference and their gradients are
    never materialised as whole ``n x d`` tensors; only the gradient with respect to ``y`` (and ``x``) is.
    """

    block = 512

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,  # type: ignore[override]
                y: torch.Tensor, hand_off: TableGradient | None = None) -> torch.Tensor:
        ctx.hand_off = hand_off
        n, d_out = y.shape
        need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        block = _LinearMSE.block
        # the bias rides along as an extra input column of ones: one GEMM gives (x W^T + b - y) per block and
        # one GEMM the gradient of weight and bias together
        low = _GEMM_DTYPE.get()
        x_aug = _low(torch.cat([x, x.new_ones(n, 1)], dim=1), low)
        w_aug = torch.cat([weight, bias[:, None]], dim=1)
        grad_wb = torch.zeros_like(w_aug)
        w_aug_g, w_g = _low(w_aug, low), _low(weight, low)
        grad_x = torch.empty_like(x) if need_x else None
        grad_y = None
        if need_y:  # written block by block below
            grad_y = hand_off.target_buffer(y) if hand_off is not None else torch.empty_like(y)
        scratch = None if grad_y is not None else y.new_empty(min(block, n), d_out)
        total = torch.zeros((), dtype=torch.float64, device=y.device)
        for s in range(0, n, block):
            e = min(n, s + block)
            xb = x_aug[s:e]
            diff = grad_y[s:e] if grad_y is not None else scratch[: e - s]  # type: ignore[index]
            if low is None:
                torch.addmm(y[s:e], xb, w_aug.T, beta=-1, out=diff)  # written once, in place
            else:
                torch.sub(xb @ w_aug_g.T, y[s:e], out=diff)
            flat = diff.view(-1)
            total += torch.dot(flat, flat).double()
            diff_g = _low(diff, low)
            _accumulate(grad_wb, diff_g.T, xb)
            if grad_x is not None:
                if low is None:
                    torch.mm(diff, weight, out=grad_x[s:e])
                else:
                    grad_x[s:e] = diff_g @ w_g
        grad_w, grad_b = grad_wb[:, :-1].contiguous(), grad_wb[:, -1].contiguous()
        scale = 2.0 / (n * d_out)
        ctx.save_for_backward(grad_w, grad_b, *(g for g in (grad_x, grad_y) if g is not None))
        ctx.has = (grad_x is not None, grad_y is not None)
        ctx.scale = scale
        return (total / (n * d_out)).to(y.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        saved = list(ctx.saved_tensors)
        grad_w, grad_b = saved[0], saved[1]
        rest = saved[2:]
        g = grad * ctx.scale
        # the saved gradients belong to this node alone: scale them in place (no new n x d tensors)
        grad_x = rest.pop(0).mul_(g) if ctx.has[0] else None
        grad_y = None
        if ctx.has[1]:
            diff = rest.pop(0)
            hand_off: TableGradient | None = ctx.hand_off
            if hand_off is not None and not hand_off.encoder_done:
                # the encoder node scales it inside its GEMM and returns the sum
                hand_off.pending, hand_off.scale = diff, -float(g)
            else:
                grad_y = diff.mul_(-g)
        return grad_x, grad_w * g, grad_b * g, grad_y, None


@in_float32
def linear_mse(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fused :func:`linear_mse_reference`; inside :func:`fused_table_gradients` for ``target`` (a whole table
    an encoder also reads through :func:`table_linear`), the table's two gradients are fused."""
    return _LinearMSE.apply(x, weight, bias, target, _hand_off(target))


def linear_mse_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         target: torch.Tensor) -> torch.Tensor:
    """``mean((x W^T + b - target)^2)``."""
    return F.mse_loss(F.linear(x, weight, bias), target)
