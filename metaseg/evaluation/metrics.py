"""Segmentation metrics of one patient's slice stack, and statistics over patients (numpy in, floats out).

Conventions (nnU-Net's, STYLE.md 3 and 5.6), stated once here and copied into every report:
- masks are boolean stacks `(slices, rows, cols)`; a slice is a *lesion slice* when its ground truth is non-empty;
- an undefined value is NaN (never 0 and never 1 by default) and means over slices or patients skip NaN, so every
  mean says how many values it holds;
- false positives on lesion-free slices are not hidden: they lower the pooled 3D Dice and lesion precision and are
  counted on their own as the FP slice rate.

Lesion-wise metrics follow BraTS-METS 2023 (github.com/rachitsaluja/BraTS-2023-Metrics) on the lesions of
metaseg.inference.lesions (3D components, 26-neighbourhood):
- a ground-truth lesion is *matched* by every predicted component that overlaps it dilated by one voxel (one
  iteration of the 18-neighbourhood, BraTS-MET's dilation factor 1); it is *detected* when it has any match;
- its lesion Dice and HD95 are of the lesion against the union of its matched components; a missed lesion scores
  Dice 0 and HD95 `HD95_MISS` (374, BraTS's penalty), and so does each false-positive component (one matching no
  ground-truth lesion); per patient: the sum over its lesions and false positives over their number, and 1 / 0 when
  it has neither (nothing to find, nothing found);
- as BraTS-MET, ground-truth lesions of at most `UNSCORED_GT_VOXELS` voxels (its 2 mm3 at 1 mm isotropic) are left
  out of every lesion-wise figure (annotation specks), though components matching them are no false positives;
- unlike BraTS, ground-truth lesions whose dilations touch stay two lesions: metaseg.inference.lesions is the one
  definition;
- distances are in voxels (each voxel taken as a unit cube) and sizes bin by voxels
  (metaseg.inference.lesions.size_bin): the development TIFFs carry no spacing;
- detection sensitivity (detected / scored ground-truth lesions) and precision (matched / predicted components) are
  pooled over patients in a report (`pooled`), so a patient with five metastases weighs five times one with one.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, stats

from metaseg.inference.lesions import label, size_bin, size_bins

# 8-connectivity within a slice and none across slices: the 2D components of the per-slice detection figures.
IN_PLANE_8 = np.zeros((3, 3, 3), bool)
IN_PLANE_8[1] = True
MATCH_DILATION = ndimage.generate_binary_structure(3, 2)  # BraTS: ground truth dilated by the 18-neighbourhood ...
MATCH_ITERATIONS = 1  # ... once (BraTS-MET's dilation factor)
HD95_MISS = 374.0  # BraTS's HD95 of a missed lesion or a false-positive component (voxels here)
UNSCORED_GT_VOXELS = 2  # ground-truth lesions this small are not scored (BraTS-MET's lesion volume threshold)
MIN_WILCOXON_PAIRS = 6  # below this a two-sided signed-rank test cannot reach p < 0.05

# per-patient metrics whose report figure is their mean over patients
METRICS = (
    "dice_3d",
    "lesion_slice_dice",
    "lesion_slice_iou",
    "hd95_px",
    "slice_component_sensitivity",
    "slice_component_precision",
    "fp_slice_rate",
    "lesionwise_dice",
    "lesionwise_hd95_vox",
    "fp_lesions",
)
# lesion detection figures pooled over patients: (numerator, denominator) counts of each patient
POOLED = {
    "lesion_sensitivity_3d": ("gt_lesions_detected", "gt_lesions"),
    "lesion_precision_3d": ("pred_lesions_matched", "pred_lesions"),
}


def _counts(gt: np.ndarray, pred: np.ndarray, axes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True positives, false positives and false negatives summed over `axes`."""
    return (
        np.count_nonzero(gt & pred, axis=axes),
        np.count_nonzero(~gt & pred, axis=axes),
        np.count_nonzero(gt & ~pred, axis=axes),
    )


def dice_3d(gt: np.ndarray, pred: np.ndarray) -> float:
    """Dice of all slices pooled (one TP/FP/FN sum per patient): 1.0 when both are empty, 0.0 for any FP on none."""
    tp, fp, fn = _counts(gt, pred, None)
    return 1.0 if tp + fp + fn == 0 else float(2 * tp / (2 * tp + fp + fn))


def slice_dice(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Dice of each slice of a stack; NaN where both masks are empty (nnU-Net's convention)."""
    tp, fp, fn = _counts(gt, pred, (1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tp + fp + fn == 0, np.nan, 2 * tp / (2 * tp + fp + fn))


def lesion_slice_dice_iou(gt: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    """Mean Dice and IoU over the lesion slices only (NaN if there are none), so empty slices cannot inflate them."""
    lesion = gt.any(axis=(1, 2))
    if not lesion.any():
        return np.nan, np.nan
    tp, fp, fn = _counts(gt[lesion], pred[lesion], (1, 2))
    return float(np.mean(2 * tp / (2 * tp + fp + fn))), float(np.mean(tp / (tp + fp + fn)))


def _hd95(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """MONAI's symmetric 95th-percentile Hausdorff distance of each pair of non-empty masks along the first axis,
    with unit spacing (pixels or voxels)."""
    from monai.metrics import compute_hausdorff_distance  # imported here: monai costs seconds to import

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # a deprecation inside MONAI itself
        hd = compute_hausdorff_distance(pred[:, None], gt[:, None], include_background=True, percentile=95)
    return hd.numpy()[:, 0]


def hd95_per_slice(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """95th-percentile symmetric Hausdorff distance (pixels, MONAI) of each lesion slice.

    NaN where the prediction is empty: the distance is undefined there (MONAI would return NaN/inf and warn), and the
    miss is already scored by Dice and sensitivity, so callers count these slices instead of inventing a distance.
    """
    lesion = gt.any(axis=(1, 2))
    gt, pred = gt[lesion], pred[lesion]
    found = pred.any(axis=(1, 2))
    distances = np.full(len(gt), np.nan)
    if found.any():
        distances[found] = _hd95(pred[found], gt[found])
    return distances


def slice_component_detection(gt: np.ndarray, pred: np.ndarray) -> tuple[int, int, int, int]:
    """(GT components, GT components hit, predicted components, predicted components hitting the ground truth).

    Components are 2D and 8-connected per slice (one lesion over five slices counts five); one overlapping pixel
    counts as a hit in either direction. The lesion-wise figures (`lesionwise`) count 3D lesions.
    """
    gt_labels, n_gt = ndimage.label(gt, IN_PLANE_8)
    pred_labels, n_pred = ndimage.label(pred, IN_PLANE_8)
    hit = len(np.unique(gt_labels[pred & gt]))
    true_components = len(np.unique(pred_labels[gt & pred]))
    return n_gt, hit, n_pred, true_components


def fp_slice_rate(gt: np.ndarray, pred: np.ndarray) -> float:
    """Share of lesion-free slices with any predicted pixel (NaN if the patient has no lesion-free slice)."""
    empty = ~gt.any(axis=(1, 2))
    return float(pred[empty].any(axis=(1, 2)).mean()) if empty.any() else np.nan


def _ratio(numerator: int, denominator: int) -> float:
    return float(numerator / denominator) if denominator else np.nan


@dataclass(frozen=True)
class Target:
    """One ground-truth lesion ready for matching: a box around it (padded by the dilation), and within the box its
    voxels and its reach (the lesion dilated: a predicted component touching the reach matches it)."""

    box: tuple[slice, ...]
    lesion: np.ndarray
    reach: np.ndarray
    voxels: int

    @property
    def scored(self) -> bool:
        return self.voxels > UNSCORED_GT_VOXELS


def targets(gt: np.ndarray) -> list[Target]:
    """The ground-truth lesions of a boolean stack (metaseg.inference.lesions.label), in label order."""
    labels, _ = label(gt)
    found = []
    for lesion_id, box in enumerate(ndimage.find_objects(labels), start=1):
        box = tuple(slice(max(s.start - MATCH_ITERATIONS, 0), min(s.stop + MATCH_ITERATIONS, n))
                    for s, n in zip(box, labels.shape))
        lesion = labels[box] == lesion_id
        reach = ndimage.binary_dilation(lesion, MATCH_DILATION, MATCH_ITERATIONS)
        found.append(Target(box, lesion, reach, int(np.count_nonzero(lesion))))
    return found


def matches(target: Target, pred_labels: np.ndarray) -> np.ndarray:
    """The labels of the predicted components that match a ground-truth lesion (any voxel in its reach), sorted."""
    components = np.unique(pred_labels[target.box][target.reach])
    return components[components > 0]


def detected(found: list[Target], pred: np.ndarray) -> int:
    """How many scored ground-truth lesions `pred` detects (any predicted voxel in a lesion's reach)."""
    return sum(bool(pred[t.box][t.reach].any()) for t in found if t.scored)


def _union_box(boxes, shape) -> tuple[slice, ...]:
    """The smallest box holding every box, grown by one voxel (clipped) so that no mask touches its border."""
    return tuple(slice(max(min(b[d].start for b in boxes) - 1, 0), min(max(b[d].stop for b in boxes) + 1, shape[d]))
                 for d in range(len(shape)))


def _lesion_hd95(target: Target, pred_labels: np.ndarray, components: np.ndarray, boxes: list) -> float:
    """HD95 (voxels) of one ground-truth lesion against the union of its matched components, on a crop of both."""
    box = _union_box([target.box, *(boxes[c - 1] for c in components)], pred_labels.shape)
    gt = np.zeros(tuple(s.stop - s.start for s in box), bool)
    gt[tuple(slice(t.start - b.start, t.stop - b.start) for t, b in zip(target.box, box))] = target.lesion
    return float(_hd95(np.isin(pred_labels[box], components)[None], gt[None])[0])


def lesionwise(gt: np.ndarray, pred: np.ndarray) -> dict:
    """BraTS-METS lesion-wise Dice and HD95, 3D detection counts and false-positive lesions of one patient (see the
    module docstring), with the detection of the scored ground-truth lesions per size bin."""
    found = targets(gt)
    pred_labels, n_pred = label(pred)
    sizes = np.bincount(pred_labels.ravel(), minlength=n_pred + 1)
    boxes = ndimage.find_objects(pred_labels)
    by_size = {name: {"lesions": 0, "detected": 0} for name in size_bins(None)}
    matched: set[int] = set()
    dice, hd = [], []
    for target in found:
        components = matches(target, pred_labels)
        matched.update(components.tolist())
        if not target.scored:
            continue
        size = by_size[size_bin(target.voxels, None)]
        size["lesions"] += 1
        size["detected"] += bool(len(components))
        if not len(components):
            dice.append(0.0)
            hd.append(HD95_MISS)
            continue
        dice.append(2 * np.count_nonzero(pred[target.box][target.lesion]) / (target.voxels + sizes[components].sum()))
        hd.append(_lesion_hd95(target, pred_labels, components, boxes))
    fp = n_pred - len(matched)
    scored = len(dice) + fp
    hits = sum(s["detected"] for s in by_size.values())
    return {
        "lesionwise_dice": float(sum(dice) / scored) if scored else 1.0,
        "lesionwise_hd95_vox": float((sum(hd) + fp * HD95_MISS) / scored) if scored else 0.0,
        "lesion_sensitivity_3d": _ratio(hits, len(dice)),
        "lesion_precision_3d": _ratio(len(matched), n_pred),
        "fp_lesions": fp,
        "gt_lesions": len(dice),
        "gt_lesions_detected": hits,
        "gt_lesions_unscored": len(found) - len(dice),
        "pred_lesions": n_pred,
        "pred_lesions_matched": len(matched),
        "gt_lesions_by_size": by_size,
    }


def patient_metrics(gt: np.ndarray, pred: np.ndarray) -> dict:
    """Every metric of one patient's stack (boolean (slices, rows, cols)); NaN where undefined, see module doc."""
    gt, pred = gt.astype(bool), pred.astype(bool)
    dice, iou = lesion_slice_dice_iou(gt, pred)
    hd = hd95_per_slice(gt, pred)
    n_gt, hit, n_pred, true_components = slice_component_detection(gt, pred)
    return {
        "dice_3d": dice_3d(gt, pred),
        "lesion_slice_dice": dice,
        "lesion_slice_iou": iou,
        "hd95_px": float(np.nanmean(hd)) if np.isfinite(hd).any() else np.nan,
        "hd95_empty_prediction_slices": int(np.isnan(hd).sum()),
        "slice_component_sensitivity": _ratio(hit, n_gt),
        "slice_component_precision": _ratio(true_components, n_pred),
        "fp_slice_rate": fp_slice_rate(gt, pred),
        **lesionwise(gt, pred),
        "n_gt_slice_components": n_gt,
        "n_pred_slice_components": n_pred,
        "n_slices": len(gt),
        "n_lesion_slices": int(gt.any(axis=(1, 2)).sum()),
    }


# --- statistics over patients ---


def bootstrap_ci(values, n_resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean over patients (NaN values left out); same seed, same interval."""
    values = np.asarray(values, float)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return np.nan, np.nan
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (n_resamples, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def pooled(per_patient: list[dict], n_resamples: int = 2000, seed: int = 0) -> dict:
    """The detection figures of POOLED over patients (sum of numerators / sum of denominators), each with its 95%
    percentile-bootstrap interval over patients and its counts, and the sensitivity per size bin (`by_size`)."""
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(per_patient), (n_resamples, len(per_patient))) if per_patient else None
    result: dict = {}
    for metric, (numerator, denominator) in POOLED.items():
        top = np.array([p[numerator] for p in per_patient], float)
        bottom = np.array([p[denominator] for p in per_patient], float)
        low = high = np.nan
        if index is not None:
            with np.errstate(invalid="ignore", divide="ignore"):
                ratios = top[index].sum(axis=1) / bottom[index].sum(axis=1)
            if np.isfinite(ratios).any():
                low, high = np.nanpercentile(ratios, [2.5, 97.5])
        result[metric] = {"value": _ratio(top.sum(), bottom.sum()), "ci95": [float(low), float(high)],
                          numerator: int(top.sum()), denominator: int(bottom.sum())}
    bins = {name: [0, 0] for name in size_bins(None)}
    for patient in per_patient:
        for name, counts in patient["gt_lesions_by_size"].items():
            bins[name][0] += counts["lesions"]
            bins[name][1] += counts["detected"]
    result["by_size"] = {name: {"lesions": n, "detected": k, "lesion_sensitivity_3d": _ratio(k, n)}
                         for name, (n, k) in bins.items()}
    return result


def paired_difference(a, b, n_resamples: int = 2000, seed: int = 0) -> dict:
    """Per-patient `a - b`: mean, 95% bootstrap CI and Wilcoxon signed-rank p (None, with a note, when untestable)."""
    diff = np.asarray(a, float) - np.asarray(b, float)
    nonzero = int(np.count_nonzero(diff))
    low, high = bootstrap_ci(diff, n_resamples, seed)
    result = {"n_patients": len(diff), "mean_difference": float(diff.mean()), "ci95": [low, high],
              "wilcoxon_p": None, "note": ""}
    if nonzero == 0:
        result["note"] = "all per-patient differences are zero: the models agree on every patient"
    elif nonzero < MIN_WILCOXON_PAIRS:
        result["note"] = (f"only {nonzero} non-zero differences: a two-sided Wilcoxon signed-rank test needs at least"
                          f" {MIN_WILCOXON_PAIRS} to be able to reach p < 0.05, so none is reported")
    else:
        result["wilcoxon_p"] = float(stats.wilcoxon(diff).pvalue)
    return result
