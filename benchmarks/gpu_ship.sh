#!/bin/bash
# The shipped recipe's whole cross-validation (3 patient folds x both bundles, seed 0: what `metaseg cv` trains for
# scripts/ship_weights.py) trained on one GPU, for a session that has one; the recipe never depends on it.
#
#   bash benchmarks/gpu_ship.sh pack DATA      here: DATA resized to the network size, packed (.gpu/data.tar.xz,
#                                              ~28 MB, and .gpu/plan_data, DATA's path here), and the wheels the GPU
#                                              image lacks (.whl/)
#   bash benchmarks/gpu_ship.sh device         on the GPU machine (the `device` tool's run, carry .gpu and .whl):
#                                              all six folds at once, one process each (the host, not the
#                                              GPU, limits a bundle's training); the fold runs come back packed,
#                                              $OUT/<bundle>_fold_<k>.tar.gz (models, logs, no resume checkpoints)
#   bash benchmarks/gpu_ship.sh finish DATA FOLDER
#                                              here: unpacks the fold archives of FOLDER (the device
#                                              tool's files_at) and lets `metaseg cv` predict every held-out
#                                              patient from the full-size DATA and write reports/cv.*; then ship them
#                                              with `python scripts/ship_weights.py --cv runs/gpu_ship/ship_s0 ...`
#
# The folds, split and plan are `metaseg cv --folds 3 --seed 0 --epochs E --spatial-size 128`'s (E: the bundles'
# configs/train.json epochs, which must agree), so `finish` trains nothing. Env: PY (python, default .venv/bin/python
# here and python3 on the device), SIZE (128), JOBS (6), OUT (the device's output folder).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-128}
RUNS=runs/gpu_ship
WHEELS="monai==1.6.1 pytorch-ignite==0.5.5 fire==0.7.1 termcolor==3.3.0 pydicom==3.0.2 nibabel==5.4.2"

epochs() {  # the epochs of both bundles' train.json (metaseg cv's own reading): one number, or an error
    "$PY" -c '
from metaseg.bundles import NAMES, bundle_dir
from metaseg.errors import UserError
from metaseg.training.cv import bundle_epochs
try:
    found = {bundle_epochs(bundle_dir(name)) for name in NAMES}
except UserError as err:
    raise SystemExit(f"gpu_ship: {err}") from None
if len(found) != 1:
    raise SystemExit(f"gpu_ship: the bundles train for different epochs {sorted(found)}: one plan cannot hold both")
print(found.pop())'
}

case "${1:-}" in
pack)
    PY=${PY:-.venv/bin/python}
    DATA=${2:?usage: gpu_ship.sh pack DATA}
    mkdir -p .gpu && realpath "$DATA" > .gpu/plan_data  # the plan names the full-size data `finish` reads
    rm -rf .gpu/Data && "$PY" benchmarks/gpu_cv.py shrink --data "$DATA" --size "$SIZE" --out .gpu/Data
    (cd .gpu && tar -cf - Data | xz -9 -T0 > data.tar.xz.part && mv data.tar.xz.part data.tar.xz && rm -rf Data)
    # pure-Python wheels only: the GPU image has torch, numpy, scikit-image, tifffile and the rest
    "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: -d .whl $WHEELS
    echo "packed: .gpu/data.tar.xz ($(du -h .gpu/data.tar.xz | cut -f1)), .whl/ ($(ls .whl | wc -l) wheels)"
    ;;
device)
    PY=${PY:-python3}
    OUT=${OUT:?the output folder (the device tool sets OUT)}
    if [ -d .whl ]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    mkdir -p .gpu && tar -xJf .gpu/data.tar.xz -C .gpu
    E=$(epochs)
    "$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
    for b in unetpp attention_unet; do  # one plan (same folds, seed, recipe) for both: check_plan refuses a mismatch
        "$PY" benchmarks/gpu_cv.py train --data .gpu/Data --plan-data "$(cat .gpu/plan_data)" \
            --runs "$RUNS" --bundle $b --seeds 0 --arm "ship:$E" --spatial-size "$SIZE" --jobs $(( ${JOBS:-6} / 2 )) \
            > "$OUT/train_$b.log" 2>&1 &
    done
    status=0; for job in $(jobs -p); do wait "$job" || status=1; done
    grep -h "trained in" "$OUT"/train_*.log || true
    # what comes back: at most 8 files of 16 MiB, so one archive per fold (an Attention U-Net model is 8 MB), each
    # with the plan; models and logs, no resume checkpoints
    for fold in "$RUNS"/ship_s0/*/fold_*; do
        tar -czf "$OUT/$(basename "$(dirname "$fold")")_$(basename "$fold").tar.gz" --exclude=checkpoint.pt \
            --exclude=eval "$RUNS"/ship_s0/cv_plan.json "$RUNS"/ship_s0/splits_final.json "$fold"
    done
    (cd "$OUT" && tar -czf train_output.tar.gz train_*.log && rm train_*.log)
    exit $status
    ;;
finish)
    PY=${PY:-.venv/bin/python}
    DATA=${2:?usage: gpu_ship.sh finish DATA FOLDER}
    FROM=${3:?usage: gpu_ship.sh finish DATA FOLDER}
    shopt -s nullglob
    archives=("$FROM"/*_fold_*.tar.gz)  # runs/gpu_ship/ship_s0/{cv_plan.json,splits_final.json,<bundle>/fold_<k>/}
    [ ${#archives[@]} -gt 0 ] || { echo "gpu_ship: no <bundle>_fold_<k>.tar.gz in $FROM" >&2; exit 2; }
    for archive in "${archives[@]}"; do
        tar -xzf "$archive"
    done
    "$PY" -c 'from metaseg.cli import main; main()' cv --data "$DATA" --folds 3 --seed 0 --bundle unetpp --bundle attention_unet \
        --epochs "$(epochs)" --spatial-size "$SIZE" --runs "$RUNS/ship_s0" --out "${REPORTS:-reports}"
    ;;
*)
    echo "usage: gpu_ship.sh pack DATA | device | finish DATA FOLDER (see the comments at the top)" >&2
    exit 2
    ;;
esac
