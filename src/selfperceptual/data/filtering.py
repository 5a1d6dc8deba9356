"""The LAION-Aesthetics filter (paper Section 4: aesthetic score > 6 and resolution > 512 px)."""

from __future__ import annotations

import pandas as pd


def filter_rows(rows: pd.DataFrame, config) -> tuple[pd.DataFrame, dict]:
    """Keeps rows that pass every condition; counts how many rows each condition removes.

    A row failing several conditions is counted under each of them, so the per-condition counts
    can add up to more than the rows removed.
    """
    conditions = {
        "aesthetic": rows["AESTHETIC_SCORE"] > config.min_aesthetic,
        "min_side": rows[["WIDTH", "HEIGHT"]].min(axis=1) > config.min_side,
    }
    if config.max_punsafe is not None:
        conditions["punsafe"] = rows["punsafe"] <= config.max_punsafe
    if config.max_pwatermark is not None:
        conditions["pwatermark"] = rows["pwatermark"] <= config.max_pwatermark
    keep = pd.concat(conditions, axis=1).all(axis=1)
    stats = {
        "rows_in": len(rows),
        "rows_kept": int(keep.sum()),
        "removed_by": {name: int((~passed).sum()) for name, passed in conditions.items()},
    }
    return rows[keep].reset_index(drop=True), stats
