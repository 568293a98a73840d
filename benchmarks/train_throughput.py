"""Training throughput: each Bundle's SupervisedTrainer epoch against a plain fp32 PyTorch loop, interleaved in one run.

The bundle side is the bundle's own `train#trainer` as configured (bf16 autocast where the CPU or GPU supports it,
threaded loader, handlers, progress bar, TensorBoard, the resumable checkpoint after every epoch), with validation
switched off; it is run twice, as shipped and with `bf16: false`. The plain side is the reference loop: the same
network_def, loss, AdamW, batch size and input size, fp32, on random tensors already in memory, as many batches as the
bundle epoch has. After every bundle iteration one plain step runs (same process, same moment), so on a shared
machine both sides see the same load and the ratio bundle / plain stays fair; the first iterations are a warm-up and
not counted. The bundle's loader thread may prepare its next batch while a plain step runs; the worst case, all of an
epoch's data preparation (timed alone, `data_prep_epoch_s`) charged to the bundle, is reported beside the ratio.
Also recorded: the one-time costs (caching the training set, the sampler's weights) and, per handler, where the
bundle epoch goes (ignite's HandlersTimeProfiler: data wait, iteration, each handler). With a CUDA GPU the same runs
happen on it (the config turns on its GPU path by itself), plus the raw bf16 channels_last loop as the GPU goal's
reference; `--variants compiled` times `compile: true`.

    python benchmarks/train_throughput.py                        # ../shared/data/lgg/Data if present, else phantom
    python benchmarks/train_throughput.py --data PATH --epochs 3 --bundles attention_unet

Writes benchmarks/results/train_throughput.json (--out).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from ignite.engine import Events
from ignite.handlers import HandlersTimeProfiler
from monai.bundle import ConfigParser

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from metaseg.bundles import config  # noqa: E402
from metaseg.bundles import bundle_imports  # noqa: E402
from metaseg.files import relative_paths, write_json_atomic  # noqa: E402
from metaseg.data.phantom import synthesize  # noqa: E402

SHARED_DATA = REPO.parent / "shared" / "data" / "lgg" / "Data"
NAMES = ("attention_unet", "unetpp")
VARIANTS = {"shipped": {}, "bf16_off": {"bf16": False}, "compiled": {"compile": True}}
WARMUP_ITERATIONS = 3


def cpu_model() -> str:
    """The CPU's model name (machines differ day to day: a results file says which one it measured)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor()


def sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def bundle_parser(name: str, data: Path, work: Path, epochs: int, **overrides) -> ConfigParser:
    bundle = REPO / "bundles" / name
    return config(bundle, "training", {
        "dataset_dir": str(data), "ckpt_dir": str(work / "models"), "output_dir": str(work / "eval"), "epochs": epochs,
        "val_interval": epochs + 1, **overrides,
    })


class PlainLoop:
    """The plain loop (fp32 unless told) on random in-memory tensors, one batch per `step()`, cycling over an epoch."""

    def __init__(self, parser: ConfigParser, device: torch.device, n_images: int, bf16: bool = False, channels_last: bool = False):
        self.device, self.bf16 = device, bf16
        self.net = parser.get_parsed_content("network_def", lazy=False).to(device).train()
        self.loss_fn = parser.get_parsed_content("loss", lazy=False)
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=parser.get_parsed_content("learning_rate"), weight_decay=1e-4)
        batch, size = parser.get_parsed_content("batch_size"), parser.get_parsed_content("spatial_size")
        channels = parser.get_parsed_content("network_def#in_channels")
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.batches = [
            (torch.randn(n, channels, size, size, device=device).to(memory_format=fmt),
             (torch.rand(n, 1, size, size, device=device) > 0.97).float())
            for n in [min(batch, n_images - i) for i in range(0, n_images, batch)]
        ]
        self.next = 0

    def step(self) -> float:
        image, label = self.batches[self.next]
        self.next = (self.next + 1) % len(self.batches)
        start = sync(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            pred = self.net(image)
        pred = [p.float() for p in pred] if isinstance(pred, list) else pred.float()
        self.loss_fn(pred, label).backward()
        self.optimizer.step()
        return sync(self.device) - start

    def epoch(self) -> float:
        return sum(self.step() for _ in self.batches)


def data_epoch(parser: ConfigParser) -> float:
    """Seconds for one pass over the bundle's training loader alone: the random transforms and collation of an epoch."""
    start = time.perf_counter()
    for _ in parser.get_parsed_content("train#dataloader"):
        pass
    return time.perf_counter() - start


def handler_profile(profiler: HandlersTimeProfiler) -> dict:
    """Seconds spent in each of the bundle's handlers, waiting for data, and in the iteration itself."""
    out = {}
    for name, event, total, *_ in profiler.get_results():
        if isinstance(total, float) and not name.startswith("bundle_vs_plain") and name != "Total":
            out[f"{name} ({event})" if event not in ("", "None") else name] = total
    return out


def bundle_vs_plain(parser: ConfigParser, epochs: int, plain: PlainLoop) -> dict:
    """Bundle epochs with one plain step after every bundle iteration, so both see the same load at every moment.

    A bundle epoch is its wall time less the plain steps run inside it; a plain epoch is the sum of its steps (as
    many as the bundle epoch has iterations). The run's first iterations (WARMUP_ITERATIONS, fewer in a one-batch
    epoch) count on neither side.
    """
    device = parser.get_parsed_content("device")
    start = time.perf_counter()
    parser.get_parsed_content("train#dataset")
    caching = time.perf_counter() - start
    start = time.perf_counter()
    parser.get_parsed_content("train#sampler")
    sampler = time.perf_counter() - start
    data_prep = data_epoch(parser)
    trainer = parser.get_parsed_content("train#trainer")
    trainer.add_event_handler(Events.EPOCH_COMPLETED, parser.get_parsed_content("train#checkpoint"))
    profiler = HandlersTimeProfiler()
    profiler.attach(trainer)
    epoch_length = len(parser.get_parsed_content("train#dataloader"))
    warmup = min(WARMUP_ITERATIONS, epoch_length - 1)
    bundle_t, plain_t, begun = [], [], []

    def epoch_started(engine):
        plain_t.append(0.0)
        begun.append(sync(device))

    def plain_step(engine):
        took = plain.step()
        if engine.state.iteration <= warmup:  # warm-up (allocators, caches): counted on neither side
            begun[-1] = sync(device)
        else:
            plain_t[-1] += took

    def epoch_completed(engine):
        bundle_t.append(sync(device) - begun[-1] - plain_t[-1])

    trainer.add_event_handler(Events.EPOCH_STARTED, epoch_started)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, plain_step)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, epoch_completed)
    trainer.run()
    iterations = [epoch_length] * epochs
    iterations[0] -= warmup
    profile = {k: round(v / epochs, 3) for k, v in handler_profile(profiler).items()}
    ratios = [b / p for b, p in zip(bundle_t, plain_t)]
    # the loader thread may prepare a batch while a plain step runs; charging all of it to the bundle bounds that
    bounds = [(b + data_prep * i / epoch_length) / p for b, p, i in zip(bundle_t, plain_t, iterations)]
    return {
        "autocast_bf16": parser.get_parsed_content("mixed_precision")._enabled,
        "caching_s": round(caching, 2), "sampler_weights_s": round(sampler, 2),
        "iterations_counted": iterations,
        "bundle_epoch_s": [round(t, 2) for t in bundle_t], "plain_fp32_epoch_s": [round(t, 2) for t in plain_t],
        "data_prep_epoch_s": round(data_prep, 2),
        "ratio_per_epoch": [round(r, 3) for r in ratios], "ratio_median": round(statistics.median(ratios), 3),
        "ratio_with_all_data_prep_charged": [round(r, 3) for r in bounds],
        "per_epoch_profile_s": profile,
    }


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--data", type=Path, help=f"a Data folder (default: {SHARED_DATA} if present, else a phantom)")
    args.add_argument("--patients", type=int, default=6, help="phantom size when no real data")
    args.add_argument("--slices", type=int, default=16)
    args.add_argument("--epochs", type=int, default=2)
    args.add_argument("--bundles", nargs="+", default=list(NAMES), choices=NAMES)
    args.add_argument("--spatial-size", type=int, help="override the bundles' input size (tests use a small one)")
    args.add_argument("--variants", nargs="+", default=["shipped", "bf16_off"], choices=list(VARIANTS),
                      help="bundle configurations to time (compiled: torch.compile)")
    args.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "train_throughput.json")
    opts = args.parse_args()
    cuda = torch.cuda.is_available()
    results = {
        "command": relative_paths("python " + " ".join(sys.argv), REPO),
        "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(),
                    "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "gpu": torch.cuda.get_device_name() if cuda else None},
        "epochs": opts.epochs, "warmup_iterations_not_counted": WARMUP_ITERATIONS, "bundles": {},
    }
    overrides = {"spatial_size": opts.spatial_size} if opts.spatial_size else {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = opts.data or (SHARED_DATA if SHARED_DATA.is_dir() else None)
        if data is None:
            data = work / "Data"
            synthesize(data, patients=opts.patients, slices=opts.slices, seed=0)
            results["data"] = f"phantom: {opts.patients} patients x {opts.slices} slices (metaseg synth, seed 0)"
        else:
            results["data"] = relative_paths(str(data), REPO)
        for name in opts.bundles:
            with bundle_imports(REPO / "bundles" / name):
                entry = {}
                for variant in opts.variants:
                    parser = bundle_parser(name, data, work / name / variant, opts.epochs, **overrides, **VARIANTS[variant])
                    n = len(parser.get_parsed_content("train#data"))
                    plain = PlainLoop(parser, parser.get_parsed_content("device"), n)
                    entry[variant] = bundle_vs_plain(parser, opts.epochs, plain)
                    print(name, variant, entry[variant], flush=True)
                entry.update(train_images_per_epoch=n, batch_size=parser.get_parsed_content("batch_size"),
                             spatial_size=parser.get_parsed_content("spatial_size"))
                if cuda and "shipped" in entry:  # the GPU goal's reference: the raw loop at its fastest (bf16, channels_last)
                    raw = PlainLoop(parser, torch.device("cuda"), n, bf16=True, channels_last=True)
                    raw.epoch()  # warm-up
                    raw_t = [raw.epoch() for _ in range(opts.epochs)]
                    shipped = entry["shipped"]
                    bundle_its = sum(shipped["iterations_counted"]) / sum(shipped["bundle_epoch_s"])
                    raw_its = len(raw.batches) * len(raw_t) / sum(raw_t)
                    entry["gpu_raw_bf16_cl_images_per_s"] = round(n * len(raw_t) / sum(raw_t), 1)
                    entry["gpu_bundle_share_of_raw"] = round(bundle_its / raw_its, 3)
                results["bundles"][name] = entry
    write_json_atomic(opts.out, results)
    print(f"written {opts.out}")


if __name__ == "__main__":
    main()
