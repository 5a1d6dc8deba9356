"""corpus: the LAION-schema training corpus and the held-out eval and feature-network splits."""

from __future__ import annotations

import logging

from ..data.corpus import ExternalFileError, build_synthetic, import_external
from ..io import write_json

log = logging.getLogger("corpus")
PARAMS = ("corpus", "download.resolution")


def add_arguments(parser) -> None:
    pass


def run(args, config, scale, out) -> None:
    if config.corpus.source == "synthetic":
        summary = build_synthetic(config.corpus, config.download.resolution, out)
    else:
        try:
            summary = import_external(config.corpus, out)
        except ExternalFileError as error:
            raise SystemExit(f"corpus: {error}") from None
    write_json(out / "summary.json", summary)
    log.info("corpus: %s", summary)
