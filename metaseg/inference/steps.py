"""Inference steps after the network: what `metaseg predict`, the engine's callers and the server apply to lesion
probabilities, and what a configuration of them means.

A configuration is a plain dict (`DEFAULT` names every key):

    models             the bundles whose lesion probabilities are averaged (one = no ensemble)
    flip_tta           also predict the left-right mirrored input, mirror back, average (test-time augmentation)
    threshold          lesion where the probability is at least it (MONAI AsDiscrete's threshold)
    min_lesion_voxels  drop lesions smaller than this, for volumes without a known spacing (0 = off)
    min_lesion_mm3     drop lesions smaller than this, for volumes with a known spacing (0 = off)
    min_lesion_score   drop lesions whose highest probability (their score, metaseg.inference.lesions.scores) is
                       under this (0 = off; a value up to the threshold removes nothing). Applied to the lesions of
                       the threshold, it is hysteresis thresholding: a lesion grows over the threshold (the low one)
                       from a voxel of at least min_lesion_score (the seed); skimage's apply_hysteresis_threshold is
                       the same but for strict inequalities and face-only neighbours
    largest_component  keep only the largest lesion; allowed only for a
                       bundle whose data are declared one lesion per patient (`one_lesion_per_patient` in its
                       inference.json): metastases come several to a patient, and this step deletes all but one

The component steps act on lesions as metaseg.inference.lesions defines them (3D connected components of a volume). A
size chosen in voxels on data without a spacing is not applied to an upload with one (its voxels are of another size),
and never the other way round. A volume is a DICOM series, a multi-frame DICOM, a NIfTI or a Data patient folder; a
single 2D slice, or several unrelated pictures uploaded together, are separate slices: they get the ensemble, flip TTA
and the threshold, and no component step (a lesion's area on one slice is not its 3D size, a second metastasis on
the same slice must not be dropped as "not the largest", and a lesion's score on one slice is at most its 3D score:
on a slice other than its most confident one, min_lesion_score, chosen on 3D lesions, would drop lesions it keeps).

Deployed, the chosen steps but `models` are a bundle's `inference_steps` (configs/inference.json; their keys and check
in metaseg.conventions): the bundle's own inferer does the flip TTA (plain MONAI, metaseg's engine, and `network_maps`
here all run it), its postprocessing the threshold, and `upload_masks` below the threshold and component steps for
`metaseg predict` and the server. metaseg.evaluation.selection chooses them on out-of-fold predictions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from metaseg.inference.lesions import label, min_voxels, scores

DEFAULT = {"models": [], "flip_tta": False, "threshold": 0.5, "min_lesion_voxels": 0, "min_lesion_mm3": 0,
           "min_lesion_score": 0, "largest_component": False}
SLICE_STEPS = ("models", "flip_tta", "threshold")  # what a single 2D slice gets (see module docstring)

# lesion probabilities of one patient: {"prob": (slices, rows, cols), "prob_flip": the mirrored input's, mirrored back}
Probs = Mapping[str, np.ndarray]


def network_maps(engine, frames: Sequence[np.ndarray], flip: bool = True) -> dict[str, np.ndarray]:
    """An engine's lesion probabilities of same-sized frames, and (with `flip`) of the left-right mirrored frames,
    mirrored back: `{"prob": (slices, rows, cols)[, "prob_flip": ...]}`, whatever the bundle's own flip_tta.

    Both are the bundle's `probabilities` views (metaseg.inference.engine), the ones its inferer averages under flip TTA: the
    mirror is taken at network resolution, as deployed. Their mean here equals the deployed average because the
    `Invertd` between them is linear (bilinear resize)."""
    maps = {"prob": np.stack(engine.probabilities(frames, view="plain"))}
    if flip:
        maps["prob_flip"] = np.stack(engine.probabilities(frames, view="mirrored"))
    return maps


def segment(engines: Mapping[str, object], frames: Sequence[np.ndarray], config: dict, volume: bool) -> np.ndarray:
    """The configuration's boolean mask of same-sized frames (a patient's slices, or one slice with volume=False);
    `engines` maps each bundle name of config["models"] to its metaseg.inference.engine.Engine."""
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



def has_volume_steps(steps: Mapping) -> bool:
    """Whether a volume's mask of one slice depends on its other slices (a component step is on)."""
    return bool(steps["min_lesion_voxels"] or steps["min_lesion_mm3"] or seeded(steps) or steps["largest_component"])


def seeded(steps: Mapping) -> bool:
    """Whether min_lesion_score removes anything: every lesion of the threshold scores at least the threshold."""
    return steps["min_lesion_score"] > steps["threshold"]


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
    size and the minimum score that remove something (min_lesion_mm3 where the voxel volume is known, else
    min_lesion_voxels) and largest_component, where on."""
    if not volume:
        return []
    size = "min_lesion_mm3" if voxel_volume_mm3 is not None else "min_lesion_voxels"
    return [step for step, on in ((size, min_size(steps, voxel_volume_mm3) > 1), ("min_lesion_score", seeded(steps)),
                                  ("largest_component", steps["largest_component"])) if on]


def mask(prob: np.ndarray, config: Mapping, volume: bool = True, voxel_volume_mm3: float | None = None) -> np.ndarray:
    """Boolean lesion mask of a (slices, rows, cols) probability stack; component steps only for a `volume`.

    The lesions are metaseg.inference.lesions' (one labelling for every step), their scores its `scores`. Not MONAI's
    RemoveSmallObjects: under scikit-image 0.26 its `min_size` also removes objects of exactly that size."""
    lesion = prob >= config["threshold"]
    smallest = min_size(config, voxel_volume_mm3)
    if not volume or not lesion.any() or (smallest <= 1 and not seeded(config) and not config["largest_component"]):
        return lesion
    labels, n = label(lesion)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= smallest
    if seeded(config):  # the seed in the probabilities' precision, as the threshold is compared
        keep[1:] &= scores(labels, n, prob)[0] >= prob.dtype.type(config["min_lesion_score"])
    keep[0] = False  # background
    if config["largest_component"] and keep.any():
        keep = np.arange(len(sizes)) == np.argmax(np.where(keep, sizes, 0))
    return keep[labels]
