"""One definition of a lesion (metaseg.inference.lesions): 3D components, their sizes and diameters, and the shipped
inference steps, which must keep the metastases of the phantom."""

from __future__ import annotations

import json

import numpy as np
import pytest

from metaseg import conventions
from metaseg.evaluation import selection
from metaseg.inference import lesions
from metaseg.inference import steps as inference_steps
from metaseg.bundles import NAMES, bundle_dir


def sphere(radius_mm: float, pixel_mm: tuple[float, float], slice_mm: float) -> np.ndarray:
    z, y, x = np.mgrid[-40:41, -60:61, -60:61]
    return (z * slice_mm) ** 2 + (y * pixel_mm[0]) ** 2 + (x * pixel_mm[1]) ** 2 <= radius_mm**2


def test_a_sphere_of_known_size_and_spacing_has_its_volume_and_diameter():
    radius, pixel, thickness = 8.0, (0.5, 0.4), 1.0
    (lesion,) = lesions.measure(sphere(radius, pixel, thickness), None, pixel, thickness)
    assert lesion.volume_mm3 == pytest.approx(4 / 3 * np.pi * radius**3, rel=0.02)
    # edge to edge on the widest slice: the diameter, within one pixel's diagonal
    assert 2 * radius <= lesion.longest_diameter_mm <= 2 * radius + np.hypot(*pixel)
    assert lesion.measurable and lesion.diameter_slice == 40 and lesion.slices == tuple(range(32, 49))
    (small,) = lesions.measure(sphere(3.0, pixel, thickness), None, pixel, thickness)
    assert small.measurable is False  # 6 mm: under RANO-BM's 10 mm
    (unknown,) = lesions.measure(sphere(3.0, pixel, thickness))
    assert unknown.volume_mm3 is None and unknown.longest_diameter_mm is None and unknown.measurable is None


def test_a_lesion_is_3d_and_touches_diagonally_across_slices():
    mask = np.zeros((4, 12, 12), bool)
    mask[0, 2:4, 2:4] = mask[1, 4, 4] = True  # corner contact with the slice above: one lesion
    mask[3, 9:11, 9:11] = True  # two slices away: another
    probability = np.where(mask, 0.9, 0.1).astype(np.float32)
    probability[3, 9, 9] = 0.99
    found = lesions.measure(mask, probability)
    assert [(x.id, x.slices, x.voxels) for x in found] == [(1, (0, 1), 5), (2, (3,), 4)]
    assert [x.max_probability for x in found] == pytest.approx([0.9, 0.99])
    assert [x.mean_probability for x in found] == pytest.approx([0.9, (3 * 0.9 + 0.99) / 4])
    assert lesions.label(mask)[1] == 2 and lesions.label(np.zeros((2, 3, 3)))[1] == 0
    # one slice: its 2D components, with an area but no volume even where the spacing is known
    (flat,) = lesions.measure(mask[3], None, (1.0, 1.0), 5.0)
    assert flat.volume_mm3 is None and flat.voxels == 4 and flat.longest_diameter_mm == pytest.approx(np.hypot(2, 2))


def test_size_bins_in_ml_where_the_spacing_is_known_else_in_voxels():
    assert [lesions.size_bin(v, 1.0) for v in (99, 100, 1000, 1001)] == ["<0.1 mL", "0.1-1 mL", "0.1-1 mL", ">1 mL"]
    assert [lesions.size_bin(v, None) for v in (99, 100, 1001)] == ["<100 voxels", "100-1000 voxels", ">1000 voxels"]
    assert lesions.size_bins(None)[0] == "<100 voxels"


def test_a_minimum_size_in_mm3_keeps_a_lesion_of_exactly_that_size_and_voxels_need_an_unknown_spacing():
    mask = np.zeros((3, 10, 10), bool)
    mask[1, 1:3, 1:3] = True  # 4 voxels of 0.5 mm3 = 2 mm3
    mask[1, 6, 6] = True  # 1 voxel
    prob = mask.astype(np.float32)
    config = {**inference_steps.DEFAULT, "min_lesion_mm3": 2.0}
    assert inference_steps.mask(prob, config, voxel_volume_mm3=0.5).sum() == 4
    assert inference_steps.mask(prob, config).sum() == 5  # mm3 means nothing without a spacing
    voxels = {**inference_steps.DEFAULT, "min_lesion_voxels": 2}
    assert inference_steps.mask(prob, voxels).sum() == 4
    assert inference_steps.mask(prob, voxels, voxel_volume_mm3=0.5).sum() == 5  # nor voxels of unknown size with one
    assert inference_steps.mask(prob, voxels, volume=False).sum() == 5  # unrelated slices: no component step


@pytest.fixture(scope="module")
def phantom_masks() -> list[np.ndarray]:
    """The perfect masks of `metaseg synth OUT --patients 10 --slices 32 --seed 3` (selection.REFERENCE_PHANTOM)."""
    assert selection.REFERENCE_PHANTOM == {"patients": 10, "slices": 32, "seed": 3}
    return selection.reference_masks()


@pytest.mark.parametrize("name", NAMES)
def test_the_shipped_steps_keep_the_metastases_of_the_phantom(name, phantom_masks):
    """Applied to perfect masks of several small metastases per patient, the served steps keep >= 99% of them."""
    config = json.loads((bundle_dir(name) / "configs" / "inference.json").read_text())
    steps = conventions.checked_steps(config["inference_steps"], name, config.get("one_lesion_per_patient", False))
    total = kept = 0
    for truth in phantom_masks:
        labels, n = lesions.label(truth)
        assert 2 <= n <= 6  # the phantom: several metastases per patient
        served = inference_steps.mask(truth.astype(np.float32), steps)  # probability 1 inside, 0 outside
        total += n
        kept += len(np.unique(labels[served & truth]))
    assert total >= 40 and kept / total >= 0.99, f"{name} keeps {kept} of {total} lesions"

