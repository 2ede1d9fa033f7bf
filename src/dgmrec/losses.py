"""Loss functions shared by the models (BPR, InfoNCE, norms, CLUB) — written once, tested once."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def bpr_loss(pos: torch.Tensor, neg: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """``-mean log sigmoid(pos - neg)``; with ``eps``, ``-mean log(sigmoid(.) + eps)`` (MMRec's variant)."""
    diff = pos - neg
    if eps is None:
        return -F.logsigmoid(diff).mean()
    return -torch.log(torch.sigmoid(diff) + eps).mean()


def emb_norm(*tensors: torch.Tensor) -> torch.Tensor:
    """Sum of (unsquared) Frobenius norms divided by the number of rows of the last tensor (MMRec EmbLoss)."""
    total = sum(t.norm(p=2) for t in tensors)
    return total / tensors[-1].shape[0]


def sq_reg(*tensors: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``0.5 * sum ||t||_F^2 / batch_size``."""
    return 0.5 * sum(t.pow(2).sum() for t in tensors) / batch_size


@torch.no_grad()
def ridge_fit(z: torch.Tensor, y: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression ``y ~ z W + b`` in float64, the penalty relative to the mean input variance.

    Returns ``(W, b)`` of shapes ``(d_z, d_y)`` and ``(d_y,)`` in ``z``'s dtype.
    """
    zd, yd = z.double(), y.double()
    z_mean, y_mean = zd.mean(0), yd.mean(0)
    zc = zd - z_mean
    gram = zc.T @ zc
    gram.diagonal().add_(ridge * float(gram.diagonal().mean()) + 1e-12)
    w = torch.linalg.solve(gram, zc.T @ (yd - y_mean))
    return w.to(z.dtype), (y_mean - z_mean @ w).to(z.dtype)


class _CosineNCE(torch.autograd.Function):
    """InfoNCE on already L2-normalised rows, with its gradient computed during the forward pass.

    The loss is a mean, so its gradient is a fixed ``(n, d)`` pair times the incoming scalar. Rows are processed
    in blocks that stay in cache: ``exp((a_blk . b - 1) / tau)`` (cosines are at most 1, so no max pass is
    needed), its row sums, and the block's share of both gradients. The ``n x n`` matrix is never stored.
    """

    block = 128

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, inv_tau: float,  # type: ignore[override]
                ids_a: torch.Tensor | None = None, ids_b: torch.Tensor | None = None) -> torch.Tensor:
        n = a.shape[0]
        shift = torch.full((1,), -inv_tau, dtype=a.dtype, device=a.device)
        grad_a = torch.empty_like(a)
        grad_b = torch.zeros_like(b)
        log_denom = torch.empty(n, dtype=a.dtype, device=a.device)
        for s in range(0, n, _CosineNCE.block):
            a_blk = a[s:s + _CosineNCE.block]
            expo = torch.addmm(shift, a_blk, b.T, alpha=inv_tau).exp_()
            if ids_a is not None and ids_b is not None:
                # another row with the same id on either side is a false negative: leave it out
                same = (ids_a[s:s + _CosineNCE.block, None] == ids_a[None, :]) | (
                    ids_b[s:s + _CosineNCE.block, None] == ids_b[None, :])
                rows = torch.arange(same.shape[0], device=same.device)
                same[rows, rows + s] = False
                expo.masked_fill_(same, 0.0)
            denom = expo.sum(dim=1, keepdim=True)
            log_denom[s:s + _CosineNCE.block] = denom.squeeze(1).log()
            expo.div_(denom)  # softmax rows P
            grad_a[s:s + _CosineNCE.block] = expo @ b
            grad_b.addmm_(expo.T, a_blk)
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


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float,
             ids: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """One-directional InfoNCE with in-batch negatives: rows of ``a`` vs all rows of ``b`` (cosine / tau).

    ``mean_i -log( exp(cos(a_i, b_i)/tau) / sum_j exp(cos(a_i, b_j)/tau) )``. By default duplicates in the batch
    count as negatives (the reference behaviour); with ``ids = (ids_a, ids_b)`` every ``j != i`` whose row shares
    an id with row ``i`` on either side is left out of the denominator.
    """
    ids_a, ids_b = ids if ids is not None else (None, None)
    return _CosineNCE.apply(F.normalize(a, dim=1), F.normalize(b, dim=1), 1.0 / temperature, ids_a, ids_b)


def perturb(x: torch.Tensor, scale: float = 0.1, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x + sign(x) * normalize(U[0,1)) * scale``: push every coordinate away from zero (DGMRec's noise)."""
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    noise.mul_(scale / torch.linalg.vector_norm(noise, dim=-1, keepdim=True).clamp_min(1e-12))
    return torch.addcmul(x, x.sign(), noise)


class CLUBSample(nn.Module):
    """Sampled CLUB upper bound on mutual information with a Gaussian variational net ``q(y|x)``.

    Mean net ``Linear(x, h) -> ReLU -> Linear(h, y)``; log-variance net the same followed by ``tanh``.
    """

    def __init__(self, x_dim: int, y_dim: int, hidden: int) -> None:
        super().__init__()
        self.mu = nn.Sequential(nn.Linear(x_dim, hidden), nn.ReLU(), nn.Linear(hidden, y_dim))
        self.logvar = nn.Sequential(nn.Linear(x_dim, hidden), nn.ReLU(), nn.Linear(hidden, y_dim), nn.Tanh())

    def log_likelihood(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mu, logvar = self.mu(x), self.logvar(x)
        return (-((mu - y) ** 2) / logvar.exp() - logvar).sum(dim=1).mean()

    def learning_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood that trains the estimator."""
        return -self.log_likelihood(x, y)

    def forward(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The sampled upper bound (positive pairs vs a random permutation of ``y``)."""
        mu, logvar = self.mu(x), self.logvar(x)
        perm = torch.randperm(x.shape[0], generator=generator, device=x.device)
        positive = -((mu - y) ** 2) / logvar.exp()
        negative = -((mu - y[perm]) ** 2) / logvar.exp()
        return (positive.sum(dim=1) - negative.sum(dim=1)).mean() / 2.0


def in_batch_softmax_ce(query: torch.Tensor, keys: torch.Tensor, temperature: float,
                        rows: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of ``query @ keys.T / tau`` with the diagonal as target, on *unnormalised* dot products.

    ``rows`` (bool, one per query row) keeps only those query rows; every key stays a candidate column, so row
    ``i`` is still scored against its own key ``i``. Mean over the kept rows; an empty selection gives 0 (not NaN).
    """
    target = torch.arange(query.shape[0], device=query.device)
    if rows is not None:
        target = target[rows]
        if target.numel() == 0:
            return (query.sum() + keys.sum()) * 0.0
        query = query[rows]
    return F.cross_entropy(query @ (keys.T / temperature), target)  # scale the B x w side, not the B x B logits


def negative_cosine(online: torch.Tensor, target: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """BYOL loss ``1 - mean_i cos(online_i, target_i)`` with a stop-gradient target (BM3).

    Zero rows have cosine 0. ``rows`` (bool) averages over those rows only; an empty selection gives 0.
    """
    cos = F.cosine_similarity(online, target.detach(), dim=-1)
    if rows is not None:
        if not bool(rows.any()):
            return online.sum() * 0.0
        cos = cos[rows]
    return 1.0 - cos.mean()


# ----------------------------------------------------------- LGMRec, DA-MRS and GUME pieces


class _TripleNCE(torch.autograd.Function):
    """Sum-reduced InfoNCE of L2-normalised rows against an explicit negative set.

    Like :class:`_CosineNCE`, rows are processed in cache-sized blocks and the gradient (a fixed set of
    tensors times the incoming scalar) is computed during the forward pass; the ``rows x negatives`` matrix is
    never stored.
    """

    block = 128

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, negatives: torch.Tensor,  # type: ignore[override]
                inv_tau: float) -> torch.Tensor:
        shift = torch.full((1,), -inv_tau, dtype=a.dtype, device=a.device)
        grad_a = torch.empty_like(a)
        grad_n = torch.zeros_like(negatives)
        log_denom = torch.empty(a.shape[0], dtype=a.dtype, device=a.device)
        for s in range(0, a.shape[0], _TripleNCE.block):
            a_blk = a[s:s + _TripleNCE.block]
            expo = torch.addmm(shift, a_blk, negatives.T, alpha=inv_tau).exp_()  # exp((a.n - 1) / tau) <= 1
            denom = expo.sum(dim=1, keepdim=True)
            log_denom[s:s + _TripleNCE.block] = denom.squeeze(1).log()
            expo.div_(denom)
            grad_a[s:s + _TripleNCE.block] = expo @ negatives
            grad_n.addmm_(expo.T, a_blk)
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


def triple_info_nce(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """``sum_i -log( exp(cos(a_i, p_i)/tau) / sum_n exp(cos(a_i, n)/tau) )`` over an explicit negative set.

    LGMRec's hypergraph contrast: **summed** (not averaged) over the rows, and the negatives are the rows of
    ``negatives`` (normally a table that also contains each positive), not the other rows of ``positive``.
    """
    return _TripleNCE.apply(F.normalize(anchor, dim=1), F.normalize(positive, dim=1),
                            F.normalize(negatives, dim=1), 1.0 / temperature)


def gumbel_softmax(logits: torch.Tensor, tau: float, generator: torch.Generator | None = None,
                   noise: bool = True) -> torch.Tensor:
    """Soft Gumbel-softmax over the last dimension: ``softmax((logits + g) / tau)``, ``g ~ Gumbel(0, 1)``.

    Same distribution as ``torch.nn.functional.gumbel_softmax(hard=False)`` but with an optional generator;
    ``noise=False`` gives the deterministic ``softmax(logits / tau)``.
    """
    if noise:
        g = -torch.empty_like(logits).exponential_(generator=generator).log()
        logits = logits + g
    return torch.softmax(logits / tau, dim=-1)


def sym_bernoulli_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Elementwise ``KL(p||q) + KL(q||p)`` of Bernoulli variables given by their logits (``p = sigmoid(a)``).

    The symmetric sum simplifies to ``(sigmoid(a) - sigmoid(b)) * (a - b)``: exact, and finite where the
    probability form (``p log p/q + (1-p) log (1-p)/(1-q)``) saturates to ``0 * log 0``.
    """
    return (torch.sigmoid(logits_p) - torch.sigmoid(logits_q)) * (logits_p - logits_q)


def weighted_bpr_loss(pos: torch.Tensor, neg: torch.Tensor, pos_weight: torch.Tensor,
                      neg_weight: torch.Tensor) -> torch.Tensor:
    """``-mean( w+ log sigmoid(pos - neg) + w- log sigmoid(neg - pos) )`` (DA-MRS's denoising BPR).

    ``w-`` > 0 adds a reversed-preference term for positives suspected to be noise; weights are used as given
    (detach them beforehand).
    """
    diff = pos - neg
    return -(pos_weight * F.logsigmoid(diff) + neg_weight * F.logsigmoid(-diff)).mean()


def moment_alignment(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``|var(a) - var(b)| + |mean(a) - mean(b)|`` over all entries (unbiased variance; GUME's view alignment)."""
    return (a.var() - b.var()).abs() + (a.mean() - b.mean()).abs()


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

    def __init__(self, table: torch.Tensor | None = None, buffer: torch.Tensor | None = None) -> None:
        self.table = table
        self.buffer = buffer
        self.pending: torch.Tensor | None = None  # the unscaled reconstruction gradient ...
        self.scale = 1.0  # ... and its factor
        self.encoder_done = False

    def target_buffer(self, like: torch.Tensor) -> torch.Tensor:
        """Where the reconstruction writes its gradient: the persistent buffer when it may, else new memory."""
        b, t = self.buffer, self.table
        if b is not None and t is not None and t.grad is None and b.shape == like.shape and b.dtype == like.dtype:
            return b
        return torch.empty_like(like)

    def install(self, grad: torch.Tensor) -> bool:
        """Make ``grad`` (the persistent buffer) the table's gradient; False when autograd should take it."""
        t = self.table
        if t is None or self.buffer is None or grad.data_ptr() != self.buffer.data_ptr():
            return False
        if t.grad is None:
            t.grad = grad
        else:
            t.grad.add_(grad)
        return True


class _TableLinear(torch.autograd.Function):
    """``x W^T + b`` whose input gradient absorbs a pending reconstruction gradient (see :class:`TableGradient`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,  # type: ignore[override]
                hand_off: TableGradient) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.hand_off = hand_off
        return torch.addmm(bias, x, weight.T)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        hand_off: TableGradient = ctx.hand_off
        grad_x = None
        if ctx.needs_input_grad[0]:
            if hand_off.pending is not None:
                grad_x = hand_off.pending.addmm_(grad, weight, beta=hand_off.scale)
                hand_off.pending = None
                if hand_off.install(grad_x):
                    grad_x = None
            else:
                grad_x = grad @ weight
        hand_off.encoder_done = True
        grad_w = grad.T @ x if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


def table_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 hand_off: TableGradient | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; with ``hand_off`` its gradient for ``x`` is fused with a reconstruction's."""
    if hand_off is None:
        return F.linear(x, weight, bias)
    return _TableLinear.apply(x, weight, bias, hand_off)


class _LinearMSE(torch.autograd.Function):
    """``mean((x W^T + b - y)^2)`` computed in row blocks, producing every gradient during the forward pass.

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
        x_aug = torch.cat([x, x.new_ones(n, 1)], dim=1)
        w_aug = torch.cat([weight, bias[:, None]], dim=1)
        grad_wb = torch.zeros_like(w_aug)
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
            torch.addmm(y[s:e], xb, w_aug.T, beta=-1, out=diff)  # written once, in place
            flat = diff.view(-1)
            total += torch.dot(flat, flat).double()
            grad_wb.addmm_(diff.T, xb)
            if grad_x is not None:
                torch.mm(diff, weight, out=grad_x[s:e])
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


def linear_mse(x: torch.Tensor, layer: nn.Linear, target: torch.Tensor,
               hand_off: TableGradient | None = None) -> torch.Tensor:
    """``F.mse_loss(layer(x), target)`` without materialising the decoded matrix (see :class:`_LinearMSE`).

    ``hand_off`` (only when ``target`` is a whole table that an encoder also reads through :func:`table_linear`
    with the same object) fuses the two gradients of the table.
    """
    return _LinearMSE.apply(x, layer.weight, layer.bias, target, hand_off)
