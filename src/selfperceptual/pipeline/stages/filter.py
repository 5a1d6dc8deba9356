"""filter: keep the corpus rows that pass the aesthetic and minimum-side thresholds."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from ..data.filtering import MetadataError, check_schema, filter_rows
from ..io import write_json

log = logging.getLogger("filter")
PARAMS = ("filter",)


def add_arguments(parser) -> None:
    parser.add_argument("--corpus", type=Path, required=True, help="the corpus stage's folder")


def run(args, config, scale, out) -> None:
    source = args.corpus / "laion.parquet"
    rows = pd.read_parquet(source)
    try:
        check_schema(rows, config.filter, source)
    except MetadataError as error:
        raise SystemExit(f"filter: {error}") from None
    if rows.empty:
        raise SystemExit(f"filter: {source} has no rows: the metadata is empty (the corpus stage copied it from corpus.laion_parquet)")
    kept, stats = filter_rows(rows, config.filter)
    write_json(out / "stats.json", stats)
    log.info("filter: %s", stats)
    for name, count in stats["removed_by"].items():
        if name.startswith("missing_") and name != "missing_url_or_text" and count:
            log.warning("filter: %d of %d rows have no %s (NaN): removed, and counted as %s, not by its threshold",
                        count, len(rows), name.removeprefix("missing_"), name)  # fmt: skip
    if kept.empty:
        raise SystemExit(
            f"filter: no rows pass (removed by condition: {stats['removed_by']}); "
            "loosen filter.min_aesthetic / filter.min_side in params.yaml"
        )
    kept.to_parquet(out / "kept.parquet", index=False)
