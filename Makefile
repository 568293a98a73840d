# metaseg: every install step lives here, so a fresh clone needs only python3, make and apt.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.stamp-setup
DEMO   := runs/demo

# glibc malloc: keep big tensor buffers in the heap instead of mmap/munmap on every step (faster CPU training).
export MALLOC_MMAP_THRESHOLD_ := 33554432
export MALLOC_TRIM_THRESHOLD_ := 268435456

.PHONY: setup test demo clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

test: setup
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/metaseg synth $(DEMO)/data --patients 8 --slices 20 --seed 0
	$(BIN)/metaseg datalist $(DEMO)/data --out $(DEMO)/datalist.json --seed 0

clean:
	rm -rf $(VENV) runs
