"""A `metaseg train` run folder as evaluation reads it: its datalist, the masks `metaseg evaluate` wrote for a split
(`<run>/<split>/masks/<patient>/<stem>_seg.png`), the inference steps that made them, and their per-patient scores."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from metaseg import conventions
from metaseg.bundles import NAMES
from metaseg.errors import UserError
from metaseg.evaluation.metrics import patient_metrics


@dataclass
class Run:
    """One `metaseg train` run folder under the bundle name it is compared as."""

    name: str
    path: Path
    datalist: dict

    def mask_path(self, split: str, item: dict) -> Path:
        image = PurePosixPath(item["image"])
        return self.path / split / "masks" / image.parent / conventions.mask_file(image.stem)


def parse_run(text: str) -> tuple[str, Path]:
    """`NAME=DIR` from the command line, NAME a shipped bundle so that the best-model record can name it."""
    name, sep, folder = text.partition("=")
    if not sep or not folder or name not in NAMES:
        raise UserError(f"--run must be NAME=RUN_DIR with NAME one of {', '.join(NAMES)}, got {text!r}")
    return name, Path(folder)


def load_run(name: str, path: Path) -> Run:
    file = path / "datalist.json"
    if not file.is_file():
        raise UserError(f"no datalist.json in run folder {path} ({name}): train into it first (metaseg train --out)")
    try:
        return Run(name, path, json.loads(file.read_text()))
    except ValueError as err:
        raise UserError(f"unreadable {file}: {err}") from None


def comparable_items(runs: list[Run], split: str) -> list[dict]:
    """The split's slices, identical in every run: models are only compared on the same patients and slices."""
    first = runs[0]
    for run in runs[1:]:
        ours, theirs = first.datalist["patients"][split], run.datalist["patients"][split]
        if sorted(ours) != sorted(theirs):
            raise UserError(
                f"runs not comparable: {first.name} and {run.name} have different {split} patients "
                f"({len(set(ours) ^ set(theirs))} differ); train both with the same data and --seed"
            )
        if sorted(i["image"] for i in first.datalist[split]) != sorted(i["image"] for i in run.datalist[split]):
            raise UserError(f"runs not comparable: {first.name} and {run.name} list different {split} slices")
    return first.datalist[split]


def evaluate_command(run: Run, split: str) -> str:
    """The `metaseg evaluate` command that (re)writes a run's masks of `split`."""
    return f"metaseg evaluate --bundle {run.name} --run {run.path} --split {split}"


def check_masks(run: Run, split: str, items: list[dict]) -> None:
    """Every slice of the split needs its predicted mask; say which patients lack how many, and how to fix it."""
    again = evaluate_command(run, split)
    if not (run.path / split / "masks").is_dir():
        raise UserError(f"no {split} masks in {run.path / split / 'masks'} ({run.name}): run `{again}` first")
    missing: dict[str, int] = {}
    for item in items:
        if not run.mask_path(split, item).is_file():
            missing[item["patient"]] = missing.get(item["patient"], 0) + 1
    if missing:
        which = ", ".join(f"{patient}: {n}" for patient, n in sorted(missing.items()))
        raise UserError(
            f"{sum(missing.values())} of {len(items)} {split} masks missing in {run.path} ({run.name}; by patient: "
            f"{which}); rerun `{again}`"
        )


def read_evaluation(run: Run, split: str) -> dict:
    """What `metaseg evaluate` recorded of the split's masks, above all the inference steps that made them."""
    file = run.path / split / "metrics.json"
    try:
        evaluation = json.loads(file.read_text())
        if not isinstance(evaluation["inference_steps"], dict) or not isinstance(evaluation["steps"], str):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{file} does not name the inference steps that made the {split} masks of {run.name} (masks "
                        f"of an older `metaseg evaluate` or of the bundle's evaluate.json are not what is served): "
                        f"rerun `{evaluate_command(run, split)}`") from None
    return evaluation



def read_predictions(run: Run, split: str, groups: dict[str, list[dict]], truth: dict) -> dict[str, np.ndarray]:
    """Boolean predicted stack per patient, each slice checked against its ground truth's size."""
    stacks = {}
    for patient, items in groups.items():
        masks = []
        for item, gt in zip(items, truth[patient]):
            path = run.mask_path(split, item)
            try:
                mask = np.asarray(Image.open(path)) > 0
            except OSError as err:
                raise UserError(f"unreadable mask {path}: {err}") from None
            if mask.shape != gt.shape:
                raise UserError(f"{path} is {mask.shape}, its ground truth {gt.shape}: masks of another data set?")
            masks.append(mask)
        stacks[patient] = np.stack(masks)
    return stacks


def score(run: Run, split: str, truth: dict, preds: dict) -> list[dict]:
    """nnU-Net's metric_per_case, one entry per patient, naming the folder its masks came from."""
    return [
        {"patient": patient, **patient_metrics(truth[patient], preds[patient]),
         "prediction_dir": str(run.path / split / "masks" / patient)}
        for patient in truth
    ]
