"""Find image/mask pairs in the users' `Data.zip` layout, from a folder or straight from the zip.

Layout: `[Data/]<patient>/<patient>_<n>.tif` with `<patient>_<n>_mask.tif` beside it. The patient is the folder a
file sits in, so a missing or extra top folder does not matter. Every file is opened once here, so that a corrupt
or wrongly shaped slice is dropped (and named) before training, not in the middle of an epoch.
"""

from __future__ import annotations

import io
import logging
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import tifffile

from metaseg.errors import UserError

log = logging.getLogger(__name__)

MASK_SUFFIX = "_mask"
SLICE_NUMBER = re.compile(r"_(\d+)$")  # <patient>_<n>: the slice number n, the order of a patient's slices


@dataclass(frozen=True)
class Pair:
    """One slice: paths are POSIX paths relative to the patients' root, so a zip and its unpacked folder agree."""

    patient: str
    slice: int
    image: str
    label: str
    lesion_pixels: int


@dataclass
class Discovery:
    """What a data source holds: the usable pairs, and every file that was left out and why."""

    source: Path
    root: str  # folder holding the patient folders, relative to the source ("" for the source itself)
    pairs: list[Pair]
    ignored: dict[str, list[str]] = field(default_factory=dict)

    @property
    def patients(self) -> list[str]:
        return sorted({p.patient for p in self.pairs})


def discover(source: str | Path) -> Discovery:
    """Pair every `<stem>.tif` with `<stem>_mask.tif` in a folder or a .zip, checking each file's contents."""
    source = Path(source)
    if not source.exists():
        raise UserError(f"data not found: {source}")
    with open_source(source) as files:
        names = sorted(files.names())
        images, masks = {}, {}
        for name in names:
            path = PurePosixPath(name)
            if path.suffix.lower() not in (".tif", ".tiff") or is_hidden(path):
                continue
            stem = str(path.with_suffix(""))
            if stem.endswith(MASK_SUFFIX):
                masks[stem[: -len(MASK_SUFFIX)]] = name
            else:
                images[stem] = name
        ignored: dict[str, list[str]] = {
            "image_without_mask": sorted(images[s] for s in images.keys() - masks.keys()),
            "mask_without_image": sorted(masks[s] for s in masks.keys() - images.keys()),
            "unreadable": [],
        }
        pairs, roots = [], set()
        for stem in sorted(images.keys() & masks.keys()):
            image_name, mask_name = images[stem], masks[stem]
            path = PurePosixPath(image_name)
            match = SLICE_NUMBER.search(path.stem)
            if len(path.parts) < 2 or match is None:
                ignored["unreadable"].append(f"{image_name}: not <patient>/<patient>_<n>.tif")
                continue
            try:
                lesion_pixels = _check_pair(files.read(image_name), files.read(mask_name))
            except ValueError as err:
                log.warning("skipping %s: %s", image_name, err)
                ignored["unreadable"].append(f"{image_name}: {err}")
                continue
            roots.add(str(path.parent.parent))
            pairs.append(
                Pair(
                    patient=path.parent.name,
                    slice=int(match.group(1)),
                    image=f"{path.parent.name}/{path.name}",
                    label=f"{path.parent.name}/{PurePosixPath(mask_name).name}",
                    lesion_pixels=lesion_pixels,
                )
            )
    if not pairs:
        raise UserError(f"no image/mask pairs (<patient>/<patient>_<n>.tif + _mask.tif) found in {source}")
    if len(roots) > 1:
        raise UserError(f"patient folders sit under more than one parent folder in {source}: {sorted(roots)}")
    pairs.sort(key=lambda p: (p.patient, p.slice))
    root = roots.pop()
    return Discovery(source=source, root="" if root == "." else root, pairs=pairs, ignored=ignored)


def read_tiff(data: bytes) -> np.ndarray:
    """Decode TIFF bytes (uncompressed or deflate; both occur in the real data) into a numpy array (rows, cols[, c])."""
    return tifffile.imread(io.BytesIO(data))


def _check_pair(image_bytes: bytes, mask_bytes: bytes) -> int:
    """Validate one slice and return its lesion pixel count; ValueError says what is wrong."""
    try:
        image, mask = read_tiff(image_bytes), read_tiff(mask_bytes)
    except Exception as err:  # tifffile raises many types for corrupt files
        raise ValueError(f"cannot decode TIFF ({type(err).__name__})") from None
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be HxWx3 uint8, got {image.shape} {image.dtype}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image {image.shape[:2]}")
    return int(np.count_nonzero(mask))


def member(root: str, path: str) -> str:
    """A patient-relative path of a datalist as a name in the data source (whose patients sit under `root`)."""
    return f"{root}/{path}" if root else path


def patients_root(names: set[str], recorded: str, label: str) -> str:
    """Where the patient folders sit in this source: the run's recorded root, else wherever `label` is found.

    So a Data folder and its Data.zip (with or without a top folder) both serve a run trained on either.
    """
    found = sorted(name[: -len(label) - 1] for name in names if name.endswith(f"/{label}"))
    for root in (recorded, "", *found):
        if member(root, label) in names:
            return root
    raise UserError(f"ground truth {label} not in the data source: is this the data the runs were trained on?")


def is_hidden(path: PurePosixPath) -> bool:
    """Dot files and macOS zip debris, which no data set means to include."""
    return any(part.startswith((".", "__MACOSX")) for part in path.parts)


class _Folder:
    def __init__(self, root: Path):
        self.root = root

    def names(self):
        return [p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file()]

    def read(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Zip:
    def __init__(self, path: Path):
        try:
            self.zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as err:
            raise UserError(f"not a readable zip file: {path} ({err})") from None

    def names(self):
        return [info.filename for info in self.zip.infolist() if not info.is_dir()]

    def read(self, name: str) -> bytes:
        try:
            return self.zip.read(name)
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise ValueError(f"corrupt zip member ({err})") from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.zip.close()
        return False


def open_source(source: Path):
    """A folder or a zip, read the same way: `.names()` lists files (POSIX, relative), `.read(name)` gives bytes."""
    if source.is_dir():
        return _Folder(source)
    if zipfile.is_zipfile(source):
        return _Zip(source)
    raise UserError(f"not a folder or a .zip file: {source}")
