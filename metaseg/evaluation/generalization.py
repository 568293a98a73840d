"""What a patient of a site never trained on, and one whose volumes arrive brain-extracted, get from the served model:
the cross-validation report's `skull_stripped` and `site_cv` figures (metaseg.evaluation.cv_report builds them) and
their section of cv.md, beside the patient cross-validation's own figure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from metaseg.evaluation.metrics import paired_difference
from metaseg.evaluation.paired import difference_ci


SITE_REPORTS = "site_cv"  # a site split's reports, under the patient reports' folder (metaseg cv --split site)
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


def site_summary(out: Path, result: dict, n_resamples: int, seed: int) -> dict | None:
    """cv.json's `site_cv`: the leave-one-site-out figure of this report's served bundle (`metaseg cv --split site`,
    its report in OUT/SITE_REPORTS), per site, and the gap to this patient cross-validation on the same patients. The served
    figure (steps chosen on the other sites) where every site is done, else the plain model row (threshold 0.5, no
    TTA) against the same row here; None without a site report or without the bundle in it."""
    file = out / SITE_REPORTS / "cv.json"
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
    return {"bundle": name, "complete": site["complete"], "steps": steps, "report": f"{SITE_REPORTS}/cv.md",
            "n_patients": len(values), "mean_dice_3d": float(np.mean(values)) if values else None,
            "per_site": {s: {"mean_dice_3d": float(np.mean(v)), "n_patients": len(v)} for s, v in sorted(per_site.items())},
            "gap": {"metric": "dice_3d", "difference": "patient CV - site CV, same patients",
                    **paired_difference([ours["dice_3d_per_patient"][p] for p in per_patient],
                                        list(per_patient.values()), n_resamples, seed)}}


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
                     f"{difference_ci(gap)} |")
    if site:
        gap = site["gap"]
        partial = "" if site["complete"] else ", **partial: not every site done**"
        lines.append(f"| leave-one-site-out ({site['bundle']}, [report]({site['report']}){partial}; {site['steps']}) "
                     f"| {site['n_patients']} | {site['mean_dice_3d']:.3f} | {difference_ci(gap)} |")
        lines += ["", "Per site (trained without it): " + "; ".join(
            f"{s} {v['mean_dice_3d']:.3f} ({v['n_patients']} patients)" for s, v in site["per_site"].items()) + "."]
    return lines
