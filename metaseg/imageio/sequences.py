"""The three MRI sequences the networks see (conventions.SEQUENCES: pre-contrast T1, FLAIR, post-contrast T1) as users
hold them: one series, or one file, per sequence.

A DICOM study keeps each sequence in a series of its own. `decode(files)` takes one upload: one image or one series
(reader.decode), or a study's three sequence series, recognised from their descriptions (`sequence_of`); any other
set of several series is refused, asking for the sequences one by one. `stack(by_sequence)` takes the sequences the
user assigned, FLAIR required. The sequences must be the same slices: the same number of frames of the same size,
the same pixel spacing where both know it, and for DICOM the same slice positions and orientation within a tolerance;
they are stacked per frame in the network's channel order into one Volume whose `sequences` are (3, rows, cols), with
FLAIR in place of a missing pre- or post-contrast sequence as the training data have it (sequence dropout). Geometry,
kind and DICOM datasets (what a SEG references) are FLAIR's.

Recognising a series
    From its SeriesDescription, else its ProtocolName, lower-cased with punctuation as spaces:
    FLAIR           says FLAIR (or dark fluid, TIRM), and neither T1 nor contrast: a T1 FLAIR or a post-contrast
                    FLAIR is not the FLAIR the network learnt;
    post-contrast   says T1 (T1, T1w, MPRAGE, SPGR, BRAVO, VIBE, TFE) and contrast (post, Gd, gad..., +C, C+, T1c,
                    T1ce, CE, contrast, KM), or has a ContrastBolusAgent;
    pre-contrast    says T1 and not contrast (or says so: pre, native, plain, non-/without/no contrast).
    Anything else (T2, DWI, a T1 that says both pre and post) is not recognised. Three series are taken as the
    sequences only when each is recognised as another one.
Limits
    All sequences together are one upload: decoding memory and DICOM elements are shared evenly between them (they
    are the same slices), and so is the decoding time; frames and files count per sequence, since the network runs
    once per slice whatever the number of sequences.
Privacy
    Descriptions are read, never logged nor put into a message; messages name files and sequences.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import replace

import numpy as np
from pydicom.dataset import Dataset

from metaseg.conventions import FLAIR_CHANNEL, SEQUENCES
from metaseg.errors import Mismatch, TooLarge
from metaseg.imageio import reader
from metaseg.imageio.dicom import dicom_datasets, frame_planes
from metaseg.imageio.limits import Limits
from metaseg.imageio.volume import Volume

Files = list[tuple[str, bytes]]  # (file name, bytes), as reader.decode takes them

FLAIR = SEQUENCES[FLAIR_CHANNEL]
FIELDS = dict(zip(("pre_contrast", "flair", "post_contrast"), SEQUENCES))  # each sequence's name as an identifier
ASK_FOR_FIELDS = f"send one series, or the sequences in the fields {', '.join(FIELDS)}"

POSITION_TOLERANCE_MM = 0.1  # the same slice in two series of one study: its position as rounded in the headers
ORIENTATION_TOLERANCE = 1e-3  # direction cosines, about 0.06 degrees
SPACING_TOLERANCE = 1e-3  # relative

_PUNCTUATION = re.compile(r"[_\-/\\.,:;()\[\]{}*#]+")
_FLAIR = re.compile(r"flair|dark ?fluid|\btirm\b")
_T1 = re.compile(r"\bt1|\bmp ?rage\b|\bf?spgr\b|\bbravo\b|\bvibe\b|\btfe\b")
_PRE = re.compile(r"\b(?:pre|non|without|no|ohne) ?(?:contrast|kontrast|km|gd|gad\w*)\b|\bpre\b|\bnative?\b|\bplain\b")
_POST = re.compile(r"\bpost\b|\bgd\b|\bgad\w*|contrast|kontrast|\bkm\b|\+ ?(?:c|gd|km)\b|\bc ?\+|\bt1 ?(?:c|ce|gd)\b|\bce\b")


FILE_FIELD = "file"  # the upload field of one image or series, or of a DICOM study's three sequence series


def volume_of(fields: Mapping[str, Files], limits: Limits = Limits()) -> Volume:
    """An upload's fields as one Volume: FILE_FIELD alone (`decode`), or the sequences' FIELDS (`stack`); the server
    and the viewer both decode this way."""
    if FILE_FIELD in fields:
        return decode(list(fields[FILE_FIELD]), limits)
    return stack({FIELDS[field]: list(files) for field, files in fields.items()}, limits)


def decode(files: Files, limits: Limits = Limits()) -> Volume:
    """One upload: an image or series as reader.decode gives it, or a study's three sequence series stacked;
    several series that are not recognisably those three are a Mismatch."""
    series = _sequence_series(files, limits)
    if series is None:
        return reader.decode(files, limits)
    return stack({sequence: [files[i] for i in indices] for sequence, indices in series.items()}, limits)


def stack(by_sequence: Mapping[str, Files], limits: Limits = Limits()) -> Volume:
    """The sequences as assigned (names from conventions.SEQUENCES; FLAIR required), checked to be the same slices
    and stacked per frame in the network's channel order, FLAIR standing in for a missing one."""
    unknown = set(by_sequence) - set(SEQUENCES)
    if unknown:
        raise ValueError(f"not sequences: {sorted(unknown)}")
    if FLAIR not in by_sequence:
        raise Mismatch("FLAIR is missing: it is required, and it stands in for a missing pre- or post-contrast T1")
    given = tuple(sequence for sequence in SEQUENCES if sequence in by_sequence)
    volumes = _decode_each({sequence: by_sequence[sequence] for sequence in given}, limits)
    flair = volumes[FLAIR]
    for sequence, volume in volumes.items():
        name = _name(by_sequence[sequence])
        _check_one_sequence(name, sequence, volume)
        if sequence != FLAIR:
            _check_same_slices(name, sequence, volume, flair)
    if given == (FLAIR,):
        return replace(flair, sequences=None, given=given)
    channels = [volumes.get(sequence, flair).frames for sequence in SEQUENCES]
    return replace(flair, sequences=[np.stack(one_slice) for one_slice in zip(*channels)], given=given)


def sequence_of(ds: Dataset) -> str | None:
    """The sequence a DICOM series holds, from its description and contrast agent (module docstring), or None."""
    text = _description(ds)
    pre = bool(_PRE.search(text))
    post = bool(_POST.search(_PRE.sub(" ", text)))
    if _FLAIR.search(text):
        return FLAIR if not (_T1.search(text) or post) else None
    if not _T1.search(text):
        return None
    post = post or bool(str(ds.get("ContrastBolusAgent") or "").strip())
    if pre and post:
        return None
    return SEQUENCES[2] if post else SEQUENCES[0]


def _description(ds: Dataset) -> str:
    for keyword in ("SeriesDescription", "ProtocolName"):
        value = str(ds.get(keyword) or "").strip()
        if value:
            return " ".join(_PUNCTUATION.sub(" ", value.lower()).split())
    return ""


def _sequence_series(files: Files, limits: Limits) -> dict[str, list[int]] | None:
    """The indices of each sequence's files when the upload is several DICOM series; None for one series (or files
    that name none) and for other kinds. The headers are parsed under the upload's limits, files allowed for three."""
    datasets = dicom_datasets(files, replace(limits, max_files=len(SEQUENCES) * limits.max_files))
    if datasets is None:
        return None
    uids = [str(ds.get("SeriesInstanceUID") or "") for ds in datasets]
    series = {uid: [i for i, other in enumerate(uids) if other == uid] for uid in dict.fromkeys(uids)}
    if len(series.keys() - {""}) <= 1:
        return None  # one series: reader.decode checks the rest as ever
    if "" in series:
        raise Mismatch(f"{len(series) - 1} DICOM series and files of no series; {ASK_FOR_FIELDS}")
    if len(series) != len(SEQUENCES):
        raise Mismatch(f"the upload holds {len(series)} DICOM series; {ASK_FOR_FIELDS}")
    found = {uid: sequence_of(datasets[indices[0]]) for uid, indices in series.items()}
    if set(found.values()) != set(SEQUENCES):
        told = "; ".join(f"{_name([files[i] for i in indices])}: {found[uid] or 'not recognised'}"
                         for uid, indices in series.items())
        raise Mismatch(f"the upload holds 3 DICOM series whose descriptions do not name pre-contrast T1, FLAIR and "
                       f"post-contrast T1 one each ({told}); {ASK_FOR_FIELDS}")
    return {found[uid]: indices for uid, indices in series.items()}


def _decode_each(by_sequence: Mapping[str, Files], limits: Limits) -> dict[str, Volume]:
    """Each sequence decoded on its own, all together within one upload's limits (module docstring)."""
    count = len(by_sequence)
    share = replace(limits, max_decoded_bytes=limits.max_decoded_bytes // count,
                    max_dicom_elements=limits.max_dicom_elements // count)
    start = time.monotonic()
    volumes = {}
    for sequence, files in by_sequence.items():
        if limits.max_seconds is not None:
            left = limits.max_seconds - (time.monotonic() - start)
            if left <= 0:
                raise TooLarge(f"decoding takes more than the limit of {limits.max_seconds:g} s")
            share = replace(share, max_seconds=left)
        volumes[sequence] = reader.decode(files, share)
    return volumes


def _name(files: Files) -> str:
    """A sequence's upload named by its first file, quoted like imageio's messages."""
    first = repr(str(files[0][0])[:100])
    return first if len(files) == 1 else f"{first} and {len(files) - 1} more"


def _check_one_sequence(name: str, sequence: str, volume: Volume) -> None:
    """A colour image whose channels differ holds several sequences, not one (a gray one saved as RGB is fine)."""
    if volume.channels == 3 and any(np.ptp(channels, axis=0).any() for channels in volume.sequences):
        raise Mismatch(f"{name} ({sequence}) is a colour image of several sequences; send such an image on its own")


def _check_same_slices(name: str, sequence: str, volume: Volume, flair: Volume) -> None:
    """Mismatch naming what differs when `volume` is not the same slices as FLAIR's."""

    def differs(problem: str) -> Mismatch:
        return Mismatch(f"{name} ({sequence}) {problem}; the sequences must be the same slices (resample to FLAIR)")

    if len(volume.frames) != len(flair.frames):
        raise differs(f"has {len(volume.frames)} slice(s), FLAIR {len(flair.frames)}")
    size, flair_size = volume.frames[0].shape, flair.frames[0].shape
    if size != flair_size:
        raise differs(f"has slices of {size[0]}x{size[1]} pixels, FLAIR {flair_size[0]}x{flair_size[1]}")
    spacing, flair_spacing = volume.pixel_spacing_mm, flair.pixel_spacing_mm
    if spacing and flair_spacing and not np.allclose(spacing, flair_spacing, rtol=SPACING_TOLERANCE, atol=0):
        raise differs(f"has a pixel spacing of {spacing[0]:g} x {spacing[1]:g} mm, "
                      f"FLAIR {flair_spacing[0]:g} x {flair_spacing[1]:g} mm")
    for index, (plane, flair_plane) in enumerate(zip(frame_planes(volume), frame_planes(flair))):
        if plane is None or flair_plane is None:
            continue
        (position, orientation), (flair_position, flair_orientation) = plane, flair_plane
        if np.abs(orientation - flair_orientation).max() > ORIENTATION_TOLERANCE:
            raise differs(f"has slice {index} in another orientation than FLAIR's")
        distance = float(np.linalg.norm(position - flair_position))
        if distance > POSITION_TOLERANCE_MM:
            raise differs(f"has slice {index} {distance:.3g} mm away from FLAIR's (slice positions differ)")
