"""What a finished run of the whole DAG must hold, at whichever scale and whichever tool ran it."""

import json
import re

import mlflow

from selfperceptual.pipeline.claims import CLAIMS, CONTRADICTED, NOT_EVALUATED, SUPPORTED, UNRESOLVED
from selfperceptual.pipeline.config import load_params
from selfperceptual.pipeline.dag import build_stages
from selfperceptual.pipeline.experiments import PEERS, RELEASED_ROWS, SAMPLE_ROWS, TRAIN_RUNS
from selfperceptual.pipeline.stages.report import MARKS

VERDICTS = (SUPPORTED, CONTRADICTED, UNRESOLVED, NOT_EVALUATED)


def image_steps(client, run_id: str, key: str) -> list[int]:
    """The steps at which a run logged MLflow images of ``key`` (images/<key>+step+<step>+timestamp+....png)."""
    names = [artifact.path.removeprefix("images/") for artifact in client.list_artifacts(run_id, "images")]
    return sorted(int(name.split("+")[2]) for name in names if name.startswith(f"{key}+step+") and not name.endswith("+compressed.webp"))


def finished_runs(copy, scale):
    mlflow.set_tracking_uri(f"sqlite:///{copy / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=[f"self-perceptual-{scale}"])
    return runs[(runs["status"] == "FINISHED") & (runs["tags.kind"] != "execution")]


def execution_runs(copy, scale):
    """The parent runs, one per pipeline execution."""
    mlflow.set_tracking_uri(f"sqlite:///{copy / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=[f"self-perceptual-{scale}"])
    return runs[runs["tags.kind"] == "execution"]


def check_outputs_and_runs(copy, scale):
    """Every stage wrote its folder; the report and the MLflow runs are complete and tagged."""
    runs_dir = copy / "runs" / scale
    config = load_params(copy / "params.yaml", scale)[1]
    for stage in build_stages(config):
        folder = runs_dir / stage.name
        assert folder.is_dir(), f"{stage.name} wrote nothing"
        assert json.loads((folder / "params.json").read_text())["scale"] == scale, stage.name
    assert not list(runs_dir.glob(".*partial"))
    for run_name in TRAIN_RUNS:
        assert (runs_dir / run_name / "pipeline" / "model_index.json").is_file()
    assert len(list((runs_dir / "sample_mse_s25" / "images").glob("*.png"))) == config.sample.num_images
    rows = set(SAMPLE_ROWS) | (set(RELEASED_ROWS) if config.authors else set())

    report = (runs_dir / "report" / "report.md").read_text()
    assert all(f"Table {number}:" in report for number in range(1, 9))
    assert "32.68" in report and "25.89" in report and "11.18" in report and "42.42" in report  # the paper's numbers beside ours
    results = json.loads((runs_dir / "report" / "results.json").read_text())
    assert set(results["metrics"]) == rows
    assert all(m["fid"] > 0 and m["is"] >= 1 for m in results["metrics"].values())
    assert all(m["fid_low"] <= m["fid"] <= m["fid_high"] for m in results["metrics"].values())
    assert {row for row in SAMPLE_ROWS if "alignment" in results["metrics"][row]} == {r for r in SAMPLE_ROWS if SAMPLE_ROWS[r].conditioning == "text"}
    verdicts = {claim["claim"]: claim["verdict"] for claim in results["claims"]}
    assert verdicts.keys() == {claim.key for claim in CLAIMS} and set(verdicts.values()) <= set(VERDICTS)
    assert "## The paper's claims" in report and report.index("## The paper's claims") < report.index("## Table 1")
    assert (runs_dir / "report" / "report.html").is_file()
    for figure in ("fig3_4.png", "fig5_uncond.png", "fig6_x0.png", "loss_curves.png", "layout.png"):
        assert (runs_dir / "report" / figure).is_file() and f"]({figure})" in report
    figures = json.loads((runs_dir / "figures" / "figures.json").read_text())
    assert f"1. {figures['fig3_4_prompts'][0]};" in report  # the figure's legend names what each row was asked for
    assert figures["fig6_timesteps"] == [f"t={t}" for t in range(1000, 0, -100)] + ["final"]

    # The peers' table and the data section: Cas-DM's folder loads as a CasDMPipeline.
    assert "## Peers: SP beside LPL and Cas-DM" in report and "## Data: the aesthetic filter, measured again" in report
    assert [row[0] for row in results["peers"][1:]] == [peer.label for peer in PEERS]
    settings = {row[0]: row[results["peers"][0].index("Settings")] for row in results["peers"][1:]}
    lpl = config.train.objective("lpl")  # each peer's settings as its training stage recorded them
    assert f"t_threshold {lpl.t_threshold}, weight {lpl.weight:g}" in settings["LPL"] and "metric_weighting" in settings["Cas-DM"]
    assert settings["MSE, continued"].startswith(f"lr {config.train.objective('sp').learning_rate:g},")  # SP's rate, the control's point
    index = json.loads((runs_dir / "train_casdm" / "pipeline" / "model_index.json").read_text())
    assert index["_class_name"] == "CasDMPipeline" and (runs_dir / "train_casdm" / "pipeline" / "x0_unet").is_dir()
    data = json.loads((runs_dir / "aesthetic" / "stats.json").read_text())
    assert data["kept"] + data["removed"] == data["samples"] > 0

    runs = finished_runs(copy, scale)
    data_stages = {stage.name for stage in build_stages(config) if stage.command in ("clip", "clip_embed", "aesthetic_train", "aesthetic")}
    assert len(runs) == len(TRAIN_RUNS) + len(rows) + 1 + len(data_stages)  # and the figures
    assert (runs["tags.kind"] == "figures").sum() == 1
    assert set(runs["tags.stage"]) >= data_stages
    assert runs["tags.pipeline_execution"].nunique() == 1
    parents = execution_runs(copy, scale)  # Snakemake's onstart made it, its onsuccess ended it
    assert len(parents) == 1 and set(runs["tags.mlflow.parentRunId"]) == {parents.iloc[0]["run_id"]}
    assert parents.iloc[0]["status"] == "FINISHED" and parents.iloc[0]["tags.closed_by"] == "snakemake"
    evaluations = runs[runs["tags.kind"] == "evaluate"].set_index("tags.row")
    assert set(evaluations.index) == rows
    row = evaluations.loc["mse_cfg75_r07_s25"]
    (trained,) = runs[runs["tags.stage"] == "train_mse"]["run_id"]
    assert row["tags.model_run_id"] == trained  # an evaluation names the run that trained its model
    # MLflow's own lineage: the model train_mse made is that run's output, the evaluation's input, and holds its metrics.
    client = mlflow.MlflowClient(f"sqlite:///{copy / 'mlflow.db'}")
    (model,) = client.search_logged_models([row["experiment_id"]], filter_string="name = 'train_mse'")
    assert model.source_run_id == trained and [o.model_id for o in client.get_run(trained).outputs.model_outputs] == [model.model_id]
    assert model.model_id in [i.model_id for i in client.get_run(row["run_id"]).inputs.model_inputs]
    fids = {metric.run_id: metric.value for metric in model.metrics if metric.key == "fid"}
    assert fids[row["run_id"]] == row["metrics.fid"] and len(fids) == sum(evaluations["tags.model_run_id"] == trained)
    assert (row["tags.cfg"], row["tags.rescale"], row["tags.steps"], row["tags.objective"]) == ("7.5", "0.7", "25", "mse")
    assert evaluations.loc["uncond_sp_s25", "tags.conditioning"] == "uncond"
    assert evaluations.loc["sp_s25", "tags.tables"].split() == [f"table{n}" for n in range(1, 8)] + ["peers"]
    assert set(runs[runs["tags.comparison"] == "peers"]["tags.stage"]) == {s for p in PEERS for s in (p.training, f"evaluate_{p.row}")}
    assert (evaluations.loc["sp_layer_decoder_s25", "tags.tables"], evaluations.loc["sp_layer_decoder_s25", "tags.ablation"]) == ("table2", "sp.layer=decoder")
    assert evaluations["metrics.fid"].notna().all() and evaluations["metrics.is"].notna().all()
    # The report links each table row to its evaluation runs (the authors' checkpoints have columns, not rows).
    linked = set(re.findall(r"/runs/([0-9a-f]{32})\?workflowType=machine_learning", report))
    assert linked == set(evaluations[~evaluations.index.str.startswith("authors_")]["run_id"])
    for claim in results["claims"]:  # each verdict with its mark
        assert f"{MARKS[claim['verdict']][0]} {claim['verdict']}" in report, claim["claim"]
    trains = runs[runs["tags.kind"] == "train"]
    assert set(trains["tags.objective"]) == {"mse", "sp", "lpl", "casdm"}
    by_stage = trains.set_index("tags.stage")
    assert by_stage.loc["train_sp_layer_decoder", "tags.sp_layer"] == "decoder"
    assert by_stage.loc["train_sp_distance_mae", "tags.sp_distance"] == "mae"
    assert by_stage.loc["train_sp_round2", "tags.perceptual_network"] == "train_sp"
    assert by_stage.loc["train_sp", "tags.perceptual_network"] == "train_mse"
    assert json.loads((runs_dir / "train_sp_tprime_near40" / "params.json").read_text())["train"]["sp"]["t_prime"] == "near40"
    history = mlflow.MlflowClient().get_metric_history(trains.iloc[0]["run_id"], "loss")
    assert len(history) >= 2
    assert image_steps(mlflow.MlflowClient(), trains.iloc[0]["run_id"], "preview")  # the preview sheets, by step
