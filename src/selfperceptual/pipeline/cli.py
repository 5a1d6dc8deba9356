"""``python -m selfperceptual <stage> --params params.yaml --scale S --out DIR [--set KEY=VALUE] [stage inputs]``.

Every stage validates the whole params.yaml first, writes its output folder atomically (a crash
leaves the previous output or nothing), and saves the resolved configuration (``--set`` applied)
beside its results. Exit status: 0 done, 1 failed, 2 bad params, 3 outputs written but the
tracking store failed, 143 stopped by SIGTERM after a checkpoint (rerun to resume).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys
import time
from pathlib import Path

from . import distributed, stages, tracking
from ..method.errors import InputError, MethodError
from .config import ConfigView, ParamsError, load_params
from .io import Busy, atomic_dir, console_copied_to, hold_exclusively, write_json
from .tracking import TrackingError

STAGES = ("corpus", "filter", "download", "clip", "clip_embed", "aesthetic_train", "aesthetic", "base", "featnet", "encode", "train", "freeze",
          "sample", "evaluate", "figures", "report")


def _parser(chosen: str | None) -> argparse.ArgumentParser:
    """Every stage listed; only ``chosen`` imported, with its arguments (a pipeline starts dozens of
    these processes, and most stages never touch diffusers)."""
    parser = argparse.ArgumentParser(prog="python -m selfperceptual", description=__doc__)
    commands = parser.add_subparsers(dest="stage", required=True)
    for name in [chosen] if chosen in STAGES else STAGES:  # a stage that runs needs no listing of the others
        module = importlib.import_module(f".stages.{name}", __package__) if name == chosen else None
        doc = module.__doc__ if module else stages.docstring(name)
        sub = commands.add_parser(name, help=doc.splitlines()[0], description=doc)
        if module is None:
            continue
        sub.add_argument("--params", type=Path, required=True, help="params.yaml")
        sub.add_argument("--scale", required=True, help="the params.yaml block to use (smoke, local, rehearsal, workstation, paper)")
        sub.add_argument("--out", type=Path, required=True, help="output folder (replaced atomically)")
        sub.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override a key of the scale block, e.g. train.sp.layer=encoder (repeatable; how ablations are run)",
        )
        sub.add_argument("--log", type=Path, help="also write the console output to this file (appended; Snakemake's log of the job)")
        module.add_arguments(sub)
        sub.set_defaults(module=module)
    return parser


def message(error: MethodError) -> str:
    """What the command line says of a method's error: an input named by its flag."""
    if isinstance(error, InputError):
        flag = f"--{error.input}"
        return f"{flag} {error.path}: {error.problem}" if error.path is not None else f"{flag}: {error.problem}"
    return str(error)


def _without_log(argv: list[str]) -> list[str]:
    kept, skip = [], False
    for arg in argv:
        if not skip and arg != "--log" and not arg.startswith("--log="):
            kept.append(arg)
        skip = arg == "--log"
    return kept


def main(argv=None) -> int:
    tracking.stage_started(time.time())  # its MLflow runs begin now, not when they are written
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    args = _parser(chosen).parse_args(argv)
    with console_copied_to(args.log):
        return _run(args, argv)


def _run(args, argv) -> int:
    try:
        scale, config = load_params(args.params, args.scale, args.overrides)
    except ParamsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    launcher = getattr(args.module, "launcher", None)
    command = launcher(_without_log(argv), config) if launcher else None  # its processes' output reaches this one's log
    if command:  # e.g. train on a node with several GPUs: one process per GPU, through accelerate
        logging.getLogger("cli").info("launching: %s", " ".join(command))
        return distributed.run_launch(command)
    resolved = config
    if args.module.PARAMS is not None:  # the stage reads what it declares, and nothing else
        config = ConfigView(config, args.module.PARAMS, args.stage)
    if distributed.rank() != 0:  # another process of such a launch: it works, the first one writes
        args.module.run(args, config, scale, None)
        return 0
    try:
        # One process writes a stage's output at a time (Snakemake and DVC run the same commands).
        _held = hold_exclusively(args.out.parent / f".{args.out.name}.lock", f"{args.stage} --out {args.out}")  # until this returns
        with atomic_dir(args.out) as out:
            write_json(out / "params.json", {"scale": scale, "stage": args.stage, "overrides": args.overrides, **resolved.model_dump()})
            report = args.module.run(args, config, scale, out)
    except Busy as busy:
        print(f"error: {args.stage}: {args.out} is being written by another process ({busy.holder}); wait for it to end, "
              "or stop it (two runs of the pipeline, e.g. Snakemake and dvc repro, at once?)", file=sys.stderr)
        return 1
    except MethodError as error:  # the method's terms, in the command line's: an input is its flag
        print(f"error: {message(error)}", file=sys.stderr)
        return 1
    except OSError as error:
        where = error.filename or args.out.parent
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            print(f"error: no space left on the device of {where} (disk full or quota reached); "
                  f"{args.out} was not written. Free space there and run the stage again.", file=sys.stderr)
        elif error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            print(f"error: cannot write to {where}: {error.strerror}; {args.out} was not written. "
                  "Choose an output folder you can write to, or mount it writable, and run the stage again.", file=sys.stderr)
        else:
            raise
        return 1
    # A stage may return what it reports to the tracker: it runs once the outputs are in place,
    # so a tracking failure never costs them.
    try:
        if report:
            report()
    except TrackingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    return 0
