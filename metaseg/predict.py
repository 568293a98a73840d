"""Segment every image of a Data folder/zip or of a plain image folder, writing one 0/255 PNG mask per slice.

Masks mirror the input: `<patient>/<stem>_seg.png` for the Data layout, the same relative folders for loose images,
and `<stem>_<k>_seg.png` per frame of a multi-frame file. A file that cannot be read is reported and skipped, and so
is a zip member whose name would put its mask outside the output folder (an absolute path, or `..`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from metaseg.conventions import mask_file
from metaseg.data import MASK_SUFFIX, is_hidden, open_source
from metaseg.engine import Engine
from metaseg.errors import UserError
from metaseg.files import write_bytes_atomic
from metaseg.imageio import decode, to_png_bytes

log = logging.getLogger(__name__)


@dataclass
class Report:
    written: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # input name -> why


def mask_name(name: str, frame: int, n_frames: int) -> PurePosixPath:
    """Where the mask of one frame of an input file goes, relative to the output folder."""
    path = PurePosixPath(name)
    stem = path.stem if n_frames == 1 else f"{path.stem}_{frame}"
    in_data_layout = len(path.parts) >= 2 and path.stem.startswith(path.parent.name + "_")
    folder = PurePosixPath(path.parent.name) if in_data_layout else path.parent
    return folder / mask_file(stem)


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


def predict(source: Path, out: Path, engine: Engine, threshold: float = 0.5) -> Report:
    if not source.exists():
        raise UserError(f"input not found: {source}")
    report, pending = Report(), []  # pending: (mask path, frame), flushed one engine batch at a time
    with open_source(source) as files:
        names = files.names()
        for name in names:
            if why := unsafe_name(name):
                report.skipped[name] = why
                log.warning("skipped %r: %s", name, why)
        names = inputs([name for name in names if name not in report.skipped])
        if not names and not report.skipped:
            raise UserError(f"no images found in {source}")
        for name in tqdm(names, desc="segmenting", unit="file"):
            try:
                frames = decode([(name, files.read(name))]).inputs
            except (UserError, ValueError) as err:
                report.skipped[name] = str(err)
                log.warning("skipped %s: %s", name, err)
                continue
            pending += [(out / mask_name(name, k, len(frames)), f) for k, f in enumerate(frames)]
            if len(pending) >= engine.batch_size:
                _segment(pending, engine, threshold, report)
                pending = []
        _segment(pending, engine, threshold, report)
    if not report.written:
        raise UserError(f"no image in {source} could be segmented ({len(report.skipped)} skipped)")
    return report


def _segment(pending: list[tuple[Path, np.ndarray]], engine: Engine, threshold: float, report: Report) -> None:
    if not pending:
        return
    for (path, _), prob in zip(pending, engine.probabilities([frame for _, frame in pending])):
        report.written.append(write_bytes_atomic(path, to_png_bytes(((prob > threshold) * 255).astype(np.uint8))))
