"""Ignite handlers and handler lists the configs name: the evaluation's metrics.json, and which handlers a
distributed rank attaches."""

import json
import os
from typing import Sequence

import torch.distributed as dist
from ignite.engine import Engine, Events


class MetricsJSON:
    """Writes the evaluator's final metrics to `output_dir/metrics.json` when it completes (what metaseg and the
    model card read), through a temporary file and a rename: a killed run leaves no half-written file."""

    def __init__(self, output_dir: str, filename: str = "metrics.json") -> None:
        self.path = os.path.join(output_dir, filename)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path + ".tmp", "w") as out:
            json.dump({k: float(v) for k, v in engine.state.metrics.items()}, out, indent=2)
        os.replace(self.path + ".tmp", self.path)


def on_this_rank(handlers: Sequence, rank_zero_only: Sequence[str]) -> list:
    """The handlers this process attaches: all of them on rank 0 (or without torch.distributed); on the other
    ranks none of the classes named in `rank_zero_only` (logging, TensorBoard, progress bar), which would only
    repeat rank 0's output."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        return list(handlers)
    return [h for h in handlers if type(h).__name__ not in rank_zero_only]
