"""The report puts each of our rows beside the matching paper row; the tiny VAE learns and is scaled."""

import sys

import pytest
import torch
import yaml
from PIL import Image
from workspace import copy_repository, run

from selfperceptual.pipeline.experiments import SAMPLE_ROWS
from selfperceptual.method.sampling import grid
from selfperceptual.pipeline.document import markdown_table
from selfperceptual.pipeline.stages.report import build_tables, grid_legend


def test_each_row_sits_beside_the_matching_paper_number(repo):
    paper = yaml.safe_load((repo / "workflow/paper_results.yaml").read_text())
    ours = {name: {"fid": 100.0 + index, "is": 1.0 + index} for index, name in enumerate(SAMPLE_ROWS)}
    ours["sp_s25"] |= {"fid_low": 90.5, "fid_high": 111.25, "precision": 0.61, "recall": 0.4, "alignment": 0.875}
    tables = build_tables(ours, paper, real_is=7.0)
    header, *rows = tables["table1"]
    sp = dict(zip(header, next(row for row in rows if row[0] == "sp" and row[3] == "25"), strict=True))
    assert [sp[key] for key in ("FID 95%, images (ours)", "Precision (ours)", "Recall (ours)", "Alignment (ours)", "Training seeds")] == ["[90.50, 111.25]", "0.610", "0.400", "0.875", "—"]
    assert set(tables) == {f"table{n}" for n in range(1, 9)}
    by_setting = {tuple(r[:4]): r for r in tables["table1"][1:]}
    assert by_setting[("mse", "7.5", "0.7", "25")][5:9] == ["18.67", f"{ours['mse_cfg75_r07_s25']['fid']:.2f}", "34.17", f"{ours['mse_cfg75_r07_s25']['is']:.2f}"]
    assert by_setting[("mse", "7.5", "—", "25")][5] == "24.41"
    assert by_setting[("sp", "—", "—", "50")][5:7] == ["24.42", f"{ours['sp_s50']['fid']:.2f}"]
    assert by_setting[("ground_truth", "—", "—", "—")][7:9] == ["35.28", "7.00"]
    layers = {r[0]: r[1:] for r in tables["table2"][1:]}
    assert layers["decoder"][:4] == ["42.42", f"{ours['sp_layer_decoder_s25']['fid']:.2f}", "19.98", f"{ours['sp_layer_decoder_s25']['is']:.2f}"]
    assert layers["midblock"][1] == f"{ours['sp_s25']['fid']:.2f}"  # the main SP run is the baseline of every ablation
    assert {r[0]: r[2] for r in tables["table6"][1:]}["sp_model"] == f"{ours['sp_round2_s25']['fid']:.2f}"
    guided = {(r[0], r[1]): r[3:] for r in tables["table7"][1:]}
    assert guided[("sp", "3")][:4] == ["20.65", f"{ours['sp_cfg3_r07_s25']['fid']:.2f}", "33.49", f"{ours['sp_cfg3_r07_s25']['is']:.2f}"]
    assert [row[:4] for row in tables["table8"][1:]] == [["mse", "—", f"{ours['uncond_mse_s25']['fid']:.2f}", "11.18"], ["sp", "—", f"{ours['uncond_sp_s25']['fid']:.2f}", "12.04"]]
    assert markdown_table(tables["table8"]).count("\n") == len(tables["table8"])


def test_a_missing_evaluation_shows_as_a_dash(repo):
    paper = yaml.safe_load((repo / "workflow/paper_results.yaml").read_text())
    tables = build_tables({}, paper, real_is=7.0)
    ours = [(row[2], row[4]) for row in tables["table3"][1:]]
    assert ours == [("—", "—")] * 3
    assert [row[1] for row in tables["table3"][1:]] == ["27.24", "24.54", "25.89"]


def test_small_samples_are_enlarged_in_the_grid_pixel_for_pixel():
    colours = [(255, 0, 0), (0, 0, 255)]
    cells = [[Image.new("RGB", (32, 32), colour)] for colour in colours]
    cells[0][0].putpixel((0, 0), (0, 255, 0))
    canvas = grid(cells, pad=2, min_side=100)  # 100 px asks for 4x: 128 px cells
    assert canvas.size == (2 + 2 * (128 + 2), 2 + 128 + 2)
    assert canvas.getpixel((2 + 3, 2 + 3)) == (0, 255, 0) and canvas.getpixel((2 + 4, 2 + 4)) == (255, 0, 0)
    assert canvas.getpixel((2 + 130 + 127, 2 + 127)) == (0, 0, 255)
    assert grid(cells, pad=2, min_side=32).size == (2 + 2 * 34, 36)  # large enough already: unchanged


def test_grid_legend_names_each_row_prompt_and_the_empty_prompt():
    assert grid_legend(["a red circle", "a blue square"]) == "Rows, top to bottom: 1. a red circle; 2. a blue square."
    assert "empty prompt" in grid_legend(["", ""])


def test_tiny_vae_training_lowers_the_loss_and_sets_unit_variance_latents(smoke_config):
    from selfperceptual.method.models import build_vae
    from selfperceptual.pipeline.stages.base import latent_scaling_factor, train_vae

    generator = torch.Generator().manual_seed(0)
    images = (torch.rand(64, 3, 1, 1, generator=generator) * 2 - 1).expand(64, 3, 32, 32).contiguous()  # flat colours
    vae = build_vae(smoke_config.base.vae, 32, seed=0)
    curve = train_vae(vae, images, smoke_config.base.vae.model_copy(update={"train_steps": 40}), seed=0)
    assert curve[-1][1] < curve[0][1]
    factor = latent_scaling_factor(vae, images)
    with torch.no_grad():
        scaled = vae.encode(images).latent_dist.mean * factor
    assert abs(scaled.std().item() - 1.0) < 0.05


def test_a_bad_params_key_stops_dvc_repro_at_the_first_stage(tmp_path):
    copy = copy_repository(tmp_path, scale="smoke")
    params = (copy / "params.yaml").read_text().replace("global_batch: 16", "global_batch: sixteen", 1)
    (copy / "params.yaml").write_text(params)
    result = run([sys.executable, "-m", "dvc", "repro"], copy, check=False)
    assert result.returncode != 0
    assert "smoke.train.global_batch" in result.stdout + result.stderr
    assert not (copy / "runs" / "smoke" / "corpus").exists()


def test_a_row_trained_with_several_seeds_is_reported_as_mean_and_interval(repo, tmp_path):
    from safetensors.torch import save_file

    from selfperceptual.pipeline.io import write_json
    from selfperceptual.pipeline.stages.report import load_runs, over_training_seeds

    folders = []
    for name, fid in (("mse_s25_seed2", 14.0), ("mse_s25", 10.0), ("mse_s25_seed1", 12.0), ("sp_s25", 9.0)):
        folder = tmp_path / f"evaluate_{name}"
        folder.mkdir()
        write_json(folder / "metrics.json", {"row": name, "fid": fid, "fid_low": fid - 1, "fid_high": fid + 2, "is": 2.0, "recall": 0.5})
        save_file({"features": torch.full((4, 3), fid)}, folder / "features.safetensors")
        folders.append(folder)
    runs = load_runs(folders)
    assert [run.metrics["row"] for run in runs["mse_s25"]] == ["mse_s25", "mse_s25_seed1", "mse_s25_seed2"] and len(runs["sp_s25"]) == 1
    summary = over_training_seeds([run.metrics for run in runs["mse_s25"]])
    assert summary["fid"] == 12.0 and summary["fid_spread"] == pytest.approx(4.302653 * 2 / 3**0.5, rel=1e-5)
    assert summary["is_spread"] == 0.0 and (summary["fid_low"], summary["seeds"]) == (9.0, 3)  # the first seed's bootstrap
    paper = yaml.safe_load((repo / "workflow/paper_results.yaml").read_text())
    header, *rows = build_tables({"mse_s25": summary, "sp_s25": over_training_seeds([runs["sp_s25"][0].metrics])}, paper, real_is=7.0)["table1"]
    cells = {(row[0], row[3], row[1]): dict(zip(header, row, strict=True)) for row in rows}
    assert cells[("mse", "25", "—")]["FID (ours)"] == "12.00 ± 4.97" and cells[("mse", "25", "—")]["Training seeds"] == "3"
    assert cells[("sp", "25", "—")]["FID (ours)"] == "9.00" and cells[("sp", "25", "—")]["Training seeds"] == "1"


def test_layout_distances_put_sp_near_mse_cfg_further_and_unrelated_samples_furthest(tmp_path):
    """Made-up features: SP's samples are MSE's moved a little, CFG's moved more; the figure's
    numbers must rank them so, with intervals that hold their means, and need every row."""
    from selfperceptual.pipeline.claims import RowRun
    from selfperceptual.pipeline.stages.report import layout_distances, layout_figure

    generator = torch.Generator().manual_seed(0)
    mse = torch.randn(64, 16, generator=generator) * 3
    moved = {"mse_s25": mse, "sp_s25": mse + 0.2 * torch.randn(64, 16, generator=generator), "mse_cfg75_r07_s25": mse + torch.randn(64, 16, generator=generator)}
    runs = {row: [RowRun({}, {"features": features.numpy()})] for row, features in moved.items()}
    found = layout_distances(runs, resamples=100)
    sp, cfg, unrelated = (found[label] for label in ("MSE vs SP", "MSE vs MSE+CFG", "MSE vs MSE, other seed and caption"))
    assert sp["mean"] < cfg["mean"] < unrelated["mean"]
    assert all(f["low"] <= f["mean"] <= f["high"] and len(f["per_image"]) == 64 for f in found.values())
    assert sp["high"] < cfg["low"]
    name, title, legend = layout_figure(found, tmp_path / "layout.png")
    assert Image.open(tmp_path / name).size[0] > 400 and "Layout" in title and "same seed and caption" in legend
    assert layout_distances({row: runs[row] for row in ("mse_s25", "sp_s25")}, resamples=100) is None


def test_the_report_states_what_shrank_the_experiment(tmp_path):
    """Fewer COCO captions than asked, LAION rows without a score, and a download that lost over
    30% of its URLs (over its parts) are warnings at the top of the report; clean records give none."""
    import json

    from selfperceptual.pipeline.stages.report import data_warnings

    def folder(name, file, record):
        (tmp_path / name).mkdir()
        (tmp_path / name / file).write_text(json.dumps(record))
        return tmp_path / name

    corpus = folder("corpus", "summary.json", {"source": "external", "eval_rows": 40, "eval_captions_asked": 100})
    filtered = folder("filter", "stats.json", {"rows_in": 10, "rows_kept": 5, "removed_by": {"missing_url_or_text": 1, "missing_AESTHETIC_SCORE": 3, "aesthetic": 1}})
    parts = [folder(f"download_part{i}", "stats.json", {"count": 10, "failed_to_download": dead, "written": 10 - dead}) for i, dead in enumerate((2, 6))]
    said = data_warnings([corpus, filtered, *parts])
    assert said == ["The evaluation uses 40 COCO captions, fewer than the 100 asked (corpus.num_eval_captions).",
                    "3 of 10 LAION rows have no AESTHETIC_SCORE (NaN) and were removed.",
                    "40% of the URLs could not be fetched (8 of 20): the models train on 12 images."]  # fmt: skip
    assert data_warnings([parts[0]]) == [] and data_warnings([]) == []
