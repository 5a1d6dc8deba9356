"""Image sheets a person can judge in MLflow: a title, then the images in rows, each with its caption
under it. Small images (32 px at the small scales) are enlarged by a whole factor with nearest
neighbour, so that no pixel is invented; large ones (512 px at the paper scale) are shrunk to keep
a sheet of sixteen under a few megabytes."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

CAPTION_LINES = 3


def _wrap(text: str, font, width: float, limit: int | None = None) -> list[str]:
    """``text`` in lines no wider than ``width``; past ``limit`` lines the last one ends in an ellipsis."""
    lines: list[str] = []
    for word in text.split():
        trial = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(trial) <= width:
            lines[-1] = trial
        else:
            lines.append(word)
    lines = [_fit(line, font, width) for line in lines] or [""]
    if limit is not None and len(lines) > limit:
        lines = [*lines[: limit - 1], _fit(lines[limit - 1] + " " + " ".join(lines[limit:]), font, width, force=True)]
    return lines


def _fit(line: str, font, width: float, force: bool = False) -> str:
    """``line`` cut with an ellipsis where it is wider than ``width`` (or, with ``force``, cut anyway)."""
    if font.getlength(line) <= width and not force:
        return line
    while line and font.getlength(line + "…") > width:
        line = line[:-1]
    return line.rstrip() + "…"


def sheet(images: list[Image.Image], captions: list[str], title: str, columns: int = 4, min_side: int = 128,
          max_side: int = 256, pad: int = 6) -> Image.Image:  # fmt: skip
    """The images ``columns`` to a row, each with its caption under it, below ``title``."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    side = min(images[0].size)
    if side < min_side:
        factor = -(-min_side // side)
        images = [image.resize((image.width * factor, image.height * factor), Image.NEAREST) for image in images]
    elif side > max_side:
        images = [image.resize((image.width * max_side // side, image.height * max_side // side), Image.LANCZOS) for image in images]
    width, height = images[0].size
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    font, heading = ImageFont.load_default(size=12), ImageFont.load_default(size=15)
    line, title_line = int(font.size * 1.35), int(heading.size * 1.4)
    title_lines = _wrap(title, heading, columns * (width + pad) - pad)
    top = pad + len(title_lines) * title_line + pad
    cell_height = height + CAPTION_LINES * line + pad
    canvas = Image.new("RGB", (pad + columns * (width + pad), top + rows * cell_height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(title_lines):
        draw.text((pad, pad + i * title_line), text, fill=(0, 0, 0), font=heading)
    for k, (image, caption) in enumerate(zip(images, captions, strict=True)):
        x, y = pad + (k % columns) * (width + pad), top + (k // columns) * cell_height
        canvas.paste(image, (x, y))
        for j, text in enumerate(_wrap(caption, font, width, CAPTION_LINES)):
            draw.text((x, y + height + 2 + j * line), text, fill=(50, 50, 50), font=font)
    return canvas
