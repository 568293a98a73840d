"""Paired per-patient comparison of two recipes, each cross-validated by `metaseg cv` on the same folds.

Two `metaseg cv` runs with different recipes (input size, patches, input sequences) write two cv.json; `cv` itself
pairs the bundles of one run. This pairs a model of run A with a model of run B over the patients both cover,
refusing runs whose folds or seed differ unless told (`--other-folds`: to compare fold counts, where each patient is
still out of fold in both runs but scored by models trained on other patients).

    python scripts/compare_cv.py reports/cv.json runs/reports_cv256p128/cv.json --label "128 px" --label "256 px" \
        --pair "attention_unet=attention_unet" --out reports/cv_resolution

Writes OUT/comparison.json and OUT/comparison.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metaseg.errors import UserError  # noqa: E402
from metaseg.evaluation.cv_report import read_cv  # noqa: E402
from metaseg.files import write_bytes_atomic, write_json_atomic  # noqa: E402
from metaseg.evaluation.metrics import paired_difference  # noqa: E402
from metaseg.evaluation.paired import paired_table  # noqa: E402


def same_folds(a: dict, b: dict) -> bool:
    return (a["folds"], a["seed"], a["patients"]) == (b["folds"], b["seed"], b["patients"])


def compare(a: dict, b: dict, pairs: list[tuple[str, str]], n_resamples: int = 2000, seed: int = 0,
            other_folds: bool = False) -> list[dict]:
    """For each (model of a, model of b): both means and the paired a - b over the patients both runs scored."""
    if not other_folds and not same_folds(a, b):
        raise UserError("the two runs used different folds or seeds: their out-of-fold predictions are not paired "
                        "(--other-folds pairs them by patient all the same, e.g. to compare fold counts)")
    rows = []
    for name_a, name_b in pairs:
        missing = [f"{name} in {label}" for name, run, label in ((name_a, a, "A"), (name_b, b, "B"))
                   if name not in run["models"]]
        if missing:
            raise UserError(f"no model {', '.join(missing)}")
        dice_a, dice_b = a["models"][name_a]["dice_3d_per_patient"], b["models"][name_b]["dice_3d_per_patient"]
        common = sorted(set(dice_a) & set(dice_b))
        if not common:
            raise UserError(f"{name_a} (A) and {name_b} (B) share no scored patient")
        x, y = [dice_a[p] for p in common], [dice_b[p] for p in common]
        rows.append({"a": name_a, "b": name_b, "patients": common, "mean_a": sum(x) / len(x), "mean_b": sum(y) / len(y),
                     "paired_a_minus_b": paired_difference(x, y, n_resamples, seed)})
    return rows


def markdown(rows: list[dict], labels: tuple[str, str], sources: tuple[str, str], commands: tuple[str, str],
             command: str, folds: str) -> str:
    la, lb = labels
    lines = [f"# Cross-validated recipes compared: {la} (A) against {lb} (B)", "",
             f"Produced by `{command}`.", "",
             f"- A, {la}: `{sources[0]}`, made by `{commands[0]}`",
             f"- B, {lb}: `{sources[1]}`, made by `{commands[1]}`", "",
             f"{folds}; every figure is out-of-fold per-patient 3D Dice over the patients both runs scored; "
             "the difference is paired by patient (95% bootstrap CI, Wilcoxon signed-rank p).", ""]
    columns = ["model A", "model B", "patients", la, lb, "A - B [95% CI]", "p"]
    lines += paired_table(columns, [([row["a"], row["b"], str(len(row["patients"])), f"{row['mean_a']:.3f}",
                                      f"{row['mean_b']:.3f}"], row["paired_a_minus_b"]) for row in rows])
    return "\n".join(lines) + "\n"


def parse_pair(text: str) -> tuple[str, str]:
    a, sep, b = text.partition("=")
    if not sep or not a or not b:
        raise argparse.ArgumentTypeError(f"expected MODEL_A=MODEL_B, got {text!r}")
    return a, b


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="cv.json of recipe A")
    parser.add_argument("b", type=Path, help="cv.json of recipe B")
    parser.add_argument("--pair", type=parse_pair, action="append", required=True, metavar="MODEL_A=MODEL_B",
                        help="a model of A and the model of B to pair with it; repeat")
    parser.add_argument("--label", action="append", help="names of the two recipes (default A, B)")
    parser.add_argument("--out", type=Path, required=True, help="folder for comparison.json and comparison.md")
    parser.add_argument("--other-folds", action="store_true",
                        help="pair by patient even though the runs' folds or seeds differ (e.g. 3 against 5 folds)")
    args = parser.parse_args(argv)
    labels = tuple(args.label or ("A", "B"))
    if len(labels) != 2:
        parser.error("give --label twice (A, then B) or not at all")
    try:
        a, b = read_cv(args.a), read_cv(args.b)
        rows = compare(a, b, args.pair, other_folds=args.other_folds)
    except UserError as err:
        raise SystemExit(f"compare_cv: {err}") from None
    for run, path in ((a, args.a), (b, args.b)):
        if not run.get("complete"):
            print(f"warning: {path} is partial (not every fold done)", file=sys.stderr)
    command = shlex.join(["python", "scripts/compare_cv.py", *sys.argv[1:]] if argv is None else argv)
    sources, commands = (str(args.a), str(args.b)), (a["command"], b["command"])
    folds = ("Same folds and seed" if same_folds(a, b) else
             f"Different folds (A: {a['folds']} folds, seed {a['seed']}; B: {b['folds']} folds, seed {b['seed']}): each "
             "patient is out of fold in both, scored by models trained on different patients")
    write_json_atomic(args.out / "comparison.json", {"command": command, "labels": labels, "sources": sources,
                                                      "commands": commands, "rows": rows})
    write_bytes_atomic(args.out / "comparison.md", markdown(rows, labels, sources, commands, command, folds).encode())
    print((args.out / "comparison.md").read_text())


if __name__ == "__main__":
    main()
