"""Content-hash cache of encoded feature vectors, kept beside the outputs so re-runs only encode what changed.

One cache per encoder and content kind: ``<folder>/<kind>-<encoder digest>.npz`` (``keys``: SHA-256 hex of the
content; ``vectors``: float32) plus a ``.json`` naming the encoder. Plain NumPy/JSON, never pickle.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path

import numpy as np

CACHE_DIR_NAME = "feature_cache"
_FORMAT = 1


def text_key(text: str) -> str:
    """Cache key of a text: SHA-256 of its UTF-8 bytes.

    Parameters
    ----------
    text:
        The text, as given to the encoder.

    Returns
    -------
    str
        Hex digest.
    """
    return hashlib.sha256(b"text\0" + text.encode("utf-8")).hexdigest()


def bytes_key(data: bytes) -> str:
    """Cache key of a file's content: SHA-256 of its bytes.

    Parameters
    ----------
    data:
        The file's bytes.

    Returns
    -------
    str
        Hex digest.
    """
    return hashlib.sha256(b"file\0" + data).hexdigest()


class FeatureCache:
    """Vectors of one encoder keyed by content hash, loaded from and saved to a folder.

    Parameters
    ----------
    folder:
        Cache folder (created on save).
    kind:
        ``text`` or ``image`` (part of the file name).
    encoder_id:
        The encoder's ``cache_id``; vectors of another encoder are never mixed in.
    dim:
        Vector size.
    enabled:
        When False nothing is read or written.
    """

    def __init__(self, folder: str | Path, kind: str, encoder_id: str, dim: int, *, enabled: bool = True) -> None:
        self.folder = Path(folder)
        self.kind = kind
        self.encoder_id = encoder_id
        self.dim = int(dim)
        self.enabled = enabled
        digest = hashlib.sha256(encoder_id.encode("utf-8")).hexdigest()[:16]
        stem = f"{re.sub(r'[^A-Za-z0-9_-]+', '_', kind)}-{digest}"
        self.path = self.folder / f"{stem}.npz"
        self.meta_path = self.folder / f"{stem}.json"
        self._stored: dict[str, int] = {}
        self._stored_vectors = np.zeros((0, self.dim), dtype=np.float32)
        self._new: dict[str, np.ndarray] = {}
        if enabled:
            self._load()

    def _load(self) -> None:
        if not self.path.is_file():
            return
        try:
            meta = json.loads(self.meta_path.read_text(encoding="utf-8"))
            with np.load(self.path, allow_pickle=False) as z:
                keys = [str(k) for k in z["keys"]]
                vectors = np.asarray(z["vectors"], dtype=np.float32)
        except Exception as exc:  # a damaged cache only costs re-encoding
            warnings.warn(f"{self.path}: ignoring unreadable feature cache ({type(exc).__name__}: {exc})", stacklevel=2)
            return
        if meta.get("encoder") != self.encoder_id or vectors.shape != (len(keys), self.dim):
            warnings.warn(f"{self.path}: ignoring feature cache of another encoder or size", stacklevel=2)
            return
        self._stored = {k: i for i, k in enumerate(keys)}
        self._stored_vectors = vectors

    def __len__(self) -> int:
        return len(self._stored) + sum(1 for k in self._new if k not in self._stored)

    def get(self, key: str) -> np.ndarray | None:
        """The cached vector of ``key``, or None.

        Parameters
        ----------
        key:
            Content hash.

        Returns
        -------
        numpy.ndarray or None
            A float32 vector of length ``dim``.
        """
        if not self.enabled:
            return None
        if key in self._new:
            return self._new[key]
        i = self._stored.get(key)
        return None if i is None else self._stored_vectors[i]

    def put(self, key: str, vector: np.ndarray) -> None:
        """Remember ``vector`` for ``key`` (written by :meth:`save`).

        Parameters
        ----------
        key:
            Content hash.
        vector:
            Float vector of length ``dim``.
        """
        if self.enabled and key not in self._stored:
            self._new[key] = np.asarray(vector, dtype=np.float32).reshape(self.dim)

    @property
    def dirty(self) -> bool:
        """Whether there are vectors not yet written."""
        return bool(self._new)

    def save(self) -> None:
        """Write all vectors (old and new) atomically (no-op when nothing is new or disabled)."""
        if not self.enabled or not self._new:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        new_keys = [k for k in self._new if k not in self._stored]
        keys = list(self._stored) + new_keys
        vectors = (
            np.concatenate([self._stored_vectors, np.stack([self._new[k] for k in new_keys]).astype(np.float32)])
            if new_keys
            else self._stored_vectors
        )
        tmp = self.path.with_name(self.path.stem + ".tmp.npz")
        np.savez(tmp, keys=np.asarray(keys, dtype="<U64"), vectors=vectors)
        meta = {
            "format": _FORMAT,
            "encoder": self.encoder_id,
            "kind": self.kind,
            "dim": self.dim,
            "entries": len(keys),
        }
        tmp_meta = self.meta_path.with_name(self.meta_path.name + ".tmp")
        tmp_meta.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        tmp.replace(self.path)
        tmp_meta.replace(self.meta_path)
        self._stored = {k: i for i, k in enumerate(keys)}
        self._stored_vectors = vectors
        self._new = {}
