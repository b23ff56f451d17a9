"""Features of augmented views through a frozen backbone, computed once and cached.

With ``freeze`` and ``data.cached_views: K`` every training image is seen as ``K`` weak and ``K``
strong augmented views plus its evaluation view; each goes through the frozen part of the
model once (batched, on the training device) and the result is stored, so training costs only
the trainable rest. Steps then sample among the cached views (:class:`CachedViews`).

The store (:class:`FeatureStore`) lives in the dpl-zoo cache under a key of everything that
decides the features: architecture and cut, a digest of the frozen weights, a digest of the
data, the view settings and ``K``. A different key is a different folder: nothing is ever
reused across a change. Rows are dataset positions and are filled on demand, chunk by chunk
(an interrupted fill continues; runs with other label splits share the rows they have in
common). Views are drawn with a fixed seed from (image position, view number), so every run
seed shares one cache.
"""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from .augment import plan_uniforms
from .data import Batch, EvalDataset, ViewDataset, ViewMaker, ViewSpec, eval_loader

FORMAT = 1
VIEW_SEED = 0x5EED          # the views of an image do not depend on the run's seed
CHUNK = 256                 # images per fill step (and per saved progress record)


def weights_digest(model: nn.Module, trainable: nn.Module) -> str:
    """sha256 of every tensor of ``model`` outside ``trainable``: the weights the cached features depend on."""
    skip = {id(t) for t in (*trainable.parameters(), *trainable.buffers())}
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
        if id(tensor) in skip:
            continue
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())  # logical order, any layout
    return h.hexdigest()


def cache_key(**fields) -> tuple[str, dict]:
    """A folder name and the readable record of what it depends on."""
    record = {"format": FORMAT, **fields}
    text = json.dumps(record, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20], record


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

    def fill(self, rows: Sequence[int], compute: Callable[[list[int]], torch.Tensor], progress=None,
             chunk: int = CHUNK) -> int:
        """Compute the rows not yet done (``compute(rows) -> len(rows) x views x feature``);
        returns how many were computed."""
        from filelock import FileLock
        with FileLock(str(self.folder / ".lock")):
            if self._done_path.is_file():   # another process may have filled rows meanwhile
                self.done = np.load(self._done_path)
            todo = self.missing(rows)
            if not todo:
                return 0
            task = progress.add_task("caching views", total=len(todo)) if progress is not None else None
            for start in range(0, len(todo), chunk):
                part = todo[start:start + chunk]
                values = compute(part)
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
        missing = self.missing(rows)
        if missing:
            raise RuntimeError(f"view cache {self.folder} lacks {len(missing)} rows (e.g. {missing[:3]})")
        return torch.from_numpy(np.ascontiguousarray(self.features[np.asarray(rows, dtype=np.int64)]))


# --- computing the features ---------------------------------------------------------------

def view_kinds(k: int) -> list[str]:
    return ["weak"] * k + ["strong"] * k


@torch.no_grad()
def train_view_features(base, spec: ViewSpec, k: int, stage: str, prefix: Callable, device: torch.device,
                        eval_tf: Callable, workers: int = 0, autocast=nullcontext,
                        channels_last: bool = False) -> Callable[[list[int]], torch.Tensor]:
    """``compute(positions)`` for a :class:`FeatureStore` of training images: ``K`` weak views,
    ``K`` strong views and the evaluation view of each, through ``prefix``. The views come from
    the same view code as training without a cache (``augment_on`` decides the path)."""
    kinds = view_kinds(k)
    maker = ViewMaker(spec, kinds, VIEW_SEED, device, channels_last)

    def views_of(positions: list[int]) -> list[torch.Tensor]:
        ds = ViewDataset(base, positions, kinds, spec, seed=VIEW_SEED, stage=stage)
        index = torch.tensor(positions)
        if stage == "source":
            batch = Batch([base.tensor()[index]], torch.tensor([base.targets[i] for i in positions]), index,
                          index, "source")
        else:
            items = [(j, p) for j, p in enumerate(positions)]   # draw = the image's position
            if workers:
                loader = torch.utils.data.DataLoader(ds, batch_size=len(items), sampler=items, num_workers=workers,
                                                     collate_fn=lambda b: b)
                batch = next(iter(loader))
            else:
                batch = ds.__getitems__(items)
        return maker(batch)

    def compute(positions: list[int]) -> torch.Tensor:
        out = []
        with autocast():
            for x in views_of(positions):
                out.append(prefix(x).float())
            out.append(prefix(_eval_batch(base, positions, eval_tf, workers, device, channels_last)).float())
        return torch.stack(out, 1)

    return compute


@torch.no_grad()
def eval_view_features(base, prefix: Callable, device: torch.device, eval_tf: Callable, workers: int = 0,
                       autocast=nullcontext, channels_last: bool = False) -> Callable[[list[int]], torch.Tensor]:
    """``compute(positions)`` for a one-view store of evaluation images."""
    def compute(positions: list[int]) -> torch.Tensor:
        with autocast():
            return prefix(_eval_batch(base, positions, eval_tf, workers, device, channels_last)).float().unsqueeze(1)
    return compute


def _eval_batch(base, positions: list[int], eval_tf: Callable, workers: int, device: torch.device,
                channels_last: bool) -> torch.Tensor:
    """The evaluation views of ``positions`` (the run's evaluation transform) on ``device``."""
    ev = EvalDataset(base, positions, eval_tf)
    xs = torch.cat([x for x, _, _ in eval_loader(ev, len(positions), workers, False)]).to(device)
    return xs.contiguous(memory_format=torch.channels_last) if channels_last else xs


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
        # one uniform per view from the counter hash of (seed, epoch, draw): slot of view v = u[:, v]
        slots = (plan_uniforms(self.seed, self.epoch, batch.draws, 0, len(self.kinds)) * k).long().clamp_max(k - 1)
        out = []
        for v, kind in enumerate(self.kinds):
            slot = slots[:, v] + (k if kind == "strong" else 0)
            out.append(self.cached.features[rows, slot].to(self.device, non_blocking=True).float())
        return out


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
