"""The findings of one upload, made here from the server's lesion probabilities with the server's own code: the
final masks (metaseg.inference.steps.upload_masks with the model's inference steps, the chosen threshold and the
chosen lesion score), the lesions (metaseg.inference.lesions.measure: 3D connected components of a volume), and how
the viewer shows them.

A volume (a DICOM series, a multi-frame DICOM, a NIfTI, one multi-page TIFF: metaseg.imageio.Volume.is_volume) has
3D lesions with a volume where the spacing is known; a single slice, or several pictures uploaded together, has the
components of each slice on its own, with an area and no volume.

The lesion score (min_lesion_score) filters lesions without hiding them: the lesions are those of every other step,
and the ones the score step removes are `filtered`, drawn dimmed and listed as such, while the final masks (counts,
downloads) leave them out. Both masks come from `upload_masks`, so the filter is the server's step itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from metaseg.conventions import SEQUENCES
from metaseg.imageio.volume import Volume
from metaseg.inference.lesions import Lesion, label, measure_upload
from metaseg.inference.steps import applied_volume_steps, as_float, min_size, upload_masks, with_threshold


@dataclass(frozen=True)
class Findings:
    masks: np.ndarray  # (frames, rows, cols) bool: the final masks, without the filtered lesions
    labels: np.ndarray  # (frames, rows, cols) int: each voxel's lesion id (Lesion.id), filtered ones included
    lesions: list[Lesion]  # every lesion, filtered ones included
    filtered: frozenset[int]  # ids of the lesions the lesion score removes
    volume_steps: list[str]  # the component steps applied, as sentences (none for a slice or separate pictures)

    @property
    def kept(self) -> list[Lesion]:
        return [lesion for lesion in self.lesions if lesion.id not in self.filtered]

    def lesion_mask(self, ids: Sequence[int] | frozenset[int], index: int) -> np.ndarray:
        """The voxels of the lesions `ids` on slice `index`."""
        return np.isin(self.labels[index], list(ids))


def find(probability: np.ndarray, volume: Volume, steps: Mapping, threshold: float, score: float) -> Findings:
    """The findings of uint8 probabilities (frames, rows, cols) of `volume` under the model's `steps` (GET /info
    `inference_steps`) with `threshold` and the lesion `score` in place of the chosen ones, as the server makes them
    (from probabilities rounded to 1/255, so a pixel within 1/510 of the threshold may fall the other way)."""
    steps = {**with_threshold(steps, threshold), "min_lesion_score": score}
    probability = as_float(probability)
    masks = upload_masks(probability, steps, volume.is_volume, volume.voxel_mm3)
    # every lesion but for the score; with largest_component the two may keep different ones: both are listed
    every = upload_masks(probability, {**steps, "min_lesion_score": 0}, volume.is_volume, volume.voxel_mm3) | masks
    masks.flags.writeable = False
    found = measure_upload(every, probability, volume.pixel_spacing_mm, volume.slice_thickness_mm, volume.is_volume)
    labels = lesion_labels(every, volume.is_volume)
    filtered = frozenset(lesion.id for lesion in found) - frozenset(np.unique(labels[masks]).tolist())
    return Findings(masks, labels, found, filtered, applied_steps(steps, volume))


def lesion_labels(masks: np.ndarray, is_volume: bool) -> np.ndarray:
    """Each voxel's lesion id, numbered as `measure_upload` numbers them: a volume's 3D lesions, else each slice's
    own, numbered on across the slices."""
    if is_volume:
        return label(masks)[0]
    labels, count = np.zeros(masks.shape, np.int32), 0
    for index, mask in enumerate(masks):
        own, n = label(mask)
        labels[index] = np.where(own[0] > 0, own[0] + count, 0)
        count += n
    return labels


STEP_WORDS = {"largest_component": "only the largest lesion kept"}


def applied_steps(steps: Mapping, volume: Volume) -> list[str]:
    """The component steps that `upload_masks` applies to this upload, in words."""
    smallest = min_size(steps, volume.voxel_mm3)
    words = {"min_lesion_mm3": f"lesions under {steps['min_lesion_mm3']:g} mm³ ({smallest} voxels) removed",
             "min_lesion_voxels": f"lesions under {smallest} voxels removed",
             "min_lesion_score": f"lesions scoring under {steps['min_lesion_score']:g} filtered (drawn pale, left out "
                                 "of the counts and the downloads)",
             **STEP_WORDS}
    return [words[step] for step in applied_volume_steps(steps, volume.is_volume, volume.voxel_mm3)]


def steps_caption(findings: Findings, volume: Volume) -> str:
    if not volume.is_volume:
        what = "a single slice" if len(volume.frames) == 1 else "separate pictures, not one volume"
        return f"Volume steps: none for {what} (threshold only; each slice's lesions on their own)."
    if not findings.volume_steps:
        return "Volume steps: none on (every lesion is kept); lesions are 3D, joined across slices."
    return f"Volume steps applied: {'; '.join(findings.volume_steps)}; lesions are 3D, joined across slices."


def _slices(lesion: Lesion) -> str:
    first, last = lesion.slices[0] + 1, lesion.slices[-1] + 1
    return str(first) if first == last else f"{first}–{last}"


def lesion_table(findings: Findings, volume: Volume) -> pd.DataFrame:
    """One row per lesion, slices counted from 1 as viewers do: a volume's size in mm³ (voxels where the spacing is
    unknown), a slice's area in mm² (px), the longest axial diameter, RANO-BM measurability, the score (highest
    probability) and, for a volume, whether the lesion score filters the lesion out."""
    spacing = volume.pixel_spacing_mm
    pixel_mm2 = spacing[0] * spacing[1] if spacing else None
    rows = []
    for lesion in findings.lesions:
        row = {"lesion": lesion.id, "slices": _slices(lesion)}
        if volume.is_volume:
            row["volume (mm³)" if volume.voxel_mm3 is not None else "volume (voxels)"] = (
                lesion.volume_mm3 if lesion.volume_mm3 is not None else lesion.voxels)
        else:
            row["area (mm²)" if pixel_mm2 else "area (px)"] = lesion.voxels * pixel_mm2 if pixel_mm2 else lesion.voxels
        if lesion.longest_diameter_mm is not None:
            row["diameter (mm)"] = lesion.longest_diameter_mm
            row["measurable"] = "yes" if lesion.measurable else "no"
        else:
            row["diameter (px)"] = lesion.longest_diameter_px
        row["score"] = lesion.max_probability
        if volume.is_volume:
            row["status"] = "filtered" if lesion.id in findings.filtered else "kept"
        rows.append(row)
    table = pd.DataFrame(rows)
    if len(volume.frames) == 1 and len(table):
        table = table.drop(columns="slices")
    return table


def headline(findings: Findings, volume: Volume, index: int) -> dict[str, str]:
    """Metric label -> value: the lesion count, the total volume of a volume (mL, or voxels), the lesion area of the
    shown slice otherwise (mm², or px), how many lesions are measurable where mm are known, and how many the lesion
    score filters out; of the kept lesions only."""
    found = findings.kept
    numbers = {"Lesions": str(len(found))}
    if volume.is_volume:
        if volume.voxel_mm3 is not None:
            numbers["Total volume"] = f"{sum(lesion.volume_mm3 for lesion in found) / 1000:.3g} mL"
        else:
            numbers["Total volume"] = f"{sum(lesion.voxels for lesion in found)} voxels"
    else:
        area = int(findings.masks[index].sum())
        spacing = volume.pixel_spacing_mm
        label = "Total area" if len(volume.frames) == 1 else "Area on this slice"
        numbers[label] = f"{area * spacing[0] * spacing[1]:.1f} mm²" if spacing else f"{area} px"
    if volume.pixel_spacing_mm is not None:
        numbers["Measurable"] = f"{sum(bool(lesion.measurable) for lesion in found)} of {len(found)}"
    if findings.filtered:
        numbers["Filtered by score"] = str(len(findings.filtered))
    return numbers


def lesion_slices(findings: Findings) -> str:
    """The slices that hold lesion, 1-based, runs joined: "2–4, 9"; "none" without lesions."""
    held = np.flatnonzero(findings.masks.any(axis=(1, 2))) + 1
    runs = np.split(held, np.flatnonzero(np.diff(held) > 1) + 1) if len(held) else []
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}–{r[-1]}" for r in runs) or "none"


def start_slice(findings: Findings) -> int:
    """0-based slice a reader starts on: the widest slice of the largest kept lesion; the middle one without."""
    if not findings.kept:
        return len(findings.masks) // 2
    return max(findings.kept, key=lambda lesion: lesion.voxels).diameter_slice


def model_input(given: Sequence[str], one_channel_dice_loss: float | None) -> str:
    """Which sequences the network got (Volume.sequences_given), and what a missing one costs (GET /info
    `one_channel_dice_loss`)."""
    if len(given) == len(SEQUENCES):
        return "The model got all three sequences: pre-contrast, FLAIR and post-contrast"
    missing = [name for name in SEQUENCES if name not in given]
    text = f"The model got {' and '.join(given)}; {' and '.join(missing)} filled with FLAIR, as in training"
    if one_channel_dice_loss is not None:
        cost = f"{-one_channel_dice_loss:+.2f}".replace("-", "−")
        text += f". FLAIR alone: about {cost} per-patient Dice out of fold"
    return text
