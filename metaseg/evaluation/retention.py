"""What a minimum lesion score would take from the reference phantom's metastases, as trained models see them.

The phantom's perfect masks (probability 1 inside every lesion) keep every score, so the rule that bounds the
minimum size (keep KEEP_REFERENCE_SHARE of the reference phantom's lesions) says nothing about a score step. Models
do: a small metastasis is often found at a probability just over the threshold. The demo models (`make demo`:
both bundles trained on the phantom of seed 0, never on the reference phantom of seed 3) segment the reference
phantom unfiltered; for every scored ground-truth lesion they find at a threshold, its *keep score* is the highest
score (metaseg.inference.lesions.scores) of the predicted lesions that match it: min_lesion_score keeps it detected
exactly up to that value. `metaseg retention` writes them (selection.PHANTOM_RETENTION in the repository); the
selection tries only the scores that keep the share (selection.keeps_reference).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from metaseg.data.discovery import member, open_source
from metaseg.evaluation.metrics import targets
from metaseg.evaluation.selection import KEEP_REFERENCE_SHARE, REFERENCE_PHANTOM, THRESHOLDS, reference_phantom, score_cap
from metaseg.inference.lesions import label, scores


def keep_scores(gt: np.ndarray, prob: np.ndarray, threshold: float) -> list[dict]:
    """`{"voxels", "keep_score"}` of each scored ground-truth lesion of one patient that the threshold's mask detects
    (metaseg.evaluation.metrics.detected): the highest score of the predicted lesions in its reach."""
    labels, n = label(prob >= threshold)
    top = scores(labels, n, prob)[0] if n else np.zeros(0)
    found = []
    for target in targets(gt):
        hits = np.unique(labels[target.box][target.reach])
        hits = hits[hits > 0]
        if target.scored and hits.size:
            found.append({"voxels": target.voxels, "keep_score": float(top[hits - 1].max())})
    return found


def reference_frames(folder: Path) -> tuple[dict[str, list[np.ndarray]], dict[str, np.ndarray]]:
    """The reference phantom written to `folder`: each patient's input frames and ground-truth stack."""
    from metaseg.imageio.reader import decode  # here: the image readers load only where frames are decoded

    root, groups, truth = reference_phantom(folder)
    with open_source(folder) as files:
        frames = {patient: [decode([(name, files.read(name))]).inputs[0]
                            for name in (member(root, item["image"]) for item in items)]
                  for patient, items in groups.items()}
    return frames, truth


def measure(runs: list[tuple[str, Path]], thresholds=THRESHOLDS) -> dict:
    """Keep scores of the reference phantom's lesions for each `metaseg train` run (NAME, folder) of a bundle, at
    each threshold, from its plain lesion probabilities (no flip TTA, no step: the unfiltered model)."""
    from metaseg.bundles import bundle_dir
    from metaseg.conventions import default_weights, model_overrides
    from metaseg.inference.engine import Engine  # here: torch only where a model runs

    with tempfile.TemporaryDirectory() as folder:
        frames, truth = reference_frames(Path(folder))
    models = {}
    for name, run in runs:
        engine = Engine(bundle_dir(name), default_weights(run), overrides=model_overrides(run))
        probs = {patient: np.stack(engine.probabilities(frames[patient], view="plain")) for patient in truth}
        lesions = sum(t.scored for gt in truth.values() for t in targets(gt))
        models[name] = {"run": str(run), "lesions": lesions, "keep_scores": {
            str(t): [lesion for patient, gt in truth.items() for lesion in keep_scores(gt, probs[patient], t)]
            for t in thresholds}}
    return {"phantom": REFERENCE_PHANTOM, "keep_share": KEEP_REFERENCE_SHARE, "models": models}


def summary(measured: dict) -> list[str]:
    """One line per model: lesions found at 0.5, and the highest score that keeps the share of them."""
    lines = []
    for name, model in measured["models"].items():
        kept = [lesion["keep_score"] for lesion in model["keep_scores"]["0.5"]]
        cap = score_cap(kept)
        small = [lesion["keep_score"] for lesion in model["keep_scores"]["0.5"] if lesion["voxels"] < 100]
        lines.append(f"{name}: finds {len(kept)} of {model['lesions']} reference phantom lesions at threshold 0.5; "
                     f"a min_lesion_score up to {cap:.3f} keeps {KEEP_REFERENCE_SHARE:.0%} of them (lowest keep "
                     f"score of a lesion under 100 voxels: {min(small, default=float('nan')):.3f})")
    return lines
