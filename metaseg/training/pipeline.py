"""The training and evaluation stages over a run folder, nnU-Net style: each stage reads and writes named files.

    <run>/run.json           the bundle, data, seed and config overrides of the run (what inference must repeat)
    <run>/fingerprint.json   what the checkpoints were trained from (bundle configs, data, split, overrides): `train`
                             resumes a run folder's checkpoint only when it matches, else stops (or --restart)
    <run>/datalist.json      the patient split the run used (written by `train`, read by `evaluate`)
    <run>/models/model.pt    the best network by validation Dice; <run>/models/checkpoint.pt to resume
    <run>/train.log          the bundle's training log (+ TensorBoard events in <run>/eval)
    <run>/<split>/masks/<patient>/<stem>_seg.png  a split's (test or validation) masks as users get them: the
                             run's weights through metaseg.inference.engine, each patient folder one volume, with the
                             bundle's chosen inference steps (or none, `steps="off"`), by metaseg.inference.predict
    <run>/<split>/metrics.json  the steps those masks were made with and their per-patient metrics
                             (metaseg.evaluation.metrics.patient_metrics), nnU-Net style: `mean`, `ci95`,
                             `metric_per_case`, and their lesion detection FROC (`froc`: points and CPM,
                             metaseg.evaluation.froc, the masks' lesions scored on the probabilities that made them)

`evaluate` scores what is served (`metaseg predict`, the server): `metaseg compare` reads these masks and records
their steps in best.json. The bundle's own evaluate.json (MONAI's evaluator, argmax, no steps) stays for plain-MONAI
users; it gives the engine's masks with the steps off (tests/test_pipeline.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from metaseg.bundles import config, run_stage
from metaseg.conventions import BUNDLE_STEPS, RUN_RECORD, SPATIAL_MULTIPLE, default_weights, model_overrides
from metaseg.data.datalist import build_datalist, by_patient, summary, write_datalist
from metaseg.data.discovery import discover, member
from metaseg.data.ground_truth import read_ground_truth
from metaseg.errors import UserError
from metaseg.evaluation.froc import froc
from metaseg.evaluation.reports import null_nan, summarize
from metaseg.evaluation.runs import Run, read_predictions, score
from metaseg.files import write_json_atomic
from metaseg.inference.steps import DEFAULT

if TYPE_CHECKING:
    from metaseg.inference.engine import Engine

FINGERPRINT = "fingerprint.json"
CHECKPOINTS = ("models/checkpoint.pt", "models/model.pt")  # what the bundle's training resumes from or keeps
STEPS_OFF = {key: DEFAULT[key] for key in BUNDLE_STEPS}  # threshold 0.5, no flip TTA, no component steps
STEPS = {  # the inference steps `evaluate` may segment with, and what each is, for the reports and best.json
    "chosen": "the bundle's inference_steps (configs/inference.json), chosen by `metaseg cv` on out-of-fold "
              "predictions of the development data",
    "off": "none: threshold 0.5, no flip TTA, no component steps (the bundle's shipped steps were chosen on the "
           "LGG development data, not on these)",
}


def train(bundle: Path, data: Path, run: Path, seed: int = 0, restart: bool = False, datalist: dict | None = None,
          **overrides) -> Path:
    """Split `data` by patient (unless given a `datalist`), then run the bundle's training into `run`; returns the
    best model's path.

    A checkpoint already in `run` is resumed only if it was trained from the same bundle configs, data, split
    and overrides; otherwise UserError, unless `restart`, which deletes the run's checkpoints first."""
    _check_patch_size(bundle, overrides)
    datalist = datalist or build_datalist(discover(data), seed=seed)
    ours = fingerprint(bundle, datalist, overrides)
    _check_resume(run, ours, restart)
    write_json_atomic(run / FINGERPRINT, ours)
    write_datalist(datalist, run / "datalist.json")
    write_json_atomic(run / RUN_RECORD, {"bundle": str(bundle), "data": str(data.resolve()), "seed": seed, "overrides": overrides})
    print(summary(datalist), flush=True)
    run_stage(
        bundle,
        "training",
        run / "train.log",
        dataset_dir=data.resolve(),
        datalist=(run / "datalist.json").resolve(),
        ckpt_dir=(run / "models").resolve(),
        output_dir=(run / "eval").resolve(),
        seed=seed,
        **overrides,
    )
    return default_weights(run)


def _check_patch_size(bundle: Path, overrides: dict) -> None:
    """A training patch is a multiple of 16 and fits inside the (resized) slice it is cut from."""
    patch = overrides.get("patch_size")
    if patch is None:
        return
    size = overrides.get("spatial_size") or config(bundle, "training")["spatial_size"]
    if not isinstance(size, int):
        raise UserError(f"this bundle's spatial_size is {size!r}, not a number: give --spatial-size with --patch-size")
    if patch % SPATIAL_MULTIPLE or patch > size:
        raise UserError(f"patch_size must be a multiple of {SPATIAL_MULTIPLE} no larger than the input size "
                        f"(spatial_size {size}), got {patch}")


def fingerprint(bundle: Path, datalist: dict, overrides: dict) -> dict:
    """What a run's checkpoints are trained from: the bundle's configs (by content), the data (its folder and the
    image/mask pairs found, with their lesion pixel counts), the patient split and the config overrides."""
    configs = hashlib.sha256()
    for path in sorted((bundle / "configs").glob("*.json")):
        configs.update(path.name.encode() + b"\0" + path.read_bytes())
    pairs = {name: datalist[name] for name in ("training", "validation", "test")}
    return {
        "bundle": {"name": bundle.name, "configs_sha256": configs.hexdigest()},
        "data": {"dataset": datalist["dataset"], "pairs_sha256": _sha256(pairs)},
        "split": {"seed": datalist["seed"], "patients": _sha256(datalist["patients"])},
        "overrides": overrides,
    }


def _sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _check_resume(run: Path, ours: dict, restart: bool) -> None:
    """Resuming another training's checkpoint would silently mix two runs: stop, or with `restart` delete them."""
    found = [run / name for name in CHECKPOINTS if (run / name).exists()]
    if not found:
        return
    if restart:
        for path in found:
            path.unlink()
        return
    try:
        theirs = json.loads((run / FINGERPRINT).read_text())
    except (OSError, ValueError):
        theirs = None
    if theirs == ours:
        return
    differs = ("it has no readable fingerprint.json" if not isinstance(theirs, dict)
               else "other " + ", ".join(key for key in ours if theirs.get(key) != ours[key]))
    raise UserError(f"{run} holds a checkpoint of another training ({differs}): resuming would mix the two; "
                    f"pass --restart to delete its checkpoints and train from scratch, or choose another --out")


def evaluate(bundle: Path, data: Path, run: Path, split: str = "test", steps: str = "chosen") -> Path:
    """Segment one split of the run's patients with its best model as `metaseg predict` and the server do, with the
    bundle's chosen inference steps or (`steps="off"`) none, and score those masks; returns the metrics file."""
    from metaseg.inference.engine import Engine  # here: the training stages run without torch in this process

    if steps not in STEPS:
        raise UserError(f"steps must be one of {', '.join(STEPS)}, got {steps!r}")
    overrides = {**model_overrides(run), **({"inference_steps": STEPS_OFF} if steps == "off" else {})}
    return evaluate_engine(Engine(bundle, default_weights(run), overrides=overrides), data, run, split, STEPS[steps])


def evaluate_engine(engine: Engine, data: Path, run: Path, split: str, steps_note: str,
                    n_resamples: int = 2000) -> Path:
    """`evaluate` with a loaded metaseg.inference.engine.Engine; `steps_note` says which inference steps it runs (a STEPS
    value), for the reports and best.json.

    <run>/<split>/ is this stage's own folder: it is replaced, so no mask of an earlier evaluation (or of the
    bundle's evaluate.json) is ever scored as this one's."""
    from metaseg.inference.predict import predict  # here: it imports the engine (torch)

    try:
        datalist = json.loads((run / "datalist.json").read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"no readable datalist.json in {run}: train into it first ({err})") from None
    groups = by_patient(datalist[split])
    if not groups:
        raise UserError(f"{run} has no {split} patients")
    root, truth = read_ground_truth(data, datalist["root"], groups)
    shutil.rmtree(run / split, ignore_errors=True)
    masks = run / split / "masks"
    report = predict(data, masks, engine, only=[member(root, item["image"]) for item in datalist[split]],
                     keep_probabilities=True)
    if report.skipped:
        raise UserError(f"{len(report.skipped)} {split} slices could not be segmented, e.g. "
                        f"{next(iter(report.skipped.values()))}")
    named = Run(engine.name, run, datalist)
    preds = read_predictions(named, split, groups, truth)
    per_patient = score(named, split, truth, preds)
    probabilities = {patient: np.stack([report.probabilities[named.mask_path(split, item)] for item in items])
                     for patient, items in groups.items()}
    return write_json_atomic(run / split / "metrics.json", null_nan({
        "split": split, "bundle": engine.name, "weights": str(engine.weights),
        "inference_steps": engine.inference_steps, "steps": steps_note,
        "scored": f"the masks in {masks}, made as `metaseg predict` and the server make them (each patient folder "
                  f"one volume)",
        **summarize(per_patient, n_resamples, seed=0),
        "froc": froc((truth[p], probabilities[p], preds[p]) for p in truth),
        "metric_per_case": per_patient,
    }))
