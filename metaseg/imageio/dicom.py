"""DICOM (Part 10, or a bare dataset) in any transfer syntax pydicom and the pylibjpeg plugins decode: parsed under
the upload's element budget, ordered into a series, with its geometry."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pydicom
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

from metaseg.errors import TooLarge, Unsupported, UserError
from metaseg.imageio.base import assemble, decoder_errors, error, finite_float32, one_channel, three_sequences
from metaseg.imageio.detect import common_kind
from metaseg.imageio.limits import Budget, Limits, MiB, check_upload, inflate
from metaseg.imageio.volume import Volume


def dicom_datasets(files: list[tuple[str, bytes]], limits: Limits = Limits()) -> list[Dataset] | None:
    """The DICOM datasets of an upload in upload order, parsed under the upload's limits but not decoded, to sort
    its files into series (metaseg.imageio.sequences); None when the upload is not DICOM."""
    check_upload(files, limits)
    if common_kind(files) != "dicom":
        return None
    budget = Budget(limits)
    return [read_dicom(name, data, budget) for name, data in files]


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



_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_CODESTREAM_SYNTAXES = {*JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes, *JPEG2000TransferSyntaxes}
_SYNTAX_BY_ENCODING = {  # (implicit VR, little endian) of a bare dataset -> its transfer syntax
    (True, True): ImplicitVRLittleEndian,
    (False, True): ExplicitVRLittleEndian,
    (False, False): ExplicitVRBigEndian,
}


def decode_dicom(files: list[tuple[str, bytes]], limits: Limits) -> Volume:
    """DICOM files (a single or multi-frame image, or the slices of a series) in series order."""
    budget = Budget(limits)
    datasets = [read_dicom(name, data, budget) for name, data in files]
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
    return assemble("dicom", files, frames, sources, spacing, thickness, in_order, sequences, affine)


_DEFER_BYTES = MiB  # element values larger than this are read from the buffer only when used


class _CountedReads(io.BytesIO):
    """The bytes of one DICOM file for pydicom, refusing once the upload's parsing has read too many elements.

    pydicom reads each data element with two reads (header, value), so a flood of tiny private elements, which
    costs ~0.4 KiB of Python objects per element, stops at the limit instead of exhausting memory.
    """

    def __init__(self, data: bytes, name: str, budget: Budget):
        super().__init__(data)
        self.name, self.budget, self.counting = name, budget, True

    def read(self, size: int | None = -1) -> bytes:
        if self.counting:
            self.budget.elements += 0.5
            if self.budget.elements > self.budget.limits.max_dicom_elements:
                limit = self.budget.limits.max_dicom_elements
                raise error(self.name, f"upload has more than {limit} DICOM data elements", TooLarge)
        return super().read(size)


def read_dicom(name: str, data: bytes, budget: Budget) -> Dataset:
    """The dataset, parsed under the element budget; large values (pixel data, blobs) stay in the buffer until
    used. A deflated dataset is inflated here, under the cap, since pydicom would inflate it without one."""
    has_preamble = data[128:132] == b"DICM"
    stream = _CountedReads(data, name, budget)
    with decoder_errors(name, "not a readable DICOM file"):
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
    with decoder_errors(name, "corrupt DICOM file meta information"):
        stream = io.BytesIO(data)
        read_preamble(stream, False)
        return _read_file_meta_info(stream)


def _read_deflated(name: str, data: bytes, budget: Budget) -> Dataset:
    """A Deflated Explicit VR Little Endian file: inflated under the cap, then parsed like any other."""
    stream = io.BytesIO(data)
    read_preamble(stream, False)
    meta = _read_file_meta_info(stream)
    inflated = _CountedReads(inflate(name, data[stream.tell():], -zlib.MAX_WBITS, budget.limits.max_inflated_bytes),
                             name, budget)
    dataset = read_dataset(inflated, is_implicit_VR=False, is_little_endian=True, defer_size=_DEFER_BYTES)
    inflated.counting = False
    return FileDataset(inflated, dataset, preamble=data[:128], file_meta=meta, is_implicit_VR=False,
                       is_little_endian=True)


def _check_dicom_image(name: str, ds: Dataset, budget: Budget) -> None:
    """Refuse from the header alone what cannot or should not be decoded."""
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        raise error(name, "DICOM file has no pixel data")
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise error(name, f"unsupported transfer syntax {syntax.name!r}", Unsupported) from None
    if not decoder.is_available:
        raise error(name, f"no decoder installed for transfer syntax {syntax.name!r}", Unsupported)
    with decoder_errors(name, "invalid DICOM image header"):
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
    with decoder_errors(name, f"invalid encapsulated {syntax.name} pixel data"):
        for index, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=frames)):
            size = _codestream_size(frame)
            if size == (0, 0):
                raise error(name, f"frame {index} of the {syntax.name} pixel data has no readable frame header")
            if size != (rows, cols):
                declared = "x".join(map(str, size))
                problem = f"frame {index} is a {declared} {syntax.name} codestream, but the header declares {rows}x{cols}"
                raise error(name, problem, TooLarge if size[0] * size[1] > rows * cols else UserError)


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
            raise error(name, f"slice of {size} differs from {first_name!r}, {first_size}")
        series, first_series = ds.get("SeriesInstanceUID"), first.get("SeriesInstanceUID")
        if series and first_series and series != first_series:
            raise error(name, f"belongs to another series than {first_name!r}")


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
    """(frame, row, col, 1) -> RAS+ mm (see the package docstring), or None without a position, an orientation or a
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


def _dicom_frames(name: str, ds: Dataset, budget: Budget) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """All frames of one file as 2D float32 modality values, in MONOCHROME2 sense, each with its sequences."""
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    frame_count, rows, cols = _dicom_geometry(ds)
    photometric = _photometric(ds)
    budget.tick(name)
    with decoder_errors(name, f"cannot decode {syntax.name} pixel data"):
        pixels, _ = get_decoder(syntax).as_array(ds, as_rgb=True)  # YBR -> RGB
        if photometric == "PALETTE COLOR":
            pixels = apply_color_lut(pixels, ds)
        stack = pixels.reshape(frame_count, rows, cols, -1)
    frames = []
    for index, frame in enumerate(stack):
        budget.tick(name)
        values = one_channel(name, frame)
        if frame.shape[-1] == 1:  # the Modality LUT applies to grayscale only
            with decoder_errors(name, "invalid Modality LUT or rescale"):
                values = _modality_values(ds, index, values, photometric)
        frames.append((finite_float32(name, values), three_sequences(name, frame)))
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
