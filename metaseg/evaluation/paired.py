"""How the reports print a paired per-patient difference (metaseg.evaluation.metrics.paired_difference): the mean
difference with its 95% CI and the Wilcoxon p, and the table of such rows, written once so that the recipe
comparisons (scripts/compare_cv.py, scripts/seed_ensemble.py, benchmarks/gpu_cv.py arms, the recipe table) read
alike."""

from __future__ import annotations


def difference_ci(paired: dict, ci_label: str = "") -> str:
    """`+0.034 [+0.018, +0.051]`; in a sentence, ci_label "95% CI " names the bracket."""
    low, high = paired["ci95"]
    return f"{paired['mean_difference']:+.3f} [{ci_label}{low:+.3f}, {high:+.3f}]"


def p_value(paired: dict, digits: int = 3) -> str:
    """The Wilcoxon signed-rank p to `digits` significant digits, or n/a where none could be tested."""
    return "n/a" if paired["wilcoxon_p"] is None else f"{paired['wilcoxon_p']:.{digits}g}"


def paired_table(columns: list[str], rows: list[tuple[list[str], dict]]) -> list[str]:
    """Markdown lines of a table whose rows are (leading cells, paired difference): the last two of `columns` name
    the difference [95% CI] and its p."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for cells, paired in rows:
        lines.append("| " + " | ".join([*cells, difference_ci(paired), p_value(paired)]) + " |")
    return lines
