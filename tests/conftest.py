"""Shared fixtures: tiny data sets written in the test, and the real development set when it is there."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import tifffile
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from metaseg.conventions import FLAIR_CHANNEL

REPO = Path(__file__).resolve().parents[1]
LGG = REPO.parent / "shared" / "data" / "lgg" / "Data"


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def metaseg(*args) -> CliResult:
    """`metaseg ARGS` run in this process (its `main`), with what it prints captured."""
    from metaseg.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exit_:  # argparse's --help
            code = exit_.code
    return CliResult(code, out.getvalue(), err.getvalue())


def assert_user_error(result: CliResult, fragment: str) -> None:
    """Exit 2 and one readable line naming the mistake, never a traceback."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metaseg: error:"), result.stderr
    assert fragment in lines[0] and "Traceback" not in result.stderr


def write_pair(folder: Path, patient: str, n: int, lesion: bool = False, compress: bool = False) -> None:
    """One slice in the Data.zip layout: a 32x32x3 image and its 0/255 mask."""
    rng = np.random.default_rng(hash((patient, n)) % 2**32)
    image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    if lesion:
        mask[10:14, 20:25] = 255
    (folder / patient).mkdir(parents=True, exist_ok=True)
    kwargs = {"compression": "zlib", "predictor": True} if compress else {}
    tifffile.imwrite(folder / patient / f"{patient}_{n}.tif", image, photometric="rgb", **kwargs)
    tifffile.imwrite(folder / patient / f"{patient}_{n}_mask.tif", mask, **kwargs)


def flair(frame: np.ndarray) -> np.ndarray:
    """What a stand-in engine looks at: a one-channel frame as it is, of three sequences (3, rows, cols) the FLAIR."""
    return frame[FLAIR_CHANNEL] if frame.ndim == 3 else frame


# A fixed 1x1-conv network for the bundles' three input channels: lesion where the normalised FLAIR (channel 1) > 0.5,
# the other sequences ignored; so masks can be checked exactly, with no training.
THRESHOLD_NET = {"_target_": "torch.nn.Conv2d", "in_channels": 3, "out_channels": 2, "kernel_size": 1}
# no inference steps beyond the plain threshold: tests that check the pipeline itself, whatever cv chose for a bundle
PLAIN_STEPS = {"flip_tta": False, "threshold": 0.5, "min_lesion_voxels": 0, "min_lesion_mm3": 0, "min_lesion_score": 0,
               "largest_component": False}


def threshold_weights(path: Path) -> Path:
    """THRESHOLD_NET's state dict, written to `path`: logits (-FLAIR, FLAIR - 1)."""
    weight = torch.zeros(2, 3, 1, 1)
    weight[:, 1] = torch.tensor([-1.0, 1.0]).view(2, 1, 1)
    torch.save({"weight": weight, "bias": torch.tensor([0.0, -1.0])}, path)
    return path


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    """10 patients x 3 slices under an extra `Data/` folder; every patient has one lesion slice."""
    root = tmp_path / "Data"
    for i in range(10):
        for n in (1, 2, 10):
            write_pair(root, f"P{i:02d}", n, lesion=(n == 2), compress=bool(i % 2))
    return root


@pytest.fixture(scope="session")
def lgg() -> Path:
    if not LGG.is_dir():
        pytest.skip(f"real development set not found at {LGG}")
    return LGG


def blob_image(shape, top_left, size=(8, 6)) -> np.ndarray:
    image = np.full(shape, 20, np.uint16)
    image[top_left[0]:top_left[0] + size[0], top_left[1]:top_left[1] + size[1]] = 200
    return image


def write_dicom(path: Path, pixels: np.ndarray) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = MRImageStorage, meta.MediaStorageSOPInstanceUID, "MR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture
def geometry_inputs(tmp_path) -> dict[str, tuple[Path, np.ndarray]]:
    """Non-square inputs with a bright blob off-centre, as PNG, 3-channel TIFF (blob in FLAIR) and DICOM."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    png = blob_image((80, 60), (10, 40))
    PIL.Image.fromarray(png.astype(np.uint8)).save(folder / "gray.png")
    tif = np.zeros((70, 90, 3), np.uint8) + 20
    tif[..., 1] = blob_image((70, 90), (50, 5)).astype(np.uint8)
    tifffile.imwrite(folder / "slice.tif", tif, photometric="rgb")
    dcm = blob_image((64, 96), (5, 70)) * 10
    write_dicom(folder / "mr.dcm", dcm)
    return {"gray": (folder / "gray.png", png), "slice": (folder / "slice.tif", tif[..., 1]), "mr": (folder / "mr.dcm", dcm)}
