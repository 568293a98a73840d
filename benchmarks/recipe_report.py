"""The recipe table (`reports/recipe.md`, `recipe.json`): each arm of a bundle's training recipe against the shipped
recipe, by patient cross-validation over seeds, every patient out of fold, in one fixed view of the masks.

    python benchmarks/recipe_report.py --data ../shared/data/lgg/Data --base runs/ship runs/recipe/base_s1 \
        --arm "brain crop=runs/recipe/crop_s0,runs/recipe/crop_s1" --out reports

Each run folder is a cross-validation runs folder (`benchmarks/gpu_cv.py train`, or `metaseg cv`) scored by
`gpu_cv.py score` (its `scores.json`: flip TTA, threshold 0.5, no component steps, whatever the bundle ships, so that
the arms compare networks, not inference steps). A recipe's figure for a patient is its mean over the recipe's seeds; an arm is paired
with the base by patient. The seed spread is the range of a recipe's per-seed means. An arm is **kept** when the 95%
CI of its paired gain is above 0 and its mean gain exceeds the base's seed spread. Dice by lesion-size half splits the
patients by their ground-truth lesion pixels (the smaller half: the first n // 2). CPU time: the training seconds of a seed's folds
(`trained.json`), summed, mean over seeds (each fold on one core). The table is metaseg.evaluation.recipes', the code
path that `gpu_cv.py arms` shares.

Run folders need not outlive their machine: `--keep reports/recipe.json` in place of `--base` carries that report's rows
as recorded and pairs the new arms with its base row's per-patient Dice (the same patients, or an error):

    python benchmarks/recipe_report.py --data ../shared/data/lgg/Data --keep reports/recipe.json \
        --arm "warm-up 12 epochs=runs/recipe2/warm12_s0,runs/recipe2/warm12_s1" --out reports
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from metaseg.errors import UserError  # noqa: E402
from metaseg.evaluation.recipe_markdown import recipe_markdown  # noqa: E402
from metaseg.evaluation.recipes import recipe_report  # noqa: E402
from metaseg.files import relative_paths  # noqa: E402


def parse_arm(text: str) -> tuple[str, list[Path]]:
    label, sep, runs = text.partition("=")
    if not sep or not label or not runs:
        raise UserError(f"--arm {text!r}: expected LABEL=RUNS[,RUNS...]")
    return label, [Path(r) for r in runs.split(",")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the Data folder the runs were trained on")
    first = parser.add_mutually_exclusive_group(required=True)
    first.add_argument("--base", type=Path, nargs="+", help="the shipped recipe's runs, one per seed")
    first.add_argument("--keep", type=Path, help="an earlier recipe.json: its rows carried, its base row the base")
    parser.add_argument("--arm", action="append", required=True, help="LABEL=RUNS[,RUNS...], one runs folder per seed")
    parser.add_argument("--bundle", default="unetpp")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    command = relative_paths("python benchmarks/recipe_report.py " + " ".join(sys.argv[1:] if argv is None else argv),
                             REPO)
    result = recipe_report(args.data, args.base, [parse_arm(a) for a in args.arm], args.out, args.bundle, command,
                           args.keep)
    print(recipe_markdown(result))


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        sys.exit(f"recipe_report: error: {err}")
