"""Split patients (never slices) into training / validation / test, and write a MONAI datalist.

The split is the bundles' (`monai.data.partition_dataset` over the sorted patient ids with a seed, in their
scripts/data.py): a bundle given a data folder without a datalist makes the same split.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from metaseg.bundles import NAMES, bundle_dir, bundle_imports
from metaseg.data.discovery import Discovery
from metaseg.errors import UserError
from metaseg.files import write_json_atomic

SPLITS = ("training", "validation", "test")


def split_patients(
    patients: list[str], seed: int = 0, test_fraction: float = 0.2, val_fraction: float = 0.1
) -> dict[str, list[str]]:
    """Seeded patient split: `test_fraction` of all patients for test, `val_fraction` for validation, rest training.

    The bundles' own function (scripts/data.py, the same file in both), so that `metaseg datalist` and a bundle run
    in plain MONAI on a data folder split alike: one implementation, which the bundle must carry to run alone."""
    with bundle_imports(bundle_dir(NAMES[0])):
        from scripts.data import split_patients as bundle_split
    try:
        return bundle_split(patients, seed, test_fraction, val_fraction)
    except ValueError as err:
        raise UserError(str(err)) from None


def build_datalist(found: Discovery, seed: int = 0, test_fraction: float = 0.2, val_fraction: float = 0.1,
                   split: dict[str, list[str]] | None = None) -> dict:
    """The datalist: MONAI's `training`/`validation`/`test` lists plus the record of how they were made.

    `split` (patients per split name) replaces the seeded split, e.g. for a cross-validation fold.
    """
    split = split or split_patients(found.patients, seed, test_fraction, val_fraction)
    items = {name: [asdict(p) for p in found.pairs if p.patient in set(split[name])] for name in SPLITS}
    return {
        "description": "metaseg patient-level split; image/label paths are relative to the patients' root folder",
        "dataset": str(found.source.resolve()),
        "root": found.root,
        "seed": seed,
        "test_fraction": test_fraction,
        "val_fraction": val_fraction,
        "counts": {
            "patients": {name: len(split[name]) for name in SPLITS},
            "pairs": {name: len(items[name]) for name in SPLITS},
            "lesion_pairs": {name: sum(i["lesion_pixels"] > 0 for i in items[name]) for name in SPLITS},
            "ignored": {reason: len(files) for reason, files in found.ignored.items()},
        },
        "patients": split,
        "ignored": found.ignored,
        **items,
    }


def by_patient(items: list[dict]) -> dict[str, list[dict]]:
    """Datalist items grouped by patient, patients sorted and each patient's slices in slice order."""
    groups: dict[str, list[dict]] = {}
    for item in sorted(items, key=lambda i: (i["patient"], i["slice"])):
        groups.setdefault(item["patient"], []).append(item)
    return groups


def write_datalist(datalist: dict, out: str | Path) -> Path:
    return write_json_atomic(out, datalist)


def summary(datalist: dict) -> str:
    """A few lines for the terminal: what was found and how it was split."""
    counts = datalist["counts"]
    lines = [f"dataset: {datalist['dataset']}"]
    for name in SPLITS:
        lines.append(
            f"  {name:<10} {counts['patients'][name]:>4} patients {counts['pairs'][name]:>6} slices"
            f" ({counts['lesion_pairs'][name]} with lesion)"
        )
    ignored = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in counts["ignored"].items())
    lines.append(f"  ignored: {ignored}")
    return "\n".join(lines)
