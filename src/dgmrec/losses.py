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


class _CosineNCE(torch.autograd.Function):
    """InfoNCE on already L2-normalised rows with a hand-written backward.

    Cosines are bounded by 1, so ``log-sum-exp`` needs no max pass (logits are shifted by ``1/tau``), and the
    exponentials are kept for the backward (normalised on the ``n x d`` side): two passes over the ``n x n``
    matrix instead of the eight or so of the generic graph, which dominate DGMRec's step time on a CPU.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, inv_tau: float) -> torch.Tensor:  # type: ignore[override]
        # exp((a.b - 1) / tau) in place: no max pass, no overflow (cosines <= 1)
        expo = torch.addmm(torch.full((1,), -inv_tau, dtype=a.dtype, device=a.device), a, b.T, alpha=inv_tau)
        expo.exp_()
        denom = expo.sum(dim=1)
        positive = (a * b).sum(dim=1) * inv_tau
        loss = (inv_tau + denom.log() - positive).mean()
        ctx.save_for_backward(a, b, expo, denom)
        ctx.inv_tau = inv_tau
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        a, b, expo, denom = ctx.saved_tensors
        scale = grad * ctx.inv_tau / a.shape[0]
        # softmax P = expo / denom (row-wise); d/da = (P - I) b, d/db = (P - I)^T a
        grad_a = (expo @ b) / denom.unsqueeze(1) - b
        grad_b = expo.T @ (a / denom.unsqueeze(1)) - a
        return grad_a * scale, grad_b * scale, None


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """One-directional InfoNCE with in-batch negatives: rows of ``a`` vs all rows of ``b`` (cosine / tau).

    ``mean_i -log( exp(cos(a_i, b_i)/tau) / sum_j exp(cos(a_i, b_j)/tau) )``; duplicates are not removed.
    """
    return _CosineNCE.apply(F.normalize(a, dim=1), F.normalize(b, dim=1), 1.0 / temperature)


def perturb(x: torch.Tensor, scale: float = 0.1, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x + sign(x) * normalize(U[0,1)) * scale``: push every coordinate away from zero (DGMRec's noise)."""
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + torch.sign(x) * F.normalize(noise, dim=-1) * scale


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

