"""The bundles metaseg ships, and the one way it runs them: MONAI's own `python -m monai.bundle run`.

Each stage runs in a child process, exactly the command a MONAI user would type, so that the bundle's `scripts`
package and its config never meet another bundle's in one interpreter, and a stage's log is the bundle's log.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from metaseg.errors import UserError

BUNDLES_DIR = Path(__file__).resolve().parents[1] / "bundles"
NAMES = ("unetpp", "attention_unet")
BEST_FILE = BUNDLES_DIR / "best.json"  # the shipped choice; `metaseg compare` writes one like it per run

# stage -> (run id inside the configs, config files merged left to right)
STAGES = {
    "training": ("training", ["train.json"]),
    "evaluating": ("evaluating", ["train.json", "evaluate.json"]),
    "inference": ("run", ["train.json", "inference.json"]),
}


def bundle_dir(name_or_path: str | Path) -> Path:
    """A shipped bundle by name, or a bundle folder given as a local path."""
    path = BUNDLES_DIR / str(name_or_path) if str(name_or_path) in NAMES else Path(name_or_path)
    if not (path / "configs" / "metadata.json").is_file():
        raise UserError(f"not a bundle (no configs/metadata.json): {name_or_path}; shipped bundles: {', '.join(NAMES)}")
    return path.resolve()


def command(bundle: Path, stage: str, **overrides) -> list[str]:
    """The `python -m monai.bundle run ...` command line for one stage, with `--key value` overrides."""
    run_id, files = STAGES[stage]
    configs = [str(bundle / "configs" / f) for f in files]
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--meta_file", str(bundle / "configs" / "metadata.json")]
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


@dataclass(frozen=True)
class Model:
    """A trained model: its bundle, its weights, and the config overrides it was trained with (e.g. spatial_size)."""

    bundle: Path
    weights: Path
    overrides: dict = field(default_factory=dict)


def best_model(record: Path = BEST_FILE) -> Model:
    """The model a best-model record names; relative paths in it are relative to the record's folder."""
    if not record.is_file():
        raise UserError(f"no best-model record at {record}: run `metaseg compare` or pass --bundle")
    try:
        best = json.loads(record.read_text())
        bundle, weights, overrides = Path(best["bundle"]), Path(best["weights"]), dict(best.get("overrides", {}))
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"unreadable best-model record {record}: {err}") from None
    bundle = bundle_dir(bundle if bundle.is_absolute() or str(bundle) in NAMES else record.parent / bundle)
    return Model(bundle, weights if weights.is_absolute() else (record.parent / weights).resolve(), overrides)
