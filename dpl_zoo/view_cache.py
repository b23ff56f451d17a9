"""Features of augmented views through a frozen backbone, computed once and cached.

With ``freeze`` and ``data.cached_views: K`` every training image is seen as ``K`` weak and ``K``
strong augmented views plus its evaluation view; each goes through the frozen part of the
model once (batched, on the training device) and the result is stored, so training costs only
the trainable rest. Steps then sample among the cached views (:class:`CachedViews`).

The store (:class:`FeatureStore`) lives in the dpl-zoo cache under a key of everything that
decides the features (:func:`dpl_zoo.identity.frozen_part`: architecture, model kwargs, cut,
the frozen weights' content, preprocessing, precision), the data's content, the view settings
and ``K``. A different key is a different folder: nothing is ever reused across a change. Rows
are dataset positions and are filled on demand, chunk by chunk, from one loader whose workers
decode and augment in parallel (an interrupted fill continues; runs with other label splits
share the rows they have in common). Views are drawn with a fixed seed from (image position,
view number), so every run seed shares one cache.
"""
from __future__ import annotations

import json
import os
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from .augment import plan_uniforms
from .data import Batch, EvalDataset, ViewDataset, ViewMaker, ViewSpec
from .identity import key

FORMAT = 1
VIEW_SEED = 0x5EED          # the views of an image do not depend on the run's seed
CHUNK = 256                 # images per prefix forward (and per saved progress record)

# compute(rows) -> (rows of a chunk, their len(chunk) x views x feature values), chunk by chunk
Compute = Callable[[list], Iterator[tuple[list, torch.Tensor]]]


def cache_key(**fields) -> tuple[str, dict]:
    """A folder name and the readable record of what it depends on."""
    record = {"format": FORMAT, **fields}
    return key(record), record


class FeatureStore:
    """``rows x views x feature`` float16 features in a memory-mapped ``.npy`` file, with a
    record of which rows are done. Only one process fills a store at a time (a file lock)."""

    def __init__(self, folder: Path, record: dict, rows: int, views: int, feature_shape: Sequence[int]):
        self.folder, self.record = Path(folder), record
        self.shape = (rows, views, *feature_shape)
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = self.folder / "meta.json"
        described = {**record, "shape": list(self.shape)}
        from filelock import FileLock
        # under the fill lock: runs side by side open one store at once, and only one may create it
        with FileLock(str(self.folder / ".lock")):
            if meta.is_file():
                saved = json.loads(meta.read_text())
                if saved != json.loads(json.dumps(described, default=str)):
                    raise RuntimeError(f"view cache {self.folder} was written for other settings; delete the folder")
            else:
                tmp = meta.with_suffix(".tmp")
                tmp.write_text(json.dumps(described, indent=1, default=str))
                tmp.replace(meta)
            path = self.folder / "features.npy"
            mode = "r+" if path.is_file() else "w+"
            self.features = np.lib.format.open_memmap(path, mode=mode, dtype=np.float16, shape=self.shape)
            self._done_path = self.folder / "done.npy"
            self.done = np.load(self._done_path) if self._done_path.is_file() else np.zeros(rows, dtype=bool)

    def missing(self, rows: Sequence[int]) -> list[int]:
        rows = np.asarray(sorted(set(int(r) for r in rows)), dtype=np.int64)
        return rows[~self.done[rows]].tolist() if rows.size else []

    def _reload_done(self) -> None:
        """The done list as on disk: another process (rank 0 under torchrun, a run side by side)
        may have filled rows since this one opened the store."""
        if self._done_path.is_file():
            self.done = np.load(self._done_path)

    def fill(self, rows: Sequence[int], compute: Compute, progress=None) -> int:
        """Compute the rows not yet done (``compute(rows)`` yields them chunk by chunk, each saved
        as it comes); returns how many were computed."""
        from filelock import FileLock
        with FileLock(str(self.folder / ".lock")):
            self._reload_done()
            todo = self.missing(rows)
            if not todo:
                return 0
            task = progress.add_task("caching views", total=len(todo)) if progress is not None else None
            for part, values in compute(todo):
                if tuple(values.shape) != (len(part), *self.shape[1:]):
                    raise RuntimeError(f"view features of shape {tuple(values.shape)}, expected "
                                       f"{(len(part), *self.shape[1:])}")
                self.features[part] = values.to(torch.float16).cpu().numpy()
                self.features.flush()
                self.done[part] = True
                tmp = self.folder / "done.tmp.npy"
                np.save(tmp, self.done)
                os.replace(tmp, self._done_path)
                if task is not None:
                    progress.advance(task, len(part))
            return len(todo)

    def read(self, rows: Sequence[int]) -> torch.Tensor:
        self._reload_done()
        missing = self.missing(rows)
        if missing:
            raise RuntimeError(f"view cache {self.folder} lacks {len(missing)} rows (e.g. {missing[:3]})")
        return torch.from_numpy(np.ascontiguousarray(self.features[np.asarray(rows, dtype=np.int64)]))


# --- computing the features ---------------------------------------------------------------

def view_kinds(k: int) -> list[str]:
    return ["weak"] * k + ["strong"] * k


class _FillItems(Dataset):
    """What a fill needs of images (asked for by their place in the fill), a batch at a time, in
    loader workers: the training views (unless the device crops them from in-memory pixels,
    stage ``source``) and the evaluation view. View ``v`` of an image is drawn from its position."""

    def __init__(self, base, positions: list[int], kinds: list[str], spec: ViewSpec, stage: str, eval_tf: Callable):
        self.positions, self.stage = positions, stage
        self.views = ViewDataset(base, positions, kinds, spec, seed=VIEW_SEED, stage=stage)
        self.evals = EvalDataset(base, positions, eval_tf)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitems__(self, items: list[int]):
        views = None if self.stage == "source" else self.views.__getitems__([(j, self.positions[j]) for j in items])
        return items, views, torch.stack([self.evals[j][0] for j in items])


def _as_is(batch):
    return batch


def _chunks(ds: Dataset, chunk: int, workers: int) -> Iterator[list]:
    """``ds`` in chunks of ``chunk`` items, each a list of loader batches: one loader for the
    whole fill, each chunk split over the ``workers`` (the items of one batch go to one worker)."""
    per_batch = -(-chunk // workers) if workers else chunk
    loader = DataLoader(ds, batch_size=per_batch, shuffle=False, num_workers=workers, collate_fn=_as_is)
    group, size = [], 0
    for batch in loader:
        group.append(batch)
        size += len(batch[0])
        if size >= chunk:
            yield group
            group, size = [], 0
    if group:
        yield group


def _joined(batches: list[Batch]) -> Batch:
    return Batch([torch.cat(views) for views in zip(*(b.images for b in batches))],
                 torch.cat([b.targets for b in batches]), torch.cat([b.indices for b in batches]),
                 torch.cat([b.draws for b in batches]), batches[0].stage)


def _on(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def train_view_features(base, spec: ViewSpec, k: int, stage: str, prefix: Callable, device: torch.device,
                        eval_tf: Callable, workers: int = 0, autocast=nullcontext, channels_last: bool = False,
                        chunk: int = CHUNK) -> Compute:
    """``compute(positions)`` for a :class:`FeatureStore` of training images: ``K`` weak views,
    ``K`` strong views and the evaluation view of each, through ``prefix``. The views come from
    the same view code as training without a cache (``augment_on`` decides the path)."""
    kinds = view_kinds(k)
    maker = ViewMaker(spec, kinds, VIEW_SEED, device, channels_last)

    @torch.no_grad()
    def compute(positions: list[int]):
        for group in _chunks(_FillItems(base, positions, kinds, spec, stage, eval_tf), chunk, workers):
            part = [positions[j] for items, _, _ in group for j in items]
            index = torch.tensor(part)
            if stage == "source":   # in-memory pixels, cropped and augmented on the device
                batch = Batch([base.tensor()[index]], torch.tensor([base.targets[i] for i in part]), index, index,
                              "source")
            else:
                batch = _joined([views for _, views, _ in group])
            with autocast():
                out = [prefix(x).float() for x in maker(batch)]
                out.append(prefix(_on(torch.cat([ev for _, _, ev in group]), device, channels_last)).float())
            yield part, torch.stack(out, 1)

    return compute


class _EvalItems(EvalDataset):
    """Evaluation views a batch at a time (``__getitems__``), as the fill's loader takes them."""

    def __getitems__(self, items: list[int]):
        return items, None, torch.stack([self[j][0] for j in items])


def eval_view_features(base, prefix: Callable, device: torch.device, eval_tf: Callable, workers: int = 0,
                       autocast=nullcontext, channels_last: bool = False, chunk: int = CHUNK) -> Compute:
    """``compute(positions)`` for a one-view store of evaluation images."""
    @torch.no_grad()
    def compute(positions: list[int]):
        for group in _chunks(_EvalItems(base, positions, eval_tf), chunk, workers):
            part = [positions[j] for items, _, _ in group for j in items]
            with autocast():
                out = prefix(_on(torch.cat([ev for _, _, ev in group]), device, channels_last)).float()
            yield part, out.unsqueeze(1)

    return compute


# --- training on cached views ----------------------------------------------------------------

class CachedViews:
    """The cached features of a set of dataset positions, as training streams draw them.

    A weak view of a sample is one of its ``K`` weak slots, a strong view one of its ``K`` strong
    slots (:class:`CachedViewMaker`); the evaluation view (slot ``2K``) serves the diagnostics.
    """

    stage = "cached"

    def __init__(self, features: torch.Tensor, positions: Sequence[int], targets: Sequence[int], k: int):
        self.features, self.k = features, k
        self.positions = torch.tensor(list(positions), dtype=torch.int64)
        self._row_of = torch.full((int(self.positions.max()) + 1 if len(self.positions) else 0,), -1,
                                  dtype=torch.int64)
        self._row_of[self.positions] = torch.arange(len(self.positions))
        self.targets = torch.tensor(list(targets), dtype=torch.int64)

    def rows(self, positions: torch.Tensor) -> torch.Tensor:
        rows = self._row_of[positions]
        if (rows < 0).any():
            raise KeyError(f"positions {positions[rows < 0][:3].tolist()} are not in the cached set")
        return rows

    def eval_set(self, positions: Sequence[int]) -> "FeatureEvalSet":
        rows = self.rows(torch.tensor(list(positions), dtype=torch.int64))
        return FeatureEvalSet(self.features[rows, 2 * self.k], self.targets[rows], list(positions))


class CachedSplit:
    """One split (labeled or unlabeled) of a run on cached views: the stream of its items."""

    stage = "cached"

    def __init__(self, cached: CachedViews, indices: Sequence[int], kinds: Sequence[str]):
        self.cached, self.indices, self.kinds = cached, list(indices), list(kinds)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.indices)

    def stream(self, sampler):
        index_of = torch.tensor(self.indices, dtype=torch.int64)
        targets = self.cached.targets[self.cached.rows(index_of)]
        for positions, draws in sampler.batches():
            yield Batch([], targets[positions], index_of[positions], draws, "cached")


class CachedViewMaker:
    """The step's views of a cached-split batch, on the training device: view ``v`` of a sample is
    slot ``floor(K u_v)`` of its weak (or strong) views, ``u`` from the counter hash of
    ``(seed, epoch, draw)``, so a resumed epoch draws the same views."""

    def __init__(self, cached: CachedViews, kinds: Sequence[str], seed: int, device: torch.device):
        self.cached, self.kinds, self.seed, self.device = cached, list(kinds), seed, device
        self.epoch = 0

    def __call__(self, batch: Batch) -> list[torch.Tensor]:
        rows = self.cached.rows(batch.indices)
        k = self.cached.k
        # one uniform per view from the counter hash of (seed, epoch, draw)
        u = plan_uniforms(self.seed, self.epoch, batch.draws, 0, len(self.kinds))
        slots = distinct_slots(u, self.kinds, k)
        return [self.cached.features[rows, slots[:, v] + (k if kind == "strong" else 0)]
                .to(self.device, non_blocking=True).float() for v, kind in enumerate(self.kinds)]


def distinct_slots(u: torch.Tensor, kinds: Sequence[str], k: int) -> torch.Tensor:
    """Slots ``0..K-1`` for the views of each sample (``u``: one uniform per view), without
    replacement within a kind: the two weak (or two strong) views of ``dpl.multiviews`` are two
    different cached views. The first view of a kind takes slot ``floor(K u)``; the ``j``-th
    takes the ``floor((K - j) u)``-th slot the earlier ones left."""
    slots = torch.zeros(u.shape, dtype=torch.int64)
    for kind in dict.fromkeys(kinds):
        views = [v for v, kd in enumerate(kinds) if kd == kind]
        if len(views) > k:
            raise ValueError(f"{len(views)} {kind} views of {k} cached ones: data.cached_views must be >= {len(views)}")
        for j, v in enumerate(views):
            slot = (u[:, v] * (k - j)).long().clamp_max(k - j - 1)
            if j:
                taken, _ = torch.sort(slots[:, views[:j]], dim=1)
                for c in range(j):     # the slot-th free one: step over each taken slot at or below it
                    slot = slot + (slot >= taken[:, c]).long()
            slots[:, v] = slot
    return slots


class FeatureEvalSet(torch.utils.data.Dataset):
    """Cached evaluation features as ``(feature, target, position)`` items."""

    def __init__(self, features: torch.Tensor, targets: torch.Tensor, positions: Sequence[int]):
        self.features, self.targets, self.positions = features, targets, list(positions)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int):
        return self.features[i].float(), int(self.targets[i]), self.positions[i]


def spec_record(spec: ViewSpec) -> dict:
    d = asdict(spec)
    d["strong"] = None if spec.strong is None else asdict(spec.strong)
    return d
