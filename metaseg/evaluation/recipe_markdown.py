"""The recipe comparisons in words and tables (metaseg.evaluation.recipes builds them): arms.md, one recipe against
another on every metric, and recipe.md, the arms of a recipe against its base."""

from __future__ import annotations

import json
from pathlib import Path

from metaseg.evaluation.paired import difference_ci, p_value, paired_table


def arms_markdown(result: dict, command: str) -> str:
    """arms.md: each metric of both recipes (mean [95% CI], per seed) and the paired new - base."""
    base, new = ([Path(r).name for r in result[side]] for side in ("base", "new"))
    lines = [f"# {', '.join(new)} against {', '.join(base)}", "",
             f"Out of fold, {result['n_patients']} patients, flip TTA and threshold 0.5, no component steps; each "
             "patient's figure is the mean over the seeds of a recipe, then paired by patient. Produced by "
             f"`{command}`.", ""]
    rows = []
    for metric, row in result["metrics"].items():
        cells = [f"`{metric}`", *(f"{row[n]['mean']:.3f} [{row[n]['ci95'][0]:.3f}, {row[n]['ci95'][1]:.3f}]"
                                  for n in ("base", "new"))]
        cells += [", ".join(f"{v:.3f}" for v in row[n]["per_seed"].values()) for n in ("base", "new")]
        rows.append((cells, row["paired_new_minus_base"]))
    columns = ["metric", "base [95% CI]", "new [95% CI]", "base per seed", "new per seed", "new − base [95% CI]",
               "Wilcoxon p"]
    return "\n".join(lines + paired_table(columns, rows)) + "\n"


def recipe_markdown(result: dict) -> str:
    """recipe.md: one row per recipe, the base first, each arm with its paired gain and whether it is kept."""
    def ci(cell: dict, digits: int = 3) -> str:
        return f"{cell['mean']:.{digits}f} [{cell['ci95'][0]:.{digits}f}, {cell['ci95'][1]:.{digits}f}]"

    lines = [f"# Recipe arms: {result['bundle']}", "",
             f"Out of fold, {result['n_patients']} patients, flip TTA and threshold 0.5, no component steps; each patient's "
             "figure is the mean over a recipe's seeds, paired with the base by patient. Kept: the gain's 95% CI is "
             "above 0 and the gain exceeds the base's seed spread. Smaller / larger half: the patients ranked by "
             f"ground-truth lesion pixels (median {result['lesion_pixels_median']:.0f}), split in two. CPU: training minutes "
             f"of one seed's folds, one core each. Produced by `{result['command']}`"
             + "".join(f", carrying the rows of `{c}`" for c in reversed(result["earlier_commands"])) + ".", "",
             "| arm | settings | seeds | per-patient 3D Dice | per seed | gain [95% CI], Wilcoxon p | kept | "
             "lesion-slice Dice | FP slices | lesion-wise Dice | lesion sensitivity | FP lesions per patient | "
             "smaller half | larger half | CPU min |",
             "|" + "---|" * 15]
    for row in result["arms"]:
        settings = ", ".join(f"{k}={json.dumps(v)}" for k, v in row["recipe"].items())
        gain, kept = "—", "—"
        if "paired_gain_dice_3d" in row:
            g = row["paired_gain_dice_3d"]
            gain = f"{difference_ci(g)}, p = {p_value(g, 2)}"
            kept = "yes" if row["kept"] else "no"
        per_seed = ", ".join(f"{v:.3f}" for v in row["dice_3d_per_seed"].values())
        cells = [row["arm"], f"`{settings}`", ", ".join(map(str, row["seeds"])), ci(row["dice_3d"]), per_seed, gain,
                 kept, f"{row['lesion_slice_dice']['mean']:.3f}", f"{row['fp_slice_rate']['mean']:.3f}",
                 ci(row["lesionwise_dice"]), f"{row['lesion_sensitivity_3d']:.3f}", ci(row["fp_lesions"], 2),
                 f"{row['dice_3d_smaller_half']:.3f}", f"{row['dice_3d_larger_half']:.3f}",
                 f"{row['cpu_minutes_per_cv']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
