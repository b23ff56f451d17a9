import numpy as np
import pytest
from PIL import Image

from dpl_zoo.config import load_config


def make_image_folder(root, classes=("cat", "dog", "emu"), per_class=10, size=16, seed=0):
    """Class-coloured noise images in root/<class>/<n>.png: learnable, tiny, deterministic."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
            img[..., c % 3] += 150
            Image.fromarray(img).save(root / name / f"{i:03d}.png")
    return root


def make_fashion_folder(folder, per_class=40, test_per_class=5, gz=True, seed=0):
    """The four Fashion-MNIST IDX files with class-dependent noise images (learnable, tiny)."""
    import gzip
    import struct
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def images(n):
        y = np.repeat(np.arange(10), n)
        x = rng.integers(0, 60, (len(y), 28, 28))
        for c in range(10):
            x[y == c, 2 * c:2 * c + 8, :] += 150
        return x.astype(np.uint8), y.astype(np.uint8)

    (train_x, train_y), (test_x, test_y) = images(per_class), images(test_per_class)
    for name, arr in (("train-images-idx3-ubyte", train_x), ("train-labels-idx1-ubyte", train_y),
                      ("t10k-images-idx3-ubyte", test_x), ("t10k-labels-idx1-ubyte", test_y)):
        header = struct.pack(">I", 0x0800 + arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape)
        payload = header + arr.tobytes()
        if gz:
            with gzip.open(folder / f"{name}.gz", "wb") as f:
                f.write(payload)
        else:
            (folder / name).write_bytes(payload)
    return folder, (train_x, train_y), (test_x, test_y)


@pytest.fixture
def image_data(tmp_path):
    make_image_folder(tmp_path / "data" / "train", per_class=10)
    make_image_folder(tmp_path / "data" / "val", per_class=4, seed=1)
    return tmp_path / "data"


def tiny_overrides(data_root, out, **extra):
    """A few CPU-seconds run: test_resnet at 32 px, 2 steps per epoch, no workers."""
    base = {
        "model": "test_resnet", "img_size": 32, "batch_size": 3, "epochs": 2, "steps_per_epoch": 2, "workers": 0,
        "lr": 0.01, "output": str(out), "experiment": "run", "log_interval": 1,
        "dpl.mu": 2, "dpl.threshold": 0.5, "dpl.qhat_momentum": 0.9, "dpl.ema_teacher": True,
        "model_ema_decay": 0.9, "data.dataset": "folder", "data.root": str(data_root / "train"),
        "data.labels_per_class": 2, "data.hflip": 0.0,
    }
    base.update(extra)
    return [f"{k}={'null' if v is None else v}" for k, v in base.items()]


@pytest.fixture
def tiny_config(image_data, tmp_path):
    def make(**extra):
        return load_config(None, tiny_overrides(image_data, tmp_path / "runs", **extra))
    return make


def straight_and_resumed(tiny_config, runs, at=2, epochs=3, **extra):
    """The same tiny run twice: straight through ("straight"), and stopped as Ctrl-C stops it at the
    start of epoch ``at`` then resumed from its checkpoint ("broken"). Returns both summaries and
    both last checkpoints."""
    import torch
    from dpl_zoo.progress import Reporter
    from dpl_zoo.train import fit

    class Interrupt(Reporter):
        def start_epoch(self, epoch, steps):
            if epoch == at:
                raise KeyboardInterrupt
            super().start_epoch(epoch, steps)
    straight = fit(tiny_config(experiment="straight", epochs=epochs, **extra), quiet=True)
    cfg = tiny_config(experiment="broken", epochs=epochs, **extra)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, reporter=Interrupt(quiet=True))
    resumed = fit(cfg, resume=str(runs / "broken" / "last.pth.tar"), quiet=True)
    return straight, resumed, *(torch.load(runs / name / "last.pth.tar", weights_only=True)
                                for name in ("straight", "broken"))


TOKEN = "hf_dplzoo_secret_test_token_0123456789"


@pytest.fixture(params=["regular", "lfs"])
def hub(request, tmp_path, monkeypatch):
    """A loopback Hub (tests/hub_server.py) with huggingface_hub pointed at it and an empty cache.

    "regular": files go inline in the commit (the path xet-enabled clients take);
    "lfs": xet disabled, files go through the LFS batch API and a PUT.
    """
    from huggingface_hub import constants
    from hub_server import HubServer
    with HubServer(upload_mode=request.param) as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        template = server.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        # older huggingface_hub (0.34, the floor) builds file URLs from its own copy of the template
        from huggingface_hub import file_download
        monkeypatch.setattr(file_download, "HUGGINGFACE_CO_URL_TEMPLATE", template, raising=False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", request.param == "lfs")
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield server


@pytest.fixture(autouse=True)
def _torch_threads_unchanged():
    """A test that leaves the process's torch thread count changed changes the numbers of every
    later in-process run (the resume-equality tests compare one against a subprocess)."""
    import torch
    threads = torch.get_num_threads()
    yield
    now = torch.get_num_threads()
    torch.set_num_threads(threads)
    assert now == threads, f"the test left torch.set_num_threads({now}) behind (was {threads})"


@pytest.fixture(autouse=True)
def _isolated_dpl_zoo_cache(tmp_path_factory, monkeypatch):
    """Image scans, converted weights and downloads go to a per-test cache, never the user's."""
    monkeypatch.setenv("DPL_ZOO_CACHE", str(tmp_path_factory.mktemp("dpl-zoo-cache")))


def make_start_folder(folder, seed=0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)):
    """A test_resnet start point as ``dpl-zoo pretrain`` exports one (``model.safetensors`` +
    ``config.json`` with its own mean/std), with BatchNorm statistics of a trained model, not the
    identity: a frozen BatchNorm exported as a fresh one then changes the logits."""
    import timm
    import torch
    from dpl_zoo.checkpoint import export_timm
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", num_classes=0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    export_timm(model, folder, None, {"mean": tuple(mean), "std": tuple(std)})
    return folder


def as_bmp(png):
    """``png`` replaced by an uncompressed BMP of the same pixels: its size never changes with them."""
    bmp = png.with_suffix(".bmp")
    with Image.open(png) as img:
        img.save(bmp)
    png.unlink()
    return bmp


def repaint(image):
    """Other pixels in the same file, at the same size (a BMP's size depends on its dimensions only)."""
    import os
    size = os.path.getsize(image)
    with Image.open(image) as img:
        arr = 255 - np.asarray(img.convert("RGB"))
    Image.fromarray(arr).save(image)
    assert os.path.getsize(image) == size
    return image
