"""One upload as the viewer keeps it: its files by the multipart field they are sent in, a digest that keys every
cached answer, and the Volume they decode to by the server's own rules.

An upload is either the files of one image or series under `file`, or the sequences the user assigned, under
`pre_contrast`, `flair` and `post_contrast` (metaseg.imageio.sequences.FIELDS). Both are decoded here exactly as the
server decodes them (metaseg.imageio.sequences: `decode` for `file`, which also takes a DICOM study's three sequence
series, and `stack` for the fields), under the server's own limits (`server_limits`), so an upload the server would
refuse is refused here, with its message, before it is sent.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePath

from metaseg.errors import UserError
from metaseg.imageio import sequences
from metaseg.imageio.detect import common_kind
from metaseg.imageio.limits import Limits, request_limits
from metaseg.imageio.volume import Volume
from metaseg.imageio.sequences import FIELDS
from ui.client import Files, Parts, ServerError

FLAIR_FIELD = next(name for name, sequence in FIELDS.items() if sequence == sequences.FLAIR)


@dataclass(frozen=True)
class Upload:
    parts: Parts = field(repr=False)
    digest: str

    @classmethod
    def of(cls, files: Iterable[tuple[str, bytes]]) -> Upload:
        """One image or series (or a DICOM study's three sequence series), sent as `file`."""
        return cls._of({sequences.FILE_FIELD: files})

    @classmethod
    def sequences(cls, given: Mapping[str, Iterable[tuple[str, bytes]]]) -> Upload:
        """The sequences the user assigned, by FIELDS' names in channel order; empty ones are left out."""
        given = {name: tuple(given.get(name) or ()) for name in FIELDS}
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
    def files(self) -> Files:
        """Every file, field after field."""
        return tuple(f for _, files in self.parts for f in files)

    @property
    def label(self) -> str:
        name = PurePath(self.files[0][0]).name
        return name if len(self.files) == 1 else f"{name} and {len(self.files) - 1} more file(s)"

    @property
    def nifti_files(self) -> int:
        """How many NIfTI files the main box got, where it got several: each NIfTI holds one sequence, so they belong
        in the sequence boxes (the server refuses several under `file`); 0 for any other upload."""
        files = list(self.files)
        if [name for name, _ in self.parts] != [sequences.FILE_FIELD] or len(files) < 2:
            return 0
        try:
            return len(files) if common_kind(files) == "nifti" else 0
        except UserError:  # mixed or unknown kinds: decoding says so
            return 0

    def volume(self, limits: Limits) -> Volume:
        """The upload decoded as the server decodes it (metaseg.imageio.sequences), under its `limits`; UserError for
        what the server would refuse: a Mismatch for sequences that are not the same slices, several DICOM series that
        are not a study's three sequences, or assigned sequences without FLAIR."""
        return sequences.volume_of(dict(self.parts), limits)


def server_limits(info: Mapping) -> Limits:
    """The server's decoding limits from its GET /info, through the function the server builds its own with: the
    viewer decodes untrusted files with the same inflate, DICOM-element and time budgets as the server."""
    try:
        return request_limits(**info["input"]["limits"])
    except (KeyError, TypeError):
        raise ServerError("The server's /info does not state its decoding limits as this viewer reads them; is it a "
                          "metaseg server of the viewer's version?") from None


def file_stem(upload: Upload, volume: Volume) -> str:
    """A safe file name stem for what the user downloads: patient and series of DICOM (PatientID_seriesN; FLAIR's
    where sequences were stacked), else the first FLAIR file's name without folders or suffixes."""
    if volume.datasets:
        ds = volume.datasets[0]
        patient, number = ds.get("PatientID"), ds.get("SeriesNumber")
        named = [str(patient) if patient else "", f"series{number}" if number not in (None, "") else ""]
        stem = _safe("_".join(part for part in named if part))
        if stem:
            return stem
    first = dict(upload.parts).get(FLAIR_FIELD, upload.files)[0][0]
    return _safe(PurePath(first).name).split(".")[0] or "upload"


def _safe(text: str) -> str:
    """Letters, digits, '-', '_' and '.' only, no leading dot, at most 80 characters."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")[:80]
