"""Raw interaction tables (arbitrary string ids, timestamps) -> contiguous ids and an 8:1:1 split.

Split rule (per user, chronological, as the MMRec preprocessing assigns ``x_label``): a user's interactions are
sorted by timestamp (ties keep file order); with ``n`` interactions the last ``round(0.1 n)`` go to test, the
``round(0.1 n)`` before them to validation and the rest to training. Users with fewer than 3 interactions keep
everything in training. Ids are remapped to ``0..n-1`` in sorted order of the original ids (as strings).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dgmrec.errors import DataError


@dataclass
class RawInteractions:
    """Remapped interactions with their split labels and the original ids."""

    users: np.ndarray
    items: np.ndarray
    labels: np.ndarray
    user_ids: np.ndarray  # original id of each remapped user
    item_ids: np.ndarray  # original id of each remapped item

    def pairs(self, label: int) -> np.ndarray:
        sel = self.labels == label
        return np.stack([self.users[sel], self.items[sel]], axis=1).astype(np.int64)


def read_table(path: str | Path) -> pd.DataFrame:
    """Read CSV, TSV or Parquet (by extension) with every column as a string."""
    path = Path(path)
    src = str(path)
    if not path.is_file():
        raise DataError("file not found", source=src)
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            df = pd.read_parquet(path)
            df = df.astype(object).where(df.notna(), "").astype(str)  # nulls become empty strings
        else:
            sep = "\t" if path.suffix.lower() in (".tsv", ".inter", ".tab") else ","
            df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"not valid UTF-8 text ({exc.reason} at byte {exc.start})", source=src) from None
    except ImportError as exc:
        raise DataError(f"reading Parquet needs pyarrow: pip install pyarrow ({exc})", source=src) from None
    except Exception as exc:
        raise DataError(f"cannot parse table ({type(exc).__name__}: {exc})", source=src) from None
    return df


def chronological_labels(users: np.ndarray, timestamps: np.ndarray,
                         ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> np.ndarray:
    """Per-user chronological split labels (0 train, 1 valid, 2 test); see the module docstring."""
    n = len(users)
    order = np.lexsort((np.arange(n), timestamps, users))  # by user, then time, then file order
    labels = np.zeros(n, dtype=np.int64)
    sorted_users = users[order]
    starts = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]])
    ends = np.r_[starts[1:], n]
    for s, e in zip(starts, ends, strict=True):
        cnt = e - s
        if cnt < 3:
            continue
        n_test = max(1, round(ratios[2] * cnt))
        n_valid = max(1, round(ratios[1] * cnt))
        labels[order[e - n_test:e]] = 2
        labels[order[e - n_test - n_valid:e - n_test]] = 1
    return labels


def read_raw_interactions(
    path: str | Path,
    user_column: str = "user",
    item_column: str = "item",
    time_column: str | None = "timestamp",
    *,
    item_order: list[str] | None = None,
) -> RawInteractions:
    """Read raw interactions, remap ids and split chronologically per user 8:1:1.

    ``item_order`` fixes the item id order (e.g. the rows of an items table); every interaction item must then
    be listed there.
    """
    df = read_table(path)
    src = str(path)
    needed = [c for c in (user_column, item_column, time_column) if c]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise DataError(f"missing column(s) {', '.join(missing)} (found: {', '.join(df.columns)})", source=src)
    if df.empty:
        raise DataError("no interactions", source=src)
    users_raw = df[user_column].astype(str).str.strip().to_numpy()
    items_raw = df[item_column].astype(str).str.strip().to_numpy()
    for col, arr in ((user_column, users_raw), (item_column, items_raw)):
        empty = np.flatnonzero(pd.Series(arr).str.strip().eq("").to_numpy())
        if len(empty):
            raise DataError(f"column {col}, row {empty[0] + 1}: empty id", source=src)
    if time_column:
        ts = pd.to_numeric(df[time_column], errors="coerce")
        if ts.isna().any():
            parsed = pd.to_datetime(df[time_column], errors="coerce", utc=True)
            if parsed.isna().any():
                row = int(np.flatnonzero(parsed.isna().to_numpy())[0])
                raise DataError(f"column {time_column}, row {row + 1}: {df[time_column].iloc[row]!r} is not a "
                                "number or a date", source=src)
            ts = parsed.astype("int64")
        timestamps = ts.to_numpy(dtype=np.float64)
    else:
        timestamps = np.arange(len(df), dtype=np.float64)
    user_ids, users = np.unique(users_raw, return_inverse=True)
    if item_order is None:
        item_ids, items = np.unique(items_raw, return_inverse=True)
    else:
        item_ids = np.asarray(item_order, dtype=str)
        index = {v: i for i, v in enumerate(item_ids)}
        unknown = [v for v in dict.fromkeys(items_raw) if v not in index]
        if unknown:
            raise DataError(f"{len(unknown)} item id(s) are not in the items table, e.g. {unknown[0]!r}",
                            source=src)
        items = np.fromiter((index[v] for v in items_raw), dtype=np.int64, count=len(items_raw))
    # duplicates of (user, item): keep the first occurrence in time
    frame = pd.DataFrame({"u": users, "i": items, "t": timestamps, "r": np.arange(len(users))})
    frame = frame.sort_values(["u", "i", "t", "r"]).drop_duplicates(["u", "i"], keep="first").sort_values("r")
    u = frame["u"].to_numpy(np.int64)
    i = frame["i"].to_numpy(np.int64)
    labels = chronological_labels(u, frame["t"].to_numpy())
    return RawInteractions(users=u, items=i, labels=labels, user_ids=user_ids, item_ids=item_ids)
