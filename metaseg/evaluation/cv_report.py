"""The cross-validation's reports over the finished folds of `metaseg cv` (layout in metaseg.training.cv):

    OUT/cv.json, OUT/cv.md             out-of-fold metrics per model over every finished fold (marked partial
                                       until all folds of all bundles are done), lesion-wise ones included
                                       (metaseg.evaluation.metrics), paired comparison, per-fold table; the inference
                                       steps chosen on all these patients (`postprocessing`, `postprocessing_per_model`)
                                       and their in-sample rows (`selected`, DEPLOYED: chosen and scored on the
                                       same patients, optimistic); `served_per_bundle`, per bundle with every fold
                                       done, what it serves estimated cross-fitted (served_entry: each fold scored
                                       with the steps chosen on the others; SERVED rows), and `served`, the best
                                       of them (`served_skipped` says why a bundle has none)
    OUT/cv_postprocessing.json         inference steps chosen on the out-of-fold probabilities
                                       (metaseg.evaluation.selection)
    OUT/cv_folds.png                   per-patient 3D Dice of each fold and model
    OUT/cv_froc.png                    the FROC of each bundle's served entry
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np

from metaseg.data.datalist import by_patient
from metaseg.data.ground_truth import read_ground_truth
from metaseg.errors import UserError
from metaseg.evaluation.figures import folds_figure, froc_figure
from metaseg.evaluation.froc import configured_froc
from metaseg.evaluation.metrics import paired_difference
from metaseg.evaluation.out_of_fold import SELECTION, done_folds, fold_dir, load_oof
from metaseg.evaluation.reports import (CONVENTIONS, ci_cell, froc_rows, lesion_note, lesion_rows, null_nan,
                                        slice_columns, summarize)
from metaseg.evaluation.selection import Scorer, cross_fitted, score_config, select
from metaseg.files import write_bytes_atomic, write_json_atomic
from metaseg.inference.steps import DEFAULT

ONE_CHANNEL = "{name} (one-channel input)"  # the same fold models given FLAIR alone, scored as a model of its own
STRIPPED = "{name} (skull-stripped input)"  # the same fold models given the slices brain-extracted, likewise
DEPLOYED = "{name} + its inference steps"  # the bundle with the steps chosen for it alone on the patients it scores
SERVED = "{name} served (cross-fitted steps)"  # the same, each fold's steps chosen on the other folds (served_entry)
SERVED_STRIPPED = "{name} served, skull-stripped input"  # the served row's steps on the skull-stripped view
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
                 n_resamples: int, seed: int) -> tuple[dict, dict]:
    """What bundle `name` serves, estimated cross-fitted: each patient of `truth` (every fold of the bundle) gets its
    out-of-fold probabilities with the steps chosen for the bundle alone (the server runs one bundle) on the other
    folds' patients (cross_fitted), scored as the model rows are. Returns cv.json's served_per_bundle
    entry and the model row (its `config`: fold -> the configuration chosen without that fold); the entry's
    `inference_steps` are those chosen on all these patients, what ships. `score`: a Scorer of these patients or
    more."""
    fitted = cross_fitted(truth, probs, [name], fold_of, score, one_lesion)
    chosen = fitted["selections"]
    row = model_entry(fitted["metric_per_patient"], fold_of, {str(k): c["config"] for k, c in chosen.items()},
                      n_resamples, seed)
    shipped = select(truth, probs, [name], score.subset(list(truth)), one_lesion)["inference_steps"]
    entry = {"bundle": name, **{key: row[key] for key in ("mean_dice_3d", "ci95_dice_3d", "dice_3d_per_patient")},
             **{key: row["mean"][key] for key in ("lesion_slice_dice", "fp_slice_rate")},
             **{key: row[key] for key in ("lesionwise_dice", "lesion_sensitivity_3d", "fp_lesions_per_patient",
                                          "n_patients")},
             "inference_steps": shipped, "steps_per_fold": {str(k): c["inference_steps"] for k, c in chosen.items()},
             "froc": configured_froc(truth, probs, {p: chosen[fold_of[p]]["config"] for p in truth}),
             "chosen_by": "inference steps chosen for the bundle alone on the other folds' out-of-fold predictions, "
                          "applied to the held-out fold"}
    return entry, row


VIEW_KEYS = ("mean_dice_3d", "ci95_dice_3d", "lesionwise_dice", "lesion_sensitivity_3d", "fp_lesions_per_patient",
             "n_patients")


def view_figures(view: dict, base: dict, n_resamples: int, seed: int) -> dict:
    """A view's figures (another input to the same models, the same steps) and what it costs against `base`, per
    patient paired."""
    patients = list(view["dice_3d_per_patient"])
    return {**{key: view[key] for key in VIEW_KEYS}, "dice_3d_per_patient": view["dice_3d_per_patient"],
            **{key: view["mean"][key] for key in ("lesion_slice_dice", "fp_slice_rate")},
            "loss": {"metric": "dice_3d", "difference": "as uploaded - this view",
                     **paired_difference([base["dice_3d_per_patient"][p] for p in patients],
                                         [view["dice_3d_per_patient"][p] for p in patients], n_resamples, seed)}}


def site_summary(file: Path, result: dict, n_resamples: int, seed: int) -> dict | None:
    """cv.json's `site_cv`: the leave-one-site-out figure of this report's served bundle (`metaseg cv --split site`,
    its report in `file`), per site, and the gap to this patient cross-validation on the same patients. The served
    figure (steps chosen on the other sites) where every site is done, else the plain model row (threshold 0.5, no
    TTA) against the same row here; None without a site report or without the bundle in it."""
    if not file.is_file():
        return None
    site = json.loads(file.read_text())
    served = result.get("served", {}).get("bundle")
    name = served if served in site.get("models", {}) else next(iter(site.get("models", {})), None)
    if name is None or name not in result["models"]:
        return None
    if name in site.get("served_per_bundle", {}) and name in result.get("served_per_bundle", {}):
        steps, theirs, ours = ("served: each site scored with the steps chosen on the other sites",
                               site["served_per_bundle"][name], result["served_per_bundle"][name])
    else:
        steps, theirs, ours = ("threshold 0.5, no TTA (not every site done: no served figure yet)",
                               site["models"][name], result["models"][name])
    per_patient = {p: d for p, d in theirs["dice_3d_per_patient"].items() if p in ours["dice_3d_per_patient"]}
    sites = dict(zip(map(str, range(len(site["sites"]))), site["sites"]))
    fold_of = {p: sites[k] for k, ids in site["patients"].items() for p in ids}
    per_site = {}
    for patient, dice in per_patient.items():
        per_site.setdefault(fold_of[patient], []).append(dice)
    values = [d for d in per_patient.values() if d is not None]
    return {"bundle": name, "complete": site["complete"], "steps": steps, "report": "site_cv/cv.md",
            "n_patients": len(values), "mean_dice_3d": float(np.mean(values)) if values else None,
            "per_site": {s: {"mean_dice_3d": float(np.mean(v)), "n_patients": len(v)} for s, v in sorted(per_site.items())},
            "gap": {"metric": "dice_3d", "difference": "patient CV - site CV, same patients",
                    **paired_difference([ours["dice_3d_per_patient"][p] for p in per_patient],
                                        list(per_patient.values()), n_resamples, seed)}}


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
    covered = {name: [p for k in done[name] for p in plan["splits"][k]["val"]] for name in names}
    all_patients = sorted({p for ps in covered.values() for p in ps})
    result = {
        "complete": all(len(d) == folds for d in done.values()),
        **({"split": "site", "sites": plan["sites"]} if "sites" in plan else {}),
        "folds": folds, "seed": seed, "command": command, "data": plan["data"], "recipe": plan["recipe"],
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
        selection = select(truth_common, probs, names, score.subset(common), all(declared.values()))
        selection.update(complete=result["complete"], patients=common, folds=folds, seed=seed, recipe=plan["recipe"])
        per_patient = score_config(truth_common, probs, selection["config"])
        result["models"]["selected"] = model_entry(per_patient, fold_of, selection["config"], n_resamples, seed)
        keys = ("config", "mean_dice_3d", "lesion_sensitivity_3d", "steps", "skipped", "smallest_gt_lesion_voxels",
                "reference_size_cap_voxels", "single_slice", "inference_steps")
        result["postprocessing"] = {k: selection[k] for k in keys}
        # each bundle's own steps, what its configs/inference.json records (the server runs one bundle)
        result["postprocessing_per_model"] = {
            name: {k: v for k, v in select(truth_common, probs, [name], score.subset(common),
                                                       declared[name]).items() if k in keys}
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
        entry, row = served_entry(name, scored, probs, fold_of, score, declared[name], n_resamples, seed)
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
    site = site_summary(out / "site_cv" / "cv.json", result, n_resamples, seed) if "sites" not in plan else None
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



def _share(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def _steps(steps: dict) -> str:
    """A bundle's inference_steps in words."""
    words = [*(["flip TTA"] if steps["flip_tta"] else []), f"threshold {steps['threshold']}",
             *([f"min {steps['min_lesion_voxels']} voxels"] if steps["min_lesion_voxels"] else []),
             *([f"min {steps['min_lesion_mm3']} mm3"] if steps["min_lesion_mm3"] else []),
             *([f"min score {steps['min_lesion_score']}"] if steps.get("min_lesion_score") else []),
             *(["largest component"] if steps["largest_component"] else [])]
    return ", ".join(words)


def served_lines(result: dict) -> list[str]:
    """cv.md's section on the served model: the cross-fitted figures of each bundle and the bundle served."""
    per_bundle, skipped = result.get("served_per_bundle", {}), result.get("served_skipped", {})
    if not per_bundle and not skipped:
        return []
    lines = ["", "## Served model, cross-fitted", "",
             "What a bundle serves, estimated without choosing on the patients scored: for each fold, the bundle's "
             "inference steps are chosen (as above, for the bundle alone: the server runs one bundle) on the other "
             "folds' out-of-fold predictions and applied to the held-out fold's. The figures are of the fold models, "
             "the parts of the shipped fold ensemble, each on the patients it never trained on (as nnU-Net reports "
             "its cross-validation); the ensemble itself has no out-of-fold patients. The steps that ship "
             "(configs/inference.json) are those chosen on all patients, the in-sample ones above.", ""]
    if per_bundle:
        lines += ["| bundle | patients | `dice_3d` | lesion-wise Dice | lesion sensitivity (3D) | FP lesions / patient "
                  "| steps shipped (all patients) | " + " | ".join(f"steps without fold {k}" for k in
                                                                  range(result["folds"])) + " |",
                  "|---|---|---|---|---|---|---|" + "---|" * result["folds"]]
        for name, entry in per_bundle.items():
            row = result["models"][SERVED.format(name=name)]
            cells = [ci_cell(row, metric) for metric in ("dice_3d", "lesionwise_dice", "lesion_sensitivity_3d",
                                                         "fp_lesions")]
            steps = [_steps(entry["steps_per_fold"][str(k)]) for k in range(result["folds"])]
            lines.append(f"| {name} | {entry['n_patients']} | " + " | ".join(cells) + f" | "
                         f"{_steps(entry['inference_steps'])} | " + " | ".join(steps) + " |")
    lines += [f"- {name}: no served figures: {why}." for name, why in skipped.items()]
    served = result.get("served")
    if served:
        lines += ["", f"Served: **{served['bundle']}** ({served['chosen_by']}, {served['mean_dice_3d']:.3f}). "
                  "Choosing between the bundles on these same patients leaves a small optimism in the served "
                  "bundle's figure; the steps within each bundle carry none."]
    return lines


def generalization_lines(result: dict) -> list[str]:
    """cv.md's section on what a patient of a new site, and one whose volumes arrive brain-extracted, get from the
    served model, beside this cross-validation's figure."""
    stripped, site = result.get("skull_stripped"), result.get("site_cv")
    if not stripped and not site:
        return []
    served = result["served"]
    lines = ["", "## New sites and brain-extracted input (served model)", "",
             "| estimate | patients | per-patient 3D Dice | gap to this CV, same patients [95% CI] |", "|---|---|---|---|",
             f"| this cross-validation, {served['bundle']} served | {served['n_patients']} | "
             f"{served['mean_dice_3d']:.3f} | |"]
    if stripped:
        gap = stripped["loss"]
        lines.append(f"| skull-stripped view (each held-out slice brain-extracted, brain mask from the image; same "
                     f"models and steps) | {stripped['n_patients']} | {stripped['mean_dice_3d']:.3f} | "
                     f"{gap['mean_difference']:+.3f} [{gap['ci95'][0]:+.3f}, {gap['ci95'][1]:+.3f}] |")
    if site:
        gap = site["gap"]
        partial = "" if site["complete"] else ", **partial: not every site done**"
        lines.append(f"| leave-one-site-out ({site['bundle']}, [report]({site['report']}){partial}; {site['steps']}) "
                     f"| {site['n_patients']} | {site['mean_dice_3d']:.3f} | {gap['mean_difference']:+.3f} "
                     f"[{gap['ci95'][0]:+.3f}, {gap['ci95'][1]:+.3f}] |")
        lines += ["", "Per site (trained without it): " + "; ".join(
            f"{s} {v['mean_dice_3d']:.3f} ({v['n_patients']} patients)" for s, v in site["per_site"].items()) + "."]
    return lines


def froc_lines(result: dict) -> list[str]:
    """cv.md's FROC of each bundle's served entry (cross-fitted, as its row in the section above)."""
    per_bundle = result.get("served_per_bundle", {})
    if not per_bundle:
        return []
    return ["", "## Lesion detection: FROC of the served model, cross-fitted", "",
            "Lesion sensitivity (3D, pooled) against false lesions per patient as a threshold on each predicted "
            "lesion's highest probability sweeps over the served masks' lesions; CPM = mean sensitivity at the "
            "seven rates (`served.froc` in cv.json).", "",
            *froc_rows({name: entry["froc"] for name, entry in per_bundle.items()}), "", "![FROC](cv_froc.png)"]


def labelled(result: dict) -> dict:
    """The model rows by the names the reports show: the rows with steps chosen on the patients they score marked
    (in-sample)."""
    in_sample = {"selected", *(DEPLOYED.format(name=name) for name in result["folds_done"])}
    return {f"{name} (in-sample)" if name in in_sample else name: entry for name, entry in result["models"].items()}


def markdown(result: dict, out: Path = Path("reports")) -> str:
    folds, models = result["folds"], labelled(result)
    n_done = {name: len(d) for name, d in result["folds_done"].items()}
    status = ("All folds done." if result["complete"] else
              "**PARTIAL: not every fold is done** (" + ", ".join(f"{n}: {d} of {folds} folds" for n, d in
                                                              n_done.items()) + "); every number below covers only "
              "the patients of finished folds and will change.")
    recipe = ", ".join(f"{k} {v}" for k, v in result["recipe"].items())
    sites = result.get("sites")
    title = (f"Leave-one-site-out cross-validation ({folds} sites: {', '.join(sites)})" if sites else
             f"Patient {folds}-fold cross-validation (seed {result['seed']})")
    lines = [f"# {title}", "", status, "",
             f"Produced by `{result['command']}`. Recipe: {recipe}. Model per fold: {result['model_selection']}.",
             "Every cell: mean over patients [95% bootstrap CI over patients]; 3D Dice pools all slices of a "
             "patient (false positives on lesion-free slices lower it).", ""]
    if models:
        columns = [m for m in slice_columns() if m != "lesion_slice_iou"]
        lines += ["| model | patients | " + " | ".join(f"`{m}`" for m in columns) + " |",
                  "|---|---|" + "---|" * len(columns)]
        for name, entry in models.items():
            cells = [ci_cell(entry, m, 2 if m.startswith("hd95") else 3) for m in columns]
            lines.append(f"| {name} | {entry['n_patients']} | " + " | ".join(cells) + " |")
        lines += ["", "Lesions (3D), per model:", "", *lesion_rows(models), "", lesion_note(out)]
        lines += ["", "`selected` = the inference steps chosen below on the same out-of-fold predictions, "
                  "`+ its inference steps` = those chosen for one bundle alone, as it is served: **in-sample, "
                  "optimistic** figures (steps chosen and scored on the same patients, as nnU-Net's "
                  "find_best_configuration). `served (cross-fitted steps)` = each fold scored with the steps chosen "
                  "on the other folds, the honest estimate of what a bundle serves (Served model, cross-fitted, "
                  "below)."]
    paired = result.get("paired_test")
    if paired:
        a, b = paired["models"]
        low, high = paired["ci95"]
        p = paired["note"] if paired["wilcoxon_p"] is None else f"Wilcoxon signed-rank p = {paired['wilcoxon_p']:.4g}"
        lines += ["", f"Paired per-patient 3D Dice {a} − {b} over {paired['n_patients']} patients: "
                  f"{paired['mean_difference']:+.3f} [95% CI {low:+.3f}, {high:+.3f}]; {p}."]
    for key, what in (("one_channel_loss", "One-channel input (FLAIR alone, as a gray PNG or DICOM upload arrives)"),
                      ("skull_stripped_loss", "Skull-stripped input (everything outside a brain mask from the image "
                                              "set to 0, as brain-extracted volumes arrive)")):
        for name, loss in result.get(key, {}).items():
            low, high = loss["ci95"]
            lines += ["", f"{what} costs {name} {loss['mean_difference']:+.3f} [95% CI {low:+.3f}, {high:+.3f}] "
                      f"per-patient 3D Dice ({loss['difference']}, {loss['n_patients']} patients)."]
    post = result.get("postprocessing")
    if post:
        lines += ["", "## Inference steps chosen on out-of-fold probabilities", "",
                  "Tried in this order; a step is kept only if it raises the mean per-patient 3D Dice and finds "
                  "no fewer lesions (3D lesion sensitivity pooled over these patients, as in the lesion table); the "
                  "threshold, the minimum size and the minimum lesion score (alone, and as the seed of hysteresis "
                  "over a lower threshold) are chosen among the values that lose no lesion, and minimum "
                  "sizes go up to the smallest ground-truth lesion of these patients"
                  + (f" ({post['smallest_gt_lesion_voxels']} voxels)" if post["smallest_gt_lesion_voxels"] else "")
                  + " and to what keeps 99% of the reference phantom's metastases"
                  + (f" ({post['reference_size_cap_voxels']} voxels)." if post.get("reference_size_cap_voxels")
                     else "."),
                  "",
                  "| step | value | 3D Dice without | with | gain | lesion sensitivity without | with | kept |",
                  "|---|---|---|---|---|---|---|---|"]
        for step in post["steps"][1:]:
            kept = "yes" if step["kept"] else f"no ({step['note']})" if "note" in step else "no"
            lines.append(f"| {step['step']} | {step['value']} | {step['mean_dice_3d_without']:.4f} | "
                         f"{step['mean_dice_3d_with']:.4f} | {step['gain']:+.4f} | "
                         f"{_share(step['lesion_sensitivity_3d_without'])} | "
                         f"{_share(step['lesion_sensitivity_3d_with'])} | {kept} |")
        lines += ["", *(f"- {step} not tried: {why}." for step, why in post["skipped"].items())]
        base = post["steps"][0]
        lines += ["", f"Start: {base['value']} ({base['note']}, {base['mean_dice_3d']:.4f}). Chosen: "
                  f"`{json.dumps(post['config'])}` ({post['mean_dice_3d']:.4f}, lesion sensitivity "
                  f"{_share(post['lesion_sensitivity_3d'])}); also in cv_postprocessing.json.",
                  "", "Each bundle alone (what its configs/inference.json `inference_steps` records):", ""]
        lines += [f"- {name}: `{json.dumps(own['inference_steps'])}`, mean per-patient 3D Dice "
                  f"{own['steps'][0]['mean_dice_3d']:.4f} -> {own['mean_dice_3d']:.4f}, lesion sensitivity "
                  f"{_share(own['steps'][0]['lesion_sensitivity_3d'])} -> {_share(own['lesion_sensitivity_3d'])}"
                  for name, own in result.get("postprocessing_per_model", {}).items()]
        lines += ["",
                  f"A single uploaded 2D slice gets `{json.dumps(post['single_slice'])}`: the component steps were "
                  "chosen on 3D components of a patient's stack and are not applied to one slice. The ensemble, if "
                  "chosen, is reported but not deployed: a bundle holds one network."]
    lines += served_lines(result) + froc_lines(result) + generalization_lines(result)
    if models:
        lines += ["", "## Per fold: mean per-patient 3D Dice (patients)", "",
                  "| model | " + " | ".join(f"site {sites[k]}" if sites else f"fold {k}" for k in range(folds)) + " |",
                  "|---|" + "---|" * folds]
        for name, entry in models.items():
            cells = [f"{f['mean_dice_3d']:.3f} ({f['n_patients']})" if (f := entry["per_fold"].get(str(k))) else "—"
                     for k in range(folds)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", "![per-fold per-patient Dice](cv_folds.png)"]
    lines += ["", "Patients per fold (split by patient over sorted ids, seeded):", ""]
    lines += [f"- fold {k} ({len(ids)}): {', '.join(ids)}" for k, ids in result["patients"].items()]
    return "\n".join(lines) + "\n"



def summary_lines(result: dict) -> list[str]:
    lines = []
    for name, entry in labelled(result).items():
        low, high = entry["ci95_dice_3d"]
        mean = entry["mean_dice_3d"]
        lines.append(f"{name}: out-of-fold per-patient 3D Dice {mean:.3f} [{low:.3f}, {high:.3f}] over "
                     f"{entry['n_patients']} patients" if mean is not None and not math.isnan(mean) else name)
    if result.get("served"):
        lines.append(f"served: {result['served']['bundle']} ({result['served']['chosen_by']})")
    return lines
