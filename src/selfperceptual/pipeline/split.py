"""Splitting a stage into jobs: job I of N does a contiguous block of the work.

Blocks are cut on batch boundaries, so every batch holds the same items whatever N is, and the
parts, concatenated in order, equal the unsplit result exactly (batched kernels give the same
numbers only for the same batch).
"""

from __future__ import annotations

import argparse
import math

from ..method.errors import InputError


def parse_part(text: str) -> tuple[int, int]:
    index, sep, count = text.partition("/")
    try:
        index, count = int(index), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--part wants I/N, e.g. 0/4 (got {text!r})") from None
    if not sep or count < 1 or not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"--part wants I/N with 0 <= I < N (got {text!r})")
    return index, count


def add_part_argument(parser, what: str) -> None:
    parser.add_argument(
        "--part", type=parse_part, metavar="I/N",
        help=f"do block I of N of {what} (the DAG passes it when params.yaml's num_jobs is N > 1)",
    )


def checked_part(part: tuple[int, int] | None, num_jobs: int, key: str) -> tuple[int, int]:
    """The part to do; a split that disagrees with params.yaml is an error, not a silent gap."""
    index, count = part or (0, 1)
    if count != num_jobs:
        raise InputError(
            "part", f"{key} is {num_jobs} in params.yaml: the DAG was made for "
            "another split. Snakemake remakes it on its next run; for DVC run `make generate`.", f"{index}/{count}",
        )
    return index, count


def block(total: int, index: int, count: int) -> range:
    """Items [start, stop) of part ``index`` of ``count`` over ``total`` items."""
    return range(total * index // count, total * (index + 1) // count)


def batch_block(total: int, batch: int, index: int, count: int) -> range:
    """Items of part ``index``, cut on multiples of ``batch`` so each batch is the same for any split."""
    batches = block(math.ceil(total / batch), index, count)
    return range(min(batches.start * batch, total), min(batches.stop * batch, total))
