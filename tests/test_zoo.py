"""Registry, load, publish and model cards, end to end against a loopback Hub."""
import json
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import ModelCard, constants

import dpl_zoo
from dpl_zoo.cli import main
from dpl_zoo.train import fit
from dpl_zoo.zoo import ZooEntry, ZooError, list_models, model_info, register, sha256_of

from conftest import TOKEN


def test_registry_has_the_reference_entries():
    names = list_models()
    for name in ("resnet50-dpl-0.2pct", "resnet50-dpl-1pct", "resnet50-dpl-clip-0.2pct", "resnet50-dpl-clip-1pct",
                 "resnet50-dpl-zeroshot", "vit_small-dpl-1pct", "vit_base-dpl-1pct", "test_resnet-dpl-mnist"):
        assert name in names
    e = model_info("resnet50-dpl-1pct")
    assert (e.metrics.top1, e.baseline.top1, e.gain, e.metrics.provenance) == (65.3, 60.9, 4.4, "reported")
    assert model_info("resnet50-dpl-0.2pct").gain == 8.0
    assert list_models("resnet50-dpl-clip-*") == ["resnet50-dpl-clip-0.2pct", "resnet50-dpl-clip-1pct"]


def test_unknown_and_unpublished_names_say_what_to_do():
    with pytest.raises(ZooError, match="did you mean resnet50-dpl-1pct"):
        dpl_zoo.load("resnet50-dpl-1pc")
    with pytest.raises(ZooError, match="no published weights yet.*dpl-zoo convert"):
        dpl_zoo.load("resnet50-dpl-1pct")
    model = dpl_zoo.load("test_resnet-dpl-mnist", pretrained=False)  # architecture from the entry
    assert model.num_classes == 10 and not model.training


@pytest.fixture
def trained_run(tiny_config, tmp_path):
    fit(tiny_config(epochs=1), quiet=True)
    return tmp_path / "runs" / "run"


def _outputs(model):
    torch.manual_seed(0)
    return model.eval()(torch.randn(2, 3, 32, 32))


def test_publish_then_load_round_trip(hub, trained_run, tmp_path, capsys):
    assert main(["publish", str(trained_run), "--repo", "tester/tiny-dpl"]) == 0
    printed = capsys.readouterr().out
    files = hub.state.repos["tester/tiny-dpl"]["files"]
    assert {"README.md", "model.safetensors", "config.json", "recipe.yaml", "summary.json"} <= set(files)
    # the token authenticated the upload but appears in no file and no output
    assert any(TOKEN in h for h in hub.state.auth_headers)
    assert TOKEN not in printed and all(TOKEN.encode() not in data for data in files.values())

    reference = timm.create_model(f"local-dir:{trained_run / 'export'}", pretrained=True)
    sha = sha256_of(trained_run / "export" / "model.safetensors")
    register(ZooEntry(name="tiny-test", architecture="test_resnet", hf_hub_id="tester/tiny-dpl", num_classes=3,
                      label_set="test", dataset="test", label_budget="2 per class", recipe="mnist_demo",
                      sha256=sha, input_size=(3, 32, 32)), overwrite=True)
    assert not list((tmp_path / "hf-cache").glob("*"))  # cache empty before the first load
    loaded = dpl_zoo.load("tiny-test")
    assert torch.equal(_outputs(loaded), _outputs(reference))
    assert loaded.pretrained_cfg["label_names"] == ["cat", "dog", "emu"]
    cfg = timm.data.resolve_data_config(model=loaded)
    assert cfg["input_size"] == (3, 32, 32)
    # plain timm loads the same repo
    via_timm = timm.create_model("hf-hub:tester/tiny-dpl", pretrained=True)
    assert torch.equal(_outputs(via_timm), _outputs(reference))
    # the card parses back with its numbers
    card = ModelCard(files["README.md"].decode())
    summary = json.loads((trained_run / "summary.json").read_text())
    top1 = [r for r in card.data.eval_results if r.metric_name == "top-1 accuracy"][0]
    assert top1.metric_value == round(summary["top1"], 2) and card.data.library_name == "timm"
    assert card.data.dpl_zoo["provenance"] == "measured"

    # offline from the cache
    constants.HF_HUB_OFFLINE = True
    hub.state.requests.clear()
    offline = dpl_zoo.load("tiny-test")
    assert torch.equal(_outputs(offline), _outputs(reference)) and hub.state.requests == []

    # a new head when num_classes differs
    five = dpl_zoo.load("tiny-test", num_classes=5)
    assert five.num_classes == 5 and five.pretrained_cfg["label_names"] is None


def test_checksum_mismatch_and_truncation_are_refused(hub, trained_run):
    assert main(["publish", str(trained_run), "--repo", "tester/tiny-sha"]) == 0
    entry = dict(architecture="test_resnet", hf_hub_id="tester/tiny-sha", num_classes=3, label_set="t", dataset="t",
                 label_budget="t", recipe="mnist_demo", input_size=(3, 32, 32))
    register(ZooEntry(name="tiny-bad-sha", sha256="0" * 64, **entry), overwrite=True)
    with pytest.raises(ZooError, match="sha256 .* was not loaded"):
        dpl_zoo.load("tiny-bad-sha")
    # truncate the cached blob: detected by the checksum, and by safetensors for hf-hub: names
    register(ZooEntry(name="tiny-good-sha", sha256=sha256_of(trained_run / "export" / "model.safetensors"),
                      **entry), overwrite=True)
    hub_cache = Path(constants.HF_HUB_CACHE)
    cached = next(hub_cache.rglob("model.safetensors"))
    blob = cached.resolve()
    blob.write_bytes(blob.read_bytes()[:1000])
    with pytest.raises(ZooError, match="truncated, corrupt"):
        dpl_zoo.load("tiny-good-sha")
    with pytest.raises(ZooError, match="truncated or corrupt"):
        dpl_zoo.load("hf-hub:tester/tiny-sha")
    assert hub_cache.exists()
    assert dpl_zoo.load("tiny-good-sha", force_download=True).num_classes == 3


def test_hub_errors(hub, tmp_path):
    with pytest.raises(ZooError, match="not found"):
        dpl_zoo.load("hf-hub:tester/missing")
    # a repo with pickle weights only is refused before anything is loaded
    from huggingface_hub import HfApi
    api = HfApi()
    api.create_repo("tester/pickle-only")
    (tmp_path / "p").mkdir()
    torch.save({"w": torch.zeros(1)}, tmp_path / "p" / "pytorch_model.bin")
    (tmp_path / "p" / "config.json").write_text(json.dumps({"architecture": "test_resnet", "num_classes": 3}))
    api.upload_folder(folder_path=str(tmp_path / "p"), repo_id="tester/pickle-only")
    with pytest.raises(ZooError, match="no model.safetensors.*never loads pickle"):
        dpl_zoo.load("hf-hub:tester/pickle-only")


def test_offline_with_empty_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ZooError, match="not in the local cache and HF_HUB_OFFLINE is set"):
        dpl_zoo.load("hf-hub:tester/anything")


def test_publish_dry_run_with_baseline_and_zoo_card(tiny_config, tmp_path, capsys):
    fit(tiny_config(epochs=1, experiment="dpl"), quiet=True)
    fit(tiny_config(epochs=1, experiment="fm", **{"dpl.method": "fixmatch"}), quiet=True)
    runs = tmp_path / "runs"
    assert main(["publish", str(runs / "dpl"), "--repo", "me/x", "--baseline", str(runs / "fm"), "--dry-run"]) == 0
    assert "nothing uploaded" in capsys.readouterr().out
    card = ModelCard.load(runs / "dpl" / "hub-staging" / "README.md")
    names = {r.metric_name: r.metric_value for r in card.data.eval_results}
    dpl = json.loads((runs / "dpl" / "summary.json").read_text())["top1"]
    fm = json.loads((runs / "fm" / "summary.json").read_text())["top1"]
    assert names["gain over FixMatch (top-1 points)"] == round(round(dpl, 2) - round(fm, 2), 2)
    assert main(["publish", str(runs / "dpl"), "--repo", "me/y", "--zoo-name", "resnet50-dpl-1pct",
                 "--dry-run", "--stage-dir", str(tmp_path / "s")]) == 0
    text = (tmp_path / "s" / "README.md").read_text()
    assert "reported" in text and "65.30" in text and 'dpl_zoo.load("resnet50-dpl-1pct")' in text


def test_cli_list_and_info(capsys):
    assert main(["list", "resnet50-*"]) == 0
    assert "resnet50-dpl-1pct" in capsys.readouterr().out
    assert main(["info", "resnet50-dpl-1pct"]) == 0
    assert "65.3" in capsys.readouterr().out
    assert main(["info", "nope"]) == 2
