r"""Cold start: representations of items without training interactions, generated from their content.

A new item (the new-item setting's held-out items, or items added to a trained run) has no collaborative
signal: its ID embedding was never trained, its preference filters are zero. Its collaborative representation
is treated as one more missing modality and generated from what the item has, its observed modality features,
by a map learned on the *old* items (those with training interactions), whose trained representations are
the targets. The map is fitted on the model's current representations before every evaluation pass, so it
adds nothing to training and nothing to a checkpoint.

Content. Per modality, the features are standardised with the mean and standard deviation of the observed
rows of the reference (old) items, then scaled to unit length; unobserved rows are zero and never compared.

Methods (configuration key ``cold_start``):

``none``
    the model's own representation of new items (the reference behaviour).
``knn``
    the mean trained representation of the item's ``cold_start_k`` most similar old items; the similarity of
    two items is the mean, over the modalities both observe, of the cosine of their content rows. Items
    without a modality in common with any old item (e.g. an item missing every modality) take the mean of the
    old items with the same observed pattern (all old items when there are none).
``ridge``
    ridge regression (strength ``cold_start_ridge``, relative to the mean input variance) from the content
    rows and the observed-pattern indicators to the representation. With ``cold_start_ridge: auto`` the
    strength is chosen from :data:`RIDGE_GRID` on the old items before every fit: two folds, each predicted by
    the map fitted on the other, and the strength whose predictions score closest to the trained
    representations (squared score error under the users' Gram matrix :math:`U^\top U / n_{users}`, the mean
    over users of :math:`(u \cdot (\hat y - y))^2`) wins. Only training data are read.

Calibration (``cold_start_calibration``). A generated representation is an average (``knn``) or a shrunk
regression estimate (``ridge``), so its scores spread far less than an old item's and a new item would sit
below every old item in a full ranking. Both calibrations scale every generated row's deviation from the old
items' mean representation :math:`\bar y` by one factor, :math:`\bar y + \alpha (\hat y - \bar y)`, set on
*held-out old items*: up to 2048 evenly spaced old items whose representations are generated without them
(``knn``: self excluded from the neighbours; ``ridge``: each of two folds fitted on the other), for which both
the generated and the trained representation are known.

``share`` (default)
    :math:`\alpha` such that the held-out old items, with their generated representations, win as many of
    the users' top-20 slots (every item ranked, no item masked; up to 4096 evenly spaced users) as they win
    with their trained ones: generated items are as visible in top lists as the items they stand for.
``spread``
    :math:`\alpha` such that the users' scores of the generated representations spread as widely as their
    scores of the trained ones (second moments about :math:`\bar y`, under the users' Gram matrix
    :math:`U^\top U / n_{users}`). Matching the whole distribution instead of its top can over-promote
    (measured on VBPR, TikTok).
``demand``
    :math:`\alpha` such that the model's own cold items win the share of the users' top-20 slots (training
    items masked, as in evaluation) that the *validation* interactions fall on them: new items are shown as
    often as the validation data say they are wanted. The share comes from the dataset
    (:attr:`ModelInput.cold_demand`, new-item setting only; the test split is never read). Without it (no
    new items, or no validation interaction on them) ``demand`` falls back to ``share``. Items added after
    training take the factor of the own cold items.
``none``
    the generated rows as they are.

The factor is then multiplied by ``cold_start_scale``. Under ``share`` and ``spread`` it depends on the old
items only, so an item gets the same representation whether it was a new item at training time or added later.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from dgmrec.errors import ConfigError
from dgmrec.losses import ridge_fit, ridge_path

COLD_START_METHODS = ("none", "knn", "ridge")
CALIBRATIONS = ("none", "share", "spread", "demand")
#: strengths ``cold_start_ridge: auto`` chooses from
RIDGE_GRID = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
#: old items whose generated representations set the calibration factor (evenly spaced)
CALIBRATION_SAMPLE = 2048
#: users whose top lists set the ``share`` factor (evenly spaced), and the list length
CALIBRATION_USERS = 4096
CALIBRATION_TOP = 20
_BLOCK = 1024  # cold rows per similarity block


@dataclass(frozen=True)
class ColdStartOptions:
    """The cold-start configuration keys (``configs/overall.yaml``)."""

    method: str = "none"
    k: int = 20
    ridge: float | None = 1.0  # None: chosen on held-out old items (``auto``)
    calibration: str = "share"
    scale: float = 1.0

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ColdStartOptions:
        d = cls()
        ridge = config.get("cold_start_ridge", d.ridge)
        try:
            strength = None if ridge in ("auto", None) else float(ridge)
        except (TypeError, ValueError):
            strength = math.nan
        if isinstance(ridge, bool) or (strength is not None and not strength >= 0):
            raise ConfigError(f"key 'cold_start_ridge' must be a number >= 0 or auto, got {ridge!r}",
                              source="cold_start_ridge")
        opts = cls(method=str(config.get("cold_start", d.method)), k=int(config.get("cold_start_k", d.k)),
                   ridge=strength,
                   calibration=str(config.get("cold_start_calibration", d.calibration)),
                   scale=float(config.get("cold_start_scale", d.scale)))
        for key, value, allowed in (("cold_start", opts.method, COLD_START_METHODS),
                                    ("cold_start_calibration", opts.calibration, CALIBRATIONS)):
            if value not in allowed:
                raise ConfigError(f"key '{key}' must be one of {', '.join(allowed)}, got {value!r}", source=key)
        for key, bad in (("cold_start_k", opts.k < 1), ("cold_start_scale", opts.scale <= 0)):
            if bad:
                raise ConfigError(f"key '{key}' is out of range: {config.get(key)!r}", source=key)
        return opts

    def for_added_items(self) -> ColdStartOptions:
        """Items added to a trained run always need a generated representation: ``none`` becomes ``knn``."""
        return self if self.method != "none" else ColdStartOptions(
            "knn", self.k, self.ridge, self.calibration, self.scale)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


class ItemContent:
    """Standardised, unit-length content rows per modality (zero where unobserved), for a growing item set.

    ``reference`` marks the items whose observed rows give each modality's mean and standard deviation.
    """

    def __init__(self, features: Sequence[torch.Tensor], observed: torch.Tensor, reference: torch.Tensor) -> None:
        self.mean: list[torch.Tensor] = []
        self.std: list[torch.Tensor] = []
        for j, x in enumerate(features):
            rows = observed[:, j] & reference
            if not bool(rows.any()):
                rows = observed[:, j]
            x_ref = x[rows].double()
            self.mean.append(x_ref.mean(0).float() if len(x_ref) else torch.zeros(x.shape[1], device=x.device))
            std = x_ref.std(0, unbiased=False).float() if len(x_ref) else torch.ones(x.shape[1], device=x.device)
            self.std.append(torch.where(std > 0, std, torch.ones_like(std)))
        self.rows = self.encode(features, observed)
        self.observed = observed.clone()

    def encode(self, features: Sequence[torch.Tensor], observed: torch.Tensor) -> list[torch.Tensor]:
        """Content rows of ``features`` (same modalities, any number of items) under the stored statistics."""
        return [_unit((x.float() - mu) / sd) * observed[:, j:j + 1].to(x.dtype)
                for j, (x, mu, sd) in enumerate(zip(features, self.mean, self.std, strict=True))]

    def append(self, features: Sequence[torch.Tensor], observed: torch.Tensor) -> None:
        self.rows = [torch.cat([r, e]) for r, e in zip(self.rows, self.encode(features, observed), strict=True)]
        self.observed = torch.cat([self.observed, observed])

    @property
    def n_items(self) -> int:
        return len(self.observed)

    def similarity(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Mean cosine over the modalities both items observe; ``-inf`` where they observe none in common."""
        num = sum(r[rows] @ r[cols].T for r in self.rows)
        obs = self.observed.float()
        count = obs[rows] @ obs[cols].T
        assert isinstance(num, torch.Tensor)
        return torch.where(count > 0, num / count.clamp_min(1.0), torch.full_like(num, -float("inf")))

    def design(self, rows: torch.Tensor) -> torch.Tensor:
        """Regression inputs: the content rows and the observed-pattern indicators."""
        return torch.cat([*(r[rows] for r in self.rows), self.observed[rows].float()], dim=1)


@dataclass
class _Memo:
    """The map and factor :meth:`ColdStart.complete` fitted on one set of representations, and its output rows.

    Adding items leaves the model's representations unchanged, so the next call reuses both and generates the
    added rows only (the service answers an addition without refitting).
    """

    users: torch.Tensor
    items: torch.Tensor
    fit_rows: torch.Tensor
    rows: torch.Tensor
    generated: torch.Tensor
    targets: torch.Tensor
    y: torch.Tensor
    center: torch.Tensor
    fit: tuple[torch.Tensor, torch.Tensor] | None
    factor: float | None

    def holds(self, users: torch.Tensor, items: torch.Tensor, fit_rows: torch.Tensor, rows: torch.Tensor) -> bool:
        """Same representations, and ``rows`` extends the rows generated so far."""
        n = len(self.rows)
        return (len(rows) >= n and torch.equal(rows[:n], self.rows) and users.shape == self.users.shape
                and items.shape == self.items.shape and torch.equal(fit_rows, self.fit_rows)
                and torch.equal(users, self.users) and torch.equal(items, self.items))


class ColdStart:
    """Generates the representations of cold items (see the module docstring).

    ``features``/``observed`` are the model's items (``reference`` = old items, whose observed rows give the
    content statistics); :meth:`add` appends items added after training, which are cold. ``cold`` marks the
    model's own cold items (the new items of the new-item setting).
    """

    def __init__(self, options: ColdStartOptions, features: Sequence[torch.Tensor] | None, observed: torch.Tensor,
                 cold: torch.Tensor, demand: float | None = None, seen: sp.csr_matrix | None = None) -> None:
        self.options = options
        # ``demand`` calibration: the validation share of interactions on the own cold items, and the
        # (user, item) pairs the evaluation masks
        self.demand = demand
        self.seen = seen
        self._features = None if features is None else list(features)
        self._observed = observed
        self.n_own = len(observed)
        self.cold = cold.clone().bool()
        self._content: ItemContent | None = None
        self._memo: _Memo | None = None
        #: the ridge strength of the fits (``cold_start_ridge``; with ``auto`` the one chosen at the last fit)
        self.ridge = RIDGE_GRID[2] if options.ridge is None else options.ridge

    @property
    def needs_item_features(self) -> bool:
        """True when built without the model's item features (``cold_start: none``) and not given them since."""
        return self._content is None and self._features is None

    def set_item_features(self, features: Sequence[torch.Tensor]) -> None:
        """The model's own items' features (model space), for a model built without them."""
        self._features = list(features)

    @property
    def content(self) -> ItemContent:
        """Built on first use (it copies the features)."""
        if self._content is None:
            if self._features is None:
                raise ValueError("the model's item features are needed: call set_item_features first")
            self._content = ItemContent(self._features, self._observed, ~self.cold[: self.n_own])
            self._features = None
        return self._content

    @property
    def n_added(self) -> int:
        return len(self.cold) - self.n_own

    def add(self, features: Sequence[torch.Tensor], observed: torch.Tensor) -> None:
        """Append cold items (features per modality in the model's order, float; ``observed`` bool ``(n, M)``)."""
        self.content.append(features, observed)
        self.cold = torch.cat([self.cold, torch.ones(len(observed), dtype=torch.bool, device=self.cold.device)])

    # --------------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def complete(self, users: torch.Tensor, items: torch.Tensor, fit_rows: torch.Tensor) -> torch.Tensor:
        """Representations of every item, own and added.

        ``items`` (``(n_own, d)``) are the model's; ``fit_rows`` (bool ``(n_own,)``) marks the items with a
        trained representation. The rows of the cold items (with method ``none``: of the added items only) are
        replaced by generated ones; without cold items to generate, ``items`` is returned as it is.
        """
        own_cold = self.options.method != "none"
        if not own_cold and self.n_added == 0:
            return items
        options = self.options.for_added_items()
        out = torch.cat([items, items.new_zeros(self.n_added, items.shape[1])])
        rows = self.cold.nonzero().ravel() if own_cold else torch.arange(self.n_own, len(self.cold), device=out.device)
        targets = (fit_rows & ~self.cold[: self.n_own]).nonzero().ravel()
        if len(rows) == 0:
            return out
        if len(targets) == 0:
            raise ConfigError("cold start needs old items with training interactions", source="cold_start")
        memo = self._memo if self._memo is not None and self._memo.holds(users, items, fit_rows, rows) else None
        if memo is None:  # fit the map and the calibration factor on the model's current representations
            y = items[targets].float()
            center = y.mean(0)
            if options.method == "ridge" and options.ridge is None:
                self.ridge = self._choose_ridge(targets, y, users.float())
            fit = self._fit(options.method, targets, y)
            raw = self._generate(options.method, rows, targets, y, fit=fit)
            factor = self._factor(options, rows, targets, y, users.float(), items.float(), raw)
            memo = _Memo(users.clone(), items.clone(), fit_rows.clone(), rows[:0], raw[:0], targets, y, center, fit,
                         factor)
        else:  # items added since the last call: only their rows are generated, with the same map and factor
            raw = self._generate(options.method, rows[len(memo.rows):], memo.targets, memo.y, fit=memo.fit)
        new = raw if memo.factor is None else memo.center + memo.factor * (raw - memo.center)
        memo.rows = rows
        memo.generated = torch.cat([memo.generated, new]) if len(memo.generated) else new
        self._memo = memo
        out[rows] = memo.generated.to(out.dtype)
        return out

    def _factor(self, options: ColdStartOptions, rows: torch.Tensor, targets: torch.Tensor, y: torch.Tensor,
                users: torch.Tensor, items: torch.Tensor, generated: torch.Tensor) -> float | None:
        """The calibration factor times ``cold_start_scale`` (None: the generated rows stay as they are)."""
        if options.calibration == "none":
            return None
        demand = self._demand_rows(rows) if options.calibration == "demand" else None
        if demand is not None:
            alpha = _demand_factor(users, y, self.seen, targets, generated[demand].float(), y.mean(0),
                                   float(self.demand))  # type: ignore[arg-type]
        else:
            alpha = self._calibration(options, targets, y, users, items)
        return None if alpha is None else options.scale * alpha

    def _demand_rows(self, rows: torch.Tensor) -> torch.Tensor | None:
        """Positions in ``rows`` of the own cold items, when the ``demand`` calibration can use them."""
        if self.demand is None or not self.demand > 0 or self.seen is None:
            return None
        own = (rows < self.n_own).nonzero().ravel()
        return own if len(own) else None

    def _fit(self, method: str, targets: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The ridge map from content to representation, fitted on ``targets`` (``knn`` has nothing to fit)."""
        return ridge_fit(self.content.design(targets), y, self.ridge) if method == "ridge" else None

    def _choose_ridge(self, targets: torch.Tensor, y: torch.Tensor, users: torch.Tensor) -> float:
        """``cold_start_ridge: auto``: the strength of :data:`RIDGE_GRID` whose two-fold held-out predictions of
        the old items' representations have the smallest squared score error (users' Gram matrix)."""
        if len(targets) < 4:
            return self.ridge
        gram = (users.T @ users / max(1, len(users))).double()
        design = self.content.design(targets)
        fold = _first_fold(len(targets), targets.device)
        error = torch.zeros(len(RIDGE_GRID), dtype=torch.float64)
        for held in (fold, ~fold):
            for i, (w, b) in enumerate(ridge_path(design[~held], y[~held], RIDGE_GRID)):
                dev = (design[held] @ w + b - y[held]).double()
                error[i] += float(((dev @ gram) * dev).sum())
        return RIDGE_GRID[int(torch.argmin(error))]

    def _generate(self, method: str, rows: torch.Tensor, targets: torch.Tensor, y: torch.Tensor,
                  exclude_self: bool = False, fit: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Generated representations of ``rows`` from the old items ``targets`` (representations ``y``)."""
        content = self.content
        if method == "ridge":
            w, b = fit if fit is not None else self._fit(method, targets, y)  # type: ignore[misc]
            return content.design(rows) @ w + b
        out = torch.empty(len(rows), y.shape[1], device=y.device)
        k = min(self.options.k, len(targets))
        fallback = self._pattern_means(targets, y)
        for start in range(0, len(rows), _BLOCK):
            block = rows[start:start + _BLOCK]
            sim = content.similarity(block, targets)
            if exclude_self:
                sim[block[:, None] == targets[None, :]] = -float("inf")
            top, idx = sim.topk(k, dim=1)
            valid = torch.isfinite(top).float()
            n_valid = valid.sum(1, keepdim=True)
            mean = (y[idx] * valid[..., None]).sum(1) / n_valid.clamp_min(1.0)
            pattern = fallback(content.observed[block])
            out[start:start + len(block)] = torch.where(n_valid > 0, mean, pattern)
        return out

    def _pattern_means(self, targets: torch.Tensor, y: torch.Tensor) -> Any:
        """A function: observed patterns -> mean representation of the old items with that pattern (else all)."""
        obs = self.content.observed
        codes = (obs.long() * (2 ** torch.arange(obs.shape[1], device=obs.device))).sum(1)
        target_codes = codes[targets]
        overall = y.mean(0)

        def lookup(observed: torch.Tensor) -> torch.Tensor:
            want = (observed.long() * (2 ** torch.arange(observed.shape[1], device=observed.device))).sum(1)
            out = overall.expand(len(want), -1).clone()
            for code in torch.unique(want):
                same = target_codes == code
                if bool(same.any()):
                    out[want == code] = y[same].mean(0)
            return out

        return lookup

    def _calibration(self, options: ColdStartOptions, targets: torch.Tensor, y: torch.Tensor, users: torch.Tensor,
                     items: torch.Tensor) -> float | None:
        """The ``share`` or ``spread`` factor of the generated deviations from the old items' mean."""
        n = len(targets)
        pick = torch.as_tensor(np.unique(np.linspace(0, n - 1, min(n, CALIBRATION_SAMPLE)).astype(np.int64)),
                               device=targets.device)
        if options.method == "ridge":  # two folds of the old items, each generated by a map fitted on the other
            fold = _first_fold(n, targets.device)
            a, b = pick[fold[pick]], pick[~fold[pick]]
            pick = torch.cat([a, b])
            held = torch.cat([self._generate("ridge", targets[a], targets[~fold], y[~fold]),
                              self._generate("ridge", targets[b], targets[fold], y[fold])])
        else:
            held = self._generate(options.method, targets[pick], targets, y, exclude_self=True)
        center = y.mean(0)
        if options.calibration == "spread":
            return _spread_ratio(users, y - center, held - center)
        return _share_factor(users, items, y[pick], held, center)  # "demand" without a demand: as "share"


def _first_fold(n: int, device: torch.device) -> torch.Tensor:
    """The first of the two folds the held-out fits split ``n`` old items into (every second item)."""
    return torch.arange(n, device=device) % 2 == 0


def _spread_ratio(users: torch.Tensor, true_dev: torch.Tensor, held_dev: torch.Tensor) -> float | None:
    gram = users.T @ users / max(1, len(users))

    def second_moment(dev: torch.Tensor) -> float:
        return float(((dev @ gram) * dev).sum(1).mean())

    den = second_moment(held_dev)
    return (second_moment(true_dev) / den) ** 0.5 if den > 0 else None


def _share_factor(users: torch.Tensor, items: torch.Tensor, trained: torch.Tensor, held: torch.Tensor,
                  center: torch.Tensor) -> float | None:
    """The factor at which the held-out items' generated rows win as many top-K slots as their trained rows.

    With threshold ``t_u`` (user ``u``'s K-th best score over ``items``), a generated row wins the slot when
    ``u.c + alpha * u.(h - c) >= t_u``: for ``u.(h - c) > 0`` from ``alpha >= r``, for ``< 0`` up to
    ``alpha <= r``, ``r = (t_u - u.c) / u.(h - c)``. The count is a step function of ``alpha``; the factor is
    taken on a log grid from 1/16 to 1024.
    """
    n_users = len(users)
    rows = torch.as_tensor(np.unique(np.linspace(0, n_users - 1, min(n_users, CALIBRATION_USERS))
                                     .astype(np.int64)), device=users.device)
    u = users[rows]
    k = min(CALIBRATION_TOP, len(items))
    t = torch.cat([(blk @ items.T).topk(k, dim=1).values[:, -1] for blk in u.split(1024)])[:, None]
    target = int((u @ trained.T >= t).sum())
    base = u @ center  # (users,)
    slope = u @ (held - center).T  # (users, held)
    gap = (t - base[:, None]).expand_as(slope)
    up = slope > 0
    down = slope < 0
    r_up = torch.sort((gap[up] / slope[up]).double()).values
    r_down = torch.sort((gap[down] / slope[down]).double()).values
    always = int(((slope == 0) & (gap <= 0)).sum())
    grid = torch.logspace(-4, 10, 561, base=2.0, dtype=torch.float64, device=users.device)
    won = (torch.searchsorted(r_up, grid, right=True) + (len(r_down) - torch.searchsorted(r_down, grid))
           + always)
    if target == 0 or int(won.max()) == 0:
        return None
    best = int(torch.argmin((won - target).abs()))
    return float(grid[best])


def _calibration_users(n_users: int, n_columns: int) -> torch.Tensor:
    """Evenly spaced users for a calibration; fewer for wide catalogues (at most 2^24 scores at once)."""
    n = min(n_users, CALIBRATION_USERS, max(64, 2**24 // max(1, n_columns)))
    return torch.as_tensor(np.unique(np.linspace(0, n_users - 1, n).astype(np.int64)))


def _demand_factor(users: torch.Tensor, y: torch.Tensor, seen: sp.csr_matrix, targets: torch.Tensor,
                   cold: torch.Tensor, center: torch.Tensor, demand: float, top: int = CALIBRATION_TOP,
                   ) -> float | None:
    """The factor at which the cold rows ``cold`` win the share ``demand`` of the users' top-K slots.

    The old items ``targets`` (trained rows ``y``) compete with their training pairs (``seen``) masked. With
    the user's old scores ``T`` and cold scores ``C(alpha) = u.c + alpha * u.(h - c)``, both sorted downwards,
    the cold items in the merged top-K number ``#{j : C_j > T_{K-1-j}}``. The share grows with ``alpha``; the
    factor is found by bisection on ``log alpha`` in [2^-6, 2^10].
    """
    k = min(top, len(targets) + len(cold))
    rows = _calibration_users(len(users), max(len(targets), len(cold))).to(users.device)
    u = users[rows]
    target_cols = targets.cpu().numpy()
    thresholds = []
    for blk_rows in rows.split(512):
        blk = users[blk_rows]
        scores = blk @ y.T
        mask = seen[blk_rows.cpu().numpy()][:, target_cols].toarray().astype(bool)
        scores[torch.as_tensor(mask, device=scores.device)] = -float("inf")
        best = scores.topk(min(k, scores.shape[1]), dim=1).values
        if best.shape[1] < k:
            best = torch.cat([best, best.new_full((len(best), k - best.shape[1]), -float("inf"))], dim=1)
        thresholds.append(best)
    # the old score each cold rank must beat: the (K - j)-th best for the (j + 1)-th best cold item
    beat = torch.cat(thresholds).flip(1)[:, : min(k, len(cold))]
    base = (u @ center)[:, None]
    slope = u @ (cold - center).T

    def share(log_alpha: float) -> float:
        c = (base + 2.0**log_alpha * slope).topk(beat.shape[1], dim=1).values
        return float((c > beat).sum()) / (len(u) * k)

    lo, hi = -6.0, 10.0
    if share(hi) <= 0:
        return None
    if share(lo) >= demand:
        return 2.0**lo
    if share(hi) <= demand:
        return 2.0**hi
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if share(mid) < demand else (lo, mid)
    return 2.0 ** ((lo + hi) / 2)
