"""Both bundles through the Model Zoo's own checks (Project-MONAI/model-zoo `ci/verify_bundle.py`), as the zoo runs
them.

verify_bundle.py lives in the zoo's CI with its helpers and is not installed; each check below is the MONAI call it
makes, with its arguments, on a copy of the bundle laid out as the zoo's `models/<bundle>`: the bundle folder first on
sys.path (the zoo's "to ensure custom code can be used"), the metadata schema at `eval/schema.json`, where the zoo's
prepare_schema.py downloads it (tests/meta_schema_20240725.json: the schema that metadata.json names, MONAI's file,
unchanged). The checks, in the zoo's order:
  directory   configs/metadata.json, LICENSE, models/model.pt and configs/inference.json exist;
  version     `version` is a key of `changelog`;
  metadata    verify_metadata(meta_file, filepath=eval/schema.json);
  data shape  verify_net_in_out(net_id="network_def", meta_file, config_file=configs/inference.json, bundle_root) with
              MONAI's defaults (n = p = any = 1: the smallest input the metadata states);
  TorchScript ckpt_export(net_id, filepath=models/verify_model.ts, ckpt_file=models/model.pt, meta_file, config_file,
              bundle_root), which scripts (no trace), then torch.jit.load(models/model.ts).
The zoo's other steps do not apply here: large_files (none), model_info.json (the zoo's registry of published
versions), bundle properties (checked only for a bundle with `supported_apps`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, ckpt_export, verify_metadata, verify_net_in_out
from monai.bundle.scripts import _get_fake_spatial_shape

from conftest import REPO
from metaseg.bundles import bundle_imports
from test_bundles import NAMES

SCHEMA = REPO / "tests" / "meta_schema_20240725.json"
NET_ID, CONFIG = "network_def", "configs/inference.json"


@pytest.fixture(scope="module", params=NAMES)
def zoo_bundle(request, tmp_path_factory) -> Path:
    """The bundle as the zoo's CI holds it: models/<name>, with the downloaded schema in eval/."""
    bundle = tmp_path_factory.mktemp("zoo") / "models" / request.param
    shutil.copytree(REPO / "bundles" / request.param, bundle, ignore=shutil.ignore_patterns("eval", "__pycache__"))
    (bundle / "eval").mkdir()
    shutil.copy(SCHEMA, bundle / "eval" / "schema.json")
    return bundle


def metadata(bundle: Path) -> dict:
    return json.loads((bundle / "configs" / "metadata.json").read_text())


def eager(bundle: Path) -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(str(bundle / CONFIG))
    with bundle_imports(bundle):
        network = parser.get_parsed_content(NET_ID)
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    return network.eval()


def minimum_input(bundle: Path) -> tuple[int, ...]:
    """The input shape verify_net_in_out builds with its defaults: the smallest the metadata states."""
    image = metadata(bundle)["network_data_format"]["inputs"]["image"]
    return (1, image["num_channels"], *_get_fake_spatial_shape(image["spatial_shape"]))


def test_the_bundle_passes_the_zoo_checks_and_its_export_is_the_eager_network(zoo_bundle):
    for file in ("configs/metadata.json", "LICENSE", "models/model.pt", CONFIG):
        assert (zoo_bundle / file).is_file(), file
    meta = metadata(zoo_bundle)
    assert meta["version"] in meta["changelog"]
    meta_file, config_file = str(zoo_bundle / "configs" / "metadata.json"), str(zoo_bundle / CONFIG)
    with bundle_imports(zoo_bundle):
        verify_metadata(meta_file=meta_file, filepath=str(zoo_bundle / "eval" / "schema.json"))
        verify_net_in_out(net_id=NET_ID, meta_file=meta_file, config_file=config_file, bundle_root=str(zoo_bundle))
        ckpt_export(net_id=NET_ID, filepath=str(zoo_bundle / "models" / "verify_model.ts"),
                    ckpt_file=str(zoo_bundle / "models" / "model.pt"), meta_file=meta_file, config_file=config_file,
                    bundle_root=str(zoo_bundle))
    torch.jit.load(str(zoo_bundle / "models" / "model.ts"))

    extra = {"metadata.json": "", "inference.json": ""}
    exported = torch.jit.load(str(zoo_bundle / "models" / "verify_model.ts"), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["version"] == meta["version"]  # ckpt_export embeds the bundle's configs
    network = eager(zoo_bundle)
    generator = torch.Generator().manual_seed(0)
    channels = meta["network_data_format"]["inputs"]["image"]["num_channels"]
    for shape in (minimum_input(zoo_bundle), (2, channels, 96, 80)):
        x = torch.randn(*shape, generator=generator)
        with torch.no_grad():
            torch.testing.assert_close(exported(x), network(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_the_stated_minimum_input_is_the_real_one(name):
    """n = 1 runs (above); the next smaller multiple of 16 is refused by the network itself."""
    bundle = REPO / "bundles" / name
    batch, channels, *size = minimum_input(bundle)
    network = eager(bundle)
    with torch.no_grad():
        assert network(torch.zeros(batch, channels, *size)).shape == (batch, 2, *size)
        smaller = [s - 16 for s in size]
        if min(smaller) > 0:
            with pytest.raises((RuntimeError, ValueError)):  # a shape mismatch, or 1x1 in an instance norm
                network(torch.zeros(batch, channels, *smaller))


def test_the_checks_refuse_what_the_zoo_refuses(tmp_path):
    """U-Net++ with its old `16*n` (a 16x16 input, 1x1 at the bottom of its instance norms) and a metadata file that
    breaks the schema both fail, as they fail in the zoo's CI."""
    bundle = Path(shutil.copytree(REPO / "bundles" / "unetpp", tmp_path / "unetpp",
                                  ignore=shutil.ignore_patterns("models", "eval")))
    meta_file = bundle / "configs" / "metadata.json"
    meta = metadata(bundle)
    for key in ("inputs", "outputs"):
        for tensor in meta["network_data_format"][key].values():
            tensor["spatial_shape"] = ["16*n", "16*n"]
    meta["version"] = 6  # the schema wants a string
    meta_file.write_text(json.dumps(meta))
    with bundle_imports(bundle), pytest.raises(ValueError, match="Expected more than 1 spatial element"):
        verify_net_in_out(net_id=NET_ID, meta_file=str(meta_file), config_file=str(bundle / CONFIG),
                          bundle_root=str(bundle))
    (bundle / "eval").mkdir()
    shutil.copy(SCHEMA, bundle / "eval" / "schema.json")
    with pytest.raises(ValueError, match="6 is not of type 'string'"):
        verify_metadata(meta_file=str(meta_file), filepath=str(bundle / "eval" / "schema.json"))
