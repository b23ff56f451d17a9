"""What every benchmark shares: machine facts, timing, and running many training runs.

Training runs go through :func:`run_jobs`: ``parallel`` single-thread processes side by side
(on a small CPU machine two single-thread processes do more work than one two-thread
process), each run in its own folder; a run whose ``summary.json`` exists is read back
instead of trained again, so an interrupted benchmark continues where it stopped. With
``DPL_BENCH_PIN=1`` in the environment each of the ``parallel`` processes is pinned to its own
slice of the cores this process may use (the GPU check pins its parts so).
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


def core_slices(n: int, cores=None) -> list[list[int]]:
    """``n`` slices of ``cores`` (default: those this process may run on), as even as they come;
    more slices than cores share them round robin."""
    cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
    if n >= len(cores):
        return [[cores[i % len(cores)]] for i in range(n)]
    k = len(cores) // n
    return [cores[i * k:(i + 1) * k] if i < n - 1 else cores[i * k:] for i in range(n)]


def _init_worker(threads: int, slices=None) -> None:
    import torch
    torch.set_num_threads(threads)
    if slices is not None:   # DPL_BENCH_PIN: this worker's own cores (its loader workers inherit them)
        os.sched_setaffinity(0, slices.get())


def _run_job(job: dict) -> dict:
    """One training run in this process; the summary plus its evaluated curve."""
    import resource
    from dpl_zoo.config import load_config
    from dpl_zoo.train import fit
    folder = Path(job["output"]) / job["name"]
    if (folder / "summary.json").is_file():
        summary = json.loads((folder / "summary.json").read_text())
        summary["reused"] = True
    else:
        cfg = load_config(job["recipe"], [*job["overrides"], f"output={job['output']}", f"experiment={job['name']}"])
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        summary = fit(cfg, resume="auto", quiet=True)  # a run cut off at an epoch end continues
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        summary["cpu_seconds"] = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary["curve"] = [{"step": r["step"], "top1": r["eval"]["student"]["top1"],
                         **{k: r["eval"].get("pseudo_labels", {}).get(k)
                            for k in ("pl_acc", "mask_rate", "pl_kl_uniform", "pl_kl_target")}}
                        for r in rows if r["kind"] == "epoch" and "eval" in r]
    summary["job"] = {k: v for k, v in job.items() if k != "output"}
    return summary


def run_jobs(jobs: list[dict], parallel: int = 2, threads: int = 1, console=None,
             on_done: Optional[Callable[[dict], None]] = None, deadline: Optional[float] = None) -> list[dict]:
    """Run ``jobs`` (``name``, ``recipe``, ``overrides``, ``output``) ``parallel`` at a time;
    results in job order. Runs that finished before (their ``summary.json`` exists) are read, not
    rerun. A failed run stops the benchmark with its error. After ``deadline`` (a
    ``time.time()``) no new run starts and the finished ones are returned."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    results: dict[int, dict] = {}
    ctx = get_context("spawn")
    slices = None
    if os.environ.get("DPL_BENCH_PIN") == "1":
        slices = ctx.Queue()
        for cores in core_slices(parallel):
            slices.put(cores)
    with Progress(TextColumn("runs"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as progress, \
            ProcessPoolExecutor(parallel, mp_context=ctx, initializer=_init_worker,
                                initargs=(threads, slices)) as pool:
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
        while pending or running:
            while pending and len(running) < parallel and (deadline is None or time.time() < deadline):
                i, job = pending.pop(0)
                running[pool.submit(_run_job, job)] = i
            if not running:
                break
            done = next(as_completed(running))
            results[running.pop(done)] = result = done.result()
            progress.advance(task)
            if on_done:
                on_done(result)
    return [results[i] for i in sorted(results)]
