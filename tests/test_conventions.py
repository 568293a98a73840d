"""metaseg.conventions is the one place for each convention, and the bundles (which cannot import it) agree with it."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import LoadImaged

from conftest import REPO
from metaseg import conventions
from metaseg.cli import main
from metaseg.data import discover
from metaseg.datalist import build_datalist
from metaseg.errors import UserError
from metaseg.imageio import decode
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
    for file in ("train.json", "inference.json"):
        assert parser(name, file)["flair_channel"] == conventions.FLAIR_CHANNEL, file
    for file, writer in (("train.json", "save_mask"), ("inference.json", "save_mask")):
        config = parser(name, file)[writer]
        assert (config["output_postfix"], config["output_ext"]) == (conventions.MASK_POSTFIX, conventions.MASK_EXT)
    loader = parser(name, "inference.json", bundle_root=str(tmp_path)).get_parsed_content("checkpointloader#load_path")
    assert Path(loader) == conventions.default_weights(tmp_path)


@pytest.mark.parametrize("name", NAMES)
def test_the_bundle_and_the_decoder_both_take_the_flair_channel(name):
    """A 3-channel slice where only FLAIR has structure gives the network input of that channel alone, in the
    bundle's preprocessing and through metaseg's decoder (the server and `metaseg predict`)."""
    rng = np.random.default_rng(0)
    slices = np.zeros((3, 40, 48), np.uint8)
    slices[conventions.FLAIR_CHANNEL] = rng.integers(0, 255, (40, 48))
    steps = parser(name, "inference.json", spatial_size=32).get_parsed_content("preprocessing").transforms
    chain = [t for t in steps if not isinstance(t, LoadImaged)]

    def net_input(image) -> torch.Tensor:
        data = {"image": MetaTensor(torch.as_tensor(np.asarray(image, np.float32)))}
        for step in chain:
            data = step(data)
        return data["image"].as_tensor()

    flair = net_input(slices[conventions.FLAIR_CHANNEL][None])
    assert torch.equal(net_input(slices), flair) and flair.std() > 0
    png = io.BytesIO()
    PIL.Image.fromarray(np.moveaxis(slices, 0, -1)).save(png, format="PNG")
    np.testing.assert_array_equal(decode([("rgb.png", png.getvalue())]).frames[0], slices[conventions.FLAIR_CHANNEL])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", [0, 3])
def test_the_bundle_splits_patients_as_metaseg_datalist_does(name, seed, tiny_data, tmp_path):
    ours = build_datalist(discover(tiny_data), seed=seed)["patients"]
    theirs = parser(name, "train.json", dataset_dir=str(tiny_data), output_dir=str(tmp_path), seed=seed)
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


HOSTILE = [  # (what the record holds, a fragment of the error)
    ({"overrides": {"network_def": "$__import__('pathlib').Path('PWNED').touch()"}}, "'network_def' not allowed"),
    ({"overrides": {"spatial_size": "$__import__('pathlib').Path('PWNED').touch() or 64"}}, "must be int, got str"),
    ({"overrides": {"spatial_size": 33}}, "multiple of 16"),
    ({"overrides": {"spatial_size": True}}, "must be int, got bool"),
    ({"overrides": {"spatial_size": 10**9}}, "multiple of 16 in [16, 4096]"),
    ({"overrides": ["spatial_size", 64]}, "overrides must be an object"),
    ({"overrides": {"device": "cpu"}}, "'device' not allowed"),
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
