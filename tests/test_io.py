"""Atomic outputs: stale temporary folders of killed runs go, results are readable by the group."""

import os
import stat
import subprocess
import sys

import pytest

from selfperceptual.pipeline.io import HOST, atomic_dir, write_json


def test_stale_partials_of_killed_runs_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True).stdout.strip()
    stale = [tmp_path / f".train_mse.{HOST}.{dead}.abc.partial", tmp_path / ".train_mse.othernode.17.def.partial"]
    live = tmp_path / f".train_mse.{HOST}.{os.getppid()}.ghi.partial"  # a running process's
    other_stage = tmp_path / f".train_sp.{HOST}.{dead}.jkl.partial"
    for folder in (*stale, live, other_stage):
        folder.mkdir()
    with atomic_dir(tmp_path / "train_mse") as out:
        (out / "weights").write_text("done")
    assert not any(folder.exists() for folder in stale)
    assert live.exists() and other_stage.exists()
    assert (tmp_path / "train_mse" / "weights").read_text() == "done"


@pytest.mark.parametrize(("umask", "folder", "file"), [(0o002, 0o775, 0o664), (0o022, 0o755, 0o644)])
def test_outputs_follow_the_umask_so_a_group_can_read_them(tmp_path, umask, folder, file):
    """JSON and weights alike: safetensors writes its files 0600 whatever the umask."""
    import torch
    from safetensors.torch import save_file

    previous = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "stage") as out:
            write_json(out / "metrics.json", {"fid": 1.0})
            (out / "pipeline" / "unet").mkdir(parents=True)
            save_file({"weight": torch.zeros(2)}, out / "pipeline" / "unet" / "model.safetensors")
            assert stat.S_IMODE((out / "pipeline" / "unet" / "model.safetensors").stat().st_mode) == 0o600  # what it wrote
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "stage").stat().st_mode) == folder
    assert stat.S_IMODE((tmp_path / "stage" / "metrics.json").stat().st_mode) == file
    assert stat.S_IMODE((tmp_path / "stage" / "pipeline" / "unet").stat().st_mode) == folder
    assert stat.S_IMODE((tmp_path / "stage" / "pipeline" / "unet" / "model.safetensors").stat().st_mode) == file


def test_a_checkpoint_cut_short_by_a_kill_is_removed_and_never_resumed(tmp_path):
    from selfperceptual.pipeline.checkpoints import CheckpointStore

    store = CheckpointStore(tmp_path / "checkpoints", keep=2)
    (tmp_path / "checkpoints" / "step-00000010").mkdir(parents=True)
    cut_short = tmp_path / "checkpoints" / ".step-00000020.othernode.4242.xyz.partial"
    cut_short.mkdir()
    assert store.latest() == tmp_path / "checkpoints" / "step-00000010"
    assert not cut_short.exists()


def test_images_decoded_and_written_on_threads_are_the_ones_done_in_line(tmp_path):
    """evaluate's parallel decoding and sample's background PNG writes change nothing but speed."""
    import numpy as np
    import pytest
    from PIL import Image, ImageOps

    from selfperceptual.pipeline.io import background_writes, decode_images

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)) for i in range(9)]
    (tmp_path / "inline").mkdir()
    (tmp_path / "threads").mkdir()
    for i, image in enumerate(images):
        image.save(tmp_path / "inline" / f"{i:05d}.png")
    with background_writes() as write:
        for i, image in enumerate(images):
            write(image.save, tmp_path / "threads" / f"{i:05d}.png")
    for i in range(len(images)):
        assert (tmp_path / "inline" / f"{i:05d}.png").read_bytes() == (tmp_path / "threads" / f"{i:05d}.png").read_bytes()

    paths = sorted((tmp_path / "inline").glob("*.png"))
    fit = lambda image: ImageOps.fit(image, (16, 16), Image.BICUBIC)  # noqa: E731 - what the reference images go through
    decoded, inline = decode_images(paths, fit), [fit(Image.open(path).convert("RGB")) for path in paths]
    assert [np.asarray(image).tobytes() for image in decoded] == [np.asarray(image).tobytes() for image in inline]

    with pytest.raises(FileNotFoundError), background_writes() as write:
        write(images[0].save, tmp_path / "missing" / "00000.png")


def test_metric_series_become_one_table_with_the_loss_first(tmp_path):
    """A training's loss curves as DVC plots them: a step column, one column per series, a blank
    where a series has no point at a step (a timestep bucket with no sample in its window)."""
    from selfperceptual.pipeline.io import write_series_csv

    series = {"loss_t0000_0499": [(5, 0.25, 1), (10, 0.5, 2)], "loss": [(5, 1.5, 1), (10, 0.75, 2)], "loss_t0500_0999": [(10, 2.0, 2)]}
    write_series_csv(series, tmp_path / "loss.csv")
    assert (tmp_path / "loss.csv").read_text().splitlines() == [
        "step,loss,loss_t0000_0499,loss_t0500_0999", "5,1.5,0.25,", "10,0.75,0.5,2.0"]
