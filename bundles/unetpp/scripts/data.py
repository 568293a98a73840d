"""The data a bundle trains on: the data folder (a folder or its zip), the seeded patient split, the datalists and
the sampling weights. Plain functions that configs call by `_target_`, so train.json reads as a recipe."""

import glob
import os
import shutil
from typing import Dict, List, Optional, Sequence

import numpy as np
from monai.data import load_decathlon_datalist, partition_dataset
from PIL import Image

SPLITS = ("training", "validation", "test")
MASK_SUFFIX = "_mask.tif"  # the data set's convention: <slice>.tif and its mask <slice>_mask.tif
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm")


def data_folder(path: str, extract_dir: str) -> str:
    """`path` itself if it is a folder; a zip of the data set is unpacked into `extract_dir` (the data set is
    distributed as a zip, and MONAI reads files, not archives)."""
    if os.path.isdir(path):
        return path
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset_dir {path} is neither a folder nor a zip file: give the data folder or zip")
    shutil.unpack_archive(path, extract_dir, "zip")
    return extract_dir


def mask_files(root: str) -> List[str]:
    """Every mask under `root`, sorted: each names one labelled slice, and its folder the patient."""
    found = sorted(glob.glob(os.path.join(root, "**", "*" + MASK_SUFFIX), recursive=True))
    if not found:
        raise FileNotFoundError(f"no *{MASK_SUFFIX} masks under {root}: not a data folder of the LGG layout")
    return found


def patients_root(masks: Sequence[str]) -> str:
    """The folder holding the patient folders: datalist paths are relative to it."""
    return os.path.dirname(os.path.dirname(masks[0]))


def patient_ids(masks: Sequence[str]) -> List[str]:
    """The patients (the masks' folder names), sorted."""
    return sorted({os.path.basename(os.path.dirname(f)) for f in masks})


def partition_patients(
    patients: Sequence[str], seed: int = 0, test_fraction: float = 0.2, val_fraction: float = 0.1
) -> Dict[str, List[str]]:
    """Seeded patient split (never slices, so no patient is on both sides): `test_fraction` of all patients for
    test, `val_fraction` for validation, the rest training; monai.data.partition_dataset over the sorted ids, which
    rounds each part on its own (at 101 patients, 1 - 0.3 - 0.2 = 0.4999.. rounds to 50 and one patient is in no
    part): training takes any patient it leaves out.
    On few patients a split may come out empty: training needs no test patients, so train.json takes this one."""
    if not 0 <= test_fraction < 1 or not 0 < val_fraction < 1 or test_fraction + val_fraction >= 1:
        raise ValueError(
            f"fractions must satisfy 0 <= test < 1, 0 < val < 1, test + val < 1 (got {test_fraction}, {val_fraction})"
        )
    ratios = [1 - test_fraction - val_fraction, val_fraction, test_fraction]
    parts = partition_dataset(sorted(patients), ratios=ratios, shuffle=True, seed=seed)
    parts[0] = parts[0] + sorted(set(patients).difference(*parts))  # rounding each part alone can leave one out
    return {name: sorted(part) for name, part in zip(SPLITS, parts)}


def split_patients(
    patients: Sequence[str], seed: int = 0, test_fraction: float = 0.2, val_fraction: float = 0.1
) -> Dict[str, List[str]]:
    """partition_patients, refused where a split it asks for would be empty: the split a datalist records."""
    split = partition_patients(patients, seed, test_fraction, val_fraction)
    empty = [name for name in SPLITS if not split[name] and not (name == "test" and test_fraction == 0)]
    if empty:
        raise ValueError(f"{len(patients)} patients are too few for this split: {', '.join(empty)} would be empty")
    return split


def split_datalist(
    split: str, datalist: Optional[str], masks: Sequence[str], patient_split: Dict[str, List[str]], base_dir: str
) -> List[dict]:
    """The image/label pairs of one split: from the datalist JSON when one is given (metaseg's, which records the
    split it made), else the masks of `patient_split`'s patients beside their images."""
    if datalist:
        return load_decathlon_datalist(datalist, data_list_key=split, base_dir=base_dir)
    chosen = set(patient_split[split])
    return [
        {"image": f[: -len(MASK_SUFFIX)] + ".tif", "label": f}
        for f in masks
        if os.path.basename(os.path.dirname(f)) in chosen
    ]


def sample_weights(
    data: Sequence[dict], positive_weight: float, lesion_area: bool = False, uniform_share: float = 0.1
) -> List[float]:
    """A weight per slice for the sampler: lesions are rare, so a slice whose mask has any lesion pixel weighs
    `positive_weight`, an empty one 1. With `lesion_area` (Buda et al. 2019), a slice is drawn with probability
    proportional to its lesion pixels, mixed with `uniform_share` of uniform draws so every slice is seen."""
    if not isinstance(lesion_area, bool):  # `--lesion_area_sampling false` would arrive as a non-empty string
        raise TypeError(f"lesion_area_sampling must be True or False, got {lesion_area!r}")
    if not lesion_area:
        return [positive_weight if Image.open(d["label"]).getbbox() else 1.0 for d in data]
    areas = np.array([np.count_nonzero(np.asarray(Image.open(d["label"]))) for d in data], dtype=np.float64)
    lesion = areas / areas.sum() if areas.sum() > 0 else np.full(len(areas), 1.0 / max(len(areas), 1))
    return list((1.0 - uniform_share) * lesion + uniform_share / max(len(areas), 1))


def input_files(folder: str) -> List[str]:
    """The images under `folder` (any depth) that inference segments, sorted; the data set's masks are not inputs."""
    return sorted(
        f
        for f in glob.glob(os.path.join(folder, "**", "*"), recursive=True)
        if f.lower().endswith(IMAGE_SUFFIXES) and not f.endswith(MASK_SUFFIX)
    )
