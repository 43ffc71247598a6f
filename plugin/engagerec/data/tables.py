"""Read one table (CSV, TSV or Parquet) and check its columns.

Every check raises DataError naming the file, column and first offending row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from engagerec.data.errors import DataError

PARQUET_SUFFIXES = (".parquet", ".pq")


def sniff_separator(path: Path) -> str:
    """Tab or comma, judged from the header line (KuaiRand ships .csv files that are tab-separated)."""
    with open(path, "r", encoding="utf-8", errors="replace") as handle:
        header = handle.readline()
    return "\t" if header.count("\t") > header.count(",") else ","


def read_table(
    path: str | Path,
    required: Sequence[str] = (),
    rename: Optional[Dict[str, str]] = None,
    usecols: Optional[Iterable[str]] = None,
) -> pd.DataFrame:
    """Read ``path`` and return a DataFrame with columns renamed by ``rename`` (file name -> canonical).

    ``required`` are canonical names that must be present after renaming.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", file=str(path))
    try:
        if path.suffix.lower() in PARQUET_SUFFIXES:
            frame = pq.read_table(path).to_pandas()
        else:
            frame = pd.read_csv(path, sep=sniff_separator(path), low_memory=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError, ValueError) as err:
        raise DataError(f"cannot be parsed: {err}", file=str(path)) from None
    rename = rename or {}
    missing_sources = [src for src in rename.values() if src not in frame.columns]
    inverse = {src: canon for canon, src in rename.items() if src != canon}
    # A file column that already has a canonical target's name (KuaiRand's readable
    # 'timestamp' beside 'time_ms') keeps its data under '<name>_raw'.
    clashes = {c: f"{c}_raw" for c in frame.columns if c in inverse.values() and c not in inverse}
    frame = frame.rename(columns=clashes)
    frame = frame.rename(columns=inverse)
    for column in required:
        if column not in frame.columns:
            source = rename.get(column, column)
            raise DataError(
                f"required column '{source}' is missing (maps to '{column}')",
                file=str(path),
                expected=f"columns including {sorted(set(required) | set(missing_sources))}",
                got=list(frame.columns)[:20],
            )
    if usecols is not None:
        frame = frame[[c for c in usecols if c in frame.columns]]
    frame.attrs["source_file"] = str(path)
    return frame


def first_bad_row(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def as_numeric(frame: pd.DataFrame, column: str, *, allow_nan: bool, integer: bool = False) -> pd.Series:
    """``frame[column]`` as numbers; a non-numeric or infinite value raises DataError with its row."""
    file = frame.attrs.get("source_file")
    series = frame[column]
    numbers = pd.to_numeric(series, errors="coerce")
    not_numeric = numbers.isna().to_numpy() & series.notna().to_numpy()
    if not_numeric.any():
        row = first_bad_row(not_numeric)
        raise DataError(
            "value is not a number",
            file=file,
            column=column,
            row=row,
            expected="a number",
            got=series.iloc[row],
        )
    values = numbers.to_numpy(dtype=np.float64, na_value=np.nan)
    infinite = np.isinf(values)
    if infinite.any():
        row = first_bad_row(infinite)
        raise DataError(
            "value is infinite",
            file=file,
            column=column,
            row=row,
            expected="a finite number",
            got=series.iloc[row],
        )
    if not allow_nan and np.isnan(values).any():
        row = first_bad_row(np.isnan(values))
        raise DataError(
            "value is missing (NaN)", file=file, column=column, row=row, expected="a value in every row"
        )
    if integer:
        finite = ~np.isnan(values)
        fractional = finite & (values != np.round(values))
        if fractional.any():
            row = first_bad_row(fractional)
            raise DataError(
                "value is not an integer id",
                file=file,
                column=column,
                row=row,
                expected="an integer",
                got=series.iloc[row],
            )
    return pd.Series(values, index=frame.index, name=column)


def check_ids(frame: pd.DataFrame, column: str, *, unique: bool) -> None:
    """Ids must be present in every row, and unique where the table is keyed by them."""
    file = frame.attrs.get("source_file")
    series = frame[column]
    missing = series.isna().to_numpy()
    if missing.any():
        raise DataError(
            "id is missing",
            file=file,
            column=column,
            row=first_bad_row(missing),
            expected="an id in every row",
        )
    if unique:
        duplicated = series.duplicated().to_numpy()
        if duplicated.any():
            row = first_bad_row(duplicated)
            raise DataError(
                "duplicate id",
                file=file,
                column=column,
                row=row,
                expected="each id once in this table",
                got=series.iloc[row],
            )
