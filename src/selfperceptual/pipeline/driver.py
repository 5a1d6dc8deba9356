"""The Snakemake driver's own record, so that a run after a killed one needs no flags.

Snakemake locks the working directory while it runs (``.snakemake/locks``) and removes the locks
when it ends; a driver killed with SIGKILL (the OOM killer, ``kill -9``, a login node's session
ending) cannot, and every later run stops with "Directory cannot be locked" until someone runs
``snakemake --unlock``. The Snakefile records its driver as it starts (``record``) and, before the
next run locks, removes locks whose driver is gone (``remove_stale_locks``): only when that driver
ran on this host and is dead, and no other Snakemake process works in this directory. Locks of a
driver on another host (a shared filesystem) are left alone: this host cannot tell whether it lives.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import psutil

from .io import read_json, write_json

RECORD = Path(".snakemake") / "driver.json"
LOCKS = Path(".snakemake") / "locks"


def record() -> None:
    """Notes this process (the driver, once it holds the locks) for the next run to check."""
    me = psutil.Process()
    write_json(RECORD, {"pid": me.pid, "host": socket.gethostname(), "started": me.create_time()})


def _alive(pid: int, started: float) -> bool:
    try:
        return abs(psutil.Process(pid).create_time() - started) < 1.0  # the same process, not a reused pid
    except psutil.NoSuchProcess:
        return False


def _another_snakemake_here() -> bool:
    here = os.getcwd()
    for process in psutil.process_iter(["pid", "cmdline", "cwd"]):
        cmdline = process.info["cmdline"] or []
        if process.info["pid"] != os.getpid() and process.info["cwd"] == here and any(Path(part).name == "snakemake" for part in cmdline[:3]):
            return True
    return False


def remove_stale_locks() -> str | None:
    """Removes the locks a killed driver of this host left; returns what it did, or None."""
    locks = sorted(LOCKS.glob("*.lock"))
    if not locks or not RECORD.is_file():
        return None
    driver = read_json(RECORD)
    if driver.get("host") != socket.gethostname() or _alive(driver["pid"], driver["started"]) or _another_snakemake_here():
        return None
    for lock in locks:
        lock.unlink(missing_ok=True)
    return (f"Removed the locks of the Snakemake run (pid {driver['pid']}) that was killed before it could remove them; "
            "its unfinished jobs run again (rerun-incomplete), and training resumes from its checkpoints.")


# SIGTERM to the driver: Snakemake lets its running jobs finish, then exits with "At least one job
# did not complete successfully" although none failed. The scheduler's handler is wrapped (before
# Snakemake makes its scheduler, which binds it) to note the request, so that the Snakefile's
# onerror can say what happened instead.
_STOPPED: list = []


def note_graceful_stops() -> None:
    from snakemake.scheduling import job_scheduler

    original = job_scheduler.JobScheduler.exit_gracefully
    if getattr(original, "noted", False):
        return

    def exit_gracefully(scheduler, *args):
        _STOPPED.append(scheduler)
        return original(scheduler, *args)

    exit_gracefully.noted = True
    job_scheduler.JobScheduler.exit_gracefully = exit_gracefully


def stopped_without_failure() -> bool:
    """Whether this run ended because SIGTERM asked it to, with no job failed."""
    return bool(_STOPPED) and not getattr(_STOPPED[-1], "_errors", True)
