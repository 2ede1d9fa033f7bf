r"""MILK: multimodality invariant learning for (new-item) recommendation (Bai et al., 2024), as run by DGMRec.

Items are represented only by their content (no item ID): a trainable feature table per modality, projected
to the embedding size. Training mixes the modalities with several "environments" (Dirichlet weights) and asks
for a low *and equal* BPR risk across them, so that user preferences do not hinge on one modality.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dgmrec.errors import ConfigError
from dgmrec.losses import sq_reg
from dgmrec.models.base import Batch, LossOutput, ModelInput, Recommender

_CHOICES = {
    "milk_mix_mode": ("dgmrec_scale", "available_only"),
    "milk_align_rows": ("dgmrec", "complete"),
    "milk_normalize": ("auto", "always", "never"),
    "milk_user_init": ("xavier", "normal"),
}


def environment_weights(lam: torch.Tensor) -> torch.Tensor:
    """The ``M + 1`` mixing environments: the uniform one, then the ``M`` cyclic shifts of ``lam``.

    Shift ``k`` puts ``lam[(m - k) mod M]`` on modality ``m`` (for ``M = 2``: ``(l1, l2)`` and ``(l2, l1)``).
    """
    M = lam.shape[0]
    uniform = torch.full((1, M), 1.0 / M, dtype=lam.dtype, device=lam.device)
    return torch.cat([uniform, torch.stack([torch.roll(lam, k) for k in range(M)])])


class MILK(Recommender):
    r"""MILK for ``M >= 2`` modalities, reproducing the DGMRec release by default.

    Architecture
    ------------
    Users: a free table :math:`e_u` (Xavier-uniform). Items: per modality a **trainable** copy :math:`T_m` of the
    imputed features (row-L2-normalised, see ``milk_normalize``) and a linear projection
    :math:`F_m = \mathrm{trs}_m(T_m)`. Under environment :math:`\lambda^e` an item is
    :math:`v^e_i = \kappa_i \sum_m \lambda^e_m F_{m,i}` with :math:`\kappa_i = 1/\#\text{observed}(i)`
    (0 when nothing is observed); scoring uses all weights 1, :math:`v_i = \kappa_i \sum_m F_{m,i}`, and
    :math:`s(u, i) = e_u \cdot v_i`.

    Losses
    ------
    Environments: the uniform one plus the ``M`` cyclic shifts of one draw :math:`\lambda \sim
    \mathrm{Dir}(\alpha \mathbf 1_M)` (fresh per batch). With :math:`\ell_e` the BPR loss (softplus form) in
    environment ``e``:

    .. math:: L = \sum_e \ell_e + \lambda_{reg} \tfrac12 (\|e_u\|^2 + \|v^0_{i^+}\|^2 + \|v^0_{i^-}\|^2)/B
              + \lambda_{align} \sum_{a<b} \mathrm{MSE}(F_a[J_{ab}], F_b[J_{ab}])
              + \lambda_{pen} \mathrm{Var}_e(\ell_e)

    (unbiased variance; the norm term only on the uniform environment; ``B`` the actual batch length;
    :math:`J_{ab}` the unique batch positives kept for the pair, see ``milk_align_rows``).

    Missing modalities
    ------------------
    The imputed (mean) rows are used like observed ones; the availability factor :math:`\kappa` only rescales
    the mixture; the alignment skips some missing rows; items with no observed modality score 0 for everyone.

    Options (default = DGMRec release)
    ----------------------------------
    ``milk_mix_mode``
        ``dgmrec_scale``: :math:`\kappa_i \sum_m \lambda_m F_{m,i}` (the imputed projection of a missing
        modality still enters with weight :math:`\lambda_m`). ``available_only``: the mixture is renormalised
        over the item's observed modalities, :math:`\sum_m \lambda_m o_{im} F_{m,i} / \sum_m \lambda_m o_{im}`
        (scoring: the mean of the observed projections; still 0 without any observed modality).
    ``milk_align_rows``
        ``dgmrec``: for the pair ``(a, b)`` drop only items whose missing set is exactly ``{a}`` or exactly
        ``{b}`` (items missing both, or missing a third modality too, are still aligned, mean against mean).
        ``complete``: keep only items observed in both ``a`` and ``b``.
    ``milk_normalize``
        Row-L2 normalisation of the imputed features before they become the trainable tables. ``auto``: as the
        release, normalise with two modalities, not with three or more (its TikTok path); ``always``/``never``.
    ``milk_user_init``
        ``xavier`` (release) or ``normal`` (the original MILK code: :math:`\mathcal N(0, 0.1^2)`).

    Unused pieces of the release (five fusion linears, a sigmoid) are not built.
    """

    name = "MILK"
    summary = "items represented by content only, invariant to the modality mix (new items, 2024)"
    missing_aware = True
    choices = _CHOICES
    cold_start_capable = False  # scores with its own cache, not final_embeddings

    def __init__(self, data: ModelInput, config: Mapping[str, Any]) -> None:
        super().__init__(data, config)
        M = data.n_modalities
        if M < 2:
            raise ConfigError("MILK needs at least two modalities", source="--modalities")
        self.M = M
        d = int(config["embedding_size"])
        self.reg_coeff = float(config["reg_coeff"])
        self.penalty_coeff = float(config["penalty_coeff"])
        self.align_coeff = float(config["align_coeff"])
        self.alpha = float(config["alpha"])
        self.mix_mode = str(config["milk_mix_mode"])
        align_rows = str(config["milk_align_rows"])
        normalize = str(config["milk_normalize"])
        normalize_features = normalize == "always" or (normalize == "auto" and M == 2)

        user = torch.empty(self.n_users, d)
        if str(config["milk_user_init"]) == "xavier":
            nn.init.xavier_uniform_(user)
        else:
            nn.init.normal_(user, std=0.1)
        self.user_embedding = nn.Parameter(user)
        self.features = nn.ParameterList()
        for m in self.modalities:
            x = data.features[m].detach().clone().float()
            self.features.append(nn.Parameter(F.normalize(x, dim=1) if normalize_features else x))
        self.projections = nn.ModuleList(nn.Linear(int(data.features[m].shape[1]), d) for m in self.modalities)

        observed = data.observed.detach().clone().bool()
        n_obs = observed.sum(1)
        kappa = torch.where(n_obs > 0, 1.0 / n_obs.clamp_min(1).float(), torch.zeros(()))
        self.register_buffer("observed", observed, persistent=False)
        self.register_buffer("kappa", kappa, persistent=False)
        # per modality pair: the items left out of the alignment
        self.pairs = list(itertools.combinations(range(M), 2))
        excluded = []
        for a, b in self.pairs:
            missing_a, missing_b = ~observed[:, a], ~observed[:, b]
            if align_rows == "complete":
                excluded.append(missing_a | missing_b)
            else:
                only_a = missing_a & (n_obs == M - 1)
                only_b = missing_b & (n_obs == M - 1)
                excluded.append(only_a | only_b)
        self.register_buffer("align_excluded", torch.stack(excluded, dim=1), persistent=False)
        self._cache: torch.Tensor | None = None

    # ---------------------------------------------------------------------------------------- forward
    def project(self, items: torch.Tensor | None = None) -> torch.Tensor:
        """Projected features ``(M, n, d)`` of ``items`` (all items when None)."""
        out = []
        for table, proj in zip(self.features, self.projections, strict=True):
            x = table if items is None else F.embedding(items, table)
            out.append(proj(x))
        return torch.stack(out)

    def mix(self, projected: torch.Tensor, weights: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """Item vectors ``(E, n, d)`` under each environment's modality weights ``weights`` ``(E, M)``."""
        obs = self.observed if items is None else self.observed[items]
        if self.mix_mode == "dgmrec_scale":
            kappa = self.kappa if items is None else self.kappa[items]
            return torch.einsum("em,mnd->end", weights, projected) * kappa[None, :, None]
        w = weights[:, None, :] * obs[None].to(weights.dtype)  # (E, n, M)
        total = w.sum(-1, keepdim=True)
        w = torch.where(total > 0, w / total.clamp_min(1e-30), torch.zeros((), dtype=w.dtype, device=w.device))
        return torch.einsum("enm,mnd->end", w, projected)

    # ------------------------------------------------------------------------------------------- loss
    def loss(self, batch: Batch) -> LossOutput:
        users, pos, neg = batch.users, batch.pos, batch.neg
        B = len(users)
        items, inverse = torch.unique(torch.cat([pos, neg]), return_inverse=True)
        inv_pos, inv_neg = inverse[:B], inverse[B:]
        projected = self.project(items)  # (M, n, d)

        alpha = torch.full((self.M,), self.alpha, device=projected.device)
        lam = torch.distributions.Dirichlet(alpha).sample()
        env = environment_weights(lam).to(projected.dtype)
        item_vec = self.mix(projected, env, items)  # (E, n, d)
        u = F.embedding(users, self.user_embedding)
        # index_select, not ``t[:, idx]``: repeated indices accumulate deterministically under threads
        v_pos, v_neg = item_vec.index_select(1, inv_pos), item_vec.index_select(1, inv_neg)
        diff = (u[None] * (v_neg - v_pos)).sum(-1)  # (E, B)
        risks = F.softplus(diff).mean(1)
        bpr = risks.sum()
        penalty = self.penalty_coeff * risks.var()
        reg = self.reg_coeff * sq_reg(u, v_pos[0], v_neg[0], batch_size=B)

        is_pos = torch.zeros(len(items), dtype=torch.bool, device=items.device)
        is_pos[inv_pos] = True
        align = torch.zeros((), device=projected.device)
        for k, (a, b) in enumerate(self.pairs):
            keep = is_pos & ~self.align_excluded[items, k]
            if keep.any():
                align = align + F.mse_loss(projected[a][keep], projected[b][keep])
        align = self.align_coeff * align
        total = bpr + reg + align + penalty
        parts = {"bpr": bpr, "reg": reg, "align": align, "penalty": penalty}
        return LossOutput(total, {k: float(v.detach()) for k, v in parts.items()})

    # ---------------------------------------------------------------------------------------- scoring
    def item_vectors(self) -> torch.Tensor:
        """Scoring vectors of all items (all modality weights 1)."""
        ones = torch.ones(1, self.M, device=self.user_embedding.device)
        return self.mix(self.project(), ones)[0]

    def prepare_eval(self) -> None:
        with torch.no_grad():
            self._cache = self.item_vectors()

    def score_users(self, users: torch.Tensor, items: slice | None = None) -> torch.Tensor:
        assert self._cache is not None, "call prepare_eval() first"
        return self.user_embedding[users] @ (self._cache if items is None else self._cache[items]).T

    def train(self, mode: bool = True) -> MILK:
        self._cache = None
        return super().train(mode)
