r"""CI2MG: contrastive intra- and inter-modality generation for incomplete multimedia recommendation
(Lin et al., ACM MM 2023), following DGMRec's re-implementation (the only one that produced its numbers).

Each modality's item representation is regenerated twice: *intra*-modality by a hypergraph whose hyperedges
are learnable prototypes, *inter*-modality by an entropic optimal-transport plan from the other modalities;
both are fused, batch-normalised and concatenated with a LightGCN embedding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from dgmrec.errors import ConfigError
from dgmrec.graphs import SparseOp, lightgcn_propagate, mean_aggregator, normalized_adjacency
from dgmrec.losses import bpr_loss, info_nce
from dgmrec.models.base import Batch, LossOutput, ModelInput, Recommender

_CONTRAST = ("dgmrec_const", "infonce")


def _xavier_linear(d_in: int, d_out: int, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(d_in, d_out, bias=bias)
    nn.init.xavier_uniform_(layer.weight)
    return layer


def prototype_hypergraph_conv(y: torch.Tensor, incidence: torch.Tensor, mixing: torch.Tensor) -> torch.Tensor:
    r"""One application of :math:`D^{-1} H \Phi B^{-1} H^\top` to ``y`` without forming the items x items matrix.

    ``incidence`` is ``H`` (items x hyperedges, signed cosines), ``mixing`` is :math:`\Phi` (hyperedges x
    hyperedges, applied untransposed); ``D``/``B`` are the row/column sums of ``H`` with exact zeros replaced by 1.
    """
    row = incidence.sum(1)
    col = incidence.sum(0)
    row = torch.where(row == 0, torch.ones_like(row), row)
    col = torch.where(col == 0, torch.ones_like(col), col)
    edge = (incidence.T @ y) / col.unsqueeze(1)
    return (incidence @ (mixing @ edge)) / row.unsqueeze(1)


# ------------------------------------------------------------------ chunked Sinkhorn transport (inter-modality)


class _GaussianKernel:
    """Row blocks of ``K_ij = exp(-||x_i - y_j||^2 / epsilon)``: one GEMM into a reused buffer, one exp.

    The exponent ``(2 x.y - |x|^2 - |y|^2) / epsilon`` is a single product of augmented rows
    ``[x, -|x|^2/eps, 1]`` and ``[2y/eps, 1, -|y|^2/eps]``. A block is only valid until the next call.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, epsilon: float, chunk_size: int) -> None:
        ones_x = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
        ones_y = torch.ones(y.shape[0], 1, dtype=y.dtype, device=y.device)
        self.x = torch.cat([x, (x * x).sum(1, keepdim=True) / -epsilon, ones_x], dim=1)
        self.y_t = torch.cat([y * (2.0 / epsilon), ones_y, (y * y).sum(1, keepdim=True) / -epsilon], dim=1).T
        self.y_t = self.y_t.contiguous()
        self.n, self.m, self.chunk_size = x.shape[0], y.shape[0], chunk_size
        self.buffer = torch.empty(min(chunk_size, self.n) * self.m, dtype=x.dtype, device=x.device)

    def ranges(self) -> list[tuple[int, int]]:
        return [(s, min(self.n, s + self.chunk_size)) for s in range(0, self.n, self.chunk_size)]

    def block(self, start: int, stop: int) -> torch.Tensor:
        k = self.buffer[: (stop - start) * self.m].view(stop - start, self.m)
        torch.mm(self.x[start:stop], self.y_t, out=k)
        return k.exp_()


def _sinkhorn_scalings(kernel: _GaussianKernel, n: int, m: int, n_iter: int, transposed: bool,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Scalings ``u, v`` of ``Sinkhorn(K)`` and ``u'`` of ``Sinkhorn(K^T)`` (see :func:`sinkhorn_transport`).

    One pass over the row blocks of ``K`` per iteration serves both problems: ``K v`` and ``K u'`` are local to
    a block, ``K^T u`` and ``K^T v'`` accumulate over blocks. ``v'`` of the last iteration is left to the caller.
    """
    x = kernel.x
    u = torch.empty(n, dtype=x.dtype, device=x.device)
    v = torch.ones(m, dtype=x.dtype, device=x.device)
    u_t = torch.ones(m, dtype=x.dtype, device=x.device)  # only read from the second iteration on
    for it in range(n_iter):
        acc = torch.zeros(2 if transposed else 1, m, dtype=x.dtype, device=x.device)
        right = torch.stack([v, u_t], dim=1) if transposed else v.unsqueeze(1)
        for start, stop in kernel.ranges():
            k = kernel.block(start, stop)
            kv = k @ right  # K v (and K u')
            u[start:stop] = 1.0 / (n * kv[:, 0])  # rows of Sinkhorn(K) sum to 1/n
            left = u[start:stop].unsqueeze(0)
            if transposed:
                # v' of the previous iteration (all ones before the first one)
                v_t = 1.0 / (n * kv[:, 1]) if it > 0 else torch.ones_like(kv[:, 1])
                left = torch.stack([u[start:stop], v_t])
            acc.addmm_(left, k)
        v = 1.0 / (m * acc[0])  # columns of Sinkhorn(K) sum to 1/m
        if transposed:
            u_t = 1.0 / (m * acc[1])  # rows of Sinkhorn(K^T) sum to 1/m
    return u, v, (u_t if transposed else None)


class _TransportApply(torch.autograd.Function):
    """``Gamma @ values`` (and ``Gamma' @ values_t``) with the plans held fixed; block-wise in both directions."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, values: torch.Tensor,  # type: ignore[override]
                values_t: torch.Tensor | None, u: torch.Tensor, v: torch.Tensor, u_t: torch.Tensor | None,
                epsilon: float, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        n, m = x.shape[0], y.shape[0]
        kernel = _GaussianKernel(x, y, epsilon, chunk_size)
        out = torch.empty(n, values.shape[1], dtype=values.dtype, device=values.device)
        scaled = v.unsqueeze(1) * values
        out_t = v_t = None
        if values_t is not None and u_t is not None:
            out_t = torch.zeros(m, values_t.shape[1], dtype=values_t.dtype, device=values_t.device)
            v_t = torch.empty(n, dtype=x.dtype, device=x.device)
            scaled = torch.cat([scaled, u_t.unsqueeze(1)], dim=1)
        for start, stop in kernel.ranges():
            k = kernel.block(start, stop)
            if out_t is not None and v_t is not None and values_t is not None and u_t is not None:
                both = k @ scaled
                out[start:stop] = (n * u[start:stop]).unsqueeze(1) * both[:, :-1]
                v_t[start:stop] = 1.0 / (n * both[:, -1])  # v' of the last iteration
                out_t.addmm_(k.T, v_t[start:stop].unsqueeze(1) * values_t[start:stop])
            else:
                out[start:stop] = (n * u[start:stop]).unsqueeze(1) * (k @ scaled)
        if out_t is not None and u_t is not None:
            out_t *= (m * u_t).unsqueeze(1)
        ctx.save_for_backward(x, y, u, v, u_t, v_t)
        ctx.epsilon, ctx.chunk_size = epsilon, chunk_size
        return out, out_t

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None, grad_t: torch.Tensor | None):  # type: ignore[override]
        x, y, u, v, u_t, v_t = ctx.saved_tensors
        n, m = x.shape[0], y.shape[0]
        g_values = g_values_t = scaled_t = None
        if ctx.needs_input_grad[2] and grad is not None:
            g_values = torch.zeros(m, grad.shape[1], dtype=x.dtype, device=x.device)
        if ctx.needs_input_grad[3] and grad_t is not None and v_t is not None and u_t is not None:
            g_values_t = torch.empty(n, grad_t.shape[1], dtype=x.dtype, device=x.device)
            scaled_t = (m * u_t).unsqueeze(1) * grad_t
        if g_values is not None or g_values_t is not None:
            kernel = _GaussianKernel(x, y, ctx.epsilon, ctx.chunk_size)
            for start, stop in kernel.ranges():
                k = kernel.block(start, stop)
                if g_values is not None and grad is not None:
                    g_values.addmm_(k.T, (n * u[start:stop]).unsqueeze(1) * grad[start:stop])
                if g_values_t is not None and scaled_t is not None:
                    g_values_t[start:stop] = v_t[start:stop].unsqueeze(1) * (k @ scaled_t)
            if g_values is not None:
                g_values *= v.unsqueeze(1)
        return None, None, g_values, g_values_t, None, None, None, None, None


def sinkhorn_transport(
    x: torch.Tensor,
    y: torch.Tensor,
    values: torch.Tensor,
    epsilon: float = 5.0,
    n_iter: int = 10,
    values_t: torch.Tensor | None = None,
    chunk_size: int = 512,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""Entropic transport between the rows of ``x`` (n) and ``y`` (m), applied to ``values`` without an n x m matrix.

    Kernel :math:`K_{ij} = \exp(-\|x_i - y_j\|^2/\epsilon)`; the plan is the reference's fixed-iteration Sinkhorn
    (CI2MG): start from :math:`K/\sum K`, repeat ``n_iter`` times "rows sum to 1/n, then columns sum to 1/m", and
    multiply by ``n``, i.e. :math:`\Gamma = n\,\mathrm{diag}(u) K \mathrm{diag}(v)` (columns sum to ``n/m``).
    Returns :math:`\Gamma\,` ``values`` (``values``: m rows) and, when ``values_t`` (n rows) is given,
    :math:`\Gamma'\,` ``values_t`` with :math:`\Gamma'` the same algorithm run on :math:`K^\top` (the reverse
    direction, sharing the passes over ``K``); otherwise ``None``. The plans are constants (no gradient to
    ``x``/``y``); the outputs are differentiable with respect to ``values``/``values_t``. ``K`` is rebuilt in row
    blocks of ``chunk_size`` in every pass (``n_iter + 1`` passes forward, one backward), so memory stays
    ``O(chunk_size * m)``. As in the reference there is no log-domain stabilisation: a row or column whose
    squared distances all exceed ~``85 * epsilon`` underflows.
    """
    with torch.no_grad():
        xd, yd = x.detach(), y.detach()
        kernel = _GaussianKernel(xd, yd, float(epsilon), int(chunk_size))
        u, v, u_t = _sinkhorn_scalings(kernel, xd.shape[0], yd.shape[0], int(n_iter), values_t is not None)
    return _TransportApply.apply(xd, yd, values, values_t, u, v, u_t, float(epsilon), int(chunk_size))


class CI2MG(Recommender):
    r"""CI2MG for ``M >= 2`` modalities (DGMRec's version by default).

    Architecture
    ------------
    * Collaborative part: :math:`[C_u; C_i] = \mathrm{LGC}_{L}(E_u, E_i; D^{-1}A)` (random-walk adjacency, no
      self-loops, mean over the layers including the ego layer).
    * Modal smoothing (frozen imputed features): :math:`F_m = W_m X_m`; users average the features of their
      items, :math:`F_{m,u}`; items average their users, :math:`\bar F_{m,i}` (items without training users: 0).
    * Intra-modality hypergraph: :math:`H_m = \mathrm{rownorm}(\bar F_m)\,\mathrm{rownorm}(P_m)^\top` with ``P_m``
      learnable prototypes; :math:`Y_m \leftarrow \sigma(D^{-1} H_m \Phi_m B^{-1} H_m^\top Y_m)`,
      ``n_hyper_layers`` times from :math:`Y_m = \bar F_m` (applied factor by factor, never as an items x items
      matrix).
    * Inter-modality transport: :math:`\Gamma_m` = Sinkhorn (``sinkhorn_epsilon``, ``sinkhorn_iterations``, no
      gradient) on the squared distances between :math:`S_m = \sum_{k \ne m} Y_k` (rows) and :math:`Y_m`
      (columns); :math:`G_m = (\Gamma_m + \delta_m) Y_m`. With two modalities this is exactly the release's pair of
      plans on ``Dist`` and ``Dist^T``; with three, its "sum of the other two" rule. Computed block-wise by
      :func:`sinkhorn_transport` (the two directions of a reciprocal pair share their passes).
    * Enhancement: :math:`\hat E_m = \mathrm{BN}(\mathrm{enh}_m([Y_m \| G_m]))` with **one** BatchNorm shared by
      all modalities (batch statistics over all items in training, running statistics at scoring).
    * Score: :math:`z_u = [C_u \| \mathrm{rownorm}(F_{1,u}) \| \dots]`, :math:`z_i = [C_i \| \mathrm{rownorm}(\hat
      E_1) \| \dots]`, :math:`s(u, i) = z_u \cdot z_i`.

    Losses
    ------
    :math:`L = L_{rec} + \lambda_1 L_s + \lambda_2 L_{bpr}` with :math:`L_{bpr}` = BPR on ``z``,
    :math:`L_{rec} = \sum_m \mathrm{MSE}(\hat E_m[J_m], F_m[J_m])` (``J_m`` = unique batch positives with
    modality ``m`` observed; the target is not detached), and :math:`L_s` the contrastive term of ``ci2mg_contrast``.

    Missing modalities
    ------------------
    Imputed features (frozen); items missing ``m`` are left out of its reconstruction and contrastive rows; the
    generated :math:`\hat E_m` represents every item at scoring time.

    Options (default = DGMRec release)
    ----------------------------------
    ``ci2mg_contrast``
        ``dgmrec_const``: the release's term compares :math:`\cos(Y_m, G_m)` with itself, so it equals
        :math:`\log 2` per modality with zero gradient; it is added as that constant. ``infonce``: InfoNCE
        (temperature ``temp``) between :math:`Y_m[J_m]` and :math:`G_m[J_m]` with in-batch negatives.
    ``ci2mg_learn_delta``
        ``false``: :math:`\delta_m` is a zero buffer, as in the release (never trained). ``true``: a learnable
        correction of the plan (zero-initialised parameter).

    Not reproduced: the release's unused per-layer linears, its per-batch print, and (three-modality TikTok
    path) the reuse of the text index set for the audio terms. The release recomputes everything for every
    evaluation batch; here :meth:`prepare_eval` computes it once.
    """

    name = "CI2MG"
    summary = "regenerates each modality's item representation from prototypes and other modalities (MM 2023)"
    missing_aware = True

    def __init__(self, data: ModelInput, config: Mapping[str, Any]) -> None:
        super().__init__(data, config)
        if str(config["ci2mg_contrast"]) not in _CONTRAST:
            raise ConfigError(f"key 'ci2mg_contrast' must be one of {', '.join(_CONTRAST)}, "
                              f"got {config['ci2mg_contrast']!r}", source="ci2mg_contrast")
        M = data.n_modalities
        if M < 2:
            raise ConfigError("CI2MG needs at least two modalities", source="--modalities")
        self.M = M
        d = int(config["embedding_size"])
        n_proto = int(config["n_prototypes"])
        self.n_ui_layers = int(config["n_ui_layers"])
        self.n_hyper_layers = int(config["n_hyper_layers"])
        self.lamb_1 = float(config["lamb_1"])
        self.lamb_2 = float(config["lamb_2"])
        self.temp = float(config["temp"])
        self.contrast = str(config["ci2mg_contrast"])
        self.epsilon = float(config["sinkhorn_epsilon"])
        self.sinkhorn_iterations = int(config["sinkhorn_iterations"])
        self.sinkhorn_chunk = int(config["sinkhorn_chunk"])

        train = data.train
        self.adj = SparseOp(normalized_adjacency(train, eps=1e-7, mode="rw"), data.device)
        self.user_agg = SparseOp(mean_aggregator(train), data.device)
        self.item_agg = SparseOp(mean_aggregator(sp.csr_matrix(train.T)), data.device)

        self.user_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_users, d)))
        self.item_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_items, d)))
        for j, m in enumerate(self.modalities):
            self.register_buffer(f"feature_{j}", data.features[m].detach().clone().float(), persistent=False)
        self.encoders = nn.ModuleList(_xavier_linear(int(data.features[m].shape[1]), d) for m in self.modalities)
        self.prototypes = nn.ParameterList(nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_proto, d)))
                                           for _ in range(M))
        self.hyper_mixing = nn.ModuleList(nn.Linear(n_proto, n_proto, bias=False) for _ in range(M))
        self.enhancers = nn.ModuleList(_xavier_linear(2 * d, d) for _ in range(M))
        self.bn = nn.BatchNorm1d(d)
        delta = torch.zeros(M, self.n_items)
        if bool(config["ci2mg_learn_delta"]):
            self.ot_delta = nn.Parameter(delta)
        else:
            self.register_buffer("ot_delta", delta, persistent=False)
        self.register_buffer("observed", data.observed.detach().clone().bool(), persistent=False)

        # transport problems: modality m takes the sum of the others as sources; a reciprocal pair (two
        # modalities) is one kernel seen from both sides
        others = [[k for k in range(M) if k != m] for m in range(M)]
        self.transport_groups: list[tuple[int, int | None]] = []
        done: set[int] = set()
        for m in range(M):
            if m in done:
                continue
            partner = others[m][0] if len(others[m]) == 1 and others[others[m][0]] == [m] else None
            self.transport_groups.append((m, partner))
            done.update({m} if partner is None else {m, partner})
        self.others = others

    # ---------------------------------------------------------------------------------------- forward
    def features(self, j: int) -> torch.Tensor:
        return getattr(self, f"feature_{j}")

    def forward_all(self) -> dict[str, Any]:
        """Every user's and item's representation (with autograd when training)."""
        ego = torch.cat([self.user_embedding, self.item_embedding])
        cf = lightgcn_propagate(self.adj, ego, self.n_ui_layers)
        projected = [enc(self.features(j)) for j, enc in enumerate(self.encoders)]  # F_m
        user_modal = self.user_agg @ torch.cat(projected, dim=1)  # F_{m,u}
        item_modal = self.item_agg @ user_modal  # bar F_m
        user_parts = list(user_modal.split(user_modal.shape[1] // self.M, dim=1))
        item_parts = list(item_modal.split(item_modal.shape[1] // self.M, dim=1))

        hyper = []
        for j in range(self.M):
            incidence = F.normalize(item_parts[j], dim=1) @ F.normalize(self.prototypes[j], dim=1).T
            y = item_parts[j]
            for _ in range(self.n_hyper_layers):
                y = torch.sigmoid(prototype_hypergraph_conv(y, incidence, self.hyper_mixing[j].weight))
            hyper.append(y)

        generated: list[torch.Tensor | None] = [None] * self.M
        for m, partner in self.transport_groups:
            sources = torch.stack([hyper[k] for k in self.others[m]]).sum(0)
            # rows = source items, columns = target items of modality m
            out, out_t = sinkhorn_transport(sources, hyper[m], hyper[m], self.epsilon, self.sinkhorn_iterations,
                                            values_t=None if partner is None else hyper[partner],
                                            chunk_size=self.sinkhorn_chunk)
            generated[m] = out
            if partner is not None:
                generated[partner] = out_t
        enhanced = []
        for j in range(self.M):
            g = generated[j]
            assert g is not None
            g = g + (self.ot_delta[j] @ hyper[j]).unsqueeze(0)  # (Gamma + delta) Y
            generated[j] = g
            enhanced.append(self.bn(self.enhancers[j](torch.cat([hyper[j], g], dim=1))))
        u_cf, i_cf = cf[: self.n_users], cf[self.n_users:]
        user = torch.cat([u_cf, *(F.normalize(p, dim=1) for p in user_parts)], dim=1)
        item = torch.cat([i_cf, *(F.normalize(e, dim=1) for e in enhanced)], dim=1)
        return {"user": user, "item": item, "projected": projected, "hyper": hyper, "generated": generated,
                "enhanced": enhanced}

    # ------------------------------------------------------------------------------------------- loss
    def loss(self, batch: Batch) -> LossOutput:
        f = self.forward_all()
        u = F.embedding(batch.users, f["user"])
        pos = (u * F.embedding(batch.pos, f["item"])).sum(1)
        neg = (u * F.embedding(batch.neg, f["item"])).sum(1)
        bpr = self.lamb_2 * bpr_loss(pos, neg)
        positives = torch.unique(batch.pos)
        zero = torch.zeros((), device=pos.device)
        rec, contrast = zero, zero
        for j in range(self.M):
            rows = positives[self.observed[positives, j]]
            if len(rows) == 0:
                continue
            rec = rec + F.mse_loss(F.embedding(rows, f["enhanced"][j]), F.embedding(rows, f["projected"][j]))
            if self.contrast == "dgmrec_const":
                contrast = contrast + math.log(2.0)  # positive and "negative" scores are the same quantity
            else:
                contrast = contrast + info_nce(F.embedding(rows, f["hyper"][j]), F.embedding(rows, f["generated"][j]),
                                               self.temp)
        contrast = self.lamb_1 * contrast
        total = rec + contrast + bpr
        parts = {"bpr": bpr, "rec": rec, "contrast": contrast}
        return LossOutput(total, {k: float(v.detach()) for k, v in parts.items()})

    # ---------------------------------------------------------------------------------------- scoring
    def final_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.forward_all()
        return f["user"], f["item"]
