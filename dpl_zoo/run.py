"""A run assembled from its config: data, split, model, task, optimiser and views.

recipe -> config -> **run** -> loop -> checkpoint/export. :func:`build_run` is shared by
training, the dry run and the benchmarks. With ``freeze`` and ``data.cached_views`` the run
trains the model's trainable rest on cached features of augmented views
(:mod:`dpl_zoo.view_cache`); everything after assembly (task, loop, metrics, checkpoints,
export) is the same.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn

from . import distributed as dist_utils
from .augment import RandAugmentSpec
from .config import ConfigError, TrainConfig
from .data import (
    EvalDataset, Split, ViewDataset, ViewMaker, ViewSpec, eval_transform, long_tail_keep, read_split_csv,
    split_from_indices, split_labeled, subsample,
)
from .datasets import ArrayImages, DataError, load_datasets
from .identity import data_digest
from .method import DebiasPLLoss
from .prior_estimate import PriorEstimator
from .models import build_model, model_from_checkpoint, resolve_data_config
from .optim import build_optimization
from .runtime import autocast_dtype, autocast_for, resolve_device, seed_everything
from .task import DebiasPLTask

UNLABELED_POOL_SEED = 0x9001    # data.unlabeled_max: one pool order for every split seed


@dataclass
class RunData:
    """What a run trains and evaluates on: base datasets and optional teacher predictions."""
    train: Any
    val: Any
    teacher_predictions: Any = None


def load_run_data(cfg: TrainConfig) -> RunData:
    train, val = load_datasets(cfg.data)
    preds = None
    if cfg.data.teacher_predictions:
        from .teachers import Predictions
        preds = Predictions.load(cfg.data.teacher_predictions)
    return RunData(train, val, preds)


@dataclass
class Run:
    """Everything one training run needs, built once by :func:`build_run`."""
    cfg: TrainConfig
    device: torch.device
    model: nn.Module                    # the whole timm model (what is checkpointed and exported)
    task: DebiasPLTask
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    classes: list[str]
    split: Split
    labeled: Any
    unlabeled: Any
    labeled_views: Any
    unlabeled_views: Any
    val: Any
    diag: Any
    steps_per_epoch: int
    data_config: dict
    data_fingerprint: str = ""
    out_dir: Optional[Path] = None
    skipped_images: int = 0
    teacher_predictions: Any = None     # zero-shot teacher (CLIP) predictions, indexed by dataset position
    autocast: Any = nullcontext
    eval_workers: int = 0
    history: list = field(default_factory=list)

    @property
    def student(self) -> nn.Module:
        """What a training step runs: the model, or its trainable rest on cached features."""
        from timm.utils.model import unwrap_model
        return unwrap_model(self.task.trainable_module)

    @property
    def ssl(self) -> bool:
        return self.cfg.dpl.method != "supervised"


def labeled_prior(labeled_targets: list[int], num_classes: int) -> list[float]:
    """The labeled split's class shares. Only a class without labels (a labeled_csv, a zero-shot
    teacher) gets a pseudo-count of 1/2, so its log-share stays finite. Add-one smoothing for every
    class inflated rare ones: at 100:1 imbalance with 1% labels (75) the rarest class's share became
    2.4% for a real 0.4%; raw it is 1.3%, set by the split's one-label floor."""
    counts = np.bincount(np.asarray(labeled_targets, dtype=np.int64), minlength=num_classes).astype(np.float64)
    counts[counts == 0] = 0.5
    return (counts / counts.sum()).tolist()


def prior_estimator(cfg: TrainConfig, labeled_targets: list[int], num_classes: int,
                    model: nn.Module) -> Optional[PriorEstimator]:
    """The estimator of ``dpl.target_prior: estimated`` (None otherwise). Its probe learns at the
    run's lr and weight decay; it only runs where there are pseudo-labels to debias (debiaspl)."""
    d = cfg.dpl
    if d.target_prior != "estimated" or d.method != "debiaspl":
        return None
    from .task import classifier_of
    return PriorEstimator(
        num_classes, classifier_of(model).in_features, labeled_prior(labeled_targets, num_classes),
        start=d.estimate_start, momentum=d.estimate_momentum, warmup=d.estimate_warmup,
        min_accepted=d.estimate_min_accepted, lr=cfg.lr, weight_decay=cfg.weight_decay, lambda_u=d.lambda_u)


def target_prior(cfg: TrainConfig, labeled_targets: list[int], num_classes: int) -> Optional[list[float]]:
    """``dpl.target_prior`` as C numbers (None: uniform, the paper's method)."""
    value = cfg.dpl.target_prior
    if value == "uniform":
        return None
    if value == "labeled":
        return labeled_prior(labeled_targets, num_classes)
    if value == "estimated":   # until the estimate is formed: its start prior
        return labeled_prior(labeled_targets, num_classes) if cfg.dpl.estimate_start == "labeled" else None
    if isinstance(value, str):
        text = Path(value).read_text().replace(",", " ").split()
        try:
            value = [float(v) for v in text]
        except ValueError as e:
            raise ConfigError(f"dpl.target_prior file {cfg.dpl.target_prior}: {e}") from e
    if len(value) != num_classes or any(v <= 0 for v in value):
        raise ConfigError(f"dpl.target_prior has {len(value)} numbers for {num_classes} classes (all must be > 0)")
    total = float(sum(value))
    return [float(v) / total for v in value]


def build_criterion(cfg: TrainConfig, num_classes: int, prior: Optional[list[float]] = None) -> DebiasPLLoss:
    d = cfg.dpl
    return DebiasPLLoss(
        num_classes, tau=d.tau, threshold=d.threshold, qhat_momentum=d.qhat_momentum, lambda_u=d.lambda_u,
        lambda_cld=d.lambda_cld, masked_qhat=d.masked_qhat, tau_pl=d.tau_pl, tau_margin=d.tau_margin,
        debias=d.debias, margin=d.margin, clip_threshold=d.clip_threshold, target_prior=prior,
        threshold_mode=d.threshold_mode, threshold_momentum=d.threshold_momentum)


def _split(cfg: TrainConfig, data: RunData, num_classes: int) -> Split:
    train, preds = data.train, data.teacher_predictions
    exclude = list(getattr(train, "bad_indices", []))
    if cfg.data.long_tail_ratio:
        kept = set(long_tail_keep(train.targets, num_classes, cfg.data.long_tail_ratio, cfg.data.long_tail_max,
                                  cfg.data.split_seed, exclude))
        exclude = [i for i in range(len(train)) if i not in kept]
    if cfg.data.labels_from == "teacher":
        # zero-shot: the confident teacher predictions are the labeled set, with the teacher's labels
        confident = (preds.confidence >= cfg.data.teacher_label_threshold).nonzero().flatten().tolist()
        if not confident:
            raise DataError(f"no image has teacher confidence >= {cfg.data.teacher_label_threshold}; "
                            f"lower data.teacher_label_threshold")
        split = split_from_indices(confident, len(train), exclude)
    elif cfg.data.labeled_csv:
        split = split_from_indices(read_split_csv(cfg.data.labeled_csv), len(train), exclude)
    elif cfg.data.labels_per_class is None and cfg.data.label_fraction is None:
        raise DataError("no label budget: set data.labels_per_class, data.label_fraction or data.labeled_csv")
    else:
        # with a given unlabeled pool the labels are drawn from the other images
        pool = set(_unlabeled_pool(cfg, len(train))) if cfg.data.unlabeled_csv else set()
        split = split_labeled(train.targets, num_classes, cfg.data.labels_per_class, cfg.data.label_fraction,
                              cfg.data.split_seed, sorted(set(exclude) | pool))
    if cfg.data.unlabeled_csv:
        pool = _unlabeled_pool(cfg, len(train))
        overlap = set(pool) & set(split.labeled)
        if overlap:
            raise DataError(f"data.unlabeled_csv and the labeled split share {len(overlap)} images (e.g. position "
                            f"{min(overlap)}): an image is labeled or unlabeled, not both; fix the two CSV files")
        bad = set(exclude)
        split = Split(split.labeled, sorted(i for i in set(pool) if i not in bad))
    cap = cfg.data.unlabeled_max
    if cap is not None and len(split.unlabeled) > cap:
        # the first `cap` unlabeled images of one fixed order of the dataset: runs with other split
        # seeds share (nearly) the same pool, and so the same cached views
        keep = set(split.unlabeled)
        order = np.random.default_rng(UNLABELED_POOL_SEED).permutation(len(train)).tolist()
        split = Split(split.labeled, sorted([i for i in order if i in keep][:cap]))
    return split


def _unlabeled_pool(cfg: TrainConfig, n: int) -> list[int]:
    pool = read_split_csv(cfg.data.unlabeled_csv)
    out_of_range = [i for i in pool if not 0 <= i < n]
    if out_of_range:
        raise DataError(f"data.unlabeled_csv {cfg.data.unlabeled_csv} names position {out_of_range[0]}, but the "
                        f"training data has {n} images (positions 0 to {n - 1}); is it the split of other data?")
    return pool


def view_spec(cfg: TrainConfig, data_config: dict) -> ViewSpec:
    try:
        strong = RandAugmentSpec.parse(cfg.data.strong_aa)
    except ValueError as e:
        raise ConfigError(f"data.strong_aa: {e}") from e
    return ViewSpec(size=data_config["input_size"][-1], scale=tuple(cfg.data.scale), ratio=tuple(cfg.data.ratio),
                    hflip=cfg.data.hflip, strong=strong, mean=tuple(data_config["mean"]),
                    std=tuple(data_config["std"]), interpolation=data_config.get("interpolation") or "bilinear")


@dataclass
class _Views:
    """Where a run's training and evaluation inputs come from."""
    labeled: Any
    unlabeled: Any
    labeled_views: Any
    unlabeled_views: Any
    val: Any
    diag: Any
    student: nn.Module
    eval_workers: int


def _image_views(cfg, data, split, model, data_config, device, val_indices, ssl, kinds) -> _Views:
    """Views made from images at every step (the ordinary path)."""
    spec = view_spec(cfg, data_config)
    stage = "ready" if cfg.data.augment_on == "workers" else (
        "source" if isinstance(data.train, ArrayImages) else "cropped")
    tf = eval_transform(data_config)
    labeled = ViewDataset(data.train, split.labeled, ["weak"], spec, seed=cfg.seed, stage=stage)
    unlabeled = ViewDataset(data.train, split.unlabeled, kinds, spec, seed=cfg.seed + 1, stage=stage) if ssl else None
    diag = EvalDataset(data.train, subsample(split.unlabeled, cfg.data.eval_unlabeled_max, cfg.data.split_seed),
                       tf) if ssl else None
    return _Views(labeled, unlabeled, ViewMaker(spec, ["weak"], cfg.seed, device, cfg.channels_last),
                  ViewMaker(spec, kinds, cfg.seed + 1, device, cfg.channels_last) if ssl else None,
                  EvalDataset(data.val, val_indices, tf), diag, model, cfg.workers)


def _cached_views(cfg, data, split, model, data_config, device, val_indices, ssl, kinds, quiet,
                  train_digest: str) -> _Views:
    """Views whose features through the frozen part are cached (filled here when missing)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from .cache import cache_dir
    from .freeze import split_for_cache
    from .identity import frozen_part
    from .view_cache import (
        CachedSplit, CachedViewMaker, CachedViews, FeatureEvalSet, FeatureStore, cache_key, eval_view_features,
        spec_record, train_view_features,
    )
    k = cfg.data.cached_views
    spec = view_spec(cfg, data_config)
    stage = "ready" if cfg.data.augment_on == "workers" else (
        "source" if isinstance(data.train, ArrayImages) else "cropped")
    prefix, tail = split_for_cache(model, cfg.freeze)
    tf = eval_transform(data_config)
    autocast = autocast_for(cfg, device)
    frozen = frozen_part(cfg, model, tail, data_config, autocast_dtype(cfg, device))
    model.eval()
    with torch.no_grad():
        feature_shape = tuple(prefix(torch.zeros(1, *data_config["input_size"], device=device)).shape[1:])
    diag_positions = subsample(split.unlabeled, cfg.data.eval_unlabeled_max, cfg.data.split_seed) if ssl else []
    rows = sorted(set(split.labeled) | set(split.unlabeled if ssl else []))
    train_key, train_record = cache_key(kind="train", data=train_digest, views=spec_record(spec), k=k, stage=stage,
                                        **frozen)
    val_key, val_record = cache_key(kind="eval", data=_shared_digest(data.val), **frozen)
    train_store = FeatureStore(cache_dir("views", train_key), train_record, len(data.train), 2 * k + 1, feature_shape)
    val_store = FeatureStore(cache_dir("views", val_key), val_record, len(data.val), 1, feature_shape)
    show = not quiet and dist_utils.is_main()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=not show) as progress:
        if dist_utils.is_main():   # one process fills; the others wait, then read what it wrote
            train_store.fill(rows, train_view_features(data.train, spec, k, stage, prefix, device, tf, cfg.workers,
                                                       autocast, cfg.channels_last), progress)
            val_store.fill(val_indices, eval_view_features(data.val, prefix, device, tf, cfg.workers, autocast,
                                                           cfg.channels_last), progress)
        dist_utils.barrier()
    cached = CachedViews(train_store.read(rows), rows, [data.train.targets[i] for i in rows], k)
    val_features = val_store.read(val_indices)[:, 0]
    val = FeatureEvalSet(val_features, torch.tensor([data.val.targets[i] for i in val_indices]), val_indices)
    return _Views(CachedSplit(cached, split.labeled, ["weak"]),
                  CachedSplit(cached, split.unlabeled, kinds) if ssl else None,
                  CachedViewMaker(cached, ["weak"], cfg.seed, device),
                  CachedViewMaker(cached, kinds, cfg.seed + 1, device) if ssl else None,
                  val, cached.eval_set(diag_positions) if ssl else None, tail, 0)


def _shared_digest(dataset) -> str:
    """The data's content digest (:func:`dpl_zoo.identity.data_digest`), read once, by rank 0."""
    return dist_utils.broadcast_object(data_digest(dataset) if dist_utils.is_main() else None)


def build_run(cfg: TrainConfig, out_dir: Optional[Path] = None, data: Optional[RunData] = None,
              quiet: bool = True, saved: Optional[dict] = None) -> Run:
    """Data, split, model, task, optimiser and views of a run; ``data`` defaults to the recipe's.

    ``saved``: the checkpoint a resume continues. It is checked against this run's config and
    data first (:func:`dpl_zoo.resume.check`); the model is then the checkpoint's, weights and
    preprocessing, before any view is cached or any preprocessing is built: a resume trains on
    what the run trained on, whatever its start file holds now (timm's ``--resume`` too takes
    the weights from the checkpoint). The training state (optimiser, EMA, qhat, schedule) is
    :func:`dpl_zoo.resume.restore`'s."""
    device = resolve_device(cfg)
    data = data or load_run_data(cfg)
    train_base, val_base = data.train, data.val
    classes = list(train_base.classes)
    num_classes = cfg.num_classes or len(classes)
    if num_classes != len(classes):
        raise DataError(f"num_classes is {num_classes} but the data has {len(classes)} classes; "
                        f"remove num_classes from the recipe or fix the data")
    preds = data.teacher_predictions
    if preds is not None:
        preds.check_matches(train_base, num_classes, cfg.data.teacher_predictions or "")
    split = _split(cfg, data, num_classes)
    digest = _shared_digest(train_base)
    if saved is not None:   # before anything is built from the data or the weights
        from . import resume as resume_rules
        resume_rules.check(saved, cfg, out_dir or Path("."), now=resume_rules.evidence(digest, split.labeled, preds,
                                                                                   split.unlabeled))
    seed_everything(cfg.seed)
    if saved is None:
        model = build_model(cfg, num_classes)
        if cfg.freeze is not None:
            from .freeze import freeze
            freeze(model, cfg.freeze)
        data_config = resolve_data_config(cfg, model)
    else:
        model, data_config = model_from_checkpoint(saved)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    d = cfg.dpl
    ssl = d.method != "supervised"
    n_views = 2 if d.multiviews else 1
    kinds = ["weak"] * n_views + ["strong"] * n_views
    per_step = d.mu * cfg.batch_size
    if ssl and len(split.unlabeled) < per_step:
        raise DataError(f"the unlabeled split has {len(split.unlabeled)} images, fewer than one unlabeled batch "
                        f"(mu x batch_size = {per_step}); lower batch_size or dpl.mu")
    val_bad = set(getattr(val_base, "bad_indices", []))
    val_indices = [i for i in range(len(val_base)) if i not in val_bad]
    if cfg.data.val_max:
        val_indices = subsample(val_indices, cfg.data.val_max, cfg.data.split_seed + 1)
    if cfg.data.cached_views:
        views = _cached_views(cfg, data, split, model, data_config, device, val_indices, ssl, kinds, quiet, digest)
    else:
        views = _image_views(cfg, data, split, model, data_config, device, val_indices, ssl, kinds)
    # one pass over the unlabeled set per epoch, for every method: baselines get the same optimiser steps
    steps = cfg.steps_per_epoch or max(1, len(split.unlabeled) // per_step)
    # the labels training uses: the teacher's in a zero-shot run (no human label may leak in)
    labeled_targets = (preds.labels[split.labeled].tolist() if cfg.data.labels_from == "teacher"
                       else [train_base.targets[i] for i in split.labeled])
    prior = target_prior(cfg, labeled_targets, num_classes) if ssl else None
    criterion = build_criterion(cfg, num_classes, prior).to(device)
    task = DebiasPLTask(views.student, criterion, method=d.method,
                        ema_decay=cfg.model_ema_decay if (d.ema_teacher or d.method == "supervised"
                                                          or cfg.model_ema_eval) else None,
                        ema_pseudo_labels=d.ema_teacher,
                        ema_warmup=cfg.model_ema_warmup, multiviews=d.multiviews, device=device,
                        prior_estimator=prior_estimator(cfg, labeled_targets, num_classes, views.student))
    if cfg.compile:
        # compile the student before any DDP wrapping, as timm does; the EMA teacher stays eager
        task.trainable_module = torch.compile(task.trainable_module)
        if not dist_utils.is_distributed():   # with several processes qhat's all-reduce stays eager
            task.compile_criterion()
    if dist_utils.is_distributed():
        if cfg.batch_size % dist_utils.world_size():
            raise ConfigError(f"batch_size {cfg.batch_size} is the global batch and must divide by the "
                              f"{dist_utils.world_size()} processes")
        if cfg.sync_bn:
            task.trainable_module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(task.trainable_module)
        task.prepare_distributed(device_ids=[device.index] if device.type == "cuda" else None)
    optimizer, scheduler = build_optimization(cfg, model, steps)
    scaler = None
    if cfg.amp and device.type == "cuda" and cfg.amp_dtype == "float16":
        from timm.utils import NativeScaler
        scaler = NativeScaler(device="cuda")
    skipped = len(getattr(train_base, "bad_indices", [])) + len(val_bad)
    return Run(cfg=cfg, device=device, model=model, task=task, optimizer=optimizer, scheduler=scheduler,
               scaler=scaler, classes=classes, split=split, labeled=views.labeled, unlabeled=views.unlabeled,
               labeled_views=views.labeled_views, unlabeled_views=views.unlabeled_views, val=views.val,
               diag=views.diag, steps_per_epoch=steps, data_config=data_config, data_fingerprint=digest,
               out_dir=out_dir, skipped_images=skipped,
               teacher_predictions=preds, autocast=autocast_for(cfg, device), eval_workers=views.eval_workers)
