"""Reading catalogue and interaction tables for the features pipeline.

Extends the data layer's CSV/TSV/Parquet reading with the options raw files need (separator, no header line,
column names, text encoding) and validates an items table: id column present, ids non-empty and unique.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dgmrec.errors import DataError, InputError

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
        in hints of error messages.
    """

    sep: str | None = None
    header: bool = True
    columns: tuple[str, ...] | None = None
    encoding: str = "utf-8"
    option_prefix: str = ""

    def option(self, name: str) -> str:
        """The command-line option that sets ``name`` (``sep``, ``columns``, ``encoding``)."""
        return f"--{self.option_prefix}{name}"

    def header_hint(self) -> str:
        """Hint for a column that is not found: maybe the file has no header line or another separator."""
        if self.columns is not None:
            return ""
        return (
            f"; a file without header line needs {self.option('columns')} (and {self.option('sep')} "
            "unless it is comma-separated)"
        )


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


def read_table_with(path: str | Path, fmt: TableFormat | None = None) -> pd.DataFrame:
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
            f"not valid {fmt.encoding} text ({exc.reason} at byte {exc.start}); if the file uses another "
            f"encoding, say which with {fmt.option('encoding')} (e.g. latin-1)",
            source=src,
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
                f"were "
                f"given ({', '.join(fmt.columns)})",
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


@dataclass
class ItemsTable:
    """An items table with validated ids; row ``i`` is item ``i`` of every output.

    Attributes
    ----------
    frame:
        The table, every value a string.
    ids:
        The original item id of each row (stripped), unique and non-empty.
    path:
        Where the table was read from; relative image paths resolve against its folder.
    id_column:
        The id column's name.
    """

    frame: pd.DataFrame
    ids: list[str]
    path: Path
    id_column: str

    @property
    def folder(self) -> Path:
        """Folder of the items table (base of relative content paths)."""
        return self.path.parent

    def __len__(self) -> int:
        return len(self.ids)


def validate_ids(values: pd.Series, column: str, source: str, what: str = "item") -> list[str]:
    """Check that ids are non-empty and unique; return them stripped.

    Parameters
    ----------
    values:
        The id column.
    column:
        Its name (for messages).
    source:
        File name (for messages).
    what:
        ``"item"`` or ``"user"`` (for messages).

    Returns
    -------
    list of str
        The stripped ids, in row order.
    """
    ids = values.astype(str).str.strip()
    empty = np.flatnonzero(ids.eq("").to_numpy())
    if len(empty):
        raise DataError(f"column {column}, row {empty[0] + 1}: empty {what} id", source=source)
    dup_mask = ids.duplicated(keep=False).to_numpy()
    if dup_mask.any():
        rows = np.flatnonzero(dup_mask)
        first = ids.iloc[rows[0]]
        same = rows[ids.iloc[rows].to_numpy() == first]
        n_dup = int(ids.duplicated().sum())
        raise DataError(
            f"column {column}: duplicate {what} id {first!r} (rows {same[0] + 1} and {same[1] + 1}); "
            f"{n_dup} duplicate row(s) in all — ids must be unique",
            source=source,
        )
    return ids.tolist()


def read_items(path: str | Path, id_column: str, fmt: TableFormat | None = None) -> ItemsTable:
    """Read and validate an items table.

    Parameters
    ----------
    path:
        CSV, TSV or Parquet file with one row per item.
    id_column:
        Column holding the item ids.
    fmt:
        Reading options for delimited text (options named ``--items-...`` in messages by default).

    Returns
    -------
    ItemsTable
        The table and its ids in row order.

    Raises
    ------
    DataError
        Missing id column, empty or duplicate ids, no rows, or unreadable file.
    """
    path = Path(path)
    src = str(path)
    fmt = fmt or TableFormat(option_prefix="items-")
    df = read_table_with(path, fmt)
    require_columns(df, {id_column: "--id-column"}, src, fmt.header_hint())
    if df.empty:
        raise DataError("the items table has no rows", source=src)
    ids = validate_ids(df[id_column], id_column, src)
    return ItemsTable(frame=df.reset_index(drop=True), ids=ids, path=path, id_column=id_column)


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_name(value: str, option: str) -> str:
    """Check a dataset or modality name is a plain file-name stem (letters, digits, ``_ - .``).

    Parameters
    ----------
    value:
        The name.
    option:
        Option name for the message.

    Returns
    -------
    str
        ``value`` unchanged.
    """
    if not _SAFE_NAME.match(value or ""):
        raise InputError(f"{value!r} is not a valid name (use letters, digits, '_', '-', '.')", source=option)
    return value
