r"""SiBraR: single-branch recommendation with modality sampling (Ganhör et al., 2024), as run by DGMRec.

One shared branch network maps every item "modality" (the item ID embedding and each projected content
feature) into the same space, so an item can be scored from whichever modalities are present; training draws
two modalities per example and adds a contrastive term between them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dgmrec.losses import Dropout, bpr_loss
from dgmrec.models.base import Batch, LossOutput, ModelInput, Recommender


def draw_modality_pairs(available: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Two distinct candidates per row, uniformly among the ``True`` entries of ``available`` ``(B, C)``.

    Returns ``(B, 2)`` column indices in random order (the first two of a random permutation of the available
    candidates). Rows with a single available candidate repeat it in both columns.
    """
    keys = torch.rand(available.shape, generator=generator, device=available.device)
    keys = torch.where(available, keys, torch.full_like(keys, -1.0))
    top = torch.topk(keys, 2, dim=1).indices
    second_ok = available.gather(1, top[:, 1:2]).squeeze(1)
    top[:, 1] = torch.where(second_ok, top[:, 1], top[:, 0])
    return top


class SIBRAR(Recommender):
    r"""SiBraR for ``M >= 1`` content modalities, reproducing the DGMRec release by default.

    Architecture
    ------------
    Users: a free table :math:`e_u`. Items: an ID table :math:`E_i` (the "interaction" modality) and per content
    modality a **trainable** copy :math:`T_m` of the imputed features with a projection
    :math:`\mathrm{trs}_m: d_m \to d`. One shared branch
    :math:`g(x) = fc_2(\mathrm{ReLU}(fc_1(\mathrm{Dropout}(x))))` gives :math:`c_{id,i} = g(E_i[i])` (not
    normalised) and :math:`c_{m,i} = \mathrm{rownorm}(g(\mathrm{trs}_m(T_m[i])))`.
    Scoring: :math:`v_i = \mathrm{mean}(c_{id,i}, c_{1,i}, \dots, c_{M,i})`, :math:`s(u, i) = e_u \cdot v_i`.

    Losses
    ------
    Per example two distinct modalities ``(a, b)`` are drawn uniformly from the ``M + 1`` candidates (the same
    pair for the positive and the negative item); :math:`r^\pm = c_{a,i^\pm} + c_{b,i^\pm}` (a sum) and
    :math:`L_{bpr} = \mathrm{BPR}(e_u \cdot r^+, e_u \cdot r^-)`. Contrastive with one negative per direction,
    :math:`\pi = c_{a,i^+} \cdot c_{b,i^+}/T`, :math:`\nu_1 = c_{a,i^+} \cdot c_{b,i^-}/T`,
    :math:`\nu_2 = c_{b,i^+} \cdot c_{a,i^-}/T`:
    :math:`L_{info} = \mathrm{mean}[\mathrm{softplus}(\nu_1 - \pi) + \mathrm{softplus}(\nu_2 - \pi)]`
    (the release's ``-log(exp(pi)) + logaddexp(pi, nu)``, computed without its overflow).
    :math:`L = L_{bpr} + \lambda L_{info}`; no norm regulariser.

    Missing modalities
    ------------------
    Release behaviour: none beyond imputation. Imputed (mean) rows are sampled like observed ones and enter the
    scoring mean.

    Options (default = DGMRec release)
    ----------------------------------
    ``sibrar_sample_available``
        ``false``: draw among all ``M + 1`` candidates. ``true``: draw only among the ID and the modalities the
        *positive* item has observed; when only the ID is available the example uses :math:`2 c_{id}` and is left
        out of the contrastive mean.
    ``sibrar_infer_available``
        ``false``: score with the mean of all ``M + 1`` embeddings. ``true``: mean of the ID and the observed
        modalities only.

    The release's unused BatchNorm layer and its debug print are not reproduced.
    """

    name = "SIBRAR"
    summary = "one shared branch maps the ID and each modality into one space, modality sampling (2024)"

    def __init__(self, data: ModelInput, config: Mapping[str, Any]) -> None:
        super().__init__(data, config)
        d = int(config["embedding_size"])
        self.temp = float(config["temp"])
        self.lamb = float(config["lamb"])
        self.sample_available = bool(config["sibrar_sample_available"])
        self.infer_available = bool(config["sibrar_infer_available"])
        self.user_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_users, d)))
        self.item_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_items, d)))
        self.features = nn.ParameterList(nn.Parameter(data.features[m].detach().clone().float())
                                         for m in self.modalities)
        self.projections = nn.ModuleList(nn.Linear(int(data.features[m].shape[1]), d) for m in self.modalities)
        self.branch = nn.Sequential(Dropout(float(config["dropout"])), nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))
        # candidate availability: column 0 is the ID (always there), then the modalities
        available = torch.cat([torch.ones(self.n_items, 1, dtype=torch.bool), data.observed.detach().cpu().bool()],
                              dim=1)
        self.register_buffer("available", available.to(data.device), persistent=False)

    # ---------------------------------------------------------------------------------------- forward
    def embed(self, items: torch.Tensor | None = None) -> torch.Tensor:
        """Branch outputs ``(M + 1, n, d)`` of ``items`` (all when None): the ID first, then each modality."""
        ids = self.item_embedding if items is None else F.embedding(items, self.item_embedding)
        out = [self.branch(ids)]
        for table, proj in zip(self.features, self.projections, strict=True):
            x = table if items is None else F.embedding(items, table)
            out.append(F.normalize(self.branch(proj(x)), dim=1))
        return torch.stack(out)

    # ------------------------------------------------------------------------------------------- loss
    def loss(self, batch: Batch) -> LossOutput:
        users, pos, neg = batch.users, batch.pos, batch.neg
        B = len(users)
        items, inverse = torch.unique(torch.cat([pos, neg]), return_inverse=True)
        emb = self.embed(items)  # (M + 1, n, d)
        if self.sample_available:
            available = self.available[pos]
        else:
            available = torch.ones(B, len(self.modalities) + 1, dtype=torch.bool, device=pos.device)
        pair = draw_modality_pairs(available)
        a, b = pair[:, 0], pair[:, 1]
        ip, i_n = inverse[:B], inverse[B:]
        # the four (modality, item) lookups as one row gather of the flattened outputs: its backward is one
        # index_add instead of four accumulating index_puts into (M + 1, n, d) zeros
        n, d = emb.shape[1], emb.shape[2]
        rows = torch.cat([a * n + ip, b * n + ip, a * n + i_n, b * n + i_n])
        pa, pb, na, nb = emb.reshape(-1, d).index_select(0, rows).view(4, B, d).unbind(0)
        u = F.embedding(users, self.user_embedding)
        bpr = bpr_loss((u * (pa + pb)).sum(1), (u * (na + nb)).sum(1))
        distinct = a != b
        pi = (pa * pb).sum(1) / self.temp
        nu1 = (pa * nb).sum(1) / self.temp
        nu2 = (pb * na).sum(1) / self.temp
        info_rows = F.softplus(nu1 - pi) + F.softplus(nu2 - pi)
        info = info_rows[distinct].mean() if bool(distinct.any()) else info_rows.sum() * 0.0
        info = self.lamb * info
        return LossOutput(bpr + info, {"bpr": float(bpr.detach()), "info": float(info.detach())})

    # ---------------------------------------------------------------------------------------- scoring
    def item_vectors(self) -> torch.Tensor:
        emb = self.embed()
        if not self.infer_available:
            return emb.mean(0)
        w = self.available.T.unsqueeze(-1).to(emb.dtype)  # (M + 1, n, 1)
        return (emb * w).sum(0) / w.sum(0)

    def final_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user_embedding, self.item_vectors()
