"""The reports' figures as PNG bytes: the qualitative best/median/worst slices, the training curves of runs, the
cross-validation's per-fold Dice, the FROC of lesion detection and the strips of its worst patients."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
from scipy.ndimage import binary_erosion

from metaseg import conventions
from metaseg.data.discovery import member, open_source, read_tiff
from metaseg.evaluation.froc import FP_RATES
from metaseg.evaluation.metrics import slice_dice
from metaseg.evaluation.runs import Run

RANKING = "lesion slices of the compared split ranked by the mean slice Dice of the two models"
_LOSS_LINE = re.compile(r"Epoch: (\d+)/\d+, Iter: \d+/\d+ -- train_loss: ([-+.\deE]+|nan)")
_METRICS_LINE = re.compile(r"Epoch\[(\d+)\] Metrics -- ([^\r\n]*)")
_METRIC_PAIR = re.compile(r"(\w+): ([-+.\deE]+|nan)")


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


def read_flair(files, root: str, item: dict) -> np.ndarray:
    """The FLAIR channel of a datalist item's slice, from an open data source (metaseg.data.discovery.open_source)."""
    return read_tiff(files.read(member(root, item["image"])))[..., conventions.FLAIR_CHANNEL]


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
            flair = read_flair(files, root, item)
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



def folds_figure(result: dict) -> bytes:
    """Per-patient 3D Dice of every fold, one colour per model, the fold mean as a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = result["models"]
    fig, ax = plt.subplots(figsize=(2 + 1.6 * result["folds"], 4))
    width = 0.8 / max(len(models), 1)
    fold_of = {p: int(k) for k, ids in result["patients"].items() for p in ids}
    for i, (name, entry) in enumerate(models.items()):
        x_of = {k: k - 0.4 + width * (i + 0.5) for k in range(result["folds"])}
        xs = [x_of[fold_of[p]] for p in entry["dice_3d_per_patient"]]
        ax.plot(xs, list(entry["dice_3d_per_patient"].values()), "o", color=f"C{i}", alpha=0.6, markersize=4,
                label=f"{name} (mean {entry['mean_dice_3d']:.3f})")
        for k, fold in entry["per_fold"].items():
            ax.hlines(fold["mean_dice_3d"], x_of[int(k)] - width / 2, x_of[int(k)] + width / 2, color=f"C{i}")
    ax.set(title="out-of-fold per-patient 3D Dice (lines: fold means)", xlabel="fold", ylabel="3D Dice",
           ylim=(-0.02, 1.02), xticks=range(result["folds"]))
    return _gridded_png(fig, ax, "lower left" if models else None)


def froc_figure(curves: dict[str, dict]) -> bytes:
    """Lesion sensitivity against false lesions per patient (log scale, ticks at the CPM's rates) of each model's FROC
    (metaseg.evaluation.froc), each CPM in the title; points without a false lesion sit at the left edge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    low, high = FP_RATES[0] / 2, FP_RATES[-1] * 2
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, froc) in enumerate(curves.items()):
        points = sorted(froc["points"], key=lambda p: p["fp_per_patient"])
        ax.step([min(max(p["fp_per_patient"], low), high) for p in points], [p["sensitivity"] for p in points],
                "o-", where="post", color=f"C{i}", markersize=3, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(FP_RATES, [f"1/{1 / rate:g}" if rate < 1 else f"{rate:g}" for rate in FP_RATES])
    ax.minorticks_off()
    ax.set(xlim=(low, high), ylim=(-0.02, 1.02), xlabel="false lesions per patient", ylabel="lesion sensitivity (3D)",
           title="FROC, CPM " + ", ".join(f"{name} {froc['cpm']:.3f}" for name, froc in curves.items()))
    return _gridded_png(fig, ax, "lower right" if curves else None)


def _gridded_png(fig, ax, legend: str | None) -> bytes:
    """A one-panel figure finished the reports' way (a light grid, the legend where `legend` says, none for None),
    as PNG bytes, and closed."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=8, loc=legend)
    data = figure_png(fig)
    plt.close(fig)
    return data


TRUTH_COLOUR, PREDICTION_COLOUR = (0, 255, 0), (255, 0, 255)  # green and magenta: apart for red-green colour blindness
BOTH_COLOUR = (255, 255, 0)  # yellow where the two outlines run together
STRIP_GAP = 4  # white pixels between two slices of a strip


def outline(mask: np.ndarray) -> np.ndarray:
    """The pixels of a 2D mask on its border (in the mask, a 4-neighbour not)."""
    return mask & ~binary_erosion(mask, border_value=0)


def outlines_strip(flairs: list[np.ndarray], truth: np.ndarray, pred: np.ndarray) -> bytes:
    """The slices side by side in gray, each with the ground truth's outline in TRUTH_COLOUR, the prediction's in
    PREDICTION_COLOUR and BOTH_COLOUR where they are the same pixels (uint8 FLAIR as stored; `truth`, `pred`: boolean
    (slices, rows, cols)), as PNG bytes. Drawn pixel for pixel, one image pixel per data pixel: nothing is resampled."""
    from PIL import Image

    panels = []
    for flair, gt, predicted in zip(flairs, truth, pred):
        rgb = np.repeat(np.asarray(flair, np.uint8)[..., None], 3, axis=2)
        truth_line, pred_line = outline(gt), outline(predicted)
        rgb[truth_line], rgb[pred_line], rgb[truth_line & pred_line] = TRUTH_COLOUR, PREDICTION_COLOUR, BOTH_COLOUR
        panels += [rgb, np.full((rgb.shape[0], STRIP_GAP, 3), 255, np.uint8)]
    buffer = io.BytesIO()
    Image.fromarray(np.concatenate(panels[:-1], axis=1)).save(buffer, format="PNG")
    return buffer.getvalue()
