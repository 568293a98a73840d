"""Run-to-run variance of a cross-validated recipe, and what averaging its runs would give.

Several `metaseg cv` runs of one bundle with other seeds (other folds and training order) hold every patient out of
fold in each run, so each run is an estimate of the same recipe, and the mean of a patient's out-of-fold probabilities
over the runs is an out-of-fold estimate of serving an ensemble of that many models (each trained without the
patient). Scored at argmax (threshold 0.5, no steps), with the bundle's `inference_steps`, and with steps chosen
for each row on the same patients (as `metaseg cv` chooses them: optimistic, alike for every row).

    python scripts/seed_ensemble.py --data ../shared/data/lgg/Data --bundle attention_unet \
        --runs runs/cv_new --runs runs/cv_seed1 --runs runs/cv_seed2 --out reports/cv_seeds

Writes OUT/seed_ensemble.json and OUT/seed_ensemble.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metaseg.bundles import bundle_dir  # noqa: E402
from metaseg.conventions import checked_steps  # noqa: E402
from metaseg.data.datalist import by_patient  # noqa: E402
from metaseg.data.discovery import discover  # noqa: E402
from metaseg.data.ground_truth import read_ground_truth  # noqa: E402
from metaseg.errors import UserError  # noqa: E402
from metaseg.evaluation.metrics import bootstrap_ci, paired_difference  # noqa: E402
from metaseg.evaluation.out_of_fold import done_folds, fold_dir, load_oof  # noqa: E402
from metaseg.evaluation.paired import difference_ci, p_value  # noqa: E402
from metaseg.evaluation.selection import Scorer, dice_per_patient, select  # noqa: E402
from metaseg.files import write_bytes_atomic, write_json_atomic  # noqa: E402
from metaseg.inference.engine import inference_parser  # noqa: E402
from metaseg.inference.steps import DEFAULT, as_float  # noqa: E402

KINDS = {"argmax": "argmax", "steps": "the bundle's steps", "own_steps": "its own steps"}


def run_maps(runs: Path, bundle: str) -> tuple[dict, dict]:
    """(plan, patient -> out-of-fold maps) of one complete `metaseg cv` runs folder for one bundle."""
    try:
        plan = json.loads((runs / "cv_plan.json").read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"no readable cv_plan.json in {runs}: {err}") from None
    if done_folds(runs, bundle, plan["folds"]) != list(range(plan["folds"])):
        raise UserError(f"{runs}: not every fold of {bundle} is done")
    maps = {}
    for k, split in enumerate(plan["splits"]):
        maps.update(load_oof(fold_dir(runs, bundle, k), split["val"]))
    return plan, maps


def summary(dice: dict[str, float]) -> dict:
    values = list(dice.values())
    return {"mean_dice_3d": float(np.mean(values)), "ci95": list(bootstrap_ci(values))}


def markdown(result: dict, command: str) -> str:
    lines = [f"# {result['bundle']}: {len(result['runs'])} cross-validation runs of one recipe, and their mean", "",
             f"Produced by `{command}`.", "",
             f"{result['patients']} patients, each out of fold in every run; mean per-patient 3D Dice [95% bootstrap "
             "CI]. `ensemble` = a patient's out-of-fold probabilities averaged over the runs (each model trained "
             "without the patient). With steps = the bundle's `inference_steps`: "
             f"`{json.dumps(result['steps'])}`.", "",
             "Own steps = the inference steps chosen for that row alone on these patients (`metaseg cv`'s selection: "
             "optimistic, alike for every row).", "",
             "| run | folds, seed | " + " | ".join(KINDS.values()) + " |", "|---|---|" + "---|" * len(KINDS)]
    for row in result["rows"]:
        cells = [f"{row[k]['mean_dice_3d']:.3f} [{row[k]['ci95'][0]:.3f}, {row[k]['ci95'][1]:.3f}]" for k in KINDS]
        lines.append(f"| {row['label']} | {row['plan']} | " + " | ".join(cells) + " |")
    spread = result["spread"]
    lines += ["", "Spread of the single runs' means (max - min): " +
              ", ".join(f"{KINDS[k]} {spread[k]:.3f}" for k in KINDS) + ".", ""]
    for key, paired in result["ensemble_minus_mean_single"].items():
        lines.append(f"Ensemble − mean of the single runs, {KINDS[key]}: {difference_ci(paired, '95% CI ')}, "
                     f"Wilcoxon p = {p_value(paired)}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the data the cross-validations ran on")
    parser.add_argument("--bundle", required=True, help="the bundle whose runs to compare (its inference_steps apply)")
    parser.add_argument("--runs", type=Path, action="append", required=True, help="a `metaseg cv --runs` folder; repeat")
    parser.add_argument("--out", type=Path, required=True, help="folder for seed_ensemble.json and .md")
    args = parser.parse_args(argv)
    try:
        if len(args.runs) < 2:
            raise UserError("give --runs at least twice: the runs to compare and average")
        parser = inference_parser(bundle_dir(args.bundle))
        one_lesion = bool(parser.get("one_lesion_per_patient", False))
        steps = checked_steps(parser.get_parsed_content("inference_steps"), args.bundle, one_lesion)
        plans, maps = {}, {}
        for runs in args.runs:
            label = str(runs)
            plans[label], run = run_maps(runs, args.bundle)
            for patient, patient_maps in run.items():
                maps.setdefault(patient, {})[label] = patient_maps
        labels = list(plans)
        recipes = {json.dumps(plan["recipe"], sort_keys=True) for plan in plans.values()}
        if len(recipes) > 1:
            raise UserError(f"the runs trained different recipes ({', '.join(sorted(recipes))}): this compares runs "
                            "of one recipe (scripts/compare_cv.py compares recipes)")
        patients = sorted(p for p in maps if len(maps[p]) == len(labels))
        if not patients:
            raise UserError("the runs share no patient")
        found = discover(args.data)
        absent = sorted(set(patients) - set(found.patients))
        if absent:
            raise UserError(f"{len(absent)} of the runs' {len(patients)} patients are not in {args.data}: give the "
                            "data the cross-validations ran on")
        items = [asdict(p) for p in found.pairs if p.patient in set(patients)]
        _, truth = read_ground_truth(args.data, found.root, by_patient(items))
    except UserError as err:
        raise SystemExit(f"seed_ensemble: {err}") from None
    for patient in patients:  # the mean of the runs as a model of its own, so that steps can be chosen for it
        per_run = maps[patient]
        per_run["ensemble"] = {key: np.mean([as_float(per_run[label][key]) for label in labels], axis=0)
                               for key in ("prob", "prob_flip")}
    truth = {p: truth[p] for p in patients}
    score = Scorer(truth, maps)
    rows = []
    for name in labels + ["ensemble"]:
        own = select(truth, maps, [name], score, one_lesion)["config"]
        configs = {"argmax": {**DEFAULT, "models": [name]}, "steps": {**steps, "models": [name]},
                   "own_steps": own}
        row = {"label": name, "plan": "mean" if name == "ensemble" else
               f"{plans[name]['folds']} folds, seed {plans[name]['seed']}"}
        for kind, config in configs.items():
            dice = dice_per_patient(truth, maps, config)
            row[kind] = {**summary(dice), "dice_3d_per_patient": dice, "config": config}
        rows.append(row)
    singles = {kind: [np.mean([row[kind]["dice_3d_per_patient"][p] for row in rows[:-1]]) for p in patients]
               for kind in KINDS}
    result = {
        "bundle": args.bundle, "runs": labels, "patients": len(patients), "steps": steps, "rows": rows,
        "spread": {kind: float(np.ptp([row[kind]["mean_dice_3d"] for row in rows[:-1]])) for kind in KINDS},
        "ensemble_minus_mean_single": {kind: paired_difference([rows[-1][kind]["dice_3d_per_patient"][p]
                                                                for p in patients], singles[kind]) for kind in KINDS},
    }
    command = shlex.join(["python", "scripts/seed_ensemble.py", *(sys.argv[1:] if argv is None else argv)])
    write_json_atomic(args.out / "seed_ensemble.json", {"command": command, **result})
    write_bytes_atomic(args.out / "seed_ensemble.md", markdown(result, command).encode())
    print((args.out / "seed_ensemble.md").read_text())


if __name__ == "__main__":
    main()
