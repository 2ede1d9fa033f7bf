"""The scoring state of a served run, and the writes that change it.

A :class:`ServingState` loads a run once (:func:`dgmrec.api.load_run`), replays what its store
(:mod:`dgmrec.serving.store`) recorded, and answers from an immutable :class:`Snapshot`: the user and item
representations, the exclusion matrices, the feedback, the similarity spaces. Readers take the current snapshot
once per request and never touch the model; writers (added items, feedback) hold one lock, change the model and
the store, build a new snapshot and swap it in with one assignment, so a request sees either the state before a
write or the state after it, never a mix.

Ids. The service speaks raw ids: the dataset's id maps (``user_ids.csv`` / ``item_ids.csv`` of its folder)
where it has them, the internal indices as strings where it does not, the ids given to added items, and the
ids of users first seen in feedback. Internal indices never leave this module.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from dgmrec import api
from dgmrec.data.dataset import RecDataset
from dgmrec.data.impute import FeatureOptions, fit_scaler, prepare_features
from dgmrec.errors import DataError, InputError
from dgmrec.evaluation.protocol import MASK_SCORE, rank_items
from dgmrec.models.base import Recommender
from dgmrec.serving.store import STORE_NAME, Store

#: similarity space of the final item representations (``GET /items/{item}/similar`` without ``modality``)
FINAL = "final"
EXCLUDES = ("seen", "train", "none")
DEFAULT_ANN_ABOVE = 100_000
MAX_ID_LENGTH = 256


class NotFoundError(InputError):
    """An unknown user or item id (HTTP 404)."""


class ConflictError(InputError):
    """An id that is already taken (HTTP 409)."""


# ------------------------------------------------------------------------------------------------------- ids
class IdMap:
    """Raw id <-> internal index, append-only, shared by snapshots.

    A snapshot knows how many entries it may see (``n``); entries appended after it was taken are invisible
    to it. Appends happen under the writer lock; lookups need no lock.
    """

    def __init__(self, ids: Sequence[str], kind: str) -> None:
        self.kind = kind
        self._ids: list[str] = []
        self._index: dict[str, int] = {}
        self.append(ids)

    def append(self, ids: Sequence[str]) -> None:
        for raw in ids:
            raw = str(raw)
            if raw in self._index:
                raise DataError(f"{self.kind} id {raw!r} appears twice")
            self._index[raw] = len(self._ids)
            self._ids.append(raw)

    def index(self, raw: str, n: int) -> int | None:
        """The index of ``raw`` among the first ``n`` entries, else None."""
        k = self._index.get(raw)
        return k if k is not None and k < n else None

    def raw(self, index: int) -> str:
        return self._ids[index]

    def raws(self, indices: np.ndarray) -> list[str]:
        ids = self._ids
        return [ids[int(k)] for k in indices]

    def __contains__(self, raw: object) -> bool:
        return raw in self._index

    def __len__(self) -> int:
        return len(self._ids)


def dataset_ids(lr: api.LoadedRun) -> tuple[list[str], list[str]]:
    """Raw user and item ids of a loaded run: the dataset's id maps, or the indices as strings; items the run
    already carries from :func:`dgmrec.api.add_items` keep the ids they were given."""
    ds = lr.dataset
    items = [str(i) for i in ds.item_labels(np.arange(ds.n_items))]
    added = [str(i) for i in lr.added_ids]  # items added with dgmrec.api.add_items outside the service
    if ds.item_ids is None and added:
        items[len(items) - len(added):] = added
    return [str(u) for u in ds.user_labels(np.arange(ds.n_users))], items


def _trained_part(lr: api.LoadedRun) -> RecDataset:
    """The run's dataset without the items :func:`dgmrec.api.add_items` gave it (the items the model was trained
    with: the ones its feature scaling and imputation were fitted on)."""
    ds = lr.dataset
    n = ds.n_items - len(lr.added_ids)
    if n == ds.n_items:
        return ds
    return replace(ds, n_items=n, features={m: x[:n] for m, x in ds.features.items()}, observed=ds.observed[:n],
                   new_items=None if ds.new_items is None else ds.new_items[:n],
                   item_ids=None if ds.item_ids is None else ds.item_ids[:n], _train_csr=None)


# ----------------------------------------------------------------------------------------------- snapshot
def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class _IndexCache:
    """faiss indexes of a snapshot's similarity spaces, built on first use."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.indexes: dict[str, Any] = {}


@dataclass(frozen=True, eq=False)
class Snapshot:
    """Everything a read request needs, never changed once built (writers build a new one).

    Attributes
    ----------
    version:
        Increases with every write.
    users, items:
        The id maps (append-only; this snapshot sees their first ``n_all_users`` / ``n_items`` entries).
    n_users, n_all_users:
        Users of the trained run; plus the users first seen in feedback.
    n_base_items, n_items:
        Items of the trained run; plus the added items.
    score:
        Trained users' indices -> ``(b, n_items)`` scores (the model's scoring, over added items too).
    item_rep:
        ``(n_items, d)`` final item representations, or None for models that have none.
    spaces:
        Similarity space -> ``(n_items, d)`` unit rows (``final`` and every modality's completed features).
    train, seen:
        CSR ``(n_users, n_base_items)``: the training items, and the items of every split, of trained users.
    feedback:
        User index -> item indices received as feedback (trained and new users).
    popularity:
        ``(n_items,)`` training interactions plus feedback per item.
    """

    version: int
    users: IdMap
    items: IdMap
    n_users: int
    n_all_users: int
    n_base_items: int
    n_items: int
    score: Callable[[torch.Tensor], torch.Tensor]
    item_rep: np.ndarray | None
    spaces: dict[str, np.ndarray]
    train: sp.csr_matrix
    seen: sp.csr_matrix
    feedback: dict[int, tuple[int, ...]]
    popularity: np.ndarray
    added_generated: dict[int, tuple[str, ...]]
    indexes: _IndexCache = field(default_factory=_IndexCache)


@dataclass
class Ranked:
    """A ranked list: raw ids, scores, and where it came from (``model``, ``content`` or ``popularity``)."""

    items: list[str]
    scores: list[float]
    source: str


@dataclass
class AddedItem:
    """One item added by :meth:`ServingState.add_items`."""

    id: str
    observed: list[str]
    generated: list[str]
    imputed: list[str]


NewItemSpec = tuple[str | None, Mapping[str, Sequence[float] | None]]
#: raw content of a new item: modality -> a text, or a file's bytes or their base64 text (None: none)
NewItemContent = Mapping[str, str | bytes | None]


class _PendingAdd:
    """An add request waiting for the write lock; whoever takes the lock adds every waiting request."""

    def __init__(self, items: list[NewItemSpec]) -> None:
        self.items = items
        self.done = threading.Event()
        self.result: list[AddedItem] | None = None
        self.error: BaseException | None = None


class _DotScorer:
    """The default scoring of :class:`~dgmrec.models.base.Recommender` on private copies of its tables."""

    def __init__(self, users: torch.Tensor, items: torch.Tensor) -> None:
        self.users = users
        self.items_t = items.T.contiguous()

    def __call__(self, users: torch.Tensor) -> torch.Tensor:
        return self.users[users] @ self.items_t


# ------------------------------------------------------------------------------------------------- state
class ServingState:
    """A served run: the loaded model, its store, and the current snapshot.

    Parameters
    ----------
    run_dir:
        Run directory written by ``dgmrec train``.
    device:
        Torch device of the model.
    ann_above:
        Catalogues with more items than this answer similar-item queries from a faiss HNSW index; smaller ones
        exactly.
    store_path:
        The SQLite file (default ``RUN_DIR/serving.sqlite``).
    """

    def __init__(self, run_dir: str | Path, *, device: str | None = "cpu", ann_above: int = DEFAULT_ANN_ABOVE,
                 store_path: str | Path | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.device = device
        self.ann_above = int(ann_above)
        if self.ann_above < 0:
            raise InputError("must be at least 0", source="--ann-above")
        self.store = Store(store_path if store_path is not None else self.run_dir / STORE_NAME)
        self._write_lock = threading.Lock()  # one addition of items at a time (model updates)
        self._swap_lock = threading.Lock()  # read-modify-write of the snapshot (feedback, the end of an addition)
        self._pending_lock = threading.Lock()
        self._pending: list[_PendingAdd] = []
        self.started = time.time()
        self._load()

    # ------------------------------------------------------------------------------------------ loading
    def _load(self) -> None:
        """Load the run, replay the store, build the first snapshot."""
        lr = api.load_run(self.run_dir, self.device)
        self.lr = lr
        self.model_name = lr.model.name
        self.modalities = list(lr.dataset.modalities)
        self.dims = {m: int(x.shape[1]) for m, x in lr.dataset.features.items()}
        self.base = lr.dataset
        self.trained = _trained_part(lr)
        user_ids, item_ids = dataset_ids(lr)
        layout = json.dumps([[m, d] for m, d in self.dims.items()])
        recorded = self.store.get_meta("modalities")
        if recorded is not None and recorded != layout:
            raise DataError(f"the store was written for modalities {recorded}, the run has {layout}",
                            source=str(self.store.path))
        with self.store.transaction() as db:
            self.store.set_meta(db, "modalities", layout)
        self.users = IdMap(user_ids, "user")
        self.items = IdMap(item_ids, "item")
        self.generates = self._completed_features() is not None
        self.base_completed = self._base_completed()
        pairs = np.concatenate([self.base.train, self.base.valid, self.base.test])
        shape = (self.base.n_users, self.base.n_items)
        train = self.base.train_matrix().tocsr()
        seen = sp.csr_matrix((np.ones(len(pairs), dtype=np.float32), (pairs[:, 0], pairs[:, 1])), shape=shape)
        seen.sum_duplicates()
        popularity = np.bincount(self.base.train[:, 1], minlength=self.base.n_items).astype(np.float64)

        added = self.store.added_items(self.dims)
        if len(added):
            if not np.array_equal(added.indices, np.arange(self.base.n_items, self.base.n_items + len(added))):
                raise DataError("the store's added items do not follow the run's items (was the run retrained? "
                                "move the store away to start afresh)", source=str(self.store.path))
            self._apply_added(added.ids, added.features)
            self.items.append(added.ids)
        completed = {m: np.concatenate([self.base_completed[m], added.completed[m]]) for m in self.modalities}
        new_idx, new_ids = self.store.new_users()
        if not np.array_equal(new_idx, np.arange(self.base.n_users, self.base.n_users + len(new_ids))):
            raise DataError("the store's users do not follow the run's users", source=str(self.store.path))
        self.users.append(new_ids)
        feedback: dict[int, tuple[int, ...]] = {}
        popularity = np.concatenate([popularity, np.zeros(len(added))])
        n_items = self.base.n_items + len(added)
        for u_raw, i_raw, _ in self.store.feedback():
            u, i = self.users.index(u_raw, len(self.users)), self.items.index(i_raw, n_items)
            if u is None or i is None:
                raise DataError(f"feedback ({u_raw!r}, {i_raw!r}) names an unknown user or item",
                                source=str(self.store.path))
            feedback[u] = (*feedback.get(u, ()), i)
            popularity[i] += 1
        observed = added.observed(self.modalities)
        generated = {int(self.base.n_items + k): self._generated_names(observed[k]) for k in range(len(added))}
        self._completed = completed
        self.snapshot = self._build(version=0, train=train, seen=seen, feedback=feedback, popularity=popularity,
                                    completed=completed, added_generated=generated)

    def _completed_features(self) -> dict[str, torch.Tensor] | None:
        with torch.no_grad():
            return self.lr.model.completed_features()

    def _base_completed(self) -> dict[str, np.ndarray]:
        """Every modality of the run's items in the dataset's stored space: observed rows as stored, missing rows
        generated by the model (DGMRec, as :func:`dgmrec.api.generate` writes them) or imputed (other models).

        Items the run carries from :func:`dgmrec.api.add_items` are completed like the service's own additions.
        """
        ds, cfg = self.trained, self.lr.config
        options = FeatureOptions.from_config(cfg)
        scaler = fit_scaler(ds, options.scaling)
        model_space = self._completed_features()
        if model_space is not None:
            rows = {m: model_space[m].detach().cpu().numpy()[: ds.n_items] for m in ds.modalities}
        else:
            rows = prepare_features(ds, options)
        out = {}
        for j, m in enumerate(ds.modalities):
            x = np.array(ds.features[m], dtype=np.float32, copy=True)
            miss = ~ds.observed[:, j]
            if miss.any():
                x[miss] = scaler.inverse(m, rows[m][miss])
            out[m] = x
        if self.base.n_items > ds.n_items:
            extra = {m: np.where(self.base.observed[ds.n_items:, j, None], self.base.features[m][ds.n_items:],
                                 np.nan).astype(np.float32) for j, m in enumerate(self.modalities)}
            done = self._added_completed(extra)
            out = {m: np.concatenate([out[m], done[m]]) for m in self.modalities}
        return out

    def _generated_names(self, observed_row: np.ndarray) -> tuple[str, ...]:
        return tuple(m for m, o in zip(self.modalities, observed_row, strict=True) if not o)

    # ----------------------------------------------------------------------------------------- snapshots
    def _scorer(self) -> tuple[Callable[[torch.Tensor], torch.Tensor], np.ndarray | None]:
        """The model's scoring on private copies (readers never touch the model), and its item representations.

        Called by writers only (under the lock, or before the service starts).
        """
        model: Recommender = self.lr.model
        with torch.no_grad():
            model.prepare_eval()
            cached = model.eval_representations()
            if type(model).score_users is Recommender.score_users and cached is not None:
                users, items = (t.detach().clone() for t in cached)
                return _DotScorer(users, items), items.cpu().numpy()
            frozen = copy.deepcopy(model)  # a model with its own scoring: score with a private copy
            frozen.prepare_eval()
            try:
                items_np = frozen.final_embeddings()[1].detach().cpu().numpy()
            except NotImplementedError:
                items_np = None
            return frozen.score_users, items_np

    def _build(self, *, version: int, train: sp.csr_matrix, seen: sp.csr_matrix,
               feedback: dict[int, tuple[int, ...]], popularity: np.ndarray, completed: Mapping[str, np.ndarray],
               added_generated: dict[int, tuple[str, ...]]) -> Snapshot:
        score, item_rep = self._scorer()
        n_items = len(popularity)
        spaces = {m: _unit_rows(completed[m]) for m in self.modalities}
        if item_rep is not None:
            if len(item_rep) != n_items:
                raise DataError(f"the model scores {len(item_rep)} items, the service knows {n_items}")
            spaces[FINAL] = _unit_rows(item_rep)
        return Snapshot(version=version, users=self.users, items=self.items, n_users=self.base.n_users,
                        n_all_users=len(self.users),
                        n_base_items=self.base.n_items, n_items=n_items, score=score, item_rep=item_rep,
                        spaces=spaces, train=train, seen=seen, feedback=feedback, popularity=popularity,
                        added_generated=added_generated)

    # ------------------------------------------------------------------------------------------- lookups
    def user_index(self, snap: Snapshot, raw: str, source: str = "user") -> int:
        u = snap.users.index(raw, snap.n_all_users)
        if u is None:
            raise NotFoundError(f"unknown user {raw!r}", source=source)
        return u

    def item_index(self, snap: Snapshot, raw: str, source: str = "item") -> int:
        i = snap.items.index(raw, snap.n_items)
        if i is None:
            raise NotFoundError(f"unknown item {raw!r}", source=source)
        return i

    # ------------------------------------------------------------------------------------------- reading
    def recommend(self, user: str, k: int, exclude: str = "seen") -> Ranked:
        """Top-``k`` items for ``user`` (raw id), with the items of ``exclude`` left out.

        Trained users are scored by the model (the answer of :func:`dgmrec.api.recommend`, feedback items also
        excluded under ``seen``); users first seen in feedback by the mean final representation of their items
        (``content``), or by popularity when that is empty.
        """
        snap = self.snapshot
        if exclude not in EXCLUDES:
            raise InputError(f"must be one of {', '.join(EXCLUDES)}, got {exclude!r}", source="exclude")
        if k < 1:
            raise InputError("must be at least 1", source="k")
        u = self.user_index(snap, user)
        cols: list[np.ndarray] = []
        if u < snap.n_users and exclude != "none":
            m = snap.train if exclude == "train" else snap.seen
            cols.append(m.indices[m.indptr[u]:m.indptr[u + 1]])
        if exclude == "seen":
            cols.append(np.asarray(snap.feedback.get(u, ()), dtype=np.int64))
        excluded = np.unique(np.concatenate(cols)) if cols else np.zeros(0, dtype=np.int64)
        row = sp.csr_matrix((np.ones(len(excluded), dtype=np.float32), (np.zeros(len(excluded), np.int64), excluded)),
                            shape=(1, snap.n_items))
        if u < snap.n_users:
            user_t = torch.tensor([u], dtype=torch.long)

            def fn(_: torch.Tensor) -> torch.Tensor:
                return snap.score(user_t)
            source = "model"
        else:
            fn, source = self._cold_user_scorer(snap, snap.feedback.get(u, ()))
        top, scores = rank_items(fn, np.zeros(1, dtype=np.int64), row, min(k, snap.n_items))
        keep = scores[0] > MASK_SCORE / 2
        return Ranked(items=snap.items.raws(top[0][keep]), scores=[float(s) for s in scores[0][keep]], source=source)

    def _cold_user_scorer(self, snap: Snapshot,
                          items: Sequence[int]) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
        if snap.item_rep is not None and len(items):
            profile = snap.item_rep[np.asarray(items, dtype=np.int64)].mean(axis=0)
            if np.linalg.norm(profile) > 0:
                scores = torch.from_numpy(snap.item_rep @ profile)[None, :]
                return (lambda _: scores), "content"
        pop = torch.from_numpy(snap.popularity.astype(np.float32))[None, :]
        return (lambda _: pop), "popularity"

    def similar(self, item: str, k: int, modality: str | None = None) -> Ranked:
        """The ``k`` items nearest ``item`` (cosine) in ``modality``'s completed features, or in the final
        representation when ``modality`` is None; exact up to ``ann_above`` items, faiss HNSW above."""
        snap = self.snapshot
        space = FINAL if modality is None else modality
        if space not in snap.spaces:
            if modality is None:
                raise InputError(f"{self.model_name} has no final item representation; pass a modality",
                                 source="modality")
            raise InputError(f"unknown modality {modality!r}; the run has: {', '.join(self.modalities)}",
                             source="modality")
        if k < 1:
            raise InputError("must be at least 1", source="k")
        i = self.item_index(snap, item)
        x = snap.spaces[space]
        kk = min(k, snap.n_items - 1)
        if kk <= 0:
            return Ranked(items=[], scores=[], source=space)
        if snap.n_items > self.ann_above:
            idx, sims = self._ann_search(snap, space, x[i], kk + 1)
        else:
            s = x @ x[i]
            idx = np.argpartition(-s, min(kk, len(s) - 1))[: kk + 1]
            sims = s[idx]
        keep = idx != i
        idx, sims = idx[keep], sims[keep]
        order = np.lexsort((idx, -sims))[:kk]
        return Ranked(items=snap.items.raws(idx[order]), scores=[float(v) for v in sims[order]], source=space)

    def _ann_search(self, snap: Snapshot, space: str, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        cache = snap.indexes
        index = cache.indexes.get(space)
        if index is None:
            with cache.lock:
                index = cache.indexes.get(space)
                if index is None:
                    x = snap.spaces[space]
                    index = faiss.IndexHNSWFlat(x.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
                    index.hnsw.efConstruction = 80
                    index.add(x)
                    index.hnsw.efSearch = max(64, 2 * k)
                    cache.indexes[space] = index
        sims, idx = index.search(query[None, :].astype(np.float32), k)
        ok = idx[0] >= 0
        return idx[0][ok].astype(np.int64), sims[0][ok]

    def _carry_indexes(self, old: Snapshot, new: Snapshot) -> None:
        """Give ``new`` (more items) copies of ``old``'s faiss indexes with the new rows added, where the old rows
        did not change, so that adding items does not rebuild an index."""
        if new.n_items <= self.ann_above or not old.indexes.indexes:
            return
        import faiss

        with old.indexes.lock:
            built = dict(old.indexes.indexes)
        for space, index in built.items():
            x_old, x_new = old.spaces.get(space), new.spaces.get(space)
            if x_old is None or x_new is None or not np.array_equal(x_old, x_new[: old.n_items]):
                continue
            clone = faiss.clone_index(index)
            clone.add(x_new[old.n_items:])
            new.indexes.indexes[space] = clone

    def health(self) -> dict[str, Any]:
        snap = self.snapshot
        return {"status": "ok", "model": self.model_name, "modalities": list(self.modalities),
                "users": snap.n_users, "new_users": snap.n_all_users - snap.n_users,
                "items": snap.n_base_items, "added_items": snap.n_items - snap.n_base_items,
                "feedback": int(sum(len(v) for v in snap.feedback.values())), "version": snap.version,
                "uptime_s": round(time.time() - self.started, 3)}

    # ------------------------------------------------------------------------------------------- writing
    def _apply_added(self, ids: Sequence[str], features: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Hand new items to the model through :func:`dgmrec.api.add_items`; returns their completed rows
        (stored space)."""
        with tempfile.TemporaryDirectory(prefix="dgmrec-serve-") as scratch:
            api.add_items(self.lr, dict(features), item_ids=list(ids), out=Path(scratch) / "added")
        return self._added_completed(features)

    def _added_completed(self, features: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The completed rows of the items just added: the client's vectors, generated rows (models that
        generate), or the mean observed row of the run's items (the others)."""
        n = len(next(iter(features.values())))
        out = {}
        generated = None
        if self.generates:
            gen_fn = getattr(self.lr.model, "added_generated_features", None)
            full = gen_fn() if gen_fn is not None else None
            if full is not None:
                scaler = fit_scaler(self.trained, FeatureOptions.from_config(self.lr.config).scaling)
                generated = {m: scaler.inverse(m, full[m].detach().cpu().numpy()[-n:]) for m in self.modalities}
        for j, m in enumerate(self.modalities):
            x = np.array(features[m], dtype=np.float32, copy=True)
            miss = np.isnan(x).all(axis=1)
            if miss.any():
                if generated is not None:
                    x[miss] = generated[m][miss]
                else:
                    obs = self.trained.observed[:, j]
                    x[miss] = self.trained.features[m][obs].mean(axis=0) if obs.any() else 0.0
            out[m] = x
        return out

    def check_new_items(self, items: Sequence[NewItemSpec], start: int,
                        taken: set[str] | None = None) -> tuple[list[str], dict[str, np.ndarray]]:
        """Validate new items (id, modality -> vector or None) and return their ids and NaN-padded matrices.

        ``start``: the index the first one would get; ``taken``: ids accepted but not yet added.
        """
        taken = taken or set()
        if not items:
            raise InputError("no items given", source="items")
        ids: list[str] = []
        feats = {m: np.full((len(items), d), np.nan, dtype=np.float32) for m, d in self.dims.items()}
        for k, (raw_id, features) in enumerate(items):
            where = f"items[{k}]"
            if raw_id is None:
                raw_id = str(start + k)
                if raw_id in self.items or raw_id in ids or raw_id in taken:
                    raise ConflictError(f"the default id {raw_id!r} is taken; give the item an id", source=where)
            else:
                if not raw_id.strip() or len(raw_id) > MAX_ID_LENGTH:
                    raise InputError(f"an id is 1 to {MAX_ID_LENGTH} characters, not blank", source=f"{where}.id")
                if raw_id in self.items or raw_id in ids or raw_id in taken:
                    raise ConflictError(f"item id {raw_id!r} already exists", source=f"{where}.id")
            ids.append(raw_id)
            given = 0
            for m, vec in features.items():
                if m not in self.dims:
                    raise InputError(f"unknown modality {m!r}; the run has: {', '.join(self.modalities)}",
                                     source=f"{where}.features")
                if vec is None:
                    continue
                v = np.asarray(vec, dtype=np.float64)
                if v.ndim != 1 or len(v) != self.dims[m]:
                    raise InputError(f"expected {self.dims[m]} values, got {v.size}",
                                     source=f"{where}.features.{m}")
                if not np.isfinite(v).all():
                    raise InputError("values must be finite numbers (no NaN or infinity)",
                                     source=f"{where}.features.{m}")
                if np.abs(v).max(initial=0.0) > np.finfo(np.float32).max:
                    raise InputError("a value does not fit a float32", source=f"{where}.features.{m}")
                feats[m][k] = v.astype(np.float32)
                given += 1
            if not given:
                raise InputError("give at least one modality's features or content", source=f"{where}.features")
        return ids, feats

    def with_content(self, items: Sequence[NewItemSpec],
                     contents: Sequence[NewItemContent | None]) -> list[NewItemSpec]:
        """``items`` with the vectors of their raw content added (:func:`dgmrec.api.content_features`: encoded as
        the run's dataset folder was built); errors name ``items[k].content.<modality>``."""
        if len(contents) != len(items):
            raise InputError(f"{len(contents)} contents for {len(items)} items", source="items")
        given = [{m: c for m, c in (content or {}).items() if c is not None} for content in contents]
        for k, ((_, features), content) in enumerate(zip(items, given, strict=True)):
            both = next((m for m in content if features.get(m) is not None), None)
            if both is not None:
                raise InputError(f"give the features or the content of '{both}', not both",
                                 source=f"items[{k}].content.{both}")
        if not any(given):
            return list(items)
        encoded = api.content_features(self.lr, given, field="items[{k}].content.{m}")
        out: list[NewItemSpec] = []
        for k, (raw_id, features) in enumerate(items):
            rows = {m: x[k] for m, x in encoded.items() if m in given[k]}
            out.append((raw_id, {**features, **rows}))
        return out

    def add_items(self, items: Sequence[NewItemSpec],
                  contents: Sequence[NewItemContent | None] | None = None) -> list[AddedItem]:
        """Add items (raw id or None for the next index, modality -> vector or None): the model generates what
        they lack, the store records them, and the next request can recommend them.

        ``contents``: per item, raw content (modality -> a text, or a file's bytes or base64 text) encoded into
        vectors first, as the run's dataset folder was built (:meth:`with_content`); the store keeps the vectors.

        Requests that arrive while another addition runs are added together in the next batch (one model update
        for all of them); each request still succeeds or fails on its own.
        """
        if contents is not None:
            items = self.with_content(items, contents)  # encoding does not hold the write lock
        request = _PendingAdd(list(items))
        with self._pending_lock:
            self._pending.append(request)
        with self._write_lock:
            if not request.done.is_set():
                with self._pending_lock:
                    batch, self._pending = self._pending, []
                self._add_batch(batch)
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def _add_batch(self, batch: list[_PendingAdd]) -> None:
        """Add the items of several requests in one model update (under the write lock); every request gets its
        result or its error and is marked done, whatever happens."""
        try:
            snap = self.snapshot
            start = snap.n_items
            accepted: list[tuple[_PendingAdd, list[str], dict[str, np.ndarray]]] = []
            taken: set[str] = set()
            for request in batch:
                try:
                    ids, feats = self.check_new_items(request.items, start + len(taken), taken)
                except InputError as exc:
                    request.error = exc
                    continue
                taken.update(ids)
                accepted.append((request, ids, feats))
            if not accepted:
                return
            ids = [i for _, req_ids, _ in accepted for i in req_ids]
            feats = {m: np.concatenate([f[m] for _, _, f in accepted]) for m in self.modalities}
            try:
                completed = self._apply_added(ids, feats)
                all_completed = {m: np.concatenate([self._completed[m], completed[m]]) for m in self.modalities}
                built = self._build(version=snap.version + 1, train=snap.train, seen=snap.seen, feedback={},
                                    popularity=np.zeros(start + len(ids)), completed=all_completed,
                                    added_generated={})
                with self.store.transaction() as db:
                    self.store.insert_items(db, start, ids, feats, completed)
            except BaseException as exc:
                if not isinstance(exc, InputError) or self.lr.dataset.n_items != start:
                    self._recover()  # the model may hold part of the batch: reload it as the store has it
                for request, _, _ in accepted:
                    request.error = exc
                if not isinstance(exc, Exception):
                    raise
                return
            observed = np.stack([~np.isnan(feats[m]).all(axis=1) for m in self.modalities], axis=1)
            generated = {start + k: self._generated_names(observed[k]) for k in range(len(ids))}
            self._carry_indexes(snap, built)
            self._completed = all_completed
            with self._swap_lock:  # feedback may have arrived meanwhile: keep it
                current = self.snapshot
                self.items.append(ids)
                self.snapshot = replace(
                    built, version=current.version + 1, n_all_users=current.n_all_users, feedback=current.feedback,
                    popularity=np.concatenate([current.popularity, np.zeros(len(ids))]),
                    added_generated={**current.added_generated, **generated})
            kind = "generated" if self.generates else "imputed"
            k = 0
            for request, req_ids, _ in accepted:
                out = []
                for raw in req_ids:
                    obs = [m for m, o in zip(self.modalities, observed[k], strict=True) if o]
                    missing = [m for m in self.modalities if m not in obs]
                    out.append(AddedItem(id=raw, observed=obs, generated=missing if kind == "generated" else [],
                                         imputed=missing if kind == "imputed" else []))
                    k += 1
                request.result = out
        finally:
            for request in batch:
                if request.result is None and request.error is None:
                    request.error = InputError("the addition was interrupted", source="items")
                request.done.set()

    def add_feedback(self, interactions: Sequence[tuple[str, str, float | None]]) -> tuple[int, list[str]]:
        """Record interactions ``(user, item, timestamp or None)`` (raw ids; unknown users become new users);
        returns the number stored and the new users' ids."""
        if not interactions:
            raise InputError("no interactions given", source="interactions")
        with self._swap_lock:
            snap = self.snapshot
            new_users: list[str] = []
            rows: list[tuple[str, str, float]] = []
            pairs: list[tuple[int, int]] = []
            now = time.time()
            for k, (user, item, ts) in enumerate(interactions):
                where = f"interactions[{k}]"
                if not user.strip() or len(user) > MAX_ID_LENGTH:
                    raise InputError(f"an id is 1 to {MAX_ID_LENGTH} characters, not blank", source=f"{where}.user")
                i = self.item_index(snap, item, source=f"{where}.item")
                if ts is not None and not math.isfinite(ts):
                    raise InputError("must be a finite number", source=f"{where}.timestamp")
                u = self.users.index(user, snap.n_all_users)
                if u is None:
                    if user not in new_users:
                        new_users.append(user)
                    u = snap.n_all_users + new_users.index(user)
                rows.append((user, item, now if ts is None else float(ts)))
                pairs.append((u, i))
            with self.store.transaction() as db:
                self.store.insert_users(db, snap.n_all_users, new_users)
                self.store.insert_feedback(db, rows)
            self.users.append(new_users)
            feedback = dict(snap.feedback)
            popularity = snap.popularity.copy()
            for u, i in pairs:
                feedback[u] = (*feedback.get(u, ()), i)
                popularity[i] += 1
            self.snapshot = replace(snap, version=snap.version + 1, n_all_users=snap.n_all_users + len(new_users),
                                    feedback=feedback, popularity=popularity, indexes=snap.indexes)
        return len(rows), new_users

    def _recover(self) -> None:
        """Reload the run and the store after a write failed half-way (the model may hold part of it); reads go
        on from the current snapshot meanwhile."""
        with self._swap_lock:
            self.store.close()
            self.store = Store(self.store.path)
            self._load()

    def close(self) -> None:
        self.store.close()
