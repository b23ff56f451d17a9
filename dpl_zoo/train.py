"""The training loop: ``fit`` over a ``TrainConfig``, built from timm's parts.

recipe -> config -> data -> model -> loop -> checkpoint/export. ``fit`` builds a
:class:`Run` (everything one run needs), then alternates ``train_one_epoch`` and
``evaluate``. Checkpoints are written at epoch ends; every RNG is re-seeded from
``(seed, epoch)`` at the start of an epoch, so a resumed run replays exactly.
"""
from __future__ import annotations

import dataclasses
import json
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn

from . import checkpoint as ckpt
from . import distributed as dist_utils
from .config import ConfigError, TrainConfig, save_config
from .data import (
    DataError, Split, Transforms, ViewDataset, build_transforms, epoch_seed, eval_loader, load_datasets,
    read_split_csv, split_from_indices, split_labeled, stream_loader, subsample, write_split_csv,
)
from .evaluate import (
    accuracy_counts, accuracy_from_counts, predict, pseudo_label_counts, pseudo_label_from_counts,
)
from .models import build_model, resolve_data_config
from .method import DebiasPLLoss
from .progress import Reporter
from .task import DebiasPLTask

# Keys that may change between a run and its resume without changing what is trained.
RESUMABLE_CHANGES = {"epochs", "output", "experiment", "workers", "pin_memory", "log_interval", "eval_interval",
                     "device", "compile"}


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


def build_criterion(cfg: TrainConfig, num_classes: int) -> DebiasPLLoss:
    d = cfg.dpl
    return DebiasPLLoss(
        num_classes, tau=d.tau, threshold=d.threshold, qhat_momentum=d.qhat_momentum, lambda_u=d.lambda_u,
        lambda_cld=d.lambda_cld, masked_qhat=d.masked_qhat, tau_pl=d.tau_pl, tau_margin=d.tau_margin,
        debias=d.debias, margin=d.margin, clip_threshold=d.clip_threshold)


def build_optimization(cfg: TrainConfig, model: nn.Module, steps_per_epoch: int):
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    momentum=cfg.momentum)
    scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.sched, num_epochs=cfg.epochs,
                                       warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr,
                                       step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    return optimizer, scheduler


def autocast_for(cfg: TrainConfig, device: torch.device):
    if not cfg.amp:
        return nullcontext
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


# --- the run ------------------------------------------------------------------------------------

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
    transforms: Transforms
    labeled: ViewDataset
    unlabeled: Optional[ViewDataset]
    val: ViewDataset
    diag: Optional[ViewDataset]
    steps_per_epoch: int
    data_config: dict
    out_dir: Optional[Path] = None
    skipped_images: int = 0
    teacher: Any = None                 # teacher predictions (CLIP), indexed by dataset position
    autocast: Any = nullcontext
    history: list = field(default_factory=list)

    @property
    def model(self) -> nn.Module:
        from timm.utils.model import unwrap_model
        return unwrap_model(self.task.trainable_module)

    @property
    def ssl(self) -> bool:
        return self.cfg.dpl.method != "supervised"


def build_run(cfg: TrainConfig, out_dir: Optional[Path] = None) -> Run:
    device = resolve_device(cfg)
    train_base, val_base = load_datasets(cfg.data)
    classes = list(train_base.classes)
    num_classes = cfg.num_classes or len(classes)
    if num_classes != len(classes):
        raise DataError(f"num_classes is {num_classes} but the data has {len(classes)} classes; "
                        f"remove num_classes from the recipe or fix the data")
    exclude = getattr(train_base, "bad_indices", [])
    teacher = None
    if cfg.data.teacher_predictions:
        from .teachers import Predictions
        teacher = Predictions.load(cfg.data.teacher_predictions)
        teacher.check_matches(train_base, num_classes, cfg.data.teacher_predictions)
    if cfg.data.labels_from == "teacher":
        # zero-shot: the confident teacher predictions are the labeled set, with the teacher's labels
        confident = (teacher.confidence >= cfg.data.teacher_label_threshold).nonzero().flatten().tolist()
        if not confident:
            raise DataError(f"no image has teacher confidence >= {cfg.data.teacher_label_threshold}; "
                            f"lower data.teacher_label_threshold")
        split = split_from_indices(confident, len(train_base), exclude)
    elif cfg.data.labeled_csv:
        split = split_from_indices(read_split_csv(cfg.data.labeled_csv), len(train_base), exclude)
    else:
        if cfg.data.labels_per_class is None and cfg.data.label_fraction is None:
            raise DataError("no label budget: set data.labels_per_class, data.label_fraction or data.labeled_csv")
        split = split_labeled(train_base.targets, num_classes, cfg.data.labels_per_class, cfg.data.label_fraction,
                              cfg.data.split_seed, exclude)
    seed_everything(cfg.seed)
    model = build_model(cfg, num_classes).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    data_config = resolve_data_config(cfg, model)
    tf = build_transforms(cfg.data, data_config)
    d = cfg.dpl
    views = 2 if d.multiviews else 1
    labeled = ViewDataset(train_base, split.labeled, [tf.weak], seed=cfg.seed)
    unlabeled = ViewDataset(train_base, split.unlabeled, [tf.weak] * views + [tf.strong] * views, seed=cfg.seed + 1) \
        if d.method != "supervised" else None
    if unlabeled is not None and len(unlabeled) < d.mu * cfg.batch_size:
        raise DataError(f"the unlabeled split has {len(unlabeled)} images, fewer than one unlabeled batch "
                        f"(mu x batch_size = {d.mu * cfg.batch_size}); lower batch_size or dpl.mu")
    val = ViewDataset(val_base, [i for i in range(len(val_base)) if i not in set(getattr(val_base, "bad_indices", []))],
                      [tf.eval])
    diag = ViewDataset(train_base, subsample(split.unlabeled, cfg.data.eval_unlabeled_max, cfg.data.split_seed),
                       [tf.eval]) if unlabeled is not None else None
    per_step = d.mu * cfg.batch_size if unlabeled is not None else cfg.batch_size
    steps = cfg.steps_per_epoch or max(1, len(unlabeled if unlabeled is not None else labeled) // per_step)
    criterion = build_criterion(cfg, num_classes).to(device)
    task = DebiasPLTask(model, criterion, method=d.method,
                        ema_decay=cfg.model_ema_decay if (d.ema_teacher or d.method == "supervised") else None,
                        multiviews=d.multiviews, device=device)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False
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
    if cfg.amp and device.type == "cuda":
        from timm.utils import NativeScaler
        scaler = NativeScaler(device="cuda")
    skipped = len(exclude) + len(getattr(val_base, "bad_indices", []))
    return Run(cfg=cfg, device=device, task=task, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
               classes=classes, split=split, transforms=tf, labeled=labeled, unlabeled=unlabeled, val=val,
               diag=diag, steps_per_epoch=steps, data_config=data_config, out_dir=out_dir,
               skipped_images=skipped, teacher=teacher, autocast=autocast_for(cfg, device))


# --- one epoch ------------------------------------------------------------------------------------

def _loaders(run: Run, epoch: int):
    """This rank's labeled and unlabeled loaders for an epoch (global batch / world size each)."""
    cfg, steps = run.cfg, run.steps_per_epoch
    rank, world = dist_utils.rank(), dist_utils.world_size()
    b = cfg.batch_size // world
    common = dict(steps=steps, epoch=epoch, workers=cfg.workers, pin_memory=cfg.pin_memory, rank=rank, world=world)
    lab = stream_loader(run.labeled, b, seed=epoch_seed(cfg.seed, epoch, 0), **common)
    if run.unlabeled is None:
        return lab, None
    return lab, stream_loader(run.unlabeled, cfg.dpl.mu * b, seed=epoch_seed(cfg.seed, epoch, 1), **common)


def train_one_epoch(run: Run, epoch: int, reporter: Reporter, metrics_log) -> dict:
    cfg, task, device = run.cfg, run.task, run.device
    seed_everything(cfg.seed * 1000 + epoch)
    task.train()
    lab_loader, unl_loader = _loaders(run, epoch)
    unl_iter = iter(unl_loader) if unl_loader is not None else None
    num_classes = len(run.classes)
    totals = {"loss": 0.0, "loss_x": 0.0, "loss_u": 0.0, "mask_rate": 0.0}
    accepted = correct = seen = 0
    hist_all = torch.zeros(num_classes, dtype=torch.long)
    hist_accepted = torch.zeros(num_classes, dtype=torch.long)
    start = time.perf_counter()
    step0 = epoch * run.steps_per_epoch
    reporter.start_epoch(epoch, run.steps_per_epoch)
    from_teacher = cfg.data.labels_from == "teacher"
    for i, (x, y, x_index) in enumerate(lab_loader):
        if from_teacher:
            y = run.teacher.labels[x_index]
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        views, u_targets, clip = (), None, {}
        if unl_iter is not None:
            *views, u_targets, u_index = next(unl_iter)
            views = [v.to(device, non_blocking=True) for v in views]
            if run.teacher is not None:
                clip = {"clip_targets": run.teacher.labels[u_index].to(device),
                        "clip_confidence": run.teacher.confidence[u_index].to(device)}
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        with run.autocast():
            out = task(x, y, views, **clip)
        loss = out["loss"]
        step = step0 + i
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"loss is {loss.item()} at step {step} (epoch {epoch}); training stopped. The last good checkpoint "
                f"is kept in {run.out_dir}; lower lr, enable clip_grad or check the data, then --resume")
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

        result = out["result"]
        row = {"loss": loss.item(), "loss_x": result.loss_x.item() if result else loss.item(),
               "loss_u": result.loss_u.item() if result else 0.0, "mask_rate": result.mask_rate.item() if result else 0.0}
        for k in totals:
            totals[k] += row[k]
        if result is not None:
            mask = result.mask.bool().cpu()
            targets = result.targets.cpu()
            hist_all += torch.bincount(targets, minlength=num_classes)
            hist_accepted += result.histogram.cpu()
            accepted += int(mask.sum())
            correct += int((targets[mask] == u_targets[mask]).sum())
        seen += x.shape[0] + sum(v.shape[0] for v in views)
        elapsed = time.perf_counter() - start
        live = {"loss": row["loss"], "mask": row["mask_rate"], "pl_acc": correct / max(accepted, 1),
                "img_s": seen / max(elapsed, 1e-9)}
        reporter.advance(live)
        if (step + 1) % cfg.log_interval == 0:
            metrics_log({"kind": "train", "epoch": epoch, "step": step + 1, **row,
                         "lr": run.optimizer.param_groups[0]["lr"], "img_per_s": live["img_s"]})
    reporter.end_epoch()
    elapsed = time.perf_counter() - start
    # sums over ranks: losses and rates averaged over every process, counts and histograms global
    keys = list(totals)
    packed = torch.tensor([totals[k] for k in keys] + [accepted, correct, seen, *hist_all.tolist(),
                                                       *hist_accepted.tolist()], dtype=torch.float64)
    packed = dist_utils.all_reduce_sum(packed.to(device)).cpu()
    world = dist_utils.world_size()
    n = run.steps_per_epoch * world
    stats = {k: float(packed[i]) / n for i, k in enumerate(keys)}
    accepted, correct, seen = (int(v) for v in packed[len(keys):len(keys) + 3])
    rest = packed[len(keys) + 3:].long()
    stats.update({"train_pl_acc": correct / accepted if accepted else float("nan"),
                  "train_pl_accepted": accepted, "img_per_s": seen / elapsed,
                  "train_pl_hist": rest[:num_classes].tolist(), "train_pl_accepted_hist": rest[num_classes:].tolist()})
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
        crit = run.task.criterion
        report["pseudo_labels"] = pseudo_label_from_counts(counts(
            run.task.teacher(), run.diag,
            lambda l, t: pseudo_label_counts(l, t, crit.prior.log_prior(), crit.tau_pl, crit.threshold)))
    return report


# --- fit ----------------------------------------------------------------------------------------

def run_name(cfg: TrainConfig) -> str:
    return cfg.experiment or f"{cfg.model}-{cfg.dpl.method}-{time.strftime('%Y%m%d-%H%M%S')}"


def _check_resume_config(saved: dict, cfg: TrainConfig, path: Path) -> None:
    current = cfg.to_dict()
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if key in RESUMABLE_CHANGES:
            continue
        if json.dumps(saved.get(key), sort_keys=True, default=str) != json.dumps(current.get(key), sort_keys=True,
                                                                                default=str):
            diffs.append(key)
    if diffs:
        raise ckpt.CheckpointError(f"{path} was written by a different recipe (differs in: {', '.join(diffs)}); "
                                   f"resume with the same recipe, or start a new run")


def _state(run: Run, epoch: int, best: dict) -> dict:
    task = run.task
    state = {"epoch": epoch, "step": (epoch + 1) * run.steps_per_epoch, "arch": run.cfg.model,
             "config": json.loads(json.dumps(run.cfg.to_dict())), "classes": run.classes,
             "state_dict": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
             "scheduler": run.scheduler.state_dict(), "task_state": task.get_task_state(),
             "rng": ckpt.rng_state(), "best": best, "history": run.history}
    if task.has_ema():
        state["state_dict_ema"] = task.get_trainable_module(ema=True).module.state_dict()
    if run.scaler is not None:
        state["amp_scaler"] = run.scaler.state_dict()
    return state


def _restore(run: Run, state: dict) -> None:
    run.model.load_state_dict(state["state_dict"])
    if run.task.has_ema():
        run.task.get_trainable_module(ema=True).module.load_state_dict(state["state_dict_ema"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.task.load_task_state(state["task_state"])
    if run.scaler is not None and "amp_scaler" in state:
        run.scaler.load_state_dict(state["amp_scaler"])
    ckpt.set_rng_state(state["rng"])
    run.history = list(state.get("history", []))


def fit(cfg: TrainConfig, resume: Optional[str] = None, quiet: bool = False, reporter: Optional[Reporter] = None) -> dict:
    """Train one run to the end; returns the summary that is also written to ``summary.json``."""
    dist_utils.init_from_env(resolve_device(cfg).type)
    main = dist_utils.is_main()
    saved = None
    if resume == "auto":  # elastic restarts: continue this experiment's last checkpoint if it has one
        if not cfg.experiment:
            raise ConfigError("--resume auto needs a fixed experiment name (--set experiment=NAME)")
        last = Path(cfg.output) / cfg.experiment / "last.pth.tar"
        resume = str(last) if last.is_file() else None
    if resume:
        saved = ckpt.load(resume)
        _check_resume_config(saved["config"], cfg, Path(resume))
        out_dir = Path(resume).parent
    else:
        out_dir = Path(cfg.output) / dist_utils.broadcast_object(run_name(cfg))
        if (out_dir / "summary.json").exists():
            raise FileExistsError(f"{out_dir} already holds a finished run; choose another experiment name "
                                  f"or output folder")
    run = build_run(cfg, out_dir)
    reporter = reporter if (reporter is not None and main) else Reporter(quiet=quiet, silent=not main)
    start_epoch, best = 0, {"top1": -1.0, "epoch": -1}
    if saved is not None:
        _restore(run, saved)
        start_epoch, best = saved["epoch"] + 1, saved["best"]
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        write_split_csv(out_dir / "labeled.csv", run.split.labeled)
    metrics_path = out_dir / "metrics.jsonl"
    if main and saved is not None and metrics_path.exists():
        _truncate_metrics(metrics_path, saved["step"])

    def log(row: dict) -> None:
        if main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")

    reporter.header(cfg, run)
    t0 = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        stats = train_one_epoch(run, epoch, reporter, log)
        if run.ssl:
            dist_utils.check_same_across_ranks(run.task.criterion.prior.qhat, "qhat")
        dist_utils.check_same_across_ranks(torch.nn.utils.parameters_to_vector(run.model.parameters()),
                                           "the student's weights")
        row = {"kind": "epoch", "epoch": epoch, "step": (epoch + 1) * run.steps_per_epoch, **stats}
        if (epoch + 1) % cfg.eval_interval == 0 or epoch + 1 == cfg.epochs:
            row["eval"] = evaluate(run)
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
    final = evaluate(run)
    summary = _summary(run, final, best, elapsed, resumed=saved is not None)
    if main:
        ckpt.export_timm(run.model, out_dir / "export", run.classes, run.data_config)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop the rows an interrupted run logged after its last checkpoint: they are replayed."""
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
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
    return {
        "method": cfg.dpl.method, "model": cfg.model, "dataset": cfg.data.dataset,
        "labeled": len(run.split.labeled), "unlabeled": len(run.split.unlabeled), "classes": len(run.classes),
        "skipped_images": run.skipped_images,
        "epochs": cfg.epochs, "steps": cfg.epochs * run.steps_per_epoch, "seed": cfg.seed,
        "top1": final["student"]["top1"], "top5": final["student"]["top5"],
        "teacher_top1": final.get("teacher", {}).get("top1"), "best_top1": best["top1"], "best_epoch": best["epoch"],
        "pl_acc": pl.get("pl_acc"), "mask_rate": pl.get("mask_rate"), "pl_kl_uniform": pl.get("pl_kl_uniform"),
        "pl_max_min_ratio": pl.get("pl_max_min_ratio"), "pl_hist": pl.get("pl_hist"),
        "qhat": run.task.criterion.prior.qhat.flatten().tolist() if run.ssl else None,
        "per_class_top1": final["student"]["per_class_top1"], "seconds": elapsed, "resumed": resumed,
        "output": str(run.out_dir) if run.out_dir else None,
    }


# --- dry run ------------------------------------------------------------------------------------------

def dry_run(cfg: TrainConfig, img_size: int = 32, batch_size: int = 2) -> dict:
    """Build the model, method, optimiser and scheduler of a recipe and run one step on
    a tiny synthetic batch at reduced size: checks a recipe without its data or hardware."""
    device = resolve_device(cfg)
    num_classes = cfg.num_classes or 10
    small = dataclasses.replace(cfg, pretrained=False, initial_checkpoint=None, img_size=img_size)
    seed_everything(cfg.seed)
    model = build_model(small, num_classes).to(device)
    criterion = build_criterion(cfg, num_classes).to(device)
    d = cfg.dpl
    task = DebiasPLTask(model, criterion, method=d.method, ema_decay=cfg.model_ema_decay if d.ema_teacher else None,
                        multiviews=d.multiviews, device=device)
    optimizer, scheduler = build_optimization(cfg, model, steps_per_epoch=1)
    views = 2 if d.multiviews else 1
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    unlabeled = [torch.randn(d.mu * batch_size, 3, img_size, img_size, device=device) for _ in range(2 * views)] \
        if d.method != "supervised" else []
    clip = {}
    if cfg.data.teacher_predictions and unlabeled:
        clip = {"clip_targets": torch.randint(0, num_classes, (d.mu * batch_size,), device=device),
                "clip_confidence": torch.rand(d.mu * batch_size, device=device)}
    task.train()
    with autocast_for(cfg, device)():
        out = task(x, y, unlabeled, **clip)
    out["loss"].backward()
    optimizer.step()
    task.update_ema(step=0)
    scheduler.step_update(num_updates=1)
    if not torch.isfinite(out["loss"]):
        raise TrainingDiverged(f"dry run of {cfg.model}: loss is {out['loss'].item()}")
    params = sum(p.numel() for p in model.parameters())
    return {"model": cfg.model, "method": d.method, "params": params, "loss": out["loss"].item(),
            "img_size": img_size, "num_classes": num_classes, "multiviews": d.multiviews}


if __name__ == "__main__":  # torchrun --nproc_per_node=N -m dpl_zoo.train RECIPE ...
    import sys
    from .cli import main as _cli_main
    sys.exit(_cli_main(["train", *sys.argv[1:]]))
