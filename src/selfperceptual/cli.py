"""``python -m selfperceptual <stage> --params params.yaml --scale S --out DIR [stage inputs]``.

Every stage validates the whole params.yaml first, writes its output folder atomically (a crash
leaves the previous output or nothing), and saves the resolved configuration beside its results.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from .config import ParamsError, load_params
from .io import atomic_dir, write_json

STAGES = ("corpus", "filter", "download", "base", "featnet", "encode", "train", "freeze", "sample", "evaluate", "report")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m selfperceptual", description=__doc__)
    commands = parser.add_subparsers(dest="stage", required=True)
    for name in STAGES:
        module = importlib.import_module(f".stages.{name}", __package__)
        sub = commands.add_parser(name, help=module.__doc__.splitlines()[0], description=module.__doc__)
        sub.add_argument("--params", type=Path, required=True, help="params.yaml")
        sub.add_argument("--scale", required=True, help="the params.yaml block to use (smoke, local, paper)")
        sub.add_argument("--out", type=Path, required=True, help="output folder (replaced atomically)")
        module.add_arguments(sub)
        sub.set_defaults(module=module)
    return parser


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = _parser().parse_args(argv)
    try:
        scale, config = load_params(args.params, args.scale)
    except ParamsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    with atomic_dir(args.out) as out:
        write_json(out / "params.json", {"scale": scale, "stage": args.stage, **config.model_dump()})
        args.module.run(args, config, scale, out)
    return 0
