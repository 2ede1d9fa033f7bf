r"""MMGCN (Wei et al., ACM MM 2019): one graph network per modality on the user-item graph, averaged.

Per modality ``m`` the node table :math:`x^0 = \mathrm{rownorm}([P_m;\ f_m(X_m)])` (users: a preference table,
items: the features, through a linear front-end for the modalities named in ``mmgcn_latent_dims``) passes three
layers of

.. math::  h = \mathrm{lrelu}(\mathrm{conv}_k(x)), \quad \hat x = \mathrm{lrelu}(L_k x) + E_{id}, \quad
           x \leftarrow \mathrm{lrelu}(G_k [h \,\|\, \hat x])

where ``conv_k`` is a mean aggregation over the bipartite graph (``D^{-1} A``) of ``x W_k (+ b_k)``. The node
representation is the mean over modalities; ``score(u, i) = z_u . z_i``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dgmrec.errors import ConfigError
from dgmrec.graphs import SparseOp, normalized_adjacency
from dgmrec.models.base import Batch, ModelInput, NodeTableRecommender

_CHOICES = {"mmgcn_conv_mode": ("auto", "bias_norm", "plain")}
_N_LAYERS = 3  # the reference hard-codes three layers (its n_layers key is ignored)


def _xavier_normal_linear(d_in: int, d_out: int) -> nn.Linear:
    layer = nn.Linear(d_in, d_out)
    nn.init.xavier_normal_(layer.weight)
    return layer


class _ModalityGCN(nn.Module):
    """One modality's branch: optional front-end, preference table and three conv/self/combine layers."""

    def __init__(self, n_users: int, d_feat: int, d_latent: int, d: int, bias_norm: bool,
                 train_preference: bool) -> None:
        super().__init__()
        width = d_latent if d_latent > 0 else d_feat
        self.front = nn.Linear(d_feat, width) if d_latent > 0 else None  # PyTorch default init
        pref = nn.init.xavier_normal_(torch.empty(n_users, width))
        if train_preference:
            self.preference = nn.Parameter(pref)
        else:  # reference: a plain tensor the optimiser never sees (kept in checkpoints)
            self.register_buffer("preference", pref)
        d_in = [width] + [d] * (_N_LAYERS - 1)
        d_conv = d_in  # conv_k maps D_in -> D_in (width for the first layer, d afterwards)
        self.conv_weight = nn.ParameterList(
            nn.Parameter(nn.init.xavier_normal_(torch.empty(i, o))) for i, o in zip(d_in, d_conv, strict=True))
        self.bias_norm = bias_norm
        self.conv_bias = nn.ParameterList(nn.Parameter(torch.zeros(o)) for o in d_conv) if bias_norm else None
        self.self_lin = nn.ModuleList(_xavier_normal_linear(i, d) for i in d_in)
        combine = [nn.Linear(o + d, d) for o in d_conv]
        nn.init.xavier_normal_(combine[0].weight)  # only the first combine layer is re-initialised (reference)
        self.combine = nn.ModuleList(combine)
        self.d_conv = d_conv

    def forward(self, features: torch.Tensor, id_embedding: torch.Tensor, agg: SparseOp) -> torch.Tensor:
        items = self.front(features) if self.front is not None else features
        x = F.normalize(torch.cat([self.preference, items], dim=0), dim=1)
        for k in range(_N_LAYERS):
            lin = self.self_lin[k]
            conv_b = self.conv_bias[k] if self.conv_bias is not None else lin.bias.new_zeros(self.d_conv[k])
            # one fused matmul for the message transform x W_k (+ b_k) and the self transform L_k x
            y = torch.addmm(torch.cat([conv_b, lin.bias]), x, torch.cat([self.conv_weight[k], lin.weight.T], dim=1))
            h = agg @ y[:, : self.d_conv[k]]
            if self.bias_norm:
                h = F.normalize(h, dim=1)
            h = F.leaky_relu(h)
            x_hat = F.leaky_relu(y[:, self.d_conv[k]:]) + id_embedding
            x = F.leaky_relu(self.combine[k](torch.cat([h, x_hat], dim=1)))
        return x


class MMGCN(NodeTableRecommender):
    """Multi-modal graph convolution network: per-modality GCNs on the user-item graph, averaged.

    Architecture
    ------------
    The graph is the training bipartite graph in both directions with mean aggregation (``D^{-1} A``, nodes
    without neighbours aggregate to 0). Branch ``m`` starts from ``rownorm([P_m; f_m(X_m)])``: ``P_m`` is a
    ``U x D_m`` preference table, ``f_m`` a linear front-end to ``mmgcn_latent_dims[m]`` dimensions (reference:
    256 for the image only) or the identity (``D_m = d_m``). Three layers (fixed; the reference ignores
    ``n_layers``): ``h = lrelu(conv(x))``, ``x_hat = lrelu(L x) + E_id``, ``x = lrelu(G [h || x_hat])`` with
    conv weights ``D_in x D_in`` and ``E_id`` a shared ``(U+I) x d`` ID table. Final ``Z = mean_m x_m``,
    ``score = z_u . z_i``. Features are frozen buffers.

    Loss
    ----
    ``BPR(s+, s-)`` (log-sigmoid) ``+ reg_weight * (mean(E_id[u]^2 + E_id[i]^2) + sum_m mean(P_m^2))`` with each
    user repeated for its positive and negative item. With the reference's frozen ``E_id`` and ``P_m`` the
    regulariser carries no gradient, so ``reg_weight`` has no effect unless ``mmgcn_train_id`` is on.

    Missing modalities
    ------------------
    Only through the data layer's imputation; the observed mask is not used. (The reference's three-modality
    path did not impute at all; we always impute.) New items get their representation from their features and
    the frozen ID rows like every other item.

    Options (departures from the reference, default = reference)
    ----------------------------------------------------------
    ``mmgcn_conv_mode``: ``bias_norm`` = the DGMRec two-modality conv (bias added before aggregation, output
    L2-normalised); ``plain`` = MMRec / the DGMRec three-modality conv (no bias, no normalisation); ``auto``
    (default) = ``bias_norm`` for two modalities and ``plain`` for three or more, as in the reference release.
    ``mmgcn_train_id``: false (default) = ``E_id`` and ``P_m`` are frozen random tensors (as in the reference,
    where they are never registered as parameters); true = trainable parameters as the paper intends.
    ``mmgcn_latent_dims``: modality -> front-end width (absent or 0 = raw features); default ``{image: 256}``.
    ``use_stale_cache``: false (default) = scoring recomputes the representation in :meth:`prepare_eval`; true =
    score with the representation of the last training forward (one optimiser step stale), as the reference.
    """

    name = "MMGCN"
    summary = "one graph network per modality on the user-item graph, averaged (MM 2019)"
    choices = _CHOICES
    min_modalities = 1

    def __init__(self, data: ModelInput, config: Mapping[str, Any]) -> None:
        super().__init__(data, config)
        d = int(config["embedding_size"])
        mode = str(config["mmgcn_conv_mode"])
        if mode == "auto":
            mode = "bias_norm" if data.n_modalities == 2 else "plain"
        latent = config["mmgcn_latent_dims"] or {}
        if not isinstance(latent, Mapping) or not all(isinstance(v, int) and v >= 0 for v in latent.values()):
            raise ConfigError("must map modality names to non-negative integers, e.g. {image: 256}",
                              source="mmgcn_latent_dims")
        self.reg_weight = float(config["reg_weight"])
        self.train_id = bool(config["mmgcn_train_id"])
        self.use_stale_cache = bool(config["use_stale_cache"])

        self.agg = SparseOp(normalized_adjacency(data.train, eps=None, mode="rw"), data.device)
        for j, m in enumerate(self.modalities):
            self.register_buffer(f"features_{j}", data.features[m].detach().clone().float(), persistent=False)
        id_table = nn.init.xavier_normal_(torch.empty(self.n_users + self.n_items, d))
        if self.train_id:
            self.id_embedding = nn.Parameter(id_table)
        else:
            self.register_buffer("id_embedding", id_table)
        self.branches = nn.ModuleList(
            _ModalityGCN(self.n_users, int(data.features[m].shape[1]), int(latent.get(m, 0)), d,
                         bias_norm=mode == "bias_norm", train_preference=self.train_id)
            for m in self.modalities)

    def feature(self, j: int) -> torch.Tensor:
        return getattr(self, f"features_{j}")

    def forward_all(self) -> torch.Tensor:
        """The ``(U+I) x d`` node representation (mean over the modality branches)."""
        out = [branch(self.feature(j), self.id_embedding, self.agg) for j, branch in enumerate(self.branches)]
        return torch.stack(out).mean(dim=0)

    def extra_reg(self, batch: Batch) -> torch.Tensor:
        return sum(b.preference.pow(2).mean() for b in self.branches)
