"""A sampling row's images, as its sample stage's parts wrote them."""

from __future__ import annotations

from pathlib import Path

from ...method.errors import InputError
from ..io import read_json


def sample_images(folders: list[Path]) -> tuple[dict, list[Path]]:
    """A sampling row's samples.json and its images in order, from all its parts; an error if
    the parts are not all of one row or leave images out."""
    for folder in folders:
        if not (folder / "samples.json").is_file():
            raise InputError("samples", "no samples.json; run its sample stage", folder)
    parts = [read_json(folder / "samples.json") for folder in folders]
    rows = {part["row"] for part in parts}
    everything = ", ".join(map(str, folders))
    if len(rows) != 1:
        raise InputError("samples", f"these folders hold different rows {sorted(rows)}", everything)
    paths = sorted((path for folder in folders for path in (folder / "images").glob("*.png")), key=lambda path: path.name)
    expected = len(parts[0]["prompts"])
    if [path.name for path in paths] != [f"{position:05d}.png" for position in range(expected)]:
        raise InputError("samples", f"row {rows.pop()}: {len(paths)} of {expected} images; a part is missing", everything)
    return parts[0], paths
