"""One upload (one file, or the slices of one series) decoded by the reader of its detected format."""

from __future__ import annotations

from metaseg.imageio.detect import common_kind
from metaseg.imageio.dicom import decode_dicom
from metaseg.imageio.limits import Limits, check_upload
from metaseg.imageio.nifti import decode_nifti
from metaseg.imageio.picture import decode_pictures
from metaseg.imageio.volume import Volume


def decode(files: list[tuple[str, bytes]], limits: Limits = Limits()) -> Volume:
    """Decode one upload (one file, or the slices of one series); any bad input raises UserError."""
    check_upload(files, limits)
    kind = common_kind(files)
    if kind == "dicom":
        return decode_dicom(files, limits)
    if kind == "nifti":
        return decode_nifti(files, limits)
    return decode_pictures(files, kind, limits)
