"""``dpl-zoo predict``: top-k classes of a folder of new images from each kind of model reference."""
import csv
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from dpl_zoo.cli import main
from dpl_zoo.train import fit

from conftest import make_image_folder

# a checkpoint trained with its own normalisation: predict must use it, not ImageNet's
MEAN, STD = (0.2, 0.3, 0.4), (0.5, 0.4, 0.3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    make_image_folder(root / "data" / "train", per_class=10)
    make_image_folder(root / "data" / "val", per_class=4, seed=1)
    from conftest import tiny_overrides
    from dpl_zoo.config import load_config
    cfg = load_config(None, tiny_overrides(root / "data", root / "runs", epochs=1, mean=list(MEAN), std=list(STD)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPL_ZOO_CACHE", str(root / "cache"))
        fit(cfg, quiet=True)
    return root / "runs" / "run"


@pytest.fixture
def new_images(tmp_path):
    """Class folders (labels unused), a loose image, a corrupt file and a truncated PNG."""
    folder = make_image_folder(tmp_path / "new", per_class=3, seed=5)
    Image.fromarray(np.full((20, 24, 3), 90, np.uint8)).save(folder / "loose.png")
    (folder / "cat" / "corrupt.jpg").write_bytes(b"not an image at all")
    good = folder / "dog" / "000.png"
    (folder / "dog" / "truncated.png").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    return folder


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _expected(model_dir, image_path, mean, std):
    """Class probabilities of one image through the export's weights and a given normalisation."""
    model = timm.create_model(f"local-dir:{model_dir}", pretrained=True).eval()
    cfg = {**timm.data.resolve_data_config(model=model), "mean": mean, "std": std}
    x = timm.data.create_transform(**cfg)(Image.open(image_path).convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        return model(x).softmax(-1)[0]


def _predict(model, folder, out, *extra):
    return main(["predict", str(model), "--data", str(folder), "--out", str(out), "--workers", "0",
                 "--device", "cpu", *extra])


def test_predict_writes_topk_per_image_and_lists_the_unreadable(trained, new_images, tmp_path, capsys):
    out = tmp_path / "out" / "predictions.csv"
    assert _predict(trained / "last.pth.tar", new_images, out, "--topk", "2") == 0
    printed = capsys.readouterr().out
    rows = _read(out)
    assert list(rows[0]) == ["filename", "index_0", "index_1", "label_0", "label_1", "prob_0", "prob_1"]
    names = [r["filename"] for r in rows]
    # every readable image below the folder, class folders or not, in path order; labels never read
    assert names == sorted(names) and len(names) == 10 and "loose.png" in names and "cat/000.png" in names
    assert {r["label_0"] for r in rows} <= {"cat", "dog", "emu"}
    assert all(1 >= float(r["prob_0"]) >= float(r["prob_1"]) >= 0 for r in rows)
    skipped = _read(tmp_path / "out" / "predictions.skipped.csv")
    assert sorted(s["filename"] for s in skipped) == ["cat/corrupt.jpg", "dog/truncated.png"]
    assert "skipped 2 unreadable images" in printed and "cat/corrupt.jpg" in printed
    assert "top-2 classes of 10 images" in printed


def test_predict_uses_the_checkpoints_own_preprocessing(trained, new_images, tmp_path):
    out = tmp_path / "p.csv"
    assert _predict(trained / "last.pth.tar", new_images, out, "--topk", "3") == 0
    row = next(r for r in _read(out) if r["filename"] == "emu/001.png")
    got = {int(row[f"index_{r}"]): float(row[f"prob_{r}"]) for r in range(3)}
    own = _expected(trained / "export", new_images / "emu" / "001.png", MEAN, STD)
    imagenet = _expected(trained / "export", new_images / "emu" / "001.png", (0.485, 0.456, 0.406),
                         (0.229, 0.224, 0.225))
    assert all(abs(got[i] - float(own[i])) < 1e-5 for i in got)
    assert max(abs(got[i] - float(imagenet[i])) for i in got) > 1e-3   # the normalisation matters here


@pytest.mark.parametrize("hub", ["regular"], indirect=True)
def test_checkpoint_export_and_zoo_name_predict_the_same(trained, new_images, tmp_path, hub):
    """The zoo name goes through a registered entry whose weights come from a loopback Hub."""
    from dpl_zoo.zoo import HubWeights, ZooEntry, register, sha256_of, unregister
    assert _predict(trained / "last.pth.tar", new_images, tmp_path / "ckpt.csv") == 0
    assert _predict(trained / "export", new_images, tmp_path / "export.csv", "--workers", "1") == 0
    assert main(["publish", str(trained), "--repo", "tester/predict", "--stage-dir", str(tmp_path / "stage")]) == 0
    config = json.loads((trained / "export" / "config.json").read_text())
    pc = config["pretrained_cfg"]
    register(ZooEntry(name="predict-test", architecture=config["architecture"], num_classes=3, label_set="test",
                      dataset="test", label_budget="2 per class", recipe="mnist_demo", timm_tag="predict_test",
                      hub=HubWeights("tester/predict", revision=hub.state.repos["tester/predict"]["sha"],
                                     sha256=sha256_of(trained / "export" / "model.safetensors")),
                      input_size=tuple(pc["input_size"]), interpolation=pc["interpolation"],
                      crop_pct=pc["crop_pct"], mean=tuple(pc["mean"]), std=tuple(pc["std"]),
                      label_names=tuple(config["label_names"])), overwrite=True)
    try:
        assert _predict("predict-test", new_images, tmp_path / "zoo.csv") == 0
    finally:
        unregister("predict-test")
    ckpt, export, zoo = (_read(tmp_path / f"{n}.csv") for n in ("ckpt", "export", "zoo"))
    assert [r["label_0"] for r in ckpt] == [r["label_0"] for r in export] == [r["label_0"] for r in zoo]
    for a, b in zip(ckpt, zoo):
        assert abs(float(a["prob_0"]) - float(b["prob_0"])) < 1e-5


def test_predict_refuses_what_it_cannot_use(trained, tmp_path, capsys):
    assert _predict(trained / "export", tmp_path / "missing", tmp_path / "p.csv") == 2
    assert "does not exist" in capsys.readouterr().out
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"\x89PNG garbage")
    earlier = tmp_path / "p.csv"
    earlier.write_text("an earlier result\n")
    assert _predict(trained / "export", broken, earlier) == 2
    assert "none of the 1 images" in capsys.readouterr().out
    assert earlier.read_text() == "an earlier result\n"          # nothing written before is lost
    assert _predict(trained / "export", broken, earlier, "--topk", "0") == 2
