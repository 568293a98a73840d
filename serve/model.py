"""Which model the server runs, and its test metrics: resolved from the settings once, at startup.

A bundle is only ever loaded from a local folder the operator configured (a shipped name, a path, or the
best-model record), never from anything a request carries.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass

from metaseg.bundles import bundle_dir
from metaseg.conventions import Model, default_weights, read_best
from metaseg.inference.engine import Engine
from metaseg.errors import UserError
from serve import dicomseg
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


@dataclass(frozen=True)
class Recorded:
    """What the report of the best-model record says about the served model, for /info; None where it says nothing."""

    test_metrics: dict[str, float] | None = None
    one_channel_dice_loss: float | None = None


def load(settings: Settings) -> tuple[Engine, Recorded]:
    """The engine (the bundle's own network, weights and preprocessing) and what its record's report says of it.

    The bundle's DICOM SEG label is checked here, so that a malformed one stops the start, not a request."""
    model = resolve(settings)
    engine = Engine(model.bundle, weights=model.weights, overrides=model.overrides)
    try:
        dicomseg.finding(engine.metadata)
    except UserError as err:
        raise UserError(f"{engine.name}: {err}") from None
    return engine, Recorded() if settings.bundle else recorded(model)


def recorded(model: Model) -> Recorded:
    """Means on patients the model did not train on, and what a one-channel input costs, from the report its record
    names.

    The record's `report` names comparison.md (or .json) of `metaseg compare` (test-split means) or cv.md of
    `metaseg cv` (out-of-fold means); the numbers are in the .json beside it: models.<bundle>.mean, and (cv only)
    one_channel_loss.<bundle>.mean_difference. No report, or an unreadable one, costs /info these figures only, so it
    is a warning, not a failed start; a missing figure is null.
    """
    if model.report is None:
        return Recorded()
    try:
        report = json.loads(model.report.with_suffix(".json").read_text())
        if report.get("split") != "test" and not report.get("complete"):
            return Recorded()
        means = report["models"][model.bundle.name]["mean"]
        metrics = {key: float(value) for key, value in means.items() if isinstance(value, int | float)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        log.warning("no test metrics from the comparison report %s: %s", model.report.name, type(err).__name__)
        return Recorded()
    losses = report.get("one_channel_loss")
    loss = losses.get(model.bundle.name) if isinstance(losses, dict) else None
    value = loss.get("mean_difference") if isinstance(loss, dict) else None
    known = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return Recorded(metrics, float(value) if known else None)
