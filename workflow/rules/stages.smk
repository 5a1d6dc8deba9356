# One rule per stage of src/selfperceptual/pipeline/dag.py (the description dvc.yaml is generated from).
# STAGES, SCALE, CONFIG, RESOURCES and RETRIES come from the Snakefile; `config` is params.yaml as Snakemake
# read it. Threads and cluster resources come from params.yaml's `resources` block of the scale.


for stage in STAGES:

    rule:
        name:
            stage.name
        input:
            [at_scale(dep) for dep in stage.deps],
        output:
            reported(stage, directory(at_scale(stage.out))),  # common.smk: what `snakemake --report` shows
        log:
            at_scale(f"runs/{{scale}}/logs/{stage.name}.log"),  # the job's console (Snakemake removes a failed attempt's)
        benchmark:
            at_scale(f"runs/{{scale}}/benchmarks/{stage.name}.tsv")
        threads: CONFIG.resources.of(stage.command).cpus  # Snakemake sets OMP_NUM_THREADS from this
        resources:
            **RESOURCES[stage.command],
        retries: RETRIES[stage.command]  # a stopped training job resumes from its checkpoint
        priority: stage.priority
        params:
            # The command goes through params: `shell:` is evaluated when the job runs, after
            # this loop has moved on, while params are bound now.
            cmd=at_scale(stage.cmd),
            values=json.dumps(param_values(config[SCALE], stage.params), sort_keys=True),
        shell:
            "{params.cmd} --log {log}"  # the stage copies its console there itself (io.console_copied_to)
