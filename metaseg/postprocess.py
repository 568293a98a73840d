"""Inference steps after the network, and their selection on out-of-fold predictions.

nnU-Net's find_best_configuration + determine_postprocessing, on lesion probabilities saved by `metaseg cv`: each
step is tried in a fixed order and kept only if it raises the out-of-fold mean per-patient 3D Dice *and* does not
lower the lesion detection sensitivity (3D lesions as metaseg.metrics matches them, pooled over the out-of-fold
patients): a step that buys Dice by deleting a metastasis is never kept. The gain of each is reported whether kept
or not. A configuration is a plain dict (`DEFAULT` names every key):

    models             the bundles whose lesion probabilities are averaged (one = no ensemble)
    flip_tta           also predict the left-right mirrored input, mirror back, average (test-time augmentation)
    threshold          lesion where the probability is at least it (MONAI AsDiscrete's threshold)
    min_lesion_voxels  drop lesions smaller than this, for volumes without a known spacing (0 = off)
    min_lesion_mm3     drop lesions smaller than this, for volumes with a known spacing (0 = off)
    largest_component  keep only the largest lesion; allowed only for a
                       bundle whose data are declared one lesion per patient (`one_lesion_per_patient` in its
                       inference.json): metastases come several to a patient, and this step deletes all but one

The component steps act on lesions as metaseg.lesions defines them (3D connected components of a volume). A size
chosen in voxels on data without a spacing is not applied to an upload with one (its voxels are of another size), and
never the other way round. A volume is a DICOM series, a multi-frame DICOM, a NIfTI or a Data patient folder; a single
2D slice, or several unrelated pictures uploaded together, are separate slices: they get the ensemble, flip TTA and
the threshold, and no component step (a lesion's area on one slice is not its 3D size, and a second metastasis on the
same slice must not be dropped as "not the largest").

The selection's own figures are in-sample (chosen and scored on the same patients); `cross_fitted` scores each fold
with the steps chosen on the other folds, the estimate of what the chosen steps do on patients they were not chosen on.

Deployed, the chosen steps but `models` are a bundle's `inference_steps` (configs/inference.json): the bundle's own
inferer does the flip TTA (plain MONAI, metaseg's engine, and `network_maps` here all run it), its postprocessing the
threshold, and `upload_masks` below the threshold and component steps for `metaseg predict` and the server.
"""

from __future__ import annotations

import functools
import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metaseg.errors import UserError
from metaseg.lesions import label, min_voxels
from metaseg.metrics import Target, detected, dice_3d, patient_metrics, targets

DEFAULT = {"models": [], "flip_tta": False, "threshold": 0.5, "min_lesion_voxels": 0, "min_lesion_mm3": 0,
           "largest_component": False}
THRESHOLDS = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7)
MIN_LESION_VOXELS = (10, 25, 50, 100, 200, 400)
SLICE_STEPS = ("models", "flip_tta", "threshold")  # what a single 2D slice gets (see module docstring)
BUNDLE_STEPS = ("flip_tta", "threshold", "min_lesion_voxels", "min_lesion_mm3", "largest_component")  # `inference_steps`

# lesion probabilities of one patient: {"prob": (slices, rows, cols), "prob_flip": the mirrored input's, mirrored back}
Probs = Mapping[str, np.ndarray]


def network_maps(engine, frames: Sequence[np.ndarray], flip: bool = True) -> dict[str, np.ndarray]:
    """An engine's lesion probabilities of same-sized frames, and (with `flip`) of the left-right mirrored frames,
    mirrored back: `{"prob": (slices, rows, cols)[, "prob_flip": ...]}`, whatever the bundle's own flip_tta.

    Both are the bundle's `probabilities` views (metaseg.engine), the ones its inferer averages under flip TTA: the
    mirror is taken at network resolution, as deployed. Their mean here equals the deployed average because the
    `Invertd` between them is linear (bilinear resize)."""
    maps = {"prob": np.stack(engine.probabilities(frames, view="plain"))}
    if flip:
        maps["prob_flip"] = np.stack(engine.probabilities(frames, view="mirrored"))
    return maps


def segment(engines: Mapping[str, object], frames: Sequence[np.ndarray], config: dict, volume: bool) -> np.ndarray:
    """The configuration's boolean mask of same-sized frames (a patient's slices, or one slice with volume=False);
    `engines` maps each bundle name of config["models"] to its metaseg.engine.Engine."""
    maps = {name: network_maps(engines[name], frames, config["flip_tta"]) for name in config["models"]}
    return mask(probability(maps, config), config, volume)


def probability(per_model: Mapping[str, Probs], config: dict) -> np.ndarray:
    """The configuration's lesion probability of one patient: mean over its models (and flips), float32 0..1."""
    keys = ("prob", "prob_flip") if config["flip_tta"] else ("prob",)
    maps = [as_float(per_model[name][key]) for name in config["models"] for key in keys]
    return maps[0] if len(maps) == 1 else np.mean(maps, axis=0, dtype=np.float32)


def as_float(prob: np.ndarray) -> np.ndarray:
    """Probabilities stored as uint8 (round(255 p)) or as floats, as float32 in 0..1."""
    return prob.astype(np.float32) / 255 if prob.dtype == np.uint8 else prob.astype(np.float32, copy=False)


def _number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float)


def checked_steps(steps: Mapping, bundle: str, one_lesion_per_patient: bool = False) -> dict:
    """A bundle's `inference_steps` without its `_desc_`; a hand-edited one that is not usable is a UserError, and so
    is `largest_component` in a bundle whose data are not declared one lesion per patient."""
    steps = {key: value for key, value in steps.items() if key != "_desc_"}
    if set(steps) != set(BUNDLE_STEPS):
        raise UserError(f"{bundle}: inference_steps must hold exactly {', '.join(BUNDLE_STEPS)}, got {sorted(steps)}")
    threshold, voxels, mm3 = steps["threshold"], steps["min_lesion_voxels"], steps["min_lesion_mm3"]
    if not all(isinstance(steps[key], bool) for key in ("flip_tta", "largest_component")) \
            or not _number(threshold) or not 0 <= threshold <= 1 \
            or isinstance(voxels, bool) or not isinstance(voxels, int) or voxels < 0 or not _number(mm3) or mm3 < 0:
        raise UserError(f"{bundle}: inference_steps need true/false flip_tta and largest_component, a threshold in "
                        f"[0, 1], a whole min_lesion_voxels >= 0 and a min_lesion_mm3 >= 0, got {steps}")
    if steps["largest_component"] and not one_lesion_per_patient:
        raise UserError(f"{bundle}: inference_steps keep only the largest lesion, but the bundle does not declare "
                        f"one_lesion_per_patient: that step would delete all metastases but one")
    return steps


def has_volume_steps(steps: Mapping) -> bool:
    """Whether a volume's mask of one slice depends on its other slices (a component step is on)."""
    return bool(steps["min_lesion_voxels"] or steps["min_lesion_mm3"] or steps["largest_component"])


def with_threshold(steps: Mapping, threshold: float | None) -> dict:
    """The steps with another threshold (a user's choice), or as they are for None."""
    return dict(steps) if threshold is None else {**steps, "threshold": threshold}


def upload_masks(probabilities: Sequence[np.ndarray], steps: Mapping, volume: bool = False,
                 voxel_volume_mm3: float | None = None) -> np.ndarray:
    """Boolean masks (frames, rows, cols) of one upload's lesion probabilities, in its frame order: the threshold,
    and for a `volume` (see the module docstring: not several unrelated slices) the component steps, with the size
    in mm3 where `voxel_volume_mm3` is known."""
    return mask(np.stack(probabilities), steps, volume=volume and len(probabilities) > 1,
                voxel_volume_mm3=voxel_volume_mm3)


def min_size(config: Mapping, voxel_volume_mm3: float | None) -> int:
    """The smallest lesion (voxels) a volume keeps: from min_lesion_mm3 where the voxel volume is known, else from
    min_lesion_voxels (a size in voxels of unknown spacing means nothing for an upload with a known one)."""
    if voxel_volume_mm3 is not None:
        return min_voxels(config["min_lesion_mm3"], voxel_volume_mm3) if config["min_lesion_mm3"] else 0
    return config["min_lesion_voxels"]


def applied_volume_steps(steps: Mapping, volume: bool, voxel_volume_mm3: float | None) -> list[str]:
    """The component steps `mask` applies to an upload, by name: none to unrelated slices; for a volume, the minimum
    size that removes something (min_lesion_mm3 where the voxel volume is known, else min_lesion_voxels) and
    largest_component, where on."""
    if not volume:
        return []
    size = "min_lesion_mm3" if voxel_volume_mm3 is not None else "min_lesion_voxels"
    return [step for step, on in ((size, min_size(steps, voxel_volume_mm3) > 1),
                                  ("largest_component", steps["largest_component"])) if on]


def mask(prob: np.ndarray, config: Mapping, volume: bool = True, voxel_volume_mm3: float | None = None) -> np.ndarray:
    """Boolean lesion mask of a (slices, rows, cols) probability stack; component steps only for a `volume`.

    The lesions are metaseg.lesions' (one labelling for both steps). Not MONAI's RemoveSmallObjects: under
    scikit-image 0.26 its `min_size` also removes objects of exactly that size."""
    lesion = prob >= config["threshold"]
    smallest = min_size(config, voxel_volume_mm3)
    if not volume or not lesion.any() or (smallest <= 1 and not config["largest_component"]):
        return lesion
    labels, _ = label(lesion)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= smallest
    keep[0] = False  # background
    if config["largest_component"] and keep.any():
        keep = np.arange(len(sizes)) == np.argmax(np.where(keep, sizes, 0))
    return keep[labels]


def dice_per_patient(truth: Mapping[str, np.ndarray], probs: Mapping[str, Mapping[str, Probs]],
                     config: dict) -> dict[str, float]:
    """Per-patient 3D Dice of a configuration over the patients of `truth` (probs: patient -> model -> maps)."""
    return {p: dice_3d(gt, mask(probability(probs[p], config), config)) for p, gt in truth.items()}


def score_config(truth: Mapping[str, np.ndarray], probs: Mapping[str, Mapping[str, Probs]],
                 config: dict) -> list[dict]:
    """nnU-Net's metric_per_case for one configuration: every metric of metaseg.metrics per patient of `truth`."""
    return [{"patient": p, **patient_metrics(gt, mask(probability(probs[p], config), config))}
            for p, gt in truth.items()]


@dataclass(frozen=True)
class Score:
    """What the selection weighs for one configuration over the out-of-fold patients: the mean per-patient 3D Dice,
    and how many of their scored ground-truth lesions it detects (metaseg.metrics.detected), of how many."""

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
    are) and how many of its ground-truth lesions `found` (metaseg.metrics.targets) the mask detects."""
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


def reference_masks() -> list[np.ndarray]:
    """The reference phantom's perfect masks, one boolean (slices, rows, cols) stack per patient; made in a
    temporary folder."""
    from metaseg.data import discover, open_source, read_tiff
    from metaseg.synth import synthesize

    with tempfile.TemporaryDirectory() as folder:
        synthesize(Path(folder), **REFERENCE_PHANTOM)
        found = discover(Path(folder))
        with open_source(Path(folder)) as files:
            return [np.stack([read_tiff(files.read(p.label)) > 0 for p in sorted(
                (p for p in found.pairs if p.patient == patient), key=lambda p: p.slice)])
                for patient in found.patients]


@functools.cache
def reference_lesion_voxels() -> tuple[int, ...]:
    """Voxel counts of the reference phantom's lesions (metaseg.lesions), sorted."""
    return tuple(sorted(int(size) for stack in reference_masks() for size in np.bincount(label(stack)[0].ravel())[1:]))


def reference_size_cap(sizes: Sequence[int] | None = None) -> int:
    """The largest minimum size (voxels) that keeps KEEP_REFERENCE_SHARE of the reference metastases."""
    sizes = np.asarray(sizes if sizes is not None else reference_lesion_voxels())
    allowed = [size for size in sizes if np.mean(sizes >= size) >= KEEP_REFERENCE_SHARE]
    return int(max(allowed))


def _best(score: Scorer, config: dict, key: str, values, floor: int) -> tuple[object, Score, dict]:
    """The value of `key` with the highest mean Dice among those detecting at least `floor` lesions (the first of a
    tie; among all values if none does, for the report to show), its score, and every value's score."""
    scores = {value: score({**config, key: value}) for value in values}
    eligible = [value for value in scores if scores[value].detected >= floor] or list(scores)
    best = max(eligible, key=lambda value: scores[value].mean_dice_3d)
    return best, scores[best], scores


def select(truth: Mapping[str, np.ndarray], probs: Mapping[str, Mapping[str, Probs]], models: list[str],
           score: Scorer | None = None, one_lesion_per_patient: bool = False, keep_reference: bool = True) -> dict:
    """Greedy selection in a fixed order (ensemble, flip TTA, threshold, minimum size, largest component).

    `truth`: patient -> boolean ground-truth stack; `probs`: patient -> model -> {"prob", "prob_flip"}, for every
    patient of `truth` and every model of `models`. A step is kept only for a mean Dice gain > 0 that detects no
    fewer lesions; the threshold and the minimum size are chosen among the values that lose no lesion. Candidates:
    minimum sizes in voxels (the out-of-fold data carry no spacing, so min_lesion_mm3 stays 0) up to the smallest
    scored ground-truth lesion of these patients and, with `keep_reference`, up to the size that keeps 99% of the
    reference phantom's metastases (a one-lesion glioma set must not teach a bundle to drop small metastases);
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

    def consider(step: str, key: str, value, with_it: Score, candidates: dict | None = None) -> None:
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
            config, current = {**config, key: value}, with_it

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
    if one_lesion_per_patient:
        consider("largest_component", "largest_component", True, score({**config, "largest_component": True}))
    else:
        skipped["largest_component"] = ("the data are not declared one lesion per patient "
                                        "(one_lesion_per_patient in the bundle's configs/inference.json)")
    return {"config": config, "mean_dice_3d": current.mean_dice_3d,
            "lesion_sensitivity_3d": current.lesion_sensitivity_3d, "steps": steps, "skipped": skipped,
            "smallest_gt_lesion_voxels": smallest, "reference_size_cap_voxels": cap, "n_patients": len(truth),
            "single_slice": {key: config[key] for key in SLICE_STEPS},
            "inference_steps": {key: config[key] for key in BUNDLE_STEPS}}


def cross_fitted(truth: Mapping[str, np.ndarray], probs: Mapping[str, Mapping[str, Probs]], models: list[str],
                 fold_of: Mapping[str, int], score: Scorer | None = None,
                 one_lesion_per_patient: bool = False) -> dict:
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
                               one_lesion_per_patient)
        held_out = {p: gt for p, gt in truth.items() if fold_of[p] == k}
        rows.update((row["patient"], row) for row in score_config(held_out, probs, selections[k]["config"]))
    return {"metric_per_patient": [rows[p] for p in truth], "selections": selections}
