"""The cross-validation's reports over the finished folds of `metaseg cv` (layout in metaseg.training.cv):

    OUT/cv.json, OUT/cv.md             out-of-fold metrics per model over every finished fold (marked partial
                                       until all folds of all bundles are done), lesion-wise ones included
                                       (metaseg.evaluation.metrics), paired comparison, per-fold table; the inference
                                       steps chosen on all these patients (`postprocessing`, `postprocessing_per_model`)
                                       and their in-sample rows (`selected`, DEPLOYED: chosen and scored on the
                                       same patients, optimistic); `served_per_bundle`, per bundle with every fold
                                       done, what it serves estimated cross-fitted (served_entry: each fold scored
                                       with the steps chosen on the others; SERVED rows), and `served`, the best
                                       of them (`served_skipped` says why a bundle has none); the served model on
                                       skull-stripped input and its leave-one-site-out figure (`skull_stripped`,
                                       `site_cv`: metaseg.evaluation.generalization); cv.md says it in tables
                                       (metaseg.evaluation.cv_markdown)
    OUT/cv_postprocessing.json         inference steps chosen on the out-of-fold probabilities
                                       (metaseg.evaluation.selection)
    OUT/cv_folds.png                   per-patient 3D Dice of each fold and model
    OUT/cv_froc.png                    the FROC of each bundle's served entry
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from metaseg.bundles import BUNDLES_DIR
from metaseg.data.datalist import by_patient
from metaseg.data.ground_truth import read_ground_truth
from metaseg.errors import UserError
from metaseg.evaluation.cv_markdown import DEPLOYED, ONE_CHANNEL, SERVED, SERVED_STRIPPED, STRIPPED, markdown
from metaseg.evaluation.figures import folds_figure, froc_figure
from metaseg.evaluation.froc import configured_froc
from metaseg.evaluation.generalization import site_summary, view_figures
from metaseg.evaluation.metrics import paired_difference
from metaseg.evaluation.out_of_fold import SELECTION, done_folds, fold_dir, load_oof
from metaseg.evaluation.reports import CONVENTIONS, null_nan, summarize
from metaseg.evaluation.retention import read_fold
from metaseg.evaluation.selection import Scorer, cross_fitted, score_caps, score_config, select
from metaseg.files import relative_paths, write_bytes_atomic, write_json_atomic
from metaseg.inference.steps import DEFAULT

REPO = BUNDLES_DIR.parent  # reports record paths relative to the checkout (no machine path in a committed report)
SERVED_CHOICE = "highest cross-fitted served mean per-patient 3D Dice"
KEYS = ("folds", "seed", "patients", "models", "command")  # what every reader of a cv.json needs


def read_cv(path: Path) -> dict:
    """A cv.json written by `metaseg cv`, or a UserError saying why it is not one."""
    try:
        run = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read a cv.json at {path}: {err}") from None
    if not isinstance(run, dict) or not all(key in run for key in KEYS):
        raise UserError(f"{path} is not a cv.json written by `metaseg cv` (it needs {', '.join(KEYS)})")
    return run


def lesion_figures(summary: dict) -> dict:
    """The lesion-wise figures of a model as cv.json names them (tools read these keys), with their 95% CIs."""
    mean, ci95, pooled = summary["mean"], summary["ci95"], summary["pooled"]
    return {
        "lesionwise_dice": mean["lesionwise_dice"], "ci95_lesionwise_dice": ci95["lesionwise_dice"],
        "lesionwise_hd95_vox": mean["lesionwise_hd95_vox"], "ci95_lesionwise_hd95_vox": ci95["lesionwise_hd95_vox"],
        "lesion_sensitivity_3d": pooled["lesion_sensitivity_3d"]["value"],
        "ci95_lesion_sensitivity_3d": pooled["lesion_sensitivity_3d"]["ci95"],
        "lesion_precision_3d": pooled["lesion_precision_3d"]["value"],
        "ci95_lesion_precision_3d": pooled["lesion_precision_3d"]["ci95"],
        "fp_lesions_per_patient": mean["fp_lesions"], "ci95_fp_lesions_per_patient": ci95["fp_lesions"],
        "lesion_sensitivity_3d_by_size": pooled["by_size"],
    }


def model_entry(per_patient: list[dict], fold_of: dict, config: dict, n_resamples: int, seed: int) -> dict:
    summary = summarize(per_patient, n_resamples, seed)
    per_fold = {}
    for entry in per_patient:
        per_fold.setdefault(fold_of[entry["patient"]], []).append(entry["dice_3d"])
    return {
        "config": config,
        "n_patients": len(per_patient),
        "dice_3d_per_patient": {e["patient"]: e["dice_3d"] for e in per_patient},
        "mean_dice_3d": summary["mean"]["dice_3d"],
        "ci95_dice_3d": summary["ci95"]["dice_3d"],
        **lesion_figures(summary),
        **summary,
        "per_fold": {str(k): {"mean_dice_3d": float(np.mean(v)), "n_patients": len(v)}
                     for k, v in sorted(per_fold.items())},
        "metric_per_patient": per_patient,
    }


def served_entry(name: str, truth: dict, probs: dict, fold_of: dict, score: Scorer, one_lesion: bool,
                 n_resamples: int, seed: int, caps: dict | None) -> tuple[dict, dict]:
    """What bundle `name` serves, estimated cross-fitted: each patient of `truth` (every fold of the bundle) gets its
    out-of-fold probabilities with the steps chosen for the bundle alone (the server runs one bundle) on the other
    folds' patients (cross_fitted), scored as the model rows are. Returns cv.json's served_per_bundle
    entry and the model row (its `config`: fold -> the configuration chosen without that fold); the entry's
    `inference_steps` are those chosen on all these patients, what ships. `score`: a Scorer of these patients or
    more. `caps`: the bundle's fold models' selection.score_caps."""
    fitted = cross_fitted(truth, probs, [name], fold_of, score, one_lesion, caps)
    chosen = fitted["selections"]
    row = model_entry(fitted["metric_per_patient"], fold_of, {str(k): c["config"] for k, c in chosen.items()},
                      n_resamples, seed)
    shipped = select(truth, probs, [name], score.subset(list(truth)), one_lesion, caps=caps)["inference_steps"]
    entry = {"bundle": name, **{key: row[key] for key in ("mean_dice_3d", "ci95_dice_3d", "dice_3d_per_patient")},
             **{key: row["mean"][key] for key in ("lesion_slice_dice", "fp_slice_rate")},
             **{key: row[key] for key in ("lesionwise_dice", "lesion_sensitivity_3d", "fp_lesions_per_patient",
                                          "n_patients")},
             "inference_steps": shipped, "steps_per_fold": {str(k): c["inference_steps"] for k, c in chosen.items()},
             "froc": configured_froc(truth, probs, {p: chosen[fold_of[p]]["config"] for p in truth}),
             "chosen_by": "inference steps chosen for the bundle alone on the other folds' out-of-fold predictions, "
                          "applied to the held-out fold"}
    return entry, row


def served_skipped(done: list[int], folds: int) -> str | None:
    """Why a bundle has no served entry (None where it has one): each fold's steps are chosen on all the others."""
    if len(done) < folds:
        return f"{len(done)} of {folds} folds done: each fold's steps are chosen on all the other folds"
    if folds < 2:
        return "one fold only: there are no other folds to choose the steps on"
    return None


def report(data: Path, found, runs: Path, out: Path, plan: dict, names: list[str], command: str,
           n_resamples: int = 2000, one_lesion_per_patient: dict[str, bool] | None = None) -> dict:
    """cv.json, cv.md, cv_postprocessing.json and cv_folds.png over every finished fold of `names`.

    `one_lesion_per_patient`: per bundle, whether its configs/inference.json declares its data one lesion per patient
    (only then is keeping the largest lesion a candidate step; for the ensemble, only if every bundle declares it)."""
    declared = {name: bool((one_lesion_per_patient or {}).get(name, False)) for name in names}
    folds, seed = plan["folds"], plan["seed"]
    fold_of = {p: k for k, split in enumerate(plan["splits"]) for p in split["val"]}
    done = {name: done_folds(runs, name, folds) for name in names}
    measured = {name: [read_fold(fold_dir(runs, name, k)) for k in done[name]] for name in names}
    caps = {name: score_caps(m) if None not in m else None for name, m in measured.items()}  # None: a fold lacks it
    covered = {name: [p for k in done[name] for p in plan["splits"][k]["val"]] for name in names}
    all_patients = sorted({p for ps in covered.values() for p in ps})
    result = {
        "complete": all(len(d) == folds for d in done.values()),
        **({"split": "site", "sites": plan["sites"]} if "sites" in plan else {}),
        "folds": folds, "seed": seed, "command": relative_paths(command, REPO), "data": relative_paths(plan["data"], REPO),
        "recipe": plan["recipe"],
        "model_selection": SELECTION,
        "one_lesion_per_patient": declared,
        "conventions": CONVENTIONS,
        "patients": {str(k): split["val"] for k, split in enumerate(plan["splits"])},
        "folds_done": done,
        "models": {},
    }
    if not all_patients:
        return _write(out, result, None)
    items = [asdict(p) for p in found.pairs if p.patient in set(all_patients)]
    _, truth = read_ground_truth(data, found.root, by_patient(items))
    probs: dict[str, dict] = {p: {} for p in all_patients}
    for name in names:
        for k in done[name]:
            for patient, maps in load_oof(fold_dir(runs, name, k), plan["splits"][k]["val"]).items():
                probs[patient][name] = maps
                if "prob_one_channel" in maps:
                    probs[patient][ONE_CHANNEL.format(name=name)] = {"prob": maps["prob_one_channel"]}
                if "prob_skull_stripped" in maps:
                    probs[patient][STRIPPED.format(name=name)] = {"prob": maps["prob_skull_stripped"],
                                                                  "prob_flip": maps["prob_skull_stripped_flip"]}
    for name in names:
        if covered[name]:
            config, scored = {**DEFAULT, "models": [name]}, {p: truth[p] for p in covered[name]}
            per_patient = score_config(scored, probs, config)
            result["models"][name] = model_entry(per_patient, fold_of, config, n_resamples, seed)
            for view, loss in ((ONE_CHANNEL, "one_channel_loss"), (STRIPPED, "skull_stripped_loss")):
                other = view.format(name=name)
                if all(other in probs[p] for p in covered[name]):
                    per_patient = score_config(scored, probs, {**config, "models": [other]})
                    result["models"][other] = model_entry(per_patient, fold_of, {**config, "models": [other]},
                                                          n_resamples, seed)
                    result.setdefault(loss, {})[name] = {
                        "metric": "dice_3d", "difference": f"{name} - {other}",
                        **paired_difference([result["models"][name]["dice_3d_per_patient"][p] for p in covered[name]],
                                            [result["models"][other]["dice_3d_per_patient"][p] for p in covered[name]],
                                            n_resamples, seed)}
    common = sorted(set.intersection(*(set(covered[name]) for name in names)))
    selection = None
    score = Scorer({p: truth[p] for p in all_patients}, probs)  # shared by every selection below
    if common:
        truth_common = {p: truth[p] for p in common}
        every = [m for name in names for m in measured[name]]
        selection = select(truth_common, probs, names, score.subset(common), all(declared.values()),
                           caps=score_caps(every) if None not in every else None)
        selection.update(complete=result["complete"], patients=common, folds=folds, seed=seed, recipe=plan["recipe"])
        per_patient = score_config(truth_common, probs, selection["config"])
        result["models"]["selected"] = model_entry(per_patient, fold_of, selection["config"], n_resamples, seed)
        keys = ("config", "mean_dice_3d", "lesion_sensitivity_3d", "steps", "skipped", "smallest_gt_lesion_voxels",
                "reference_size_cap_voxels", "reference_score_caps", "single_slice", "inference_steps")
        result["postprocessing"] = {k: selection[k] for k in keys}
        # each bundle's own steps, what its configs/inference.json records (the server runs one bundle)
        result["postprocessing_per_model"] = {
            name: {k: v for k, v in select(truth_common, probs, [name], score.subset(common),
                                                       declared[name], caps=caps[name]).items() if k in keys}
            for name in names}
        for name, own in result["postprocessing_per_model"].items():  # as deployed: the bundle with its own steps
            per_patient = score_config(truth_common, probs, own["config"])
            result["models"][DEPLOYED.format(name=name)] = model_entry(per_patient, fold_of, own["config"],
                                                                       n_resamples, seed)
        if len(names) == 2:
            a, b = names
            dice = {n: [result["models"][n]["dice_3d_per_patient"][p] for p in common] for n in names}
            result["paired_test"] = {"metric": "dice_3d", "models": [a, b], "difference": f"{a} - {b}",
                                     **paired_difference(dice[a], dice[b], n_resamples, seed)}
    result["served_per_bundle"], result["served_skipped"] = {}, {}
    for name in names:
        why = served_skipped(done[name], folds)
        if why:
            result["served_skipped"][name] = why
            continue
        scored = {p: truth[p] for p in covered[name]}
        entry, row = served_entry(name, scored, probs, fold_of, score, declared[name], n_resamples, seed, caps[name])
        result["served_per_bundle"][name], result["models"][SERVED.format(name=name)] = entry, row
        stripped = STRIPPED.format(name=name)
        if all(stripped in probs[p] for p in scored):  # the served steps of each fold, on its patients stripped
            view = {p: {name: probs[p][stripped]} for p in scored}
            per_patient = [r for k, config in row["config"].items()
                           for r in score_config({p: gt for p, gt in scored.items() if fold_of[p] == int(k)}, view,
                                                 config)]
            stripped_row = model_entry(per_patient, fold_of, row["config"], n_resamples, seed)
            result["models"][SERVED_STRIPPED.format(name=name)] = stripped_row
            entry["skull_stripped"] = view_figures(stripped_row, row, n_resamples, seed)
    if not result["served_skipped"]:  # every bundle has its served entry: the best of them is served
        best = max(result["served_per_bundle"].values(), key=lambda entry: entry["mean_dice_3d"])
        result["served"] = {**best, "chosen_by": SERVED_CHOICE}
        if "skull_stripped" in best:
            result["skull_stripped"] = {"bundle": best["bundle"], **best["skull_stripped"]}
    site = site_summary(out, result, n_resamples, seed) if "sites" not in plan else None
    if site:
        result["site_cv"] = site
    write_bytes_atomic(out / "cv_folds.png", folds_figure(result))
    if result["served_per_bundle"]:
        write_bytes_atomic(out / "cv_froc.png", froc_figure({name: entry["froc"] for name, entry in
                                                             result["served_per_bundle"].items()}))
    return _write(out, result, selection)


def _write(out: Path, result: dict, selection: dict | None) -> dict:
    if selection is not None:
        write_json_atomic(out / "cv_postprocessing.json", null_nan(selection))
    write_json_atomic(out / "cv.json", null_nan(result))
    write_bytes_atomic(out / "cv.md", markdown(result, out).encode())
    return result
