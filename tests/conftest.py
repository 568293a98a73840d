"""Shared fixtures: tiny data sets written in the test, and the real development set when it is there."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

REPO = Path(__file__).resolve().parents[1]
LGG = REPO.parent / "shared" / "data" / "lgg" / "Data"


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
