# Two commands for a fresh clone:  make run  (the pipeline)  and  make test  (the tests).
SCALE ?= local
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export NO_ALBUMENTATIONS_UPDATE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup run test generate clean-runs

# torch first, by exact version: on CPU-only machines `pip install torch==2.13.0` takes the CPU
# build, and nothing later can pull the CUDA packages in through a looser range.
$(STAMP): requirements.lock pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -r requirements.lock
	$(PYTHON) -m pip install --quiet --no-deps -e .
	touch $@

setup: $(STAMP)

run: setup
	snakemake --cores all --config scale=$(SCALE)

test: setup
	$(PYTHON) -m pytest

# After editing src/selfperceptual/dag.py or config.py: regenerate dvc.yaml and the params schema.
generate: setup
	$(PYTHON) -m selfperceptual.dag --write dvc.yaml
	$(PYTHON) -m selfperceptual.config workflow/schemas/params.schema.json

clean-runs:
	rm -rf runs/$(SCALE)
