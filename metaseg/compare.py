"""`metaseg compare`: two trained bundles scored on the same patients, nnU-Net style, and the model to serve recorded.

Reads, per run, `<run>/datalist.json` and the masks `metaseg evaluate` wrote for the compared split,
`<run>/<split>/masks/<patient>/<stem>_seg.png`: made by the engine as `metaseg predict` and the server make them, with
the inference steps `<run>/<split>/metrics.json` names, so every score here is of masks users get. The ground truth
and FLAIR come from the data source. Writes, each atomically:

    OUT/comparison.json   per-patient metrics (all of metaseg.metrics.patient_metrics), means with 95% bootstrap
                          CIs, paired test, patient lists, each model's inference steps, command
    OUT/comparison.md     the same as a table, with the conventions and links to the figures
    OUT/qualitative.png   best, median and worst lesion slice of the compared split, every model side by side
    OUT/training_curves.png  per-epoch training loss and validation Dice of each run
    best-out (OUT/best.json) the model to serve, readable by conventions.read_best

Model choice never rests on a split of a handful of patients (here the compared split, or a validation split):
the architecture is the one the shipped patient cross-validation chose (the bundle `bundles/best.json` names,
out of fold on every development patient), served with this run's weights of it, the input size it was trained at
and the inference steps its masks were scored with (best.json `overrides`: what is served is what was scored). The
compared split's numbers only report, whichever model they favour.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from metaseg import conventions, lesions
from metaseg.bundles import BUNDLES_DIR, NAMES
from metaseg.data import open_source, read_tiff
from metaseg.errors import UserError
from metaseg.files import write_bytes_atomic, write_json_atomic
from metaseg.metrics import (HD95_MISS, METRICS, UNSCORED_GT_VOXELS, bootstrap_ci, paired_difference,
                             patient_metrics, pooled, slice_dice)
from metaseg.pipeline import model_overrides

RANKING = "lesion slices of the compared split ranked by the mean slice Dice of the two models"
CONVENTIONS = {
    "dice_3d": "all slices of a patient pooled (one TP/FP/FN sum); no lesion and no prediction = 1, no lesion but "
    "any prediction = 0, so false positives on lesion-free slices lower it",
    "lesion_slice_dice": "Dice of each lesion slice (non-empty ground truth), averaged per patient, then over "
    "patients; lesion-free slices are not in it",
    "lesion_slice_iou": "as lesion_slice_dice, with IoU",
    "hd95_px": "95th-percentile Hausdorff distance in pixels (MONAI) of each lesion slice with a non-empty "
    "prediction, averaged per patient; a lesion slice with an empty prediction has no distance: it is left out "
    "and counted in hd95_empty_prediction_slices (its miss shows in Dice and sensitivity)",
    "slice_component_sensitivity": "per slice, not per lesion: ground-truth 2D components (8-connected, each "
    "slice on its own, so one lesion over five slices counts five) touched by any predicted pixel / those components",
    "slice_component_precision": "predicted 2D components (8-connected per slice) touching any ground-truth pixel / "
    "predicted 2D components; undefined (null) for a patient with no predicted component",
    "fp_slice_rate": "lesion-free slices with any predicted pixel / lesion-free slices",
    "lesion": "a 3D connected component (26-neighbourhood) of a patient's mask stack, metaseg/lesions.py; "
    f"ground-truth lesions of at most {UNSCORED_GT_VOXELS} voxels are not scored (BraTS-MET's threshold)",
    "lesion_matching": "a ground-truth lesion is matched by every predicted lesion overlapping it dilated by one voxel "
    "(18-neighbourhood, BraTS-MET); it is detected when it has a match; a predicted lesion matching none is a false "
    "positive (BraTS also merges ground-truth lesions whose dilations touch: here they stay two lesions)",
    "lesionwise_dice": "BraTS-METS 2023: per patient, the Dice of each ground-truth lesion against the union of its "
    "matches (0 if missed), plus a 0 for each false-positive lesion, averaged; 1 with no lesion and no prediction; "
    "then the mean over patients",
    "lesionwise_hd95_vox": f"as lesionwise_dice with the 95th-percentile Hausdorff distance in voxels (unit cubes: "
    f"the TIFFs carry no spacing), {HD95_MISS:g} (BraTS's penalty) for a missed or false-positive lesion, 0 with no "
    "lesion and no prediction",
    "lesion_sensitivity_3d": "detected ground-truth lesions / ground-truth lesions, pooled over all patients' lesions "
    "(a patient with five lesions weighs five); 95% CI: bootstrap over patients; also per size bin of the "
    "ground-truth lesion (voxels: < 100, 100-1000, > 1000)",
    "lesion_precision_3d": "predicted lesions matching a ground-truth lesion / predicted lesions, pooled as "
    "lesion_sensitivity_3d",
    "fp_lesions_per_patient": "predicted lesions matching no ground-truth lesion, mean over patients",
    "means": "over patients with a defined value (null = undefined, e.g. no lesion slice); 95% CI: percentile "
    "bootstrap over patients",
    "qualitative": RANKING,
}
EMPTY_SLICES = (
    "Empty slices: lesion-free slices count only in the 3D Dice (a false positive there adds FP pixels), in the "
    "slice-component precision (each false blob is a predicted component), in the FP slice rate (their share with "
    "any prediction) and in the lesion-wise figures (a false-positive lesion); lesion-slice Dice, IoU and HD95 use "
    "lesion slices only, and HD95 leaves out lesion slices the model left empty (counted in the last column)."
)
_LOSS_LINE = re.compile(r"Epoch: (\d+)/\d+, Iter: \d+/\d+ -- train_loss: ([-+.\deE]+|nan)")
_METRICS_LINE = re.compile(r"Epoch\[(\d+)\] Metrics -- ([^\r\n]*)")
_METRIC_PAIR = re.compile(r"(\w+): ([-+.\deE]+|nan)")


@dataclass
class Run:
    """One `metaseg train` run folder under the bundle name it is compared as."""

    name: str
    path: Path
    datalist: dict

    def mask_path(self, split: str, item: dict) -> Path:
        image = PurePosixPath(item["image"])
        return self.path / split / "masks" / image.parent / conventions.mask_file(image.stem)


def parse_run(text: str) -> tuple[str, Path]:
    """`NAME=DIR` from the command line, NAME a shipped bundle so that the best-model record can name it."""
    name, sep, folder = text.partition("=")
    if not sep or not folder or name not in NAMES:
        raise UserError(f"--run must be NAME=RUN_DIR with NAME one of {', '.join(NAMES)}, got {text!r}")
    return name, Path(folder)


def load_run(name: str, path: Path) -> Run:
    file = path / "datalist.json"
    if not file.is_file():
        raise UserError(f"no datalist.json in run folder {path} ({name}): train into it first (metaseg train --out)")
    try:
        return Run(name, path, json.loads(file.read_text()))
    except ValueError as err:
        raise UserError(f"unreadable {file}: {err}") from None


def comparable_items(runs: list[Run], split: str) -> list[dict]:
    """The split's slices, identical in every run: models are only compared on the same patients and slices."""
    first = runs[0]
    for run in runs[1:]:
        ours, theirs = first.datalist["patients"][split], run.datalist["patients"][split]
        if sorted(ours) != sorted(theirs):
            raise UserError(
                f"runs not comparable: {first.name} and {run.name} have different {split} patients "
                f"({len(set(ours) ^ set(theirs))} differ); train both with the same data and --seed"
            )
        if sorted(i["image"] for i in first.datalist[split]) != sorted(i["image"] for i in run.datalist[split]):
            raise UserError(f"runs not comparable: {first.name} and {run.name} list different {split} slices")
    return first.datalist[split]


def _again(run: Run, split: str) -> str:
    return f"metaseg evaluate --bundle {run.name} --run {run.path} --split {split}"


def check_masks(run: Run, split: str, items: list[dict]) -> None:
    """Every slice of the split needs its predicted mask; say which patients lack how many, and how to fix it."""
    again = _again(run, split)
    if not (run.path / split / "masks").is_dir():
        raise UserError(f"no {split} masks in {run.path / split / 'masks'} ({run.name}): run `{again}` first")
    missing: dict[str, int] = {}
    for item in items:
        if not run.mask_path(split, item).is_file():
            missing[item["patient"]] = missing.get(item["patient"], 0) + 1
    if missing:
        which = ", ".join(f"{patient}: {n}" for patient, n in sorted(missing.items()))
        raise UserError(
            f"{sum(missing.values())} of {len(items)} {split} masks missing in {run.path} ({run.name}; by patient: "
            f"{which}); rerun `{again}`"
        )


def read_evaluation(run: Run, split: str) -> dict:
    """What `metaseg evaluate` recorded of the split's masks, above all the inference steps that made them."""
    file = run.path / split / "metrics.json"
    try:
        evaluation = json.loads(file.read_text())
        if not isinstance(evaluation["inference_steps"], dict) or not isinstance(evaluation["steps"], str):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{file} does not name the inference steps that made the {split} masks of {run.name} (masks "
                        f"of an older `metaseg evaluate` or of the bundle's evaluate.json are not what is served): "
                        f"rerun `{_again(run, split)}`") from None
    return evaluation


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


def by_patient(items: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for item in sorted(items, key=lambda i: (i["patient"], i["slice"])):
        groups.setdefault(item["patient"], []).append(item)
    return groups


def _stack(masks: list[np.ndarray], what: str) -> np.ndarray:
    if len({m.shape for m in masks}) > 1:
        raise UserError(f"slices of {what} differ in size: {sorted({m.shape for m in masks})}")
    return np.stack(masks)


def member(root: str, path: str) -> str:
    """A patient-relative path of a datalist as a name in the data source (whose patients sit under `root`)."""
    return f"{root}/{path}" if root else path


def patients_root(names: set[str], recorded: str, label: str) -> str:
    """Where the patient folders sit in this source: the run's recorded root, else wherever `label` is found.

    So a Data folder and its Data.zip (with or without a top folder) both serve a run trained on either.
    """
    found = sorted(name[: -len(label) - 1] for name in names if name.endswith(f"/{label}"))
    for root in (recorded, "", *found):
        if member(root, label) in names:
            return root
    raise UserError(f"ground truth {label} not in the data source: is this the data the runs were trained on?")


def read_ground_truth(data: Path, recorded_root: str, groups: dict[str, list[dict]]) -> tuple[str, dict]:
    """(patients root in `data`, boolean ground-truth stack per patient) from the folder or zip of the runs."""
    with open_source(data) as files:
        names = set(files.names())
        first = next(iter(groups.values()))[0]["label"]
        root = patients_root(names, recorded_root, first)
        stacks = {}
        for patient, items in groups.items():
            masks = []
            for item in items:
                name = member(root, item["label"])
                if name not in names:
                    raise UserError(f"ground truth {name} not in {data}: is this the data the runs were trained on?")
                masks.append(read_tiff(files.read(name)) > 0)
            stacks[patient] = _stack(masks, f"patient {patient}")
    return root, stacks


def read_predictions(run: Run, split: str, groups: dict[str, list[dict]], truth: dict) -> dict[str, np.ndarray]:
    """Boolean predicted stack per patient, each slice checked against its ground truth's size."""
    stacks = {}
    for patient, items in groups.items():
        masks = []
        for item, gt in zip(items, truth[patient]):
            path = run.mask_path(split, item)
            try:
                mask = np.asarray(Image.open(path)) > 0
            except OSError as err:
                raise UserError(f"unreadable mask {path}: {err}") from None
            if mask.shape != gt.shape:
                raise UserError(f"{path} is {mask.shape}, its ground truth {gt.shape}: masks of another data set?")
            masks.append(mask)
        stacks[patient] = np.stack(masks)
    return stacks


def score(run: Run, split: str, truth: dict, preds: dict) -> list[dict]:
    """nnU-Net's metric_per_case, one entry per patient, naming the folder its masks came from."""
    return [
        {"patient": patient, **patient_metrics(truth[patient], preds[patient]),
         "prediction_dir": str(run.path / split / "masks" / patient)}
        for patient in truth
    ]


def summarize(per_patient: list[dict], n_resamples: int, seed: int) -> dict:
    """Mean, 95% bootstrap CI and number of defined values of every metric over patients, and the lesion detection
    figures pooled over patients (`pooled`, metaseg.metrics.pooled)."""
    summary: dict = {"mean": {}, "ci95": {}, "n": {}}
    for metric in METRICS:
        values = np.array([p[metric] for p in per_patient], float)
        defined = ~np.isnan(values)
        summary["mean"][metric] = float(values[defined].mean()) if defined.any() else math.nan
        summary["ci95"][metric] = list(bootstrap_ci(values, n_resamples, seed))
        summary["n"][metric] = int(defined.sum())
    summary["hd95_empty_prediction_slices"] = sum(p["hd95_empty_prediction_slices"] for p in per_patient)
    summary["pooled"] = pooled(per_patient, n_resamples, seed)
    return summary


def rank_slices(groups: dict, truth: dict, preds: dict[str, dict]) -> list[tuple[float, str, int]]:
    """(mean slice Dice of the models, patient, index in the patient's stack) of every lesion slice, worst first.

    The mean of both models ranks slices by how hard they are, not by how one model did. Without any lesion slice,
    every slice is ranked (both masks empty counts as Dice 1).
    """
    ranked, lesion = [], []
    for patient in groups:
        dices = np.mean([np.nan_to_num(slice_dice(truth[patient], p[patient]), nan=1.0) for p in preds.values()], 0)
        ranked += [(float(d), patient, i) for i, d in enumerate(dices)]
        lesion += truth[patient].any(axis=(1, 2)).tolist()
    return sorted(r for r, keep in zip(ranked, lesion) if keep or not any(lesion))


def figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def qualitative_figure(data: Path, root: str, split: str, groups, truth, preds, picks) -> bytes:
    """A row per picked slice: FLAIR, ground truth, and each model's prediction with its slice Dice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(picks), 2 + len(preds), figsize=(3 * (2 + len(preds)), 3.2 * len(picks)),
                             squeeze=False)
    with open_source(data) as files:
        for row, (label, (mean_dice, patient, index)) in zip(axes, picks):
            item = groups[patient][index]
            flair = read_tiff(files.read(member(root, item["image"])))[..., conventions.FLAIR_CHANNEL]
            gt = truth[patient][index]
            header = f"{label}: {patient} slice {item['slice']}\nmean Dice {mean_dice:.3f}\nFLAIR"
            panels = [(header, None, None), ("ground truth", gt, "lime")]
            panels += [(name, pred[patient][index], "red") for name, pred in preds.items()]
            for ax, (title, mask, color) in zip(row, panels):
                ax.imshow(flair, cmap="gray")
                if mask is not None:
                    ax.imshow(np.ma.masked_where(~mask, mask), cmap=matplotlib.colors.ListedColormap([color]),
                              alpha=0.45, interpolation="nearest")
                if color == "red":
                    ax.contour(gt, levels=[0.5], colors="lime", linewidths=0.7)
                    title += f"\nslice Dice {float(np.nan_to_num(slice_dice(gt[None], mask[None])[0], nan=1.0)):.3f}"
                ax.set_title(title, fontsize=9)
                ax.set_axis_off()
    fig.suptitle(f"{split}: {RANKING} (green outline = ground truth)", fontsize=10)
    data_png = figure_png(fig)
    plt.close(fig)
    return data_png


def _epoch_means(epochs, values) -> tuple[list[int], list[float]]:
    epochs, values = np.asarray(epochs, int), np.asarray(values, float)
    unique, index = np.unique(epochs, return_inverse=True)
    return unique.tolist(), (np.bincount(index, values) / np.bincount(index)).tolist()


def curves_from_events(folder: Path) -> dict | None:
    """Per-epoch curves from TensorBoard events; None without events.

    `train_loss` is logged per iteration: an iteration belongs to the epoch of the first validation logged after it
    (both bundles validate every epoch; with a longer val_interval a point averages the epochs since the last one).
    """
    if not any(folder.glob("events.out.tfevents.*")):
        return None
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    curves = {tag: ([e.step for e in events.Scalars(tag)], [e.value for e in events.Scalars(tag)])
              for tag in tags if tag.startswith("val_")}
    if "train_loss" in tags:
        loss = events.Scalars("train_loss")
        key = next((t for t in ("val_dice", "val_mean_dice") if t in tags), None)  # logged once per validation
        closing = events.Scalars(key) if key else []
        steps = [e.step for e in closing] + [closing[-1].step + 1 if closing else 1]  # the epoch still running
        index = np.searchsorted([e.wall_time for e in closing], [e.wall_time for e in loss])
        curves["train_loss"] = _epoch_means(np.asarray(steps)[index], [e.value for e in loss])
    return curves


def curves_from_log(log: Path) -> dict:
    """Per-epoch curves from the StatsHandler lines of train.log, for runs without TensorBoard events."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    losses = [(int(e), float(v)) for e, v in _LOSS_LINE.findall(text)]
    curves = {"train_loss": _epoch_means(*zip(*losses))} if losses else {}
    for epoch, pairs in _METRICS_LINE.findall(text):
        for tag, value in _METRIC_PAIR.findall(pairs):
            curves.setdefault(tag, ([], []))
            curves[tag][0].append(int(epoch))
            curves[tag][1].append(float(value))
    return curves


def training_curves_figure(runs: list[Run]) -> bytes:
    """Training loss and validation Dice per epoch, every run on the same two panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (loss_ax, dice_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for color, run in zip(("tab:blue", "tab:orange"), runs):
        curves = curves_from_events(run.path / "eval") or curves_from_log(run.path / "train.log")
        if "train_loss" in curves:
            loss_ax.plot(*curves["train_loss"], "o-", color=color, label=run.name, markersize=3)
        for tag, style in (("val_dice", "o-"), ("val_lesion_dice", "s--")):
            if tag in curves:
                dice_ax.plot(*curves[tag], style, color=color, label=f"{run.name} {tag}", markersize=3)
    loss_ax.set(title="training loss (mean per epoch)", xlabel="epoch", ylabel="loss")
    dice_ax.set(title="validation Dice per epoch", xlabel="epoch", ylabel="Dice", ylim=(0, 1))
    for ax in (loss_ax, dice_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    data_png = figure_png(fig)
    plt.close(fig)
    return data_png


def null_nan(obj):
    """JSON has no NaN: undefined values are written as null."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: null_nan(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [null_nan(v) for v in obj]
    return obj


def ci_cell(summary: dict, metric: str, digits: int = 3) -> str:
    """`mean [low, high]` of a metric of `summarize`: its mean over patients, or its pooled figure (POOLED)."""
    if metric in summary["mean"]:
        value, (low, high) = summary["mean"][metric], summary["ci95"][metric]
    else:
        value, (low, high) = summary["pooled"][metric]["value"], summary["pooled"][metric]["ci95"]
    if math.isnan(value):
        return "n/a"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


# the lesion-wise columns of every report table: (metric of `summarize`, header, digits)
LESION_COLUMNS = (
    ("lesionwise_dice", "lesion-wise Dice", 3),
    ("lesionwise_hd95_vox", "lesion-wise HD95 (voxels)", 1),
    ("lesion_sensitivity_3d", "lesion sensitivity (3D, pooled)", 3),
    ("lesion_precision_3d", "lesion precision (3D, pooled)", 3),
    ("fp_lesions", "FP lesions per patient", 2),
)


def slice_columns() -> list[str]:
    """The voxel and per-slice columns of a report table: every metric of METRICS but the lesion-wise ones (a metric
    added there reaches the reports by itself)."""
    lesion_wise = {metric for metric, _, _ in LESION_COLUMNS}
    return [metric for metric in METRICS if metric not in lesion_wise]


def lesion_rows(models: dict) -> list[str]:
    """The lesion-wise table of a report (markdown lines): one row per model summary, with the pooled sensitivity
    per size bin of the ground-truth lesion."""
    bins = next(iter(models.values()))["pooled"]["by_size"] if models else {}
    lines = ["| model | GT lesions | " + " | ".join(header for _, header, _ in LESION_COLUMNS) + " | " +
             " | ".join(f"sensitivity {name}" for name in bins) + " |",
             "|---|---|" + "---|" * (len(LESION_COLUMNS) + len(bins))]
    for name, summary in models.items():
        cells = [ci_cell(summary, m, d) for m, _, d in LESION_COLUMNS]
        cells += [f"{b['detected']}/{b['lesions']}" for b in summary["pooled"]["by_size"].values()]
        lines.append(f"| {name} | {summary['pooled']['lesion_sensitivity_3d']['gt_lesions']} | " + " | ".join(cells)
                     + " |")
    return lines


def lesion_note(folder: Path) -> str:
    """What the lesion-wise columns mean, for a markdown report written in `folder` (it links metaseg/lesions.py)."""
    link = os.path.relpath(Path(lesions.__file__).resolve(), Path(folder).resolve()).replace(os.sep, "/")
    return (f"Lesions as BraTS-METS 2023 scores them: a lesion is a 3D connected component ([metaseg/lesions.py]"
            f"({link})); a ground-truth lesion is detected when a predicted lesion overlaps it dilated by one voxel, "
            f"scores the Dice and HD95 of it against its matches (0 and {HD95_MISS:g} if missed), and each "
            f"false-positive lesion adds a 0 and a {HD95_MISS:g} to the patient's lesion-wise means; sensitivity and "
            "precision pool all lesions of all patients, the sensitivity per size bin reads detected / ground-truth "
            f"lesions; HD95 in voxels (the TIFFs carry no spacing); ground-truth lesions of at most "
            f"{UNSCORED_GT_VOXELS} voxels are not scored. Conventions in full: `conventions` in the JSON report.")


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
    low, high = paired["ci95"]
    p = f"Wilcoxon signed-rank p = {paired['wilcoxon_p']:.4g}" if paired["wilcoxon_p"] is not None else paired["note"]
    lines += [
        "",
        f"Paired test, per-patient 3D Dice {a} − {b} over {paired['n_patients']} patients: mean difference "
        f"{paired['mean_difference']:+.3f} [95% CI {low:+.3f}, {high:+.3f}]; {p}.",
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
    write_json_atomic(out / "comparison.json", null_nan(report))
    write_bytes_atomic(out / "comparison.md", markdown(report, out).encode())
    write_best(best_out, runs, best, report, out / "comparison.md")
    return report


def _model_overrides(run: Run) -> dict:
    """The config overrides inference must repeat (input size), from run.json; {} for runs older than run.json."""
    return model_overrides(run.path) if (run.path / "run.json").is_file() else {}


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
