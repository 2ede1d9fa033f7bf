"""What a served run keeps across restarts: ``RUN_DIR/serving.sqlite`` (SQLite in WAL mode).

Tables
------
``items``
    Items added over HTTP: internal index (``n_items`` of the trained run onwards), raw id, the batch that added
    them and when.
``item_features``
    One row per added item and modality: whether the client sent it (``observed``) and the vector, float32 bytes
    in the dataset's stored feature space (the client's features, or the model's generated / imputed ones for a
    modality it did not send; NULL when none was produced).
``users``
    Users first seen in feedback (not in the trained run): internal index (``n_users`` onwards) and raw id.
``feedback``
    User-item interactions received, raw ids, in arrival order, with a timestamp (the client's or the arrival
    time): the interactions of the next retraining.

The trained checkpoint is never written; everything the service learns goes here.
"""

from __future__ import annotations

import csv
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dgmrec.errors import DataError

STORE_NAME = "serving.sqlite"
SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (idx INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, batch INTEGER NOT NULL,
                                  added REAL NOT NULL);
CREATE TABLE IF NOT EXISTS item_features (idx INTEGER NOT NULL REFERENCES items(idx), modality TEXT NOT NULL,
                                          observed INTEGER NOT NULL, vector BLOB,
                                          PRIMARY KEY (idx, modality));
CREATE TABLE IF NOT EXISTS users (idx INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, added REAL NOT NULL);
CREATE TABLE IF NOT EXISTS feedback (seq INTEGER PRIMARY KEY AUTOINCREMENT, user TEXT NOT NULL,
                                     item TEXT NOT NULL, timestamp REAL NOT NULL);
"""


@dataclass
class AddedItems:
    """The added items of a store, in index order.

    Attributes
    ----------
    indices:
        Internal indices (contiguous from the trained run's ``n_items``).
    ids:
        Raw ids.
    batches:
        The add request each item came with (items of one request share a number).
    features:
        Modality -> ``(n, d_m)`` float32, the client's vectors, NaN rows where the client sent none.
    completed:
        Modality -> ``(n, d_m)`` float32, the client's vectors or the model's generated / imputed ones (NaN rows
        where none was produced).
    """

    indices: np.ndarray
    ids: list[str]
    batches: np.ndarray
    features: dict[str, np.ndarray]
    completed: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.ids)

    def observed(self, modalities: Sequence[str]) -> np.ndarray:
        """``(n, M)`` bool: which modalities the client sent for each item."""
        if not modalities:
            return np.zeros((len(self), 0), dtype=bool)
        return np.stack([~np.isnan(self.features[m]).all(axis=1) for m in modalities], axis=1)


class Store:
    """The SQLite file of a served run. One connection shared by the threads of the service, behind a lock.

    Parameters
    ----------
    path:
        The database file (created with its tables when absent).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise DataError(f"cannot open the serving store ({exc})", source=str(self.path)) from None
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
        elif row[0] != SCHEMA_VERSION:
            raise DataError(f"serving store version {row[0]}, this dgmrec reads version {SCHEMA_VERSION}",
                            source=str(self.path))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: committed when the block ends, rolled back when it raises."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # ------------------------------------------------------------------------------------------- meta
    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, db: sqlite3.Connection, key: str, value: str) -> None:
        db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # ------------------------------------------------------------------------------------------ items
    def insert_items(self, db: sqlite3.Connection, start: int, ids: Sequence[str],
                     features: Mapping[str, np.ndarray], completed: Mapping[str, np.ndarray]) -> None:
        """Record items ``start, start + 1, ...`` (inside :meth:`transaction`).

        ``features``: the client's vectors, NaN rows where none was sent; ``completed``: every modality's vector
        after generation or imputation (NaN rows where none was produced).
        """
        batch_row = db.execute("SELECT COALESCE(MAX(batch), -1) + 1 FROM items").fetchone()
        batch, now = int(batch_row[0]), time.time()
        db.executemany("INSERT INTO items VALUES (?, ?, ?, ?)",
                       [(start + k, str(i), batch, now) for k, i in enumerate(ids)])
        rows = []
        for m, x in features.items():
            done = completed.get(m)
            for k in range(len(ids)):
                observed = not np.isnan(x[k]).all()
                vec = x[k] if observed else (None if done is None or np.isnan(done[k]).all() else done[k])
                rows.append((start + k, m, int(observed),
                             None if vec is None else np.ascontiguousarray(vec, dtype=np.float32).tobytes()))
        db.executemany("INSERT INTO item_features VALUES (?, ?, ?, ?)", rows)

    def added_items(self, dims: Mapping[str, int]) -> AddedItems:
        """Every added item, in index order; ``dims``: modality -> feature width."""
        with self._lock:
            items = self._db.execute("SELECT idx, id, batch FROM items ORDER BY idx").fetchall()
            feats = self._db.execute("SELECT idx, modality, observed, vector FROM item_features").fetchall()
        n = len(items)
        indices = np.asarray([r[0] for r in items], dtype=np.int64)
        position = {int(idx): k for k, idx in enumerate(indices)}
        features = {m: np.full((n, d), np.nan, dtype=np.float32) for m, d in dims.items()}
        completed = {m: np.full((n, d), np.nan, dtype=np.float32) for m, d in dims.items()}
        for idx, m, observed, blob in feats:
            if m not in dims:
                raise DataError(f"the store has features of modality {m!r}, which the run does not have",
                                source=str(self.path))
            if blob is None:
                continue
            vec = np.frombuffer(blob, dtype=np.float32)
            if len(vec) != dims[m]:
                raise DataError(f"a stored '{m}' vector has {len(vec)} values, the run's have {dims[m]}",
                                source=str(self.path))
            completed[m][position[int(idx)]] = vec
            if observed:
                features[m][position[int(idx)]] = vec
        return AddedItems(indices=indices, ids=[str(r[1]) for r in items],
                          batches=np.asarray([r[2] for r in items], dtype=np.int64), features=features,
                          completed=completed)

    # ------------------------------------------------------------------------------ users and feedback
    def insert_users(self, db: sqlite3.Connection, start: int, ids: Sequence[str]) -> None:
        now = time.time()
        db.executemany("INSERT INTO users VALUES (?, ?, ?)", [(start + k, str(u), now) for k, u in enumerate(ids)])

    def new_users(self) -> tuple[np.ndarray, list[str]]:
        """Indices and raw ids of the users first seen in feedback, in index order."""
        with self._lock:
            rows = self._db.execute("SELECT idx, id FROM users ORDER BY idx").fetchall()
        return np.asarray([r[0] for r in rows], dtype=np.int64), [str(r[1]) for r in rows]

    def insert_feedback(self, db: sqlite3.Connection, rows: Sequence[tuple[str, str, float]]) -> None:
        db.executemany("INSERT INTO feedback (user, item, timestamp) VALUES (?, ?, ?)", rows)

    def feedback(self) -> list[tuple[str, str, float]]:
        """Every interaction received, ``(user, item, timestamp)`` with raw ids, in arrival order."""
        with self._lock:
            rows = self._db.execute("SELECT user, item, timestamp FROM feedback ORDER BY seq").fetchall()
        return [(str(u), str(i), float(t)) for u, i, t in rows]

    def count(self, table: str) -> int:
        if table not in ("items", "users", "feedback"):
            raise ValueError(table)
        with self._lock:
            return int(self._db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


def export_feedback(store: Store, out: str | Path) -> int:
    """Write the store's feedback as ``user,item,timestamp`` CSV (the columns ``dgmrec data import`` reads by
    default), atomically; returns the number of interactions."""
    rows = store.feedback()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["user", "item", "timestamp"])
        writer.writerows((u, i, repr(t)) for u, i, t in rows)
    tmp.replace(out)
    return len(rows)


def export_items(store: Store, out: str | Path) -> int:
    """Write the store's added items into folder ``out``: ``item_ids.csv`` (``itemID,original_id``),
    ``<modality>_feat.npy`` (completed rows: the client's vectors, generated or imputed ones for the rest) and
    ``observed.npz`` (which modalities the client sent), the files of a dataset folder; returns the number of
    items."""
    from dgmrec.data.masks import save_plain_mask
    from dgmrec.data.raw import ITEM_IDS_NAME, write_id_table

    layout = store.get_meta("modalities")
    if layout is None:
        raise DataError("the store does not record the run's modalities (it was never served)", source=str(store.path))
    dims = {str(m): int(d) for m, d in json.loads(layout)}
    added = store.added_items(dims)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_id_table(out / ITEM_IDS_NAME, added.ids, "itemID")
    for m in dims:
        tmp = out / f".{m}_feat.tmp.npy"
        np.save(tmp, added.completed[m])
        tmp.replace(out / f"{m}_feat.npy")
    save_plain_mask(out / "observed.npz", added.observed(list(dims)), list(dims))
    return len(added)
