"""The training and evaluation stages over a run folder, nnU-Net style: each stage reads and writes named files.

    <run>/run.json           the bundle, data, seed and config overrides of the run (what inference must repeat)
    <run>/datalist.json      the patient split the run used (written by `train`, read by `evaluate`)
    <run>/models/model.pt    the best network by validation Dice; <run>/models/checkpoint.pt to resume
    <run>/train.log          the bundle's training log (+ TensorBoard events in <run>/eval)
    <run>/<split>/metrics.json  slice metrics of a split (validation or test), per-slice CSVs, and the predicted
                             masks in <run>/<split>/masks/<patient>/<stem>_seg.png
"""

from __future__ import annotations

import json
from pathlib import Path

from metaseg.bundles import run_stage
from metaseg.data import discover
from metaseg.datalist import build_datalist, summary, write_datalist
from metaseg.errors import UserError
from metaseg.files import write_json_atomic

# Overrides that change the network's input, so inference and evaluation of the run must repeat them.
MODEL_OVERRIDES = ("spatial_size",)


def train(bundle: Path, data: Path, run: Path, seed: int = 0, datalist: dict | None = None, **overrides) -> Path:
    """Split `data` by patient (unless given a `datalist`), then run the bundle's training into `run`; returns the
    best model's path. A run folder that holds a checkpoint resumes from it (the bundle's `resume`)."""
    datalist = datalist or build_datalist(discover(data), seed=seed)
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
    return run / "models" / "model.pt"


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
