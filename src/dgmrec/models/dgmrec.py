r"""DGMRec: Disentangling and Generating Modalities for Recommendation (Kim et al., SIGIR 2025).

One code path for any number ``M >= 2`` of modalities. Per modality ``m`` the raw features ``X_m`` are encoded
into a *general* part :math:`G_m = \sigma(f_g(\tanh(h_m X_m)))` (``f_g`` shared by all modalities) and a
*specific* part :math:`S_m = \sigma(f_{s,m} X_m)`; both are gated by a user-preference item filter
:math:`\Phi_m` and propagated on the modality's item kNN graph. Items are represented by their LightGCN
embedding plus the mean of the averaged general feature and the ``M`` specific features; users likewise
from their items. Missing modalities are *generated*: a translator maps the other modalities' general
features (source order ``m+1, ..., m+M-1`` mod ``M``) to the target's general feature, a generator maps the
item's preference filter to its specific feature, and the decoder turns both into raw features that are
written back into the feature table; the kNN graphs of items with a missing modality are then refreshed.

Losses: BPR + norms + reconstruction + CLUB (disentangling) + inter-modal InfoNCE + user-item alignment +
behaviour-modality alignment + generation. The defaults reproduce the reference release; each documented
deviation is an option (see ``configs/models/DGMRec.yaml``; presets name sets of them, docs/dgmrec.md):

``trainable_raw_features``, ``preference_mode``, ``infer_graph``, ``write_policy``, ``refresh_rows``,
``missing_source_policy``, ``club_modalities``, ``inter_user_pairs``, ``intra_specific``,
``recon_observed_only``, ``new_item_generation``, ``nce_duplicates``, ``generation_space``, ``recon_target``,
``decoder_fit``.

Generation spaces. The reference trains the translator on filtered, propagated general features and the
specific generator on raw specific features, decodes filtered, propagated features, but generates from raw
general features and propagates the generated parts before decoding (spec 9.15). ``propagated`` makes every
step use the filtered, propagated features (the paper's Eq. 10-14); ``raw`` makes every step use the raw
encoder outputs (decoder = autoencoder over the encoders). With ``recon_target: original`` the decoder learns
the original features of observed items (a frozen copy) instead of the drifting trainable table, so
generated rows live in the original feature space. The decoder is linear and its reconstruction loss is a
least-squares problem in its weights; ``decoder_fit: least_squares`` solves it exactly (ridge-regularised)
before every generation instead of taking gradient steps, which a few thousand Adam steps on inputs of tiny
variance (sigmoid outputs) do not reach. That decoder is still fitted on the encodings of an item's own
features and then applied to *generated* encodings, which differ (the generated specific part comes from
user preferences only); ``decoder_fit: least_squares_generated`` fits it instead on the generated inputs of
the items that observe every modality, so it learns the map it is used for.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from dgmrec.errors import ConfigError
from dgmrec.graphs import (
    SparseOp,
    blend_rows,
    knn_graph,
    lightgcn_propagate,
    mean_aggregator,
    normalized_adjacency,
)
from dgmrec.losses import CLUBSample, bpr_loss, info_nce, linear_mse, perturb, ridge_fit
from dgmrec.models.base import Batch, LossOutput, ModelInput, Recommender
from dgmrec.ops.fused import fused_table_gradients, table_linear

_CHOICES = {
    "preference_mode": ("code_tanh_idproj", "paper_sigmoid_table"),
    "infer_graph": ("initial", "refreshed"),
    "write_policy": ("only_missing_m", "any_missing_with_one_observed", "all_missing", "none"),
    "refresh_rows": ("auto", "all_missing_m", "only_missing_m"),
    "missing_source_policy": ("table", "observed_mean"),
    "club_modalities": ("first_two", "all"),
    "inter_user_pairs": ("first_pair", "cyclic"),
    "intra_specific": ("reference", "specific"),
    "new_item_generation": ("auto", "new"),
    "nce_duplicates": ("keep", "mask"),
    "generation_space": ("reference", "propagated", "raw"),
    "recon_target": ("table", "original"),
    "decoder_fit": ("gradient", "least_squares", "least_squares_generated"),
}


#: prefix of the disentanglement cosines in the training log (:meth:`DGMRec.after_epoch`)
COSINE_LOG_PREFIX = "cos "


@dataclass(frozen=True)
class LossWeights:
    """Weights of DGMRec's losses; each field names its configuration key (the reference's name)."""

    reconstruction: float  # recon: decoder reconstruction of the raw features
    modality_reg: float  # reg: norm of the positive items' modality representations
    club: float  # sampler: CLUB bound on the general/specific mutual information (0 disables CLUB)
    inter_modal: float  # interModal: InfoNCE between the modalities' general features
    user_item: float  # intraModal: user-item alignment InfoNCE
    behaviour_modality: float  # alignBM: behaviour (CF) vs modality alignment InfoNCE
    generation: float  # additive: translator and specific-generator losses
    cf_reg: float  # cf_reg: norm of the batch's CF embeddings

    @classmethod
    def from_config(cls, c: Mapping[str, Any]) -> LossWeights:
        return cls(reconstruction=float(c["recon"]), modality_reg=float(c["reg"]), club=float(c["sampler"]),
                   inter_modal=float(c["interModal"]), user_item=float(c["intraModal"]),
                   behaviour_modality=float(c["alignBM"]), generation=float(c["additive"]),
                   cf_reg=float(c["cf_reg"]))


def _xavier_linear(d_in: int, d_out: int, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(d_in, d_out, bias=bias)
    nn.init.xavier_uniform_(layer.weight)
    return layer


def _mlp(d_in: int, d: int) -> nn.Sequential:
    return nn.Sequential(_xavier_linear(d_in, d), nn.Tanh(), _xavier_linear(d, d))


def disentanglement_cosines(general: Sequence[torch.Tensor], specific: Sequence[torch.Tensor],
                            observed: torch.Tensor, modalities: Sequence[str]) -> dict[str, tuple[float, int]]:
    """Mean cosine, over items, of the general and specific features of each modality (items observing it) and
    of the general features of each pair of modalities (items observing both): name -> (cosine, items).

    The disentanglement diagnostics (paper Fig. 5): the first falls and the second rises as the parts separate.
    A pair that no item observes in full is left out. Computed in float64.
    """

    def mean_cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(F.cosine_similarity(a.double(), b.double(), dim=1, eps=1e-12).mean())

    obs = torch.as_tensor(observed, dtype=torch.bool, device=general[0].device)
    out: dict[str, tuple[float, int]] = {}
    for j, m in enumerate(modalities):
        sel = obs[:, j]
        if bool(sel.any()):
            out[f"general-specific {m}"] = (mean_cos(general[j][sel], specific[j][sel]), int(sel.sum()))
    for a, b in itertools.combinations(range(len(modalities)), 2):
        sel = obs[:, a] & obs[:, b]
        if bool(sel.any()):
            out[f"general {modalities[a]}-{modalities[b]}"] = (mean_cos(general[a][sel], general[b][sel]),
                                                               int(sel.sum()))
    return out


class DGMRec(Recommender):
    """DGMRec for ``M >= 2`` modalities (see the module docstring and ``configs/models/DGMRec.yaml``)."""

    name = "DGMRec"
    summary = "general/specific modality features; missing modalities generated from observed ones (SIGIR 2025)"
    missing_aware = True
    generates = True
    choices = _CHOICES
    min_modalities = 2

    def __init__(self, data: ModelInput, config: Mapping[str, Any]) -> None:
        super().__init__(data, config)
        c = config
        d = int(c["embedding_size"])
        self.d = d
        M = data.n_modalities
        self.M = M
        self.n_ui_layers = int(c["n_ui_layers"])
        self.n_mm_layers = int(c["n_mm_layers"])
        self.knn_k = int(c["knn_k"])
        self.weights = LossWeights.from_config(c)
        self.tau_inter_modal = float(c["interModalTemp"])
        self.tau_user_item = float(c["intraModalTemp"])
        self.tau_behaviour_modality = float(c["alignBMTemp"])
        self.refresh_blend = float(c["avg_lambda"])  # weight of the rebuilt rows in a graph refresh
        self.refresh_interval = int(c["refresh_interval"])
        self.perturb_scale = float(c["perturb_scale"])
        self.opts = {k: str(c[k]) for k in _CHOICES}
        self.trainable_raw = bool(c["trainable_raw_features"])
        self.recon_observed_only = bool(c["recon_observed_only"])
        self.infer_adj_update = bool(int(c["infer_adj_update"]))

        # ------------------------------------------------------------- masks and item sets
        obs = data.observed_np()
        self.observed_np = obs
        self.register_buffer("observed", torch.from_numpy(obs.copy()), persistent=False)
        self.register_buffer("complete", torch.from_numpy(obs.all(axis=1)), persistent=False)
        self.missing_setting = bool((~obs).any())
        self.new_items_np = data.new_items_np()
        self.new_item_setting = data.setting == "new-items" and bool(self.new_items_np.any())
        old = ~self.new_items_np
        n_observed = obs.sum(axis=1)
        only_missing = (~obs) & (n_observed == M - 1)[:, None]
        self.writes = self.opts["write_policy"] != "none"  # generation (and graph refresh) happens at all
        if self.opts["write_policy"] == "only_missing_m":
            write = only_missing
        elif self.opts["write_policy"] == "any_missing_with_one_observed":
            write = (~obs) & (n_observed >= 1)[:, None]
        elif self.opts["write_policy"] == "none":  # the ablation "w/o Generation": imputed rows stay as they are
            write = np.zeros_like(obs)
        else:
            write = ~obs
        refresh_mode = self.opts["refresh_rows"]
        if refresh_mode == "auto":
            refresh_mode = "all_missing_m" if M == 2 else "only_missing_m"
        refresh = ~obs if refresh_mode == "all_missing_m" else only_missing
        # training-time generation and refresh touch old items only
        self.write_rows = [np.flatnonzero(write[:, j] & old) for j in range(M)]
        self.refresh_rows_ = [np.flatnonzero(refresh[:, j] & old) for j in range(M)]
        infer_items = self.new_items_np
        if self.opts["new_item_generation"] == "auto" and M >= 3:
            infer_items = old  # reference behaviour for three modalities
        self.infer_write_rows = [np.flatnonzero(write[:, j] & infer_items) for j in range(M)]
        self.infer_refresh_rows = [np.flatnonzero(~obs[:, j] & infer_items) for j in range(M)]

        # ------------------------------------------------------------- graphs
        train = data.train
        self.ui_adj = SparseOp(normalized_adjacency(train, eps=1e-7), data.device)
        self.user_agg = SparseOp(mean_aggregator(train), data.device)
        self.item_agg = SparseOp(mean_aggregator(sp.csr_matrix(train.T)), data.device)

        # ------------------------------------------------------------- parameters
        self.user_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_users, d)))
        self.item_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_items, d)))
        self.features = nn.ParameterList()
        for m in self.modalities:
            x = data.features[m].detach().clone().float()
            self.features.append(nn.Parameter(x, requires_grad=self.trainable_raw))
        self._table_grad_buffers: list[torch.Tensor] | None = None
        self.added_features: dict[str, torch.Tensor] = {}  # completed features of items added after training
        self.original_features: list[torch.Tensor] = []
        if self.opts["recon_target"] == "original":
            self.original_features = [data.features[m].detach().clone().float().to(self.device)
                                      for m in self.modalities]
        dims = [int(data.features[m].shape[1]) for m in self.modalities]
        self.general_in = nn.ModuleList(_xavier_linear(dm, d) for dm in dims)  # h_m
        self.specific_enc = nn.ModuleList(_xavier_linear(dm, d) for dm in dims)  # f_{s,m}
        self.general_shared = _xavier_linear(d, d)  # f_g
        if self.opts["preference_mode"] == "code_tanh_idproj":
            self.preference = nn.ModuleList(_xavier_linear(d, d, bias=False) for _ in dims)
        else:
            self.preference_tables = nn.ParameterList(
                nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_users, d))) for _ in dims)
        self.specific_generator = nn.ModuleList(_mlp(d, d) for _ in dims)  # Gamma^s_m
        self.translator = nn.ModuleList(_mlp((M - 1) * d, d) for _ in dims)  # Gamma^g_m
        self.decoder = nn.ModuleList(_xavier_linear(2 * d, dm) for dm in dims)  # D_m
        self.decoder_ridge = float(c["decoder_ridge"])
        if self.opts["decoder_fit"] == "least_squares" and self.opts["generation_space"] == "reference":
            raise ConfigError("decoder_fit=least_squares needs generation_space raw or propagated (the reference "
                              "space decodes inputs unlike the ones the decoder is fitted on)", source="decoder_fit")
        if self.decoder_ridge < 0:
            raise ConfigError(f"must be >= 0, got {self.decoder_ridge}", source="decoder_ridge")
        if self.opts["decoder_fit"] != "gradient":
            self.decoder.requires_grad_(False)
        # a least-squares decoder with a frozen target takes nothing from the reconstruction gradient
        self.recon_in_loss = bool(self.weights.reconstruction) and not (
            self.opts["decoder_fit"] != "gradient" and bool(self.original_features))
        # the table gets gradient from its encoder and from being the whole reconstruction target: fuse the two
        self.fuse_table_grads = (self.recon_in_loss and self.trainable_raw and not self.original_features
                                 and not self.recon_observed_only)
        self.sources = [[(m + s) % M for s in range(1, M)] for m in range(M)]

        # CLUB estimators live outside the main optimiser (their own Adam)
        club_mods = list(range(M)) if self.opts["club_modalities"] == "all" else [0, 1]
        self.club_mods = club_mods if self.weights.club > 0 else []
        self.club = nn.ModuleList(CLUBSample(d, d, int(c["club_hidden"]) // 2) for _ in self.club_mods)
        self.club_optimizer = (torch.optim.Adam(self.club.parameters(), lr=float(c["club_lr"]))
                               if self.club_mods else None)
        self.club_steps = int(c["club_steps"])
        self.club_sample = int(c["club_sample"])

        # kNN graphs from the initial (imputed) features
        self.counter = 0
        self.train_graphs: list[SparseOp] = []
        self.infer_graphs: list[SparseOp] = []
        self._build_initial_graphs()

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """Everything but the CLUB estimators, which ``before_epoch`` trains with their own optimiser."""
        own = {id(p) for p in self.club.parameters()}
        return [{"params": [p for p in self.parameters() if p.requires_grad and id(p) not in own]}]

    # ------------------------------------------------------------------------------------------ graphs
    def _build_initial_graphs(self) -> None:
        self.train_graphs, self.infer_graphs = [], []
        for j, x in enumerate(self.features):
            missing = ~self.observed_np[:, j]
            infer = knn_graph(x.detach(), self.knn_k, isolate=missing, isolate_before_topk=False)
            if self.new_item_setting:
                train = knn_graph(x.detach(), self.knn_k, isolate=self.new_items_np, isolate_before_topk=True)
            else:
                train = infer
            self.train_graphs.append(SparseOp(train, self.device))
            self.infer_graphs.append(SparseOp(infer, self.device))

    def _scoring_graphs(self) -> list[SparseOp]:
        if self.new_item_setting or self.opts["infer_graph"] == "initial":
            return self.infer_graphs
        return self.train_graphs

    def _propagate_mm(self, graph: SparseOp, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.n_mm_layers):
            x = graph @ x
        return x

    # ------------------------------------------------------------------------------------- encoders
    def encode(self, j: int, x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw general and specific features of modality ``j`` (``h_m`` and ``f_{s,m}`` as one matmul)."""
        x = self.features[j] if x is None else x
        h, fs = self.general_in[j], self.specific_enc[j]
        both = table_linear(x, torch.cat([h.weight, fs.weight]), torch.cat([h.bias, fs.bias]))
        general = torch.sigmoid(self.general_shared(torch.tanh(both[:, : self.d])))
        specific = torch.sigmoid(both[:, self.d:])
        return general, specific

    def item_filter(self, j: int) -> torch.Tensor:
        """Item preference filter Phi_m (zero for items without training users)."""
        if self.opts["preference_mode"] == "code_tanh_idproj":
            q = torch.tanh(self.preference[j](self.user_embedding))
            return self.item_agg @ q
        return torch.sigmoid(self.item_agg @ self.preference_tables[j])

    # -------------------------------------------------------------------------------------- forward
    def forward_all(self, graphs: list[SparseOp], users: torch.Tensor | None = None) -> dict[str, Any]:
        """Representations of all items and of ``users`` (all users when None); user rows follow ``users``."""
        ego = torch.cat([self.user_embedding, self.item_embedding], dim=0)
        cf = lightgcn_propagate(self.ui_adj, ego, self.n_ui_layers)
        u_cf, i_cf = cf[: self.n_users], cf[self.n_users:]
        raw_g, raw_s, filt, prop_g, prop_s = [], [], [], [], []
        for j in range(self.M):
            g, s = self.encode(j)
            phi = self.item_filter(j)
            both = self._propagate_mm(graphs[j], torch.cat([phi * g, phi * s], dim=1))
            raw_g.append(g)
            raw_s.append(s)
            filt.append(phi)
            prop_g.append(both[:, : self.d])
            prop_s.append(both[:, self.d:])
        item_mm = torch.cat(prop_g + prop_s, dim=1)
        if users is None:
            user_mm = self.user_agg @ item_mm
        else:
            # aggregate only the batch's distinct users (their rows hold at most every non-zero once; the batch's
            # own rows repeat active users) and gather the batch rows from that small table: no n_users-sized
            # tensors, gradients or zero fills per step
            distinct, where = torch.unique(users, return_inverse=True)
            user_mm = self.user_agg.rows(distinct) @ item_mm
            picked = F.embedding(where, torch.cat([F.embedding(distinct, u_cf), user_mm], dim=1))
            u_cf, user_mm = picked[:, : self.d], picked[:, self.d:]
        user_g = list(user_mm[:, : self.M * self.d].split(self.d, dim=1))
        user_s = list(user_mm[:, self.M * self.d:].split(self.d, dim=1))
        item_rep = i_cf + (torch.stack(prop_g).mean(0) + torch.stack(prop_s).sum(0)) / (self.M + 1)
        user_rep = u_cf + (torch.stack(user_g).mean(0) + torch.stack(user_s).sum(0)) / (self.M + 1)
        return {"u_cf": u_cf, "i_cf": i_cf, "raw_g": raw_g, "raw_s": raw_s, "filter": filt, "g": prop_g,
                "s": prop_s, "user_g": user_g, "user_s": user_s, "user": user_rep, "item": item_rep}

    # ----------------------------------------------------------------------------------------- loss
    def loss(self, batch: Batch) -> LossOutput:
        """The training objective (:meth:`objective`) of one batch.

        Where a feature table is both trained and the whole reconstruction target, its two gradients (through
        its encoder and as the target) are produced by one GEMM into a persistent buffer
        (:func:`dgmrec.ops.fused.fused_table_gradients`); the values are those of :meth:`objective` alone.
        """
        if not self.fuse_table_grads:
            return self.objective(batch)
        if self._table_grad_buffers is None:
            self._table_grad_buffers = [torch.empty_like(x) for x in self.features]
        with fused_table_gradients(list(self.features), self._table_grad_buffers):
            return self.objective(batch)

    def objective(self, batch: Batch) -> LossOutput:
        """BPR + norms + reconstruction + CLUB + inter-modal + user-item + behaviour-modality + generation."""
        w = self.weights
        f = self.forward_all(self.train_graphs, users=batch.users)
        u, p, n = batch.users, batch.pos, batch.neg
        mask_dups = self.opts["nce_duplicates"] == "mask"
        ui_ids = (u, p) if mask_dups else None
        uu_ids = (u, u) if mask_dups else None
        pp_ids = (p, p) if mask_dups else None
        B, M, d = len(p), self.M, self.d
        # gather every batch row once (one index backward per table instead of one per tensor)
        item_tab = torch.cat([f["item"], f["i_cf"], *f["g"], *f["s"]], dim=1)
        user_tab = torch.cat([f["user"], f["u_cf"], *f["user_g"], *f["user_s"]], dim=1)
        rows = F.embedding(torch.cat([p, n]), item_tab)  # positives and negatives in one gather
        ip = rows[:B].split(d, dim=1)
        i_n = rows[B:, : 2 * d].split(d, dim=1)
        uu = user_tab.split(d, dim=1)  # rows are already the batch's users
        p_item, p_cf, p_g, p_s = ip[0], ip[1], ip[2:2 + M], ip[2 + M:]
        n_item, n_cf = i_n
        u_user, u_cf, u_g, u_s = uu[0], uu[1], uu[2:2 + M], uu[2 + M:]

        bpr = bpr_loss((u_user * p_item).sum(1), (u_user * n_item).sum(1))
        reg = w.cf_reg * (u_cf.norm() + p_cf.norm() + n_cf.norm()) / B
        reg = reg + w.modality_reg * sum((p_g[j] + p_s[j]).norm() for j in range(M)) / B
        parts = {"bpr": bpr, "reg": reg}
        zero = torch.zeros((), device=bpr.device)

        if self.recon_in_loss:
            recon = zero
            for j in range(M):
                dec_in = perturb(self._decoder_input(f, j).detach(), self.perturb_scale)
                rows, target = self._recon_target(j)
                if rows is not None:
                    dec_in, target = dec_in[rows], target[rows]
                recon = recon + linear_mse(dec_in, self.decoder[j], target)
            parts["recon"] = w.reconstruction * recon

        if self.club_mods:
            club = sum(est(f["s"][j], f["g"][j]) for est, j in zip(self.club, self.club_mods, strict=True))
            parts["club"] = w.club * club

        items = torch.unique(torch.cat([p, n]))
        items_all = items[self.complete[items]] if self.missing_setting else items
        if w.inter_modal:
            pairs = [(0, 1)] if M == 2 else [(j, (j + 1) % M) for j in range(M)]
            inter = zero
            if len(items_all) > 1:
                raw_g = F.embedding(items_all, torch.cat(f["raw_g"], dim=1)).split(d, dim=1)
                for a, b in pairs:
                    inter = inter + info_nce(raw_g[a], raw_g[b], self.tau_inter_modal)
            user_pairs = [(0, 1)] if self.opts["inter_user_pairs"] == "first_pair" else pairs
            for a, b in user_pairs:
                inter = inter + info_nce(u_g[a], u_g[b], self.tau_inter_modal, uu_ids)
            parts["inter"] = w.inter_modal * inter

        sum_user_g = torch.stack(u_g).sum(0)
        sum_item_g = torch.stack(p_g).sum(0)
        if w.user_item:
            # the general-feature term uses the inter-modal temperature, as the reference does (spec 9.8)
            intra = info_nce(u_cf, p_cf, self.tau_user_item, ui_ids) + info_nce(sum_user_g, sum_item_g,
                                                                                 self.tau_inter_modal, ui_ids)
            for j in range(M):
                use_general = self.opts["intra_specific"] == "reference" and M >= 3 and j == 2
                a, b = (u_g[j], p_g[j]) if use_general else (u_s[j], p_s[j])
                intra = intra + info_nce(a, b, self.tau_user_item, ui_ids)
            parts["intra"] = w.user_item * intra

        if w.behaviour_modality:
            bm = info_nce(p_cf, sum_item_g, self.tau_behaviour_modality, pp_ids) + info_nce(
                u_cf, sum_user_g, self.tau_behaviour_modality, uu_ids)
            parts["bm"] = w.behaviour_modality * bm

        if self.missing_setting and w.generation:
            gen = zero
            space = self.opts["generation_space"]
            spec_key = "s" if space == "propagated" else "raw_s"
            gen_key = "raw_g" if space == "raw" else "g"
            tab = F.embedding(items, torch.cat([*f[spec_key], *f["filter"], *f[gen_key]], dim=1)).split(d, dim=1)
            raw_s, filt, gen_g = tab[:M], tab[M:2 * M], tab[2 * M:]
            complete = self.complete[items]
            for j in range(M):
                obs = self.observed[items, j]
                if obs.any():
                    fake_s = self.specific_generator[j](perturb(filt[j][obs], self.perturb_scale))
                    gen = gen + F.mse_loss(fake_s, raw_s[j][obs])
                if complete.any():
                    src = torch.cat([gen_g[k][complete] for k in self.sources[j]], dim=1)
                    fake_g = self.translator[j](perturb(src, self.perturb_scale))
                    gen = gen + F.mse_loss(fake_g, gen_g[j][complete])
            parts["gen"] = w.generation * gen

        total = sum(parts.values())
        return LossOutput(total, {k: float(v.detach()) for k, v in parts.items()})

    # -------------------------------------------------------------------------------- epoch hooks
    def before_epoch(self, epoch: int) -> dict[str, float] | None:
        info: dict[str, float] = {}
        if self.club_mods:
            info["club_nll"] = self._train_club()
        self.counter += 1
        if self.missing_setting and self.writes:
            generated = self._generate(self.train_graphs, noise=True)
            self._write(generated, self.write_rows)
            if self.refresh_blend > 0 and self.counter % self.refresh_interval == 0:
                self.train_graphs = self._refresh(self.train_graphs, self.refresh_rows_)
                info["graph_nnz"] = float(sum(g.nnz for g in self.train_graphs))
        return info or None

    def after_epoch(self, epoch: int) -> dict[str, float] | None:
        """The disentanglement diagnostics of the epoch's end, for the log (``cos <name>`` keys; no state or
        random stream is touched, so training is the same with or without them)."""
        with torch.no_grad():
            parts = [self.encode(j) for j in range(self.M)]
        cosines = disentanglement_cosines([g for g, _ in parts], [s for _, s in parts], self.observed,
                                          self.modalities)
        return {f"{COSINE_LOG_PREFIX}{name}": value for name, (value, _) in cosines.items()}

    def before_evaluation(self, epoch: int) -> None:
        if not (self.new_item_setting and self.missing_setting and self.writes):
            return
        generated = self._generate(self.infer_graphs, noise=True)
        self._write(generated, self.infer_write_rows)
        if self.infer_adj_update and self.refresh_blend > 0 and self.counter % self.refresh_interval == 0:
            self.infer_graphs = self._refresh(self.infer_graphs, self.infer_refresh_rows)

    def _train_club(self) -> float:
        assert self.club_optimizer is not None
        with torch.no_grad():
            raw = [self.encode(j) for j in self.club_mods]
        total = 0.0
        for _ in range(self.club_steps):
            idx = torch.randperm(self.n_items, device=self.device)[: self.club_sample]
            loss = sum(est.learning_loss(s[idx], g[idx]) for est, (g, s) in zip(self.club, raw, strict=True))
            self.club_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.club_optimizer.step()
            total += float(loss.detach())
        return total / max(1, self.club_steps)

    @torch.no_grad()
    def _generate(self, graphs: list[SparseOp], noise: bool = True) -> list[torch.Tensor]:
        """Decoded raw features of every item for every modality, from the current state."""
        return [dec(z) for dec, z in zip(self.decoder, self._generation_inputs(graphs, noise), strict=True)]

    @torch.no_grad()
    def _generation_inputs(self, graphs: list[SparseOp], noise: bool) -> list[torch.Tensor]:
        """Per modality, the decoder's input at generation time ``[generated G; generated S]`` of every item.

        With a least-squares ``decoder_fit`` the decoders are refitted here, on the reconstruction inputs
        (``least_squares``) or on these generated inputs of the items observing every modality
        (``least_squares_generated``); they are part of the state the inputs are generated for.
        """
        space = self.opts["generation_space"]
        fit = self.opts["decoder_fit"]
        if space == "raw":
            raw = [self.encode(j) for j in range(self.M)]
            f = {"raw_g": [g for g, _ in raw], "raw_s": [s for _, s in raw]}
        elif space == "propagated" or fit == "least_squares":  # decoders fit on the training graphs' features
            f = self.forward_all(self.train_graphs if space == "reference" else graphs)
        else:
            f = {"raw_g": [self.encode(j)[0] for j in range(self.M)]}
        if fit == "least_squares":
            self._fit_decoders([self._decoder_input(f, j) for j in range(self.M)])
        general = f["g"] if space == "propagated" else f["raw_g"]
        if self.opts["missing_source_policy"] == "observed_mean":
            general = [torch.where(self.observed[:, j:j + 1], g, g[self.observed[:, j]].mean(0, keepdim=True))
                       for j, g in enumerate(general)]
        out = []
        for j in range(self.M):
            src = torch.cat([general[k] for k in self.sources[j]], dim=1)
            gen_g = self.translator[j](src)
            gen_s = self.specific_generator[j](self.item_filter(j))
            if space == "reference":
                gen_g, gen_s = self._propagate_mm(graphs[j], gen_g), self._propagate_mm(graphs[j], gen_s)
            out.append(torch.cat([gen_g, gen_s], dim=1))
        if fit == "least_squares_generated":  # fitted on what it decodes: generated inputs of complete items
            self._fit_decoders(out, self.complete)
        return [perturb(z, self.perturb_scale) for z in out] if noise else out

    def _decoder_input(self, f: dict[str, Any], j: int) -> torch.Tensor:
        """What decoder ``j`` reconstructs from: ``[G; S]`` of the generation space (without noise)."""
        prefix = "raw_" if self.opts["generation_space"] == "raw" else ""
        return torch.cat([f[prefix + "g"][j], f[prefix + "s"][j]], dim=1)

    def _recon_target(self, j: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Rows (None = all) and target table of decoder ``j``'s reconstruction objective."""
        if self.original_features:
            return self.observed[:, j], self.original_features[j]
        return (self.observed[:, j] if self.recon_observed_only else None), self.features[j]

    @torch.no_grad()
    def _fit_decoders(self, inputs: list[torch.Tensor], among: torch.Tensor | None = None) -> None:
        """Set decoder ``j`` to the ridge least-squares map from ``inputs[j]`` to its reconstruction target.

        The rows are those of the reconstruction objective, restricted to the items in ``among`` if given.
        """
        for j, dec in enumerate(self.decoder):
            z = inputs[j]
            rows, y = self._recon_target(j)
            y = y.detach()
            if among is not None:
                rows = among if rows is None else rows & among
            if rows is not None:
                z, y = z[rows], y[rows]
            if len(z) < 2:
                continue
            w, b = ridge_fit(z, y, self.decoder_ridge)  # (2d, d_m), (d_m,)
            dec.weight.copy_(w.T)
            dec.bias.copy_(b)

    @torch.no_grad()
    def _write(self, generated: list[torch.Tensor], rows: list[np.ndarray]) -> None:
        for j, r in enumerate(rows):
            if len(r):
                idx = torch.as_tensor(r, device=self.device)
                self.features[j].data[idx] = generated[j][idx]

    def _refresh(self, graphs: list[SparseOp], rows: list[np.ndarray]) -> list[SparseOp]:
        out = []
        for j, g in enumerate(graphs):
            if len(rows[j]) == 0:
                out.append(g)
                continue
            fresh = knn_graph(self.features[j].detach(), self.knn_k)
            out.append(SparseOp(blend_rows(g.scipy, fresh, rows[j], self.refresh_blend), self.device))
        return out

    # ------------------------------------------------------------------------------------ scoring
    def final_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.forward_all(self._scoring_graphs())
        return f["user"], f["item"]

    # --------------------------------------------------------------------------------- generation API
    def generate_for_retrieval(self) -> dict[str, torch.Tensor]:
        """Deterministic generated raw features of every item (no noise, scoring graphs)."""
        gen = self._generate(self._scoring_graphs(), noise=False)
        return {m: g for m, g in zip(self.modalities, gen, strict=True)}

    def generation_inputs(self) -> dict[str, torch.Tensor]:
        """What the decoders turn into :meth:`generate_for_retrieval`'s features (for analyses of generation)."""
        inputs = self._generation_inputs(self._scoring_graphs(), noise=False)
        return {m: z for m, z in zip(self.modalities, inputs, strict=True)}

    def completed_features(self) -> dict[str, torch.Tensor]:
        """Current feature tables with every missing row replaced by a freshly generated one."""
        gen = self.generate_for_retrieval()
        out = {}
        for j, m in enumerate(self.modalities):
            x = self.features[j].detach().clone()
            miss = ~self.observed[:, j]
            x[miss] = gen[m][miss]
            out[m] = x
        return out

    # ------------------------------------------------------- cold start: items added after training (coldstart.py)
    def add_items(self, features: Mapping[str, torch.Tensor], observed: torch.Tensor,
                  item_features: Mapping[str, torch.Tensor] | None = None) -> None:
        """Generate the added items' missing modalities, then their representations (the base class's cold path).

        A missing modality's general part comes from the translator on the general features of the item's other
        modalities (imputed rows where those are missing too), its specific part from the specific generator on
        a zero preference filter (the item has no users), both decoded into raw features.
        """
        super().add_items(features, observed, item_features)
        obs = observed.to(self.device)
        with torch.no_grad():
            x = [features[m].to(self.device).float() for m in self.modalities]
            general = [self.encode(j, x[j])[0] for j in range(self.M)]
            zero = x[0].new_zeros(len(obs), self.d)
            for j, m in enumerate(self.modalities):
                gen_g = self.translator[j](torch.cat([general[k] for k in self.sources[j]], dim=1))
                gen = self.decoder[j](torch.cat([gen_g, self.specific_generator[j](zero)], dim=1))
                rows = torch.where(obs[:, j:j + 1], x[j], gen)
                old = self.added_features.get(m)
                self.added_features[m] = rows if old is None else torch.cat([old, rows])

    def added_generated_features(self) -> dict[str, torch.Tensor] | None:
        return self.added_features or None

    # ------------------------------------------------------------------------------- checkpointing
    def get_extra_state(self) -> dict[str, Any]:
        def pack(graphs: list[SparseOp]) -> list[dict[str, torch.Tensor]]:
            return [{"indptr": torch.from_numpy(g.scipy.indptr.astype(np.int64)),
                     "indices": torch.from_numpy(g.scipy.indices.astype(np.int64)),
                     "data": torch.from_numpy(g.scipy.data.astype(np.float32))} for g in graphs]

        state: dict[str, Any] = {"counter": self.counter, "train_graphs": pack(self.train_graphs),
                                 "infer_graphs": pack(self.infer_graphs)}
        if self.club_optimizer is not None:
            state["club_optimizer"] = self.club_optimizer.state_dict()
        return state

    def set_extra_state(self, state: Any) -> None:
        if not state:
            return

        def unpack(items: list[dict[str, torch.Tensor]]) -> list[SparseOp]:
            return [SparseOp(sp.csr_matrix((g["data"].numpy(), g["indices"].numpy(), g["indptr"].numpy()),
                                           shape=(self.n_items, self.n_items)), self.device) for g in items]

        self.counter = int(state["counter"])
        self.train_graphs = unpack(state["train_graphs"])
        self.infer_graphs = unpack(state["infer_graphs"])
        if self.club_optimizer is not None and "club_optimizer" in state:
            self.club_optimizer.load_state_dict(state["club_optimizer"])
