"""What a derived artifact was made from: its identity, computed in one place.

Cached features of a frozen backbone (:mod:`dpl_zoo.view_cache`) and a resumed checkpoint
(:mod:`dpl_zoo.resume`) are valid only for the inputs that made them. This module is the one
owner of those inputs' digests, so the cache key and the resume check cannot disagree about
what "the same" means:

- :func:`data_digest`: what a dataset holds, by *content*. Image files are hashed byte by byte
  (an image rewritten in place at the same size is other data); each file's digest is
  remembered in the dpl-zoo cache under its stat signature (size, modification and change
  times, inode: what git's index compares), so a second look at an unchanged folder reads no
  image. Paths count relative to the data root: a moved folder is the same data.
- :func:`frozen_part`: everything that decides what the frozen part of a model computes from an
  image: the architecture and its timm ``model_kwargs`` (pooling, output stride, activation...),
  the cut, the *content* of the frozen weights actually loaded (a start file's or a resumed
  checkpoint's), the preprocessing (timm's data-config keys) and the autocast precision.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

# the data-config keys that decide a model's input pixels (timm's names); what an export's
# config.json carries of them is its preprocessing
PREPROCESSING_KEYS = ("input_size", "mean", "std", "crop_pct", "interpolation", "crop_mode")


def preprocessing(data_config: dict) -> dict:
    """The input-deciding part of a timm data config, as plain JSON values."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items() if k in PREPROCESSING_KEYS}


def weights_digest(model: nn.Module, trainable: Optional[nn.Module] = None) -> str:
    """sha256 of every tensor of ``model`` outside ``trainable``: the weights a frozen part computes with."""
    skip = {id(t) for t in (*trainable.parameters(), *trainable.buffers())} if trainable is not None else set()
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
        if id(tensor) in skip:
            continue
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())  # logical order, any layout
    return h.hexdigest()


def frozen_part(cfg, model: nn.Module, trainable: nn.Module, data_config: dict,
                autocast_dtype: Optional[torch.dtype]) -> dict:
    """Everything that decides the output of ``model``'s frozen part (all but ``trainable``) for an image."""
    return {"model": cfg.model, "model_kwargs": cfg.model_kwargs, "freeze": cfg.freeze,
            "weights": weights_digest(model, trainable), "preprocessing": preprocessing(data_config),
            "amp": str(autocast_dtype).replace("torch.", "") if autocast_dtype is not None else None}


def key(record: dict) -> str:
    """A folder name for ``record``: any change of it is another name."""
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:20]


# --- data -----------------------------------------------------------------------------------------

def data_digest(dataset) -> str:
    """sha256 of what ``dataset`` holds, with its labels: in-memory images by their pixels, image
    files by their content and their path relative to the data root (:func:`file_digests`);
    datasets that list no files (timm's streaming readers) by their sample list, as far as they
    give one. Computed once per dataset object."""
    known = getattr(dataset, "_data_digest", None)
    if known:
        return known
    from .datasets import ArrayImages
    h = hashlib.sha256(type(dataset).__name__.encode())
    h.update(str(len(dataset)).encode())
    files = _files(dataset)
    if isinstance(dataset, ArrayImages):
        h.update(str(dataset.images.shape).encode())
        h.update(np.ascontiguousarray(dataset.images).tobytes())
    elif files is not None:
        root, paths = files
        for path, digest in zip(paths, file_digests(root, paths)):
            h.update(f"{os.path.relpath(path, root)}\t{digest}\n".encode())
    elif getattr(dataset, "samples", None):
        h.update("\n".join(str(path) for path, _ in dataset.samples).encode())
    h.update(np.asarray(dataset.targets, dtype=np.int64).tobytes())
    dataset._data_digest = h.hexdigest()
    return dataset._data_digest


def _files(dataset) -> Optional[tuple[Path, list[str]]]:
    """``(root, file paths)`` of a dataset read from image files (ours, or a timm folder reader)."""
    reader = getattr(getattr(dataset, "ds", None), "reader", None)
    for source in (dataset, reader):
        samples, root = getattr(source, "samples", None), getattr(source, "root", None)
        if samples and root is not None and os.path.isfile(samples[0][0]):
            return Path(root), [str(path) for path, _ in samples]
    return None


def file_digests(root: Path, paths: Sequence[str], threads: int = 8) -> list[str]:
    """sha256 of each file's content. Remembered in the dpl-zoo cache (one record per data root)
    under each file's stat signature: a file whose size, modification time, change time or inode
    differs is read again, an unchanged one is not."""
    from .cache import cache_dir
    from .datasets import DataError
    record = cache_dir("file-digests", hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16] + ".json")
    memo: dict = {}
    if record.is_file():
        try:
            memo = json.loads(record.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{record} is not a readable digest record ({e}); delete it (it is rebuilt)") from e
    rels = [os.path.relpath(p, root) for p in paths]
    signatures = [_signature(p) for p in paths]
    digests: list[Optional[str]] = [memo[r][1] if r in memo and memo[r][0] == s else None
                                    for r, s in zip(rels, signatures)]
    todo = [i for i, d in enumerate(digests) if d is None]
    if todo:
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            for i, digest in zip(todo, pool.map(_sha256, [paths[i] for i in todo])):
                digests[i] = digest
    # other files of the root (another dataset over it) stay remembered while they exist
    listed = set(rels)
    now = {r: v for r, v in memo.items() if r in listed or os.path.exists(os.path.join(root, r))}
    now.update({r: [s, d] for r, s, d in zip(rels, signatures, digests)})
    if now != memo:
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_suffix(f".{os.getpid()}.tmp")   # runs side by side may write it at once
        tmp.write_text(json.dumps(now))
        tmp.replace(record)
    return digests


def _signature(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
