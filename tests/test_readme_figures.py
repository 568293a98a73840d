"""The figures of README.md and docs/*.md that name a committed results file equal it (scripts/readme_figures.py; the
marker format is in its docstring), and the check fails on a figure that differs, a missing file or key, an entry
whose text is not in its block."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("readme_figures", REPO / "scripts" / "readme_figures.py")
figures = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look the module up
spec.loader.exec_module(figures)


def test_every_marked_figure_equals_its_results_file():
    found, problems = figures.check()
    assert not problems, "\n".join(problems)
    assert len([f for f in found if f.where.startswith("README.md")]) >= 50  # markers removed by mistake show here


def test_the_served_headline_and_the_serving_latency_are_marked():
    """The figures issue 36 found stale or contradicting are read from files, not typed."""
    keys = {(f.file, f.key) for f in figures.check()[0] if f.where.startswith("README.md")}
    assert ("reports/cv.json", "served.mean_dice_3d") in keys
    assert ("reports/cv.json", "one_channel_loss.attention_unet.mean_difference") in keys
    assert any(file == "benchmarks/results/serve_latency.json" for file, _ in keys)


@pytest.fixture
def repo(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({
        "served": {"mean_dice_3d": 0.73252, "ci95": [0.6897, -0.0108], "rate": 0.0596, "n": 1049, "s": 109.4},
        "models": {"a.b (x)": {"per_patient": {"p1": 0.4, "p2": 0.9, "p3": 0.2}}}}))
    return tmp_path


def run(repo, block: str) -> list[str]:
    (repo / "R.md").write_text(block)
    return figures.check(("R.md",), repo)[1]


def test_equal_figures_pass_in_every_form(repo):
    assert run(repo, """<!-- figures
**{0.733}** [0.690 <- r.json served.mean_dice_3d
0.733 {[0.690, −0.011]} <- r.json served.ci95
at {6.0%} <- r.json served.rate
{1,049} slices <- r.json served.n
{~0.7} <- r.json served.mean_dice_3d
in {1 min 49 s} <- r.json served.s
{2} below <- r.json models.a.b (x).per_patient count<0.5
{109400 ms} <- r.json served.s *1000
-->
Dice **0.733** [0.690, −0.011] at 6.0% of 1,049 slices (~0.7) in 1 min 49 s;
2 below 0.5, 109400 ms.
""") == []


@pytest.mark.parametrize("entry, problem", [
    ("{0.72} [0.690 <- r.json served.mean_dice_3d", "'0.72' but the file has 0.73252 (0.73)"),
    ("{0.73} <- r.json served.mean_dice_3d", "is not in the block"),
    ("{0.733} <- r.json served.dice", "no key 'dice'"),
    ("{0.733} <- missing.json served.mean_dice_3d", "no file missing.json"),
    ("{0.733} <- r.json served", "not a number"),
    ("0.733 <- r.json", "not 'TEXT <- FILE KEY.PATH"),
    ("{[0.690, 0.771]} <- r.json served.ci95", "is not in the block"),
])
def test_a_differing_figure_or_a_broken_marker_fails(repo, entry, problem):
    problems = run(repo, f"<!-- figures\n{entry}\n-->\nDice 0.733 in 1 min 49 s, 0.72 [0.690\n")
    assert len(problems) == 1 and problem in problems[0], problems


def test_a_figure_in_another_paragraph_is_not_found(repo):
    """An entry covers the block right below its comment (up to the first blank line), not the rest of the file."""
    problems = run(repo, "<!-- figures\n{0.733} <- r.json served.mean_dice_3d\n-->\nno figure here\n\nDice 0.733\n")
    assert "is not in the block" in problems[0]
