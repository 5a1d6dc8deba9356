# Helpers of the Snakefile's rules and handlers (kept apart from the rules, as `snakemake --lint` asks).


def at_scale(path):
    return path.format(scale=SCALE)


# Stages run here start in a second, forked from a server that has done their imports
# (src/selfperceptual/pipeline/warm.py; SP_WARM_STAGES=0 turns it off).
WARM = []


def stop_warm():
    for server in filter(None, WARM):
        server.stop()
    WARM.clear()


# What `snakemake --report` shows, per stage command: files of the stage's folder, their caption
# (workflow/report/) and category. Every other stage's folder is not a report item. A pattern
# needs a wildcard (Snakemake lists the folder with it): one name is a wildcard held to it.
REPORT_ITEMS = {
    "report": (["{figure}.png", "{name,report}.html", "tables/{table}.csv"], "Results"),
    "evaluate": (["{name,samples}.png", "{name,metrics}.json"], "Samples"),
    "train": (["{name,preview}.png", "{name,loss_curve|metrics}.json"], "Training"),
}


def reported(stage, out):
    """``out``, marked as a report item where the stage's command makes one."""
    if stage.command not in REPORT_ITEMS:
        return out
    patterns, category = REPORT_ITEMS[stage.command]
    return report(out, patterns=patterns, caption=f"../report/{stage.command}.rst", category=category, subcategory=stage.name)
