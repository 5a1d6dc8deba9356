"""Start-up of each kind of stage: the seconds ``python -m selfperceptual <stage> --help`` takes,
which is the imports the command line makes for that stage and nothing else (a pipeline starts
one such process per job: 76 at the smoke scale, 91 at the rehearsal).

    python benchmarks/startup.py                      # this checkout, median of 3 runs per stage
    python benchmarks/startup.py --vs /path/to/src    # and another checkout's src/, run by run

With ``--vs``, each run of a stage here is followed by one of the other source tree (put first on
PYTHONPATH), so that both see the same load; the ratio is taken per stage from the medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from selfperceptual.pipeline.cli import STAGES


def seconds(stage: str | None, src: str | None) -> float:
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "selfperceptual", *([stage] if stage else []), "--help"]
    started = time.perf_counter()
    subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--vs", type=Path, help="another checkout's src/ folder, timed run by run against this one")
    parser.add_argument("stages", nargs="*", default=list(STAGES), help="stages to time after --help alone (default: every stage)")
    args = parser.parse_args()
    print(f"stage            {'this (s)':>9}" + (f"  {'--vs (s)':>9}  {'ratio':>6}" if args.vs else ""))
    for stage in [None, *args.stages]:
        here, there = [], []
        for _ in range(args.runs):
            here.append(seconds(stage, None))
            if args.vs:
                there.append(seconds(stage, str(args.vs.resolve())))
        line = f"{stage or '(--help)':<16} {statistics.median(here):9.2f}"
        if args.vs:
            line += f"  {statistics.median(there):9.2f}  {statistics.median(here) / statistics.median(there):6.2f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
