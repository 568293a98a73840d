#!/bin/bash
# The shipped recipe's whole cross-validation (3 patient folds x both bundles, seed 0: what `metaseg cv` trains for
# scripts/ship_weights.py) trained on any GPU host; the recipe never depends on one. Three steps: pack here, copy the
# checkout with .gpu/ and .whl/ to the host and run `device` there, copy its OUT folder back and `finish` here.
#
#   bash benchmarks/gpu_ship.sh pack DATA      here: DATA resized to the network size, packed (.gpu/data.tar.xz,
#                                              ~28 MB, and .gpu/plan_data, DATA's path here), and the pure-Python
#                                              wheels a bare GPU image may lack (.whl/)
#   bash benchmarks/gpu_ship.sh device         on the GPU host, OUT set: the folds of BUNDLES at once, one process
#                                              each (the host, not the GPU, limits a bundle's training); the fold
#                                              runs come back packed, $OUT/<bundle>_fold_<k>[_<k>...].tar.gz
#                                              (models, logs, no resume checkpoints). A job array runs one bundle per task
#                                              (BUNDLES=unetpp, BUNDLES=attention_unet), each with its own OUT
#   bash benchmarks/gpu_ship.sh finish DATA FOLDER
#                                              here: unpacks the fold archives copied back into FOLDER (every task's
#                                              OUT) and lets `metaseg cv` predict every held-out patient from the
#                                              full-size DATA and write reports/cv.*; then ship them with
#                                              `python scripts/ship_weights.py --cv runs/gpu_ship/ship_s0 ...`
#
# The folds, split and plan are `metaseg cv --folds 3 --seed 0 --epochs E --spatial-size 128`'s (E: the bundles'
# configs/train.json epochs, which must agree), so `finish` trains nothing. Env: PY (python, default .venv/bin/python
# here and python3 on the host), SIZE (128), JOBS (processes per bundle, 3), BUNDLES (unetpp attention_unet), OUT
# (the folder copied back). Where the copy back is limited: FOLDS_PER_ARCHIVE (1; an Attention U-Net fold is ~8 MB
# packed, so 3 folds of a bundle make one ~25 MB file) and MAX_MIB (no limit: `device` fails on a larger archive).
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
    OUT=${OUT:?the folder to copy back (set OUT)}
    if [ -d .whl ]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    mkdir -p .gpu && tar -xJf .gpu/data.tar.xz -C .gpu
    E=$(epochs)
    "$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
    for b in ${BUNDLES:-unetpp attention_unet}; do  # one plan (folds, seed, recipe): check_plan refuses a mismatch
        "$PY" benchmarks/gpu_cv.py train --data .gpu/Data --plan-data "$(cat .gpu/plan_data)" \
            --runs "$RUNS" --bundle "$b" --seeds 0 --arm "ship:$E" --spatial-size "$SIZE" --jobs "${JOBS:-3}" \
            > "$OUT/train_$b.log" 2>&1 &
    done
    status=0; for job in $(jobs -p); do wait "$job" || status=1; done
    grep -h "trained in" "$OUT"/train_*.log || true
    # FOLDS_PER_ARCHIVE folds of a bundle per archive, each archive with the plan; models and logs, no checkpoints
    for bundle in "$RUNS"/ship_s0/*/; do
        folds=("$bundle"fold_*)
        for (( i = 0; i < ${#folds[@]}; i += ${FOLDS_PER_ARCHIVE:-1} )); do
            part=("${folds[@]:i:${FOLDS_PER_ARCHIVE:-1}}")
            name=$(basename "$bundle")_fold_$(IFS=_; echo "${part[*]##*fold_}").tar.gz
            tar -czf "$OUT/$name" --exclude=checkpoint.pt --exclude=eval \
                "$RUNS"/ship_s0/cv_plan.json "$RUNS"/ship_s0/splits_final.json "${part[@]%/}"
            mib=$(( ($(stat -c %s "$OUT/$name") + 1048575) / 1048576 ))
            if [ -n "${MAX_MIB:-}" ] && [ "$mib" -gt "$MAX_MIB" ]; then
                echo "gpu_ship: $name is $mib MiB, over MAX_MIB=$MAX_MIB: lower FOLDS_PER_ARCHIVE" >&2; status=1
            fi
        done
    done
    (cd "$OUT" && tar -czf train_output.tar.gz train_*.log && rm train_*.log)
    exit $status
    ;;
finish)
    PY=${PY:-.venv/bin/python}
    DATA=${2:?usage: gpu_ship.sh finish DATA FOLDER}
    FROM=${3:?usage: gpu_ship.sh finish DATA FOLDER}
    shopt -s nullglob
    archives=("$FROM"/*_fold_*.tar.gz)  # runs/gpu_ship/ship_s0/{cv_plan.json,splits_final.json,<bundle>/fold_<k>/...}
    [ ${#archives[@]} -gt 0 ] || { echo "gpu_ship: no <bundle>_fold_<k>[_<k>...].tar.gz in $FROM" >&2; exit 2; }
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
