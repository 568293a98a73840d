"""cv.md: the cross-validation report (metaseg.evaluation.cv_report builds cv.json) in words and tables, and the
names its model rows go by."""

from __future__ import annotations

import json
import math
from pathlib import Path

from metaseg.evaluation.generalization import generalization_lines
from metaseg.evaluation.paired import difference_ci
from metaseg.evaluation.reports import ci_cell, froc_rows, lesion_note, lesion_rows, slice_columns

ONE_CHANNEL = "{name} (one-channel input)"  # the same fold models given FLAIR alone, scored as a model of its own
STRIPPED = "{name} (skull-stripped input)"  # the same fold models given the slices brain-extracted, likewise
DEPLOYED = "{name} + its inference steps"  # the bundle with the steps chosen for it alone on the patients it scores
SERVED = "{name} served (cross-fitted steps)"  # the same, each fold's steps chosen on the other folds (served_entry)
SERVED_STRIPPED = "{name} served, skull-stripped input"  # the served row's steps on the skull-stripped view


def _cap(caps: dict, threshold: float) -> float:
    """A threshold's score cap, from a selection or from its JSON (whose keys are strings)."""
    return caps[threshold] if threshold in caps else caps[str(threshold)]


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
        p = paired["note"] if paired["wilcoxon_p"] is None else f"Wilcoxon signed-rank p = {paired['wilcoxon_p']:.4g}"
        lines += ["", f"Paired per-patient 3D Dice {a} − {b} over {paired['n_patients']} patients: "
                  f"{difference_ci(paired, '95% CI ')}; {p}."]
    for key, what in (("one_channel_loss", "One-channel input (FLAIR alone, as a gray PNG or DICOM upload arrives)"),
                      ("skull_stripped_loss", "Skull-stripped input (everything outside a brain mask from the image "
                                              "set to 0, as brain-extracted volumes arrive)")):
        for name, loss in result.get(key, {}).items():
            lines += ["", f"{what} costs {name} {difference_ci(loss, '95% CI ')} "
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
                  + (f" ({post['reference_size_cap_voxels']} voxels)" if post.get("reference_size_cap_voxels")
                     else "")
                  + ("; minimum lesion scores (and hysteresis seeds) go up to what keeps 99% of the reference "
                     "phantom's lesions that the fold models find there (metaseg.evaluation.retention: at the "
                     f"chosen threshold {post['config']['threshold']}, up to "
                     f"{_cap(post['reference_score_caps'], post['config']['threshold']):.3f})."
                     if post.get("reference_score_caps") else "."),
                  "",
                  "| step | value | 3D Dice without | with | gain | lesion sensitivity without | with | kept |",
                  "|---|---|---|---|---|---|---|---|"]
        for step in post["steps"][1:]:
            kept = "yes" if step["kept"] else f"no ({step['note']})" if "note" in step else "no"
            lines.append(f"| {step['step']} | {step['value']} | {step['mean_dice_3d_without']:.4f} | "
                         f"{step['mean_dice_3d_with']:.4f} | {step['gain']:+.4f} | "
                         f"{_share(step['lesion_sensitivity_3d_without'])} | "
                         f"{_share(step['lesion_sensitivity_3d_with'])} | {kept} |")
        lines += ["", *(f"- {step['step']}: {step['refused']} not tried." for step in post["steps"] if "refused" in step),
                  *(f"- {step} not tried: {why}." for step, why in post["skipped"].items())]
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
