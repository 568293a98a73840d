# metaseg: every install step lives here, so a fresh clone needs only python3, make and apt.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.stamp-setup
BROWSER_STAMP := $(VENV)/.stamp-browser
DEMO   := runs/demo
DEMO_TRAIN := --epochs 30 --spatial-size 64 --restart  # a demo trains from scratch: a checkpoint left by an older bundle never stops it
BUNDLES := attention_unet unetpp

# glibc malloc: keep big tensor buffers in the heap instead of mmap/munmap on every step (faster CPU training).
export MALLOC_MMAP_THRESHOLD_ := 33554432
export MALLOC_TRIM_THRESHOLD_ := 268435456

.PHONY: setup test demo train $(addprefix train-,$(BUNDLES)) $(addprefix evaluate-,$(BUNDLES)) serve-ui \
  monailabel-check bench clean

# The browser test drives Debian's Chromium and the DICOM SEG test Debian's dicom3tools (dciodvfy); apt needs root,
# so sudo is used when not root and sudo exists.
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || ! command -v sudo >/dev/null || echo sudo)

setup: $(STAMP) $(BROWSER_STAMP)

# The locks, one a part (requirements/*.lock): each holds what its pyproject extra adds to the ones before it.
LOCKS  := $(addprefix requirements/,runtime.lock serve.lock ui.lock test.lock)
# Every pinned wheel, downloaded once: the venv installs from it, and tests/test_install.py installs the metaseg wheel
# into a fresh venv from it with no index (so the pyproject extras, not the lock, decide what gets installed).
WHEELS := $(VENV)/wheels

# pip installs one wheel after another on one core, so the locks' two halves go in at once, each downloaded then
# installed (every pin is in the locks, hence --no-deps; `pip check` then proves the set complete and consistent), and
# byte-compilation (pip's own runs on one core) is done by compileall on all of them, leaving out the packages' own
# test suites, a fifth of the code that nothing imports (a failure there is pip's silent one too).
PIP := $(BIN)/python -m pip --disable-pip-version-check
PIP_INSTALL := $(PIP) install --quiet
half = $(PIP) download --quiet --no-deps -d $(WHEELS) -r $(1) && \
  $(PIP_INSTALL) --no-index --find-links $(WHEELS) --no-compile --no-deps -r $(1)
$(STAMP): $(LOCKS) pyproject.toml
	$(PYTHON) -m venv $(VENV)
	grep -hv '^#' $(LOCKS) > $(VENV)/lock.txt
	sed -n 'p;n' $(VENV)/lock.txt > $(VENV)/lock-1.txt && sed -n 'n;p' $(VENV)/lock.txt > $(VENV)/lock-2.txt
	$(call half,$(VENV)/lock-1.txt) & first=$$!; $(call half,$(VENV)/lock-2.txt); second=$$?; wait $$first && [ $$second -eq 0 ]
	$(PIP) check
	$(BIN)/python -m compileall -q -j 0 -x '/tests?/|/testing/_internal/' $$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))') >/dev/null || true
	$(PIP_INSTALL) --no-deps --no-build-isolation -e .
	touch $@

$(BROWSER_STAMP): | $(STAMP)
	command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v dciodvfy >/dev/null || { \
	  $(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y \
	  --no-install-recommends chromium chromium-driver dicom3tools; }
	touch $@

test: setup
	$(BIN)/python -m pytest -q

# The main job on the embedded phantom: train both bundles briefly, evaluate, compare, record the model to serve, and
# measure which lesion scores would keep the reference phantom's lesions each model finds (metaseg retention). Its
# set-up is the Python environment alone (the browser is for the tests); the two bundles train at once, a core each,
# and each one's output is shown when it ends. No inference steps (threshold 0.5, no flip TTA, no component steps):
# the bundles' shipped steps were chosen on LGG, not on the phantom, and the demo scores and serves the same masks.
demo: $(STAMP)
	$(BIN)/metaseg synth $(DEMO)/data --patients 10 --slices 16 --seed 0
	$(MAKE) --no-print-directory -j2 --output-sync=target train DATA=$(DEMO)/data RUNS=$(DEMO) \
	  TRAIN_ARGS="$(DEMO_TRAIN)" THREADS=1 INFERENCE_STEPS=off
	$(BIN)/metaseg retention $(foreach b,$(BUNDLES),--run $(b)=$(DEMO)/$(b)) --out $(DEMO)/report/phantom_retention.json
	@echo
	@echo "demo done: report in $(DEMO)/report/comparison.md, model to serve in $(DEMO)/best.json"
	@echo "serve it:        $(BIN)/metaseg serve --best $(DEMO)/best.json"
	@echo "open the viewer: $(BIN)/metaseg ui    (in a second terminal)"

# The same pipeline on your own data: make train DATA=path/to/Data.zip [RUNS=runs/mydata] [INFERENCE_STEPS=off]
# (one stage after the other; with -j2 two stages at once, then THREADS=1 gives each a core). Each bundle trains, then
# its test patients are segmented as `metaseg predict` and the server do (with the bundle's chosen inference steps,
# or none with INFERENCE_STEPS=off) and scored; then compare reports on those masks and records the model to serve:
# the architecture the shipped patient cross-validation chose (bundles/best.json), with this run's weights and the
# steps its masks were scored with. No validation evaluation: a handful of validation patients chooses nothing.
RUNS ?= runs/$(notdir $(basename $(DATA)))
INFERENCE_STEPS ?= chosen
THREADED := $(if $(THREADS),OMP_NUM_THREADS=$(THREADS))
train: $(addprefix evaluate-,$(BUNDLES))
	$(BIN)/metaseg compare --data $(DATA) $(foreach b,$(BUNDLES),--run $(b)=$(RUNS)/$(b)) \
	  --out $(RUNS)/report --best-out $(RUNS)/best.json

$(addprefix train-,$(BUNDLES)): train-%: $(STAMP)
	@test -n "$(DATA)" || { echo "usage: make train DATA=path/to/Data.zip"; exit 2; }
	$(THREADED) $(BIN)/metaseg train --bundle $* --data $(DATA) --out $(RUNS)/$* $(TRAIN_ARGS)

$(addprefix evaluate-,$(BUNDLES)): evaluate-%: train-%
	$(THREADED) $(BIN)/metaseg evaluate --bundle $* --data $(DATA) --run $(RUNS)/$* --split test --steps $(INFERENCE_STEPS)

# The server in the background, then the viewer in front; Ctrl-C stops both.
#   make serve-ui [SERVE_ARGS="--best runs/demo/best.json"] [SERVER_PORT=8000] [UI_PORT=8501]
SERVER_PORT ?= 8000
UI_PORT ?= 8501
serve-ui: $(STAMP)
	$(BIN)/metaseg serve --port $(SERVER_PORT) $(SERVE_ARGS) & server=$$!; \
	trap 'kill $$server 2>/dev/null' EXIT INT TERM; \
	$(BIN)/metaseg ui --server http://127.0.0.1:$(SERVER_PORT) --port $(UI_PORT)

# Both bundles in a MONAI Label server (`monailabel start_server` on a free local port; over REST: infer a PNG and a
# DICOM slice, train one epoch), in a venv of its own:
# monailabel pulls torchvision, and PyPI's torchvision does not import beside our torch 2.13.0 CPU wheel, so this venv
# has torch 2.14.1 + torchvision 0.29.1 (a CUDA build, about 8 GB). torch comes first so that monailabel's source-only
# dependency (sam2) builds against it instead of fetching a second torch for an isolated build.
# Result: benchmarks/results/monailabel.json (committed); tests/test_monailabel.py reruns it when the venv exists.
ML_VENV  := .venv-monailabel
ML_STAMP := $(ML_VENV)/.stamp-setup

$(ML_STAMP): requirements-monailabel.txt
	$(PYTHON) -m venv $(ML_VENV)
	$(ML_VENV)/bin/python -m pip install --quiet --disable-pip-version-check $$(grep -E '^(torch|setuptools|wheel)==' requirements-monailabel.txt)
	$(ML_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-build-isolation -r requirements-monailabel.txt
	touch $@

# Speed and load, never in `make test`: results to benchmarks/results/*.json (run on a quiet machine; ~6 min here).
bench: setup
	$(BIN)/python benchmarks/synth_speed.py
	$(BIN)/python benchmarks/serve_latency.py --requests 30
	$(BIN)/python benchmarks/serve_load.py

monailabel-check: setup $(ML_STAMP)
	nice -n 10 $(ML_VENV)/bin/python scripts/monailabel_check.py --metaseg-python $(BIN)/python \
	  --out benchmarks/results/monailabel.json

# Build outputs, caches and the venvs, and the demo's run (`make demo` makes it again); never a trained model of
# yours: `make train` and `metaseg cv` write under runs/<name>/, which stays.
clean:
	rm -rf $(VENV) $(ML_VENV) $(DEMO) build dist *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
