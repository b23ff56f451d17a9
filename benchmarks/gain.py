"""Accuracy gain and pseudo-label balance: FixMatch vs DebiasPL (and supervised-only).

Runs the embedded real MNIST digits at several label budgets and seeds with the same
model, steps and data for every method, then an ablation over tau, qhat momentum and
the two components alone. Prints rich tables, writes every run's numbers to JSON, and
draws the pseudo-label class histograms of both methods (the paper's figure) when
matplotlib is installed (``pip install 'dpl-zoo[bench]'``).

    python benchmarks/gain.py                      # 1,000 steps, 5 seeds, 1 and 2 labels per class
    python benchmarks/gain.py --ablation           # plus the tau / momentum / component ablation
    python benchmarks/gain.py --toy                # a seconds-long smoke run
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from _common import add_rerun_argument, mean_sd, run_jobs, write_report  # noqa: E402

console = Console()

ABLATIONS = [  # (label, overrides): tau x qhat momentum, then each component alone, at the default budget
    *[(f"tau {t}, m {m}", {"dpl.tau": t, "dpl.qhat_momentum": m}) for m in (0.99, 0.999) for t in (0.25, 0.5, 1.0)],
    ("tau 0 (FixMatch)", {"dpl.method": "fixmatch"}),
    ("debiased pseudo-labels only", {"dpl.margin": False}),
    ("adaptive margin only", {"dpl.debias": False}),
]


def job(out: Path, name: str, overrides: dict, base: dict) -> dict:
    sets = {**base, **overrides}
    return {"name": name, "recipe": "mnist_demo", "output": str(out / "runs" / "gain"),
            "overrides": [f"{k}={v}" for k, v in sets.items()], "label": name}


def gain_table(results: list[dict], budgets: list[int], methods: list[str]) -> tuple[Table, list[dict]]:
    table = Table(title="test top-1 (mean ± sd over seeds) and pseudo-labels at the end of training")
    for col in ("labels/class", "method", "top-1", "PL acc", "mask", "PL KL(unif)", "PL max/min", "gain vs FixMatch"):
        table.add_column(col, justify="left" if col == "method" else "right")
    rows = []
    for k in budgets:
        fm = mean_sd([r["top1"] for r in results if r["budget"] == k and r["method"] == "fixmatch"])
        for m in methods:
            rs = [r for r in results if r["budget"] == k and r["method"] == m]
            top1, pl, mask, kl, ratio = (mean_sd([r[f] for r in rs]) for f in
                                         ("top1", "pl_acc", "mask_rate", "pl_kl_uniform", "pl_max_min_ratio"))
            gains = [r["top1"] - f["top1"] for r in rs for f in results
                     if f["budget"] == k and f["method"] == "fixmatch" and f["seed"] == r["seed"]]
            gain = mean_sd(gains) if m != "fixmatch" else (float("nan"), float("nan"))
            wins = sum(g > 0 for g in gains) if m != "fixmatch" else None
            row = {"budget": k, "method": m, "top1_mean": top1[0], "top1_sd": top1[1], "pl_acc_mean": pl[0],
                   "mask_rate_mean": mask[0], "pl_kl_mean": kl[0], "pl_kl_sd": kl[1], "pl_max_min_mean": ratio[0],
                   "gain_mean": gain[0], "gain_sd": gain[1], "fixmatch_top1_sd": fm[1], "seeds": len(rs),
                   "wins": wins, "gains": gains}
            rows.append(row)
            table.add_row(str(k), m, f"{top1[0]:.2f} ± {top1[1]:.2f}", f"{pl[0]:.2f}", f"{mask[0]:.2f}",
                          f"{kl[0]:.3f} ± {kl[1]:.3f}", f"{ratio[0]:.1f}",
                          "-" if m == "fixmatch" else f"{gain[0]:+.2f} ± {gain[1]:.2f} (won {wins}/{len(gains)})")
    return table, rows


def ablation_table(results: list[dict]) -> Table:
    table = Table(title="ablation at the default budget (one seed)")
    for col in ("setting", "top-1", "PL acc", "PL KL(unif)", "PL max/min"):
        table.add_column(col, justify="left" if col == "setting" else "right")
    for r in results:
        table.add_row(r["label"], f"{r['top1']:.2f}", f"{r['pl_acc'] or float('nan'):.2f}",
                      f"{r['pl_kl_uniform']:.3f}", f"{r['pl_max_min_ratio']:.1f}")
    return table


def plot_histograms(results: list[dict], budget: int, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        console.print("matplotlib not installed: no figure (pip install 'dpl-zoo[bench]')")
        return False
    picks = {m: next((r for r in results if r["method"] == m and r["budget"] == budget), None)
             for m in ("fixmatch", "debiaspl")}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=True)
    for ax, (m, r) in zip(axes, picks.items()):
        if r is None:
            continue
        hist = sorted(r["pl_hist"], reverse=True)
        ax.bar(range(len(hist)), hist, color="#d62728" if m == "fixmatch" else "#1f77b4")
        ax.set_title(f"{'FixMatch' if m == 'fixmatch' else 'DebiasPL'}: top-1 {r['top1']:.1f}%, "
                     f"KL {r['pl_kl_uniform']:.3f}")
        ax.set_xlabel("classes sorted by pseudo-label count")
    axes[0].set_ylabel("pseudo-labels on the unlabeled set")
    fig.suptitle(f"Pseudo-label class distribution, MNIST, {budget} labels per class (seed {picks['debiaspl']['seed']})"
                 if picks["debiaspl"] else "Pseudo-label class distribution")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", default="1,2", help="labels per class")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--methods", default="supervised,fixmatch,debiaspl")
    p.add_argument("--steps", type=int, default=1000, help="training steps per run (the default recipe's 1,000)")
    p.add_argument("--ablation", action="store_true", help="also the tau x momentum and component ablation")
    p.add_argument("--parallel", type=int, default=2, help="single-thread runs side by side")
    p.add_argument("--out", default="benchmarks/results")
    add_rerun_argument(p)
    p.add_argument("--toy", action="store_true", help="smoke run: 1 budget, 1 seed, 2 steps")
    args = p.parse_args(argv)
    budgets = [int(b) for b in args.budgets.split(",")]
    methods = args.methods.split(",")
    seeds, steps = args.seeds, args.steps
    out = Path(args.out)
    base = {"steps_per_epoch": 100, "epochs": max(1, steps // 100), "eval_interval": 5, "workers": 0}
    parallel = args.parallel
    if args.toy:
        budgets, seeds, parallel = budgets[:1], 1, 1
        base = {"steps_per_epoch": 2, "epochs": 1, "workers": 0, "data.eval_unlabeled_max": 200, "data.val_max": 50}
    tag = "toy" if args.toy else f"{steps}"
    t0 = time.perf_counter()
    jobs = []
    for k in budgets:
        for seed in range(seeds):
            for m in methods:
                j = job(out, f"{tag}-{k}pc-{m}-s{seed}", {"data.labels_per_class": k, "seed": seed,
                                                         "data.split_seed": seed, "dpl.method": m}, base)
                j.update(budget=k, method=m, seed=seed)
                jobs.append(j)
    ablation_jobs = []
    default_budget = 2 if 2 in budgets else budgets[0]
    if args.ablation or args.toy:
        for label, overrides in (ABLATIONS[:2] if args.toy else ABLATIONS):
            name = f"{tag}-ablation-" + "".join(c if c.isalnum() else "_" for c in label)
            j = job(out, name, {"data.labels_per_class": default_budget, "seed": 0, "data.split_seed": 0,
                                **overrides}, base)
            j["label"] = label
            ablation_jobs.append(j)
    done = run_jobs(jobs + ablation_jobs, rerun_changed=args.rerun_changed, parallel=parallel, console=console,
                    on_done=lambda r: console.print(f"{r['job']['name']}: top-1 {r['top1']:.2f} ({r['seconds']:.0f} s)"))
    results = []
    for r in done[:len(jobs)]:
        r.update(budget=r["job"]["budget"], method=r["job"]["method"], seed=r["job"]["seed"])
        results.append(r)
    table, rows = gain_table(results, budgets, methods)
    console.print(table)
    ablation = []
    for r in done[len(jobs):]:
        r["label"] = r["job"]["label"]
        ablation.append(r)
    if ablation:
        console.print(ablation_table(ablation))
    figure = out / ("pseudo_label_histograms_toy.png" if args.toy else "pseudo_label_histograms.png")
    plotted = plot_histograms(results, default_budget, figure)
    write_report(out, "gain_toy.json" if args.toy else "gain.json", "gain",
                 {"recipe": "mnist_demo", "budgets": budgets, "seeds": seeds, "methods": methods, "overrides": base,
                  "parallel": parallel}, t0, console, table=rows, runs=results, ablation=ablation,
                 figure=str(figure) if plotted else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
