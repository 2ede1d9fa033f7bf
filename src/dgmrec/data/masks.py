"""Observed-modality masks: reading, writing and generating them.

Formats read:

* the reference's pickled dict of item-id arrays keyed by the set of *missing* modality letters
  (``t v all`` for two modalities, ``t v a tv ta va all`` for three). The file is read with a restricted
  unpickler that accepts only NumPy arrays, dtypes, dicts, lists and plain values; anything else is rejected,
  and what it accepts is capped by the catalogue size (see :func:`load_pickled_mask_dict`).
* the project's plain format: an ``.npz`` with ``observed`` (bool, items x modalities) and ``modalities``
  (unicode names), loaded with ``allow_pickle=False``;
* all-NaN rows of a feature matrix (real missing content).

Generated masks follow the reference recipe (see :func:`generate_missing_mask`).
"""

from __future__ import annotations

import io
import itertools
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from dgmrec.errors import DataError

DEFAULT_LETTERS: dict[str, str] = {"t": "text", "v": "image", "a": "audio"}

# The only globals a mask pickle may reference: NumPy's array reconstruction machinery.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, stream: io.BufferedIOBase, source: str) -> None:
        super().__init__(stream)
        self._source = source

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise DataError(
            f"mask pickle references {module}.{name}; only NumPy arrays and dicts are allowed",
            source=self._source,
        )


#: a mask lists every item at most once: besides a fixed allowance for the pickle's framing, a mask file needs at
#: most this many bytes per catalogue item (an int64 id takes 8)
_PICKLE_BYTES_PER_ITEM = 16
_PICKLE_BASE_BYTES = 1 << 16


def load_pickled_mask_dict(path: str | Path, n_items: int) -> dict[str, np.ndarray]:
    """Read a reference mask file (``np.save`` of a dict, or a plain pickle) without running its code.

    What it accepts is capped by the catalogue of ``n_items`` items: the file size (:data:`_PICKLE_BYTES_PER_ITEM`
    bytes per item plus a fixed allowance), flat lists or 1-D arrays of integer ids only (no nesting, whose shared
    references let a tiny pickle expand into millions of ids), ids in ``0..n_items-1`` and at most ``n_items`` ids
    in all (an item is listed under one key at most).
    """
    path = Path(path)
    src = str(path)
    limit = _PICKLE_BASE_BYTES + _PICKLE_BYTES_PER_ITEM * int(n_items)
    try:
        size = path.stat().st_size
        if size > limit:
            raise DataError(f"mask file has {size} bytes, more than a mask of {n_items} items needs ({limit})",
                            source=src)
        with path.open("rb") as f:
            head = f.read(6)
            f.seek(0)
            if head == b"\x93NUMPY":
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    _shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    _shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                if dtype != np.dtype(object):
                    raise DataError("expected a pickled dict of item-id arrays, found a plain array", source=src)
            obj = _RestrictedUnpickler(f, src).load()
    except DataError:
        raise
    except OSError as exc:
        raise DataError(f"cannot read mask file ({exc.strerror or exc})", source=src) from None
    except Exception as exc:  # any corruption inside the pickle stream
        raise DataError(f"not a valid mask pickle ({type(exc).__name__}: {exc})", source=src) from None
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        obj = obj.item()
    if not isinstance(obj, dict):
        raise DataError(f"mask pickle holds a {type(obj).__name__}, expected a dict", source=src)
    out: dict[str, np.ndarray] = {}
    total = 0
    for key, value in obj.items():
        if not isinstance(key, str):
            raise DataError(f"mask key {key!r} is not a string", source=src)
        ids = _flat_ids(value, key, n_items, src)
        total += len(ids)
        if total > n_items:
            raise DataError(f"mask lists more item ids ({total} up to key '{key}') than there are items ({n_items})",
                            source=src)
        bad = ids[(ids < 0) | (ids >= n_items)]
        if len(bad):
            raise DataError(f"mask key '{key}' has item id {bad[0]} out of range 0..{n_items - 1}", source=src)
        out[key] = ids
    return out


def _flat_ids(value: object, key: str, n_items: int, src: str) -> np.ndarray:
    """The item ids of one mask key: a flat list/tuple of integers or a 0-/1-D integer array, at most ``n_items``."""
    if isinstance(value, np.ndarray) and value.dtype != object:
        if value.ndim > 1:
            raise DataError(f"mask key '{key}' holds a nested ({value.ndim}-D) array, expected a flat list of ids",
                            source=src)
        if value.size > n_items:
            raise DataError(f"mask key '{key}' lists {value.size} ids, more than there are items ({n_items})",
                            source=src)
        if value.dtype.kind not in "iu" and value.size:
            raise DataError(f"mask key '{key}' holds {value.dtype} values, expected item ids", source=src)
        return value.astype(np.int64).ravel()
    if isinstance(value, np.ndarray):  # object array: check its elements like a list's
        if value.ndim > 1:
            raise DataError(f"mask key '{key}' holds a nested ({value.ndim}-D) array, expected a flat list of ids",
                            source=src)
        value = value.ravel().tolist()
    if not isinstance(value, list | tuple):
        raise DataError(f"mask key '{key}' holds a {type(value).__name__}, expected a list or array of item ids",
                        source=src)
    if len(value) > n_items:
        raise DataError(f"mask key '{key}' lists {len(value)} ids, more than there are items ({n_items})", source=src)
    for v in value:
        if isinstance(v, list | tuple | dict | set | np.ndarray):
            raise DataError(f"mask key '{key}' holds a nested {type(v).__name__}, expected a flat list of ids",
                            source=src)
        if isinstance(v, bool) or not isinstance(v, int | np.integer):
            raise DataError(f"mask key '{key}' holds {type(v).__name__} values, expected item ids", source=src)
    return np.asarray(value, dtype=np.int64).ravel()


def _letters_for_key(key: str, all_letters: str) -> str:
    return all_letters if key == "all" else key


def mask_from_key_dict(
    groups: Mapping[str, np.ndarray],
    n_items: int,
    modalities: Sequence[str],
    letters: Mapping[str, str] | None = None,
    source: str = "mask",
) -> np.ndarray:
    """Turn a ``{missing-letters: item ids}`` dict into an ``(n_items, M)`` observed mask.

    Letters whose modality is not among ``modalities`` are ignored (e.g. the ``t`` of a TikTok mask used as
    image + audio). ``all`` means every letter that appears in the dict's other keys (or the letter map).
    """
    letters = dict(DEFAULT_LETTERS if letters is None else letters)
    key_letters = sorted({c for k in groups if k != "all" for c in k})
    for c in key_letters:
        if c not in letters:
            raise DataError(
                f"mask key letter '{c}' has no modality; map it with --mask-letters (known: "
                f"{', '.join(f'{k}={v}' for k, v in letters.items())})",
                source=source,
            )
    known_keys = {"all"} | {"".join(c) for r in range(1, len(letters) + 1) for c in itertools.permutations(letters, r)}
    for k in groups:
        if k not in known_keys:
            raise DataError(f"unknown mask key '{k}' (keys name the missing modalities, e.g. t, v, tv, all)",
                            source=source)
    all_letters = "".join(key_letters) if key_letters else "".join(letters)
    col = {name: j for j, name in enumerate(modalities)}
    observed = np.ones((n_items, len(modalities)), dtype=bool)
    seen = np.zeros(n_items, dtype=bool)
    for key, ids in groups.items():
        if len(ids) and (ids.min() < 0 or ids.max() >= n_items):
            bad = ids[(ids < 0) | (ids >= n_items)][0]
            raise DataError(f"mask key '{key}' has item id {bad} out of range 0..{n_items - 1}", source=source)
        if seen[ids].any():
            raise DataError(f"mask key '{key}' lists an item that another key also lists", source=source)
        seen[ids] = True
        for c in _letters_for_key(key, all_letters):
            name = letters[c]
            if name in col:
                observed[ids, col[name]] = False
    return observed


def mask_to_key_dict(observed: np.ndarray, modalities: Sequence[str],
                     letters: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
    """Inverse of :func:`mask_from_key_dict` (for exporting to the reference format)."""
    letters = dict(DEFAULT_LETTERS if letters is None else letters)
    inverse = {v: k for k, v in letters.items()}
    missing_letters = []
    for name in modalities:
        if name not in inverse:
            raise DataError(f"modality '{name}' has no mask letter", source="mask")
        missing_letters.append(inverse[name])
    out: dict[str, list[int]] = {}
    for i in np.flatnonzero(~observed.all(axis=1)):
        miss = [missing_letters[j] for j in np.flatnonzero(~observed[i])]
        key = "all" if len(miss) == len(modalities) else "".join(miss)
        out.setdefault(key, []).append(int(i))
    return {k: np.asarray(v, dtype=np.int64) for k, v in out.items()}


def save_plain_mask(path: str | Path, observed: np.ndarray, modalities: Sequence[str]) -> None:
    """Write the project's plain mask format (``.npz``, no pickle)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, observed=observed.astype(bool), modalities=np.asarray(list(modalities), dtype=str))
    tmp.replace(path)


def load_plain_mask(path: str | Path) -> tuple[np.ndarray, list[str]]:
    src = str(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            if "observed" not in z or "modalities" not in z:
                raise DataError("plain mask must contain 'observed' and 'modalities'", source=src)
            observed = np.asarray(z["observed"]).astype(bool)
            modalities = [str(m) for m in z["modalities"]]
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot read plain mask ({type(exc).__name__}: {exc})", source=src) from None
    if observed.ndim != 2 or observed.shape[1] != len(modalities):
        raise DataError(f"observed has shape {observed.shape} for {len(modalities)} modalities", source=src)
    return observed, modalities


def read_mask_file(
    path: str | Path,
    n_items: int,
    modalities: Sequence[str],
    letters: Mapping[str, str] | None = None,
) -> np.ndarray:
    """Read either mask format and return the observed mask aligned with ``modalities``."""
    path = Path(path)
    if not path.is_file():
        raise DataError("mask file not found", source=str(path))
    with path.open("rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        observed, names = load_plain_mask(path)
        if observed.shape[0] != n_items:
            raise DataError(f"mask has {observed.shape[0]} items, the dataset {n_items}", source=str(path))
        out = np.ones((n_items, len(modalities)), dtype=bool)
        for j, name in enumerate(modalities):
            if name in names:
                out[:, j] = observed[:, names.index(name)]
        return out
    groups = load_pickled_mask_dict(path, n_items)
    return mask_from_key_dict(groups, n_items, modalities, letters, source=str(path))


def parse_letters(spec: str | None) -> dict[str, str]:
    """Parse ``"t=text,v=image,a=audio"`` into a letter map (default when ``spec`` is empty)."""
    if not spec:
        return dict(DEFAULT_LETTERS)
    out: dict[str, str] = {}
    for part in spec.split(","):
        if "=" not in part:
            raise DataError(f"expected letter=modality, got {part!r}", source="--mask-letters")
        k, v = (s.strip() for s in part.split("=", 1))
        if len(k) != 1 or not v:
            raise DataError(f"expected a single letter and a modality name, got {part!r}", source="--mask-letters")
        out[k] = v
    return out


# ---------------------------------------------------------------------------------------------- generators
def cold_warm_groups(train_counts: np.ndarray, cold_fraction: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """Split items into the cold group (the ``cold_fraction`` with the fewest training interactions) and warm.

    Items are sorted by training count with a stable sort, so ties keep id order.
    """
    order = np.argsort(train_counts, kind="stable")
    n_cold = int(len(order) * cold_fraction)
    return np.sort(order[:n_cold]), np.sort(order[n_cold:])


def draw_new_items(train_counts: np.ndarray, fraction: float = 0.2, seed: int = 1111,
                   cold_fraction: float = 0.7) -> np.ndarray:
    """Reference new-item draw: ``fraction`` of the cold group and of the warm group, without replacement."""
    rng = np.random.default_rng(seed)
    new = np.zeros(len(train_counts), dtype=bool)
    for group in cold_warm_groups(train_counts, cold_fraction):
        k = round(len(group) * fraction)
        new[rng.choice(group, size=k, replace=False)] = True
    return new


def generate_missing_mask(
    train_counts: np.ndarray,
    n_modalities: int,
    ratio: float,
    seed: int = 1225,
    new_items: np.ndarray | None = None,
    new_seed: int = 1111,
) -> np.ndarray:
    """Generate an observed mask with the reference recipe, generalised to M modalities.

    1. Stratify items into four groups: {new, old} x {cold, warm} (cold = the 70 % of items with the fewest
       training interactions; new = 20 % of each of cold and warm drawn with ``new_seed``, or ``new_items``).
    2. With ``seed``, draw ``round(ratio * |group|)`` items of each group, without replacement.
    3. Split each group's draw (in drawn order) into M consecutive, near-equal parts; part k (k = 1..M) misses
       exactly k modalities, spread in consecutive near-equal runs over the ``C(M, k)`` subsets of size k
       (in ``itertools.combinations`` order of the modality list).

    For M = 2 this gives the reference's 1/4 one-only, 1/4 other-only, 1/2 both; for M = 3, thirds with
    1, 2 and 3 missing modalities as in the TikTok masks.
    """
    if not 0.0 <= ratio <= 1.0:
        raise DataError(f"missing ratio must lie in [0, 1], got {ratio}", source="ratio")
    if n_modalities < 1:
        raise DataError("need at least one modality", source="modalities")
    n = len(train_counts)
    if new_items is None:
        new_items = draw_new_items(train_counts, seed=new_seed)
    cold, _warm = cold_warm_groups(train_counts)
    is_cold = np.zeros(n, dtype=bool)
    is_cold[cold] = True
    rng = np.random.default_rng(seed)
    observed = np.ones((n, n_modalities), dtype=bool)
    subsets = [list(itertools.combinations(range(n_modalities), k)) for k in range(1, n_modalities + 1)]
    for new_flag in (True, False):
        for cold_flag in (True, False):
            group = np.flatnonzero((new_items == new_flag) & (is_cold == cold_flag))
            k = round(len(group) * ratio)
            if k == 0:
                continue
            drawn = rng.choice(group, size=k, replace=False)
            for level, part in enumerate(np.array_split(drawn, n_modalities)):
                for combo, chunk in zip(subsets[level], np.array_split(part, len(subsets[level])), strict=True):
                    for j in combo:
                        observed[chunk, j] = False
    return observed
