"""Cross-validation folds trained on one GPU at once, for when a GPU is at hand (the recipe never depends on one).

`metaseg cv` trains its folds one after another; on one GPU the host, not the GPU, limits a bundle's training (~100
images/s per process on an H200), so here every fold of every (arm, seed) trains in its own process at the same time
(OMP_NUM_THREADS=1 each). The folds, splits and plan are exactly `metaseg cv`'s, so the runs folder it writes is one
that `metaseg cv` resumes: copied back to the CPU machine, the same `metaseg cv` command (printed per run) finds every
fold trained and only predicts the held-out patients and writes the report, from the original data.

    python benchmarks/gpu_cv.py shrink --data ../shared/data/lgg/Data --size 128 --out .gpu/Data
    (cd .gpu && tar -cf - Data | xz -9 > data.tar.xz)      # 28 MB: what travels to the device, unpacked there
    python benchmarks/gpu_cv.py train --data .gpu/Data --plan-data ../shared/data/lgg/Data --runs runs/gpu \
        --bundle unetpp --seeds 0 1 --arm base:6 --arm long:18 --spatial-size 128 --jobs 12

`shrink` writes the data set resized to the network size with the bundles' own deterministic resize (bilinear with
anti-aliasing for images, nearest for masks), as uncompressed uint8 TIFFs (xz packs them best): a device that can only
be sent a few tens of MiB gets the data this way. The network then sees the same input as from the full-size slice but for rounding to uint8.
`--plan-data` records the full-size data's path in the plan, as the CPU machine's `metaseg cv` will check it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tifffile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from metaseg.data import discover, open_source, read_tiff  # noqa: E402


def shrink(data: Path, size: int, out: Path) -> None:
    """Every image and mask of `data` at size x size, as the bundles' training transforms resize them."""
    from monai.transforms import Resize

    image_resize = Resize((size, size), mode="bilinear", anti_aliasing=True)
    mask_resize = Resize((size, size), mode="nearest")
    found = discover(data)
    with open_source(data) as files:
        for pair in found.pairs:
            for name, resize, is_mask in ((pair.image, image_resize, False), (pair.label, mask_resize, True)):
                pixels = read_tiff(files.read(f"{found.root}/{name}" if found.root else name))
                channels = (pixels > 127)[None].astype(np.float32) if is_mask else np.moveaxis(pixels, -1, 0)
                small = np.asarray(resize(channels.astype(np.float32)))
                target = out / name
                target.parent.mkdir(parents=True, exist_ok=True)
                if is_mask:
                    tifffile.imwrite(target, (small[0] > 0.5).astype(np.uint8) * 255)
                else:
                    rgb = np.clip(np.rint(np.moveaxis(small, 0, -1)), 0, 255).astype(np.uint8)
                    tifffile.imwrite(target, rgb, photometric="rgb")


def train_runs(args) -> None:
    from metaseg.bundles import bundle_dir
    from metaseg.cv import assign_folds, check_plan, cv_datalist, splits_final
    from metaseg.files import write_json_atomic
    from metaseg.pipeline import train

    found = discover(args.data)
    bundle = bundle_dir(args.bundle)
    tasks = []
    for arm in args.arm:
        label, epochs = arm.split(":")
        for seed in args.seeds:
            runs = args.runs / f"{label}_s{seed}"
            recipe = {"epochs": int(epochs), "spatial_size": args.spatial_size}
            plan = {"data": str(Path(args.plan_data).resolve()), "folds": args.folds, "seed": seed, "recipe": recipe,
                    "patients": found.patients,
                    "splits": splits_final(assign_folds(found.patients, args.folds, seed))}
            check_plan(runs, plan)
            print("then, on the CPU machine: " + shlex.join(
                ["metaseg", "cv", "--data", args.plan_data, "--folds", str(args.folds), "--seed", str(seed),
                 "--bundle", args.bundle, "--runs", str(runs), "--out", f"reports/tmp/{label}_s{seed}",
                 "--epochs", epochs, "--spatial-size", str(args.spatial_size)]), file=sys.stderr, flush=True)
            for k in range(args.folds):
                tasks.append((runs, plan, k, int(epochs)))

    def run(task) -> str:
        runs, plan, k, epochs = task
        fold_dir = runs / args.bundle / f"fold_{k}"
        if (fold_dir / "trained.json").is_file():
            return f"{fold_dir}: already trained"
        split = plan["splits"][k]
        datalist = cv_datalist(found, plan, runs, k, split["train"], split["val"])
        started = time.time()
        overrides = {"epochs": epochs, "val_interval": epochs, "spatial_size": args.spatial_size}
        train(bundle, args.data, fold_dir, seed=plan["seed"], datalist=datalist, **overrides)  # logs to train.log
        write_json_atomic(fold_dir / "trained.json", {"seconds": round(time.time() - started), "resumed": False,
                                                      "device": "gpu", **overrides})
        return f"{fold_dir}: trained in {time.time() - started:.0f} s"

    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by each fold's training process
    with ThreadPoolExecutor(args.jobs) as pool:  # threads: each fold trains in a child process of its own
        for line in pool.map(run, tasks):
            print(line, file=sys.stderr, flush=True)  # stdout carries every fold's training output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("shrink")
    s.add_argument("--data", type=Path, required=True)
    s.add_argument("--size", type=int, default=128)
    s.add_argument("--out", type=Path, required=True)
    t = sub.add_parser("train")
    t.add_argument("--data", type=Path, required=True)
    t.add_argument("--plan-data", required=True)
    t.add_argument("--runs", type=Path, required=True)
    t.add_argument("--bundle", default="unetpp")
    t.add_argument("--seeds", type=int, nargs="+", default=[0])
    t.add_argument("--arm", action="append", required=True, help="LABEL:EPOCHS")
    t.add_argument("--spatial-size", type=int, default=128)
    t.add_argument("--folds", type=int, default=3)
    t.add_argument("--jobs", type=int, default=12)
    args = parser.parse_args()
    if args.command == "shrink":
        shrink(args.data, args.size, args.out)
    else:
        train_runs(args)


if __name__ == "__main__":
    main()
