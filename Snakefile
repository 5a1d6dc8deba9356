# The pipeline for Snakemake. Its rules are made from src/selfperceptual/dag.py, the same
# description dvc.yaml is generated from, so both tools run the same commands on the same paths.
#   snakemake --cores all                      # the scale params.yaml names (local)
#   snakemake --cores all --config scale=smoke
#   snakemake --profile workflow/profiles/slurm  # on a cluster
import json
import os
import uuid

import yaml
from snakemake.exceptions import WorkflowError

from selfperceptual import tracking
from selfperceptual.cluster import CLUSTER_FILE, TRAIN_RETRIES, ClusterSettingsError, cluster_settings, read_cluster_file, rule_resources
from selfperceptual.config import ParamsError, load_params
from selfperceptual.dag import PARAMS_FILE, build_stages, missing_external_inputs, param_values, run_dir
from selfperceptual.experiments import RELEASED_ROWS

configfile: PARAMS_FILE

try:
    SCALE, CONFIG = load_params(PARAMS_FILE, config.get("scale"))
    # Partition, account and GPU type: `cluster:` of the Snakemake config, else the user's cluster.yaml.
    CLUSTER = cluster_settings(config.get("cluster") or read_cluster_file(CLUSTER_FILE))
except (ParamsError, ClusterSettingsError) as error:
    raise WorkflowError(str(error))
MISSING = missing_external_inputs(CONFIG)
if MISSING:
    raise WorkflowError(f"scale {SCALE!r} needs external inputs that are missing:\n  " + "\n  ".join(MISSING))

# One id for every MLflow run of this execution (jobs on a cluster inherit it).
os.environ.setdefault(tracking.EXECUTION_ENV, f"snakemake-{uuid.uuid4().hex[:12]}")
STAGES = build_stages(CONFIG)


def at_scale(path):
    return path.format(scale=SCALE)


rule all:  # the default target: the first rule of this file (rules of included files never are)
    input:
        at_scale("runs/{scale}/report"),


include: "workflow/rules/stages.smk"


if CONFIG.authors:

    rule authors:  # the authors' checkpoints through the Table 1 rows, without training anything
        input:
            [at_scale(run_dir(f"evaluate_{row}")) for row in RELEASED_ROWS],


onstart:
    tracking.prepare(SCALE)


onsuccess:
    # Record what ran with DVC, so `dvc status` agrees with Snakemake. dvc.yaml follows the scale
    # params.yaml names; a run of another scale (--config scale=...) is left unrecorded.
    with open(PARAMS_FILE) as handle:
        dvc_scale = yaml.safe_load(handle)["scale"]
    done = [stage.name for stage in STAGES if os.path.isdir(at_scale(stage.out))]
    if dvc_scale == SCALE and done and os.path.isdir(".dvc"):
        shell("dvc commit --force --quiet " + " ".join(done))
    elif dvc_scale != SCALE:
        print(f"Not recorded in dvc.lock: params.yaml's scale is {dvc_scale!r}, this run's is {SCALE!r}.")
    print(tracking.ui_hint(tracking.prepare(SCALE)))
