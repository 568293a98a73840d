"""The fast training paths change speed, not results: bf16 autocast against fp32, the device-resident data path
against the CPU one, and the throughput benchmark end to end on a tiny phantom (no timing is asserted)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import ToDeviced
from monai.utils import set_determinism

from conftest import REPO
from metaseg.bundles import bundle_imports

NAMES = ("unetpp", "attention_unet")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    from metaseg.data.phantom import synthesize

    root = tmp_path_factory.mktemp("phantom") / "Data"
    synthesize(root, patients=5, slices=4, seed=2)
    return root


@pytest.fixture(autouse=True)
def bundle_scripts(request):
    """The test's bundle's scripts/ importable while it parses train.json, as MONAI's `run` makes them."""
    callspec = getattr(request.node, "callspec", None)
    name = callspec.params.get("name", "attention_unet") if callspec else "attention_unet"
    with bundle_imports(REPO / "bundles" / name):
        yield


def parser_for(name: str, data: Path | None = None, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / name / "configs" / "train.json"))
    parser.update({"spatial_size": 32, **({"dataset_dir": str(data)} if data else {}), **overrides})
    return parser


def cpu_flags() -> set[str]:
    """The CPU's feature flags as the kernel reports them: a source independent of the config's torch probe."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def dtype_inside(name: str, **overrides) -> torch.dtype:
    """The dtype the network's first convolution computes in under the bundle's own `forward`."""
    parser = parser_for(name, **overrides)
    net = parser.get_parsed_content("network_def")
    seen = []
    next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d)).register_forward_hook(
        lambda m, i, o: seen.append(o.dtype))
    with torch.no_grad():
        parser.get_parsed_content("forward")(torch.randn(2, 3, 32, 32), net)
    return seen[0]


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="no /proc/cpuinfo to read the CPU's flags from")
@pytest.mark.parametrize("name", NAMES)
def test_bf16_follows_the_switch_and_the_hardware(name):
    """On the CPU the network computes in bf16 exactly where the CPU has native bf16 (AVX512-BF16 or AMX), and in
    fp32 with the switch off."""
    native = bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    assert dtype_inside(name) == (torch.bfloat16 if native else torch.float32)
    assert dtype_inside(name, bf16=False) == torch.float32


@pytest.mark.parametrize("name", NAMES)
def test_bf16_and_fp32_training_steps_agree(name):
    """One optimizer step through the bundle's own `forward` and loss, with autocast forced on and off."""
    torch.manual_seed(0)
    image = torch.randn(4, parser_for(name).get_parsed_content("network_def#in_channels"), 32, 32)
    label = torch.zeros(4, 1, 32, 32)
    label[:, :, 10:16, 12:20] = 1
    outcome = {}
    for bf16 in (True, False):
        parser = parser_for(name, **{"mixed_precision#enabled": bf16})
        torch.manual_seed(1)
        net = parser.get_parsed_content("network_def")
        forward, loss_fn = parser.get_parsed_content("forward"), parser.get_parsed_content("loss")
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
        inner = []
        first_conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
        first_conv.register_forward_hook(lambda m, i, o: inner.append(o.dtype))
        torch.manual_seed(2)  # the same dropout masks on both sides
        pred = forward(image, net)
        heads = pred if isinstance(pred, list) else [pred]
        assert all(h.dtype == torch.float32 for h in heads)  # the loss always sees fp32
        assert inner[0] == (torch.bfloat16 if bf16 else torch.float32)  # the network really ran in bf16
        loss = loss_fn(pred, label)
        loss.backward()
        optimizer.step()
        outcome[bf16] = (loss.item(), torch.softmax(heads[-1].detach(), 1), copy.deepcopy(net.state_dict()))
    (loss_bf16, prob_bf16, state_bf16), (loss_fp32, prob_fp32, state_fp32) = outcome[True], outcome[False]
    assert torch.isfinite(torch.tensor([loss_bf16, loss_fp32])).all()
    assert abs(loss_bf16 - loss_fp32) <= 0.02 * abs(loss_fp32)
    assert (prob_bf16 - prob_fp32).abs().max() <= 0.05
    assert all(torch.isfinite(v).all() for v in state_bf16.values() if v.is_floating_point())


def first_batches(name: str, data: Path, n: int = 2, **overrides) -> list[dict]:
    parser = parser_for(name, data, batch_size=4, **overrides)
    set_determinism(seed=0)
    loader = parser.get_parsed_content("train#dataloader")
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == n:
            break
    set_determinism(seed=None)
    return batches


def test_device_resident_path_runs_the_same_transforms(phantom):
    """data_on_device caches on the device (the GPU where there is one) and augments there; same seed, same batches."""
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    parser = parser_for("attention_unet", phantom, data_on_device=True, device=f"$torch.device('{device}')")
    assert any(isinstance(t, ToDeviced) for t in parser.get_parsed_content("train#preprocessing").transforms)
    assert not any(isinstance(t, ToDeviced) for t in parser_for("attention_unet").get_parsed_content("train#preprocessing").transforms)
    on_host = first_batches("attention_unet", phantom, data_on_device=False, device="$torch.device('cpu')")
    on_device = first_batches("attention_unet", phantom, data_on_device=True, device=f"$torch.device('{device}')")
    assert len(on_host) == len(on_device) == 2
    for host, dev in zip(on_host, on_device):
        assert dev["image"].device.type == torch.device(device).type and type(dev["image"]) is torch.Tensor
        assert torch.equal(host["label"], dev["label"].cpu())
        torch.testing.assert_close(host["image"], dev["image"].cpu(), atol=1e-4, rtol=1e-4)
        assert host["image"].std() > 0.1  # real, augmented images, not a constant


def test_random_transforms_never_change_the_cache(phantom):
    """copy_cache is off for training: a whole epoch of draws must leave the cached plain tensors as they were."""
    parser = parser_for("attention_unet", phantom, batch_size=4)
    dataset = parser.get_parsed_content("train#dataset")
    before = [{k: v.clone() for k, v in item.items()} for item in dataset._cache]
    assert all(type(v) is torch.Tensor for item in dataset._cache for v in item.values())  # no metadata cached
    drawn = sum(len(batch["image"]) for batch in parser.get_parsed_content("train#dataloader"))
    assert drawn == len(before)
    assert all(torch.equal(old[k], new[k]) for old, new in zip(before, dataset._cache) for k in old)


def test_benchmark_runs_on_a_tiny_phantom(phantom, tmp_path):
    out = tmp_path / "throughput.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "--data", str(phantom), "--epochs", "2",
           "--spatial-size", "32", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results["bundles"]) == set(NAMES)
    for entry in results["bundles"].values():
        assert entry["spatial_size"] == 32 and entry["train_images_per_epoch"] > 0
        native = bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
        for variant, bf16 in (("shipped", native), ("bf16_off", False)):
            run = entry[variant]
            assert run["autocast_bf16"] == bf16
            assert len(run["bundle_epoch_s"]) == len(run["plain_fp32_epoch_s"]) == len(run["iterations_counted"]) == 2
            assert run["ratio_median"] > 0 and run["data_prep_epoch_s"] > 0
            assert all(r <= b for r, b in zip(run["ratio_per_epoch"], run["ratio_with_all_data_prep_charged"]))
            assert {"Processing", "Dataflow", "Checkpoint (EPOCH_COMPLETED)"} <= set(run["per_epoch_profile_s"])


def test_step_profile_times_and_profiles_both_precisions(tmp_path):
    out = tmp_path / "profile.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "step_profile.py"), "--steps", "1", "--spatial-size", "32",
           "--no-compile", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results["bundles"]) == set(NAMES)
    for entry in results["bundles"].values():
        assert entry["spatial_size"] == 32 and set(entry["step_s"]) == {"fp32", "bf16"}
        assert entry["bf16_speedup"] == pytest.approx(entry["step_s"]["fp32"] / entry["step_s"]["bf16"], rel=1e-2)
        for ops in entry["ops"].values():
            assert ops and all(op["self_s_per_step"] >= 0 and 0 <= op["share"] <= 1 for op in ops)
            assert sum(op["share"] for op in ops) <= 1.001
            assert any("convolution" in op["op"] for op in ops)  # the network's own work is in the table


def test_gpu_switches_wire_through_and_train_on_cpu(phantom, tmp_path):
    """The GPU path's switches, forced on here on the CPU: channels_last weights and inputs, cudnn autotuning, the
    device-resident cache; one epoch trains with finite loss. `compile` only wraps the network (compiling is slow)."""
    common = dict(channels_last=True, data_on_device=True, cudnn_benchmark=True, batch_size=4, epochs=1, val_interval=2,
                  ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "eval"))
    before = torch.backends.cudnn.benchmark
    try:
        parser = parser_for("attention_unet", phantom, **common)
        trainer = parser.get_parsed_content("train#trainer")
        assert torch.backends.cudnn.benchmark is True
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in trainer.network.parameters() if p.dim() == 4)
        trainer.run()
        assert torch.isfinite(torch.as_tensor(trainer.state.output["loss"]))
        compiled = parser_for("attention_unet", phantom, compile=True, **common).get_parsed_content("train#trainer")
        assert isinstance(compiled.network, torch._dynamo.eval_frame.OptimizedModule)
    finally:
        torch.backends.cudnn.benchmark = before
