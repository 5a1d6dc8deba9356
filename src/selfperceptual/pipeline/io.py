"""Atomic outputs: a crash never leaves a half-written file or folder that a later stage trusts."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from safetensors import safe_open

log = logging.getLogger("io")
HOST = socket.gethostname().replace(".", "_")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(final: Path, pattern: str | None = None) -> None:
    """Removes the temporary folders that killed runs of ``final`` (or of every sibling matching
    ``pattern``) left behind. A stage runs once at a time (Snakemake and DVC see to it), so any such
    folder whose process is gone is stale; one made on another host (a cluster node) cannot be
    asked, and is stale too."""
    for partial in final.parent.glob(f".{pattern or final.name}.*.partial"):
        parts = partial.name.split(".")  # "", name, host, pid, random, "partial"
        host, pid = (parts[-4], parts[-3]) if len(parts) >= 6 else ("", "")
        if host == HOST and pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        log.info("removing %s, left by a run that was killed", partial)
        shutil.rmtree(partial, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _follow_umask(folder: Path) -> None:
    """Gives what ``folder`` holds the permissions the umask allows: safetensors (and so diffusers'
    and our checkpoints' weights) writes its files 0600 whatever the umask, so a group sharing a
    cluster folder could read the JSON beside the weights but not the weights."""
    allowed = {True: 0o777 & ~_umask(), False: 0o666 & ~_umask()}
    for root, folders, files in os.walk(folder):
        for name, is_dir in [*((name, True) for name in folders), *((name, False) for name in files)]:
            path = os.path.join(root, name)
            mode = os.lstat(path).st_mode
            if not stat.S_ISLNK(mode) and stat.S_IMODE(mode) | allowed[is_dir] != stat.S_IMODE(mode):
                os.chmod(path, stat.S_IMODE(mode) | allowed[is_dir])


@contextlib.contextmanager
def atomic_dir(final: str | Path):
    """Yields a temporary sibling folder; on success it replaces ``final`` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{HOST}.{os.getpid()}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        _follow_umask(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    os.chmod(final, 0o777 & ~_umask())  # mkdtemp made it private; the group may read what the umask allows


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp made it private
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_series_csv(series: dict[str, list], path: str | Path) -> None:
    """Metric series ({name: [(step, value, ...), ...]}) as one table: a ``step`` column, then one
    column per series (``loss`` first), empty where a series has no point at that step."""
    names = sorted(series, key=lambda name: (name != "loss", name))
    by_step: dict[int, dict[str, float]] = {}
    for name in names:
        for point in series[name]:
            by_step.setdefault(int(point[0]), {})[name] = point[1]
    lines = [",".join(["step", *names])]
    lines += [",".join([str(step), *(repr(float(row[name])) if name in row else "" for name in names)]) for step, row in sorted(by_step.items())]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


class SavedArrays(Mapping):
    """A safetensors file's arrays as numpy, each read from disk when first asked for (the report
    reads some arrays of dozens of evaluations, not every array of each)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with safe_open(self.path, framework="numpy") as handle:
            self._names = tuple(handle.keys())
        self._read: dict[str, object] = {}

    def __getitem__(self, name: str):
        if name not in self._names:
            raise KeyError(f"{self.path} holds no {name!r} (it holds {', '.join(self._names)})")
        if name not in self._read:
            with safe_open(self.path, framework="numpy") as handle:
                self._read[name] = handle.get_tensor(name)
        return self._read[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


@contextlib.contextmanager
def console_copied_to(path: str | Path | None):
    """Everything this process and its children write to stdout and stderr also goes to the file
    ``path`` (appended, after a header line naming the command), and on to the stderr the process had: the job's log
    that Snakemake asks for, with the progress bars still on the console. The copy is made by a
    thread of this process, so a stage stopped by SIGTERM still logs to the end; nothing is copied
    without ``path``."""
    if path is None:
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    log = open(path, "ab")  # noqa: SIM115 - closed below, after the pump's last write
    log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n".encode())
    log.flush()
    read, write = os.pipe()
    saved = os.dup(1), os.dup(2)
    os.dup2(write, 1)
    os.dup2(write, 2)
    os.close(write)

    def pump() -> None:
        try:
            while chunk := os.read(read, 1 << 16):
                os.write(saved[1], chunk)
                log.write(chunk)
                log.flush()
        except (OSError, ValueError):  # the console or the log went away: stop copying
            pass

    thread = threading.Thread(target=pump, name="console-log", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)  # the pipe's last write ends in this process close here
        os.dup2(saved[1], 2)
        thread.join(timeout=5)  # a child still holding the pipe (a worker left behind) is not waited for
        if not thread.is_alive():
            os.close(read)
            log.close()
        for fd in saved:
            os.close(fd)


def cores() -> int:
    """The cores this process may run on (a job's allocation, not the machine's)."""
    return len(os.sched_getaffinity(0))


def decode_images(paths, prepare=None) -> list:
    """The images at ``paths`` as RGB PIL images (each passed through ``prepare`` when given), in
    order, decoded on a thread per core: PIL's decoders and resamplers release the GIL."""
    from PIL import Image

    def decode(path):
        image = Image.open(path).convert("RGB")
        return prepare(image) if prepare else image

    with ThreadPoolExecutor(max_workers=cores()) as pool:
        return list(pool.map(decode, paths))


@contextlib.contextmanager
def background_writes():
    """Yields ``submit(function, *args)``: the writes (PNG encoding, compression) run on worker
    threads while the caller goes on computing. On exit, every write has finished; the first that
    failed raises."""
    with ThreadPoolExecutor(max_workers=cores()) as pool:
        futures = []
        yield lambda function, *args: futures.append(pool.submit(function, *args))
        for future in futures:
            future.result()


class Busy(Exception):
    """Another process holds the lock; ``holder`` is what it wrote there (pid, host, since, what)."""

    def __init__(self, lock_file: Path, holder: str):
        super().__init__(f"{lock_file} is held by {holder}")
        self.lock_file, self.holder = lock_file, holder


def hold_exclusively(lock_file: Path, what: str):
    """Takes an exclusive lock on ``lock_file`` (flock: the kernel drops it when the process ends,
    however it ends, so no stale lock survives a kill) and writes who holds it; returns the open
    file, which holds the lock until it is closed or the process ends. Raises Busy, naming the
    holder, when another process has it."""
    import fcntl

    lock_file.parent.mkdir(parents=True, exist_ok=True)
    handle = open(lock_file, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise Busy(lock_file, holder) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: {what}\n")
    handle.flush()
    return handle
