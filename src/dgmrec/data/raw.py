"""Raw tables: reading CSV/TSV/Parquet files, and raw interactions (string ids, timestamps) -> contiguous ids
and an 8:1:1 split.

Split rule (per user, chronological, as the MMRec preprocessing assigns ``x_label``): a user's interactions are
sorted by timestamp (ties keep file order); with ``n`` interactions the last ``round(0.1 n)`` go to test, the
``round(0.1 n)`` before them to validation and the rest to training. Users with fewer than 3 interactions keep
everything in training. Ids are remapped to ``0..n-1`` in sorted order of the original ids (as strings), or in
a given item order.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dgmrec.errors import DataError, InputError

ITEM_IDS_NAME = "item_ids.csv"
USER_IDS_NAME = "user_ids.csv"
SEP_ALIASES: dict[str, str] = {
    "tab": "\t",
    "\\t": "\t",
    "comma": ",",
    "pipe": "|",
    "semicolon": ";",
    "space": " ",
}
PARQUET_SUFFIXES = (".parquet", ".pq")
TAB_SUFFIXES = (".tsv", ".tab", ".inter")


# ----------------------------------------------------------------------------------------------- tables
@dataclass(frozen=True)
class TableFormat:
    """How to read a delimited text table.

    Parameters
    ----------
    sep:
        Field separator; ``None`` picks tab for ``.tsv``/``.tab``/``.inter`` and comma otherwise.
    header:
        Whether the first line names the columns. Without a header, columns are named ``1, 2, 3, ...`` unless
        ``columns`` names them.
    columns:
        Names for the fields of a file without header line (implies ``header=False``).
    encoding:
        Text encoding of the file (``utf-8`` accepts and drops a byte-order mark).
    option_prefix:
        Prefix of the command-line options that set these values (``items-`` for ``--items-sep``, ...), used
        in hints of error messages; None when no option sets them (no hints).
    """

    sep: str | None = None
    header: bool = True
    columns: tuple[str, ...] | None = None
    encoding: str = "utf-8"
    option_prefix: str | None = None

    def option(self, name: str) -> str:
        """The command-line option that sets ``name`` (``sep``, ``columns``, ``encoding``)."""
        return f"--{self.option_prefix or ''}{name}"

    def header_hint(self) -> str:
        """Hint for a column that is not found: maybe the file has no header line or another separator."""
        if self.columns is not None or self.option_prefix is None:
            return ""
        return (
            f"; a file without header line needs {self.option('columns')} (and {self.option('sep')} "
            "unless it is comma-separated)"
        )

    def encoding_hint(self) -> str:
        """Hint for a file that does not decode: which option names another encoding."""
        if self.option_prefix is None:
            return ""
        return f"; if the file uses another encoding, say which with {self.option('encoding')} (e.g. latin-1)"


def parse_sep(value: str | None, option: str = "--sep") -> str | None:
    """Turn a separator option (``tab``, ``\\t``, ``,``, ``|``, ``pipe``, ...) into the separator string.

    Parameters
    ----------
    value:
        The option value, or None for the default.
    option:
        Option name used in error messages.

    Returns
    -------
    str or None
        The separator, or None when ``value`` is None or empty.
    """
    if value is None or value == "":
        return None
    sep = SEP_ALIASES.get(value.lower(), value)
    if sep in ('"', "\n", "\r"):
        raise InputError(f"{value!r} cannot be a field separator", source=option)
    return sep


def parse_columns(value: str | None, option: str = "--columns") -> tuple[str, ...] | None:
    """Parse a comma-separated list of column names (``user,item,rating,timestamp``).

    Parameters
    ----------
    value:
        The option value, or None.
    option:
        Option name used in error messages.

    Returns
    -------
    tuple of str or None
        The names, or None when ``value`` is None or empty.
    """
    if value is None or value.strip() == "":
        return None
    names = tuple(part.strip() for part in value.split(","))
    if any(not n for n in names):
        raise InputError(f"empty column name in {value!r}", source=option)
    dup = [n for n in dict.fromkeys(names) if names.count(n) > 1]
    if dup:
        raise InputError(f"column name {dup[0]!r} is given twice", source=option)
    return names


def _parquet_as_strings(path: Path) -> pd.DataFrame:
    """Read Parquet with every column as a string; nulls become empty strings (not ``'None'``/``'nan'``)."""
    src = str(path)
    try:
        df = pd.read_parquet(path)
    except ImportError as exc:
        raise DataError(f"reading Parquet needs pyarrow: pip install pyarrow ({exc})", source=src) from None
    except Exception as exc:
        raise DataError(f"cannot read Parquet file ({type(exc).__name__}: {exc})", source=src) from None
    out = {}
    for col in df.columns:
        series = df[col]
        null = series.isna().to_numpy()
        values = series.astype(str).to_numpy(dtype=object)
        values[null] = ""
        out[str(col)] = values
    return pd.DataFrame(out, dtype=object)


def read_table(path: str | Path, fmt: TableFormat | None = None) -> pd.DataFrame:
    """Read a CSV, TSV or Parquet table with every value as a string (empty string for empty fields).

    Parameters
    ----------
    path:
        The table file. ``.parquet``/``.pq`` is read as Parquet, anything else as delimited text.
    fmt:
        Separator, header and encoding options for delimited text (default: header line, UTF-8, separator
        by extension).

    Returns
    -------
    pandas.DataFrame
        One string column per field; column names are stripped of surrounding spaces.

    Raises
    ------
    DataError
        File not found, not valid text in the given encoding, unparsable, or its field count does not match
        ``fmt.columns``.
    """
    fmt = fmt or TableFormat()
    path = Path(path)
    src = str(path)
    if not path.is_file():
        raise DataError("file not found", source=src)
    if path.suffix.lower() in PARQUET_SUFFIXES:
        df = _parquet_as_strings(path)
        if fmt.columns is not None:
            if len(fmt.columns) != df.shape[1]:
                raise DataError(f"has {df.shape[1]} columns but {len(fmt.columns)} names were given", source=src)
            df.columns = list(fmt.columns)
        return df
    sep = fmt.sep or ("\t" if path.suffix.lower() in TAB_SUFFIXES else ",")
    header = fmt.header and fmt.columns is None
    encoding = "utf-8-sig" if fmt.encoding.lower().replace("_", "-") in ("utf-8", "utf8") else fmt.encoding
    try:
        df = pd.read_csv(
            path,
            sep=sep,
            header=0 if header else None,
            dtype=str,
            keep_default_na=False,
            encoding=encoding,
            engine="python" if len(sep) > 1 else "c",
        )
    except UnicodeDecodeError as exc:
        raise DataError(
            f"not valid {fmt.encoding} text ({exc.reason} at byte {exc.start}){fmt.encoding_hint()}", source=src
        ) from None
    except LookupError:
        raise InputError(f"unknown text encoding {fmt.encoding!r}", source=fmt.option("encoding")) from None
    except pd.errors.EmptyDataError:
        raise DataError("the file is empty", source=src) from None
    except Exception as exc:
        raise DataError(f"cannot parse table ({type(exc).__name__}: {exc})", source=src) from None
    df = df.fillna("")
    if header:
        df.columns = [str(c).strip() for c in df.columns]
    elif fmt.columns is not None:
        if df.shape[1] != len(fmt.columns):
            raise DataError(
                f"lines have {df.shape[1]} fields (separator {sep!r}) but {len(fmt.columns)} column names "
                f"were given ({', '.join(fmt.columns)})",
                source=src,
            )
        df.columns = list(fmt.columns)
    else:
        df.columns = [str(j + 1) for j in range(df.shape[1])]
    return df


def require_columns(df: pd.DataFrame, columns: dict[str, str], source: str, hint: str = "") -> None:
    """Raise a :class:`DataError` naming the first missing column and the option that named it.

    Parameters
    ----------
    df:
        The table.
    columns:
        Column name -> option that asked for it (e.g. ``{"movie_id": "--id-column"}``).
    source:
        File name for the message.
    hint:
        Appended to the message.
    """
    for col, option in columns.items():
        if col not in df.columns:
            found = ", ".join(repr(str(c)) for c in df.columns[:20]) + (", ..." if df.shape[1] > 20 else "")
            raise DataError(f"no column {col!r} ({option}); the table has: {found}{hint}", source=source)


def write_id_table(path: Path, original_ids: Sequence[str], column: str) -> None:
    """Write ``<column>,original_id`` (row ``i`` -> ``i``, its original id) as CSV, atomically.

    Parameters
    ----------
    path:
        Output file (``item_ids.csv`` / ``user_ids.csv``).
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


# ------------------------------------------------------------------------------------------ interactions
@dataclass
class RawInteractions:
    """Remapped interactions with their split labels and the original ids.

    Attributes
    ----------
    users, items, labels:
        One entry per unique (user, item) pair, in file order: remapped ids and split label (0/1/2).
    user_ids, item_ids:
        Original id of each remapped user / item.
    rows_read, rows_kept:
        Rows in the table, and rows left after the rating filter (before repeated pairs are dropped).
    """

    users: np.ndarray
    items: np.ndarray
    labels: np.ndarray
    user_ids: np.ndarray
    item_ids: np.ndarray
    rows_read: int
    rows_kept: int

    def pairs(self, label: int) -> np.ndarray:
        """``(n, 2)`` int64 (user, item) pairs with split label ``label``, in file order."""
        sel = self.labels == label
        return np.stack([self.users[sel], self.items[sel]], axis=1).astype(np.int64)

    def splits(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The train, valid and test pairs (as :func:`dgmrec.data.mmrec.write_inter` takes them)."""
        return self.pairs(0), self.pairs(1), self.pairs(2)


def chronological_labels(users: np.ndarray, timestamps: np.ndarray,
                         ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> np.ndarray:
    """Per-user chronological split labels (0 train, 1 valid, 2 test); see the module docstring."""
    n = len(users)
    order = np.lexsort((np.arange(n), timestamps, users))  # by user, then time, then file order
    labels = np.zeros(n, dtype=np.int64)
    sorted_users = users[order]
    starts = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]])
    ends = np.r_[starts[1:], n]
    for s, e in zip(starts, ends, strict=True):
        cnt = e - s
        if cnt < 3:
            continue
        n_test = max(1, round(ratios[2] * cnt))
        n_valid = max(1, round(ratios[1] * cnt))
        labels[order[e - n_test:e]] = 2
        labels[order[e - n_test - n_valid:e - n_test]] = 1
    return labels


def _first(mask: pd.Series | np.ndarray) -> int:
    return int(np.flatnonzero(np.asarray(mask))[0])


def parse_timestamps(values: pd.Series, column: str, source: str) -> np.ndarray:
    """Timestamps as float64: numbers as they are, otherwise dates (all of them) as time since 1970.

    Parameters
    ----------
    values:
        The stripped timestamp strings.
    column, source:
        Column and file names for messages (rows are counted from 1, the header line not counted).

    Returns
    -------
    numpy.ndarray
        One value per row; only the order matters for the split.
    """
    numbers = pd.to_numeric(values, errors="coerce")
    if not numbers.isna().any():
        return numbers.to_numpy(dtype=np.float64)
    with warnings.catch_warnings():  # "could not infer format": then every value is parsed on its own
        warnings.simplefilter("ignore", UserWarning)
        dates = pd.to_datetime(values, errors="coerce", utc=True)
    if not dates.isna().any():
        return dates.astype("int64").to_numpy(dtype=np.float64)
    neither = (numbers.isna() & dates.isna()).to_numpy()
    if neither.any():
        row = _first(neither)
        raise DataError(f"column {column}, row {row + 1}: {values.iloc[row]!r} is not a number or a date",
                        source=source)
    row = _first(dates.isna())
    raise DataError(f"column {column}, row {row + 1}: {values.iloc[row]!r} is a number but row "
                    f"{_first(numbers.isna()) + 1} is a date; use one kind of timestamp", source=source)


def read_raw_interactions(
    table: str | Path | pd.DataFrame,
    user_column: str = "user",
    item_column: str = "item",
    time_column: str | None = "timestamp",
    *,
    rating_filter: tuple[str, float] | None = None,
    item_order: Sequence[str] | None = None,
    item_order_name: str = "the items table",
    fmt: TableFormat | None = None,
) -> RawInteractions:
    """Read and check raw interactions, keep the rows passing the rating filter, remap ids and split 8:1:1.

    Parameters
    ----------
    table:
        A CSV, TSV or Parquet file (read with :func:`read_table` and ``fmt``), or a table already in memory
        with every value a string (as :func:`read_table` returns it).
    user_column, item_column:
        Id columns (values are stripped; an empty id is an error).
    time_column:
        Timestamp column (numbers or dates) for the chronological split; file order when None.
    rating_filter:
        ``(rating column, minimum)``: keep only rows with ``rating >= minimum`` (implicit feedback).
    item_order:
        Original item ids fixing the item numbering (e.g. the rows of an items table); every interaction item
        must then be listed there. Sorted ids of the interactions when None.
    item_order_name:
        What ``item_order`` is called in messages.
    fmt:
        Separator, header and encoding of a delimited file.

    Returns
    -------
    RawInteractions
        Unique (user, item) pairs (the earliest occurrence of a repeated pair) with their split labels.

    Raises
    ------
    DataError
        Missing columns, no rows, empty ids, item ids not in ``item_order`` (with their count and an
        example), bad timestamps or ratings, or no row passing the rating filter.
    """
    if isinstance(table, pd.DataFrame):
        df, source, hint = table, "interactions table", ""
    else:
        fmt = fmt or TableFormat()
        df, source, hint = read_table(table, fmt), str(table), fmt.header_hint()
    needed = {user_column: "--user-column", item_column: "--item-column"}
    if time_column:
        needed[time_column] = "--time-column"
    if rating_filter is not None:
        needed[rating_filter[0]] = "--rating-column"
    require_columns(df, needed, source, hint)
    if df.empty:
        raise DataError("no interactions", source=source)
    users_raw = df[user_column].astype(str).str.strip()
    items_raw = df[item_column].astype(str).str.strip()
    for col, values in ((user_column, users_raw), (item_column, items_raw)):
        empty = values.eq("").to_numpy()
        if empty.any():
            raise DataError(f"column {col}, row {_first(empty) + 1}: empty id", source=source)
    index = None if item_order is None else {v: i for i, v in enumerate(item_order)}
    if index is not None:
        unknown = [v for v in dict.fromkeys(items_raw.tolist()) if v not in index]
        if unknown:
            raise DataError(f"{len(unknown)} item id(s) in column {item_column} are not in {item_order_name}, "
                            f"e.g. {unknown[0]!r}", source=source)
    if time_column:
        timestamps = parse_timestamps(df[time_column].astype(str).str.strip(), time_column, source)
    else:
        timestamps = np.arange(len(df), dtype=np.float64)
    keep = np.ones(len(df), dtype=bool)
    if rating_filter is not None:
        column, minimum = rating_filter
        ratings = pd.to_numeric(df[column].astype(str).str.strip(), errors="coerce")
        if ratings.isna().any():
            row = _first(ratings.isna())
            raise DataError(f"column {column}, row {row + 1}: {df[column].iloc[row]!r} is not a number",
                            source=source)
        keep = (ratings >= minimum).to_numpy()
        if not keep.any():
            raise DataError(f"no interaction has {column} >= {minimum:g}", source=source)
    users_kept = users_raw.to_numpy()[keep]
    items_kept = items_raw.to_numpy()[keep]
    user_ids, users = np.unique(users_kept, return_inverse=True)
    if index is None:
        item_ids, items = np.unique(items_kept, return_inverse=True)
    else:
        item_ids = np.asarray(list(item_order or ()), dtype=str)
        items = np.fromiter((index[v] for v in items_kept), dtype=np.int64, count=len(items_kept))
    # repeated (user, item) pairs: keep the first occurrence in time
    frame = pd.DataFrame({"u": users, "i": items, "t": timestamps[keep], "r": np.arange(len(users))})
    frame = frame.sort_values(["u", "i", "t", "r"]).drop_duplicates(["u", "i"], keep="first").sort_values("r")
    u = frame["u"].to_numpy(np.int64)
    i = frame["i"].to_numpy(np.int64)
    labels = chronological_labels(u, frame["t"].to_numpy())
    return RawInteractions(users=u, items=i, labels=labels, user_ids=user_ids, item_ids=item_ids,
                           rows_read=len(df), rows_kept=int(keep.sum()))
