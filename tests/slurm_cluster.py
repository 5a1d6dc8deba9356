"""A real SLURM cluster on localhost for the tests, shaped like a GPU cluster: Debian's slurm-wlm and munge.

Two nodes of 64 CPUs, about 1 TB and 8 GPUs each (SLURM is told to trust that configuration; the GPUs
are device files standing for /dev/nvidia*), and partitions debug (the default), work and gpu, the
last with a 48-hour limit. ``gpu_cluster(folder)`` installs the packages if they are missing
(apt-get, as root), starts munged, slurmctld and one slurmd per node with every file of theirs under
``folder`` and private ports (but the
sockets, in a short-named folder under /tmp: a Unix socket path has at most 108 bytes, and slurmd's
job sockets under a pytest folder reach it at job 10), yields the environment that points SLURM's
commands at it (``SLURM_CONF``), and stops the daemons after.

While the cluster runs, SLURM's default configuration path links to its slurm.conf: the SLURM
executor runs each job's srun with every SLURM_* variable removed, SLURM_CONF included, so srun
inside a job finds the configuration where a real cluster keeps it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
DEFAULT_CONF = Path("/etc/slurm/slurm.conf")  # Debian's compiled-in path
DAEMONS = ("slurmctld", "slurmd", "munged")


class SlurmUnavailable(RuntimeError):
    """This machine cannot run SLURM (no apt-get, not root, or the install failed)."""


def ensure_installed() -> None:
    if all(shutil.which(name) or Path(f"/usr/sbin/{name}").exists() for name in DAEMONS):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable("slurm-wlm and munge are not installed, and installing them needs root and apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
        if result.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _daemon(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


# Nodes shaped like a cluster's GPU nodes (an 8-GPU server: 64 cores, about 1 TB): SLURM trusts the
# configured hardware (config_overrides), and its GPUs are files that stand for /dev/nvidia0-7.
GPU_NODE = {"cpus": 64, "memory_mb": 1_000_000, "gpus": 8}
NODES = ("node1", "node2")  # two, so that a two-node training job can be judged and placed
PARTITION_MAX_TIME = "48:00:00"  # the "gpu" partition's limit, as on many clusters


def slurm_conf(folder: Path, sockets: Path) -> str:
    """The verified recipe of shared/DESIGN.md: two GPU nodes on loopback, each its own slurmd on its
    own port, with every path private to ``folder`` and munged's and slurmd's sockets under ``sockets``."""
    ctld_port, *node_ports = _free_ports(1 + len(NODES))
    (folder / "state").mkdir(exist_ok=True)
    for node in NODES:
        (sockets / "spool" / node).mkdir(parents=True, exist_ok=True)
    devices = sockets / "dev"
    devices.mkdir(exist_ok=True)
    for index in range(GPU_NODE["gpus"]):
        (devices / f"nvidia{index}").symlink_to("/dev/null")
    (folder / "gres.conf").write_text(f"NodeName={','.join(NODES)} Name=gpu Count={GPU_NODE['gpus']} File={devices}/nvidia[0-{GPU_NODE['gpus'] - 1}]\n")
    nodes = " ".join(NODES)
    return "\n".join(
        [
            "ClusterName=sptest",
            "SlurmctldHost=localhost",
            "SlurmUser=root",
            f"SlurmctldPort={ctld_port}",
            f"AuthInfo=socket={sockets / 'munge.socket'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",  # trust the nodes' configured CPUs, memory and GPUs
            "GresTypes=gpu",
            "EnforcePartLimits=ALL",  # a request over a partition's limits is refused at submission, as on real clusters
            # Finished jobs stay on record for a day: the tests read them back, and the SLURM executor
            # follows jobs with squeue only when records outlive its status checks (else it tries sacct,
            # which this cluster, keeping no accounting, cannot answer). 0 would read as 2 s here.
            "MinJobAge=86400",
            "SchedulerParameters=sched_interval=1",
            f"StateSaveLocation={folder / 'state'}",
            f"SlurmdSpoolDir={sockets / 'spool'}/%n",
            f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
            f"SlurmdPidFile={folder / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={folder / 'slurmctld.log'}",
            f"SlurmdLogFile={folder / 'slurmd-%n.log'}",
            *(f"NodeName={name} NodeAddr=127.0.0.1 Port={port} CPUs={GPU_NODE['cpus']} RealMemory={GPU_NODE['memory_mb']} "
              f"Gres=gpu:{GPU_NODE['gpus']} State=UNKNOWN" for name, port in zip(NODES, node_ports)),
            f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP",
            f"PartitionName=work Nodes={','.join(NODES)} Default=NO MaxTime=INFINITE State=UP",  # what a user's cluster.yaml names
            f"PartitionName=gpu Nodes={','.join(NODES)} Default=NO MaxTime={PARTITION_MAX_TIME} State=UP",
            "",
        ]
    )


@contextlib.contextmanager
def gpu_cluster(folder: Path):
    """Yields the environment (SLURM_CONF and the rest of os.environ) of a running cluster."""
    ensure_installed()
    folder.mkdir(parents=True, exist_ok=True)
    sockets = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
    munge_socket = sockets / "munge.socket"
    conf = folder / "slurm.conf"
    conf.write_text(slurm_conf(folder, sockets))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    processes = []
    munged = [
        _daemon("munged"), "--force", f"--socket={munge_socket}", f"--pid-file={folder / 'munged.pid'}",
        f"--log-file={folder / 'munged.log'}", f"--seed-file={folder / 'munged.seed'}",
    ]
    if not Path("/etc/munge/munge.key").exists():
        subprocess.run([_daemon("mungekey"), "--create"], check=True)
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, sockets, ignore_errors=True)
        stack.enter_context(_default_conf_linked_to(conf))
        subprocess.run(munged, check=True, capture_output=True, text=True)
        stack.callback(subprocess.run, [_daemon("munged"), "--stop", f"--socket={munge_socket}"], capture_output=True, check=False)
        daemons = [[_daemon("slurmctld"), "-D", "-i", "-f", str(conf)], *([_daemon("slurmd"), "-D", "-N", node, "-f", str(conf)] for node in NODES)]
        for command in daemons:
            log = stack.enter_context(open(folder / f"{Path(command[0]).name}-{command[-3]}.out", "w"))
            processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
        stack.callback(_stop, processes)
        _wait_until_idle(env, folder)
        yield env


@contextlib.contextmanager
def _default_conf_linked_to(conf: Path):
    running = subprocess.run(["pgrep", "-x", "slurmctld"], capture_output=True, check=False).returncode == 0
    if DEFAULT_CONF.is_symlink() and not running:
        DEFAULT_CONF.unlink()  # left by a test cluster that was killed
    if DEFAULT_CONF.exists():
        raise SlurmUnavailable(f"{DEFAULT_CONF} exists (a SLURM of this machine, or another test cluster): not replacing it")
    DEFAULT_CONF.parent.mkdir(parents=True, exist_ok=True)
    DEFAULT_CONF.symlink_to(conf)
    try:
        yield
    finally:
        DEFAULT_CONF.unlink(missing_ok=True)


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=20)
        if process.poll() is None:
            process.kill()


def _wait_until_idle(env: dict, folder: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    state = ""
    while time.monotonic() < deadline:
        result = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True, check=False)
        state = result.stdout.strip()
        if state and set(state.split()) == {"idle"}:  # one line per partition
            return
        time.sleep(1)
    logs = "\n".join(f"{p.name}:\n{p.read_text()[-1500:]}" for p in sorted(folder.glob("*.log")) + sorted(folder.glob("*.out")))
    raise RuntimeError(f"the SLURM node did not become idle in {timeout_s:.0f} s (state {state!r})\n{logs}")
