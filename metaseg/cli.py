"""`metaseg` command line: one subcommand per stage, each a thin call into the library.

Every user mistake ends as one line on stderr and exit code 2; a traceback means a bug in metaseg.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from importlib.metadata import entry_points
from pathlib import Path

from metaseg.errors import UserError


COMMANDS = "metaseg.commands"  # entry points: register(subparsers) of a subcommand that lives outside metaseg


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message; the user gets one line
        raise UserError(message)


@contextmanager
def extra_imports(extra: str):
    """The imports of a subcommand that needs an optional part: a missing package is one line naming its extra."""
    try:
        yield
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] in ("metaseg", "serve", "ui"):
            raise  # metaseg's own module: a bug, not a package left out
        raise UserError(f"`metaseg {extra}` needs metaseg's {extra} extra ({err.name} is not installed): "
                        f"pip install 'metaseg[{extra}]'") from None


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1): {text}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return value


def cmd_synth(args) -> None:
    from metaseg.data.phantom import synthesize

    stats = synthesize(args.out, patients=args.patients, slices=args.slices, seed=args.seed)
    print(
        f"wrote {stats['patients']} synthetic patients x {stats['slices_per_patient']} slices to {args.out} "
        f"({stats['n_lesion_slices']} slices with lesions, {len(stats['lesions'])} lesions)"
    )


def cmd_datalist(args) -> None:
    from metaseg.data.datalist import build_datalist, summary, write_datalist
    from metaseg.data.discovery import discover

    datalist = build_datalist(discover(args.data), args.seed, args.test_fraction, args.val_fraction)
    write_datalist(datalist, args.out)
    print(summary(datalist))
    print(f"datalist written to {args.out}")


PATCH_HELP = "train on random patches of this size (multiple of 16, at most the input size) cut from the whole slice"


def _overrides(args) -> dict:
    chosen = {"epochs": args.epochs, "spatial_size": args.spatial_size, "patch_size": args.patch_size}
    return {k: v for k, v in chosen.items() if v is not None}


def cmd_train(args) -> None:
    from metaseg.bundles import bundle_dir
    from metaseg.training.pipeline import train

    run = args.out or Path("runs") / Path(args.bundle).name
    model = train(bundle_dir(args.bundle), args.data, run, seed=args.seed, restart=args.restart, **_overrides(args))
    print(f"best model: {model}")


def cmd_evaluate(args) -> None:
    import json

    from metaseg.bundles import bundle_dir
    from metaseg.training.pipeline import evaluate

    if not (args.run / "datalist.json").is_file():
        raise UserError(f"no datalist.json in {args.run}: train into it first (metaseg train --out {args.run})")
    metrics = evaluate(bundle_dir(args.bundle), args.data, args.run, split=args.split, steps=args.steps)
    scores = json.loads(metrics.read_text())
    low, high = scores["ci95"]["dice_3d"]
    print(f"{args.split}: per-patient 3D Dice {scores['mean']['dice_3d']:.3f} [{low:.3f}, {high:.3f}] over "
          f"{len(scores['metric_per_case'])} patients, inference steps {args.steps}; masks in "
          f"{args.run / args.split / 'masks'}, metrics in {metrics}")


def _probability(text: str) -> float:
    value = _fraction(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be in (0, 1)")
    return value


def cmd_predict(args) -> None:
    from metaseg.bundles import bundle_dir
    from metaseg.conventions import Model, default_weights, read_best
    from metaseg.inference.engine import Engine
    from metaseg.inference.predict import predict

    if args.bundle:
        model = Model(bundle_dir(args.bundle), args.weights or default_weights(bundle_dir(args.bundle)))
    else:
        model = read_best(args.best) if args.best else read_best()
    engine = Engine(model.bundle, weights=model.weights, overrides=model.overrides)
    print(f"model: {engine.name} ({engine.weights})", flush=True)
    report = predict(args.input, args.out, engine, threshold=args.threshold)
    print(f"wrote {len(report.written)} masks to {args.out}; skipped {len(report.skipped)} files")
    for name, why in report.skipped.items():
        print(f"  skipped {name}: {why}")


def cmd_compare(args) -> None:
    from metaseg.evaluation.comparison import compare
    from metaseg.evaluation.runs import parse_run

    report = compare(args.data, [parse_run(r) for r in args.run], args.split, args.out, args.best_out,
                     args.bootstrap, args.seed)
    for name, model in report["models"].items():
        low, high = model["ci95"]["dice_3d"]
        print(f"{name}: {args.split} per-patient 3D Dice {model['mean']['dice_3d']:.3f} [{low:.3f}, {high:.3f}]")
    print(f"model to serve: {report['best']} ({report['selected_by']}); reports in {args.out}, "
          f"best-model record {args.best_out or args.out / 'best.json'}")


def cmd_cv(args) -> None:
    from metaseg.bundles import NAMES
    from metaseg.evaluation.cv_markdown import summary_lines
    from metaseg.training.cv import cross_validate, report_dir

    result = cross_validate(args.data, args.bundle or list(NAMES), args.folds, args.seed, args.out, args.runs,
                            args.bootstrap, args.fold, args.collect, args.split, **_overrides(args))
    if result is None:
        print(f"fold {args.fold} done in {args.runs}; reports: the same command with --collect instead of --fold")
        return
    print("\n".join(summary_lines(result)))
    done = "all folds done" if result["complete"] else "NOT all folds done (partial reports)"
    print(f"{done}; reports in {report_dir(args.out, args.split) / 'cv.md'}")


def cmd_failures(args) -> None:
    import shlex

    from metaseg.evaluation.failures import failures

    command = shlex.join(["metaseg", "failures", "--data", str(args.data), "--runs", str(args.runs), "--report",
                          str(args.report), "--out", str(args.out)])
    for entry in failures(args.data, args.runs, args.report, args.out, command):
        print(f"{entry['patient']}: 3D Dice {entry['dice_3d']:.3f}: {entry['what_went_wrong']}")
    print(f"wrote {args.out / 'failures.md'} and its pictures in {args.out / 'failures'}")


def cmd_retention(args) -> None:
    import shlex

    from metaseg.bundles import bundle_dir
    from metaseg.conventions import default_weights, model_overrides
    from metaseg.evaluation.cv_report import REPO
    from metaseg.evaluation.retention import model_keep_scores, summary
    from metaseg.evaluation.runs import parse_run
    from metaseg.files import relative_paths, write_json_atomic
    from metaseg.inference.engine import Engine

    models = {}
    for name, run in map(parse_run, args.run):
        engine = Engine(bundle_dir(name), default_weights(run), overrides=model_overrides(run))
        models[name] = {"run": relative_paths(str(run), REPO), **model_keep_scores(engine)}
        print(summary(name, models[name]))
    command = shlex.join(["metaseg", "retention", *(f"--run={r}" for r in args.run), "--out", str(args.out)])
    write_json_atomic(args.out, {"command": relative_paths(command, REPO), "models": models})
    print(f"wrote {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="metaseg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("synth", help="write the synthetic brain-MRI-with-metastases phantom in the Data.zip layout")
    p.add_argument("out", type=Path, help="output folder (plays the role of Data/)")
    p.add_argument("--patients", type=positive_int, default=10)
    p.add_argument("--slices", type=positive_int, default=20, help="slices per patient")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("datalist", help="find image/mask pairs and split them by patient into a MONAI datalist")
    p.add_argument("data", type=Path, help="a Data folder or Data.zip")
    p.add_argument("--out", type=Path, required=True, help="datalist JSON to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-fraction", type=_fraction, default=0.2, help="share of patients for test (0.2)")
    p.add_argument("--val-fraction", type=_fraction, default=0.1, help="share of patients for validation (0.1)")
    p.set_defaults(func=cmd_datalist)

    for name, func, text in (
        ("train", cmd_train, "split the data by patient and train a bundle (python -m monai.bundle run, train.json)"),
        ("evaluate", cmd_evaluate, "segment a run's test or validation patients as predict and the server do, and score them"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--bundle", required=True, help="unetpp, attention_unet, or a bundle folder")
        p.add_argument("--data", type=Path, required=True, help="a Data folder or Data.zip")
        p.set_defaults(func=func)
    sub.choices["train"].add_argument("--epochs", type=positive_int, help="override the bundle's epochs")
    sub.choices["train"].add_argument("--spatial-size", type=positive_int, help="override the input size (multiple of 16)")
    sub.choices["train"].add_argument("--patch-size", type=positive_int, help=PATCH_HELP)
    sub.choices["train"].add_argument("--out", type=Path, help="run folder (default runs/<bundle>)")
    sub.choices["train"].add_argument("--seed", type=int, default=0)
    sub.choices["train"].add_argument("--restart", action="store_true",
                                      help="delete the run folder's checkpoints instead of resuming them")
    sub.choices["evaluate"].add_argument("--run", type=Path, required=True, help="the folder `metaseg train` wrote")
    sub.choices["evaluate"].add_argument("--split", choices=("validation", "test"), default="test")
    sub.choices["evaluate"].add_argument(
        "--steps", choices=("chosen", "off"), default="chosen",
        help="chosen: the bundle's inference_steps (default); off: threshold 0.5, no flip TTA, no component steps")

    p = sub.add_parser("predict", help="segment a Data folder/zip or a folder of PNG/TIFF/DICOM images into 0/255 PNG masks")
    p.add_argument("input", type=Path, help="a Data folder or Data.zip, or a folder of images")
    p.add_argument("--out", type=Path, required=True, help="folder for the <stem>_seg.png masks")
    p.add_argument("--bundle", help="unetpp, attention_unet or a bundle folder (default: the recorded best)")
    p.add_argument("--weights", type=Path, help="model.pt to use with --bundle (default: the bundle's models/model.pt)")
    p.add_argument("--best", type=Path, help="a best-model record written by `metaseg compare` (default: bundles/best.json)")
    p.add_argument("--threshold", type=_probability,
                   help="lesion probability threshold (default: the bundle's inference_steps threshold)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("compare", help="score two runs' evaluated masks on the same patients; record the model to "
                       "serve: the cross-validation's architecture (bundles/best.json) with its run's weights")
    p.add_argument("--data", type=Path, required=True, help="the Data folder or Data.zip the runs were trained on")
    p.add_argument("--run", action="append", required=True, metavar="NAME=DIR", help="bundle name and run folder, twice")
    p.add_argument("--split", choices=("validation", "test"), default="test", help="patients to report on (test)")
    p.add_argument("--out", type=Path, default=Path("reports"), help="report folder (reports)")
    p.add_argument("--best-out", type=Path, help="best-model record to write (default OUT/best.json)")
    p.add_argument("--bootstrap", type=positive_int, default=2000, help="bootstrap resamples for the 95%% CIs")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("cv", help="patient k-fold cross-validation of the bundles; inference steps chosen out of fold")
    p.add_argument("--data", type=Path, required=True, help="a Data folder or Data.zip")
    p.add_argument("--folds", type=positive_int, default=5, help="number of patient folds (5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fold assignment and of training (0)")
    p.add_argument("--bundle", action="append", help="unetpp, attention_unet or a bundle folder; repeat (default: both)")
    p.add_argument("--epochs", type=positive_int, help="override the bundles' epochs")
    p.add_argument("--spatial-size", type=positive_int, help="override the input size (multiple of 16)")
    p.add_argument("--patch-size", type=positive_int, help=PATCH_HELP)
    p.add_argument("--out", type=Path, default=Path("reports"), help="folder for cv.json, cv.md (reports)")
    p.add_argument("--runs", type=Path, default=Path("runs/cv"), help="folder for the fold runs (runs/cv); rerun to resume")
    p.add_argument("--bootstrap", type=positive_int, default=2000, help="bootstrap resamples for the 95%% CIs")
    p.add_argument("--fold", type=int, help="train and predict this fold alone (0-based; no report), e.g. one per "
                   "GPU or job-array task; then the same command with --collect")
    p.add_argument("--collect", action="store_true", help="train nothing: report over the folds done in --runs")
    p.add_argument("--split", choices=("patient", "site"), default="patient",
                   help="patient k-fold (default), or site: leave-one-site-out by the TCGA site code of the patient "
                   "ids, one fold per site (--folds unused), in RUNS/site with reports in OUT/site_cv; the patient "
                   "report then shows the site figure beside its own")
    p.set_defaults(func=cmd_cv)

    p = sub.add_parser("retention", help="the reference phantom's lesions that trained models find, with the highest "
                       "lesion score that keeps each: what bounds a min_lesion_score (metaseg cv measures its folds)")
    p.add_argument("--run", action="append", required=True, metavar="NAME=DIR",
                   help="bundle name and `metaseg train` run folder (the demo's: runs/demo/NAME); repeat")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.set_defaults(func=cmd_retention)

    p = sub.add_parser("failures", help="the served model's 5 worst out-of-fold patients of a `metaseg cv`: a strip "
                       "of each one's lesion slices, truth and prediction outlined, and what went wrong")
    p.add_argument("--data", type=Path, required=True, help="the Data folder or Data.zip of the cross-validation")
    p.add_argument("--runs", type=Path, required=True, help="its fold runs (metaseg cv --runs)")
    p.add_argument("--report", type=Path, required=True, help="its cv.json (in metaseg cv --out)")
    p.add_argument("--out", type=Path, required=True, help="folder for failures.md and failures/<patient>.png")
    p.set_defaults(func=cmd_failures)

    for command in sorted(entry_points(group=COMMANDS), key=lambda e: e.name):  # serve, ui: their own packages
        command.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except UserError as err:
        print(f"metaseg: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("metaseg: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
