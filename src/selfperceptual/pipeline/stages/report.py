"""report: the paper's claims with computed verdicts, Tables 1-8 with our numbers beside the paper's, Figures 3-6, the
layout-preservation figure and the loss curves."""

from __future__ import annotations

import csv
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import yaml

from .. import tracking
from ...method import objectives
from ..claims import CONTRADICTED, NOT_EVALUATED, SUPPORTED, UNRESOLVED, Evidence, Finding, RowRun, judge, twin_distances
from ..document import Document, Links, Marked, Section, to_html, to_markdown, write_tables
from ..experiments import PEERS, TABLES, TRAIN_RUNS, row_label, unseeded
from ..intervals import over_seeds, resample_mean
from ..data import DEAD_URL_WARNING
from ..io import SavedArrays, read_json, write_json

log = logging.getLogger("report")
PARAMS = ("report", "evaluate", "clip.model", "featnet.kind", "sample.num_images", "train.seeds")


def add_arguments(parser) -> None:
    parser.add_argument("--evaluation", type=Path, action="append", required=True, help="an evaluate stage's folder (repeat)")
    parser.add_argument("--figures", type=Path, required=True, help="the figures stage's folder")
    parser.add_argument("--featnet", type=Path, required=True, help="the featnet stage's folder")
    parser.add_argument("--paper-results", type=Path, required=True, help="the paper's numbers (YAML)")
    parser.add_argument("--training", type=Path, action="append", default=[], help="a peer's training stage folder (repeat): its cost")
    parser.add_argument("--aesthetic", type=Path, help="the aesthetic stage's folder: the filter measured again")
    parser.add_argument("--data", type=Path, action="append", default=[],
                        help="a data stage's folder, corpus, filter or download (repeat): what shrank the experiment")


def _fmt(value, digits=2, spread=None) -> str:
    """``value``, with `` ± spread`` (the half-width of its 95% interval over training seeds) when it has one."""
    if value is None:
        return "—"
    return f"{value:.{digits}f}" + ("" if spread is None else f" ± {spread:.{digits}f}")


def _fid_interval(ours: dict) -> str:
    """A row's 95% bootstrap interval of FID over its images (the first training seed's)."""
    low, high = ours.get("fid_low"), ours.get("fid_high")
    return "—" if low is None else f"[{low:.2f}, {high:.2f}]"


SEED_METRICS = ("fid", "is", "precision", "recall", "alignment", "clip_score")


def over_training_seeds(runs: list[dict]) -> dict:
    """One row's metrics over its training seeds: the mean of each, with ``<key>_spread``, the
    half-width of its 95% t interval, where there are two seeds or more; the first seed's
    bootstrap interval of FID (``fid_low``, ``fid_high``) stays."""
    summary = {**runs[0], "seeds": len(runs)}
    if len(runs) > 1:
        for key in SEED_METRICS:
            if all(key in run for run in runs):
                summary[key], low, high = over_seeds([run[key] for run in runs])
                summary[f"{key}_spread"] = (high - low) / 2
    return summary


def _cell(value) -> str:
    if value is None:
        return "—"
    return f"{value:g}" if isinstance(value, float) else str(value)


def paper_entry(paper_rows: list[dict], key: dict) -> dict:
    """The entry of a paper table whose fields equal ``key`` (fields it lacks count as null)."""
    matches = [entry for entry in paper_rows if all(entry.get(field) == value for field, value in key.items())]
    if len(matches) != 1:
        raise ValueError(f"{len(matches)} paper rows match {key}; expected exactly one")
    return matches[0]


def build_tables(metrics: dict[str, dict], paper: dict, real_is: float, links: dict[str, Links] | None = None) -> dict[str, list[list[str]]]:
    """Every table of TABLES, each of our rows beside the paper's; a missing metric shows as —.
    Where the authors' checkpoints were evaluated (rows ``authors_<row>``), Table 1 shows them too.
    With ``links`` (row -> its evaluation runs in MLflow), a last column links each row to them."""
    tables = {}
    clip_header = ["CLIP score (ours)"] if any("clip_score" in row for row in metrics.values()) else []
    for name, table in TABLES.items():
        released = name == "table1" and any(f"authors_{entry.row}" in metrics for entry in table.rows)
        header = ["FID (paper)", "FID (ours)", "IS (paper)", "IS (ours)"]
        header += ["FID (authors' checkpoint)", "IS (authors' checkpoint)"] if released else []
        header += ["FID 95%, images (ours)", "Precision (ours)", "Recall (ours)", "Alignment (ours)", *clip_header, "Training seeds"]
        header += ["MLflow"] if links else []
        rows = [[column.replace("_", " ").capitalize() for column in table.columns] + header]
        for entry in table.rows:
            theirs = paper_entry(paper[name], entry.paper)
            ours = {"fid": 0.0, "is": real_is} if entry.row is None else metrics.get(entry.row, {})
            settings = [_cell(theirs.get(column, entry.paper.get(column))) for column in table.columns]
            cells = [_fmt(theirs.get("fid")), _fmt(ours.get("fid"), 2, ours.get("fid_spread")), _fmt(theirs.get("is")),
                     _fmt(ours.get("is"), 2, ours.get("is_spread"))]
            if released:
                checkpoint = metrics.get(f"authors_{entry.row}", {}) if entry.row else {}
                cells += [_fmt(checkpoint.get("fid")), _fmt(checkpoint.get("is"))]
            cells += [_fid_interval(ours)]
            cells += [_fmt(ours.get(key), 3, ours.get(f"{key}_spread")) for key in ("precision", "recall", "alignment")]
            cells += [_fmt(ours.get("clip_score"), 2, ours.get("clip_score_spread"))] if clip_header else []
            cells += [str(ours.get("seeds", "—")) if entry.row else "—"]
            cells += [links.get(entry.row, "—") if entry.row else "—"] if links else []
            rows.append(settings + cells)
        tables[name] = rows
    return tables


def peers_table(metrics: dict[str, dict], training: dict[str, dict], clip_is_alignment: bool = False, links: dict[str, Links] | None = None) -> list[list[str]]:
    """SP beside the other perceptual objectives, one row per peer (experiments.PEERS): the same
    sampling row settings, the evaluation of Table 1, and the cost its training stage measured."""
    rows = [["Objective", "Fine-tuned from", "Steps", "Settings", "FID", "FID 95%, images", "IS", "Precision", "Recall", "Alignment", "CLIP score",
             "s/step (this run)", "Peak memory MiB (this run)", *(["MLflow"] if links else [])]]  # fmt: skip
    for peer in PEERS:
        ours, cost = metrics.get(peer.row, {}), training.get(peer.training, {})
        rows.append([
            peer.label, TRAIN_RUNS[peer.training].init, _cell(cost.get("num_steps")), settings_cell(cost.get("settings")),
            _fmt(ours.get("fid"), 2, ours.get("fid_spread")),
            _fid_interval(ours), _fmt(ours.get("is"), 2, ours.get("is_spread")),
            *(_fmt(ours.get(key), 3, ours.get(f"{key}_spread")) for key in ("precision", "recall", "alignment")),
            _fmt(ours.get("clip_score", ours.get("alignment") if clip_is_alignment else None), 2),
            _fmt(cost.get("seconds_per_step"), 3), _fmt(cost.get("peak_memory_mib"), 0),
            *([links.get(peer.row, "—")] if links else []),
        ])  # fmt: skip
    return rows


def training_record(folder: Path) -> dict:
    """What a training stage measured (metrics.json) and the settings it trained with (settings.json;
    a folder made before it was written has none)."""
    settings = folder / "settings.json"
    return {**read_json(folder / "metrics.json"), "settings": read_json(settings) if settings.is_file() else None}


def settings_cell(settings: dict | None) -> str:
    """A training stage's objective settings as it recorded them (its settings.json): the
    learning rate and condition dropout, then the objective's own, each as ``name value``."""
    if not settings:
        return "—"
    common = set(objectives.ObjectiveSettings.model_fields)
    words = [f"lr {settings['learning_rate']:g}", f"dropout {settings['condition_dropout']:g}"]
    for key, value in settings.items():
        if key not in common and value is not None:  # null: the setting's default behaviour (params.yaml says which)
            shown = "on" if value is True else "off" if value is False else f"{value:g}" if isinstance(value, float) else value
            words.append(f"{key} {shown}")
    return ", ".join(words)


def peers_note() -> str:
    """How the peers were trained, each peer objective as its plug-in describes itself."""
    peer_objectives = dict.fromkeys(TRAIN_RUNS[peer.training].objective for peer in PEERS)
    described = " ".join(f"{objective.label}: {objective.summary}" for objective in map(objectives.get, peer_objectives))
    return (
        "Every peer is trained on the same data with the same batch, and sampled like Table 1's rows (DDIM, 25 steps, no "
        "guidance, the same seeds and captions). MSE (the starting model) is Table 1's MSE model; the others are fine-tuned "
        "from it for as many steps at the same learning rate as SP, MSE continued with the MSE loss alone, the control for the "
        f"extra steps. {described} Settings: what each training stage recorded (its settings.json; a null setting, which "
        "keeps its default behaviour, is left out). s/step and peak memory are what each training job measured here (jobs ran side by side; "
        "CPU: the process's peak RSS); benchmarks/sp_step.py compares them in one controlled run."
    )


def data_warnings(folders: list[Path]) -> list[str]:
    """What shrank the experiment without stopping it, in words, from the records of the data
    stages: fewer COCO captions than asked, LAION rows without a score, URLs that could not be fetched."""
    warnings, downloads = [], []
    for folder in folders:
        summary, stats = folder / "summary.json", folder / "stats.json"
        if summary.is_file():
            corpus = read_json(summary)
            asked = corpus.get("eval_captions_asked")
            if asked and corpus["eval_rows"] < asked:
                warnings.append(f"The evaluation uses {corpus['eval_rows']} COCO captions, fewer than the {asked} asked (corpus.num_eval_captions).")
        if stats.is_file():
            record = read_json(stats)
            if "removed_by" in record:
                for name, count in record["removed_by"].items():
                    if name.startswith("missing_") and name != "missing_url_or_text" and count:
                        warnings.append(f"{count} of {record['rows_in']} LAION rows have no {name.removeprefix('missing_')} (NaN) and were removed.")
            if "failed_to_download" in record:
                downloads.append(record)
    count, dead, written = (sum(record[key] for record in downloads) for key in ("count", "failed_to_download", "written"))
    if count and dead / count > DEAD_URL_WARNING:
        warnings.append(f"{100 * dead / count:.0f}% of the URLs could not be fetched ({dead} of {count}): the models train on {written} images.")
    return warnings


def aesthetic_section(stats: dict) -> tuple[list[list[str]], str]:
    """The aesthetic threshold re-applied to the measured scores of the downloaded images."""
    rows = [["Downloaded samples", "Threshold", "Removed by the measured score", "Corpus score, mean", "Measured score, mean",
             "Correlation of the two"]]  # fmt: skip
    rows.append([str(stats["samples"]), f"{stats['threshold']:g}", f"{stats['removed']} ({stats['removed'] / max(stats['samples'], 1):.1%})",
                 _fmt(stats.get("corpus_mean")), _fmt(stats.get("measured_mean")), _fmt(stats.get("correlation"), 3)])  # fmt: skip
    note = ("Every downloaded image passed the filter on the score in the corpus metadata. clip-retrieval embedded each one "
            "(stage clip_embed), the LAION aesthetic predictor scored the embedding anew (stage aesthetic), and the filter's "
            "threshold was applied to that score: the images it would remove, and how far the two scores agree. At the small "
            "scales CLIP and predictor are tiny ones trained on the corpus (stages clip and aesthetic_train).")
    return rows, note


ALIGNMENT = {  # what the Alignment column measures, with and without evaluate.clip
    False: "Alignment: the fraction of samples whose caption's shape and colour the evaluation classifier recognises (0-1); "
    "CLIP score: 100 times the cosine of the image's and the caption's embeddings by the data stages' CLIP (the tiny one "
    "trained on the corpus here), the CLIP clip-retrieval embedded the training set with.",
    True: "Alignment: CLIP score, 100 times the cosine of the image's and the caption's CLIP embeddings (0-100).",
}


def load_runs(evaluations: list[Path]) -> dict[str, list[RowRun]]:
    """Each sampling row's evaluations (metrics.json, features.safetensors), one per training seed, in seed order."""
    found: dict[str, list[tuple[int, RowRun]]] = {}
    for folder in evaluations:
        metrics = read_json(folder / "metrics.json")
        row, seed = unseeded(metrics["row"])
        found.setdefault(row, []).append((seed, RowRun(metrics, SavedArrays(folder / "features.safetensors"))))
    return {row: [run for _, run in sorted(runs, key=lambda pair: pair[0])] for row, runs in found.items()}


def fid_by_row(metrics: dict[str, dict], path: Path) -> None:
    """Each sampling row's FID (the mean over training seeds) and its first seed's bootstrap
    interval, in row order: DVC's per-row FID plot."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "fid", "fid_low", "fid_high"])
        for row, found in metrics.items():
            writer.writerow([row, found.get("fid", ""), found.get("fid_low", ""), found.get("fid_high", "")])


def run_links(evaluations: list[Path]) -> dict[str, Links]:
    """Each sampling row's evaluation runs in MLflow (from each evaluation's tracking.json), one
    link per training seed."""
    found: dict[str, list[tuple[int, dict]]] = {}
    for folder in evaluations:
        if (folder / "tracking.json").is_file():
            row, seed = unseeded(read_json(folder / "metrics.json")["row"])
            found.setdefault(row, []).append((seed, read_json(folder / "tracking.json")))
    return {
        row: Links([("run" if len(runs) == 1 else f"seed {seed}", tracking.run_link(run["run_id"], run["experiment_id"], run["tracking_uri"]))
                    for seed, run in sorted(runs, key=lambda pair: pair[0])])
        for row, runs in found.items()
    }  # fmt: skip


def _signed(value) -> str:
    if value is None:
        return "—"
    return f"{0.0 if abs(value) < 1e-6 else value:+.3g}"  # float noise of equal numbers shows as +0


STATISTIC = {"fid": "FID", "precision": "precision", "recall": "recall", "alignment": "alignment", "layout": "layout distance"}
CLAIMED = {"<": "lower", ">": "higher", "=": "the same", ">=": "not lower"}
MARKS = {SUPPORTED: ("✔", "supported"), CONTRADICTED: ("✘", "contradicted"), UNRESOLVED: ("?", "unresolved"), NOT_EVALUATED: ("–", "not-evaluated")}


def describe_finding(finding: Finding) -> str:
    """One difference in words, with its direction, e.g. "SP: FID 12.2 higher than MSE [+7.5,
    +17.8] (paired bootstrap over images); the paper: lower → contradicted"."""
    difference = finding.difference
    statistic = STATISTIC[difference.statistic]
    first, second = (" vs ".join(map(row_label, rows)) for rows in (difference.a, difference.b))
    if finding.estimate is None:
        return f"{first} against {second}: no {statistic} ({finding.source})"
    size = abs(finding.estimate)
    relation = "the same as" if size < 1e-6 else f"{size:.3g} {'higher' if finding.estimate > 0 else 'lower'} than"
    interval = "" if finding.low is None else f" [{_signed(finding.low)}, {_signed(finding.high)}]"
    source = finding.source.replace("images (bootstrap)", "paired bootstrap over images")
    source = re.sub(r"^seeds \((\d+)\)$", r"over \1 training seeds", source)
    return f"{first}: {statistic} {relation} {second}{interval} ({source}); the paper: {CLAIMED[difference.claimed]} → {finding.verdict}"


def claims_table(judged) -> list[list[str]]:
    rows = [["Claim (paper)", "Verdict", "What we measured (95% interval, over what); the paper's direction; the verdict of each difference"]]
    for claim, verdict, findings in judged:
        mark, kind = MARKS[verdict]
        rows.append([claim.text, Marked(f"{mark} {verdict}", kind), "\n".join(map(describe_finding, findings)) or "its rows were not run"])
    return rows


def grid_legend(prompts: list[str]) -> str:
    """What each grid row was asked for, top to bottom."""
    if not any(prompts):
        return "Every row: the empty prompt, each row with its own seed."
    return "Rows, top to bottom: " + "; ".join(f"{i}. {prompt or '(empty prompt)'}" for i, prompt in enumerate(prompts, 1)) + "."


def figures(folder: Path) -> list[tuple[str, str, str]]:
    """(file name, title, legend) of each figure of the figures stage, in the paper's order."""
    made = read_json(folder / "figures.json")
    guidance = made["guidance"]
    cfg = f"CFG {guidance['cfg']:g}, rescale {guidance['rescale']:g}, {guidance['steps']} steps"
    return [
        ("fig3_4.png", f"Figures 3 and 4: MSE | SP | MSE+CFG, 50 NFEs ({cfg}), same seed per row", grid_legend(made["fig3_4_prompts"])),
        ("fig5_uncond.png", f"Figure 5: unconditional MSE | SP, DDIM {made['fig5_steps']} steps, same seeds", grid_legend([""])),
        ("fig6_x0.png", "Figure 6: the x0 prediction at each step of a 10-step DDIM, then the final image; MSE, MSE+CFG and SP, same seed",
         "Blocks of three rows (MSE, MSE+CFG, SP), top to bottom: " + "; ".join(f"{i}. {p}" for i, p in enumerate(made["fig6_prompts"], 1)) + "."),
        ("loss_curves.png", "Training loss of the four main runs", ""),
    ]


LAYOUT_PAIRS = {  # label -> the two rows whose samples of the same seed and caption are compared
    "MSE vs SP": ("mse_s25", "sp_s25"),
    "MSE vs MSE+CFG": ("mse_s25", "mse_cfg75_r07_s25"),
    "MSE vs MSE, other seed and caption": ("mse_s25", "mse_s25"),  # the distance of samples that share nothing
}


def layout_distances(runs: dict[str, list[RowRun]], resamples: int) -> dict[str, dict] | None:
    """Section 4.1's "SP keeps layout, CFG changes it" in numbers: per pair of rows, the feature
    distance of each sample to its twin (same seed and caption; training seed 0), their mean and its
    95% bootstrap interval, beside that of samples that share nothing (each MSE sample against the
    next one). None when a row is missing (a partial DAG)."""
    if not all(row in runs for pair in LAYOUT_PAIRS.values() for row in pair):
        return None
    found = {}
    for label, (first, second) in LAYOUT_PAIRS.items():
        a, b = runs[first][0].features, runs[second][0].features
        b = np.roll(b, 1, axis=0) if first == second else b  # one row against itself: another sample
        values = twin_distances(a, b)
        low, high = resample_mean(values, resamples or 200).interval()
        found[label] = {"mean": float(values.mean()), "low": low, "high": high, "per_image": values.tolist()}
    return found


def layout_figure(distances: dict[str, dict], path: Path) -> tuple[str, str, str]:
    """The layout distances as a figure: a dot per sample, the mean with its interval per pair."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(8, 3.2))
    for y, found in enumerate(distances.values()):
        axes.scatter(found["per_image"], [y] * len(found["per_image"]), s=8, alpha=0.35, color="grey")
        axes.errorbar([found["mean"]], [y], xerr=[[found["mean"] - found["low"]], [found["high"] - found["mean"]]], fmt="o", color="black", capsize=4)
    axes.set_yticks(range(len(distances)), list(distances))
    axes.invert_yaxis()
    axes.set_xlabel("feature distance of the two samples (evaluation network)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
    legend = ("Each grey dot is one sample's distance to its twin in the other row (same seed and caption, training seed 0); "
              "black: the mean and its 95% bootstrap interval. SP keeps MSE's layout where its distance lies well below the "
              "last line, which pairs samples that share neither seed nor caption; CFG changes it where its distance is larger.")  # fmt: skip
    return path.name, "Layout: how far SP and CFG move MSE's samples (Sec. 4.1)", legend


def run(args, config, scale, out) -> None:
    paper = yaml.safe_load(args.paper_results.read_text())
    runs = load_runs(args.evaluation)
    metrics = {row: over_training_seeds([run.metrics for run in row_runs]) for row, row_runs in runs.items()}
    real_is = read_json(args.featnet / "summary.json")["real_is"]
    links = run_links(args.evaluation)
    tables = build_tables(metrics, paper, real_is, links)
    peers = peers_table(metrics, {folder.name: training_record(folder) for folder in args.training},
                        clip_is_alignment=bool(config.evaluate.clip) and config.evaluate.clip == config.clip.model, links=links)
    margins = config.report.equivalence_margins
    evidence = Evidence(runs, config.evaluate.bootstrap, margins.model_dump())
    judged = judge(evidence)
    claims = claims_table(judged)
    shown = figures(args.figures)
    for file_name, _, _ in shown:
        shutil.copy2(args.figures / file_name, out / file_name)
    layout = layout_distances(runs, config.evaluate.bootstrap)
    shown += [layout_figure(layout, out / "layout.png")] if layout else []
    caveat = {
        "paper": "",
        "rehearsal": " The rehearsal's models and Inception weights are random stand-ins: its numbers test the code paths, not the method.",
    }.get(scale, " Small-scale numbers are not on the paper's absolute scale; compare the directions (SP vs MSE, CFG vs none) and the gaps.")
    seeds = (
        f" The Table 1 and 8 runs are trained with {config.train.seeds} seeds (mean ± half its 95% interval over them); the ablations once."
        if config.train.seeds > 1 else " Every run is trained once (one training seed)."
    )  # fmt: skip
    shrunk = data_warnings(args.data)
    intro = (
        f"Scale `{scale}`: {config.sample.num_images} samples per row, FID and IS from the "
        f"`{config.featnet.kind}` feature network.{seeds}{caveat}"
        + (f" Data warnings: {' '.join(shrunk)}" if shrunk else "")
    )
    verdicts_note = (
        "Each verdict is computed: a difference is supported when its 95% interval lies wholly on the claimed side, contradicted "
        "when wholly on the other, and not resolved otherwise; intervals are over training seeds where there are several, else a "
        "paired bootstrap over the images of one run (same seeds and captions), which leaves out how much training runs differ. "
        "There is no correction for the number of differences: at 95%, about one in twenty resolves by chance. FID: lower is "
        "better; layout: the mean feature distance between samples of the same seed and caption; '≈' and '≳' allow "
        f"{margins.recall:g} of recall and {margins.alignment:g} of alignment. {ALIGNMENT[bool(config.evaluate.clip)]}"
    )
    sections = [Section("The paper's claims", claims, note=verdicts_note)]
    sections += [Section(TABLES[name].title, rows, note=TABLES[name].note) for name, rows in tables.items()]
    if args.aesthetic:
        data_rows, data_note = aesthetic_section(read_json(args.aesthetic / "stats.json"))
        sections.append(Section("Data: the aesthetic filter, measured again", data_rows, note=data_note))
    sections.append(Section("Peers: SP beside LPL and Cas-DM", peers, note=peers_note()))
    sections += [Section(title, image=file_name, note=legend) for file_name, title, legend in shown]
    document = Document("Diffusion Model with Perceptual Loss: reproduction report", intro, sections)
    (out / "report.md").write_text(to_markdown(document))
    (out / "report.html").write_text(to_html(document, f"Report ({scale})"))
    write_tables(document, out / "tables")
    fid_by_row(metrics, out / "fid_by_row.csv")
    verdicts = [
        {"claim": claim.key, "text": claim.text, "verdict": verdict, "findings": [
            {"difference": f.difference.describe(), "estimate": f.estimate, "low": f.low, "high": f.high, "source": f.source, "verdict": f.verdict}
            for f in findings
        ]}
        for claim, verdict, findings in judged
    ]  # fmt: skip
    layout = {label: {key: value for key, value in found.items() if key != "per_image"} for label, found in (layout or {}).items()}
    write_json(out / "results.json", {"metrics": metrics, "real_is": real_is, "tables": tables, "peers": peers, "claims": verdicts, "layout": layout})
    log.info("report: %s", out / "report.md")
