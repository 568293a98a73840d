"""Cross-validation (`metaseg cv`) and the inference steps chosen on its out-of-fold probabilities."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from skimage.filters import apply_hysteresis_threshold

from conftest import REPO, assert_user_error, metaseg
from test_engine import random_weights
from metaseg.conventions import BUNDLE_STEPS
from metaseg.evaluation import cv_report, metrics, retention, selection
from metaseg.inference import steps as inference_steps
from metaseg.training.cv import assign_folds, monitor_patients, site_folds, splits_final
from metaseg.inference.engine import Engine
from metaseg.errors import UserError
from metaseg.evaluation.metrics import dice_3d


# --- fold assignment ---


def test_folds_are_by_patient_seeded_disjoint_and_cover_every_patient_once():
    patients = [f"P{i:02d}" for i in range(11)]
    folds = assign_folds(list(reversed(patients)), 3, seed=0)  # input order does not matter: ids are sorted first
    assert sorted(p for fold in folds for p in fold) == patients  # every patient exactly once
    assert sorted(len(f) for f in folds) == [3, 4, 4]
    assert folds == assign_folds(patients, 3, seed=0) and folds != assign_folds(patients, 3, seed=1)
    for k, split in enumerate(splits_final(folds)):
        assert split["val"] == folds[k] and not set(split["train"]) & set(split["val"])
        assert sorted(split["train"] + split["val"]) == patients
        monitor = monitor_patients(split["train"], k, seed=0)
        assert len(monitor) == 3 and set(monitor) <= set(split["train"])  # never a held-out patient
    with pytest.raises(UserError, match="between 2 and the number of patients"):
        assign_folds(patients, 1, 0)
    with pytest.raises(UserError, match="between 2 and the number of patients"):
        assign_folds(patients, 12, 0)


# --- post-processing steps on hand-made volumes ---


def blob(volume: np.ndarray, slices, rows, cols, value=1) -> np.ndarray:
    volume[slices, rows, cols] = value
    return volume


def test_largest_component_is_3d_and_connects_diagonally_across_slices():
    pred = np.zeros((4, 32, 32), np.float32)
    blob(pred, slice(0, 1), slice(2, 6), slice(2, 6))  # 16 voxels on slice 0 ...
    blob(pred, slice(1, 2), slice(6, 10), slice(6, 10))  # ... touching this one only at a corner: one 3D lesion
    blob(pred, slice(3, 4), slice(15, 20), slice(15, 20))  # 25 voxels in one slice: larger in plane, smaller in 3D
    config = {**inference_steps.DEFAULT, "largest_component": True}
    kept = inference_steps.mask(pred, config)
    assert kept.sum() == 32 and kept[0].sum() == kept[1].sum() == 16 and not kept[3].any()
    assert inference_steps.mask(pred, config, volume=False).sum() == 57  # a single slice gets no component step
    assert not inference_steps.mask(np.zeros_like(pred), config).any()


def test_minimum_size_removes_only_components_below_it():
    pred = np.zeros((3, 32, 32), np.float32)
    blob(pred, slice(0, 2), slice(0, 3), slice(0, 3))  # 18 voxels over two slices
    blob(pred, slice(2, 3), slice(20, 24), slice(20, 24))  # 16 voxels
    blob(pred, slice(0, 1), slice(10, 12), slice(28, 30))  # 4 voxels
    config = {**inference_steps.DEFAULT, "min_lesion_voxels": 17}
    assert inference_steps.mask(pred, config).sum() == 18
    assert inference_steps.mask(pred, {**config, "min_lesion_voxels": 5}).sum() == 34
    assert inference_steps.mask(pred, {**config, "min_lesion_voxels": 0}).sum() == 38
    assert inference_steps.mask(pred, config, volume=False).sum() == 38


def stack(*blobs) -> np.ndarray:
    volume = np.zeros((4, 40, 40), np.float32)
    for args in blobs:
        blob(volume, *args)
    return volume


LESION = (slice(0, 4), slice(4, 16), slice(4, 16))  # 576 voxels
SECOND = (slice(2, 4), slice(25, 40), slice(25, 40))  # 450 voxels, far away: smaller, but above every min size


def test_selection_keeps_a_step_only_when_it_raises_the_mean_dice():
    """Largest component helps patient A (a false blob), hurts nowhere, and the data are declared one lesion per
    patient; the threshold must drop below 0.5."""
    truth = {"A": stack(LESION) > 0, "B": stack(LESION) > 0}
    weak = 0.45  # the network is under-confident: everything at 0.45, so the default threshold finds nothing
    probs = {
        "A": {"net": {"prob": stack(LESION + (weak,), SECOND + (weak,))}},
        "B": {"net": {"prob": stack(LESION + (weak,))}},
    }
    for maps in probs.values():
        maps["net"]["prob_flip"] = maps["net"]["prob"]  # flipping changes nothing: no gain, not kept
    chosen = selection.select(truth, probs, ["net"], one_lesion_per_patient=True, keep_reference=False)
    steps = {s["step"]: s for s in chosen["steps"]}
    assert steps["baseline"]["mean_dice_3d"] == 0.0 and steps["baseline"]["lesion_sensitivity_3d"] == 0.0
    assert not steps["flip_tta"]["kept"] and steps["flip_tta"]["gain"] == 0
    assert steps["threshold"]["kept"] and steps["threshold"]["value"] == 0.3  # the first of the tied best values
    assert steps["threshold"]["mean_dice_3d_with"] == pytest.approx((2 * 576 / (576 + 1026) + 1) / 2)
    assert steps["threshold"]["lesion_sensitivity_3d_with"] == 1.0
    assert not steps["min_lesion_voxels"]["kept"]  # the false blob (450) is bigger than every candidate size
    assert steps["largest_component"]["kept"] and steps["largest_component"]["gain"] > 0
    assert steps["largest_component"]["lesion_sensitivity_3d_without"] == 1.0 == \
        steps["largest_component"]["lesion_sensitivity_3d_with"]  # the blob was no lesion
    assert chosen["config"] == {**inference_steps.DEFAULT, "models": ["net"], "threshold": 0.3, "largest_component": True}
    assert chosen["mean_dice_3d"] == 1.0 and chosen["single_slice"] == {"models": ["net"], "flip_tta": False,
                                                                         "threshold": 0.3}
    assert set(chosen["inference_steps"]) == set(BUNDLE_STEPS)
    undeclared = selection.select(truth, probs, ["net"])  # metastasis data: keeping one lesion is no candidate
    assert "largest_component" not in {s["step"] for s in undeclared["steps"]}
    assert "not declared one lesion per patient" in undeclared["skipped"]["largest_component"]
    assert undeclared["config"] == {**inference_steps.DEFAULT, "models": ["net"], "threshold": 0.3}


def test_selection_rejects_steps_that_hurt():
    """Two real lesions: keeping the largest one loses the other; averaging in a wrong model loses both."""
    truth = {"A": stack(LESION, SECOND) > 0}
    good = stack(LESION, SECOND)
    wrong = stack((slice(0, 4), slice(20, 25), slice(0, 5)))
    probs = {"A": {"good": {"prob": good, "prob_flip": good}, "wrong": {"prob": wrong, "prob_flip": wrong}}}
    chosen = selection.select(truth, probs, ["good", "wrong"], one_lesion_per_patient=True)
    steps = {s["step"]: s for s in chosen["steps"]}
    assert steps["baseline"]["value"] == "good" and steps["baseline"]["mean_dice_3d"] == 1.0
    assert not steps["ensemble"]["kept"] and steps["ensemble"]["gain"] < 0
    assert not steps["largest_component"]["kept"] and steps["largest_component"]["gain"] < 0
    assert not any(s["kept"] for s in chosen["steps"][1:])
    assert chosen["config"] == {**inference_steps.DEFAULT, "models": ["good"]}


SMALL = (slice(1, 3), slice(30, 33), slice(2, 7))  # 30 voxels: a small metastasis
BLOB = (slice(0, 2), slice(22, 32), slice(20, 30))  # 200 voxels of false positive


def test_a_step_that_raises_dice_by_deleting_a_metastasis_is_never_kept():
    """One large and one small lesion, both found, and a false blob larger than the small lesion: keeping the largest
    lesion raises the Dice (the blob goes) but deletes the small metastasis. Undeclared it is not tried; declared,
    it is tried and rejected for the lesion it loses."""
    truth = {"A": stack(LESION, SMALL) > 0}
    prob = stack(LESION, SMALL, BLOB)
    probs = {"A": {"net": {"prob": prob, "prob_flip": prob}}}
    largest = {**inference_steps.DEFAULT, "models": ["net"], "largest_component": True}
    score = selection.Scorer(truth, probs)
    assert score(largest).mean_dice_3d > score({**largest, "largest_component": False}).mean_dice_3d
    assert score(largest).detected == 1 < score({**largest, "largest_component": False}).detected == 2
    undeclared = selection.select(truth, probs, ["net"], score)
    assert "largest_component" in undeclared["skipped"] and not undeclared["config"]["largest_component"]
    declared = selection.select(truth, probs, ["net"], score, one_lesion_per_patient=True)
    step = declared["steps"][-1]
    assert step["step"] == "largest_component" and step["gain"] > 0 and not step["kept"]
    assert (step["lesion_sensitivity_3d_without"], step["lesion_sensitivity_3d_with"]) == (1.0, 0.5)
    assert step["note"] == "loses 1 of 2 lesions"
    assert declared["config"] == {**inference_steps.DEFAULT, "models": ["net"]} and declared["lesion_sensitivity_3d"] == 1


def test_only_thresholds_that_keep_every_found_lesion_compete():
    """The small lesion and a false blob sit at probability 0.55: a threshold of 0.6 or more raises the Dice (the
    blob goes) but loses the lesion, so it is not chosen."""
    truth = {"A": stack(LESION, SMALL) > 0}
    prob = stack(LESION + (0.9,), SMALL + (0.55,), BLOB + (0.55,))
    probs = {"A": {"net": {"prob": prob, "prob_flip": prob}}}
    chosen = selection.select(truth, probs, ["net"])
    step = next(s for s in chosen["steps"] if s["step"] == "threshold")
    high = step["candidates"]["0.6"]
    assert high["mean_dice_3d"] > step["mean_dice_3d_without"] and high["lesion_sensitivity_3d"] == 0.5
    assert not step["kept"] and step["value"] <= 0.55 and chosen["config"]["threshold"] == 0.5


def test_minimum_sizes_never_exceed_the_smallest_ground_truth_lesion():
    """Both patients' smallest lesion has 30 voxels, found over-segmented (a 60-voxel lesion); patient B also has a
    40-voxel false blob. A minimum of 50 would raise the Dice and lose no lesion of these predictions, but it could
    delete a lesion of the labels' smallest size: candidates stop at 30."""
    truth = {"A": stack(LESION, SMALL) > 0, "B": stack(LESION, SMALL) > 0}
    found = (slice(1, 3), slice(28, 34), slice(2, 7))  # 60 voxels over SMALL
    probs = {"A": {"net": {"prob": stack(LESION, found)}},
             "B": {"net": {"prob": stack(LESION, found, (slice(0, 1), slice(10, 14), slice(30, 40)))}}}
    for maps in probs.values():
        maps["net"]["prob_flip"] = maps["net"]["prob"]
    score = selection.Scorer(truth, probs)
    plain = {**inference_steps.DEFAULT, "models": ["net"]}
    assert score({**plain, "min_lesion_voxels": 50}).mean_dice_3d > score(plain).mean_dice_3d
    assert score({**plain, "min_lesion_voxels": 50}).detected == score(plain).detected == 4
    chosen = selection.select(truth, probs, ["net"], score, keep_reference=False)
    step = next(s for s in chosen["steps"] if s["step"] == "min_lesion_voxels")
    assert chosen["smallest_gt_lesion_voxels"] == 30 and list(step["candidates"]) == ["10", "25"]
    assert not step["kept"] and chosen["config"]["min_lesion_voxels"] == 0 and chosen["config"]["min_lesion_mm3"] == 0
    tiny = {"A": stack((slice(0, 1), slice(0, 2), slice(0, 4))) > 0}  # an 8-voxel lesion: no candidate at all
    alone = selection.select(tiny, {"A": probs["A"]}, ["net"], keep_reference=False)
    assert "exceeds the smallest ground-truth lesion (8 voxels)" in alone["skipped"]["min_lesion_voxels"]
    # by default the reference phantom's metastases (down to 5 voxels) bound the sizes too: no candidate of 10+
    guarded = selection.select(truth, probs, ["net"], score)
    assert "min_lesion_voxels" not in {s["step"] for s in guarded["steps"]}
    assert "reference phantom's metastases (5 voxels)" in guarded["skipped"]["min_lesion_voxels"]


def test_the_reference_size_cap_keeps_99_percent_of_the_reference_metastases():
    assert selection.reference_size_cap([5] + [100] * 99) == 100  # dropping 1 of 100 is allowed
    assert selection.reference_size_cap([5, 6] + [100] * 98) == 6  # 2 of 100 is not
    sizes = selection.reference_lesion_voxels()
    assert len(sizes) == 43 and sizes[0] == 5 and selection.reference_size_cap() == 5


def test_selections_sharing_a_scorer_choose_the_same_and_score_each_configuration_once(monkeypatch):
    """cv's report runs the ensemble's selection and each bundle's over the same maps, and the cross-fitted ones on
    subsets of the patients: a configuration is scored once per patient, and sharing changes no choice."""
    truth = {"A": stack(LESION, SECOND) > 0, "B": stack(LESION) > 0}
    good = stack(LESION, SECOND)
    wrong = stack((slice(0, 4), slice(20, 25), slice(0, 5)))
    probs = {patient: {"good": {"prob": good, "prob_flip": good}, "wrong": {"prob": wrong, "prob_flip": wrong}}
             for patient in truth}
    scored = []
    real = selection.patient_score
    monkeypatch.setattr(selection, "patient_score",
                        lambda gt, found, maps, config: scored.append((config, maps)) or real(gt, found, maps, config))
    runs = [(truth, models) for models in (["good", "wrong"], ["good"], ["wrong"])]
    runs += [({"A": truth["A"]}, ["good", "wrong"]), ({"B": truth["B"]}, ["good"])]  # subsets, as cross_fitted's
    alone = [selection.select(patients, probs, models) for patients, models in runs]
    unshared, scored[:] = len(scored), []
    score = selection.Scorer(truth, probs)
    shared = [selection.select(patients, probs, models, score.subset(list(patients))) for patients, models in runs]
    assert shared == alone
    keys = [(json.dumps(config, sort_keys=True), id(maps)) for config, maps in scored]
    assert len(keys) == len(set(keys)) < unshared  # nothing scored twice, less work than the selections alone
    assert score.subset(["B"])({**inference_steps.DEFAULT, "models": ["good"]}) == \
        selection.Scorer({"B": truth["B"]}, probs)({**inference_steps.DEFAULT, "models": ["good"]})


def test_cross_fitted_steps_never_see_the_fold_they_score(monkeypatch):
    """Patient A (fold 0) needs a threshold below 0.5 (an under-confident network); B and C (fold 1) have a faint
    false blob (0.4) that such a threshold keeps. Chosen on all three, threshold 0.45 suits everyone (Dice 1 each);
    cross-fitted, fold 0's steps come from B and C (0.5: A is missed) and fold 1's from A (0.3: the blobs come back).
    Each fold's selection is given the other folds' patients only."""
    truth = {patient: stack(LESION) > 0 for patient in "ABC"}
    confident = stack(LESION + (0.9,), SECOND + (0.4,))
    probs = {"A": {"net": {"prob": stack(LESION + (0.45,))}}, "B": {"net": {"prob": confident}},
             "C": {"net": {"prob": confident}}}
    for maps in probs.values():
        maps["net"]["prob_flip"] = maps["net"]["prob"]
    fold_of = {"A": 0, "B": 1, "C": 1}
    in_sample = selection.select(truth, probs, ["net"])
    assert in_sample["config"]["threshold"] == 0.45 and in_sample["mean_dice_3d"] == 1.0
    seen = []
    real = selection.select
    monkeypatch.setattr(selection, "select", lambda t, *args, **kw: seen.append(sorted(t)) or real(t, *args, **kw))
    fitted = selection.cross_fitted(truth, probs, ["net"], fold_of, caps=caps_at(1.0))
    assert seen == [["B", "C"], ["A"]]  # fold 0's steps chosen on fold 1's patients, and the other way round
    for k, patients in enumerate(seen):
        assert not {p for p in patients if fold_of[p] == k}
    chosen = {k: selection["config"]["threshold"] for k, selection in fitted["selections"].items()}
    assert chosen == {0: 0.5, 1: 0.3}  # neither is the in-sample choice
    dice = {row["patient"]: row["dice_3d"] for row in fitted["metric_per_patient"]}
    blob_dice = 2 * 576 / (576 + 576 + 450)
    assert dice == pytest.approx({"A": 0.0, "B": blob_dice, "C": blob_dice})
    assert [row["patient"] for row in fitted["metric_per_patient"]] == list(truth)
    with pytest.raises(UserError, match="at least two folds"):
        selection.cross_fitted(truth, probs, ["net"], {p: 0 for p in truth})


def test_a_minimum_lesion_score_keeps_a_small_confident_lesion_and_drops_a_large_unconfident_one():
    pred = stack(LESION + (0.7,), SMALL + (0.95,))
    config = {**inference_steps.DEFAULT, "min_lesion_score": 0.9}
    np.testing.assert_array_equal(inference_steps.mask(pred, config), stack(SMALL) > 0)
    assert inference_steps.mask(pred, {**config, "min_lesion_score": 0.7}).sum() == 606  # 0.7 reaches a seed of 0.7
    assert inference_steps.mask(pred, {**config, "min_lesion_score": 0.5}).sum() == 606  # up to the threshold: off
    assert inference_steps.mask(pred, config, volume=False).sum() == 606  # a single slice gets no component step
    assert inference_steps.applied_volume_steps(config, True, None) == ["min_lesion_score"]
    assert inference_steps.has_volume_steps(config)
    assert not inference_steps.has_volume_steps({**config, "min_lesion_score": 0.5})


def test_hysteresis_is_the_threshold_as_the_low_one_and_the_score_as_the_seed():
    """LESION and SECOND at 0.4, a seed of 0.9 inside LESION only: over 0.3 with seeds of 0.8, LESION grows whole
    from its seed and SECOND, with none, goes; skimage's hysteresis, with strict inequalities and face neighbours,
    agrees here."""
    pred = stack(LESION + (0.4,), SECOND + (0.4,))
    pred[1, 8:10, 8:10] = 0.9
    kept = inference_steps.mask(pred, {**inference_steps.DEFAULT, "threshold": 0.3, "min_lesion_score": 0.8})
    np.testing.assert_array_equal(kept, stack(LESION) > 0)
    np.testing.assert_array_equal(kept, apply_hysteresis_threshold(pred, 0.3, 0.8))


def test_a_minimum_lesion_score_is_kept_where_it_raises_the_dice_and_loses_no_lesion():
    """A confident small metastasis (30 voxels, 0.95) and a large unconfident false lesion (200 voxels, 0.7): no
    minimum size may remove the blob (it is larger than the metastasis), a score of 0.8 does, and the first tied
    candidate (0.8) is kept; a lower threshold with its seed (hysteresis) gains nothing more."""
    truth = {"A": stack(LESION, SMALL) > 0}
    prob = stack(LESION + (0.9,), SMALL + (0.95,), BLOB + (0.7,))
    probs = {"A": {"net": {"prob": prob, "prob_flip": prob}}}
    chosen = selection.select(truth, probs, ["net"], keep_reference=False)
    steps = {s["step"]: s for s in chosen["steps"]}
    assert not steps["min_lesion_voxels"]["kept"]  # 10 and 25 keep the blob, larger sizes exceed the metastasis
    score = steps["min_lesion_score"]
    assert score["kept"] and score["value"] == 0.8 and list(score["candidates"]) == ["0.55", "0.6", "0.7", "0.8", "0.9", "0.95"]
    assert score["lesion_sensitivity_3d_with"] == 1.0 and score["mean_dice_3d_with"] == 1.0
    assert not steps["hysteresis"]["kept"] and steps["hysteresis"]["gain"] == 0
    assert chosen["config"] == {**inference_steps.DEFAULT, "models": ["net"], "min_lesion_score": 0.8}
    assert chosen["inference_steps"]["min_lesion_score"] == 0.8
    report = cv_report.markdown({"folds": 2, "folds_done": {}, "complete": True, "recipe": {}, "seed": 0,
                                 "command": "c", "model_selection": "m", "models": {}, "patients": {},
                                 "postprocessing": chosen})
    assert "| min_lesion_score | 0.8 | 0.8584 | 1.0000 | +0.1416 | 1.000 | 1.000 | yes |" in report


def test_a_minimum_lesion_score_that_loses_a_metastasis_is_never_kept():
    """The small metastasis is as unconfident (0.7) as the false blob: the scores that drop the blob (0.8 and up)
    raise the Dice but drop the metastasis too, so they do not compete."""
    truth = {"A": stack(LESION, SMALL) > 0}
    prob = stack(LESION + (0.9,), SMALL + (0.7,), BLOB + (0.7,))
    probs = {"A": {"net": {"prob": prob, "prob_flip": prob}}}
    chosen = selection.select(truth, probs, ["net"], keep_reference=False)
    step = next(s for s in chosen["steps"] if s["step"] == "min_lesion_score")
    high = step["candidates"]["0.8"]
    assert high["mean_dice_3d"] > step["mean_dice_3d_without"] and high["lesion_sensitivity_3d"] == 0.5
    assert not step["kept"] and step["value"] <= 0.7
    assert chosen["config"]["min_lesion_score"] == 0 and chosen["lesion_sensitivity_3d"] == 1.0
    faint = stack(LESION + (0.9,), SMALL + (0.52,), BLOB + (0.52,))  # every score (0.55 and up) drops the metastasis
    alone = selection.select(truth, {"A": {"net": {"prob": faint, "prob_flip": faint}}}, ["net"], keep_reference=False)
    step = next(s for s in alone["steps"] if s["step"] == "min_lesion_score")
    assert step["gain"] > 0 and not step["kept"] and step["note"] == "loses 1 of 2 lesions"
    assert alone["config"]["min_lesion_score"] == 0 and alone["lesion_sensitivity_3d"] == 1.0


def test_a_score_cap_keeps_99_percent_of_the_found_reference_lesions():
    assert selection.score_cap([0.6] + [0.99] * 99) == np.float32(0.99)  # dropping 1 of 100 is allowed
    assert selection.score_cap([0.6, 0.7] + [0.99] * 98) == np.float32(0.7)  # 2 of 100 is not
    assert selection.score_cap([0.9, 0.6, 0.8]) == np.float32(0.6)  # under 100 lesions, none may go
    assert selection.score_cap([]) == 1


def test_a_found_lesion_s_keep_score_is_the_highest_score_of_the_predicted_lesions_matching_it():
    """The metastasis is found at 0.9, the small one at 0.7, the blob matches nothing; over 0.75 the small one is
    not found at all, so it has no keep score there."""
    gt = stack(LESION, SMALL) > 0
    prob = stack(LESION + (0.9,), SMALL + (0.7,), BLOB + (0.6,))
    prob[0, 4, 4] = 0.95  # one voxel of the lesion more confident: the lesion's score is its highest voxel
    found = metrics.targets(gt)
    assert retention.keep_scores(found, prob, 0.5) == [{"voxels": 576, "keep_score": pytest.approx(0.95)},
                                                       {"voxels": 30, "keep_score": pytest.approx(0.7)}]
    assert retention.keep_scores(found, prob, 0.75) == [{"voxels": 576, "keep_score": pytest.approx(0.95)}]
    for kept in (0.7, 0.65):  # the score step keeps a lesion exactly up to its keep score
        assert inference_steps.mask(prob, {**inference_steps.DEFAULT, "min_lesion_score": kept})[SMALL].all()
    assert not inference_steps.mask(prob, {**inference_steps.DEFAULT, "min_lesion_score": 0.71})[SMALL].any()


def caps_at(cap: float) -> dict:
    """selection.score_caps of models whose found phantom lesions allow scores up to `cap` everywhere."""
    return {view: {t: cap for t in selection.THRESHOLDS} for view in ("plain", "flip")}


def test_score_caps_take_the_strictest_model_per_view_and_threshold():
    """Two fold models: one finds a phantom lesion at 0.7 (plain view) and one at 0.9; flip TTA raises the first's
    to 0.8; a model that finds nothing at a threshold allows any score there."""
    lesion = lambda score: {"voxels": 30, "keep_score": score}  # noqa: E731
    first = {"plain": {"0.5": [lesion(0.7), lesion(0.99)], "0.3": []}, "flip": {"0.5": [lesion(0.8)]}}
    second = {"plain": {"0.5": [lesion(0.9)], "0.3": [lesion(0.6)]}, "flip": {"0.5": [lesion(0.95)]}}
    caps = selection.score_caps([first, second])
    assert caps == {"plain": {0.5: pytest.approx(0.7), 0.3: pytest.approx(0.6)}, "flip": {0.5: pytest.approx(0.8)}}
    assert selection.keeps_reference(0.7, 0.5, False, caps) and not selection.keeps_reference(0.75, 0.5, False, caps)
    assert selection.keeps_reference(0.75, 0.5, True, caps)
    with pytest.raises(UserError, match="rerun `metaseg cv`"):
        selection.keeps_reference(0.7, 0.45, False, caps)


def test_the_selection_never_tries_a_score_that_drops_the_phantom_lesions_a_model_finds():
    """The first score test's patient, whose false blob (0.7) a score of 0.8 removes; the fold models' phantom
    lesions allow scores up to 0.75: 0.8 and up are not tried, and 0.55 to 0.7 gain nothing. Without a measurement
    of the models on the phantom no score is tried at all."""
    truth = {"A": stack(LESION, SMALL) > 0}
    prob = stack(LESION + (0.9,), SMALL + (0.95,), BLOB + (0.7,))
    probs = {"A": {"net": {"prob": prob, "prob_flip": prob}}}
    chosen = selection.select(truth, probs, ["net"], caps=caps_at(0.75))
    step = next(s for s in chosen["steps"] if s["step"] == "min_lesion_score")
    assert list(step["candidates"]) == ["0.55", "0.6", "0.7"] and not step["kept"]
    assert step["refused"].startswith("0.8, 0.9, 0.95 (each drops more than 1%")
    assert "min_lesion_score" not in chosen["skipped"]  # tried or skipped, never both
    refused = selection.select(truth, probs, ["net"], caps=caps_at(0.52))  # every candidate over the cap
    assert "min_lesion_score" not in [s["step"] for s in refused["steps"]]
    assert refused["skipped"]["min_lesion_score"].startswith("0.55, 0.6, 0.7, 0.8, 0.9, 0.95 (each drops")
    assert chosen["config"]["min_lesion_score"] == 0 and chosen["reference_score_caps"][0.5] == 0.75
    assert selection.select(truth, probs, ["net"], caps=caps_at(1.0))["config"]["min_lesion_score"] == 0.8
    unmeasured = selection.select(truth, probs, ["net"])
    assert "min_lesion_score" not in [s["step"] for s in unmeasured["steps"]]
    assert unmeasured["skipped"]["min_lesion_score"].startswith("no model's probabilities on the reference phantom")


def test_a_fold_model_s_phantom_keep_scores_are_measured_once_and_read_back(tmp_path):
    """metaseg cv's fold file: every lesion a model finds, at its score, in both views; the engine is loaded only
    when the file is missing; an older fold (no file) reads as unmeasured."""
    assert retention.read_fold(tmp_path) is None
    frames, truth = retention.reference_frames()
    answers = {id(frame): gt for patient, gt_stack in truth.items() for frame, gt in zip(frames[patient], gt_stack)}
    views = []

    class Sure:  # finds every phantom lesion at 0.8 and nothing else, in either view
        def probabilities(self, frames, view=None):
            views.append(view)
            return [answers[id(frame)] * np.float32(0.8) for frame in frames]

    measured = retention.fold_keep_scores(tmp_path, lambda: Sure())
    assert set(views) == {"plain", "mirrored"} and set(measured) == {"plain", "flip"}
    scored = [t.voxels for gt in truth.values() for t in metrics.targets(gt) if t.scored]
    for view in ("plain", "flip"):
        for t in selection.THRESHOLDS:
            assert sorted(lesion["voxels"] for lesion in measured[view][str(t)]) == sorted(scored)
            assert all(lesion["keep_score"] == pytest.approx(0.8) for lesion in measured[view][str(t)])
    assert retention.fold_keep_scores(tmp_path, lambda: pytest.fail("loaded again")) == measured
    for stale in ('{"phantom": {"patients": 3}, "keep_scores": {}}', "{not json"):  # another phantom's, or cut short
        (tmp_path / retention.FOLD_FILE).write_text(stale)
        assert retention.read_fold(tmp_path) is None
    views.clear()
    assert retention.fold_keep_scores(tmp_path, lambda: Sure()) == measured and views  # measured again


def test_cross_fitted_scores_choose_without_the_fold_they_score(monkeypatch):
    """B and C (fold 1) have a confident lesion and an unconfident false blob, which a score of 0.8 removes; A (fold 0)
    has an unconfident small metastasis, which it would delete. Chosen on all three, no score (it loses A's lesion);
    cross-fitted, fold 0 gets the score chosen on B and C and loses A's metastasis, fold 1 none."""
    truth = {"A": stack(LESION, SMALL) > 0, "B": stack(LESION) > 0, "C": stack(LESION) > 0}
    confident = stack(LESION + (0.9,), BLOB + (0.7,))
    probs = {"A": {"net": {"prob": stack(LESION + (0.9,), SMALL + (0.7,))}}, "B": {"net": {"prob": confident}},
             "C": {"net": {"prob": confident}}}
    for maps in probs.values():
        maps["net"]["prob_flip"] = maps["net"]["prob"]
    fold_of = {"A": 0, "B": 1, "C": 1}
    assert selection.select(truth, probs, ["net"], caps=caps_at(1.0))["config"]["min_lesion_score"] == 0
    seen = []
    real = selection.select
    monkeypatch.setattr(selection, "select", lambda t, *args, **kw: seen.append(sorted(t)) or real(t, *args, **kw))
    fitted = selection.cross_fitted(truth, probs, ["net"], fold_of, caps=caps_at(1.0))
    assert seen == [["B", "C"], ["A"]]
    assert {k: chosen["config"]["min_lesion_score"] for k, chosen in fitted["selections"].items()} == {0: 0.8, 1: 0}
    rows = {row["patient"]: row for row in fitted["metric_per_patient"]}
    assert rows["A"]["dice_3d"] == pytest.approx(2 * 576 / (2 * 576 + 30))  # its metastasis deleted out of fold
    assert rows["B"]["dice_3d"] == rows["C"]["dice_3d"] == pytest.approx(2 * 576 / (2 * 576 + 200))


def test_hysteresis_is_chosen_where_a_lesion_s_rim_is_below_the_threshold_and_a_false_one_has_no_seed():
    """LESION's core is 0.9 and its rim 0.4; a large false lesion lies at 0.4. No threshold alone helps (0.4 keeps
    the false lesion, 0.45 and up miss the rim), and a score at the threshold removes nothing; over 0.3 (the first
    of the tied lower thresholds) with a seed of 0.55 (the score step's first tied candidate), the lesion is whole
    and the false one gone."""
    truth = {"A": stack(LESION) > 0}
    prob = stack(LESION + (0.4,), (slice(0, 4), slice(20, 40), slice(20, 40), 0.4))
    prob[:, 6:14, 6:14] = 0.9
    probs = {"A": {"net": {"prob": prob, "prob_flip": prob}}}
    chosen = selection.select(truth, probs, ["net"], keep_reference=False)
    steps = {s["step"]: s for s in chosen["steps"]}
    assert not steps["threshold"]["kept"] and not steps["min_lesion_score"]["kept"]
    hysteresis = steps["hysteresis"]
    assert hysteresis["kept"] and hysteresis["value"] == (0.3, 0.55) and hysteresis["mean_dice_3d_with"] == 1.0
    assert chosen["config"] == {**inference_steps.DEFAULT, "models": ["net"], "threshold": 0.3, "min_lesion_score": 0.55}


def test_ensemble_and_flip_average_probabilities_and_read_uint8():
    a = {"prob": np.full((1, 2, 2), 255, np.uint8), "prob_flip": np.zeros((1, 2, 2), np.uint8)}
    b = {"prob": np.zeros((1, 2, 2), np.float32), "prob_flip": np.zeros((1, 2, 2), np.float32)}
    config = {**inference_steps.DEFAULT, "models": ["a", "b"]}
    assert inference_steps.probability({"a": a, "b": b}, config).max() == 0.5
    assert inference_steps.probability({"a": a, "b": b}, {**config, "flip_tta": True}).max() == 0.25
    assert inference_steps.probability({"a": a}, {**config, "models": ["a"]}).max() == 1.0


def test_flip_tta_is_the_bundles_own_mirror_and_what_cv_scores_is_what_is_deployed(tmp_path):
    """network_maps runs the bundle's `probabilities` views; their mean is what the bundle's inferer gives under
    flip_tta, and the mirrored view is close to the prediction of the mirrored input, mirrored back. Close, not
    equal: the bundle mirrors the preprocessed image, as training's RandFlipd does, and CLAHE does not commute with
    a mirror."""
    bundle, weights = REPO / "bundles" / "attention_unet", random_weights("attention_unet", tmp_path)
    frame = np.random.default_rng(0).integers(0, 255, (3, 48, 40)).astype(np.float32)
    engine = Engine(bundle, weights, overrides={"spatial_size": 32, "inference_steps#flip_tta": False})
    maps = inference_steps.network_maps(engine, [frame])
    np.testing.assert_array_equal(maps["prob"][0], engine.probabilities([frame])[0])  # the bundle's flip_tta is off
    assert np.abs(maps["prob"] - maps["prob_flip"]).max() > 0.1  # random weights: the network is not symmetric
    mirrored_input = engine.probabilities([np.ascontiguousarray(frame[..., ::-1])])[0]
    assert np.abs(maps["prob_flip"][0] - mirrored_input[:, ::-1]).max() < 0.05
    assert np.abs(maps["prob_flip"][0] - mirrored_input).max() > 0.1  # (without mirroring back it would be far off)
    deployed = Engine(bundle, weights, overrides={"spatial_size": 32, "inference_steps#flip_tta": True})
    config = {**inference_steps.DEFAULT, "models": ["m"], "flip_tta": True, "threshold": 0.4}
    np.testing.assert_allclose(deployed.probabilities([frame])[0], inference_steps.probability({"m": maps}, config)[0],
                               atol=1e-5)
    np.testing.assert_array_equal(inference_steps.segment({"m": engine}, [frame], config, volume=False),
                                  inference_steps.upload_masks(deployed.probabilities([frame]), config))
    assert "prob_flip" not in inference_steps.network_maps(engine, [frame], flip=False)


# --- the command on a tiny phantom ---


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    from metaseg.data.phantom import synthesize

    data = tmp_path_factory.mktemp("cv") / "Data"
    synthesize(data, patients=6, slices=4, seed=0)
    return data


LESION_KEYS = ("lesionwise_dice", "lesion_sensitivity_3d", "fp_lesions_per_patient", "ci95_lesionwise_dice",
               "ci95_lesion_sensitivity_3d", "ci95_fp_lesions_per_patient", "lesionwise_hd95_vox",
               "lesion_precision_3d", "lesion_sensitivity_3d_by_size")


def hand_written_runs(phantom: Path, runs: Path) -> tuple:
    """Out-of-fold maps in the format a `metaseg cv` run writes, for a 2-fold plan of the phantom: bundle `perfect`
    predicts the ground truth, `empty` nothing. Returns the data found, its ground truth and the plan."""
    from metaseg.evaluation import out_of_fold as cv
    from metaseg.data.datalist import by_patient
    from metaseg.data.ground_truth import read_ground_truth
    from metaseg.data.discovery import discover

    found = discover(phantom)
    _, truth = read_ground_truth(phantom, found.root, by_patient([asdict(p) for p in found.pairs]))
    plan = {"data": str(phantom), "folds": 2, "seed": 0, "recipe": {"epochs": 1},
            "splits": splits_final(assign_folds(found.patients, 2, 0))}
    for name, prob in (("perfect", lambda gt: gt), ("empty", np.zeros_like)):
        for k, split in enumerate(plan["splits"]):
            fold = runs / name / f"fold_{k}"
            for patient in split["val"]:
                maps = cv.as_uint8(prob(truth[patient]).astype(np.float32))
                cv.write_npz(fold / "oof" / f"{patient}.npz", prob=maps, prob_flip=maps)
            (fold / "fold.json").write_text("{}")
    return found, truth, plan


SERVED_KEYS = {"bundle", "mean_dice_3d", "ci95_dice_3d", "dice_3d_per_patient", "lesion_slice_dice", "fp_slice_rate",
               "lesionwise_dice", "lesion_sensitivity_3d", "fp_lesions_per_patient", "n_patients", "inference_steps",
               "steps_per_fold", "chosen_by", "froc"}


def test_the_cv_report_carries_the_lesion_wise_metrics_for_every_model(phantom, tmp_path):
    """cv.json/cv.md from hand-written out-of-fold maps: every model row has the lesion-wise keys, the step rows the
    sensitivity; each bundle has its cross-fitted served entry, and the better one is served."""
    from metaseg.evaluation import cv_report as cv

    found, truth, plan = hand_written_runs(phantom, tmp_path / "runs")
    out = tmp_path / "reports"
    result = cv.report(phantom, found, tmp_path / "runs", out, plan, ["perfect", "empty"], "metaseg cv", 50,
                       {"perfect": True, "empty": False})
    saved = json.loads((out / "cv.json").read_text())
    assert set(saved["models"]) == {"perfect", "empty", "selected", "perfect + its inference steps",
                                    "empty + its inference steps", "perfect served (cross-fitted steps)",
                                    "empty served (cross-fitted steps)"}
    for name, entry in saved["models"].items():
        assert all(key in entry for key in LESION_KEYS), name
    lesions = sum(lesions_of(gt) for gt in truth.values())
    perfect, empty = saved["models"]["perfect"], saved["models"]["empty"]
    assert perfect["lesionwise_dice"] == perfect["lesion_sensitivity_3d"] == 1
    assert perfect["fp_lesions_per_patient"] == 0
    assert perfect["lesionwise_hd95_vox"] == 0 and perfect["pooled"]["lesion_sensitivity_3d"]["gt_lesions"] == lesions
    assert empty["lesion_sensitivity_3d"] == 0 and empty["lesion_precision_3d"] is None  # nothing predicted
    assert sum(b["lesions"] for b in empty["lesion_sensitivity_3d_by_size"].values()) == lesions
    assert saved["conventions"]["lesion_sensitivity_3d"].startswith("detected ground-truth lesions")
    assert saved["one_lesion_per_patient"] == {"perfect": True, "empty": False}
    # largest component: a candidate for the bundle declaring one lesion per patient only (and not for the ensemble)
    own = saved["postprocessing_per_model"]
    assert "largest_component" in {s["step"] for s in own["perfect"]["steps"]}
    assert "largest_component" in own["empty"]["skipped"] and "largest_component" in saved["postprocessing"]["skipped"]
    for step in saved["postprocessing"]["steps"][1:]:
        assert {"lesion_sensitivity_3d_without", "lesion_sensitivity_3d_with"} <= set(step)
    assert set(saved["postprocessing"]["inference_steps"]) == set(BUNDLE_STEPS)
    assert result["models"]["selected"]["lesion_sensitivity_3d"] == 1.0
    md = (out / "cv.md").read_text()
    assert "| model | GT lesions | lesion-wise Dice |" in md
    link = re.search(r"\[metaseg/inference/lesions.py\]\(([^)]+)\)", md)[1]  # the one definition of a lesion, linked
    assert (out / link).resolve() == (REPO / "metaseg" / "inference" / "lesions.py").resolve()
    assert f"| perfect | {lesions} | 1.000 [1.000, 1.000] |" in md
    assert "| lesion sensitivity without | with |" in md and "largest_component not tried" in md

    served = saved["served_per_bundle"]
    assert set(served) == {"perfect", "empty"} and saved["served_skipped"] == {}
    for name, entry in served.items():
        assert set(entry) == SERVED_KEYS and entry["bundle"] == name and entry["n_patients"] == len(truth)
        assert set(entry["steps_per_fold"]) == {"0", "1"}
        assert all(set(steps) == set(BUNDLE_STEPS) for steps in entry["steps_per_fold"].values())
        # what ships is what configs/inference.json records: the steps chosen on all patients
        assert entry["inference_steps"] == saved["postprocessing_per_model"][name]["inference_steps"]
        row = saved["models"][f"{name} served (cross-fitted steps)"]
        assert entry["dice_3d_per_patient"] == row["dice_3d_per_patient"] and set(row["dice_3d_per_patient"]) == \
            set(truth)
        assert entry["lesion_slice_dice"] == row["mean"]["lesion_slice_dice"]
    assert served["perfect"]["mean_dice_3d"] == served["perfect"]["lesionwise_dice"] == 1
    assert served["empty"]["mean_dice_3d"] == 0 and served["empty"]["lesion_sensitivity_3d"] == 0
    best = max(served, key=lambda name: served[name]["mean_dice_3d"])
    assert saved["served"] == {**served[best], "chosen_by": "highest cross-fitted served mean per-patient 3D Dice"}
    assert saved["served"]["bundle"] == "perfect"
    # FROC: the perfect maps' lesions are the ground truth's, each of probability 1; the empty ones have none
    assert saved["served"]["froc"] == {"points": [{"threshold": 1.0, "sensitivity": 1.0, "fp_per_patient": 0.0}],
                                       "cpm": 1.0}
    assert served["empty"]["froc"] == {"points": [], "cpm": 0.0}
    assert "| perfect |" + " 1.000 |" * 8 in md and (out / "cv_froc.png").read_bytes().startswith(b"\x89PNG")
    assert "## Served model, cross-fitted" in md and "Served: **perfect**" in md and "| selected (in-sample) |" in md


def test_served_figures_wait_for_every_fold_of_a_bundle(phantom, tmp_path):
    """A bundle with a fold not done has no served entry (its steps would be chosen on fewer folds), a note says so,
    and no bundle is served until every bundle has its entry."""
    from metaseg.evaluation import cv_report as cv

    found, truth, plan = hand_written_runs(phantom, tmp_path / "runs")
    (tmp_path / "runs" / "empty" / "fold_1" / "fold.json").unlink()
    out = tmp_path / "reports"
    result = cv.report(phantom, found, tmp_path / "runs", out, plan, ["perfect", "empty"], "metaseg cv", 50)
    assert set(result["served_per_bundle"]) == {"perfect"} and "served" not in result
    assert result["served_skipped"] == {"empty": "1 of 2 folds done: each fold's steps are chosen on all the other "
                                                 "folds"}
    assert "- empty: no served figures: 1 of 2 folds done" in (out / "cv.md").read_text()
    assert cv.served_skipped([0], 1) == "one fold only: there are no other folds to choose the steps on"


def lesions_of(gt: np.ndarray) -> int:
    from metaseg.inference import lesions

    labels, n = lesions.label(gt)
    return int((np.bincount(labels.ravel())[1:] > 2).sum())


def test_an_interrupted_fold_resumes_in_its_run_folder_and_keeps_its_log(phantom, tmp_path, monkeypatch):
    """No trained.json: training runs again in the same folder (the bundle resumes from models/checkpoint.pt)."""
    import metaseg.training.pipeline
    from metaseg.training import cv
    from metaseg.data.discovery import discover

    found = discover(phantom)
    plan = {"folds": 2, "seed": 0, "splits": splits_final(assign_folds(found.patients, 2, 0))}
    fold = tmp_path / "attention_unet" / "fold_1"
    (fold / "models").mkdir(parents=True)
    (fold / "models" / "checkpoint.pt").write_bytes(b"epoch 1 of 2")
    (fold / "train.log").write_text("epoch 1 of 2\n")
    calls = []
    monkeypatch.setattr(metaseg.training.pipeline, "train", lambda bundle, data, run, **kw: calls.append((run, kw)))
    monkeypatch.setattr(cv, "predict_fold", lambda *args: calls.append("predicted"))
    cv.run_fold(Path("bundle"), "attention_unet", phantom, found, plan, 1, tmp_path, {"epochs": 2, "val_interval": 2})
    (run, kwargs), predicted = calls
    assert run == fold and predicted == "predicted" and (fold / "train.log.1").read_text() == "epoch 1 of 2\n"
    assert kwargs["epochs"] == 2 and kwargs["datalist"]["patients"]["test"] == plan["splits"][1]["val"]
    assert json.loads((fold / "trained.json").read_text())["resumed"] is True
    assert json.loads((fold / "fold.json").read_text())["patients"] == plan["splits"][1]["val"]
    calls.clear()
    cv.run_fold(Path("bundle"), "attention_unet", phantom, found, plan, 1, tmp_path, {"epochs": 2, "val_interval": 2})
    assert calls == ["predicted"]  # trained.json: training is not repeated, only the missing predictions


def first_fold_reported(out: Path) -> bool:
    """The reports were rewritten after the first fold (written atomically: a file is complete or absent)."""
    try:
        return json.loads((out / "cv.json").read_text())["folds_done"]["unetpp"] == [0]
    except (OSError, KeyError):
        return False


def test_cv_runs_end_to_end_and_resumes_after_a_kill(phantom, tmp_path):
    from metaseg.data.ground_truth import read_ground_truth
    from metaseg.data.discovery import discover

    out, runs = tmp_path / "reports", tmp_path / "runs"
    args = ["cv", "--data", phantom, "--folds", 2, "--epochs", 1, "--spatial-size", 32, "--out", out, "--runs", runs,
            "--bootstrap", 100]
    first = runs / "unetpp" / "fold_0"
    child = subprocess.Popen([sys.executable, "-m", "metaseg.cli", *map(str, args)], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.time() + 900
        while not first_fold_reported(out) and child.poll() is None and time.time() < deadline:
            time.sleep(0.2)
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # the whole group, the bundle's training child too
        child.wait()
    assert (first / "fold.json").is_file() and not (runs / "unetpp" / "fold_1" / "fold.json").exists()
    partial = json.loads((out / "cv.json").read_text())
    assert partial["complete"] is False and partial["folds_done"]["unetpp"] == [0]
    assert "PARTIAL" in (out / "cv.md").read_text()
    stamps = {f: f.stat().st_mtime_ns for f in (first / "models" / "model.pt", first / "train.log")}

    result = metaseg(*args)
    assert result.returncode == 0, result.stderr
    assert "cv: unetpp fold 0 already done, skipped" in result.stdout
    assert {f: f.stat().st_mtime_ns for f in stamps} == stamps  # the finished fold was not trained again

    report = json.loads((out / "cv.json").read_text())
    patients = sorted(discover(phantom).patients)
    assert report["complete"] is True and report["folds"] == 2 and report["seed"] == 0
    assert sorted(p for ids in report["patients"].values() for p in ids) == patients
    one_channel = {f"{n} (one-channel input)" for n in ("unetpp", "attention_unet")}
    stripped = {f"{n} (skull-stripped input)" for n in ("unetpp", "attention_unet")}
    deployed = {f"{n} + its inference steps" for n in ("unetpp", "attention_unet")}
    served = {f"{n} served (cross-fitted steps)" for n in ("unetpp", "attention_unet")}
    served_stripped = {f"{n} served, skull-stripped input" for n in ("unetpp", "attention_unet")}
    assert set(report["models"]) == {"unetpp", "attention_unet", "selected", *one_channel, *stripped, *deployed,
                                     *served, *served_stripped}
    assert report["skull_stripped"]["bundle"] == report["served"]["bundle"]
    assert report["skull_stripped"]["n_patients"] == 6 and "site_cv" not in report
    assert report["served"]["bundle"] in {"unetpp", "attention_unet"}
    assert set(report["one_channel_loss"]) == {"unetpp", "attention_unet"}
    plan = json.loads((runs / "splits_final.json").read_text())
    assert [s["val"] for s in plan] == list(report["patients"].values())
    for k, split in enumerate(plan):  # the bundle trained on the other folds, never on its held-out patients
        datalist = json.loads((runs / "attention_unet" / f"fold_{k}" / "datalist.json").read_text())
        assert datalist["patients"]["test"] == split["val"] and datalist["patients"]["training"] == split["train"]
        assert set(datalist["patients"]["validation"]) <= set(split["train"])

    # the reported Dice comes from the saved out-of-fold probabilities at the default threshold
    found = discover(phantom)
    from dataclasses import asdict

    from metaseg.data.datalist import by_patient

    _, truth = read_ground_truth(phantom, found.root, by_patient([asdict(p) for p in found.pairs]))
    model = report["models"]["attention_unet"]
    assert sorted(model["dice_3d_per_patient"]) == patients
    for k, ids in report["patients"].items():
        for patient in ids:
            with np.load(runs / "attention_unet" / f"fold_{k}" / "oof" / f"{patient}.npz") as npz:
                assert npz["prob"].dtype == np.uint8 and npz["prob"].shape == npz["prob_flip"].shape == (4, 256, 256)
                assert npz["prob_one_channel"].shape == (4, 256, 256)  # FLAIR alone: the model's one-channel input
                assert npz["prob_skull_stripped"].shape == npz["prob_skull_stripped_flip"].shape == (4, 256, 256)
                expected = dice_3d(truth[patient], npz["prob"] / 255 > 0.5)
            assert model["dice_3d_per_patient"][patient] == pytest.approx(expected)
    assert model["mean_dice_3d"] == pytest.approx(np.mean(list(model["dice_3d_per_patient"].values())))
    assert report["paired_test"]["n_patients"] == 6 and report["paired_test"]["models"] == ["unetpp", "attention_unet"]

    chosen = json.loads((out / "cv_postprocessing.json").read_text())
    assert chosen["config"] == report["models"]["selected"]["config"] == report["postprocessing"]["config"]
    tried = [s["step"] for s in chosen["steps"]]
    steps = ["baseline", "ensemble", "flip_tta", "threshold", "min_lesion_voxels", "min_lesion_score", "hysteresis",
             "largest_component"]  # the selection's order; a step is tried or skipped with its reason, never both
    assert sorted(tried + list(chosen["skipped"]), key=steps.index) == steps and tried[:4] == steps[:4]
    assert "not declared one lesion per patient" in chosen["skipped"]["largest_component"]  # as the bundles say
    for name, entry in report["models"].items():
        assert all(key in entry for key in LESION_KEYS), name
    # the served figure is each fold's held-out patients under the steps chosen without them, from the saved maps
    for name, served in report["served_per_bundle"].items():
        assert set(served["steps_per_fold"]) == set(report["patients"])
        for k, ids in report["patients"].items():
            config = {**inference_steps.DEFAULT, **served["steps_per_fold"][k], "models": [name]}
            for patient in ids:
                with np.load(runs / name / f"fold_{k}" / "oof" / f"{patient}.npz") as npz:
                    maps = {name: {key: npz[key] for key in ("prob", "prob_flip")}}
                expected = dice_3d(truth[patient], inference_steps.mask(inference_steps.probability(maps, config), config))
                assert served["dice_3d_per_patient"][patient] == pytest.approx(expected), (name, patient)
    md = (out / "cv.md").read_text()
    assert "All folds done." in md and "| attention_unet | 6 |" in md and "A single uploaded 2D slice gets" in md
    assert (out / "cv_folds.png").stat().st_size > 0

    # a rerun with another plan is refused rather than mixed into these folds
    assert_user_error(metaseg(*args[:-2], "--seed", 1), "holds a cross-validation with other")


def test_the_site_split_never_puts_a_site_in_both_training_and_scoring():
    patients = ["TCGA_HT_7602_19951103", "TCGA_CS_4941_19960909", "TCGA_DU_5849_19950405", "TCGA_CS_6186_20000601",
                "TCGA_EZ_7264_20010816", "TCGA_HT_A61B_19991127", "TCGA_DU_7010_19860307"]
    sites, folds = site_folds(patients)
    assert sites == ["CS", "DU", "EZ", "HT"]
    assert folds == [["TCGA_CS_4941_19960909", "TCGA_CS_6186_20000601"], ["TCGA_DU_5849_19950405",
                     "TCGA_DU_7010_19860307"], ["TCGA_EZ_7264_20010816"], ["TCGA_HT_7602_19951103",
                                                                           "TCGA_HT_A61B_19991127"]]
    for site, split in zip(sites, splits_final(folds)):
        assert {p.split("_")[1] for p in split["val"]} == {site}
        assert site not in {p.split("_")[1] for p in split["train"]}
        assert sorted(split["train"] + split["val"]) == sorted(patients)
    with pytest.raises(UserError, match="at least two sites"):
        site_folds(["TCGA_CS_4941_19960909", "TCGA_CS_6186_20000601"])
    with pytest.raises(UserError, match="needs TCGA patient ids"):
        site_folds(["TCGA_CS_4941_19960909", "SYN_000"])


def test_the_report_shows_the_skull_stripped_view_and_the_site_figure(phantom, tmp_path):
    """Hand-written maps: `perfect`'s skull-stripped view finds nothing for fold 1's patients, so the served figure
    of the stripped view is fold 0's share and its loss the rest; its leave-one-site-out run (two made-up sites)
    misses every patient of site BB: per site 1 and 0, and the gap to the patient CV is BB's share."""
    from metaseg.evaluation import cv_report as cv
    from metaseg.evaluation import out_of_fold

    found, truth, plan = hand_written_runs(phantom, tmp_path / "runs")
    for k, split in enumerate(plan["splits"]):
        for patient in split["val"]:
            file = tmp_path / "runs" / "perfect" / f"fold_{k}" / "oof" / f"{patient}.npz"
            maps = out_of_fold.read_npz(file)
            stripped = maps["prob"] if k == 0 else np.zeros_like(maps["prob"])
            out_of_fold.write_npz(file, **maps, prob_skull_stripped=stripped, prob_skull_stripped_flip=stripped)
    site_b = plan["splits"][1]["val"]
    site_plan = {**plan, "split": "site", "sites": ["AA", "BB"]}
    for k, split in enumerate(site_plan["splits"]):
        for patient in split["val"]:
            prob = out_of_fold.as_uint8(truth[patient] * float(patient not in site_b))
            out_of_fold.write_npz(tmp_path / "site" / "perfect" / f"fold_{k}" / "oof" / f"{patient}.npz", prob=prob,
                                  prob_flip=prob)
        (tmp_path / "site" / "perfect" / f"fold_{k}" / "fold.json").write_text("{}")
    out = tmp_path / "reports"
    site_result = cv.report(phantom, found, tmp_path / "site", out / "site_cv", site_plan, ["perfect"], "site", 50)
    assert site_result["sites"] == ["AA", "BB"] and site_result["complete"]
    assert "# Leave-one-site-out cross-validation (2 sites: AA, BB)" in (out / "site_cv" / "cv.md").read_text()

    saved = cv.report(phantom, found, tmp_path / "runs", out, plan, ["perfect", "empty"], "metaseg cv", 50)
    n, n_b = len(truth), len(site_b)
    stripped = saved["skull_stripped"]
    assert stripped["bundle"] == "perfect" and stripped["n_patients"] == n
    assert stripped["mean_dice_3d"] == pytest.approx((n - n_b) / n)
    assert stripped["loss"]["mean_difference"] == pytest.approx(n_b / n)
    assert saved["models"]["perfect (skull-stripped input)"]["mean_dice_3d"] == pytest.approx((n - n_b) / n)
    served_row = saved["models"]["perfect served, skull-stripped input"]
    assert served_row["dice_3d_per_patient"] == stripped["dice_3d_per_patient"]
    assert "empty (skull-stripped input)" not in saved["models"]  # its files hold no such view
    site = saved["site_cv"]
    assert site["bundle"] == "perfect" and site["complete"] and site["steps"].startswith("served")
    assert site["per_site"] == {"AA": {"mean_dice_3d": 1.0, "n_patients": n - n_b},
                                "BB": {"mean_dice_3d": 0.0, "n_patients": n_b}}
    assert site["mean_dice_3d"] == pytest.approx((n - n_b) / n)
    assert site["gap"]["mean_difference"] == pytest.approx(n_b / n)
    md = (out / "cv.md").read_text()
    assert "## New sites and brain-extracted input (served model)" in md and "[report](site_cv/cv.md)" in md
    assert f"AA 1.000 ({n - n_b} patients); BB 0.000 ({n_b} patients)" in md
    assert "Skull-stripped input (everything outside a brain mask" in md


def test_a_fold_of_an_older_run_gets_only_the_missing_view(phantom, tmp_path, monkeypatch):
    """A finished fold whose files lack the skull-stripped view: running it again adds that view from the slices
    brain-extracted and keeps the saved maps as they were; a complete file is not touched."""
    from metaseg.data.datalist import build_datalist, by_patient
    from metaseg.data.discovery import discover
    from metaseg.evaluation import out_of_fold
    from metaseg.training import cv

    found = discover(phantom)
    items = build_datalist(found, split={"training": [], "validation": [], "test": found.patients[:2]})["test"]
    first, second = by_patient(items)
    old = {"prob": np.full((4, 8, 8), 7, np.uint8), "prob_flip": np.full((4, 8, 8), 9, np.uint8)}
    out_of_fold.write_npz(tmp_path / "oof" / f"{first}.npz", **old, slices=np.arange(4))
    complete = {**old, "prob_skull_stripped": old["prob"], "prob_skull_stripped_flip": old["prob"]}
    out_of_fold.write_npz(tmp_path / "oof" / f"{second}.npz", **complete, slices=np.arange(4))
    stamp = (tmp_path / "oof" / f"{second}.npz").stat().st_mtime_ns
    assert not out_of_fold.views_complete(tmp_path, [first, second])
    (tmp_path / retention.FOLD_FILE).write_text(json.dumps({"phantom": selection.REFERENCE_PHANTOM, "keep_scores": {}}))
    seen = []

    class Engine:
        def __init__(self, *args, **kwargs):
            pass

        def probabilities(self, frames, view):
            seen.append(frames)
            return [np.full(f.shape[-2:], 0.5) for f in frames]

    monkeypatch.setattr("metaseg.inference.engine.Engine", Engine)
    monkeypatch.setattr("metaseg.conventions.model_overrides", lambda run: {})
    cv.predict_fold(tmp_path, REPO / "bundles" / "attention_unet", phantom, found.root, items)
    saved = out_of_fold.read_npz(tmp_path / "oof" / f"{first}.npz")
    assert np.array_equal(saved["prob"], old["prob"]) and np.array_equal(saved["prob_flip"], old["prob_flip"])
    assert saved["prob_skull_stripped"].shape == (4, 256, 256) and (saved["prob_skull_stripped"] == 128).all()
    assert len(seen) == 2 and all((f == 0).any() for f in seen[0])  # only the stripped view ran, on stripped slices
    assert (tmp_path / "oof" / f"{second}.npz").stat().st_mtime_ns == stamp
    assert out_of_fold.views_complete(tmp_path, [first, second])


def test_cv_bad_arguments_are_one_line(phantom, tmp_path):
    assert_user_error(metaseg("cv", "--data", phantom, "--folds", 7, "--runs", tmp_path), "--folds must be between")
    assert_user_error(metaseg("cv", "--data", phantom, "--split", "site", "--runs", tmp_path), "needs TCGA patient ids")
    assert_user_error(metaseg("cv", "--data", tmp_path / "none", "--runs", tmp_path), "data not found")
    assert_user_error(metaseg("cv", "--data", phantom, "--bundle", "nope", "--runs", tmp_path), "not a bundle")


def script(name: str, *args) -> None:
    """scripts/NAME.py's main(ARGS) in this process, as `python scripts/NAME.py ARGS` runs it."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main([str(a) for a in args])


def assert_script_error(name: str, args: list, fragment: str, out: Path) -> None:
    """The script stops with one readable line (SystemExit with a message: Python prints it alone and exits 1),
    and writes nothing."""
    with pytest.raises(SystemExit) as stopped:
        script(name, *args, "--out", out)
    message = stopped.value.code
    assert isinstance(message, str) and "\n" not in message and "Traceback" not in message, message
    assert message.startswith(f"{name}: ") and fragment in message, message
    assert not out.exists()


def test_compare_cv_pairs_two_recipes_by_patient_and_refuses_unpaired_runs(tmp_path):
    """scripts/compare_cv.py: model A of one cv.json against model B of another, over the patients both scored."""
    def cv_json(path: Path, seed: int, dice: dict) -> Path:
        path.write_text(json.dumps({"folds": 2, "seed": seed, "patients": {"0": ["p1", "p2"], "1": ["p3", "p4"]},
                                    "complete": True, "command": f"metaseg cv --seed {seed}",
                                    "models": {"net": {"dice_3d_per_patient": dice}}}))
        return path

    a = cv_json(tmp_path / "a.json", 0, {"p1": 0.8, "p2": 0.6, "p3": 0.7, "p4": 0.9})
    b = cv_json(tmp_path / "b.json", 0, {"p1": 0.7, "p2": 0.6, "p3": 0.5})  # a partial run: p4 not scored yet
    script("compare_cv", a, b, "--pair", "net=net", "--out", tmp_path / "out")
    (row,) = json.loads((tmp_path / "out" / "comparison.json").read_text())["rows"]
    assert row["patients"] == ["p1", "p2", "p3"]
    assert row["paired_a_minus_b"]["mean_difference"] == pytest.approx(0.1)
    assert "| net | net | 3 | 0.700 | 0.600 | +0.100" in (tmp_path / "out" / "comparison.md").read_text()
    other_seed = cv_json(tmp_path / "c.json", 1, {"p1": 0.7})
    for args, fragment in (([a, other_seed, "--pair", "net=net"], "different folds or seeds"),
                           ([a, b, "--pair", "net=missing"], "no model missing in B"),
                           ([a, tmp_path / "none.json", "--pair", "net=net"], "cannot read a cv.json"),
                           ([a, REPO / "bundles" / "best.json", "--pair", "net=net"], "not a cv.json")):
        assert_script_error("compare_cv", args, fragment, tmp_path / "bad")
    # told that the folds differ (3 against 5 folds, say), it pairs by patient all the same and says so
    script("compare_cv", a, other_seed, "--pair", "net=net", "--other-folds", "--out", tmp_path / "k")
    assert json.loads((tmp_path / "k" / "comparison.json").read_text())["rows"][0]["patients"] == ["p1"]
    assert "Different folds (A: 2 folds, seed 0; B: 2 folds, seed 1)" in (tmp_path / "k" / "comparison.md").read_text()


def test_dice_by_volume_splits_patients_at_the_median_lesion_volume(phantom, tmp_path):
    """scripts/dice_by_volume.py: a model's out-of-fold Dice per patient against the lesion volume in the data."""
    from metaseg.data.discovery import discover

    volume = {}
    for pair in discover(phantom).pairs:
        volume[pair.patient] = volume.get(pair.patient, 0) + pair.lesion_pixels
    with_lesion = sorted((p for p in volume if volume[p]), key=volume.get)
    assert len(with_lesion) >= 4, volume
    dice = {p: 0.5 + 0.1 * rank for rank, p in enumerate(with_lesion)}  # the larger the lesion, the higher the Dice
    cv = tmp_path / "cv.json"
    cv.write_text(json.dumps({"folds": 2, "seed": 0, "patients": {}, "complete": True, "command": "metaseg cv",
                              "models": {"net": {"dice_3d_per_patient": dice}}}))
    script("dice_by_volume", cv, "--data", phantom, "--model", "net", "--out", tmp_path / "out")
    result = json.loads((tmp_path / "out" / "dice_by_volume.json").read_text())
    small, large = result["halves"]["smaller"], result["halves"]["larger"]
    assert small["patients"] + large["patients"] == len(with_lesion)
    assert small["mean_dice_3d"] < large["mean_dice_3d"] and small["volume_range"][1] <= large["volume_range"][0]
    assert result["spearman"]["rho"] == pytest.approx(1.0)
    assert [row["patient"] for row in result["lowest"]][:2] == with_lesion[:2]
    for args, fragment in ((["--model", "missing"], "no model 'missing'"),
                           (["--model", "net", "--data", tmp_path / "none"], "data not found")):
        assert_script_error("dice_by_volume", [cv, "--data", phantom, *args], fragment, tmp_path / "bad")


def test_seed_ensemble_scores_each_run_and_their_mean_out_of_fold(phantom, tmp_path):
    """scripts/seed_ensemble.py on hand-made runs: one run's maps are the truth, the other's are empty; their mean
    (0.5) still passes the 0.5 threshold, so the ensemble scores as the perfect run does."""
    from metaseg.data.datalist import by_patient
    from metaseg.data.ground_truth import read_ground_truth
    from metaseg.data.discovery import discover

    found = discover(phantom)
    _, truth = read_ground_truth(phantom, found.root, by_patient([asdict(p) for p in found.pairs]))
    with_lesion = [p for p in sorted(truth) if truth[p].any()]
    folds = [with_lesion[::2], with_lesion[1::2]]

    def runs(name: str, seed: int, prob) -> Path:
        folder = tmp_path / name
        (folder / "cv_plan.json").parent.mkdir(parents=True)
        (folder / "cv_plan.json").write_text(json.dumps({"folds": 2, "seed": seed, "recipe": {"epochs": 1},
                                                         "splits": [{"val": f, "train": []} for f in folds]}))
        for k, patients in enumerate(folds):
            oof = folder / "attention_unet" / f"fold_{k}" / "oof"
            oof.mkdir(parents=True)
            for p in patients:
                maps = (prob(truth[p]) * 255).astype(np.uint8)
                np.savez(oof / f"{p}.npz", prob=maps, prob_flip=maps)
            (oof.parent / "fold.json").write_text("{}")
        return folder

    perfect, empty = runs("a", 0, lambda gt: gt.astype(float)), runs("b", 1, lambda gt: np.zeros(gt.shape))
    bundle = ["--data", phantom, "--bundle", "attention_unet"]
    script("seed_ensemble", *bundle, "--runs", perfect, "--runs", empty, "--out", tmp_path / "out")
    result = json.loads((tmp_path / "out" / "seed_ensemble.json").read_text())
    means = {row["label"]: row["argmax"]["mean_dice_3d"] for row in result["rows"]}
    assert means == {str(perfect): 1.0, str(empty): 0.0, "ensemble": 1.0}
    assert result["patients"] == len(with_lesion) and result["spread"]["argmax"] == 1.0
    assert result["ensemble_minus_mean_single"]["argmax"]["mean_difference"] == pytest.approx(0.5)
    other = runs("c", 2, lambda gt: gt.astype(float))
    plan = json.loads((other / "cv_plan.json").read_text())
    (other / "cv_plan.json").write_text(json.dumps({**plan, "recipe": {"epochs": 2}}))
    (perfect / "attention_unet" / "fold_1" / "fold.json").rename(tmp_path / "moved.json")
    one_patient = tmp_path / "one" / "Data"  # data that lacks most of the runs' patients
    shutil.copytree(phantom / with_lesion[0], one_patient / with_lesion[0])
    also_empty = runs("d", 3, lambda gt: np.zeros(gt.shape))
    for bad_args, fragment in ((["--runs", empty, "--runs", other], "different recipes"),
                               (["--runs", perfect, "--runs", empty], "not every fold"),
                               (["--runs", empty], "at least twice"),
                               (["--runs", empty, "--runs", tmp_path / "none"], "no readable cv_plan"),
                               (["--runs", empty, "--runs", also_empty, "--data", one_patient], "are not in")):
        assert_script_error("seed_ensemble", [*bundle, *bad_args], fragment, tmp_path / "bad")


def fake_fold(bundle, name, data, found, plan, k, runs, overrides, trained: list | None = None):
    """run_fold without training: seeded probabilities per patient (the same in any runs folder), as predict_fold
    stores them, and fold.json."""
    from metaseg.evaluation.out_of_fold import as_uint8, write_npz
    from metaseg.files import write_json_atomic

    fold_dir = runs / name / f"fold_{k}"
    for patient in plan["splits"][k]["val"]:
        slices = sorted(p.slice for p in found.pairs if p.patient == patient)
        rng = np.random.default_rng([k, len(name), sum(map(ord, patient))])
        prob = rng.random((len(slices), 256, 256)).astype(np.float32) ** 4
        write_npz(fold_dir / "oof" / f"{patient}.npz", prob=as_uint8(prob), prob_flip=as_uint8(prob[..., ::-1]),
                  slices=np.array(slices))
    write_json_atomic(fold_dir / "fold.json", {"bundle": name, "fold": k, "patients": plan["splits"][k]["val"]})
    if trained is not None:
        trained.append((name, k))


def test_one_fold_per_command_then_collect_equals_a_whole_run(phantom, tmp_path, monkeypatch):
    """`--fold K` trains (here: fakes) only fold K of each bundle and reports nothing; `--collect` trains nothing and
    reports whatever folds are done; folds run apart and then collected give the whole run's report."""
    from metaseg.training import cv

    trained = []
    monkeypatch.setattr(cv, "run_fold", lambda *args: fake_fold(*args, trained=trained))
    common = dict(data=phantom, bundles=["unetpp", "attention_unet"], folds=2, seed=0, n_resamples=50)
    assert cv.cross_validate(**common, out=tmp_path / "apart_out", runs=tmp_path / "apart", fold=1) is None
    assert sorted(trained) == [("attention_unet", 1), ("unetpp", 1)] and not (tmp_path / "apart_out").exists()
    partial = cv.cross_validate(**common, out=tmp_path / "apart_out", runs=tmp_path / "apart", collect=True)
    assert not partial["complete"] and partial["folds_done"] == {"unetpp": [1], "attention_unet": [1]}
    assert len(trained) == 2  # collect trained nothing
    cv.cross_validate(**common, out=tmp_path / "apart_out", runs=tmp_path / "apart", fold=0)
    apart = cv.cross_validate(**common, out=tmp_path / "apart_out", runs=tmp_path / "apart", collect=True)
    whole = cv.cross_validate(**common, out=tmp_path / "whole_out", runs=tmp_path / "whole")
    assert apart["complete"] and len(trained) == 8  # 2 apart, 2 apart, 4 in the whole run
    assert json.dumps(apart["models"], sort_keys=True, default=str) == \
        json.dumps(whole["models"], sort_keys=True, default=str)
    with pytest.raises(UserError, match="--fold must be between 0 and 1"):
        cv.cross_validate(**common, runs=tmp_path / "apart", fold=2)
    with pytest.raises(UserError, match="does not go with --collect"):
        cv.cross_validate(**common, runs=tmp_path / "apart", fold=0, collect=True)
