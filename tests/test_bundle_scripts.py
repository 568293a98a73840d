"""The code the bundles' configs call from their scripts/ package (data, transforms, compute, handlers), checked
function by function and through the configs that name them."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd, LoadImaged, Resized
from skimage.exposure import equalize_adapthist

from conftest import REPO
from metaseg.data.datalist import split_patients as metaseg_split_patients
from metaseg.bundles import bundle_imports
from metaseg.errors import UserError

BUNDLES = REPO / "bundles"
MODULES = ("data", "transforms", "compute", "handlers")


@pytest.fixture(scope="module")
def scripts() -> SimpleNamespace:
    """The bundles' scripts modules (the same bytes in both bundles, tests/test_bundles.py)."""
    with bundle_imports(BUNDLES / "attention_unet"):
        return SimpleNamespace(**{name: importlib.import_module(f"scripts.{name}") for name in MODULES})


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from metaseg.data.phantom import synthesize

    root = tmp_path_factory.mktemp("phantom") / "Data"
    synthesize(root, patients=10, slices=2, seed=3)
    return root


def train_parser(name: str, *extra: str, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / name / "configs" / f) for f in ("train.json", *extra)])
    parser.update({"spatial_size": 32, **overrides})
    return parser


# data.py


def test_data_folder_takes_a_folder_as_it_is(scripts, phantom, tmp_path):
    assert scripts.data.data_folder(str(phantom), str(tmp_path / "unused")) == str(phantom)
    assert not (tmp_path / "unused").exists()


def test_data_folder_unpacks_a_zip_and_the_config_reads_the_same_slices(scripts, phantom, tmp_path):
    archive = shutil.make_archive(str(tmp_path / "lgg"), "zip", phantom.parent, phantom.name)
    extracted = scripts.data.data_folder(archive, str(tmp_path / "out"))
    assert extracted == str(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out" / "Data").rglob("*_mask.tif")) == sorted(
        p.name for p in phantom.rglob("*_mask.tif"))
    lists = {}
    for source, out in ((phantom, tmp_path / "a"), (archive, tmp_path / "b")):
        parser = train_parser("attention_unet", dataset_dir=str(source), output_dir=str(out))
        with bundle_imports(BUNDLES / "attention_unet"):
            root, items = parser.get_parsed_content("patients_root"), parser.get_parsed_content("train#data")
        lists[source] = [{key: str(Path(path).relative_to(root)) for key, path in item.items()} for item in items]
    assert lists[phantom] == lists[archive] and len(lists[phantom]) == 7 * 2  # 10 patients: 7 train x 2 slices


def test_data_folder_refuses_a_missing_path_in_one_line(scripts, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dataset_dir .*nowhere is neither a folder nor a zip file"):
        scripts.data.data_folder(str(tmp_path / "nowhere"), str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="no \\*_mask.tif masks under"):
        scripts.data.mask_files(str(tmp_path))


def test_split_patients_on_a_hand_made_list(scripts):
    patients = [f"TCGA_{i:02d}" for i in (7, 3, 9, 1, 0, 5, 2, 8, 6, 4)]
    split = scripts.data.split_patients(patients, seed=0)
    assert split == {"training": ["TCGA_01", "TCGA_02", "TCGA_04", "TCGA_06", "TCGA_07", "TCGA_08", "TCGA_09"],
                     "validation": ["TCGA_03"], "test": ["TCGA_00", "TCGA_05"]}  # every datalist of seed 0 on these
    no_test = scripts.data.split_patients(patients, seed=0, test_fraction=0.0)
    assert no_test["test"] == [] and len(no_test["validation"]) == 1


# (patients, test fraction, validation fraction) -> sizes by hand: each part takes its fraction of the patients
# rounded half up, training 1 - test - val (44 at 0.2 / 0.1: 30.8 -> 31, 4.4 -> 4, 8.8 -> 9), and the patient that
# rounding each part on its own leaves out (101 at 0.3 / 0.2: 1 - 0.3 - 0.2 = 0.4999.., 50.49.. -> 50, 20, 30: 51)
SIZES = {(10, 0.2, 0.1): (7, 1, 2), (44, 0.2, 0.1): (31, 4, 9), (101, 0.2, 0.1): (71, 10, 20),
         (10, 0.0, 0.25): (8, 2, 0), (44, 0.0, 0.25): (33, 11, 0), (101, 0.0, 0.25): (76, 25, 0),
         (10, 0.3, 0.2): (5, 2, 3), (44, 0.3, 0.2): (22, 9, 13), (101, 0.3, 0.2): (51, 20, 30)}


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize(("count", "test_fraction", "val_fraction"),
                         list(SIZES))
def test_split_patients_sizes_and_every_patient_once(scripts, count, seed, test_fraction, val_fraction):
    """Each part has its rounded share, sorted; every patient is in one part; the same seed gives the same split
    whatever the order given, another seed another; metaseg's split is the bundle's."""
    patients = [f"P{(i * 37) % 1000:03d}" for i in range(count)]
    split = scripts.data.split_patients(patients, seed, test_fraction, val_fraction)
    assert split == scripts.data.split_patients(patients[::-1], seed, test_fraction, val_fraction)
    assert split != scripts.data.split_patients(patients, seed + 1, test_fraction, val_fraction)
    assert metaseg_split_patients(patients, seed, test_fraction, val_fraction) == split
    assert tuple(len(split[name]) for name in ("training", "validation", "test")) == SIZES[
        count, test_fraction, val_fraction]
    assert all(part == sorted(part) for part in split.values())
    assert sorted(sum(split.values(), [])) == sorted(patients)


@pytest.mark.parametrize(("test_fraction", "val_fraction"), [(1.0, 0.1), (0.2, 0.0), (0.5, 0.5), (-0.1, 0.1)])
def test_bad_fractions_are_a_value_error_in_the_bundle_and_one_user_error_line_in_metaseg(scripts, test_fraction, val_fraction):
    with pytest.raises(UserError) as theirs:
        metaseg_split_patients(["a", "b", "c"], 0, test_fraction, val_fraction)
    with pytest.raises(ValueError) as ours:
        scripts.data.split_patients(["a", "b", "c"], 0, test_fraction, val_fraction)
    assert str(ours.value) == str(theirs.value)


def test_training_takes_the_split_without_test_patients(scripts):
    """Five patients leave the test split empty: split_patients refuses that (a datalist records a test split),
    partition_patients, what train.json uses, gives the same patients for training and validation."""
    patients = ["a", "b", "c", "d", "e"]
    with pytest.raises(ValueError, match="5 patients are too few for this split: test would be empty"):
        scripts.data.split_patients(patients)
    split = scripts.data.partition_patients(patients)
    assert split["test"] == [] and split["validation"] and len(split["training"]) == 4


def test_the_config_split_is_the_datalist_split(phantom, tmp_path):
    """A data folder without a datalist trains on exactly the patients `metaseg datalist` would pick."""
    parser = train_parser("unetpp", dataset_dir=str(phantom), output_dir=str(tmp_path))
    with bundle_imports(BUNDLES / "unetpp"):
        ours = parser.get_parsed_content("patient_split")
        items = {s: parser.get_parsed_content("split_data")(s) for s in ("training", "validation", "test")}
    patients = sorted(p.name for p in phantom.iterdir() if p.is_dir())
    assert ours == metaseg_split_patients(patients, seed=0)
    for name, pairs in items.items():
        assert sorted({Path(d["label"]).parent.name for d in pairs}) == ours[name]
        assert all(d["image"] == d["label"].replace("_mask.tif", ".tif") for d in pairs)


def test_sample_weights_favour_slices_with_a_lesion(scripts, tmp_path):
    import PIL.Image

    empty, lesion = np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8)
    lesion[2, 3] = 255
    for stem, mask in (("empty", empty), ("lesion", lesion)):
        PIL.Image.fromarray(mask).save(tmp_path / f"{stem}_mask.tif")
    data = [{"label": str(tmp_path / f"{s}_mask.tif")} for s in ("lesion", "empty", "lesion")]
    assert scripts.data.sample_weights(data, positive_weight=2.5) == [2.5, 1.0, 2.5]


def test_lesion_area_sampling_draws_slices_by_lesion_pixels_plus_a_uniform_share(scripts, tmp_path):
    import PIL.Image

    areas = {"empty": 0, "small": 10, "large": 30}
    for stem, area in areas.items():
        mask = np.zeros((8, 8), np.uint8)
        mask.flat[:area] = 255
        PIL.Image.fromarray(mask).save(tmp_path / f"{stem}_mask.tif")
    data = [{"label": str(tmp_path / f"{s}_mask.tif")} for s in ("empty", "small", "large", "empty")]
    weights = np.array(scripts.data.sample_weights(data, 2.0, lesion_area=True, uniform_share=0.1))
    assert np.allclose(weights, [0.025, 0.9 * 10 / 40 + 0.025, 0.9 * 30 / 40 + 0.025, 0.025])
    draws = torch.utils.data.WeightedRandomSampler(weights.tolist(), 20000, generator=torch.Generator().manual_seed(0))
    lesion_fraction = np.isin(list(draws), [1, 2]).mean()
    assert abs(lesion_fraction - 0.95) < 0.01  # 90% by area, and half of the 10% uniform share
    only_empty = [data[0], data[3]]
    assert scripts.data.sample_weights(only_empty, 2.0, lesion_area=True) == [0.5, 0.5]
    with pytest.raises(TypeError, match="lesion_area_sampling must be True or False"):
        scripts.data.sample_weights(data, 2.0, lesion_area="false")


def test_input_files_are_the_images_without_the_data_set_masks(scripts, tmp_path):
    for name in ("b.png", "a/one.DCM", "a/two.tif", "a/two_mask.tif", "notes.txt", "c.jpeg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = [str(Path(f).relative_to(tmp_path)) for f in scripts.data.input_files(str(tmp_path))]
    assert found == ["a/one.DCM", "a/two.tif", "b.png", "c.jpeg"]


# transforms.py


def old_clahe(x: torch.Tensor, clip_limit: float = 0.01) -> torch.Tensor:
    """The expression train.json and inference.json held before scripts/transforms.py, verbatim."""
    return x.copy_(torch.stack([torch.from_numpy(equalize_adapthist(c.clamp(0, 1).numpy(), clip_limit=clip_limit))
                                for c in x]))


def test_clahe_on_a_constant_slice_stays_constant_and_leaves_its_input(scripts):
    image = MetaTensor(torch.full((3, 24, 24), 0.4), meta={"filename_or_obj": "slice.tif"})
    out = scripts.transforms.CLAHE(0.01)(image)
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "slice.tif"
    assert out.shape == image.shape and out.dtype == torch.float32
    assert all(torch.unique(c).numel() == 1 for c in out) and 0 <= out.min() <= out.max() <= 1
    assert torch.equal(image.as_tensor(), torch.full((3, 24, 24), 0.4))  # a new image, not the input changed


def test_clahe_gives_exactly_the_old_expression_s_output(scripts):
    rng = np.random.default_rng(0)
    images = [rng.random((3, 40, 56)), rng.normal(0.5, 0.6, (3, 32, 32)), np.full((1, 16, 16), 1.7)]
    transform = scripts.transforms.CLAHEd(keys="image", clip_limit=0.02)
    for array in images:
        image = MetaTensor(torch.as_tensor(array, dtype=torch.float32))
        expected = old_clahe(image.clone(), clip_limit=0.02)
        assert torch.equal(transform({"image": image})["image"].as_tensor(), expected.as_tensor())


def test_the_sequence_steps(scripts):
    three, gray = torch.arange(4 * 2 * 2.0).reshape(4, 2, 2), torch.ones(1, 2, 2)
    assert torch.equal(scripts.transforms.three_sequences(three), three[:3])
    assert torch.equal(scripts.transforms.three_sequences(gray), gray.repeat(3, 1, 1))
    assert torch.equal(scripts.transforms.flair_only(three, 1), three[1:2].repeat(3, 1, 1))


def test_brain_box_is_the_flair_above_a_fraction_of_its_maximum(scripts):
    image = torch.zeros(3, 12, 12)
    image[1, 3:7, 2:9] = 100.0
    image[1, 5, 5] = 5.0  # below 10% of the maximum: dark, yet inside the box
    image[0] = 90.0  # other sequences do not count
    brain = scripts.transforms.brain_box(image, channel=1, fraction=0.1, enabled=True)
    assert brain.shape == (1, 12, 12) and brain.sum() == 4 * 7 - 1
    assert scripts.transforms.brain_box(image, 1, 0.1, enabled=False).all()
    assert scripts.transforms.brain_box(torch.zeros(3, 12, 12), 1, 0.1, enabled=True).all()  # no brain: whole slice
    with pytest.raises(TypeError, match="brain_crop must be True or False"):  # `--brain_crop false` on a command line
        scripts.transforms.brain_box(image, 1, 0.1, enabled="false")


def test_brain_mask_is_the_head_from_the_image_eroded_by_the_skull(scripts):
    """A hand-made head: a disk of radius 20 (ring of skull from 16 to 20) on faint noise, a bright speck apart from
    it; eroded by 4 pixels the mask is the disk inside the skull, the speck and the background left out."""
    rows, cols = np.mgrid[:64, :64]
    radius = np.hypot(rows - 32, cols - 32)
    image = np.random.default_rng(0).uniform(0, 3, (3, 64, 64)).astype(np.float32)
    image[:, radius < 20] = 100
    image[:, (radius >= 16) & (radius < 20)] = 250
    image[:, 2:4, 2:4] = 250  # a bright speck outside the head: not its largest component
    mask = scripts.transforms.brain_mask(torch.as_tensor(image), erosion=4)
    assert mask.shape == (64, 64) and not mask[:6, :6].any()
    assert mask[radius < 15].all() and not mask[radius >= 17].any()  # the disk inside the skull, to a pixel
    image[:, 28:36, 28:36] = 0  # a dark hole inside the brain (a ventricle, a cavity) stays inside the mask
    assert scripts.transforms.brain_mask(torch.as_tensor(image), erosion=4)[28:36, 28:36].all()
    assert not scripts.transforms.brain_mask(torch.zeros(3, 64, 64), erosion=4).any()  # no head: empty


def test_skull_strip_changes_nothing_inside_the_brain_mask(scripts):
    image = MetaTensor(torch.as_tensor(np.random.default_rng(1).uniform(0, 255, (3, 48, 48)), dtype=torch.float32))
    image[:, :, :6] = 1  # a dark border: the head is the rest
    mask = torch.as_tensor(scripts.transforms.brain_mask(image, erosion=3))
    stripped = scripts.transforms.skull_strip(image, erosion=3)
    assert isinstance(stripped, MetaTensor) and stripped.dtype == image.dtype
    assert 0 < mask.sum() < mask.numel()
    assert torch.equal(stripped[:, mask], image[:, mask]) and not stripped[:, ~mask].any()


def test_the_stripped_copy_is_made_only_when_enabled_and_drawn_with_its_probability(scripts):
    image = torch.as_tensor(np.random.default_rng(2).uniform(50, 255, (3, 32, 32)), dtype=torch.float32)
    image[:, :4] = 0
    off = scripts.transforms.SkullStrippedCopyd("image", erosion=2, enabled=False)({"image": image})
    on = scripts.transforms.SkullStrippedCopyd("image", erosion=2, enabled=True)({"image": image})
    assert set(off) == {"image"} and set(on) == {"image", "image_stripped"}
    assert torch.equal(on["image_stripped"], scripts.transforms.skull_strip(image, 2))
    with pytest.raises(TypeError, match="enabled must be True or False"):
        scripts.transforms.SkullStrippedCopyd("image", erosion=2, enabled="false")
    swap = scripts.transforms.RandSkullStripd("image", prob=0.5)
    swap.set_random_state(0)
    drawn = [swap(dict(on)) for _ in range(400)]
    assert all(set(d) == {"image"} for d in drawn)
    stripped = sum(torch.equal(d["image"], on["image_stripped"]) for d in drawn)
    assert 160 < stripped < 240  # binomial(400, 0.5): within 4 standard deviations
    assert torch.equal(on["image"], image)  # the cached item is never changed


def brain_chain(name: str, **settings) -> Compose:
    """train.json's deterministic chain without its loader, at 32 px, with `settings`."""
    parser = train_parser(name, **settings)
    with bundle_imports(BUNDLES / name):
        steps = parser.get_parsed_content("validate#preprocessing").transforms
    return Compose([t for t in steps if not isinstance(t, LoadImaged)])


@pytest.mark.parametrize("name", ("unetpp", "attention_unet"))
def test_brain_crop_keeps_a_lesion_at_the_box_edge_and_inverts_to_the_slice_frame(name):
    rng = np.random.default_rng(0)
    image = np.zeros((3, 96, 96), np.float32)
    image[:, 20:80, 30:70] = rng.uniform(80, 120, (3, 60, 40))  # the brain: rows 20-79, columns 30-69
    label = np.zeros((1, 96, 96), np.float32)
    label[:, 20:32, 58:70] = 1  # a lesion in the brain's top right corner
    data = {"image": MetaTensor(torch.as_tensor(image)), "label": MetaTensor(torch.as_tensor(label))}
    chain = brain_chain(name, brain_crop=True)
    out = chain(data)
    assert out["image"].shape == (3, 32, 32) and out["label"].sum() > 0  # the lesion at the edge survives
    box_rows = torch.nonzero(out["label"][0].sum(1)).flatten()
    assert box_rows.min() <= 2  # the box starts at the brain (plus the margin), not at the slice's border
    out["pred"] = out["label"].clone()
    back = Invertd("pred", transform=chain, orig_keys="image", nearest_interp=False)(out)["pred"]  # as the bundle
    assert back.shape == (1, 96, 96)
    mask = back.numpy() >= 0.5
    dice = 2 * (mask * label).sum() / (mask.sum() + label.sum())
    assert dice > 0.8  # back where it was, to within the ~2x resampling of a 32-px network input
    for empty in (np.zeros((3, 96, 96), np.float32), np.zeros((3, 64, 80), np.float32)):  # no brain: the whole slice
        assert chain({"image": MetaTensor(torch.as_tensor(empty))})["image"].shape == (3, 32, 32)


@pytest.mark.parametrize("name", ("unetpp", "attention_unet"))
def test_without_brain_crop_a_slice_is_only_resized_as_before(name):
    image = {"image": MetaTensor(torch.as_tensor(np.random.default_rng(1).uniform(0, 255, (3, 96, 72))))}
    steps = brain_chain(name).transforms
    geometry = Compose(steps[: [type(t).__name__ for t in steps].index("Resized") + 1])
    resized = Resized("image", (32, 32), mode="bilinear", anti_aliasing=True)(dict(image))["image"]
    assert torch.equal(geometry(dict(image))["image"].as_tensor(), resized.as_tensor())


def test_training_chain_order(scripts):
    chain = scripts.transforms.training_chain
    args = dict(deterministic=["load", "scale"], random=["flip"], drop_meta="drop", to_device="gpu", patch_crop="crop")
    assert chain(**args, on_device=False, crop=False) == ["load", "scale", "drop", "flip", "drop"]
    assert chain(**args, on_device=True, crop=True) == ["load", "scale", "gpu", "drop", "crop", "flip", "drop"]


# compute.py


def test_cpu_bf16_follows_the_kernel_s_flags(scripts, tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f amx_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert scripts.compute.cpu_flags(str(info)) == {"fpu", "sse", "avx512f", "amx_bf16"}
    assert scripts.compute.cpu_flags(str(tmp_path / "none")) == set()  # not Linux: no native bf16 assumed
    monkeypatch.setattr(scripts.compute, "cpu_flags", lambda: {"avx512f"})
    assert scripts.compute.native_bf16("cpu") is False
    monkeypatch.setattr(scripts.compute, "cpu_flags", lambda: {"avx512_bf16"})
    assert scripts.compute.native_bf16(torch.device("cpu")) is True


# handlers.py


def test_metrics_json_is_written_whole(scripts, tmp_path):
    writer = scripts.handlers.MetricsJSON(str(tmp_path / "eval"))
    writer(SimpleNamespace(state=SimpleNamespace(metrics={"val_dice": torch.tensor(0.5), "val_mean_dice": 0.25})))
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == {"val_dice": 0.5, "val_mean_dice": 0.25}
    assert [p.name for p in (tmp_path / "eval").iterdir()] == ["metrics.json"]


@pytest.mark.parametrize(("rank", "expected"), [
    (0, ["LrScheduleHandler", "ValidationHandler", "StatsHandler", "TensorBoardStatsHandler", "ProgressBar"]),
    (1, ["LrScheduleHandler", "ValidationHandler"]),
])
def test_multi_gpu_drops_the_logging_handlers_by_name_on_other_ranks(rank, expected, monkeypatch, tmp_path):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: rank)
    parser = train_parser("attention_unet", "multi_gpu_train.json", output_dir=str(tmp_path), device="cpu")
    parser["validate#evaluator"] = None  # the validator is not what this test is about
    parser["lr_scheduler#warmup_steps"], parser["lr_scheduler#t_total"] = 1, 2  # else sized by a data loader of real data
    parser["network"] = "$@network_def.to(@device)"  # DistributedDataParallel needs a process group
    with bundle_imports(BUNDLES / "attention_unet"):
        handlers = parser.get_parsed_content("train#trainer#train_handlers")
    assert [type(h).__name__ for h in handlers] == expected


# the configs as recipes


def test_no_config_expression_holds_logic():
    """What the configs compute is in scripts/: every `$` expression left is a reference, a call or a short line."""
    long = []
    for path in BUNDLES.glob("*/configs/*.json"):

        def walk(node):
            if isinstance(node, dict):
                for value in node.values():
                    walk(value)
            elif isinstance(node, list):
                for value in node:
                    walk(value)
            elif isinstance(node, str) and node.startswith("$") and (len(node) > 110 or "torch.cpu._" in node):
                long.append(f"{path.parent.parent.name}/{path.name}: {node[:60]}")

        walk(json.loads(path.read_text()))
    assert not long
