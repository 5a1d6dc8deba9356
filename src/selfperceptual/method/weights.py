"""Weights files from outside (torch ``.pth``: Inception-v3, VGG16, the LAION aesthetic predictor),
read so that none can run code: ``torch.load(..., weights_only=True)`` unpickles tensors and plain
containers only, and refuses anything else before it runs. A file's SHA-256 is checked against the
one its publisher gives, where there is one (torch hub names its files ``<name>-<first hex digits of
the SHA-256>.pth``: that prefix is the published hash)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from .errors import SettingError


class WeightsFileError(SettingError):
    """A weights file named by ``setting`` is missing, not a plain weights file, or not the published one."""

    def __init__(self, setting: str, path: Path | str, problem: str):
        super().__init__(setting, f"{path}: {problem}")
        self.path = path


def sha256_of(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_weights(path: Path | str | None, setting: str, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (the params key ``setting`` names it), on the CPU. ``sha256``: the
    published hash, whole or its leading hex digits; None checks nothing."""
    if not path or not Path(path).is_file():
        raise WeightsFileError(setting, path, "not a file")
    if sha256:
        found = sha256_of(path)
        if not found.startswith(sha256.lower()):
            raise WeightsFileError(setting, path, f"SHA-256 {found}, not the published {sha256}: another file, or a damaged copy")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError or EOFError by what is wrong
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        why = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0] if lines else type(error).__name__)
        raise WeightsFileError(setting, path, f"not a plain weights file, refused without running it ({why})") from None
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise WeightsFileError(setting, path, "not a state dict (a mapping of names to tensors)")
    return state
