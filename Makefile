# metaseg: every install step lives here, so a fresh clone needs only python3, make and apt.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.stamp-setup
DEMO   := runs/demo
DEMO_TRAIN := --epochs 12 --spatial-size 64

# glibc malloc: keep big tensor buffers in the heap instead of mmap/munmap on every step (faster CPU training).
export MALLOC_MMAP_THRESHOLD_ := 33554432
export MALLOC_TRIM_THRESHOLD_ := 268435456

.PHONY: setup test demo train clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

test: setup
	$(BIN)/python -m pytest -q

# The main job on the embedded phantom: train both bundles briefly, evaluate, compare, record the best.
demo: setup
	$(BIN)/metaseg synth $(DEMO)/data --patients 10 --slices 16 --seed 0
	$(MAKE) --no-print-directory train DATA=$(DEMO)/data RUNS=$(DEMO) TRAIN_ARGS="$(DEMO_TRAIN)"
	@echo
	@echo "demo done: report in $(DEMO)/report/comparison.md, best model recorded in $(DEMO)/best.json"
	@echo "serve it:        $(BIN)/metaseg serve --best $(DEMO)/best.json"
	@echo "open the viewer: $(BIN)/metaseg ui    (in a second terminal)"

# The same pipeline on your own data: make train DATA=path/to/Data.zip [RUNS=runs/mydata]
RUNS ?= runs/$(notdir $(basename $(DATA)))
train: setup
	@test -n "$(DATA)" || { echo "usage: make train DATA=path/to/Data.zip"; exit 2; }
	for b in attention_unet unetpp; do \
	  $(BIN)/metaseg train --bundle $$b --data $(DATA) --out $(RUNS)/$$b $(TRAIN_ARGS) && \
	  $(BIN)/metaseg evaluate --bundle $$b --data $(DATA) --run $(RUNS)/$$b --split validation && \
	  $(BIN)/metaseg evaluate --bundle $$b --data $(DATA) --run $(RUNS)/$$b --split test || exit 1; \
	done
	$(BIN)/metaseg compare --data $(DATA) --run attention_unet=$(RUNS)/attention_unet --run unetpp=$(RUNS)/unetpp \
	  --out $(RUNS)/report --best-out $(RUNS)/best.json

clean:
	rm -rf $(VENV) runs
