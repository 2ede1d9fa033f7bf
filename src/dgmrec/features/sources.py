"""Modality sources: what to read per item for one modality, how to fetch it and how to decode it.

A source names where each item's content of one modality comes from (a text column, one file per item, ...)
and its ``kind`` (``text``, ``image``, ...), which selects the encoders that apply and the feature cache. The
one encode path (:func:`dgmrec.features.pipeline.encode_modality`) asks a source to

1. ``collect`` a reference per item (or the reason it has none),
2. ``fetch`` an item's content with its cache key (content hash), and
3. ``decode`` the content into what the encoder takes, only for content the cache does not hold.

An unusable item raises :class:`MissingContent` with the reason, which the missing-content report lists.
Another content type (e.g. audio files) is another source class: a subclass of :class:`FileSource` that says
how to decode its files, with encoders registered for its kind (:func:`dgmrec.features.encoders.register_encoder`).
"""

from __future__ import annotations

import io
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from dgmrec.data.raw import require_columns
from dgmrec.errors import DataError, InputError
from dgmrec.features.cache import bytes_key, text_key
from dgmrec.features.encoders import (
    DEFAULT_IMAGE_ENCODER,
    DEFAULT_TEXT_ENCODER,
    Encoder,
    load_encoder,
    require_module,
)
from dgmrec.features.tables import ItemsTable


class MissingContent(Exception):
    """One item's content of one modality is unusable; the message is the reason shown in the report."""


@dataclass
class Collected:
    """A source's reference to every item's content, before anything is read.

    Attributes
    ----------
    refs:
        Per item, what :meth:`ModalitySource.fetch` takes (a text, a file path, ...), or None when the item has
        no content.
    shown:
        Per item, how its content is named in reasons (a path as written; empty when there is nothing to name).
    reasons:
        Per item, why ``refs[i]`` is None (empty otherwise).
    none_hint:
        What to tell the user when no item has content.
    """

    refs: list[Any | None]
    shown: list[str]
    reasons: list[str]
    none_hint: str

    @property
    def present(self) -> int:
        """Number of items with a reference."""
        return sum(r is not None for r in self.refs)


class ModalitySource(ABC):
    """Where the content of one modality comes from, and how to turn it into encoder inputs.

    Subclasses are frozen dataclasses with a ``modality`` field (the output name, ``<modality>_feat.npy``) and
    set the class attributes ``kind`` (encoder registry and cache name), ``default_encoder`` and
    ``default_batch_size``.
    """

    kind: ClassVar[str]
    default_encoder: ClassVar[str | None] = None
    default_batch_size: ClassVar[int] = 32
    modality: str

    @abstractmethod
    def collect(self, items: ItemsTable) -> Collected:
        """The reference to every item's content (nothing is encoded yet)."""

    @abstractmethod
    def fetch(self, ref: Any, shown: str) -> tuple[str, Any]:
        """The cache key (content hash) and the content of one item; raises :class:`MissingContent`."""

    def decode(self, payload: Any, shown: str) -> Any:
        """Turn fetched content into one encoder input (identity by default); raises :class:`MissingContent`."""
        return payload

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """The source's settings, as stored in the missing-content report."""

    def load_encoder(self, spec: str | Encoder | None, device: str) -> Encoder:
        """Resolve an encoder name, path or object for this kind of content (the default one when None)."""
        spec = self.default_encoder if spec is None else spec
        if spec is None:
            raise InputError(f"give an encoder for {self.kind} content", source="--encoder")
        return load_encoder(self.kind, spec, device)


# ------------------------------------------------------------------------------------------------ helpers
def check_location(kind: str, has_column: bool, folder: Path | None, *, repeatable: bool = False) -> None:
    """Require exactly one of a content column (``--<kind>-column``) and a folder (``--<kind>-dir``).

    Parameters
    ----------
    kind:
        Content kind (option names are ``--<kind>-column`` and ``--<kind>-dir``).
    has_column:
        Whether a column is given.
    folder:
        The folder, or None.
    repeatable:
        Whether ``--<kind>-column`` may be repeated (said in the message).
    """
    if has_column and folder is not None:
        raise InputError(f"give --{kind}-column or --{kind}-dir, not both", source=f"--{kind}-dir")
    if not has_column and folder is None:
        more = " (repeatable)" if repeatable else ""
        raise InputError(f"give --{kind}-column{more} or --{kind}-dir", source=f"features {kind}")


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


def collect_files(
    items: ItemsTable, column: str | None, folder: Path | None, pattern: str, kind: str
) -> Collected:
    """The existing content file of every item, from a path column or from ``folder / pattern``.

    Parameters
    ----------
    items:
        The items table; relative paths in ``column`` resolve against its folder.
    column:
        Column holding a path per item (empty = no file), or None to use ``folder`` and ``pattern``.
    folder, pattern:
        Folder of the files and file-name pattern with ``{id}``.
    kind:
        Content kind, for reasons and option names (``--<kind>-column``, ``--<kind>-pattern``).

    Returns
    -------
    Collected
        Paths of existing files (None: no path, or the file is not found, with the reason), paths as written.
    """
    n = len(items)
    paths: list[Path | None] = [None] * n
    shown = [""] * n
    reasons = [""] * n
    if column:
        require_columns(items.frame, {column: f"--{kind}-column"}, str(items.path))
        for i, value in enumerate(items.frame[column].astype(str).to_numpy()):
            value = str(value).strip()
            if not value:
                reasons[i] = f"no {kind} path"
                continue
            p = Path(value).expanduser()
            paths[i] = p if p.is_absolute() else items.folder / p
            shown[i] = value
    elif folder is not None:
        base = Path(folder)
        if not base.is_dir():
            raise DataError(f"{kind} folder not found", source=str(base))
        for i, item_id in enumerate(items.ids):
            shown[i] = format_pattern(pattern, item_id, f"--{kind}-pattern")
            paths[i] = base / shown[i]
    else:
        check_location(kind, False, None)  # raises: neither a column nor a folder
    for i, p in enumerate(paths):
        if p is not None and not p.is_file():
            paths[i] = None
            reasons[i] = f"{kind} file not found: {shown[i]}"
    hint = f"no {kind} file found, e.g. {shown[0] or 'no path'}; check the {kind} folder and pattern"
    return Collected(list(paths), shown, reasons, hint)


def read_content_file(path: Path, shown: str, kind: str) -> bytes:
    """The bytes of one item's content file; an unreadable file raises :class:`MissingContent`."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise MissingContent(f"{kind} file unreadable: {shown} ({exc.strerror or exc})") from None


# ----------------------------------------------------------------------------------------------- sources
class FileSource(ModalitySource):
    """Content in one file per item: a path column (relative to the items table's folder) or ``folder/pattern``.

    Cache keys are hashes of the files' bytes, so a file is decoded only when its vector is not cached.
    Subclasses are frozen dataclasses with the fields ``column``, ``pattern`` and ``modality``, expose their
    folder field as :attr:`folder`, and implement :meth:`decode`.
    """

    column: str | None
    pattern: str

    @property
    @abstractmethod
    def folder(self) -> Path | None:
        """Folder of the files (used with ``pattern`` when no column is given)."""

    def __post_init__(self) -> None:
        check_location(self.kind, bool(self.column), self.folder)

    def collect(self, items: ItemsTable) -> Collected:
        return collect_files(items, self.column, self.folder, self.pattern, self.kind)

    def fetch(self, ref: Path, shown: str) -> tuple[str, bytes]:
        data = read_content_file(ref, shown, self.kind)
        return bytes_key(data), data

    @abstractmethod
    def decode(self, payload: bytes, shown: str) -> Any:
        """Decode one file's bytes; raise :class:`MissingContent` for a corrupt file."""

    def describe(self) -> dict[str, Any]:
        if self.column:
            return {"column": self.column}
        return {f"{self.kind}_dir": str(self.folder), "pattern": self.pattern}


@dataclass(frozen=True)
class TextSource(ModalitySource):
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
    kind: ClassVar[str] = "text"
    default_encoder: ClassVar[str | None] = DEFAULT_TEXT_ENCODER
    default_batch_size: ClassVar[int] = 64

    def __post_init__(self) -> None:
        check_location(self.kind, bool(self.columns), self.text_dir, repeatable=True)

    def collect(self, items: ItemsTable) -> Collected:
        """The stripped text of every item (texts are read here: their hash is the cache key)."""
        if self.columns:
            return self._collect_columns(items)
        files = collect_files(items, None, self.text_dir, self.pattern, self.kind)
        texts: list[Any | None] = [None] * len(items)
        for i, path in enumerate(files.refs):
            if path is None:
                continue
            try:
                raw = read_content_file(path, files.shown[i], self.kind)
            except MissingContent as exc:
                files.reasons[i] = str(exc)
                continue
            text = self._decode_text(raw, path)
            if text:
                texts[i] = text
            else:
                files.reasons[i] = f"empty text file: {files.shown[i]}"
        return Collected(texts, files.shown, files.reasons, "every text is empty or missing")

    def _collect_columns(self, items: ItemsTable) -> Collected:
        n = len(items)
        texts: list[Any | None] = [None] * n
        reasons = [""] * n
        require_columns(items.frame, {c: "--text-column" for c in self.columns}, str(items.path))
        cols = [items.frame[c].astype(str).to_numpy() for c in self.columns]
        for i in range(n):
            joined = "\n".join(p for p in (str(col[i]).strip() for col in cols) if p)
            if joined:
                texts[i] = joined
            else:
                reasons[i] = "empty text" if len(cols) == 1 else f"empty text in {', '.join(self.columns)}"
        return Collected(texts, [""] * n, reasons, "every text is empty or missing")

    def _decode_text(self, raw: bytes, path: Path) -> str:
        try:
            return raw.decode(self.encoding).lstrip("\ufeff").strip()
        except UnicodeDecodeError as exc:
            raise DataError(
                f"not valid {self.encoding} text ({exc.reason} at byte {exc.start}); convert the "
                "file or pass --text-encoding",
                source=str(path),
            ) from None
        except LookupError:
            raise InputError(f"unknown text encoding {self.encoding!r}", source="--text-encoding") from None

    def fetch(self, ref: str, shown: str) -> tuple[str, str]:
        return text_key(ref), ref

    def describe(self) -> dict[str, Any]:
        if self.columns:
            return {"columns": list(self.columns)}
        return {"text_dir": str(self.text_dir), "pattern": self.pattern}


@dataclass(frozen=True)
class ImageSource(FileSource):
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
    kind: ClassVar[str] = "image"
    default_encoder: ClassVar[str | None] = DEFAULT_IMAGE_ENCODER
    default_batch_size: ClassVar[int] = 32

    @property
    def folder(self) -> Path | None:
        return self.image_dir

    def decode(self, payload: bytes, shown: str) -> Any:
        image, why = decode_image(payload)
        if image is None:
            raise MissingContent(f"{why}: {shown}")
        return image


def decode_image(data: bytes) -> tuple[Any | None, str]:
    """Decode image bytes to an RGB ``PIL.Image`` (EXIF rotation applied, transparency on white).

    Parameters
    ----------
    data:
        Content of an image file.

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
        msg = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", msg)  # no object reprs with memory addresses
        return None, f"unreadable image ({type(exc).__name__}{': ' + msg if msg else ''})"
