"""Out-of-fold per-patient Dice against lesion volume: which patients keep a cross-validated model below the bar.

A mean per-patient Dice weighs a patient with a 2,000-pixel lesion as much as one with 40,000, so where the mean
stalls it matters whether the misses are the small lesions. This splits the patients of one `metaseg cv` model at
the median lesion volume (lesion pixels summed over all slices, from the data's masks) and lists the lowest.

    python scripts/dice_by_volume.py reports/cv.json --data ../shared/data/lgg/Data \
        --model "unetpp + its inference steps" --out reports/cv_volume

Writes OUT/dice_by_volume.json and OUT/dice_by_volume.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metaseg.data.discovery import discover  # noqa: E402
from metaseg.errors import UserError  # noqa: E402
from metaseg.evaluation.cv_report import read_cv  # noqa: E402
from metaseg.files import write_bytes_atomic, write_json_atomic  # noqa: E402
from metaseg.evaluation.metrics import bootstrap_ci  # noqa: E402

LOWEST = 10  # patients listed by name


def by_volume(dice: dict[str, float], volume: dict[str, int]) -> dict:
    """Mean Dice [95% CI] of the smaller- and larger-lesion halves (split at the median volume), their Spearman rank
    correlation, and the lowest-scoring patients."""
    patients = sorted(p for p in dice if volume.get(p, 0) > 0)
    if len(patients) < 4:
        raise UserError(f"{len(patients)} scored patients with a lesion in the data: too few to split by volume")
    median = float(np.median([volume[p] for p in patients]))
    halves = {}
    for name, members in (("smaller", [p for p in patients if volume[p] <= median]),
                          ("larger", [p for p in patients if volume[p] > median])):
        scores = [dice[p] for p in members]
        halves[name] = {"patients": len(members), "mean_dice_3d": float(np.mean(scores)),
                        "ci95": list(bootstrap_ci(scores)),
                        "volume_range": [min(volume[p] for p in members), max(volume[p] for p in members)]}
    rho, p = spearmanr([volume[q] for q in patients], [dice[q] for q in patients])
    lowest = sorted(patients, key=lambda q: dice[q])[:LOWEST]
    return {"patients": len(patients), "mean_dice_3d": float(np.mean([dice[q] for q in patients])),
            "median_dice_3d": float(np.median([dice[q] for q in patients])), "median_volume": median,
            "halves": halves, "spearman": {"rho": float(rho), "p": float(p)},
            "lowest": [{"patient": q, "dice_3d": dice[q], "lesion_pixels": volume[q]} for q in lowest],
            "below": {str(bar): sum(dice[q] < bar for q in patients) for bar in (0.5, 0.7, 0.8)}}


def markdown(result: dict, model: str, command: str) -> str:
    lines = [f"# Out-of-fold per-patient 3D Dice against lesion volume: {model}", "", f"Produced by `{command}`.", "",
             f"{result['patients']} patients with a lesion; mean {result['mean_dice_3d']:.3f}, median "
             f"{result['median_dice_3d']:.3f}; below 0.5 / 0.7 / 0.8: {result['below']['0.5']} / "
             f"{result['below']['0.7']} / {result['below']['0.8']}. Lesion volume = lesion pixels over all of a "
             f"patient's slices (median {result['median_volume']:.0f}).", "",
             "| half | patients | lesion pixels | mean per-patient 3D Dice [95% CI] |", "|---|---|---|---|"]
    for name, half in result["halves"].items():
        low, high = half["ci95"]
        lines.append(f"| {name} lesions | {half['patients']} | {half['volume_range'][0]}-{half['volume_range'][1]} "
                     f"| {half['mean_dice_3d']:.3f} [{low:.3f}, {high:.3f}] |")
    lines += ["", f"Spearman rank correlation of Dice with volume: {result['spearman']['rho']:+.2f} "
              f"(p = {result['spearman']['p']:.3g}).", "", "| lowest patients | 3D Dice | lesion pixels |",
              "|---|---|---|"]
    lines += [f"| {row['patient']} | {row['dice_3d']:.3f} | {row['lesion_pixels']} |" for row in result["lowest"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cv", type=Path, help="cv.json written by `metaseg cv`")
    parser.add_argument("--data", type=Path, required=True, help="the data the cross-validation ran on (folder or .zip)")
    parser.add_argument("--model", required=True, help="a model of the cv.json, e.g. 'unetpp + its inference steps'")
    parser.add_argument("--out", type=Path, required=True, help="folder for dice_by_volume.json and .md")
    args = parser.parse_args(argv)
    try:
        run = read_cv(args.cv)
        if args.model not in run["models"]:
            raise UserError(f"no model {args.model!r} in {args.cv}; it has: {', '.join(run['models'])}")
        volume = Counter()
        for pair in discover(args.data).pairs:
            volume[pair.patient] += pair.lesion_pixels
        result = by_volume(run["models"][args.model]["dice_3d_per_patient"], volume)
    except UserError as err:
        raise SystemExit(f"dice_by_volume: {err}") from None
    command = shlex.join(["python", "scripts/dice_by_volume.py", *(sys.argv[1:] if argv is None else argv)])
    write_json_atomic(args.out / "dice_by_volume.json", {"command": command, "cv": str(args.cv), "model": args.model,
                                                          **result})
    write_bytes_atomic(args.out / "dice_by_volume.md", markdown(result, args.model, command).encode())
    print((args.out / "dice_by_volume.md").read_text())


if __name__ == "__main__":
    main()
