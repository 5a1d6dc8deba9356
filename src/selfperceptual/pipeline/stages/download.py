"""download: img2dataset fetches the kept rows into webdataset shards at the training resolution.

With ``download.num_jobs`` > 1 the DAG runs one job per contiguous block of rows (``--part I/N``);
each sample keeps its row number (``ROW``), so later stages see the same dataset whatever the split.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import logging
import multiprocessing
import multiprocessing.context
import os
import re
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pandas as pd


@contextmanager
def _without(module: str):
    """Imports made inside see ``module`` as not installed (when nothing imported it before)."""
    absent = module not in sys.modules
    if absent:
        sys.modules[module] = None  # import raises ModuleNotFoundError
    try:
        yield
    finally:
        if absent and sys.modules.get(module, False) is None:
            del sys.modules[module]


os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset imports albumentations, which would ask the network
# img2dataset's writer imports webdataset, which imports torch only for its DataLoader classes and
# has stand-ins where torch is not installed; nothing here uses them. Without torch the stage, and
# each worker process img2dataset spawns (which imports this module first), start 1.3 s sooner.
with _without("torch"):
    from img2dataset import distributor
    from img2dataset.logger import LoggerProcess

    img2dataset_main = importlib.import_module("img2dataset.main")  # the module; the package's "main" is a function
    img2dataset_resizer = importlib.import_module("img2dataset.resizer")


class _EightBitDecoding:
    """OpenCV as img2dataset's resizer sees it, with ``imdecode`` giving 8 bits per channel. The
    resizer decodes with ``IMREAD_UNCHANGED``, then mattes alpha and encodes JPEG as if every image
    had 8 bits: a 16-bit PNG came out uniformly white. Here 16-bit images are scaled to 8 bits
    (rounded, v / 257); float or 32-bit pixels, whose scale no file states, are refused and counted
    among the failures (``stats.json``), never stored."""

    def __init__(self, cv2):
        self._cv2 = cv2

    def __getattr__(self, name):
        return getattr(self._cv2, name)

    def imdecode(self, buffer, flags):
        import numpy as np

        image = self._cv2.imdecode(buffer, flags)
        if image is None or image.dtype == np.uint8:
            return image
        if image.dtype == np.uint16:
            return np.rint(image / 257.0).astype(np.uint8)
        raise ValueError(f"{image.dtype} pixels: only 8- and 16-bit images are converted faithfully")


if not isinstance(img2dataset_resizer.cv2, _EightBitDecoding):  # the stage's process and each worker img2dataset spawns
    img2dataset_resizer.cv2 = _EightBitDecoding(img2dataset_resizer.cv2)

from ..data import DEAD_URL_WARNING
from ..data.shards import count_samples
from ..io import read_json, write_json
from ..split import add_part_argument, block, checked_part

log = logging.getLogger("download")
PARAMS = ("download",)


def add_arguments(parser) -> None:
    parser.add_argument("--filtered", type=Path, required=True, help="the filter stage's folder")
    parser.add_argument("--corpus", type=Path, required=True, help="the corpus stage's folder (base of relative URLs)")
    add_part_argument(parser, "the kept rows")


WEB = ("http", "https")
LOCAL_PATH = "a local path"  # how a URL without a scheme is counted when refused


def allowed_schemes(settings, corpus: Path) -> tuple[str, ...] | None:
    """``download.url_schemes``; by default the web's for metadata from outside, so a LAION parquet
    cannot make the download read local files (``file://`` URLs, or paths), and any for the
    synthetic corpus, whose rows name its own images by path. None: every URL is fetched."""
    if settings.url_schemes is not None:
        return tuple(scheme.lower() for scheme in settings.url_schemes)
    made = corpus / "summary.json"  # the corpus stage's record of where its rows came from
    synthetic = made.is_file() and read_json(made).get("source") == "synthetic"
    return None if synthetic else WEB


def refused_urls(urls: pd.Series, allowed: tuple[str, ...] | None) -> pd.Series:
    """Per URL: the scheme it was refused for (``a local path`` where it has none), or "" if fetched."""
    if allowed is None:
        return pd.Series("", index=urls.index)
    schemes = urls.str.extract(r"^([A-Za-z][A-Za-z0-9+.-]*)://", expand=False).str.lower().fillna(LOCAL_PATH)
    return schemes.where(~schemes.isin(allowed), "")


def resolve_urls(urls: pd.Series, base: Path) -> pd.Series:
    """Relative URLs become file:// URIs under ``base`` (img2dataset needs absolute ones)."""
    is_relative = ~urls.str.contains("://", regex=False)
    return urls.where(~is_relative, urls[is_relative].map(lambda url: (base / url).resolve().as_uri()))


def _shard_stats(folder: Path) -> dict:
    """Sums img2dataset's per-shard stats; failures are counted, never fatal."""
    totals = {"count": 0, "successes": 0, "failed_to_download": 0, "failed_to_resize": 0}
    errors: dict[str, int] = {}
    for path in sorted(folder.glob("*_stats.json")):
        shard = json.loads(path.read_text())
        for key in totals:
            totals[key] += int(shard.get(key, 0))
        for message, count in shard.get("status_dict", {}).items():
            if message != "success":
                kind = re.sub(r"'[^']*'", "'...'", message)[:200]  # one entry per kind, not per file
                errors[kind] = errors.get(kind, 0) + count
    return {**totals, "errors": errors}


def _die_with_the_stage() -> None:
    """Asks Linux to SIGKILL this process when its parent, the stage, dies, however it dies."""
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != multiprocessing.parent_process().pid:  # it died before the line above took effect
        os._exit(1)


class _DiesWithTheStage:
    def run(self):
        _die_with_the_stage()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the stage answers for them
        super().run()


class _Worker(_DiesWithTheStage, multiprocessing.context.SpawnProcess):
    pass


class _Logger(_DiesWithTheStage, LoggerProcess):
    pass


class _SpawnContext(multiprocessing.context.SpawnContext):
    Process = _Worker


def _interrupted(signum, frame) -> None:
    """Ctrl-C: the stage dies of SIGINT at once, and its processes with it (the next run removes
    its temporary folder). Unwinding img2dataset's pool instead can hang for good when a worker
    dies while it holds the pool's queue lock."""
    print("download: interrupted; the next run starts the download again", file=sys.stderr, flush=True)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)


_SIGNALS_STAY_WITH_THE_STAGE = SimpleNamespace(SIGINT=signal.SIGINT, signal=lambda signum, handler: None)


@contextmanager
def _processes_die_with_the_stage():
    """img2dataset's processes outlive a stage killed with SIGKILL (the OOM killer, ``kill -9``):
    orphaned, its pool's workers wait on the dead stage's queue for good, holding their memory, and
    its logger polls for stats files ten times a second, for good. It makes them from
    ``get_context("spawn")`` and ``LoggerProcess``; these hand it processes that die with the stage.
    It also turns Ctrl-C into ``sys.exit(0)``, a stage that "succeeds" with no output; its handler
    is never installed, and Ctrl-C kills the stage."""
    saved = distributor.get_context, img2dataset_main.LoggerProcess, img2dataset_main.signal
    distributor.get_context = lambda method: _SpawnContext()  # it asks for "spawn"
    img2dataset_main.LoggerProcess = _Logger
    img2dataset_main.signal = _SIGNALS_STAY_WITH_THE_STAGE
    previous = signal.signal(signal.SIGINT, _interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        distributor.get_context, img2dataset_main.LoggerProcess, img2dataset_main.signal = saved


def run(args, config, scale, out) -> None:
    settings = config.download
    shards = out / "shards"
    index, count = checked_part(args.part, settings.num_jobs, "download.num_jobs")
    rows = pd.read_parquet(args.filtered / "kept.parquet")
    rows["ROW"] = range(len(rows))  # a sample's identity, whatever the split
    rows = rows.iloc[block(len(rows), index, count)].copy()
    if rows.empty:
        raise SystemExit(f"download: part {index}/{count} of {args.filtered / 'kept.parquet'} has no rows; lower download.num_jobs")
    refused = refused_urls(rows["URL"], allowed_schemes(settings, args.corpus))
    refusals = {scheme: int(count) for scheme, count in refused[refused != ""].value_counts().items()}
    if refusals:
        log.warning("download %d/%d: %d of %d rows refused for their URL scheme (%s); download.url_schemes allows %s",
                    index, count, sum(refusals.values()), len(rows), refusals, settings.url_schemes or list(WEB))
    if len(rows) == sum(refusals.values()):
        raise SystemExit(f"download: every row of {args.filtered / 'kept.parquet'} (part {index}/{count}) was refused for its URL "
                         f"scheme {refusals}; the metadata came from outside, so only {', '.join(WEB)} are fetched "
                         "(set download.url_schemes to allow others)")  # fmt: skip
    span = [int(rows["ROW"].iloc[0]), int(rows["ROW"].iloc[-1]) + 1]  # this part's rows, refused ones included
    rows = rows[refused == ""].copy()
    rows["URL"] = resolve_urls(rows["URL"], args.corpus)
    url_list = out / "urls.parquet"
    rows.to_parquet(url_list, index=False)
    with _processes_die_with_the_stage():
        img2dataset_main.download(
            url_list=str(url_list),
            input_format="parquet",
            url_col="URL",
            caption_col="TEXT",
            save_additional_columns=["ROW", "AESTHETIC_SCORE", "WIDTH", "HEIGHT"],
            output_format="webdataset",
            output_folder=str(shards),
            image_size=settings.resolution,
            resize_mode="center_crop",
            processes_count=settings.processes,
            thread_count=settings.threads,
            number_sample_per_shard=settings.shard_size,
            timeout=settings.timeout_s,
            extract_exif=False,
            compute_hash=None,
            enable_wandb=False,
            distributor="multiprocessing",
        )
    stats = _shard_stats(shards)
    # img2dataset counts a sample fetched before its writer has stored it; what the shards hold is
    # what later stages get, so that is what counts.
    stats["written"] = count_samples([out])
    stats["fetched_not_written"] = stats["successes"] - stats["written"]
    stats["refused"] = refusals  # rows never fetched: scheme -> count (not in count, successes or failures)
    write_json(out / "stats.json", {"part": [index, count], "rows": span, **stats})
    log.info("download %d/%d: %d of %d written; failures: %s", index, count, stats["written"], stats["count"], stats["errors"])
    if stats["fetched_not_written"]:
        log.warning("download: %d samples were fetched but not written to the shards", stats["fetched_not_written"])
    dead = stats["failed_to_download"] / stats["count"] if stats["count"] else 0.0
    if dead > DEAD_URL_WARNING:
        log.warning("download: %.0f%% of the URLs could not be fetched (%d of %d; LAION's links decay, a share above %.0f%% "
                    "suggests the network or a proxy): the experiment trains on %d images", 100 * dead, stats["failed_to_download"],
                    stats["count"], 100 * DEAD_URL_WARNING, stats["written"])  # fmt: skip
    if stats["written"] == 0:
        raise SystemExit(
            f"download: the shards hold no sample ({stats['successes']} of {stats['count']} fetched; failures: {stats['errors']})"
        )
