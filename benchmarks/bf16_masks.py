"""Do bf16 masks match fp32 ones? The shipped weights of each bundle, its own validation preprocessing and `forward`,
run with autocast on and off over the validation and test patients; masks compared pixel by pixel and per patient.

The tolerance that decides whether inference may run in bf16: on every patient the 3D Dice between the bf16 and the fp32
mask is >= 0.99, and no patient's 3D Dice against the ground truth moves by more than 0.005.

    python benchmarks/bf16_masks.py [--data ../shared/data/lgg/Data]

Writes benchmarks/results/bf16_masks.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader, Dataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from metaseg.bundles import config  # noqa: E402
from metaseg.conventions import model_overrides  # noqa: E402
from metaseg.bundles import bundle_imports  # noqa: E402
from metaseg.files import relative_paths, write_json_atomic  # noqa: E402
from metaseg.evaluation.metrics import dice_3d  # noqa: E402

SHARED_DATA = REPO.parent / "shared" / "data" / "lgg" / "Data"
NAMES = ("attention_unet", "unetpp")
MASK_DICE_MIN, GT_DICE_SHIFT_MAX = 0.99, 0.005


def masks(name: str, data: Path, split: str) -> tuple[dict, dict, dict]:
    """Per patient: ground truth, fp32 masks and bf16 masks, slices stacked in datalist order."""
    bundle = REPO / "bundles" / name
    # the shipped weights' input size, from the run record of the fold they were trained as
    parser = config(bundle, "training", {"dataset_dir": str(data), "device": "$torch.device('cpu')",
                                         **model_overrides(bundle / "docs" / "training" / "fold_0")})
    with bundle_imports(bundle):  # the configs' components are the bundle's scripts/
        items = parser.get_parsed_content("split_data")(split)
        loader = DataLoader(Dataset(items, parser.get_parsed_content("validate#preprocessing")), batch_size=16)
        net = parser.get_parsed_content("network_def")
        forwards = {}
        for bf16 in (True, False):
            parser.update({"mixed_precision#enabled": bf16})
            forwards[bf16] = parser.get_parsed_content("forward", lazy=False)
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    net.eval()
    labels, preds = [], {True: [], False: []}
    with torch.no_grad():
        for batch in loader:
            labels.extend(batch["label"][:, 0].numpy() > 0)
            for bf16, forward in forwards.items():
                preds[bf16].extend(forward(batch["image"], net).argmax(1).numpy() > 0)
    patients = [Path(d["image"]).parent.name for d in items]

    def by_patient(slices: list) -> dict:
        return {p: np.stack([s for q, s in zip(patients, slices) if q == p]) for p in dict.fromkeys(patients)}

    return by_patient(labels), by_patient(preds[False]), by_patient(preds[True])


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--data", type=Path, default=SHARED_DATA)
    args.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bf16_masks.json")
    opts = args.parse_args()
    results = {"command": relative_paths("python " + " ".join(sys.argv), REPO),
               "data": relative_paths(str(opts.data), REPO),
               "tolerance": {"mask_dice_min": MASK_DICE_MIN, "gt_dice_shift_max": GT_DICE_SHIFT_MAX}, "bundles": {}}
    for name in NAMES:
        per_patient, pixels, differing = {}, 0, 0
        for split in ("validation", "test"):
            gt, fp32, bf16 = masks(name, opts.data, split)
            for patient in gt:
                pixels += fp32[patient].size
                differing += int((fp32[patient] != bf16[patient]).sum())
                per_patient[patient] = {
                    "split": split,
                    "bf16_vs_fp32_dice": dice_3d(fp32[patient], bf16[patient]),
                    "gt_dice_fp32": dice_3d(gt[patient], fp32[patient]),
                    "gt_dice_bf16": dice_3d(gt[patient], bf16[patient]),
                }
        agree = [p["bf16_vs_fp32_dice"] for p in per_patient.values() if not np.isnan(p["bf16_vs_fp32_dice"])]
        shift = [abs(p["gt_dice_bf16"] - p["gt_dice_fp32"]) for p in per_patient.values() if not np.isnan(p["gt_dice_fp32"])]
        results["bundles"][name] = {
            "patients": len(per_patient), "pixels_differing": differing, "pixel_fraction_differing": differing / pixels,
            "min_bf16_vs_fp32_dice": min(agree), "max_gt_dice_shift": max(shift),
            "within_tolerance": min(agree) >= MASK_DICE_MIN and max(shift) <= GT_DICE_SHIFT_MAX,
            "per_patient": per_patient,
        }
        print(name, {k: v for k, v in results["bundles"][name].items() if k != "per_patient"}, flush=True)
    write_json_atomic(opts.out, results)
    print(f"written {opts.out}")


if __name__ == "__main__":
    main()
