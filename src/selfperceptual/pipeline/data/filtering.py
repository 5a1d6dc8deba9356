"""The LAION-Aesthetics filter (paper Section 4: aesthetic score > 6 and resolution > 512 px)."""

from __future__ import annotations

import pandas as pd
from pandas.api import types

NUMERIC = ("WIDTH", "HEIGHT", "AESTHETIC_SCORE")


class MetadataError(ValueError):
    """A metadata parquet the filter cannot trust; the message names the column."""


def check_schema(rows: pd.DataFrame, config, source) -> None:
    """Columns present with the types the filter and the download read, before anything else runs."""
    needed = ["URL", "TEXT", *NUMERIC]
    needed += [name for name, limit in (("punsafe", config.max_punsafe), ("pwatermark", config.max_pwatermark)) if limit is not None]
    absent = [name for name in needed if name not in rows.columns]
    if absent:
        raise MetadataError(f"{source}: missing column(s) {', '.join(absent)} (has {', '.join(map(str, rows.columns))})")
    for name in (*NUMERIC, *needed[5:]):
        if not types.is_numeric_dtype(rows[name]):
            raise MetadataError(f"{source}: column {name} must be numeric (it is {rows[name].dtype})")
    for name in ("URL", "TEXT"):
        wrong = rows[name].map(lambda value: value is not None and not isinstance(value, str))
        if wrong.any():
            row = int(wrong.idxmax())
            value = rows[name].iloc[row]
            raise MetadataError(
                f"{source}: column {name} must hold text; row {row} holds {type(value).__name__} {value!r:.60}"
                + (" (bytes: decode them to UTF-8 strings first)" if isinstance(value, bytes) else "")
            )


def filter_rows(rows: pd.DataFrame, config) -> tuple[pd.DataFrame, dict]:
    """Keeps rows that pass every condition; counts how many rows each condition removes.

    A row failing several conditions is counted under each of them, so the per-condition counts
    can add up to more than the rows removed. A number the metadata lacks (NaN) is counted under
    its own name (``missing_<column>``), never as a removal by that column's threshold.
    """
    limits = {"AESTHETIC_SCORE": ("aesthetic", lambda v: v > config.min_aesthetic), "WIDTH": ("min_side", lambda v: v > config.min_side),
              "HEIGHT": ("min_side", lambda v: v > config.min_side)}  # fmt: skip
    if config.max_punsafe is not None:
        limits["punsafe"] = ("punsafe", lambda v: v <= config.max_punsafe)
    if config.max_pwatermark is not None:
        limits["pwatermark"] = ("pwatermark", lambda v: v <= config.max_pwatermark)
    conditions = {"missing_url_or_text": rows["URL"].notna() & rows["TEXT"].notna()}
    for column in limits:
        conditions[f"missing_{column}"] = rows[column].notna()
    for column, (name, passes) in limits.items():
        passed = passes(rows[column]) | rows[column].isna()
        conditions[name] = conditions[name] & passed if name in conditions else passed
    keep = pd.concat(conditions, axis=1).all(axis=1)
    stats = {
        "rows_in": len(rows),
        "rows_kept": int(keep.sum()),
        "removed_by": {name: int((~passed).sum()) for name, passed in conditions.items()},
    }
    return rows[keep].reset_index(drop=True), stats
