"""Decode uploaded image bytes into 2D float32 slices; shared by the server and the CLI.

``decode(files)`` takes one file, or several files that are the slices of one series. The format
is recognised from magic numbers, never from the (user-chosen) file name: PNG, JPEG, TIFF (also
multi-page), DICOM (Part 10 with 'DICM' at offset 128, or a bare dataset without preamble) in any
transfer syntax pydicom and the pylibjpeg plugins decode, and NIfTI-1 (.nii, .nii.gz). All files of
an upload must be of one kind and one frame size. ``to_nifti_bytes`` writes a mask stack back as
NIfTI-1 in the upload's geometry.

What a volume is
    One volume (``Volume.is_volume``: its lesions are 3D, metaseg.lesions) is a DICOM series (several
    files sharing one SeriesInstanceUID, ordered by position), a multi-frame DICOM, a NIfTI, or one
    multi-page TIFF. Several PNG/JPEG/TIFF files uploaded together are unrelated slices, and so are
    several DICOM files without a SeriesInstanceUID: nothing says they are one series.

Conventions
-----------
Orientation
    Every frame is a (rows, cols) array as the image is displayed: row 0 is the top.
    PNG/JPEG/TIFF: as stored, with an EXIF/TIFF Orientation tag applied.
    DICOM: as stored (DICOM pixel rows are display rows). Several files are sorted by
    ImagePositionPatient projected on the slice normal (inferior to superior for axial
    slices), else by InstanceNumber, else kept in upload order.
    NIfTI: reoriented to the closest RAS+ axes (axis flips/permutations only, never resampled);
    frame k is the axial slice ``data[:, :, k]`` shown the way a DICOM viewer shows an axial
    slice (radiological view: anterior at the top, the patient's right on the image's left),
    i.e. ``slice.T[::-1, ::-1]``; frames run inferior to superior. An axial DICOM series and
    the NIfTI converted from it give the same frames.
Geometry
    ``Volume.affine`` maps a voxel index (frame, row, col, 1) to RAS+ millimetres where the source
    says where its pixels are: DICOM ImagePositionPatient/ImageOrientationPatient/PixelSpacing, with
    the step between frames from the first and last positions (else SliceThickness along the
    normal), or the NIfTI's own affine. ``to_nifti_bytes`` stores a mask stack in that geometry, laid
    out so that the reading convention above gives back its frames in series order (for a DICOM
    series, when its slices are axial as usually stored; else as any NIfTI of that geometry reads);
    without geometry, the pixel spacing and slice thickness where known, else 1 mm.
Channels
    ``frames`` are one channel: of any 3- or 4-channel image (RGB, RGBA, palette expanded to RGBA,
    RGB/YBR DICOM, PALETTE COLOR DICOM, 3-sample TIFF) channel 1. The training slices are
    256x256x3 with channels (pre-contrast, FLAIR, post-contrast), so channel 1 is FLAIR; for a
    gray picture saved as RGB all channels are equal, so channel 1 is its gray value. Gray+alpha
    yields channel 0. ``sequences`` keeps channels 0-2 of such an image, (3, rows, cols), for the
    models that see all three sequences (None for a one-channel frame); ``inputs`` is what the
    network gets: the sequences where there are three, else the frame.
Intensities
    Native values as float32, never rescaled (the model's preprocessing normalises); 16-bit
    colour PNGs, which PIL would cut to 8 bits, are decoded with imagecodecs. DICOM gets
    its Modality LUT / RescaleSlope+Intercept (also from Enhanced DICOM functional groups);
    MONOCHROME1 is mirrored over the modality range of its stored bits so that bright means high
    signal, as in MONOCHROME2. NIfTI gets scl_slope/scl_inter.
Non-finite values
    NaN and +/-inf (e.g. NIfTI background written by registration tools) are replaced by 0 and
    the count is logged as a warning; they would otherwise poison intensity normalisation.
Limits
    See ``Limits``. Sizes come from headers (PNG/JPEG header, TIFF tags, DICOM Rows/Columns/
    NumberOfFrames/SamplesPerPixel/BitsAllocated, NIfTI dim/datatype, also of a .nii.gz before
    the rest is inflated) and are checked before any pixel is decoded, as a memory budget in
    bytes: frames x rows x columns x (samples x bytes per sample + two float32 copies, the frame
    and its probability map). gzip/deflate streams are inflated under a cap; JPEG/JPEG-LS/JPEG
    2000 codestreams inside DICOM must declare the Rows/Columns of their header; a DICOM file is
    parsed under an upload-wide cap on data elements, with values over 1 MiB read on use only.
Privacy and safety
    Nothing is written to disk. Only pixel, geometry and series-identity DICOM tags are read; no
    tag value is ever logged or put into an error message. Every problem with the input raises
    ``UserError`` with a one-line message naming the file; exceptions from third-party decoders
    are wrapped, and only around the decoder calls themselves.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import math
import re
import struct
import time
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import imagecodecs
import nibabel as nib
import numpy as np
import pydicom
import tifffile
from PIL import Image
from pydicom.dataset import Dataset, FileDataset
from pydicom.encaps import generate_frames

# Private, but the only way to read a deflated dataset's file meta without inflating it.
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder
from pydicom.pixels.utils import _get_jpg_parameters  # private too: the JPEG/JPEG-LS SOF parser
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
)

from metaseg.conventions import FLAIR_CHANNEL, SEQUENCES
from metaseg.lesions import voxel_mm3
from metaseg.errors import TooLarge, Unsupported, UserError

log = logging.getLogger(__name__)

_MiB = 2**20


@dataclass(frozen=True)
class Limits:
    """Upper bounds that keep a hostile or accidental upload from exhausting memory or CPU."""

    max_bytes: int = 128 * _MiB  # per uploaded file, as uploaded (a 256^3 float32 NIfTI is 64 MiB)
    max_pixels: int = 4096 * 4096  # per frame (rows * cols)
    max_frames: int = 512  # per upload, all files together
    max_files: int = 512  # per upload
    max_decoded_bytes: int = 2**30  # per upload: decoded samples + float32 copies (2, or 5 with sequences), all frames
    max_inflated_bytes: int = 2**30  # most a .nii.gz or a deflated DICOM may inflate to
    max_dicom_elements: int = 200_000  # per upload, all DICOM files together (a flood costs ~0.4 KiB each)
    max_seconds: float | None = None  # decoding time, checked between frames; None: no limit


@dataclass(frozen=True)
class Volume:
    """The slices of one upload, in series order (see the module docstring for conventions).

    ``source_frame[i]`` is ``(index into the uploaded files, frame index within that file)`` of
    ``frames[i]``. ``datasets`` holds one pydicom Dataset per DICOM file in series order, which is
    the order in which the files first appear in ``source_frame``; it is empty for other kinds.
    """

    kind: str  # 'png' | 'jpeg' | 'tiff' | 'dicom' | 'nifti'
    frames: list[np.ndarray] = field(repr=False)  # 2D float32 (rows, cols), C-contiguous
    source_frame: list[tuple[int, int]] = field(repr=False)
    pixel_spacing_mm: tuple[float, float] | None = None  # (row spacing, column spacing)
    slice_thickness_mm: float | None = None
    datasets: tuple[Dataset, ...] = field(default=(), repr=False)
    sequences: list[np.ndarray | None] | None = field(default=None, repr=False)  # per frame (3, rows, cols) or None
    affine: np.ndarray | None = field(default=None, repr=False)  # 4x4: (frame, row, col, 1) -> RAS+ mm; None: unknown
    given: tuple[str, ...] | None = None  # of sequences stacked from separate uploads (metaseg.sequences), those sent

    @property
    def inputs(self) -> list[np.ndarray]:
        """The network input of each frame: the three sequences (3, rows, cols) when every frame has them, else the
        frames; one upload is one kind of input, so the `channels` a report states holds for all its slices."""
        return self.sequences if self.channels == 3 else self.frames

    @property
    def is_volume(self) -> bool:
        """Whether the frames are one volume (a DICOM series or multi-frame file, a NIfTI, one multi-page TIFF), whose
        lesions are 3D (metaseg.lesions); several pictures, or DICOM files without a SeriesInstanceUID, uploaded
        together are unrelated slices."""
        if len(self.frames) < 2:
            return False
        if len({file_index for file_index, _ in self.source_frame}) == 1:
            return True
        # several files: decode has refused DICOM files of different series; each must name its series
        return self.kind == "dicom" and all(ds.get("SeriesInstanceUID") for ds in self.datasets)

    @property
    def voxel_mm3(self) -> float | None:
        """One voxel's volume where the in-plane spacing and the slice thickness are known (a volume only)."""
        return voxel_mm3(self.pixel_spacing_mm, self.slice_thickness_mm) if self.is_volume else None

    @property
    def channels(self) -> int:
        """3 when every frame brought three sequences, else 1 (frames that are one channel are used as FLAIR)."""
        return 3 if self.sequences is not None and all(s is not None for s in self.sequences) else 1

    @property
    def sequences_given(self) -> tuple[str, ...]:
        """The sequences (conventions.SEQUENCES) the network gets from the upload; FLAIR stands in for the others."""
        if self.given is not None:
            return self.given
        return SEQUENCES if self.channels == 3 else (SEQUENCES[FLAIR_CHANNEL],)


def decode(files: list[tuple[str, bytes]], limits: Limits = Limits()) -> Volume:
    """Decode one upload (one file, or the slices of one series); any bad input raises UserError."""
    _check_upload(files, limits)
    kind = _common_kind(files)
    if kind == "dicom":
        return _decode_dicom(files, limits)
    if kind == "nifti":
        return _decode_nifti(files, limits)
    return _decode_pictures(files, kind, limits)


def dicom_datasets(files: list[tuple[str, bytes]], limits: Limits = Limits()) -> list[Dataset] | None:
    """The DICOM datasets of an upload in upload order, parsed under the upload's limits but not decoded, to sort
    its files into series (metaseg.sequences); None when the upload is not DICOM."""
    _check_upload(files, limits)
    if _common_kind(files) != "dicom":
        return None
    budget = _Budget(limits)
    return [_read_dicom(name, data, budget) for name, data in files]


def frame_planes(volume: Volume) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Each frame's DICOM (ImagePositionPatient, ImageOrientationPatient), in series order; None for a frame without
    them, and for every frame of a volume that is not DICOM."""
    dataset_of = dict(zip(dict.fromkeys(file_index for file_index, _ in volume.source_frame), volume.datasets))
    planes = []
    for file_index, frame in volume.source_frame:
        ds = dataset_of.get(file_index)
        if ds is None:
            planes.append(None)
            continue
        position, orientation = _plane(ds, frame)
        planes.append(None if position is None or orientation is None else (position, orientation))
    return planes


def to_nifti_bytes(masks: np.ndarray, volume: Volume) -> bytes:
    """A (frames, rows, cols) mask stack of `volume` as gzipped NIfTI-1, uint8 0/1, in the volume's geometry (see the
    module docstring): `decode` of it gives the masks back in the volume's frame order."""
    masks = np.asarray(masks)
    rows, cols = volume.frames[0].shape
    if masks.shape != (len(volume.frames), rows, cols):
        raise ValueError(f"expected {len(volume.frames)} masks of {rows}x{cols}, got shape {masks.shape}")
    affine = volume.affine if volume.affine is not None else _grid_affine(volume)
    stored = np.ascontiguousarray((masks != 0).astype(np.uint8)[:, ::-1, ::-1].transpose(2, 1, 0))  # as read back
    image = nib.Nifti1Image(stored, affine @ np.linalg.inv(_frame_to_nifti(rows, cols)))
    image.header.set_xyzt_units("mm")
    image.set_qform(image.affine, code="aligned")  # aligned to the upload; the sform says the same
    image.set_sform(image.affine, code="aligned")
    return gzip.compress(image.to_bytes(), compresslevel=6)


def to_png_bytes(mask: np.ndarray) -> bytes:
    """Encode a 2D mask (uint8 0/255, or bool) as PNG in memory, for the server and the CLI."""
    mask = np.asarray(mask)
    if mask.dtype == bool:
        mask = mask.astype(np.uint8) * 255
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise ValueError(f"expected a 2D uint8 or bool mask, got {mask.dtype} {mask.shape}")
    buffer = io.BytesIO()
    Image.fromarray(mask).save(buffer, format="PNG")
    return buffer.getvalue()


# --- errors and limits ------------------------------------------------------------------------


def _error(name: str, problem: str, category: type[UserError] = UserError) -> UserError:
    """A UserError (or subclass) naming the file; the name is quoted so that it cannot break the line."""
    return category(f"{str(name)[:100]!r}: {problem}")


def _reason(exc: BaseException) -> str:
    """A decoder's exception as one short line, without the repr of our in-memory buffer."""
    text = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "", str(exc))
    return " ".join(text.split())[:300] or type(exc).__name__


@contextlib.contextmanager
def _decoder_errors(name: str, what: str) -> Iterator[None]:
    """Third-party decoders raise anything on hostile bytes; report it as the user's problem."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        raise _error(name, f"{what}: {_reason(exc)}") from exc


_WORKING_BYTES_PER_PIXEL = 2 * 4  # two float32 copies: the frame, and its probability map in the server
_SEQUENCE_BYTES_PER_PIXEL = 3 * 4  # a 3+ channel image also keeps its three sequences as float32


class _Budget:
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
            raise _error(name, f"image has no pixels ({frames} frame(s) of {rows}x{cols})")
        if rows * cols > limits.max_pixels:
            limit = limits.max_pixels
            raise _error(name, f"frame of {rows}x{cols} pixels exceeds the limit of {limit}", TooLarge)
        self.frames += frames
        working = _WORKING_BYTES_PER_PIXEL + (_SEQUENCE_BYTES_PER_PIXEL if samples >= 3 else 0)
        self.bytes += frames * rows * cols * (max(samples, 1) * max(sample_bytes, 1) + working)
        if self.frames > limits.max_frames:
            raise _error(name, f"upload has more than {limits.max_frames} frames", TooLarge)
        if self.bytes > limits.max_decoded_bytes:
            problem = f"decoding the upload needs more than the limit of {limits.max_decoded_bytes} bytes of memory"
            raise _error(name, problem, TooLarge)
        self.tick(name)

    def tick(self, name: str) -> None:
        """Called between frames: refuse once decoding has taken longer than its limit."""
        if self._end is not None and time.monotonic() > self._end:
            raise _error(name, f"decoding takes more than the limit of {self.limits.max_seconds:g} s", TooLarge)


def _check_upload(files: list[tuple[str, bytes]], limits: Limits) -> None:
    if not files:
        raise UserError("no files were uploaded")
    if len(files) > limits.max_files:
        raise TooLarge(f"too many files: {len(files)} uploaded, at most {limits.max_files}")
    for name, data in files:
        if not data:
            raise _error(name, "file is empty")
        if len(data) > limits.max_bytes:
            raise _error(name, f"file has {len(data)} bytes, more than {limits.max_bytes}", TooLarge)


def _inflate(name: str, blob: bytes, wbits: int, cap: int) -> bytes:
    """Decompress at most `cap` bytes, so that a small zip bomb cannot exhaust memory."""
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(blob, cap + 1)
    except zlib.error as exc:
        raise _error(name, f"corrupt compressed stream ({exc})") from exc
    if len(out) > cap:
        raise _error(name, f"decompresses to more than {cap} bytes", TooLarge)
    if not inflater.eof:
        raise _error(name, "compressed stream is truncated")
    return out


def _finite_float32(name: str, pixels: np.ndarray) -> np.ndarray:
    """A float32 C-contiguous copy in which NaN/inf became 0 (see the module docstring)."""
    if pixels.dtype.kind not in "biuf":
        raise _error(name, f"unsupported pixel type {pixels.dtype}", Unsupported)
    with np.errstate(over="ignore", invalid="ignore"):  # float64 beyond float32 becomes inf
        values = np.array(pixels, dtype=np.float32, order="C")
    return _zero_non_finite(values)


def _zero_non_finite(values: np.ndarray) -> np.ndarray:
    """Replace NaN/inf by 0 in place (see the module docstring)."""
    non_finite = ~np.isfinite(values)
    if non_finite.any():
        log.warning("replaced %d non-finite pixel values with 0", int(non_finite.sum()))
        values[non_finite] = 0.0
    return values


def _volume(
    kind: str,
    files: list[tuple[str, bytes]],
    frames: list[np.ndarray],
    sources: list[tuple[int, int]],
    spacing: tuple[float, float] | None = None,
    thickness: float | None = None,
    datasets: Sequence[Dataset] = (),
    sequences: list[np.ndarray | None] | None = None,
    affine: np.ndarray | None = None,
) -> Volume:
    """Assemble the result, insisting that all slices share one size, as slices of a series do."""
    rows, cols = frames[0].shape
    for frame, (file_index, _) in zip(frames, sources):
        if frame.shape != (rows, cols):
            size = "x".join(map(str, frame.shape))
            problem = f"slice of {size} differs from the first, {rows}x{cols}"
            raise _error(files[file_index][0], problem)
    if sequences is not None and all(s is None for s in sequences):
        sequences = None
    return Volume(kind, frames, sources, spacing, thickness, tuple(datasets), sequences, affine)


# --- format detection -------------------------------------------------------------------------

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),  # BigTIFF
    (b"MM\x00+", "tiff"),
)
_GZIP_MAGIC = b"\x1f\x8b"
_GZIP_WBITS = 16 + zlib.MAX_WBITS
_NIFTI1_HEADER_SIZE = 348
_BARE_DICOM_STARTS = (b"\x08\x00", b"\x00\x08")  # group 0008, little / big endian


def _is_nifti1(head: bytes) -> bool:
    return head[344:348] == b"n+1\x00"


def _gunzip_head(name: str, data: bytes) -> bytes:
    """The first bytes of a gzip stream, enough for a NIfTI-1 header, without inflating the rest."""
    try:
        return zlib.decompressobj(_GZIP_WBITS).decompress(data, _NIFTI1_HEADER_SIZE)
    except zlib.error as exc:
        raise _error(name, f"corrupt gzip stream ({exc})") from exc


def _detect_kind(name: str, data: bytes) -> str | None:
    """The format from magic numbers alone; the file name is user-chosen and often wrong."""
    if data[128:132] == b"DICM":  # first: a DICOM preamble may itself hold a TIFF header
        return "dicom"
    for magic, kind in _MAGIC:
        if data.startswith(magic):
            return kind
    if _is_nifti1(data):
        return "nifti"
    if data.startswith(_GZIP_MAGIC):
        if not _is_nifti1(_gunzip_head(name, data)):
            raise _error(name, "gzip file does not hold a NIfTI-1 image", Unsupported)
        return "nifti"
    if data.startswith(_BARE_DICOM_STARTS):  # a dataset without preamble; read with force
        return "dicom"
    return None


def _common_kind(files: list[tuple[str, bytes]]) -> str:
    kinds = [_detect_kind(name, data) for name, data in files]
    for (name, _), kind in zip(files, kinds):
        if kind is None:
            raise _error(name, "not a recognised image (expected PNG, JPEG, TIFF, DICOM, NIfTI-1)", Unsupported)
    first_name = str(files[0][0])[:100]
    for (name, _), kind in zip(files, kinds):
        if kind != kinds[0]:
            problem = f"is {kind} but {first_name!r} is {kinds[0]}; upload one kind at a time"
            raise _error(name, problem)
    return kinds[0]


# --- PNG, JPEG, TIFF --------------------------------------------------------------------------

_CHANNEL_BY_COUNT = {1: 0, 2: 0, 3: FLAIR_CHANNEL, 4: FLAIR_CHANNEL}  # gray(+alpha): gray; RGB(A): FLAIR
_EXIF_ORIENTATION = 0x0112  # also the TIFF Orientation tag
_ORIENTATIONS = {  # EXIF/TIFF orientation -> how to turn the stored array into the displayed one
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, -1)[::-1],
    8: lambda a: np.rot90(a, 1),
}
_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG"}
_PIL_SAMPLE_BYTES = {"I;16": 2, "I;16B": 2, "I;16L": 2, "I": 4, "F": 4}  # other modes: 1 byte per sample
_TIFF_AXES = set("YXS")


def _one_channel(name: str, pixels: np.ndarray) -> np.ndarray:
    """(rows, cols[, channels]) -> (rows, cols) by the channel rule of the module docstring."""
    if pixels.ndim == 2:
        return pixels
    if pixels.ndim == 3 and pixels.shape[2] in _CHANNEL_BY_COUNT:
        return pixels[:, :, _CHANNEL_BY_COUNT[pixels.shape[2]]]
    raise _error(name, f"unsupported pixel layout {pixels.shape}", Unsupported)


def _sequences(name: str, pixels: np.ndarray) -> np.ndarray | None:
    """(rows, cols, 3+) -> channels 0-2 as float32 (3, rows, cols); None for a one- or two-channel image."""
    if pixels.ndim != 3 or pixels.shape[2] < 3:
        return None
    return _finite_float32(name, np.moveaxis(pixels[:, :, :3], -1, 0))


def _orient(pixels: np.ndarray, orientation) -> np.ndarray:
    """Apply an EXIF/TIFF orientation to the first two axes of (rows, cols[, channels])."""
    transform = _ORIENTATIONS.get(orientation)
    return transform(pixels) if transform else pixels


def _decode_pictures(files: list[tuple[str, bytes]], kind: str, limits: Limits) -> Volume:
    """PNG, JPEG or TIFF files: their frames in upload order."""
    budget = _Budget(limits)
    read = _read_tiff if kind == "tiff" else _read_pil
    frames, sequences, sources = [], [], []
    for file_index, (name, data) in enumerate(files):
        for frame_index, pixels in read(name, data, kind, budget):
            budget.tick(name)
            frames.append(_finite_float32(name, _one_channel(name, pixels)))
            sequences.append(_sequences(name, pixels))
            sources.append((file_index, frame_index))
    return _volume(kind, files, frames, sources, sequences=sequences)


def _open_pil(name: str, data: bytes, fmt: str) -> Image.Image:
    """Read the header only; PIL's decompression-bomb warning becomes an error like the bomb error.

    (warnings.catch_warnings is process-wide; a concurrent decode at worst also sees the filter.)
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data), formats=[fmt])
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _error(name, f"cannot read {fmt} header: {_reason(exc)}", TooLarge) from None


def _is_16bit_color_png(data: bytes) -> bool:
    """PIL cuts 16-bit RGB(A) and gray+alpha PNGs to 8 bits; IHDR says bit depth and color type."""
    return data[24] == 16 and data[25] in (2, 4, 6)


def _read_pil(name: str, data: bytes, kind: str, budget: _Budget) -> list[tuple[int, np.ndarray]]:
    """A PNG or JPEG as [(0, pixels)]; of an animated PNG only the first frame."""
    fmt = _PIL_FORMATS[kind]
    with _decoder_errors(name, f"cannot read {fmt} header"):
        image = _open_pil(name, data, fmt)
        samples = 4 if image.mode in ("P", "PA") else len(image.getbands())  # palette: expanded to RGBA
        wide = kind == "png" and _is_16bit_color_png(data)
    budget.reserve(name, 1, image.height, image.width, samples, 2 if wide else _PIL_SAMPLE_BYTES.get(image.mode, 1))
    with _decoder_errors(name, f"corrupt or truncated {fmt} image"):
        if wide:
            pixels = imagecodecs.png_decode(data)
        elif image.mode in ("P", "PA"):
            pixels = np.asarray(image.convert("RGBA"))
        else:
            pixels = np.asarray(image)
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    _one_channel(name, pixels)  # an unsupported layout fails here, before anything else is done with it
    return [(0, _orient(pixels, orientation))]


def _read_tiff(name: str, data: bytes, kind: str, budget: _Budget) -> list[tuple[int, np.ndarray]]:
    """All full-resolution pages of a TIFF as [(page index, pixels)]."""
    with _decoder_errors(name, "cannot read TIFF"):
        tiff = tifffile.TiffFile(io.BytesIO(data))
    with tiff:
        frames = []
        for page in _tiff_image_pages(name, tiff, budget):
            budget.tick(name)
            with _decoder_errors(name, f"corrupt TIFF page {page.index}"):
                pixels = page.asarray()
            if "S" in page.axes:
                pixels = np.moveaxis(pixels, page.axes.index("S"), -1)
            _one_channel(name, pixels)
            pixels = _orient(pixels, _tiff_orientation(page))
            frames.append((page.index, pixels))
    return frames


def _tiff_orientation(page: tifffile.TiffPage) -> int:
    tag = page.tags.get(_EXIF_ORIENTATION)
    return tag.value if tag else 1


def _tiff_image_pages(name: str, tiff: tifffile.TiffFile, budget: _Budget) -> list:
    """The pages to decode, each reserved in the budget first; reduced pages are thumbnails."""
    pages = []
    with _decoder_errors(name, "corrupt TIFF directory"):
        for page in tiff.pages:
            if page.is_reduced:
                continue
            if not set(page.axes) <= _TIFF_AXES:
                raise _error(name, f"TIFF page {page.index} has unsupported axes {page.axes!r}", Unsupported)
            sample_bytes = -(-int(page.bitspersample) // 8)  # 1..8 bits: 1 byte, 12: 2, 64: 8
            budget.reserve(name, 1, page.imagelength, page.imagewidth, page.samplesperpixel, sample_bytes)
            pages.append(page)
    if not pages:
        raise _error(name, "TIFF holds no image")
    return pages


# --- DICOM ------------------------------------------------------------------------------------

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_CODESTREAM_SYNTAXES = {*JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes, *JPEG2000TransferSyntaxes}
_SYNTAX_BY_ENCODING = {  # (implicit VR, little endian) of a bare dataset -> its transfer syntax
    (True, True): ImplicitVRLittleEndian,
    (False, True): ExplicitVRLittleEndian,
    (False, False): ExplicitVRBigEndian,
}


def _decode_dicom(files: list[tuple[str, bytes]], limits: Limits) -> Volume:
    """DICOM files (a single or multi-frame image, or the slices of a series) in series order."""
    budget = _Budget(limits)
    datasets = [_read_dicom(name, data, budget) for name, data in files]
    for (name, _), ds in zip(files, datasets):
        _check_dicom_image(name, ds, budget)
    _check_one_series(files, datasets)
    order = _series_order(datasets)
    frames, sequences, sources = [], [], []
    for file_index in order:
        file_frames = _dicom_frames(files[file_index][0], datasets[file_index], budget)
        frames.extend(frame for frame, _ in file_frames)
        sequences.extend(seq for _, seq in file_frames)
        sources.extend((file_index, frame_index) for frame_index in range(len(file_frames)))
    in_order = [datasets[i] for i in order]
    spacing, thickness = _dicom_pixel_spacing(in_order[0]), _dicom_slice_thickness(in_order)
    affine = _dicom_affine(in_order, len(frames))
    return _volume("dicom", files, frames, sources, spacing, thickness, in_order, sequences, affine)


_DEFER_BYTES = _MiB  # element values larger than this are read from the buffer only when used


class _CountedReads(io.BytesIO):
    """The bytes of one DICOM file for pydicom, refusing once the upload's parsing has read too many elements.

    pydicom reads each data element with two reads (header, value), so a flood of tiny private elements, which
    costs ~0.4 KiB of Python objects per element, stops at the limit instead of exhausting memory.
    """

    def __init__(self, data: bytes, name: str, budget: _Budget):
        super().__init__(data)
        self.name, self.budget, self.counting = name, budget, True

    def read(self, size: int | None = -1) -> bytes:
        if self.counting:
            self.budget.elements += 0.5
            if self.budget.elements > self.budget.limits.max_dicom_elements:
                limit = self.budget.limits.max_dicom_elements
                raise _error(self.name, f"upload has more than {limit} DICOM data elements", TooLarge)
        return super().read(size)


def _read_dicom(name: str, data: bytes, budget: _Budget) -> Dataset:
    """The dataset, parsed under the element budget; large values (pixel data, blobs) stay in the buffer until
    used. A deflated dataset is inflated here, under the cap, since pydicom would inflate it without one."""
    has_preamble = data[128:132] == b"DICM"
    stream = _CountedReads(data, name, budget)
    with _decoder_errors(name, "not a readable DICOM file"):
        if has_preamble and _file_meta(name, data).get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
            ds = _read_deflated(name, data, budget)
        else:
            ds = pydicom.dcmread(stream, force=not has_preamble, defer_size=_DEFER_BYTES)
    stream.counting = False  # deferred values are read later, without counting
    if "TransferSyntaxUID" not in ds.file_meta:  # bare dataset: the pixel decoder needs to know
        ds.file_meta.TransferSyntaxUID = _SYNTAX_BY_ENCODING.get(
            ds.original_encoding, ImplicitVRLittleEndian
        )
    return ds


def _file_meta(name: str, data: bytes) -> Dataset:
    with _decoder_errors(name, "corrupt DICOM file meta information"):
        stream = io.BytesIO(data)
        read_preamble(stream, False)
        return _read_file_meta_info(stream)


def _read_deflated(name: str, data: bytes, budget: _Budget) -> Dataset:
    """A Deflated Explicit VR Little Endian file: inflated under the cap, then parsed like any other."""
    stream = io.BytesIO(data)
    read_preamble(stream, False)
    meta = _read_file_meta_info(stream)
    inflated = _CountedReads(_inflate(name, data[stream.tell():], -zlib.MAX_WBITS, budget.limits.max_inflated_bytes),
                             name, budget)
    dataset = read_dataset(inflated, is_implicit_VR=False, is_little_endian=True, defer_size=_DEFER_BYTES)
    inflated.counting = False
    return FileDataset(inflated, dataset, preamble=data[:128], file_meta=meta, is_implicit_VR=False,
                       is_little_endian=True)


def _check_dicom_image(name: str, ds: Dataset, budget: _Budget) -> None:
    """Refuse from the header alone what cannot or should not be decoded."""
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        raise _error(name, "DICOM file has no pixel data")
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise _error(name, f"unsupported transfer syntax {syntax.name!r}", Unsupported) from None
    if not decoder.is_available:
        raise _error(name, f"no decoder installed for transfer syntax {syntax.name!r}", Unsupported)
    with _decoder_errors(name, "invalid DICOM image header"):
        frames, rows, cols = _dicom_geometry(ds)
        samples = 3 if _photometric(ds) == "PALETTE COLOR" else int(ds.get("SamplesPerPixel") or 1)
        sample_bytes = 2 if _photometric(ds) == "PALETTE COLOR" else -(-int(ds.get("BitsAllocated") or 8) // 8)
    budget.reserve(name, frames, rows, cols, samples, sample_bytes)
    if syntax in _CODESTREAM_SYNTAXES:
        _check_codestreams(name, ds, syntax, frames, rows, cols)


def _dicom_geometry(ds: Dataset) -> tuple[int, int, int]:
    """(frames, rows, columns) as declared; NumberOfFrames absent or 0 means one frame."""
    return int(ds.get("NumberOfFrames") or 1), int(ds.Rows), int(ds.Columns)


def _photometric(ds: Dataset) -> str:
    return str(ds.get("PhotometricInterpretation", "")).strip()


def _check_codestreams(name: str, ds: Dataset, syntax: UID, frames: int, rows: int, cols: int) -> None:
    """A JPEG, JPEG-LS or JPEG 2000 frame is decoded at the size its own codestream declares, which the
    budget above never saw: every frame's codestream must declare the header's Rows and Columns."""
    with _decoder_errors(name, f"invalid encapsulated {syntax.name} pixel data"):
        for index, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=frames)):
            size = _codestream_size(frame)
            if size == (0, 0):
                raise _error(name, f"frame {index} of the {syntax.name} pixel data has no readable frame header")
            if size != (rows, cols):
                declared = "x".join(map(str, size))
                problem = f"frame {index} is a {declared} {syntax.name} codestream, but the header declares {rows}x{cols}"
                raise _error(name, problem, TooLarge if size[0] * size[1] > rows * cols else UserError)


def _codestream_size(frame: bytes) -> tuple[int, int]:
    """(rows, columns) from a JPEG/JPEG-LS SOF or a JPEG 2000 SIZ marker segment; (0, 0) when there is none."""
    if frame.startswith(b"\xff\xd8"):
        info = _get_jpg_parameters(frame)
        return (info["height"], info["width"]) if info else (0, 0)
    start = frame.find(b"\xff\x4f\xff\x51", 0, 4096)  # SOC + SIZ: a J2K codestream, bare or inside a JP2 box
    if start < 0 or len(frame) < start + 24:
        return 0, 0
    xsiz, ysiz, x0, y0 = struct.unpack(">IIII", frame[start + 8 : start + 24])
    return ysiz - y0, xsiz - x0


def _check_one_series(files: list[tuple[str, bytes]], datasets: list[Dataset]) -> None:
    """Several files must be slices of one series: one frame size, one SeriesInstanceUID."""
    first_name, first = str(files[0][0])[:100], datasets[0]
    for (name, _), ds in zip(files[1:], datasets[1:]):
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns):
            size, first_size = f"{ds.Rows}x{ds.Columns}", f"{first.Rows}x{first.Columns}"
            raise _error(name, f"slice of {size} differs from {first_name!r}, {first_size}")
        series, first_series = ds.get("SeriesInstanceUID"), first.get("SeriesInstanceUID")
        if series and first_series and series != first_series:
            raise _error(name, f"belongs to another series than {first_name!r}")


def _numbers(item: Dataset, keyword: str, count: int) -> np.ndarray | None:
    """A numeric tag as `count` finite floats, or None when absent or malformed (it is optional)."""
    try:
        values = np.asarray(item.get(keyword), dtype=float).ravel()
    except Exception:  # pydicom's value conversion raises various errors on malformed values
        return None
    if values.size != count or not np.isfinite(values).all():
        return None
    return values


def _frame_macro(ds: Dataset, frame: int, keyword: str) -> Dataset:
    """Where a frame's attributes live: Enhanced DICOM has per-frame or shared functional groups,
    classic DICOM the top level. Malformed groups count as absent."""
    for groups_keyword, index in (
        ("PerFrameFunctionalGroupsSequence", frame),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        try:
            groups = ds.get(groups_keyword) or ()
            if index < len(groups) and groups[index].get(keyword):
                return groups[index].get(keyword)[0]
        except Exception:  # pydicom parses sequences lazily and may fail on malformed ones
            continue
    return ds


def _positions_along_normal(datasets: list[Dataset]) -> list[float] | None:
    """Each file's ImagePositionPatient along the first file's slice normal, or None."""
    orientation = _numbers(datasets[0], "ImageOrientationPatient", 6)
    if orientation is None:
        return None
    normal = np.cross(orientation[:3], orientation[3:])
    if not np.linalg.norm(normal) > 0:
        return None
    positions = [_numbers(ds, "ImagePositionPatient", 3) for ds in datasets]
    if any(position is None for position in positions):
        return None
    return [float(position @ normal) for position in positions]


def _series_order(datasets: list[Dataset]) -> list[int]:
    """Slices come in any order: sort along the slice normal, else by InstanceNumber, else keep."""
    numbers = [_numbers(ds, "InstanceNumber", 1) for ds in datasets]
    instance_numbers = None if any(n is None for n in numbers) else [float(n[0]) for n in numbers]
    for key in (_positions_along_normal(datasets), instance_numbers):
        if key is not None:
            return sorted(range(len(datasets)), key=key.__getitem__)
    return list(range(len(datasets)))


def _dicom_pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    """PixelSpacing (in PixelMeasuresSequence for Enhanced DICOM), else ImagerPixelSpacing."""
    for item, keyword in (
        (_frame_macro(ds, 0, "PixelMeasuresSequence"), "PixelSpacing"),
        (ds, "ImagerPixelSpacing"),
    ):
        spacing = _numbers(item, keyword, 2)
        if spacing is not None and (spacing > 0).all():
            return float(spacing[0]), float(spacing[1])
    return None


def _dicom_slice_thickness(datasets: list[Dataset]) -> float | None:
    """SliceThickness, else the median distance between the sorted slice positions."""
    measures = _frame_macro(datasets[0], 0, "PixelMeasuresSequence")
    thickness = _numbers(measures, "SliceThickness", 1)
    if thickness is not None and thickness[0] > 0:
        return float(thickness[0])
    positions = _positions_along_normal(datasets)
    if positions is None or len(positions) < 2:
        return None
    gap = float(np.median(np.abs(np.diff(positions))))
    return gap if gap > 0 else None


def _plane(ds: Dataset, frame: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(ImagePositionPatient, ImageOrientationPatient) of one frame of a dataset, each None where absent."""
    return (_numbers(_frame_macro(ds, frame, "PlanePositionSequence"), "ImagePositionPatient", 3),
            _numbers(_frame_macro(ds, frame, "PlaneOrientationSequence"), "ImageOrientationPatient", 6))


def _dicom_affine(datasets: list[Dataset], frames: int) -> np.ndarray | None:
    """(frame, row, col, 1) -> RAS+ mm (see the module docstring), or None without a position, an orientation or a
    pixel spacing. `datasets` in series order, `frames` of them all together."""
    first, last = datasets[0], datasets[-1]
    origin, orientation = _plane(first, 0)
    spacing = _dicom_pixel_spacing(first)
    if orientation is None or origin is None or spacing is None:
        return None
    along_row, along_column = orientation[:3], orientation[3:]  # where the column index, the row index increase
    normal = np.cross(along_row, along_column)
    if not np.linalg.norm(normal) > 0:
        return None
    step = None
    if frames > 1:
        end, _ = _plane(last, _dicom_geometry(last)[0] - 1)
        if end is not None and not np.allclose(end, origin):
            step = (end - origin) / (frames - 1)
    if step is None:  # one frame, or frames without their own positions
        step = normal / np.linalg.norm(normal) * (_dicom_slice_thickness(datasets) or 1.0)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = step, along_column * spacing[0], along_row * spacing[1], origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM's patient axes are LPS+


def _dicom_frames(name: str, ds: Dataset, budget: _Budget) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """All frames of one file as 2D float32 modality values, in MONOCHROME2 sense, each with its sequences."""
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    frame_count, rows, cols = _dicom_geometry(ds)
    photometric = _photometric(ds)
    budget.tick(name)
    with _decoder_errors(name, f"cannot decode {syntax.name} pixel data"):
        pixels, _ = get_decoder(syntax).as_array(ds, as_rgb=True)  # YBR -> RGB
        if photometric == "PALETTE COLOR":
            pixels = apply_color_lut(pixels, ds)
        stack = pixels.reshape(frame_count, rows, cols, -1)
    frames = []
    for index, frame in enumerate(stack):
        budget.tick(name)
        values = _one_channel(name, frame)
        if frame.shape[-1] == 1:  # the Modality LUT applies to grayscale only
            with _decoder_errors(name, "invalid Modality LUT or rescale"):
                values = _modality_values(ds, index, values, photometric)
        frames.append((_finite_float32(name, values), _sequences(name, frame)))
    return frames


def _modality_values(ds: Dataset, frame: int, pixels: np.ndarray, photometric: str) -> np.ndarray:
    """Apply the Modality LUT/rescale; mirror MONOCHROME1 over the modality range of its stored
    bits (not the data range, so that all slices of a series map alike)."""
    source = _frame_macro(ds, frame, "PixelValueTransformationSequence")
    values = apply_modality_lut(pixels, source)
    if photometric == "MONOCHROME1":
        bits = int(ds.get("BitsStored") or ds.BitsAllocated)
        signed = ds.get("PixelRepresentation") == 1
        stored = [-(2 ** (bits - 1)), 2 ** (bits - 1) - 1] if signed else [0, 2**bits - 1]
        ends = apply_modality_lut(np.array(stored), source)
        values = ends.min() + ends.max() - values.astype(np.float64)
    return values


# --- NIfTI ------------------------------------------------------------------------------------

_MM_PER_UNIT = {"mm": 1.0, "unknown": 1.0, "micron": 1e-3, "meter": 1e3}


def _decode_nifti(files: list[tuple[str, bytes]], limits: Limits) -> Volume:
    """One NIfTI-1 image (.nii or .nii.gz, 2D or 3D) as axial slices (see the module docstring)."""
    if len(files) > 1:
        raise UserError(f"upload one NIfTI file at a time ({len(files)} were uploaded)")
    name, data = files[0]
    gzipped = data.startswith(_GZIP_MAGIC)
    header, shape, needed = _nifti_header(name, _gunzip_head(name, data) if gzipped else data)
    _Budget(limits).reserve(name, shape[2], shape[1], shape[0], 1, header.get_data_dtype().itemsize)
    if gzipped:  # only now that the header's size fits the budget
        data = _inflate(name, data, _GZIP_WBITS, limits.max_inflated_bytes)
    if len(data) < needed:
        raise _error(name, f"NIfTI image is truncated ({len(data)} of {needed} bytes)")
    with _decoder_errors(name, "corrupt NIfTI image"):
        image = nib.Nifti1Image.from_bytes(data)
        voxels = image.get_fdata(dtype=np.float32).reshape(shape)
        affine = image.affine
        orientation = nib.orientations.io_orientation(affine)
    del image, data  # the raw bytes are not needed beyond here
    zooms = _nifti_zooms_mm(header)
    if np.isnan(orientation).any():  # a degenerate affine leaves the data as stored, and says nothing of geometry
        affine = None
    else:
        voxels = nib.orientations.apply_orientation(voxels, orientation)
        affine = affine @ nib.orientations.inv_ornt_aff(orientation, shape) @ _frame_to_nifti(*voxels.shape[1::-1])
        zooms = tuple(zooms[i] for i in np.argsort(orientation[:, 0]))
    voxels = _zero_non_finite(voxels)  # in place (get_fdata made a float32 copy): one copy of the volume fewer
    frames = [np.ascontiguousarray(voxels[:, :, k].T[::-1, ::-1]) for k in range(voxels.shape[2])]
    sources = [(0, k) for k in range(len(frames))]
    spacing = (zooms[1], zooms[0]) if None not in zooms[:2] else None
    return _volume("nifti", files, frames, sources, spacing, zooms[2], affine=affine)


def _frame_to_nifti(rows: int, cols: int) -> np.ndarray:
    """(frame, row, col, 1) -> the voxel (x, y, z, 1) of the RAS+ array it was read from: frame k is
    `data[:, :, k].T[::-1, ::-1]` (module docstring)."""
    return np.array([[0, 0, -1, cols - 1], [0, -1, 0, rows - 1], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)


def _grid_affine(volume: Volume) -> np.ndarray:
    """For a volume without geometry: frames on a grid of its pixel spacing and slice thickness (else 1 mm), laid out
    as the reading convention reads a NIfTI whose affine is that diagonal."""
    rows, cols = volume.frames[0].shape
    row_mm, col_mm = volume.pixel_spacing_mm or (1.0, 1.0)
    return np.diag([col_mm, row_mm, volume.slice_thickness_mm or 1.0, 1.0]) @ _frame_to_nifti(rows, cols)


def _nifti_header(name: str, data: bytes) -> tuple[nib.Nifti1Header, tuple[int, int, int], int]:
    """The header, the (x, y, z) shape and the bytes the image needs, read before any voxel."""
    with _decoder_errors(name, "invalid NIfTI header"):
        header = nib.Nifti1Header.from_fileobj(io.BytesIO(data), check=True)
        shape = tuple(int(n) for n in header.get_data_shape())
        dtype = header.get_data_dtype()
        needed = int(header["vox_offset"]) + math.prod(shape) * dtype.itemsize
    if dtype.kind not in "biuf":
        raise _error(name, f"unsupported NIfTI data type {dtype}", Unsupported)
    if len(shape) < 2:
        raise _error(name, f"NIfTI image has {len(shape)} dimension(s), need 2 or 3")
    volumes = math.prod(shape[3:])
    if volumes != 1:
        problem = f"NIfTI image of shape {shape} holds {volumes} volumes; upload one 3D volume"
        raise _error(name, problem)
    return header, (shape + (1,))[:3], needed


def _nifti_zooms_mm(header: nib.Nifti1Header) -> tuple[float | None, float | None, float | None]:
    """Voxel size along x, y, z in mm; None where the header gives no usable size."""
    mm = _MM_PER_UNIT.get(header.get_xyzt_units()[0], 1.0)
    pixdim = header["pixdim"][1:4]
    return tuple(float(z) * mm if np.isfinite(z) and z > 0 else None for z in pixdim)
