"""Both MONAI Bundles, run the way a MONAI user runs them: `python -m monai.bundle ...` on a copy of the bundle
outside the repo, with `metaseg` blocked from import, on a small phantom set."""

from __future__ import annotations

import ast
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from monai.bundle import ConfigParser
from monai.handlers import CheckpointLoader

from conftest import REPO, THRESHOLD_NET, threshold_weights
from metaseg.bundles import bundle_imports

BUNDLES = REPO / "bundles"
NAMES = ("unetpp", "attention_unet")
SIZE = "32"  # the network input for tests: small, a multiple of 16


@dataclass
class Trained:
    name: str
    bundle: Path  # the copy outside the repo
    out: Path  # its ckpt_dir


@pytest.fixture(scope="session")
def phantom(tmp_path_factory) -> Path:
    from metaseg.data.phantom import synthesize

    root = tmp_path_factory.mktemp("phantom") / "Data"
    synthesize(root, patients=6, slices=6, seed=1)
    return root


@pytest.fixture(scope="session")
def blocker(tmp_path_factory) -> Path:
    """A PYTHONPATH entry whose `metaseg` fails to import: the bundles must not need it."""
    root = tmp_path_factory.mktemp("block")
    (root / "metaseg").mkdir()
    (root / "metaseg" / "__init__.py").write_text("raise ImportError('metaseg is blocked in bundle tests')\n")
    return root


def monai_bundle(*args, cwd: Path, blocker: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(blocker))
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", *map(str, args)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout + result.stderr


def config_files(bundle: Path, *names: str) -> str:
    return repr([str(bundle / "configs" / n) for n in names])


def copy_bundle(name: str, dest: Path) -> Path:
    return Path(shutil.copytree(BUNDLES / name, dest / name, ignore=shutil.ignore_patterns("*.pt", "eval", "__pycache__")))


def train_args(bundle: Path, data: Path, out: Path, epochs: int) -> list:
    return [
        "run", "--meta_file", bundle / "configs/metadata.json", "--config_file", bundle / "configs/train.json",
        "--bundle_root", bundle, "--dataset_dir", data, "--epochs", epochs, "--ckpt_dir", out,
        "--output_dir", out / "eval", "--spatial_size", SIZE,
    ]


@pytest.fixture(scope="session", params=NAMES)
def trained(request, phantom, blocker, tmp_path_factory) -> Trained:
    """One epoch of the documented training command (MONAI's default run id), run from a folder outside the bundle."""
    work = tmp_path_factory.mktemp(request.param)
    bundle = copy_bundle(request.param, work)
    ok(monai_bundle(*train_args(bundle, phantom, work / "out", 1), cwd=work, blocker=blocker))
    return Trained(request.param, bundle, work / "out")


def saved_epoch(checkpoint: Path) -> int:
    trainer = torch.load(checkpoint, weights_only=True)["trainer"]  # ignite keeps iterations, not epochs
    return trainer["iteration"] // trainer["epoch_length"]


def network_def(bundle: Path) -> torch.nn.Module:
    """The bundle's own network_def, with the bundle root importable as MONAI's workflow would make it."""
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    with bundle_imports(bundle):
        return parser.get_parsed_content("network_def")


def in_channels(bundle: Path) -> int:
    """The network's input channels as the bundle states them (three sequences)."""
    return ConfigParser.load_config_file(str(bundle / "configs" / "inference.json"))["network_def"]["in_channels"]


def test_metaseg_really_is_blocked(blocker, tmp_path):
    result = subprocess.run([sys.executable, "-c", "import metaseg"], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(blocker)))
    assert result.returncode != 0


def test_training_keeps_best_single_output_state_dict_and_resume_state(trained):
    state = torch.load(trained.out / "model.pt", weights_only=True)
    net = network_def(trained.bundle)
    net.load_state_dict(state, strict=True)  # a plain state dict of the served network
    resume = torch.load(trained.out / "checkpoint.pt", weights_only=True)
    assert set(resume) == {"network", "optimizer", "lr_scheduler", "trainer", "best"}
    assert saved_epoch(trained.out / "checkpoint.pt") == 1 and resume["best"]["_saved"][0][1] == "model.pt"
    assert not list(trained.out.glob("*.tmp")) and not list(trained.out.glob("tmp*"))


def test_evaluate_scores_test_patients_and_writes_masks_at_input_size(trained, phantom, blocker):
    out = trained.out / "test"
    ok(monai_bundle(
        "run", "--meta_file", trained.bundle / "configs/metadata.json",
        "--config_file", config_files(trained.bundle, "train.json", "evaluate.json"), "--bundle_root", trained.bundle,
        "--dataset_dir", phantom, "--ckpt_dir", trained.out, "--output_dir", out, "--spatial_size", SIZE,
        cwd=trained.out, blocker=blocker,
    ))
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"val_dice", "val_mean_dice", "val_lesion_dice"} and 0 <= metrics["val_dice"] <= 1
    masks = sorted((out / "masks").rglob("*_seg.png"))
    assert len(masks) == 6  # one test patient x 6 slices: 6 patients -> 4 train / 1 val / 1 test
    for mask in masks:
        array = np.asarray(PIL.Image.open(mask))
        assert array.shape == (256, 256) and set(np.unique(array)) <= {0, 255}
    assert (out / "val_mean_dice_raw.csv").read_text().count("\n") == 7  # header + one row per slice


def run_inference(bundle: Path, inputs: Path, ckpt: Path, out: Path, blocker: Path, extra: tuple = (),
                  settings: tuple = ()) -> None:
    ok(monai_bundle(
        "run", "--meta_file", bundle / "configs/metadata.json",
        "--config_file", config_files(bundle, "inference.json", *extra), "--bundle_root", bundle,
        "--input_dir", inputs, "--ckpt_dir", ckpt, "--output_dir", out, "--spatial_size", SIZE,
        "--other_folds#checkpoints", "[]",  # one model.pt, not a shipped fold ensemble
        *settings, cwd=out.parent, blocker=blocker,
    ))


def threshold_masks(bundle: Path, inputs: Path, out: Path, blocker: Path, settings: tuple = ()) -> Path:
    """Inference with a fixed 1x1-conv threshold network (lesion where the normalised FLAIR > 0.5) for geometry."""
    threshold = out.parent / f"{out.name}_net"
    threshold.mkdir()
    threshold_weights(threshold / "model.pt")
    (threshold / "net.json").write_text(json.dumps({"network_def": THRESHOLD_NET}))
    shutil.copy(threshold / "net.json", bundle / "configs" / "threshold_net.json")
    try:
        run_inference(bundle, inputs, threshold, out, blocker, extra=("threshold_net.json",), settings=settings)
    finally:
        (bundle / "configs" / "threshold_net.json").unlink()
    return out


def assert_blobs_come_back(masks: Path, geometry_inputs: dict) -> None:
    for stem, (_, image) in geometry_inputs.items():
        mask = np.asarray(PIL.Image.open(masks / f"{stem}_seg.png"))
        expected = image > (int(image.min()) + int(image.max())) / 2
        assert mask.shape == image.shape and set(np.unique(mask)) == {0, 255}
        rows, cols = np.nonzero(mask)
        exp_rows, exp_cols = np.nonzero(expected)
        assert abs(rows.mean() - exp_rows.mean()) < 1.5 and abs(cols.mean() - exp_cols.mean()) < 1.5, stem
        overlap = np.logical_and(mask > 0, expected).sum() / expected.sum()
        assert overlap > 0.7, (stem, overlap)


def test_inference_masks_come_back_at_input_size_and_position(trained, geometry_inputs, blocker, tmp_path):
    """Geometry of the whole inference path (readers, resize, inverse, writer) for PNG, TIFF and DICOM.

    The trained 1-epoch network proves the bundle's own net runs; a fixed 1x1-conv threshold network (lesion where
    the normalised FLAIR > 0.5) proves each bright blob comes back where it was, in each input's orientation.
    """
    inputs = geometry_inputs["gray"][0].parent
    run_inference(trained.bundle, inputs, trained.out, tmp_path / "trained", blocker)
    for stem, (_, image) in geometry_inputs.items():
        assert np.asarray(PIL.Image.open(tmp_path / "trained" / f"{stem}_seg.png")).shape == image.shape

    assert_blobs_come_back(threshold_masks(trained.bundle, inputs, tmp_path / "fixed", blocker), geometry_inputs)


def test_brain_crop_puts_each_mask_back_in_its_slice_s_frame(trained, geometry_inputs, blocker, tmp_path):
    """With brain_crop the network sees the box of the bright pixels (here the blob and a margin, each input of
    another shape and position): the inverse pads it back, so each blob still comes back where it was."""
    inputs = geometry_inputs["gray"][0].parent
    masks = threshold_masks(trained.bundle, inputs, tmp_path / "crop", blocker, settings=("--brain_crop", "True"))
    assert_blobs_come_back(masks, geometry_inputs)


@pytest.mark.parametrize("name", NAMES)
def test_the_recipe_arms_train_in_plain_monai(name, phantom, blocker, tmp_path):
    """The brain crop, lesion-area sampling and skull-stripping augmentation (off by default) train an epoch from a
    copy of the bundle."""
    bundle = copy_bundle(name, tmp_path)
    out = tmp_path / "out"
    ok(monai_bundle(*train_args(bundle, phantom, out, 1), "--brain_crop", "True", "--lesion_area_sampling", "True",
                    "--skull_strip_prob", "0.5", cwd=tmp_path, blocker=blocker))
    assert saved_epoch(out / "checkpoint.pt") == 1
    assert set(torch.load(out / "model.pt", weights_only=True)) == set(network_def(bundle).state_dict())


def test_unetpp_trains_on_every_head_and_serves_the_last():
    net = network_def(BUNDLES / "unetpp")
    x = torch.randn(2, in_channels(BUNDLES / "unetpp"), 32, 32)
    net.train()
    heads = net(x)
    assert isinstance(heads, list) and len(heads) == 4
    net.eval()
    with torch.no_grad():
        served, heads = net(x), super(type(net), net).forward(x)  # MONAI's own list, shallowest head first
    assert torch.equal(served, heads[-1]) and not torch.allclose(served, heads[0])
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "unetpp" / "configs" / "train.json"))
    loss = parser.get_parsed_content("loss")
    assert list(loss.weights) == [0.125, 0.25, 0.5, 1.0]  # the full-depth head weighs most


def test_killed_training_resumes_from_its_last_epoch(phantom, blocker, tmp_path):
    bundle = copy_bundle("attention_unet", tmp_path)
    out, epochs = tmp_path / "out", 6
    cmd = [sys.executable, "-m", "monai.bundle", *map(str, train_args(bundle, phantom, out, epochs))]
    env = dict(os.environ, PYTHONPATH=str(blocker))
    child = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoint.pt").exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    saved = saved_epoch(out / "checkpoint.pt")
    assert 1 <= saved < epochs, "the run was not killed mid-training"
    torch.load(out / "model.pt", weights_only=True)  # complete, never half-written
    log = ok(subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600))
    ran = sorted({int(line.split("Epoch: ")[1].split("/")[0]) for line in log.splitlines() if "Epoch: " in line})
    assert ran == list(range(saved + 1, epochs + 1))
    assert saved_epoch(out / "checkpoint.pt") == epochs


def test_multi_gpu_config_runs_two_processes_with_gloo(phantom, blocker, tmp_path):
    bundle = copy_bundle("unetpp", tmp_path)
    out = tmp_path / "out"
    args = train_args(bundle, phantom, out, 1)
    args[args.index("--config_file") + 1] = config_files(bundle, "train.json", "multi_gpu_train.json")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "monai.bundle"]
    env = dict(os.environ, PYTHONPATH=str(blocker), OMP_NUM_THREADS="1")
    result = subprocess.run([*torchrun, *map(str, args)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    log = ok(result)
    assert log.count("Epoch[1] Metrics") == 1  # validation metrics are gathered and logged by rank 0 only
    state = torch.load(out / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state)  # saved unwrapped from DistributedDataParallel
    network_def(bundle).load_state_dict(state, strict=True)


def test_torchscript_and_onnx_exports_match_the_eager_network(trained, blocker):
    import onnxruntime

    meta, train = trained.bundle / "configs/metadata.json", trained.bundle / "configs/train.json"
    common = ["--net_id", "network_def", "--ckpt_file", trained.out / "model.pt", "--meta_file", meta, "--config_file", train]
    channels = in_channels(trained.bundle)
    shape = f"[1, {channels}, 64, 64]"
    ok(monai_bundle("ckpt_export", "--filepath", trained.out / "model.ts", *common, cwd=trained.bundle, blocker=blocker))
    ok(monai_bundle("onnx_export", "--filepath", trained.out / "model.onnx", *common, "--input_shape", shape, cwd=trained.bundle, blocker=blocker))
    net = network_def(trained.bundle)
    net.load_state_dict(torch.load(trained.out / "model.pt", weights_only=True))
    net.eval()
    x = torch.randn(1, channels, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = net(x).numpy()
        scripted = torch.jit.load(str(trained.out / "model.ts"))(x).numpy()
    session = onnxruntime.InferenceSession(str(trained.out / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert eager.shape == (1, 2, 64, 64)
    assert np.abs(scripted - eager).max() <= 1e-4
    assert np.abs(onnx_out - eager).max() <= 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_metadata_verifies_offline_and_network_matches_it(name, blocker, tmp_path):
    bundle = copy_bundle(name, tmp_path)
    meta = bundle / "configs/metadata.json"
    log = ok(monai_bundle("verify_metadata", "--meta_file", meta, "--filepath", BUNDLES / "meta_schema.json", cwd=bundle, blocker=blocker))
    assert "skipped downloading" in log and "verified with no error" in log
    log = ok(monai_bundle(
        "verify_net_in_out", "--net_id", "network_def", "--meta_file", meta,
        "--config_file", bundle / "configs/inference.json", "--n", 4, cwd=bundle, blocker=blocker,
    ))
    assert "verified with no error" in log


def test_the_bundles_differ_only_in_network_loss_and_chosen_steps():
    """inference_steps are chosen per bundle on its out-of-fold predictions (tests/test_shipped.py holds them)."""

    def load(name, file):
        return json.loads((BUNDLES / name / "configs" / file).read_text())

    for file in ("evaluate.json", "multi_gpu_train.json"):
        assert load("unetpp", file) == load("attention_unet", file), file
    a, b = load("unetpp", "train.json"), load("attention_unet", "train.json")
    # skull_strip_prob: Attention U-Net 0.9.0 was retrained with the kept skull-stripping arm; U-Net++ 0.8.2 keeps the
    # recipe its shipped folds were trained with until it is retrained on the 77 patients (docs/experiments.md)
    assert a.keys() == b.keys() and {k for k in a if a[k] != b[k]} == {"network_def", "loss", "skull_strip_prob"}
    assert (a["skull_strip_prob"], b["skull_strip_prob"]) == (0.0, 0.3)
    a, b = load("unetpp", "inference.json"), load("attention_unet", "inference.json")
    assert a.keys() == b.keys() and {k for k in a if a[k] != b[k]} <= {"network_def", "inference_steps"}
    assert a["inference_steps"]["_desc_"] == b["inference_steps"]["_desc_"]
    assert (BUNDLES / "unetpp/configs/logging.conf").read_text() == (BUNDLES / "attention_unet/configs/logging.conf").read_text()
    for name in NAMES:
        metadata = load(name, "metadata.json")
        assert metadata["version"] in metadata["changelog"]


def test_the_bundles_carry_the_same_scripts_and_no_metaseg():
    """Code both bundles call (ensemble, data, transforms, compute, handlers) is one file copied byte for byte: each
    bundle is self-contained, so neither can import the other's nor metaseg; only U-Net++'s network is its own."""
    files = {name: {p.name: p.read_bytes() for p in (BUNDLES / name / "scripts").glob("*.py")} for name in NAMES}
    assert set(files["unetpp"]) - set(files["attention_unet"]) == {"unetpp.py"}
    assert set(files["attention_unet"]) - set(files["unetpp"]) == set()
    assert {"ensemble.py", "data.py", "transforms.py", "compute.py", "handlers.py"} <= set(files["attention_unet"])
    for file, code in files["attention_unet"].items():
        assert files["unetpp"][file] == code, file
    imported = set()
    for path in BUNDLES.glob("*/scripts/*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
    assert "metaseg" not in imported and "torch" in imported  # the walk saw the imports


def test_every_torch_load_is_weights_only():
    assert "weights_only=True" in inspect.getsource(CheckpointLoader.__call__)  # what the configs use
    offenders = []
    for path in [*REPO.glob("metaseg/**/*.py"), *REPO.glob("bundles/**/*.py"), *REPO.glob("serve/**/*.py"), *REPO.glob("tests/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("torch.load", "load") and "torch" in ast.unparse(node.func):
                if not any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in node.keywords):
                    offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders
