"""Encoding one modality of an items table: collect content, use the cache, encode in batches, report gaps.

Row ``i`` of every output is item ``i`` of the items table. Items without usable content (empty text, no image
path, a missing, unreadable or corrupt image) get an all-NaN row and are listed with the reason in the
missing-content report (``missing_content.json`` and a readable ``missing_content.txt``).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dgmrec.data.masks import save_plain_mask
from dgmrec.data.mmrec import PLAIN_MASK_NAME, order_modalities
from dgmrec.errors import DataError, InputError
from dgmrec.features.cache import CACHE_DIR_NAME, FeatureCache, bytes_key, text_key
from dgmrec.features.encoders import (
    DEFAULT_IMAGE_ENCODER,
    DEFAULT_TEXT_ENCODER,
    ImageEncoder,
    TextEncoder,
    load_image_encoder,
    load_text_encoder,
    require_module,
)
from dgmrec.features.tables import ItemsTable, check_name, require_columns

ITEM_IDS_NAME = "item_ids.csv"
USER_IDS_NAME = "user_ids.csv"
REPORT_JSON = "missing_content.json"
REPORT_TXT = "missing_content.txt"
REPORT_FORMAT = 1
SAVE_EVERY_BATCHES = 10

Log = Callable[[str], None]


@dataclass(frozen=True)
class TextSource:
    """Where an item's text comes from: one or more columns (joined by newlines) or one file per item.

    Parameters
    ----------
    columns:
        Text columns of the items table; non-empty values are joined with a newline.
    text_dir, pattern:
        Alternatively, read ``text_dir / pattern.format(id=<item id>)``; a missing file means missing text.
    encoding:
        Encoding of the text files (a file that does not decode is an error naming it).
    modality:
        Output modality name (``<modality>_feat.npy``).
    """

    columns: tuple[str, ...] = ()
    text_dir: Path | None = None
    pattern: str = "{id}.txt"
    encoding: str = "utf-8"
    modality: str = "text"


@dataclass(frozen=True)
class ImageSource:
    """Where an item's image comes from: a path column (relative to the items table's folder) or a pattern.

    Parameters
    ----------
    column:
        Column holding an image path per item (empty = no image).
    image_dir, pattern:
        Alternatively ``image_dir / pattern.format(id=<item id>)``.
    modality:
        Output modality name.
    """

    column: str | None = None
    image_dir: Path | None = None
    pattern: str = "{id}.jpg"
    modality: str = "image"


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
        ``text`` or ``image``.
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


# --------------------------------------------------------------------------------------------- progress
@contextmanager
def _progress(total: int, description: str, enabled: bool) -> Iterator[Callable[[int], None]]:
    """Yield an ``advance(n)`` callable backed by a rich progress bar on stderr (silent off a terminal)."""
    if not enabled or total == 0:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    if not console.is_terminal:
        yield lambda n: None
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


# ------------------------------------------------------------------------------------------ collecting
def format_pattern(pattern: str, item_id: str, option: str) -> str:
    """Fill ``{id}`` of a file-name pattern.

    Parameters
    ----------
    pattern:
        E.g. ``{id}.jpg`` or ``covers/{id}/front.png``.
    item_id:
        The original item id.
    option:
        Option name for messages.

    Returns
    -------
    str
        The file name.
    """
    if "{id}" not in pattern:
        raise InputError(f"pattern {pattern!r} must contain {{id}}", source=option)
    try:
        return pattern.format(id=item_id)
    except (KeyError, IndexError, ValueError) as exc:
        raise InputError(
            f"bad pattern {pattern!r} ({type(exc).__name__}: {exc}); only {{id}} may be used", source=option
        ) from None


def collect_texts(items: ItemsTable, source: TextSource) -> tuple[list[str | None], list[str]]:
    """The text of every item (None when missing) and, for missing ones, the reason.

    Parameters
    ----------
    items:
        The items table.
    source:
        Text columns or text files.

    Returns
    -------
    texts, reasons
        ``texts[i]`` is the stripped text or None; ``reasons[i]`` explains a None (empty otherwise).
    """
    n = len(items)
    texts: list[str | None] = [None] * n
    reasons = [""] * n
    if source.columns and source.text_dir is not None:
        raise InputError("give text columns or a text folder, not both", source="--text-dir")
    if source.columns:
        require_columns(items.frame, {c: "--text-column" for c in source.columns}, str(items.path))
        cols = [items.frame[c].astype(str).to_numpy() for c in source.columns]
        for i in range(n):
            parts = [str(col[i]).strip() for col in cols]
            joined = "\n".join(p for p in parts if p)
            if joined:
                texts[i] = joined
            else:
                reasons[i] = "empty text" if len(cols) == 1 else f"empty text in {', '.join(source.columns)}"
        return texts, reasons
    if source.text_dir is None:
        raise InputError("give a text column (--text-column) or a text folder (--text-dir)", source="text")
    folder = Path(source.text_dir)
    if not folder.is_dir():
        raise DataError("text folder not found", source=str(folder))
    for i, item_id in enumerate(items.ids):
        rel = format_pattern(source.pattern, item_id, "--text-pattern")
        path = folder / rel
        if not path.is_file():
            reasons[i] = f"text file not found: {rel}"
            continue
        try:
            raw = path.read_bytes()
        except OSError as exc:
            reasons[i] = f"text file unreadable: {rel} ({exc.strerror or exc})"
            continue
        try:
            text = raw.decode(source.encoding).lstrip("\ufeff").strip()
        except UnicodeDecodeError as exc:
            raise DataError(
                f"not valid {source.encoding} text ({exc.reason} at byte {exc.start}); convert the "
                "file or pass --text-encoding",
                source=str(path),
            ) from None
        except LookupError:
            raise InputError(f"unknown text encoding {source.encoding!r}", source="--text-encoding") from None
        if text:
            texts[i] = text
        else:
            reasons[i] = f"empty text file: {rel}"
    return texts, reasons


def collect_image_paths(items: ItemsTable, source: ImageSource) -> tuple[list[Path | None], list[str], list[str]]:
    """The image path of every item (None when none is given) with the path as written, for messages.

    Parameters
    ----------
    items:
        The items table; relative paths in an image column resolve against its folder.
    source:
        Image column or folder + pattern.

    Returns
    -------
    paths, shown, reasons
        ``paths[i]`` (None when the item names no image), its display form, and the reason for a None.
    """
    n = len(items)
    paths: list[Path | None] = [None] * n
    shown = [""] * n
    reasons = [""] * n
    if source.column and source.image_dir is not None:
        raise InputError("give --image-column or --image-dir, not both", source="--image-dir")
    if source.column:
        require_columns(items.frame, {source.column: "--image-column"}, str(items.path))
        for i, value in enumerate(items.frame[source.column].astype(str).to_numpy()):
            value = str(value).strip()
            if not value:
                reasons[i] = "no image path"
                continue
            p = Path(value).expanduser()
            paths[i] = p if p.is_absolute() else items.folder / p
            shown[i] = value
        return paths, shown, reasons
    if source.image_dir is None:
        raise InputError("give an image column (--image-column) or an image folder (--image-dir)", source="image")
    folder = Path(source.image_dir)
    if not folder.is_dir():
        raise DataError("image folder not found", source=str(folder))
    for i, item_id in enumerate(items.ids):
        rel = format_pattern(source.pattern, item_id, "--image-pattern")
        paths[i] = folder / rel
        shown[i] = rel
    return paths, shown, reasons


def decode_image(data: bytes) -> tuple[Any | None, str]:
    """Decode image bytes to an RGB ``PIL.Image`` (EXIF rotation applied, transparency on white).

    Parameters
    ----------
    data:
        The file's bytes.

    Returns
    -------
    image, reason
        The image, or None and the reason it could not be decoded.
    """
    pil = require_module("PIL.Image", "image decoding")
    ops = require_module("PIL.ImageOps", "image decoding")
    if not data:
        return None, "empty file"
    try:
        with pil.open(io.BytesIO(data)) as im:
            im.load()
            im = ops.exif_transpose(im) or im
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                white = pil.new("RGBA", rgba.size, (255, 255, 255, 255))
                rgb = pil.alpha_composite(white, rgba).convert("RGB")
            else:
                rgb = im.convert("RGB")
            if rgb.size[0] < 1 or rgb.size[1] < 1:
                return None, "image has no pixels"
            return rgb, ""
    except Exception as exc:  # any decoder failure marks this one item missing
        msg = str(exc).splitlines()[0] if str(exc) else ""
        return None, f"unreadable image ({type(exc).__name__}{': ' + msg if msg else ''})"


# ---------------------------------------------------------------------------------------------- encoding
class _Batcher:
    """Accumulates inputs to encode, deduplicated by key, and writes results into the feature matrix."""

    def __init__(
        self,
        features: np.ndarray,
        encode: Callable[[list[Any]], np.ndarray],
        cache: FeatureCache,
        batch_size: int,
        encoder_name: str,
    ) -> None:
        self.features = features
        self.encode = encode
        self.cache = cache
        self.batch_size = batch_size
        self.encoder_name = encoder_name
        self.keys: list[str] = []
        self.inputs: list[Any] = []
        self.rows: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}
        self.encoded = 0
        self.unique = 0
        self.batches = 0
        self.bad_rows: list[int] = []

    def known(self, row: int, key: str) -> bool:
        """Resolve ``row`` if its content was already encoded or queued in this run."""
        if key in self.computed:
            self.features[row] = self.features[self.computed[key]]
            self.encoded += 1
            return True
        if key in self.rows:
            self.rows[key].append(row)
            return True
        return False

    def add(self, row: int, key: str, value: Any) -> bool:
        """Queue ``row`` with encoder input ``value``. Returns True when a batch is full."""
        self.rows[key] = [row]
        self.keys.append(key)
        self.inputs.append(value)
        return len(self.inputs) >= self.batch_size

    def flush(self) -> None:
        if not self.inputs:
            return
        vecs = np.asarray(self.encode(self.inputs), dtype=np.float32)
        dim = self.features.shape[1]
        if vecs.shape != (len(self.inputs), dim):
            raise InputError(
                f"encoder {self.encoder_name!r} returned shape {vecs.shape} for {len(self.inputs)} "
                f"inputs, expected ({len(self.inputs)}, {dim})",
                source="--encoder",
            )
        for key, vec in zip(self.keys, vecs, strict=True):
            rows = self.rows[key]
            if np.isfinite(vec).all():
                self.features[rows] = vec
                self.cache.put(key, vec)
                self.computed[key] = rows[0]
                self.encoded += len(rows)
                self.unique += 1
            else:
                self.bad_rows.extend(rows)
        self.keys, self.inputs, self.rows = [], [], {}
        self.batches += 1
        if self.batches % SAVE_EVERY_BATCHES == 0:
            self.cache.save()


def _check_some_content(items: ItemsTable, present: int, modality: str, hint: str) -> None:
    if present == 0:
        raise DataError(
            f"no item has {modality} content ({hint}); every modality needs at least one item",
            source=str(items.path),
        )


def encode_text_modality(
    items: ItemsTable,
    source: TextSource,
    encoder: str | TextEncoder = DEFAULT_TEXT_ENCODER,
    *,
    cache_dir: str | Path | None = None,
    device: str = "cpu",
    batch_size: int = 64,
    use_cache: bool = True,
    progress: bool = True,
) -> ModalityResult:
    """Encode the text of every item; items with empty text get NaN rows.

    Parameters
    ----------
    items:
        The items table.
    source:
        Text columns or files, and the modality name.
    encoder:
        Encoder name, model folder, or a :class:`TextEncoder` object.
    cache_dir:
        Folder of the feature cache (no caching when None).
    device:
        Torch device for built-in encoders.
    batch_size:
        Texts per encoder call.
    use_cache:
        Read and write the cache.
    progress:
        Show a progress bar on a terminal.

    Returns
    -------
    ModalityResult
        Features, missing items and counts.
    """
    check_name(source.modality, "--modality")
    if batch_size < 1:
        raise InputError("must be at least 1", source="--batch-size")
    texts, reasons = collect_texts(items, source)
    _check_some_content(items, sum(t is not None for t in texts), source.modality, "every text is empty or missing")
    t_load = time.perf_counter()
    enc = load_text_encoder(encoder, device)
    load_seconds = time.perf_counter() - t_load
    t0 = time.perf_counter()
    n = len(items)
    features = np.full((n, enc.dim), np.nan, dtype=np.float32)
    cache = FeatureCache(cache_dir or ".", "text", enc.cache_id, enc.dim, enabled=use_cache and cache_dir is not None)
    batcher = _Batcher(features, lambda xs: enc.encode(xs), cache, batch_size, enc.name)
    cached = 0
    try:
        with _progress(n, f"{source.modality}: encoding", progress) as advance:
            for i, text in enumerate(texts):
                advance(1)
                if text is None:
                    continue
                key = text_key(text)
                if batcher.known(i, key):
                    continue
                hit = cache.get(key)
                if hit is not None:
                    features[i] = hit
                    cached += 1
                elif batcher.add(i, key, text):
                    batcher.flush()
            batcher.flush()
    finally:
        cache.save()
    for r in batcher.bad_rows:
        reasons[r] = "encoder returned non-finite values"
    missing = [MissingItem(i, items.ids[i], reasons[i]) for i in range(n) if np.isnan(features[i]).all()]
    src: dict[str, Any] = (
        {"columns": list(source.columns)}
        if source.columns
        else {"text_dir": str(source.text_dir), "pattern": source.pattern}
    )
    return ModalityResult(
        source.modality,
        "text",
        features,
        missing,
        batcher.encoded,
        cached,
        enc.name,
        enc.cache_id,
        time.perf_counter() - t0,
        src,
        load_seconds,
        batcher.unique,
    )


def encode_image_modality(
    items: ItemsTable,
    source: ImageSource,
    encoder: str | ImageEncoder = DEFAULT_IMAGE_ENCODER,
    *,
    cache_dir: str | Path | None = None,
    device: str = "cpu",
    batch_size: int = 32,
    use_cache: bool = True,
    progress: bool = True,
) -> ModalityResult:
    """Encode the image of every item; items whose image is absent, unreadable or corrupt get NaN rows.

    Parameters
    ----------
    items:
        The items table.
    source:
        Image column or folder + pattern, and the modality name.
    encoder:
        Encoder name, model file, or an :class:`ImageEncoder` object.
    cache_dir:
        Folder of the feature cache (no caching when None); keys are hashes of the image files' bytes.
    device:
        Torch device for built-in encoders.
    batch_size:
        Images per encoder call.
    use_cache:
        Read and write the cache.
    progress:
        Show a progress bar on a terminal.

    Returns
    -------
    ModalityResult
        Features, missing items and counts.
    """
    check_name(source.modality, "--modality")
    if batch_size < 1:
        raise InputError("must be at least 1", source="--batch-size")
    paths, shown, reasons = collect_image_paths(items, source)
    exists = [p is not None and p.is_file() for p in paths]
    _check_some_content(
        items,
        sum(exists),
        source.modality,
        f"no image file found, e.g. {shown[0] or 'no path'}; check the image folder and pattern",
    )
    t_load = time.perf_counter()
    enc = load_image_encoder(encoder, device)
    load_seconds = time.perf_counter() - t_load
    t0 = time.perf_counter()
    n = len(items)
    features = np.full((n, enc.dim), np.nan, dtype=np.float32)
    cache = FeatureCache(cache_dir or ".", "image", enc.cache_id, enc.dim, enabled=use_cache and cache_dir is not None)
    batcher = _Batcher(features, lambda xs: enc.encode(xs), cache, batch_size, enc.name)
    cached = 0
    try:
        with _progress(n, f"{source.modality}: encoding", progress) as advance:
            for i, path in enumerate(paths):
                advance(1)
                if path is None:
                    continue
                if not exists[i]:
                    reasons[i] = f"image file not found: {shown[i]}"
                    continue
                try:
                    data = path.read_bytes()
                except OSError as exc:
                    reasons[i] = f"image file unreadable: {shown[i]} ({exc.strerror or exc})"
                    continue
                key = bytes_key(data)
                if batcher.known(i, key):
                    continue
                hit = cache.get(key)
                if hit is not None:
                    features[i] = hit
                    cached += 1
                    continue
                image, why = decode_image(data)
                if image is None:
                    reasons[i] = f"{why}: {shown[i]}"
                    continue
                if batcher.add(i, key, image):
                    batcher.flush()
            batcher.flush()
    finally:
        cache.save()
    for r in batcher.bad_rows:
        reasons[r] = f"encoder returned non-finite values: {shown[r]}"
    missing = [MissingItem(i, items.ids[i], reasons[i]) for i in range(n) if np.isnan(features[i]).all()]
    src: dict[str, Any] = (
        {"column": source.column} if source.column else {"image_dir": str(source.image_dir), "pattern": source.pattern}
    )
    return ModalityResult(
        source.modality,
        "image",
        features,
        missing,
        batcher.encoded,
        cached,
        enc.name,
        enc.cache_id,
        time.perf_counter() - t0,
        src,
        load_seconds,
        batcher.unique,
    )


# ----------------------------------------------------------------------------------------------- writing
def ids_digest(ids: Sequence[str]) -> str:
    """SHA-256 of the id list (detects outputs built for another items table)."""
    return hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()


def write_id_table(path: Path, original_ids: Sequence[str], column: str) -> None:
    """Write ``<column>,original_id`` (row ``i`` -> ``i``, its original id) as CSV.

    Parameters
    ----------
    path:
        Output file.
    original_ids:
        Original ids in remapped order.
    column:
        ``itemID`` or ``userID``.
    """
    frame = pd.DataFrame({column: np.arange(len(original_ids), dtype=np.int64), "original_id": list(original_ids)})
    tmp = path.with_name(path.name + ".tmp")
    frame.to_csv(tmp, index=False)
    tmp.replace(path)


def read_id_table(path: Path) -> list[str] | None:
    """Original ids from an ``item_ids.csv`` / ``user_ids.csv`` (None when absent or unreadable)."""
    if not path.is_file():
        return None
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
        return df["original_id"].tolist()
    except Exception:
        return None


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
    feature files built for another items table are reported through ``log``. An existing ``observed.npz``
    is rebuilt from the NaN rows of the folder's feature files.

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
    if dataset is None and (out / PLAIN_MASK_NAME).is_file():
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


def extract_text_features(
    items_path: str | Path,
    id_column: str,
    source: TextSource,
    out: str | Path,
    *,
    encoder: str | TextEncoder = DEFAULT_TEXT_ENCODER,
    items_fmt: Any = None,
    device: str = "cpu",
    batch_size: int = 64,
    use_cache: bool = True,
    progress: bool = True,
    log: Log | None = None,
) -> tuple[ModalityResult, dict[str, Any]]:
    """Read an items table, encode its texts and write ``<modality>_feat.npy``, ids and report into ``out``.

    Parameters
    ----------
    items_path, id_column:
        Items table and id column.
    source:
        Text columns or files and the modality name.
    out:
        Output folder (the cache lives in ``out/feature_cache``).
    encoder:
        Encoder name, model folder or object.
    items_fmt:
        :class:`~dgmrec.features.tables.TableFormat` of the items table.
    device, batch_size, use_cache, progress:
        See :func:`encode_text_modality`.
    log:
        Receives warnings.

    Returns
    -------
    result, report
        The encoded modality and the report written.
    """
    from dgmrec.features.tables import read_items

    items = read_items(items_path, id_column, items_fmt)
    result = encode_text_modality(
        items,
        source,
        encoder,
        cache_dir=cache_dir_of(out),
        device=device,
        batch_size=batch_size,
        use_cache=use_cache,
        progress=progress,
    )
    return result, write_features(out, items, [result], log=log)


def extract_image_features(
    items_path: str | Path,
    id_column: str,
    source: ImageSource,
    out: str | Path,
    *,
    encoder: str | ImageEncoder = DEFAULT_IMAGE_ENCODER,
    items_fmt: Any = None,
    device: str = "cpu",
    batch_size: int = 32,
    use_cache: bool = True,
    progress: bool = True,
    log: Log | None = None,
) -> tuple[ModalityResult, dict[str, Any]]:
    """Read an items table, encode its images and write ``<modality>_feat.npy``, ids and report into ``out``.

    Parameters
    ----------
    items_path, id_column:
        Items table and id column.
    source:
        Image column or folder + pattern and the modality name.
    out:
        Output folder (the cache lives in ``out/feature_cache``).
    encoder:
        Encoder name, model file or object.
    items_fmt:
        :class:`~dgmrec.features.tables.TableFormat` of the items table.
    device, batch_size, use_cache, progress:
        See :func:`encode_image_modality`.
    log:
        Receives warnings.

    Returns
    -------
    result, report
        The encoded modality and the report written.
    """
    from dgmrec.features.tables import read_items

    items = read_items(items_path, id_column, items_fmt)
    result = encode_image_modality(
        items,
        source,
        encoder,
        cache_dir=cache_dir_of(out),
        device=device,
        batch_size=batch_size,
        use_cache=use_cache,
        progress=progress,
    )
    return result, write_features(out, items, [result], log=log)
