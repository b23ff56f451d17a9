"""Registry, load, publish and model cards, end to end against a loopback Hub."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import HfApi, ModelCard, constants

import dpl_zoo
from dpl_zoo.checkpoint import export_timm
from dpl_zoo.cli import main
from dpl_zoo.train import fit
from dpl_zoo.zoo import HubWeights, ZooEntry, ZooError, list_models, model_info, register, sha256_of, unregister

from conftest import TOKEN


@pytest.fixture(autouse=True)
def checkout_template(monkeypatch):
    """Cards from this checkout's hub/model_card.md (an editable install may map
    dpl_zoo.templates to another checkout's hub/ folder)."""
    import dpl_zoo.hub
    monkeypatch.setattr(dpl_zoo.hub, "template_path", lambda: Path(__file__).parents[1] / "hub" / "model_card.md")


def test_registry_has_the_reference_entries():
    names = list_models()
    for name in ("resnet50-dpl-0.2pct", "resnet50-dpl-1pct", "resnet50-dpl-clip-0.2pct",
                 "resnet50-dpl-clip-0.2pct-100ep", "resnet50-dpl-clip-1pct", "resnet50-dpl-zeroshot",
                 "vit_small-dpl-1pct", "vit_base-dpl-1pct", "test_resnet-dpl-mnist"):
        assert name in names
    e = model_info("resnet50-dpl-1pct")
    # the file's own number (the authors' re-run) and the paper's, each with its source
    assert (e.metrics.top1, e.paper.top1, e.baseline.top1, e.gain) == (65.6, 65.3, 60.9, 4.7)
    assert "released file" in e.metrics.source and "CVPR 2022" in e.paper.source
    assert e.release.drive_id == "1o2MYjkf-G_NGNHqMdXdYQWr2X_catw2Q" and e.release.sha256 is None
    assert e.source == "authors' release" and e.timm_name == "resnet50.dpl_1pct"
    assert "CC-BY-NC-4.0" in e.license_note and "MIT" in e.license_note
    zs = model_info("resnet50-dpl-zeroshot")
    assert (zs.metrics.top1, zs.paper.top1, zs.release.epochs) == (68.7, 68.3, 50) and "100 epochs" in zs.paper.source
    assert model_info("resnet50-dpl-clip-0.2pct-100ep").metrics.top1 == 70.4
    assert list_models("resnet50-dpl-clip-*") == ["resnet50-dpl-clip-0.2pct", "resnet50-dpl-clip-0.2pct-100ep",
                                                  "resnet50-dpl-clip-1pct"]
    assert model_info("test_resnet-dpl-mnist").source == "none"


IMPORT_ORDER = """
import sys
import dpl_zoo.method
assert "timm" not in sys.modules, "import dpl_zoo.method imported timm"
import dpl_zoo
assert "timm" not in sys.modules, "import dpl_zoo imported timm"
import dpl_zoo.registry
assert not {"dpl_zoo.zoo", "dpl_zoo.sources", "dpl_zoo.timm_tags"} & set(sys.modules), "registry imports its users"
import dpl_zoo.sources
assert not {"dpl_zoo.zoo", "dpl_zoo.timm_tags"} & set(sys.modules), "sources imports the zoo"
import timm
assert not timm.list_pretrained("*.dpl_*"), "timm tags registered before the zoo was used"
assert "resnet50-dpl-1pct" in dpl_zoo.list_models()
assert "resnet50.dpl_1pct" in timm.list_pretrained("resnet50.*"), "the zoo did not register its timm tags"
"""


def test_the_method_core_leaves_timm_alone_and_the_registry_imports_nothing_above_it():
    """``import dpl_zoo.method`` (the loss, for any loop) neither imports timm nor touches its registry;
    the registry's types import none of their users; the first zoo call registers the timm tags."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", IMPORT_ORDER], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_weights_from_the_moco_eman_backbone_carry_its_non_commercial_licence(tmp_path):
    """The stricter licence goes into every machine-readable field (Hub filters read the card's
    `license`); the card text keeps why: DebiasPL code MIT, MoCo-EMAN backbone CC-BY-NC-4.0."""
    from dpl_zoo.config import MOCO_EMAN_URL
    from dpl_zoo.hub import card_from_entry, card_from_run, model_card
    for name in list_models("resnet50-*"):
        e = model_info(name)
        assert e.license == "cc-by-nc-4.0", name
        assert timm.models.get_pretrained_cfg(e.timm_name).license == "cc-by-nc-4.0"
        card = model_card(card_from_entry(e))
        assert card.data.license == "cc-by-nc-4.0"
        assert "CC-BY-NC-4.0" in card.text and "MIT" in card.text
    assert model_info("test_resnet-dpl-mnist").license == "mit"  # our own code and data only
    # a run of the ResNet-50 recipes started from MoCo-EMAN too
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "export" / "config.json").write_text(json.dumps({"architecture": "resnet50"}))
    (run / "export" / "model.safetensors").write_bytes(b"")  # the card reads the config only
    (run / "summary.json").write_text(json.dumps({"top1": 60.0, "top5": 80.0, "labeled": 12811}))
    for start, licence in ((MOCO_EMAN_URL, "cc-by-nc-4.0"), (None, "mit")):
        (run / "config.yaml").write_text(f"model: resnet50\ninitial_checkpoint: {start or 'null'}\n")
        info = card_from_run(run, "me/r50")
        assert info.license == licence and model_card(info).data.license == licence
        assert ("CC-BY-NC-4.0" in model_card(info).text) == (start is not None)


def test_hub_revisions_must_be_commit_hashes():
    with pytest.raises(ZooError, match="not a 40-hex commit hash"):
        HubWeights("org/name", revision="main", sha256="0" * 64)
    with pytest.raises(ZooError, match="needs a timm_tag"):
        ZooEntry(name="x", architecture="resnet18", num_classes=3, label_set="t", dataset="t", label_budget="t",
                 recipe="t", hub=HubWeights("org/x", "a" * 40, "0" * 64))


def test_names_follow_timm_folders_need_local_dir(tmp_path, monkeypatch, capsys):
    """A folder named like a registry entry never shadows it (no checksum would be checked)."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    saved = timm.create_model("test_resnet", num_classes=10).eval()
    export_timm(saved, tmp_path / "test_resnet-dpl-mnist")
    with pytest.raises(ZooError, match="no source that can deliver"):
        dpl_zoo.load("test_resnet-dpl-mnist")  # the registry entry, not the folder
    for name in ("local-dir:test_resnet-dpl-mnist", "./test_resnet-dpl-mnist", Path("test_resnet-dpl-mnist"),
                 str(tmp_path / "test_resnet-dpl-mnist")):
        assert dpl_zoo.load(name).num_classes == 10
    (tmp_path / "mine").mkdir()
    with pytest.raises(ZooError, match="unknown zoo model 'mine'.*local-dir:mine"):
        dpl_zoo.load("mine")
    with pytest.raises(ZooError, match="did you mean resnet50-dpl-1pct"):
        dpl_zoo.load("resnet50-dpl-1pc")
    # dpl-zoo eval reads names the same way, and evaluates the folder's weights (not a fresh model)
    from dpl_zoo.evaluate import load_for_eval
    for name in ("./test_resnet-dpl-mnist", "local-dir:test_resnet-dpl-mnist"):
        assert torch.equal(_outputs(load_for_eval(name)[0]), _outputs(saved))
    assert main(["eval", "test_resnet-dpl-mnist", "--data", "mnist"]) == 2
    assert "no source that can deliver" in capsys.readouterr().out
    model = dpl_zoo.load("test_resnet-dpl-mnist", pretrained=False)  # architecture from the entry
    assert model.num_classes == 10 and not model.training


@pytest.fixture
def trained_run(tiny_config, tmp_path):
    fit(tiny_config(epochs=1), quiet=True)
    return tmp_path / "runs" / "run"


def _outputs(model):
    torch.manual_seed(0)
    return model.eval()(torch.randn(2, 3, 32, 32))


def _hub_entry(name, export: Path, repo_id: str, revision: str, **change) -> ZooEntry:
    """A registry entry for a run's export published on the Hub, stating its preprocessing."""
    cfg = json.loads((export / "config.json").read_text())
    pc = cfg["pretrained_cfg"]
    fields = dict(name=name, architecture=cfg["architecture"], num_classes=cfg["num_classes"], label_set="test",
                  dataset="test", label_budget="2 per class", recipe="mnist_demo",
                  hub=HubWeights(repo_id, revision=revision, sha256=sha256_of(export / "model.safetensors")),
                  timm_tag=name.replace("-", "_"), input_size=tuple(pc["input_size"]),
                  interpolation=pc["interpolation"], crop_pct=pc["crop_pct"], mean=tuple(pc["mean"]),
                  std=tuple(pc["std"]), label_names=tuple(cfg["label_names"]))
    fields.update(change)
    return register(ZooEntry(**fields), overwrite=True)


@pytest.fixture
def cleanup():
    names = []
    yield names
    for name in names:
        if name in list_models():
            unregister(name)


def test_publish_then_load_round_trip(hub, trained_run, tmp_path, capsys, cleanup, monkeypatch):
    monkeypatch.setenv("DPL_ZOO_CACHE", str(tmp_path / "dpl-cache"))
    assert main(["publish", str(trained_run), "--repo", "tester/tiny-dpl"]) == 0
    printed = capsys.readouterr().out
    repo = hub.state.repos["tester/tiny-dpl"]
    files = repo["files"]
    assert {"README.md", "model.safetensors", "config.json", "recipe.yaml", "summary.json"} <= set(files)
    assert f"commit {repo['sha']}" in printed
    # the token authenticated the upload but appears in no file and no output
    assert any(TOKEN in h for h in hub.state.auth_headers)
    assert TOKEN not in printed and all(TOKEN.encode() not in data for data in files.values())

    export = trained_run / "export"
    reference = timm.create_model(f"local-dir:{export}", pretrained=True)
    cleanup.append("tiny-test")
    _hub_entry("tiny-test", export, "tester/tiny-dpl", repo["sha"])
    assert not list((tmp_path / "hf-cache").glob("*"))  # cache empty before the first load
    loaded = dpl_zoo.load("tiny-test")
    assert torch.equal(_outputs(loaded), _outputs(reference))
    assert loaded.pretrained_cfg["label_names"] == ("cat", "dog", "emu")
    assert timm.data.resolve_data_config(model=loaded)["input_size"] == (3, 32, 32)
    # the same model as a timm tag, and through plain timm from the repo
    assert torch.equal(_outputs(timm.create_model("test_resnet.tiny_test", pretrained=True)), _outputs(reference))
    assert torch.equal(_outputs(timm.create_model("hf-hub:tester/tiny-dpl", pretrained=True)), _outputs(reference))
    card = ModelCard(files["README.md"].decode())
    summary = json.loads((trained_run / "summary.json").read_text())
    top1 = [r for r in card.data.eval_results if r.metric_name == "top-1 accuracy"][0]
    assert top1.metric_value == round(summary["top1"], 2) and card.data.library_name == "timm"
    assert card.data.dpl_zoo["provenance"] == "measured"

    # warm and offline: no request at all (pinned commit, verified file)
    constants.HF_HUB_OFFLINE = True
    hub.state.requests.clear()
    offline = dpl_zoo.load("tiny-test")
    assert torch.equal(_outputs(offline), _outputs(reference)) and hub.state.requests == []

    # a new head when num_classes differs
    five = dpl_zoo.load("tiny-test", num_classes=5)
    assert five.num_classes == 5 and five.pretrained_cfg["label_names"] is None


def test_checksum_mismatch_and_truncation_are_refused(hub, trained_run, tmp_path, cleanup, monkeypatch):
    monkeypatch.setenv("DPL_ZOO_CACHE", str(tmp_path / "dpl-cache"))
    assert main(["publish", str(trained_run), "--repo", "tester/tiny-sha"]) == 0
    sha = hub.state.repos["tester/tiny-sha"]["sha"]
    export = trained_run / "export"
    cleanup.extend(["tiny-bad-sha", "tiny-good-sha"])
    bad = _hub_entry("tiny-bad-sha", export, "tester/tiny-sha", sha)
    register(ZooEntry(**{**bad.__dict__, "hub": HubWeights("tester/tiny-sha", sha, "0" * 64)}), overwrite=True)
    with pytest.raises(ZooError, match="sha256 .* was not loaded"):
        dpl_zoo.load("tiny-bad-sha")
    # a truncated cached blob: refused by the checksum (size changed), and by safetensors for hf-hub: names
    _hub_entry("tiny-good-sha", export, "tester/tiny-sha", sha)
    assert dpl_zoo.load("tiny-good-sha").num_classes == 3
    blob = next(Path(constants.HF_HUB_CACHE).rglob("model.safetensors")).resolve()
    blob.write_bytes(blob.read_bytes()[:1000])
    with pytest.raises(ZooError, match="truncated, corrupt"):
        dpl_zoo.load("tiny-good-sha")
    with pytest.raises(ZooError, match="truncated or corrupt"):
        dpl_zoo.load(f"hf-hub:tester/tiny-sha@{sha}")
    assert dpl_zoo.load("tiny-good-sha", force_download=True).num_classes == 3


def test_config_of_a_zoo_entry_is_pinned_and_checked(hub, trained_run, tmp_path, cleanup, monkeypatch):
    """config.json comes from the pinned commit and must describe the registry's model."""
    monkeypatch.setenv("DPL_ZOO_CACHE", str(tmp_path / "dpl-cache"))
    assert main(["publish", str(trained_run), "--repo", "tester/tiny-cfg"]) == 0
    first = hub.state.repos["tester/tiny-cfg"]["sha"]
    export = trained_run / "export"
    # main moves on: a config.json for another architecture is pushed
    changed = json.loads((export / "config.json").read_text())
    changed.update(architecture="resnet18", num_classes=7)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(changed))
    second = HfApi().upload_folder(folder_path=str(tmp_path / "cfg"), repo_id="tester/tiny-cfg").oid
    cleanup.extend(["tiny-pinned", "tiny-moved", "tiny-other-arch"])
    _hub_entry("tiny-pinned", export, "tester/tiny-cfg", first)
    assert dpl_zoo.load("tiny-pinned").num_classes == 3  # the pinned commit's files, not main's
    _hub_entry("tiny-moved", export, "tester/tiny-cfg", second)
    with pytest.raises(ZooError, match=r"architecture 'resnet18' \(registry: 'test_resnet'\).*num_classes"):
        dpl_zoo.load("tiny-moved")
    _hub_entry("tiny-other-arch", export, "tester/tiny-cfg", first, architecture="resnet18")
    with pytest.raises(ZooError, match=r"architecture 'test_resnet' \(registry: 'resnet18'\)"):
        dpl_zoo.load("tiny-other-arch")


def test_hub_errors(hub, tmp_path):
    with pytest.raises(ZooError, match="not found"):
        dpl_zoo.load("hf-hub:tester/missing")
    # a repo with pickle weights only is refused before anything is loaded
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


def test_model_index_holds_only_the_models_own_results(tiny_config, tmp_path, capsys):
    fit(tiny_config(epochs=1, experiment="dpl"), quiet=True)
    fit(tiny_config(epochs=1, experiment="fm", **{"dpl.method": "fixmatch"}), quiet=True)
    runs = tmp_path / "runs"
    assert main(["publish", str(runs / "dpl"), "--repo", "me/x", "--baseline", str(runs / "fm"), "--dry-run"]) == 0
    assert "nothing uploaded" in capsys.readouterr().out
    card = ModelCard.load(runs / "dpl" / "hub-staging" / "README.md")
    results = {r.metric_name: r for r in card.data.eval_results}
    assert set(results) == {"top-1 accuracy", "top-5 accuracy"}  # no baseline, no gain
    dpl = json.loads((runs / "dpl" / "summary.json").read_text())["top1"]
    fm = json.loads((runs / "fm" / "summary.json").read_text())["top1"]
    assert results["top-1 accuracy"].metric_value == round(dpl, 2)
    assert results["top-1 accuracy"].dataset_type == "data"  # the data folder's name (data/train), not a path
    assert card.data.dpl_zoo["baseline_top1"] == round(fm, 2)
    assert card.data.dpl_zoo["gain"] == round(round(dpl, 2) - round(fm, 2), 2)
    assert f"{round(fm, 2):.2f}" in card.text  # the baseline stays in the card's table
    assert str(tmp_path) not in (runs / "dpl" / "hub-staging" / "README.md").read_text()

    assert main(["publish", str(runs / "dpl"), "--repo", "me/x", "--dataset-id", "me/cats-dogs-emus",
                 "--dry-run"]) == 0
    card = ModelCard.load(runs / "dpl" / "hub-staging" / "README.md")
    assert {r.dataset_type for r in card.data.eval_results} == {"me/cats-dogs-emus"}

    assert main(["publish", str(runs / "dpl"), "--repo", "me/y", "--zoo-name", "resnet50-dpl-1pct",
                 "--dry-run", "--stage-dir", str(tmp_path / "s")]) == 0
    text = (tmp_path / "s" / "README.md").read_text()
    card = ModelCard.load(tmp_path / "s" / "README.md")
    assert [(r.metric_name, r.metric_value, r.dataset_type) for r in card.data.eval_results] == [
        ("top-1 accuracy", 65.6, "ILSVRC/imagenet-1k")]
    assert card.data.dpl_zoo["baseline_top1"] == 60.9 and card.data.dpl_zoo["paper_top1"] == 65.3
    assert "reported" in text and "65.60" in text and "60.90" in text and "CC-BY-NC-4.0" in text
    assert 'dpl_zoo.load("resnet50-dpl-1pct")' in text and 'timm.create_model("resnet50.dpl_1pct"' in text


def test_publish_stages_fresh_without_local_paths_and_removes_stale_repo_files(hub, trained_run, tmp_path):
    staging = trained_run / "hub-staging"
    (trained_run / "eval.json").write_text(json.dumps({"top1": 50.0, "top5": 90.0, "images": 12,
                                                       "data": str(tmp_path / "data" / "val"),
                                                       "model": str(trained_run / "export")}))
    assert main(["publish", str(trained_run), "--repo", "tester/fresh"]) == 0
    files = hub.state.repos["tester/fresh"]["files"]
    assert "eval.json" in files
    for name, data in files.items():  # no local path in anything uploaded
        assert str(tmp_path).encode() not in data, name
    assert json.loads(files["eval.json"])["data"] == "val"
    assert json.loads(files["summary.json"])["output"] == "run"

    (staging / "stale.txt").write_text("left over")
    (trained_run / "eval.json").unlink()
    assert main(["publish", str(trained_run), "--repo", "tester/fresh"]) == 0
    assert not (staging / "stale.txt").exists() and not (staging / "eval.json").exists()
    files = hub.state.repos["tester/fresh"]["files"]
    assert "eval.json" not in files and "stale.txt" not in files and "summary.json" in files

    # a folder dpl-zoo did not make is never emptied
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(["publish", str(trained_run), "--repo", "tester/fresh", "--stage-dir", str(tmp_path / "mine"),
                 "--dry-run"]) == 2
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_hub_errors_through_the_cli_are_one_line(hub, trained_run, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    capsys.readouterr()
    assert main(["publish", str(trained_run), "--repo", "tester/anon"]) == 2
    out = capsys.readouterr().out
    assert "not logged in: run `hf auth login` or set HF_TOKEN" in out and "Traceback" not in out
    assert "tester/anon" not in hub.state.repos
    # the Hub out of reach
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    assert main(["publish", str(trained_run), "--repo", "tester/anon"]) == 2
    out = capsys.readouterr().out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the Hub cannot be reached" in errors[0] and "Traceback" not in out


def test_cli_list_and_info(capsys):
    assert main(["list", "resnet50-*"]) == 0
    out = capsys.readouterr().out
    assert "resnet50-dpl-1pct" in out and "authors' release" in out
    assert main(["list", "test_resnet-*"]) == 0
    assert "none" in capsys.readouterr().out
    assert main(["info", "resnet50-dpl-1pct"]) == 0
    out = capsys.readouterr().out
    assert "65.6" in out and "resnet50.dpl_1pct" in out and "1o2MYjkf-G_NGNHqMdXdYQWr2X_catw2Q" in out
    assert main(["info", "nope"]) == 2


def test_export_keeps_the_preprocessing_with_a_timm_without_data_config(tmp_path, monkeypatch):
    # timm 1.0.29's save_for_hf takes no data_config; the export must not depend on it
    import timm.models
    real = timm.models.save_for_hf

    def save_for_hf_1_0_29(model, save_directory, model_config=None, model_args=None, safe_serialization=False):
        return real(model, save_directory, model_config=model_config, model_args=model_args,
                    safe_serialization=safe_serialization)

    monkeypatch.setattr(timm.models, "save_for_hf", save_for_hf_1_0_29)
    model = timm.create_model("test_resnet", num_classes=3)
    out = export_timm(model, tmp_path / "m", ["a", "b", "c"],
                      data_config={"input_size": (3, 48, 48), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
                                   "crop_pct": 1.0, "interpolation": "bilinear", "crop_mode": "center"})
    cfg = json.loads((out / "config.json").read_text())["pretrained_cfg"]
    assert cfg["input_size"] == [3, 48, 48] and cfg["mean"] == [0.5, 0.5, 0.5] and cfg["std"] == [0.25, 0.25, 0.25]
    assert cfg["crop_pct"] == 1.0 and cfg["interpolation"] == "bilinear"
    assert "test_input_size" not in cfg and "test_crop_pct" not in cfg
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert timm.data.resolve_data_config({}, model=loaded)["input_size"] == (3, 48, 48)
