"""Segment every image of a Data folder/zip or of a plain image folder, writing one 0/255 PNG mask per slice.

Masks come from the bundle's chosen inference steps (metaseg.inference.steps.upload_masks), as in the server: a Data
patient folder (`<patient>/<patient>_<n>.*`, slices in the order of n) is one volume, and so is a multi-frame file
(DICOM, NIfTI, multi-page TIFF); every other file is a single slice, which gets no component step.

Masks mirror the input: `<patient>/<stem>_seg.png` for the Data layout, the same relative folders for loose images,
and `<stem>_<k>_seg.png` per frame of a multi-frame file. A file that cannot be read is reported and skipped, and so
is a zip member whose name would put its mask outside the output folder (an absolute path, or `..`), and so are the
slices of a patient folder whose sizes differ (they do not make one volume).
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from metaseg.conventions import mask_file
from metaseg.data.discovery import MASK_SUFFIX, SLICE_NUMBER, is_hidden, open_source
from metaseg.errors import UserError
from metaseg.files import write_bytes_atomic
from metaseg.imageio.picture import to_png_bytes
from metaseg.imageio.reader import decode
from metaseg.inference.engine import Engine
from metaseg.inference.steps import upload_masks, with_threshold

log = logging.getLogger(__name__)


@dataclass
class Report:
    written: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # input name -> why
    probabilities: dict[Path, np.ndarray] = field(default_factory=dict)  # mask -> its frame's, if kept


def mask_name(name: str, frame: int, n_frames: int) -> PurePosixPath:
    """Where the mask of one frame of an input file goes, relative to the output folder."""
    path = PurePosixPath(name)
    stem = path.stem if n_frames == 1 else f"{path.stem}_{frame}"
    folder = PurePosixPath(path.parent.name) if in_data_layout(path) else path.parent
    return folder / mask_file(stem)


def in_data_layout(path: PurePosixPath) -> bool:
    """`<patient>/<patient>_<n>.<ext>`: a slice of a Data patient folder."""
    return len(path.parts) >= 2 and path.stem.startswith(path.parent.name + "_")


def volumes(names: list[str]) -> list[list[str]]:
    """The files as uploads: each Data patient folder's slices in slice-number order, every other file alone."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name in names:
        path = PurePosixPath(name)
        groups.setdefault(("patient", str(path.parent)) if in_data_layout(path) else ("file", name), []).append(name)

    def slice_number(name: str) -> tuple[int, str]:
        match = SLICE_NUMBER.search(PurePosixPath(name).stem)
        return (int(match.group(1)) if match else -1, name)

    return [sorted(group, key=slice_number) for _, group in sorted(groups.items())]


def unsafe_name(name: str) -> str | None:
    """Why a member name must not become an output path (a zip may hold any name), or None when it is safe."""
    path = PurePosixPath(name)
    if path.is_absolute():
        return "absolute path in the archive: its mask would be written outside --out"
    if ".." in path.parts:
        return "'..' in the path: its mask would be written outside --out"
    return None


def inputs(names: list[str]) -> list[str]:
    """Image files to segment: everything but ground-truth masks and hidden files."""
    return sorted(
        n for n in names
        if not PurePosixPath(n).stem.endswith(MASK_SUFFIX)
        and not is_hidden(PurePosixPath(n))
    )


def predict(source: Path, out: Path, engine: Engine, threshold: float | None = None,
            only: Collection[str] | None = None, keep_probabilities: bool = False) -> Report:
    """Masks of every input with the engine's inference steps; `threshold` replaces the steps' own; `only` (names in
    the source, e.g. the slices of a run's test patients for `metaseg evaluate`) segments those alone;
    `keep_probabilities` keeps each mask's lesion probabilities in the report (for `metaseg evaluate`'s FROC)."""
    if not source.exists():
        raise UserError(f"input not found: {source}")
    steps = with_threshold(engine.inference_steps, threshold)
    report, pending = Report(), []  # pending: (mask paths, frames) per upload, flushed about one engine batch at a time
    with open_source(source) as files:
        names = files.names()
        if only is not None:
            missing = set(only) - set(names)
            if missing:
                raise UserError(f"{len(missing)} of the {len(only)} images to segment are not in {source}: "
                                f"is this the data the run was trained on?")
            names = sorted(set(only))
        for name in names:
            if why := unsafe_name(name):
                _skip(report, name, why)
        names = inputs([name for name in names if name not in report.skipped])
        if not names and not report.skipped:
            raise UserError(f"no images found in {source}")
        with tqdm(total=len(names), desc="segmenting", unit="file") as progress:
            for group in volumes(names):
                read, paths, frames = [], [], []
                for name in group:
                    progress.update()
                    try:
                        decoded = decode([(name, files.read(name))]).inputs
                    except (UserError, ValueError) as err:
                        _skip(report, name, str(err))
                        continue
                    read.append(name)
                    paths += [out / mask_name(name, k, len(decoded)) for k in range(len(decoded))]
                    frames += decoded
                sizes = sorted({frame.shape[-2:] for frame in frames})
                if len(sizes) > 1:
                    for name in read:
                        _skip(report, name, f"the slices of its patient folder differ in size {sizes}: not one volume")
                    continue
                if frames:
                    pending.append((paths, frames))
                if sum(len(f) for _, f in pending) >= engine.batch_size:
                    _segment(pending, engine, steps, report, keep_probabilities)
                    pending = []
        _segment(pending, engine, steps, report, keep_probabilities)
    if not report.written:
        raise UserError(f"no image in {source} could be segmented ({len(report.skipped)} skipped)")
    return report


def _skip(report: Report, name: str, why: str) -> None:
    report.skipped[name] = why
    log.warning("skipped %r: %s", name, why)


def _segment(pending: list[tuple[list[Path], list[np.ndarray]]], engine: Engine, steps: dict, report: Report,
             keep: bool) -> None:
    """One engine call over the frames of several uploads, then each upload's masks from its own probabilities (kept
    in the report with `keep`)."""
    if not pending:
        return
    probabilities = engine.probabilities([frame for _, frames in pending for frame in frames])
    start = 0
    for paths, frames in pending:
        masks = upload_masks(probabilities[start : start + len(frames)], steps, volume=True)
        if keep:
            report.probabilities.update(zip(paths, probabilities[start : start + len(frames)]))
        start += len(frames)
        report.written += [write_bytes_atomic(path, to_png_bytes(mask)) for path, mask in zip(paths, masks)]
