"""Where a CPU training step goes: each bundle's network, loss and AdamW (its batch and size, random tensors), fp32
against bf16 autocast, timed in alternation and profiled op by op with torch.profiler; plus whether `torch.compile`
of the network gets through a training step.

Why: on some CPUs bf16 gains far less than the 1.6-1.7x measured elsewhere, and the bundle epoch / plain fp32 ratio
(benchmarks/train_throughput.py) is essentially that gain. The op table says what bf16 does not speed up.

    python benchmarks/step_profile.py [--bundles unetpp] [--steps 6]

Writes benchmarks/results/step_profile.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import NAMES, REPO, PlainLoop, bundle_parser, cpu_model  # noqa: E402
from metaseg.bundles import bundle_imports  # noqa: E402
from metaseg.files import write_json_atomic  # noqa: E402

TOP_OPS = 12


def timed_steps(loops: dict[str, PlainLoop], steps: int) -> dict[str, float]:
    """Median seconds per step of each loop, steps taken in alternation so that both see the same machine load."""
    times = {name: [] for name in loops}
    for loop in loops.values():
        loop.step()  # warm-up (oneDNN primitive creation)
    for _ in range(steps):
        for name, loop in loops.items():
            times[name].append(loop.step())
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def op_table(loop: PlainLoop, steps: int) -> list[dict]:
    """The ops with the most self CPU time per step, and their share of the step."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            loop.step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "self_s_per_step": round(e.self_cpu_time_total / 1e6 / steps, 4),
             "share": round(e.self_cpu_time_total / total, 3), "calls_per_step": e.count // steps}
            for e in events[:TOP_OPS]]


def compile_check(parser) -> str:
    """'ok', or the last line of the error torch.compile of the network raises in a bf16 training step."""
    loop = PlainLoop(parser, torch.device("cpu"), 16, bf16=True)
    loop.net = torch.compile(loop.net)
    try:
        loop.step()
    except Exception as err:  # noqa: BLE001 - the result is the error itself
        lines = [line for line in traceback.format_exception_only(type(err), err)[-1].splitlines() if line.strip()]
        return "fails: " + (lines[0] if lines else type(err).__name__)[:300]
    return "ok"


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--bundles", nargs="+", default=list(NAMES), choices=NAMES)
    args.add_argument("--steps", type=int, default=6, help="timed steps per precision (median), and profiled steps")
    args.add_argument("--no-compile", action="store_true", help="skip the torch.compile check (minutes on 2 cores)")
    args.add_argument("--spatial-size", type=int, help="override the bundles' input size (128)")
    args.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "step_profile.json")
    opts = args.parse_args()
    results = {"command": "python " + " ".join(sys.argv), "cpu": cpu_model(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "bundles": {}}
    overrides = {"spatial_size": opts.spatial_size} if opts.spatial_size else {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in opts.bundles:
            with bundle_imports(REPO / "bundles" / name):
                parser = bundle_parser(name, Path(tmp), Path(tmp), 1, **overrides)
                loops = {"fp32": PlainLoop(parser, torch.device("cpu"), 16),
                         "bf16": PlainLoop(parser, torch.device("cpu"), 16, bf16=True)}
                seconds = timed_steps(loops, opts.steps)
                entry = {"batch": parser["batch_size"], "spatial_size": parser["spatial_size"], "step_s": seconds, "bf16_speedup": round(seconds["fp32"] / seconds["bf16"], 3),
                         "ops": {precision: op_table(loop, opts.steps) for precision, loop in loops.items()}}
                if not opts.no_compile:
                    started = time.perf_counter()
                    entry["compile_bf16_step"] = compile_check(parser)
                    entry["compile_check_s"] = round(time.perf_counter() - started, 1)
                results["bundles"][name] = entry
                print(name, entry["step_s"], "bf16 speedup", entry["bf16_speedup"], entry.get("compile_bf16_step", ""),
                      flush=True)
    write_json_atomic(opts.out, results)


if __name__ == "__main__":
    main()
