"""Data discovery in the Data.zip layout: pairing, ignored files, zip vs folder, orientation."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import tifffile
from monai.data import PILReader
from monai.transforms import LoadImage

from conftest import write_pair
from metaseg.data.discovery import discover
from metaseg.errors import UserError


def zip_folder(folder: Path, out: Path, prefix: str = "Data") -> Path:
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, f"{prefix}/{path.relative_to(folder).as_posix()}" if prefix else path.relative_to(folder))
    return out


def test_pairs_sorted_numerically_and_relative(tiny_data):
    found = discover(tiny_data)
    assert len(found.pairs) == 30 and len(found.patients) == 10
    assert [p.slice for p in found.pairs if p.patient == "P00"] == [1, 2, 10]  # 10 after 2, not after 1
    first = found.pairs[0]
    assert first.image == "P00/P00_1.tif" and first.label == "P00/P00_1_mask.tif"
    assert [p.lesion_pixels > 0 for p in found.pairs[:3]] == [False, True, False]


def test_unpaired_files_are_ignored_and_counted(tiny_data):
    (tiny_data / "P00" / "P00_2_mask.tif").unlink()  # image without mask
    (tiny_data / "P01" / "P01_1.tif").unlink()  # mask without image
    (tiny_data / "P02" / "notes.txt").write_text("not an image")
    found = discover(tiny_data)
    assert len(found.pairs) == 28
    assert found.ignored["image_without_mask"] == ["P00/P00_2.tif"]
    assert found.ignored["mask_without_image"] == ["P01/P01_1_mask.tif"]


def test_corrupt_and_misshaped_files_are_skipped_with_a_named_warning(tiny_data, caplog):
    (tiny_data / "P03" / "P03_1.tif").write_bytes(b"II*\x00garbage")
    tifffile.imwrite(tiny_data / "P04" / "P04_1_mask.tif", np.zeros((16, 16), np.uint8))
    tifffile.imwrite(tiny_data / "P05" / "P05_1.tif", np.zeros((32, 32), np.uint8))  # one channel, not three
    found = discover(tiny_data)
    assert len(found.pairs) == 27
    unreadable = " ".join(found.ignored["unreadable"])
    for name in ("P03_1.tif", "P04_1.tif", "P05_1.tif"):
        assert name in unreadable and name in caplog.text


@pytest.mark.parametrize("prefix", ["Data", "", "outer/Data"])
def test_zip_gives_the_same_pairs_as_the_folder(tiny_data, tmp_path, prefix):
    archive = zip_folder(tiny_data, tmp_path / "Data.zip", prefix)
    assert discover(archive).pairs == discover(tiny_data).pairs


def test_bad_sources_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        discover(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no image/mask pairs"):
        discover(tmp_path / "empty")
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UserError):
        discover(tmp_path / "bad.zip")
    with zipfile.ZipFile(tmp_path / "nopairs.zip", "w") as zf:
        zf.writestr("Data/readme.txt", "nothing here")
    with pytest.raises(UserError, match="no image/mask pairs"):
        discover(tmp_path / "nopairs.zip")


def test_patient_folders_under_two_parents_is_an_error(tmp_path):
    write_pair(tmp_path / "a", "P1", 1)
    write_pair(tmp_path / "b", "P2", 1)
    with pytest.raises(UserError, match="more than one parent"):
        discover(tmp_path)


def test_real_development_set_has_77_patients_and_2667_pairs(lgg):
    """../shared/README.md: 77 patients and 2,667 pairs since 2026-12-07 (44 and 1,458 before)."""
    found = discover(lgg)
    assert len(found.patients) == 77 and len(found.pairs) == 2667
    assert not any(found.ignored.values())


def test_real_development_set_as_zip_matches_folder(lgg, tmp_path):
    subset = tmp_path / "Data"
    for patient in sorted(p.name for p in lgg.iterdir())[:3]:  # both TIFF encodings: 4941 is uncompressed
        shutil.copytree(lgg / patient, subset / patient)
    assert any("4941" in p for p in (q.name for q in subset.iterdir()))
    assert discover(zip_folder(subset, tmp_path / "Data.zip")).pairs == discover(subset).pairs


def test_orientation_round_trip_pil_tifffile_numpy_monai(tmp_path):
    """A pattern with a bright top-left corner: MONAI's PIL reader transposes unless reverse_indexing=False."""
    pattern = np.zeros((40, 30, 3), np.uint8)
    pattern[:5, :3, 1] = 255  # rows 0-4, cols 0-2 of the FLAIR channel
    path = tmp_path / "p.tif"
    tifffile.imwrite(path, pattern, photometric="rgb", compression="zlib", predictor=True)
    assert np.array_equal(np.asarray(PIL.Image.open(path)), pattern)
    assert np.array_equal(tifffile.imread(path), pattern)
    default = np.asarray(LoadImage(reader="PILReader", ensure_channel_first=True)(path))
    assert default.shape == (3, 30, 40) and np.array_equal(default[1], pattern[..., 1].T)  # the pitfall
    numpy_order = np.asarray(LoadImage(reader=PILReader(reverse_indexing=False), ensure_channel_first=True)(path))
    assert numpy_order.shape == (3, 40, 30) and np.array_equal(numpy_order[1], pattern[..., 1])
