"""The training loop: ``fit`` over a ``TrainConfig``, built from timm's parts.

recipe -> config -> run (:mod:`dpl_zoo.run`) -> **loop** -> checkpoint/export. ``fit``
builds a :class:`~dpl_zoo.run.Run`, then alternates :func:`train_one_epoch` and
:func:`evaluate`. Checkpoints are written at epoch ends (what they hold and what a resume
compares: :mod:`dpl_zoo.resume`); every RNG is re-seeded from ``(seed, epoch)`` at the start of
an epoch and the augmentations are drawn from ``(seed, epoch, draw)``, so a resumed run
replays exactly.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch
import yaml

from . import checkpoint as ckpt
from . import distributed as dist_utils
from . import resume as resume_rules
from .config import ConfigError, TrainConfig, save_config
from .data import eval_loader, write_split_csv
from .evaluate import accuracy_counts, accuracy_from_counts, predict, pseudo_label_counts, pseudo_label_from_counts
from .inputs import StepInputs, epoch_inputs
from .metrics import StepMetrics
from .progress import Reporter
from .run import Run, build_run
from .runtime import deterministic_mode, resolve_device, seed_everything


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# --- one step, one epoch ----------------------------------------------------------------------------

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


def estimate_fields(run: Run) -> dict:
    """The prior estimate's state for logs and the summary (``dpl.target_prior: estimated``); empty
    otherwise."""
    est = run.task.prior_estimator
    if est is None:
        return {}
    return {"prior_estimate": [round(v, 6) for v in est.prior.flatten().tolist()],
            "estimate_in_use": bool(est.ready()), "estimate_accepted": int(est.accepted),
            "estimate_steps": int(est.steps)}


def threshold_fields(run: Run) -> dict:
    """The self-adaptive thresholds as they stand (``dpl.threshold_mode: self_adaptive``), per
    class, for logs and the summary; empty with a fixed threshold."""
    adaptive = run.task.criterion.adaptive
    if adaptive is None:
        return {}
    return {"thresholds": [round(v, 6) for v in adaptive.thresholds().flatten().tolist()]}


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
                         "lr": run.optimizer.param_groups[0]["lr"], "img_per_s": img_s, **estimate_fields(run),
                         **threshold_fields(run)})
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
        logits, targets = predict(model, eval_loader(ds, bs, run.eval_workers, cfg.pin_memory, rank, world),
                                  run.device, run.autocast)
        return dist_utils.all_reduce_sum(fn(logits, targets).to(run.device)).cpu()

    report = {"student": accuracy_from_counts(counts(run.student, run.val, lambda l, t: accuracy_counts(l, t, n)), n)}
    if run.task.has_ema():
        report["teacher"] = accuracy_from_counts(
            counts(run.task.averaged(), run.val, lambda l, t: accuracy_counts(l, t, n)), n)
    if run.diag is not None:
        prior = run.task.criterion.prior
        crit = run.task.criterion
        report["pseudo_labels"] = pseudo_label_from_counts(counts(
            run.task.teacher(), run.diag,
            lambda l, t: pseudo_label_counts(l, t, prior.log_ratio(), crit.tau_pl, crit.current_threshold())),
            target=prior.target.flatten().tolist())
    return report


# --- fit ----------------------------------------------------------------------------------------

def stamped_name(output, prefix: str) -> str:
    """``PREFIX-YYYYmmdd-HHMMSS``, with ``-2``, ``-3``... when a run of the same second already
    took that name under ``output`` (two unnamed runs started within a second must not collide).
    Rank 0 chooses; every rank gets the same name."""
    name = None
    if dist_utils.is_main():
        base = f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
        name, n = base, 2
        while any(Path(output).glob(f"{name}*")):
            name, n = f"{base}-{n}", n + 1
    return dist_utils.broadcast_object(name)


def run_name(cfg: TrainConfig) -> str:
    return cfg.experiment or stamped_name(cfg.output, f"{cfg.model}-{cfg.dpl.method}")


def resolve_run_folder(cfg, resume: Optional[str], name) -> tuple[Path, Optional[dict], Optional[dict]]:
    """Where a run writes and what it continues from: ``(folder, checkpoint or None, summary of the
    finished run or None)``, by the resume rules (:mod:`dpl_zoo.resume`). ``name()`` names a new run.

    ``resume="auto"``: continue ``output/experiment/last.pth.tar`` when it exists, answer with the
    summary of a run finished with this recipe, continue a finished run whose ``epochs`` grew, else
    start the run. A new run never writes into a folder that holds one.
    """
    if resume == "auto":
        if not cfg.experiment:
            raise ConfigError("--resume auto needs a fixed experiment name (--set experiment=NAME): restarts must "
                              "find the same run folder")
        folder = Path(cfg.output) / cfg.experiment
        if (folder / "summary.json").is_file():
            finished = yaml.safe_load((folder / "config.yaml").read_text())
            resume_rules.check({"config": finished}, cfg, folder, finished=True)
            if finished.get("epochs") == cfg.epochs:    # a finished run answers for this recipe only
                return folder, None, json.loads((folder / "summary.json").read_text())
        resume = str(folder / "last.pth.tar") if (folder / "last.pth.tar").is_file() else None
    if resume:
        saved = ckpt.load(resume)
        resume_rules.check(saved, cfg, Path(resume))
        return Path(resume).parent, saved, None
    out_dir = Path(cfg.output) / dist_utils.broadcast_object(name())
    if (out_dir / "summary.json").exists():
        raise FileExistsError(f"{out_dir} already holds a finished run; choose another experiment name "
                              f"or output folder")
    if (out_dir / "last.pth.tar").exists():
        raise FileExistsError(f"{out_dir} holds an unfinished run; continue it with --resume auto (or "
                              f"--resume {out_dir / 'last.pth.tar'}), or choose another experiment name")
    return out_dir, None, None


def fit(cfg: TrainConfig, resume: Optional[str] = None, quiet: bool = False, reporter: Optional[Reporter] = None) -> dict:
    """Train one run to the end; returns the summary that is also written to ``summary.json``.

    ``resume="auto"`` (torchrun restarts): continue ``output/experiment/last.pth.tar`` when it
    exists, return the summary of a run finished with this recipe, continue a finished run
    whose ``epochs`` grew, else start the run. What a resume may change: :mod:`dpl_zoo.resume`.
    """
    device = resolve_device(cfg)
    dist_utils.init_from_env(device.type)
    main = dist_utils.is_main()
    out_dir, saved, finished = resolve_run_folder(cfg, resume, lambda: run_name(cfg))
    if finished is not None:
        return finished
    with deterministic_mode(cfg.deterministic, device):
        return _fit(cfg, out_dir, saved, quiet, reporter, main)


def _fit(cfg: TrainConfig, out_dir: Path, saved: Optional[dict], quiet: bool, reporter: Optional[Reporter],
         main: bool) -> dict:
    run = build_run(cfg, out_dir, quiet=quiet, saved=saved)   # checks a resume, and takes its model
    reporter = reporter if (reporter is not None and main) else Reporter(quiet=quiet, silent=not main)
    start_epoch, best = 0, {"top1": -1.0, "epoch": -1}
    if saved is not None:
        resume_rules.restore(run, saved)
        start_epoch, best = saved["epoch"] + 1, saved["best"]
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        # a finished run continued for more epochs is unfinished again until it ends
        (out_dir / "summary.json").unlink(missing_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        write_split_csv(out_dir / "labeled.csv", run.split.labeled)
    metrics_path = out_dir / "metrics.jsonl"
    if main and metrics_path.exists():
        if saved is not None:
            truncate_metrics(metrics_path, saved["step"])
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
            dist_utils.check_same_across_ranks(run.task.criterion.prior.target, "the target prior")
            if run.task.criterion.adaptive is not None:
                dist_utils.check_same_across_ranks(run.task.criterion.adaptive.thresholds(), "the thresholds")
        estimate = estimate_fields(run)
        if estimate:
            est = run.task.prior_estimator
            reporter.say(f"prior estimate: {'in use' if estimate['estimate_in_use'] else 'not formed yet, debiasing towards the start prior (' + est.start + ')'}"
                         f" | {estimate['estimate_accepted']} pseudo-labels accepted (needs {est.min_accepted}), "
                         f"{estimate['estimate_steps']} steps (needs {est.warmup}) | "
                         + " ".join(f"{v:.3f}" for v in estimate["prior_estimate"]))
        if dist_utils.is_distributed():  # reshape, not view: channels_last weights are not contiguous
            dist_utils.check_same_across_ranks(torch.cat([p.detach().reshape(-1) for p in run.model.parameters()]),
                                               "the student's weights")
        row = {"kind": "epoch", "epoch": epoch, "step": (epoch + 1) * run.steps_per_epoch, **stats, **estimate}
        final = None
        if (epoch + 1) % cfg.eval_interval == 0 or epoch + 1 == cfg.epochs:
            final = row["eval"] = evaluate(run)
            top1 = row["eval"]["student"]["top1"]
            if top1 > best["top1"]:
                best = {"top1": top1, "epoch": epoch}
                if main:
                    ckpt.atomic_save(resume_rules.state(run, epoch, best), out_dir / "best.pth.tar")
            reporter.eval_line(epoch, row["eval"])
        run.history.append(_compact(row))
        log(row)
        if main:
            ckpt.atomic_save(resume_rules.state(run, epoch, best), out_dir / "last.pth.tar")
    elapsed = time.perf_counter() - t0
    if final is None:  # resumed after the last epoch's checkpoint: nothing was evaluated in this process
        final = evaluate(run)
    summary = _summary(run, final, best, elapsed, resumed=saved is not None)
    if main:
        export(run, out_dir / "export")
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def export(run: Run, out_dir: Path) -> Path:
    """The whole trained model as a timm folder (frozen layers as ordinary ones)."""
    from .freeze import exportable
    return ckpt.export_timm(exportable(run.model), out_dir, run.classes, run.data_config,
                            head_hidden_size=run.cfg.head_hidden_size, training=training_record(run))


def training_record(run: Run) -> dict:
    """How the model was trained, for the export's config and the model card: the method and the
    target its pseudo-labels were debiased towards (with the estimate, when it was estimated)."""
    record = {"method": run.cfg.dpl.method}
    if run.ssl:
        mode = run.cfg.dpl.target_prior
        record["target_prior"] = mode if mode in ("uniform", "labeled", "estimated") else "given"
        record["target_prior_values"] = [round(v, 6) for v in run.task.criterion.prior.target.flatten().tolist()]
        record.update(estimate_fields(run))
        record["threshold_mode"] = run.cfg.dpl.threshold_mode
        record.update(threshold_fields(run))
    return record


def truncate_metrics(path: Path, last_step: int) -> None:
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
        "trainable_params": sum(p.numel() for p in run.student.parameters() if p.requires_grad),
        "freeze": cfg.freeze, "cached_views": cfg.data.cached_views,
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
        "target_prior_mode": (cfg.dpl.target_prior if isinstance(cfg.dpl.target_prior, str) and
                              cfg.dpl.target_prior in ("uniform", "labeled", "estimated") else "given")
        if run.ssl else None,
        **estimate_fields(run),
        "threshold_mode": cfg.dpl.threshold_mode if run.ssl else None, **threshold_fields(run),
        "per_class_top1": final["student"]["per_class_top1"], "seconds": elapsed, "resumed": resumed,
        "output": str(run.out_dir) if run.out_dir else None,
    }


