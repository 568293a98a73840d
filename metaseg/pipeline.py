"""The training and evaluation stages over a run folder, nnU-Net style: each stage reads and writes named files.

    <run>/datalist.json      the patient split the run used (written by `train`, read by `evaluate`)
    <run>/models/model.pt    the best network by validation Dice; <run>/models/checkpoint.pt to resume
    <run>/train.log          the bundle's training log (+ TensorBoard events in <run>/eval)
    <run>/test/metrics.json  test-split metrics, per-slice CSVs and the predicted masks in <run>/test/masks
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


def evaluate(bundle: Path, data: Path, run: Path, **overrides) -> Path:
    """Score the run's best model on its test patients; returns the metrics file."""
    run_stage(
        bundle,
        "evaluating",
        run / "test.log",
        dataset_dir=data.resolve(),
        datalist=(run / "datalist.json").resolve(),
        ckpt_dir=(run / "models").resolve(),
        output_dir=(run / "test").resolve(),
        **overrides,
    )
    return run / "test" / "metrics.json"
