"""Labeled/unlabeled splits (and the authors' split CSVs), the seeded sample stream and loaders.

Training batches come from one seeded global stream of sample positions, sharded by rank
(:class:`StreamSampler`). Each item carries its ``draw`` (its place in that stream), from
which :mod:`dpl_zoo.augment` derives every random choice of its views. Two pipelines
(``data.augment_on``):

- ``workers``: the loader workers decode, crop, flip and RandAugment each image with PIL and
  hand over normalised float views;
- ``device``: the workers only decode and crop (in-memory datasets are not even loaded
  through workers: their uint8 pixels are gathered directly), and flip + RandAugment +
  normalisation run batched on the training device (:class:`ViewMaker`).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .augment import (BatchViews, PILViews, RandAugmentSpec, normalize_images, pil_to_uint8, plan_size,
                      plan_uniforms)
from .datasets import ArrayImages, DataError


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


def long_tail_keep(targets: Sequence[int], num_classes: int, ratio: float, head: int, seed: int = 0,
                   exclude: Sequence[int] = ()) -> list[int]:
    """Positions of a seeded long-tailed subset: class ``c`` keeps
    ``round(head x ratio ** (-c / (C - 1)))`` images (at least 1), class 0 the most."""
    targets = np.asarray(targets)
    usable = np.ones(len(targets), dtype=bool)
    usable[list(exclude)] = False
    rng = np.random.default_rng(seed + 7_919)
    keep: list[int] = []
    for c in range(num_classes):
        idx = np.flatnonzero((targets == c) & usable)
        n = max(1, int(round(head * ratio ** (-c / max(num_classes - 1, 1)))))
        if n > idx.size:
            raise DataError(f"class {c} has {idx.size} images, fewer than the {n} the long-tail profile asks for; "
                            f"lower data.long_tail_max")
        keep += rng.choice(idx, size=n, replace=False).tolist()
    return sorted(keep)


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


def subsample(indices: Sequence[int], cap: int, seed: int) -> list[int]:
    """A fixed random subset of at most ``cap`` indices (pseudo-label diagnostics on large sets)."""
    if len(indices) <= cap:
        return list(indices)
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(np.asarray(indices), size=cap, replace=False).tolist())


# --- views --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ViewSpec:
    """How the training views of a run look: input size, crop, flip, RandAugment, normalisation."""
    size: int
    scale: tuple
    ratio: tuple
    hflip: float
    strong: Optional[RandAugmentSpec]
    mean: tuple
    std: tuple
    interpolation: str = "bilinear"

    def pil(self, strong: bool) -> PILViews:
        return PILViews(self.size, self.scale, self.ratio, self.hflip, self.strong if strong else None,
                        self.interpolation, self.mean)

    def batched(self, strong: bool) -> BatchViews:
        return BatchViews(self.size, self.scale, self.ratio, self.hflip, self.strong if strong else None,
                          self.mean, self.std, self.interpolation)

    @property
    def plan_size(self) -> int:
        return plan_size(self.strong)


@dataclass
class Batch:
    """One step's items of one stream. ``images``: one float tensor per view (views ready),
    one uint8 tensor per view (cropped, to augment on the device), or a single uint8 source
    that every view is cropped from on the device."""
    images: list
    targets: torch.Tensor
    indices: torch.Tensor
    draws: torch.Tensor
    stage: str              # "ready" | "cropped" | "source"

    def pin_memory(self) -> "Batch":
        return Batch([x.pin_memory() for x in self.images], self.targets.pin_memory(), self.indices, self.draws,
                     self.stage)


class ViewDataset(Dataset):
    """A subset of a base dataset whose items are asked for as ``(position, draw)``, a batch at
    a time (``__getitems__``); ``kinds`` lists the views (``"weak"`` / ``"strong"``), and view
    ``v`` of a sample is drawn from the plan of ``(seed, epoch, draw, v)``."""

    def __init__(self, base: Dataset, indices: Sequence[int], kinds: Sequence[str], spec: ViewSpec,
                 seed: int = 0, stage: str = "ready"):
        self.base, self.indices, self.kinds, self.spec, self.seed = base, list(indices), list(kinds), spec, seed
        self.stage, self.epoch = stage, 0
        self.makers = [spec.pil(kind == "strong") for kind in self.kinds]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitems__(self, items: Sequence[tuple[int, int]]) -> Batch:
        positions = [p for p, _ in items]
        draws = torch.tensor([d for _, d in items], dtype=torch.int64)
        pairs = [self.base[self.indices[p]] for p in positions]
        imgs, targets = [im for im, _ in pairs], torch.tensor([t for _, t in pairs])
        views = []
        for v, maker in enumerate(self.makers):
            plan = maker.plans(plan_uniforms(self.seed, self.epoch, draws, v, self.spec.plan_size), imgs)
            ready = self.stage == "ready"
            out = torch.stack([pil_to_uint8(maker.apply(im, plan, k, flip=ready, augment=ready))
                               for k, im in enumerate(imgs)])
            views.append(normalize_images(out, self.spec.mean, self.spec.std) if ready else out)
        return Batch(views, targets, torch.tensor([self.indices[p] for p in positions]), draws, self.stage)


class ViewMaker:
    """Turns a :class:`Batch` into the model's input views on ``device``, augmenting there
    when the workers did not."""

    def __init__(self, spec: ViewSpec, kinds: Sequence[str], seed: int, device: torch.device,
                 channels_last: bool = False):
        self.spec, self.kinds, self.seed, self.device = spec, list(kinds), seed, device
        self.makers = [spec.batched(kind == "strong") for kind in self.kinds]
        self.channels_last = channels_last
        self.epoch = 0

    def __call__(self, batch: Batch) -> list[torch.Tensor]:
        out = []
        for v, maker in enumerate(self.makers):
            if batch.stage == "ready":
                x = batch.images[v].to(self.device, non_blocking=True)
            else:
                src = batch.images[0] if batch.stage == "source" else batch.images[v]
                u = plan_uniforms(self.seed, self.epoch, batch.draws, v, self.spec.plan_size)
                x = maker(src.to(self.device, non_blocking=True), u, crop=batch.stage == "source",
                          channels_last=self.channels_last)
            out.append(x.contiguous(memory_format=torch.channels_last) if self.channels_last else x)
        return out


# --- the sample stream -------------------------------------------------------------------------

class StreamSampler(Sampler):
    """One shard of a global, seeded stream of sample positions.

    The stream is concatenated permutations of the dataset (a small labeled set is
    reshuffled and cycled), cut into global batches of ``per_rank x world`` items; rank
    ``r`` takes the ``r``-th slice of every global batch. Items are ``(position, draw)``
    with ``draw`` the place in the global stream.
    """

    def __init__(self, size: int, steps: int, per_rank: int, seed: int, rank: int = 0, world: int = 1):
        self.size, self.steps, self.per_rank, self.seed, self.rank, self.world = size, steps, per_rank, seed, rank, world

    def __len__(self) -> int:
        return self.steps * self.per_rank

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Per step, this rank's ``(positions, draws)`` as two tensors."""
        g = torch.Generator().manual_seed(self.seed)
        total = self.steps * self.per_rank * self.world
        stream = torch.cat([torch.randperm(self.size, generator=g) for _ in range(-(-total // self.size))])[:total]
        global_batch = self.per_rank * self.world
        for step in range(self.steps):
            start = step * global_batch + self.rank * self.per_rank
            yield stream[start:start + self.per_rank], torch.arange(start, start + self.per_rank)

    def __iter__(self):
        for positions, draws in self.batches():
            yield from zip(positions.tolist(), draws.tolist())


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """A seed fixed by (seed, epoch, stream): resuming at an epoch replays its order exactly."""
    return seed * 1_000_003 + epoch * 7919 + stream


class ArrayStream:
    """In-memory data for the ``device`` pipeline: per step, the uint8 pixels of this rank's
    items gathered from one tensor, no loader processes."""

    def __init__(self, base: ArrayImages, indices: Sequence[int], sampler: StreamSampler):
        self.pixels, self.targets = base.tensor(), torch.tensor(base.targets)
        self.indices, self.sampler = torch.tensor(list(indices)), sampler

    def __len__(self) -> int:
        return self.sampler.steps

    def __iter__(self) -> Iterator[Batch]:
        for positions, draws in self.sampler.batches():
            index = self.indices[positions]
            yield Batch([self.pixels[index]], self.targets[index], index, draws, "source")


def _identity(batch):
    return batch


def stream_loader(ds: ViewDataset, per_rank: int, steps: int, seed: int, epoch: int, workers: int,
                  pin_memory: bool, rank: int = 0, world: int = 1):
    """``steps`` batches of ``per_rank`` items from this rank's shard of the epoch's global stream."""
    if len(ds) == 0:
        raise DataError("an empty split cannot be loaded; check the label budget and the data")
    ds.epoch = epoch
    sampler = StreamSampler(len(ds), steps, per_rank, seed, rank, world)
    if ds.stage == "cached":    # features of cached views (dpl_zoo.view_cache): no images to load
        return ds.stream(sampler)
    if ds.stage == "source":
        return ArrayStream(ds.base, ds.indices, sampler)
    return DataLoader(ds, batch_size=per_rank, sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      drop_last=True, collate_fn=_identity, persistent_workers=False)


# --- evaluation ---------------------------------------------------------------------------------

class EvalDataset(Dataset):
    """``(image, target, position)`` with a deterministic transform, for evaluation."""

    def __init__(self, base: Dataset, indices: Sequence[int], transform: Callable):
        self.base, self.indices, self.transform = base, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        img, target = self.base[self.indices[i]]
        return self.transform(img), target, self.indices[i]


def eval_loader(ds: Dataset, batch_size: int, workers: int, pin_memory: bool, rank: int = 0,
                world: int = 1) -> DataLoader:
    """In order; under data parallelism rank ``r`` takes positions ``r, r + world, ...`` with no
    padding, so summed counts give the exact global metrics."""
    shard = torch.utils.data.Subset(ds, range(rank, len(ds), world)) if world > 1 else ds
    return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin_memory)


def eval_transform(data_config: dict) -> Callable:
    from timm.data import create_transform
    return create_transform(input_size=data_config["input_size"], mean=data_config["mean"], std=data_config["std"],
                            interpolation=data_config.get("interpolation", "bilinear"),
                            crop_pct=data_config.get("crop_pct"), crop_mode=data_config.get("crop_mode"))
