"""Selection of the inference steps (metaseg.inference.steps) on out-of-fold predictions.

nnU-Net's find_best_configuration + determine_postprocessing, on lesion probabilities saved by `metaseg cv`: each
step is tried in a fixed order and kept only if it raises the out-of-fold mean per-patient 3D Dice *and* does not
lower the lesion detection sensitivity (3D lesions as metaseg.evaluation.metrics matches them, pooled over the
out-of-fold patients): a step that buys Dice by deleting a metastasis is never kept. The gain of each is reported
whether kept or not.

A minimum lesion score (a lesion's highest probability) is for the false lesions that no minimum size removes without
deleting small metastases. Its guard is twofold: the lesion rule, and the reference phantom's lesions as models see
them: the phantom's perfect masks (probability 1 inside) keep every score, so the rule is read off the models' own
probabilities on it (metaseg.evaluation.retention: `metaseg cv` runs each fold model on the reference phantom): a
score (or a hysteresis seed) is tried only where it keeps KEEP_REFERENCE_SHARE of the phantom lesions each model
finds at that threshold, with flip TTA as chosen.

The selection's own figures are in-sample (chosen and scored on the same patients); `cross_fitted` scores each fold
with the steps chosen on the other folds, the estimate of what the chosen steps do on patients they were not chosen on.
"""

from __future__ import annotations

import functools
import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from metaseg.conventions import BUNDLE_STEPS
from metaseg.data.datalist import by_patient
from metaseg.data.discovery import discover, member, open_source
from metaseg.data.ground_truth import read_ground_truth
from metaseg.data.phantom import synthesize
from metaseg.errors import UserError
from metaseg.evaluation.metrics import Target, detected, dice_3d, patient_metrics, targets
from metaseg.inference.lesions import label
from metaseg.inference.steps import DEFAULT, SLICE_STEPS, Probs, mask, probability

THRESHOLDS = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7)
MIN_LESION_VOXELS = (10, 25, 50, 100, 200, 400)
MIN_LESION_SCORES = (0.5, 0.55, 0.6, 0.7, 0.8, 0.9, 0.95)  # tried where above the chosen threshold (at or below it, no-ops)


def dice_per_patient(truth: Mapping[str, np.ndarray], probs: Mapping[str, Mapping[str, Probs]],
                     config: dict) -> dict[str, float]:
    """Per-patient 3D Dice of a configuration over the patients of `truth` (probs: patient -> model -> maps)."""
    return {p: dice_3d(gt, mask(probability(probs[p], config), config)) for p, gt in truth.items()}


def score_config(truth: Mapping[str, np.ndarray], probs: Mapping[str, Mapping[str, Probs]],
                 config: dict) -> list[dict]:
    """nnU-Net's metric_per_case for one configuration: every metric of metaseg.evaluation.metrics per patient of `truth`."""
    return [{"patient": p, **patient_metrics(gt, mask(probability(probs[p], config), config))}
            for p, gt in truth.items()]


@dataclass(frozen=True)
class Score:
    """What the selection weighs for one configuration over the out-of-fold patients: the mean per-patient 3D Dice,
    and how many of their scored ground-truth lesions it detects (metaseg.evaluation.metrics.detected), of how many."""

    mean_dice_3d: float
    detected: int
    lesions: int

    @property
    def lesion_sensitivity_3d(self) -> float:
        return self.detected / self.lesions if self.lesions else float("nan")

    def figures(self) -> dict:
        return {"mean_dice_3d": self.mean_dice_3d, "lesion_sensitivity_3d": self.lesion_sensitivity_3d}


def patient_score(gt: np.ndarray, found: list[Target], maps: Mapping[str, Probs], config: dict) -> tuple[float, int]:
    """One patient's 3D Dice under a configuration (its mask as of a volume without a spacing, as the out-of-fold data
    are) and how many of its ground-truth lesions `found` (metaseg.evaluation.metrics.targets) the mask detects."""
    predicted = mask(probability(maps, config), config)
    return dice_3d(gt, predicted), detected(found, predicted)


class Scorer:
    """The Score of a configuration over these patients, each patient's `patient_score` remembered per configuration:
    selections over the same out-of-fold maps (the ensemble's and each bundle's own, and those of `cross_fitted` on
    subsets of the patients) share their common configurations instead of scoring them again."""

    def __init__(self, truth: Mapping[str, np.ndarray], probs: Mapping[str, Mapping[str, Probs]],
                 found: Mapping[str, list[Target]] | None = None, memo: dict | None = None):
        """`found` and `memo` are for `subset`: the patients' lesions, and (configuration JSON, patient) -> score."""
        self.truth, self.probs = truth, probs
        self.found = found if found is not None else {patient: targets(gt) for patient, gt in truth.items()}
        self.memo: dict[tuple[str, str], tuple[float, int]] = {} if memo is None else memo

    def __call__(self, config: dict) -> Score:
        key = json.dumps(config, sort_keys=True)
        for patient, gt in self.truth.items():
            if (key, patient) not in self.memo:
                self.memo[key, patient] = patient_score(gt, self.found[patient], self.probs[patient], config)
        dice, hits = zip(*(self.memo[key, patient] for patient in self.truth))
        return Score(float(np.mean(dice)), sum(hits),
                     sum(t.scored for patient in self.truth for t in self.found[patient]))

    def subset(self, patients: Sequence[str]) -> Scorer:
        """A Scorer over some of these patients, sharing what was scored."""
        return Scorer({p: self.truth[p] for p in patients}, self.probs, {p: self.found[p] for p in patients},
                      self.memo)

    def smallest_lesion(self) -> int | None:
        """Voxels of the smallest scored ground-truth lesion of these patients (None without any)."""
        return min((t.voxels for lesions in self.found.values() for t in lesions if t.scored), default=None)


# The metastases every shipped step must keep: the lesions of `metaseg synth OUT --patients 10 --slices 32 --seed 3`
# (43 lesions, 2-6 per patient, 5 to ~1,550 voxels of 256x256 slices, as the development TIFFs), of which a minimum
# size may drop at most 1% (tests/test_lesions.py holds the shipped steps to it).
REFERENCE_PHANTOM = {"patients": 10, "slices": 32, "seed": 3}
KEEP_REFERENCE_SHARE = 0.99


@functools.cache
def reference_phantom() -> tuple[dict[str, list[bytes]], dict[str, np.ndarray]]:
    """The reference phantom, made once per process in a temporary folder: each patient's image files (bytes, in
    slice order) and boolean (slices, rows, cols) ground-truth stack."""
    with tempfile.TemporaryDirectory() as folder:
        synthesize(Path(folder), **REFERENCE_PHANTOM)
        found = discover(Path(folder))
        groups = by_patient([asdict(p) for p in found.pairs])
        root, truth = read_ground_truth(Path(folder), found.root, groups)
        with open_source(Path(folder)) as files:
            images = {patient: [files.read(member(root, item["image"])) for item in items]
                      for patient, items in groups.items()}
    return images, truth


def reference_masks() -> list[np.ndarray]:
    """The reference phantom's perfect masks, one stack per patient."""
    return list(reference_phantom()[1].values())


@functools.cache
def reference_lesion_voxels() -> tuple[int, ...]:
    """Voxel counts of the reference phantom's lesions (metaseg.inference.lesions), sorted."""
    return tuple(sorted(int(size) for stack in reference_masks() for size in np.bincount(label(stack)[0].ravel())[1:]))


def reference_size_cap(sizes: Sequence[int] | None = None) -> int:
    """The largest minimum size (voxels) that keeps KEEP_REFERENCE_SHARE of the reference metastases."""
    sizes = np.asarray(sizes if sizes is not None else reference_lesion_voxels())
    allowed = [size for size in sizes if np.mean(sizes >= size) >= KEEP_REFERENCE_SHARE]
    return int(max(allowed))


def score_cap(keep_scores: Sequence[float]) -> np.float32:
    """The highest min_lesion_score that keeps KEEP_REFERENCE_SHARE of lesions of these keep scores (the highest
    score of the predicted lesions matching each; metaseg.evaluation.retention), 1 for none."""
    needed = sorted(np.float32(score) for score in keep_scores)
    return needed[int(len(needed) * (1 - KEEP_REFERENCE_SHARE))] if needed else np.float32(1)


# a model's keep scores on the reference phantom (metaseg.evaluation.retention.model_keep_scores): view ("plain", or
# "flip": the flip-TTA mean) -> threshold (as text, JSON's keys) -> [{"voxels", "keep_score"}, ...]
KeepScores = Mapping[str, Mapping[str, Sequence[Mapping]]]


def score_caps(models: Sequence[KeepScores]) -> dict[str, dict[float, float]]:
    """View -> threshold -> the highest min_lesion_score that keeps KEEP_REFERENCE_SHARE of the reference phantom's
    lesions that each of these models (a bundle's fold models, say) finds there."""
    caps: dict[str, dict[float, float]] = {}
    for model in models:
        for view, by_threshold in model.items():
            view_caps = caps.setdefault(view, {})
            for threshold, kept in by_threshold.items():
                cap = float(score_cap([lesion["keep_score"] for lesion in kept]))
                view_caps[float(threshold)] = min(view_caps.get(float(threshold), cap), cap)
    return caps


def keeps_reference(score: float, threshold: float, flip_tta: bool, caps: Mapping[str, Mapping[float, float]]) -> bool:
    """Whether a minimum lesion score over `threshold` keeps the reference phantom's found lesions (`score_caps`)."""
    view = "flip" if flip_tta else "plain"
    if threshold not in caps.get(view, {}):
        raise UserError(f"no keep scores of the reference phantom at threshold {threshold} ({view}): "
                        f"rerun `metaseg cv` to measure them")
    return np.float32(score) <= np.float32(caps[view][threshold])


def _with(config: dict, key: str | tuple[str, ...], value) -> dict:
    """The configuration with `key` set to `value`; a tuple of keys (one step setting several) takes a tuple."""
    return {**config, **(dict(zip(key, value)) if isinstance(key, tuple) else {key: value})}


def _best(score: Scorer, config: dict, key: str | tuple[str, ...], values, floor: int) -> tuple[object, Score, dict]:
    """The value of `key` with the highest mean Dice among those detecting at least `floor` lesions (the first of a
    tie; among all values if none does, for the report to show), its score, and every value's score."""
    scores = {value: score(_with(config, key, value)) for value in values}
    eligible = [value for value in scores if scores[value].detected >= floor] or list(scores)
    best = max(eligible, key=lambda value: scores[value].mean_dice_3d)
    return best, scores[best], scores


def select(truth: Mapping[str, np.ndarray], probs: Mapping[str, Mapping[str, Probs]], models: list[str],
           score: Scorer | None = None, one_lesion_per_patient: bool = False, keep_reference: bool = True,
           caps: Mapping[str, Mapping[float, float]] | None = None) -> dict:
    """Greedy selection in a fixed order (ensemble, flip TTA, threshold, minimum size, minimum lesion score,
    hysteresis, largest component).

    `truth`: patient -> boolean ground-truth stack; `probs`: patient -> model -> {"prob", "prob_flip"}, for every
    patient of `truth` and every model of `models`. A step is kept only for a mean Dice gain > 0 that detects no
    fewer lesions; the threshold and the minimum size are chosen among the values that lose no lesion. Candidates:
    minimum sizes in voxels (the out-of-fold data carry no spacing, so min_lesion_mm3 stays 0) up to the smallest
    scored ground-truth lesion of these patients and, with `keep_reference`, up to the size that keeps 99% of the
    reference phantom's metastases (a one-lesion glioma set must not teach a bundle to drop small metastases);
    minimum lesion scores of MIN_LESION_SCORES above the chosen threshold, among those that lose no lesion and (with
    `keep_reference`) keep the reference phantom's lesions (`keeps_reference`); then hysteresis, each threshold of
    THRESHOLDS below the chosen one with the score as its seed (the kept score, else the score step's best candidate)
    where that seed keeps the phantom's lesions at that threshold: a lesion that reaches the seed grows over the lower
    threshold;
    `caps`: `score_caps` of the models' probabilities on the reference phantom; with `keep_reference` and none, no
    score is tried (perfect masks keep every score: only a model's probabilities can bound one);
    `largest_component` only where the data are declared
    `one_lesion_per_patient`. Returns the chosen configuration and, per step, the mean Dice and lesion sensitivity
    without and with it, the gain, and whether it was kept; `skipped` says why a step was not tried. `score`: a
    `Scorer` of the same truth and probs to share with other selections.
    """
    score = score or Scorer(truth, probs)
    single = {name: score({**DEFAULT, "models": [name]}) for name in models}
    start = max(single, key=lambda name: single[name].mean_dice_3d)
    config, current = {**DEFAULT, "models": [start]}, single[start]
    steps = [{"step": "baseline", "value": start, **current.figures(),
              "note": f"best single model at the default threshold {DEFAULT['threshold']}",
              "candidates": {name: s.figures() for name, s in single.items()}}]
    skipped = {}

    def consider(step: str, key: str | tuple[str, ...], value, with_it: Score, candidates: dict | None = None) -> None:
        nonlocal config, current
        gain = with_it.mean_dice_3d - current.mean_dice_3d
        loses = with_it.detected < current.detected
        steps.append({"step": step, "value": value, "mean_dice_3d_without": current.mean_dice_3d,
                      "mean_dice_3d_with": with_it.mean_dice_3d, "gain": gain,
                      "lesion_sensitivity_3d_without": current.lesion_sensitivity_3d,
                      "lesion_sensitivity_3d_with": with_it.lesion_sensitivity_3d, "kept": gain > 0 and not loses,
                      **({"note": f"loses {current.detected - with_it.detected} of {current.lesions} lesions"}
                         if loses else {}),
                      **({"candidates": {str(k): v.figures() for k, v in candidates.items()}} if candidates else {})})
        if gain > 0 and not loses:
            config, current = _with(config, key, value), with_it

    if len(models) > 1:
        consider("ensemble", "models", list(models), score({**config, "models": list(models)}))
    consider("flip_tta", "flip_tta", True, score({**config, "flip_tta": True}))
    consider("threshold", "threshold", *_best(score, config, "threshold", THRESHOLDS, current.detected))
    smallest, cap = score.smallest_lesion(), reference_size_cap() if keep_reference else None
    sizes = [size for size in MIN_LESION_VOXELS
             if smallest is not None and size <= smallest and (cap is None or size <= cap)]
    if sizes:
        consider("min_lesion_voxels", "min_lesion_voxels",
                 *_best(score, config, "min_lesion_voxels", sizes, current.detected))
    elif smallest is None:
        skipped["min_lesion_voxels"] = "no ground-truth lesion to bound a minimum size"
    else:
        why = (f"the smallest ground-truth lesion ({smallest} voxels)" if cap is None or smallest <= cap else
               f"what keeps {KEEP_REFERENCE_SHARE:.0%} of the reference phantom's metastases ({cap} voxels)")
        skipped["min_lesion_voxels"] = f"every candidate ({', '.join(map(str, MIN_LESION_VOXELS))}) exceeds {why}"
    def kept(seed: float, threshold: float) -> bool:
        return not keep_reference or (caps is not None and keeps_reference(seed, threshold, config["flip_tta"], caps))

    above = [seed for seed in MIN_LESION_SCORES if seed > config["threshold"]]  # THRESHOLDS end below them all
    seeds, best_seed = [seed for seed in above if kept(seed, config["threshold"])], None
    refused = (f"{', '.join(map(str, sorted(set(above) - set(seeds))))} (each drops more than "
               f"{1 - KEEP_REFERENCE_SHARE:.0%} of the reference phantom's lesions the models find at threshold "
               f"{config['threshold']})")
    if seeds:
        best_seed, with_seed, by_seed = _best(score, config, "min_lesion_score", seeds, current.detected)
        consider("min_lesion_score", "min_lesion_score", best_seed, with_seed, by_seed)
        if len(seeds) < len(above):
            steps[-1]["refused"] = refused
    elif keep_reference and caps is None:
        skipped["min_lesion_score"] = ("no model's probabilities on the reference phantom to bound a score (perfect "
                                       "masks keep every score)")
    else:
        skipped["min_lesion_score"] = refused
    seed = config["min_lesion_score"] or best_seed
    lower = [t for t in THRESHOLDS if t < config["threshold"] and seed is not None and kept(seed, t)]
    if lower:
        consider("hysteresis", ("threshold", "min_lesion_score"),
                 *_best(score, config, ("threshold", "min_lesion_score"), [(t, seed) for t in lower], current.detected))
    else:
        skipped["hysteresis"] = (f"no candidate threshold below the chosen {config['threshold']}" if seed is not None
                                 else "no minimum lesion score keeps the reference phantom's lesions")
    if one_lesion_per_patient:
        consider("largest_component", "largest_component", True, score({**config, "largest_component": True}))
    else:
        skipped["largest_component"] = ("the data are not declared one lesion per patient "
                                        "(one_lesion_per_patient in the bundle's configs/inference.json)")
    return {"config": config, "mean_dice_3d": current.mean_dice_3d,
            "lesion_sensitivity_3d": current.lesion_sensitivity_3d, "steps": steps, "skipped": skipped,
            "smallest_gt_lesion_voxels": smallest, "reference_size_cap_voxels": cap,
            "reference_score_caps": (caps or {}).get("flip" if config["flip_tta"] else "plain") if keep_reference
            else None, "n_patients": len(truth),
            "single_slice": {key: config[key] for key in SLICE_STEPS},
            "inference_steps": {key: config[key] for key in BUNDLE_STEPS}}


def cross_fitted(truth: Mapping[str, np.ndarray], probs: Mapping[str, Mapping[str, Probs]], models: list[str],
                 fold_of: Mapping[str, int], score: Scorer | None = None,
                 one_lesion_per_patient: bool = False, caps: Mapping[str, Mapping[float, float]] | None = None) -> dict:
    """The steps chosen without each fold, scored on it: for each fold k of the patients of `truth` (`fold_of`:
    patient -> fold), `select` on the patients of the other folds only, its configuration applied to fold k's.

    No patient's mask depends on its own ground truth, unlike `select`'s figures (chosen and scored on the same
    patients). Returns `metric_per_patient` (`score_config`'s rows, in the order of `truth`) and `selections`: fold
    -> what `select` returned without it. `score`: a Scorer of truth and probs (or of more patients), whose subsets
    the k selections share. A UserError with fewer than two folds: there are no other folds to choose on."""
    score = score or Scorer(truth, probs)
    folds = sorted({fold_of[p] for p in truth})
    if len(folds) < 2:
        raise UserError(f"cross-fitting needs patients of at least two folds, got fold(s) {folds}")
    selections, rows = {}, {}
    for k in folds:
        others = [p for p in truth if fold_of[p] != k]
        selections[k] = select({p: truth[p] for p in others}, probs, models, score.subset(others),
                               one_lesion_per_patient, caps=caps)
        held_out = {p: gt for p, gt in truth.items() if fold_of[p] == k}
        rows.update((row["patient"], row) for row in score_config(held_out, probs, selections[k]["config"]))
    return {"metric_per_patient": [rows[p] for p in truth], "selections": selections}
