"""The corpus: a deterministic LAION-Aesthetics-schema corpus made offline, or the real one.

The synthetic corpus draws coloured shapes whose captions say what they show. Its
``AESTHETIC_SCORE`` means something: the lower it is, the more the image is spoilt by noise and
blur, so the aesthetic filter removes the ugly ones, as it does on LAION. Source sizes lie on both
sides of the minimum-side threshold, and a few rows point to missing or corrupt files, as LAION
URLs do. URLs are relative to the corpus folder (so it can move); the download stage resolves
them to file:// URIs. Two held-out splits stand where MSCOCO stands in the paper: ``eval`` (captions and real
images for the FID reference) and ``featnet`` (labelled images to train the feature network).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

log = logging.getLogger("corpus")
LAION_COLUMNS = ["URL", "TEXT", "WIDTH", "HEIGHT", "AESTHETIC_SCORE", "punsafe", "pwatermark"]
SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 50, 180),
    "orange": (245, 130, 30),
}
BACKGROUNDS = {"white": (235, 235, 235), "black": (20, 20, 20), "gray": (128, 128, 128), "teal": (30, 110, 110)}
SIZES = ("small", "large")
NUM_CLASSES = len(SHAPES) * len(COLORS)  # the feature network's labels: (shape, colour)
CLEAN_SCORE = 6.5  # scores at or above this render without any spoiling


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    background: str
    size: str
    x: float  # centre, as a fraction of the canvas
    y: float

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.color} {self.shape} on a {self.background} background"

    @property
    def label(self) -> int:
        return SHAPES.index(self.shape) * len(COLORS) + list(COLORS).index(self.color)


def random_scene(rng: np.random.Generator) -> Scene:
    return Scene(
        shape=SHAPES[rng.integers(len(SHAPES))],
        color=list(COLORS)[rng.integers(len(COLORS))],
        background=list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
        size=SIZES[rng.integers(len(SIZES))],
        x=float(rng.uniform(0.35, 0.65)),
        y=float(rng.uniform(0.35, 0.65)),
    )


def render(scene: Scene, width: int, height: int, aesthetic: float, rng: np.random.Generator) -> Image.Image:
    """Draws the scene; below CLEAN_SCORE the image is spoilt in proportion to the shortfall."""
    image = Image.new("RGB", (width, height), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    side = min(width, height)
    radius = side * (0.17 if scene.size == "small" else 0.32)
    cx, cy = scene.x * width, scene.y * height
    color = COLORS[scene.color]
    if scene.shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=color)
    elif scene.shape == "square":
        draw.rectangle([cx - radius, cy - radius, cx + radius, cy + radius], fill=color)
    else:
        corners = 3 if scene.shape == "triangle" else 4
        start = -math.pi / 2
        draw.polygon(
            [(cx + radius * math.cos(start + 2 * math.pi * k / corners), cy + radius * math.sin(start + 2 * math.pi * k / corners)) for k in range(corners)],
            fill=color,
        )
    shortfall = max(0.0, CLEAN_SCORE - aesthetic)
    if shortfall > 0:
        image = image.filter(ImageFilter.GaussianBlur(radius=shortfall * side / 40))
        pixels = np.asarray(image, dtype=np.float32)
        pixels += rng.normal(0.0, 30.0 * shortfall, size=pixels.shape)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image


def _write_image(image: Image.Image, path: Path, broken: str | None) -> None:
    if broken == "missing":
        return
    image.save(path, quality=95)
    if broken == "corrupt":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])


def make_train_rows(config, image_dir: Path, rng: np.random.Generator) -> pd.DataFrame:
    rows = []
    for index in range(config.num_train_rows):
        scene = random_scene(rng)
        width, height = (int(v) for v in rng.integers(config.min_source_side, config.max_source_side + 1, size=2))
        aesthetic = float(np.round(rng.uniform(3.5, 8.5), 3))
        broken = None
        if rng.random() < config.broken_fraction:
            broken = "missing" if rng.random() < 0.5 else "corrupt"
        path = image_dir / f"{index:06d}.jpg"
        _write_image(render(scene, width, height, aesthetic, rng), path, broken)
        rows.append(
            {
                "URL": f"{image_dir.name}/{path.name}",  # relative to the corpus folder
                "TEXT": scene.caption,
                "WIDTH": width,
                "HEIGHT": height,
                "AESTHETIC_SCORE": aesthetic,
                "punsafe": float(np.round(rng.beta(1, 20), 4)),
                "pwatermark": float(np.round(rng.beta(1, 8), 4)),
            }
        )
    return pd.DataFrame(rows, columns=LAION_COLUMNS)


def make_heldout_split(count: int, resolution: int, image_dir: Path, rng: np.random.Generator) -> pd.DataFrame:
    """Clean images at the training resolution, with captions and labels."""
    rows = []
    for index in range(count):
        scene = random_scene(rng)
        path = image_dir / f"{index:06d}.png"
        render(scene, resolution, resolution, CLEAN_SCORE + 1.0, rng).save(path)
        rows.append({"caption": scene.caption, "label": scene.label, "image": f"{image_dir.name}/{path.name}"})
    return pd.DataFrame(rows)


def build_synthetic(config, resolution: int, out: Path) -> dict:
    """Writes laion.parquet + images/, eval/ and featnet/ under ``out``; returns a summary."""
    rng = np.random.default_rng(config.seed)
    (out / "images").mkdir()
    train = make_train_rows(config, out / "images", rng)
    train.to_parquet(out / "laion.parquet", index=False)
    splits = {}
    for name, count in (("eval", config.num_eval_captions), ("featnet", config.num_featnet_images)):
        (out / name).mkdir()
        split = make_heldout_split(count, resolution, out / name, rng)
        split.to_parquet(out / f"{name}.parquet", index=False)
        splits[name] = len(split)
    return {"source": "synthetic", "train_rows": len(train), **{f"{k}_rows": v for k, v in splits.items()}}


class ExternalFileError(ValueError):
    """An external input (LAION metadata, COCO captions or images) that is not what its format says;
    the message names the setting, the file and what is wrong in it, in one line."""


def read_laion(path: str | Path) -> pd.DataFrame:
    """LAION-Aesthetics metadata: a parquet file with the LAION columns (``LAION_COLUMNS``), named as LAION names them."""
    try:
        laion = pd.read_parquet(path)
    except Exception as error:  # noqa: BLE001 - pyarrow's ArrowInvalid, OSError, ... by what the file is
        reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise ExternalFileError(f"corpus.laion_parquet: {path}: not a parquet file ({reason})") from None
    absent = [column for column in LAION_COLUMNS if column not in laion.columns]
    if absent:
        other_case = [str(column) for column in laion.columns if str(column).upper() in map(str.upper, absent)]
        hint = f"; it has {', '.join(other_case)}: rename them as LAION names them" if other_case else f" (it has {', '.join(map(str, laion.columns))})"
        raise ExternalFileError(f"corpus.laion_parquet: {path}: missing the LAION column(s) {', '.join(absent)}{hint}")
    return laion


def read_coco_captions(path: str | Path, count: int, images: Path) -> tuple[list[str], list[str]]:
    """The first ``count`` captions of an MSCOCO captions file and their image files under ``images``
    (each checked to be there). Fewer captions than ``count`` are taken, with a warning."""
    setting = "corpus.coco_captions"
    try:
        coco = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ExternalFileError(f"{setting}: {path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); "
                                "a truncated download?") from None  # fmt: skip
    except UnicodeDecodeError:
        raise ExternalFileError(f"{setting}: {path}: not a text file (COCO's captions_val2014.json is JSON)") from None
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list) or not isinstance(coco.get("annotations"), list):
        raise ExternalFileError(f"{setting}: {path}: not an MSCOCO captions file (it needs the lists 'images' and 'annotations')")
    try:
        files = {image["id"]: image["file_name"] for image in coco["images"]}
        annotations = [(a["caption"].strip(), a["image_id"]) for a in coco["annotations"][:count]]
    except (KeyError, TypeError, AttributeError) as error:
        raise ExternalFileError(f"{setting}: {path}: an image or annotation lacks {error} (COCO's id, file_name, image_id, caption)") from None
    unknown = next((image_id for _, image_id in annotations if image_id not in files), None)
    if unknown is not None:
        raise ExternalFileError(f"{setting}: {path}: an annotation names image_id {unknown!r}, which its 'images' does not list")
    if len(annotations) < count:
        log.warning("corpus.coco_captions: %s holds %d captions, fewer than corpus.num_eval_captions = %d: "
                    "the evaluation uses those %d", path, len(annotations), count, len(annotations))  # fmt: skip
    paths = [str(images / files[image_id]) for _, image_id in annotations]
    missing = [p for p in dict.fromkeys(paths) if not Path(p).is_file()]
    if missing:
        raise ExternalFileError(f"corpus.coco_images: {images}: {len(missing)} of the images the captions name are not there, "
                                f"e.g. {Path(missing[0]).name}")  # fmt: skip
    return [caption for caption, _ in annotations], paths


def import_external(config, out: Path) -> dict:
    """The paper scale: LAION metadata as given, and the first N MSCOCO-2014 val captions."""
    missing = [name for name in ("laion_parquet", "coco_captions", "coco_images") if not getattr(config, name)]
    if missing:
        raise ExternalFileError(f"corpus.source is 'external' but corpus.{', corpus.'.join(missing)} is not set")
    for name in ("laion_parquet", "coco_captions", "coco_images"):
        if not Path(getattr(config, name)).exists():
            raise ExternalFileError(f"corpus.{name}: {getattr(config, name)} does not exist")
    laion = read_laion(config.laion_parquet)
    laion[LAION_COLUMNS].to_parquet(out / "laion.parquet", index=False)
    captions, images = read_coco_captions(config.coco_captions, config.num_eval_captions, Path(config.coco_images).resolve())
    evaluation = pd.DataFrame({"caption": captions, "label": -1, "image": images})
    evaluation.to_parquet(out / "eval.parquet", index=False)
    pd.DataFrame(columns=["caption", "label", "image"]).to_parquet(out / "featnet.parquet", index=False)
    return {"source": "external", "train_rows": len(laion), "eval_rows": len(evaluation), "eval_captions_asked": config.num_eval_captions,
            "featnet_rows": 0}
