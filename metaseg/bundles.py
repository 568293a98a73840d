"""The bundles metaseg ships, the one way it runs them (MONAI's own `python -m monai.bundle run`), and the one way
anything in the repository reads their configs (`config`).

Each stage runs in a child process, exactly the command a MONAI user would type, so that the bundle's `scripts`
package and its config never meet another bundle's in one interpreter, and a stage's log is the bundle's log.
"""

from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from metaseg.errors import UserError

if TYPE_CHECKING:
    from monai.bundle import ConfigParser

BUNDLES_DIR = Path(__file__).resolve().parents[1] / "bundles"
NAMES = ("unetpp", "attention_unet")
RUN_ID = "run"  # MONAI's default: every stage runs it, as the model zoo, MONAI Label and MONAI Deploy expect

# stage -> config files merged left to right; train.json and inference.json each load alone
STAGES = {
    "training": ["train.json"],
    "evaluating": ["train.json", "evaluate.json"],
    "inference": ["inference.json"],
}


def bundle_dir(name_or_path: str | Path) -> Path:
    """A shipped bundle by name, or a bundle folder given as a local path."""
    path = BUNDLES_DIR / str(name_or_path) if str(name_or_path) in NAMES else Path(name_or_path)
    if not (path / "configs" / "metadata.json").is_file():
        raise UserError(f"not a bundle (no configs/metadata.json): {name_or_path}; shipped bundles: {', '.join(NAMES)}")
    return path.resolve()


def config(bundle: Path, stage: str, overrides: dict | None = None) -> ConfigParser:
    """The merged configs of one stage (STAGES) with the bundle's metadata, `bundle_root` the bundle, and `overrides`
    (config id -> value, e.g. the spatial_size a model was trained at) set on top, as `--key value` sets them."""
    from monai.bundle import ConfigParser  # here: the stages that only run bundles never import MONAI

    parser = ConfigParser()
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser.read_config([str(bundle / "configs" / name) for name in STAGES[stage]])
    parser["bundle_root"] = str(bundle)
    for key, value in (overrides or {}).items():
        parser[key] = value
    return parser


@contextmanager
def bundle_imports(bundle: Path):
    """Make `bundle/scripts` importable while its config is parsed, as MONAI's `run` does (the configs' components live there).

    Every bundle's package is called `scripts`, so a cached one from another bundle is dropped first and after.
    """

    def forget_scripts():
        for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
            del sys.modules[name]

    forget_scripts()
    sys.path.insert(0, str(bundle))
    try:
        yield
    finally:
        sys.path.remove(str(bundle))
        forget_scripts()


def command(bundle: Path, stage: str, **overrides) -> list[str]:
    """The `python -m monai.bundle run ...` command line for one stage, with `--key value` overrides."""
    configs = [str(bundle / "configs" / f) for f in STAGES[stage]]
    cmd = [sys.executable, "-m", "monai.bundle", "run", RUN_ID, "--meta_file", str(bundle / "configs" / "metadata.json")]
    cmd += ["--config_file", configs[0] if len(configs) == 1 else repr(configs), "--bundle_root", str(bundle)]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    return cmd


def run_stage(bundle: Path, stage: str, log_file: Path, **overrides) -> None:
    """Run one stage, echoing its output and keeping it in `log_file`; a failure is one readable error."""
    cmd = command(bundle, stage, **overrides)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as child:
            for line in child.stdout:
                sys.stdout.write(line)
                log.write(line)
    if child.returncode != 0:
        raise UserError(f"{stage} of bundle {bundle.name} failed (exit {child.returncode}); full log: {log_file}")
