"""clip-retrieval's embedding folders (``embeddings/img_emb/``, ``text_emb/``, ``metadata/``), as the
clip_embed stage writes them and the aesthetic stage reads them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ...method.errors import InputError


def read_embeddings(folder: Path) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """(image embeddings, text embeddings, metadata) of a clip_embed folder, in clip-retrieval's order."""
    root = folder / "embeddings"
    parts = sorted((root / "img_emb").glob("img_emb_*.npy"), key=lambda path: int(path.stem.rsplit("_", 1)[1]))
    if not parts:
        raise InputError("embeddings", "no embeddings/img_emb/*.npy; run its clip_embed stage", folder)
    numbers = [path.stem.rsplit("_", 1)[1] for path in parts]
    images = np.concatenate([np.load(root / "img_emb" / f"img_emb_{n}.npy") for n in numbers])
    texts = np.concatenate([np.load(root / "text_emb" / f"text_emb_{n}.npy") for n in numbers])
    metadata = pd.concat([pd.read_parquet(root / "metadata" / f"metadata_{n}.parquet") for n in numbers], ignore_index=True)
    return images, texts, metadata
