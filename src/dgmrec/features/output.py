"""What the features pipeline produces and writes: per-modality results, id tables, the missing-content report.

Row ``i`` of every ``<modality>_feat.npy`` is item ``i`` of the items table (``item_ids.csv`` maps it back to
the original id). Items without usable content have all-NaN rows and are listed with the reason in
``missing_content.json`` and a readable ``missing_content.txt``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dgmrec.data.masks import save_plain_mask
from dgmrec.data.mmrec import PLAIN_MASK_NAME, order_modalities
from dgmrec.data.raw import ITEM_IDS_NAME, read_id_table, write_id_table
from dgmrec.errors import DataError
from dgmrec.features.cache import CACHE_DIR_NAME
from dgmrec.features.tables import ItemsTable

REPORT_JSON = "missing_content.json"
REPORT_TXT = "missing_content.txt"
REPORT_FORMAT = 1

Log = Callable[[str], None]


@dataclass
class MissingItem:
    """An item whose content is missing for one modality."""

    row: int
    original_id: str
    reason: str


@dataclass
class ModalityResult:
    """Features of one modality and how they were obtained.

    Attributes
    ----------
    modality:
        Output name.
    kind:
        The source's content kind (``text``, ``image``, ...).
    features:
        ``(n_items, dim)`` float32; all-NaN rows for missing items.
    missing:
        Missing items with reasons, in row order.
    encoded, cached:
        Rows computed in this run (items sharing identical content count each) and rows taken from the cache
        of earlier runs.
    encoder, encoder_id:
        Encoder display name and cache identity.
    seconds:
        Wall time of collection and encoding (excluding model loading).
    source:
        Description of the content source (for the report).
    load_seconds:
        Time to load the encoder.
    encoder_inputs:
        Distinct contents passed to the encoder in this run.
    """

    modality: str
    kind: str
    features: np.ndarray
    missing: list[MissingItem]
    encoded: int
    cached: int
    encoder: str
    encoder_id: str
    seconds: float
    source: dict[str, Any] = field(default_factory=dict)
    load_seconds: float = 0.0
    encoder_inputs: int = 0

    @property
    def observed(self) -> np.ndarray:
        """Bool vector, True where the item has a feature row."""
        return ~np.isnan(self.features).all(axis=1)

    def summary_line(self) -> str:
        """One readable line of counts."""
        n = self.features.shape[0]
        return (
            f"{self.modality}: {n} items, {n - len(self.missing)} with features "
            f"({self.encoded} encoded, {self.cached} from cache), {len(self.missing)} missing; "
            f"{self.features.shape[1]}-d, encoder {self.encoder}, {self.seconds:.1f} s"
        )


# ----------------------------------------------------------------------------------------------- writing
def ids_digest(ids: Sequence[str]) -> str:
    """SHA-256 of the id list (detects outputs built for another items table)."""
    return hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()


def _save_npy(path: Path, x: np.ndarray) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.npy")
    np.save(tmp, np.ascontiguousarray(x, dtype=np.float32))
    tmp.replace(path)


def _modality_entry(r: ModalityResult, file_name: str) -> dict[str, Any]:
    return {
        "kind": r.kind,
        "file": file_name,
        "dim": int(r.features.shape[1]),
        "encoder": r.encoder,
        "encoder_id": r.encoder_id,
        "source": r.source,
        "observed": int(r.features.shape[0] - len(r.missing)),
        "missing": len(r.missing),
        "encoded": r.encoded,
        "cached": r.cached,
        "encoder_inputs": r.encoder_inputs,
        "encode_seconds": round(r.seconds, 2),
        "load_seconds": round(r.load_seconds, 2),
        "missing_items": [{"itemID": m.row, "original_id": m.original_id, "reason": m.reason} for m in r.missing],
    }


def format_report(report: dict[str, Any]) -> str:
    """Readable summary of a missing-content report.

    Parameters
    ----------
    report:
        The JSON report as a dict.

    Returns
    -------
    str
        Text with counts per modality, reasons and the missing item ids.
    """
    lines = [
        f"Missing item content — {report['n_items']} items (table: {report.get('items_table', '?')})",
        "",
    ]
    mods = report.get("modalities", {})
    for m, e in mods.items():
        lines.append(
            f"{m}: {e['observed']} with features, {e['missing']} missing "
            f"({e['encoded']} encoded, {e['cached']} from cache; {e['dim']}-d, encoder {e['encoder']})"
        )
        reasons: dict[str, int] = {}
        for it in e["missing_items"]:
            head = it["reason"].split(":")[0]
            reasons[head] = reasons.get(head, 0) + 1
        for why, cnt in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {cnt:6d}  {why}")
    lines.append("")
    both = report.get("missing_all_modalities", [])
    if len(mods) > 1:
        lines.append(f"missing in every modality: {len(both)} item(s)")
        lines.append("")
    for m, e in mods.items():
        if e["missing_items"]:
            lines.append(f"[{m}] missing items (itemID, original id, reason):")
            lines.extend(f"  {it['itemID']}\t{it['original_id']}\t{it['reason']}" for it in e["missing_items"])
            lines.append("")
    if "dataset" in report:
        d = report["dataset"]
        lines.append(
            f"dataset {d['name']}: {d['n_users']} users, {d['n_items']} items, {d['n_interactions']} "
            f"interactions (train {d['train']}, valid {d['valid']}, test {d['test']}); "
            f"{d['items_without_interactions']} item(s) have no interaction"
        )
    return "\n".join(lines).rstrip() + "\n"


def write_features(
    out: str | Path,
    items: ItemsTable,
    results: Sequence[ModalityResult],
    *,
    dataset: dict[str, Any] | None = None,
    log: Log | None = None,
) -> dict[str, Any]:
    """Write ``<modality>_feat.npy`` files, ``item_ids.csv`` and the missing-content report into ``out``.

    Entries of other modalities already in the report are kept when they were built for the same item ids;
    feature files built for another items table are reported through ``log``. ``observed.npz`` is rebuilt
    from the NaN rows of the folder's feature files when it exists or when ``dataset`` is given.

    Parameters
    ----------
    out:
        Output folder (created).
    items:
        The items table the results were computed on.
    results:
        Encoded modalities.
    dataset:
        Dataset statistics to store in the report (``dataset build``).
    log:
        Receives warnings.

    Returns
    -------
    dict
        The report written to ``missing_content.json``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    digest = ids_digest(items.ids)
    previous = read_id_table(out / ITEM_IDS_NAME)
    same_ids = previous is not None and ids_digest(previous) == digest
    written = {r.modality for r in results}
    if previous is not None and not same_ids and log is not None:
        for p in sorted(out.glob("*_feat.npy")):
            if p.name[: -len("_feat.npy")] not in written:
                log(f"warning: {p} was built for another items table; rebuild it or remove it")
    old: dict[str, Any] = {}
    report_path = out / REPORT_JSON
    if same_ids and report_path.is_file():
        try:
            old = json.loads(report_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            old = {}
    modalities: dict[str, Any] = {
        m: e for m, e in old.get("modalities", {}).items() if m not in written and (out / e.get("file", "")).is_file()
    }
    for r in results:
        if r.features.shape[0] != len(items):
            raise DataError(f"{r.modality} has {r.features.shape[0]} rows for {len(items)} items")
        name = f"{r.modality}_feat.npy"
        _save_npy(out / name, r.features)
        modalities[r.modality] = _modality_entry(r, name)
    write_id_table(out / ITEM_IDS_NAME, items.ids, "itemID")
    ordered = {m: modalities[m] for m in order_modalities(list(modalities))}
    missing_sets = [{it["itemID"] for it in e["missing_items"]} for e in ordered.values()]
    missing_all = sorted(set.intersection(*missing_sets)) if missing_sets else []
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "items_table": str(items.path),
        "id_column": items.id_column,
        "n_items": len(items),
        "item_ids_sha256": digest,
        "modalities": ordered,
        "missing_all_modalities": [{"itemID": i, "original_id": items.ids[i]} for i in missing_all],
    }
    if dataset is not None:
        report["dataset"] = dataset
    elif "dataset" in old:
        report["dataset"] = old["dataset"]
    tmp = report_path.with_name(report_path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(report_path)
    (out / REPORT_TXT).write_text(format_report(report), encoding="utf-8")
    if dataset is not None or (out / PLAIN_MASK_NAME).is_file():
        refresh_plain_mask(out, len(items))
    return report


def refresh_plain_mask(out: Path, n_items: int) -> None:
    """Rebuild ``observed.npz`` from the all-NaN rows of the folder's ``*_feat.npy`` with ``n_items`` rows.

    Parameters
    ----------
    out:
        Dataset folder.
    n_items:
        Expected row count; feature files with another count are left out.
    """
    names, cols = [], []
    for p in sorted(out.glob("*_feat.npy")):
        x = np.load(p, mmap_mode="r", allow_pickle=False)
        if x.ndim == 2 and x.shape[0] == n_items:
            names.append(p.name[: -len("_feat.npy")])
            cols.append(~np.isnan(np.asarray(x)).all(axis=1))
    if names:
        order = order_modalities(names)
        observed = np.column_stack([cols[names.index(m)] for m in order])
        save_plain_mask(out / PLAIN_MASK_NAME, observed, order)


def cache_dir_of(out: str | Path) -> Path:
    """The feature cache folder inside an output folder."""
    return Path(out) / CACHE_DIR_NAME
