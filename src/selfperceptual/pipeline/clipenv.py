"""clip-retrieval's environment shares .venv's torch build.

clip-retrieval pins numpy<2, pyarrow<16, webdataset<0.3 and open_clip<3, so it has an environment of
its own (``.venv-clip``, ``make clip-env``). Its torch is .venv's, the same exact build: PyTorch,
torchvision, Triton and the CUDA libraries (4.6 GB on Linux x86_64) are linked into it, not installed
a second time, and ``requirements-clip.lock`` lists only the rest.

    python -m selfperceptual.pipeline.clipenv .venv-clip    # after python3 -m venv, before its pip install
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
from pathlib import Path, PurePosixPath

SHARED = {"torch", "torchvision", "triton"}
SHARED_PREFIXES = ("nvidia-", "cuda-")  # the CUDA wheels torch depends on (Linux x86_64)


def is_shared(name: str) -> bool:
    name = name.lower().replace("_", "-")
    return name in SHARED or name.startswith(SHARED_PREFIXES)


def site_packages(env: Path) -> Path:
    folder = env / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    if not folder.is_dir():
        raise SystemExit(f"clipenv: {env} has no {folder.relative_to(env)}; it must be a venv of the same Python as .venv "
                         f"({sys.version_info.major}.{sys.version_info.minor})")
    return folder


def shared_entries() -> dict[str, Path]:
    """Each top-level file or folder of the shared distributions (their dist-info included), by name."""
    entries: dict[str, Path] = {}
    for dist in importlib.metadata.distributions():
        if not is_shared(dist.metadata["Name"]):
            continue
        root = Path(dist.locate_file(""))
        for file in dist.files or ():
            top = PurePosixPath(str(file)).parts[0]
            if top != "..":  # console scripts in bin/ stay .venv's
                entries[top] = root / top
    return entries


def link_torch(env: Path) -> list[str]:
    """Symlinks (relative, so the checkout can move) from env's site-packages to .venv's torch stack."""
    target = site_packages(env)
    entries = shared_entries()
    if not any(name.startswith("torch-") for name in entries):
        raise SystemExit(f"clipenv: no torch in {sys.prefix}; run `make setup` first")
    for name, source in sorted(entries.items()):
        link = target / name
        if link.is_symlink() or link.exists():
            if link.resolve() != source.resolve():
                raise SystemExit(f"clipenv: {link} exists and is not .venv's {name}; remove {env} and run `make clip-env` again")
            continue
        link.symlink_to(os.path.relpath(source, target))
    return sorted(entries)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("env", type=Path, help="the environment to link into (a fresh venv)")
    args = parser.parse_args(argv)
    names = link_torch(args.env)
    print(f"clipenv: {len(names)} entries of .venv's torch build linked into {args.env}")


if __name__ == "__main__":
    main()
