"""Stages that start in a second: a server that has imported every stage forks one process per stage.

A stage process spends its first seconds importing torch, diffusers, transformers and MLflow (about
13 s of CPU on a laptop core), and a pipeline runs dozens of stages: 91 at the rehearsal scale. With
``SP_STAGE_SERVER`` naming this server's socket, ``python -m selfperceptual ...`` hands its command
line, environment, working directory and standard streams to the server, which forks; the fork runs
the stage as a new process would, in that environment and directory, writing to those streams,
with the thread count the environment asks for. The command's own process stays for the stage's
life: it passes SIGTERM, SIGINT and the rest on to the stage, exits with the stage's status, and
the stage dies with it if it is killed.

Where the server cannot serve a command exactly as a new process would run it, the command runs in
a new process as before: a command before the server is listening, a launched worker of a
multi-GPU job, or (logged) one whose environment differs from the server's in more than thread,
temporary-folder and working-directory settings (libraries read many variables once, at import).
A served training stage's ``peak_memory_mib`` on the CPU (its max RSS) counts only the pages of the
server's libraries that the fork touched, less than a new process's; its MLflow run is tagged
``process: served``.

Snakemake starts one for a run on this machine (not for cluster jobs) on Linux without NVIDIA GPUs
(a fork must not inherit a CUDA context; a GPU stage's start-up is small beside its work). Set
``SP_WARM_STAGES=0`` to start every stage as a new process. Of a served stage, Snakemake's
``benchmark`` file has the wall time only: its memory and CPU are in the server's fork, not the job.

    python -m selfperceptual.pipeline.warm SOCKET           # the server (Snakefile starts and stops it)
    python -m selfperceptual.pipeline.warm --run dvc repro  # any command, its stages served (DVC starts none)
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from glob import glob
from typing import NoReturn

SERVER_ENV = "SP_STAGE_SERVER"
SWITCH_ENV = "SP_WARM_STAGES"
# Read by the stage itself (torch.set_num_threads), so they may differ from the server's.
THREAD_SETTINGS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS",
                   "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
# Where temporary files go (Snakemake sets them for each job; the fork reads them afresh), and
# the working directory as the command's shell saw it (the fork moves there).
PER_COMMAND = ("TMPDIR", "TMP", "TEMP", "TEMPDIR", "PWD", "OLDPWD")
# Read by nobody at import: the shell's nesting level and last command, MLflow's telemetry session.
UNREAD = ("SHLVL", "_", "_MLFLOW_TELEMETRY_SESSION_ID")
# Set by DVC for each command it runs (dvc/stage/run.py, dvc/repo/experiments), read by no library at import.
DVC_PER_COMMAND = ("DVC_ROOT", "DVC_STAGE", "DVC_EXP_BASELINE_REV", "DVC_EXP_NAME")
# Set by a launcher in each process of a multi-GPU job: those run as new processes.
LAUNCHED = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
SERVED = False  # True in a stage forked from the server (a training run's tags say so: its max RSS is the fork's)
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
_HEADER = struct.Struct("!I")
_STATUS = struct.Struct("!i")
_DECLINED = -(2**31)

log = logging.getLogger("warm")


# The command's side ---------------------------------------------------------------------------

def delegate(path: str, argv: list[str]) -> int | None:
    """Runs ``argv`` (``sys.argv`` of ``python -m selfperceptual``) in a fork of the server at
    ``path``; returns its exit status, or None when it must run in this process instead."""
    if any(name in os.environ for name in LAUNCHED):
        return None
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(path)
    except OSError:  # not started yet, or stopped: a new process is as right, only slower
        client.close()
        return None
    with client:
        request = json.dumps({"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}).encode()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        socket.send_fds(client, [_HEADER.pack(len(request)) + request], [0, 1, 2])
        pid = _receive_status(client)
        if pid is None or pid == _DECLINED:
            return None
        previous = {signum: signal.signal(signum, lambda signum, frame: _send(pid, signum)) for signum in FORWARDED}
        status = _receive_status(client)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if status is None:  # the server went away without a word: the stage's fate is unknown
        print("error: the stage server stopped before the stage ended", file=sys.stderr)
        return 1
    if status < 0:  # killed by a signal: end the same way, as the shell would see a new process end
        signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
        return 128 - status
    return status


def _send(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _receive_status(connection: socket.socket) -> int | None:
    data = b""
    while len(data) < _STATUS.size:
        chunk = connection.recv(_STATUS.size - len(data))
        if not chunk:
            return None
        data += chunk
    return _STATUS.unpack(data)[0]


# Starting and stopping ------------------------------------------------------------------------

class Server:
    """A stage server started for a pipeline run; ``stop`` ends it after its stages."""

    def __init__(self, process: subprocess.Popen, folder: str):
        self.process, self.folder = process, folder

    def stop(self) -> None:
        os.environ.pop(SERVER_ENV, None)
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


def not_wanted(local: bool) -> str | None:
    """Why a pipeline run should start every stage as a new process, or None."""
    if os.environ.get(SWITCH_ENV, "1") == "0":
        return f"{SWITCH_ENV}=0"
    if os.environ.get(SERVER_ENV):
        return f"{SERVER_ENV} names a server already"
    if not local:
        return "stages run as cluster jobs"
    if sys.platform != "linux":
        return "forking a process that has imported torch is safe on Linux only"
    if glob("/dev/nvidia[0-9]*"):
        return "this machine has NVIDIA GPUs"
    return None


def start(local: bool) -> Server | None:
    """Starts a server for this process's stage commands (they find it through the environment),
    unless ``not_wanted``. It takes commands once its imports are done; until then they run as new
    processes."""
    reason = not_wanted(local)
    if reason:
        log.info("stages start as new processes: %s", reason)
        return None
    folder = tempfile.mkdtemp(prefix="sp-stages-")
    path = os.path.join(folder, "socket")
    # os.environ as Snakemake passes it to its jobs (a library's own setenv is not in it); the
    # server's own session: signals reach a stage through its command only.
    process = subprocess.Popen([sys.executable, "-m", f"{__package__}.warm", path], env=dict(os.environ), start_new_session=True)
    os.environ[SERVER_ENV] = path
    return Server(process, folder)


# The server's side ----------------------------------------------------------------------------

# Imported once by the server besides every stage of cli.STAGES: what stages import when they run.
PRELOAD = (
    "selfperceptual.method.losses", "selfperceptual.method.cascade",  # what the objectives import when they build
    "mlflow", "mlflow.entities", "mlflow.store.tracking.sqlalchemy_store",
    "diffusers", "torchvision.models", "torch_fidelity.feature_extractor_inceptionv3", "PIL.Image",
)
PRELOAD_NAMES = (("transformers", ("CLIPModel", "CLIPProcessor", "CLIPTokenizer", "CLIPTextModel", "CLIPImageProcessor")),
                 ("diffusers", ("AutoencoderKL", "UNet2DConditionModel", "PNDMScheduler")))


class _Stage(Exception):
    """Raised in a fork to leave the server's loop and run a stage with a clean stack."""

    def __init__(self, argv: list[str]):
        self.argv = argv


def preload() -> dict[str, str]:
    """Imports what stages use; returns the variables those imports set, as they would in a new process."""
    import importlib

    from .cli import STAGES

    before = dict(os.environ)
    for name in (*(f"{__package__}.stages.{stage}" for stage in STAGES), *PRELOAD):
        importlib.import_module(name)
    for module, names in PRELOAD_NAMES:
        for name in names:
            getattr(importlib.import_module(module), name)
    return {key: value for key, value in os.environ.items() if before.get(key) != value}


def differences(env: dict[str, str], server_env: dict[str, str]) -> list[str]:
    """Variables set differently from the server's, other than thread settings."""
    keys = (set(env) | set(server_env)) - set(THREAD_SETTINGS) - set(PER_COMMAND) - set(DVC_PER_COMMAND) - set(UNREAD) - {SERVER_ENV}
    return sorted(key for key in keys if env.get(key) != server_env.get(key))


def serve(path: str, server_env: dict[str, str], imported_env: dict[str, str], parent: int) -> None:
    """Accepts commands at ``path`` until SIGTERM or the exit of ``parent`` (the pipeline's driver),
    forking one process per command; then waits for the stages it started. A command is served when
    its environment is ``server_env`` (the one the server started with) but for the settings
    ``differences`` leaves out; its fork has the command's environment plus ``imported_env``, what
    the imports set."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".new")
    listener.listen(64)
    os.rename(path + ".new", path)  # listening before a command can find it
    stopping = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    running: dict[int, socket.socket] = {}
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    try:
        while not stopping and os.getppid() == parent or running:
            if (stopping or os.getppid() != parent) and listener.fileno() >= 0:
                selector.unregister(listener)
                listener.close()
                os.unlink(path)
            for _ in selector.select(timeout=0.05):
                connection, _ = listener.accept()
                pid = _start(connection, server_env, imported_env, listener, running)
                if pid:
                    running[pid] = connection
            while running:
                try:
                    pid, wait_status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:  # no child at all: the stages still listed have ended and been reaped
                    for connection in running.values():
                        connection.close()
                    running.clear()
                    break
                if not pid or pid not in running:
                    break
                with running.pop(pid) as connection:
                    try:
                        connection.sendall(_STATUS.pack(os.waitstatus_to_exitcode(wait_status)))
                    except OSError:  # the command is gone (and its stage with it)
                        pass
    finally:
        if listener.fileno() >= 0:
            listener.close()
            os.unlink(path)


def _start(connection: socket.socket, server_env: dict, imported_env: dict, listener: socket.socket, running: dict) -> int | None:
    """Reads one command and forks its stage; returns the fork's pid, or None when declined."""
    fds: list[int] = []
    try:
        data, fds, _, _ = socket.recv_fds(connection, 1 << 16, 3)
        while len(data) < _HEADER.size or len(data) < _HEADER.size + _HEADER.unpack(data[: _HEADER.size])[0]:
            chunk = connection.recv(1 << 16)
            if not chunk:
                raise OSError("the command hung up")
            data += chunk
        request = json.loads(data[_HEADER.size :])
        changed = differences(request["env"], server_env)
        if len(fds) != 3 or changed:
            log.warning("running %s in a new process: its environment differs in %s", request["argv"][1:2], changed)
            connection.sendall(_STATUS.pack(_DECLINED))
            connection.close()
            return None
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        pid = os.fork()
        if pid == 0:
            listener.close()
            for other in running.values():
                other.close()
            imported = {key: value for key, value in imported_env.items() if key not in UNREAD}
            _become({**request["env"], **imported}, request["cwd"], fds, connection)
            raise _Stage(request["argv"])
        try:
            connection.sendall(_STATUS.pack(pid))
        except OSError:  # the command is gone: its stage sees that and ends; it is still reaped
            pass
        return pid
    except (OSError, ValueError, KeyError) as error:
        log.warning("a command could not be served: %s", error)
        connection.close()
        return None
    finally:
        for fd in fds:
            os.close(fd)


def _become(env: dict[str, str], cwd: str, fds: list[int], connection: socket.socket) -> None:
    """In the fork: the command's streams, environment, directory, signals and threads."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=stream is sys.stderr or os.isatty(stream.fileno()))
    os.environ.clear()
    os.environ.update({key: value for key, value in env.items() if key != SERVER_ENV})  # what it launches starts anew
    os.chdir(cwd)
    tempfile.tempdir = None  # found again from TMPDIR and the rest
    for signum in (*FORWARDED, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    threads = os.environ.get("OMP_NUM_THREADS")
    import torch
    from threadpoolctl import threadpool_limits

    count = int(threads) if threads else len(os.sched_getaffinity(0))
    torch.set_num_threads(count)
    threadpool_limits(count)
    _die_with(connection)


def _die_with(connection: socket.socket) -> None:
    """The stage ends when its command's process does (killed, it cannot pass that on)."""
    import threading

    def watch() -> None:
        while True:
            try:
                if not connection.recv(1):
                    break
            except InterruptedError:
                continue
            except OSError:
                break
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="warm-watch", daemon=True).start()


def run_stage(argv: list[str]) -> NoReturn:
    """Runs the stage in the fork and ends the fork as a new process would end, but for tearing
    down every module the server imported (seconds of CPU that a stage needs no more than a new
    process does: its open files are closed by then, and the exit handlers still run)."""
    from .cli import main

    import importlib

    importlib.import_module(f"{__package__}.warm").SERVED = True  # the server runs as __main__: the stages' copy
    sys.argv = list(argv)
    try:
        code = main(argv[1:])
    except SystemExit as error:
        code = error.code
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())
        _exit_handlers()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        code = 128 + signal.SIGINT
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    _exit_handlers()
    os._exit(code & 0xFF)


def _exit_handlers() -> None:
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def run_with_server(command: list[str]) -> int:
    """Runs ``command`` (``dvc repro``, ``dvc exp run``, a script) with a stage server for the
    stages it starts; returns its exit status. Ctrl-C reaches the command from the terminal, as
    it would without this; SIGTERM and SIGHUP are passed on to it."""
    if not command:
        raise SystemExit("usage: python -m selfperceptual.pipeline.warm --run COMMAND [ARG ...]")
    from uuid import uuid4

    from .tracking import EXECUTION_ENV

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # One execution for its runs in MLflow, whether a stage is served or not (as the Snakefile does).
    label = next((word for word in command if not word.startswith("-") and "python" not in os.path.basename(word)), "command")
    os.environ.setdefault(EXECUTION_ENV, f"{os.path.basename(label)}-{uuid4().hex[:12]}")
    server = start(local=True)
    try:
        process = subprocess.Popen(command)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, lambda signum, frame: _send(process.pid, signum))
        return process.wait()
    finally:
        if server:
            server.stop()


def main() -> None:
    if sys.argv[1:2] == ["--run"]:
        sys.exit(run_with_server(sys.argv[2:]))
    path = sys.argv[1]
    parent = os.getppid()  # before the imports: a parent killed while they run is noticed too
    started = time.monotonic()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # as python -m selfperceptual sets it
    server_env = dict(os.environ)
    imported_env = preload()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    log.info("stage server ready at %s (%.1f s of imports)", path, time.monotonic() - started)
    logging.getLogger().handlers.clear()  # a stage configures its own logging, as a new process does
    try:
        serve(path, server_env, imported_env, parent)
    except _Stage as stage:
        run_stage(stage.argv)


if __name__ == "__main__":
    main()
