"""Which model the server runs, and its test metrics: resolved from the settings once, at startup.

A bundle is only ever loaded from a local folder the operator configured (a shipped name, a path, or the
best-model record), never from anything a request carries.
"""

from __future__ import annotations

import json
import logging

from metaseg.bundles import bundle_dir
from metaseg.conventions import Model, default_weights, read_best
from metaseg.engine import Engine
from metaseg.errors import UserError
from serve.config import Settings

log = logging.getLogger(__name__)


def resolve(settings: Settings) -> Model:
    """The configured bundle, else the recorded best; raises UserError saying what to pass when there is none."""
    if settings.bundle:
        weights = settings.weights or default_weights(bundle_dir(settings.bundle))
        model = Model(bundle_dir(settings.bundle), weights)
    else:
        model = read_best(settings.best_record)
        model = Model(model.bundle, settings.weights or model.weights, model.overrides, model.report)
    if settings.spatial_size:
        model = Model(model.bundle, model.weights, {**model.overrides, "spatial_size": settings.spatial_size},
                      model.report)
    if not model.weights.is_file():
        raise UserError(f"no trained weights at {model.weights}: train the bundle, or pass --weights / METASEG_WEIGHTS")
    return model


def load(settings: Settings) -> tuple[Engine, dict[str, float] | None]:
    """The engine (the bundle's own network, weights and preprocessing) and its test metrics, if recorded."""
    model = resolve(settings)
    engine = Engine(model.bundle, weights=model.weights, overrides=model.overrides)
    return engine, None if settings.bundle else report_metrics(model)


def report_metrics(model: Model) -> dict[str, float] | None:
    """Means on patients the model did not train on, from the report its record names.

    The record's `report` names comparison.md (or .json) of `metaseg compare` (test-split means) or cv.md of
    `metaseg cv` (out-of-fold means); the numbers are in the .json beside it, under models.<bundle>.mean. No report,
    or an unreadable one, costs /info its metrics only, so it is a warning, not a failed start.
    """
    if model.report is None:
        return None
    try:
        report = json.loads(model.report.with_suffix(".json").read_text())
        if report.get("split") != "test" and not report.get("complete"):
            return None
        means = report["models"][model.bundle.name]["mean"]
        return {key: float(value) for key, value in means.items() if isinstance(value, int | float)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        log.warning("no test metrics from the comparison report %s: %s", model.report.name, type(err).__name__)
        return None
