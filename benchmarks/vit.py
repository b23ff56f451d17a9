"""A ViT with DebiasPL against FixMatch on the embedded MNIST digits, from scratch.

timm's ``vit_tiny_patch16_224`` architecture shrunk to what a 32 px digit and a CPU allow:
patch 8 (16 tokens), width 96, depth 6, 3 heads (about 0.7 M parameters), AdamW with timm's
layer-wise lr decay, the embedded default's data and method settings otherwise. A from-scratch
ViT needs more labels than the ResNet to learn at all: ``--labels`` per class (default 10).

    python benchmarks/vit.py            # 3 seeds x {supervised, FixMatch, DebiasPL}
    python benchmarks/vit.py --toy
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
METHODS = ("supervised", "fixmatch", "debiaspl")
VIT = ["model=vit_tiny_patch16_224", "img_size=32",
       "model_kwargs={patch_size: 8, embed_dim: 96, depth: 6, num_heads: 3}",
       "opt=adamw", "lr=0.001", "weight_decay=0.05", "layer_decay=0.9", "warmup_epochs=1", "clip_grad=1.0"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--labels", type=int, default=10, help="labels per class")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results")
    add_rerun_argument(p)
    p.add_argument("--toy", action="store_true")
    args = p.parse_args(argv)
    seeds, steps, parallel = args.seeds, args.steps, args.parallel
    extra = []
    if args.toy:
        seeds, steps, parallel = 1, 2, 1
        extra = ["data.val_max=50", "data.eval_unlabeled_max=50", "warmup_epochs=0"]
    runs = Path(args.out) / "runs" / ("vit-toy" if args.toy else "vit")
    base = [*VIT, f"data.labels_per_class={args.labels}", f"steps_per_epoch={min(100, steps)}",
            f"epochs={max(1, steps // 100)}", "eval_interval=5", "workers=0", *extra]
    jobs = [{"name": f"{m}-s{s}", "recipe": "mnist_demo", "output": str(runs), "method": m, "seed": s,
             "overrides": [*base, f"dpl.method={m}", f"seed={s}", f"data.split_seed={s}"]}
            for s in range(seeds) for m in METHODS]
    t0 = time.perf_counter()
    results = run_jobs(jobs, rerun_changed=args.rerun_changed, parallel=parallel, console=console,
                       on_done=lambda r: console.print(f"{r['job']['name']}: top-1 {r['top1']:.2f} ({r['seconds']:.0f} s)"))
    rows = []
    for m in METHODS:
        rs = [r for r in results if r["job"]["method"] == m]
        fm = {r["job"]["seed"]: r["top1"] for r in results if r["job"]["method"] == "fixmatch"}
        gains = [r["top1"] - fm[r["job"]["seed"]] for r in rs] if m != "fixmatch" else []
        rows.append({"method": m, "seeds": len(rs), "top1": mean_sd([r["top1"] for r in rs]),
                     "pl_acc": mean_sd([r["pl_acc"] for r in rs]), "pl_kl": mean_sd([r["pl_kl_uniform"] for r in rs]),
                     "gain": mean_sd(gains) if gains else None, "wins": sum(g > 0 for g in gains) if gains else None,
                     "params": rs[0].get("params"), "seconds": mean_sd([r["seconds"] for r in rs])[0]})
    table = Table(title=f"ViT (patch 8, width 96, depth 6) from scratch, MNIST, {args.labels} labels per class, "
                        f"{steps} steps, {seeds} seeds")
    for col in ("method", "test top-1", "accepted PL acc.", "PL KL(uniform)", "gain vs FixMatch", "s / run"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["method"], f"{r['top1'][0]:.2f} ± {r['top1'][1]:.2f}",
                      "-" if r["method"] == "supervised" else f"{r['pl_acc'][0]:.2f}",
                      "-" if r["method"] == "supervised" else f"{r['pl_kl'][0]:.3f}",
                      "-" if r["gain"] is None else f"{r['gain'][0]:+.2f} ± {r['gain'][1]:.2f} (won {r['wins']})",
                      f"{r['seconds']:.0f}")
    console.print(table)
    write_report(Path(args.out), "vit_toy.json" if args.toy else "vit.json", "vit",
                 {"labels_per_class": args.labels, "seeds": seeds, "steps": steps, "overrides": base,
                  "parallel": parallel}, t0, console, table=rows, runs=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
