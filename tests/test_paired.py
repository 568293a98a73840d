"""The paired per-patient difference, as computed (metrics.paired_difference, bootstrap_ci) and as every recipe
comparison prints it (metaseg.evaluation.paired), on small cases worked out by hand."""

from __future__ import annotations

import pytest

from metaseg.evaluation.metrics import bootstrap_ci, paired_difference
from metaseg.evaluation.paired import difference_ci, p_value, paired_table

GAIN = {"mean_difference": 0.0344, "ci95": [0.0176, 0.0514], "wilcoxon_p": 1.0312e-05}
LOSS = {"mean_difference": -0.0084, "ci95": [-0.0291, 0.0121], "wilcoxon_p": None}


def test_bootstrap_ci_of_two_values_spans_both():
    # a resample of [0, 1] has mean 0 or 1 with chance 1/4 each: both tails hold far more than 2.5% of 2000 resamples
    assert bootstrap_ci([0.0, 1.0], 2000, seed=0) == (0.0, 1.0)
    assert bootstrap_ci([0.0, 1.0, 0.0, 1.0], 2000, seed=3) == bootstrap_ci([0.0, 1.0, 0.0, 1.0], 2000, seed=3)


def test_paired_difference_of_a_constant_gain_and_of_ten_gains():
    same = paired_difference([0.5, 0.75, 1.0], [0.25, 0.5, 0.75])  # every patient +0.25: a zero-width CI
    assert same["mean_difference"] == 0.25 and same["ci95"] == [0.25, 0.25] and same["n_patients"] == 3
    assert same["wilcoxon_p"] is None and "only 3 non-zero differences" in same["note"]
    ten = paired_difference([0.5 + 0.01 * k for k in range(1, 11)], [0.5] * 10)  # gains 0.01 ... 0.10
    # ten positive differences, no ties: the exact two-sided signed-rank p is 2 / 2**10
    assert ten["wilcoxon_p"] == pytest.approx(2 / 1024) and ten["mean_difference"] == pytest.approx(0.055)


def test_a_paired_difference_prints_as_one_cell():
    assert difference_ci(GAIN) == "+0.034 [+0.018, +0.051]"
    assert difference_ci(LOSS, "95% CI ") == "-0.008 [95% CI -0.029, +0.012]"
    assert (p_value(GAIN), p_value(GAIN, 2), p_value(LOSS)) == ("1.03e-05", "1e-05", "n/a")


def test_the_paired_table_ends_each_row_with_the_difference_and_its_p():
    lines = paired_table(["model", "patients", "A - B [95% CI]", "p"], [(["net", "44"], GAIN), (["other", "3"], LOSS)])
    assert lines == ["| model | patients | A - B [95% CI] | p |", "|---|---|---|---|",
                     "| net | 44 | +0.034 [+0.018, +0.051] | 1.03e-05 |",
                     "| other | 3 | -0.008 [-0.029, +0.012] | n/a |"]
