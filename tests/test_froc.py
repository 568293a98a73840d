"""FROC of lesion detection (metaseg.evaluation.froc) on hand-made volumes whose lesions, candidates and scores are
known, so every point and the CPM are computed by hand; and the lesion score it sweeps."""

from __future__ import annotations

import numpy as np
import pytest

from metaseg.evaluation.figures import froc_figure
from metaseg.evaluation.froc import froc, patient_candidates
from metaseg.evaluation.reports import froc_rows
from metaseg.inference import lesions

SHAPE = (4, 16, 16)


def candidate(pred: np.ndarray, prob: np.ndarray, where: tuple, score: float) -> None:
    """A predicted lesion at `where` whose highest probability is `score` (its other voxels lower)."""
    pred[where] = True
    prob[where] = score / 2
    prob[tuple(np.argwhere(pred & (prob == score / 2))[0])] = score


def two_patients() -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """3 scored ground-truth lesions, 4 candidates: 0.9 hits lesion 1 beside it (one voxel away, in its reach),
    0.3 lies two voxels from lesion 2 (a false lesion; lesion 2 is missed), 0.8 is false, 0.6 overlaps lesion 3."""
    cases = []
    for placed in ([((1, slice(2, 5), slice(2, 5)), ((1, slice(5, 7), slice(2, 5)), 0.9)),
                    ((2, slice(10, 13), slice(10, 13)), ((2, slice(10, 13), slice(14, 16)), 0.3))],
                   [((0, slice(5, 8), slice(5, 8)), ((0, slice(6, 9), slice(6, 9)), 0.6)),
                    (None, ((3, slice(12, 14), slice(1, 3)), 0.8))]):
        gt, pred, prob = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool), np.zeros(SHAPE, np.float32)
        for lesion, (where, score) in placed:
            if lesion is not None:
                gt[lesion] = True
            candidate(pred, prob, where, score)
        cases.append((gt, prob, pred))
    return cases


def test_froc_points_and_cpm_of_two_patients_are_the_hand_computed_ones():
    result = froc(two_patients())
    assert [p["threshold"] for p in result["points"]] == pytest.approx([0.9, 0.8, 0.6, 0.3])
    assert [(p["sensitivity"], p["fp_per_patient"]) for p in result["points"]] == [
        (1 / 3, 0.0), (1 / 3, 0.5), (2 / 3, 0.5), (2 / 3, 1.0)]
    # 1/8 and 1/4 FP per patient: 1/3 (threshold 0.9); 1/2 and beyond: 2/3
    assert result["cpm"] == pytest.approx((2 * (1 / 3) + 5 * (2 / 3)) / 7)


def test_a_candidate_beside_a_lesion_dilated_by_one_voxel_hits_it_and_two_voxels_away_does_not():
    gt, prob, pred = two_patients()[0]
    found = patient_candidates(gt, prob, pred)
    assert found.lesions == pytest.approx((0.9, -np.inf)) and found.false == pytest.approx((0.3,))


def test_a_ground_truth_speck_is_no_lesion_to_find_and_its_match_no_false_lesion():
    gt, pred, prob = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool), np.zeros(SHAPE, np.float32)
    gt[1, 3, 3:5] = True  # 2 voxels: not scored (metaseg.evaluation.metrics.UNSCORED_GT_VOXELS)
    candidate(pred, prob, (1, slice(3, 5), slice(3, 5)), 0.7)
    result = froc([(gt, prob, pred)])
    assert [p["fp_per_patient"] for p in result["points"]] == [0.0] and np.isnan(result["points"][0]["sensitivity"])
    assert np.isnan(result["cpm"])


def test_no_candidate_at_all_reaches_no_sensitivity():
    gt, _, _ = two_patients()[0]
    assert froc([(gt, np.zeros(SHAPE, np.float32), np.zeros(SHAPE, bool))]) == {"points": [], "cpm": 0.0}


def test_a_lesion_score_is_its_highest_and_mean_probability():
    mask = np.zeros((2, 6, 6), bool)
    mask[0, 0:2, 0:2] = mask[1, 4:6, 4] = True
    probability = np.zeros((2, 6, 6), np.float32)
    probability[0, 0:2, 0:2] = [[0.5, 0.75], [0.25, 1.0]]
    probability[1, 4:6, 4] = [0.5, 0.5]
    highest, mean = lesions.scores(*lesions.label(mask), probability)
    assert highest.tolist() == [1.0, 0.5] and mean.tolist() == [0.625, 0.5]


def test_the_froc_table_and_figure():
    result = froc(two_patients())
    header, _, row = froc_rows({"model": result})
    assert header.count("FP / patient") == 7
    assert row == "| model | 0.333 | 0.333 | 0.667 | 0.667 | 0.667 | 0.667 | 0.667 | 0.571 |"
    assert froc_figure({"model": result}).startswith(b"\x89PNG")
