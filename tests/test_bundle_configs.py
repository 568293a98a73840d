"""The bundles' configs as other MONAI tools read them: train.json and inference.json each load alone and run under
MONAI's default ids, and what inference.json repeats from train.json (network, image preprocessing, the scalars
they use) stays identical to it.

Why repeated rather than defined once: MONAI Label, MONAI Deploy and the model zoo read `configs/inference.json`
alone, so it cannot reference train.json; MONAI 1.6.1's only cross-file reference, the file macro
(`%configs/train.json#network_def`), resolves its path against the working directory, not the bundle (checked in
test_a_file_macro_would_not_load_from_elsewhere), so it breaks for a copied bundle run from another folder.
"""

from __future__ import annotations

import copy
import importlib
import json

import numpy as np
import PIL.Image
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.data import MetaTensor
from monai.transforms import Compose, LoadImaged, RandCropByPosNegLabeld, RandLambdad

from conftest import REPO
from metaseg.bundles import bundle_imports
from test_bundles import NAMES, phantom  # noqa: F401 (a fixture)

BUNDLES = REPO / "bundles"
PER_KEY_ARGS = {"mode", "anti_aliasing", "padding_mode", "align_corners"}  # lists with one entry per key
TRAINING_ONLY = {"scripts.transforms.SkullStrippedCopyd"}  # makes a training copy of the image; inference has none
SHARED_SCALARS = ("seed", "batch_size", "num_workers", "spatial_size", "clahe_clip_limit", "device")


def raw(name: str, file: str) -> dict:
    return json.loads((BUNDLES / name / "configs" / file).read_text())


def image_only(transform: dict) -> dict | None:
    """A dictionary transform's config restricted to the `image` key, without descriptions; None if it skips image."""
    keys = transform["keys"] if isinstance(transform["keys"], list) else [transform["keys"]]
    if "image" not in keys or transform["_target_"] in TRAINING_ONLY:
        return None
    at = keys.index("image")
    out = {}
    for arg, value in transform.items():
        if arg in ("_desc_", "allow_missing_keys"):
            continue
        if arg == "keys":
            value = "image"
        elif arg in PER_KEY_ARGS and isinstance(value, list) and len(keys) > 1:
            value = value[at]
        out[arg] = value
    return out


def workflow(name: str, file: str, kind: str, **override) -> ConfigWorkflow:
    configs = BUNDLES / name / "configs"
    return ConfigWorkflow(config_file=str(configs / file), meta_file=str(configs / "metadata.json"),
                          logging_file=False, workflow_type=kind, bundle_root=str(BUNDLES / name), **override)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("file", "kind"), [("train.json", "train"), ("inference.json", "infer")])
def test_each_config_loads_alone_with_the_default_run_id(name, file, kind, phantom, tmp_path):
    flow = workflow(name, file, kind, dataset_dir=str(phantom), output_dir=str(tmp_path), spatial_size=32)
    flow.initialize()
    with bundle_imports(BUNDLES / name):  # what MONAI's `run` does before it builds the network
        assert flow.check_properties() == []  # MONAI's own table of required ids for a train / infer workflow
    assert flow.run_id == "run" and isinstance(flow.parser["run"], list) and flow.parser["run"]
    assert "initialize" in flow.parser and "finalize" not in flow.parser  # the zoo's: finalize only for multi-GPU


@pytest.mark.parametrize("name", NAMES)
def test_old_run_ids_are_aliases_of_run(name):
    for files, alias in ((["train.json"], "training"), (["train.json", "evaluate.json"], "evaluating")):
        parser = ConfigParser()
        parser.read_config([str(BUNDLES / name / "configs" / f) for f in files])
        parser.parse()
        assert parser[alias] == parser["run"] and parser["run"], (files, alias)


@pytest.mark.parametrize("name", NAMES)
def test_inference_repeats_the_training_network_and_scalars_exactly(name):
    train, infer = raw(name, "train.json"), raw(name, "inference.json")
    assert infer["network_def"] == train["network_def"]
    for key in SHARED_SCALARS:
        assert infer[key] == train[key], key


@pytest.mark.parametrize("name", NAMES)
def test_inference_preprocessing_is_the_training_chain_for_the_image_alone(name):
    train, infer = raw(name, "train.json"), raw(name, "inference.json")
    expected = [t for t in map(image_only, train["train"]["deterministic_transforms"]) if t is not None]
    ours = [image_only(t) for t in infer["preprocessing"]["transforms"]]
    assert ours == expected
    assert all("label" not in json.dumps(t) for t in infer["preprocessing"]["transforms"])  # MONAI Label's loader


def chains(name: str) -> tuple[Compose, Compose]:
    """Both preprocessing chains without their loaders: training's deterministic one, and inference's."""
    built = []
    for file, key in (("train.json", "validate#preprocessing"), ("inference.json", "preprocessing")):
        parser = ConfigParser()
        parser.read_config(str(BUNDLES / name / "configs" / file))
        parser["spatial_size"] = 32
        with bundle_imports(BUNDLES / name):  # the chains use the bundle's scripts/transforms.py
            steps = parser.get_parsed_content(key).transforms
        built.append(Compose([t for t in steps if not isinstance(t, LoadImaged)]))
    return built[0], built[1]


def as_image(array) -> MetaTensor:
    return MetaTensor(torch.as_tensor(np.asarray(array), dtype=torch.float32))


@pytest.mark.parametrize("name", NAMES)
def test_both_chains_give_the_same_network_input(name):
    """Behaviour, not only config text: a 3-channel slice, a gray one and a near-constant one; a gray image becomes
    three identical channels (FLAIR copied into all three, as the data set does where a sequence is missing)."""
    training, inference = chains(name)
    rng = np.random.default_rng(0)
    for image in (rng.integers(0, 255, (3, 40, 56)), rng.normal(300, 80, (1, 64, 64)), np.pad([[[5.0]]], ((0, 0), (9, 9), (9, 9)))):
        a = training({"image": as_image(image)})["image"].as_tensor()
        b = inference({"image": as_image(image)})["image"].as_tensor()
        assert a.shape == (3, 32, 32) and torch.equal(a, b)
        if image.shape[0] == 1:
            assert torch.equal(a[0], a[1]) and torch.equal(a[1], a[2])
        else:
            assert not torch.equal(a[0], a[1])  # the sequences are kept apart, each scaled on its own


@pytest.mark.parametrize("name", NAMES)
def test_sequence_dropout_trains_on_what_a_flair_only_upload_gets(name):
    """The property that lets one model serve both inputs: training's sequence dropout (forced on) turns a 3-channel
    slice into exactly the network input that its FLAIR channel alone, uploaded as a gray image, gets at inference."""
    training, inference = chains(name)
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / name / "configs" / "train.json"))
    parser["sequence_dropout"] = 1.0
    at = [t["_target_"] for t in parser["train#random_transforms"]].index("RandLambdad")
    with bundle_imports(BUNDLES / name):
        dropout = parser.get_parsed_content("train#random_transforms")[at]
    assert isinstance(dropout, RandLambdad) and parser["train#random_transforms"][at]["keys"] == "image"
    flair = parser["flair_channel"]
    slice_ = np.random.default_rng(1).integers(0, 255, (3, 40, 56))
    kept = training({"image": as_image(slice_)})["image"]
    dropped = dropout({"image": kept})["image"].as_tensor()
    upload = inference({"image": as_image(slice_[flair][None])})["image"].as_tensor()
    assert dropped.shape == (3, 32, 32) and torch.equal(dropped, upload)
    assert not torch.equal(kept.as_tensor(), upload)  # without the dropout the three sequences stay
    parser["sequence_dropout"] = 0.0
    with bundle_imports(BUNDLES / name):
        never = parser.get_parsed_content("train#random_transforms", lazy=False)[at]
    assert torch.equal(never({"image": kept})["image"].as_tensor(), kept.as_tensor())


def head_slice(rng) -> np.ndarray:
    """Three sequences of a hand-made head: a bright ring (scalp and skull) around a textured brain, on faint noise."""
    rows, cols = np.mgrid[:64, :64]
    radius = np.hypot(rows - 32, cols - 30)
    image = rng.uniform(0, 4, (3, 64, 64))
    image[:, radius < 26] = rng.uniform(60, 120, (3, int((radius < 26).sum())))
    image[:, (radius >= 22) & (radius < 26)] = 230
    return image


@pytest.mark.parametrize("name", NAMES)
def test_skull_stripping_trains_on_what_a_brain_extracted_upload_gets(name):
    """The augmentation's property: the cached stripped copy is, to the bit, the network input that the same slice
    skull-stripped by scripts.transforms.skull_strip and uploaded gets at inference; with skull_strip_prob 1 every
    draw trains on it, with 0 none, and the copy never reaches the batch."""
    training, inference = chains(name)
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / name / "configs" / "train.json"))
    parser.update({"spatial_size": 32, "skull_strip_prob": 1.0})
    with bundle_imports(BUNDLES / name):
        steps = parser.get_parsed_content("validate#preprocessing").transforms
        strip = importlib.import_module("scripts.transforms").skull_strip
        swap = parser.get_parsed_content("train#random_transforms")[0]
    with_copy = Compose([t for t in steps if not isinstance(t, LoadImaged)])
    slice_ = head_slice(np.random.default_rng(2))
    cached = with_copy({"image": as_image(slice_)})
    stripped_upload = inference({"image": strip(as_image(slice_), parser["skull_strip_erosion"])})["image"]
    assert torch.equal(cached["image_stripped"].as_tensor(), stripped_upload.as_tensor())
    assert torch.equal(cached["image"].as_tensor(), training({"image": as_image(slice_)})["image"].as_tensor())
    assert not torch.equal(cached["image"].as_tensor(), cached["image_stripped"].as_tensor())
    drawn = swap(dict(cached))
    assert set(drawn) == {"image"} and torch.equal(drawn["image"].as_tensor(), stripped_upload.as_tensor())
    swap.prob = 0.0
    kept = swap(dict(cached))
    assert set(kept) == {"image"} and torch.equal(kept["image"].as_tensor(), cached["image"].as_tensor())
    parser["skull_strip_prob"] = 0.0  # off (U-Net++'s default): no copy, no cost
    with bundle_imports(BUNDLES / name):
        off = Compose([t for t in parser.get_parsed_content("validate#preprocessing", lazy=False).transforms
                       if not isinstance(t, LoadImaged)])
    assert "image_stripped" not in off({"image": as_image(slice_)})


@pytest.mark.parametrize("name", NAMES)
def test_patches_are_cut_from_the_full_size_slice_and_often_centred_on_a_lesion(name, phantom):  # noqa: F811
    """patch_size below spatial_size: training sees patches of the whole-size slice (validation and inference whole
    slices); equal to it (the default), no crop step at all, so recipes without patches train as before."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / name / "configs" / "train.json"))
    assert parser["patch_size"] == "@spatial_size"
    parser.update({"spatial_size": 64, "patch_size": 32})
    with bundle_imports(BUNDLES / name):
        preprocessing = parser.get_parsed_content("train#preprocessing")
        whole = parser.get_parsed_content("validate#preprocessing")
    assert sum(isinstance(t, RandCropByPosNegLabeld) for t in preprocessing.transforms) == 1
    mask = next(m for m in sorted(phantom.rglob("*_mask.tif")) if np.asarray(PIL.Image.open(m)).any())
    item = {"image": str(mask).replace("_mask.tif", ".tif"), "label": str(mask)}
    on_lesion = 0
    for seed in range(16):
        preprocessing.set_random_state(seed)
        (patch,) = preprocessing(dict(item))  # a list of num_samples patches
        assert patch["image"].shape == (3, 32, 32) and patch["label"].shape == (1, 32, 32)
        on_lesion += bool(patch["label"].any())
    assert on_lesion >= 6  # half the patches are centred on a lesion pixel
    assert whole(dict(item))["image"].shape == (3, 64, 64)
    parser["patch_size"] = 64
    with bundle_imports(BUNDLES / name):
        plain = parser.get_parsed_content("train#preprocessing", lazy=False)
    assert not any(isinstance(t, RandCropByPosNegLabeld) for t in plain.transforms)


def test_a_file_macro_would_not_load_from_elsewhere(tmp_path, monkeypatch):
    """The reason network_def is repeated: a macro naming train.json by a relative path fails from another folder."""
    bundle = BUNDLES / "attention_unet"
    config = copy.deepcopy(raw("attention_unet", "inference.json"))
    config["network_def"] = "%configs/train.json#network_def"
    (tmp_path / "inference.json").write_text(json.dumps(config))
    monkeypatch.chdir(bundle)
    parser = ConfigParser()
    parser.read_config(str(tmp_path / "inference.json"))
    assert parser.get_parsed_content("network_def").__class__.__name__ == "AttentionUnet"  # from the bundle root
    monkeypatch.chdir(tmp_path)
    parser = ConfigParser()
    parser.read_config(str(tmp_path / "inference.json"))
    with pytest.raises(FileNotFoundError):
        parser.get_parsed_content("network_def")
