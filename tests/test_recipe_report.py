"""The recipe comparison (metaseg.evaluation.recipes) through its two entry points, benchmarks/recipe_report.py (the
per-arm recipe table) and `benchmarks/gpu_cv.py arms` (two recipes, every metric), on hand-made scored runs (what
`gpu_cv.py score` writes)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import REPO
from metaseg.data.discovery import discover
from metaseg.errors import UserError
from metaseg.evaluation.recipe_markdown import arms_markdown, recipe_markdown


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


recipe_report, gpu_cv = load("recipe_report"), load("gpu_cv")


def scored_run(folder: Path, seed: int, dice: dict[str, float], recipe: dict, seconds: int = 600) -> Path:
    (folder / "unetpp").mkdir(parents=True)
    (folder / "cv_plan.json").write_text(json.dumps({"folds": 3, "seed": seed, "recipe": recipe}))
    for k in range(3):
        (folder / "unetpp" / f"fold_{k}").mkdir()
        (folder / "unetpp" / f"fold_{k}" / "trained.json").write_text(json.dumps({"seconds": seconds}))
    scores = {p: {"fold": 0, "dice_3d": d, "lesion_slice_dice": d, "fp_slice_rate": 0.1, "lesionwise_dice": d / 2,
                  "fp_lesions": 1, "gt_lesions": 2, "gt_lesions_detected": 1 + (d > 0.7)} for p, d in dice.items()}
    (folder / "scores.json").write_text(json.dumps(scores))
    return folder


def test_an_arm_is_kept_only_when_its_paired_gain_clears_the_seed_spread(tiny_data, tmp_path):
    patients = discover(tiny_data).patients
    base = [scored_run(tmp_path / f"base_s{s}", s, {p: 0.60 + 0.02 * s + 0.01 * i for i, p in enumerate(patients)},
                       {"epochs": 6}) for s in (0, 1)]  # per-seed means 0.645 and 0.665: a spread of 0.02
    big = [scored_run(tmp_path / f"big_s{s}", s, {p: 0.75 + 0.01 * i for i, p in enumerate(patients)},
                      {"epochs": 6, "brain_crop": True}, seconds=900) for s in (0, 1)]
    small = [scored_run(tmp_path / f"small_s{s}", s, {p: 0.62 + 0.01 * i for i, p in enumerate(patients)},
                        {"epochs": 6, "lesion_area_sampling": True}) for s in (0, 1)]
    out = tmp_path / "report"
    recipe_report.main(["--data", str(tiny_data), "--base", *map(str, base), "--arm", f"big={big[0]},{big[1]}",
                        "--arm", f"small={small[0]},{small[1]}", "--out", str(out)])
    result = json.loads((out / "recipe.json").read_text())
    rows = {row["arm"]: row for row in result["arms"]}
    base_row, big_row, small_row = rows["base (shipped recipe)"], rows["big"], rows["small"]
    assert base_row["seed_spread"] == pytest.approx(0.02) and "kept" not in base_row
    assert big_row["paired_gain_dice_3d"]["mean_difference"] == pytest.approx(0.14) and big_row["kept"]
    assert small_row["paired_gain_dice_3d"]["mean_difference"] == pytest.approx(0.01)  # a gain on every patient,
    assert small_row["paired_gain_dice_3d"]["ci95"][0] > 0 and not small_row["kept"]  # but within the seed spread
    assert big_row["cpu_minutes_per_cv"] == pytest.approx(45) and base_row["cpu_minutes_per_cv"] == pytest.approx(30)
    assert big_row["lesion_sensitivity_3d"] == 1.0 and base_row["lesion_sensitivity_3d"] == pytest.approx(21 / 40)
    # every patient has the same lesion: the halves split by id, P00-P04 the "smaller"
    assert big_row["dice_3d_smaller_half"] == pytest.approx(0.77) and big_row["dice_3d_larger_half"] == pytest.approx(0.82)
    table = (out / "recipe.md").read_text()
    assert "| big | `epochs=6, brain_crop=true` | 0, 1 | 0.795" in table and "| yes |" in table and "| no |" in table


def test_recipe_report_refuses_unscored_runs_and_bad_arms(tiny_data, tmp_path):
    base = scored_run(tmp_path / "base_s0", 0, {"P00": 0.5}, {"epochs": 6})
    (tmp_path / "unscored").mkdir()
    with pytest.raises(UserError, match="no scores.json"):
        recipe_report.main(["--data", str(tiny_data), "--base", str(base), "--arm", f"x={tmp_path / 'unscored'}",
                            "--out", str(tmp_path / "out")])
    (base / "scores.json").write_text("{not json")
    with pytest.raises(UserError, match="unreadable"):
        recipe_report.main(["--data", str(tiny_data), "--base", str(base), "--arm", f"x={base}",
                            "--out", str(tmp_path / "out")])
    with pytest.raises(UserError, match="LABEL=RUNS"):
        recipe_report.parse_arm("no-runs")
    assert not (tmp_path / "out").exists()


def test_gpu_cv_arms_carry_train_json_settings():
    assert gpu_cv.parse_arm("crop:6:brain_crop=true,brain_margin=8") == ("crop", "6", {"brain_crop": True,
                                                                                       "brain_margin": 8})
    assert gpu_cv.parse_arm("base:18") == ("base", "18", {})
    scheduler = {"_target_": "monai.optimizers.WarmupCosineSchedule", "optimizer": "@optimizer", "warmup_steps": 3,
                 "t_total": "$@epochs * len(@train#dataloader)", "note": "a \"quoted, comma\" here"}
    spec = f"warm:12:lr_scheduler={json.dumps(scheduler)},train#handlers#0#epoch_level=false,w=[1,2]"
    assert gpu_cv.parse_arm(spec) == ("warm", "12", {"lr_scheduler": scheduler,
                                                     "train#handlers#0#epoch_level": False, "w": [1, 2]})
    assert gpu_cv.parse_arm('x:6:a="b\\\\",c= 1 ,') == ("x", "6", {"a": "b\\", "c": 1})  # a string ending in \\
    for bad in ("crop", ":6", "crop:six", "crop:6:brain_crop", "crop:6:=true", "crop:6:brain_crop=yes",
                "crop:6:a=1 2", "crop:6:a,b=1", "crop:6:a={\"b\": 1"):
        with pytest.raises(UserError, match="--arm"):
            gpu_cv.parse_arm(bad)


def test_a_kept_report_carries_its_rows_and_pairs_new_arms_with_its_base(tiny_data, tmp_path):
    patients = discover(tiny_data).patients
    base = [scored_run(tmp_path / f"base_s{s}", s, {p: 0.60 + 0.02 * s + 0.01 * i for i, p in enumerate(patients)},
                       {"epochs": 6}) for s in (0, 1)]

    def runs(name: str, start: float) -> list[Path]:
        dice = [{p: start + 0.03 * s * (i % 2) for i, p in enumerate(patients)} for s in (0, 1)]
        return [scored_run(tmp_path / f"{name}_s{s}", s, dice[s], {"epochs": 12}) for s in (0, 1)]

    arm = {"a": runs("a", 0.7), "b": runs("b", 0.5)}
    spec = {name: f"{name}={runs[0]},{runs[1]}" for name, runs in arm.items()}
    common = ["--data", str(tiny_data), "--out"]
    recipe_report.main([*common, str(tmp_path / "all"), "--base", *map(str, base), "--arm", spec["a"],
                        "--arm", spec["b"]])
    recipe_report.main([*common, str(tmp_path / "first"), "--base", *map(str, base), "--arm", spec["a"]])
    for run in base + arm["a"]:  # the earlier runs are gone with their machine
        (run / "scores.json").unlink()
    recipe_report.main([*common, str(tmp_path / "then"), "--keep", str(tmp_path / "first" / "recipe.json"),
                        "--arm", spec["b"]])
    everything = json.loads((tmp_path / "all" / "recipe.json").read_text())
    carried = json.loads((tmp_path / "then" / "recipe.json").read_text())
    assert carried["arms"] == everything["arms"]  # the same rows as from all the runs at once
    assert "--keep" in carried["command"] and "--arm a=" in carried["earlier_commands"][0]
    assert f"carrying the rows of `{carried['earlier_commands'][0]}`" in (tmp_path / "then" / "recipe.md").read_text()

    fewer = scored_run(tmp_path / "c_s0", 0, {p: 0.5 for p in patients[:3]}, {"epochs": 6})
    with pytest.raises(UserError, match=f"scored 3 of the kept report's {len(patients)} patients"):
        recipe_report.main([*common, str(tmp_path / "x"), "--keep", str(tmp_path / "then" / "recipe.json"),
                            "--arm", f"c={fewer}"])
    with pytest.raises(UserError, match="not 'attention_unet'"):
        recipe_report.main([*common, str(tmp_path / "x"), "--keep", str(tmp_path / "then" / "recipe.json"),
                            "--arm", spec["b"], "--bundle", "attention_unet"])
    no_command = {k: v for k, v in carried.items() if k != "command"}
    for bad in ('{"arms": []}', "{not json", json.dumps(no_command)):
        (tmp_path / "bad.json").write_text(bad)
        with pytest.raises(UserError, match="not a readable recipe report"):
            recipe_report.main([*common, str(tmp_path / "x"), "--keep", str(tmp_path / "bad.json"),
                                "--arm", spec["b"]])
    assert not (tmp_path / "x").exists()


def arm_run(folder: Path, dice: list[float], lesionwise: list[float] | None = None) -> Path:
    """A scored run of patients P0.. (what `gpu_cv.py score` writes; arms reads nothing else)."""
    folder.mkdir(parents=True)
    lesionwise = lesionwise or dice
    scores = {f"P{i}": {"dice_3d": d, "lesion_slice_dice": d, "fp_slice_rate": 0.1, "lesionwise_dice": w,
                        "fp_lesions": 1} for i, (d, w) in enumerate(zip(dice, lesionwise))}
    (folder / "scores.json").write_text(json.dumps(scores))
    return folder


def test_gpu_cv_arms_pairs_the_seed_means_of_two_recipes_by_patient(tmp_path):
    nan = float("nan")
    base = [arm_run(tmp_path / "base_s0", [0.5, 0.6, 0.7, 0.8], [nan, 0.6, 0.7, 0.8]),
            arm_run(tmp_path / "base_s1", [0.7, 0.6, 0.5, 0.8])]  # per patient 0.6, 0.6, 0.6, 0.8
    new = [arm_run(tmp_path / "new_s0", [0.7, 0.8, 0.9, 1.0]),
           arm_run(tmp_path / "new_s1", [0.9, 0.8, 0.7, 0.8, 0.3])]  # per patient 0.8, 0.8, 0.8, 0.9; P4 unpaired
    out = tmp_path / "arms"
    gpu_cv.main(["arms", "--base", *map(str, base), "--new", *map(str, new), "--out", str(out)])
    result = json.loads((out / "arms.json").read_text())
    dice = result["metrics"]["dice_3d"]
    assert result["n_patients"] == 4
    assert dice["base"]["mean"] == pytest.approx(0.65) and dice["new"]["mean"] == pytest.approx(0.825)
    assert dice["base"]["per_seed"] == pytest.approx({"base_s0": 0.65, "base_s1": 0.65})
    assert dice["new"]["per_seed"] == pytest.approx({"new_s0": 0.85, "new_s1": 0.8})
    paired = dice["paired_new_minus_base"]  # +0.2, +0.2, +0.2, +0.1
    assert paired["mean_difference"] == pytest.approx(0.175) and paired["wilcoxon_p"] is None  # 4 pairs: untestable
    # a resample's mean gain is 0.2 - 0.025 k, k ~ Binomial(4, 1/4) the draws of the +0.1: P(k = 0) = 0.32 and
    # P(k >= 3) = 0.05 > 0.025 > P(k = 4) = 0.004, so the 95% CI is [0.125, 0.2]; the base's, likewise, [0.6, 0.75]
    assert paired["ci95"] == pytest.approx([0.125, 0.2]) and dice["base"]["ci95"] == pytest.approx([0.6, 0.75])
    # a seed's NaN is left out of the patient's mean: P0's lesion-wise Dice is base_s1's 0.7 alone
    assert result["metrics"]["lesionwise_dice"]["base"]["mean"] == pytest.approx((0.7 + 0.6 + 0.6 + 0.8) / 4)
    table = (out / "arms.md").read_text()
    assert table.startswith("# new_s0, new_s1 against base_s0, base_s1\n")
    assert f"`python benchmarks/gpu_cv.py arms --base {base[0]} {base[1]} --new {new[0]} {new[1]} --out {out}`" in table
    assert ("| `dice_3d` | 0.650 [0.600, 0.750] | 0.825 [0.800, 0.875] | 0.650, 0.650 | 0.850, 0.800 "
            "| +0.175 [+0.125, +0.200] | n/a |") in table
    with pytest.raises(UserError, match="no scores.json"):
        gpu_cv.main(["arms", "--base", str(base[0]), "--new", str(tmp_path), "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_the_committed_recipe_tables_read_as_their_json_renders_them():
    """reports/recipe.md and reports/cv_schedule/arms.md were written by the code before it moved into the library:
    rendered again from their JSON, they come out byte for byte."""
    recipe = json.loads((REPO / "reports" / "recipe.json").read_text())
    assert recipe_markdown(recipe) == (REPO / "reports" / "recipe.md").read_text()
    arms = json.loads((REPO / "reports" / "cv_schedule" / "arms.json").read_text())
    command = " ".join(["python benchmarks/gpu_cv.py arms --base", *arms["base"], "--new", *arms["new"],
                        "--out reports/cv_schedule"])
    assert arms_markdown(arms, command) == (REPO / "reports" / "cv_schedule" / "arms.md").read_text()
