"""The HTTP server: every input format, findings in pixels and mm, DICOM SEG, limits and errors (always a 4xx,
never a 5xx), a saturated pool, logs without patient data, and a real uvicorn that stops in time (load: `make bench`).

The model is the attention_unet bundle with seeded random weights at spatial_size 32 (fast, no training);
where exact masks matter, an "echo" engine whose probability is the slice's own brightness stands in for it.
"""

from __future__ import annotations

import asyncio
import builtins
import gzip
import io
import json
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import highdicom as hd
import httpx
import nibabel as nib
import numpy as np
import pydicom
import pytest
import starlette.formparsers
import tifffile
from fastapi import HTTPException
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from starlette.requests import Request

from conftest import REPO, flair
from metaseg.imageio import detect, reader
from metaseg.imageio.volume import Volume
from metaseg.inference import lesions
from metaseg.cli import main
from metaseg.errors import UserError
from metaseg.inference.steps import upload_masks
from serve import dicomseg
from serve.config import Settings
from serve.deps import get_engine
from serve.main import create_app
from serve.uploads import read_files
from test_engine import random_weights

MiB = 2**20
SHIPPED = Path(pydicom.__file__).parent / "data" / "test_files"  # files on disk only: nothing is downloaded


# --- the model and the app ----------------------------------------------------------------------------------


class EchoEngine:
    """Probability = the slice's brightness scaled to 0..1, so a mask is wherever the picture is bright."""

    name = "echo"
    metadata = {"version": "0.0.0"}
    spatial_size = 32
    batch_size = 4  # slices per call, as the server batches for a real engine
    inference_steps = {"flip_tta": False, "threshold": 0.5, "min_lesion_voxels": 0, "min_lesion_mm3": 0,
                       "min_lesion_score": 0, "largest_component": False}
    one_lesion_per_patient = False

    def probabilities(self, frames):
        frames = [flair(f) for f in frames]
        return [(f / f.max() if f.max() > 0 else np.zeros_like(f)).astype(np.float32) for f in frames]


class SlowEngine(EchoEngine):
    """Holds its pool thread until released, to saturate a pool of one."""

    def __init__(self):
        self.started, self.release = threading.Event(), threading.Event()

    def probabilities(self, frames):
        self.started.set()
        self.release.wait(30)
        return super().probabilities(frames)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return random_weights("attention_unet", tmp_path_factory.mktemp("model"))


def settings_for(weights: Path, **changes) -> Settings:
    return Settings(**{"bundle": "attention_unet", "weights": weights, "spatial_size": 32, "max_upload_bytes": 2 * MiB}
                    | changes)


@contextmanager
def serving(settings: Settings, engine=None):
    app = create_app(settings)
    if engine is not None:
        app.dependency_overrides[get_engine] = lambda: engine
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def client(weights):
    with serving(settings_for(weights)) as c:
        yield c


@pytest.fixture(scope="module")
def echo(weights):
    with serving(settings_for(weights), EchoEngine()) as c:
        yield c


def post(client, path="/segment", *files, **params):
    return client.post(path, files=[("file", f) for f in files], params=params)


def read_png(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(response.content)))


# --- inputs ---------------------------------------------------------------------------------------------------

STUDY, SERIES, FRAME_OF_REFERENCE = generate_uid(), generate_uid(), generate_uid()


def blobs(shape=(40, 56), boxes=((5, 30, 6, 8),), dtype=np.uint8, high=200) -> np.ndarray:
    """Background 20 with bright boxes (row, col, height, width): an asymmetric picture with known lesions."""
    image = np.full(shape, 20, dtype)
    for row, col, height, width in boxes:
        image[row : row + height, col : col + width] = high
    return image


def encode(image, fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


def tiff(image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, image, **kwargs)
    return buffer.getvalue()


def nifti(data, gz=False) -> bytes:
    raw = nib.Nifti1Image(data, np.eye(4)).to_bytes()
    return gzip.compress(raw) if gz else raw


def mr(pixels: np.ndarray, z: float = 0.0, **attrs) -> Dataset:
    """An MR Image Storage instance with everything a SEG needs; `attrs` set or (None) delete attributes."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Patient", "T-1", "19700101", "O"
    ds.StudyInstanceUID, ds.StudyID, ds.StudyDate, ds.StudyTime = STUDY, "1", "20240101", "120000"
    ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.Modality, ds.InstanceNumber = SERIES, 1, "MR", int(z) + 1
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = FRAME_OF_REFERENCE, ""
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, z], [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [0.5, 0.8], 3.0
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    for keyword, value in attrs.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def dcm(ds: Dataset, **write_args) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True, **write_args)
    return buffer.getvalue()


def shipped(name: str) -> bytes:
    return (SHIPPED / name).read_bytes()


def shipped_size(name: str) -> tuple[int, int]:
    ds = pydicom.dcmread(SHIPPED / name, stop_before_pixels=True)
    return int(ds.Rows), int(ds.Columns)


SLICE = blobs()
RGB = np.dstack([SLICE // 2, SLICE, SLICE // 3])  # channel 1 (FLAIR) is the slice
SERIES_SLICES = [blobs((24, 32), ((2 + 4 * z, 3, 4, 5),)) for z in range(3)]
VOXELS = np.random.default_rng(0).integers(0, 900, (24, 20, 3)).astype(np.int16)


def series_files(order=(2, 0, 1)) -> list[tuple[str, bytes]]:
    return [(f"s{z}.dcm", dcm(mr(SERIES_SLICES[z], z=float(z)))) for z in order]


FORMATS = [  # id, files, (rows, cols), slices, input channels
    ("png-gray8", lambda: [("a.png", encode(SLICE))], SLICE.shape, 1, 1),
    ("png-gray16", lambda: [("a.png", encode(SLICE.astype(np.uint16) * 300))], SLICE.shape, 1, 1),
    ("png-rgb", lambda: [("a.png", encode(RGB))], SLICE.shape, 1, 3),
    ("png-rgba", lambda: [("a.png", encode(np.dstack([RGB, np.full(SLICE.shape, 255, np.uint8)])))], SLICE.shape, 1, 3),
    ("jpeg", lambda: [("a.jpg", encode(SLICE, "JPEG"))], SLICE.shape, 1, 1),
    ("tiff-gray", lambda: [("a.tif", tiff(SLICE))], SLICE.shape, 1, 1),
    ("tiff-dataset-slice-256x256x3",
     lambda: [("TCGA_X_1.tif", tiff(np.random.default_rng(1).integers(0, 255, (256, 256, 3), np.uint8),
                                    photometric="rgb"))], (256, 256), 1, 3),
    ("dicom-explicit-le", lambda: [("a.dcm", shipped("MR_small.dcm"))], shipped_size("MR_small.dcm"), 1, 1),
    ("dicom-implicit-le", lambda: [("a.dcm", shipped("MR_small_implicit.dcm"))], (64, 64), 1, 1),
    ("dicom-big-endian", lambda: [("a.dcm", shipped("MR_small_bigendian.dcm"))], (64, 64), 1, 1),
    ("dicom-deflate", lambda: [("a.dcm", shipped("image_dfl.dcm"))], shipped_size("image_dfl.dcm"), 1, 1),
    ("dicom-jpeg-baseline", lambda: [("a.dcm", shipped("SC_rgb_jpeg_dcmtk.dcm"))], (100, 100), 1, 3),
    ("dicom-jpeg-lossless", lambda: [("a.dcm", shipped("SC_rgb_jpeg_gdcm.dcm"))], (100, 100), 1, 3),
    ("dicom-jpeg-ls", lambda: [("a.dcm", shipped("MR_small_jpeg_ls_lossless.dcm"))], (64, 64), 1, 1),
    ("dicom-jpeg-2000", lambda: [("a.dcm", shipped("MR_small_jp2klossless.dcm"))], (64, 64), 1, 1),
    ("dicom-rle", lambda: [("a.dcm", shipped("MR_small_RLE.dcm"))], (64, 64), 1, 1),
    ("dicom-multiframe-rgb-rle", lambda: [("a.dcm", shipped("SC_rgb_rle_2frame.dcm"))], (100, 100), 2, 3),
    ("dicom-multiframe-mr", lambda: [("a.dcm", dcm(mr(np.stack(SERIES_SLICES))))], (24, 32), 3, 1),
    ("dicom-series", series_files, (24, 32), 3, 1),
    ("nifti", lambda: [("a.nii", nifti(VOXELS))], (20, 24), 3, 1),
    ("nifti-gz", lambda: [("a.nii.gz", nifti(VOXELS, gz=True))], (20, 24), 3, 1),
    ("png-1x1", lambda: [("a.png", encode(np.full((1, 1), 255, np.uint8)))], (1, 1), 1, 1),
    ("png-1x3000-strip", lambda: [("a.png", encode(np.tile(SLICE[:1], (1, 60))[:, :3000]))], (1, 3000), 1, 1),
    ("png-constant", lambda: [("a.png", encode(np.full((50, 50), 7, np.uint8)))], (50, 50), 1, 1),
]


# --- every format -------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Divide by zero:Warning")  # MONAI, on a slice without intensity range
@pytest.mark.parametrize(("make", "size", "slices", "channels"), [f[1:] for f in FORMATS], ids=[f[0] for f in FORMATS])
def test_every_format_is_segmented_at_its_own_size(client, make, size, slices, channels):
    files = make()
    report = post(client, "/segment", *files)
    assert report.status_code == 200, report.text
    body = report.json()
    assert (body["image_size"], body["slices"]) == ({"rows": size[0], "cols": size[1]}, slices)
    assert body["input_channels"] == channels  # colour: the three sequences; gray: one channel, taken as FLAIR
    assert body["model"] == "attention_unet" and 0 <= body["max_probability"] <= 1 and body["inference_ms"] > 0
    last = post(client, "/segment/mask", *files, slice=slices - 1)
    mask = read_png(last)
    assert mask.shape == size and set(np.unique(mask)) <= {0, 255}


def test_same_slice_as_png_and_dicom_gives_the_same_mask(client, echo):
    as_png, as_dicom = ("a.png", encode(SLICE)), ("a.dcm", dcm(mr(SLICE)))
    np.testing.assert_array_equal(read_png(post(client, "/segment/mask", as_png)),
                                  read_png(post(client, "/segment/mask", as_dicom)))
    expected = np.where(SLICE > 100, 255, 0)  # the bright box, where the picture has it: orientation is kept
    for upload in (as_png, as_dicom, ("a.tif", tiff(RGB, photometric="rgb"))):
        np.testing.assert_array_equal(read_png(post(echo, "/segment/mask", upload)), expected)


def test_the_engine_gets_three_sequences_of_a_colour_upload_and_the_frame_of_a_gray_one(weights):
    class Recording(EchoEngine):
        seen = []

        def probabilities(self, frames):
            self.seen.extend(frames)
            return super().probabilities(frames)

    with serving(settings_for(weights), Recording()) as recording:
        tif = post(recording, "/segment", ("a.tif", tiff(RGB, photometric="rgb"))).json()
        gray = post(recording, "/segment", ("a.png", encode(SLICE))).json()
    (three, one) = Recording.seen
    np.testing.assert_array_equal(three, np.moveaxis(RGB, -1, 0))  # (pre-contrast, FLAIR, post-contrast)
    np.testing.assert_array_equal(one, SLICE)
    assert (tif["input_channels"], gray["input_channels"]) == (3, 1)
    assert tif["lesion_count"] == gray["lesion_count"] == 1  # the echo sees the same FLAIR in both


def test_slice_components_are_measured_with_pixel_spacing_and_lesions_in_3d(echo):
    slice0 = blobs((30, 40), ((2, 3, 4, 5), (20, 30, 3, 3)), np.uint16)
    slice1 = blobs((30, 40), (), np.uint16)
    slice1[10, 10] = slice1[11, 11] = 200  # diagonal neighbours: one component (8-connected)
    slice1[20:23, 30:33] = 200  # under the second box of slice 0: one lesion over both slices
    files = [("b.dcm", dcm(mr(slice1, z=3.0))), ("a.dcm", dcm(mr(slice0, z=0.0)))]
    body = post(echo, "/segment", *files).json()
    assert (body["slices"], body["pixel_spacing_mm"], body["volume"]) == (2, [0.5, 0.8], True)
    first, second, third, fourth = body["slice_components"]
    assert first == {"slice_index": 0, "area_px": 20, "area_mm2": pytest.approx(8.0),
                     "centroid": {"row": 3.5, "col": 5.0},
                     "bbox": {"row_min": 2, "col_min": 3, "row_max": 5, "col_max": 7}, "max_probability": 1.0}
    assert (second["slice_index"], second["area_px"], second["bbox"]["row_min"]) == (0, 9, 20)
    assert (third["slice_index"], third["area_px"], third["centroid"]) == (1, 2, {"row": 10.5, "col": 10.5})
    assert (fourth["slice_index"], fourth["area_px"]) == (1, 9)
    assert body["total_area_px"] == 40 and body["total_area_mm2"] == pytest.approx(40 * 0.4)
    assert body["lesion_count"] == 3 == len(body["lesions"])  # the 3x3 boxes of both slices are one lesion
    box, spanning, pair = body["lesions"]
    voxel_mm3 = 0.5 * 0.8 * 3.0  # SliceThickness 3 mm
    assert (box["slices"], box["voxels"], box["volume_mm3"]) == ([0], 20, pytest.approx(20 * voxel_mm3))
    assert box["longest_diameter_mm"] == pytest.approx(np.hypot(4 * 0.5, 5 * 0.8)) and box["measurable"] is False
    assert (spanning["slices"], spanning["first_slice"], spanning["last_slice"]) == ([0, 1], 0, 1)
    assert spanning["voxels"] == 18
    assert spanning["centroid"] == {"slice": 0.5, "row": 21.0, "col": 31.0}
    assert spanning["bbox"] == {"row_min": 20, "col_min": 30, "row_max": 22, "col_max": 32}
    assert (pair["slices"], pair["voxels"], pair["longest_diameter_px"]) == ([1], 2, pytest.approx(np.hypot(2, 2)))
    assert body["volume_ml"] == pytest.approx(40 * voxel_mm3 / 1000)  # the lesions' volume
    as_png = post(echo, "/segment", ("a.png", encode(slice0.astype(np.uint8)))).json()
    assert as_png["lesion_count"] == 2 and as_png["total_area_px"] == 29 and not as_png["volume"]
    assert as_png["slice_components"][0]["area_mm2"] is None and as_png["total_area_mm2"] is None
    assert as_png["volume_ml"] is None and as_png["lesions"][0]["volume_mm3"] is None
    assert as_png["lesions"][0]["longest_diameter_mm"] is None and as_png["lesions"][0]["measurable"] is None
    at_one = post(echo, "/segment", ("a.png", encode(SLICE)), threshold=1).json()  # lesion where p >= threshold
    assert (at_one["lesion_count"], at_one["total_area_px"], at_one["threshold"]) == (1, 48, 1.0)  # the box: p = 1


class SizedEcho(EchoEngine):
    """The echo with minimum lesion sizes: 100 voxels where the spacing is unknown, 100 mm3 where it is known."""

    inference_steps = {**EchoEngine.inference_steps, "min_lesion_voxels": 100, "min_lesion_mm3": 100}


def test_a_series_and_a_multi_frame_dicom_are_volumes_and_several_pictures_are_not(weights, echo):
    """SERIES_SLICES hold one tumour over three slices (60 voxels, 72 mm3): a volume's lesion, which the minimum
    size drops; as three pictures, three lesions of one slice each, which no component step touches."""
    uploads = {
        "series": (series_files(), True),
        "multi-frame": ([("m.dcm", dcm(mr(np.stack(SERIES_SLICES))))], True),
        "pictures": ([(f"{z}.png", encode(s)) for z, s in enumerate(SERIES_SLICES)], False),
        "dicom-without-series": ([(f"{z}.dcm", dcm(mr(s, z=float(z), SeriesInstanceUID=None)))
                                  for z, s in enumerate(SERIES_SLICES)], False),
    }
    with serving(settings_for(weights), SizedEcho()) as sized:
        for name, (files, volume) in uploads.items():
            plain, stepped = post(echo, "/segment", *files).json(), post(sized, "/segment", *files).json()
            assert plain["volume"] is stepped["volume"] is volume, name
            assert len(plain["slice_components"]) == 3, name
            if volume:
                (tumour,) = plain["lesions"]
                assert (tumour["slices"], tumour["voxels"], plain["lesion_count"]) == ([0, 1, 2], 60, 1), name
                assert tumour["volume_mm3"] == pytest.approx(60 * 0.5 * 0.8 * 3.0), name
                assert (stepped["volume_steps"], stepped["lesion_count"]) == (["min_lesion_mm3"], 0), name
                assert stepped["volume_ml"] == 0 and plain["volume_ml"] == pytest.approx(0.072), name
            else:
                assert [lesion["slices"] for lesion in plain["lesions"]] == [[0], [1], [2]], name
                assert [lesion["id"] for lesion in plain["lesions"]] == [1, 2, 3], name
                assert stepped["volume_steps"] == [] and stepped["lesions"] == plain["lesions"], name
                assert plain["volume_ml"] is None and plain["lesions"][0]["volume_mm3"] is None, name
        unspaced = [("m.dcm", dcm(mr(np.stack(SERIES_SLICES), PixelSpacing=None, SliceThickness=None)))]
        stepped = post(sized, "/segment", *unspaced).json()  # no spacing: the size in voxels
        assert (stepped["volume_steps"], stepped["lesion_count"], stepped["volume_ml"]) == (["min_lesion_voxels"], 0,
                                                                                          None)


def sphere_series(spheres, shape=(64, 48), slices=7, pixel_mm=0.5, slice_mm=1.8) -> tuple[list, np.ndarray]:
    """A DICOM series (upload order shuffled) of bright balls: (slice, row, col) centre and radius in mm each; and
    the ball voxels, in series order."""
    k, row, col = np.indices((slices, *shape))
    inside = np.zeros((slices, *shape), bool)
    for (ck, crow, ccol), radius in spheres:
        distance2 = ((k - ck) * slice_mm) ** 2 + ((row - crow) * pixel_mm) ** 2 + ((col - ccol) * pixel_mm) ** 2
        inside |= distance2 <= radius**2
    pixels = np.where(inside, 200, 20).astype(np.uint16)
    order = np.random.default_rng(5).permutation(slices)
    files = [(f"{z}.dcm", dcm(mr(pixels[z], z=z * slice_mm, PixelSpacing=[pixel_mm, pixel_mm],
                                 SliceThickness=slice_mm))) for z in order]
    return files, inside


def test_the_lesion_table_measures_a_sphere_of_known_size(echo):
    """A ball of radius 6 mm over 7 slices (0.5 mm pixels, 1.8 mm slices) is one measurable lesion of ~905 mm3 and
    a 12 mm diameter (12.5 edge to edge of its pixels); a 2.5 mm ball beside it is not measurable."""
    files, inside = sphere_series([((3, 16, 16), 6.0), ((3, 48, 36), 2.5)])
    body = post(echo, "/segment", *files).json()
    assert (body["volume"], body["lesion_count"], len(body["slice_components"])) == (True, 2, 7 + 3)
    big, small = body["lesions"]
    voxel_mm3 = 0.5 * 0.5 * 1.8
    assert (big["slices"], big["first_slice"], big["last_slice"]) == (list(range(7)), 0, 6)  # 7 slices, one lesion
    assert big["voxels"] == int(inside[:, :33].sum()) and big["volume_mm3"] == pytest.approx(big["voxels"] * voxel_mm3)
    assert big["volume_mm3"] == pytest.approx(4 / 3 * np.pi * 6.0**3, rel=0.03)
    assert big["longest_diameter_mm"] == pytest.approx(12.5, abs=0.1)
    assert big["longest_diameter_px"] == pytest.approx(25, abs=0.2)
    assert (big["diameter_slice"], big["measurable"], big["max_probability"]) == (3, True, 1.0)
    assert 0 < big["mean_probability"] <= big["max_probability"]
    assert big["centroid"] == pytest.approx({"slice": 3, "row": 16, "col": 16})
    assert big["bbox"] == {"row_min": 4, "col_min": 4, "row_max": 28, "col_max": 28}
    assert (small["slices"], small["measurable"]) == ([2, 3, 4], False) and 5.5 <= small["longest_diameter_mm"] < 6
    assert body["volume_ml"] == pytest.approx((big["volume_mm3"] + small["volume_mm3"]) / 1000)
    assert body["volume_ml"] == pytest.approx(inside.sum() * voxel_mm3 / 1000)
    alone = post(echo, "/segment", files[0]).json()  # a single DICOM slice: areas and diameters, no volume
    assert (alone["volume"], alone["volume_ml"], alone["volume_steps"]) == (False, None, [])
    assert all(lesion["volume_mm3"] is None and lesion["longest_diameter_mm"] for lesion in alone["lesions"])


def test_mask_and_overlay_of_one_series_slice(echo):
    files = series_files()
    for z in range(3):
        expected = np.where(SERIES_SLICES[z] > 100, 255, 0)
        np.testing.assert_array_equal(read_png(post(echo, "/segment/mask", *files, slice=z)), expected)
    overlay = read_png(post(echo, "/segment/overlay", *files, slice=1))
    assert overlay.shape == (24, 32, 3)
    lesion = SERIES_SLICES[1] > 100
    assert (overlay[lesion][:, 0] == 255).all() and (overlay[lesion][:, 1] < 255).all()
    assert (overlay[~lesion][:, 0] == overlay[~lesion][:, 1]).all()  # gray outside the lesion


# --- all slices: NIfTI mask, probabilities -------------------------------------------------------------------


def read_nifti(response) -> Volume:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/gzip"
    return reader.decode([("mask.nii.gz", response.content)])


def test_nifti_mask_reads_back_as_the_masks_in_series_order(echo):
    files = series_files(order=(1, 2, 0))
    mask = read_nifti(post(echo, "/segment/nifti", *files))
    np.testing.assert_array_equal(np.stack(mask.frames), np.stack(SERIES_SLICES) > 100)
    np.testing.assert_allclose(mask.affine, reader.decode(files).affine, atol=1e-5)  # on the DICOM's own voxels
    at_one = read_nifti(post(echo, "/segment/nifti", *files, threshold=1))
    assert np.stack(at_one.frames).sum() == np.sum(np.stack(SERIES_SLICES) == 200)  # the threshold applies
    source = [("a.nii.gz", nifti(VOXELS, gz=True))]
    mask = read_nifti(post(echo, "/segment/nifti", *source))
    expected = np.stack([f / f.max() >= 0.5 for f in reader.decode(source).frames])
    np.testing.assert_array_equal(np.stack(mask.frames), expected)
    pictures = read_nifti(post(echo, "/segment/nifti", *[(f"{z}.png", encode(s)) for z, s in enumerate(SERIES_SLICES)]))
    np.testing.assert_array_equal(np.stack(pictures.frames), np.stack(SERIES_SLICES) > 100)
    assert pictures.pixel_spacing_mm == (1.0, 1.0)  # no geometry: 1 mm


def nifti_grids() -> dict[str, nib.Nifti1Image]:
    """One volume on an RAS grid, the same reoriented to LPS, and on an oblique grid (tilted 30 degrees, its axes
    running S, A, R): 900 in every slice along every axis, so that the echo's mask is the voxels >= 450 whichever way
    metaseg reads the slices."""
    data = np.random.default_rng(4).integers(0, 900, (6, 5, 4)).astype(np.int16)
    data[np.arange(6), np.arange(6) % 5, np.arange(6) % 4] = 900
    ras = nib.Nifti1Image(data, np.diag([0.5, 0.6, 2.0, 1.0]))
    cos, sin = np.cos(np.radians(30)), np.sin(np.radians(30))
    oblique = np.array([[-0.5 * sin, 0, 2 * cos, 1], [0, 0.6, 0, 2], [0.5 * cos, 0, 2 * sin, 3], [0, 0, 0, 1]])
    return {"ras": ras, "lps": ras.as_reoriented(nib.orientations.axcodes2ornt("LPS")),
            "oblique": nib.Nifti1Image(data, oblique)}


@pytest.mark.parametrize("grid", ["ras", "lps", "oblique"])
def test_nifti_mask_of_a_nifti_is_on_the_uploads_own_grid(echo, grid):
    """Its shape, voxel order and affine, as one file and as the three sequences' fields (FLAIR's grid): a mask that
    is stacked onto its input needs no reorientation."""
    upload = nifti_grids()[grid]
    flair_bytes = upload.to_bytes()
    t1 = nib.Nifti1Image(np.asarray(upload.dataobj) // 2, upload.affine).to_bytes()
    sequences = {"pre_contrast": ("t1.nii", t1), "flair": ("flair.nii", flair_bytes), "post_contrast": ("t1c.nii", t1)}
    for files in ([("file", ("a.nii", flair_bytes))], list(sequences.items())):
        response = echo.post("/segment/nifti", files=files)
        assert response.status_code == 200, response.text
        mask = nib.Nifti1Image.from_bytes(gzip.decompress(response.content))
        np.testing.assert_array_equal(np.asarray(mask.dataobj), np.asarray(upload.dataobj) >= 450)  # voxel for voxel
        np.testing.assert_array_equal(mask.affine, nib.Nifti1Image.from_bytes(flair_bytes).affine)


def read_npz(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    with np.load(io.BytesIO(response.content), allow_pickle=False) as archive:
        assert list(archive) == ["probability"]
        return archive["probability"]


def test_probabilities_are_the_engines_within_a_255th(client):
    files = series_files()
    probability = read_npz(post(client, "/segment/probabilities", *files))
    assert probability.dtype == np.uint8 and probability.shape == (3, 24, 32)
    engine = client.app.state.engine
    expected = np.stack(engine.probabilities(reader.decode(files).inputs))  # series order
    assert np.abs(probability / 255 - expected).max() <= 0.5 / 255 + 1e-6
    assert probability.std() > 0  # a real map, not a constant


def test_a_client_with_the_probabilities_finds_what_segment_reports(echo):
    """The recipe of POST /segment/probabilities: upload_masks of probability / 255 with the /info steps, then
    metaseg.inference.lesions.measure, gives /segment's masks and lesions."""
    files = series_files()
    probability = read_npz(post(echo, "/segment/probabilities", *files)) / 255
    volume = reader.decode(files)
    masks = upload_masks(list(probability), EchoEngine.inference_steps, volume.is_volume, volume.voxel_mm3)
    np.testing.assert_array_equal(masks, np.stack(reader.decode(
        [("m.nii.gz", post(echo, "/segment/nifti", *files).content)]).frames) > 0)
    report = post(echo, "/segment", *files).json()
    found = lesions.measure(masks, probability, volume.pixel_spacing_mm, volume.slice_thickness_mm)
    assert [(f.slices, f.voxels, f.volume_mm3) for f in found] == [
        (tuple(lesion["slices"]), lesion["voxels"], pytest.approx(lesion["volume_mm3"]))
        for lesion in report["lesions"]]


# --- DICOM SEG ------------------------------------------------------------------------------------------------


def read_seg(response) -> hd.seg.Segmentation:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/dicom"
    return hd.seg.segread(io.BytesIO(response.content))


def test_dicom_seg_references_every_slice_of_the_series(echo):
    files = series_files(order=(1, 2, 0))
    seg = read_seg(post(echo, "/segment/seg", *files))
    uids = [pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID for _, data in files]
    assert sorted(uid for _, _, uid in seg.get_source_image_uids()) == sorted(uids)
    assert seg.SegmentationType == "BINARY" and seg.number_of_frames == 3
    assert seg.StudyInstanceUID == STUDY and seg.FrameOfReferenceUID == FRAME_OF_REFERENCE
    description = seg.get_segment_description(1)  # the echo's bundle says nothing: a lesion, nothing more
    assert (description.segment_label, description.segmented_property_type.value) == ("lesion", "52988006")
    assert description.segmented_property_category.value == "49755003"
    by_z = {float(z): uid for z, uid in zip((1, 2, 0), uids)}
    pixels = seg.get_pixels_by_source_instance([by_z[z] for z in (0.0, 1.0, 2.0)], segment_numbers=[1])
    np.testing.assert_array_equal(pixels[..., 0].astype(bool), np.stack(SERIES_SLICES) > 100)
    position = {uid: pydicom.dcmread(io.BytesIO(data)).ImagePositionPatient for uid, (_, data) in zip(uids, files)}
    assert (seg.Rows, seg.Columns) == SERIES_SLICES[0].shape
    for group in seg.PerFrameFunctionalGroupsSequence:  # each frame in highdicom's order, where its source slice is
        uid = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert group.PlanePositionSequence[0].ImagePositionPatient == position[uid]


def test_dicom_seg_of_a_series_without_slice_thickness_uses_the_slice_spacing(echo):
    files = [(f"{z}.dcm", dcm(mr(s, z=2.5 * z, SliceThickness=None))) for z, s in enumerate(SERIES_SLICES)]
    seg = read_seg(post(echo, "/segment/seg", *files))
    assert float(seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness) == 2.5


def test_dicom_seg_says_what_the_shipped_weights_learnt(client):
    seg = read_seg(post(client, "/segment/seg", *series_files()))
    stated = json.loads((REPO / "bundles/attention_unet/configs/metadata.json").read_text())["segment_label"]
    description = seg.get_segment_description(1)
    assert description.segment_label == stated["label"] == "FLAIR abnormality (LGG-trained model)"
    assert (description.segmented_property_category.value, description.segmented_property_type.value) == (
        "49755003", "52988006")  # Morphologically Abnormal Structure, Lesion
    assert description.anatomic_regions[0].value == "12738006"  # brain
    assert description.SegmentDescription == stated["description"] and "LGG" in seg.ContentDescription
    buffer = io.BytesIO()
    seg.save_as(buffer)
    assert b"14799000" not in buffer.getvalue() and b"Neoplasm" not in buffer.getvalue()  # no metastasis coded


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian dicom3tools) is not installed")
def test_dicom_seg_passes_dciodvfy_without_errors(client, tmp_path):
    for name, files in (("series", series_files()), ("one", [("a.dcm", shipped("MR_small.dcm"))])):
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(post(client, "/segment/seg", *files).content)
        checked = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        lines = (checked.stdout + checked.stderr).splitlines()
        assert "Segmentation" in lines and not [line for line in lines if line.startswith("Error")], lines


def test_a_malformed_segment_label_stops_the_start(weights, tmp_path):
    bundle = Path(shutil.copytree(REPO / "bundles" / "attention_unet", tmp_path / "attention_unet",
                                  ignore=shutil.ignore_patterns("*.pt", "eval")))
    path = bundle / "configs" / "metadata.json"
    metadata = json.loads(path.read_text())
    metadata["segment_label"] = {"label": "x" * 65, "category": {}, "type": {}}
    path.write_text(json.dumps(metadata))
    with pytest.raises(UserError, match="attention_unet: configs/metadata.json segment_label is not usable"):
        with serving(settings_for(weights, bundle=str(bundle))):
            pass
    assert dicomseg.finding({}) == dicomseg.LESION  # a bundle that says nothing: a lesion


@pytest.mark.parametrize("name", ["MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_dicom_seg_of_shipped_files(client, name):
    seg = read_seg(post(client, "/segment/seg", ("a.dcm", shipped(name))))
    source = pydicom.dcmread(SHIPPED / name, stop_before_pixels=True)
    assert [uid for _, _, uid in seg.get_source_image_uids()] == [source.SOPInstanceUID]
    assert seg.number_of_frames == int(source.get("NumberOfFrames") or 1)


def test_dicom_seg_without_geometry_only_where_nothing_is_invented(echo):
    """One frame without position/orientation or frame of reference: a SEG aligned pixel for pixel, without plane
    positions. Several without them, or an MR image without the FrameOfReferenceUID its IOD requires: 422."""
    flat = mr(SLICE, ImagePositionPatient=None, ImageOrientationPatient=None, PatientBirthDate=None,
              StudyID=None, AccessionNumber=None)  # also missing type 2 attributes
    seg = read_seg(post(echo, "/segment/seg", ("a.dcm", dcm(flat))))
    assert "PlanePositionSequence" not in seg.PerFrameFunctionalGroupsSequence[0]
    np.testing.assert_array_equal(seg.get_pixels_by_source_instance([flat.SOPInstanceUID])[0, ..., 0], SLICE > 100)
    unpositioned = [(f"{z}.dcm", dcm(mr(s, ImagePositionPatient=None))) for z, s in enumerate(SERIES_SLICES)]
    refused = post(echo, "/segment/seg", *unpositioned)
    assert refused.status_code == 422 and "cannot build a DICOM SEG" in refused.json()["detail"]
    refused = post(echo, "/segment/seg", ("a.dcm", dcm(mr(SLICE, FrameOfReferenceUID=None))))
    assert refused.status_code == 422 and refused.json()["detail"].endswith(dicomseg.REFUSED)
    refused = post(echo, "/segment/seg", ("a.dcm", shipped("SC_rgb_rle_2frame.dcm")))  # two frames, no geometry
    assert refused.status_code == 422 and "cannot be told apart" in refused.json()["detail"]
    capture = post(echo, "/segment/seg", ("a.dcm", shipped("SC_rgb_jpeg_dcmtk.dcm")))  # no frame of reference
    assert capture.status_code == 200 and capture.headers["content-type"] == "application/dicom"
    seg = pydicom.dcmread(io.BytesIO(capture.content))  # highdicom's reader wants a SliceThickness it need not have
    source = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert source.ReferencedSOPInstanceUID == pydicom.dcmread(SHIPPED / "SC_rgb_jpeg_dcmtk.dcm").SOPInstanceUID
    assert (seg.Modality, seg.NumberOfFrames, "FrameOfReferenceUID" in seg) == ("SEG", 1, False)
    assert post(echo, "/segment", ("a.dcm", dcm(mr(SLICE, FrameOfReferenceUID=None)))).status_code == 200


# --- bad uploads: always a 4xx with a detail ------------------------------------------------------------------

PNG = encode(SLICE)
JPEG = encode(SLICE, "JPEG")
TIF = tiff(SLICE)
DCM = dcm(mr(SLICE))
NII = nifti(VOXELS)
RANDOM = np.random.default_rng(7).bytes(4000)


def png_declaring(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR (with a valid CRC) claims another size."""
    data = encode(np.zeros((1, 1), np.uint8))
    ihdr = struct.pack(">II", width, height) + data[24:29]
    return data[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + data[33:]


def dicom_with(**attrs) -> bytes:
    return dcm(mr(SLICE, **attrs))


def with_syntax(syntax: str) -> bytes:
    ds = mr(SLICE)
    ds.file_meta.TransferSyntaxUID = syntax
    return dcm(ds, implicit_vr=False, little_endian=True)


def corrupt_rle() -> bytes:
    ds = pydicom.dcmread(SHIPPED / "MR_small_RLE.dcm")
    ds.PixelData = encapsulate([RANDOM])
    return dcm(ds)


def one(data: bytes, name="scan"):
    return lambda c: post(c, "/segment", (name, data))


def raw(content: bytes, content_type: str | None, **headers):
    if content_type:
        headers["content-type"] = content_type
    return lambda c: c.post("/segment", content=content, headers=headers)


MULTIPART = "multipart/form-data; boundary=xyz"
PART = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n' + PNG

BAD_UPLOADS = [  # id, request, expected status
    ("no-body", lambda c: c.post("/segment"), 415),
    ("json-body", lambda c: c.post("/segment", json={"file": "a.png"}), 415),
    ("text-body", raw(b"hello", "text/plain"), 415),
    ("urlencoded-form", lambda c: c.post("/segment", data={"file": "abc"}), 415),
    ("multipart-without-boundary", raw(PART, "multipart/form-data"), 400),
    ("multipart-garbage", raw(RANDOM, MULTIPART), 400),
    ("multipart-truncated", raw(PART, MULTIPART), 400),
    ("field-not-named-file", lambda c: c.post("/segment", files={"image": ("a.png", PNG)}), 422),
    ("only-other-fields", lambda c: c.post("/segment", data={"note": "x"}, files={"other": ("a", PNG)}), 422),
    ("empty-file", one(b""), 400),
    ("random-bytes", one(RANDOM), 415),
    ("text-file", one(b"patient list\nline 2\n" * 20), 415),
    ("json-file", one(b'{"image": [1, 2, 3]}'), 415),
    ("png-truncated", one(PNG[: len(PNG) // 2]), 400),
    ("png-signature-only", one(PNG[:8]), 400),
    ("png-corrupt-data", one(PNG[:60] + bytes(40) + PNG[100:]), 400),
    ("png-zero-sized", one(png_declaring(0, 10)), 400),
    ("png-decompression-bomb", one(png_declaring(100_000, 100_000)), 413),
    ("png-over-max-pixels", one(png_declaring(5000, 5000)), 413),
    ("jpeg-truncated", one(JPEG[:300]), 400),
    ("jpeg-soi-only", one(b"\xff\xd8\xff"), 400),
    ("tiff-header-only", one(b"II*\x00\x08\x00\x00\x00"), 400),
    ("tiff-truncated", one(TIF[: len(TIF) // 2]), 400),
    ("dicom-preamble-only", one(bytes(128) + b"DICM"), 400),
    ("dicom-truncated", one(DCM[:-300]), 400),
    ("dicom-shipped-truncated", one(shipped("MR_truncated.dcm")), 400),
    ("dicom-no-pixel-data", one(dicom_with(PixelData=None)), 400),
    ("dicom-unknown-transfer-syntax", one(with_syntax("1.2.3.4")), 415),
    ("dicom-12-bit-jpeg", one(shipped("JPEG-lossy.dcm")), 400),
    ("dicom-corrupt-rle", one(corrupt_rle()), 400),
    ("dicom-zero-rows", one(dicom_with(Rows=0)), 400),
    ("dicom-too-many-frames", one(dicom_with(NumberOfFrames=100_000)), 413),
    ("gzip-not-nifti", one(gzip.compress(b"hello" * 100)), 415),
    ("gzip-corrupt", one(b"\x1f\x8b" + RANDOM), 400),
    ("nifti-truncated", one(NII[:400]), 400),
    ("nifti-4d", one(nifti(np.zeros((4, 4, 2, 3), np.int16))), 400),
    ("two-nifti-files", lambda c: post(c, "/segment", ("a.nii", NII), ("b.nii", NII)), 400),
    ("mixed-kinds", lambda c: post(c, "/segment", ("a.png", PNG), ("b.dcm", DCM)), 400),
    ("series-sizes-differ", lambda c: post(c, "/segment", ("a.dcm", DCM), ("b.dcm", dcm(mr(SLICE[:8])))), 400),
    ("body-over-limit", one(bytes(128) + b"DICM" + bytes(3 * MiB)), 413),
    ("content-length-understated", lambda c: c.post("/segment", files={"file": ("a", bytes(3 * MiB))},
                                                     headers={"content-length": "300"}), 413),
    ("content-length-over-limit", raw(PART, MULTIPART, **{"content-length": str(10**9)}), 413),
    ("threshold-above-1", lambda c: post(c, "/segment", ("a.png", PNG), threshold=1.5), 422),
    ("threshold-negative", lambda c: post(c, "/segment", ("a.png", PNG), threshold=-0.1), 422),
    ("threshold-nan", lambda c: post(c, "/segment", ("a.png", PNG), threshold="nan"), 422),
    ("threshold-not-a-number", lambda c: post(c, "/segment", ("a.png", PNG), threshold="high"), 422),
    ("slice-past-the-end", lambda c: post(c, "/segment/mask", ("a.png", PNG), slice=1), 422),
    ("slice-negative", lambda c: post(c, "/segment/overlay", ("a.png", PNG), slice=-1), 422),
    ("series-slice-past-the-end", lambda c: post(c, "/segment/overlay", *series_files(), slice=3), 422),
    ("seg-of-a-png", lambda c: post(c, "/segment/seg", ("a.png", PNG)), 415),
    ("nifti-of-random-bytes", lambda c: post(c, "/segment/nifti", ("a.nii", RANDOM)), 415),
    ("nifti-threshold-above-1", lambda c: post(c, "/segment/nifti", ("a.png", PNG), threshold=2), 422),
    ("probabilities-of-a-truncated-png",
     lambda c: post(c, "/segment/probabilities", ("a.png", PNG[: len(PNG) // 2])), 400),
    ("probabilities-without-file", lambda c: c.post("/segment/probabilities", files={"image": ("a.png", PNG)}), 422),
]


@pytest.mark.parametrize(("send", "status"), [b[1:] for b in BAD_UPLOADS], ids=[b[0] for b in BAD_UPLOADS])
def test_bad_upload_is_a_4xx_with_a_detail(client, send, status):
    response = send(client)
    assert response.status_code == status, response.text
    assert response.json()["detail"]


def test_every_format_the_decoder_reads_has_malformed_uploads():
    formats = {kind for _, kind in detect.MAGIC} | {"dicom", "nifti", "gzip"}
    assert formats <= {case[0].split("-")[0] for case in BAD_UPLOADS}


def test_upload_limit_is_checked_while_the_body_arrives():
    """No Content-Length, a 64 KiB chunk at a time: refused after the limit's worth, not after all 6 MiB."""
    chunks = [PART[: 64 * 1024]] + [bytes(64 * 1024)] * 95
    received = []

    async def receive():
        received.append(chunks[len(received)])
        return {"type": "http.request", "body": received[-1], "more_body": len(received) < len(chunks)}

    scope = {"type": "http", "method": "POST", "path": "/segment", "headers": [(b"content-type", MULTIPART.encode())]}
    with pytest.raises(HTTPException) as refused:
        asyncio.run(read_files(Request(scope, receive), Settings(max_upload_bytes=256 * 1024), lambda n: None))
    assert refused.value.status_code == 413 and len(received) == 5


def test_uploads_never_touch_the_disk(echo, monkeypatch):
    """A 1.5 MiB upload (Starlette's form parser would spool it to a temporary file) with every temporary file,
    and every file opened for writing, forbidden."""

    def forbidden(*args, **kwargs):
        raise AssertionError("an upload was written to disk")

    def read_only_open(file, mode="r", *args, **kwargs):
        if set(mode) & set("wax+"):
            forbidden()
        return real_open(file, mode, *args, **kwargs)

    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", read_only_open)
    monkeypatch.setattr(starlette.formparsers, "SpooledTemporaryFile", forbidden)
    for name in ("mkstemp", "TemporaryFile", "NamedTemporaryFile", "SpooledTemporaryFile"):
        monkeypatch.setattr(tempfile, name, forbidden)
    big = blobs((900, 860), dtype=np.uint16)
    assert post(echo, "/segment", ("big.dcm", dcm(mr(big)))).json()["image_size"] == {"rows": 900, "cols": 860}


# --- the service ----------------------------------------------------------------------------------------------


def test_openapi_lists_every_endpoint_with_its_models(client):
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    segment_routes = ("/segment", "/segment/mask", "/segment/overlay", "/segment/seg", "/segment/nifti",
                      "/segment/probabilities")
    assert {path: set(ops) for path, ops in paths.items()} == {
        "/health": {"get"}, "/info": {"get"}, **{path: {"post"} for path in segment_routes}}
    components = schema["components"]["schemas"]
    assert set(components) >= {"Health", "ModelInfo", "SegmentationReport", "Lesion3D", "SliceComponent"}
    for path in segment_routes:
        body = paths[path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert body["anyOf"] == [{"required": ["file"]}, {"required": ["flair"]}]  # or the sequence fields
        assert set(body["properties"]) == {"file", "pre_contrast", "flair", "post_contrast"}
        assert {"400", "413", "415", "422", "503"} <= set(paths[path]["post"]["responses"])
    for path, media_type in (("/segment/mask", "image/png"), ("/segment/seg", "application/dicom"),
                             ("/segment/nifti", "application/gzip"),
                             ("/segment/probabilities", "application/octet-stream")):
        assert media_type in paths[path]["post"]["responses"]["200"]["content"], path
    assert "threshold" not in {p["name"] for p in paths["/segment/probabilities"]["post"].get("parameters", [])}
    report = components["SegmentationReport"]["properties"]
    assert {"volume", "lesions", "lesion_count", "slice_components", "volume_ml", "volume_steps",
            "sequences_given"} <= set(report)
    assert all(field.get("description") for name, field in components["Lesion3D"]["properties"].items()
               if name not in ("first_slice", "last_slice", "centroid"))
    assert {"one_lesion_per_patient", "one_channel_dice_loss"} <= set(components["ModelInfo"]["properties"])
    assert {p["name"] for p in paths["/segment/mask"]["post"]["parameters"]} == {"threshold", "slice"}
    assert client.get("/docs").status_code == 200


def test_health_and_info_without_a_recorded_report(client):
    version = json.loads((REPO / "bundles/attention_unet/configs/metadata.json").read_text())["version"]
    assert client.get("/health").json() == {"status": "ok", "model": "attention_unet", "version": version,
                                             "busy": 0, "capacity": 66}
    info = client.get("/info").json()
    assert (info["model"], info["architecture"], info["test_metrics"]) == ("attention_unet", "AttentionUnet", None)
    assert (info["one_lesion_per_patient"], info["one_channel_dice_loss"]) == (False, None)
    assert info["input"]["channels"] == 3 and info["input"]["channel_def"]["1"] == "FLAIR"
    assert "copied into all three" in info["input"]["channel_rule"]
    assert info["input"]["spatial_size"] == 32 and "DICOM" in info["input"]["formats"]
    assert info["input"]["limits"]["max_upload_bytes"] == 2 * MiB
    shipped = json.loads((REPO / "bundles" / "attention_unet" / "configs" / "inference.json").read_text())
    assert info["inference_steps"] == {k: v for k, v in shipped["inference_steps"].items() if k != "_desc_"}


def test_best_model_record_is_the_default_and_its_report_gives_test_metrics(weights, tmp_path):
    record = tmp_path / "best.json"
    record.write_text(json.dumps({"bundle": "attention_unet", "weights": str(weights),
                                  "overrides": {"spatial_size": 32}, "report": "reports/comparison.md"}))
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "comparison.json").write_text(json.dumps(
        {"split": "test", "models": {"attention_unet": {"mean": {"dice_3d": 0.81, "hd95_px": None}}}}))
    with serving(Settings(best_record=record)) as c:
        info = c.get("/info").json()
    assert (info["model"], info["input"]["spatial_size"], info["test_metrics"]) == ("attention_unet", 32,
                                                                                   {"dice_3d": 0.81})
    assert info["one_channel_dice_loss"] is None  # a comparison does not measure it


def test_the_cross_validation_report_says_what_one_channel_costs(weights, tmp_path):
    """cv.json's one_channel_loss of the served bundle; a report without it, or with another bundle's only, null."""
    record = tmp_path / "best.json"
    record.write_text(json.dumps({"bundle": "attention_unet", "weights": str(weights),
                                  "overrides": {"spatial_size": 32}, "report": "cv.md"}))
    cv = {"complete": True, "models": {"attention_unet": {"mean": {"dice_3d": 0.74}}},
          "one_channel_loss": {"attention_unet": {"metric": "dice_3d", "mean_difference": 0.116}}}
    answers = []
    for report in (cv, {**cv, "one_channel_loss": {"unetpp": {"mean_difference": 0.1}}},
                   {**cv, "one_channel_loss": {"attention_unet": {"mean_difference": "NaN"}}},
                   {key: value for key, value in cv.items() if key != "one_channel_loss"}):
        (tmp_path / "cv.json").write_text(json.dumps(report))
        with serving(Settings(best_record=record)) as c:
            info = c.get("/info").json()
        answers.append((info["test_metrics"], info["one_channel_dice_loss"]))
    assert answers == [({"dice_3d": 0.74}, 0.116)] + [({"dice_3d": 0.74}, None)] * 3


def test_missing_best_model_record_is_a_clear_startup_error(tmp_path, capsys, monkeypatch):
    with pytest.raises(UserError, match=r"run `metaseg compare` or pass --bundle"):
        with serving(Settings(best_record=tmp_path / "best.json")):
            pass
    monkeypatch.setenv("METASEG_BEST_RECORD", "restored after the test")  # `metaseg serve` exports its choice
    assert main(["serve", "--best", str(tmp_path / "best.json")]) == 2
    assert "run `metaseg compare` or pass --bundle" in capsys.readouterr().err


def test_logs_hold_no_patient_data(echo, caplog):
    caplog.set_level(logging.DEBUG)
    doe = dcm(mr(SLICE, PatientName="Doe^Jane", PatientID="DOE-4711", InstitutionName="Doe Clinic"))
    assert post(echo, "/segment", ("Doe_Jane.dcm", doe)).status_code == 200
    assert post(echo, "/segment/seg", ("Doe_Jane.dcm", doe)).status_code == 200
    assert post(echo, "/segment", ("Doe_Jane.dcm", doe[:-300])).status_code == 400
    assert "segment: dicom, 1 file(s)" in caplog.text  # the request was logged: sizes and kinds only
    assert "Doe" not in caplog.text and "DOE" not in caplog.text
    assert pydicom.dcmread(io.BytesIO(doe)).SOPInstanceUID not in caplog.text  # highdicom logs UIDs at INFO


# --- importing and starting the server ------------------------------------------------------------------------

# Run in a fresh interpreter. MONAI sets CUBLAS_WORKSPACE_CONFIG and LD_LIBRARY_PATH on its own import, so it is
# imported before the snapshot: what is measured is what metaseg's server modules do.
IMPORT_SERVE_MAIN = """
import json, os
import monai
import serve.allocator as allocator
from fastapi import FastAPI
calls = []
allocator.tune_malloc = allocator.tune_server_process = lambda: calls.append("malloc") or {}
before = dict(os.environ)
import serve.config, serve.main
changed = sorted(key for key in before.keys() | os.environ.keys() if before.get(key) != os.environ.get(key))
apps = [name for name, value in vars(serve.main).items() if isinstance(value, FastAPI)]
print(json.dumps({"changed": changed, "malloc": calls, "apps": apps,
                  "settings_read": serve.config.get_settings.cache_info().currsize}))
"""


def test_importing_the_server_changes_nothing_in_the_process():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", IMPORT_SERVE_MAIN], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == {"changed": [], "malloc": [], "apps": [], "settings_read": 0}


# --- a real server ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def uvicorn_server(weights: Path, **settings: str):
    """A real `uvicorn --factory serve.main:create_app` on a free loopback port, with METASEG_* `settings`; yields
    its URL."""
    port = free_port()
    env = {**os.environ, "METASEG_BUNDLE": "attention_unet", "METASEG_WEIGHTS": str(weights),
           "METASEG_SPATIAL_SIZE": "32", **{f"METASEG_{key.upper()}": value for key, value in settings.items()}}
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "serve.main:create_app", "--host", "127.0.0.1", "--port",
         str(port), "--log-level", "warning"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # loading torch and the model on a busy 2-core machine
        while True:
            assert server.poll() is None, server.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "server did not start"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.25)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        server.stdout.close()
    assert server.returncode in (0, -signal.SIGTERM)  # stopped by our SIGTERM in time: neither crashed nor killed
