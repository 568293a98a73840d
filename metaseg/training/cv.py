"""`metaseg cv`: patient k-fold cross-validation of the bundles, with out-of-fold probabilities kept for selection.

nnU-Net's layout, one file per stage, each written atomically so an interrupted run resumes where it stopped:

    RUNS/splits_final.json             [{"train": [...], "val": [...]}, ...]: folds over sorted patient ids, seeded
    RUNS/cv_plan.json                  data, folds, seed, recipe; a rerun with another plan is refused, not mixed
    RUNS/<bundle>/fold_<k>/            a `metaseg train` run folder (datalist.json, run.json, models/, train.log)
        trained.json                   training finished (else a rerun resumes it from models/checkpoint.pt,
                                       keeping the interrupted log as train.log.<n>)
        oof/<patient>.npz              lesion probabilities of each held-out patient, uint8 round(255 p):
                                       `prob`, and `prob_flip` (mirrored input, mirrored back) for flip TTA;
                                       `prob_skull_stripped` and its `_flip`: the slices brain-extracted
                                       (metaseg.inference.skull_strip), what a user with skull-stripped volumes
                                       gets; for slices of three sequences also `prob_one_channel`: FLAIR alone
                                       as the input (what a one-channel upload gets). A file of an older run
                                       lacking a view gets it added when the fold is run again
        fold.json                      the fold is done: its patients and their per-patient 3D Dice
    OUT/cv.json, OUT/cv.md, OUT/cv_postprocessing.json, OUT/cv_folds.png
                                       the reports over every finished fold (metaseg.evaluation.cv_report)

`--split site` holds out one site at a time instead (leave-one-site-out: the TCGA site code in the patient id, as
`TCGA_<site>_<case>_<date>`), into RUNS/site/ with its reports in OUT/site_cv/: what a patient of a site never seen
gets. The patient report then carries the site figure beside its own (`site_cv` in cv.json).

Model selection inside a fold: none. Each fold's model is its final epoch (nnU-Net ships checkpoint_final too);
a small validation on held-out patients picked the best epoch by noise in this project (issue 10). The bundle's
validation key holds MONITOR_PATIENTS of the fold's own training patients and runs once, after the last epoch, so
its `models/model.pt` is the final network and its log line only shows the fit on training patients.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from pathlib import Path

import numpy as np

from metaseg.bundles import config
from metaseg.conventions import FLAIR_CHANNEL
from metaseg.data.datalist import build_datalist, by_patient
from metaseg.data.discovery import discover, member, open_source
from metaseg.errors import UserError
from metaseg.evaluation import out_of_fold
from metaseg.evaluation.cv_report import report
from metaseg.evaluation.generalization import SITE_REPORTS
from metaseg.evaluation.out_of_fold import SELECTION, as_uint8, has_views, read_npz, write_npz
from metaseg.evaluation.retention import fold_keep_scores, read_fold
from metaseg.files import write_json_atomic
from metaseg.inference.skull_strip import skull_stripped
from metaseg.inference.steps import network_maps

MONITOR_PATIENTS = 3
SITE = re.compile(r"TCGA_([A-Z0-9]{2})_")  # TCGA's tissue source site: the hospital a patient's scans come from
SITE_RUNS = "site"  # the site split's folder under --runs (its reports: generalization.SITE_REPORTS under --out)


def assign_folds(patients: list[str], folds: int, seed: int) -> list[list[str]]:
    """Disjoint folds covering every patient once: MONAI's partition_dataset over the sorted ids, seeded shuffle."""
    from monai.data import partition_dataset

    patients = sorted(set(patients))
    if folds < 2 or folds > len(patients):
        raise UserError(f"--folds must be between 2 and the number of patients ({len(patients)}), got {folds}")
    parts = partition_dataset(patients, num_partitions=folds, shuffle=True, seed=seed, even_divisible=False)
    return [sorted(part) for part in parts]


def report_dir(out: Path, split: str) -> Path:
    """Where a cross-validation of this split writes its reports."""
    return out / SITE_REPORTS if split == "site" else out


def site_of(patient: str) -> str:
    match = SITE.match(patient)
    if not match:
        raise UserError(f"--split site needs TCGA patient ids (TCGA_<site>_...), got {patient!r}")
    return match.group(1)


def site_folds(patients: list[str]) -> tuple[list[str], list[list[str]]]:
    """Leave-one-site-out: the sites in sorted order and, per site, its patients (sorted); at least two sites."""
    sites = sorted({site_of(p) for p in patients})
    if len(sites) < 2:
        raise UserError(f"--split site needs patients of at least two sites, got {', '.join(sites)}")
    return sites, [sorted(p for p in set(patients) if site_of(p) == site) for site in sites]


def splits_final(folds: list[list[str]]) -> list[dict]:
    """nnU-Net's splits_final.json: per fold, the training patients (all other folds) and the held-out ones."""
    return [{"train": sorted(p for j, f in enumerate(folds) if j != k for p in f), "val": fold}
            for k, fold in enumerate(folds)]


def monitor_patients(train: list[str], fold: int, seed: int) -> list[str]:
    """The training-fold patients the bundle's one validation pass looks at (seeded per fold)."""
    rng = np.random.default_rng([seed, fold])
    return sorted(rng.choice(sorted(train), min(MONITOR_PATIENTS, len(train)), replace=False).tolist())


def bundle_epochs(bundle: Path) -> int:
    try:
        return int(config(bundle, "training")["epochs"])
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"cannot read epochs from {bundle}/configs/train.json: {err}") from None


def check_plan(runs: Path, plan: dict) -> None:
    """Write the plan, or refuse to resume a runs folder that was made with another one."""
    file = runs / "cv_plan.json"
    if file.is_file():
        recorded = json.loads(file.read_text())
        changed = sorted(k for k in plan if recorded.get(k) != plan[k])
        if changed:
            raise UserError(f"{runs} holds a cross-validation with other {', '.join(changed)} ({file}): "
                            f"pass another --runs folder, or delete it to start over")
    write_json_atomic(file, plan)
    write_json_atomic(runs / "splits_final.json", plan["splits"])


def predict_fold(fold_dir: Path, bundle: Path, data: Path, root: str, items: list[dict]) -> None:
    """Save each held-out patient's lesion probabilities in every view (out_of_fold.VIEWS), and the fold model's
    keep scores of the reference phantom's lesions (metaseg.evaluation.retention); a patient whose file has
    them all is kept, one whose file lacks a view (an older run's) gets the missing views added."""
    from metaseg.conventions import model_overrides
    from metaseg.imageio.reader import decode
    from metaseg.inference.engine import Engine  # here: the training stages run without importing torch

    engine = None

    def loaded() -> Engine:
        nonlocal engine
        engine = engine or Engine(bundle, weights=fold_dir / "models" / "model.pt", overrides=model_overrides(fold_dir))
        return engine

    with open_source(data) as files:
        for patient, slices in by_patient(items).items():
            out = fold_dir / "oof" / f"{patient}.npz"
            if has_views(out):
                continue
            saved = read_npz(out) if out.is_file() else {}
            engine = loaded()
            frames = []
            for item in slices:
                name = member(root, item["image"])
                frames.append(decode([(name, files.read(name))]).inputs[0])
            maps = {}
            if "prob" not in saved:
                maps = network_maps(engine, frames, flip=True)
                if frames[0].ndim == 3:  # the slices bring three sequences: also FLAIR alone
                    maps["prob_one_channel"] = np.stack(engine.probabilities([f[FLAIR_CHANNEL] for f in frames],
                                                                             view="plain"))
            stripped = network_maps(engine, skull_stripped(bundle, frames), flip=True)
            maps.update(prob_skull_stripped=stripped["prob"], prob_skull_stripped_flip=stripped["prob_flip"])
            write_npz(out, **{**saved, **{key: as_uint8(value) for key, value in maps.items()},
                              "slices": np.array([i["slice"] for i in slices])})
    fold_keep_scores(fold_dir, loaded)


def cv_datalist(found, plan: dict, runs: Path, fold: int, training: list[str], test: list[str]) -> dict:
    """The `metaseg train` datalist of fold k (test: its held-out patients): the bundle's validation monitors a few
    of the training patients, recorded as such."""
    monitor = monitor_patients(training, fold, plan["seed"])
    datalist = build_datalist(found, split={"training": training, "validation": monitor, "test": test})
    datalist.update(seed=plan["seed"], test_fraction=None, val_fraction=None,
                    cv={"fold": fold, "folds": plan["folds"],
                        "validation": "training-fold patients, monitor only: " + SELECTION,
                        "splits": str((runs / "splits_final.json").resolve())})
    return datalist


def train_fold(bundle: Path, name: str, data: Path, found, plan: dict, k: int, runs: Path, overrides: dict) -> dict:
    """Train fold k of one bundle into RUNS/<name>/fold_<k> (or resume its training; nothing once trained.json is
    there), and return the fold's datalist."""
    from metaseg.training.pipeline import train

    fold_dir = out_of_fold.fold_dir(runs, name, k)
    split = plan["splits"][k]
    datalist = cv_datalist(found, plan, runs, k, split["train"], split["val"])
    if not (fold_dir / "trained.json").is_file():
        resumed = (fold_dir / "models" / "checkpoint.pt").is_file()
        print(f"cv: {name} fold {k}: {'resuming' if resumed else 'training'} on {len(split['train'])} patients",
              flush=True)
        keep_log(fold_dir / "train.log")
        started = time.time()
        train(bundle, data, fold_dir, seed=plan["seed"], datalist=datalist, **overrides)
        write_json_atomic(fold_dir / "trained.json", {"seconds": round(time.time() - started), "resumed": resumed,
                                                      **overrides})
    return datalist


def run_fold(bundle: Path, name: str, data: Path, found, plan: dict, k: int, runs: Path, overrides: dict) -> None:
    """Train fold k of one bundle (or resume its training), then save its out-of-fold probabilities; a fold done by
    an older run only gets the views its files lack."""
    fold_dir = out_of_fold.fold_dir(runs, name, k)
    done = fold_dir / "fold.json"
    datalist = train_fold(bundle, name, data, found, plan, k, runs, overrides)
    patients = plan["splits"][k]["val"]
    print(f"cv: {name} fold {k}: predicting {len(patients)} held-out patients", flush=True)
    started = time.time()
    predict_fold(fold_dir, bundle, data, found.root, datalist["test"])
    if not done.is_file():
        write_json_atomic(done, {"bundle": name, "fold": k, "patients": patients,
                                 "predict_seconds": round(time.time() - started)})


def keep_log(log: Path) -> None:
    """An interrupted training's log becomes train.log.<n> (the resumed run writes a fresh train.log)."""
    if log.is_file():
        n = 1
        while log.with_name(f"{log.name}.{n}").exists():
            n += 1
        log.rename(log.with_name(f"{log.name}.{n}"))


def cross_validate(data: Path, bundles: list[str], folds: int = 5, seed: int = 0, out: Path = Path("reports"),
                   runs: Path = Path("runs/cv"), n_resamples: int = 2000,
                   fold: int | None = None, collect: bool = False, split: str = "patient",
                   **overrides) -> dict | None:
    """Every fold of every bundle (fold by fold, so both models' paired figures grow together), reports after each.
    What ships is the k fold models of each bundle (scripts/ship_weights.py), as nnU-Net's fold ensemble.

    As nnU-Net's `nnUNetv2_train DATASET CONFIG FOLD`: `fold` trains and predicts that fold alone (of every bundle;
    another machine, a job-array task or a GPU each) and writes no report (returns None); `collect` trains nothing and
    reports over whatever folds are done. Both check the same plan, so the folds of one command line fit together.

    `split` "site": leave-one-site-out (one fold per site, `folds` unused) in RUNS/site, reports in OUT/site_cv."""
    from metaseg.bundles import bundle_dir
    from metaseg.inference.engine import inference_parser

    if not Path(data).exists():
        raise UserError(f"data not found: {data}")
    if fold is not None and collect:
        raise UserError("--fold trains one fold: it does not go with --collect")
    if split not in ("patient", "site"):
        raise UserError(f"--split must be patient or site, got {split!r}")
    found = discover(data)
    if split == "site":
        sites, parts = site_folds(found.patients)
        folds = len(parts)
    else:
        parts = assign_folds(found.patients, folds, seed)
    if fold is not None and not 0 <= fold < folds:
        raise UserError(f"--fold must be between 0 and {folds - 1} ({folds} folds), got {fold}")
    resolved = {Path(str(b)).name: bundle_dir(b) for b in dict.fromkeys(bundles)}
    if len(resolved) != len(set(bundles)):
        raise UserError(f"bundles must have different folder names, got {bundles}")
    epochs = {name: overrides.get("epochs") or bundle_epochs(bundle) for name, bundle in resolved.items()}
    declared = {name: bool(inference_parser(bundle).get("one_lesion_per_patient", False))
                for name, bundle in resolved.items()}
    recipe = {"epochs": overrides.get("epochs", "each bundle's configs/train.json"),
              **{k: overrides[k] for k in ("spatial_size", "patch_size") if k in overrides}}
    plan = {"data": str(Path(data).resolve()), "folds": folds, "seed": seed, "recipe": recipe,
            "patients": found.patients, "splits": splits_final(parts),
            **({"split": "site", "sites": sites} if split == "site" else {})}
    fold_runs = runs / SITE_RUNS if split == "site" else runs
    check_plan(fold_runs, plan)
    folds_args = ["--split", "site"] if split == "site" else ["--folds", str(folds)]
    command = shlex.join(["metaseg", "cv", "--data", str(data), *folds_args, "--seed", str(seed),
                          *[a for b in resolved for a in ("--bundle", b)], "--out", str(out), "--runs", str(runs),
                          *[a for k, v in overrides.items() for a in (f"--{k.replace('_', '-')}", str(v))]])
    def run(k: int, name: str, bundle: Path) -> bool:
        """Fold k of one bundle unless done (every view of its held-out patients and its phantom keep scores
        saved); whether it ran."""
        fold_path = out_of_fold.fold_dir(fold_runs, name, k)
        if (fold_path / "fold.json").is_file() and out_of_fold.views_complete(fold_path, plan["splits"][k]["val"]) \
                and read_fold(fold_path) is not None:
            print(f"cv: {name} fold {k} already done, skipped", flush=True)
            return False
        # the final epoch's network is the fold's model.pt: the bundle validates once, after the last epoch
        run_fold(bundle, name, data, found, plan, k, fold_runs,
                 {**overrides, "epochs": epochs[name], "val_interval": epochs[name]})
        return True

    if fold is not None:
        for name, bundle in resolved.items():
            run(fold, name, bundle)
        return None
    report_out = report_dir(out, split)
    result = report(data, found, fold_runs, report_out, plan, list(resolved), command, n_resamples, declared)
    if collect:
        return result
    for k in range(folds):
        for name, bundle in resolved.items():
            if run(k, name, bundle):
                result = report(data, found, fold_runs, report_out, plan, list(resolved), command, n_resamples,
                                declared)
    return result
