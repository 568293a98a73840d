"""What every report shares: the conventions it states, the summary of per-patient metrics (means, 95% CIs, pooled
detection), JSON without NaN, and the markdown cells and lesion-wise table of its tables."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from metaseg.evaluation.figures import RANKING
from metaseg.evaluation.froc import FP_RATES, sensitivity_at
from metaseg.evaluation.metrics import HD95_MISS, METRICS, UNSCORED_GT_VOXELS, bootstrap_ci, pooled
from metaseg.inference import lesions

CONVENTIONS = {
    "dice_3d": "all slices of a patient pooled (one TP/FP/FN sum); no lesion and no prediction = 1, no lesion but "
    "any prediction = 0, so false positives on lesion-free slices lower it",
    "lesion_slice_dice": "Dice of each lesion slice (non-empty ground truth), averaged per patient, then over "
    "patients; lesion-free slices are not in it",
    "lesion_slice_iou": "as lesion_slice_dice, with IoU",
    "hd95_px": "95th-percentile Hausdorff distance in pixels (MONAI) of each lesion slice with a non-empty "
    "prediction, averaged per patient; a lesion slice with an empty prediction has no distance: it is left out "
    "and counted in hd95_empty_prediction_slices (its miss shows in Dice and sensitivity)",
    "slice_component_sensitivity": "per slice, not per lesion: ground-truth 2D components (8-connected, each "
    "slice on its own, so one lesion over five slices counts five) touched by any predicted pixel / those components",
    "slice_component_precision": "predicted 2D components (8-connected per slice) touching any ground-truth pixel / "
    "predicted 2D components; undefined (null) for a patient with no predicted component",
    "fp_slice_rate": "lesion-free slices with any predicted pixel / lesion-free slices",
    "lesion": "a 3D connected component (26-neighbourhood) of a patient's mask stack, metaseg/inference/lesions.py; "
    f"ground-truth lesions of at most {UNSCORED_GT_VOXELS} voxels are not scored (BraTS-MET's threshold)",
    "lesion_matching": "a ground-truth lesion is matched by every predicted lesion overlapping it dilated by one voxel "
    "(18-neighbourhood, BraTS-MET); it is detected when it has a match; a predicted lesion matching none is a false "
    "positive (BraTS also merges ground-truth lesions whose dilations touch: here they stay two lesions)",
    "lesionwise_dice": "BraTS-METS 2023: per patient, the Dice of each ground-truth lesion against the union of its "
    "matches (0 if missed), plus a 0 for each false-positive lesion, averaged; 1 with no lesion and no prediction; "
    "then the mean over patients",
    "lesionwise_hd95_vox": f"as lesionwise_dice with the 95th-percentile Hausdorff distance in voxels (unit cubes: "
    f"the TIFFs carry no spacing), {HD95_MISS:g} (BraTS's penalty) for a missed or false-positive lesion, 0 with no "
    "lesion and no prediction",
    "lesion_sensitivity_3d": "detected ground-truth lesions / ground-truth lesions, pooled over all patients' lesions "
    "(a patient with five lesions weighs five); 95% CI: bootstrap over patients; also per size bin of the "
    "ground-truth lesion (voxels: < 100, 100-1000, > 1000)",
    "lesion_precision_3d": "predicted lesions matching a ground-truth lesion / predicted lesions, pooled as "
    "lesion_sensitivity_3d",
    "fp_lesions_per_patient": "predicted lesions matching no ground-truth lesion, mean over patients",
    "froc": "lesion sensitivity (3D, pooled) against false lesions per patient as a threshold on the lesion score "
    "(each predicted lesion's highest probability) sweeps: points {threshold, sensitivity, fp_per_patient}, one per "
    "distinct score, a lesion kept iff its score >= threshold; cpm: mean sensitivity at 1/8, 1/4, 1/2, 1, 2, 4 and 8 "
    "false lesions per patient (the highest reached at no more, 0 if none), metaseg/evaluation/froc.py",
    "means": "over patients with a defined value (null = undefined, e.g. no lesion slice); 95% CI: percentile "
    "bootstrap over patients",
    "qualitative": RANKING,
}


def summarize(per_patient: list[dict], n_resamples: int, seed: int) -> dict:
    """Mean, 95% bootstrap CI and number of defined values of every metric over patients, and the lesion detection
    figures pooled over patients (`pooled`, metaseg.evaluation.metrics.pooled)."""
    summary: dict = {"mean": {}, "ci95": {}, "n": {}}
    for metric in METRICS:
        values = np.array([p[metric] for p in per_patient], float)
        defined = ~np.isnan(values)
        summary["mean"][metric] = float(values[defined].mean()) if defined.any() else math.nan
        summary["ci95"][metric] = list(bootstrap_ci(values, n_resamples, seed))
        summary["n"][metric] = int(defined.sum())
    summary["hd95_empty_prediction_slices"] = sum(p["hd95_empty_prediction_slices"] for p in per_patient)
    summary["pooled"] = pooled(per_patient, n_resamples, seed)
    return summary



def null_nan(obj):
    """JSON has no NaN: undefined values are written as null."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: null_nan(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [null_nan(v) for v in obj]
    return obj


def ci_cell(summary: dict, metric: str, digits: int = 3) -> str:
    """`mean [low, high]` of a metric of `summarize`: its mean over patients, or its pooled figure (POOLED)."""
    if metric in summary["mean"]:
        value, (low, high) = summary["mean"][metric], summary["ci95"][metric]
    else:
        value, (low, high) = summary["pooled"][metric]["value"], summary["pooled"][metric]["ci95"]
    if math.isnan(value):
        return "n/a"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


# the lesion-wise columns of every report table: (metric of `summarize`, header, digits)
LESION_COLUMNS = (
    ("lesionwise_dice", "lesion-wise Dice", 3),
    ("lesionwise_hd95_vox", "lesion-wise HD95 (voxels)", 1),
    ("lesion_sensitivity_3d", "lesion sensitivity (3D, pooled)", 3),
    ("lesion_precision_3d", "lesion precision (3D, pooled)", 3),
    ("fp_lesions", "FP lesions per patient", 2),
)


def slice_columns() -> list[str]:
    """The voxel and per-slice columns of a report table: every metric of METRICS but the lesion-wise ones (a metric
    added there reaches the reports by itself)."""
    lesion_wise = {metric for metric, _, _ in LESION_COLUMNS}
    return [metric for metric in METRICS if metric not in lesion_wise]


def lesion_rows(models: dict) -> list[str]:
    """The lesion-wise table of a report (markdown lines): one row per model summary, with the pooled sensitivity
    per size bin of the ground-truth lesion."""
    bins = next(iter(models.values()))["pooled"]["by_size"] if models else {}
    lines = ["| model | GT lesions | " + " | ".join(header for _, header, _ in LESION_COLUMNS) + " | " +
             " | ".join(f"sensitivity {name}" for name in bins) + " |",
             "|---|---|" + "---|" * (len(LESION_COLUMNS) + len(bins))]
    for name, summary in models.items():
        cells = [ci_cell(summary, m, d) for m, _, d in LESION_COLUMNS]
        cells += [f"{b['detected']}/{b['lesions']}" for b in summary["pooled"]["by_size"].values()]
        lines.append(f"| {name} | {summary['pooled']['lesion_sensitivity_3d']['gt_lesions']} | " + " | ".join(cells)
                     + " |")
    return lines


def lesion_note(folder: Path) -> str:
    """What the lesion-wise columns mean, for a markdown report written in `folder` (it links
    metaseg/inference/lesions.py)."""
    link = os.path.relpath(Path(lesions.__file__).resolve(), Path(folder).resolve()).replace(os.sep, "/")
    return (f"Lesions as BraTS-METS 2023 scores them: a lesion is a 3D connected component "
            f"([metaseg/inference/lesions.py]({link})); a ground-truth lesion is detected when a predicted lesion overlaps it dilated by one voxel, "
            f"scores the Dice and HD95 of it against its matches (0 and {HD95_MISS:g} if missed), and each "
            f"false-positive lesion adds a 0 and a {HD95_MISS:g} to the patient's lesion-wise means; sensitivity and "
            "precision pool all lesions of all patients, the sensitivity per size bin reads detected / ground-truth "
            f"lesions; HD95 in voxels (the TIFFs carry no spacing); ground-truth lesions of at most "
            f"{UNSCORED_GT_VOXELS} voxels are not scored. Conventions in full: `conventions` in the JSON report.")


def froc_rows(curves: dict[str, dict]) -> list[str]:
    """The FROC table of a report (markdown lines): per model (metaseg.evaluation.froc), the lesion sensitivity at
    each false-lesion rate of the CPM and the CPM."""
    lines = ["| model | " + " | ".join(f"sensitivity at {rate:g} FP / patient" for rate in FP_RATES) + " | CPM |",
             "|---|" + "---|" * (len(FP_RATES) + 1)]
    for name, froc in curves.items():
        cells = [f"{sensitivity_at(froc['points'], rate):.3f}" for rate in FP_RATES] + [f"{froc['cpm']:.3f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines
