"""Ship trained runs as the bundles' weights: the last step after `make train` on the real data.

For each bundle run in RUNS it copies `models/model.pt` to `bundles/<name>/models/model.pt` and the evidence that made
it (run.json, datalist.json, train.log) to `bundles/<name>/docs/`, exports `models/model.ts` (TorchScript, with MONAI's
`ckpt_export`, as the model zoo ships it); then it writes `bundles/best.json` naming the model that `metaseg compare`
recorded (with its evidence), pointing at the shipped copy.

    python scripts/ship_weights.py runs/lgg --report reports/comparison.md
    python scripts/ship_weights.py --cv runs/cv --report reports/cv.md   # `metaseg cv --train-all`: the models
        trained on all patients (RUNS/<bundle>/all), best = the higher out-of-fold mean per-patient 3D Dice
    python scripts/ship_weights.py --torchscript-only     # re-export model.ts from the shipped model.pt
    python scripts/ship_weights.py --from-report --report reports/cv.md   # keep the weights; eval_metrics, best.json

Shipping from a cross-validation also writes each bundle's `metadata.json` `eval_metrics` (EVAL_METRICS): the recipe's
out-of-fold figures at argmax and, marked optimistic, with the bundle's inference steps, from the report named, so the
card never shows numbers that nothing reproduces.
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
from metaseg.conventions import BEST_FILE, default_weights, read_best, write_best  # noqa: E402
from metaseg.files import write_bytes_atomic  # noqa: E402

MAX_BYTES = 10 * 2**20  # committed weights stay small


def export_torchscript(bundle: Path) -> Path:
    """models/model.ts from models/model.pt by MONAI's ckpt_export (it embeds metadata.json and inference.json)."""
    target = bundle / "models" / "model.ts"
    configs = bundle / "configs"
    subprocess.run(
        [sys.executable, "-m", "monai.bundle", "ckpt_export", "--net_id", "network_def", "--filepath", str(target),
         "--ckpt_file", str(default_weights(bundle)), "--meta_file", str(configs / "metadata.json"),
         "--config_file", str(configs / "inference.json")],
        cwd=bundle, check=True,
    )
    if target.stat().st_size > MAX_BYTES:
        raise SystemExit(f"{target} is over {MAX_BYTES} bytes")
    return target


# metadata.json eval_metrics key -> the cv.json figure of "<bundle> + its inference steps" (out of fold, as served)
# metadata.json eval_metrics key -> (cv.json model row, figure): `argmax` the bundle alone at threshold 0.5 (no choice made
# on the patients it scores: unbiased), `served` with its inference steps, which were chosen on the same out-of-fold
# patients (optimistic: the keys say so, until the served-model issue cross-fits them)
ROWS = {"argmax": "{name}", "served": "{name} + its inference steps"}
EVAL_METRICS = {
    "cv_oof_argmax_dice_3d_per_patient": ("argmax", "mean_dice_3d"),
    "cv_oof_served_dice_3d_per_patient_optimistic": ("served", "mean_dice_3d"),
    "cv_oof_served_lesionwise_dice_optimistic": ("served", "lesionwise_dice"),
    "cv_oof_served_lesion_sensitivity_3d_optimistic": ("served", "lesion_sensitivity_3d"),
    "cv_oof_served_fp_lesions_per_patient_optimistic": ("served", "fp_lesions_per_patient"),
    "cv_oof_served_lesion_slice_dice_optimistic": ("served", "mean/lesion_slice_dice"),
    "cv_oof_served_fp_slice_rate_optimistic": ("served", "mean/fp_slice_rate"),
}


def figure(cv: dict, name: str, row: str, path: str):
    """A bundle's figure in cv.json: of its `row` (ROWS), at `path` ("key" or "mean/key"); None where absent."""
    entry = cv["models"].get(ROWS[row].format(name=name))
    for key in path.split("/"):
        entry = entry.get(key) if isinstance(entry, dict) else None
    return entry


def write_eval_metrics(cv: dict, bundles: Path = BUNDLES_DIR) -> None:
    """Each bundle's metadata.json `eval_metrics` from the cross-validation report (EVAL_METRICS)."""
    for name in NAMES:
        figures = {key: round(float(value), 4) for key, (row, path) in EVAL_METRICS.items()
                   if (value := figure(cv, name, row, path)) is not None}
        path = bundles / name / "configs" / "metadata.json"
        text = path.read_text()  # the one line is replaced: the file keeps its hand-made layout
        new, count = re.subn(r'"eval_metrics": \{[^{}]*\}', lambda _: '"eval_metrics": ' + json.dumps(figures), text)
        if count != 1:
            raise SystemExit(f"{path}: expected one flat eval_metrics entry")
        json.loads(new)
        write_bytes_atomic(path, new.encode())


def read_cv(report: Path) -> dict:
    if not (report.parent / "cv.json").is_file():
        raise SystemExit(f"no {report.parent / 'cv.json'}: run `metaseg cv ...` first")
    cv = json.loads((report.parent / "cv.json").read_text())
    if not cv["complete"]:
        raise SystemExit(f"{report.parent / 'cv.json'} is partial: finish the cross-validation first")
    return cv


def ship_cv(runs: Path, report: Path) -> None:
    """The models `metaseg cv --train-all` trained on all patients; best.json by out-of-fold mean 3D Dice."""
    cv = read_cv(report)
    for name in NAMES:
        if not (runs / name / "all" / "trained.json").is_file():
            raise SystemExit(f"{runs / name / 'all'} has not finished training on all patients")
        copy_run(runs / name / "all", BUNDLES_DIR / name, extra=("trained.json",))
    print("shipped both bundles' weights")
    record_from_report(cv, report)


def record_from_report(cv: dict, report: Path) -> None:
    """bundles/best.json (the bundle with the higher out-of-fold mean at argmax, the unbiased figure, with its shipped
    weights) and each bundle's eval_metrics, from a complete cross-validation report."""
    dice = {name: cv["models"][name]["mean_dice_3d"] for name in NAMES}
    best = max(dice, key=dice.get)
    patients = len(cv["models"][best]["dice_3d_per_patient"])
    write_best(BEST_FILE, best, default_weights(BUNDLES_DIR / best), {}, report=report,
               selected_by=f"out-of-fold mean per-patient 3D Dice at argmax, {cv['folds']}-fold patient "
               f"cross-validation (seed {cv['seed']}, {patients} patients); shipped weights: the same recipe trained on "
               f"all development patients",
               cv_dice_3d=dice, cv_ci95_dice_3d={name: cv["models"][name]["ci95_dice_3d"] for name in NAMES})
    write_eval_metrics(cv)
    print(f"best.json and eval_metrics from {report.name}; best: {read_best().bundle.name}")


def copy_run(run: Path, bundle: Path, extra: tuple[str, ...] = ()) -> None:
    """A run's model.pt as the bundle's weights (+ model.ts), and the evidence that made it into bundle/docs."""
    weights = default_weights(run)
    torch.load(weights, weights_only=True)  # a complete, plain state dict
    if weights.stat().st_size > MAX_BYTES:
        raise SystemExit(f"{weights} is over {MAX_BYTES} bytes")
    write_bytes_atomic(default_weights(bundle), weights.read_bytes())
    export_torchscript(bundle)
    for evidence in ("run.json", "datalist.json", "train.log", *extra):
        target = "datalist_lgg.json" if evidence == "datalist.json" else evidence
        shutil.copyfile(run / evidence, bundle / "docs" / target)


def ship(runs: Path, report: Path) -> None:
    chosen = json.loads((runs / "best.json").read_text())
    for name in NAMES:
        copy_run(runs / name, BUNDLES_DIR / name)
    evidence = {key: value for key, value in chosen.items() if key not in ("bundle", "weights", "overrides", "report")}
    write_best(BEST_FILE, chosen["bundle"], default_weights(BUNDLES_DIR / chosen["bundle"]), chosen.get("overrides", {}),
               report=report, **evidence)
    print(f"shipped both bundles' weights; best: {read_best().bundle.name}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="?", help="folder holding <bundle>/ runs and the best.json of `metaseg compare`")
    parser.add_argument("--report", type=Path, default=REPO / "reports" / "comparison.md")
    parser.add_argument("--torchscript-only", action="store_true", help="only re-export each bundle's model.ts")
    parser.add_argument("--cv", type=Path, help="a `metaseg cv --train-all` runs folder (its report: --report cv.md)")
    parser.add_argument("--from-report", action="store_true", help="keep the shipped weights; write best.json and "
                        "metadata.json eval_metrics from the cross-validation report (--report cv.md)")
    args = parser.parse_args()
    if args.from_report:
        record_from_report(read_cv(args.report.resolve()), args.report.resolve())
    elif args.torchscript_only:
        for name in NAMES:
            print(f"exported {export_torchscript(BUNDLES_DIR / name)}")
    elif args.cv:
        ship_cv(args.cv, args.report.resolve())
    elif args.runs:
        ship(args.runs, args.report.resolve())
    else:
        parser.error("give RUNS, or --torchscript-only")
