"""A bundle's chosen inference steps (`inference_steps` in configs/inference.json) give the same masks through plain
MONAI (`monai.bundle run`, and in memory as MONAI Deploy runs a bundle), `metaseg predict` and the server; a volume
gets the component steps, a single slice does not.

Models: the attention_unet bundle copied into a temp folder with its steps set there, around seeded random weights
(the real network, where flip TTA and the threshold must act as configured) or around a 1x1 convolution that marks
bright pixels (lesion where the normalised FLAIR > 1), where exact masks of hand-made volumes matter.
"""

from __future__ import annotations

import io
import json
import zipfile
from contextlib import contextmanager
from pathlib import Path

import highdicom as hd
import numpy as np
import PIL.Image
import pydicom
import pytest
import tifffile
import torch
from fastapi.testclient import TestClient

from conftest import write_dicom
from metaseg.inference.engine import Engine
from metaseg.errors import UserError
from metaseg.imageio.reader import decode
from metaseg.inference.steps import upload_masks
from metaseg.inference.predict import predict
from serve.config import Settings
from serve.main import create_app
from test_bundles import blocker, copy_bundle, monai_bundle, ok  # noqa: F401 (blocker: a fixture)
from test_deploy import deploy
from test_engine import random_weights
from test_serve import dcm, mr

CHOSEN = {"flip_tta": True, "threshold": 0.4, "min_lesion_voxels": 0, "min_lesion_mm3": 0, "min_lesion_score": 0,
          "largest_component": False}
DEFAULT = {"flip_tta": False, "threshold": 0.5, "min_lesion_voxels": 0, "min_lesion_mm3": 0, "min_lesion_score": 0,
           "largest_component": False}
BRIGHT_NET = {"_target_": "torch.nn.Conv2d", "in_channels": 3, "out_channels": 2, "kernel_size": 1}


def bundle_with(folder: Path, steps: dict, network_def: dict | None = None) -> Path:
    """attention_unet copied to `folder` with these inference steps at spatial_size 32, and weights: seeded random
    ones of its own network, or those of BRIGHT_NET when that is the network_def."""
    bundle = copy_bundle("attention_unet", folder)
    path = bundle / "configs" / "inference.json"
    config = json.loads(path.read_text())
    config["inference_steps"] = {"_desc_": config["inference_steps"]["_desc_"], **steps}
    config["one_lesion_per_patient"] = steps["largest_component"]  # a bundle may keep one lesion only if it declares it
    config["spatial_size"] = 32
    config["other_folds"]["checkpoints"] = []  # one model.pt, not a fold ensemble: for MONAI, predict and the server
    if network_def is None:
        random_weights("attention_unet", bundle / "models")
    else:
        config["network_def"] = network_def
        weight = torch.zeros(2, 3, 1, 1)
        weight[1, 1] = 1.0  # lesion logit = FLAIR - 1, background 0
        torch.save({"weight": weight, "bias": torch.tensor([0.0, -1.0])}, bundle / "models" / "model.pt")
    path.write_text(json.dumps(config, indent=4))
    return bundle


@contextmanager
def serving(bundle: Path):
    settings = Settings(bundle=str(bundle), weights=bundle / "models" / "model.pt", max_upload_bytes=2**21)
    with TestClient(create_app(settings)) as client:
        yield client


def png(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(PIL.Image.open(io.BytesIO(response.content)))


def upload(path: Path) -> list[tuple[str, tuple[str, bytes]]]:
    return [("file", (path.name, path.read_bytes()))]


def test_one_slice_gets_the_same_mask_from_monai_bundle_run_predict_and_the_server(blocker, tmp_path):  # noqa: F811
    bundle = bundle_with(tmp_path, CHOSEN)
    inputs = tmp_path / "in"
    inputs.mkdir()
    gray = np.full((40, 56), 20, np.uint8)
    gray[5:13, 30:40] = 200
    tifffile.imwrite(inputs / "slice.tif", np.dstack([gray // 2, gray, gray[:, ::-1] // 3]), photometric="rgb")
    PIL.Image.fromarray(gray).save(inputs / "gray.png")
    # plain MONAI, from outside the bundle and without metaseg
    ok(monai_bundle("run", "--meta_file", bundle / "configs/metadata.json", "--config_file",
                    bundle / "configs/inference.json", "--bundle_root", bundle, "--input_dir", inputs,
                    "--output_dir", tmp_path / "monai", cwd=tmp_path, blocker=blocker))
    engine = Engine(bundle)
    assert engine.inference_steps == CHOSEN
    predict(inputs, tmp_path / "predict", engine)
    default = Engine(bundle, overrides={"inference_steps": DEFAULT})
    with serving(bundle) as client:
        assert client.get("/info").json()["inference_steps"] == CHOSEN
        for stem in ("slice", "gray"):
            file = next(inputs.glob(f"{stem}.*"))
            by_monai = np.asarray(PIL.Image.open(tmp_path / "monai" / f"{stem}_seg.png")) > 0
            by_predict = np.asarray(PIL.Image.open(tmp_path / "predict" / f"{stem}_seg.png")) > 0
            by_server = png(client.post("/segment/mask", files=upload(file))) > 0
            by_deploy = deploy(bundle, channels_first(file), engine.network)[0] > 0
            assert 0.05 < by_predict.mean() < 0.95, stem  # a mask with both classes: not two empty masks agreeing
            np.testing.assert_array_equal(by_server, by_predict)
            np.testing.assert_array_equal(by_deploy, by_predict)
            np.testing.assert_array_equal(by_monai, by_predict)
            report = client.post("/segment", files=upload(file)).json()
            assert (report["threshold"], report["volume_steps"], report["volume"]) == (0.4, [], False)
            assert report["total_area_px"] == by_server.sum()
            # the chosen steps act: with flip TTA off and the threshold at 0.5 the mask is another one
            frame = engine_input(file)
            assert (upload_masks(default.probabilities([frame]), DEFAULT)[0] != by_predict).mean() > 0.05, stem
            assert (upload_masks(default.probabilities([frame]), {**DEFAULT, "threshold": 0.4})[0]
                    != by_predict).mean() > 0.01, stem  # flip TTA alone changes it too
            slider = png(client.post("/segment/mask", files=upload(file), params={"threshold": 0.5})) > 0
            at_half = upload_masks(engine.probabilities([frame]), {**CHOSEN, "threshold": 0.5})[0]
            np.testing.assert_array_equal(slider, at_half)  # the viewer's slider replaces the chosen threshold only


def channels_first(path: Path) -> np.ndarray:
    image = tifffile.imread(path) if path.suffix == ".tif" else np.asarray(PIL.Image.open(path))
    return np.moveaxis(image, -1, 0) if image.ndim == 3 else image[None]


def engine_input(path: Path) -> np.ndarray:
    return decode([(path.name, path.read_bytes())]).inputs[0]


# --- volumes ---

BIG, MEDIUM, SMALL = (slice(4, 12), slice(4, 12)), (slice(20, 26), slice(20, 26)), (slice(26, 29), slice(2, 5))


def hand_made_volume() -> np.ndarray:
    """Four 32x32 slices: BIG on slices 0-2 (192 voxels), MEDIUM on 2-3 (72, apart from BIG), SMALL on 1 (9)."""
    volume = np.full((4, 32, 32), 20, np.uint16)
    for z in (0, 1, 2):
        volume[z][BIG] = 200
    for z in (2, 3):
        volume[z][MEDIUM] = 200
    volume[1][SMALL] = 200
    return volume


def expected(volume: np.ndarray, *kept) -> np.ndarray:
    mask = np.zeros(volume.shape, bool)
    for z, where in kept:
        mask[z][where] = True
    return mask


def multi_frame(path: Path, volume: np.ndarray) -> Path:
    write_dicom(path, volume[0])
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames, ds.PixelData = len(volume), volume.astype("<u2").tobytes()
    ds.save_as(path)
    return path


def seg_masks(client: TestClient, volume: np.ndarray) -> np.ndarray:
    """The masks of the server's DICOM SEG of `volume` sent as a DICOM series, in series order."""
    series = [("file", (f"s{z}.dcm", dcm(mr(pixels, z=float(z))))) for z, pixels in enumerate(volume)]
    seg = client.post("/segment/seg", files=series)
    assert seg.status_code == 200, seg.text
    uids = [pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID for _, (_, data) in series]
    frames = hd.seg.segread(io.BytesIO(seg.content)).get_pixels_by_source_instance(uids, segment_numbers=[1])
    return frames[..., 0].astype(bool)


def test_a_volume_gets_the_component_steps_in_predict_and_the_server_and_a_single_slice_does_not(tmp_path):
    volume = hand_made_volume()
    only_big = expected(volume, *[(z, BIG) for z in (0, 1, 2)])
    bundle = bundle_with(tmp_path, {**DEFAULT, "largest_component": True}, BRIGHT_NET)
    inputs = tmp_path / "in"
    inputs.mkdir()
    multi_frame(inputs / "multi.dcm", volume)
    PIL.Image.fromarray(volume[1].astype(np.uint8)).save(inputs / "one.png")  # slice 1 alone: BIG and SMALL
    engine = Engine(bundle)
    predict(inputs, tmp_path / "out", engine)
    by_predict = np.stack([np.asarray(PIL.Image.open(tmp_path / "out" / f"multi_{k}_seg.png")) > 0 for k in range(4)])
    np.testing.assert_array_equal(by_predict, only_big)
    single = np.asarray(PIL.Image.open(tmp_path / "out" / "one_seg.png")) > 0
    np.testing.assert_array_equal(single, expected(volume, (1, BIG), (1, SMALL))[1])
    with serving(bundle) as client:
        for k in range(4):
            np.testing.assert_array_equal(png(client.post("/segment/mask", files=upload(inputs / "multi.dcm"),
                                                          params={"slice": k})) > 0, by_predict[k])
            overlay = png(client.post("/segment/overlay", files=upload(inputs / "multi.dcm"), params={"slice": k}))
            np.testing.assert_array_equal(overlay[..., 0] != overlay[..., 1], by_predict[k])  # red there, gray elsewhere
        report = client.post("/segment", files=upload(inputs / "multi.dcm")).json()
        assert report["volume_steps"] == ["largest_component"] and report["total_area_px"] == only_big.sum()
        assert report["lesion_count"] == 1 and report["lesions"][0]["slices"] == [0, 1, 2]  # BIG, one 3D lesion
        assert [component["slice_index"] for component in report["slice_components"]] == [0, 1, 2]
        one = client.post("/segment", files=upload(inputs / "one.png")).json()
        assert one["volume_steps"] == [] and one["lesion_count"] == 2 and one["total_area_px"] == single.sum()
        np.testing.assert_array_equal(png(client.post("/segment/mask", files=upload(inputs / "one.png"))) > 0, single)
        # a DICOM series is a volume too, and its SEG holds the volume's masks
        np.testing.assert_array_equal(seg_masks(client, volume), only_big)


def test_minimum_size_and_largest_component_differ_and_a_data_patient_folder_is_one_volume(tmp_path):
    """min_lesion_voxels 20 keeps MEDIUM (72 voxels) where largest_component drops it; a Data patient's slices are
    one volume in slice-number order (P_1, P_2, P_10), whatever the order of their names."""
    volume = hand_made_volume()
    bundle = bundle_with(tmp_path, {**DEFAULT, "min_lesion_voxels": 20}, BRIGHT_NET)
    engine = Engine(bundle)
    probabilities = engine.probabilities(list(volume))
    np.testing.assert_array_equal(upload_masks(probabilities, engine.inference_steps, volume=True),
                                  expected(volume, *[(z, BIG) for z in (0, 1, 2)], (2, MEDIUM), (3, MEDIUM)))
    data = tmp_path / "Data.zip"
    slices = {1: volume[0], 2: volume[0], 10: volume[3]}  # BIG on P_1 and P_2 (one 3D lesion), MEDIUM on P_10
    with zipfile.ZipFile(data, "w") as archive:
        for n, pixels in slices.items():
            rgb = np.repeat(pixels.astype(np.uint8)[..., None], 3, axis=2)
            buffer = io.BytesIO()
            tifffile.imwrite(buffer, rgb, photometric="rgb")
            archive.writestr(f"Data/P/P_{n}.tif", buffer.getvalue())
    largest = Engine(bundle, overrides={"inference_steps#min_lesion_voxels": 0, "one_lesion_per_patient": True,
                                        "inference_steps#largest_component": True})
    predict(data, tmp_path / "out", largest)
    masks = {n: np.asarray(PIL.Image.open(tmp_path / "out" / "P" / f"P_{n}_seg.png")) > 0 for n in slices}
    assert masks[1][BIG].all() and masks[2][BIG].all() and masks[1].sum() == masks[2].sum() == 64
    assert not masks[10].any()  # MEDIUM is not the largest 3D lesion of the patient


def test_a_minimum_lesion_score_drops_a_large_unconfident_lesion_in_predict_the_server_and_its_files(tmp_path):
    """BIG (192 voxels) dim and SMALL (27 voxels) bright on slices 0-2: min_lesion_score 0.95 keeps SMALL (its
    probability ~0.997) and drops BIG (~0.88), which no minimum size could do without dropping SMALL first. predict,
    the report, the PNG, SEG and NIfTI masks all hold SMALL only; a single slice gets no component step."""
    volume = np.full((3, 32, 32), 20, np.uint16)
    for z in range(3):
        volume[z][BIG], volume[z][SMALL] = 120, 250  # each slice holds both, so they are normalised alike
    only_small = expected(volume, *[(z, SMALL) for z in range(3)])
    bundle = bundle_with(tmp_path, {**DEFAULT, "min_lesion_score": 0.95}, BRIGHT_NET)
    engine = Engine(bundle)
    probabilities = np.stack(engine.probabilities(list(volume)))
    lesions = expected(volume, *[(z, where) for z in range(3) for where in (BIG, SMALL)])
    assert probabilities[lesions].min() > 0.5 > probabilities[~lesions].max()  # both are lesions at the threshold
    assert probabilities[:, BIG[0], BIG[1]].max() < 0.95 < probabilities[:, SMALL[0], SMALL[1]].max()
    np.testing.assert_array_equal(upload_masks(list(probabilities), engine.inference_steps, volume=True), only_small)
    inputs = tmp_path / "in"
    inputs.mkdir()
    multi_frame(inputs / "multi.dcm", volume)
    PIL.Image.fromarray(volume[1].astype(np.uint8)).save(inputs / "one.png")
    predict(inputs, tmp_path / "out", engine)
    by_predict = np.stack([np.asarray(PIL.Image.open(tmp_path / "out" / f"multi_{k}_seg.png")) > 0 for k in range(3)])
    np.testing.assert_array_equal(by_predict, only_small)
    single = np.asarray(PIL.Image.open(tmp_path / "out" / "one_seg.png")) > 0
    np.testing.assert_array_equal(single, expected(volume, (1, BIG), (1, SMALL))[1])  # 2D: both kept
    with serving(bundle) as client:
        report = client.post("/segment", files=upload(inputs / "multi.dcm")).json()
        assert report["volume_steps"] == ["min_lesion_score"] and report["lesion_count"] == 1
        assert report["lesions"][0]["voxels"] == 27 and report["lesions"][0]["max_probability"] >= 0.95
        for k in range(3):
            np.testing.assert_array_equal(png(client.post("/segment/mask", files=upload(inputs / "multi.dcm"),
                                                          params={"slice": k})) > 0, only_small[k])
        nifti = client.post("/segment/nifti", files=upload(inputs / "multi.dcm"))
        assert nifti.status_code == 200, nifti.text
        np.testing.assert_array_equal(np.stack(decode([("m.nii.gz", nifti.content)]).frames) > 0, only_small)
        np.testing.assert_array_equal(seg_masks(client, volume), only_small)
        one = client.post("/segment", files=upload(inputs / "one.png")).json()
        assert one["volume_steps"] == [] and one["lesion_count"] == 2


def test_unusable_inference_steps_are_a_clear_error(tmp_path):
    bundle = bundle_with(tmp_path, {**DEFAULT, "threshold": 1.5})
    with pytest.raises(UserError, match=r"a threshold and a min_lesion_score in \[0, 1\]"):
        Engine(bundle)
    with pytest.raises(UserError, match=r"a threshold and a min_lesion_score in \[0, 1\]"):
        Engine(bundle, overrides={"inference_steps": {**DEFAULT, "min_lesion_score": -0.1}})
    with pytest.raises(UserError, match="must hold exactly flip_tta, threshold, min_lesion_voxels, min_lesion_mm3, "
                                        "min_lesion_score, largest_component"):
        Engine(bundle, overrides={"inference_steps": {"threshold": 0.5}})
    with pytest.raises(UserError, match="does not declare one_lesion_per_patient"):
        Engine(bundle, overrides={"inference_steps": {**DEFAULT, "largest_component": True}})
    path = bundle / "configs" / "inference.json"
    config = json.loads(path.read_text())
    del config["inference_steps"]
    path.write_text(json.dumps(config))
    with pytest.raises(UserError, match="has no inference_steps"):
        Engine(bundle)
