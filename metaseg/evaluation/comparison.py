"""`metaseg compare`: two trained bundles scored on the same patients, nnU-Net style, and the model to serve recorded.

Reads, per run, `<run>/datalist.json` and the masks `metaseg evaluate` wrote for the compared split,
`<run>/<split>/masks/<patient>/<stem>_seg.png`: made by the engine as `metaseg predict` and the server make them, with
the inference steps `<run>/<split>/metrics.json` names, so every score here is of masks users get. The ground truth
and FLAIR come from the data source. Writes, each atomically:

    OUT/comparison.json   per-patient metrics (all of metaseg.evaluation.metrics.patient_metrics), means with 95%
                          bootstrap CIs, paired test, patient lists, each model's inference steps, command
    OUT/comparison.md     the same as a table, with the conventions and links to the figures
    OUT/qualitative.png   best, median and worst lesion slice of the compared split, every model side by side
    OUT/training_curves.png  per-epoch training loss and validation Dice of each run
    OUT/froc.png          each model's lesion detection FROC, as `metaseg evaluate` computed it on the same masks
                          (its metrics.json `froc`; a model evaluated before that has none: `froc` null)
    best-out (OUT/best.json) the model to serve, readable by conventions.read_best

Model choice never rests on a split of a handful of patients (here the compared split, or a validation split):
the architecture is the one the shipped patient cross-validation chose (the bundle `bundles/best.json` names,
out of fold on every development patient), served with this run's weights of it, the input size it was trained at
and the inference steps its masks were scored with (best.json `overrides`: what is served is what was scored). The
compared split's numbers only report, whichever model they favour.
"""


from __future__ import annotations

import json
import shlex
from pathlib import Path

from metaseg import conventions
from metaseg.bundles import BUNDLES_DIR, NAMES
from metaseg.data.datalist import by_patient
from metaseg.data.ground_truth import read_ground_truth
from metaseg.errors import UserError
from metaseg.evaluation.figures import (RANKING, froc_figure, qualitative_figure, rank_slices,
                                        training_curves_figure)
from metaseg.evaluation.metrics import paired_difference
from metaseg.evaluation.paired import difference_ci
from metaseg.evaluation.reports import (CONVENTIONS, ci_cell, froc_rows, lesion_note, lesion_rows, null_nan,
                                        slice_columns, summarize)
from metaseg.evaluation.runs import (Run, check_masks, comparable_items, load_run, read_evaluation, read_predictions,
                                     score)
from metaseg.files import write_bytes_atomic, write_json_atomic

EMPTY_SLICES = (
    "Empty slices: lesion-free slices count only in the 3D Dice (a false positive there adds FP pixels), in the "
    "slice-component precision (each false blob is a predicted component), in the FP slice rate (their share with "
    "any prediction) and in the lesion-wise figures (a false-positive lesion); lesion-slice Dice, IoU and HD95 use "
    "lesion slices only, and HD95 leaves out lesion slices the model left empty (counted in the last column)."
)


def chosen_architecture(record: Path, names: list[str]) -> str:
    """The bundle the patient cross-validation chose (`record`: bundles/best.json), one of the compared `names`."""
    name = conventions.read_best(record).bundle.name
    if name not in names:
        raise UserError(f"the cross-validation chose {name} ({record}), which is not among the compared runs "
                        f"({', '.join(names)}): compare a run of it")
    return name


def selected_by(record: Path, architecture: str, split: str, n_patients: int) -> str:
    """The rule the best-model record follows, in the words the report and best.json use."""
    try:
        shown = record.resolve().relative_to(BUNDLES_DIR.parent).as_posix()
    except ValueError:  # a record outside the repository
        shown = str(record)
    return (f"architecture: {architecture}, the one the patient cross-validation chose ({shown}, out-of-fold "
            f"per-patient 3D Dice on every development patient), served with this run's weights of it; the "
            f"{n_patients} {split} patients only report (a handful of patients cannot choose a model)")



def markdown(report: dict, out: Path = Path("reports")) -> str:
    """comparison.md: the tables (voxel and per-slice, then lesion-wise), the paired test, the inference steps,
    the model to serve and why, the conventions and the figures."""
    split, models, paired = report["split"], report["models"], report["paired_test"]
    a, b = paired["models"]
    n = len(report["patients"][split])
    lines = [
        f"# Model comparison on {n} {split} patients",
        "",
        f"Produced by `{report['command']}`. Every cell: mean over patients [95% bootstrap CI], of the masks users "
        "get (`metaseg evaluate`: each model's weights through the engine, each patient one volume, with the "
        "inference steps below, as `metaseg predict` and the server run them).",
        "",
        "| model | " + " | ".join(f"`{m}`" for m in slice_columns()) + " | lesion slices without prediction |",
        "|---|" + "---|" * (len(slice_columns()) + 1),
    ]
    for name, summary in models.items():
        cells = [ci_cell(summary, m, 2 if m.startswith("hd95") else 3) for m in slice_columns()]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {summary['hd95_empty_prediction_slices']} |")
    lines += ["", *lesion_rows(models), "", lesion_note(out)]
    lines += ["", "Lesion detection FROC (sensitivity at each rate of false lesions per patient as a threshold on "
              "each lesion's highest probability sweeps, and the CPM, their mean):", "", *froc_rows(frocs(report)),
              *(f"- {name}: no FROC: " + ("no scored ground-truth lesion" if summary["froc"] else "its masks were "
                "evaluated before `metaseg evaluate` computed one; rerun `metaseg evaluate`")
                for name, summary in models.items() if name not in frocs(report)),
              "", "![FROC](froc.png)"]
    p = f"Wilcoxon signed-rank p = {paired['wilcoxon_p']:.4g}" if paired["wilcoxon_p"] is not None else paired["note"]
    lines += [
        "",
        f"Paired test, per-patient 3D Dice {a} − {b} over {paired['n_patients']} patients: mean difference "
        f"{difference_ci(paired, '95% CI ')}; {p}.",
        "",
        "Inference steps of the scored masks:",
        "",
    ]
    lines += [f"- {name}: {summary['steps']} (`{json.dumps(summary['inference_steps'])}`)"
              for name, summary in models.items()]
    lines += [
        "",
        f"Model to serve: **{report['best']}**. {report['selected_by'][0].upper()}{report['selected_by'][1:]}. "
        f"Served with the inference steps its masks above were scored with: {models[report['best']]['steps']}.",
        "",
        EMPTY_SLICES,
        "",
        "Patients (split by patient, never by slice):",
        "",
    ]
    lines += [f"- {name} ({len(ids)}): {', '.join(ids)}" for name, ids in report["patients"].items()]
    lines += [
        "",
        f"## Qualitative: best, median and worst slice ({RANKING})",
        "",
        "![qualitative](qualitative.png)",
        "",
        "## Training curves",
        "",
        "![training curves](training_curves.png)",
        "",
    ]
    return "\n".join(lines)


def frocs(report: dict) -> dict[str, dict]:
    """The models' FROCs that `metaseg evaluate` computed, by model, where defined (its CPM is null without any
    scored ground-truth lesion)."""
    return {name: model["froc"] for name, model in report["models"].items()
            if model["froc"] is not None and model["froc"]["cpm"] is not None}


def command_line(data: Path, named: list[tuple[str, Path]], split: str, out: Path, best_out: Path,
                 n_resamples: int, seed: int) -> str:
    runs = [arg for name, path in named for arg in ("--run", f"{name}={path}")]
    return shlex.join(["metaseg", "compare", "--data", str(data), *runs, "--split", split, "--out", str(out),
                       "--best-out", str(best_out), "--bootstrap", str(n_resamples), "--seed", str(seed)])


def compare(data: Path, named: list[tuple[str, Path]], split: str = "test", out: Path = Path("reports"),
            best_out: Path | None = None, n_resamples: int = 2000, seed: int = 0,
            architecture_record: Path = conventions.BEST_FILE) -> dict:
    """Score both runs' `split` masks, write the reports and the best-model record (the architecture
    `architecture_record` names, see the module docstring); return the report."""
    if len(named) != 2 or named[0][0] == named[1][0]:
        raise UserError(f"compare takes two --run NAME=DIR with different names ({', '.join(NAMES)}), got "
                        f"{[name for name, _ in named]}")
    if not Path(data).exists():
        raise UserError(f"data not found: {data}")
    best_out = best_out or out / "best.json"
    runs = [load_run(name, path) for name, path in named]
    best = chosen_architecture(architecture_record, [run.name for run in runs])
    groups = by_patient(comparable_items(runs, split))
    evaluations = {}
    for run in runs:
        check_masks(run, split, [i for items in groups.values() for i in items])
        evaluations[run.name] = read_evaluation(run, split)
    root, truth = read_ground_truth(data, runs[0].datalist["root"], groups)
    preds = {run.name: read_predictions(run, split, groups, truth) for run in runs}
    scores = {run.name: score(run, split, truth, preds[run.name]) for run in runs}
    a, b = (run.name for run in runs)
    dice = {name: [p["dice_3d"] for p in scores[name]] for name in (a, b)}
    report = {
        "command": command_line(data, named, split, out, best_out, n_resamples, seed),
        "data": str(data),
        "split": split,
        "conventions": CONVENTIONS,
        "models": {
            run.name: {"run": str(run.path), "steps": evaluations[run.name]["steps"],
                       "inference_steps": evaluations[run.name]["inference_steps"],
                       "froc": evaluations[run.name].get("froc"),
                       **summarize(scores[run.name], n_resamples, seed), "metric_per_patient": scores[run.name]}
            for run in runs
        },
        "paired_test": {"metric": "dice_3d", "models": [a, b], "difference": f"{a} - {b}",
                        **paired_difference(dice[a], dice[b], n_resamples, seed)},
        "best": best,
        "selected_by": selected_by(architecture_record, best, split, len(groups)),
        "patients": {s: runs[0].datalist["patients"][s] for s in ("test", "validation", "training")},
    }
    ranked = rank_slices(groups, truth, preds)
    picks = [("best", ranked[-1]), ("median", ranked[len(ranked) // 2]), ("worst", ranked[0])]
    write_bytes_atomic(out / "qualitative.png", qualitative_figure(data, root, split, groups, truth, preds, picks))
    write_bytes_atomic(out / "training_curves.png", training_curves_figure(runs))
    write_bytes_atomic(out / "froc.png", froc_figure(frocs(report)))
    write_json_atomic(out / "comparison.json", null_nan(report))
    write_bytes_atomic(out / "comparison.md", markdown(report, out).encode())
    write_best(best_out, runs, best, report, out / "comparison.md")
    return report


def _model_overrides(run: Run) -> dict:
    """The config overrides inference must repeat (input size), from run.json; {} for runs older than run.json."""
    return conventions.model_overrides(run.path) if (run.path / conventions.RUN_RECORD).is_file() else {}


def write_best(file: Path, runs: list[Run], best: str, report: dict, md: Path) -> Path:
    """The best-model record `metaseg.conventions.read_best` reads: the run's weights, its input size, and the
    inference steps its masks were scored with, so that what is served is what was scored."""
    run, model = next(r for r in runs if r.name == best), report["models"][best]
    return conventions.write_best(
        file, best, conventions.default_weights(run.path),
        {**_model_overrides(run), "inference_steps": model["inference_steps"]}, report=md,
        selected_by=report["selected_by"], inference_steps_note=model["steps"],
        **({"test_dice_3d": {name: m["mean"]["dice_3d"] for name, m in report["models"].items()}}
           if report["split"] == "test" else {}),
    )
