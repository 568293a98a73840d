"""The in-memory engine gives what the bundle's own `inference.json` gives, for both bundles in one process."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import ScaleIntensityRangePercentiles

from conftest import PLAIN_STEPS, REPO, THRESHOLD_NET, threshold_weights
from metaseg.inference.engine import Engine, OneSortPercentiles
from metaseg.errors import UserError
from metaseg.imageio.reader import decode
from test_bundles import NAMES, network_def

SIZE = {"spatial_size": 32}


def random_weights(name: str, folder: Path, seed: int = 0) -> Path:
    """A model.pt of the bundle's own network_def with seeded random weights (no training needed)."""
    torch.manual_seed(seed)
    net = network_def(REPO / "bundles" / name)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), folder / "model.pt")
    return folder / "model.pt"


@pytest.mark.parametrize("brain_crop", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_engine_matches_the_bundle_inference_command(name, brain_crop, geometry_inputs, tmp_path):
    weights = random_weights(name, tmp_path / "ckpt")
    inputs = next(iter(geometry_inputs.values()))[0].parent
    bundle = REPO / "bundles" / name
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--meta_file", str(bundle / "configs/metadata.json"),
         "--config_file", str(bundle / "configs/inference.json"), "--bundle_root", str(bundle), "--input_dir", str(inputs),
         "--ckpt_dir", str(tmp_path / "ckpt"), "--output_dir", str(tmp_path / "out"), "--spatial_size", "32",
         "--other_folds#checkpoints", "[]",  # one model.pt, not a shipped fold ensemble
         "--brain_crop", str(brain_crop)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    engine = Engine(bundle, weights=weights, overrides={**SIZE, "brain_crop": brain_crop})
    for stem, (path, _) in geometry_inputs.items():
        inputs = decode([(path.name, path.read_bytes())]).inputs  # the 3-channel TIFF as (3, rows, cols)
        ours = engine.probabilities(inputs)[0] >= engine.inference_steps["threshold"]  # the bundle's own steps
        theirs = np.asarray(PIL.Image.open(tmp_path / "out" / f"{stem}_seg.png")) > 0
        assert ours.shape == theirs.shape
        assert (ours == theirs).mean() > 0.99, stem  # same pipeline; only float ties at p = 0.5 may differ


def test_two_bundles_in_one_process_keep_their_own_networks(tmp_path):
    frame = np.random.default_rng(0).integers(0, 255, (48, 40)).astype(np.float32)
    alone = {}
    for name in NAMES:
        alone[name] = Engine(REPO / "bundles" / name, random_weights(name, tmp_path / name), overrides=SIZE)
    for name in reversed(NAMES):  # the other order: a stale `scripts` module must not leak between bundles
        again = Engine(REPO / "bundles" / name, tmp_path / name / "model.pt", overrides=SIZE)
        assert type(again.network).__name__ == type(alone[name].network).__name__
        np.testing.assert_allclose(again.probabilities([frame])[0], alone[name].probabilities([frame])[0], atol=1e-6)
    assert type(alone["unetpp"].network).__name__ == "UNetPlusPlus"
    assert alone["unetpp"].probabilities([frame])[0].shape == (48, 40)


def test_engine_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no trained weights"):
        Engine(REPO / "bundles" / "attention_unet", weights=tmp_path / "missing.pt")
    engine = Engine(REPO / "bundles" / "attention_unet", random_weights("attention_unet", tmp_path), overrides=SIZE)
    for shape in ((5, 8, 8), (8, 8, 3), (2, 8, 8, 1), (0, 8)):  # too many channels, channel-last, 4D, empty
        with pytest.raises(UserError, match="2D slice"):
            engine.probabilities([np.zeros(shape, np.float32)])


def test_weights_of_another_network_are_a_user_error(tmp_path):
    """One-channel weights (a bundle before 0.4.0) or a broken file: one readable line, not a traceback."""
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "attention_unet" / "configs" / "inference.json"))
    parser["network_def#in_channels"] = 1
    torch.save(parser.get_parsed_content("network_def").state_dict(), tmp_path / "one_channel.pt")
    torch.save({"model.0.conv.weight": torch.zeros(1)}, tmp_path / "other.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    (tmp_path / "zip.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    (tmp_path / "text.pt").write_bytes(b"hello, not weights")
    cases = {"one_channel.pt": r"do not fit the attention_unet network: size mismatch .*\[16, 1, 3, 3\]",
             "other.pt": "do not fit the attention_unet network: Missing key", "list.pt": "do not fit",
             "zip.pt": "cannot read weights", "text.pt": "cannot read weights"}
    for file, message in cases.items():
        with pytest.raises(UserError, match=message) as err:
            Engine(REPO / "bundles" / "attention_unet", tmp_path / file, overrides=SIZE)
        assert "\n" not in str(err.value) and file in str(err.value)


def test_a_one_channel_frame_is_the_network_input_of_flair_in_all_three_channels(tmp_path):
    """A gray slice, as (rows, cols) or (1, rows, cols), segments exactly as three copies of it would; three real
    sequences give another map."""
    rng = np.random.default_rng(0)
    sequences = rng.integers(0, 255, (3, 40, 48)).astype(np.float32)
    flair = sequences[1]
    engine = Engine(REPO / "bundles" / "attention_unet", random_weights("attention_unet", tmp_path), overrides=SIZE)
    gray, gray_1, copies, three = engine.probabilities([flair, flair[None], np.stack([flair] * 3), sequences])
    np.testing.assert_array_equal(gray, gray_1)
    np.testing.assert_array_equal(gray, copies)
    assert gray.shape == three.shape == (40, 48) and np.abs(three - gray).max() > 1e-3


def test_near_constant_slice_is_segmented_not_crashed(tmp_path):
    """A slice at the top of the head: a few bright pixels on black make the 0.5/99.5 percentiles equal, and MONAI's
    percentile scaling then returns without clipping; CLAHE must still get values in [0, 1] (a real test slice did this).
    With the threshold network (softmax of (-F, F - 1): lesion probability sigmoid(2F - 1) of the prepared FLAIR F)
    the forward pass is that by hand, and the map at the slice's size is highest on the bright spot, the same twice."""
    frame = np.zeros((256, 256), np.float32)
    frame[100:104, 100:105] = 3.0
    engine = Engine(REPO / "bundles" / "attention_unet", threshold_weights(tmp_path / "net.pt"),
                    overrides=SIZE | {"network_def": THRESHOLD_NET, "inference_steps": PLAIN_STEPS})
    _, batch = engine.prepare([frame])
    assert batch.shape == (1, 3, 32, 32) and torch.isfinite(batch).all()
    torch.testing.assert_close(engine.forward(batch)[:, 1], torch.sigmoid(2 * batch[:, 1] - 1))
    prob = engine.probabilities([frame])[0]
    assert prob.shape == (256, 256) and prob.dtype == np.float32 and prob.min() >= 0 and prob.max() <= 1
    assert prob[101, 102] > 0.9 and prob[0, 0] < 0.3  # the spot, and black far from it
    np.testing.assert_array_equal(engine.probabilities([frame])[0], prob)


def test_the_engines_percentile_scaling_is_monais_bit_for_bit(tmp_path):
    """OneSortPercentiles (both percentiles of every channel from one sort) gives MONAI's values exactly, so the
    engine's masks stay those of the bundle's own preprocessing; the engine uses it."""
    monai = ScaleIntensityRangePercentiles(0.5, 99.5, 0.0, 1.0, clip=True, channel_wise=True)
    ours = OneSortPercentiles.like(monai)
    rng = np.random.default_rng(0)
    near_constant = np.zeros((3, 64, 64))
    near_constant[:, 10:12, 10:13] = 3.0
    for image in (rng.normal(100, 30, (3, 128, 128)), rng.integers(0, 4096, (3, 128, 128)), rng.random((1, 37, 53)),
                  near_constant, np.zeros((3, 8, 8))):
        x = MetaTensor(torch.as_tensor(image, dtype=torch.float32))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI's divide-by-zero warning of a constant channel, both alike
            torch.testing.assert_close(ours(x), monai(x), rtol=0, atol=0)
    engine = Engine(REPO / "bundles" / "attention_unet", random_weights("attention_unet", tmp_path), overrides=SIZE)
    assert any(isinstance(getattr(step, "scaler", None), OneSortPercentiles) for step in engine.preprocess.transforms)
