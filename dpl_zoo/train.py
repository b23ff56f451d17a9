"""The training loop: ``fit`` over a ``TrainConfig``, built from timm's parts.

recipe -> config -> data -> model -> loop -> checkpoint/export. ``fit`` builds a
:class:`Run` (everything one run needs, from :func:`build_run`, which ``dry_run`` shares),
then alternates ``train_one_epoch`` and ``evaluate``. Checkpoints are written at epoch
ends; every RNG is re-seeded from ``(seed, epoch)`` at the start of an epoch and the
augmentations are drawn from ``(seed, epoch, draw)``, so a resumed run replays exactly.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
import yaml

from . import checkpoint as ckpt
from . import distributed as dist_utils
from .augment import RandAugmentSpec
from .config import ConfigError, TrainConfig, save_config
from .data import (
    Split, ViewDataset, ViewMaker, ViewSpec, EvalDataset, epoch_seed, eval_loader, eval_transform, long_tail_keep,
    read_split_csv,
    split_from_indices, split_labeled, stream_loader, subsample, write_split_csv,
)
from .datasets import ArrayImages, DataError, load_datasets
from .evaluate import accuracy_counts, accuracy_from_counts, predict, pseudo_label_counts, pseudo_label_from_counts
from .method import DebiasPLLoss
from .metrics import StepMetrics
from .models import build_model, resolve_data_config
from .progress import Reporter
from .task import DebiasPLTask

# Keys that may change between a run and its resume without changing what is trained
# (dotted paths; a moved data folder or start checkpoint is the same data).
RESUMABLE_CHANGES = {"epochs", "output", "experiment", "workers", "pin_memory", "log_interval", "eval_interval",
                     "device", "compile", "initial_checkpoint", "data.root", "data.val_root", "data.verify_images",
                     "data.teacher_predictions", "data.labeled_csv"}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# --- building blocks --------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def resolve_device(cfg: TrainConfig) -> torch.device:
    """The configured device, else CUDA when present; under torchrun, this process's GPU."""
    kind = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(kind)
    return dist_utils.local_device(device.type) if device.index is None else device


def target_prior(cfg: TrainConfig, labeled_targets: list[int], num_classes: int) -> Optional[list[float]]:
    """``dpl.target_prior`` as C numbers (None: uniform, the paper's method)."""
    value = cfg.dpl.target_prior
    if value == "uniform":
        return None
    if value == "labeled":
        # add-one smoothing: a class without labels keeps a small, non-zero share
        counts = np.bincount(np.asarray(labeled_targets, dtype=np.int64), minlength=num_classes).astype(np.float64)
        return ((counts + 1) / (counts.sum() + num_classes)).tolist()
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
        debias=d.debias, margin=d.margin, clip_threshold=d.clip_threshold, target_prior=prior)


def build_optimization(cfg: TrainConfig, model: nn.Module, steps_per_epoch: int):
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    momentum=cfg.momentum, layer_decay=cfg.layer_decay,
                                    filter_bias_and_bn=cfg.filter_bias_and_bn)
    scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.sched, num_epochs=cfg.epochs,
                                       warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr,
                                       step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    return optimizer, scheduler


def autocast_for(cfg: TrainConfig, device: torch.device):
    if not cfg.amp:
        return nullcontext
    dtype = getattr(torch, cfg.amp_dtype) if device.type == "cuda" else torch.bfloat16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


@contextmanager
def deterministic_mode(enabled: bool, device: torch.device):
    """``deterministic: true`` for the duration of one run only: deterministic kernels (errors
    where none exists), no cuDNN autotuning; the process's previous settings come back after
    (except ``CUBLAS_WORKSPACE_CONFIG``: cuBLAS reads it once per process, so it stays set)."""
    if not enabled:
        yield
        return
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    if device.type == "cuda" and not os.environ.get("CUBLAS_WORKSPACE_CONFIG"):
        # cuBLAS is deterministic only with a fixed workspace (read when its handle is first made)
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2], saved[3]


# --- the run ------------------------------------------------------------------------------------

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
    task: DebiasPLTask
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    classes: list[str]
    split: Split
    labeled: ViewDataset
    unlabeled: Optional[ViewDataset]
    labeled_views: ViewMaker
    unlabeled_views: Optional[ViewMaker]
    val: EvalDataset
    diag: Optional[EvalDataset]
    steps_per_epoch: int
    data_config: dict
    out_dir: Optional[Path] = None
    skipped_images: int = 0
    teacher_predictions: Any = None     # zero-shot teacher (CLIP) predictions, indexed by dataset position
    autocast: Any = nullcontext
    history: list = field(default_factory=list)

    @property
    def model(self) -> nn.Module:
        from timm.utils.model import unwrap_model
        return unwrap_model(self.task.trainable_module)

    @property
    def ssl(self) -> bool:
        return self.cfg.dpl.method != "supervised"


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
        return split_from_indices(confident, len(train), exclude)
    if cfg.data.labeled_csv:
        return split_from_indices(read_split_csv(cfg.data.labeled_csv), len(train), exclude)
    if cfg.data.labels_per_class is None and cfg.data.label_fraction is None:
        raise DataError("no label budget: set data.labels_per_class, data.label_fraction or data.labeled_csv")
    return split_labeled(train.targets, num_classes, cfg.data.labels_per_class, cfg.data.label_fraction,
                         cfg.data.split_seed, exclude)


def view_spec(cfg: TrainConfig, data_config: dict) -> ViewSpec:
    try:
        strong = RandAugmentSpec.parse(cfg.data.strong_aa)
    except ValueError as e:
        raise ConfigError(f"data.strong_aa: {e}") from e
    return ViewSpec(size=data_config["input_size"][-1], scale=tuple(cfg.data.scale), ratio=tuple(cfg.data.ratio),
                    hflip=cfg.data.hflip, strong=strong, mean=tuple(data_config["mean"]),
                    std=tuple(data_config["std"]), interpolation=data_config.get("interpolation") or "bilinear")


def build_run(cfg: TrainConfig, out_dir: Optional[Path] = None, data: Optional[RunData] = None) -> Run:
    """Data, split, model, task, optimiser and views of a run; ``data`` defaults to the recipe's."""
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
    seed_everything(cfg.seed)
    model = build_model(cfg, num_classes).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    data_config = resolve_data_config(cfg, model)
    spec = view_spec(cfg, data_config)
    d = cfg.dpl
    stage = "ready" if cfg.data.augment_on == "workers" else (
        "source" if isinstance(train_base, ArrayImages) else "cropped")
    n_views = 2 if d.multiviews else 1
    kinds = ["weak"] * n_views + ["strong"] * n_views
    labeled = ViewDataset(train_base, split.labeled, ["weak"], spec, seed=cfg.seed, stage=stage)
    labeled_views = ViewMaker(spec, ["weak"], cfg.seed, device, cfg.channels_last)
    ssl = d.method != "supervised"
    unlabeled = ViewDataset(train_base, split.unlabeled, kinds, spec, seed=cfg.seed + 1, stage=stage) if ssl else None
    unlabeled_views = ViewMaker(spec, kinds, cfg.seed + 1, device, cfg.channels_last) if ssl else None
    per_step = d.mu * cfg.batch_size
    if ssl and len(split.unlabeled) < per_step:
        raise DataError(f"the unlabeled split has {len(split.unlabeled)} images, fewer than one unlabeled batch "
                        f"(mu x batch_size = {per_step}); lower batch_size or dpl.mu")
    tf = eval_transform(data_config)
    val_bad = set(getattr(val_base, "bad_indices", []))
    val_indices = [i for i in range(len(val_base)) if i not in val_bad]
    if cfg.data.val_max:
        val_indices = subsample(val_indices, cfg.data.val_max, cfg.data.split_seed + 1)
    val = EvalDataset(val_base, val_indices, tf)
    diag = EvalDataset(train_base, subsample(split.unlabeled, cfg.data.eval_unlabeled_max, cfg.data.split_seed),
                       tf) if ssl else None
    # one pass over the unlabeled set per epoch, for every method: baselines get the same optimiser steps
    steps = cfg.steps_per_epoch or max(1, len(split.unlabeled) // per_step)
    # the labels training uses: the teacher's in a zero-shot run (no human label may leak in)
    labeled_targets = (preds.labels[split.labeled].tolist() if cfg.data.labels_from == "teacher"
                       else [train_base.targets[i] for i in split.labeled])
    prior = target_prior(cfg, labeled_targets, num_classes) if ssl else None
    criterion = build_criterion(cfg, num_classes, prior).to(device)
    task = DebiasPLTask(model, criterion, method=d.method,
                        ema_decay=cfg.model_ema_decay if (d.ema_teacher or d.method == "supervised") else None,
                        multiviews=d.multiviews, device=device)
    if cfg.compile:
        # compile the student before any DDP wrapping, as timm does; the EMA teacher stays eager
        task.trainable_module = torch.compile(task.trainable_module)
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
    return Run(cfg=cfg, device=device, task=task, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
               classes=classes, split=split, labeled=labeled, unlabeled=unlabeled, labeled_views=labeled_views,
               unlabeled_views=unlabeled_views, val=val, diag=diag, steps_per_epoch=steps, data_config=data_config,
               out_dir=out_dir, skipped_images=skipped, teacher_predictions=preds,
               autocast=autocast_for(cfg, device))


# --- one step, one epoch ----------------------------------------------------------------------------

def _loaders(run: Run, epoch: int):
    """This rank's labeled and unlabeled batches for an epoch (global batch / world size each)."""
    cfg, steps = run.cfg, run.steps_per_epoch
    rank, world = dist_utils.rank(), dist_utils.world_size()
    b = cfg.batch_size // world
    for maker in (run.labeled_views, run.unlabeled_views):
        if maker is not None:
            maker.epoch = epoch
    common = dict(steps=steps, epoch=epoch, workers=cfg.workers, pin_memory=cfg.pin_memory, rank=rank, world=world)
    lab = stream_loader(run.labeled, b, seed=epoch_seed(cfg.seed, epoch, 0), **common)
    if run.unlabeled is None:
        return lab, None
    return lab, stream_loader(run.unlabeled, cfg.dpl.mu * b, seed=epoch_seed(cfg.seed, epoch, 1), **common)


@dataclass
class StepInputs:
    """What one step consumes, on the training device: labeled views and labels, unlabeled views,
    teacher predictions, and the unlabeled images' true labels (for diagnostics only)."""
    x: torch.Tensor
    y: torch.Tensor
    views: list
    clip: dict
    u_targets: Optional[torch.Tensor]

    @property
    def images(self) -> int:
        return self.x.shape[0] + sum(v.shape[0] for v in self.views)


def step_inputs(run: Run, lab, unl) -> StepInputs:
    """Views of a pair of batches on the training device (augmented there when ``augment_on: device``)."""
    device = run.device
    y = run.teacher_predictions.labels[lab.indices] if run.cfg.data.labels_from == "teacher" else lab.targets
    (x,) = run.labeled_views(lab)
    views, clip = [], {}
    if unl is not None:
        views = run.unlabeled_views(unl)
        if run.teacher_predictions is not None:
            clip = {"clip_targets": run.teacher_predictions.labels[unl.indices].to(device, non_blocking=True),
                    "clip_confidence": run.teacher_predictions.confidence[unl.indices].to(device, non_blocking=True)}
    return StepInputs(x, y.to(device, non_blocking=True), views, clip, unl.targets if unl is not None else None)


def epoch_inputs(run: Run, epoch: int):
    """The epoch's :class:`StepInputs`. On a GPU they are made one step ahead in a background
    thread (loading and kernel launches for the views overlap the step); on a CPU in the loop
    itself, since there a second thread only takes cores from the step (measured: 0.92 of the
    step-alone images/s inline against 0.88 with a thread, on 2 cores)."""
    if run.device.type == "cuda":
        yield from prefetched_inputs(run, epoch)
        return
    lab_loader, unl_loader = _loaders(run, epoch)
    unl_iter = iter(unl_loader) if unl_loader is not None else None
    for lab in lab_loader:
        yield step_inputs(run, lab, next(unl_iter) if unl_iter is not None else None)


def prefetched_inputs(run: Run, epoch: int, depth: int = 1, threads: Optional[int] = 1):
    """The epoch's :class:`StepInputs`, made ``depth`` steps ahead in a background thread. The
    order, and so the result, is the same as making them in the loop."""
    import queue
    import threading
    lab_loader, unl_loader = _loaders(run, epoch)
    box: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def hand(item) -> bool:
        """Queue ``item`` unless the consumer stopped (it may stop with the queue full)."""
        while not stop.is_set():
            try:
                box.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        if threads is not None:
            torch.set_num_threads(threads)  # this thread's own OpenMP team: leave the cores to the step
        try:
            unl_iter = iter(unl_loader) if unl_loader is not None else None
            for lab in lab_loader:
                if not hand(step_inputs(run, lab, next(unl_iter) if unl_iter is not None else None)):
                    return
            hand(done)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread, which raises it
            hand(e)

    thread = threading.Thread(target=produce, name="dpl-zoo-prefetch", daemon=True)
    thread.start()
    try:
        while (item := box.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def train_step(run: Run, inputs: StepInputs, step: int) -> dict:
    """Forward, backward, optimiser, EMA and scheduler for one step; no host sync."""
    cfg, task = run.cfg, run.task
    with run.autocast():
        out = task(inputs.x, inputs.y, inputs.views, **inputs.clip)
    loss = out["loss"]
    run.optimizer.zero_grad(set_to_none=True)
    params = task.get_clip_parameters()
    if run.scaler is not None:
        run.scaler(loss, run.optimizer, clip_grad=cfg.clip_grad, parameters=params)
    else:
        loss.backward()
        if cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        run.optimizer.step()
    task.update_ema(step=step)
    run.scheduler.step_update(num_updates=step + 1)
    return out


def _diverged(run: Run, step: int, epoch: int, loss: float) -> TrainingDiverged:
    return TrainingDiverged(
        f"loss is {loss} at step {step} (epoch {epoch}); training stopped. The last good checkpoint is kept in "
        f"{run.out_dir}; lower lr, enable clip_grad or check the data, then --resume")


def train_one_epoch(run: Run, epoch: int, reporter: Reporter, metrics_log) -> dict:
    cfg, task = run.cfg, run.task
    seed_everything(cfg.seed * 1000 + epoch)
    task.train()
    meter = StepMetrics(len(run.classes), run.device)
    start = time.perf_counter()
    step0 = epoch * run.steps_per_epoch
    seen = 0
    reporter.start_epoch(epoch, run.steps_per_epoch)
    for i, inputs in enumerate(epoch_inputs(run, epoch)):
        step = step0 + i
        out = train_step(run, inputs, step)
        meter.update(step, out["loss"], out["result"], inputs.u_targets)
        seen += inputs.images
        last = i + 1 == run.steps_per_epoch
        if (step + 1) % cfg.log_interval and not last:
            reporter.advance()
            continue
        row = meter.read()  # the only host sync of the loop
        if row["first_bad_step"] >= 0:
            raise _diverged(run, row["first_bad_step"], epoch, row["first_bad_loss"])
        img_s = seen / max(time.perf_counter() - start, 1e-9)
        reporter.advance({"loss": row["loss"], "mask": row["mask_rate"], "pl_acc": row["pl_acc"], "img_s": img_s})
        if (step + 1) % cfg.log_interval == 0:
            metrics_log({"kind": "train", "epoch": epoch, "step": step + 1,
                         **{k: row[k] for k in ("loss", "loss_x", "loss_u", "mask_rate")},
                         "lr": run.optimizer.param_groups[0]["lr"], "img_per_s": img_s})
    reporter.end_epoch()
    elapsed = time.perf_counter() - start
    # sums over ranks: losses and rates averaged over every process, counts and histograms global
    packed = dist_utils.all_reduce_sum(meter.packed_totals())
    stats = StepMetrics.unpack_totals(packed, len(run.classes), run.steps_per_epoch * dist_utils.world_size())
    stats["img_per_s"] = seen * dist_utils.world_size() / elapsed
    return stats


# --- evaluation -------------------------------------------------------------------------------------

def evaluate(run: Run) -> dict:
    """Student and teacher accuracy and the pseudo-label diagnostics; under data parallelism
    each rank scores its shard and the counts are summed, so the numbers are exact."""
    cfg, n = run.cfg, len(run.classes)
    bs = max(cfg.batch_size, 64)
    rank, world = dist_utils.rank(), dist_utils.world_size()

    def counts(model, ds, fn):
        logits, targets = predict(model, eval_loader(ds, bs, cfg.workers, cfg.pin_memory, rank, world), run.device,
                                  run.autocast)
        return dist_utils.all_reduce_sum(fn(logits, targets).to(run.device)).cpu()

    report = {"student": accuracy_from_counts(counts(run.model, run.val, lambda l, t: accuracy_counts(l, t, n)), n)}
    if run.task.has_ema():
        report["teacher"] = accuracy_from_counts(
            counts(run.task.teacher(), run.val, lambda l, t: accuracy_counts(l, t, n)), n)
    if run.diag is not None:
        prior = run.task.criterion.prior
        crit = run.task.criterion
        report["pseudo_labels"] = pseudo_label_from_counts(counts(
            run.task.teacher(), run.diag,
            lambda l, t: pseudo_label_counts(l, t, prior.log_ratio(), crit.tau_pl, crit.threshold)),
            target=prior.target.flatten().tolist())
    return report


# --- fit ----------------------------------------------------------------------------------------

def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key in ("dpl", "data"):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _check_resume_config(saved: dict, cfg: TrainConfig, path: Path) -> None:
    before, now = _flatten(saved), _flatten(cfg.to_dict())
    diffs = [key for key in sorted(set(before) | set(now)) if key not in RESUMABLE_CHANGES and
             json.dumps(before.get(key), sort_keys=True, default=str) !=
             json.dumps(now.get(key), sort_keys=True, default=str)]
    if diffs:
        raise ckpt.CheckpointError(f"{path} was written by a different recipe (differs in: {', '.join(diffs)}); "
                                   f"resume with the same recipe, or start a new run")


def _check_resume_teacher(saved: dict, run: Run) -> None:
    """``data.teacher_predictions`` may move between a run and its resume; its content may not."""
    recorded, preds = saved.get("teacher_predictions_sha256"), run.teacher_predictions
    had = bool(saved["config"].get("data", {}).get("teacher_predictions"))
    if had != (preds is not None):
        raise ckpt.CheckpointError(f"the run started {'with' if had else 'without'} data.teacher_predictions and "
                                   f"would resume {'without' if had else 'with'} them, which changes what is "
                                   f"trained; resume with the same setting, or start a new run")
    if recorded is None or preds is None:   # a run without a teacher, or a checkpoint from before the record
        return
    if preds.digest() != recorded:
        raise ckpt.CheckpointError(f"the teacher predictions {run.cfg.data.teacher_predictions} differ from those "
                                   f"the run started with (sha256 {recorded[:12]}..., now {preds.digest()[:12]}...); "
                                   f"resume with the same file, or start a new run")


def _state(run: Run, epoch: int, best: dict) -> dict:
    task = run.task
    state = {"epoch": epoch, "step": (epoch + 1) * run.steps_per_epoch, "arch": run.cfg.model,
             "config": json.loads(json.dumps(run.cfg.to_dict())), "classes": run.classes,
             "state_dict": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
             "scheduler": run.scheduler.state_dict(), "task_state": task.get_task_state(),
             "best": best, "history": run.history,
             # the preprocessing trained with: a start point's own (e.g. EfficientNet-PyTorch's) is not in the config
             "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in run.data_config.items()}}
    if task.has_ema():
        state["state_dict_ema"] = task.get_trainable_module(ema=True).module.state_dict()
    if run.teacher_predictions is not None:
        state["teacher_predictions_sha256"] = run.teacher_predictions.digest()
    if run.scaler is not None:
        state["amp_scaler"] = run.scaler.state_dict()
    return state


def _restore(run: Run, state: dict) -> None:
    """Weights, EMA teacher, optimiser, scheduler, qhat and the target prior. No RNG state: every
    epoch re-seeds its RNGs from (seed, epoch), so a checkpoint resumes on any number of GPUs."""
    run.model.load_state_dict(state["state_dict"])
    if run.task.has_ema():
        run.task.get_trainable_module(ema=True).module.load_state_dict(state["state_dict_ema"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.task.load_task_state(state["task_state"])
    if run.scaler is not None and "amp_scaler" in state:
        run.scaler.load_state_dict(state["amp_scaler"])
    run.history = list(state.get("history", []))


def run_name(cfg: TrainConfig) -> str:
    return cfg.experiment or f"{cfg.model}-{cfg.dpl.method}-{time.strftime('%Y%m%d-%H%M%S')}"


def fit(cfg: TrainConfig, resume: Optional[str] = None, quiet: bool = False, reporter: Optional[Reporter] = None) -> dict:
    """Train one run to the end; returns the summary that is also written to ``summary.json``.

    ``resume="auto"`` (torchrun restarts): continue ``output/experiment/last.pth.tar`` when it
    exists, return the summary of a finished run, else start the run.
    """
    device = resolve_device(cfg)
    dist_utils.init_from_env(device.type)
    main = dist_utils.is_main()
    saved = None
    if resume == "auto":
        if not cfg.experiment:
            raise ConfigError("--resume auto needs a fixed experiment name (--set experiment=NAME): restarts must "
                              "find the same run folder")
        folder = Path(cfg.output) / cfg.experiment
        if (folder / "summary.json").is_file():
            # a finished run answers for this recipe only
            _check_resume_config(yaml.safe_load((folder / "config.yaml").read_text()), cfg, folder)
            return json.loads((folder / "summary.json").read_text())
        resume = str(folder / "last.pth.tar") if (folder / "last.pth.tar").is_file() else None
    if resume:
        saved = ckpt.load(resume)
        _check_resume_config(saved["config"], cfg, Path(resume))
        out_dir = Path(resume).parent
    else:
        out_dir = Path(cfg.output) / dist_utils.broadcast_object(run_name(cfg))
        if (out_dir / "summary.json").exists():
            raise FileExistsError(f"{out_dir} already holds a finished run; choose another experiment name "
                                  f"or output folder")
        if (out_dir / "last.pth.tar").exists():
            raise FileExistsError(f"{out_dir} holds an unfinished run; continue it with --resume auto (or "
                                  f"--resume {out_dir / 'last.pth.tar'}), or choose another experiment name")
    with deterministic_mode(cfg.deterministic, device):
        return _fit(cfg, out_dir, saved, quiet, reporter, main)


def _fit(cfg: TrainConfig, out_dir: Path, saved: Optional[dict], quiet: bool, reporter: Optional[Reporter],
         main: bool) -> dict:
    run = build_run(cfg, out_dir)
    reporter = reporter if (reporter is not None and main) else Reporter(quiet=quiet, silent=not main)
    start_epoch, best = 0, {"top1": -1.0, "epoch": -1}
    if saved is not None:
        if (out_dir / "labeled.csv").is_file() and read_split_csv(out_dir / "labeled.csv") != run.split.labeled:
            raise ckpt.CheckpointError(f"the labeled split of {out_dir} differs from this data's: the data changed "
                                       f"since the run started; resume on the same data or start a new run")
        _check_resume_teacher(saved, run)
        _restore(run, saved)
        start_epoch, best = saved["epoch"] + 1, saved["best"]
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        write_split_csv(out_dir / "labeled.csv", run.split.labeled)
    metrics_path = out_dir / "metrics.jsonl"
    if main and metrics_path.exists():
        if saved is not None:
            _truncate_metrics(metrics_path, saved["step"])
        else:  # rows of a run that died before its first checkpoint: this start replays them
            metrics_path.unlink()

    def log(row: dict) -> None:
        if main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")

    reporter.header(cfg, run)
    t0 = time.perf_counter()
    final = None
    for epoch in range(start_epoch, cfg.epochs):
        stats = train_one_epoch(run, epoch, reporter, log)
        if run.ssl:
            dist_utils.check_same_across_ranks(run.task.criterion.prior.qhat, "qhat")
        if dist_utils.is_distributed():  # reshape, not view: channels_last weights are not contiguous
            dist_utils.check_same_across_ranks(torch.cat([p.detach().reshape(-1) for p in run.model.parameters()]),
                                               "the student's weights")
        row = {"kind": "epoch", "epoch": epoch, "step": (epoch + 1) * run.steps_per_epoch, **stats}
        final = None
        if (epoch + 1) % cfg.eval_interval == 0 or epoch + 1 == cfg.epochs:
            final = row["eval"] = evaluate(run)
            top1 = row["eval"]["student"]["top1"]
            if top1 > best["top1"]:
                best = {"top1": top1, "epoch": epoch}
                if main:
                    ckpt.atomic_save(_state(run, epoch, best), out_dir / "best.pth.tar")
            reporter.eval_line(epoch, row["eval"])
        run.history.append(_compact(row))
        log(row)
        if main:
            ckpt.atomic_save(_state(run, epoch, best), out_dir / "last.pth.tar")
    elapsed = time.perf_counter() - t0
    if final is None:  # resumed after the last epoch's checkpoint: nothing was evaluated in this process
        final = evaluate(run)
    summary = _summary(run, final, best, elapsed, resumed=saved is not None)
    if main:
        ckpt.export_timm(run.model, out_dir / "export", run.classes, run.data_config)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop the rows an interrupted run logged after its last checkpoint (they are replayed),
    and a last line the interruption left half written."""
    keep = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a partly written row: its step is replayed after the checkpoint
        if row.get("step", 0) <= last_step:
            keep.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def _compact(row: dict) -> dict:
    """What the checkpoint keeps of an epoch row (the full rows are in metrics.jsonl)."""
    out = {k: row[k] for k in ("epoch", "loss", "mask_rate") if k in row}
    if "eval" in row:
        out["top1"] = row["eval"]["student"]["top1"]
    return out


def _summary(run: Run, final: dict, best: dict, elapsed: float, resumed: bool) -> dict:
    cfg = run.cfg
    pl = final.get("pseudo_labels", {})
    prior = run.task.criterion.prior
    return {
        "method": cfg.dpl.method, "model": cfg.model, "dataset": cfg.data.dataset,
        "params": sum(p.numel() for p in run.model.parameters()),
        "labeled": len(run.split.labeled), "unlabeled": len(run.split.unlabeled), "classes": len(run.classes),
        "skipped_images": run.skipped_images,
        "epochs": cfg.epochs, "steps": cfg.epochs * run.steps_per_epoch, "seed": cfg.seed,
        "top1": final["student"]["top1"], "top5": final["student"]["top5"],
        "balanced_top1": final["student"]["balanced_top1"],
        "teacher_top1": final.get("teacher", {}).get("top1"), "best_top1": best["top1"], "best_epoch": best["epoch"],
        "pl_acc": pl.get("pl_acc"), "mask_rate": pl.get("mask_rate"), "pl_kl_uniform": pl.get("pl_kl_uniform"),
        "pl_kl_target": pl.get("pl_kl_target"), "pl_max_min_ratio": pl.get("pl_max_min_ratio"),
        "pl_hist": pl.get("pl_hist"),
        "qhat": prior.qhat.flatten().tolist() if run.ssl else None,
        "target_prior": prior.target.flatten().tolist() if run.ssl else None,
        "per_class_top1": final["student"]["per_class_top1"], "seconds": elapsed, "resumed": resumed,
        "output": str(run.out_dir) if run.out_dir else None,
    }


# --- dry run ------------------------------------------------------------------------------------------

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
    """One step of a recipe on a tiny synthetic batch at reduced size, through the same
    :func:`build_run` and :func:`train_step` as training: checks a recipe without its data,
    start checkpoint or hardware."""
    num_classes = cfg.num_classes or 10
    data_cfg = dataclasses.replace(cfg.data, dataset="synthetic", labeled_csv=None, label_fraction=None,
                                   labels_per_class=None if cfg.data.labels_from == "teacher" else 1)
    small = dataclasses.replace(cfg, pretrained=False, initial_checkpoint=None, from_scratch=True, img_size=img_size,
                                batch_size=batch_size, steps_per_epoch=1, epochs=1, warmup_epochs=0, workers=0,
                                compile=False, data=data_cfg)
    run = build_run(small, data=_synthetic_data(small, num_classes, img_size))
    lab_loader, unl_loader = _loaders(run, epoch=0)
    run.task.train()
    lab, unl = next(iter(lab_loader)), (next(iter(unl_loader)) if unl_loader is not None else None)
    out = train_step(run, step_inputs(run, lab, unl), 0)
    loss = float(out["loss"].detach())
    if not np.isfinite(loss):
        raise TrainingDiverged(f"dry run of {cfg.model}: loss is {loss}")
    params = sum(p.numel() for p in run.model.parameters())
    return {"model": cfg.model, "method": cfg.dpl.method, "params": params, "loss": loss, "img_size": img_size,
            "num_classes": num_classes, "multiviews": cfg.dpl.multiviews, "augment_on": cfg.data.augment_on}
