"""One upload as the viewer keeps it: its files by the multipart field they are sent in, and a digest that keys
every cached answer.

An upload is either the files of one image or series under `file` (where the server also recognises a DICOM study's
three sequence series), or the sequences the user assigned, under `pre_contrast`, `flair` and `post_contrast` (FLAIR
required; the server fills a missing one with FLAIR, as the training data do).
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import PurePath

import pydicom

from metaseg.errors import UserError
from metaseg.imageio import Volume
from ui.client import Files, Parts

SEQUENCES = {"pre_contrast": "pre-contrast", "flair": "FLAIR", "post_contrast": "post-contrast"}  # channel order
_SERIES_TAGS = ["SeriesInstanceUID", "SeriesNumber", "SeriesDescription"]


@dataclass(frozen=True)
class Upload:
    parts: Parts = field(repr=False)
    digest: str

    @classmethod
    def of(cls, files: Iterable[tuple[str, bytes]]) -> Upload:
        """One image or series, sent as `file`."""
        return cls._of({"file": files})

    @classmethod
    def sequences(cls, given: Mapping[str, Iterable[tuple[str, bytes]]]) -> Upload:
        """The sequences the user assigned (SEQUENCES' fields; empty ones are left out); FLAIR is required."""
        given = {name: tuple(given.get(name) or ()) for name in SEQUENCES}
        if not given["flair"]:
            raise UserError("Add the FLAIR: the model needs it whenever the sequences come in separate files "
                            "(a missing pre- or post-contrast is filled with FLAIR).")
        return cls._of({name: files for name, files in given.items() if files})

    @classmethod
    def _of(cls, fields: Mapping[str, Iterable[tuple[str, bytes]]]) -> Upload:
        parts = tuple((name, tuple((str(f), bytes(d)) for f, d in files)) for name, files in fields.items())
        sha = hashlib.sha256()
        for name, files in parts:
            for filename, data in files:
                sha.update(f"{name}\0{filename}\0{len(data)}\0".encode())
                sha.update(data)
        return cls(parts, sha.hexdigest())

    @property
    def assigned(self) -> bool:
        """Whether the user assigned the sequences (else everything is under `file`)."""
        return self.parts[0][0] != "file"

    @property
    def files(self) -> Files:
        """Every file, field after field."""
        return tuple(f for _, files in self.parts for f in files)

    @property
    def label(self) -> str:
        name = PurePath(self.files[0][0]).name
        return name if len(self.files) == 1 else f"{name} and {len(self.files) - 1} more file(s)"

    @cached_property
    def views(self) -> list[tuple[str, Files]]:
        """What can be shown, each (name, files): the assigned sequences with FLAIR first, the series of a DICOM
        upload that holds several (the server takes three as the sequences), or the whole upload. They share one
        geometry (the server refuses them otherwise), so the first stands for all in sizes and slice order."""
        if self.assigned:
            fields = dict(self.parts)
            return [(SEQUENCES[name], fields[name]) for name in ("flair", "pre_contrast", "post_contrast")
                    if name in fields]
        return dicom_series(self.files) or [(self.label, self.files)]

    def sequences_given(self, channels: int) -> list[str]:
        """The sequences the network gets, by the server's rule: the assigned ones; all three for a DICOM study of
        three series or a 3-channel image (`channels` of the decoded upload); else FLAIR alone."""
        if self.assigned:
            return [SEQUENCES[name] for name, _ in self.parts]
        return list(SEQUENCES.values()) if channels == 3 or len(self.views) > 1 else ["FLAIR"]


def dicom_series(files: Files) -> list[tuple[str, Files]] | None:
    """The series of an upload of DICOM files, by SeriesNumber, each named by its description (or number); None
    unless these are DICOM files (with the 'DICM' preamble) of more than one series."""
    series: dict[str, list] = {}
    for name, data in files:
        if data[128:132] != b"DICM":
            return None
        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=_SERIES_TAGS)
        except Exception:  # pydicom raises many kinds on a broken header; decoding the upload says what is wrong
            return None
        uid = str(ds.get("SeriesInstanceUID", ""))
        number = ds.get("SeriesNumber")
        title = str(ds.get("SeriesDescription") or "").strip() or f"series {number if number is not None else '?'}"
        series.setdefault(uid, [number if isinstance(number, int) else float("inf"), title, []])[2].append((name, data))
    if len(series) < 2:
        return None
    return [(title, tuple(group)) for _, title, group in sorted(series.values(), key=lambda s: s[0])]


def file_stem(upload: Upload, volume: Volume) -> str:
    """A safe file name stem for what the user downloads: patient and series of DICOM (PatientID_seriesN), else
    the first file's name without folders or suffixes."""
    if volume.datasets:
        ds = volume.datasets[0]
        patient, number = ds.get("PatientID"), ds.get("SeriesNumber")
        named = [str(patient) if patient else "", f"series{number}" if number not in (None, "") else ""]
        stem = _safe("_".join(part for part in named if part))
        if stem:
            return stem
    return _safe(PurePath(upload.views[0][1][0][0]).name).split(".")[0] or "upload"


def _safe(text: str) -> str:
    """Letters, digits, '-', '_' and '.' only, no leading dot, at most 80 characters."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")[:80]
