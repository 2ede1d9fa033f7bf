"""Building a complete MMRec dataset folder from raw interactions, an items table and item content.

Interactions are optionally filtered by rating (implicit feedback), checked against the items table, remapped
and split per user chronologically 8:1:1 by the data layer; items keep the items table's order, including
items without interactions; each modality's content is encoded with the features pipeline.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dgmrec.data.dataset import RecDataset
from dgmrec.data.mmrec import NEW_ITEMS_SUFFIX, order_modalities, write_mmrec
from dgmrec.data.raw import RawInteractions, read_raw_interactions
from dgmrec.errors import DataError, InputError
from dgmrec.features.encoders import DEFAULT_IMAGE_ENCODER, DEFAULT_TEXT_ENCODER, ImageEncoder, TextEncoder
from dgmrec.features.pipeline import (
    USER_IDS_NAME,
    ImageSource,
    Log,
    ModalityResult,
    TextSource,
    cache_dir_of,
    encode_image_modality,
    encode_text_modality,
    write_features,
    write_id_table,
)
from dgmrec.features.tables import TableFormat, check_name, read_items, read_table_with, require_columns


@dataclass(frozen=True)
class InteractionsSpec:
    """Where and how to read raw interactions.

    Parameters
    ----------
    path:
        CSV, TSV or Parquet file (a headerless file needs ``fmt`` with ``columns``).
    user_column, item_column:
        Id columns.
    time_column:
        Timestamp column (unix seconds or dates) for the chronological split; file order when None.
    rating_column, min_rating:
        Keep only rows with ``rating >= min_rating`` (both or neither).
    fmt:
        Separator, header and encoding of a delimited file.
    """

    path: Path
    user_column: str
    item_column: str
    time_column: str | None = None
    rating_column: str | None = None
    min_rating: float | None = None
    fmt: TableFormat | None = None


@dataclass
class BuildResult:
    """What :func:`build_dataset` wrote."""

    out: Path
    dataset: RecDataset
    modalities: list[ModalityResult]
    report: dict[str, Any]
    stats: dict[str, Any] = field(default_factory=dict)


def _timestamps_ok(values: pd.Series, column: str, source: str) -> None:
    """Same rule as the data layer (numbers, else dates), but naming the row of the original file."""
    ts = pd.to_numeric(values.str.strip(), errors="coerce")
    if ts.isna().any():
        parsed = pd.to_datetime(values, errors="coerce", utc=True)
        if parsed.isna().any():
            row = int(np.flatnonzero(parsed.isna().to_numpy())[0])
            raise DataError(
                f"column {column}, row {row + 1}: {values.iloc[row]!r} is not a number or a date",
                source=source,
            )


def read_interactions(
    spec: InteractionsSpec, item_ids: list[str], items_source: str = "the items table"
) -> tuple[RawInteractions, dict[str, Any]]:
    """Read, filter and check raw interactions, then remap and split them with the data layer.

    Parameters
    ----------
    spec:
        File, columns and filter.
    item_ids:
        Original item ids in items-table order (fixes the item numbering).
    items_source:
        Name of the items table for messages.

    Returns
    -------
    raw, stats
        Remapped interactions with split labels, and counts (rows read, kept by the rating filter, unique
        user-item pairs).

    Raises
    ------
    DataError
        Missing columns, empty ids, bad ratings or timestamps, no rows left, or item ids that are not in the
        items table (with their count and an example).
    """
    src = str(spec.path)
    if (spec.min_rating is None) != (spec.rating_column is None):
        raise InputError("--min-rating and --rating-column go together", source="--min-rating")
    fmt = spec.fmt or TableFormat()
    df = read_table_with(spec.path, fmt)
    needed = {spec.user_column: "--user-column", spec.item_column: "--item-column"}
    if spec.time_column:
        needed[spec.time_column] = "--time-column"
    if spec.rating_column:
        needed[spec.rating_column] = "--rating-column"
    require_columns(df, needed, src, fmt.header_hint())
    if df.empty:
        raise DataError("no interactions", source=src)
    users = df[spec.user_column].astype(str).str.strip()
    items = df[spec.item_column].astype(str).str.strip()
    for col, values in ((spec.user_column, users), (spec.item_column, items)):
        empty = np.flatnonzero(values.eq("").to_numpy())
        if len(empty):
            raise DataError(f"column {col}, row {empty[0] + 1}: empty id", source=src)
    index = set(item_ids)
    unknown = [v for v in dict.fromkeys(items.tolist()) if v not in index]
    if unknown:
        raise DataError(
            f"{len(unknown)} item id(s) in column {spec.item_column} are not in {items_source}, e.g. {unknown[0]!r}",
            source=src,
        )
    if spec.time_column:
        _timestamps_ok(df[spec.time_column].astype(str), spec.time_column, src)
    keep = np.ones(len(df), dtype=bool)
    if spec.rating_column is not None and spec.min_rating is not None:
        ratings = pd.to_numeric(df[spec.rating_column].astype(str).str.strip(), errors="coerce")
        if ratings.isna().any():
            row = int(np.flatnonzero(ratings.isna().to_numpy())[0])
            raise DataError(
                f"column {spec.rating_column}, row {row + 1}: {df[spec.rating_column].iloc[row]!r} is not a number",
                source=src,
            )
        keep = (ratings >= spec.min_rating).to_numpy()
        if not keep.any():
            raise DataError(f"no interaction has {spec.rating_column} >= {spec.min_rating:g}", source=src)
    table = pd.DataFrame({"user": users[keep].to_numpy(), "item": items[keep].to_numpy()})
    if spec.time_column:
        table["timestamp"] = df[spec.time_column].astype(str).str.strip()[keep].to_numpy()
    with tempfile.TemporaryDirectory(prefix="dgmrec-inter-") as tmp:
        path = Path(tmp) / "interactions.tsv"
        table.to_csv(path, sep="\t", index=False)
        try:
            raw = read_raw_interactions(
                path, "user", "item", "timestamp" if spec.time_column else None, item_order=list(item_ids)
            )
        except DataError as exc:
            message = str(exc)
            if exc.source and message.startswith(f"{exc.source}: "):
                message = message[len(exc.source) + 2 :]
            if spec.min_rating is not None:
                message += " (after the rating filter)"
            raise DataError(message, source=src) from None
    stats = {"rows_read": len(df), "rows_kept": int(keep.sum()), "interactions": len(raw.users)}
    return raw, stats


def _check_leftovers(out: Path, name: str, modalities: list[str]) -> None:
    """Refuse an output folder holding another dataset's files (they would be read with the new ones)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError("output path exists and is not a folder", source=str(out))
    stray = [p.name for p in sorted(out.glob("*.inter")) if p.name != f"{name}.inter"]
    stray += [p.name for p in sorted(out.glob("*_feat.npy")) if p.name[: -len("_feat.npy")] not in modalities]
    if stray:
        raise DataError(
            f"the output folder already holds {', '.join(stray)} from another build; remove them or "
            "use an empty folder (the feature_cache folder may stay)",
            source=str(out),
        )


def build_dataset(
    interactions: InteractionsSpec,
    items_path: str | Path,
    id_column: str,
    *,
    name: str,
    out: str | Path,
    text: TextSource | None = None,
    image: ImageSource | None = None,
    items_fmt: TableFormat | None = None,
    text_encoder: str | TextEncoder = DEFAULT_TEXT_ENCODER,
    image_encoder: str | ImageEncoder = DEFAULT_IMAGE_ENCODER,
    device: str = "cpu",
    text_batch_size: int = 64,
    image_batch_size: int = 32,
    use_cache: bool = True,
    progress: bool = True,
    log: Log | None = None,
) -> BuildResult:
    """Build an MMRec folder: ``<name>.inter``, ``<modality>_feat.npy``, ``observed.npz``, id maps and report.

    Parameters
    ----------
    interactions:
        The raw interactions and how to read and filter them.
    items_path, id_column:
        Items table and its id column; its row order is the item numbering (``n_items`` = its size).
    name:
        Dataset name (stem of the ``.inter`` file).
    out:
        Output folder; the feature cache lives in ``out/feature_cache``.
    text, image:
        Content sources (at least one).
    items_fmt:
        Reading options of the items table.
    text_encoder, image_encoder:
        Encoder names, paths, or objects.
    device:
        Torch device.
    text_batch_size, image_batch_size:
        Encoder batch sizes.
    use_cache:
        Reuse and update the feature cache.
    progress:
        Show progress bars on a terminal.
    log:
        Receives one line per finished step.

    Returns
    -------
    BuildResult
        The dataset as written, per-modality results and the report.
    """
    check_name(name, "--name")
    if name.endswith(NEW_ITEMS_SUFFIX):
        raise InputError(f"a dataset name may not end with {NEW_ITEMS_SUFFIX}", source="--name")
    if text is None and image is None:
        raise InputError(
            "give at least one modality: --text-column/--text-dir or --image-column/--image-dir",
            source="dataset build",
        )
    say = log or (lambda s: None)
    out = Path(out)
    mods = [s.modality for s in (text, image) if s is not None]
    if len(set(mods)) != len(mods):
        raise InputError(f"the text and image modalities are both named {mods[0]!r}", source="--modality")
    items = read_items(items_path, id_column, items_fmt)
    raw, stats = read_interactions(interactions, items.ids, items_source=f"the items table {items.path}")
    say(
        f"interactions: {stats['rows_read']} rows read, {stats['rows_kept']} kept, "
        f"{stats['interactions']} unique "
        f"user-item pairs; {len(raw.user_ids)} users, {len(items)} items"
    )
    _check_leftovers(out, name, mods)
    out.mkdir(parents=True, exist_ok=True)
    results: list[ModalityResult] = []
    cache = cache_dir_of(out)
    if text is not None:
        results.append(
            encode_text_modality(
                items,
                text,
                text_encoder,
                cache_dir=cache,
                device=device,
                batch_size=text_batch_size,
                use_cache=use_cache,
                progress=progress,
            )
        )
        say(results[-1].summary_line())
    if image is not None:
        results.append(
            encode_image_modality(
                items,
                image,
                image_encoder,
                cache_dir=cache,
                device=device,
                batch_size=image_batch_size,
                use_cache=use_cache,
                progress=progress,
            )
        )
        say(results[-1].summary_line())
    for r in results:
        if not r.observed.any():
            raise DataError(
                f"no item has usable {r.modality} content (see the reasons in the report)",
                source=str(items.path),
            )
    by_name = {r.modality: r for r in results}
    order = order_modalities(list(by_name))
    features = {m: by_name[m].features for m in order}
    observed = np.column_stack([by_name[m].observed for m in order])
    ds = RecDataset(
        name=name,
        n_users=len(raw.user_ids),
        n_items=len(items),
        train=raw.pairs(0),
        valid=raw.pairs(1),
        test=raw.pairs(2),
        features=features,
        observed=observed,
        source=str(out),
    )
    write_mmrec(ds, out)
    write_id_table(out / USER_IDS_NAME, [str(u) for u in raw.user_ids], "userID")
    counts = np.bincount(raw.items, minlength=len(items))
    dataset_info = {
        "name": name,
        "interactions_file": str(interactions.path),
        "user_column": interactions.user_column,
        "item_column": interactions.item_column,
        "time_column": interactions.time_column,
        "rating_filter": (
            f"{interactions.rating_column} >= {interactions.min_rating:g}"
            if interactions.min_rating is not None
            else None
        ),
        "rows_read": stats["rows_read"],
        "rows_kept": stats["rows_kept"],
        "n_users": ds.n_users,
        "n_items": ds.n_items,
        "n_interactions": len(raw.users),
        "train": len(ds.train),
        "valid": len(ds.valid),
        "test": len(ds.test),
        "items_without_interactions": int((counts == 0).sum()),
        "split": "per user, chronological, 8:1:1 (users with < 3 interactions: all train)",
    }
    report = write_features(out, items, results, dataset=dataset_info, log=log)
    stats.update(dataset_info)
    return BuildResult(out=out, dataset=ds, modalities=results, report=report, stats=stats)
