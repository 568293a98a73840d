"""The training and evaluation stages over a run folder, nnU-Net style: each stage reads and writes named files.

    <run>/run.json           the bundle, data, seed and config overrides of the run (what inference must repeat)
    <run>/fingerprint.json   what the checkpoints were trained from (bundle configs, data, split, overrides): `train`
                             resumes a run folder's checkpoint only when it matches, else stops (or --restart)
    <run>/datalist.json      the patient split the run used (written by `train`, read by `evaluate`)
    <run>/models/model.pt    the best network by validation Dice; <run>/models/checkpoint.pt to resume
    <run>/train.log          the bundle's training log (+ TensorBoard events in <run>/eval)
    <run>/<split>/metrics.json  slice metrics of a split (validation or test), per-slice CSVs, and the predicted
                             masks in <run>/<split>/masks/<patient>/<stem>_seg.png
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from metaseg.bundles import run_stage
from metaseg.conventions import MODEL_OVERRIDES, SPATIAL_MULTIPLE, default_weights
from metaseg.errors import UserError
from metaseg.files import write_json_atomic

FINGERPRINT = "fingerprint.json"
CHECKPOINTS = ("models/checkpoint.pt", "models/model.pt")  # what the bundle's training resumes from or keeps


def train(bundle: Path, data: Path, run: Path, seed: int = 0, restart: bool = False, datalist: dict | None = None,
          **overrides) -> Path:
    """Split `data` by patient (unless given a `datalist`), then run the bundle's training into `run`; returns the
    best model's path.

    A checkpoint already in `run` is resumed only if it was trained from the same bundle configs, data, split
    and overrides; otherwise UserError, unless `restart`, which deletes the run's checkpoints first."""
    from metaseg.data import discover  # here, not at the top: `evaluate` runs without importing MONAI (seconds)
    from metaseg.datalist import build_datalist, summary, write_datalist

    _check_patch_size(bundle, overrides)
    datalist = datalist or build_datalist(discover(data), seed=seed)
    ours = fingerprint(bundle, datalist, overrides)
    _check_resume(run, ours, restart)
    write_json_atomic(run / FINGERPRINT, ours)
    write_datalist(datalist, run / "datalist.json")
    write_json_atomic(run / "run.json", {"bundle": str(bundle), "data": str(data.resolve()), "seed": seed, "overrides": overrides})
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
    size = overrides.get("spatial_size") or json.loads((bundle / "configs" / "train.json").read_text())["spatial_size"]
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


def model_overrides(run: Path) -> dict:
    """The overrides a run's model needs at inference (its input size), from its run.json."""
    try:
        recorded = json.loads((run / "run.json").read_text())["overrides"]
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"no readable run.json in {run}: train into it first ({err})") from None
    return {k: v for k, v in recorded.items() if k in MODEL_OVERRIDES}


def evaluate(bundle: Path, data: Path, run: Path, split: str = "test") -> Path:
    """Predict and score one split of the run's patients with its best model; returns the metrics file."""
    run_stage(
        bundle,
        "evaluating",
        run / f"{split}.log",
        dataset_dir=data.resolve(),
        datalist=(run / "datalist.json").resolve(),
        ckpt_dir=(run / "models").resolve(),
        output_dir=(run / split).resolve(),
        **{"validate#data": f"$@split_data('{split}')"},
        **model_overrides(run),
    )
    return run / split / "metrics.json"
