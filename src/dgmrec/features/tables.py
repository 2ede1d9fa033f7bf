"""Reading the items table of the features pipeline.

Reads the catalogue with the data layer's table reader (CSV/TSV/Parquet; separator, header line, column names
and text encoding as options) and validates it: id column present, ids non-empty and unique.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dgmrec.data.raw import TableFormat, read_table, require_columns
from dgmrec.errors import DataError, InputError


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
    df = read_table(path, fmt)
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
