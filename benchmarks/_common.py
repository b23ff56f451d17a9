"""What every benchmark shares: machine facts, timing, and running many training runs.

Training runs go through :func:`run_jobs`: ``parallel`` single-thread processes side by side
(on a small CPU machine two single-thread processes do more work than one two-thread
process), each run in its own folder; a run whose ``summary.json`` exists is read back
instead of trained again, so an interrupted benchmark continues where it stopped.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Optional


def machine_facts() -> dict:
    import huggingface_hub
    import timm
    import torch
    facts = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
             "processor": platform.processor() or platform.machine(), "torch": torch.__version__,
             "torch_threads": torch.get_num_threads(), "timm": timm.__version__,
             "huggingface_hub": huggingface_hub.__version__, "cuda": torch.cuda.is_available(),
             "load_average": os.getloadavg()}
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
    return facts


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 2, sync: Callable[[], None] = lambda: None) -> dict:
    """Median wall time of ``fn`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats}


def write_report(out: Path, name: str, benchmark: str, settings: dict, t0: float, console=None, **fields) -> Path:
    """``out/name``: the benchmark's numbers with the date, the machine, its settings and its time."""
    report = {"benchmark": benchmark, "date": time.strftime("%Y-%m-%d"), "machine": machine_facts(),
              "settings": settings, **fields, "seconds": time.perf_counter() - t0}
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(portable(json.dumps(report, indent=2, default=str), out))
    if console is not None:
        console.print(f"wrote {path} ({report['seconds'] / 60:.1f} min)")
    return path


def portable(text: str, out: Path) -> str:
    """``text`` without this machine's paths: the checkout's prefix dropped (paths become relative
    to the repository), the Python installation's shown as ``<python prefix>``, home as ``~``."""
    out = Path(out).resolve()
    repo = out.parents[1] if out.parts[-2:] == ("benchmarks", "results") else Path(__file__).resolve().parents[1]
    for prefix, alias in ((str(repo) + os.sep, ""), (sys.prefix + os.sep, "<python prefix>/"),
                          (os.path.expanduser("~") + os.sep, "~/")):
        text = text.replace(prefix, alias)
    return text


def mean_sd(values) -> tuple[float, float]:
    values = [v for v in values if v is not None and v == v]
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _init_worker(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)


def _run_job(job: dict) -> dict:
    """One run in this process (``kind``: ``train``, the default, or ``pretrain``); the summary plus
    its evaluated curve (test top-1, or the kNN monitor of a pretraining run)."""
    import resource
    from dpl_zoo.config import load_config, load_pretrain_config
    from dpl_zoo.pretrain import pretrain
    from dpl_zoo.train import fit
    folder = Path(job["output"]) / job["name"]
    kind = job.get("kind", "train")
    if (folder / "summary.json").is_file():
        summary = json.loads((folder / "summary.json").read_text())
        summary["reused"] = True
    else:
        overrides = [*job["overrides"], f"output={job['output']}", f"experiment={job['name']}"]
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        if kind == "pretrain":
            summary = pretrain(load_pretrain_config(job["recipe"], overrides), resume="auto", quiet=True)
        else:
            summary = fit(load_config(job["recipe"], overrides), resume="auto", quiet=True)  # a cut-off run continues
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        summary["cpu_seconds"] = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if kind == "pretrain":
        summary["curve"] = [{"step": r["step"], "loss": r["loss"], "knn_top1": r.get("knn", {}).get("knn_top1")}
                            for r in rows if r["kind"] == "epoch"]
    else:
        summary["curve"] = [{"step": r["step"], "top1": r["eval"]["student"]["top1"],
                             **{k: r["eval"].get("pseudo_labels", {}).get(k)
                                for k in ("pl_acc", "mask_rate", "pl_kl_uniform", "pl_kl_target")}}
                            for r in rows if r["kind"] == "epoch" and "eval" in r]
    summary["job"] = {k: v for k, v in job.items() if k != "output"}
    return summary


def run_jobs(jobs: list[dict], parallel: int = 2, threads: int = 1, console=None,
             on_done: Optional[Callable[[dict], None]] = None, deadline: Optional[float] = None) -> list[dict]:
    """Run ``jobs`` (``name``, ``recipe``, ``overrides``, ``output``; optional ``kind``: ``pretrain``,
    and ``after``: names of jobs that must finish first, e.g. the pretraining a fine-tuning run
    starts from) ``parallel`` at a time, each free slot taking the first job whose ``after`` are
    done; results in job order. Runs that finished before (their ``summary.json`` exists) are
    read, not rerun. A failed run stops the benchmark with its error. After ``deadline`` (a
    ``time.time()``) no new run starts and the finished ones are returned."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    results: dict[int, dict] = {}
    ctx = get_context("spawn")
    with Progress(TextColumn("runs"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as progress, \
            ProcessPoolExecutor(parallel, mp_context=ctx, initializer=_init_worker, initargs=(threads,)) as pool:
        task = progress.add_task("runs", total=len(jobs))
        pending = []
        for i, job in enumerate(jobs):
            if (Path(job["output"]) / job["name"] / "summary.json").is_file():  # finished: read, not rerun
                results[i] = result = _run_job(job)
                progress.advance(task)
                if on_done:
                    on_done(result)
            else:
                pending.append((i, job))
        running: dict = {}
        finished = {jobs[i]["name"] for i in results}
        while pending or running:
            while len(running) < parallel and (deadline is None or time.time() < deadline):
                ready = next((n for n, (_, job) in enumerate(pending) if set(job.get("after", ())) <= finished), None)
                if ready is None:
                    break
                i, job = pending.pop(ready)
                running[pool.submit(_run_job, job)] = i
            if not running:
                break
            done = next(as_completed(running))
            i = running.pop(done)
            results[i] = result = done.result()
            finished.add(jobs[i]["name"])
            progress.advance(task)
            if on_done:
                on_done(result)
    return [results[i] for i in sorted(results)]
