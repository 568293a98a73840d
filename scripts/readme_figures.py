"""README figures read from the committed results files: `python scripts/readme_figures.py` lists each marked figure
beside its source and exits 1 when one differs (tests/test_readme_figures.py runs it in `make test`).

Marker format. An HTML comment (invisible on GitHub) right above a paragraph, table or list names the figures of that
block (its lines up to the first blank one), one per line, `TEXT <- FILE KEY.PATH [count<X] [*N | /N]`:

    <!-- figures
    | {0.733} [0.690 <- reports/cv.json served.mean_dice_3d
    0.733 {[0.690, 0.771]} <- reports/cv.json served.ci95_dice_3d
    | 0.651 | {6.0%} <- reports/cv.json served.fp_slice_rate
    {9} patients fall <- reports/cv.json models.attention_unet served (cross-fitted steps).dice_3d_per_patient count<0.5
    -->

TEXT must appear in the block (`**`, line breaks and the typographic minus read as plain text); the figure is its part
in braces, or all of it: one number (`+0.016`, `1,049`, `~0.10`; `6.0%` is the value x 100; a unit after it, `254 ms`,
is ignored, so write the key's own unit), a list `[0.690, 0.771]` or a duration `1 min 49 s` (the value in seconds). It
must equal the value rounded to the decimals written. FILE is a path in the repository, KEY.PATH a key path into its
JSON (keys joined by `.`, a key may hold spaces or dots; list items by index); `count<X` counts the values of that dict
or list below X; `*N` or `/N` scales the value first.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECKED = ("README.md", "docs/benchmarks.md", "docs/experiments.md", "docs/serving.md")
BLOCK = re.compile(r"<!--\s*figures\s*\n(?P<entries>.*?)-->[ \t]*\n(?P<block>(?:[ \t]*\S[^\n]*(?:\n|$))+)", re.S)
ENTRY = re.compile(r"^(?P<text>.+?) <- (?P<file>\S+) (?P<key>.+?)"
                   r"(?: (?P<count>count<[\d.]+))?(?: (?P<scale>[*/][\d.]+))?$")
NUMBER = r"[+-]?\d[\d,]*(?:\.\d+)?"


@dataclass
class Figure:
    where: str  # the markdown file and the line of the entry
    text: str
    file: str
    key: str
    count: str | None
    scale: str | None

    @property
    def figure(self) -> str:
        braced = re.search(r"\{(.+?)\}", self.text)
        return braced.group(1) if braced else self.text

    @property
    def located(self) -> str:
        return self.text.replace("{", "").replace("}", "")


def marked(path: Path, root: Path = REPO) -> tuple[list[Figure], list[str]]:
    """Every entry of every figures comment in a markdown file, and the problems: an entry not in the marker format,
    or whose text is not in the block below its comment (a number in it only where no digit goes on around it)."""
    text = path.read_text()
    figures, problems = [], []
    for block in BLOCK.finditer(text):
        first = text.count("\n", 0, block.start("entries")) + 1
        for offset, line in enumerate(block["entries"].splitlines()):
            if not line.strip():
                continue
            where = f"{path.relative_to(root)}:{first + offset}"
            entry = ENTRY.match(line.strip())
            if not entry:
                problems.append(f"{where}: not 'TEXT <- FILE KEY.PATH [count<X] [*N|/N]': {line.strip()!r}")
                continue
            figure = Figure(where, entry["text"], entry["file"], entry["key"], entry["count"], entry["scale"])
            located = normalised(figure.located)
            pattern = (r"(?<![\d.,])" if located[0].isdigit() else "") + re.escape(located) + (
                r"(?![\d]|[.,]\d)" if located[-1].isdigit() else "")
            if not re.search(pattern, normalised(block["block"])):
                problems.append(f"{where}: {figure.located!r} is not in the block below the comment")
                continue
            figures.append(figure)
    return figures, problems


def normalised(text: str) -> str:
    """Markdown emphasis, quote marks at line starts, line breaks and the typographic minus as plain text, so that
    entries are written plainly and may span a line break."""
    text = re.sub(r"^[ \t]*>[ \t]?", "", text, flags=re.M).replace("**", "").replace("\u2212", "-")
    return re.sub(r"\s+", " ", text)


def lookup(data, key: str, where: str):
    """The value at a dotted key path; the longest key that matches comes first, so keys may hold dots or spaces."""
    value, rest = data, key
    while rest:
        if isinstance(value, list):
            head, _, tail = rest.partition(".")
            if not head.isdigit() or int(head) >= len(value):
                raise KeyError(f"{where}: no item {head!r} in a list of {len(value)} at {key!r}")
            value, rest = value[int(head)], tail
            continue
        if not isinstance(value, dict):
            raise KeyError(f"{where}: {rest!r} goes below a value at {key!r}")
        names = [name for name in value if rest == name or rest.startswith(name + ".")]
        if not names:
            raise KeyError(f"{where}: no key {rest.split('.')[0]!r} at {key!r}")
        name = max(names, key=len)
        value, rest = value[name], rest[len(name) + 1 :]
    return value


def source_value(figure: Figure, root: Path = REPO, loaded: dict | None = None):
    """The value a figure names; `loaded` keeps each file parsed once across figures."""
    loaded = {} if loaded is None else loaded
    if figure.file not in loaded:
        path = root / figure.file
        if not path.is_file():
            raise FileNotFoundError(f"{figure.where}: no file {figure.file}")
        loaded[figure.file] = json.loads(path.read_text())
    value = lookup(loaded[figure.file], figure.key, figure.where)
    if figure.count:
        bound = float(figure.count.removeprefix("count<"))
        values = value.values() if isinstance(value, dict) else value
        value = sum(1 for v in values if v is not None and v < bound)
    if figure.scale:
        factor = float(figure.scale[1:]) if figure.scale[0] == "*" else 1 / float(figure.scale[1:])
        value = [v * factor for v in value] if isinstance(value, list) else value * factor
    return value


def rendered(number: str, value) -> str:
    """`value` written the way `number` is: its decimals, its sign, its thousands commas."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"not a number: {value!r}")
    decimals = len(number.split(".")[1]) if "." in number else 0
    spec = ("+" if number.startswith("+") else "") + ("," if "," in number else "") + f".{decimals}f"
    out = format(value, spec)
    return ("+" if spec.startswith("+") else "") + out[1:] if re.fullmatch(r"-[0.,]+", out) else out


def differs(figure: Figure, root: Path = REPO, loaded: dict | None = None) -> str | None:
    """None when the figure equals its source value as written, else what differs."""
    value, written = source_value(figure, root, loaded), normalised(figure.figure)
    duration = re.fullmatch(r"(\d+) min (\d+) s", written)
    if duration:
        expected = f"{int(round(value)) // 60} min {int(round(value)) % 60} s"
        return None if expected == written else f"{written!r} but the file has {value} s ({expected})"
    listed = re.fullmatch(rf"\[({NUMBER}(?:, {NUMBER})*)\]", written)
    if listed:
        numbers = listed.group(1).split(", ")
        if not isinstance(value, list) or len(value) != len(numbers):
            return f"{written!r} but the file has {value!r}"
        expected = "[" + ", ".join(rendered(n, v) for n, v in zip(numbers, value)) + "]"
        return None if expected == written else f"{written!r} but the file has {value!r} ({expected})"
    numbers = re.findall(rf"{NUMBER}%?", written)
    if len(numbers) != 1:
        raise ValueError(f"{figure.where}: {written!r} holds {len(numbers)} numbers; put the figure in braces")
    number = numbers[0]
    if number.endswith("%"):
        number, value = number[:-1], value * 100
    expected = rendered(number, value)
    return None if expected == number else f"{written!r} but the file has {value!r} ({expected})"


def check(files: tuple[str, ...] = CHECKED, root: Path = REPO) -> tuple[list[Figure], list[str]]:
    """Every marked figure of `files` (markdown files under `root`, whose results files the markers name) and the
    problems: a figure that differs, a malformed entry, a missing file or key."""
    figures, problems, loaded = [], [], {}
    for name in files:
        found, wrong = marked(root / name, root)
        figures, problems = figures + found, problems + wrong
    for figure in figures:
        try:
            problem = differs(figure, root, loaded)
        except (OSError, KeyError, TypeError, ValueError) as error:
            problem = str(error).strip("'\"")
        if problem:
            problems.append(problem if problem.startswith(figure.where) else
                            f"{figure.where}: {problem} [{figure.file} {figure.key}]")
    return figures, problems


def main() -> int:
    figures, problems = check()
    for figure in figures:
        print(f"{figure.where}: {figure.figure}  <-  {figure.file} {figure.key}")
    print("\n".join(problems) or f"{len(figures)} figures, each equal to its source")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
