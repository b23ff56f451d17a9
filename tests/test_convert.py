"""Authors' checkpoints and MoCo backbones onto timm models."""
import pickle

import pytest
import timm
import torch

from dpl_zoo.cli import main
from dpl_zoo.convert import convert_checkpoint
from dpl_zoo.layouts import ConversionError, load_start_point as load_initial_weights, read_checkpoint as read_state
from dpl_zoo.zoo import load
from drive_server import authors_checkpoint


def test_convert_authors_resnet50_forward_equal(tmp_path):
    student, teacher = authors_checkpoint(tmp_path / "dpl.pth.tar")
    x = torch.randn(2, 3, 224, 224)
    assert main(["convert", str(tmp_path / "dpl.pth.tar"), "--out", str(tmp_path / "s")]) == 0
    converted = load(str(tmp_path / "s"))
    assert torch.equal(converted(x), student(x))
    assert converted.pretrained_cfg["label_names"][0] == "n01440764"  # ImageNet synsets
    convert_checkpoint(tmp_path / "dpl.pth.tar", tmp_path / "t", teacher=True)
    assert torch.equal(load(str(tmp_path / "t"))(x), teacher(x))


def test_moco_backbone_as_initial_weights(tmp_path):
    torch.manual_seed(1)
    src = timm.create_model("test_resnet", num_classes=128)  # MoCo projection head: not a classifier
    state = {f"module.encoder_q.{k}": v for k, v in src.state_dict().items()}
    state["module.encoder_k.conv1.weight"] = torch.zeros(1)  # the key encoder is ignored
    torch.save({"state_dict": state}, tmp_path / "moco.pth.tar")
    model = timm.create_model("test_resnet", num_classes=10)
    info = load_initial_weights(model, tmp_path / "moco.pth.tar")
    assert info["layout"] == "moco" and "fc.weight" in info["reset_head"]
    assert torch.equal(model.conv1[0].weight, src.conv1[0].weight)
    with pytest.raises(ConversionError, match="MoCo backbone without a classifier"):
        convert_checkpoint(tmp_path / "moco.pth.tar", tmp_path / "out", arch="test_resnet")
    with pytest.raises(ConversionError, match="does not fit"):
        load_initial_weights(timm.create_model("resnet18", num_classes=10), tmp_path / "moco.pth.tar")


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_with_code_is_refused(tmp_path, capsys):
    bad = tmp_path / "evil.pth.tar"
    with open(bad, "wb") as f:
        pickle.dump({"state_dict": Payload()}, f)
    with pytest.raises(ConversionError, match="pickled code, which dpl-zoo refuses"):
        read_state(bad)
    assert "this must never run" not in capsys.readouterr().out
    assert main(["convert", str(bad), "--out", str(tmp_path / "o")]) == 2


def test_corrupt_and_missing_files(tmp_path):
    (tmp_path / "zero.pth.tar").write_bytes(b"")
    with pytest.raises(ConversionError, match="corrupt"):
        read_state(tmp_path / "zero.pth.tar")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ConversionError, match="not a readable safetensors"):
        read_state(tmp_path / "bad.safetensors")
    with pytest.raises(ConversionError, match="does not exist"):
        read_state(tmp_path / "nope.pth")
