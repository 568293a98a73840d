"""What a minimum lesion score would take from the reference phantom's metastases, as a trained model sees them.

The phantom's perfect masks (probability 1 inside every lesion) keep every score, so the rule that bounds the
minimum size (keep KEEP_REFERENCE_SHARE of the reference phantom's lesions) says nothing about a score step. A
model's probabilities do: a small metastasis is often found at a probability just over the threshold. A model
segments the reference phantom as served (its plain probabilities, and the flip-TTA mean); for every scored
ground-truth lesion it finds at a threshold, the lesion's *keep score* is the highest score
(metaseg.inference.lesions.scores) of the predicted lesions that match it: min_lesion_score keeps it detected exactly
up to that value. `metaseg cv` measures each fold model (FOLD_FILE beside its out-of-fold files) and the step
selection tries only the scores that keep the share (selection.score_caps); `metaseg retention` measures any
`metaseg train` run, e.g. the demo's.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from metaseg.evaluation.metrics import Target, targets
from metaseg.evaluation.selection import (KEEP_REFERENCE_SHARE, REFERENCE_PHANTOM, THRESHOLDS, KeepScores,
                                          reference_phantom, score_cap)
from metaseg.files import write_json_atomic
from metaseg.inference.lesions import label, scores
from metaseg.inference.steps import network_maps, probability

FOLD_FILE = "phantom_keep_scores.json"  # a `metaseg cv` fold's keep scores, beside its oof/ folder


def keep_scores(found: list[Target], prob: np.ndarray, threshold: float) -> list[dict]:
    """`{"voxels", "keep_score"}` of each scored ground-truth lesion of one patient (`found`: its
    metaseg.evaluation.metrics.targets) that the threshold's mask detects (metaseg.evaluation.metrics.detected): the
    highest score (metaseg.inference.lesions.scores) of the predicted lesions in its reach."""
    labels, n = label(prob >= threshold)
    top = scores(labels, n, prob)[0]
    kept = []
    for target in found:
        hits = np.unique(labels[target.box][target.reach])
        hits = hits[hits > 0]
        if target.scored and hits.size:
            kept.append({"voxels": target.voxels, "keep_score": float(top[hits - 1].max())})
    return kept


@functools.cache
def reference_frames() -> tuple[dict[str, list[np.ndarray]], dict[str, np.ndarray]]:
    """The reference phantom's input frames (as an upload of its files decodes them) and ground-truth stack per
    patient."""
    from metaseg.imageio.reader import decode  # here: the image readers load only where frames are decoded

    images, truth = reference_phantom()
    return {patient: [decode([("slice.tif", image)]).inputs[0] for image in files]
            for patient, files in images.items()}, truth


def model_keep_scores(engine) -> dict:
    """One model's (a metaseg.inference.engine.Engine's) keep scores of the reference phantom's lesions at every
    threshold of the selection, of its plain probabilities and of their flip-TTA mean (selection.KeepScores), with
    how many scored lesions the phantom has."""
    frames, truth = reference_frames()
    measured: dict = {"plain": {str(t): [] for t in THRESHOLDS}, "flip": {str(t): [] for t in THRESHOLDS}}
    lesions = 0
    for patient, gt in truth.items():
        found = targets(gt)
        lesions += sum(t.scored for t in found)
        maps = {"model": network_maps(engine, frames[patient], flip=True)}
        for view, flip in (("plain", False), ("flip", True)):  # the flip-TTA mean as the selection takes it
            prob = probability(maps, {"models": ["model"], "flip_tta": flip})
            for t in THRESHOLDS:
                measured[view][str(t)] += keep_scores(found, prob, t)
    return {"phantom": REFERENCE_PHANTOM, "lesions": lesions, "keep_scores": measured}


def fold_keep_scores(fold_dir: Path, engine) -> KeepScores:
    """A `metaseg cv` fold model's keep scores: measured once (`engine`: a callable loading the fold's Engine, called
    only then) and kept in the fold's FOLD_FILE; a file of another reference phantom, or unreadable, is measured
    again."""
    measured = read_fold(fold_dir)
    if measured is None:
        write_json_atomic(fold_dir / FOLD_FILE, model_keep_scores(engine()))
        measured = read_fold(fold_dir)
    return measured


def read_fold(fold_dir: Path) -> KeepScores | None:
    """A fold's measured keep scores, or None where it has none (a fold of an older `metaseg cv`, or a file of another
    reference phantom or unreadable)."""
    try:
        measured = json.loads((fold_dir / FOLD_FILE).read_text())
    except (OSError, ValueError):
        return None
    return measured.get("keep_scores") if isinstance(measured, dict) and measured.get("phantom") == REFERENCE_PHANTOM \
        else None


def summary(name: str, measured: dict) -> str:
    """One line: the lesions a model finds at 0.5, and the highest score that keeps the share of them."""
    kept = measured["keep_scores"]["plain"]["0.5"]
    small = [lesion["keep_score"] for lesion in kept if lesion["voxels"] < 100]
    return (f"{name}: finds {len(kept)} of {measured['lesions']} reference phantom lesions at threshold 0.5; a "
            f"min_lesion_score up to {score_cap([lesion['keep_score'] for lesion in kept]):.3f} keeps "
            f"{KEEP_REFERENCE_SHARE:.0%} of them (lowest keep score of one under 100 voxels: "
            f"{min(small, default=float('nan')):.3f})")
