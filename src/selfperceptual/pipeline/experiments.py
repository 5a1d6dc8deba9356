"""The paper's experiments as data: which models are trained, which sampling rows are evaluated,
and which row of which paper table each one stands beside.

Variants are entries of these registries, never copies of code: a training run is one objective
and one conditioning of the one training stage, an ablation is a setting of SP's changed from the
scale block's (as data: the dotted params key and its value, written as params.yaml writes it); a
sampling row is one sampler setting of the one sampling stage. The DAG (``dag.py``) makes each
stage from one of these specs, and the cost model, the report and the trackers' tags read the
spec, never the command made from it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..method import objectives
from ..method.objectives.sp import SelfPerceptualSettings
from .config import TrainConfig, settings_affecting


def seeded(name: str, seed: int) -> str:
    return name if seed == 0 else f"{name}_seed{seed}"


def unseeded(name: str) -> tuple[str, int]:
    """``"sp_s25_seed2"`` -> ``("sp_s25", 2)``; a name without the suffix is seed 0."""
    head, sep, tail = name.rpartition("_seed")
    return (head, int(tail)) if sep and tail.isdigit() and int(tail) > 0 else (name, 0)


@dataclass(frozen=True)
class TrainRun:
    name: str  # the stage name and output folder
    objective: str  # mse | sp | lpl | casdm
    conditioning: str  # text | uncond
    init: str  # stage whose pipeline is the starting point
    inputs: tuple[tuple[str, str], ...] = ()  # (input, stage): what the objective reads besides data and init (SP's f*: a freeze stage)
    settings: tuple[tuple[str, object], ...] = ()  # (dotted params key, value) set on the scale block: the ablations
    steps_of: str | None = None  # train for this objective's num_steps at its learning rate (the peers' MSE control)
    seed: int = 0  # added to train.seed: the training seeds of the Table 1 and 8 runs (train.seeds)

    def params(self) -> tuple[str, ...]:
        """The params.yaml keys its stage depends on: the training settings that change what it
        trains or records (config.AFFECTS), its objective's section, what it borrows, the schedule."""
        common = (f"train.{key}" for key in settings_affecting(TrainConfig, "weights", "record"))
        borrowed = (f"train.{self.steps_of}.num_steps", f"train.{self.steps_of}.learning_rate") if self.steps_of else ()
        return (*common, "schedule", f"train.{self.objective}", *borrowed)

    def overrides(self, config) -> dict[str, object]:
        """What this run sets on the scale block ``config``: its settings, and its training seed."""
        return {**dict(self.settings), **({"train.seed": config.train.seed + self.seed} if self.seed else {})}

    @property
    def ablation(self) -> str:
        """Its settings as the trackers tag them (``sp.layer=encoder``), or ``none``."""
        return " ".join(f"{key.removeprefix('train.')}={value}" for key, value in self.settings) or "none"


@dataclass(frozen=True)
class SampleRow:
    name: str
    model: str  # training stage whose pipeline samples
    steps: int
    cfg: float | None = None  # None: guidance off
    rescale: float | None = None

    @property
    def conditioning(self) -> str:
        return MODELS[unseeded(self.model)[0]].conditioning

    @property
    def objective(self) -> str:
        return MODELS[unseeded(self.model)[0]].objective

    @property
    def nfe(self) -> int:
        return self.steps * (2 if self.cfg is not None and self.cfg > 1 else 1)

    @property
    def tables(self) -> list[str]:
        name = unseeded(self.name)[0]
        found = [table_name for table_name, table in TABLES.items() if any(entry.row == name for entry in table.rows)]
        return found + (["peers"] if any(peer.row == name for peer in PEERS) else [])


def _frozen(stage: str) -> tuple[tuple[str, str], ...]:
    """SP's input: f*, the freeze stage ``stage``'s frozen copy of the model training starts from."""
    return (("perceptual", stage),)


def _sp_ablation(name: str, init: str = "train_mse", perceptual: str = "freeze", **sp_settings) -> TrainRun:
    """An SP run that differs from train_sp in ``sp_settings`` (keys of ``train.sp``)."""
    settings = tuple((f"train.sp.{key}", value) for key, value in sp_settings.items())
    return TrainRun(name, "sp", "text", init=init, inputs=_frozen(perceptual), settings=settings)


MAIN_RUNS = (
    TrainRun("train_mse", "mse", "text", init="base"),
    TrainRun("train_sp", "sp", "text", init="train_mse", inputs=_frozen("freeze")),
    TrainRun("train_mse_uncond", "mse", "uncond", init="base"),
    TrainRun("train_sp_uncond", "sp", "uncond", init="train_mse_uncond", inputs=_frozen("freeze_uncond")),
)

# Tables 2-6: SP runs that differ from train_sp in one setting each.
ABLATION_RUNS = (
    # Table 2: which layer's features (losses summed over the layers).
    _sp_ablation("train_sp_layer_encoder", layer="encoder"),
    _sp_ablation("train_sp_layer_decoder", layer="decoder"),
    _sp_ablation("train_sp_layer_encoder_midblock", layer="encoder_midblock"),
    # Table 3: how t' is drawn (the rules are documented in losses.T_PRIME_SAMPLERS).
    _sp_ablation("train_sp_tprime_near40", t_prime="near40"),
    _sp_ablation("train_sp_tprime_normal100", t_prime="normal100"),
    # Table 4: distance on the features.
    _sp_ablation("train_sp_distance_mae", distance="mae"),
    # Table 5: the sp2 formulation (Eq. 13-16).
    _sp_ablation("train_sp_formulation_sp2", formulation="sp2"),
    # Table 6: a second SP round whose perceptual network is the frozen SP model. "Repeat the
    # training process" is read as continuing from the SP model, as the first round continued
    # from the MSE model.
    _sp_ablation("train_sp_round2", init="train_sp", perceptual="freeze_sp"),
)

# The peers (docs/peers.md): each fine-tunes the MSE model for as many steps, at the same rate, as
# SP does; "MSE, continued" is the same with the MSE loss, the control for the extra steps.
PEER_RUNS = (
    TrainRun("train_mse_continued", "mse", "text", init="train_mse", steps_of="sp"),
    TrainRun("train_lpl", "lpl", "text", init="train_mse"),
    TrainRun("train_casdm", "casdm", "text", init="train_mse"),
)

TRAIN_RUNS = {run.name: run for run in (*MAIN_RUNS, *ABLATION_RUNS, *PEER_RUNS)}


@dataclass(frozen=True)
class ReleasedModel:
    """The authors' published checkpoint of one objective (params.yaml ``authors``), imported by
    the base stage as a starting model is, and sampled with our DDIM."""

    name: str  # the import stage's name and output folder
    objective: str  # mse | sp: the key of params.yaml's ``authors`` block
    conditioning: str = "text"

    def params(self) -> tuple[str, ...]:
        """What its import stage depends on: where the checkpoint is, and the schedule it is read under."""
        return ("schedule", f"authors.{self.objective}")


RELEASED_MODELS = {model.name: model for model in (ReleasedModel("authors_mse", "mse"), ReleasedModel("authors_sp", "sp"))}
MODELS = {**TRAIN_RUNS, **RELEASED_MODELS}  # every model a sampling row can name

# freeze stage -> the training stage it copies.
FREEZES = {"freeze": "train_mse", "freeze_uncond": "train_mse_uncond", "freeze_sp": "train_sp"}


SAMPLE_ROWS = {
    row.name: row
    for row in (
        SampleRow("mse_s25", "train_mse", 25),
        SampleRow("mse_s50", "train_mse", 50),
        SampleRow("mse_cfg75_s25", "train_mse", 25, cfg=7.5),
        SampleRow("mse_cfg75_r07_s25", "train_mse", 25, cfg=7.5, rescale=0.7),
        SampleRow("sp_s25", "train_sp", 25),
        SampleRow("sp_s50", "train_sp", 50),
        SampleRow("uncond_mse_s25", "train_mse_uncond", 25),  # always the empty prompt
        SampleRow("uncond_sp_s25", "train_sp_uncond", 25),
        *(SampleRow(run.name.removeprefix("train_") + "_s25", run.name, 25) for run in ABLATION_RUNS),
        # Table 7: SP with classifier-free guidance, rescale 0.7.
        SampleRow("sp_cfg2_r07_s25", "train_sp", 25, cfg=2.0, rescale=0.7),
        SampleRow("sp_cfg3_r07_s25", "train_sp", 25, cfg=3.0, rescale=0.7),
        SampleRow("sp_cfg4_r07_s25", "train_sp", 25, cfg=4.0, rescale=0.7),
        SampleRow("sp_cfg75_r07_s25", "train_sp", 25, cfg=7.5, rescale=0.7),
        *(SampleRow(run.name.removeprefix("train_") + "_s25", run.name, 25) for run in PEER_RUNS),
    )
}


@dataclass(frozen=True)
class Peer:
    label: str
    row: str  # its sampling row (25 DDIM steps, no CFG)
    training: str  # its training stage


# The peers table: SP beside the other perceptual objectives, each fine-tuned from train_mse.
PEERS = (
    Peer("MSE (the starting model)", "mse_s25", "train_mse"),
    Peer("MSE, continued", "mse_continued_s25", "train_mse_continued"),
    Peer("SP", "sp_s25", "train_sp"),
    Peer("LPL", "lpl_s25", "train_lpl"),
    Peer("Cas-DM", "casdm_s25", "train_casdm"),
)


def peer_tags(stage: str) -> dict:
    """The MLflow tag of the peers' runs (training and evaluation): filter with tags.comparison = 'peers'."""
    return {"comparison": "peers"} if any(stage in (peer.training, f"evaluate_{peer.row}") for peer in PEERS) else {}


@dataclass(frozen=True)
class TableEntry:
    row: str | None  # our sampling row; None for the real images (ground truth)
    paper: dict  # the key fields of the matching entry of paper_results.yaml


@dataclass(frozen=True)
class Table:
    title: str
    columns: tuple[str, ...]  # the paper's key fields, shown as columns
    rows: tuple[TableEntry, ...]
    note: str = ""


def _entries(column: str, pairs: dict) -> tuple[TableEntry, ...]:
    return tuple(TableEntry(row, {column: value}) for value, row in pairs.items())


def _sp_setting_entries(setting: str, main_first: bool = False) -> tuple[TableEntry, ...]:
    """The rows of an SP ablation table: each run that changes ``train.sp.<setting>``, labelled with
    the value it sets, and the main SP run with the setting's default, both as params.yaml writes them."""
    key = f"train.sp.{setting}"
    changed = [TableEntry(f"{run.name.removeprefix('train_')}_s25", {setting: dict(run.settings)[key]}) for run in ABLATION_RUNS if key in dict(run.settings)]
    main = TableEntry("sp_s25", {setting: SelfPerceptualSettings.model_fields[setting].default})
    return (main, *changed) if main_first else (*changed, main)


def _guided(loss: str, cfg, rescale, steps: int | None = None) -> dict:
    return {"loss": loss, "cfg": cfg, "rescale": rescale, **({"steps": steps} if steps else {})}


TABLES = {
    "table1": Table(
        "Table 1: quantitative evaluation",
        ("loss", "cfg", "rescale", "steps", "nfe"),
        (
            TableEntry(None, {"loss": "ground_truth"}),
            TableEntry("mse_s25", _guided("mse", None, None, 25)),
            TableEntry("mse_s50", _guided("mse", None, None, 50)),
            TableEntry("mse_cfg75_s25", _guided("mse", 7.5, None, 25)),
            TableEntry("mse_cfg75_r07_s25", _guided("mse", 7.5, 0.7, 25)),
            TableEntry("sp_s25", _guided("sp", None, None, 25)),
            TableEntry("sp_s50", _guided("sp", None, None, 50)),
        ),
    ),
    "table2": Table(
        "Table 2: layer l of the perceptual features",
        ("layer",),
        _sp_setting_entries("layer"),
        "encoder (the paper's 'all encoder'): the outputs of every down block; decoder ('all decoder'): those of every up "
        "block; encoder_midblock: both, and the mid block's; the losses are summed.",
    ),
    "table3": Table(
        "Table 3: choice of t' (clamped to [1, T])",
        ("t_prime",),
        _sp_setting_entries("t_prime"),
        "near40 is the paper's t +/- 40, normal100 its N(t, 100), uniform its uniform(1, T). The paper leaves the rules open. "
        "Ours: near40 is t' = t - 40 or t + 40 with equal probability; normal100 a normal with standard deviation 100, "
        "rounded; both clamped to the schedule's range; uniform is drawn independently of t.",
    ),
    "table4": Table("Table 4: distance on the features", ("distance",), _sp_setting_entries("distance")),
    "table5": Table("Table 5: formulation", ("formulation",), _sp_setting_entries("formulation", main_first=True)),
    "table6": Table(
        "Table 6: which network is the frozen perceptual network",
        ("perceptual_network",),
        _entries("perceptual_network", {"mse_model": "sp_s25", "sp_model": "sp_round2_s25"}),
        "sp_model: a second SP round that continues from the SP model, with the frozen SP model as f*.",
    ),
    "table7": Table(
        "Table 7: self-perceptual combined with classifier-free guidance",
        ("loss", "cfg", "rescale"),
        (
            TableEntry("mse_cfg75_r07_s25", _guided("mse", 7.5, 0.7)),
            TableEntry("sp_s25", _guided("sp", None, None)),
            TableEntry("sp_cfg2_r07_s25", _guided("sp", 2.0, 0.7)),
            TableEntry("sp_cfg3_r07_s25", _guided("sp", 3.0, 0.7)),
            TableEntry("sp_cfg4_r07_s25", _guided("sp", 4.0, 0.7)),
            TableEntry("sp_cfg75_r07_s25", _guided("sp", 7.5, 0.7)),
        ),
    ),
    "table8": Table(
        "Table 8: unconditional generation (always the empty prompt)",
        ("loss",),
        (TableEntry("uncond_mse_s25", {"loss": "mse"}), TableEntry("uncond_sp_s25", {"loss": "sp"})),
    ),
}

# The authors' checkpoints through exactly the Table 1 rows of their objective (params ``authors``).
RELEASED_ROWS = {
    f"authors_{row.name}": SampleRow(f"authors_{row.name}", f"authors_{row.objective}", row.steps, row.cfg, row.rescale)
    for row in (SAMPLE_ROWS[entry.row] for entry in TABLES["table1"].rows if entry.row)
}
ALL_ROWS = {**SAMPLE_ROWS, **RELEASED_ROWS}

# Training seeds (``train.seeds``). The Table 1 and 8 runs are trained once per seed; a run of seed
# k > 0 is the seed-0 run's stage with ``_seed<k>`` appended to its name and to each seeded
# stage it starts from, and ``train.seed`` raised by k. Their Table 1 and 8 rows are sampled and
# evaluated for every seed with the same sampling seeds; ablation rows stay single-seed.
SEEDED_RUNS = ("train_mse", "train_sp", "train_mse_uncond", "train_sp_uncond")
SEEDED_TABLES = ("table1", "table8")


def _seeded_row(row: SampleRow) -> bool:
    return row.model in SEEDED_RUNS and any(table in row.tables for table in SEEDED_TABLES)


@dataclass(frozen=True)
class Plan:
    """What one scale trains, freezes and samples, its training seeds included."""

    train_runs: dict[str, TrainRun]
    freezes: dict[str, str]  # freeze stage -> the training stage it copies
    rows: dict[str, SampleRow]


def plan(seeds: int) -> Plan:
    runs, freezes, rows = dict(TRAIN_RUNS), dict(FREEZES), dict(SAMPLE_ROWS)
    for seed in range(1, seeds):
        for name in SEEDED_RUNS:
            run = TRAIN_RUNS[name]
            runs[seeded(name, seed)] = replace(
                run, name=seeded(name, seed), init=seeded(run.init, seed) if run.init in SEEDED_RUNS else run.init,
                inputs=tuple((input_name, seeded(stage, seed) if stage in FREEZES else stage) for input_name, stage in run.inputs), seed=seed,
            )  # fmt: skip
        frozen = {stage for name in SEEDED_RUNS for _, stage in TRAIN_RUNS[name].inputs if stage in FREEZES}  # the seeded SP runs' f*
        freezes |= {seeded(name, seed): seeded(source, seed) for name, source in FREEZES.items() if name in frozen}
        rows |= {seeded(row.name, seed): row_named(seeded(row.name, seed)) for row in SAMPLE_ROWS.values() if _seeded_row(row)}
    return Plan(runs, freezes, rows)


def row_named(name: str) -> SampleRow:
    """Any sampling row by name, a training seed's included; KeyError for no such row."""
    base, seed = unseeded(name)
    if base not in ALL_ROWS:
        raise KeyError(f"no such sampling row; the rows are {', '.join(sorted(ALL_ROWS))}, and those of Tables 1 and 8 with _seed<k>")
    row = ALL_ROWS[base]
    if not seed:
        return row
    if not _seeded_row(row):
        raise KeyError(f"{base} is not trained once per seed (only the rows of Tables 1 and 8 are)")
    return replace(row, name=name, model=seeded(row.model, seed))


def train_run_named(name: str) -> TrainRun:
    base, seed = unseeded(name)
    return plan(seed + 1).train_runs[name] if seed else TRAIN_RUNS[base]


# The DrawBench prompts of the paper's Figures 3 and 4, in their order (Saharia et al. 2022).
DRAWBENCH_FIGURE_PROMPTS = (
    "New York Skyline with 'Deep Learning' written with fireworks on the sky.",
    "An elephant is behind a tree. You can see the trunk on one side and the back legs on the other.",
    "A couple of glasses are sitting on a table.",
    "One car on the street.",
    "A laptop on top of a teddy bear.",
    "A giraffe underneath a microwave.",
    "A yellow book and a red vase.",
    "One cat and one dog sitting on the grass.",
    "A painting by Grant Wood of an astronaut couple, american gothic style.",
    "A blue colored dog.",
    "McDonalds Church.",
    "Photo of a cat singing in a barbershop quartet.",
    "A black colored car.",
    "A black colored sandwich.",
    "A fish eating a pelican.",
    "A green apple and a black backpack.",
    "A green cup and a blue cell phone.",
    "A horse riding an astronaut.",
    "A pink colored giraffe.",
    "A red colored car.",
    "A separate seat for one person, typically with a back and four legs.",
    "A sign that says 'Diffusion'.",
    "A sheep to the right of a wine glass.",
    "A photo of a confused grizzly bear in calculus class.",
)


def row_label(name: str) -> str:
    """A sampling row in words, as the report states the claims: ``SP``, ``MSE + CFG 7.5, rescale
    0.7``, ``SP (layer=encoder)``, ``SP, unconditional``, ``SP, 50 steps``, ``the authors' SP``."""
    row = row_named(name)
    base, seed = unseeded(row.model)
    model, run = MODELS[base], TRAIN_RUNS.get(base)
    words = ("the authors' " if base in RELEASED_MODELS else "") + objectives.get(model.objective).label
    if run and run.steps_of:
        words += ", continued"  # the peers' control: the same loss, as many more steps as the others
    if run and run.settings:
        words += f" ({run.ablation})"
    elif run and run.objective == "sp" and TRAIN_RUNS.get(run.init, run).objective == "sp":
        words += " (round 2)"  # Table 6: from the SP model, its f* frozen from it
    if row.conditioning == "uncond":
        words += ", unconditional"
    if row.cfg is not None:
        words += f" + CFG {row.cfg:g}" + ("" if row.rescale is None else f", rescale {row.rescale:g}")
    if row.steps != 25:
        words += f", {row.steps} steps"
    return words + (f", training seed {seed}" if seed else "")
