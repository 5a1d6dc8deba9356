# Two commands for a fresh clone:  make run  (the pipeline)  and  make test  (the tests).
SCALE ?= local
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export NO_ALBUMENTATIONS_UPDATE := 1
export TOKENIZERS_PARALLELISM := false

CLIP_VENV := .venv-clip
CLIP_STAMP := $(CLIP_VENV)/.installed

.PHONY: setup run test generate clean-runs clip-env

# One lock for laptops, CI and clusters: the regular torch build (pinned with `===`, so the local
# `+cpu` build some machines offer cannot be picked) with its torchvision, CUDA libraries included.
$(STAMP): requirements.lock pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r requirements.lock
	$(PYTHON) -m pip install --quiet --no-deps -e .
	touch $@

setup: $(STAMP)

# clip-retrieval's own environment (it pins numpy<2, pyarrow<16, webdataset<0.3 and open_clip<3, and
# imports setuptools' pkg_resources), from its own lock, with .venv's torch build linked in rather than
# installed twice (src/selfperceptual/pipeline/clipenv.py). The clip_embed stage runs `make clip-env` the first
# time it needs it.
$(CLIP_STAMP): requirements-clip.lock $(STAMP)
	rm -rf $(CLIP_VENV)
	python3 -m venv $(CLIP_VENV)
	$(PYTHON) -m selfperceptual.pipeline.clipenv $(CLIP_VENV)
	$(CLIP_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(CLIP_VENV)/bin/python -m pip install --quiet --no-deps -r requirements-clip.lock
	$(CLIP_VENV)/bin/python -m pip check
	touch $@

clip-env: $(CLIP_STAMP)

run: setup
	snakemake --cores all --config scale=$(SCALE)

# Three workers on two cores: the end-to-end runs start first, side by side (tests/conftest.py orders them).
test: setup
	$(PYTHON) -m pytest -n 3 --dist loadgroup --no-loadscope-reorder

# After editing src/selfperceptual/pipeline/dag.py or config.py: regenerate dvc.yaml and the params schema.
generate: setup
	$(PYTHON) -m selfperceptual.pipeline.dag --write dvc.yaml
	$(PYTHON) -m selfperceptual.pipeline.config schema workflow/schemas/params.schema.json

clean-runs:
	rm -rf runs/$(SCALE)
