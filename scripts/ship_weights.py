"""Ship a finished `metaseg cv` as the bundles' fold ensembles: the last step of a cross-validation on the real data.

For each bundle, the k fold models of RUNS become its ensemble (nnU-Net ships its fold models the same way):

    models/model.pt, models/model.ts               fold 0 (what `network_def` loads: MONAI Label, the Model Zoo)
    models/fold_<k>/model.pt, model.ts             fold k = 1..k-1 (configs/inference.json `other_folds`)
    docs/training/                                 the evidence: cv_plan.json, splits_final.json, shipped.json (the
                                                   cv command, seed, report) and fold_<k>/ (run.json, datalist.json,
                                                   train.log, trained.json, fold.json), their paths relative
                                                   to the checkout (`runs/...`, `../shared/data/...`)

Each model.ts is MONAI's `ckpt_export` of its model.pt (it embeds metadata.json and inference.json). Then
inference.json's `other_folds` lists the shipped folds, its `inference_steps` are those the report chose on all
out-of-fold patients, metadata.json `eval_metrics` are the report's figures (EVAL_METRICS: the cross-fitted served
estimate, and the argmax one), and bundles/best.json names the bundle of the report's `served`. No model that the
cross-validation did not score is shipped. `--bundle NAME` ships (and records) that bundle alone: the others keep
their folds and the report their docs/training/shipped.json names, which the tests read per bundle.

    python scripts/ship_weights.py --cv runs/ship --report reports/cv.md
    python scripts/ship_weights.py --cv runs/ship --report reports/cv.md --bundle attention_unet
    python scripts/ship_weights.py --from-report --report reports/cv.md   # keep the weights; the figures, best.json
    python scripts/ship_weights.py --torchscript-only                     # re-export every model.ts
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from metaseg.bundles import BUNDLES_DIR, NAMES  # noqa: E402
from metaseg.conventions import BEST_FILE, default_weights, write_best  # noqa: E402
from metaseg.files import relative_paths, write_bytes_atomic, write_json_atomic  # noqa: E402

MAX_BYTES = 10 * 2**20  # each committed file stays under the Model Zoo's limit
MAX_BUNDLE_BYTES = 50 * 2**20  # all weights of one bundle
EVIDENCE = ("run.json", "datalist.json", "train.log", "trained.json", "fold.json")

# metadata.json eval_metrics key -> (cv.json entry, figure): `served` the bundle's cross-fitted estimate of what it
# serves (steps chosen on the other folds), `argmax` its fold models alone at threshold 0.5 (no choice made at all)
EVAL_METRICS = {
    "cv_oof_argmax_dice_3d_per_patient": ("argmax", "mean_dice_3d"),
    "cv_served_crossfitted_dice_3d_per_patient": ("served", "mean_dice_3d"),
    "cv_served_crossfitted_lesion_slice_dice": ("served", "lesion_slice_dice"),
    "cv_served_crossfitted_fp_slice_rate": ("served", "fp_slice_rate"),
    "cv_served_crossfitted_lesionwise_dice": ("served", "lesionwise_dice"),
    "cv_served_crossfitted_lesion_sensitivity_3d": ("served", "lesion_sensitivity_3d"),
    "cv_served_crossfitted_fp_lesions_per_patient": ("served", "fp_lesions_per_patient"),
}


def fold_weights(bundle: Path, k: int) -> Path:
    """Where fold k's model.pt lives in a bundle: fold 0 is the bundle's own model.pt."""
    return default_weights(bundle) if k == 0 else bundle / "models" / f"fold_{k}" / "model.pt"


def shipped_folds(bundle: Path) -> list[Path]:
    return [default_weights(bundle), *sorted((bundle / "models").glob("fold_*/model.pt"))]


def export_torchscript(bundle: Path, weights: Path) -> Path:
    """model.ts beside `weights` by MONAI's ckpt_export (it embeds metadata.json and inference.json)."""
    target = weights.with_suffix(".ts")
    configs = bundle / "configs"
    subprocess.run(
        [sys.executable, "-m", "monai.bundle", "ckpt_export", "--net_id", "network_def", "--filepath", str(target),
         "--ckpt_file", str(weights), "--meta_file", str(configs / "metadata.json"),
         "--config_file", str(configs / "inference.json")],
        cwd=bundle, check=True, stdout=subprocess.DEVNULL,
    )
    if target.stat().st_size > MAX_BYTES:
        raise SystemExit(f"{target} is over {MAX_BYTES} bytes")
    return target


def figure(cv: dict, name: str, entry: str, key: str):
    """A bundle's figure in cv.json: of its cross-fitted `served` entry or its `argmax` model row; None where absent."""
    found = cv.get("served_per_bundle", {}).get(name) if entry == "served" else cv["models"].get(name)
    return (found or {}).get(key)


def write_eval_metrics(cv: dict, bundles: Path = BUNDLES_DIR, names: tuple[str, ...] = NAMES) -> None:
    """Each bundle's metadata.json `eval_metrics` from the cross-validation report (EVAL_METRICS)."""
    for name in names:
        figures = {key: round(float(value), 4) for key, (entry, field) in EVAL_METRICS.items()
                   if (value := figure(cv, name, entry, field)) is not None}
        replace_line(bundles / name / "configs" / "metadata.json", r'"eval_metrics": \{[^{}]*\}',
                     '"eval_metrics": ' + json.dumps(figures))


def replace_line(path: Path, pattern: str, new: str) -> None:
    """Replace the one match of `pattern` in a JSON config, keeping the file's hand-made layout."""
    text, count = re.subn(pattern, lambda _: new, path.read_text())
    if count != 1:
        raise SystemExit(f"{path}: expected one match of {pattern}")
    json.loads(text)
    write_bytes_atomic(path, text.encode())


def write_folds(bundle: Path, folds: int) -> None:
    """inference.json `other_folds`: the shipped folds after fold 0."""
    listed = json.dumps([f"$@ckpt_dir + '/fold_{k}/model.pt'" for k in range(1, folds)])
    replace_line(bundle / "configs" / "inference.json", r'"checkpoints": \[[^\]]*\]', f'"checkpoints": {listed}')


def write_steps(bundle: Path, steps: dict) -> None:
    """inference.json `inference_steps`: each value on its line, the `_desc_` kept."""
    path = bundle / "configs" / "inference.json"
    block = re.search(r'"inference_steps": \{[^{}]*\}', path.read_text())
    if block is None:
        raise SystemExit(f"{path}: no flat inference_steps entry")
    new = block.group(0)
    for key, value in steps.items():
        new, count = re.subn(rf'("{key}": )[^,\n]+', lambda m: m.group(1) + json.dumps(value), new)
        if count != 1:
            raise SystemExit(f"{path}: expected one {key} in inference_steps")
    replace_line(path, re.escape(block.group(0)), new)


def read_cv(report: Path, names: tuple[str, ...] = NAMES) -> dict:
    if not (report.parent / "cv.json").is_file():
        raise SystemExit(f"no {report.parent / 'cv.json'}: run `metaseg cv ...` first")
    cv = json.loads((report.parent / "cv.json").read_text())
    if not cv["complete"]:
        raise SystemExit(f"{report.parent / 'cv.json'} is partial: finish the cross-validation first")
    if not cv.get("served") or not set(names) <= set(cv.get("served_per_bundle", {})):
        raise SystemExit(f"{report.parent / 'cv.json'} has no cross-fitted `served` figures for {', '.join(names)}: "
                         f"collect it again with this metaseg (`metaseg cv ... --collect`), or ship with --bundle")
    return cv


def ship_cv(runs: Path, report: Path, bundles: Path = BUNDLES_DIR, names: tuple[str, ...] = NAMES) -> None:
    """Each named bundle's fold models of a finished `metaseg cv` in RUNS as its shipped ensemble (module
    docstring); everything is checked before anything is written."""
    cv = read_cv(report, names)
    folds = {name: [runs / name / f"fold_{k}" for k in range(cv["folds"])] for name in names}
    for name, dirs in folds.items():
        for fold in dirs:
            if not (fold / "fold.json").is_file():
                raise SystemExit(f"{fold} is not finished (no fold.json): run `metaseg cv ... --fold K` for it")
            torch.load(default_weights(fold), weights_only=True)  # a complete, plain state dict
        size = 2 * sum(default_weights(fold).stat().st_size for fold in dirs)  # with a model.ts about as large
        if size > MAX_BUNDLE_BYTES:
            raise SystemExit(f"{name}: {len(dirs)} fold models make ~{size} bytes with TorchScript, over "
                             f"{MAX_BUNDLE_BYTES}")
    for name, dirs in folds.items():
        ship_folds(cv, runs, dirs, bundles / name, report)
    print(f"shipped the fold ensembles of {', '.join(names)} ({cv['folds']} folds each)")
    record_from_report(cv, report, bundles, names)


def ship_folds(cv: dict, runs: Path, folds: list[Path], bundle: Path, report: Path) -> None:
    """One bundle's fold models, TorchScript exports, evidence and configs."""
    for stale in (bundle / "models").glob("fold_*"):
        shutil.rmtree(stale)
    training = bundle / "docs" / "training"
    shutil.rmtree(training, ignore_errors=True)
    write_folds(bundle, len(folds))
    write_steps(bundle, cv["served_per_bundle"][bundle.name]["inference_steps"])
    for k, fold in enumerate(folds):
        target = fold_weights(bundle, k)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(target, default_weights(fold).read_bytes())
        export_torchscript(bundle, target)
        (training / fold.name).mkdir(parents=True)
        for evidence in [*EVIDENCE, *(log.name for log in fold.glob("train.log.*"))]:  # with interrupted logs
            if (fold / evidence).is_file():
                copy_evidence(fold / evidence, training / fold.name / evidence)
    for plan in ("cv_plan.json", "splits_final.json"):
        copy_evidence(runs / plan, training / plan)
    write_json_atomic(training / "shipped.json", {
        "command": relative_paths(cv["command"], REPO), "seed": cv["seed"], "folds": cv["folds"],
        "recipe": cv["recipe"], "report": relative_paths(str(report), REPO),
        "weights": {f"fold_{k}": str(fold_weights(bundle, k).relative_to(bundle)) for k in range(len(folds))}})


def copy_evidence(source: Path, target: Path, root: Path = REPO) -> None:
    """A record of the runs folder (text) into docs/training, the absolute paths in it relative to the checkout
    `root` that trained it: committed files name no folder of the machine."""
    write_bytes_atomic(target, relative_paths(source.read_bytes().decode(), root).encode())


def record_from_report(cv: dict, report: Path, bundles: Path = BUNDLES_DIR, names: tuple[str, ...] = NAMES) -> None:
    """bundles/best.json (the bundle of the report's cross-fitted `served`, with its shipped ensemble) and the named
    bundles' eval_metrics, from a complete cross-validation report; best.json lists the served figures of the
    bundles the report scored."""
    served = cv["served"]
    per_bundle = cv["served_per_bundle"]
    best = served["bundle"]
    unscored = [name for name in NAMES if name not in per_bundle]
    chosen_by = (served["chosen_by"] if not unscored else f"the only bundle this cross-validation scored "
                 f"({', '.join(unscored)} not cross-validated on these patients, so not compared)")
    write_best(bundles / BEST_FILE.name, best, default_weights(bundles / best), {}, report=report,
               selected_by=f"{chosen_by}; {cv['folds']}-fold patient cross-validation (seed {cv['seed']}, "
               f"{served['n_patients']} patients); shipped: the bundle's {cv['folds']} fold models, averaged",
               cv_served_dice_3d={name: entry["mean_dice_3d"] for name, entry in per_bundle.items()},
               cv_served_ci95_dice_3d={name: entry["ci95_dice_3d"] for name, entry in per_bundle.items()})
    write_eval_metrics(cv, bundles, names)
    print(f"best.json and eval_metrics from {report.name}; best: {best}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, default=REPO / "reports" / "cv.md", help="the cv.md of the run")
    parser.add_argument("--torchscript-only", action="store_true", help="only re-export every shipped model.ts")
    parser.add_argument("--cv", type=Path, help="a finished `metaseg cv` runs folder (its report: --report)")
    parser.add_argument("--from-report", action="store_true", help="keep the shipped weights; write best.json and "
                        "metadata.json eval_metrics from the cross-validation report (--report cv.md)")
    parser.add_argument("--bundle", action="append", choices=NAMES, help="ship or record this bundle alone; repeat "
                        "(default: every bundle)")
    args = parser.parse_args()
    names = tuple(args.bundle or NAMES)
    if args.from_report:
        record_from_report(read_cv(args.report.resolve(), names), args.report.resolve(), names=names)
    elif args.torchscript_only:
        for name in NAMES:
            for weights in shipped_folds(BUNDLES_DIR / name):
                print(f"exported {export_torchscript(BUNDLES_DIR / name, weights)}")
    elif args.cv:
        ship_cv(args.cv, args.report.resolve(), names=names)
    else:
        parser.error("give --cv RUNS, --from-report or --torchscript-only")
