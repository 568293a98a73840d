"""The conventions every part of metaseg shares, each written once: where weights live, the best-model record and a
run's record of its overrides, mask file names, the sequences (input channels) and the inference steps a bundle
records.

The bundles cannot import this module (a bundle copied out of the repo runs in plain MONAI), so they state the same
facts in their configs (`flair_channel`, the writer's `output_postfix`/`output_ext`, `models/model.pt`) and
tests/test_conventions.py holds them equal to what is written here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from metaseg.bundles import BUNDLES_DIR, NAMES, bundle_dir
from metaseg.errors import UserError
from metaseg.files import write_json_atomic

SEQUENCES = ("pre-contrast", "FLAIR", "post-contrast")  # the network's input channels in order: T1 before contrast,
# FLAIR, T1 after contrast, as the data set's slices hold them
FLAIR_CHANNEL = SEQUENCES.index("FLAIR")  # the channel shown to users, and the one a one-channel input stands for (the
# bundles copy it into all three; training does so by sequence dropout)
SKULL_STRIP_EROSION = 14  # pixels: the skull-stripped view of a cross-validation (a head mask from the image eroded by
# 14 px takes off scalp and skull and keeps 99.7% of the development set's lesion voxels); training's augmentation
# uses the bundles' own skull_strip_erosion, a different width, so the view is not the augmentation's own input
MASK_POSTFIX, MASK_EXT = "seg", ".png"  # <stem>_seg.png, 0/255
WEIGHTS = Path("models") / "model.pt"  # a bundle's (and a run folder's) best network, a plain state dict
BEST_FILE = BUNDLES_DIR / "best.json"  # the shipped choice; `metaseg compare` writes one like it per run

# A bundle's chosen inference steps (configs/inference.json `inference_steps`; metaseg.inference.steps applies them)
BUNDLE_STEPS = ("flip_tta", "threshold", "min_lesion_voxels", "min_lesion_mm3", "min_lesion_score", "largest_component")
RUN_RECORD = "run.json"  # in a run folder: the bundle, data, seed and config overrides it was trained with

# Config overrides a model needs again at inference (its input size; the inference steps its scores were made with),
# and the only ones a best-model record may carry: a record is a file on disk, and a string reaching ConfigParser
# could be a `$` expression.
MODEL_OVERRIDES = {"spatial_size": int, "brain_crop": bool, "inference_steps": dict}
SPATIAL_MULTIPLE = 16  # the networks halve the input four times


def mask_file(stem: str) -> str:
    """The mask's file name for an input file (or frame) with this stem."""
    return f"{stem}_{MASK_POSTFIX}{MASK_EXT}"


def default_weights(bundle: Path) -> Path:
    return Path(bundle) / WEIGHTS


@dataclass(frozen=True)
class Model:
    """A trained model: its bundle, its weights, and the config overrides it was trained with (e.g. spatial_size)."""

    bundle: Path
    weights: Path
    overrides: dict = field(default_factory=dict)
    report: Path | None = None  # the comparison report that chose it, if a record names one


def checked_overrides(overrides) -> dict:
    """`overrides` if it holds only known keys with values of their type, else UserError saying what is wrong."""
    if not isinstance(overrides, dict):
        raise UserError(f"overrides must be an object, got {type(overrides).__name__}")
    for key, value in overrides.items():
        kind = MODEL_OVERRIDES.get(key)
        if kind is None:
            raise UserError(f"override {key!r} not allowed (allowed: {', '.join(MODEL_OVERRIDES)})")
        if type(value) is not kind:
            raise UserError(f"override {key} must be {kind.__name__}, got {type(value).__name__}")
    size = overrides.get("spatial_size")
    if size is not None and not (SPATIAL_MULTIPLE <= size <= 4096 and size % SPATIAL_MULTIPLE == 0):
        raise UserError(f"override spatial_size must be a multiple of {SPATIAL_MULTIPLE} in [16, 4096], got {size}")
    if "inference_steps" in overrides:  # numbers and booleans only; the engine checks largest_component against
        # the bundle's one_lesion_per_patient
        overrides = {**overrides, "inference_steps": checked_steps(overrides["inference_steps"], "override", True)}
    return dict(overrides)


def _number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float)


def checked_steps(steps: Mapping, bundle: str, one_lesion_per_patient: bool = False) -> dict:
    """A bundle's `inference_steps` without its `_desc_`; a hand-edited one that is not usable is a UserError, and so
    is `largest_component` in a bundle whose data are not declared one lesion per patient."""
    steps = {key: value for key, value in steps.items() if key != "_desc_"}
    if set(steps) != set(BUNDLE_STEPS):
        raise UserError(f"{bundle}: inference_steps must hold exactly {', '.join(BUNDLE_STEPS)}, got {sorted(steps)}")
    voxels, mm3 = steps["min_lesion_voxels"], steps["min_lesion_mm3"]
    if not all(isinstance(steps[key], bool) for key in ("flip_tta", "largest_component")) \
            or not all(_number(steps[key]) and 0 <= steps[key] <= 1 for key in ("threshold", "min_lesion_score")) \
            or isinstance(voxels, bool) or not isinstance(voxels, int) or voxels < 0 or not _number(mm3) or mm3 < 0:
        raise UserError(f"{bundle}: inference_steps need true/false flip_tta and largest_component, a threshold and a "
                        f"min_lesion_score in [0, 1], a whole min_lesion_voxels >= 0 and a min_lesion_mm3 >= 0, "
                        f"got {steps}")
    if steps["largest_component"] and not one_lesion_per_patient:
        raise UserError(f"{bundle}: inference_steps keep only the largest lesion, but the bundle does not declare "
                        f"one_lesion_per_patient: that step would delete all metastases but one")
    return steps


def model_overrides(run: Path) -> dict:
    """The overrides a run's model needs at inference (its input size, its brain crop), from its RUN_RECORD."""
    try:
        recorded = json.loads((Path(run) / RUN_RECORD).read_text())["overrides"]
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"no readable {RUN_RECORD} in {run}: train into it first ({err})") from None
    return {k: v for k, v in recorded.items() if k in MODEL_OVERRIDES}


def read_best(record: Path = BEST_FILE) -> Model:
    """The model a best-model record names; relative paths in it are relative to the record's folder."""
    if not record.is_file():
        raise UserError(f"no best-model record at {record}: run `metaseg compare` or pass --bundle")
    try:
        best = json.loads(record.read_text())
        if not isinstance(best, dict) or not isinstance(best["bundle"], str) or not isinstance(best["weights"], str):
            raise TypeError("bundle and weights must be strings")
        bundle, weights = Path(best["bundle"]), Path(best["weights"])
        overrides = checked_overrides(best.get("overrides", {}))
        report = best.get("report")
        if report is not None and not isinstance(report, str):
            raise TypeError("report must be a string")
    except (ValueError, KeyError, TypeError, UserError) as err:
        raise UserError(f"unreadable best-model record {record}: {err}") from None
    bundle = bundle_dir(bundle if bundle.is_absolute() or str(bundle) in NAMES else record.parent / bundle)
    weights = weights if weights.is_absolute() else (record.parent / weights).resolve()
    return Model(bundle, weights, overrides, record.parent / report if report else None)


def _relative(path: Path, start: Path) -> str:
    try:
        return os.path.relpath(Path(path).resolve(), Path(start).resolve())
    except ValueError:  # another drive on Windows
        return str(Path(path).resolve())


def write_best(record: Path, bundle: str, weights: Path, overrides: dict, report: Path | None = None,
               **evidence) -> Path:
    """Write a best-model record that `read_best` reads back: `bundle` a shipped name, paths stored relative to the
    record's folder; `evidence` (scores, how the model was selected) is kept as given."""
    if bundle not in NAMES:
        raise UserError(f"a best-model record names a shipped bundle ({', '.join(NAMES)}), got {bundle!r}")
    record = Path(record)
    return write_json_atomic(record, {
        "bundle": bundle,
        "weights": _relative(weights, record.parent),
        "overrides": checked_overrides(overrides),
        **evidence,
        **({"report": _relative(report, record.parent)} if report else {}),
    })
