"""The ground truth of a data source: each patient's boolean mask stack, read from the folder or zip a run was
trained on, whichever of the two it is now."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from metaseg.data.discovery import member, open_source, patients_root, read_tiff
from metaseg.errors import UserError


def stack(masks: list[np.ndarray], what: str) -> np.ndarray:
    """One patient's slices as a (slices, rows, cols) stack; slices of different sizes are a UserError."""
    if len({m.shape for m in masks}) > 1:
        raise UserError(f"slices of {what} differ in size: {sorted({m.shape for m in masks})}")
    return np.stack(masks)


def read_ground_truth(data: Path, recorded_root: str, groups: dict[str, list[dict]]) -> tuple[str, dict]:
    """(patients root in `data`, boolean ground-truth stack per patient) from the folder or zip of the runs;
    `groups`: datalist items per patient in slice order (metaseg.data.datalist.by_patient)."""
    with open_source(data) as files:
        names = set(files.names())
        first = next(iter(groups.values()))[0]["label"]
        root = patients_root(names, recorded_root, first)
        stacks = {}
        for patient, items in groups.items():
            masks = []
            for item in items:
                name = member(root, item["label"])
                if name not in names:
                    raise UserError(f"ground truth {name} not in {data}: is this the data the runs were trained on?")
                masks.append(read_tiff(files.read(name)) > 0)
            stacks[patient] = stack(masks, f"patient {patient}")
    return root, stacks
