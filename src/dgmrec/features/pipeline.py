"""The one encode path of every modality: collect content, use the cache, encode in batches, report gaps.

:func:`encode_modality` takes any :class:`~dgmrec.features.sources.ModalitySource` (texts, images, or another
content type) and an encoder. Row ``i`` of its output is item ``i`` of the items table; items without usable
content get an all-NaN row and are listed with the reason. :func:`extract_features` reads an items table,
encodes one modality and writes it with :func:`~dgmrec.features.output.write_features`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from dgmrec.data.raw import TableFormat
from dgmrec.errors import DataError, InputError
from dgmrec.features.cache import FeatureCache
from dgmrec.features.encoders import Encoder
from dgmrec.features.output import Log, MissingItem, ModalityResult, cache_dir_of, write_features
from dgmrec.features.sources import MissingContent, ModalitySource
from dgmrec.features.tables import ItemsTable, check_name, read_items

SAVE_EVERY_BATCHES = 10


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


def encode_modality(
    items: ItemsTable,
    source: ModalitySource,
    encoder: str | Encoder | None = None,
    *,
    cache_dir: str | Path | None = None,
    device: str = "cpu",
    batch_size: int | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> ModalityResult:
    """Encode one modality of every item; items without usable content get NaN rows and a reason.

    Parameters
    ----------
    items:
        The items table.
    source:
        Where each item's content comes from (e.g. :class:`~dgmrec.features.sources.TextSource`,
        :class:`~dgmrec.features.sources.ImageSource`), with the output modality name.
    encoder:
        Encoder name, model path, or an encoder object for the source's kind; the source's default when None.
    cache_dir:
        Folder of the feature cache (no caching when None); keys are hashes of the content (a text, a file's
        bytes).
    device:
        Torch device for built-in encoders.
    batch_size:
        Inputs per encoder call (the source's default when None).
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
    batch_size = source.default_batch_size if batch_size is None else batch_size
    if batch_size < 1:
        raise InputError("must be at least 1", source="--batch-size")
    content = source.collect(items)
    if content.present == 0:
        raise DataError(
            f"no item has {source.modality} content ({content.none_hint}); every modality needs at least one item",
            source=str(items.path),
        )
    t_load = time.perf_counter()
    enc = source.load_encoder(encoder, device)
    load_seconds = time.perf_counter() - t_load
    t0 = time.perf_counter()
    n = len(items)
    features = np.full((n, enc.dim), np.nan, dtype=np.float32)
    cache = FeatureCache(
        cache_dir or ".", source.kind, enc.cache_id, enc.dim, enabled=use_cache and cache_dir is not None
    )
    batcher = _Batcher(features, enc.encode, cache, batch_size, enc.name)
    reasons = list(content.reasons)
    cached = 0
    try:
        with _progress(n, f"{source.modality}: encoding", progress) as advance:
            for i, ref in enumerate(content.refs):
                advance(1)
                if ref is None:
                    continue
                try:
                    key, payload = source.fetch(ref, content.shown[i])
                    if batcher.known(i, key):
                        continue
                    hit = cache.get(key)
                    if hit is not None:
                        features[i] = hit
                        cached += 1
                        continue
                    value = source.decode(payload, content.shown[i])
                except MissingContent as exc:
                    reasons[i] = str(exc)
                    continue
                if batcher.add(i, key, value):
                    batcher.flush()
            batcher.flush()
    finally:
        cache.save()
    for r in batcher.bad_rows:
        reasons[r] = "encoder returned non-finite values" + (f": {content.shown[r]}" if content.shown[r] else "")
    missing = [MissingItem(i, items.ids[i], reasons[i]) for i in range(n) if np.isnan(features[i]).all()]
    return ModalityResult(
        source.modality,
        source.kind,
        features,
        missing,
        batcher.encoded,
        cached,
        enc.name,
        enc.cache_id,
        time.perf_counter() - t0,
        source.describe(),
        load_seconds,
        batcher.unique,
    )


def extract_features(
    items_path: str | Path,
    id_column: str,
    source: ModalitySource,
    out: str | Path,
    *,
    encoder: str | Encoder | None = None,
    items_fmt: TableFormat | None = None,
    device: str = "cpu",
    batch_size: int | None = None,
    use_cache: bool = True,
    progress: bool = True,
    log: Log | None = None,
) -> tuple[ModalityResult, dict[str, Any]]:
    """Read an items table, encode one modality and write ``<modality>_feat.npy``, ids and report into ``out``.

    Parameters
    ----------
    items_path, id_column:
        Items table and id column.
    source:
        Where each item's content comes from, and the modality name.
    out:
        Output folder (the cache lives in ``out/feature_cache``).
    encoder:
        Encoder name, model path or object (the source's default when None).
    items_fmt:
        Reading options of the items table.
    device, batch_size, use_cache, progress:
        See :func:`encode_modality`.
    log:
        Receives warnings.

    Returns
    -------
    result, report
        The encoded modality and the report written.
    """
    items = read_items(items_path, id_column, items_fmt)
    result = encode_modality(
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
