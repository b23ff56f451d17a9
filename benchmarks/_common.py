"""What every benchmark shares: machine facts, timing, and running many training runs.

Training runs go through :func:`run_jobs`: ``parallel`` single-thread processes side by side
(on a small CPU machine two single-thread processes do more work than one two-thread
process), each run in its own folder; a run whose ``summary.json`` exists is read back
instead of trained again, so an interrupted benchmark continues where it stopped.

A run folder is reused only for the settings it was made with: its ``config.yaml`` (and the
device its summary records) must equal the config the job builds now, up to
``NEUTRAL_SETTINGS``. Run names leave most settings out (steps, label budget, device, start
weights, ...), so a rerun with other flags finds folders of the same name made under other
settings: that is an error naming the folder and the keys, and with ``rerun_changed``
(``--rerun-changed`` on every benchmark) the job runs in ``NAME-<settings hash>`` next to it,
where later calls find it without the flag.
With ``DPL_BENCH_PIN=1`` in the environment each of the ``parallel`` processes is pinned to its own
slice of the cores this process may use (the GPU check pins its parts so).
"""
from __future__ import annotations

import json
import math
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


def json_text(obj, indent: int = 2) -> str:
    """``obj`` as JSON that strict readers accept: NaN and infinities (a supervised arm has no
    pseudo-label accuracy) become ``null``; other objects their ``str``."""
    return json.dumps(_finite(obj), indent=indent, default=str, allow_nan=False)


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_report(out: Path, name: str, benchmark: str, settings: dict, t0: float, console=None, **fields) -> Path:
    """``out/name``: the benchmark's numbers with the date, the machine, its settings and its time."""
    report = {"benchmark": benchmark, "date": time.strftime("%Y-%m-%d"), "machine": machine_facts(),
              "command": command_line(), "settings": settings, **fields, "seconds": time.perf_counter() - t0}
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(portable(json_text(report), out))
    if console is not None:
        console.print(f"wrote {path} ({report['seconds'] / 60:.1f} min)")
    return path


def command_line() -> str:
    """How this process was started, as the results pages show it (``python benchmarks/NAME.py ...``)."""
    import shlex
    return " ".join(["python", *(shlex.quote(a) for a in sys.argv)])


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


def paired_difference(a: dict, b: dict) -> dict:
    """Per seed (the seeds both ``{seed: value}`` have): ``a - b``, its mean and sd, and the seeds
    ``a`` won."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    m, sd = mean_sd(diffs)
    return {"seeds": seeds, "diffs": diffs, "mean": m, "sd": sd, "won": sum(d > 0 for d in diffs)}


def kl_from(hist, reference) -> float:
    """KL(pseudo-label histogram || reference): every arm measured against the same reference."""
    total = float(sum(hist))
    return sum(h / total * math.log(h / total / r) for h, r in zip(hist, reference) if h > 0)


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


# Settings that change neither what a run trains nor the numbers it reports (the augmentation is
# seeded per sample, so the number of loader workers does not change the images): a finished run
# made under other values of these is reused. Every other key of the config must match, and so
# must the device type (``device: null`` resolves to CUDA when there is one). Seconds and CPU time
# of a reused run are those of the run that made it.
NEUTRAL_SETTINGS = frozenset({"output", "experiment", "workers", "pin_memory", "log_interval"})


class RunSettingsChanged(SystemExit):
    """Run folders hold runs made with other settings; the message says which and what to do
    (a ``SystemExit``: a benchmark script stops with that one line, no traceback)."""


def _job_config(job: dict, folder: str):
    from dpl_zoo.config import load_config, load_pretrain_config
    load = load_pretrain_config if job.get("kind") == "pretrain" else load_config
    return load(job["recipe"], [*job["overrides"], f"output={job['output']}", f"experiment={folder}"])


def _device_type(cfg) -> str:
    import torch
    return torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")).type


def _settings(config: dict, device: Optional[str]) -> dict:
    """What a run's results depend on: its config without ``NEUTRAL_SETTINGS``, as JSON values
    (tuples and lists alike), and the device type it ran on (None: not recorded)."""
    from dpl_zoo.config import flatten
    flat = {k: json.loads(json.dumps(v, default=str)) for k, v in flatten(config).items()
            if k not in NEUTRAL_SETTINGS}
    return {**flat, "device type": device}


def _saved_settings(folder: Path) -> Optional[dict]:
    """The settings of the run in ``folder``; None when no run started there (nothing to reuse
    or resume: a folder without a checkpoint or summary is started over by training)."""
    import yaml
    if not ((folder / "summary.json").is_file() or (folder / "last.pth.tar").is_file()):
        return None
    if not (folder / "config.yaml").is_file():
        return {}   # a run without its config: no setting can be shown to match
    summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").is_file() else {}
    return _settings(yaml.safe_load((folder / "config.yaml").read_text()) or {}, summary.get("device"))


def _differences(saved: dict, now: dict) -> list[str]:
    keys = sorted(set(saved) | set(now))
    diffs = [k for k in keys if k != "device type" and saved.get(k) != now.get(k)]
    recorded = saved.get("device type")
    if recorded is not None and recorded != now["device type"]:   # older runs did not record it
        diffs.append("device")
    return diffs


def _settings_tag(settings: dict) -> str:
    import hashlib
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def resolve_folders(jobs: list[dict], rerun_changed: bool = False) -> list[dict]:
    """Each job with the run folder (``folder``) it reuses, resumes or starts: its ``name`` when
    that holds no run or one made with the same settings, else ``name-<settings hash>`` when that
    holds such a run or ``rerun_changed``. Otherwise :class:`RunSettingsChanged`, naming every
    folder that differs and in what, before any run starts."""
    resolved, changed = [], []
    for job in jobs:
        cfg = _job_config(job, job["name"])
        now = _settings(cfg.to_dict(), _device_type(cfg))
        saved = _saved_settings(Path(job["output"]) / job["name"])
        if saved is None or not _differences(saved, now):
            resolved.append({**job, "folder": job["name"]})
            continue
        fresh = f"{job['name']}-{_settings_tag(now)}"
        fresh_saved = _saved_settings(Path(job["output"]) / fresh)
        if fresh_saved is not None and _differences(fresh_saved, now):   # a hash collision, or edited by hand
            changed.append((Path(job["output"]) / fresh, _differences(fresh_saved, now), None))
        elif fresh_saved is not None or rerun_changed:
            resolved.append({**job, "folder": fresh})
        else:
            changed.append((Path(job["output"]) / job["name"], _differences(saved, now), fresh))
    if changed:
        folder, diffs, fresh = changed[0]
        more = f" ({len(changed) - 1} more run folders differ too)" if len(changed) > 1 else ""
        what = ", ".join(diffs) if diffs else "no config.yaml to compare"
        todo = (f"rerun with --rerun-changed to train these settings in fresh folders next to it (here {fresh}), "
                f"or delete the folder" if fresh else "delete the folder")
        raise RunSettingsChanged(f"{folder} holds a run made with other settings (differs in: {what}), whose results "
                                 f"would be reported under these settings{more}; {todo}")
    return resolved


def _run_job(job: dict) -> dict:
    """One run in this process (in ``job["folder"]``, see :func:`resolve_folders`; ``kind``:
    ``train``, the default, or ``pretrain``); the summary plus its evaluated curve (test top-1, or
    the kNN monitor of a pretraining run)."""
    import resource
    from dpl_zoo.pretrain import pretrain
    from dpl_zoo.train import fit
    folder = Path(job["output"]) / job["folder"]
    kind = job.get("kind", "train")
    if (folder / "summary.json").is_file():
        summary = json.loads((folder / "summary.json").read_text())
        summary["reused"] = True
    else:
        cfg = _job_config(job, job["folder"])
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        if kind == "pretrain":
            summary = pretrain(cfg, resume="auto", quiet=True)
        else:
            summary = fit(cfg, resume="auto", quiet=True)  # a run cut off at an epoch end continues
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        summary["cpu_seconds"] = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        summary["device"] = _device_type(cfg)   # what a later reuse compares (device: null depends on the machine)
        (folder / "summary.json").write_text(json_text(summary))
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


def add_rerun_argument(parser) -> None:
    parser.add_argument("--rerun-changed", action="store_true",
                        help="run folders made with other settings: train these settings in fresh folders next "
                             "to them (NAME-<settings hash>) instead of stopping with an error")


def run_jobs(jobs: list[dict], parallel: int = 2, threads: int = 1, console=None,
             on_done: Optional[Callable[[dict], None]] = None, deadline: Optional[float] = None,
             rerun_changed: bool = False) -> list[dict]:
    """Run ``jobs`` (``name``, ``recipe``, ``overrides``, ``output``; optional ``kind``: ``pretrain``,
    and ``after``: names of jobs that must finish first, e.g. the pretraining a fine-tuning run
    starts from) ``parallel`` at a time, each free slot taking the first job whose ``after`` are
    done; results in job order. Runs that finished before with the same settings (their
    ``summary.json`` exists) are read, not rerun; runs made with other settings are an error, or
    with ``rerun_changed`` run again in fresh folders (:func:`resolve_folders`). A failed run
    stops the benchmark with its error. After ``deadline`` (a ``time.time()``) no new run starts
    and the finished ones are returned."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    jobs = resolve_folders(jobs, rerun_changed)
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
            if (Path(job["output"]) / job["folder"] / "summary.json").is_file():  # finished: read, not rerun
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
