"""Step cost of DebiasPL against FixMatch, against a hand-written torch step, and the data pipeline.

For each model (resnet50 and a ViT at a small input size; CUDA too when present):
- DebiasPL step / FixMatch step, same batch (target <= 1.03);
- dpl-zoo step / hand-written step doing the same forward, backward, optimiser and EMA work
  (target <= 1.10): the physical floor of the loop;
- peak memory of the step vs the hand-written step;
and for the embedded MNIST pipeline, loader-only images/s (weak + strong views, the recipe's
workers) vs the images/s the step consumes (target >= 1.5).
Variants are interleaved round by round and medians reported, since absolute times drift.

    python benchmarks/speed.py            # default sizes
    python benchmarks/speed.py --toy      # a smoke run
"""
from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_facts  # noqa: E402

from dpl_zoo.method import DebiasPLLoss  # noqa: E402
from dpl_zoo.task import DebiasPLTask  # noqa: E402

console = Console()


def make_batch(b: int, mu: int, size: int, classes: int, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 3, size, size, generator=g).to(device)
    y = torch.randint(0, classes, (b,), generator=g).to(device)
    views = [torch.randn(mu * b, 3, size, size, generator=g).to(device) for _ in range(2)]
    return x, y, views


def build_model(name: str, size: int, classes: int, device):
    import timm
    kwargs = {"img_size": size} if "vit" in name else {}
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=classes, **kwargs).to(device)


def dpl_step_fn(model, tau: float, classes: int, batch):
    """One step through dpl-zoo: the timm TrainingTask with the DebiasPL criterion and EMAN."""
    task = DebiasPLTask(model, DebiasPLLoss(classes, tau=tau, threshold=0.95, qhat_momentum=0.999),
                        ema_decay=0.999, device=batch[0].device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    state = {"step": 0}

    def step():
        out = task(batch[0], batch[1], batch[2])
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        task.update_ema(step=state["step"] + 10)
        state["step"] += 1
    return step


def hand_step_fn(model, classes: int, batch):
    """The same work written directly in torch: student on labeled + strong views, no-grad EMA
    teacher on weak views, FixMatch-style masked loss, SGD, EMA over parameters and buffers."""
    teacher = copy.deepcopy(model).eval()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    x, y, (weak, strong) = batch
    n = x.shape[0]

    def step():
        logits = model(torch.cat([x, strong]))
        with torch.no_grad():
            p = torch.softmax(teacher(weak).float(), dim=-1)
        maxp, t = p.max(-1)
        loss = F.cross_entropy(logits[:n], y) + (F.cross_entropy(logits[n:], t, reduction="none")
                                                 * maxp.ge(0.95).float()).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            ema = [v for v in teacher.state_dict().values() if v.is_floating_point()]
            cur = [v for v in model.state_dict().values() if v.is_floating_point()]
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


def _peak_memory_worker(kind, name, size, classes, b, mu, device_type, steps, queue):
    import threading
    device = torch.device(device_type)
    model = build_model(name, size, classes, device)
    batch = make_batch(b, mu, size, classes, device)
    fn = hand_step_fn(model, classes, batch) if kind == "hand" else \
        dpl_step_fn(model, 0.4 if kind == "debiaspl" else 0.0, classes, batch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(steps):
            fn()
        queue.put(torch.cuda.max_memory_allocated() - base)
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


def peak_memory(kind, name, size, classes, b, mu, device, steps=3) -> int:
    """Peak memory growth of the step in a fresh process (CPU: max RSS; CUDA: allocator peak)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_peak_memory_worker, args=(kind, name, size, classes, b, mu, device.type, steps, q))
    p.start()
    value = q.get(timeout=600)
    p.join()
    return value


def bench_model(name, size, classes, b, mu, device, rounds, warmup) -> dict:
    batch = make_batch(b, mu, size, classes, device)
    fns = {
        "debiaspl": dpl_step_fn(build_model(name, size, classes, device), 0.4, classes, batch),
        "fixmatch": dpl_step_fn(build_model(name, size, classes, device), 0.0, classes, batch),
        "hand": hand_step_fn(build_model(name, size, classes, device), classes, batch),
    }
    med = time_interleaved(fns, rounds, warmup, _sync(device))
    mem = {k: peak_memory(k, name, size, classes, b, mu, device) for k in ("debiaspl", "hand")}
    return {"model": name, "device": device.type, "img_size": size, "batch": b, "mu": mu, "step_s": med,
            "debiaspl_over_fixmatch": med["debiaspl"] / med["fixmatch"], "debiaspl_over_hand": med["debiaspl"] / med["hand"],
            "peak_bytes": mem, "memory_ratio": mem["debiaspl"] / max(mem["hand"], 1)}


def bench_pipeline(steps: int) -> dict:
    """Loader-only images/s of the embedded recipe vs images/s its training step consumes."""
    from dpl_zoo.config import load_config
    from dpl_zoo.train import build_run, _loaders
    cfg = load_config("mnist_demo", [f"steps_per_epoch={steps}"])
    run = build_run(cfg)
    lab, unl = _loaders(run, epoch=0)
    t = time.perf_counter()
    n = 0
    for (x, _, _), (w, s, _, _) in zip(lab, unl):
        n += x.shape[0] + w.shape[0] + s.shape[0]
    loader_ips = n / (time.perf_counter() - t)
    # the step alone, on one batch held in memory, the recipe's model and method
    lab, unl = _loaders(run, epoch=1)
    (x, y, _), (w, s, _, _) = next(iter(lab)), next(iter(unl))
    task, opt = run.task.train(), run.optimizer

    def step():
        out = task(x, y, [w, s])
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
    med = time_interleaved({"step": step}, rounds=max(3, steps // 2), warmup=2, sync=lambda: None)["step"]
    step_ips = (x.shape[0] + w.shape[0] + s.shape[0]) / med
    return {"recipe": "mnist_demo", "workers": cfg.workers, "loader_img_per_s": loader_ips,
            "step_img_per_s": step_ips, "ratio": loader_ips / step_ips}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet50,vit_small_patch16_224")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=4, help="labeled images per step (unlabeled: mu x batch)")
    p.add_argument("--mu", type=int, default=5)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--pipeline-steps", type=int, default=40)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--toy", action="store_true")
    args = p.parse_args(argv)
    models, size, b, rounds, psteps = args.models.split(","), args.img_size, args.batch, args.rounds, args.pipeline_steps
    if args.toy:
        models, size, b, rounds, psteps = ["test_resnet", "test_vit"], 32, 2, 2, 3
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    t0 = time.perf_counter()
    results = [bench_model(m, size, 10, b, args.mu, d, rounds, warmup=2) for d in devices for m in models]
    pipeline = bench_pipeline(psteps)
    for r in results:
        console.print(f"{r['model']}: peak memory of the step, DebiasPL {r['peak_bytes']['debiaspl'] / 2**20:.0f} MiB, "
                      f"hand-written {r['peak_bytes']['hand'] / 2**20:.0f} MiB")
    table = Table(title=f"step cost, batch {b} + {args.mu * b} unlabeled, {size} px (medians of {rounds} rounds)")
    for col in ("model", "device", "DebiasPL s", "FixMatch s", "hand s", "DPL/FixMatch (<=1.03)",
                "DPL/hand (<=1.10)", "peak mem DPL/hand"):
        table.add_column(col, justify="left" if col in ("model", "device") else "right")
    for r in results:
        s = r["step_s"]
        table.add_row(r["model"], r["device"], f"{s['debiaspl']:.3f}", f"{s['fixmatch']:.3f}", f"{s['hand']:.3f}",
                      f"{r['debiaspl_over_fixmatch']:.3f}", f"{r['debiaspl_over_hand']:.3f}", f"{r['memory_ratio']:.2f}")
    console.print(table)
    console.print(f"data pipeline ({pipeline['recipe']}, {pipeline['workers']} worker): loader "
                  f"{pipeline['loader_img_per_s']:.0f} img/s vs step {pipeline['step_img_per_s']:.0f} img/s: "
                  f"ratio {pipeline['ratio']:.2f} (target >= 1.5)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("speed_toy.json" if args.toy else "speed.json")
    path.write_text(json.dumps({"benchmark": "speed", "date": time.strftime("%Y-%m-%d"), "machine": machine_facts(),
                                "settings": {"models": models, "img_size": size, "batch": b, "mu": args.mu,
                                             "rounds": rounds, "pipeline_steps": psteps, "toy": args.toy},
                                "models": results, "pipeline": pipeline,
                                "seconds": time.perf_counter() - t0}, indent=2))
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
