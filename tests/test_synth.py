"""The synthetic phantom: the real data set's layout, determinism, and what makes it hard the way metastases are."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from metaseg.errors import UserError
from metaseg.data.phantom import synthesize

PATIENTS, SLICES = 6, 20


def read_patient(root, pid: str, slices: int) -> tuple[np.ndarray, np.ndarray]:
    """(slices, 256, 256, 3) images and (slices, 256, 256) masks of one patient, slice 1 first."""
    images = np.stack([tifffile.imread(root / pid / f"{pid}_{n}.tif") for n in range(1, slices + 1)])
    masks = np.stack([tifffile.imread(root / pid / f"{pid}_{n}_mask.tif") for n in range(1, slices + 1)])
    return images, masks


def components(mask: np.ndarray) -> list[np.ndarray]:
    """One boolean array per connected lesion in a 2-D mask."""
    labels, count = ndimage.label(mask > 0)
    return [labels == k for k in range(1, count + 1)]


def diameter(component: np.ndarray) -> float:
    """Equivalent diameter: that of the disc with the same area."""
    return float(np.sqrt(4 * component.sum() / np.pi))


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "nested" / "data"  # parents are created too
    truth = synthesize(root, PATIENTS, SLICES, seed=0)
    data = {f"SYN_{i:03d}": read_patient(root, f"SYN_{i:03d}", SLICES) for i in range(PATIENTS)}
    return root, truth, data


def test_layout_shapes_dtypes_and_values(phantom):
    root, truth, data = phantom
    assert sorted(p.name for p in root.iterdir()) == sorted([*data, "phantom.json"])
    for pid, (images, masks) in data.items():
        names = {f"{pid}_{n}{suffix}.tif" for n in range(1, SLICES + 1) for suffix in ("", "_mask")}
        assert {p.name for p in (root / pid).iterdir()} == names
        assert images.shape == (SLICES, 256, 256, 3) and images.dtype == np.uint8
        assert masks.shape == (SLICES, 256, 256) and masks.dtype == np.uint8
        assert set(np.unique(masks)) <= {0, 255}
        assert images[..., 0].max() > 100 and images[..., 1].max() > 100 and images[..., 2].max() > 100
        assert images[:, :8, :8].mean() < 8  # background outside the head is (nearly) black
    assert json.loads((root / "phantom.json").read_text()) == truth
    assert {k: truth[k] for k in ("seed", "patients", "slices_per_patient", "n_slices")} == {
        "seed": 0, "patients": PATIENTS, "slices_per_patient": SLICES, "n_slices": PATIENTS * SLICES}


def test_same_seed_gives_identical_bytes_and_other_seeds_differ(tmp_path):
    runs = {name: synthesize(tmp_path / name, 2, 4, seed=seed) for name, seed in (("a", 3), ("b", 3), ("c", 4))}
    assert runs["a"] == runs["b"] != runs["c"]
    for pid in ("SYN_000", "SYN_001"):
        a, b, c = (read_patient(tmp_path / name, pid, 4) for name in "abc")
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
        assert not np.array_equal(a[0], c[0])


def test_a_patient_does_not_depend_on_how_many_are_made(phantom, tmp_path):
    _, truth, data = phantom
    alone = synthesize(tmp_path, 1, SLICES, seed=0)
    images, masks = read_patient(tmp_path, "SYN_000", SLICES)
    assert np.array_equal(images, data["SYN_000"][0]) and np.array_equal(masks, data["SYN_000"][1])
    assert alone["lesions"] == [lesion for lesion in truth["lesions"] if lesion["patient"] == "SYN_000"]


def test_most_slices_are_lesion_free_and_every_patient_has_a_lesion(phantom):
    _, truth, data = phantom
    lesion_slices = [int(masks.any(axis=(1, 2)).sum()) for _, masks in data.values()]
    assert min(lesion_slices) >= 1
    assert truth["n_lesion_slices"] == sum(lesion_slices)
    assert truth["lesion_free_fraction"] == pytest.approx(1 - sum(lesion_slices) / (PATIENTS * SLICES))
    assert truth["lesion_free_fraction"] >= 0.5


def test_lesion_table_agrees_with_the_masks(phantom):
    _, truth, data = phantom
    for pid, (_, masks) in data.items():
        table = [lesion for lesion in truth["lesions"] if lesion["patient"] == pid]
        assert 2 <= len(table) <= 6
        expected = np.zeros(SLICES, int)  # lesions per slice
        for lesion in table:
            (row, col), (first, last) = lesion["center_rc"], lesion["slices"]
            assert 1 <= first <= last <= SLICES
            expected[first - 1 : last] += 1
            labels = [ndimage.label(masks[n - 1] > 0)[0] for n in range(first, last + 1)]
            assert all(lab[row, col] > 0 for lab in labels)  # the centre is lesion on every slice it spans
            widest = max(diameter(lab == lab[row, col]) for lab in labels)
            assert lesion["max_diameter_px"] == pytest.approx(widest, abs=0.06)
        assert [len(components(mask)) for mask in masks] == list(expected)  # lesions never touch


def test_lesion_sizes_span_tiny_to_large(phantom):
    _, _, data = phantom
    sizes = [diameter(c) for _, masks in data.values() for mask in masks for c in components(mask)]
    assert 2 <= min(sizes) and max(sizes) <= 30
    assert sum(size <= 6 for size in sizes) >= 3  # small metastases are the hard, common case
    assert max(sizes) >= 12


def test_lesions_lie_inside_the_brain(phantom):
    _, _, data = phantom
    for images, masks in data.values():
        flair = images[..., 1].astype(float)
        background = flair[:, :16, :16].mean()
        for n in np.flatnonzero(masks.any(axis=(1, 2))):
            for component in components(masks[n]):
                assert flair[n][component].min() > 0
                assert flair[n][component].mean() > background + 30


def test_flair_is_brighter_around_lesions_than_in_normal_brain(phantom):
    """Edema: a FLAIR-bright zone outside the mask, so the model must tell lesion from edema."""
    _, _, data = phantom
    yy, xx = np.mgrid[0:256, 0:256]
    central = np.hypot(yy - 128, xx - 128) < 40  # always brain
    for images, masks in data.values():
        flair = images[..., 1].astype(float)
        lesion = masks > 0
        empty = ~lesion.any(axis=(1, 2))
        normal = np.median(flair[empty][:, central])
        ring = np.stack([ndimage.binary_dilation(m, iterations=4) & ~ndimage.binary_dilation(m) for m in lesion])
        assert flair[ring].mean() > 1.15 * normal


def test_large_lesions_enhance_as_a_ring(phantom):
    _, _, data = phantom
    checked = 0
    for images, masks in data.values():
        for n, mask in enumerate(masks):
            for component in components(mask):
                if diameter(component) >= 16:
                    post = images[n, ..., 2].astype(float)
                    rim = component & ~ndimage.binary_erosion(component, iterations=2)
                    core = ndimage.binary_erosion(component, iterations=5)
                    assert post[rim].mean() > post[core].mean() + 20
                    checked += 1
    assert checked >= 2


@pytest.mark.parametrize("kwargs", [{"patients": 0}, {"patients": 2, "slices": 0}, {"patients": 2, "seed": -1},
                                    {"patients": 1.5}])
def test_bad_arguments_are_user_errors(tmp_path, kwargs):
    with pytest.raises(UserError):
        synthesize(tmp_path, **kwargs)
