"""CLIP teacher predictions and CLIP-assisted / zero-shot training, with a tiny random open_clip model.

Real CLIP weights cannot be downloaded here; a user with network gets them by name
(clip:RN50/openai). The tiny model checks the whole path, not CLIP's accuracy.
"""
import json

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from dpl_zoo.cli import main  # noqa: E402
from dpl_zoo.config import load_config  # noqa: E402
from dpl_zoo.datasets import DataError, ImageFolderDataset  # noqa: E402
from dpl_zoo.method import DebiasPLLoss  # noqa: E402
from dpl_zoo.teachers import Predictions, dataset_fingerprint, predict_zero_shot  # noqa: E402
from dpl_zoo.train import fit  # noqa: E402

from conftest import make_image_folder, tiny_overrides  # noqa: E402

TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module", autouse=True)
def tiny_clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "dpl-tiny-clip.json"
    path.write_text(json.dumps(TINY))
    open_clip.add_model_config(path)
    return "clip:dpl-tiny-clip"


def test_pseudo_label_file_and_eval(image_data, tmp_path, capsys):
    out = tmp_path / "preds.safetensors"
    assert main(["pseudo-label", "--teacher", "clip:dpl-tiny-clip", "--data", str(image_data / "train"),
                 "--out", str(out), "--eval", "--workers", "0", "--topk", "2"]) == 0
    preds = Predictions.load(out)
    ds = ImageFolderDataset(image_data / "train")
    assert preds.indices.shape == (30, 2) and preds.probs.shape == (30, 2)
    assert torch.all(preds.probs[:, 0] >= preds.probs[:, 1]) and preds.num_classes == 3
    assert preds.fingerprint == dataset_fingerprint(ds) and preds.class_names == ["cat", "dog", "emu"]
    result = json.loads(out.with_suffix(".eval.json").read_text())
    assert result["images"] == 30 and 0 <= result["top1"] <= 100
    assert "zero-shot top-1" in capsys.readouterr().out


def test_pseudo_labelling_resumes_after_interruption(image_data, tmp_path, monkeypatch):
    import dpl_zoo.teachers as teachers
    ds = ImageFolderDataset(image_data / "train")
    calls = {"n": 0}
    real = teachers._encode_chunk

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the third batch: two 8-image parts are already on disk
        return real(*args, **kwargs)

    monkeypatch.setattr(teachers, "_encode_chunk", flaky)
    out = tmp_path / "p.safetensors"
    kwargs = dict(batch_size=8, chunk=8, workers=0, show_progress=False)
    torch.manual_seed(0)  # the tiny teacher is randomly initialised: the same weights in every build
    with pytest.raises(KeyboardInterrupt):
        predict_zero_shot("clip:dpl-tiny-clip", ds, ds.classes, out, **kwargs)
    assert len(list((tmp_path / "p.safetensors.parts").glob("*.safetensors"))) == 2
    calls["n"] = 100
    torch.manual_seed(0)
    resumed = predict_zero_shot("clip:dpl-tiny-clip", ds, ds.classes, out, **kwargs)
    assert calls["n"] == 100 + 2  # only the two missing parts were computed
    monkeypatch.setattr(teachers, "_encode_chunk", real)
    torch.manual_seed(0)
    fresh = predict_zero_shot("clip:dpl-tiny-clip", ds, ds.classes, tmp_path / "f.safetensors", **kwargs)
    assert torch.equal(resumed.indices, fresh.indices) and torch.allclose(resumed.probs, fresh.probs)


@pytest.fixture
def preds_file(image_data, tmp_path):
    ds = ImageFolderDataset(image_data / "train")
    path = tmp_path / "preds.safetensors"
    predict_zero_shot("clip:dpl-tiny-clip", ds, ds.classes, path, workers=0, show_progress=False)
    return path


def test_predictions_for_another_dataset_are_refused(image_data, tmp_path, preds_file):
    other = make_image_folder(tmp_path / "other", per_class=10, seed=5)  # same size, other files? same names
    (other / "cat" / "000.png").rename(other / "cat" / "zzz.png")      # one file renamed: another dataset
    make_image_folder(tmp_path / "other_val", per_class=4)
    sets = tiny_overrides(image_data, tmp_path / "runs", epochs=1, **{"data.root": str(other),
                                                                      "data.val_root": str(tmp_path / "other_val"),
                                                                      "data.teacher_predictions": str(preds_file)})
    with pytest.raises(DataError, match="made for another dataset"):
        fit(load_config(None, sets), quiet=True)
    bigger = make_image_folder(tmp_path / "bigger", per_class=12)
    sets = tiny_overrides(image_data, tmp_path / "runs", epochs=1, **{"data.root": str(bigger),
                                                                      "data.val_root": str(tmp_path / "other_val"),
                                                                      "data.teacher_predictions": str(preds_file)})
    with pytest.raises(DataError, match="cover 30 images, the dataset has 36"):
        fit(load_config(None, sets), quiet=True)


def test_clip_assisted_training_run(image_data, tmp_path, preds_file):
    cfg = load_config(None, tiny_overrides(image_data, tmp_path / "runs", epochs=1, **{
        "data.teacher_predictions": str(preds_file), "dpl.clip_threshold": 0.0, "dpl.threshold": 1.0}))
    fit(cfg, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "runs" / "run" / "metrics.jsonl").read_text().splitlines()]
    # threshold 1.0: nothing passes the student's own mask, so every sample gets the CLIP label
    assert all(r["kind"] != "train" or r["loss_u"] > 0 for r in rows)


def test_zero_shot_run_uses_teacher_labels(image_data, tmp_path, preds_file):
    preds = Predictions.load(preds_file)
    threshold = float(preds.confidence.median())
    cfg = load_config(None, tiny_overrides(image_data, tmp_path / "runs", epochs=1, **{
        "data.teacher_predictions": str(preds_file), "data.labels_from": "teacher",
        "data.teacher_label_threshold": threshold, "data.labels_per_class": None, "dpl.clip_threshold": 0.3}))
    summary = fit(cfg, quiet=True)
    assert summary["labeled"] == int((preds.confidence >= threshold).sum())
    labeled = [int(line) for line in (tmp_path / "runs" / "run" / "labeled.csv").read_text().split()[1:]]
    assert labeled == sorted((preds.confidence >= threshold).nonzero().flatten().tolist())


def test_clip_term_is_active_on_the_right_samples():
    # the step a training loop runs: student mask 1 on sample 0 only; CLIP confident on 0 and 2
    crit = DebiasPLLoss(3, tau=0.4, threshold=0.9, clip_threshold=0.4)
    weak = torch.tensor([[9.0, 0, 0], [0, 0.1, 0], [0, 0, 0.2]])
    out = crit(weak, torch.zeros(3, 3), clip_targets=torch.tensor([0, 1, 2]),
               clip_confidence=torch.tensor([0.9, 0.3, 0.5]))
    assert out.mask.tolist() == [1.0, 0.0, 0.0] and out.clip_mask.tolist() == [0.0, 0.0, 1.0]


def test_zero_shot_config_errors():
    from dpl_zoo.config import ConfigError
    with pytest.raises(ConfigError, match="needs data.teacher_predictions"):
        load_config("mnist_demo", ["data.labels_from=teacher", "data.labels_per_class=null"])
    with pytest.raises(ConfigError, match="takes no human label budget"):
        load_config("mnist_demo", ["data.labels_from=teacher", "data.teacher_predictions=x.safetensors"])


def test_pseudo_label_skips_the_unreadable_images_training_skips(image_data, tmp_path):
    (image_data / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "preds.safetensors"
    assert main(["pseudo-label", "--teacher", "clip:dpl-tiny-clip", "--data", str(image_data / "train"),
                 "--out", str(out), "--workers", "0"]) == 0
    ds = ImageFolderDataset(image_data / "train")
    preds = Predictions.load(out)
    (bad,) = ds.bad_indices
    assert len(preds.indices) == len(ds) == 31 and float(preds.confidence[bad]) == 0.0
    assert float(preds.confidence.min(dim=0).values) == 0.0 and int((preds.confidence > 0).sum()) == 30


def test_resumed_parts_must_come_from_the_same_teacher_and_settings(image_data, tmp_path, monkeypatch):
    import dpl_zoo.teachers as teachers
    ds = ImageFolderDataset(image_data / "train")
    out = tmp_path / "p.safetensors"

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(teachers, "_encode_chunk", interrupt)
    with pytest.raises(KeyboardInterrupt):
        predict_zero_shot("clip:dpl-tiny-clip", ds, ds.classes, out, chunk=8, workers=0, show_progress=False)
    for change, name in ((dict(topk=2), "topk"), (dict(templates=["a {}."]), "templates")):
        with pytest.raises(DataError, match=f"other settings \\({name} differ"):
            predict_zero_shot("clip:dpl-tiny-clip", ds, ds.classes, out, chunk=8, workers=0, show_progress=False,
                              **change)
    with pytest.raises(DataError, match="teacher differ"):
        predict_zero_shot("clip:RN50", ds, ds.classes, out, chunk=8, workers=0, show_progress=False)
    # parts from an older version, with no record of their settings, are not reused
    parts = out.with_name(out.name + ".parts")
    (parts / "settings.json").unlink()
    (parts / "00000.safetensors").write_bytes(b"an old chunk")
    with pytest.raises(DataError, match="without a record of their settings"):
        predict_zero_shot("clip:dpl-tiny-clip", ds, ds.classes, out, chunk=8, workers=0, show_progress=False)


def test_resume_checks_the_teacher_predictions_content(image_data, tmp_path, preds_file):
    from dpl_zoo.checkpoint import CheckpointError
    last = tmp_path / "runs" / "run" / "last.pth.tar"

    def config(epochs, preds):
        return load_config(None, tiny_overrides(image_data, tmp_path / "runs", epochs=epochs, **{
            "data.teacher_predictions": preds, "dpl.clip_threshold": 0.0}))

    fit(config(1, str(preds_file)), quiet=True)
    assert torch.load(last, weights_only=True)["evidence"]["teacher_predictions"] == Predictions.load(preds_file).digest()
    (tmp_path / "runs" / "run" / "summary.json").unlink()
    moved = tmp_path / "moved.safetensors"                      # the same predictions under another path resume
    moved.write_bytes(preds_file.read_bytes())
    assert fit(config(2, str(moved)), resume=str(last), quiet=True)["steps"] == 4
    (tmp_path / "runs" / "run" / "summary.json").unlink()
    other = Predictions.load(moved)                             # other content under the same path does not
    other.probs[0, 0] = 0.5
    other.save(moved)
    with pytest.raises(CheckpointError, match="teacher predictions differ from those the run started with"):
        fit(config(3, str(moved)), resume=str(last), quiet=True)
    with pytest.raises(CheckpointError, match="started with data.teacher_predictions and would resume without"):
        fit(config(3, None), resume=str(last), quiet=True)
