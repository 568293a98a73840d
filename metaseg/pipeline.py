"""The training and evaluation stages over a run folder, nnU-Net style: each stage reads and writes named files.

    <run>/datalist.json      the patient split the run used (written by `train`, read by `evaluate`)
    <run>/models/model.pt    the best network by validation Dice; <run>/models/checkpoint.pt to resume
    <run>/train.log          the bundle's training log (+ TensorBoard events in <run>/eval)
    <run>/<split>/metrics.json  slice metrics of a split (validation or test), per-slice CSVs, and the predicted
                             masks in <run>/<split>/masks/<patient>/<stem>_seg.png
"""

from __future__ import annotations

from pathlib import Path

from metaseg.bundles import run_stage
from metaseg.data import discover
from metaseg.datalist import build_datalist, summary, write_datalist


def train(bundle: Path, data: Path, run: Path, seed: int = 0, **overrides) -> Path:
    """Split `data` by patient, then run the bundle's training into `run`; returns the best model's path."""
    datalist = build_datalist(discover(data), seed=seed)
    write_datalist(datalist, run / "datalist.json")
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


def evaluate(bundle: Path, data: Path, run: Path, split: str = "test", **overrides) -> Path:
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
        **overrides,
    )
    return run / split / "metrics.json"
