# One rule per stage of src/selfperceptual/dag.py (the description dvc.yaml is generated from).
# STAGES, SCALE and CONFIG come from the Snakefile.


def at_scale(path):
    return path.format(scale=SCALE)


rule all:
    input:
        at_scale("runs/{scale}/report"),


for stage in STAGES:

    rule:
        name:
            stage.name
        input:
            [at_scale(dep) for dep in stage.deps],
        output:
            directory(at_scale(stage.out)),
        benchmark:
            at_scale(f"runs/{{scale}}/benchmarks/{stage.name}.tsv")
        threads: stage.threads  # Snakemake sets OMP_NUM_THREADS from this
        params:
            # The command goes through params: `shell:` is evaluated when the job runs, after
            # this loop has moved on, while params are bound now.
            cmd=at_scale(stage.cmd),
            values=json.dumps(param_values(CONFIG, stage.params), sort_keys=True),
        shell:
            "{params.cmd}"
