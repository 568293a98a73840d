"""Segmentation metrics of one patient's slice stack, and statistics over patients (numpy in, floats out).

Conventions (nnU-Net's, STYLE.md 3 and 5.6), stated once here and copied into every report:
- masks are boolean stacks `(slices, rows, cols)`; a slice is a *lesion slice* when its ground truth is non-empty;
- an undefined value is NaN (never 0 and never 1 by default) and means over slices or patients skip NaN, so every
  mean says how many values it holds;
- false positives on lesion-free slices are not hidden: they lower the pooled 3D Dice and lesion precision and are
  counted on their own as the FP slice rate.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import ndimage, stats

# 8-connectivity within a slice and none across slices: a lesion is a 2D connected component of one slice.
IN_PLANE_8 = np.zeros((3, 3, 3), bool)
IN_PLANE_8[1] = True
MIN_WILCOXON_PAIRS = 6  # below this a two-sided signed-rank test cannot reach p < 0.05

METRICS = (
    "dice_3d",
    "lesion_slice_dice",
    "lesion_slice_iou",
    "hd95_px",
    "lesion_sensitivity",
    "lesion_precision",
    "fp_slice_rate",
)


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


def hd95_per_slice(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """95th-percentile symmetric Hausdorff distance (pixels, MONAI) of each lesion slice.

    NaN where the prediction is empty: the distance is undefined there (MONAI would return NaN/inf and warn), and the
    miss is already scored by Dice and sensitivity, so callers count these slices instead of inventing a distance.
    """
    from monai.metrics import compute_hausdorff_distance  # imported here: monai costs seconds to import

    lesion = gt.any(axis=(1, 2))
    gt, pred = gt[lesion], pred[lesion]
    found = pred.any(axis=(1, 2))
    distances = np.full(len(gt), np.nan)
    if found.any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # a deprecation inside MONAI itself
            hd = compute_hausdorff_distance(pred[found, None], gt[found, None], include_background=True, percentile=95)
        distances[found] = hd.numpy()[:, 0]
    return distances


def lesion_detection(gt: np.ndarray, pred: np.ndarray) -> tuple[int, int, int, int]:
    """(GT lesions, GT lesions hit, predicted components, predicted components hitting a lesion).

    Components are 2D and 8-connected per slice; one overlapping pixel counts as a hit in either direction.
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
    return numerator / denominator if denominator else np.nan


def patient_metrics(gt: np.ndarray, pred: np.ndarray) -> dict:
    """Every metric of one patient's stack (boolean (slices, rows, cols)); NaN where undefined, see module doc."""
    gt, pred = gt.astype(bool), pred.astype(bool)
    dice, iou = lesion_slice_dice_iou(gt, pred)
    hd = hd95_per_slice(gt, pred)
    n_gt, hit, n_pred, true_components = lesion_detection(gt, pred)
    return {
        "dice_3d": dice_3d(gt, pred),
        "lesion_slice_dice": dice,
        "lesion_slice_iou": iou,
        "hd95_px": float(np.nanmean(hd)) if np.isfinite(hd).any() else np.nan,
        "hd95_empty_prediction_slices": int(np.isnan(hd).sum()),
        "lesion_sensitivity": _ratio(hit, n_gt),
        "lesion_precision": _ratio(true_components, n_pred),
        "fp_slice_rate": fp_slice_rate(gt, pred),
        "n_gt_lesions": n_gt,
        "n_pred_components": n_pred,
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
