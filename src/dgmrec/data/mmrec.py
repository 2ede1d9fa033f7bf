"""Reading and writing MMRec-format dataset folders.

A folder holds ``<name>.inter`` (tab-separated ``userID itemID x_label`` with 0/1/2 = train/valid/test; extra
columns are ignored), one ``<modality>_feat.npy`` per modality (row = item id, any float dtype), optionally
``<name>_new_items.inter`` (the new-item split), ``observed.npz`` (the plain mask format) and the id maps
``user_ids.csv`` / ``item_ids.csv`` (``userID,original_id`` / ``itemID,original_id``: internal index -> original
id). All-NaN feature rows mark content that is really missing. A folder without feature files loads with no
modality (for the models that use no features).
Feature files larger than :data:`MMAP_MIN_BYTES` are memory-mapped rather than read: their pages are read from
disk on use and can be dropped again, so a catalogue whose raw features do not fit in memory next to the model's
(imputed) copy still loads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from dgmrec.data.dataset import RecDataset
from dgmrec.data.masks import draw_new_items, read_mask_file, save_plain_mask
from dgmrec.errors import DataError

INTER_COLUMNS = ("userID", "itemID", "x_label")
SPLIT_LABELS = ("train", "valid", "test")  # x_label 0, 1, 2
NEW_ITEMS_SUFFIX = "_new_items"
PLAIN_MASK_NAME = "observed.npz"
USER_IDS_NAME = "user_ids.csv"
ITEM_IDS_NAME = "item_ids.csv"


REFERENCE_ORDER = ("image", "text", "audio")
MMAP_MIN_BYTES = 1 << 30  # feature files at least this large are memory-mapped (float32 files without a copy)
_ROW_BLOCK_BYTES = 64 << 20  # rows checked at once for NaN / infinity


def order_modalities(names: Sequence[str]) -> list[str]:
    """The reference order (image, text, audio) first, then any other modality by name."""
    known = [m for m in REFERENCE_ORDER if m in names]
    return known + sorted(m for m in names if m not in REFERENCE_ORDER)


def find_inter_file(folder: Path) -> tuple[str, Path, Path | None]:
    """Return ``(name, main .inter path, new-items .inter path or None)`` of a dataset folder.

    A folder that only has ``<name>_new_items.inter`` uses it as its interaction file.
    """
    if not folder.is_dir():
        raise DataError("dataset folder not found", source=str(folder))
    inters = sorted(folder.glob("*.inter"))
    main = [p for p in inters if not p.stem.endswith(NEW_ITEMS_SUFFIX)]
    news = [p for p in inters if p.stem.endswith(NEW_ITEMS_SUFFIX)]
    if len(main) > 1:
        raise DataError(f"several .inter files ({', '.join(p.name for p in main)}); keep one per folder",
                        source=str(folder))
    if main:
        name = main[0].stem
        new = folder / f"{name}{NEW_ITEMS_SUFFIX}.inter"
        return name, main[0], new if new.is_file() else None
    if len(news) == 1:
        return news[0].stem[: -len(NEW_ITEMS_SUFFIX)], news[0], None
    raise DataError("no <name>.inter file", source=str(folder))


def read_inter(path: Path) -> pd.DataFrame:
    """Read and validate an MMRec ``.inter`` file; returns columns ``userID itemID x_label`` as int64."""
    src = str(path)
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except Exception as exc:
        raise DataError(f"cannot parse as tab-separated text ({type(exc).__name__}: {exc})", source=src) from None
    missing = [c for c in INTER_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"missing column(s) {', '.join(missing)}; expected header {' '.join(INTER_COLUMNS)} "
                        f"(found: {' '.join(map(str, df.columns))})", source=src)
    out = {}
    for col in INTER_COLUMNS:
        values = pd.to_numeric(df[col].str.strip(), errors="coerce")
        bad = values.isna() | (values != values.round())
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(f"column {col}, line {row + 2}: {df[col].iloc[row]!r} is not an integer", source=src)
        arr = values.to_numpy().astype(np.int64)
        if (arr < 0).any():
            row = int(np.flatnonzero(arr < 0)[0])
            raise DataError(f"column {col}, line {row + 2}: negative id {arr[row]}", source=src)
        out[col] = arr
    labels = out["x_label"]
    if ((labels < 0) | (labels > 2)).any():
        row = int(np.flatnonzero((labels < 0) | (labels > 2))[0])
        raise DataError(f"column x_label, line {row + 2}: {labels[row]} is not 0, 1 or 2", source=src)
    if len(labels) == 0:
        raise DataError("no interactions", source=src)
    if not (labels == 0).any():
        raise DataError("no training interactions (x_label 0)", source=src)
    return pd.DataFrame(out)


def load_features(path: Path) -> np.ndarray:
    """Load one ``<modality>_feat.npy`` as float32 (float16/float64 converted); no pickle allowed.

    A file of at least :data:`MMAP_MIN_BYTES` is memory-mapped read-only (a float32 C-order file is returned as
    the map itself; another dtype is converted into memory).
    """
    src = str(path)
    try:
        big = path.stat().st_size >= MMAP_MIN_BYTES
        x = np.load(path, allow_pickle=False, mmap_mode="r" if big else None)
    except ValueError as exc:
        raise DataError(f"not a plain numeric .npy array ({exc})", source=src) from None
    except Exception as exc:
        raise DataError(f"cannot read feature file ({type(exc).__name__}: {exc})", source=src) from None
    if x.dtype.kind not in "fiu":
        raise DataError(f"feature dtype {x.dtype} is not numeric", source=src)
    if x.ndim != 2:
        raise DataError(f"features must be a 2-D (items x dims) matrix, got shape {x.shape}", source=src)
    if isinstance(x, np.memmap) and x.dtype == np.float32 and x.flags.c_contiguous:
        return x
    return np.ascontiguousarray(x, dtype=np.float32)


def missing_rows(x: np.ndarray, source: str) -> np.ndarray:
    """Rows that are entirely NaN (real missing content); reject partial NaN and any infinity.

    Checked in blocks of rows, so the temporary masks stay small for memory-mapped files."""
    step = max(1, _ROW_BLOCK_BYTES // max(1, x.shape[1] * x.itemsize))
    all_nan = np.zeros(x.shape[0], dtype=bool)
    for start in range(0, x.shape[0], step):
        block = np.asarray(x[start:start + step])
        nan_rows = np.isnan(block).all(axis=1)
        bad = ~np.isfinite(block).all(axis=1) & ~nan_rows
        if bad.any():
            row = start + int(np.flatnonzero(bad)[0])
            kind = "inf" if np.isinf(x[row]).any() else "NaN"
            raise DataError(f"row {row} contains {kind} values (only whole-NaN rows may mark missing items)",
                            source=source)
        all_nan[start:start + step] = nan_rows
    return all_nan


def load_mmrec(
    folder: str | Path,
    *,
    modalities: Sequence[str] | None = None,
    mask: str | Path | None = None,
    mask_letters: Mapping[str, str] | None = None,
    setting: str = "missing",
    new_item_seed: int = 1111,
) -> RecDataset:
    """Load an MMRec-format folder into a :class:`RecDataset`.

    ``modalities`` selects a subset of the ``*_feat.npy`` files (all, in name order, when None). ``mask`` is a
    reference pickle or a plain ``.npz`` mask; ``observed.npz`` in the folder is used when no mask is given.
    All-NaN feature rows are always marked missing. ``setting="new-items"`` reads ``<name>_new_items.inter``
    when present, otherwise draws 20 % new items from the cold and warm groups with ``new_item_seed``.
    """
    folder = Path(folder)
    name, inter_path, new_path = find_inter_file(folder)
    df = read_inter(inter_path)
    feat_files = sorted(folder.glob("*_feat.npy"))
    available = order_modalities([p.name[: -len("_feat.npy")] for p in feat_files])
    if modalities:
        unknown = [m for m in modalities if m not in available]
        if unknown:
            has = ", ".join(available) or "no <modality>_feat.npy files"
            raise DataError(f"unknown modality '{unknown[0]}'; the folder has: {has}", source="--modalities")
        if len(set(modalities)) != len(modalities):
            raise DataError("a modality is listed twice", source="--modalities")
        chosen = list(modalities)
    else:
        chosen = available
    features: dict[str, np.ndarray] = {}
    nan_rows: dict[str, np.ndarray] = {}
    n_rows: int | None = None
    for m in chosen:
        path = folder / f"{m}_feat.npy"
        x = load_features(path)
        if n_rows is not None and x.shape[0] != n_rows:
            raise DataError(f"has {x.shape[0]} rows but {chosen[0]}_feat.npy has {n_rows}", source=str(path))
        n_rows = x.shape[0]
        nan_rows[m] = missing_rows(x, str(path))
        features[m] = x
    max_user = int(df["userID"].max())
    max_item = int(df["itemID"].max())
    user_ids = read_id_map(folder / USER_IDS_NAME, "userID")
    item_ids = read_id_map(folder / ITEM_IDS_NAME, "itemID")
    if n_rows is None:  # no features: the items are those of the interactions and of the id map
        n_rows = max(max_item + 1, 0 if item_ids is None else len(item_ids))
    if max_item >= n_rows:
        raise DataError(f"itemID {max_item} is out of range: the feature files have {n_rows} rows "
                        f"(feature row count must equal the number of items)", source=str(inter_path))
    n_items = n_rows
    n_users = max(max_user + 1, 0 if user_ids is None else len(user_ids))
    for path, ids, n, what in ((folder / USER_IDS_NAME, user_ids, n_users, "users of the interactions"),
                               (folder / ITEM_IDS_NAME, item_ids, n_items, "items")):
        if ids is not None and len(ids) != n:
            raise DataError(f"has {len(ids)} rows but the dataset has {n} {what}", source=str(path))

    if mask is not None:
        observed = read_mask_file(mask, n_items, chosen, mask_letters)
    elif (folder / PLAIN_MASK_NAME).is_file():
        observed = read_mask_file(folder / PLAIN_MASK_NAME, n_items, chosen, mask_letters)
    else:
        observed = np.ones((n_items, len(chosen)), dtype=bool)
    for j, m in enumerate(chosen):
        observed[nan_rows[m], j] = False
    for j, m in enumerate(chosen):
        if not observed[:, j].any():
            raise DataError(f"modality '{m}' is missing for every item", source=str(folder))

    def pairs(frame: pd.DataFrame, label: int) -> np.ndarray:
        sel = frame[frame["x_label"] == label]
        return np.stack([sel["userID"].to_numpy(), sel["itemID"].to_numpy()], axis=1).astype(np.int64)

    train, valid, test = pairs(df, 0), pairs(df, 1), pairs(df, 2)
    ds = RecDataset(name=name, n_users=n_users, n_items=n_items, train=train, valid=valid, test=test,
                    features=features, observed=observed, source=str(folder), user_ids=user_ids, item_ids=item_ids)
    if setting == "missing":
        return ds
    if setting != "new-items":
        raise DataError(f"unknown setting {setting!r}; use missing or new-items", source="--setting")
    if new_path is not None:
        df_new = read_inter(new_path)
        if int(df_new["userID"].max()) >= n_users or int(df_new["itemID"].max()) >= n_items:
            raise DataError("ids out of the range of the main .inter file", source=str(new_path))
        new_train = pairs(df_new, 0)
        # every item without training rows in the file; the split keeps those that have some in the main file
        new_items = np.bincount(new_train[:, 1], minlength=n_items) == 0
        return make_new_item_split(ds, new_items, train=new_train, valid=pairs(df_new, 1))
    counts = np.bincount(train[:, 1], minlength=n_items)
    return make_new_item_split(ds, draw_new_items(counts, seed=new_item_seed))


def read_id_map(path: Path, column: str) -> np.ndarray | None:
    """The original ids of an id map (``<column>,original_id``, rows in any order), indexed by ``column``;
    None when the file does not exist. The indices must be ``0..n-1`` once each and the ids unique."""
    if not path.is_file():
        return None
    src = str(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except Exception as exc:
        raise DataError(f"cannot parse as CSV ({type(exc).__name__}: {exc})", source=src) from None
    missing = [c for c in (column, "original_id") if c not in df.columns]
    if missing:
        raise DataError(f"missing column(s) {', '.join(missing)}; expected header {column},original_id "
                        f"(found: {','.join(map(str, df.columns))})", source=src)
    index = pd.to_numeric(df[column].str.strip(), errors="coerce")
    n = len(df)
    if index.isna().any() or sorted(index.astype(int)) != list(range(n)):
        raise DataError(f"column {column} must hold 0..{n - 1} once each", source=src)
    ids = df["original_id"].str.strip().to_numpy(dtype=object)
    duplicated = pd.Series(ids).duplicated()
    if duplicated.any():
        raise DataError(f"original id {ids[int(np.flatnonzero(duplicated.to_numpy())[0])]!r} appears twice",
                        source=src)
    out = np.empty(n, dtype=object)
    out[index.astype(int).to_numpy()] = ids
    return out.astype(str)


def write_id_maps(ds: RecDataset, folder: Path) -> None:
    """Write ``user_ids.csv`` / ``item_ids.csv`` of a dataset that carries original ids."""
    for path, column, ids in ((folder / USER_IDS_NAME, "userID", ds.user_ids),
                              (folder / ITEM_IDS_NAME, "itemID", ds.item_ids)):
        if ids is not None:
            tmp = path.with_name(f".{path.name}.tmp")
            pd.DataFrame({column: np.arange(len(ids)), "original_id": ids}).to_csv(tmp, index=False)
            tmp.replace(path)


def make_new_item_split(ds: RecDataset, new_items: np.ndarray, *, train: np.ndarray | None = None,
                        valid: np.ndarray | None = None) -> RecDataset:
    """Move every training interaction of ``new_items`` to the test set (reference new-item protocol).

    Validation interactions of new items stay in validation, as in the reference. The reported test set is the
    original test plus the removed training rows; ``test_new_only`` keeps the test rows on new items. A drawn
    item without training rows is no new item (nothing distinguishes it from any other item that never had
    any): the new items are the same whether the split is drawn here or read from a ``_new_items`` file.
    """
    new_items = np.asarray(new_items, dtype=bool) & (np.bincount(ds.train[:, 1], minlength=ds.n_items) > 0)
    is_new_row = new_items[ds.train[:, 1]]
    removed = ds.train[is_new_row]
    kept = ds.train[~is_new_row] if train is None else train
    test = np.concatenate([ds.test, removed], axis=0)
    test_new_only = test[new_items[test[:, 1]]]
    return replace(ds, train=kept, valid=ds.valid if valid is None else valid, test=test,
                   new_items=new_items.astype(bool), setting="new-items", test_new_only=test_new_only,
                   _train_csr=None)


def write_inter(path: str | Path, splits: Sequence[np.ndarray]) -> Path:
    """Write an MMRec ``.inter`` file atomically: header ``userID itemID x_label``, tab-separated.

    ``splits`` holds the ``(n, 2)`` (user, item) pairs of train, valid and test (labels 0, 1, 2), written in
    that order; the folder is created when needed.
    """
    if not 1 <= len(splits) <= len(SPLIT_LABELS):
        raise ValueError(f"expected the pairs of {', '.join(SPLIT_LABELS)}, got {len(splits)} arrays")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [np.column_stack([np.asarray(p, dtype=np.int64).reshape(-1, 2), np.full(len(p), lab, dtype=np.int64)])
            for lab, p in enumerate(splits)]
    table = pd.DataFrame(np.concatenate(rows), columns=list(INTER_COLUMNS))
    tmp = path.with_name(f".{path.name}.tmp")
    table.to_csv(tmp, sep="\t", index=False)
    tmp.replace(path)
    return path


def write_mmrec(ds: RecDataset, folder: str | Path, *, write_mask: bool = True,
                features: Mapping[str, np.ndarray] | None = None) -> Path:
    """Write ``ds`` as an MMRec folder (``<name>.inter``, ``<modality>_feat.npy``, ``observed.npz``, and the id
    maps when the dataset has them)."""
    folder = Path(folder)
    write_inter(folder / f"{ds.name}.inter", (ds.train, ds.valid, ds.test))
    for m, x in (features or ds.features).items():
        tmp_f = folder / f".{m}_feat.tmp.npy"
        np.save(tmp_f, np.asarray(x, dtype=np.float32))
        tmp_f.replace(folder / f"{m}_feat.npy")
    if write_mask:
        save_plain_mask(folder / PLAIN_MASK_NAME, ds.observed, ds.modalities)
    write_id_maps(ds, folder)
    return folder
