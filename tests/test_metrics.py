"""Lesion-wise metrics (metaseg.evaluation.metrics, BraTS-METS 2023) on hand-made volumes with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from monai.metrics import compute_hausdorff_distance

from metaseg.evaluation.metrics import HD95_MISS, lesionwise, patient_metrics, pooled

LESION = (slice(1, 4), slice(2, 8), slice(2, 8))  # 3 x 6 x 6 = 108 voxels
SMALL = (slice(1, 3), slice(20, 24), slice(20, 24))  # 32 voxels, far from LESION


def volume(*boxes, shape=(6, 32, 32)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for box in boxes:
        mask[box] = True
    return mask


def test_a_perfect_prediction_and_an_empty_case():
    gt = volume(LESION, SMALL)
    m = lesionwise(gt, gt)
    assert (m["lesionwise_dice"], m["lesionwise_hd95_vox"], m["lesion_sensitivity_3d"]) == (1.0, 0.0, 1.0)
    assert (m["gt_lesions"], m["pred_lesions"], m["fp_lesions"], m["lesion_precision_3d"]) == (2, 2, 0, 1.0)
    assert m["gt_lesions_by_size"]["<100 voxels"] == {"lesions": 1, "detected": 1}
    assert m["gt_lesions_by_size"]["100-1000 voxels"] == {"lesions": 1, "detected": 1}
    empty = np.zeros_like(gt)
    m = lesionwise(empty, empty)  # nothing to find and nothing found: BraTS's 1 / 0
    assert (m["lesionwise_dice"], m["lesionwise_hd95_vox"], m["fp_lesions"]) == (1.0, 0.0, 0)
    assert np.isnan(m["lesion_sensitivity_3d"]) and np.isnan(m["lesion_precision_3d"])
    m = lesionwise(empty, volume(SMALL))  # a false positive on a patient without lesions
    assert (m["lesionwise_dice"], m["lesionwise_hd95_vox"], m["fp_lesions"]) == (0.0, HD95_MISS, 1)


def test_a_missed_lesion_scores_0_and_the_penalty():
    m = lesionwise(volume(LESION, SMALL), volume(LESION))
    assert m["lesionwise_dice"] == 0.5 and m["lesionwise_hd95_vox"] == HD95_MISS / 2
    assert (m["lesion_sensitivity_3d"], m["gt_lesions_detected"], m["fp_lesions"]) == (0.5, 1, 0)
    assert m["gt_lesions_by_size"]["<100 voxels"] == {"lesions": 1, "detected": 0}


def test_a_false_positive_lesion_adds_a_0_and_the_penalty():
    m = lesionwise(volume(LESION), volume(LESION, SMALL))
    assert m["lesionwise_dice"] == 0.5 and m["lesionwise_hd95_vox"] == HD95_MISS / 2
    assert (m["fp_lesions"], m["pred_lesions"], m["lesion_precision_3d"], m["lesion_sensitivity_3d"]) == (1, 2, 0.5, 1)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # a deprecation inside MONAI itself
def test_a_split_lesion_is_one_lesion_scored_against_both_of_its_pieces():
    gt = volume((slice(1, 3), slice(4, 8), slice(2, 14)))  # one lesion, 2 x 4 x 12 = 96 voxels
    pred = volume((slice(1, 3), slice(4, 8), slice(2, 7)), (slice(1, 3), slice(4, 8), slice(9, 14)))  # 2 x 40, gap 2
    m = lesionwise(gt, pred)
    assert (m["gt_lesions"], m["pred_lesions"], m["fp_lesions"], m["lesion_sensitivity_3d"]) == (1, 2, 0, 1.0)
    assert m["lesionwise_dice"] == pytest.approx(2 * 80 / (96 + 80))  # against the union of both pieces
    whole = compute_hausdorff_distance(pred[None, None], gt[None, None], include_background=True, percentile=95)
    assert m["lesionwise_hd95_vox"] == pytest.approx(float(whole)) and 0 < m["lesionwise_hd95_vox"] <= 1.5


def test_hd95_is_in_voxels_in_3d_and_a_lesion_is_one_3d_component():
    gt = volume((slice(0, 5), slice(4, 12), slice(4, 12)))  # one lesion over five slices
    shifted = volume((slice(0, 5), slice(4, 12), slice(7, 15)))  # moved by 3 columns
    assert lesionwise(gt, shifted)["lesionwise_hd95_vox"] == pytest.approx(3.0)
    one_slice = volume((slice(2, 3), slice(4, 12), slice(4, 12)))
    m = patient_metrics(gt, one_slice)
    assert m["gt_lesions"] == 1 and m["lesion_sensitivity_3d"] == 1.0  # one lesion, found
    assert m["slice_component_sensitivity"] == pytest.approx(1 / 5)  # the per-slice figure counts five


def test_matching_reaches_one_voxel_around_a_lesion_and_tiny_labels_are_not_scored():
    gt = volume(LESION)
    touching = volume((slice(1, 4), slice(2, 8), slice(8, 10)))  # beside it, no overlap: in the dilated lesion
    m = lesionwise(gt, touching)
    assert (m["lesion_sensitivity_3d"], m["fp_lesions"], m["lesionwise_dice"]) == (1.0, 0, 0.0)  # found, Dice 0
    beyond = volume((slice(1, 4), slice(2, 8), slice(9, 11)))  # a one-voxel gap: a miss and a false positive
    m = lesionwise(gt, beyond)
    assert (m["lesion_sensitivity_3d"], m["fp_lesions"], m["lesionwise_dice"]) == (0.0, 1, 0.0)
    speck = gt.copy()
    speck[5, 30, 30] = True  # a one-voxel label: left out, as BraTS-MET leaves out lesions of <= 2 voxels
    m = lesionwise(speck, gt)
    assert (m["gt_lesions"], m["gt_lesions_unscored"], m["lesionwise_dice"]) == (1, 1, 1.0)
    m = lesionwise(speck, speck)  # and predicting it is no false positive
    assert (m["fp_lesions"], m["pred_lesions"], m["lesionwise_dice"]) == (0, 2, 1.0)


def test_detection_pools_every_lesion_of_every_patient():
    """Patient A: 1 of 3 lesions found; patient B: its 1 lesion. Pooled 2 of 4, not the mean of 1/3 and 1."""
    a = patient_metrics(volume(LESION, SMALL, (slice(4, 6), slice(20, 30), slice(2, 12))), volume(SMALL))
    b = patient_metrics(volume(LESION), volume(LESION))
    figures = pooled([a, b], n_resamples=200, seed=0)
    sensitivity = figures["lesion_sensitivity_3d"]
    assert (sensitivity["value"], sensitivity["gt_lesions_detected"], sensitivity["gt_lesions"]) == (0.5, 2, 4)
    assert sensitivity["ci95"][0] <= 0.5 <= sensitivity["ci95"][1]
    assert pooled([a, b], 200, 0) == figures  # same seed, same interval
    assert figures["lesion_precision_3d"]["value"] == 1.0
    assert figures["by_size"]["<100 voxels"] == {"lesions": 1, "detected": 1, "lesion_sensitivity_3d": 1.0}
    assert figures["by_size"]["100-1000 voxels"] == {"lesions": 3, "detected": 1, "lesion_sensitivity_3d": 1 / 3}
    assert np.isnan(figures["by_size"][">1000 voxels"]["lesion_sensitivity_3d"])
    assert np.isnan(pooled([], 10)["lesion_sensitivity_3d"]["value"])
