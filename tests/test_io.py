"""Atomic outputs: stale temporary folders of killed runs go, results are readable by the group."""

import os
import stat
import subprocess
import sys

from selfperceptual.io import HOST, atomic_dir, write_json


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


def test_outputs_follow_the_umask_so_a_group_can_read_them(tmp_path):
    previous = os.umask(0o002)
    try:
        with atomic_dir(tmp_path / "stage") as out:
            write_json(out / "metrics.json", {"fid": 1.0})
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "stage").stat().st_mode) == 0o775
    assert stat.S_IMODE((tmp_path / "stage" / "metrics.json").stat().st_mode) == 0o664


def test_a_checkpoint_cut_short_by_a_kill_is_removed_and_never_resumed(tmp_path):
    from selfperceptual.checkpoints import CheckpointStore

    store = CheckpointStore(tmp_path / "checkpoints", keep=2)
    (tmp_path / "checkpoints" / "step-00000010").mkdir(parents=True)
    cut_short = tmp_path / "checkpoints" / ".step-00000020.othernode.4242.xyz.partial"
    cut_short.mkdir()
    assert store.latest() == tmp_path / "checkpoints" / "step-00000010"
    assert not cut_short.exists()
