"""metaseg.imageio: every format decodes to the right frames; bad uploads raise UserError."""

import dataclasses
import gzip
import io
import logging
import struct
import zlib

import imagecodecs
import nibabel as nib
import numpy as np
import pydicom
import pytest
import tifffile
from PIL import Image, ImageOps
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from metaseg.errors import UserError
from metaseg.imageio.limits import Limits
from metaseg.imageio.nifti import to_nifti_bytes
from metaseg.imageio.picture import to_png_bytes
from metaseg.imageio.reader import decode
from metaseg.imageio.volume import Volume

SERIES_UID = generate_uid()


# --- builders ---------------------------------------------------------------------------------


def pattern(dtype=np.uint16, high=200) -> np.ndarray:
    """A non-symmetric test image: 24x32 with a bright 4x6 block near the top-left corner."""
    image = np.full((24, 32), 10, dtype)
    image[2:6, 3:9] = high
    return image


def pil_bytes(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png(array: np.ndarray) -> bytes:
    return pil_bytes(Image.fromarray(array))


def tiff(*pages: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as writer:
        for page in pages:
            writer.write(page, **kwargs)
    return buffer.getvalue()


def dicom_dataset(pixels: np.ndarray, syntax=ExplicitVRLittleEndian, **attrs) -> Dataset:
    """An MR image of uint16 `pixels` (2D, or 3D for multi-frame); `attrs` override anything."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = SERIES_UID
    ds.Modality = "MR"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def dicom_bytes(ds: Dataset, **write_args) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, **({"enforce_file_format": True} | write_args))
    return buffer.getvalue()


def dicom(pixels: np.ndarray, **attrs) -> bytes:
    return dicom_bytes(dicom_dataset(pixels, **attrs))


def nifti(data: np.ndarray, affine=None, gz=False, zooms=None) -> bytes:
    image = nib.Nifti1Image(data, np.eye(4) if affine is None else affine)
    if zooms:
        image.header.set_zooms(zooms)
    raw = image.to_bytes()
    return gzip.compress(raw) if gz else raw


def shipped(name: str) -> bytes:
    with open(get_testdata_file(name), "rb") as file:
        return file.read()


def one(name: str, data: bytes) -> Volume:
    return decode([(name, data)])


MR_SMALL = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array.astype(np.float32)


def check_volume(volume: Volume, count: int) -> None:
    assert len(volume.frames) == len(volume.source_frame) == count
    for frame in volume.frames:
        assert frame.ndim == 2 and frame.dtype == np.float32 and frame.flags.c_contiguous


# --- PNG, JPEG, TIFF --------------------------------------------------------------------------

GRAY16 = (np.arange(24 * 32).reshape(24, 32) * 80).astype(np.uint16)  # up to 61360: needs 16 bits
GRAY8 = pattern(np.uint8)
ONES = np.ones((24, 32), np.uint8)
PALETTE = [(i, 255 - i, i // 2) for i in range(256)]


def palette_png() -> bytes:
    image = Image.fromarray(pattern(np.uint8, 200), mode="P")
    image.putpalette([value for rgb in PALETTE for value in rgb])
    return pil_bytes(image)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(png(pattern(np.uint8, 200)), pattern(np.uint8, 200), id="gray8"),
        pytest.param(png(GRAY16), GRAY16, id="gray16"),
        pytest.param(png(np.dstack([GRAY8, ONES * 7])), GRAY8, id="gray+alpha"),
        pytest.param(png(np.dstack([ONES, GRAY8, ONES * 3])), GRAY8, id="rgb-channel1"),
        pytest.param(png(np.dstack([ONES, GRAY8, ONES * 3, ONES])), GRAY8, id="rgba-channel1"),
        pytest.param(palette_png(), np.array([p[1] for p in PALETTE])[pattern(np.uint8, 200)],
                     id="palette"),
        pytest.param(imagecodecs.png_encode(np.dstack([GRAY16 // 2, GRAY16, GRAY16 // 3])), GRAY16,
                     id="rgb16-native-depth"),
        pytest.param(imagecodecs.png_encode(np.dstack([GRAY16, GRAY16 // 3])), GRAY16,
                     id="gray16+alpha-native-depth"),
    ],
)
def test_png_variants_decode_to_native_values(data, expected):
    volume = one("scan.png", data)
    assert volume.kind == "png" and volume.pixel_spacing_mm is None and volume.datasets == ()
    check_volume(volume, 1)
    np.testing.assert_array_equal(volume.frames[0], expected.astype(np.float32))


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_jpeg_decodes_close_to_original(mode):
    image = Image.fromarray(pattern(np.uint8, 200)).convert(mode)
    volume = one("photo.jpg", pil_bytes(image, "JPEG", quality=95))
    assert volume.kind == "jpeg"
    check_volume(volume, 1)
    assert np.abs(volume.frames[0] - pattern(np.uint8, 200)).max() < 30


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_is_applied_like_pillow(fmt, orientation):
    image = Image.fromarray(pattern(np.uint8, 200))
    exif = image.getexif()
    exif[0x0112] = orientation
    data = pil_bytes(image, fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))), dtype=np.float32)
    np.testing.assert_array_equal(one("x", data).frames[0], expected)


@pytest.mark.parametrize(
    ("pages", "kwargs"),
    [
        pytest.param([GRAY16], {}, id="uint16"),
        pytest.param([GRAY16 / np.float32(7)], {"compression": "zlib"}, id="float32-deflate"),
        pytest.param([pattern(np.uint8, 200)], {"compression": "lzw"}, id="uint8-lzw"),
        pytest.param([GRAY16, GRAY16 + 1, GRAY16 + 2], {"compression": "zlib"}, id="multipage"),
    ],
)
def test_tiff_gray_pages_become_frames(pages, kwargs):
    volume = one("stack.tif", tiff(*pages, **kwargs))
    assert volume.kind == "tiff"
    check_volume(volume, len(pages))
    assert volume.source_frame == [(0, i) for i in range(len(pages))]
    for frame, page in zip(volume.frames, pages):
        np.testing.assert_array_equal(frame, page.astype(np.float32))


@pytest.mark.parametrize("planar", ["contig", "separate"])
def test_three_channel_tiff_yields_flair_frame_and_keeps_its_sequences(planar):
    rng = np.random.default_rng(0)
    pre, flair, post = rng.integers(0, 255, (3, 256, 256), dtype=np.uint8)
    stacked = np.stack([pre, flair, post], axis=-1 if planar == "contig" else 0)
    volume = one("slice.tif", tiff(stacked, photometric="rgb", planarconfig=planar))
    check_volume(volume, 1)
    np.testing.assert_array_equal(volume.frames[0], flair.astype(np.float32))
    check_sequences(volume, [np.stack([pre, flair, post])])


def check_sequences(volume: Volume, expected: list[np.ndarray]) -> None:
    """Three sequences per frame, channel-first float32, and they are what the network gets."""
    assert volume.channels == 3 and volume.inputs is volume.sequences and len(volume.sequences) == len(expected)
    for sequences, want in zip(volume.sequences, expected):
        assert sequences.shape == (3, *want.shape[1:]) and sequences.dtype == np.float32
        assert sequences.flags.c_contiguous
        np.testing.assert_array_equal(sequences, want.astype(np.float32))


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(png(np.dstack([ONES, GRAY8, ONES * 3])), np.stack([ONES, GRAY8, ONES * 3]), id="rgb"),
        pytest.param(png(np.dstack([ONES, GRAY8, ONES * 3, ONES * 9])), np.stack([ONES, GRAY8, ONES * 3]),
                     id="rgba-alpha-dropped"),
        pytest.param(imagecodecs.png_encode(np.dstack([GRAY16 // 2, GRAY16, GRAY16 // 3])),
                     np.stack([GRAY16 // 2, GRAY16, GRAY16 // 3]), id="rgb16-native-depth"),
    ],
)
def test_colour_png_keeps_three_sequences(data, expected):
    volume = one("slice.png", data)
    check_volume(volume, 1)
    np.testing.assert_array_equal(volume.frames[0], expected[1].astype(np.float32))  # FLAIR, for display
    check_sequences(volume, [expected])


def test_rgb_dicom_keeps_three_sequences_per_frame():
    ds = pydicom.dcmread(get_testdata_file("SC_rgb_rle_2frame.dcm"))
    check_sequences(one("rgb.dcm", shipped("SC_rgb_rle_2frame.dcm")), list(np.moveaxis(ds.pixel_array, -1, 1)))


@pytest.mark.parametrize(
    ("name", "make"),
    [
        pytest.param("scan.png", lambda: png(GRAY8), id="gray-png"),
        pytest.param("scan.png", lambda: png(np.dstack([GRAY8, ONES * 7])), id="gray+alpha-png"),
        pytest.param("stack.tif", lambda: tiff(GRAY16, GRAY16 + 1), id="gray-tiff"),
        pytest.param("mr.dcm", lambda: shipped("MR_small.dcm"), id="dicom"),
        pytest.param("vol.nii", lambda: nifti(VOXELS), id="nifti"),
    ],
)
def test_one_channel_images_have_no_sequences_and_give_their_frames(name, make):
    volume = one(name, make())
    assert volume.sequences is None and volume.channels == 1
    assert volume.inputs is volume.frames


def test_an_upload_mixing_colour_and_gray_gives_one_channel_for_every_slice():
    """One upload is one kind of input: the report's input_channels must hold for all of its slices."""
    volume = decode([("rgb.png", png(np.dstack([ONES, GRAY8, ONES * 3]))), ("gray.png", png(GRAY8 + 1))])
    assert volume.sequences[0] is not None and volume.sequences[1] is None
    assert volume.channels == 1 and volume.inputs is volume.frames


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_turns_the_sequences_like_the_frame(orientation):
    image = Image.fromarray(np.random.default_rng(orientation).integers(0, 255, (24, 32, 3), dtype=np.uint8))
    exif = image.getexif()
    exif[0x0112] = orientation
    data = pil_bytes(image, "PNG", exif=exif)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))  # (rows, cols, 3)
    volume = one("x.png", data)
    np.testing.assert_array_equal(volume.frames[0], expected[..., 1].astype(np.float32))
    check_sequences(volume, [np.moveaxis(expected, -1, 0)])


def test_sequences_count_against_the_memory_budget():
    """A colour slice also keeps three float32 sequences: 3 + 8 + 12 bytes per pixel, a gray one 1 + 8."""
    gray, rgb = png(GRAY8), png(np.dstack([ONES, GRAY8, ONES * 3]))
    limits = Limits(max_decoded_bytes=GRAY8.size * 20)
    assert decode([("gray.png", gray)], limits).channels == 1
    with pytest.raises(UserError, match="bytes of memory"):
        decode([("rgb.png", rgb)], limits)
    assert decode([("rgb.png", rgb)], Limits(max_decoded_bytes=GRAY8.size * 23)).channels == 3


def test_tiff_orientation_tag_is_applied():
    data = tiff(pattern(), extratags=[(0x0112, "H", 1, 6, True)])  # 6: rotate 90 clockwise
    np.testing.assert_array_equal(one("x.tif", data).frames[0], np.rot90(pattern(), -1))


def test_several_pictures_keep_upload_order():
    files = [(f"{i}.png", png(pattern(np.uint8) + i)) for i in (3, 1, 2)]
    volume = decode(files)
    assert [frame[0, 0] for frame in volume.frames] == [13, 11, 12]
    assert volume.source_frame == [(0, 0), (1, 0), (2, 0)]


# --- orientation across formats ---------------------------------------------------------------


def as_nifti_ras(image: np.ndarray) -> bytes:
    """The inverse of the documented NIfTI display rule, frame = slice.T[::-1, ::-1]."""
    return nifti(image[::-1, ::-1].T[:, :, None].astype(np.int16))


def as_nifti_lps(image: np.ndarray) -> bytes:
    """How a DICOM-to-NIfTI converter may store an axial slice: i -> left, j -> posterior."""
    return nifti(image.T[:, :, None].astype(np.int16), affine=np.diag([-1.0, -1.0, 1.0, 1.0]))


def three_channel_tiff(image: np.ndarray) -> bytes:
    noise = np.random.default_rng(1).integers(0, 255, image.shape, dtype=np.uint8)
    return tiff(np.dstack([noise, image.astype(np.uint8), noise]), photometric="rgb")


@pytest.mark.parametrize(
    "encode",
    [
        pytest.param(lambda a: png(a.astype(np.uint8)), id="png"),
        pytest.param(lambda a: tiff(a), id="tiff"),
        pytest.param(three_channel_tiff, id="tiff-3-channel"),
        pytest.param(lambda a: dicom(a, ImageOrientationPatient=[1, 0, 0, 0, 1, 0]), id="dicom"),
        pytest.param(as_nifti_ras, id="nifti-ras"),
        pytest.param(as_nifti_lps, id="nifti-lps"),
    ],
)
def test_bright_corner_stays_top_left_in_every_format(encode):
    image = pattern(np.uint16, 200)
    frame = one("pattern", encode(image)).frames[0]
    np.testing.assert_array_equal(frame, image.astype(np.float32))
    assert np.unravel_index(frame.argmax(), frame.shape) == (2, 3)


# --- DICOM ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "MR_small.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_expb.dcm",
        "MR_small_implicit.dcm",
        "MR_small_padded.dcm",
    ],
)
@pytest.mark.filterwarnings("ignore:The pixel data is .* excess padding")
def test_dicom_transfer_syntaxes_match_uncompressed_pixels(name):
    volume = one(name, shipped(name))
    assert volume.kind == "dicom" and len(volume.datasets) == 1
    check_volume(volume, 1)
    np.testing.assert_array_equal(volume.frames[0], MR_SMALL)
    assert volume.pixel_spacing_mm == (0.3125, 0.3125) and volume.slice_thickness_mm == 0.8


def test_a_modality_lut_maps_stored_values_by_its_table_clamped_at_both_ends():
    """LUT Descriptor [8 entries, first stored value 4, 16 bits]: 4..11 read entries 0..7, lower values entry 0,
    higher ones entry 7 (PS3.3 C.11.1)."""
    lut = Dataset()
    lut.add_new(0x00283002, "US", [8, 4, 16])  # LUT Descriptor
    lut.ModalityLUTType = "US"
    lut.add_new(0x00283006, "US", [7, 107, 207, 307, 407, 507, 607, 707])  # LUT Data
    data = dicom(np.arange(16).reshape(4, 4), ModalityLUTSequence=[lut])
    expected = [[7, 7, 7, 7], [7, 107, 207, 307], [407, 507, 607, 707], [707, 707, 707, 707]]
    np.testing.assert_array_equal(one("lut.dcm", data).frames[0], np.array(expected, np.float32))


def test_built_deflated_dicom_decodes():
    data = dicom(GRAY16, syntax=DeflatedExplicitVRLittleEndian)
    np.testing.assert_array_equal(one("d.dcm", data).frames[0], GRAY16.astype(np.float32))


def test_rgb_dicom_yields_channel_1_per_frame():
    ds = pydicom.dcmread(get_testdata_file("SC_rgb_rle_2frame.dcm"))
    volume = one("rgb.dcm", shipped("SC_rgb_rle_2frame.dcm"))
    check_volume(volume, 2)
    assert volume.source_frame == [(0, 0), (0, 1)]
    for frame, expected in zip(volume.frames, ds.pixel_array[..., 1]):
        np.testing.assert_array_equal(frame, expected.astype(np.float32))


def test_palette_color_dicom_yields_channel_1_of_its_lut():
    """Stored values index the palette (descriptor [4 entries, first 0, 16 bits]); the frame is the green table."""
    tables = {"Red": [0, 1000, 2000, 3000], "Green": [65535, 40000, 20000, 5], "Blue": [9, 9, 9, 9]}
    attrs = {"PhotometricInterpretation": "PALETTE COLOR"}
    for colour, table in tables.items():
        attrs[f"{colour}PaletteColorLookupTableDescriptor"] = [4, 0, 16]
        attrs[f"{colour}PaletteColorLookupTableData"] = np.array(table, "<u2").tobytes()
    frame = one("p.dcm", dicom(np.array([[0, 1], [2, 3], [3, 0]]), **attrs)).frames[0]
    np.testing.assert_array_equal(frame, np.array([[65535, 40000], [20000, 5], [5, 65535]], np.float32))


def test_rescale_slope_and_intercept_are_applied():
    data = dicom(GRAY16, RescaleSlope=2, RescaleIntercept=-100)
    np.testing.assert_array_equal(one("r.dcm", data).frames[0], GRAY16 * 2.0 - 100)


def test_monochrome1_is_mirrored_over_its_stored_range():
    stored = np.minimum(GRAY16, 4095)
    data = dicom(stored, PhotometricInterpretation="MONOCHROME1", BitsStored=12, HighBit=11,
                 RescaleSlope=2, RescaleIntercept=5)
    # modality range is [2*0+5, 2*4095+5]; mirrored: 5 + 8195 - (2*p + 5) = 8195 - 2*p
    np.testing.assert_array_equal(one("m1.dcm", data).frames[0], 8195 - 2.0 * stored)


def test_multiframe_dicom_gives_frames_in_order():
    stack = np.stack([GRAY16 + i for i in range(3)])
    volume = one("mf.dcm", dicom(stack))
    check_volume(volume, 3)
    assert volume.source_frame == [(0, 0), (0, 1), (0, 2)] and len(volume.datasets) == 1
    for i, frame in enumerate(volume.frames):
        np.testing.assert_array_equal(frame, (GRAY16 + i).astype(np.float32))


def test_enhanced_dicom_functional_groups_give_spacing_and_rescale():
    measures, transform, shared = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = [0.9, 0.8], 3.0
    transform.RescaleSlope, transform.RescaleIntercept = 3, 1
    shared.PixelMeasuresSequence = [measures]
    shared.PixelValueTransformationSequence = [transform]
    data = dicom(np.stack([GRAY16, GRAY16]), SharedFunctionalGroupsSequence=[shared])
    volume = one("e.dcm", data)
    assert volume.pixel_spacing_mm == (0.9, 0.8) and volume.slice_thickness_mm == 3.0
    np.testing.assert_array_equal(volume.frames[1], GRAY16 * 3.0 + 1)


def series_slice(value: int, **attrs) -> bytes:
    return dicom(np.full((8, 6), value, np.uint16), **attrs)


def test_shuffled_series_is_sorted_along_the_slice_normal():
    axial = [1, 0, 0, 0, 1, 0]
    files = [
        (f"z{z}.dcm", series_slice(z, ImagePositionPatient=[0, 0, z], ImageOrientationPatient=axial,
                                   InstanceNumber=10 - z, PixelSpacing=[0.5, 0.7]))
        for z in (10, 0, 5)
    ]
    volume = decode(files)
    check_volume(volume, 3)
    assert [frame[0, 0] for frame in volume.frames] == [0, 5, 10]
    assert volume.source_frame == [(1, 0), (2, 0), (0, 0)]
    assert [ds.ImagePositionPatient[2] for ds in volume.datasets] == [0, 5, 10]
    assert volume.pixel_spacing_mm == (0.5, 0.7)
    assert volume.slice_thickness_mm == 5.0  # no SliceThickness: the spacing of the positions


def test_series_sort_follows_an_oblique_normal():
    sagittal = [0, 1, 0, 0, 0, -1]  # normal = -x: increasing projection means decreasing x
    files = [
        (f"x{x}.dcm",
         series_slice(x, ImagePositionPatient=[x, 0, 0], ImageOrientationPatient=sagittal))
        for x in (1, 3, 2)
    ]
    assert [frame[0, 0] for frame in decode(files).frames] == [3, 2, 1]


def test_series_without_positions_sorts_by_instance_number_else_keeps_upload_order():
    numbered = [(f"{n}.dcm", series_slice(n, InstanceNumber=n)) for n in (2, 3, 1)]
    assert [frame[0, 0] for frame in decode(numbered).frames] == [1, 2, 3]
    unnumbered = [(f"{n}.dcm", series_slice(n)) for n in (2, 3, 1)]
    assert [frame[0, 0] for frame in decode(unnumbered).frames] == [2, 3, 1]


def test_imager_pixel_spacing_is_the_fallback():
    assert one("c.dcm", dicom(GRAY16, ImagerPixelSpacing=[0.2, 0.3])).pixel_spacing_mm == (0.2, 0.3)


def test_dicom_without_preamble_is_read():
    ds = dicom_dataset(GRAY16)
    del ds.file_meta
    data = dicom_bytes(ds, enforce_file_format=False, implicit_vr=True, little_endian=True)
    assert data[128:132] != b"DICM"
    np.testing.assert_array_equal(one("bare", data).frames[0], GRAY16.astype(np.float32))


def test_volume_repr_and_logs_hold_no_pixels_or_patient_data(caplog):
    caplog.set_level(logging.DEBUG)
    data = dicom(GRAY16, PatientName="Doe^Jane", PatientID="Doe-1234", PatientBirthDate="19700101")
    volume = one("study.dcm", data)
    assert "Doe" not in caplog.text and "Doe" not in repr(volume)
    assert "PixelData" not in repr(volume) and len(repr(volume)) < 200
    with pytest.raises(dataclasses.FrozenInstanceError):
        volume.kind = "png"
    ds = dicom_dataset(GRAY16, PatientName="Doe^Jane")
    del ds.PixelData
    with pytest.raises(UserError) as error:
        one("study.dcm", dicom_bytes(ds))
    assert "Doe" not in str(error.value) and "Doe" not in caplog.text


# --- NIfTI ------------------------------------------------------------------------------------

VOXELS = np.arange(5 * 4 * 3, dtype=np.int16).reshape(5, 4, 3)  # x=5, y=4, z=3


@pytest.mark.parametrize("gz", [False, True], ids=["nii", "nii.gz"])
def test_nifti_3d_gives_axial_slices_along_last_axis(gz):
    volume = one("brain.nii", nifti(VOXELS, gz=gz, zooms=(0.9, 0.8, 2.5)))
    assert volume.kind == "nifti"
    check_volume(volume, 3)
    assert volume.source_frame == [(0, 0), (0, 1), (0, 2)]
    for k, frame in enumerate(volume.frames):
        assert frame.shape == (4, 5)
        np.testing.assert_array_equal(frame, VOXELS[:, :, k].T[::-1, ::-1])
    assert volume.pixel_spacing_mm == pytest.approx((0.8, 0.9))
    assert volume.slice_thickness_mm == pytest.approx(2.5)


def test_nifti_2d_and_single_volume_4d_are_accepted():
    assert len(one("a.nii", nifti(VOXELS[:, :, 0])).frames) == 1
    assert len(one("b.nii", nifti(VOXELS[..., None])).frames) == 3


def test_nifti_scaling_and_units_are_applied():
    data = nib.Nifti1Image(VOXELS, np.eye(4))
    data.header.set_slope_inter(2, 1)
    data.header.set_zooms((500, 500, 1000))
    data.header.set_xyzt_units("micron")
    volume = one("s.nii", data.to_bytes())
    np.testing.assert_array_equal(volume.frames[0], VOXELS[:, :, 0].T[::-1, ::-1] * 2.0 + 1)
    assert volume.pixel_spacing_mm == (0.5, 0.5) and volume.slice_thickness_mm == 1.0


def test_non_finite_values_become_zero_with_a_warning(caplog):
    data = VOXELS.astype(np.float32)
    data[0, 0, 0], data[1, 1, 1] = np.nan, np.inf
    with caplog.at_level(logging.WARNING, logger="metaseg.imageio"):
        volume = one("nan.nii", nifti(data))
    assert all(np.isfinite(frame).all() for frame in volume.frames)
    assert volume.frames[0][-1, -1] == 0 and "2 non-finite" in caplog.text


# --- to_png_bytes -----------------------------------------------------------------------------


def test_to_png_bytes_round_trips_a_mask():
    mask = (pattern(np.uint8, 1) == 1).astype(np.uint8) * 255
    data = to_png_bytes(mask)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), mask)
    assert to_png_bytes(mask > 0) == data
    with pytest.raises(ValueError):
        to_png_bytes(np.zeros((2, 2, 2), np.uint8))


# --- what a volume is -------------------------------------------------------------------------

VOLUMES = [  # id, files, one volume?
    ("dicom-series", lambda: [(f"{z}.dcm", series_slice(z, ImagePositionPatient=[0, 0, z])) for z in (2, 0, 1)], True),
    ("dicom-multi-frame", lambda: [("mf.dcm", dicom(np.stack([GRAY16] * 3)))], True),
    ("nifti", lambda: [("a.nii", nifti(VOXELS))], True),
    ("one-multi-page-tiff", lambda: [("a.tif", tiff(GRAY8, GRAY8))], True),
    ("one-dicom-slice", lambda: [("a.dcm", dicom(GRAY16))], False),
    ("one-nifti-slice", lambda: [("a.nii", nifti(VOXELS[:, :, :1]))], False),
    ("several-pngs", lambda: [(f"{i}.png", png(GRAY8)) for i in range(3)], False),
    ("several-multi-page-tiffs", lambda: [(f"{i}.tif", tiff(GRAY8, GRAY8)) for i in range(2)], False),
    ("dicom-files-without-series-uid",
     lambda: [(f"{z}.dcm", series_slice(z, SeriesInstanceUID=None)) for z in range(3)], False),
]


@pytest.mark.parametrize(("make", "expected"), [v[1:] for v in VOLUMES], ids=[v[0] for v in VOLUMES])
def test_a_volume_is_a_series_a_multi_frame_file_a_nifti_or_one_tiff_and_pictures_are_not(make, expected):
    volume = decode(make())
    assert volume.is_volume is expected
    spaced = dataclasses.replace(volume, pixel_spacing_mm=(0.5, 0.5), slice_thickness_mm=2.0)
    assert (spaced.voxel_mm3 is not None) is expected  # only a volume has voxels with a volume


# --- geometry and the NIfTI mask --------------------------------------------------------------


def lps_to_ras(point) -> np.ndarray:
    return np.asarray(point, float) * [-1, -1, 1]


def test_dicom_affine_puts_every_voxel_where_the_dicom_says():
    oblique = [0.0, 0.8, -0.6, 0.0, 0.6, 0.8]  # rows along +y/-z, columns along +y/+z: a tilted sagittal series
    normal = np.cross(oblique[:3], oblique[3:])
    positions = {k: np.array([10.0, -20.0, 30.0]) + 2.5 * k * normal for k in range(3)}
    files = [(f"{k}.dcm", series_slice(k, ImagePositionPatient=list(positions[k]), ImageOrientationPatient=oblique,
                                       PixelSpacing=[0.7, 0.9])) for k in (1, 2, 0)]
    volume = decode(files)
    for k, row, col in ((0, 0, 0), (2, 7, 5), (1, 3, 4)):
        where = positions[k] + col * 0.9 * np.array(oblique[:3]) + row * 0.7 * np.array(oblique[3:])
        np.testing.assert_allclose((volume.affine @ [k, row, col, 1])[:3], lps_to_ras(where), atol=1e-9)
    multi = one("mf.dcm", dicom(np.stack([GRAY16] * 3), ImagePositionPatient=[1, 2, 3], SliceThickness=4,
                                ImageOrientationPatient=[1, 0, 0, 0, 1, 0], PixelSpacing=[0.5, 0.5]))
    np.testing.assert_allclose((multi.affine @ [2, 0, 0, 1])[:3], lps_to_ras([1, 2, 3 + 2 * 4]))  # along the normal
    assert one("a.dcm", dicom(GRAY16)).affine is None  # no position, orientation or spacing: no geometry


def nifti_with_a_zero_affine(data: np.ndarray) -> bytes:
    """A NIfTI whose sform is all zeros (a degenerate affine, read as stored)."""
    raw = bytearray(nifti(data))
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw)))
    header["qform_code"], header["sform_code"] = 0, 1
    header["srow_x"] = header["srow_y"] = header["srow_z"] = 0
    raw[: header.sizeof_hdr] = header.binaryblock
    return bytes(raw)


def sources() -> list:
    """Uploads of every geometry the NIfTI writer meets: id, files, whether the mask reads back in series order (not a
    sagittal series: metaseg reads every NIfTI as axial slices)."""
    axial = [1, 0, 0, 0, 1, 0]
    rng = np.random.default_rng(3)
    stack = rng.integers(0, 900, (4, 8, 6)).astype(np.uint16)
    permuted = np.array([[0, 0, 2.0, 5], [-0.9, 0, 0, 3], [0, 1.1, 0, -7], [0, 0, 0, 1]])  # axes swapped and flipped
    oblique = np.array([[0.9, 0.1, 0, 1], [-0.1, 0.9, 0, 2], [0, 0, 2.5, 3], [0, 0, 0, 1]])
    cos, sin = np.cos(np.radians(30)), np.sin(np.radians(30))  # an LPS grid tilted by 30 degrees about x
    rotated = np.array([[-0.9, 0, 0, 4], [0, -cos, -2.5 * sin, 5], [0, -sin, 2.5 * cos, 6], [0, 0, 0, 1]])
    return [
        ("dicom-axial-series", [(f"{z}.dcm", dicom(stack[z], ImagePositionPatient=[4, 5, 3.0 * z],
                                                   ImageOrientationPatient=axial, PixelSpacing=[0.6, 0.7]))
                                for z in (3, 0, 2, 1)], True),
        ("dicom-sagittal-series", [(f"{x}.dcm", dicom(stack[x], ImagePositionPatient=[2.0 * x, 0, 0],
                                                      ImageOrientationPatient=[0, 1, 0, 0, 0, -1],
                                                      PixelSpacing=[1.0, 1.0])) for x in range(4)], False),
        ("nifti-ras", [("a.nii", nifti(stack.T.astype(np.int16), zooms=(0.5, 0.6, 2.0)))], True),
        ("nifti-lps", [("a.nii", nifti(stack.T.astype(np.int16), affine=np.diag([-1.0, -1.0, 1.0, 1.0])))], True),
        ("nifti-permuted", [("a.nii.gz", nifti(stack.T.astype(np.int16), affine=permuted, gz=True))], True),
        ("nifti-oblique", [("a.nii", nifti(stack.T.astype(np.int16), affine=oblique))], True),
        ("nifti-rotated-lps", [("a.nii", nifti(stack.T.astype(np.int16), affine=rotated))], True),
        ("nifti-zero-affine", [("a.nii", nifti_with_a_zero_affine(stack.T.astype(np.int16)))], True),
        ("pngs-without-geometry", [(f"{z}.png", png(stack[z].astype(np.uint8))) for z in range(4)], True),
        ("dicom-without-geometry", [("a.dcm", dicom(stack[0]))], True),
    ]


@pytest.mark.parametrize(("files", "in_order"), [s[1:] for s in sources()], ids=[s[0] for s in sources()])
def test_nifti_mask_lies_on_its_source_and_reads_back_as_its_frames(files, in_order):
    volume = decode(files)
    masks = np.stack(volume.frames) > 450
    data = to_nifti_bytes(masks, volume)
    assert data[:2] == b"\x1f\x8b"  # .nii.gz
    image = nib.Nifti1Image.from_bytes(gzip.decompress(data))
    stored = np.asarray(image.dataobj)
    assert stored.dtype == np.uint8 and set(np.unique(stored)) <= {0, 1}
    back = decode([("mask.nii.gz", data)])
    if in_order:
        np.testing.assert_array_equal(np.stack(back.frames) > 0, masks)
    if volume.affine is None:  # a grid of the known spacing, else 1 mm
        assert back.pixel_spacing_mm == pytest.approx(volume.pixel_spacing_mm or (1.0, 1.0))
        return
    # every source voxel lands on a mask voxel of its own value, in the world's coordinates
    to_mask = np.linalg.inv(image.affine) @ volume.affine
    for k, row, col in np.ndindex(masks.shape):
        x, y, z = np.round(to_mask @ [k, row, col, 1])[:3].astype(int)
        assert stored[x, y, z] == masks[k, row, col]
    if in_order:
        np.testing.assert_allclose(back.affine, volume.affine, atol=1e-4)  # float32 in the NIfTI header


@pytest.mark.parametrize("files", [s[1] for s in sources() if s[0].startswith("nifti")],
                         ids=[s[0] for s in sources() if s[0].startswith("nifti")])
def test_nifti_mask_of_a_nifti_is_on_its_own_voxels(files):
    """The mask of a NIfTI upload has its shape, voxel order and affine, as MONAI's Invertd and nnU-Net answer."""
    name, data = files[0]
    upload = nib.Nifti1Image.from_bytes(gzip.decompress(data) if name.endswith(".gz") else data)
    volume = decode(files)
    image = nib.Nifti1Image.from_bytes(gzip.decompress(to_nifti_bytes(np.stack(volume.frames) > 450, volume)))
    np.testing.assert_array_equal(np.asarray(image.dataobj), np.asarray(upload.dataobj) > 450)  # voxel for voxel
    if volume.affine is not None:  # a degenerate affine says nothing to keep: a grid of its voxel sizes
        np.testing.assert_array_equal(image.affine, upload.affine)


def test_nifti_mask_of_the_wrong_shape_is_refused():
    volume = one("a.nii", nifti(VOXELS))
    with pytest.raises(ValueError, match="expected 3 masks of 4x5"):
        to_nifti_bytes(np.zeros((3, 5, 4), bool), volume)


# --- bad uploads ------------------------------------------------------------------------------


def png_declaring(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR (with a valid CRC) claims another size."""
    data = png(np.zeros((1, 1), np.uint8))
    ihdr = struct.pack(">II", width, height) + data[24:29]
    return data[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + data[33:]


def tiff_declaring(width: int, height: int, dtype=np.uint8, samples: int = 1) -> bytes:
    """An 8x8 TIFF of `samples` samples of `dtype` whose first directory claims another size."""
    pixels = np.zeros((8, 8, samples) if samples > 1 else (8, 8), dtype)
    data = bytearray(tiff(pixels, photometric="minisblack", planarconfig="contig"))
    (ifd,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, ifd)
    for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
        tag = struct.unpack_from("<H", data, entry)[0]
        if tag in (256, 257):
            struct.pack_into("<HHII", data, entry, tag, 4, 1, width if tag == 256 else height)
    return bytes(data)


def nifti_declaring(shape) -> bytes:
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape(shape)
    header["vox_offset"] = 352
    return header.binaryblock + b"\0" * 4 + b"\0" * 64


def with_pixel_data(name: str, pixel_data: bytes) -> bytes:
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.PixelData = pixel_data
    return dicom_bytes(ds)


def with_syntax(syntax: str, encapsulated: bool) -> bytes:
    ds = dicom_dataset(GRAY16, syntax=syntax)
    if encapsulated:
        ds.PixelData = encapsulate([b"\0" * 64])
        ds["PixelData"].VR = "OB"
        return dicom_bytes(ds)
    return dicom_bytes(ds, implicit_vr=False, little_endian=True)


def without_pixel_data() -> bytes:
    ds = dicom_dataset(GRAY16)
    del ds.PixelData
    return dicom_bytes(ds)


RANDOM = np.random.default_rng(7).bytes(4000)
PNG = png(pattern(np.uint8))
JPEG = pil_bytes(Image.fromarray(pattern(np.uint8)), "JPEG")
TIF = tiff(GRAY16)
DCM = dicom(GRAY16)
NII = nifti(VOXELS)
SMALL_INFLATE = Limits(max_inflated_bytes=2**20)
MPEG2 = "1.2.840.10008.1.2.4.100"


def single(case_id, make, match, limits=Limits()):
    """A one-file upload named 'scan'; its error must name the file."""
    return pytest.param(lambda: [("scan", make())], limits, [match, "'scan'"], id=case_id)


def several(case_id, make, match, limits=Limits()):
    return pytest.param(make, limits, [match], id=case_id)


BAD_UPLOADS = [
    several("no-files", lambda: [], "no files"),
    single("empty", lambda: b"", "empty"),
    single("random-bytes", lambda: RANDOM, "not a recognised image"),
    single("text", lambda: b"patient list\nline 2\n" * 20, "not a recognised image"),
    single("json", lambda: b'{"image": [1, 2, 3]}', "not a recognised image"),
    single("png-truncated", lambda: PNG[: len(PNG) // 2], "truncated"),
    single("png-signature-only", lambda: PNG[:8], "PNG"),
    single("png-corrupt-idat", lambda: PNG[:60] + bytes(40) + PNG[100:], "PNG"),
    single("png-zero-size", lambda: png_declaring(0, 10), "PNG"),
    single("png-bomb-error", lambda: png_declaring(100_000, 100_000), "decompression bomb"),
    single("png-bomb-warning", lambda: png_declaring(10_000, 10_000), "decompression bomb"),
    single("png-over-max-pixels", lambda: png_declaring(5000, 5000), "exceeds the limit"),
    single("jpeg-truncated", lambda: JPEG[:300], "JPEG"),
    single("jpeg-soi-only", lambda: b"\xff\xd8\xff", "JPEG"),
    single("tiff-header-only", lambda: b"II*\x00\x08\x00\x00\x00", "TIFF"),
    single("tiff-truncated", lambda: TIF[: len(TIF) // 2], "TIFF"),
    single("tiff-bomb", lambda: tiff_declaring(100_000, 100_000), "exceeds the limit"),
    single("tiff-too-many-pages", lambda: tiff(GRAY16, GRAY16, GRAY16), "more than 2 frames",
           Limits(max_frames=2)),
    single("tiff-five-samples",
           lambda: tiff(np.zeros((8, 8, 5), np.uint8), photometric="minisblack",
                        planarconfig="contig"),
           "pixel layout"),
    single("dicom-preamble-only", lambda: bytes(128) + b"DICM", "no pixel data"),
    single("dicom-truncated", lambda: DCM[: len(DCM) - 300], "less than expected"),
    single("dicom-shipped-truncated", lambda: shipped("MR_truncated.dcm"), "less than expected"),
    single("dicom-bare-garbage", lambda: b"\x08\x00" + RANDOM, "DICOM"),
    single("dicom-no-pixel-data", without_pixel_data, "no pixel data"),
    single("dicom-bogus-syntax", lambda: with_syntax("1.2.3.4", False), "1.2.3.4"),
    single("dicom-mpeg2-syntax", lambda: with_syntax(MPEG2, True), "MPEG2 Main Profile"),
    single("dicom-12bit-jpeg", lambda: shipped("JPEG-lossy.dcm"), "JPEG Extended"),
    single("dicom-corrupt-rle",
           lambda: with_pixel_data("MR_small_RLE.dcm", encapsulate([RANDOM])), "RLE"),
    single("dicom-corrupt-jpeg-ls",
           lambda: with_pixel_data("MR_small_jpeg_ls_lossless.dcm",
                                   encapsulate([b"\xff\xd8" + RANDOM])), "JPEG-LS"),
    single("dicom-corrupt-j2k",
           lambda: with_pixel_data("MR_small_jp2klossless.dcm", encapsulate([RANDOM])),
           "JPEG 2000"),
    single("dicom-bomb-dimensions", lambda: dicom(GRAY16, Rows=60000, Columns=60000), "exceeds"),
    single("dicom-too-many-frames", lambda: dicom(GRAY16, NumberOfFrames=100_000), "frames"),
    single("dicom-zero-rows", lambda: dicom(GRAY16, Rows=0), "no pixels"),
    single("dicom-deflate-bomb",
           lambda: dicom(np.zeros((1024, 1024), np.uint16), syntax=DeflatedExplicitVRLittleEndian),
           "more than 1048576 bytes", SMALL_INFLATE),
    single("gzip-bomb", lambda: gzip.compress(NII + bytes(8 * 2**20)), "more than", SMALL_INFLATE),
    single("gzip-not-nifti", lambda: gzip.compress(b"hello" * 100), "NIfTI"),
    single("gzip-corrupt", lambda: b"\x1f\x8b" + RANDOM, "gzip"),
    single("gzip-truncated", lambda: gzip.compress(NII)[:-40], "truncated"),
    single("nifti-truncated", lambda: NII[:400], "truncated"),
    single("nifti-huge-dimensions", lambda: nifti_declaring((30000, 30000, 30000)), "exceeds"),
    single("nifti-gz-huge-dimensions", lambda: gzip.compress(nifti_declaring((9000, 9000, 500))),
           "exceeds"),
    single("nifti-4d", lambda: nifti(np.zeros((4, 4, 2, 3), np.int16)), "3 volumes"),
    single("nifti-complex", lambda: nifti(np.zeros((4, 4, 2), np.complex64)), "data type"),
    single("file-too-large", lambda: TIF, "more than 100", Limits(max_bytes=100)),
    several("nifti-two-files", lambda: [("a.nii", NII), ("b.nii", NII)], "one NIfTI"),
    several("too-many-files", lambda: [(f"{i}.png", PNG) for i in range(3)], "too many files",
            Limits(max_files=2)),
    several("over-memory-budget-in-all", lambda: [("a.png", PNG), ("b.png", PNG)], "'b.png'",
            Limits(max_decoded_bytes=10_000)),
    several("mixed-kinds", lambda: [("a.png", PNG), ("b.dcm", DCM)], "'b.dcm': is dicom"),
    several("dicom-series-sizes-differ", lambda: [("a.dcm", DCM), ("b.dcm", dicom(GRAY16[:8]))],
            "'b.dcm': slice of 8x32"),
    several("dicom-series-uids-differ",
            lambda: [("a.dcm", DCM), ("b.dcm", dicom(GRAY16, SeriesInstanceUID="1.2.3"))],
            "another series"),
    several("picture-sizes-differ",
            lambda: [("a.png", PNG), ("b.png", png(np.zeros((5, 5), np.uint8)))], "'b.png'"),
]


@pytest.mark.parametrize(("make_files", "limits", "expected"), BAD_UPLOADS)
def test_bad_upload_raises_a_one_line_user_error(make_files, limits, expected):
    with pytest.raises(UserError) as error:
        decode(make_files(), limits)
    message = str(error.value)
    assert message and "\n" not in message
    for part in expected:
        assert part in message
