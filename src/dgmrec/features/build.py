"""Building a complete MMRec dataset folder from raw interactions, an items table and item content.

Interactions are optionally filtered by rating (implicit feedback), checked against the items table, remapped
and split per user chronologically 8:1:1 by the data layer; items keep the items table's order, including
items without interactions; each modality's content is encoded with the features pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dgmrec.data.dataset import RecDataset
from dgmrec.data.mmrec import NEW_ITEMS_SUFFIX, order_modalities, write_inter
from dgmrec.data.raw import USER_IDS_NAME, RawInteractions, TableFormat, read_raw_interactions, write_id_table
from dgmrec.errors import DataError, InputError
from dgmrec.features.encoders import Encoder
from dgmrec.features.output import Log, ModalityResult, cache_dir_of, write_features
from dgmrec.features.pipeline import encode_modality
from dgmrec.features.sources import ModalitySource
from dgmrec.features.tables import check_name, read_items


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
    if (spec.min_rating is None) != (spec.rating_column is None):
        raise InputError("--min-rating and --rating-column go together", source="--min-rating")
    rating_filter = None
    if spec.rating_column is not None and spec.min_rating is not None:
        rating_filter = (spec.rating_column, spec.min_rating)
    raw = read_raw_interactions(
        spec.path,
        spec.user_column,
        spec.item_column,
        spec.time_column,
        rating_filter=rating_filter,
        item_order=item_ids,
        item_order_name=items_source,
        fmt=spec.fmt or TableFormat(option_prefix=""),
    )
    stats = {"rows_read": raw.rows_read, "rows_kept": raw.rows_kept, "interactions": len(raw.users)}
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
    sources: Sequence[ModalitySource],
    items_fmt: TableFormat | None = None,
    encoders: Mapping[str, str | Encoder] | None = None,
    batch_sizes: Mapping[str, int] | None = None,
    device: str = "cpu",
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
    sources:
        One content source per modality (at least one; distinct modality names).
    items_fmt:
        Reading options of the items table.
    encoders:
        Modality name -> encoder name, path or object (the source's default for a modality not listed).
    batch_sizes:
        Modality name -> encoder batch size (the source's default for a modality not listed).
    device:
        Torch device.
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
    if not sources:
        raise InputError("give at least one modality source", source="dataset build")
    mods = [s.modality for s in sources]
    twice = [m for m in dict.fromkeys(mods) if mods.count(m) > 1]
    if twice:
        raise InputError(f"two sources are both named {twice[0]!r}", source="--modality")
    encoders = dict(encoders or {})
    batch_sizes = dict(batch_sizes or {})
    for option, given in (("encoders", encoders), ("batch_sizes", batch_sizes)):
        stray = [m for m in given if m not in mods]
        if stray:
            raise InputError(f"no source has the modality {stray[0]!r} (sources: {', '.join(mods)})", source=option)
    say = log or (lambda s: None)
    out = Path(out)
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
    for source in sources:
        results.append(
            encode_modality(
                items,
                source,
                encoders.get(source.modality),
                cache_dir=cache_dir_of(out),
                device=device,
                batch_size=batch_sizes.get(source.modality),
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
    train, valid, test = raw.splits()
    ds = RecDataset(
        name=name,
        n_users=len(raw.user_ids),
        n_items=len(items),
        train=train,
        valid=valid,
        test=test,
        features={m: by_name[m].features for m in order},
        observed=np.column_stack([by_name[m].observed for m in order]),
        source=str(out),
    )
    write_inter(out / f"{name}.inter", (train, valid, test))
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
