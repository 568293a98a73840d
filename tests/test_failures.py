"""`metaseg failures`: the served model's worst out-of-fold patients as pictures and one line each, on hand-made masks
and on out-of-fold maps written as `metaseg cv` writes them for a phantom."""

from __future__ import annotations

import io
import json
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from scipy import ndimage

from conftest import assert_user_error, metaseg
from metaseg.evaluation import failures as fail
from metaseg.evaluation.figures import BOTH_COLOUR, PREDICTION_COLOUR, STRIP_GAP, TRUTH_COLOUR, outline


def box(stack: np.ndarray, slices, rows, cols) -> np.ndarray:
    stack[slices, rows, cols] = True
    return stack


def test_the_line_names_missed_and_false_lesions_with_their_sizes_largest_error_first():
    gt = np.zeros((20, 32, 32), bool)
    box(gt, slice(2, 4), slice(2, 12), slice(2, 12))  # 200 voxels, found whole
    box(gt, slice(2, 5), slice(20, 30), slice(20, 30))  # 300 voxels, missed
    pred = box(np.zeros_like(gt), slice(2, 4), slice(2, 12), slice(2, 12))
    box(pred, slice(16, 18), slice(2, 7), slice(2, 7))  # a false lesion of 50 voxels, 12 slices from slice 4
    box(pred, slice(10, 11), slice(20, 22), slice(20, 22))  # and one of 4 voxels
    assert fail.what_went_wrong(gt, pred) == ("missed 1 of 2 lesions (300 voxels); 2 false lesions, the largest "
                                              "50 voxels, 12 slices from the nearest true lesion")


def test_the_line_says_how_a_found_lesion_is_drawn():
    gt = box(np.zeros((6, 32, 32), bool), slice(1, 5), slice(4, 14), slice(4, 14))  # 400 voxels
    half = box(np.zeros_like(gt), slice(1, 5), slice(4, 14), slice(4, 9))  # 200 of them
    assert fail.what_went_wrong(gt, half) == ("found 1 of 1 lesions, under-segmented: predicted 50% of their true "
                                              "volume, Dice 0.67 on them")
    grown = ndimage.binary_dilation(gt, iterations=2)
    assert "over-segmented" in fail.what_went_wrong(gt, grown)
    assert fail.what_went_wrong(gt, gt) == "no wrong voxel"
    empty = np.zeros_like(gt)
    assert fail.what_went_wrong(empty, empty) == "nothing to find, nothing found"
    assert fail.what_went_wrong(empty, half) == "1 false lesion of 200 voxels (no true lesion)"


def test_the_worst_patients_lowest_first_and_the_worst_slices_in_slice_order():
    served = {"dice_3d_per_patient": {"a": 0.9, "b": 0.1, "c": 0.5, "d": 0.1, "e": 0.7, "f": 0.3, "g": 0.95}}
    assert fail.worst_patients(served) == ["b", "d", "f", "c", "e"]
    assert fail.worst_patients({"dice_3d_per_patient": {"a": 0.9, "b": 0.2}}) == ["b", "a"]  # fewer than five
    gt, pred = np.zeros((12, 8, 8), bool), np.zeros((12, 8, 8), bool)
    for i in range(10):
        gt[i, :i + 1, 0] = True  # slice i: i + 1 wrong voxels
    pred[11, 0, 0] = True
    assert fail.shown_slices(gt, pred, cap=3) == [7, 8, 9]
    assert fail.shown_slices(gt, pred) == list(range(2, 10))  # 8 of the 11 slices with lesion


# --- the command, on out-of-fold maps as `metaseg cv` writes them ---


@pytest.fixture(scope="module")
def served_cv(tmp_path_factory) -> dict:
    """A 2-fold `metaseg cv` of a 6-patient phantom, its out-of-fold maps hand-made from the truth (one patient
    perfect, one with a lesion missed, one with a false lesion, one eroded in plane, one empty, one dilated), and cv.json with
    the served entry `served_entry` makes of them."""
    from metaseg.data.datalist import by_patient
    from metaseg.data.discovery import discover
    from metaseg.data.ground_truth import read_ground_truth
    from metaseg.data.phantom import synthesize
    from metaseg.evaluation.cv_report import served_entry
    from metaseg.evaluation.out_of_fold import as_uint8, load_oof, write_npz
    from metaseg.evaluation.selection import Scorer
    from metaseg.inference.lesions import label
    from metaseg.training.cv import assign_folds, splits_final

    folder = tmp_path_factory.mktemp("failures")
    data, runs = folder / "Data", folder / "runs"
    synthesize(data, patients=6, slices=8, seed=0)
    found = discover(data)
    _, truth = read_ground_truth(data, found.root, by_patient([asdict(p) for p in found.pairs]))
    splits = splits_final(assign_folds(found.patients, 2, 0))

    def missed(gt):
        labels, _ = label(gt)
        return gt & (labels != 1)

    def false(gt):
        return box(gt.copy(), slice(0, 2), slice(5, 25), slice(5, 25))

    in_plane = ndimage.generate_binary_structure(2, 1)[None]
    degrade = [lambda gt: gt, missed, false, lambda gt: ndimage.binary_erosion(gt, in_plane), np.zeros_like,
               lambda gt: ndimage.binary_dilation(gt, iterations=3)]
    made = dict(zip(sorted(truth), degrade))
    for k, split in enumerate(splits):
        for patient in split["val"]:
            maps = as_uint8(made[patient](truth[patient]).astype(np.float32))
            write_npz(runs / "unetpp" / f"fold_{k}" / "oof" / f"{patient}.npz", prob=maps, prob_flip=maps)
    fold_of = {p: k for k, split in enumerate(splits) for p in split["val"]}
    probs = {p: {"unetpp": m} for k, split in enumerate(splits)
             for p, m in load_oof(runs / "unetpp" / f"fold_{k}", split["val"]).items()}
    served, _ = served_entry("unetpp", truth, probs, fold_of, Scorer(truth, probs), False, 20, 0, None)
    report = folder / "reports" / "cv.json"
    report.parent.mkdir()
    result = {"folds": 2, "seed": 0, "command": "metaseg cv", "models": {},
              "patients": {str(k): split["val"] for k, split in enumerate(splits)}, "served": served}
    report.write_text(json.dumps(result))
    return {"data": data, "runs": runs, "report": report, "truth": truth, "served": served, "fold_of": fold_of}


def test_the_five_worst_patients_get_a_strip_and_a_line(served_cv, tmp_path):
    data, runs, report, served = (served_cv[key] for key in ("data", "runs", "report", "served"))
    out = tmp_path / "docs"
    result = metaseg("failures", "--data", data, "--runs", runs, "--report", report, "--out", out)
    assert result.returncode == 0, result.stderr
    dice = served["dice_3d_per_patient"]
    worst = sorted(dice, key=dice.get)[:5]
    assert dice[worst[-1]] <= min(d for p, d in dice.items() if p not in worst)
    assert sorted(p.name for p in (out / "failures").iterdir()) == sorted(f"{p}.png" for p in worst)
    assert sorted(p.name for p in out.iterdir()) == ["failures", "failures.md"]  # nothing else written
    md = (out / "failures.md").read_text()
    headings = re.findall(r"^## \d\. (\S+): 3D Dice ([\d.]+)", md, re.M)
    assert [p for p, _ in headings] == worst and [float(d) for _, d in headings] == [round(dice[p], 3) for p in worst]
    assert all(f"![{p}](failures/{p}.png)" in md for p in worst)
    assert "green outline = ground truth, magenta outline = prediction**, yellow where they run together" in md
    assert f"`metaseg failures --data {data} --runs {runs} --report {report} --out {out}`" in md

    for patient in worst:
        gt = served_cv["truth"][patient]
        pred = fail.served_mask(runs, served, served_cv["fold_of"][patient], patient)
        line = re.search(rf"## \d\. {patient}:.*\n\nWhat went wrong: (.*)\.\n", md)[1]
        assert line == fail.what_went_wrong(gt, pred)
        slices = fail.shown_slices(gt, pred)
        strip = np.asarray(PIL.Image.open(io.BytesIO((out / "failures" / f"{patient}.png").read_bytes())))
        rows, cols = gt.shape[1:]
        assert strip.shape == (rows, len(slices) * (cols + STRIP_GAP) - STRIP_GAP, 3)
        for j, i in enumerate(slices):
            panel = strip[:, j * (cols + STRIP_GAP):j * (cols + STRIP_GAP) + cols]
            truth_line, pred_line = outline(gt[i]), outline(pred[i])
            for where, colour in ((truth_line & ~pred_line, TRUTH_COLOUR), (pred_line & ~truth_line, PREDICTION_COLOUR),
                                  (truth_line & pred_line, BOTH_COLOUR)):
                assert (panel[where] == colour).all()
            assert not (panel[~(truth_line | pred_line)] == PREDICTION_COLOUR).all(axis=1).any()
    assert "missed 1 of" in md and "1 false lesion of 800 voxels" in md and "under-segmented" in md


def test_a_missing_or_wrong_report_is_one_line(served_cv, tmp_path):
    data, runs, report = served_cv["data"], served_cv["runs"], served_cv["report"]
    args = ["--data", data, "--runs", runs, "--out", tmp_path / "docs"]
    assert_user_error(metaseg("failures", *args, "--report", tmp_path / "none.json"), "cannot read a cv.json")
    unserved = tmp_path / "cv.json"
    saved = json.loads(report.read_text())
    unserved.write_text(json.dumps({**{k: v for k, v in saved.items() if k != "served"},
                                    "served_skipped": {"unetpp": "1 of 2 folds done"}}))
    assert_user_error(metaseg("failures", *args, "--report", unserved), "no served model (unetpp: 1 of 2 folds done)")
    other = json.loads(report.read_text())
    other["served"]["dice_3d_per_patient"] = {p: d / 2 + 0.01 for p, d in
                                              other["served"]["dice_3d_per_patient"].items()}
    unserved.write_text(json.dumps(other))
    assert_user_error(metaseg("failures", *args, "--report", unserved), "not the runs of this report")
    assert_user_error(metaseg("failures", "--data", data, "--runs", tmp_path, "--report", report, "--out",
                              tmp_path / "docs"), "no out-of-fold probabilities")
    assert not (tmp_path / "docs").exists()
