# The pipeline for Snakemake. Its rules are made from src/selfperceptual/pipeline/dag.py, the same
# description dvc.yaml is generated from, so both tools run the same commands on the same paths.
#   snakemake --cores all                      # the scale params.yaml names (local)
#   snakemake --cores all --config scale=smoke
#   snakemake --profile workflow/profiles/slurm  # on a cluster
import json
import os
import uuid
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError

from selfperceptual.pipeline import driver, pulled, tracking, warm
from selfperceptual.pipeline.cluster import CLUSTER_FILE, ClusterSettingsError, cluster_settings, read_cluster_file, retries, rule_resources
from selfperceptual.pipeline.config import ParamsError, load_params
from selfperceptual.pipeline.dag import PARAMS_FILE, build_stages, missing_external_inputs, param_values, render_dvc_yaml, run_dir
from selfperceptual.pipeline.experiments import RELEASED_ROWS

configfile: PARAMS_FILE


report: "workflow/report/workflow.rst"

try:
    SCALE, CONFIG = load_params(PARAMS_FILE, config.get("scale"))
    # Partition, account and GPU type: `cluster:` of the Snakemake config, else the user's cluster.yaml.
    CLUSTER = cluster_settings(config.get("cluster") or read_cluster_file(CLUSTER_FILE))
    STAGES = build_stages(CONFIG)
    # What each job asks the cluster for, and how often a stage is submitted again: a training stage
    # longer than the cluster's max_runtime is a chain of jobs, plus retries for failures. Only the
    # main process resubmits: the job that SLURM stops ahead of its limit must end, not restart
    # inside its own allocation (which has no time left).
    RESOURCES = {stage.command: rule_resources(CONFIG.resources.of(stage.command), CLUSTER, stage.command) for stage in STAGES}
    RETRIES = {stage.command: retries(CONFIG.resources.of(stage.command), CLUSTER, stage.command) if workflow.is_main_process else 0 for stage in STAGES}
except (ParamsError, ClusterSettingsError) as error:
    raise WorkflowError(str(error))
MISSING = missing_external_inputs(CONFIG)
if MISSING:
    raise WorkflowError(f"scale {SCALE!r} needs external inputs that are missing:\n  " + "\n  ".join(MISSING))

# A run after one killed with SIGKILL needs no --unlock (src/selfperceptual/pipeline/driver.py).
if workflow.is_main_process:
    STALE = driver.remove_stale_locks()
    if STALE:
        print(STALE)
    driver.note_graceful_stops()  # SIGTERM: say it stopped, not that a job failed

# One id for every MLflow run of this execution (jobs on a cluster inherit it).
os.environ.setdefault(tracking.EXECUTION_ENV, f"snakemake-{uuid.uuid4().hex[:12]}")

# What ran is recorded with DVC when dvc.yaml describes this run: the scale params.yaml names, and
# the DAG its settings give now (train.seeds and the num_jobs settings change the stages).
with open(PARAMS_FILE) as handle:
    DVC_SCALE = yaml.safe_load(handle)["scale"]
DVC_CURRENT = os.path.isfile("dvc.yaml") and Path("dvc.yaml").read_text() == render_dvc_yaml(PARAMS_FILE)
if DVC_SCALE == SCALE and not DVC_CURRENT:
    print("Warning: dvc.yaml does not match params.yaml (a changed train.seeds or num_jobs?); this run will not be "
          "recorded with DVC. Run `make generate` to update dvc.yaml.")


include: "workflow/rules/common.smk"


# After `dvc pull` or `dvc checkout`, outputs carry the times DVC wrote them at: those DVC finds
# unchanged are put back in the DAG's order, so Snakemake, which goes by times, agrees with DVC,
# which goes by content (src/selfperceptual/pipeline/pulled.py).
if DVC_SCALE == SCALE and DVC_CURRENT and os.path.isdir(".dvc") and workflow.is_main_process:
    RESTAMPED = pulled.restamp({stage.name: (at_scale(stage.out), tuple(map(at_scale, stage.deps))) for stage in STAGES})
    if RESTAMPED:
        print(f"{len(RESTAMPED)} outputs written by DVC (dvc pull or checkout), which dvc status finds unchanged, "
              "were put back in the order of the DAG.")


rule all:  # the default target: the first rule of this file (rules of included files never are)
    input:
        at_scale("runs/{scale}/report"),


include: "workflow/rules/stages.smk"


if CONFIG.authors:

    rule authors:  # the authors' checkpoints through the Table 1 rows, without training anything
        input:
            [at_scale(run_dir(f"evaluate_{row}")) for row in RELEASED_ROWS],


onstart:
    driver.record()  # the driver that holds the locks now, for the next run to check
    tracking.prepare(SCALE)
    tracking.start_execution(SCALE, "snakemake")  # the run its stages' runs nest under
    WARM.append(warm.start(local=workflow.local_exec))


onerror:
    stop_warm()
    if driver.stopped_without_failure():
        tracking.end_execution(SCALE, "KILLED")
        raise WorkflowError("Stopped by SIGTERM once the jobs that were running had finished; none failed. "
                            "Run snakemake again to go on.")
    tracking.end_execution(SCALE, "FAILED")


onsuccess:
    stop_warm()
    tracking.end_execution(SCALE, "FINISHED")
    # Record what ran with DVC, so `dvc status` agrees with Snakemake. dvc.yaml follows the scale
    # params.yaml names; a run of another scale (--config scale=...) is left unrecorded.
    done = [stage.name for stage in STAGES if os.path.isdir(at_scale(stage.out))]
    if DVC_SCALE == SCALE and DVC_CURRENT and done and os.path.isdir(".dvc"):
        # Every stage: one commit of the whole dvc.yaml, which DVC parses once (naming 121 stages
        # makes it parse dvc.yaml, dvc.lock and params.yaml again for each: 2.6 times slower).
        shell("dvc commit --force --quiet" + ("" if len(done) == len(STAGES) else " " + " ".join(done)))
    elif DVC_SCALE != SCALE:
        print(f"Not recorded in dvc.lock: params.yaml's scale is {DVC_SCALE!r}, this run's is {SCALE!r}.")
    elif not DVC_CURRENT:
        print("Not recorded in dvc.lock: dvc.yaml does not match params.yaml; run `make generate`, then `dvc commit`.")
    print(tracking.ui_hint(tracking.prepare(SCALE)))
