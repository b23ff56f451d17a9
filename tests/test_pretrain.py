"""``dpl-zoo pretrain`` end to end on tiny data: outputs, kNN monitor, exact resume, the export as a
fine-tuning start, the CLI and the config's errors (CPU, seconds each)."""
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from dpl_zoo.cli import main
from dpl_zoo.config import ConfigError, load_config, load_pretrain_config
from dpl_zoo.layouts import ConversionError, load_start_point
from dpl_zoo.pretrain import pretrain
from dpl_zoo.progress import Reporter
from dpl_zoo.train import fit

from conftest import make_fashion_folder, make_image_folder, tiny_overrides

RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "pretrain_moco.yaml")


def tiny_pretrain(out, **extra):
    """A few CPU-seconds of MoCo: test_resnet at 16 px, batches of 8, a queue of 24."""
    base = {"model": "test_resnet", "img_size": 16, "batch_size": 8, "epochs": 2, "steps_per_epoch": 2,
            "workers": 0, "lr": 0.05, "amp": False, "output": str(out), "experiment": "moco", "log_interval": 1,
            "moco.queue_size": 24, "moco.dim": 16, "moco.hidden": 32, "moco.momentum": 0.9,
            "data.blur_sigma": "[0.1, 0.5]", "knn.k": 5, "knn.bank_max": 40, "knn.val_max": 20}
    base.update(extra)
    return [f"{k}={'null' if v is None else v}" for k, v in base.items()]


@pytest.fixture
def fashion(tmp_path):
    folder, _, _ = make_fashion_folder(tmp_path / "fm", per_class=6, test_per_class=2)
    return folder


def test_pretrain_writes_everything_and_its_export_loads_with_timm(fashion, tmp_path):
    cfg = load_pretrain_config(RECIPE, tiny_pretrain(tmp_path / "runs", **{"data.dataset": "fashion_mnist",
                                                                           "data.root": str(fashion)}))
    summary = pretrain(cfg, quiet=True)
    out = tmp_path / "runs" / "moco"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "last.pth.tar", "export/model.safetensors",
                 "export/config.json"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert len(epochs) == 2 and all(0 <= r["knn"]["knn_top1"] <= 100 and r["knn"]["bank"] == 40 for r in epochs)
    assert summary["images"] == 60 and summary["steps"] == 4 and summary["knn_top1"] == epochs[-1]["knn"]["knn_top1"]
    # the classes differ in where a bright band lies: the monitor sees that far above chance (10 %)
    assert all(r["knn"]["knn_top1"] >= 40 for r in epochs), [r["knn"] for r in epochs]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    # the export is the query encoder's backbone: plain timm loads it, with the pretraining's preprocessing
    model = timm.create_model(f"local-dir:{out / 'export'}").eval()
    assert model.pretrained_cfg["input_size"] == (3, 16, 16) and model.num_classes == 0
    state = torch.load(out / "last.pth.tar", weights_only=True)
    # EMAN: the key encoder starts as the query encoder and follows it by momentum at every step
    from dpl_zoo.pretrain import build_pretrain_run
    start = build_pretrain_run(cfg).task.get_trainable_module(ema=True).module.state_dict()
    key, query = state["state_dict_ema"], state["state_dict"]
    moved = [k for k, v in start.items() if v.is_floating_point() and not torch.equal(key[k], v)]
    assert len(moved) > 0.9 * sum(v.is_floating_point() for v in start.values())      # the keys moved...
    assert any(not torch.equal(key[k], query[k]) for k in moved)                       # ...behind the query
    exported = load_file(out / "export" / "model.safetensors")
    assert set(exported) == {k[len("backbone."):] for k in state["state_dict"] if k.startswith("backbone.")}
    assert all(torch.equal(v, state["state_dict"]["backbone." + k]) for k, v in exported.items())
    config = json.loads((out / "export" / "config.json").read_text())
    assert config["dpl_zoo"]["pretrain"]["method"] == "moco_v2_eman" and config["dpl_zoo"]["pretrain"]["images"] == 60


def test_resumed_pretraining_equals_an_uninterrupted_one(fashion, tmp_path):
    common = {"data.dataset": "fashion_mnist", "data.root": str(fashion), "epochs": 3}
    straight = pretrain(load_pretrain_config(RECIPE, tiny_pretrain(tmp_path / "runs", experiment="straight",
                                                                   **common)), quiet=True)

    class Interrupt(Reporter):
        def start_epoch(self, epoch, steps):
            if epoch == 2:
                raise KeyboardInterrupt
            super().start_epoch(epoch, steps)

    cfg = load_pretrain_config(RECIPE, tiny_pretrain(tmp_path / "runs", experiment="broken", **common))
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, reporter=Interrupt(quiet=True))
    assert not (tmp_path / "runs" / "broken" / "summary.json").exists()
    resumed = pretrain(cfg, resume="auto", quiet=True)
    a = torch.load(tmp_path / "runs" / "straight" / "last.pth.tar", weights_only=True)
    b = torch.load(tmp_path / "runs" / "broken" / "last.pth.tar", weights_only=True)
    for key in ("state_dict", "state_dict_ema"):     # query encoder, and the EMAN key encoder with its statistics
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    for key in ("queue", "queue_ptr"):
        assert torch.equal(a["task_state"][key], b["task_state"][key]), key
    momentum = lambda state: [s["momentum_buffer"] for s in state["optimizer"]["state"].values()]  # noqa: E731
    assert momentum(a) and all(torch.equal(x, y) for x, y in zip(momentum(a), momentum(b)))
    assert resumed["resumed"] and resumed["knn_top1"] == straight["knn_top1"] and resumed["loss"] == straight["loss"]
    rows = lambda name: [{k: v for k, v in json.loads(line).items() if k != "img_per_s"}  # noqa: E731
                         for line in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    assert rows("straight") == rows("broken")
    # a finished run answers --resume auto with its summary; another recipe is refused
    assert pretrain(cfg, resume="auto", quiet=True)["seconds"] == resumed["seconds"]
    other = load_pretrain_config(RECIPE, tiny_pretrain(tmp_path / "runs", experiment="broken",
                                                       **{**common, "moco.temperature": 0.1}))
    with pytest.raises(Exception, match="differs in: moco.temperature"):
        pretrain(other, resume="auto", quiet=True)


def test_export_is_a_fine_tuning_start(tmp_path, image_data):
    # pretrain on the images of a folder (labels unused), the kNN monitor on its labeled twin; with
    # a mean and std of its own, which the fine-tuning recipe does not name
    pretrain(load_pretrain_config(RECIPE, tiny_pretrain(
        tmp_path / "pre", img_size=32, batch_size=6, mean="[0.3, 0.4, 0.5]", std="[0.2, 0.2, 0.2]",
        **{"data.root": str(image_data / "train"), "knn.root": str(image_data / "train"),
           "knn.val_root": str(image_data / "val")})), quiet=True)
    export = tmp_path / "pre" / "moco" / "export"
    exported = load_file(export / "model.safetensors")
    cfg = load_config(None, tiny_overrides(image_data, tmp_path / "runs", epochs=1, initial_checkpoint=str(export)))
    from dpl_zoo.run import build_run
    run = build_run(cfg)
    own = run.model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in exported.items())          # every backbone tensor from the export
    assert set(own) - set(exported) == {"fc.weight", "fc.bias"}              # only the new head is not
    pre_cfg = json.loads((export / "config.json").read_text())["pretrained_cfg"]
    assert pre_cfg["mean"] == [0.3, 0.4, 0.5] and pre_cfg["std"] == [0.2, 0.2, 0.2]
    assert run.data_config["mean"] == (0.3, 0.4, 0.5) and run.data_config["std"] == (0.2, 0.2, 0.2)   # the start's
    summary = fit(cfg, quiet=True)
    assert summary["steps"] == 2 and 0 <= summary["top1"] <= 100
    # weights made for another architecture are refused, even through a folder
    with pytest.raises(ConversionError, match="holds test_resnet weights"):
        load_start_point(timm.create_model("resnet18", num_classes=3), export)
    # the pretraining checkpoint itself is not the start: its export is
    with pytest.raises(ConversionError, match="start from its export instead"):
        load_start_point(timm.create_model("test_resnet", num_classes=3), export.parent / "last.pth.tar")


def test_pretrain_cli_on_an_unlabeled_folder(tmp_path, capsys):
    images = tmp_path / "photos"
    make_image_folder(images / "batch-1", classes=("a",), per_class=12)
    make_image_folder(images / "batch-2", classes=("b",), per_class=12, seed=3)
    (images / "notes.txt").write_text("not an image")
    sets = [a for o in tiny_pretrain(tmp_path / "runs", **{"data.root": str(images)}) for a in ("--set", o)]
    assert main(["pretrain", RECIPE, *sets, "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "pretrained test_resnet on 24 images" in text and "initial_checkpoint=" in text
    summary = json.loads((tmp_path / "runs" / "moco" / "summary.json").read_text())
    assert summary["knn_top1"] is None and summary["images"] == 24      # no labels given: no monitor
    assert main(["pretrain", RECIPE, *sets, "--set", "moco.queue_sise=8"]) == 2
    assert "did you mean 'queue_size'" in capsys.readouterr().out
    assert main(["pretrain", RECIPE, *sets, "--set", "experiment=other", "--set", "batch_size=50"]) == 2
    assert "fewer than one batch" in capsys.readouterr().out
    # a kNN monitor folder that is not there names the setting to fix
    assert main(["pretrain", RECIPE, *sets, "--set", "experiment=k", "--set", f"knn.root={tmp_path / 'nope'}"]) == 2
    assert f"'{tmp_path / 'nope'}' does not exist; set knn.root to" in capsys.readouterr().out
    # the pretraining checkpoint is not a classifier: eval says so in one line and points to the export
    labeled = make_image_folder(tmp_path / "labeled", classes=("a", "b"), per_class=2)
    assert main(["eval", str(tmp_path / "runs" / "moco" / "last.pth.tar"), "--data", str(labeled)]) == 2
    out, err = capsys.readouterr()
    assert "is a dpl-zoo pretrain checkpoint" in out and f"initial_checkpoint={tmp_path / 'runs' / 'moco' / 'export'}" \
        in out.replace("\n", "") and "Traceback" not in out + err


def test_pretrain_config_errors():
    with pytest.raises(ConfigError, match="did you mean 'temperature'"):
        load_pretrain_config(None, ["moco.temprature=0.1"])
    with pytest.raises(ConfigError, match="moco.momentum is out of range"):
        load_pretrain_config(None, ["moco.momentum=1.0"])
    with pytest.raises(ConfigError, match="data.blur_sigma is out of range"):
        load_pretrain_config(None, ["data.blur_sigma=[2.0, 0.1]"])
    with pytest.raises(ConfigError, match="did you mean 'val_max'"):
        load_pretrain_config(None, ["knn.val_maxx=3"])
    cfg = load_pretrain_config(RECIPE, ["data.root=x"])
    assert cfg.moco.queue_size == 65536 and cfg.moco.temperature == 0.2 and cfg.data.scale == (0.2, 1.0)
    assert cfg.knn.k == 200 and cfg.data.color_jitter == (0.4, 0.4, 0.4, 0.1)
