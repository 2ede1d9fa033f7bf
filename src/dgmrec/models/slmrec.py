r"""SLMRec (Tao et al., TMM 2022): self-supervised multimedia recommendation, DGMRec release's variant.

One LightGCN pass per "view" -- item IDs and each modality's projected features, users always starting from the
same user table -- concatenated and fused by a linear layer; trained with an in-batch softmax recommendation loss
plus the fine-and-coarse (FAC) cross-modal contrastive task on the batch's items.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dgmrec.graphs import SparseOp, lightgcn_propagate, normalized_adjacency
from dgmrec.losses import in_batch_softmax_ce, info_nce
from dgmrec.models.base import Batch, LossOutput, ModelInput, Recommender

_CHOICES = {
    "slmrec_fac_rows": ("auto", "missing", "observed", "all"),
    "slmrec_fac_modalities": ("reference", "all"),
}


def _xavier_linear(d_in: int, d_out: int) -> nn.Linear:
    layer = nn.Linear(d_in, d_out)
    nn.init.xavier_uniform_(layer.weight)
    return layer


def fac_chain(spec: str, n_modalities: int) -> list[int | None]:
    """Modality of every FAC stage (None: a link of the chain without a contrastive term).

    ``reference``: ``[first, None, second]`` -- the release keeps the original ID -> visual -> acoustic -> textual
    chain but has the acoustic term commented out, so its link (``g_iv_iva``) is still applied; the first and
    second modalities of the data order fill the visual and textual slots. ``all``: every modality in data order.
    """
    if spec == "reference":
        return [0, None, 1]
    return list(range(n_modalities))


class SLMRec(Recommender):
    """SLMRec with the FAC task, for any number ``M >= 2`` of modalities.

    Architecture
    ------------
    ``E_u, E_i`` (Xavier-uniform) and, per modality, ``dense_m: Linear(d_m -> d)`` on the row-L2-normalised
    (imputed, frozen) features. The ``M + 1`` item views ``[E_i, dense_1(X_1), ..., dense_M(X_M)]`` are each
    propagated with users starting from ``E_u`` by LightGCN (``n_ui_layers``, mean over layers incl. the ego layer,
    ``D^-1/2 A D^-1/2`` with ``+1e-8`` on the degrees); since propagation is linear, the views are stacked
    column-wise and propagated in one pass. The concatenation ``[H^id || H^1 || ... || H^M]`` is fused by
    ``fuse_u`` / ``fuse_i: Linear((M+1) d -> d)`` into ``z_u, z_i``; the score is ``z_u . z_i`` (the release
    applies a sigmoid, which cannot change a ranking and is dropped here to avoid saturation ties).

    Losses
    ------
    ``L = CE(cos(z_u, z_i) / temp) + ssl_alpha * L_FAC`` with in-batch negatives (the sampled negative is not
    used; ``use_neg_sampling`` is off). No explicit regulariser: the Adam ``weight_decay`` (1e-4) regularises every
    parameter. ``L_FAC`` runs a chain over the batch's positive items: ``s_0 = H^id_i``, ``s_k = g_k(s_{k-1})``
    (width ``d``, the last stage ``d/2``); a stage with modality ``m`` adds
    ``CE(s_k h_k(H^m_i)^T / ssl_temp)`` on unnormalised logits (rows selected by ``slmrec_fac_rows``, all batch
    items as columns).

    Missing modalities
    ------------------
    Imputed features (data layer) and the FAC row selection below.

    Options (departures)
    --------------------
    ``slmrec_fac_rows``
        Rows of each FAC term: ``missing`` -- only items whose stage modality is *missing* (the release's
        two-modality path, which aligns ID embeddings with mean-imputed features); ``observed`` -- only items whose
        modality is observed (probably the intent); ``all`` -- every row (original SLMRec; the release's
        three-modality path); ``auto`` (default) -- the release: ``missing`` for two modalities, ``all`` otherwise.
    ``slmrec_fac_modalities``
        ``reference`` (default): stages ``[first modality, plain link, second modality]``; further modalities do
        not enter FAC (the release drops the audio term even on three-modality TikTok). ``all``: one stage per
        modality in data order (the original chain is visual, acoustic, textual).

    Scoring uses ``z`` recomputed in :meth:`prepare_eval` (the release reuses the one of the last training batch,
    one optimiser step stale). The release's never-used acoustic head (``g_a_iva``) and the dead ``reg`` key are
    not reproduced.
    """

    name = "SLMRec"
    summary = "LightGCN views of IDs and modalities with a cross-modal contrastive task (TMM 2022)"
    missing_aware = True
    choices = _CHOICES
    min_modalities = 2

    def __init__(self, data: ModelInput, config: Mapping[str, Any]) -> None:
        super().__init__(data, config)
        d = int(config["embedding_size"])
        self.d = d
        M = data.n_modalities
        self.M = M
        self.n_layers = int(config["n_ui_layers"])
        self.temp = float(config["temp"])
        self.ssl_temp = float(config["ssl_temp"])
        self.ssl_alpha = float(config["ssl_alpha"])
        rows = str(config["slmrec_fac_rows"])
        if rows == "auto":
            rows = "missing" if M == 2 else "all"
        self.fac_rows = rows
        self.adj = SparseOp(normalized_adjacency(data.train, eps=1e-8), data.device)

        self.user_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_users, d)))
        self.item_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_items, d)))
        for j, m in enumerate(self.modalities):
            self.register_buffer(f"feature_{j}", F.normalize(data.features[m].float(), dim=1), persistent=False)
        self.dense = nn.ModuleList(_xavier_linear(int(data.features[m].shape[1]), d) for m in self.modalities)
        self.fuse_user = _xavier_linear((M + 1) * d, d)
        self.fuse_item = _xavier_linear((M + 1) * d, d)

        # FAC chain: links g_k (ID side) and per-stage modality heads h_k
        self.stages = fac_chain(str(config["slmrec_fac_modalities"]), M)
        widths = [d] * (len(self.stages) - 1) + [d // 2]
        ins = [d, *widths[:-1]]
        self.chain = nn.ModuleList(_xavier_linear(i, w) for i, w in zip(ins, widths, strict=True))
        self.stage_heads = nn.ModuleDict({str(k): _xavier_linear(d, widths[k])
                                          for k, m in enumerate(self.stages) if m is not None})
        self.register_buffer("observed", data.observed.clone(), persistent=False)

    def features(self, j: int) -> torch.Tensor:
        return getattr(self, f"feature_{j}")

    def propagate(self) -> torch.Tensor:
        """``[H^id || H^1 || ... || H^M]`` for users (first rows) and items, shape ``(N, (M+1) d)``."""
        items = torch.cat([self.item_embedding, *(self.dense[j](self.features(j)) for j in range(self.M))], dim=1)
        users = self.user_embedding.repeat(1, self.M + 1)
        return lightgcn_propagate(self.adj, torch.cat([users, items], dim=0), self.n_layers)

    def _fac_rows(self, items: torch.Tensor, j: int) -> torch.Tensor | None:
        if self.fac_rows == "all":
            return None
        obs = F.embedding(items, self.observed[:, j : j + 1].float()).squeeze(1) > 0
        return obs if self.fac_rows == "observed" else ~obs

    def fac_loss(self, item_views: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Sum of the FAC chain's contrastive terms over the batch's items (``item_views``: their propagated rows)."""
        views = item_views.split(self.d, dim=1)
        state = views[0]
        total = item_views.new_zeros(())
        for k, j in enumerate(self.stages):
            state = self.chain[k](state)
            if j is None:
                continue
            partner = self.stage_heads[str(k)](views[1 + j])
            total = total + in_batch_softmax_ce(state, partner, self.ssl_temp, self._fac_rows(items, j))
        return total

    def loss(self, batch: Batch) -> LossOutput:
        h = self.propagate()
        users = F.embedding(batch.users, h[: self.n_users])
        items = F.embedding(batch.pos, h[self.n_users:])
        main = info_nce(self.fuse_user(users), self.fuse_item(items), self.temp)
        fac = self.fac_loss(items, batch.pos)
        return LossOutput(main + self.ssl_alpha * fac, {"main": float(main.detach()), "fac": float(fac.detach())})

    def final_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.propagate()
        return self.fuse_user(h[: self.n_users]), self.fuse_item(h[self.n_users:])
