"""Loss functions shared by the models (BPR, InfoNCE, norms, CLUB) — written once, tested once.

Where a loss has a fused kernel (InfoNCE, the linear decoder's MSE), the function here states the maths and
calls the kernel in :mod:`dgmrec.ops.fused`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dgmrec.ops import fused


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


def linear_mse(x: torch.Tensor, layer: nn.Linear, target: torch.Tensor) -> torch.Tensor:
    """``F.mse_loss(layer(x), target)``: the mean squared error of a linear decoder.

    Computed block-wise without the decoded matrix (:func:`dgmrec.ops.fused.linear_mse`).
    """
    return fused.linear_mse(x, layer.weight, layer.bias, target)


@torch.no_grad()
def _centred(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``z`` and ``y`` in float64, centred, and their column means: ``(zc, yc, z_mean, y_mean)``."""
    zd, yd = z.double(), y.double()
    z_mean, y_mean = zd.mean(0), yd.mean(0)
    return zd - z_mean, yd - y_mean, z_mean, y_mean


def ridge_fit(z: torch.Tensor, y: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression ``y ~ z W + b`` in float64, the penalty relative to the mean input variance.

    Returns ``(W, b)`` of shapes ``(d_z, d_y)`` and ``(d_y,)`` in ``z``'s dtype.
    """
    zc, yc, z_mean, y_mean = _centred(z, y)
    gram = zc.T @ zc
    gram.diagonal().add_(ridge * float(gram.diagonal().mean()) + 1e-12)
    w = torch.linalg.solve(gram, zc.T @ yc)
    return w.to(z.dtype), (y_mean - z_mean @ w).to(z.dtype)


def ridge_path(z: torch.Tensor, y: torch.Tensor, ridges: Sequence[float]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`ridge_fit` for several strengths at the cost of one symmetric eigendecomposition.

    The decomposition is of the ``d_z x d_z`` input Gram matrix, or, with fewer rows than columns, of the
    ``n x n`` kernel matrix (``W = Z^T (Z Z^T + r I)^{-1} Y``, the same solution).
    """
    zc, yc, z_mean, y_mean = _centred(z, y)
    scale = float((zc * zc).sum()) / zc.shape[1]  # mean diagonal of the input Gram matrix
    if zc.shape[0] < zc.shape[1]:
        lam, vec = torch.linalg.eigh(zc @ zc.T)
        left, proj = zc.T @ vec, vec.T @ yc
    else:
        lam, vec = torch.linalg.eigh(zc.T @ zc)
        left, proj = vec, vec.T @ (zc.T @ yc)
    out = []
    for ridge in ridges:
        w = left @ (proj / (lam.clamp_min(0.0) + ridge * scale + 1e-12)[:, None])
        out.append((w.to(z.dtype), (y_mean - z_mean @ w).to(z.dtype)))
    return out


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float,
             ids: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """One-directional InfoNCE with in-batch negatives: rows of ``a`` vs all rows of ``b`` (cosine / tau).

    ``mean_i -log( exp(cos(a_i, b_i)/tau) / sum_j exp(cos(a_i, b_j)/tau) )``. By default duplicates in the batch
    count as negatives (the reference behaviour); with ``ids = (ids_a, ids_b)`` every ``j != i`` whose row shares
    an id with row ``i`` on either side is left out of the denominator.
    """
    ids_a, ids_b = ids if ids is not None else (None, None)
    return fused.cosine_nce(F.normalize(a, dim=1), F.normalize(b, dim=1), 1.0 / temperature, ids_a, ids_b)


def perturb(x: torch.Tensor, scale: float = 0.1, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x + sign(x) * normalize(U[0,1)) * scale``: push every coordinate away from zero (DGMRec's noise)."""
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    noise.mul_(scale / torch.linalg.vector_norm(noise, dim=-1, keepdim=True).clamp_min(1e-12))
    return torch.addcmul(x, x.sign(), noise)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout (``F.dropout``'s maths: zero with probability ``p``, scale the rest by ``1 / (1 - p)``),
    with the mask drawn by ``torch.rand`` (on CPU about twice as fast as ``F.dropout``'s Bernoulli sampler)."""
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return torch.zeros_like(x)
    return x * ((torch.rand_like(x) >= p) * (1.0 / (1.0 - p)))


class Dropout(nn.Module):
    """:func:`dropout` as a module (active in training mode only, like ``nn.Dropout``)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


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
    # the target carries no gradient: normalise it once, and divide the products by the online norms only
    # (the values of ``F.cosine_similarity``, with a lighter backward)
    target = target.detach()
    unit_target = target / target.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    cos = (online * unit_target).sum(-1) / online.norm(dim=-1).clamp_min(1e-8)
    if rows is not None:
        if not bool(rows.any()):
            return online.sum() * 0.0
        cos = cos[rows]
    return 1.0 - cos.mean()


# ----------------------------------------------------------- LGMRec, DA-MRS and GUME pieces


def triple_info_nce(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """``sum_i -log( exp(cos(a_i, p_i)/tau) / sum_n exp(cos(a_i, n)/tau) )`` over an explicit negative set.

    LGMRec's hypergraph contrast: **summed** (not averaged) over the rows, and the negatives are the rows of
    ``negatives`` (normally a table that also contains each positive), not the other rows of ``positive``.
    """
    return fused.triple_nce(F.normalize(anchor, dim=1), F.normalize(positive, dim=1), F.normalize(negatives, dim=1),
                            1.0 / temperature)


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
