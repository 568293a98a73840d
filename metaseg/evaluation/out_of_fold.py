"""The fold runs of `metaseg cv` as training writes them and evaluation reads them: where a fold lives, which folds
are done, and the out-of-fold lesion probabilities of each held-out patient (RUNS/<bundle>/fold_<k>/oof/<patient>.npz,
uint8 round(255 p), one array per view: VIEWS)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from metaseg.files import write_bytes_atomic

# the views of a held-out patient: its slices as they are, mirrored (flip TTA), skull-stripped (the view's own
# pair), and FLAIR alone (only for slices of three sequences); ALWAYS_VIEWS are in every finished file
ALWAYS_VIEWS = ("prob", "prob_flip", "prob_skull_stripped", "prob_skull_stripped_flip")
VIEWS = (*ALWAYS_VIEWS, "prob_one_channel")

# how each fold's model is chosen: metaseg.training.cv trains to it, the fold datalists and cv.json state it
SELECTION = "final epoch of each fold (no early stopping); the bundle's validation runs once on training-fold patients"


def fold_dir(runs: Path, name: str, k: int) -> Path:
    """Where fold k of bundle `name` trains and keeps its out-of-fold probabilities."""
    return runs / name / f"fold_{k}"


def done_folds(runs: Path, name: str, folds: int) -> list[int]:
    return [k for k in range(folds) if (fold_dir(runs, name, k) / "fold.json").is_file()]


def has_views(file: Path) -> bool:
    """Whether a patient's file exists and holds ALWAYS_VIEWS (one of an older run may lack a newer view); reads
    the file's index, not its arrays."""
    if not file.is_file():
        return False
    with np.load(file) as npz:
        return set(ALWAYS_VIEWS) <= set(npz.files)


def views_complete(fold_dir: Path, patients: list[str]) -> bool:
    """Whether every held-out patient's file holds ALWAYS_VIEWS."""
    return all(has_views(fold_dir / "oof" / f"{patient}.npz") for patient in patients)


def write_npz(path: Path, **arrays) -> Path:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return write_bytes_atomic(path, buffer.getvalue())


def as_uint8(prob: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(prob, 0, 1) * 255).astype(np.uint8)


def read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as npz:
        return {key: npz[key] for key in npz.files}


def load_oof(fold_dir: Path, patients: list[str]) -> dict[str, dict[str, np.ndarray]]:
    return {patient: {key: value for key, value in read_npz(fold_dir / "oof" / f"{patient}.npz").items()
                      if key in VIEWS} for patient in patients}
