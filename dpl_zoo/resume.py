"""What a checkpoint holds, and what a resume compares: the one owner of the resume rules.

A run resumes only onto what it trained on. :data:`MAY_CHANGE` lists the config keys that may
differ between a run and its resume, and why; every other key must be equal. Beyond the
config, each checkpoint records the *content* the run trained on (:func:`evidence`): the
training data's content digest (:func:`dpl_zoo.identity.data_digest`, the digest the view
cache is keyed by), the labeled split, the teacher predictions' sha256. Paths may move
(``data.root``, ``data.labeled_csv``, ``data.teacher_predictions``), their content may not.
:func:`check` applies both; the run's assembly calls it before anything is built or written.
The start point is no input of a resume: the model, weights and preprocessing, is the
checkpoint's (:func:`dpl_zoo.models.model_from_checkpoint`), so ``initial_checkpoint`` may
move, change or go.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

from .checkpoint import CheckpointError
from .config import flatten

# config keys (dotted) that may change on resume, and why that is safe
MAY_CHANGE = {
    "epochs": "a longer (or shorter, not yet reached) schedule: it is rebuilt for the new length and "
              "continues from the checkpoint's step",
    "output": "where the run is written", "experiment": "the run's name",
    "workers": "loader processes", "pin_memory": "host memory pinning",
    "log_interval": "how often metrics are logged", "eval_interval": "how often the model is evaluated",
    "device": "where the run trains", "compile": "torch.compile, same computation",
    "initial_checkpoint": "the start point: moved, rewritten or gone (the weights and their preprocessing "
                          "come from the checkpoint)",
    "data.root": "a moved data folder (its content is compared)",
    "data.val_root": "a moved evaluation folder",
    "data.verify_images": "the start-up scan",
    "data.teacher_predictions": "a moved predictions file (its sha256 is compared)",
    "data.labeled_csv": "a moved split file (the split is compared)",
    "data.unlabeled_csv": "a moved split file (the unlabeled positions are compared)",
    # pretraining (dpl-zoo pretrain): the kNN monitor reads the model, it never changes it
    "knn.enabled": "the kNN monitor only reads the model", "knn.root": "a moved labeled folder (monitor only)",
    "knn.val_root": "a moved labeled folder (monitor only)", "knn.val_split": "the monitor's split",
    "knn.k": "the monitor's k", "knn.temperature": "the monitor's temperature",
    "knn.bank_max": "the monitor's bank size", "knn.val_max": "the monitor's test size",
    "knn.interval": "how often the monitor runs",
}

# what each checkpoint records of the content it trained on
EVIDENCE = {
    "data": "the training data's content digest (dpl_zoo.identity.data_digest)",
    "labeled": "sha256 of the labeled positions",
    "teacher_predictions": "sha256 of the teacher predictions (None without a teacher)",
    "unlabeled": "sha256 of the unlabeled positions (not recorded by checkpoints before data.unlabeled_csv)",
}


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def labeled_digest(labeled) -> str:
    return hashlib.sha256(",".join(str(int(i)) for i in sorted(labeled)).encode()).hexdigest()


# how "data" is digested: 1 (no record) a folder by file names and sizes, 2 by file content
DATA_DIGEST_VERSION = 2


def evidence(data: str, labeled=(), teacher_predictions=None, unlabeled=()) -> dict:
    """What a run trains on, for its checkpoints (see :data:`EVIDENCE`): its data's content
    digest, labeled positions and teacher predictions; a pretraining run has no labeled split
    (an empty one) and no teacher."""
    return {"data": data, "labeled": labeled_digest(labeled),
            "teacher_predictions": teacher_predictions.digest() if teacher_predictions is not None else None,
            "unlabeled": labeled_digest(unlabeled), "data_digest_version": DATA_DIGEST_VERSION}


def check(saved: dict, cfg, where: Path, now: Optional[dict] = None, finished: bool = False) -> None:
    """Refuse a resume of ``saved`` (a checkpoint, or ``{"config": ...}`` of a finished run) with
    ``cfg`` that would train something else. ``now``: this run's :func:`evidence`, compared when
    given. ``finished``: ``saved`` is a finished run, so a shorter ``epochs`` is no resume either."""
    after = flatten(cfg.to_dict())
    # a key the checkpoint's dpl-zoo did not have yet: that run trained as its default does now
    before = {**flatten(type(cfg)().to_dict()), **flatten(saved["config"])}
    diffs = [k for k in sorted(set(before) | set(after)) if k not in MAY_CHANGE and not _same(before.get(k),
                                                                                               after.get(k))]
    if diffs:
        raise CheckpointError(f"{where} was written by a different recipe (differs in: {', '.join(diffs)}); "
                              f"resume with the same recipe, or start a new run")
    trained = saved["epoch"] + 1 if "epoch" in saved else before.get("epochs", 0)
    if cfg.epochs < trained:
        raise CheckpointError(f"{where} has trained {trained} epochs; epochs={cfg.epochs} would end before that. "
                              f"Resume with epochs >= {trained}, or start a new run")
    if now is None:
        return
    recorded = saved.get("evidence")
    if recorded is None:
        raise CheckpointError(f"{where} records nothing of the data it trained on (written by an older dpl-zoo); "
                              f"it cannot be checked, so it cannot be resumed: start a new run")
    problems = {
        "data": "the training data differ from those the run started with (images added, removed, renamed or "
                "rewritten in data.root?)",
        "labeled": "the labeled split differs from the run's (another data.labeled_csv, split seed or data)",
        "unlabeled": "the unlabeled images differ from the run's (another data.unlabeled_csv or unlabeled_max)",
        "teacher_predictions": "the teacher predictions differ from those the run started with"
                               if recorded.get("teacher_predictions") and now.get("teacher_predictions") else
                               f"the run started {'with' if recorded.get('teacher_predictions') else 'without'} "
                               f"data.teacher_predictions and would resume "
                               f"{'without' if recorded.get('teacher_predictions') else 'with'} them",
    }
    if recorded.get("data") != now.get("data") and recorded.get("data_digest_version", 1) < DATA_DIGEST_VERSION:
        raise CheckpointError(f"cannot resume {where}: it was written by an older dpl-zoo, which recorded a data "
                              f"folder by its file names and sizes; this one compares the files' content and cannot "
                              f"check it against that record. Start a new run, or finish this one with the dpl-zoo "
                              f"version that started it")
    for key in EVIDENCE:
        if key == "unlabeled" and key not in recorded:   # older checkpoints: their pool followed from the rest
            continue
        if recorded.get(key) != now.get(key):
            raise CheckpointError(f"cannot resume {where}: {problems[key]}; resume on the same content, or start "
                                  f"a new run")


def state(run, epoch: int, best: dict) -> dict:
    """A checkpoint of ``run`` after ``epoch``: the whole model, EMA teacher, optimiser, the task's
    state (qhat and target prior; MoCo's queue), what the run trained on, its config and the
    preprocessing."""
    task = run.task
    out = {"epoch": epoch, "step": (epoch + 1) * run.steps_per_epoch, "arch": run.cfg.model,
           "config": json.loads(json.dumps(run.cfg.to_dict())), "classes": run.classes,
           "state_dict": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
           "task_state": task.get_task_state(), "best": best, "history": run.history,
           "evidence": evidence(run.data_fingerprint, run.split.labeled if getattr(run, "split", None) else (),
                                getattr(run, "teacher_predictions", None),
                                run.split.unlabeled if getattr(run, "split", None) else ()),
           # the preprocessing trained with: a start point's own (e.g. EfficientNet-PyTorch's) is not in the config
           "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in run.data_config.items()}}
    if task.has_ema():
        out["state_dict_ema"] = task.get_trainable_module(ema=True).module.state_dict()
    if run.scaler is not None:
        out["amp_scaler"] = run.scaler.state_dict()
    return out


def restore(run, saved: dict) -> int:
    """Load a checkpoint into ``run``; returns the step it continues from. No RNG state: every
    epoch re-seeds its RNGs from (seed, epoch), so a checkpoint resumes on any number of GPUs.
    The lr schedule is the run's own (its current ``epochs``), set to the checkpoint's step."""
    run.model.load_state_dict(saved["state_dict"])
    if run.task.has_ema():
        run.task.get_trainable_module(ema=True).module.load_state_dict(saved["state_dict_ema"])
    run.optimizer.load_state_dict(saved["optimizer"])
    run.task.load_task_state(saved["task_state"])
    if run.scaler is not None and "amp_scaler" in saved:
        run.scaler.load_state_dict(saved["amp_scaler"])
    run.history = list(saved.get("history", []))
    step = (saved["epoch"] + 1) * run.steps_per_epoch
    run.scheduler.step_update(num_updates=step)
    return step
