"""The recipe table (`reports/recipe.md`, `recipe.json`): each arm of a bundle's training recipe against the shipped
recipe, by patient cross-validation over seeds, every patient out of fold, in one fixed view of the masks.

    python benchmarks/recipe_report.py --data ../shared/data/lgg/Data --base runs/ship runs/recipe/base_s1 \
        --arm "brain crop=runs/recipe/crop_s0,runs/recipe/crop_s1" --out reports

Each run folder is a cross-validation runs folder (`benchmarks/gpu_cv.py train`, or `metaseg cv`) scored by
`gpu_cv.py score` (its `scores.json`: flip TTA, threshold 0.5, no component steps, whatever the bundle ships, so that
the arms compare networks, not inference steps). A recipe's figure for a patient is its mean over the recipe's seeds; an arm is paired
with the base by patient. The seed spread is the range of a recipe's per-seed means. An arm is **kept** when the 95%
CI of its paired gain is above 0 and its mean gain exceeds the base's seed spread. Dice by lesion-size half splits the
patients by their ground-truth lesion pixels (the smaller half: the first n // 2). CPU time: the training seconds of a seed's folds
(`trained.json`), summed, mean over seeds (each fold on one core).

Run folders need not outlive their machine: `--keep reports/recipe.json` in place of `--base` carries that report's rows
as recorded and pairs the new arms with its base row's per-patient Dice (the same patients, or an error):

    python benchmarks/recipe_report.py --data ../shared/data/lgg/Data --keep reports/recipe.json \
        --arm "warm-up 12 epochs=runs/recipe2/warm12_s0,runs/recipe2/warm12_s1" --out reports
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from metaseg.errors import UserError  # noqa: E402
from metaseg.files import relative_paths  # noqa: E402

METRICS = ("dice_3d", "lesion_slice_dice", "fp_slice_rate", "lesionwise_dice", "fp_lesions")


def lesion_pixels(data: Path, patients: list[str]) -> dict[str, int]:
    """Each patient's ground-truth lesion pixels, summed over its slices."""
    from metaseg.data.datalist import by_patient
    from metaseg.data.discovery import discover
    from metaseg.data.ground_truth import read_ground_truth

    found = discover(data)
    items = by_patient([vars(pair) for pair in found.pairs if pair.patient in set(patients)])
    _, truth = read_ground_truth(data, found.root, items)
    return {patient: int(stack.sum()) for patient, stack in truth.items()}


def load_recipe(label: str, runs: list[Path], bundle: str) -> dict:
    """A recipe's runs: per seed, its scores, settings and training CPU seconds."""
    seeds = {}
    for run in runs:
        scores, plan = run / "scores.json", run / "cv_plan.json"
        if not scores.is_file() or not plan.is_file():
            raise UserError(f"{run}: no scores.json or cv_plan.json: train it, then `gpu_cv.py score` it")
        try:
            plan = json.loads(plan.read_text())
            folds = [run / bundle / f"fold_{k}" / "trained.json" for k in range(plan["folds"])]
            if not all(f.is_file() for f in folds):
                raise UserError(f"{run}: not every fold is trained")
            seeds[plan["seed"]] = {"run": str(run), "recipe": plan["recipe"], "scores": json.loads(scores.read_text()),
                                   "train_s": sum(json.loads(f.read_text())["seconds"] for f in folds)}
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"{run}: unreadable cv_plan.json, scores.json or trained.json ({err!r})") from None
    if len(seeds) != len(runs):
        raise UserError(f"{label}: two runs of the same seed")
    return seeds


def summary(label: str, seeds: dict, patients: list[str], base: dict | None, small: set[str]) -> dict:
    from metaseg.evaluation.metrics import bootstrap_ci, paired_difference

    def per_patient(metric: str, among=patients) -> np.ndarray:
        return np.array([np.mean([float(s["scores"][p][metric]) for s in seeds.values()]) for p in among])

    dice_per_seed = {seed: float(np.mean([s["scores"][p]["dice_3d"] for p in patients])) for seed, s in seeds.items()}
    row = {"arm": label, "runs": [s["run"] for s in seeds.values()], "recipe": next(iter(seeds.values()))["recipe"],
           "seeds": sorted(seeds), "dice_3d_per_seed": dice_per_seed,
           "seed_spread": max(dice_per_seed.values()) - min(dice_per_seed.values()),
           "cpu_minutes_per_cv": float(np.mean([s["train_s"] for s in seeds.values()]) / 60)}
    for metric in METRICS:
        values = per_patient(metric)
        row[metric] = {"mean": float(np.nanmean(values)), "ci95": bootstrap_ci(values)}
    detected = sum(s["scores"][p]["gt_lesions_detected"] for s in seeds.values() for p in patients)
    lesions = sum(s["scores"][p]["gt_lesions"] for s in seeds.values() for p in patients)
    row["lesion_sensitivity_3d"] = detected / lesions if lesions else float("nan")
    row["dice_3d_smaller_half"] = float(per_patient("dice_3d", [p for p in patients if p in small]).mean())
    row["dice_3d_larger_half"] = float(per_patient("dice_3d", [p for p in patients if p not in small]).mean())
    row["per_patient_dice_3d"] = dict(zip(patients, per_patient("dice_3d").tolist()))
    if base is not None:
        ours, theirs = per_patient("dice_3d"), np.array([base["per_patient_dice_3d"][p] for p in patients])
        gain = paired_difference(ours, theirs)
        row["paired_gain_dice_3d"] = gain
        row["kept"] = bool(gain["ci95"][0] > 0 and gain["mean_difference"] > base["seed_spread"])
    return row


def load_kept(path: Path, bundle: str) -> dict:
    """An earlier recipe.json whose rows are carried over: its first row is the base the new arms pair with."""
    try:
        kept = json.loads(path.read_text())
        rows, base = kept["arms"], kept["arms"][0]
        patients = sorted(base["per_patient_dice_3d"])
        commands = kept.get("earlier_commands", []) + [kept["command"]]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as err:
        raise UserError(f"--keep {path}: not a readable recipe report ({err!r})") from None
    if kept.get("bundle") != bundle:
        raise UserError(f"--keep {path}: a report of bundle {kept.get('bundle')!r}, not {bundle!r}")
    return {"rows": rows, "patients": patients, "commands": commands}


def report(data: Path, base: list[Path] | None, arms: list[tuple[str, list[Path]]], out: Path, bundle: str,
           command: str, keep: Path | None = None) -> dict:
    from metaseg.files import write_bytes_atomic, write_json_atomic

    kept = load_kept(keep, bundle) if keep else None
    recipes = [] if kept else [("base (shipped recipe)", load_recipe("base", base, bundle))]
    recipes += [(label, load_recipe(label, runs, bundle)) for label, runs in arms]
    scored = set.intersection(*[set(s["scores"]) for _, seeds in recipes for s in seeds.values()])
    patients = kept["patients"] if kept else sorted(scored)
    if not patients:
        raise UserError("the runs share no scored patient")
    if not scored >= set(patients):
        raise UserError(f"the runs scored {len(scored & set(patients))} of the kept report's {len(patients)} patients")
    pixels = lesion_pixels(data, patients)
    median = float(np.median(list(pixels.values())))
    small = set(sorted(patients, key=lambda p: (pixels[p], p))[: len(patients) // 2])  # ties split by id
    rows = kept["rows"] if kept else [summary(recipes[0][0], recipes[0][1], patients, None, small)]
    new = recipes if kept else recipes[1:]
    rows = rows + [summary(label, seeds, patients, rows[0], small) for label, seeds in new]
    result = {"command": command, "earlier_commands": kept["commands"] if kept else [], "bundle": bundle,
              "n_patients": len(patients), "view": "flip TTA, threshold 0.5", "lesion_pixels_median": median,
              "arms": rows}
    write_json_atomic(out / "recipe.json", result)
    write_bytes_atomic(out / "recipe.md", markdown(result).encode())
    return result


def markdown(result: dict) -> str:
    def ci(cell: dict, digits: int = 3) -> str:
        return f"{cell['mean']:.{digits}f} [{cell['ci95'][0]:.{digits}f}, {cell['ci95'][1]:.{digits}f}]"

    lines = [f"# Recipe arms: {result['bundle']}", "",
             f"Out of fold, {result['n_patients']} patients, flip TTA and threshold 0.5, no component steps; each patient's "
             "figure is the mean over a recipe's seeds, paired with the base by patient. Kept: the gain's 95% CI is "
             "above 0 and the gain exceeds the base's seed spread. Smaller / larger half: the patients ranked by "
             f"ground-truth lesion pixels (median {result['lesion_pixels_median']:.0f}), split in two. CPU: training minutes "
             f"of one seed's folds, one core each. Produced by `{result['command']}`"
             + "".join(f", carrying the rows of `{c}`" for c in reversed(result["earlier_commands"])) + ".", "",
             "| arm | settings | seeds | per-patient 3D Dice | per seed | gain [95% CI], Wilcoxon p | kept | "
             "lesion-slice Dice | FP slices | lesion-wise Dice | lesion sensitivity | FP lesions per patient | "
             "smaller half | larger half | CPU min |",
             "|" + "---|" * 15]
    for row in result["arms"]:
        settings = ", ".join(f"{k}={json.dumps(v)}" for k, v in row["recipe"].items())
        gain, kept = "—", "—"
        if "paired_gain_dice_3d" in row:
            g = row["paired_gain_dice_3d"]
            p = "n/a" if g["wilcoxon_p"] is None else f"{g['wilcoxon_p']:.2g}"
            gain = f"{g['mean_difference']:+.3f} [{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}], p = {p}"
            kept = "yes" if row["kept"] else "no"
        per_seed = ", ".join(f"{v:.3f}" for v in row["dice_3d_per_seed"].values())
        cells = [row["arm"], f"`{settings}`", ", ".join(map(str, row["seeds"])), ci(row["dice_3d"]), per_seed, gain,
                 kept, f"{row['lesion_slice_dice']['mean']:.3f}", f"{row['fp_slice_rate']['mean']:.3f}",
                 ci(row["lesionwise_dice"]), f"{row['lesion_sensitivity_3d']:.3f}", ci(row["fp_lesions"], 2),
                 f"{row['dice_3d_smaller_half']:.3f}", f"{row['dice_3d_larger_half']:.3f}",
                 f"{row['cpu_minutes_per_cv']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_arm(text: str) -> tuple[str, list[Path]]:
    label, sep, runs = text.partition("=")
    if not sep or not label or not runs:
        raise UserError(f"--arm {text!r}: expected LABEL=RUNS[,RUNS...]")
    return label, [Path(r) for r in runs.split(",")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the Data folder the runs were trained on")
    first = parser.add_mutually_exclusive_group(required=True)
    first.add_argument("--base", type=Path, nargs="+", help="the shipped recipe's runs, one per seed")
    first.add_argument("--keep", type=Path, help="an earlier recipe.json: its rows carried, its base row the base")
    parser.add_argument("--arm", action="append", required=True, help="LABEL=RUNS[,RUNS...], one runs folder per seed")
    parser.add_argument("--bundle", default="unetpp")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    command = relative_paths("python benchmarks/recipe_report.py " + " ".join(sys.argv[1:] if argv is None else argv),
                             REPO)
    result = report(args.data, args.base, [parse_arm(a) for a in args.arm], args.out, args.bundle, command, args.keep)
    print(markdown(result))


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        sys.exit(f"recipe_report: error: {err}")
