"""Training recipes compared by patient: the one code path of `benchmarks/gpu_cv.py arms` (two recipes, every metric
paired) and `benchmarks/recipe_report.py` (arms against a base, and the rule that keeps one).

A recipe is one cross-validation runs folder per seed, each scored per patient in one fixed view (`gpu_cv.py score`
writes its scores.json: flip TTA, threshold 0.5, no component steps, so that recipes compare networks, not inference
steps). A recipe's figure for a patient is its mean over the recipe's seeds; two recipes pair by patient."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from metaseg.errors import UserError
from metaseg.evaluation.metrics import bootstrap_ci, paired_difference
from metaseg.evaluation.recipe_markdown import arms_markdown, recipe_markdown
from metaseg.files import write_bytes_atomic, write_json_atomic

METRICS = ("dice_3d", "lesion_slice_dice", "fp_slice_rate", "lesionwise_dice", "fp_lesions")


def read_scores(run: Path) -> dict:
    """A scored runs folder's scores.json: patient -> metrics."""
    try:
        return json.loads((run / "scores.json").read_text())
    except FileNotFoundError:
        raise UserError(f"{run}: no scores.json: train it, then `gpu_cv.py score` it") from None
    except (OSError, ValueError) as err:
        raise UserError(f"{run}: unreadable scores.json ({err!r})") from None


def seed_mean(seeds: list[dict], patients: list[str], metric: str) -> np.ndarray:
    """Each patient's `metric`, averaged over a recipe's seeds (their scores; a seed's NaN left out)."""
    return np.array([np.nanmean([float(scores[p][metric]) for scores in seeds]) for p in patients])


def mean_ci(values: np.ndarray) -> dict:
    """The mean over patients (NaN left out) and its 95% bootstrap CI."""
    return {"mean": float(np.nanmean(values)), "ci95": bootstrap_ci(values)}


def per_seed(seeds: dict, patients: list[str], metric: str) -> dict:
    """Each seed's own mean of `metric` over the patients (seeds: key -> scores)."""
    return {key: float(np.nanmean([scores[p][metric] for p in patients])) for key, scores in seeds.items()}


def common_patients(seeds: list[dict]) -> list[str]:
    """The patients every run scored."""
    return sorted(set.intersection(*[set(scores) for scores in seeds]))


def arms(base: list[Path], new: list[Path], out: Path, command: str) -> dict:
    """Recipe `new` against `base` on every metric, over the patients all their runs scored: OUT/arms.json, arms.md."""
    sides = {"base": {run.name: read_scores(run) for run in base}, "new": {run.name: read_scores(run) for run in new}}
    patients = common_patients([scores for side in sides.values() for scores in side.values()])
    result = {"base": [str(r) for r in base], "new": [str(r) for r in new], "n_patients": len(patients),
              "threshold": 0.5, "metrics": {}}
    for metric in METRICS:
        values = {name: seed_mean(list(side.values()), patients, metric) for name, side in sides.items()}
        result["metrics"][metric] = {
            **{name: {**mean_ci(values[name]), "per_seed": per_seed(side, patients, metric)}
               for name, side in sides.items()},
            "paired_new_minus_base": paired_difference(values["new"], values["base"])}
    write_json_atomic(out / "arms.json", result)
    write_bytes_atomic(out / "arms.md", arms_markdown(result, command).encode())
    return result


def load_recipe(label: str, runs: list[Path], bundle: str) -> dict:
    """A recipe's runs: per seed, its scores, settings and training CPU seconds (every fold trained)."""
    seeds = {}
    for run in runs:
        scores = read_scores(run)
        try:
            plan = json.loads((run / "cv_plan.json").read_text())
            folds = [run / bundle / f"fold_{k}" / "trained.json" for k in range(plan["folds"])]
            if not all(f.is_file() for f in folds):
                raise UserError(f"{run}: not every fold is trained")
            seeds[plan["seed"]] = {"run": str(run), "recipe": plan["recipe"], "scores": scores,
                                   "train_s": sum(json.loads(f.read_text())["seconds"] for f in folds)}
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UserError(f"{run}: unreadable cv_plan.json or trained.json ({err!r})") from None
    if len(seeds) != len(runs):
        raise UserError(f"{label}: two runs of the same seed")
    return seeds


def recipe_row(label: str, seeds: dict, patients: list[str], base: dict | None, small: set[str]) -> dict:
    """A recipe's row of the recipe table; an arm's also pairs its per-patient 3D Dice with the base row's and says
    whether it is kept: the gain's 95% CI above 0 and the gain above the base's seed spread."""
    scores = {seed: s["scores"] for seed, s in seeds.items()}
    dice_per_seed = per_seed(scores, patients, "dice_3d")
    row = {"arm": label, "runs": [s["run"] for s in seeds.values()], "recipe": next(iter(seeds.values()))["recipe"],
           "seeds": sorted(seeds), "dice_3d_per_seed": dice_per_seed,
           "seed_spread": max(dice_per_seed.values()) - min(dice_per_seed.values()),
           "cpu_minutes_per_cv": float(np.mean([s["train_s"] for s in seeds.values()]) / 60)}
    for metric in METRICS:
        row[metric] = mean_ci(seed_mean(list(scores.values()), patients, metric))
    detected = sum(s[p]["gt_lesions_detected"] for s in scores.values() for p in patients)
    lesions = sum(s[p]["gt_lesions"] for s in scores.values() for p in patients)
    row["lesion_sensitivity_3d"] = detected / lesions if lesions else float("nan")
    for half, among in (("smaller", [p for p in patients if p in small]),
                        ("larger", [p for p in patients if p not in small])):
        row[f"dice_3d_{half}_half"] = float(seed_mean(list(scores.values()), among, "dice_3d").mean())
    dice = seed_mean(list(scores.values()), patients, "dice_3d")
    row["per_patient_dice_3d"] = dict(zip(patients, dice.tolist()))
    if base is not None:
        gain = paired_difference(dice, np.array([base["per_patient_dice_3d"][p] for p in patients]))
        row["paired_gain_dice_3d"] = gain
        row["kept"] = bool(gain["ci95"][0] > 0 and gain["mean_difference"] > base["seed_spread"])
    return row


def lesion_pixels(data: Path, patients: list[str]) -> dict[str, int]:
    """Each patient's ground-truth lesion pixels, summed over its slices."""
    from metaseg.data.datalist import by_patient
    from metaseg.data.discovery import discover
    from metaseg.data.ground_truth import read_ground_truth

    found = discover(data)
    items = by_patient([vars(pair) for pair in found.pairs if pair.patient in set(patients)])
    _, truth = read_ground_truth(data, found.root, items)
    return {patient: int(stack.sum()) for patient, stack in truth.items()}


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


def recipe_report(data: Path, base: list[Path] | None, arm_runs: list[tuple[str, list[Path]]], out: Path,
                  bundle: str, command: str, keep: Path | None = None) -> dict:
    """The recipe table, OUT/recipe.json and recipe.md: the base recipe's row (from its runs, or carried with the
    rows of the `keep` report) and each arm's, paired with the base by patient. The lesion-size halves rank the
    patients by ground-truth lesion pixels in `data` (ties by id; the smaller half: the first n // 2)."""
    kept = load_kept(keep, bundle) if keep else None
    recipes = [] if kept else [("base (shipped recipe)", load_recipe("base", base, bundle))]
    recipes += [(label, load_recipe(label, runs, bundle)) for label, runs in arm_runs]
    scored = set(common_patients([s["scores"] for _, seeds in recipes for s in seeds.values()]))
    patients = kept["patients"] if kept else sorted(scored)
    if not patients:
        raise UserError("the runs share no scored patient")
    if not scored >= set(patients):
        raise UserError(f"the runs scored {len(scored & set(patients))} of the kept report's {len(patients)} patients")
    pixels = lesion_pixels(data, patients)
    median = float(np.median(list(pixels.values())))
    small = set(sorted(patients, key=lambda p: (pixels[p], p))[: len(patients) // 2])
    rows = kept["rows"] if kept else [recipe_row(recipes[0][0], recipes[0][1], patients, None, small)]
    new = recipes if kept else recipes[1:]
    rows = rows + [recipe_row(label, seeds, patients, rows[0], small) for label, seeds in new]
    result = {"command": command, "earlier_commands": kept["commands"] if kept else [], "bundle": bundle,
              "n_patients": len(patients), "view": "flip TTA, threshold 0.5", "lesion_pixels_median": median,
              "arms": rows}
    write_json_atomic(out / "recipe.json", result)
    write_bytes_atomic(out / "recipe.md", recipe_markdown(result).encode())
    return result
