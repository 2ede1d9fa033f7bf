r"""LGMRec: local and global graph learning for multimodal recommendation (Guo et al., AAAI 2024).

Local embeddings come from a LightGCN branch on ID embeddings plus, per modality, projected item features
(users: mean of their items) smoothed on the user-item graph. Global embeddings come from a few learnable
hyperedges per modality: items and users are softly assigned to them with a Gumbel-softmax, and a hypergraph
convolution of the collaborative item embeddings gives every node a global view. A contrast between the
global views of different modalities regularises the hyperedges.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dgmrec.graphs import SparseOp, lightgcn_propagate, mean_aggregator, normalized_adjacency
from dgmrec.losses import bpr_loss, dropout, emb_norm, gumbel_softmax, triple_info_nce
from dgmrec.models.base import Batch, LossOutput, ModelInput, Recommender

_CHOICES = {
    "lgmrec_eval_gumbel": ("none", "sample"),
    "lgmrec_item_cl_rows": ("auto", "complete", "positives"),
}


class LGMRec(Recommender):
    r"""LGMRec for any number ``M >= 2`` of modalities.

    Architecture
    ------------
    * Collaborative graph embedding (CGE): :math:`C = \mathrm{LGC}_{L_{ui}}(E_u, E_i; \hat A)` with the
      symmetric user-item adjacency (degree + 1e-7), layer mean including the ego layer.
    * Modality graph embedding (MGE), per modality ``m``: :math:`F_i = X_m W_m` (frozen imputed features,
      ``W_m`` Xavier, no bias), :math:`F_u = \mathrm{mean}_{i \in N(u)} F_i`,
      :math:`G_m = \hat A^{L_{mm}} [F_u; F_i]` (last layer only).
    * Hyperedges, per modality: :math:`a_i = X_m H_m` (``H_m`` in ``R^{d_m x K}``), :math:`a_u = R a_i` (raw sum
      over the user's items), :math:`\Pi = \mathrm{GumbelSoftmax}_\tau(a)` row-wise over the ``K`` hyperedges;
      during training :math:`\tilde\Pi` = dropout with keep probability ``keep_rate``.
    * Hypergraph convolution: :math:`\Lambda = \tilde\Pi_i^\top C_i`, :math:`\Gamma_i = \tilde\Pi_i \Lambda`,
      :math:`\Gamma_u = \tilde\Pi_u \Lambda` (``n_hyper_layer`` times, feeding :math:`\Gamma_i` back in).
    * Final :math:`Z = C + \sum_m \mathrm{rownorm}(G_m) + \alpha\,\mathrm{rownorm}(\sum_m \Gamma_m)`,
      score :math:`z_u^\top z_i`.

    Losses
    ------
    ``BPR + cl_weight * L_HCL + reg_weight * EmbNorm(z_u, z_pos, z_neg)`` (unsquared norms / batch).
    ``L_HCL`` sums, over the modality pairs ``(m, m+1 mod M)`` (one pair when ``M = 2``), a *sum-reduced*
    InfoNCE with temperature ``tau`` between the global views of the batch users (negatives: all users of the
    second modality) and of the batch items (see ``lgmrec_item_cl_rows``), divided by the number of pairs.

    Missing modalities
    ------------------
    Imputed feature rows are used as they are, both for MGE and for the hyperedge assignments; only the
    item-side contrast looks at the mask (``lgmrec_item_cl_rows``).

    Options (defaults reproduce the DGMRec release; ``auto`` picks its two- or three-modality code path)
    ------------------------------------------------------------------------------------------------
    ``lgmrec_eval_gumbel``
        ``none`` (default): scoring uses the noise-free ``softmax(a / tau)`` assignments, so evaluation is
        deterministic. ``sample``: like the reference, Gumbel noise is drawn at evaluation too (once per
        evaluation pass, from a dedicated seeded generator, so training randomness is not disturbed; the
        reference even redraws it for every batch of users).
    ``lgmrec_item_cl_rows``
        ``complete``: rows are the *unique* batch positives observed in every modality and the negatives are
        all complete items (the release's two-modality path). ``positives``: every batch positive (duplicates
        kept) against all items (the release's three-modality path and MMRec). ``auto`` (default): the
        former for two modalities, the latter otherwise.
    ``lgmrec_hcl_detach_cf``
        ``false`` (default, reference and paper): the hypergraph convolution reads the collaborative item
        embeddings with gradient, so the contrast also trains the ID embeddings through
        :math:`\Lambda = \tilde\Pi_i^\top C_i`. ``true`` (our addition): it reads them detached. On TikTok
        (image + audio) the summed contrast's gradient on the ID embeddings is about 100x that of BPR at
        initialisation, and the image hyperedges collapse onto one (non-negative features, so every item's
        logits share one dominant direction): validation recall falls after the first epoch and only
        recovers ~15 epochs later, which is why the reference run early-stopped with its best at epoch 0.
        Detaching removes the drop (but the model still peaks early on that data).
    """

    name = "LGMRec"
    summary = "local modality graph embeddings plus global hypergraph embeddings (AAAI 2024)"
    missing_aware = True
    choices = _CHOICES
    min_modalities = 2

    def __init__(self, data: ModelInput, config: Mapping[str, Any]) -> None:
        super().__init__(data, config)
        c = config
        d = int(c["embedding_size"])
        self.d = d
        self.M = data.n_modalities
        self.K = int(c["hyper_num"])
        self.n_ui_layers = int(c["n_ui_layers"])
        self.n_mm_layers = int(c["n_mm_layers"])
        self.n_hyper_layers = int(c["n_hyper_layer"])
        self.keep_rate = float(c["keep_rate"])
        self.alpha = float(c["alpha"])
        self.cl_weight = float(c["cl_weight"])
        self.reg_weight = float(c["reg_weight"])
        self.tau = float(c["tau"])
        self.eval_gumbel = str(c["lgmrec_eval_gumbel"])
        self.item_cl_rows = str(c["lgmrec_item_cl_rows"])
        if self.item_cl_rows == "auto":  # the release's two- and three-modality code paths
            self.item_cl_rows = "complete" if self.M == 2 else "positives"
        self.hcl_detach_cf = bool(c["lgmrec_hcl_detach_cf"])
        # modality pairs of the hypergraph contrast: a cycle (a single pair for two modalities)
        self.pairs = [(j, (j + 1) % self.M) for j in range(self.M if self.M > 2 else 1)]

        obs = data.observed_np()
        complete = obs.all(axis=1)
        self.register_buffer("complete", torch.from_numpy(complete.copy()), persistent=False)
        self.register_buffer("complete_ids", torch.from_numpy(np.flatnonzero(complete)), persistent=False)

        train = data.train
        self.ui_adj = SparseOp(normalized_adjacency(train, eps=1e-7), data.device)
        self.user_mean = SparseOp(mean_aggregator(train, eps=1e-7), data.device)
        self.user_sum = SparseOp(train, data.device)

        self.user_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_users, d)))
        self.item_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_items, d)))
        self.feature_names = [f"feature_{j}" for j in range(self.M)]
        for j, m in enumerate(self.modalities):
            self.register_buffer(self.feature_names[j], data.features[m].detach().clone().float(),
                                 persistent=False)
        dims = [int(data.features[m].shape[1]) for m in self.modalities]
        self.projection = nn.ParameterList(nn.Parameter(nn.init.xavier_uniform_(torch.empty(dm, d))) for dm in dims)
        self.hyperedges = nn.ParameterList(
            nn.Parameter(nn.init.xavier_uniform_(torch.empty(dm, self.K))) for dm in dims)
        self.eval_generator = torch.Generator(device=data.device).manual_seed(int(c["seed"]))

    # ------------------------------------------------------------------------------------------ forward
    def feature(self, j: int) -> torch.Tensor:
        return getattr(self, self.feature_names[j])

    def _assign(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        noise = self.training or self.eval_gumbel == "sample"
        pi = gumbel_softmax(logits, self.tau, generator=None if self.training else generator, noise=noise)
        return dropout(pi, 1.0 - self.keep_rate, self.training)

    def forward_all(self) -> dict[str, Any]:
        """Final user/item embeddings and the per-modality global (hypergraph) embeddings."""
        n_u = self.n_users
        ego = torch.cat([self.user_embedding, self.item_embedding], dim=0)
        cf = lightgcn_propagate(self.ui_adj, ego, self.n_ui_layers)
        cf_items = cf[n_u:]
        d, K = self.d, self.K
        # one matmul per modality for the projection and the hyperedge logits
        proj, logits = [], []
        for j in range(self.M):
            both = self.feature(j) @ torch.cat([self.projection[j], self.hyperedges[j]], dim=1)
            proj.append(both[:, :d])
            logits.append(both[:, d:])
        items_mm = torch.cat(proj, dim=1)  # (I, M d): all modalities propagate together
        mge = torch.cat([self.user_mean @ items_mm, items_mm], dim=0)
        for _ in range(self.n_mm_layers):
            mge = self.ui_adj @ mge
        item_logits = torch.cat(logits, dim=1)
        user_logits = self.user_sum @ item_logits
        generator = self.eval_generator if not self.training else None
        local = cf
        hyper_input = cf_items.detach() if self.hcl_detach_cf else cf_items
        global_u, global_i = [], []
        for j in range(self.M):
            local = local + F.normalize(mge[:, j * d:(j + 1) * d], dim=1)
            pi_i = self._assign(item_logits[:, j * K:(j + 1) * K], generator)
            pi_u = self._assign(user_logits[:, j * K:(j + 1) * K], generator)
            h_i = hyper_input
            h_u = cf_items.new_zeros(n_u, d)
            for _ in range(self.n_hyper_layers):
                lat = pi_i.T @ h_i
                h_i = pi_i @ lat
                h_u = pi_u @ lat
            global_u.append(h_u)
            global_i.append(h_i)
        ghe = torch.cat([torch.stack(global_u).sum(0), torch.stack(global_i).sum(0)], dim=0)
        final = local + self.alpha * F.normalize(ghe, dim=1)
        return {"user": final[:n_u], "item": final[n_u:], "global_u": global_u, "global_i": global_i}

    # --------------------------------------------------------------------------------------------- loss
    def loss(self, batch: Batch) -> LossOutput:
        f = self.forward_all()
        u = F.embedding(batch.users, f["user"])
        items = torch.cat([batch.pos, batch.neg])
        pn = F.embedding(items, f["item"])
        p, n = pn[: len(batch.pos)], pn[len(batch.pos):]
        bpr = bpr_loss((u * p).sum(1), (u * n).sum(1))
        reg = self.reg_weight * emb_norm(u, p, n)
        parts = {"bpr": bpr, "reg": reg}
        if self.cl_weight:
            if self.item_cl_rows == "complete":
                rows = torch.unique(batch.pos)
                rows = rows[self.complete[rows]]
                neg_ids: torch.Tensor | None = self.complete_ids
            else:
                rows, neg_ids = batch.pos, None
            gu, gi = f["global_u"], f["global_i"]
            hcl = torch.zeros((), device=bpr.device)
            for a, b in self.pairs:
                hcl = hcl + triple_info_nce(F.embedding(batch.users, gu[a]), F.embedding(batch.users, gu[b]),
                                            gu[b], self.tau)
                if len(rows):
                    negatives = gi[b] if neg_ids is None else F.embedding(neg_ids, gi[b])
                    hcl = hcl + triple_info_nce(F.embedding(rows, gi[a]), F.embedding(rows, gi[b]), negatives,
                                                self.tau)
            parts["hcl"] = self.cl_weight * hcl / len(self.pairs)
        total = sum(parts.values())
        return LossOutput(total, {k: float(v.detach()) for k, v in parts.items()})

    # ------------------------------------------------------------------------------------------ scoring
    def final_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.forward_all()
        return f["user"], f["item"]

    # ------------------------------------------------------------------------------------ checkpointing
    def get_extra_state(self) -> dict[str, Any]:
        return {"eval_generator": self.eval_generator.get_state()}

    def set_extra_state(self, state: Any) -> None:
        if state and "eval_generator" in state:
            self.eval_generator.set_state(state["eval_generator"])
