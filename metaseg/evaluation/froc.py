"""Free-response ROC (FROC) of lesion detection: lesion sensitivity against false lesions per patient as a threshold
on the lesion score sweeps, and its competition performance metric (CPM), as detection papers report them.

A reader counts lesions, and each false one is a finding to rule out. The candidates of a patient are the lesions
(metaseg.inference.lesions) of the binary mask the served steps produce; a candidate's score is its highest
probability (metaseg.inference.lesions.scores), and at threshold t a candidate is kept iff its score >= t. A
ground-truth lesion is detected at t iff a kept candidate matches it by metaseg.evaluation.metrics' rule (overlap
with the lesion dilated by one voxel); a kept candidate matching no ground-truth lesion is a false lesion. As there,
ground-truth lesions of at most UNSCORED_GT_VOXELS voxels are not scored, and candidates matching only them are no
false lesions. Sensitivity pools the lesions of all patients; false lesions are a mean over patients.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from metaseg.evaluation.metrics import matches, targets
from metaseg.inference.lesions import label, scores
from metaseg.inference.steps import Probs, mask, probability

FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # false lesions per patient the CPM averages sensitivity over


@dataclass(frozen=True)
class PatientCandidates:
    """What the FROC needs of one patient: every candidate's score, the score of each candidate matching no
    ground-truth lesion, and per scored ground-truth lesion the highest score of its matches (-inf if none)."""

    scores: tuple[float, ...]
    false: tuple[float, ...]
    lesions: tuple[float, ...]


def patient_candidates(gt: np.ndarray, probability: np.ndarray, pred: np.ndarray) -> PatientCandidates:
    """The candidates of one patient's boolean prediction `pred`, scored on `probability`, matched to `gt`."""
    labels, n = label(pred)
    highest, _ = scores(labels, n, probability)
    matched: set[int] = set()
    lesions = []
    for target in targets(np.asarray(gt, bool)):
        components = matches(target, labels)
        matched.update(components.tolist())
        if target.scored:
            lesions.append(float(highest[components - 1].max()) if len(components) else -np.inf)
    false = tuple(float(highest[c - 1]) for c in range(1, n + 1) if c not in matched)
    return PatientCandidates(tuple(highest.tolist()), false, tuple(lesions))


def sensitivity_at(points: list[dict], rate: float) -> float:
    """The highest sensitivity of the points with at most `rate` false lesions per patient, 0 if there is none."""
    return max((p["sensitivity"] for p in points if p["fp_per_patient"] <= rate), default=0.0)


def froc(cases: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict:
    """The FROC of patients given as (ground truth, probability, prediction) stacks (slices, rows, cols), one case at
    a time (so the volumes of many patients need not be held together).

    `points`: one per distinct candidate score t, highest first, {"threshold": t, "sensitivity": detected / scored
    ground-truth lesions of all patients, "fp_per_patient": false lesions / patients}; `cpm`: the mean over FP_RATES
    of the highest sensitivity reached at no more false lesions per patient than the rate, a rate no point reaches
    counting 0 (`sensitivity_at`). Sensitivity and CPM are NaN without any scored ground-truth lesion."""
    found = [patient_candidates(*case) for case in cases]
    best = np.array([s for p in found for s in p.lesions], float)
    false = np.array([s for p in found for s in p.false], float)
    points = [{"threshold": t,
               "sensitivity": np.count_nonzero(best >= t) / len(best) if len(best) else float("nan"),
               "fp_per_patient": np.count_nonzero(false >= t) / len(found)}
              for t in sorted({s for p in found for s in p.scores}, reverse=True)]
    cpm = float(np.mean([sensitivity_at(points, rate) for rate in FP_RATES])) if len(best) else float("nan")
    return {"points": points, "cpm": cpm}


def configured_froc(truth: Mapping[str, np.ndarray], probs: Mapping[str, Mapping[str, Probs]],
                    configs: Mapping[str, dict]) -> dict:
    """The FROC of the patients of `truth` as metaseg.evaluation.selection.score_config scores them: each patient's
    probability and mask under its own configuration of inference steps (`configs`: patient -> configuration)."""
    def cases():
        for patient, gt in truth.items():
            prob = probability(probs[patient], configs[patient])
            yield gt, prob, mask(prob, configs[patient])

    return froc(cases())
