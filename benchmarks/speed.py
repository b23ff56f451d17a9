"""Step cost and data pipeline: DebiasPL against FixMatch and a hand-written step; loader vs step.

Step cost, per model (``--models``; ResNet-50 and ViT-S/16 by default) on ``--device``:
- DebiasPL step / FixMatch step on the same batch (target <= 1.03);
- dpl-zoo step / a hand-written torch step doing the same forward, backward, optimiser and EMA
  work (target <= 1.05 on CUDA, 1.10 on CPU): the physical floor of the loop;
- peak memory against the hand-written step, images/s, and on CUDA the model FLOP
  utilisation against the card's bf16 peak (FLOPs counted by ``torch.utils.flop_counter``).
Variants are interleaved round by round and medians reported, since absolute times drift.

``--compile-criterion`` adds the DebiasPL step with the criterion compiled (``torch.compile``).

Pipeline (the embedded default recipe, both ``data.augment_on`` paths): images/s of the loader
alone, of the step alone (one batch held in memory) and of real training; target: training
>= 0.9 x step alone. ``--end-to-end`` also times the README's main command, ``dpl-zoo train``.

``--profile``: ``torch.profiler`` over a few steps of DebiasPL and of the hand-written step, the
top operations by device time (CPU time on a CPU) and the kernels launched per step.
``--mfu``: model FLOP utilisation of the DebiasPL step as the per-device batch doubles from
``--batch`` until it no longer fits (or ``--max-batch``), then with the student and criterion
compiled at the largest batch that fit and at ``--batch``. ``--rows FILE`` appends each result
as a JSON line when it is measured, so a run stopped at a deadline keeps what finished.

    python benchmarks/speed.py                          # CPU, default sizes
    python benchmarks/speed.py --device cuda --img-size 224 --batch 8 --multiviews both
    python benchmarks/speed.py --device cuda --img-size 224 --batch 8 --profile --mfu --no-pipeline
    python benchmarks/speed.py --toy                    # a smoke run
"""
from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from _common import json_text, write_report  # noqa: E402

from dpl_zoo.method import DebiasPLLoss  # noqa: E402
from dpl_zoo.task import DebiasPLTask  # noqa: E402

console = Console()

# dense bf16 tensor-core peaks, FLOP/s (vendor data sheets); MFU is reported against these
BF16_PEAK = {"H100 SXM": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12,
             "A100": 312e12, "L40S": 362e12, "A10": 125e12, "RTX 4090": 165e12}


def card_peak(name: str):
    for key in sorted(BF16_PEAK, key=len, reverse=True):
        if key.lower() in name.lower():
            return BF16_PEAK[key]
    return None


def make_batch(b: int, mu: int, size: int, classes: int, views: int, device, on_device: bool = False):
    """A fixed random batch (drawn on the CPU, the same on every device; ``on_device``: drawn
    there, for the large batches of the MFU sweep)."""
    where = device if on_device else "cpu"
    g = torch.Generator(device=where).manual_seed(0)
    x = torch.randn(b, 3, size, size, generator=g, device=where).to(device)
    y = torch.randint(0, classes, (b,), generator=g, device=where).to(device)
    unl = [torch.randn(mu * b, 3, size, size, generator=g, device=where).to(device) for _ in range(2 * views)]
    return x, y, unl


def build_model(name: str, size: int, classes: int, device, channels_last: bool = False):
    import timm
    kwargs = {"img_size": size} if "vit" in name else {}
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=classes, **kwargs).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _autocast(device, amp: bool):
    if not amp:
        return lambda: torch.autocast(device_type=device.type, enabled=False)
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def dpl_step_fn(model, tau: float, classes: int, batch, amp: bool = False, compile_criterion: bool = False,
                compile_student: bool = False):
    """One step through dpl-zoo: the timm TrainingTask with the DebiasPL criterion and EMAN
    (``compile_student``/``compile_criterion``: as ``compile: true`` builds a run)."""
    views = len(batch[2]) // 2
    task = DebiasPLTask(model, DebiasPLLoss(classes, tau=tau, threshold=0.95, qhat_momentum=0.999),
                        ema_decay=0.999, multiviews=views == 2, device=batch[0].device).train()
    if compile_student:   # one static graph per batch size, as a run has
        task.trainable_module = torch.compile(task.trainable_module, dynamic=False)
    if compile_criterion:
        task.compile_criterion(dynamic=False)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    state = {"step": 0}
    ac = _autocast(batch[0].device, amp)

    def step():
        with ac():
            out = task(batch[0], batch[1], batch[2])
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        task.update_ema(step=state["step"] + 10)
        state["step"] += 1
    return step


def hand_step_fn(model, classes: int, batch, amp: bool = False):
    """The same work written directly in torch: student on labeled + strong views, no-grad EMA
    teacher on weak views, FixMatch-style masked loss per (weak, strong) pair, SGD, EMA over
    parameters and buffers."""
    teacher = copy.deepcopy(model).eval()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    x, y, unl = batch
    views = len(unl) // 2
    weak, strong = unl[:views], unl[views:]
    n, nu = x.shape[0], weak[0].shape[0]
    ac = _autocast(x.device, amp)
    ema = [v for v in teacher.state_dict().values() if v.is_floating_point()]
    cur = [v for v in model.state_dict().values() if v.is_floating_point()]

    def step():
        with ac():
            logits = model(torch.cat([x, *strong])).float()
            with torch.no_grad():
                pw = torch.softmax(teacher(torch.cat(weak)).float(), dim=-1)
        maxp, t = pw.max(-1)
        mask = maxp.ge(0.95).float()
        loss = F.cross_entropy(logits[:n], y)
        for i, s in enumerate(logits[n:].split(nu)):
            for j in range(views):
                loss = loss + (F.cross_entropy(s, t[j * nu:(j + 1) * nu], reduction="none")
                               * mask[j * nu:(j + 1) * nu]).mean() / (views * views)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, cur, 1 - 0.999)
    return step


def _sync(device):
    return (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)


def time_interleaved(fns: dict, rounds: int, warmup: int, sync) -> dict:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_memory_worker(kind, name, size, classes, b, mu, views, device_type, amp, steps, queue):
    import threading
    device = torch.device(device_type)
    model = build_model(name, size, classes, device)
    batch = make_batch(b, mu, size, classes, views, device)
    fn = hand_step_fn(model, classes, batch, amp) if kind == "hand" else \
        dpl_step_fn(model, 0.4 if kind == "debiaspl" else 0.0, classes, batch, amp)
    if device.type == "cuda":
        queue.put(cuda_peak_memory(fn, steps))
        return
    # CPU: the lifetime high (ru_maxrss) is set while building the model, so sample the
    # current RSS in a thread while the steps run and report its peak above the start
    base, peak, done = _current_rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _current_rss())
            done.wait(0.001)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    for _ in range(steps):
        fn()
    done.set()
    t.join()
    queue.put(max(peak[0], _current_rss()) - base)


def cuda_peak_memory(fn, steps: int = 3) -> int:
    """Allocator peak above what was allocated before, over ``steps`` calls of a warmed-up step
    (in this process: the other steps' models and gradients are part of the base)."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def peak_memory(kind, name, size, classes, b, mu, views, device, amp, steps=3) -> int:
    """Peak memory growth of the step in a fresh process (CPU: RSS; CUDA: allocator peak)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_peak_memory_worker, args=(kind, name, size, classes, b, mu, views, device.type, amp,
                                                      steps, q))
    p.start()
    value = q.get(timeout=600)
    p.join()
    return value


def step_flops(name, size, classes, batch, amp) -> int:
    """FLOPs of one DebiasPL step (forward + backward + teacher forward), by torch's counter."""
    from torch.utils.flop_counter import FlopCounterMode
    model = build_model(name, size, classes, batch[0].device)
    fn = dpl_step_fn(model, 0.4, classes, batch, amp)
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def bench_model(name, size, classes, b, mu, views, device, rounds, warmup, amp, compile_criterion=False) -> dict:
    batch = make_batch(b, mu, size, classes, views, device)
    fns = {
        "debiaspl": dpl_step_fn(build_model(name, size, classes, device), 0.4, classes, batch, amp),
        "fixmatch": dpl_step_fn(build_model(name, size, classes, device), 0.0, classes, batch, amp),
        "hand": hand_step_fn(build_model(name, size, classes, device), classes, batch, amp),
    }
    if compile_criterion:
        fns["debiaspl_compiled_criterion"] = dpl_step_fn(build_model(name, size, classes, device), 0.4, classes,
                                                         batch, amp, compile_criterion=True)
    med = time_interleaved(fns, rounds, warmup, _sync(device))
    if device.type == "cuda":   # the allocator's peak, in this process (a fresh one per step costs seconds)
        mem = {k: cuda_peak_memory(fns[k]) for k in ("debiaspl", "hand")}
    else:
        mem = {k: peak_memory(k, name, size, classes, b, mu, views, device, amp) for k in ("debiaspl", "hand")}
    images = b + 2 * views * mu * b
    flops = step_flops(name, size, classes, batch, amp)
    peak = card_peak(torch.cuda.get_device_name(0)) if device.type == "cuda" else None
    row = {"model": name, "device": device.type, "img_size": size, "batch": b, "mu": mu, "views": views,
           "amp": amp, "step_s": med, "img_per_s": images / med["debiaspl"],
           "debiaspl_over_fixmatch": med["debiaspl"] / med["fixmatch"],
           "debiaspl_over_hand": med["debiaspl"] / med["hand"],
           "peak_bytes": mem, "memory_ratio": mem["debiaspl"] / max(mem["hand"], 1), "step_flops": flops,
           "flop_per_s": flops / med["debiaspl"], "mfu_bf16": flops / med["debiaspl"] / peak if peak else None}
    if compile_criterion:
        c = med["debiaspl_compiled_criterion"]
        row.update(compiled_criterion_over_hand=c / med["hand"], compiled_criterion_over_fixmatch=c / med["fixmatch"])
    return row


# --- where the step's time goes (torch.profiler) ----------------------------------------------------

def _device_time(evt) -> float:
    """Self device time of a profiler average in microseconds (the attribute's name changed in torch 2.4)."""
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(evt, attr):
            return float(getattr(evt, attr))
    return 0.0


def profile_steps(name, size, classes, b, mu, views, device, amp, steps: int = 5, top: int = 15,
                  compile_criterion: bool = False) -> dict:
    """``torch.profiler`` over ``steps`` steps of DebiasPL and of the hand-written step on one batch:
    per variant, the operations with the most self device time (self CPU time on a CPU), with
    calls and times per step, the device and host time per step and the kernels launched per
    step; and the operations whose time differs most between DebiasPL and the hand-written step."""
    from torch.profiler import ProfilerActivity, profile
    batch = make_batch(b, mu, size, classes, views, device)
    fns = {"debiaspl": dpl_step_fn(build_model(name, size, classes, device), 0.4, classes, batch, amp),
           "hand": hand_step_fn(build_model(name, size, classes, device), classes, batch, amp)}
    if compile_criterion:
        fns["debiaspl_compiled_criterion"] = dpl_step_fn(build_model(name, size, classes, device), 0.4, classes,
                                                         batch, amp, compile_criterion=True)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync = _sync(device)
    out: dict = {"model": name, "img_size": size, "batch": b, "mu": mu, "views": views, "steps": steps,
                 "sorted_by": "self device time" if cuda else "self CPU time", "variants": {}}
    per_op: dict = {}
    for key, fn in fns.items():
        for _ in range(3):
            fn()
        sync()
        t = time.perf_counter()
        with profile(activities=activities) as prof:
            for _ in range(steps):
                fn()
            sync()
        wall = (time.perf_counter() - t) / steps
        averages = prof.key_averages()
        ops = {}
        for evt in averages:
            dev = _device_time(evt) if cuda else 0.0
            ops[evt.key] = {"op": evt.key, "calls": evt.count / steps, "self_device_ms": dev / 1e3 / steps,
                            "self_cpu_ms": evt.self_cpu_time_total / 1e3 / steps}
        per_op[key] = ops
        kernels = sum(1 for e in prof.events() if cuda and getattr(e, "device_type", None) is not None
                      and str(e.device_type).endswith("CUDA")) / steps
        rank = "self_device_ms" if cuda else "self_cpu_ms"
        out["variants"][key] = {
            "wall_ms_per_step": 1e3 * wall,
            "device_ms_per_step": sum(o["self_device_ms"] for o in ops.values()),
            "host_ms_per_step": sum(o["self_cpu_ms"] for o in ops.values()),
            "kernels_per_step": kernels,
            "top": sorted(ops.values(), key=lambda o: -o[rank])[:top]}
    rank = "self_device_ms" if cuda else "self_cpu_ms"
    a, h = per_op["debiaspl"], per_op["hand"]
    diff = [{"op": k, "debiaspl_ms": a.get(k, {}).get(rank, 0.0), "hand_ms": h.get(k, {}).get(rank, 0.0),
             "debiaspl_calls": a.get(k, {}).get("calls", 0.0), "hand_calls": h.get(k, {}).get("calls", 0.0)}
            for k in set(a) | set(h)]
    for d in diff:
        d["extra_ms"] = d["debiaspl_ms"] - d["hand_ms"]
    out["debiaspl_minus_hand"] = sorted(diff, key=lambda d: -abs(d["extra_ms"]))[:top]
    return out


def print_profile(prof: dict, console_=None) -> None:
    c = console_ or console
    for key, v in prof["variants"].items():
        table = Table(title=f"{prof['model']} x{prof['views']} {key}: {v['wall_ms_per_step']:.2f} ms/step wall, "
                            f"device {v['device_ms_per_step']:.2f} ms, host {v['host_ms_per_step']:.2f} ms, "
                            f"{v['kernels_per_step']:.0f} kernels/step (top by {prof['sorted_by']})")
        for col in ("operation", "calls/step", "self device ms/step", "self CPU ms/step"):
            table.add_column(col, justify="left" if col == "operation" else "right")
        for o in v["top"]:
            table.add_row(o["op"][:60], f"{o['calls']:.0f}", f"{o['self_device_ms']:.3f}", f"{o['self_cpu_ms']:.3f}")
        c.print(table)
    table = Table(title=f"{prof['model']}: DebiasPL minus hand-written step, by {prof['sorted_by']} per step")
    for col in ("operation", "DebiasPL ms", "hand ms", "extra ms", "calls DPL/hand"):
        table.add_column(col, justify="left" if col == "operation" else "right")
    for d in prof["debiaspl_minus_hand"]:
        table.add_row(d["op"][:60], f"{d['debiaspl_ms']:.3f}", f"{d['hand_ms']:.3f}", f"{d['extra_ms']:+.3f}",
                      f"{d['debiaspl_calls']:.0f}/{d['hand_calls']:.0f}")
    c.print(table)


# --- what a bigger per-device batch buys (MFU) ------------------------------------------------------

def _mfu_point(name, size, classes, b, mu, views, device, amp, rounds, flops_per_image, compiled) -> dict:
    batch = make_batch(b, mu, size, classes, views, device, on_device=True)
    fn = dpl_step_fn(build_model(name, size, classes, device), 0.4, classes, batch, amp,
                     compile_criterion=compiled, compile_student=compiled)
    t = time.perf_counter()
    fn()                                   # the first call compiles
    _sync(device)()
    first = time.perf_counter() - t
    med = time_interleaved({"step": fn}, rounds, 2, _sync(device))["step"]
    images = b + 2 * views * mu * b
    peak = card_peak(torch.cuda.get_device_name(0)) if device.type == "cuda" else None
    flops = flops_per_image * images
    return {"model": name, "batch": b, "mu": mu, "views": views, "images_per_step": images, "compiled": compiled,
            "step_s": med, "img_per_s": images / med, "step_flops": flops, "flop_per_s": flops / med,
            "mfu_bf16": flops / med / peak if peak else None, "first_step_s": first,
            "peak_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None}


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, getattr(torch, "OutOfMemoryError", ())) or "out of memory" in str(e).lower()


def mfu_sweep(name, size, classes, b0, mu, views, device, amp, rounds: int = 5, max_batch: int = 1024,
              budget_s: float = 600.0, compile_: bool = True, on_row=None) -> list[dict]:
    """DebiasPL step's images/s and MFU as the per-device labeled batch doubles from ``b0`` until
    out of memory or ``max_batch``; then compiled (student and criterion) at the largest batch that
    fit and at ``b0``. FLOPs are counted once at ``b0`` and scale with the images per step. No
    new measurement starts after ``budget_s``."""
    import gc
    start = time.perf_counter()
    flops_per_image = step_flops(name, size, classes, make_batch(b0, mu, size, classes, views, device), amp) \
        / (b0 + 2 * views * mu * b0)
    rows: list[dict] = []

    def measure(b: int, compiled: bool) -> dict:
        if time.perf_counter() - start > budget_s:
            row = {"model": name, "batch": b, "compiled": compiled, "skipped": "budget spent"}
        else:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                row = _mfu_point(name, size, classes, b, mu, views, device, amp, rounds, flops_per_image, compiled)
            except Exception as e:  # noqa: BLE001 - out of memory ends the doubling; anything else is raised
                if not _is_oom(e):
                    raise
                row = {"model": name, "batch": b, "compiled": compiled, "oom": True}
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        if on_row:
            on_row(row)
        return row

    fit = None
    b = b0
    while b <= max_batch:
        row = measure(b, False)
        if row.get("oom") or row.get("skipped"):
            break
        fit, b = b, 2 * b
    if compile_ and fit:
        for b in [fit] + ([b0] if fit != b0 else []):
            if measure(b, True).get("skipped"):
                break
    return rows


def bench_pipeline(augment_on: str, steps: int, device: str, workers: int) -> dict:
    """Images/s of the embedded recipe's loader alone, step alone and real training."""
    from dpl_zoo.config import load_config
    from dpl_zoo.progress import Reporter
    from dpl_zoo.inputs import epoch_loaders
    from dpl_zoo.run import build_run
    from dpl_zoo.train import train_one_epoch
    cfg = load_config("mnist_demo", [f"steps_per_epoch={steps}", f"data.augment_on={augment_on}",
                                     f"workers={workers}", f"device={device}"])
    run = build_run(cfg)
    sync = _sync(run.device)
    lab, unl = epoch_loaders(run, epoch=0)
    t, n = time.perf_counter(), 0
    for a, b in zip(lab, unl):
        views = run.labeled_views(a) + run.unlabeled_views(b)
        n += sum(v.shape[0] for v in views)
    sync()
    loader_ips = n / (time.perf_counter() - t)
    # the step alone: one batch of finished views held on the device, the recipe's model and method
    lab, unl = epoch_loaders(run, epoch=1)
    a, b = next(iter(lab)), next(iter(unl))
    (x,), views = run.labeled_views(a), run.unlabeled_views(b)
    y = a.targets.to(run.device)
    task, opt = run.task.train(), run.optimizer

    def step():
        out = task(x, y, views)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        task.update_ema(step=0)
    med = time_interleaved({"step": step}, rounds=steps, warmup=3, sync=sync)["step"]
    step_ips = (x.shape[0] + sum(v.shape[0] for v in views)) / med
    # real training: loaders, views, step, metrics, as `dpl-zoo train` runs them
    stats = train_one_epoch(run, 2, Reporter(quiet=True, silent=True), lambda row: None)
    return {"recipe": "mnist_demo", "augment_on": augment_on, "workers": workers, "device": str(run.device),
            "steps": steps, "loader_img_per_s": loader_ips, "step_img_per_s": step_ips,
            "train_img_per_s": stats["img_per_s"], "train_over_step": stats["img_per_s"] / step_ips}


def _jpeg_folder(root: Path, per_class: int, classes: int = 10, size: int = 320) -> Path:
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = rng.integers(0, 255, (size // 16, size // 16, 3), dtype=np.uint8)
            Image.fromarray(base).resize((size, size), Image.BILINEAR).save(root / f"c{c}" / f"{i}.jpg", quality=90)
    return root


def bench_folder_views(device: str, workers: int, work: Path, per_class: int = 80, steps: int = 8,
                       img_size: int = 224, batch: int = 64, budget: float = 600.0) -> list[dict]:
    """Images/s of finished training views from a folder of 320 px JPEGs (``finetune`` recipe,
    weak + strong views): PIL in ``workers`` loader processes vs decode + crop there and flip +
    RandAugment batched on ``device``. The second epoch is timed (the first starts the workers)."""
    from dpl_zoo.config import load_config
    from dpl_zoo.inputs import epoch_loaders
    from dpl_zoo.run import build_run
    root = _jpeg_folder(work / "jpegs" / "train", per_class)
    _jpeg_folder(work / "jpegs" / "val", per_class=2)
    sync = _sync(torch.device(device))
    rows, start = [], time.perf_counter()
    for path in ("workers", "device"):
        if time.perf_counter() - start > budget:
            break
        cfg = load_config("finetune", [f"data.root={root}", "model=resnet18", "pretrained=false", f"device={device}",
                                       f"data.augment_on={path}", f"workers={workers}", f"batch_size={batch}",
                                       f"img_size={img_size}", "data.label_fraction=0.2", f"steps_per_epoch={steps}",
                                       "dpl.mu=5", "amp=false"])
        run = build_run(cfg)
        for epoch in range(2):
            lab, unl = epoch_loaders(run, epoch)
            sync()
            t, n = time.perf_counter(), 0
            for a, b in zip(lab, unl):
                n += sum(v.shape[0] for v in run.labeled_views(a) + run.unlabeled_views(b))
            sync()
        rows.append({"augment_on": path, "device": device, "workers": workers, "img_size": img_size,
                     "img_per_s": n / (time.perf_counter() - t)})
    return rows


def end_to_end(out: Path) -> dict:
    """Wall time of the README's main command, `dpl-zoo train`, both methods."""
    folder = out / "runs" / f"speed-e2e-{time.strftime('%Y%m%d-%H%M%S')}"
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dpl_zoo", "train", "--quiet", "--set", f"output={folder}"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - t
    comparison = json.loads(next(folder.glob("*-comparison.json")).read_text())
    return {"seconds": seconds, "top1": {s["method"]: s["top1"] for s in comparison}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet50,vit_small_patch16_224")
    p.add_argument("--device", default="cpu")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=4, help="labeled images per step (unlabeled: mu x batch)")
    p.add_argument("--mu", type=int, default=5)
    p.add_argument("--multiviews", choices=("off", "on", "both"), default="off")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--pipeline-steps", type=int, default=100)
    p.add_argument("--no-pipeline", action="store_true")
    p.add_argument("--folder", action="store_true", help="also folder views at 224 px: PIL workers vs batched")
    p.add_argument("--no-models", action="store_true")
    p.add_argument("--end-to-end", action="store_true", help="also time `dpl-zoo train` (about 5 minutes on CPU)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default=None, help="output file name (default speed.json / speed_<device>.json)")
    p.add_argument("--toy", action="store_true")
    p.add_argument("--compile-criterion", action="store_true",
                   help="also time the DebiasPL step with the criterion compiled")
    p.add_argument("--profile", action="store_true", help="torch.profiler: DebiasPL vs the hand-written step")
    p.add_argument("--profile-steps", type=int, default=5)
    p.add_argument("--mfu", action="store_true", help="MFU as the per-device batch doubles, then compiled")
    p.add_argument("--max-batch", type=int, default=1024, help="--mfu: largest labeled batch tried")
    p.add_argument("--mfu-seconds", type=float, default=600.0, help="--mfu: no new measurement after this")
    p.add_argument("--no-mfu-compile", action="store_true")
    p.add_argument("--rows", help="append each measured row to this JSON-lines file as it is measured")
    args = p.parse_args(argv)
    models, size, b, rounds, psteps = args.models.split(","), args.img_size, args.batch, args.rounds, args.pipeline_steps
    if args.toy:
        models, size, b, rounds, psteps = ["test_resnet", "test_vit"], 32, 2, 2, 3
    device = torch.device(args.device)
    view_counts = {"off": [1], "on": [2], "both": [1, 2]}[args.multiviews]
    t0 = time.perf_counter()

    def emit(kind: str, row: dict) -> dict:
        if args.rows:
            Path(args.rows).parent.mkdir(parents=True, exist_ok=True)
            with open(args.rows, "a") as f:
                f.write(json_text({"kind": kind, **row}, indent=None) + "\n")
        return row
    results = [] if args.no_models else [
        emit("step", bench_model(m, size, 10, b, args.mu, v, device, rounds, 2, args.amp, args.compile_criterion))
        for m in models for v in view_counts]
    profiles = [emit("profile", profile_steps(m, size, 10, b, args.mu, 1, device, args.amp, args.profile_steps,
                                              compile_criterion=args.compile_criterion))
                for m in models] if args.profile else []
    mfu = [row for m in models for row in mfu_sweep(
        m, size, 10, b, args.mu, 1, device, args.amp, rounds=max(2, min(rounds, 5)),
        max_batch=2 * b if args.toy else args.max_batch, budget_s=args.mfu_seconds,
        compile_=not args.no_mfu_compile, on_row=lambda r: emit("mfu", r))] if args.mfu else []
    pipeline = [] if args.no_pipeline else [bench_pipeline("workers", psteps, args.device, 0 if args.toy else 1),
                                            bench_pipeline("device", psteps, args.device, 0)]
    folder = []
    if args.folder:
        import tempfile
        with tempfile.TemporaryDirectory() as work:
            folder = bench_folder_views(args.device, 1, Path(work), per_class=8 if args.toy else 80,
                                        steps=2 if args.toy else 8, img_size=64 if args.toy else 224,
                                        batch=2 if args.toy else 64)
    e2e = end_to_end(Path(args.out)) if args.end_to_end else None
    target = 1.05 if device.type == "cuda" else 1.10
    if results:
        table = Table(title=f"step cost on {device.type}, batch {b} + {args.mu * b} unlabeled x views, {size} px "
                            f"(medians of {rounds} rounds{', bf16' if args.amp else ''})")
        for col in ("model", "views", "DebiasPL s", "FixMatch s", "hand s", "DPL/FixMatch (<=1.03)",
                    f"DPL/hand (<={target})", "peak mem DPL/hand", "img/s", "MFU bf16"):
            table.add_column(col, justify="left" if col == "model" else "right")
        for r in results:
            s = r["step_s"]
            table.add_row(r["model"], str(r["views"]), f"{s['debiaspl']:.4f}", f"{s['fixmatch']:.4f}",
                          f"{s['hand']:.4f}", f"{r['debiaspl_over_fixmatch']:.3f}", f"{r['debiaspl_over_hand']:.3f}",
                          f"{r['memory_ratio']:.2f}", f"{r['img_per_s']:.0f}",
                          "-" if r["mfu_bf16"] is None else f"{100 * r['mfu_bf16']:.1f}%")
        console.print(table)
        for r in results:
            if "compiled_criterion_over_hand" in r:
                console.print(f"{r['model']} x{r['views']}, criterion compiled: DPL/hand "
                              f"{r['compiled_criterion_over_hand']:.3f}, DPL/FixMatch "
                              f"{r['compiled_criterion_over_fixmatch']:.3f}")
    for prof in profiles:
        print_profile(prof)
    if mfu:
        table = Table(title=f"MFU of the DebiasPL step as the per-device batch grows ({size} px, mu {args.mu})")
        for col in ("model", "labeled batch", "images/step", "compiled", "step s", "img/s", "MFU bf16", "peak GiB"):
            table.add_column(col, justify="left" if col == "model" else "right")
        for r in mfu:
            if "step_s" not in r:
                table.add_row(r["model"], str(r["batch"]), "-", str(r["compiled"]), "out of memory" if r.get("oom")
                              else r.get("skipped", "-"), "-", "-", "-")
                continue
            table.add_row(r["model"], str(r["batch"]), str(r["images_per_step"]), str(r["compiled"]),
                          f"{r['step_s']:.4f}", f"{r['img_per_s']:.0f}",
                          "-" if r["mfu_bf16"] is None else f"{100 * r['mfu_bf16']:.1f}%",
                          "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.1f}")
        console.print(table)
    if pipeline:
        table = Table(title=f"data pipeline, mnist_demo, {psteps} steps (target: training >= 0.9 x step alone)")
        for col in ("augment_on", "workers", "loader alone img/s", "step alone img/s", "training img/s",
                    "training / step"):
            table.add_column(col, justify="left" if col == "augment_on" else "right")
        for r in pipeline:
            table.add_row(r["augment_on"], str(r["workers"]), f"{r['loader_img_per_s']:.0f}",
                          f"{r['step_img_per_s']:.0f}", f"{r['train_img_per_s']:.0f}", f"{r['train_over_step']:.2f}")
        console.print(table)
    for r in folder:
        console.print(f"folder views at {r['img_size']} px, augment_on={r['augment_on']} ({r['workers']} worker), "
                      f"{r['device']}: {r['img_per_s']:.0f} img/s")
    if e2e:
        console.print(f"`dpl-zoo train` end to end: {e2e['seconds']:.0f} s; top-1 {e2e['top1']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or ("speed_toy.json" if args.toy else "speed.json" if device.type == "cpu" else
                         f"speed_{device.type}.json")
    write_report(out, name, "speed", {"models": models, "device": args.device, "img_size": size, "batch": b,
                                      "mu": args.mu, "multiviews": args.multiviews, "amp": args.amp,
                                      "rounds": rounds, "pipeline_steps": psteps, "toy": args.toy,
                                      "compile_criterion": args.compile_criterion}, t0, console,
                 models=results, pipeline=pipeline, folder_views=folder, end_to_end=e2e, profile=profiles, mfu=mfu)
    return 0


if __name__ == "__main__":
    sys.exit(main())
