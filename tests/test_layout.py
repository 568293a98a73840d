"""The package layout of metaseg/__init__.py, checked on the source: no module imports from a stage above its own
(function-level and TYPE_CHECKING imports included), and no module runs long without saying why."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "metaseg"
STAGES = ("core", "imageio", "data", "inference", "evaluation", "training", "cli")  # lowest first
CORE = ("errors", "files", "bundles", "conventions")
MAX_LINES = 400
REASON = "lines:"  # a longer module's docstring holds a line starting with it, saying why it is one module


def stage(module: str) -> str:
    """The stage of a dotted module name under metaseg (`metaseg.inference.steps` -> inference)."""
    parts = module.split(".")[1:]
    if not parts or parts[0] in CORE or parts[0] == "__init__":
        return "core"
    if parts[0] not in STAGES:
        raise AssertionError(f"{module}: not in a stage of metaseg/__init__.py ({', '.join(STAGES)})")
    return parts[0]


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every metaseg import in a file, wherever it sits; `from metaseg import x` names metaseg.x."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "metaseg"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "metaseg":
            if node.module == "metaseg":
                found += [(node.lineno, f"metaseg.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: relative import; metaseg imports by absolute name")
    return found


def upward_imports(root: Path = PACKAGE) -> list[str]:
    """Every import of a module from a stage above the importer's, as `file:line: a (stage) imports b (stage)`."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        own = stage(module_name(path, root))
        for line, target in imported(path):
            theirs = stage(target)
            if STAGES.index(theirs) > STAGES.index(own):
                problems.append(f"{path.relative_to(root.parent)}:{line}: {own} imports {target} ({theirs})")
    return problems


def long_without_reason(root: Path = PACKAGE) -> list[str]:
    """Modules over MAX_LINES lines whose docstring has no line starting with REASON."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        lines = text.count("\n")
        docstring = ast.get_docstring(ast.parse(text)) or ""
        if lines > MAX_LINES and not any(line.strip().startswith(REASON) for line in docstring.splitlines()):
            problems.append(f"{path.relative_to(root.parent)}: {lines} lines and no '{REASON} ...' reason in its docstring")
    return problems


def test_no_module_imports_from_a_stage_above_its_own():
    assert upward_imports() == []


def test_no_long_module_without_a_reason():
    assert long_without_reason() == []


def test_every_module_sits_in_a_stage_and_the_order_is_the_documented_one():
    doc = (PACKAGE / "__init__.py").read_text()
    assert [line.split()[0] for line in doc.splitlines() if line.startswith("    ") and line.split()[0] in STAGES] \
        == list(STAGES)
    assert {stage(module_name(path)) for path in PACKAGE.rglob("*.py")} == set(STAGES)


def test_the_checks_fail_on_an_upward_import_and_on_a_long_module(tmp_path):
    """The two checks can fail: a copy of the package with one upward import and one long module."""
    fake = tmp_path / "metaseg"
    (fake / "imageio").mkdir(parents=True)
    (fake / "imageio" / "volume.py").write_text('"""A volume."""\n\n\ndef f():\n    from metaseg.training import cv\n')
    (fake / "data").mkdir()
    (fake / "data" / "long.py").write_text('"""Long."""\n' + "x = 1\n" * (MAX_LINES + 1))
    (fake / "data" / "reasoned.py").write_text('"""Long.\n\nlines: one table.\n"""\n' + "x = 1\n" * (MAX_LINES + 1))
    assert upward_imports(fake) == ["metaseg/imageio/volume.py:5: imageio imports metaseg.training (training)"]
    assert long_without_reason(fake) == [f"metaseg/data/long.py: {MAX_LINES + 2} lines and no 'lines: ...' reason in "
                                         "its docstring"]


def packages_imported(path: Path) -> set[str]:
    """The top-level packages a file imports, wherever the import sits."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add((node.module or "").split(".")[0])
    return names


def test_metaseg_never_imports_the_server_or_the_viewer():
    """serve and ui import metaseg, not the other way round: `metaseg serve` and `metaseg ui` register through the
    `metaseg.commands` entry points of pyproject.toml, so the library installs and imports without them."""
    found = [f"{path.relative_to(PACKAGE.parent)} imports {name}" for path in sorted(PACKAGE.rglob("*.py"))
             for name in sorted(packages_imported(path) & {"serve", "ui"})]
    assert found == []
