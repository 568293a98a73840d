"""metaseg.conventions is the one place for each convention, and the bundles (which cannot import it) agree with it."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from monai.bundle import ConfigParser

from conftest import PLAIN_STEPS, REPO
from metaseg import conventions
from metaseg.bundles import bundle_imports
from metaseg.cli import main
from metaseg.data.discovery import discover
from metaseg.data.datalist import build_datalist
from metaseg.errors import UserError
from metaseg.imageio.reader import decode
from test_bundles import NAMES

BUNDLES = REPO / "bundles"


def parser(name: str, file: str, **overrides) -> ConfigParser:
    p = ConfigParser()
    p.read_config(str(BUNDLES / name / "configs" / file))
    for key, value in overrides.items():
        p[key] = value
    return p


@pytest.mark.parametrize("name", NAMES)
def test_the_bundles_state_the_same_conventions(name, tmp_path):
    assert parser(name, "train.json")["flair_channel"] == conventions.FLAIR_CHANNEL  # sequence dropout keeps it
    for file, writer in (("train.json", "save_mask"), ("inference.json", "save_mask")):
        config = parser(name, file)[writer]
        assert (config["output_postfix"], config["output_ext"]) == (conventions.MASK_POSTFIX, conventions.MASK_EXT)
    loader = parser(name, "inference.json", bundle_root=str(tmp_path)).get_parsed_content("checkpointloader#load_path")
    assert Path(loader) == conventions.default_weights(tmp_path)


def test_the_decoder_shows_the_flair_channel_and_passes_all_three_in_order():
    """FLAIR_CHANNEL is what a user sees of a colour upload (and what the bundles copy into all three channels for a
    one-channel input, `flair_channel` above); the network gets the three sequences in the data set's order."""
    slices = np.random.default_rng(0).integers(0, 255, (3, 40, 48), dtype=np.uint8)
    png = io.BytesIO()
    PIL.Image.fromarray(np.moveaxis(slices, 0, -1)).save(png, format="PNG")
    volume = decode([("rgb.png", png.getvalue())])
    np.testing.assert_array_equal(volume.frames[0], slices[conventions.FLAIR_CHANNEL])
    np.testing.assert_array_equal(volume.inputs[0], slices)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", [0, 3])
def test_the_bundle_splits_patients_as_metaseg_datalist_does(name, seed, tiny_data, tmp_path):
    ours = build_datalist(discover(tiny_data), seed=seed)["patients"]
    theirs = parser(name, "train.json", dataset_dir=str(tiny_data), output_dir=str(tmp_path), seed=seed)
    with bundle_imports(BUNDLES / name):  # the split is the bundle's scripts/data.py, as MONAI's `run` imports it
        split = theirs.get_parsed_content("patient_split")
    assert {k: sorted(v) for k, v in split.items()} == ours
    assert ours["test"] and ours["validation"]  # a real split, not three empty lists agreeing


def test_mask_names():
    assert conventions.mask_file("P01_10") == "P01_10_seg.png"


def test_best_record_round_trip(tmp_path):
    weights = tmp_path / "runs" / "unetpp" / "models" / "model.pt"
    report = tmp_path / "reports" / "comparison.md"
    record = conventions.write_best(tmp_path / "out" / "best.json", "unetpp", weights, {"spatial_size": 64},
                                    report=report, selected_by="validation")
    stored = json.loads(record.read_text())
    assert stored["weights"] == "../runs/unetpp/models/model.pt" and stored["report"] == "../reports/comparison.md"
    model = conventions.read_best(record)
    assert model.bundle == BUNDLES / "unetpp" and model.weights == weights and model.report.resolve() == report
    assert model.overrides == {"spatial_size": 64}
    steps = {**PLAIN_STEPS, "_desc_": "dropped"}  # the inference steps a model was scored with ride along
    conventions.write_best(record, "unetpp", weights, {"inference_steps": steps})
    assert conventions.read_best(record).overrides == {"inference_steps": PLAIN_STEPS}


HOSTILE = [  # (what the record holds, a fragment of the error)
    ({"overrides": {"network_def": "$__import__('pathlib').Path('PWNED').touch()"}}, "'network_def' not allowed"),
    ({"overrides": {"spatial_size": "$__import__('pathlib').Path('PWNED').touch() or 64"}}, "must be int, got str"),
    ({"overrides": {"spatial_size": 33}}, "multiple of 16"),
    ({"overrides": {"spatial_size": True}}, "must be int, got bool"),
    ({"overrides": {"spatial_size": 10**9}}, "multiple of 16 in [16, 4096]"),
    ({"overrides": ["spatial_size", 64]}, "overrides must be an object"),
    ({"overrides": {"device": "cpu"}}, "'device' not allowed"),
    ({"overrides": {"inference_steps": {**PLAIN_STEPS, "threshold": "$__import__('pathlib').Path('PWNED').touch()"}}},
     "a threshold and a min_lesion_score in [0, 1]"),
    ({"overrides": {"inference_steps": {**PLAIN_STEPS, "min_lesion_score": "$__import__('os').getcwd()"}}},
     "a threshold and a min_lesion_score in [0, 1]"),
    ({"overrides": {"inference_steps": {"threshold": 0.5}}}, "inference_steps must hold exactly"),
    ({"overrides": {"inference_steps": "off"}}, "must be dict, got str"),
    ({"bundle": 3}, "must be strings"),
    ({"weights": None}, "must be strings"),
    ({"report": ["x"]}, "report must be a string"),
]


@pytest.mark.parametrize(("change", "fragment"), HOSTILE, ids=[f"{list(c)[0]}-{i}" for i, (c, _) in enumerate(HOSTILE)])
def test_a_best_record_may_hold_only_known_overrides(change, fragment, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    record = tmp_path / "best.json"
    record.write_text(json.dumps({"bundle": "attention_unet", "weights": "model.pt", "overrides": {}, **change}))
    with pytest.raises(UserError, match="unreadable best-model record") as err:
        conventions.read_best(record)
    assert fragment in str(err.value)
    assert main(["predict", str(tmp_path), "--out", str(tmp_path / "out"), "--best", str(record)]) == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "out").exists()


def test_writing_a_record_checks_it_too(tmp_path):
    with pytest.raises(UserError, match="not allowed"):
        conventions.write_best(tmp_path / "best.json", "unetpp", tmp_path / "m.pt", {"epochs": 3})
    with pytest.raises(UserError, match="shipped bundle"):
        conventions.write_best(tmp_path / "best.json", "../elsewhere", tmp_path / "m.pt", {})
    assert not (tmp_path / "best.json").exists()
