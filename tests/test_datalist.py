"""Patient-level split and the datalist JSON."""

from __future__ import annotations

import json

import pytest

from metaseg.data.discovery import discover
from metaseg.data.datalist import SPLITS, build_datalist, split_patients
from metaseg.errors import UserError

PATIENTS = [f"P{i:02d}" for i in range(44)]


def test_split_is_disjoint_complete_and_sized():
    split = split_patients(PATIENTS, seed=0)
    sets = [set(split[name]) for name in SPLITS]
    assert set().union(*sets) == set(PATIENTS)
    assert sum(len(s) for s in sets) == 44  # no patient in two lists
    assert [len(s) for s in sets] == [31, 4, 9]  # 20% test, 10% validation


def test_split_reproducible_per_seed_and_different_across_seeds():
    assert split_patients(PATIENTS, seed=3) == split_patients(list(reversed(PATIENTS)), seed=3)
    assert split_patients(PATIENTS, seed=3)["test"] != split_patients(PATIENTS, seed=4)["test"]


@pytest.mark.parametrize(("n", "test", "val"), [(2, 0.2, 0.1), (5, 0.2, 0.1), (10, 0.5, 0.5), (10, 0.2, 0.0)])
def test_impossible_splits_are_user_errors(n, test, val):
    with pytest.raises(UserError):
        split_patients(PATIENTS[:n], test_fraction=test, val_fraction=val)


def test_datalist_items_carry_patient_and_slice_and_never_mix_patients(tiny_data):
    datalist = build_datalist(discover(tiny_data), seed=1)
    seen = {}
    for name in SPLITS:
        for item in datalist[name]:
            assert set(item) >= {"image", "label", "patient", "slice"}
            assert item["image"].startswith(item["patient"] + "/")
            assert seen.setdefault(item["patient"], name) == name
        assert sorted({i["patient"] for i in datalist[name]}) == datalist["patients"][name]
    assert datalist["seed"] == 1
    json.dumps(datalist)  # serialisable as is


def test_split_counts_of_a_hand_made_data_set(tiny_data):
    """10 patients of 3 slices, one with a lesion each: 10 * 0.7, 0.1, 0.2 patients, 3 slices and 1 lesion slice per
    patient in every split, whichever patients the seed draws."""
    counts = build_datalist(discover(tiny_data), seed=1)["counts"]
    assert counts["patients"] == {"training": 7, "validation": 1, "test": 2}
    assert counts["pairs"] == {"training": 21, "validation": 3, "test": 6}
    assert counts["lesion_pairs"] == {"training": 7, "validation": 1, "test": 2}


def test_real_split_counts(lgg):
    """The 77 development patients at seed 0: 15 test (round(77 * 0.2)), 8 validation (round(77 * 0.1)), 54 training;
    the slice counts are those of the patients drawn, recorded once."""
    datalist = build_datalist(discover(lgg), seed=0)
    assert datalist["counts"]["patients"] == {"training": 54, "validation": 8, "test": 15}
    assert datalist["counts"]["pairs"] == {"training": 1801, "validation": 310, "test": 556}
    assert sum(datalist["counts"]["lesion_pairs"].values()) == 942
