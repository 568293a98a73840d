"""The fold runs of `metaseg cv` as training writes them and evaluation reads them: where a fold lives, which folds
are done, and the out-of-fold lesion probabilities of each held-out patient (RUNS/<bundle>/fold_<k>/oof/<patient>.npz,
uint8 round(255 p))."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from metaseg.files import write_bytes_atomic

# how each fold's model is chosen: metaseg.training.cv trains to it, the fold datalists and cv.json state it
SELECTION = "final epoch of each fold (no early stopping); the bundle's validation runs once on training-fold patients"


def fold_dir(runs: Path, name: str, k: int) -> Path:
    """Where fold k of bundle `name` trains and keeps its out-of-fold probabilities."""
    return runs / name / f"fold_{k}"


def done_folds(runs: Path, name: str, folds: int) -> list[int]:
    return [k for k in range(folds) if (fold_dir(runs, name, k) / "fold.json").is_file()]


def write_npz(path: Path, **arrays) -> Path:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return write_bytes_atomic(path, buffer.getvalue())


def as_uint8(prob: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(prob, 0, 1) * 255).astype(np.uint8)


def load_oof(fold_dir: Path, patients: list[str]) -> dict[str, dict[str, np.ndarray]]:
    loaded = {}
    for patient in patients:
        with np.load(fold_dir / "oof" / f"{patient}.npz") as npz:
            loaded[patient] = {key: npz[key] for key in ("prob", "prob_flip", "prob_one_channel") if key in npz}
    return loaded
