"""Training throughput: each Bundle's own SupervisedTrainer against a plain PyTorch loop, same machine, one run.

Both sides use the bundle's network_def, loss, optimizer, batch size, input size and transform chain (the
deterministic part computed once, the random part per sample, positive slices oversampled the same way); the
bundle side also pays for its handlers (stats, TensorBoard, progress bar, per-epoch checkpoint). Validation is
switched off on both sides. Throughput counts training images per second after one warm-up epoch.

    python benchmarks/train_throughput.py                       # phantom data, both bundles
    python benchmarks/train_throughput.py --lgg ../shared/data/lgg/Data   # + one real epoch each via metaseg train

Writes benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.data import CacheDataset, DataLoader
from monai.transforms import Compose
from PIL import Image
from torch.utils.data import WeightedRandomSampler

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from metaseg.engine import bundle_imports  # noqa: E402
from metaseg.files import write_json_atomic  # noqa: E402
from metaseg.synth import synthesize  # noqa: E402


def bundle_parser(name: str, data: Path, work: Path, epochs: int) -> ConfigParser:
    bundle = REPO / "bundles" / name
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    parser.update({
        "bundle_root": str(bundle), "dataset_dir": str(data), "ckpt_dir": str(work / "models"),
        "output_dir": str(work / "eval"), "epochs": epochs, "val_interval": epochs + 1, "num_workers": 0,
    })
    return parser


def bundle_epochs(parser: ConfigParser, epochs: int) -> list[float]:
    trainer = parser.get_parsed_content("train#trainer")
    trainer.add_event_handler(Events.EPOCH_COMPLETED, parser.get_parsed_content("train#checkpoint"))
    times = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: times.append(time.perf_counter()))
    trainer.run()
    times.append(time.perf_counter())
    return [b - a for a, b in zip(times, times[1:])]


def plain_epochs(parser: ConfigParser, epochs: int) -> list[float]:
    """The same recipe as a hand-written loop: cached deterministic transforms, random ones per sample."""
    data = parser.get_parsed_content("train#data")
    deterministic = Compose(parser.get_parsed_content("train#deterministic_transforms"))
    random = Compose(parser.get_parsed_content("train#random_transforms"))
    cached = CacheDataset(data, deterministic, cache_rate=1.0, num_workers=0, progress=False)

    class Augmented(torch.utils.data.Dataset):
        def __len__(self):
            return len(cached)

        def __getitem__(self, i):
            return random(cached[i])

    weight = parser.get_parsed_content("positive_weight")
    weights = [weight if Image.open(d["label"]).getbbox() else 1.0 for d in data]
    loader = DataLoader(
        Augmented(), batch_size=parser.get_parsed_content("batch_size"),
        sampler=WeightedRandomSampler(weights, len(data), replacement=True), num_workers=0,
    )
    net = parser.get_parsed_content("network_def")
    loss_fn = parser.get_parsed_content("loss")
    optimizer = torch.optim.AdamW(net.parameters(), lr=parser.get_parsed_content("learning_rate"), weight_decay=1e-4)
    times = []
    net.train()
    for _ in range(epochs):
        start = time.perf_counter()
        for batch in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(net(batch["image"]), batch["label"])
            loss.backward()
            optimizer.step()
        times.append(time.perf_counter() - start)
    return times


def images_per_second(times: list[float], n_images: int) -> float:
    steady = times[1:] or times  # the first epoch warms up allocators and caches
    return n_images * len(steady) / sum(steady)


def lgg_epoch(name: str, lgg: Path, work: Path) -> dict:
    """Wall time of `metaseg train --epochs 1` on the real data: caching, one epoch, one validation."""
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "metaseg.cli", "train", "--bundle", name, "--data", str(lgg), "--epochs", "1",
         "--out", str(work / f"lgg_{name}")],
        check=True, stdout=subprocess.DEVNULL,
    )
    return {"command": f"metaseg train --bundle {name} --data {lgg} --epochs 1", "wall_s": time.perf_counter() - start}


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--patients", type=int, default=6)
    args.add_argument("--slices", type=int, default=16)
    args.add_argument("--epochs", type=int, default=3)
    args.add_argument("--lgg", type=Path, help="also time one real epoch per bundle on this Data folder")
    args.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "train_throughput.json")
    opts = args.parse_args()
    results = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__, "device": "cpu"},
        "data": f"phantom: {opts.patients} patients x {opts.slices} slices (metaseg synth, seed 0)",
        "epochs": opts.epochs,
        "bundles": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "Data"
        synthesize(data, patients=opts.patients, slices=opts.slices, seed=0)
        for name in ("attention_unet", "unetpp"):
            parser = bundle_parser(name, data, work / name, opts.epochs)
            n_train = len(parser.get_parsed_content("train#data"))
            with bundle_imports(REPO / "bundles" / name):  # networks are built inside the epoch runners
                bundle_t = bundle_epochs(parser, opts.epochs)
                plain_t = plain_epochs(bundle_parser(name, data, work / f"{name}_plain", opts.epochs), opts.epochs)
            bundle_ips, plain_ips = images_per_second(bundle_t, n_train), images_per_second(plain_t, n_train)
            results["bundles"][name] = {
                "train_images_per_epoch": n_train,
                "batch_size": parser.get_parsed_content("batch_size"),
                "spatial_size": parser.get_parsed_content("spatial_size"),
                "bundle_epoch_s": bundle_t, "plain_epoch_s": plain_t,
                "bundle_images_per_s": round(bundle_ips, 2), "plain_images_per_s": round(plain_ips, 2),
                "bundle_vs_plain": round(bundle_ips / plain_ips, 3),
            }
            print(name, results["bundles"][name], flush=True)
            if opts.lgg:
                results["bundles"][name]["lgg_one_epoch"] = lgg_epoch(name, opts.lgg, work)
                print(name, results["bundles"][name]["lgg_one_epoch"], flush=True)
    write_json_atomic(opts.out, results)
    print(f"written {opts.out}")


if __name__ == "__main__":
    main()
