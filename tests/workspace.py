"""A temporary copy of the repository to run the real pipeline in (tests never touch the checkout)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def copy_repository(destination: Path, scale: str | None = None) -> Path:
    """Copies tracked and untracked-but-not-ignored files, then makes it a git repo of its own."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO, check=True, capture_output=True
    ).stdout.decode().split("\0")
    for name in filter(None, files):
        source = REPO / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    if scale:
        params = destination / "params.yaml"
        params.write_text(params.read_text().replace("\nscale: local\n", f"\nscale: {scale}\n"))
    subprocess.run(["git", "init", "-q"], cwd=destination, check=True)
    commit(destination, "copy")
    return destination


def commit(copy: Path, message: str) -> None:
    """Commits everything git does not ignore in ``copy``."""
    subprocess.run(["git", "add", "-A"], cwd=copy, check=True)
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", message], cwd=copy, check=True)


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "SP_PIPELINE_EXECUTION")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["NO_ALBUMENTATIONS_UPDATE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def run(command: list[str], cwd: Path, timeout: int = 900, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs ``command`` in ``cwd`` with the test environment (plus ``env``); fails with its output."""
    result = subprocess.run(command, cwd=cwd, env={**environment(), **(env or {})}, capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextmanager
def serve(folder):
    """An HTTP server for ``folder`` on loopback, stopped on exit; yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
