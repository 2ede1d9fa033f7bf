"""Encoding content handed over in memory (an item's text, a file's bytes) the way a dataset folder was built.

``dgmrec features`` and ``dgmrec dataset build`` record in the folder's missing-content report
(``missing_content.json``) how every modality was built: its content kind (``text``, ``image``, ...) and its
encoder (name and cache identity). :func:`encode_given` encodes new contents of such a modality through the one
encode path of the build: the contents become an items table (texts in a column, file contents as files of a
scratch folder) read by the kind's own source class, and :func:`~dgmrec.features.pipeline.encode_modality`
decodes them and runs the recorded encoder, so a content gets the vector the build gave it (same text
cleaning, image decoding and preprocessing, same encoder). Encoders are loaded on first use and kept for the
life of the process (:func:`recorded_encoder`).
"""

from __future__ import annotations

import inspect
import json
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dgmrec.errors import DataError, InputError
from dgmrec.features.encoders import Encoder, load_encoder
from dgmrec.features.output import REPORT_JSON
from dgmrec.features.pipeline import encode_modality
from dgmrec.features.sources import FileSource, ModalitySource, TextSource
from dgmrec.features.tables import ItemsTable

_COLUMN = "content"


@dataclass(frozen=True)
class BuiltModality:
    """How one modality of a dataset folder was built, as its missing-content report records it.

    Attributes
    ----------
    modality:
        The modality (``<modality>_feat.npy``).
    kind:
        Content kind of its source (``text``, ``image``, ...).
    encoder:
        The encoder's name (a registered name, or the model path it was loaded from).
    encoder_id:
        The encoder's identity (its cache id): the encoder loaded again must have it.
    dim:
        Feature width.
    """

    modality: str
    kind: str
    encoder: str
    encoder_id: str
    dim: int

    @property
    def takes_text(self) -> bool:
        """Whether a content of this modality is a text (a string); otherwise it is a file's bytes."""
        return issubclass(source_class(self.kind), TextSource)


def built_modalities(folder: str | Path) -> dict[str, BuiltModality]:
    """The modalities of a dataset folder that the features pipeline built; empty when the folder has no
    missing-content report (features made elsewhere, e.g. precomputed ones). A report is read once per version
    of the file (its modification time and size).

    Parameters
    ----------
    folder:
        The dataset folder.

    Returns
    -------
    dict
        Modality -> how it was built.
    """
    path = Path(folder) / REPORT_JSON
    try:
        stat = path.stat()
    except OSError:
        return {}
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    hit = _READ.get(key)
    if hit is None:
        hit = _READ[key] = _read_report(path)
    return dict(hit)


_READ: dict[tuple[str, int, int], dict[str, BuiltModality]] = {}  # reports read, by file and version


def _read_report(path: Path) -> dict[str, BuiltModality]:
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        entries = report["modalities"]
        return {str(m): BuiltModality(str(m), str(e["kind"]), str(e["encoder"]), str(e["encoder_id"]), int(e["dim"]))
                for m, e in entries.items()}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"unreadable missing-content report ({exc})", source=str(path)) from None
    except (KeyError, TypeError, ValueError, AttributeError):
        raise DataError("a modality entry lacks its kind, encoder, encoder_id or dim", source=str(path)) from None


def source_class(kind: str) -> type[ModalitySource]:
    """The source class that reads ``kind`` content: the built-in text and image sources, or a
    :class:`~dgmrec.features.sources.FileSource` subclass defined in this process (the first one found)."""
    todo: list[type[ModalitySource]] = [ModalitySource]
    while todo:
        cls = todo.pop(0)
        if not inspect.isabstract(cls) and issubclass(cls, (TextSource, FileSource)) and \
                getattr(cls, "kind", None) == kind:
            return cls
        todo.extend(cls.__subclasses__())
    raise InputError(f"no source class reads {kind!r} content in this process (texts, and files of the image "
                     "kind or of a FileSource subclass, can be encoded)")


# ------------------------------------------------------------------------------------------------ encoders
_LOADED: dict[tuple[str, str, str, str], tuple[Encoder, threading.Lock]] = {}
_LOADING = threading.Lock()


def recorded_encoder(built: BuiltModality, device: str = "cpu") -> tuple[Encoder, threading.Lock]:
    """The encoder ``built`` records, loaded once per process (on first use) and kept, with the lock that
    serialises its use.

    Parameters
    ----------
    built:
        The modality's record.
    device:
        Torch device of built-in encoders.

    Returns
    -------
    encoder, lock
        The encoder, whose identity and width are the recorded ones, and its lock.
    """
    key = (built.kind, built.encoder, built.encoder_id, device)
    with _LOADING:
        hit = _LOADED.get(key)
        if hit is not None:
            return hit
        try:
            enc = load_encoder(built.kind, built.encoder, device)
        except InputError as exc:
            raise InputError(f"cannot load the {built.kind} encoder {built.encoder!r} the dataset's '{built.modality}' "
                             f"features were built with ({_reason(exc)})") from None
        if enc.cache_id != built.encoder_id or int(enc.dim) != built.dim:
            raise InputError(f"the {built.kind} encoder {built.encoder!r} found here (identity {enc.cache_id!r}, "
                             f"{enc.dim}-d) is not the one the dataset's '{built.modality}' features were built with "
                             f"({built.encoder_id!r}, {built.dim}-d)")
        _LOADED[key] = hit = (enc, threading.Lock())
        return hit


def _reason(exc: InputError) -> str:
    """An error's message without the field it names."""
    text = str(exc)
    return text.removeprefix(f"{exc.source}: ") if exc.source else text


# ------------------------------------------------------------------------------------------------ encoding
def _given_items(contents: Sequence[str | bytes | None], scratch: Path, as_files: bool) -> ItemsTable:
    """The contents as an items table with one ``content`` column: the texts, or the names of files holding the
    bytes in ``scratch`` (empty where there is no content)."""
    values = []
    for k, content in enumerate(contents):
        if content is None:
            values.append("")
        elif as_files:
            (scratch / str(k)).write_bytes(bytes(content))
            values.append(str(k))
        else:
            values.append(str(content))
    ids = [str(k) for k in range(len(contents))]
    frame = pd.DataFrame({"id": ids, _COLUMN: values}, dtype=str)
    return ItemsTable(frame=frame, ids=ids, path=scratch / "given.csv", id_column="id")


def encode_given(built: BuiltModality, contents: Sequence[str | bytes | None], fields: Sequence[str],
                 device: str = "cpu") -> np.ndarray:
    """Encode contents of one modality as the dataset folder's were encoded.

    Parameters
    ----------
    built:
        How the modality was built (:func:`built_modalities`).
    contents:
        Per item: a text (text kinds), a file's bytes (file kinds), or None for none.
    fields:
        Per item, how its content is named in errors (``items[0].content.image``).
    device:
        Torch device of built-in encoders.

    Returns
    -------
    np.ndarray
        ``(len(contents), dim)`` float32, the encoder's vectors (the space of ``<modality>_feat.npy``); NaN rows
        where the content is None.

    Raises
    ------
    InputError
        Naming the field: content of the wrong type, content that does not decode (an empty text, a corrupt
        image), a missing ``features`` extra, an encoder that is not available here or not the recorded one.
    """
    if len(fields) != len(contents):
        raise ValueError("one field name per content")
    given = [k for k, c in enumerate(contents) if c is not None]
    out = np.full((len(contents), built.dim), np.nan, dtype=np.float32)
    if not given:
        return out
    first = fields[given[0]]
    try:
        cls = source_class(built.kind)
        as_files = issubclass(cls, FileSource)
        for k in given:
            if not isinstance(contents[k], bytes if as_files else str):
                raise InputError(f"expected {'bytes' if as_files else 'a text'}, got {type(contents[k]).__name__}",
                                 source=fields[k])
        # the kind's own source, reading the content column (file kinds: file names in the scratch folder)
        options = {"column": _COLUMN} if as_files else {"columns": (_COLUMN,)}
        source = cls(modality=built.modality, **options)  # type: ignore[call-arg]
        encoder, lock = recorded_encoder(built, device)
        with tempfile.TemporaryDirectory(prefix="dgmrec-given-") as scratch:
            items = _given_items(contents, Path(scratch), as_files)
            collected = source.collect(items)
            unusable = next((k for k in given if collected.refs[k] is None), None)
            if unusable is not None:
                raise InputError(collected.reasons[unusable], source=fields[unusable])
            with lock:
                result = encode_modality(items, source, encoder, device=device, use_cache=False, progress=False)
    except InputError as exc:
        if exc.source in fields:
            raise
        raise InputError(_reason(exc), source=first) from None
    for miss in result.missing:
        if contents[miss.row] is not None:
            shown = collected.shown[miss.row]
            reason = miss.reason.removesuffix(f": {shown}") if shown else miss.reason
            raise InputError(reason, source=fields[miss.row])
    rows = np.asarray(given)
    out[rows] = result.features[rows]
    return out
