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

An arm may set train.json values after its epochs (`--arm crop:6:brain_crop=true`, values as JSON); such an arm is
scored with `score`, as `metaseg cv` has no option for them. On the CPU machine the same command with `--jobs 2`
trains two folds at once, one per core, from the full-size data (`--data` and `--plan-data` the same folder).

`shrink` writes the data set resized to the network size with the bundles' own deterministic resize (bilinear with
anti-aliasing for images, nearest for masks), as uncompressed uint8 TIFFs (xz packs them best): a device that can only
be sent a few tens of MiB gets the data this way. The network then sees the same input as from the full-size slice but for rounding to uint8.
`--plan-data` records the full-size data's path in the plan, as the CPU machine's `metaseg cv` will check it.

Comparing recipes needs less than `metaseg cv`'s report (three views of every patient): `score` predicts each held-out
patient once in one fixed view, whatever the bundle ships (flip TTA on, threshold 0.5, no component steps: the
arms compare networks, not inference steps), from the full-size data, and writes RUNS/scores.json (resumable, patient
by patient); `arms` pairs two recipes by patient on every metric, averaged over seeds (metaseg.evaluation.recipes,
which also makes benchmarks/recipe_report.py's table):

    python benchmarks/gpu_cv.py score --data ../shared/data/lgg/Data --runs runs/gpu/long_s0 --bundle unetpp
    python benchmarks/gpu_cv.py arms --base runs/gpu/base_s0 runs/gpu/base_s1 --new runs/gpu/long_s0 runs/gpu/long_s1 \
        --out reports/cv_gpu_epochs
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tifffile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from metaseg.data.discovery import discover, open_source, read_tiff  # noqa: E402
from metaseg.errors import UserError  # noqa: E402


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


def parse_arm(arm: str) -> tuple[str, str, dict]:
    """LABEL:EPOCHS[:KEY=VALUE,...] -> (label, epochs, train.json settings); each VALUE is JSON (true, 0.1, "x",
    or a whole component as an object)."""
    label, _, rest = arm.partition(":")
    epochs, _, items = rest.partition(":")
    if not label or not epochs.isdigit():
        raise UserError(f"--arm {arm}: expected LABEL:EPOCHS[:KEY=JSON,...] with EPOCHS a whole number")
    settings, decoder, space, at = {}, json.JSONDecoder(), re.compile(r"\s*"), 0
    while at < len(items):  # JSON's own parser says where each VALUE ends, so a VALUE may hold commas
        key, sep, _ = items[at:].partition("=")
        try:
            if not sep or not key or "," in key:
                raise ValueError("no KEY=")
            settings[key], end = decoder.raw_decode(items, space.match(items, at + len(key) + 1).end())
            end = space.match(items, end).end()  # spaces around a VALUE, as json.loads allows
            if items[end : end + 1] not in ("", ","):
                raise ValueError(f"{items[end:]!r} after the value")
        except ValueError as err:
            raise UserError(f"--arm {arm}: {items[at:]!r} is not KEY=JSON[,KEY=JSON...] ({err})") from None
        at = end + 1
    return label, epochs, settings


def train_runs(args) -> None:
    from metaseg.bundles import bundle_dir
    from metaseg.training.cv import assign_folds, check_plan, splits_final, train_fold

    found = discover(args.data)
    bundle = bundle_dir(args.bundle)
    tasks = []
    for arm in args.arm:
        label, epochs, settings = parse_arm(arm)
        for seed in args.seeds:
            runs = args.runs / f"{label}_s{seed}"
            recipe = {"epochs": int(epochs), "spatial_size": args.spatial_size, **settings}
            plan = {"data": str(Path(args.plan_data).resolve()), "folds": args.folds, "seed": seed, "recipe": recipe,
                    "patients": found.patients,
                    "splits": splits_final(assign_folds(found.patients, args.folds, seed))}
            check_plan(runs, plan)
            if not settings:  # an arm with train.json settings is scored with `score`, as metaseg cv has no such options
                print("then, on the CPU machine: " + shlex.join(
                    ["metaseg", "cv", "--data", args.plan_data, "--folds", str(args.folds), "--seed", str(seed),
                     "--bundle", args.bundle, "--runs", str(runs), "--out", f"reports/tmp/{label}_s{seed}",
                     "--epochs", epochs, "--spatial-size", str(args.spatial_size)]), file=sys.stderr, flush=True)
            for k in range(args.folds):
                tasks.append((runs, plan, k, int(epochs), settings))

    def run(task) -> str:
        runs, plan, k, epochs, settings = task
        overrides = {"epochs": epochs, "val_interval": epochs, "spatial_size": args.spatial_size, **settings}
        train_fold(bundle, args.bundle, args.data, found, plan, k, runs, overrides)  # logs to the fold's train.log
        trained = json.loads((runs / args.bundle / f"fold_{k}" / "trained.json").read_text())
        return f"{runs / args.bundle / f'fold_{k}'}: trained in {trained['seconds']} s"

    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by each fold's training process
    with ThreadPoolExecutor(args.jobs) as pool:  # threads: each fold trains in a child process of its own
        for line in pool.map(run, tasks):
            print(line, file=sys.stderr, flush=True)  # stdout carries every fold's training output


def score_runs(data: Path, runs: Path, bundle_name: str) -> dict:
    """Per-patient metrics of every held-out patient of a runs folder's trained folds, all in one view (resumable):
    `evaluate`'s steps off (threshold 0.5, no component steps) but with flip TTA, whatever the bundle ships."""
    from metaseg.bundles import bundle_dir
    from metaseg.data.datalist import by_patient
    from metaseg.data.ground_truth import read_ground_truth
    from metaseg.inference.engine import Engine
    from metaseg.files import write_json_atomic
    from metaseg.imageio.reader import decode
    from metaseg.evaluation.metrics import patient_metrics
    from metaseg.conventions import model_overrides
    from metaseg.training.pipeline import STEPS_OFF

    view = {**STEPS_OFF, "flip_tta": True}
    out = runs / "scores.json"
    scores = json.loads(out.read_text()) if out.is_file() else {}
    found = discover(data)
    plan = json.loads((runs / "cv_plan.json").read_text())
    for k, split in enumerate(plan["splits"]):
        fold_dir = runs / bundle_name / f"fold_{k}"
        todo = [p for p in split["val"] if p not in scores]
        if not todo or not (fold_dir / "trained.json").is_file():
            continue
        engine = Engine(bundle_dir(bundle_name), weights=fold_dir / "models" / "model.pt",
                        overrides={**model_overrides(fold_dir), "inference_steps": view})
        items = by_patient([vars(pair) for pair in found.pairs if pair.patient in set(todo)])
        _, truth = read_ground_truth(data, found.root, items)
        with open_source(data) as files:
            for patient, slices in items.items():
                names = [f"{found.root}/{i['image']}" if found.root else i["image"] for i in slices]
                frames = [decode([(name, files.read(name))]).inputs[0] for name in names]
                prob = np.stack(engine.probabilities(frames))  # averaged with the mirror's: the view's flip TTA
                scores[patient] = {"fold": k, **patient_metrics(truth[patient], prob >= view["threshold"])}
                write_json_atomic(out, scores)
                print(f"{runs.name}: {patient} {scores[patient]['dice_3d']:.3f}", flush=True)
    return scores


def main(argv: list[str] | None = None) -> None:
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
    t.add_argument("--arm", action="append", required=True,
                   help="LABEL:EPOCHS[:KEY=JSON,...], e.g. crop:6:brain_crop=true (train.json settings)")
    t.add_argument("--spatial-size", type=int, default=128)
    t.add_argument("--folds", type=int, default=3)
    t.add_argument("--jobs", type=int, default=12)
    c = sub.add_parser("score")
    c.add_argument("--data", type=Path, required=True)
    c.add_argument("--runs", type=Path, nargs="+", required=True)
    c.add_argument("--bundle", default="unetpp")
    a = sub.add_parser("arms")
    a.add_argument("--base", type=Path, nargs="+", required=True)
    a.add_argument("--new", type=Path, nargs="+", required=True)
    a.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "shrink":
        shrink(args.data, args.size, args.out)
    elif args.command == "score":
        for runs in args.runs:
            score_runs(args.data, runs, args.bundle)
    elif args.command == "arms":
        from metaseg.evaluation.recipes import arms

        command = " ".join(["python benchmarks/gpu_cv.py arms --base", *map(str, args.base), "--new",
                            *map(str, args.new), "--out", str(args.out)])
        arms(args.base, args.new, args.out, command)
    else:
        train_runs(args)


if __name__ == "__main__":
    try:
        main()
    except UserError as err:  # a missing folder, a runs folder of another plan: one line, as metaseg's CLI says it
        sys.exit(f"gpu_cv: error: {err}")
