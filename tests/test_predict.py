"""`metaseg predict`: one 0/255 mask per slice, mirroring the input, bad files skipped and reported."""

from __future__ import annotations

import zipfile

import numpy as np
import PIL.Image
import pydicom
import pytest

from conftest import (PLAIN_STEPS, REPO, THRESHOLD_NET, assert_user_error, metaseg, threshold_weights, write_dicom,
                      write_pair)
from metaseg.inference.engine import Engine
from metaseg.errors import UserError
from metaseg.inference.predict import predict


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    """The attention_unet bundle's pipeline around a 1x1-conv 'lesion where normalised FLAIR > 0.5' net."""
    weights = threshold_weights(tmp_path_factory.mktemp("net") / "model.pt")
    return Engine(REPO / "bundles" / "attention_unet", weights,
                  overrides={"spatial_size": 32, "network_def": THRESHOLD_NET, "inference_steps": PLAIN_STEPS})


def test_data_layout_zip_gives_one_mask_per_slice_in_patient_folders(engine, tiny_data, tmp_path):
    archive = tmp_path / "Data.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(tiny_data.rglob("*.tif")):
            zf.write(path, f"Data/{path.relative_to(tiny_data).as_posix()}")
    report = predict(archive, tmp_path / "out", engine)
    masks = sorted((tmp_path / "out").rglob("*_seg.png"))
    assert len(masks) == len(report.written) == 30 and not report.skipped
    assert (tmp_path / "out" / "P03" / "P03_10_seg.png").is_file()
    assert np.asarray(PIL.Image.open(masks[0])).shape == (32, 32)


def test_loose_images_multiframe_and_bad_files(engine, tmp_path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    image = np.full((50, 70), 10, np.uint8)
    image[5:15, 50:60] = 250  # a bright blob near the top right
    PIL.Image.fromarray(image).save(folder / "sub" / "scan.png")
    write_dicom(folder / "mr.dcm", image.astype(np.uint16))
    frames = pydicom.dcmread(folder / "mr.dcm")
    frames.NumberOfFrames, frames.PixelData = 2, image.astype(np.uint16).tobytes() * 2
    frames.save_as(folder / "multi.dcm")
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    report = predict(folder, tmp_path / "out", engine)
    assert sorted(report.skipped) == ["broken.png", "notes.txt"]
    written = sorted(p.relative_to(tmp_path / "out").as_posix() for p in report.written)
    assert written == ["mr_seg.png", "multi_0_seg.png", "multi_1_seg.png", "sub/scan_seg.png"]
    for path in report.written:  # each mask at its input's size, blob where it was
        mask = np.asarray(PIL.Image.open(path))
        assert mask.shape == (50, 70) and mask[10, 55] == 255 and mask[40, 10] == 0


def test_zip_members_that_point_outside_out_are_skipped(engine, tmp_path):
    """Absolute and `..` member names (a zip may hold any) are reported, and nothing lands outside --out."""
    picture = tmp_path / "scan.png"
    PIL.Image.fromarray(np.full((20, 20), 100, np.uint8)).save(picture)
    archive = tmp_path / "evil.zip"
    outside = tmp_path / "outside"
    hostile = [str(outside / "abs.png"), "../escape.png", "x/../../escape2.png", "Data/../../P1/P1_1.png"]
    with zipfile.ZipFile(archive, "w") as zf:
        for name in [*hostile, "ok/fine.png"]:
            zf.writestr(zipfile.ZipInfo(name), picture.read_bytes())
    out = tmp_path / "a" / "out"
    report = predict(archive, out, engine)
    assert sorted(report.skipped) == sorted(hostile)
    assert all("outside --out" in why for why in report.skipped.values())
    assert [p.relative_to(out).as_posix() for p in report.written] == ["ok/fine_seg.png"]
    written = {p for p in tmp_path.rglob("*_seg.png")}
    assert written == {out / "ok" / "fine_seg.png"} and not outside.exists()


def test_only_the_named_images_are_segmented(engine, tiny_data, tmp_path):
    """`metaseg evaluate` segments a split's slices alone; a name the source lacks is one line, nothing written."""
    only = ["P03/P03_10.tif", "P03/P03_2.tif", "P07/P07_1.tif"]
    report = predict(tiny_data, tmp_path / "out", engine, only=only)
    written = sorted(p.relative_to(tmp_path / "out").as_posix() for p in report.written)
    assert written == ["P03/P03_10_seg.png", "P03/P03_2_seg.png", "P07/P07_1_seg.png"] and not report.skipped
    with pytest.raises(UserError, match="1 of the 2 images to segment are not in .*trained on"):
        predict(tiny_data, tmp_path / "other", engine, only=["P03/P03_1.tif", "P99/P99_1.tif"])
    assert not (tmp_path / "other").exists()


def test_nothing_to_segment_is_a_user_error(engine, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        predict(tmp_path / "empty", tmp_path / "out", engine)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("x")
    with pytest.raises(UserError, match="could be segmented"):
        predict(tmp_path / "junk", tmp_path / "out", engine)


def test_cli_errors_are_one_line(tmp_path):
    write_pair(tmp_path / "Data", "P1", 1)
    for args, fragment in (
        (["predict", tmp_path / "missing", "--out", tmp_path / "o", "--bundle", "attention_unet", "--weights", tmp_path / "w.pt"], "no trained weights"),
        (["predict", tmp_path / "Data", "--out", tmp_path / "o", "--best", tmp_path / "none.json"], "no best-model record"),
        (["predict", tmp_path / "Data", "--out", tmp_path / "o", "--threshold", "2"], "must be in"),
    ):
        assert_user_error(metaseg(*args), fragment)
