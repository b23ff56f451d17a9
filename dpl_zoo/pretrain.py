"""Self-supervised pretraining (``dpl-zoo pretrain``): MoCo v2 with EMAN on unlabeled images.

recipe -> :class:`~dpl_zoo.config.PretrainConfig` -> :func:`build_pretrain_run` -> loop ->
checkpoint/export, with the machinery of fine-tuning: the seeded sample stream and batched
views (:mod:`dpl_zoo.moco_views`), timm's optimiser and schedule, atomic checkpoints at epoch
ends and the resume rules of :mod:`dpl_zoo.resume` (a resumed run ends equal to an
uninterrupted one), ``metrics.jsonl`` rows, the progress :class:`~dpl_zoo.progress.Reporter`.
A kNN monitor (:func:`dpl_zoo.moco.weighted_knn` on the backbone's features of a labeled
split) reports feature quality per epoch when labels are at hand.

The export is the query encoder's backbone as a timm folder (``model.safetensors`` +
``config.json`` with the preprocessing), which the fine-tuning recipes take as
``initial_checkpoint: runs/NAME/export`` (every tensor checked by :mod:`dpl_zoo.layouts`).
"""
from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from . import checkpoint as ckpt
from . import distributed as dist_utils
from . import resume as resume_rules
from .config import ConfigError, PretrainConfig, save_config
from .data import EvalDataset, ViewDataset, epoch_seed, eval_loader, eval_transform, stream_loader, subsample
from .datasets import ArrayImages, DataError
from .identity import data_digest
from .moco import MoCoEncoder, weighted_knn
from .moco_views import MoCoViews, moco_view_spec
from .progress import Reporter
from .runtime import autocast_for, deterministic_mode, resolve_device, seed_everything
from .task import MoCoTask

POOL_SEED = 0x9001    # data.unlabeled_max: one fixed subset, whatever the run's seed


# --- data -----------------------------------------------------------------------------------------

@dataclass
class PretrainData:
    """The images to pretrain on and, when labels are at hand, the kNN monitor's bank and test set."""
    train: Any
    bank: Any = None
    test: Any = None


def load_pretrain_data(cfg: PretrainConfig) -> PretrainData:
    """``data.dataset``: ``folder`` (every image below ``data.root``, labels unknown; the monitor
    needs ``knn.root``), ``mnist`` / ``fashion_mnist`` (their labels are the monitor's: bank = the
    training images, test = the test split), or a timm dataset name (its ``knn.val_split``)."""
    from .datasets import ImageFolderDataset, TimmDataset, UnlabeledFolder, _sibling_split, load_fashion_mnist, \
        load_mnist
    d, k = cfg.data, cfg.knn
    if d.dataset == "folder":
        if d.root is None:
            raise DataError("data.dataset: folder needs data.root (a folder of images, any nesting)")
        train = UnlabeledFolder(d.root, d.verify_images, d.strict)
        if not (k.enabled and k.root):
            return PretrainData(train)
        bank = ImageFolderDataset(k.root, d.verify_images, d.strict, setting="knn.root")
        val_root = k.val_root or _sibling_split(k.root)
        if val_root is None:
            raise DataError(f"no labeled test folder for the kNN monitor next to {k.root}: set knn.val_root")
        test = ImageFolderDataset(val_root, d.verify_images, d.strict, setting="knn.val_root")
        if test.classes != bank.classes:
            raise DataError(f"knn.val_root classes {test.classes[:5]}... differ from knn.root's {bank.classes[:5]}...")
        return PretrainData(train, bank, test)
    if d.dataset == "mnist":
        train, test = load_mnist(d.val_fraction, d.root)
    elif d.dataset == "fashion_mnist":
        train, test = load_fashion_mnist(d.root)
    else:
        train = TimmDataset(d.dataset, d.root, d.train_split)
        test = TimmDataset(d.dataset, d.root, k.val_split) if k.enabled else None
    return PretrainData(train, train, test) if k.enabled else PretrainData(train)


# --- the run --------------------------------------------------------------------------------------

@dataclass
class KNNMonitor:
    """The labeled images the monitor scores the backbone's features on."""
    bank: EvalDataset
    bank_labels: torch.Tensor
    test: EvalDataset
    test_labels: torch.Tensor
    num_classes: int


@dataclass
class PretrainRun:
    """Everything one pretraining run needs, built once by :func:`build_pretrain_run`. Its
    fields follow :class:`~dpl_zoo.run.Run` where the resume rules read them."""
    cfg: PretrainConfig
    device: torch.device
    model: MoCoEncoder                  # the query encoder: backbone + projection head (checkpointed)
    task: MoCoTask
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    images: ViewDataset                 # the pretraining pool, cropped by the workers or on the device
    views: MoCoViews
    pool: list
    steps_per_epoch: int
    data_config: dict
    data_fingerprint: str = ""
    knn: Optional[KNNMonitor] = None
    out_dir: Optional[Path] = None
    skipped_images: int = 0
    autocast: Any = nullcontext
    classes: list = field(default_factory=list)   # none: nothing is classified
    history: list = field(default_factory=list)

    @property
    def backbone(self) -> nn.Module:
        return self.model.backbone


def _knn_monitor(cfg: PretrainConfig, data: PretrainData, data_config: dict) -> Optional[KNNMonitor]:
    if data.bank is None or data.test is None:
        return None
    tf = eval_transform(data_config)

    def usable(ds, cap, seed):
        bad = set(getattr(ds, "bad_indices", []))
        good = [i for i in range(len(ds)) if i not in bad and ds.targets[i] >= 0]
        return subsample(good, cap, seed) if cap else good

    bank_idx = usable(data.bank, cfg.knn.bank_max, cfg.seed + 11)
    test_idx = usable(data.test, cfg.knn.val_max, cfg.seed + 12)
    if not bank_idx or not test_idx:
        raise DataError("the kNN monitor's labeled bank or test set is empty; set knn.enabled=false or fix knn.root")
    return KNNMonitor(EvalDataset(data.bank, bank_idx, tf), torch.tensor([data.bank.targets[i] for i in bank_idx]),
                      EvalDataset(data.test, test_idx, tf), torch.tensor([data.test.targets[i] for i in test_idx]),
                      len(data.bank.classes))


def build_pretrain_run(cfg: PretrainConfig, out_dir: Optional[Path] = None,
                       data: Optional[PretrainData] = None) -> PretrainRun:
    """Data, encoders, queue, optimiser and views of a pretraining run."""
    from .models import build_backbone, resolve_data_config
    from .optim import build_optimization
    import os
    device = resolve_device(cfg)
    if dist_utils.is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("dpl-zoo pretrain runs in one process (one GPU): its queue is not shared across "
                          "processes; run it without torchrun")
    data = data or load_pretrain_data(cfg)
    train = data.train
    bad = set(getattr(train, "bad_indices", []))
    pool = [i for i in range(len(train)) if i not in bad]
    if cfg.data.unlabeled_max is not None and len(pool) > cfg.data.unlabeled_max:
        pool = subsample(pool, cfg.data.unlabeled_max, POOL_SEED)
    if len(pool) < cfg.batch_size:
        raise DataError(f"{len(pool)} usable images, fewer than one batch (batch_size {cfg.batch_size}); lower "
                        f"batch_size or add images")
    seed_everything(cfg.seed)
    backbone = build_backbone(cfg)
    data_config = resolve_data_config(cfg, backbone)
    model = MoCoEncoder(backbone, cfg.moco.dim, cfg.moco.hidden).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    spec = moco_view_spec(cfg.data, data_config)
    stage = "source" if isinstance(train, ArrayImages) else "cropped"
    images = ViewDataset(train, pool, ["weak", "weak"], spec.crop_spec(), seed=cfg.seed, stage=stage)
    task = MoCoTask(model, cfg.moco.queue_size, cfg.moco.dim, cfg.moco.temperature, cfg.moco.momentum, device=device,
                    generator=torch.Generator().manual_seed(cfg.seed))
    steps = cfg.steps_per_epoch or max(1, len(pool) // cfg.batch_size)
    optimizer, scheduler = build_optimization(cfg, model, steps)
    scaler = None
    if cfg.amp and device.type == "cuda" and cfg.amp_dtype == "float16":
        from timm.utils import NativeScaler
        scaler = NativeScaler(device="cuda")
    return PretrainRun(cfg=cfg, device=device, model=model, task=task, optimizer=optimizer, scheduler=scheduler,
                       scaler=scaler, images=images, views=MoCoViews(spec, cfg.seed, device, cfg.channels_last),
                       pool=pool, steps_per_epoch=steps, data_config=data_config,
                       data_fingerprint=data_digest(train), knn=_knn_monitor(cfg, data, data_config),
                       out_dir=out_dir, skipped_images=len(bad), autocast=autocast_for(cfg, device))


# --- one step, one epoch --------------------------------------------------------------------------

def pretrain_step(run: PretrainRun, query_view: torch.Tensor, key_view: torch.Tensor) -> dict:
    """Forward (loss against the queue, keys enqueued), backward, optimiser, key encoder, schedule."""
    cfg, task = run.cfg, run.task
    with run.autocast():
        out = task(query_view, key_view)
    run.optimizer.zero_grad(set_to_none=True)
    if run.scaler is not None:
        run.scaler(out["loss"], run.optimizer, clip_grad=cfg.clip_grad, parameters=task.get_clip_parameters())
    else:
        out["loss"].backward()
        if cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(task.get_clip_parameters(), cfg.clip_grad)
        run.optimizer.step()
    task.update_ema()   # constant momentum (moco.momentum): EMAN's key encoder
    return out


def pretrain_one_epoch(run: PretrainRun, epoch: int, reporter: Reporter, metrics_log) -> dict:
    """One epoch; statistics stay on the device and are read every ``log_interval`` steps."""
    from .train import TrainingDiverged
    cfg = run.cfg
    seed_everything(cfg.seed * 1000 + epoch)
    run.task.train()
    run.views.epoch = epoch
    loader = stream_loader(run.images, cfg.batch_size, run.steps_per_epoch, epoch_seed(cfg.seed, epoch, 0), epoch,
                           cfg.workers, cfg.pin_memory)
    # rows: epoch sums, interval sums; columns: loss, instance accuracy
    sums = torch.zeros(2, 2, dtype=torch.float64, device=run.device)
    first_bad = torch.full((), -1, dtype=torch.int64, device=run.device)
    start, seen, interval = time.perf_counter(), 0, 0
    step0 = epoch * run.steps_per_epoch
    reporter.start_epoch(epoch, run.steps_per_epoch)
    for i, batch in enumerate(loader):
        step = step0 + i
        query_view, key_view = run.views(batch)
        out = pretrain_step(run, query_view, key_view)
        run.scheduler.step_update(num_updates=step + 1)
        loss = out["loss"].detach()
        sums += torch.stack([loss, out["instance_acc"].to(loss.dtype)]).double().unsqueeze(0)
        first_bad = torch.where(~torch.isfinite(loss) & (first_bad < 0), step, first_bad)
        seen += 2 * len(query_view)
        interval += 1
        last = i + 1 == run.steps_per_epoch
        if (step + 1) % cfg.log_interval and not last:
            reporter.advance()
            continue
        values = torch.cat([sums[1], first_bad.double().view(1)]).cpu().tolist()   # the loop's only host sync
        if values[2] >= 0:
            raise TrainingDiverged(f"loss is not finite at step {int(values[2])} (epoch {epoch}); pretraining stopped. "
                                   f"The last good checkpoint is kept in {run.out_dir}; lower lr, then --resume")
        row = {"loss": values[0] / interval, "instance_acc": values[1] / interval,
               "img_s": seen / max(time.perf_counter() - start, 1e-9)}
        sums[1].zero_()
        interval = 0
        reporter.advance(row)
        if (step + 1) % cfg.log_interval == 0:
            metrics_log({"kind": "train", "epoch": epoch, "step": step + 1, "loss": row["loss"],
                         "instance_acc": row["instance_acc"], "lr": run.optimizer.param_groups[0]["lr"],
                         "img_per_s": row["img_s"]})
    reporter.end_epoch()
    total = sums[0].cpu().tolist()
    return {"loss": total[0] / run.steps_per_epoch, "instance_acc": total[1] / run.steps_per_epoch,
            "img_per_s": seen / (time.perf_counter() - start)}


@torch.no_grad()
def knn_accuracy(run: PretrainRun) -> dict:
    """Weighted kNN top-1 (percent) of the backbone's features: bank = labeled images, scored on
    the test images (k = ``knn.k``, temperature ``knn.temperature``)."""
    from .evaluate import predict
    monitor, cfg = run.knn, run.cfg

    def features(ds):
        loader = eval_loader(ds, 256, cfg.workers, cfg.pin_memory)
        return predict(run.backbone, loader, run.device, run.autocast)[0]

    predicted = weighted_knn(features(monitor.bank), monitor.bank_labels, features(monitor.test),
                             monitor.num_classes, k=cfg.knn.k, temperature=cfg.knn.temperature)
    return {"knn_top1": 100 * (predicted == monitor.test_labels).double().mean().item(),
            "bank": len(monitor.bank), "images": len(monitor.test)}


# --- the whole run ----------------------------------------------------------------------------------

def pretrain(cfg: PretrainConfig, resume: Optional[str] = None, quiet: bool = False,
             reporter: Optional[Reporter] = None) -> dict:
    """Pretrain to the end; returns the summary also written to ``summary.json``. ``resume``: a
    ``last.pth.tar``, or ``"auto"`` as for :func:`dpl_zoo.train.fit`."""
    from .train import resolve_run_folder, stamped_name
    device = resolve_device(cfg)
    name = lambda: cfg.experiment or stamped_name(cfg.output, f"{cfg.model}-moco")  # noqa: E731
    out_dir, saved, finished = resolve_run_folder(cfg, resume, name)
    if finished is not None:
        return finished
    with deterministic_mode(cfg.deterministic, device):
        return _pretrain(cfg, out_dir, saved, quiet, reporter)


def _pretrain(cfg: PretrainConfig, out_dir: Path, saved: Optional[dict], quiet: bool,
              reporter: Optional[Reporter]) -> dict:
    from .train import truncate_metrics
    run = build_pretrain_run(cfg, out_dir)
    reporter = reporter or Reporter(quiet=quiet)
    start_epoch, best = 0, {"knn_top1": None, "epoch": -1}
    if saved is not None:
        resume_rules.check(saved, cfg, out_dir, now=resume_rules.evidence(run.data_fingerprint))
        resume_rules.restore(run, saved)
        start_epoch, best = saved["epoch"] + 1, saved["best"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").unlink(missing_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    metrics_path = out_dir / "metrics.jsonl"
    if metrics_path.exists():
        if saved is not None:
            truncate_metrics(metrics_path, saved["step"])
        else:
            metrics_path.unlink()

    def log(row: dict) -> None:
        with metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    monitor = (f"kNN monitor: {len(run.knn.bank)} labeled, {len(run.knn.test)} scored" if run.knn else
               "no kNN monitor (no labels given)")
    reporter.say(f"MoCo v2 + EMAN | {cfg.model} | {cfg.data.dataset}: {len(run.pool)} images"
                 f"{f' (skipped {run.skipped_images} unreadable)' if run.skipped_images else ''} | {cfg.epochs} epochs "
                 f"x {run.steps_per_epoch} steps of {cfg.batch_size} | queue {cfg.moco.queue_size} | {monitor} | "
                 f"output {out_dir}")
    t0 = time.perf_counter()
    knn = None
    for epoch in range(start_epoch, cfg.epochs):
        stats = pretrain_one_epoch(run, epoch, reporter, log)
        row = {"kind": "epoch", "epoch": epoch, "step": (epoch + 1) * run.steps_per_epoch, **stats}
        if run.knn is not None and ((epoch + 1) % cfg.knn.interval == 0 or epoch + 1 == cfg.epochs):
            knn = row["knn"] = knn_accuracy(run)
            if best["knn_top1"] is None or knn["knn_top1"] > best["knn_top1"]:
                best = {"knn_top1": knn["knn_top1"], "epoch": epoch}
            reporter.say(f"epoch {epoch + 1}: kNN top-1 {knn['knn_top1']:.2f} (k={cfg.knn.k}, {knn['bank']} labeled)")
        run.history.append({k: row[k] for k in ("epoch", "loss", "instance_acc")} |
                           ({"knn_top1": knn["knn_top1"]} if "knn" in row else {}))
        log(row)
        ckpt.atomic_save(resume_rules.state(run, epoch, best), out_dir / "last.pth.tar")
    elapsed = time.perf_counter() - t0
    if knn is None and run.knn is not None:   # resumed after the last checkpoint: nothing scored here
        knn = knn_accuracy(run)
    export_dir = export_backbone(run, out_dir / "export", knn)
    last = run.history[-1] if run.history else {}
    summary = {"method": "moco_v2_eman", "model": cfg.model, "dataset": cfg.data.dataset, "images": len(run.pool),
               "skipped_images": run.skipped_images, "epochs": cfg.epochs, "steps": cfg.epochs * run.steps_per_epoch,
               "batch_size": cfg.batch_size, "seed": cfg.seed, "loss": last.get("loss"),
               "instance_acc": last.get("instance_acc"), "knn_top1": knn["knn_top1"] if knn else None,
               "best_knn_top1": best["knn_top1"], "best_epoch": best["epoch"],
               "params": sum(p.numel() for p in run.backbone.parameters()), "seconds": elapsed,
               "resumed": saved is not None, "output": str(out_dir), "export": str(export_dir)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def export_backbone(run: PretrainRun, out_dir: Path, knn: Optional[dict] = None) -> Path:
    """The query encoder's backbone as a timm folder with the preprocessing it was trained with:
    a fine-tuning start (``initial_checkpoint: <folder>``), or ``timm.create_model("local-dir:...")``.
    ``config.json`` records how it was made under ``dpl_zoo.pretrain``."""
    ckpt.export_timm(run.backbone, out_dir, None, run.data_config)
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    cfg = run.cfg
    config["dpl_zoo"] = {"pretrain": {"method": "moco_v2_eman", "dataset": cfg.data.dataset, "images": len(run.pool),
                                      "epochs": cfg.epochs, "steps": cfg.epochs * run.steps_per_epoch,
                                      "knn_top1": knn["knn_top1"] if knn else None}}
    config_path.write_text(json.dumps(config, indent=4))
    return out_dir
