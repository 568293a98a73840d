"""What an upload may cost: the limits, and the budget that checks declared sizes against them before any pixel is
decoded (the package docstring of metaseg.imageio)."""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass

from metaseg.errors import TooLarge, UserError
from metaseg.imageio.base import error

MiB = 2**20


@dataclass(frozen=True)
class Limits:
    """Upper bounds that keep a hostile or accidental upload from exhausting memory or CPU."""

    max_bytes: int = 128 * MiB  # per uploaded file, as uploaded (a 256^3 float32 NIfTI is 64 MiB)
    max_pixels: int = 4096 * 4096  # per frame (rows * cols)
    max_frames: int = 512  # per upload, all files together
    max_files: int = 512  # per upload
    max_decoded_bytes: int = 2**30  # per upload: decoded samples + float32 copies (2, or 5 with sequences), all frames
    max_inflated_bytes: int = 2**30  # most a .nii.gz or a deflated DICOM may inflate to
    max_dicom_elements: int = 200_000  # per upload, all DICOM files together (a flood costs ~0.4 KiB each)
    max_seconds: float | None = None  # decoding time, checked between frames; None: no limit


def request_limits(
    *, max_upload_bytes: int, max_pixels: int, max_frames: int, max_decoded_bytes: int, inflate_factor: int,
    max_dicom_elements: int, decode_timeout_s: float,
) -> Limits:
    """The decoder's limits for one request of the server, from its settings (serve.config.Settings, shown by GET
    /info): the server decodes under them, and so does the viewer before it sends an upload, so that both refuse an
    untrusted file the same way, with the same inflate, DICOM-element and time budgets. A single file may use the
    whole request budget."""
    return Limits(
        max_bytes=max_upload_bytes,
        max_pixels=max_pixels,
        max_frames=max_frames,
        max_files=max_frames,
        max_decoded_bytes=max_decoded_bytes,
        max_inflated_bytes=inflate_factor * max_upload_bytes,
        max_dicom_elements=max_dicom_elements,
        max_seconds=decode_timeout_s,
    )


_WORKING_BYTES_PER_PIXEL = 2 * 4  # two float32 copies: the frame, and its probability map in the server
_SEQUENCE_BYTES_PER_PIXEL = 3 * 4  # a 3+ channel image also keeps its three sequences as float32


class Budget:
    """Declared sizes of an upload, checked against the limits before any pixel is decoded, and the time spent."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.frames = 0
        self.bytes = 0
        self.elements = 0  # DICOM data elements parsed so far
        self._end = None if limits.max_seconds is None else time.monotonic() + limits.max_seconds

    def reserve(self, name: str, frames: int, rows: int, cols: int, samples: int = 1, sample_bytes: int = 1) -> None:
        """Count `frames` of rows x cols pixels of `samples` samples of `sample_bytes` bytes each."""
        limits = self.limits
        if frames <= 0 or rows <= 0 or cols <= 0:
            raise error(name, f"image has no pixels ({frames} frame(s) of {rows}x{cols})")
        if rows * cols > limits.max_pixels:
            limit = limits.max_pixels
            raise error(name, f"frame of {rows}x{cols} pixels exceeds the limit of {limit}", TooLarge)
        self.frames += frames
        working = _WORKING_BYTES_PER_PIXEL + (_SEQUENCE_BYTES_PER_PIXEL if samples >= 3 else 0)
        self.bytes += frames * rows * cols * (max(samples, 1) * max(sample_bytes, 1) + working)
        if self.frames > limits.max_frames:
            raise error(name, f"upload has more than {limits.max_frames} frames", TooLarge)
        if self.bytes > limits.max_decoded_bytes:
            problem = f"decoding the upload needs more than the limit of {limits.max_decoded_bytes} bytes of memory"
            raise error(name, problem, TooLarge)
        self.tick(name)

    def tick(self, name: str) -> None:
        """Called between frames: refuse once decoding has taken longer than its limit."""
        if self._end is not None and time.monotonic() > self._end:
            raise error(name, f"decoding takes more than the limit of {self.limits.max_seconds:g} s", TooLarge)


def check_upload(files: list[tuple[str, bytes]], limits: Limits) -> None:
    if not files:
        raise UserError("no files were uploaded")
    if len(files) > limits.max_files:
        raise TooLarge(f"too many files: {len(files)} uploaded, at most {limits.max_files}")
    for name, data in files:
        if not data:
            raise error(name, "file is empty")
        if len(data) > limits.max_bytes:
            raise error(name, f"file has {len(data)} bytes, more than {limits.max_bytes}", TooLarge)


def inflate(name: str, blob: bytes, wbits: int, cap: int) -> bytes:
    """Decompress at most `cap` bytes, so that a small zip bomb cannot exhaust memory."""
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(blob, cap + 1)
    except zlib.error as exc:
        raise error(name, f"corrupt compressed stream ({exc})") from exc
    if len(out) > cap:
        raise error(name, f"decompresses to more than {cap} bytes", TooLarge)
    if not inflater.eof:
        raise error(name, "compressed stream is truncated")
    return out
