"""The format of an uploaded file from its magic numbers alone; the file name is user-chosen and often wrong."""

from __future__ import annotations

import zlib

from metaseg.errors import Unsupported
from metaseg.imageio.base import error

MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),  # BigTIFF
    (b"MM\x00+", "tiff"),
)
GZIP_MAGIC = b"\x1f\x8b"
GZIP_WBITS = 16 + zlib.MAX_WBITS
_NIFTI1_HEADER_SIZE = 348
_BARE_DICOM_STARTS = (b"\x08\x00", b"\x00\x08")  # group 0008, little / big endian


def _is_nifti1(head: bytes) -> bool:
    return head[344:348] == b"n+1\x00"


def gunzip_head(name: str, data: bytes) -> bytes:
    """The first bytes of a gzip stream, enough for a NIfTI-1 header, without inflating the rest."""
    try:
        return zlib.decompressobj(GZIP_WBITS).decompress(data, _NIFTI1_HEADER_SIZE)
    except zlib.error as exc:
        raise error(name, f"corrupt gzip stream ({exc})") from exc


def _detect_kind(name: str, data: bytes) -> str | None:
    """The format from magic numbers alone; the file name is user-chosen and often wrong."""
    if data[128:132] == b"DICM":  # first: a DICOM preamble may itself hold a TIFF header
        return "dicom"
    for magic, kind in MAGIC:
        if data.startswith(magic):
            return kind
    if _is_nifti1(data):
        return "nifti"
    if data.startswith(GZIP_MAGIC):
        if not _is_nifti1(gunzip_head(name, data)):
            raise error(name, "gzip file does not hold a NIfTI-1 image", Unsupported)
        return "nifti"
    if data.startswith(_BARE_DICOM_STARTS):  # a dataset without preamble; read with force
        return "dicom"
    return None


def common_kind(files: list[tuple[str, bytes]]) -> str:
    kinds = [_detect_kind(name, data) for name, data in files]
    for (name, _), kind in zip(files, kinds):
        if kind is None:
            raise error(name, "not a recognised image (expected PNG, JPEG, TIFF, DICOM, NIfTI-1)", Unsupported)
    first_name = str(files[0][0])[:100]
    for (name, _), kind in zip(files, kinds):
        if kind != kinds[0]:
            problem = f"is {kind} but {first_name!r} is {kinds[0]}; upload one kind at a time"
            raise error(name, problem)
    return kinds[0]
