"""Checking a recipe without its data, start checkpoint or hardware: one step on a tiny synthetic
batch, through the same :func:`~dpl_zoo.run.build_run` and :func:`~dpl_zoo.train.train_step`
as training."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .config import TrainConfig
from .datasets import ArrayImages
from .inputs import epoch_loaders, step_inputs
from .run import RunData, build_run
from .train import TrainingDiverged, train_step


def _synthetic_data(cfg: TrainConfig, num_classes: int, img_size: int) -> RunData:
    """Random images, enough for one step of ``cfg``, and matching teacher predictions when
    the recipe uses them."""
    per_class = 2 + -(-cfg.dpl.mu * cfg.batch_size // num_classes)
    g = np.random.default_rng(0)
    classes = [f"class{c}" for c in range(num_classes)]
    targets = np.repeat(np.arange(num_classes), per_class)
    train = ArrayImages(g.integers(0, 255, (len(targets), img_size, img_size, 3), dtype=np.uint8), targets, classes)
    val = ArrayImages(g.integers(0, 255, (num_classes, img_size, img_size, 3), dtype=np.uint8),
                      np.arange(num_classes), classes)
    preds = None
    if cfg.data.teacher_predictions:
        from .teachers import Predictions, dataset_fingerprint
        k = min(5, num_classes)
        probs = torch.full((len(targets), k), 0.01)
        probs[:, 0] = torch.where(torch.arange(len(targets)) % 2 == 0, 0.97, 0.5)
        indices = torch.stack([(torch.as_tensor(targets) + j) % num_classes for j in range(k)], 1)
        preds = Predictions(indices, probs, dataset_fingerprint(train), num_classes, "synthetic")
    return RunData(train, val, preds)


def dry_run(cfg: TrainConfig, img_size: int = 32, batch_size: int = 2) -> dict:
    """One step of a recipe on a tiny synthetic batch at reduced size. Cached views are made
    per step instead (the frozen part runs, nothing is written to the cache), after the checks
    the real run makes on its frozen part."""
    num_classes = cfg.num_classes or 10
    data_cfg = dataclasses.replace(cfg.data, dataset="synthetic", labeled_csv=None, label_fraction=None,
                                   labels_per_class=None if cfg.data.labels_from == "teacher" else 1,
                                   cached_views=None, unlabeled_max=None)
    small = dataclasses.replace(cfg, pretrained=False, initial_checkpoint=None, from_scratch=True, img_size=img_size,
                                batch_size=batch_size, steps_per_epoch=1, epochs=1, warmup_epochs=0, workers=0,
                                compile=False, data=data_cfg)
    run = build_run(small, data=_synthetic_data(small, num_classes, img_size))
    if cfg.data.cached_views:   # the checks the real run makes before caching (which cut, which randomness)
        from .freeze import split_for_cache
        split_for_cache(run.model, cfg.freeze)
    lab_loader, unl_loader = epoch_loaders(run, epoch=0)
    run.task.train()
    lab, unl = next(iter(lab_loader)), (next(iter(unl_loader)) if unl_loader is not None else None)
    out = train_step(run, step_inputs(run, lab, unl), 0)
    loss = float(out["loss"].detach())
    if not np.isfinite(loss):
        raise TrainingDiverged(f"dry run of {cfg.model}: loss is {loss}")
    params = sum(p.numel() for p in run.model.parameters())
    return {"model": cfg.model, "method": cfg.dpl.method, "params": params, "loss": loss, "img_size": img_size,
            "num_classes": num_classes, "multiviews": cfg.dpl.multiviews, "augment_on": cfg.data.augment_on,
            "freeze": cfg.freeze}
