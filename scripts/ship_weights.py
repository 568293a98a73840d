"""Ship trained runs as the bundles' weights: the last step after `make train` on the real data.

For each bundle run in RUNS it copies `models/model.pt` to `bundles/<name>/models/model.pt` and the evidence that made
it (run.json, datalist.json, train.log) to `bundles/<name>/docs/`; then it writes `bundles/best.json` naming the
model that `metaseg compare` chose on validation patients, pointing at the shipped copy.

    python scripts/ship_weights.py runs/lgg --report reports/comparison.md
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from metaseg.bundles import BEST_FILE, BUNDLES_DIR, NAMES, best_model  # noqa: E402
from metaseg.files import write_bytes_atomic, write_json_atomic  # noqa: E402

MAX_BYTES = 10 * 2**20  # committed weights stay small


def ship(runs: Path, report: Path) -> None:
    chosen = json.loads((runs / "best.json").read_text())
    for name in NAMES:
        run, bundle = runs / name, BUNDLES_DIR / name
        weights = run / "models" / "model.pt"
        torch.load(weights, weights_only=True)  # a complete, plain state dict
        if weights.stat().st_size > MAX_BYTES:
            raise SystemExit(f"{weights} is over {MAX_BYTES} bytes")
        write_bytes_atomic(bundle / "models" / "model.pt", weights.read_bytes())
        for evidence, target in (("run.json", "run.json"), ("datalist.json", "datalist_lgg.json"), ("train.log", "train.log")):
            shutil.copyfile(run / evidence, bundle / "docs" / target)
    write_json_atomic(BEST_FILE, {
        "bundle": chosen["bundle"],
        "weights": f"{chosen['bundle']}/models/model.pt",
        "overrides": chosen.get("overrides", {}),
        "selected_by": chosen["selected_by"],
        "validation_dice_3d": chosen["validation_dice_3d"],
        "test_dice_3d": chosen.get("test_dice_3d"),
        "report": str(Path("..") / report.relative_to(REPO)),
    })
    print(f"shipped both bundles' weights; best: {best_model().bundle.name}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="folder holding <bundle>/ runs and the best.json of `metaseg compare`")
    parser.add_argument("--report", type=Path, default=REPO / "reports" / "comparison.md")
    args = parser.parse_args()
    ship(args.runs, args.report.resolve())
