"""clip_embed: clip-retrieval's ``inference`` over the downloaded webdataset shards: the CLIP image
and text embedding of every training sample, with its metadata, in clip-retrieval's own layout
(``embeddings/img_emb/``, ``text_emb/``, ``metadata/``). clip-retrieval cannot share the pipeline's
environment (docs/clip-retrieval.md); it runs from its own, ``.venv-clip``, which this stage brings
up to date with ``make clip-env`` (made when missing, made again when its lock or .venv changed).
The CLIP is ``clip.model`` (a Hugging Face folder or cached hub id), or the clip stage's tiny one
(``--clip``), loaded as ``hf_clip:``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
from pathlib import Path

from .. import tracking
from ..data.embeddings import read_embeddings
from ..data.shards import count_samples
from ..io import write_json

log = logging.getLogger("clip_embed")
PARAMS = ("clip",)
REPO = Path(__file__).resolve().parents[4]
CLIP_ENV_VARIABLE = "SELFPERCEPTUAL_CLIP_ENV"  # another place for clip-retrieval's environment


def add_arguments(parser) -> None:
    parser.add_argument("--images", type=Path, action="append", required=True, help="a download stage's folder (repeat for each part)")
    parser.add_argument("--clip", type=Path, help="the clip stage's folder (the tiny CLIP; when clip.model is null)")


def clip_retrieval() -> Path:
    """clip-retrieval's command in its own environment, which ``make clip-env`` brings up to date
    first: it is made when missing, and made again when its lock or .venv changed (its torch is
    .venv's, linked in)."""
    if CLIP_ENV_VARIABLE in os.environ:
        env = Path(os.environ[CLIP_ENV_VARIABLE])
        if not (env / ".installed").is_file():
            raise SystemExit(f"clip_embed: {CLIP_ENV_VARIABLE}={env} has no finished environment (.installed); "
                             f"make it with `make clip-env CLIP_VENV={env}`")
        return env / "bin" / "clip-retrieval"
    env = REPO / ".venv-clip"
    with open(REPO / ".venv-clip.lock", "w") as lock:  # two jobs at once: one makes it, the other waits
        fcntl.flock(lock, fcntl.LOCK_EX)
        make = ["make", "--no-print-directory", "-C", str(REPO), "clip-env"]
        if subprocess.run([*make, "--question"], check=False, capture_output=True).returncode != 0:
            log.info("clip_embed: making clip-retrieval's environment %s (about a minute)", env)
            subprocess.run(make, check=True)
    return env / "bin" / "clip-retrieval"


def model_argument(config, clip_stage: Path | None) -> str:
    if config.clip.model is not None:
        return f"hf_clip:{config.clip.model}"
    if clip_stage is None or not (clip_stage / "model" / "config.json").is_file():
        raise SystemExit(f"--clip {clip_stage}: no model/config.json; clip.model is null, so the clip stage's tiny CLIP is needed")
    return f"hf_clip:{(clip_stage / 'model').resolve()}"


def run(args, config, scale, out):
    shards = [str(path.resolve()) for folder in args.images for path in sorted((folder / "shards").glob("*.tar"))]
    if not shards:
        raise SystemExit(f"clip_embed: no shards in {', '.join(map(str, args.images))}; run the download stage")
    model = model_argument(config, args.clip)
    cpus = config.resources.of("clip_embed").cpus
    workers = 0 if cpus == 1 else cpus  # image decoding in worker processes where the job has the CPUs
    command = [
        str(clip_retrieval()), "inference", "--input_format", "webdataset",
        "--input_dataset", shards[0] if len(shards) == 1 else "{" + ",".join(shards) + "}",
        "--output_folder", str(out / "embeddings"), "--clip_model", model, "--batch_size", str(config.clip.batch),
        "--num_prepro_workers", str(workers), "--enable_text", "True", "--enable_image", "True", "--enable_metadata", "True", "--use_jit", "False",
    ]  # fmt: skip
    log.info("clip_embed: %s", " ".join(command))
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"clip_embed: clip-retrieval inference failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    images, texts, metadata = read_embeddings(out)
    expected = count_samples(args.images)
    if not len(images) == len(texts) == len(metadata) == expected:
        raise SystemExit(f"clip_embed: clip-retrieval embedded {len(images)} images, {len(texts)} captions and {len(metadata)} metadata rows "
                         f"of {expected} downloaded samples")  # fmt: skip
    summary = {"samples": expected, "dimension": int(images.shape[1]), "model": model, "shards": len(shards)}
    write_json(out / "summary.json", summary)
    log.info("clip_embed: %s", summary)
    return lambda: tracking.log_run(scale, stage=args.out.name, params={"clip": config.clip.model_dump(), "model": model}, tags={"kind": "clip_embed"},
                                    metrics={"samples": expected, "dimension": images.shape[1]})  # fmt: skip
