"""Imbalanced data: which class distribution to debias pseudo-labels towards.

Long-tailed Fashion-MNIST (Debian's ``dataset-fashion-mnist``, or ``--data``): the training
set is subsampled with an exponential class profile (class c keeps ``head x IR^(-c/9)``
images; ``data.long_tail_ratio``), then 1% of each class is labeled (at least one image), the
rest unlabeled, so labeled and unlabeled data share the profile. Arms: FixMatch, DebiasPL
towards uniform (the paper), DebiasPL towards the labeled split's class frequencies
(``dpl.target_prior: labeled``); imbalance ratios 10 and 100; 3 seeds; timm ``test_resnet``
from scratch at 32 px, the embedded default's settings.

Test sets: the balanced Fashion-MNIST test set (1,000 images per class), and the same set
weighted by the training profile: its top-1 is the profile-weighted mean of the per-class
recalls measured on all 10,000 test images (the expected accuracy on a test set drawn with the
training profile, without the noise of a subsample). Balanced accuracy (mean per-class
recall) is the same for both.

    python benchmarks/imbalanced.py           # 70 minutes on 2 CPU cores (2026-11-30)
    python benchmarks/imbalanced.py --toy
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from _common import add_rerun_argument, kl_from, mean_sd, run_jobs, write_report  # noqa: E402

console = Console()
ARMS = {"fixmatch": ["dpl.method=fixmatch"],
        "debiaspl-uniform": ["dpl.method=debiaspl", "dpl.target_prior=uniform"],
        "debiaspl-labeled": ["dpl.method=debiaspl", "dpl.target_prior=labeled"]}


def profile(ratio: float, classes: int = 10) -> list[float]:
    w = [ratio ** (-c / (classes - 1)) for c in range(classes)]
    return [x / sum(w) for x in w]


def scores(summary: dict, ratio: float) -> dict:
    recall = summary["per_class_top1"]
    p = profile(ratio, len(recall))
    return {"balanced_top1": summary["top1"], "balanced_acc": summary["balanced_top1"],
            "lt_top1": sum(pc * r for pc, r in zip(p, recall)), "head_recall": recall[0], "tail_recall": recall[-1],
            "pl_kl_target": summary["pl_kl_target"], "pl_kl_uniform": summary["pl_kl_uniform"],
            # the reference every arm shares: the training set's class profile
            "pl_kl_profile": kl_from(summary["pl_hist"], p),
            "pl_acc": summary["pl_acc"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ratios", default="10,100")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--head", type=int, default=3000, help="images of the most frequent class")
    p.add_argument("--label-fraction", type=float, default=0.01)
    p.add_argument("--data", help="folder with the four Fashion-MNIST IDX files (default: Debian's)")
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results")
    add_rerun_argument(p)
    p.add_argument("--toy", action="store_true")
    args = p.parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",")]
    seeds, steps, head, parallel = args.seeds, args.steps, args.head, args.parallel
    extra = []
    if args.toy:
        ratios, seeds, steps, head, parallel = ratios[:1], 1, 2, 40, 1
        extra = ["data.val_max=50", "data.eval_unlabeled_max=50", "batch_size=4"]
    out = Path(args.out)
    runs = out / "runs" / ("imbalanced-toy" if args.toy else "imbalanced")
    base = ["data.dataset=fashion_mnist", f"data.root={args.data}" if args.data else "data.root=null",
            "data.labels_per_class=null", f"data.label_fraction={args.label_fraction}", "data.hflip=0.5",
            f"data.long_tail_max={head}", "steps_per_epoch=100" if steps >= 100 else f"steps_per_epoch={steps}",
            f"epochs={max(1, steps // 100)}", "eval_interval=5", "workers=0", *extra]
    jobs = []
    for ratio in ratios:
        for seed in range(seeds):
            for arm, sets in ARMS.items():
                jobs.append({"name": f"ir{ratio:g}-{arm}-s{seed}", "recipe": "mnist_demo", "output": str(runs),
                             "overrides": [*base, *sets, f"data.long_tail_ratio={ratio}", f"seed={seed}",
                                           f"data.split_seed={seed}"], "ratio": ratio, "arm": arm, "seed": seed})
    t0 = time.perf_counter()
    results = run_jobs(jobs, rerun_changed=args.rerun_changed, parallel=parallel, console=console,
                       on_done=lambda r: console.print(f"{r['job']['name']}: balanced top-1 {r['top1']:.2f} "
                                                       f"({r['seconds']:.0f} s)"))
    rows = []
    for ratio in ratios:
        for arm in ARMS:
            rs = [scores(r, ratio) for r in results if r["job"]["ratio"] == ratio and r["job"]["arm"] == arm]
            row = {"ratio": ratio, "arm": arm, "seeds": len(rs)}
            for key in rs[0]:
                row[key] = mean_sd([s[key] for s in rs])
            rows.append(row)
    table = Table(title=f"long-tailed Fashion-MNIST, {args.label_fraction:.0%} labels, {steps} steps, {seeds} seeds "
                        f"(mean ± sd)")
    for col in ("IR", "arm", "LT test top-1", "balanced test top-1", "balanced acc.", "tail recall",
                "head recall", "PL KL(training profile)"):
        table.add_column(col)
    for r in rows:
        f = lambda k, spec=".2f": f"{r[k][0]:{spec}} ± {r[k][1]:{spec}}"  # noqa: E731
        table.add_row(f"{r['ratio']:g}", r["arm"], f("lt_top1"), f("balanced_top1"), f("balanced_acc"),
                      f("tail_recall"), f("head_recall"), f("pl_kl_profile", ".3f"))
    console.print(table)
    verdicts = {}
    for ratio in ratios:
        get = {r["arm"]: r for r in rows if r["ratio"] == ratio}
        verdicts[f"IR {ratio:g}: labeled prior best on the LT test"] = (
            get["debiaspl-labeled"]["lt_top1"][0] > max(get["debiaspl-uniform"]["lt_top1"][0],
                                                        get["fixmatch"]["lt_top1"][0]))
        verdicts[f"IR {ratio:g}: uniform best on the balanced test"] = (
            get["debiaspl-uniform"]["balanced_top1"][0] >= max(get["debiaspl-labeled"]["balanced_top1"][0],
                                                               get["fixmatch"]["balanced_top1"][0]))
    for k, v in verdicts.items():
        console.print(f"{k}: {v}")
    write_report(out, "imbalanced_toy.json" if args.toy else "imbalanced.json", "imbalanced",
                 {"ratios": ratios, "seeds": seeds, "steps": steps, "head": head, "label_fraction": args.label_fraction,
                  "parallel": parallel, "overrides": base}, t0, console, table=rows, verdicts=verdicts,
                 runs=[{**r, "scores": scores(r, r["job"]["ratio"])} for r in results])
    return 0


if __name__ == "__main__":
    sys.exit(main())
