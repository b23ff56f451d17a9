"""The peer a user would pick instead, side by side: USB (PyPI ``semilearn`` 0.3.2, MIT) FixMatch,
FlexMatch, FreeMatch, SoftMatch and its DebiasPL beside this project's FixMatch and DebiasPL.

Every run of a task shares the split (the labeled positions our split code writes, one CSV per
seed, read by both libraries; unlabeled: every other training image), the network (dpl-zoo's
``build_model`` after the same seeding, so backbone and initialisation are identical), the image
size, labeled batch, mu, steps, learning rate, weight decay, EMA decay, confidence threshold,
seeds and test images. Each library keeps its own augmentation, optimiser schedule and
algorithm-specific settings (USB's defaults). Both are scored by dpl-zoo's counters on the same
test images: top-1 and per-class top-1 of the EMA weights (the model both libraries evaluate),
the pseudo-labels each algorithm would make on the same unlabeled images (KL from the target
distribution), and training images/s (labeled + weak + strong images per second of training,
evaluation excluded). Reported: mean +- sd over seeds, and per seed the paired difference of our
DebiasPL against every USB arm (``compare``).

Sizes: ``--full`` (a GPU: Fashion-MNIST, EfficientNet-Lite0 from ImageNet; the GPU check runs it),
``--size cpu`` (two CPU cores: the embedded MNIST digits at 2 labels per class and Fashion-MNIST
at 4, ``test_resnet`` from scratch; USB's CUDA calls emulated on the CPU), ``--toy`` (the tests).

USB trains only on CUDA. It runs in its own environment (``usb_runner.py``): wheels prepared here
(``--prepare``: semilearn with ``--no-deps`` and the two small packages it imports at start,
``progress`` and ``ruamel.yaml``; about 0.3 MB) are installed with ``pip --target`` into a folder
only the USB processes put on their path; it is never a dependency of dpl-zoo.

    python benchmarks/usb_peer.py --prepare                  # with network (PyPI)
    python benchmarks/usb_peer.py --full --device cuda       # on a GPU (the GPU check runs it)
    python benchmarks/usb_peer.py --size cpu --cpu-emulate   # on 2 CPU cores (docs/results/usb-peer.md)
    python benchmarks/usb_peer.py --toy --cpu-emulate        # CPU test
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from _common import core_slices, mean_sd, paired_difference, write_report  # noqa: E402
from usb_runner import STUBBED  # noqa: E402

console = Console(width=None if sys.stdout.isatty() else 150)
WHEELS = ROOT / ".gpu" / "usb" / "wheels"
PINS = ("semilearn==0.3.2", "progress==1.6.1", "ruamel.yaml==0.19.1")
USB_ALGORITHMS = ("fixmatch", "flexmatch", "freematch", "softmatch", "debiaspl")
# our arms: the shared settings unless named here; debiaspl-recipe is the finetune recipe's tau and threshold;
# debiaspl-sat composes the debiasing with FreeMatch's self-adaptive threshold (its momentum 0.999, FreeMatch's)
OUR_ARMS = {"fixmatch": {"method": "fixmatch"}, "debiaspl": {"method": "debiaspl"},
            "debiaspl-recipe": {"method": "debiaspl", "tau": 2.0, "threshold": 0.7},
            "debiaspl-sat": {"method": "debiaspl", "threshold_mode": "self_adaptive"},
            "supervised": {"method": "supervised"},
            # ablations (--ours): the student makes the pseudo-labels and the EMA is only evaluated, as in USB;
            # FreeMatch's threshold on our FixMatch (without FreeMatch's fairness term)
            "fixmatch-student": {"method": "fixmatch", "ema_teacher": False, "model_ema_eval": True},
            "fixmatch-sat": {"method": "fixmatch", "threshold_mode": "self_adaptive"},
            "debiaspl-sat-student": {"method": "debiaspl", "threshold_mode": "self_adaptive", "ema_teacher": False,
                                     "model_ema_eval": True},
            # our FixMatch with what USB's FixMatch does differently in its optimiser and augmentation: Nesterov,
            # a cosine that ends near USB's cos(7 pi / 16) x lr, RandAugment with 3 operations at magnitude 5
            "fixmatch-usb-like": {"method": "fixmatch", "usb_like": True}}
TABLE_ARMS = ["fixmatch", "debiaspl", "debiaspl-recipe", "debiaspl-sat", "supervised"]   # the sizes' own
LITE0_MEAN, LITE0_STD = (0.498, 0.498, 0.498), (0.502, 0.502, 0.502)   # the weights' (x - 127) / 128
HALF = (0.5, 0.5, 0.5)
# a task: the data, the network and its start, and what depends on them
FASHION_LITE0 = dict(task="fashion-lite0", dataset="fashion_mnist", model="tf_efficientnet_lite0", start="imagenet",
                     img_size=64, labels_per_class=4, steps=600, test=10000, lr=0.01, mean=LITE0_MEAN,
                     std=LITE0_STD, hflip=True, scale=(0.6, 1.0))
# the CPU tasks' steps: half the embedded default's 1,000 and 300 (not 500) on Fashion-MNIST, so three seeds of
# all nine arms fit about an hour of two shared cores (USB's own CPU pipeline costs ~0.3 s a step here)
DIGITS = dict(task="digits", dataset="mnist", model="test_resnet", start="scratch", img_size=32, labels_per_class=2,
              steps=500, test=2000, lr=0.03, mean=HALF, std=HALF, hflip=False, scale=(0.7, 1.0))
FASHION = dict(task="fashion", dataset="fashion_mnist", model="test_resnet", start="scratch", img_size=32,
               labels_per_class=4, steps=300, test=2000, lr=0.03, mean=HALF, std=HALF, hflip=True, scale=(0.7, 1.0))
LOG_EVERY = 50   # steps between logged means (both libraries): the mask-rate curves' resolution
TOY = dict(img_size=32, steps=2, labels_per_class=2, test=20)
SIZES = {  # labeled batch, mu, seeds, runs side by side, loader workers, the tasks, the arms
    "full": dict(batch=16, mu=3, seeds=3, parallel=6, workers=1, tasks=[FASHION_LITE0],
                 usb=["fixmatch", "freematch", "softmatch", "debiaspl"], ours=["fixmatch", "debiaspl"]),
    "cpu": dict(batch=16, mu=3, seeds=3, parallel=2, workers=0, tasks=[DIGITS, FASHION],
                usb=list(USB_ALGORITHMS), ours=TABLE_ARMS),
    "toy": dict(batch=2, mu=2, seeds=1, parallel=2, workers=0, tasks=[{**FASHION_LITE0, **TOY}, {**DIGITS, **TOY}],
                usb=list(USB_ALGORITHMS), ours=TABLE_ARMS),
}
# what both libraries are given alike, besides each task's lr (each library's algorithm-specific settings keep
# their defaults)
SHARED = dict(momentum=0.9, weight_decay=5e-4, ema=0.99, threshold=0.95, tau=0.5, prior_momentum=0.99)


# --- preparation, here --------------------------------------------------------------------------

def prepare(dest: Path = WHEELS) -> int:
    """Download the wheels USB needs (pure Python, any platform) for an offline machine."""
    dest.mkdir(parents=True, exist_ok=True)
    for pin in PINS:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "-d", str(dest), pin], check=True)
    size = sum(p.stat().st_size for p in dest.glob("*.whl"))
    console.print(f"USB wheels in {dest}: {', '.join(sorted(p.name for p in dest.glob('*.whl')))} "
                  f"({size / 2**20:.2f} MiB)")
    return size


def install(wheels: Path, site: Path) -> Path:
    """USB's own environment: the wheels installed into ``site`` (once per set of wheels)."""
    files = sorted(wheels.glob("*.whl"))
    if not any(f.name.startswith("semilearn-") for f in files):
        raise FileNotFoundError(f"no semilearn wheel in {wheels}: run `python benchmarks/usb_peer.py --prepare` "
                                f"where there is network, and carry .gpu")
    marker = site / ".installed"
    names = "\n".join(f.name for f in files)
    if not (marker.is_file() and marker.read_text() == names):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--upgrade", "--target", str(site), *map(str, files)], check=True)
        marker.write_text(names)
    return site


# --- the shared split and the jobs ----------------------------------------------------------------

def load_task_data(task: dict, data: str | None):
    """``(train, test)`` of a task as dpl-zoo loads them (``data``: the Fashion-MNIST folder)."""
    from dpl_zoo.config import load_config
    from dpl_zoo.datasets import load_datasets
    cfg = load_config("finetune", [f"data.dataset={task['dataset']}", "data.val_root=null",
                                   f"data.root={data}" if data and task["dataset"] == "fashion_mnist" else
                                   "data.root=null"])
    return load_datasets(cfg.data)


def write_splits(size: dict, data: str | None, out: Path) -> dict[tuple[str, int], Path]:
    """One CSV of labeled positions per task and seed, written by our split code; both libraries read it."""
    from dpl_zoo.data import split_labeled, write_split_csv
    (out / "splits").mkdir(parents=True, exist_ok=True)
    paths = {}
    for task in size["tasks"]:
        train, _ = load_task_data(task, data)
        for seed in range(size["seeds"]):
            split = split_labeled(train.targets, len(train.classes), labels_per_class=task["labels_per_class"],
                                  seed=seed)
            paths[task["task"], seed] = out / "splits" / f"{task['task']}-seed{seed}.csv"
            write_split_csv(paths[task["task"], seed], split.labeled)
    return paths


def jobs_for(size: dict, splits: dict, usb=None, ours=None) -> list[dict]:
    """Seed by seed (task by task within a seed), so a time limit still leaves whole comparisons."""
    usb, ours = usb if usb is not None else size["usb"], ours if ours is not None else size["ours"]
    jobs = []
    for seed in range(size["seeds"]):
        for task in size["tasks"]:
            t, split = task["task"], str(splits[task["task"], seed])
            jobs += [{"lib": "usb", "algorithm": a, "task": t, "seed": seed, "split": split,
                      "name": f"{t}-usb-{a}-s{seed}"} for a in usb]
            jobs += [{"lib": "dpl-zoo", "algorithm": a, "task": t, "seed": seed, "split": split,
                      "name": f"{t}-dpl-zoo-{a}-s{seed}"} for a in ours]
    return jobs


def task_of(size: dict, job: dict) -> dict:
    return next(t for t in size["tasks"] if t["task"] == job["task"])


def usb_config(job: dict, size: dict, device: str, out: Path) -> dict:
    """USB's argument namespace for one run (``semilearn.lighting.config.get_config`` adds the
    algorithm's own defaults). USB's DebiasPL is an 'imbalanced algorithm' on top of FixMatch. The
    dataset name is one USB does not know, so it loads nothing itself."""
    task = task_of(size, job)
    debiaspl = job["algorithm"] == "debiaspl"
    return {
        "algorithm": "fixmatch" if debiaspl else job["algorithm"], "imb_algorithm": "debiaspl" if debiaspl else None,
        "net": task["model"], "use_pretrain": False, "dataset": f"dpl_zoo_{task['task']}", "num_classes": 10,
        "num_labels": task["labels_per_class"] * 10, "img_size": task["img_size"], "crop_ratio": 0.875,
        "batch_size": size["batch"], "uratio": size["mu"], "eval_batch_size": 256,
        "epoch": 1, "num_train_iter": task["steps"], "num_eval_iter": task["steps"], "num_log_iter": LOG_EVERY,
        "num_warmup_iter": 0, "optim": "SGD", "lr": task["lr"], "momentum": SHARED["momentum"],
        "weight_decay": SHARED["weight_decay"], "layer_decay": 1.0, "ema_m": SHARED["ema"],
        "ulb_loss_ratio": 1.0, "p_cutoff": SHARED["threshold"], "hard_label": True,
        "debiaspl_tau": SHARED["tau"], "debiaspl_ema_p": SHARED["prior_momentum"],
        "amp": device == "cuda", "use_cat": True, "clip_grad": 0.0, "num_workers": size["workers"],
        "seed": job["seed"], "gpu": 0 if device == "cuda" else None, "distributed": False, "world_size": 1,
        "rank": 0, "multiprocessing_distributed": False, "include_lb_to_ulb": False,
        "save_dir": str(out / "usb-runs"), "save_name": job["name"], "resume": False, "overwrite": True,
        "use_tensorboard": False, "use_wandb": False, "use_aim": False,
    }


def ours_overrides(job: dict, size: dict, args, out: Path) -> list[str]:
    """The same run through dpl-zoo's ``finetune`` recipe (as benchmarks/finetune.py builds it); a
    network from scratch trains every layer at the full lr, in NHWC (the embedded default's choice)."""
    task = task_of(size, job)
    arm = {"tau": SHARED["tau"], "threshold": SHARED["threshold"], "threshold_mode": "fixed", "ema_teacher": True,
           "model_ema_eval": False, **OUR_ARMS[job["algorithm"]]}
    scratch = task["start"] == "scratch"
    start = ["initial_checkpoint=null", "backbone_lr_scale=1.0", "channels_last=true"] if scratch else \
        [f"initial_checkpoint={args.weights}"]
    fashion = task["dataset"] == "fashion_mnist" and args.data
    return [
        f"model={task['model']}", *start, "pretrained=false",
        f"img_size={task['img_size']}", f"data.dataset={task['dataset']}",
        f"data.root={args.data}" if fashion else "data.root=null", "data.val_root=null",
        "data.label_fraction=null", "data.labels_per_class=null", f"data.labeled_csv={job['split']}",
        f"data.hflip={0.5 if task['hflip'] else 0.0}", f"data.scale=[{task['scale'][0]}, {task['scale'][1]}]",
        "data.augment_on=device", f"data.val_max={task['test']}",
        f"data.eval_unlabeled_max={min(task['test'], 2000)}",
        f"mean=[{', '.join(map(str, task['mean']))}]", f"std=[{', '.join(map(str, task['std']))}]", "crop_pct=1.0",
        f"batch_size={size['batch']}", f"dpl.mu={size['mu']}", "epochs=1", f"steps_per_epoch={task['steps']}",
        "eval_interval=1", "warmup_epochs=0", f"lr={task['lr']}", f"momentum={SHARED['momentum']}",
        f"weight_decay={SHARED['weight_decay']}", f"model_ema_decay={SHARED['ema']}",
        f"dpl.qhat_momentum={SHARED['prior_momentum']}", f"dpl.tau={arm['tau']}",
        f"dpl.threshold={arm['threshold']}", f"dpl.threshold_mode={arm['threshold_mode']}",
        f"dpl.method={arm['method']}", f"dpl.ema_teacher={str(arm['ema_teacher']).lower()}",
        f"model_ema_eval={str(arm['model_ema_eval']).lower()}", f"seed={job['seed']}",
        *([f"opt=nesterov", f"min_lr={task['lr'] * math.cos(7 * math.pi / 16):.6g}", "data.strong_aa=rand-m5-n3"]
          if arm.get("usb_like") else []),
        f"data.split_seed={job['seed']}", f"workers={size['workers']}", f"device={args.device}",
        "amp=" + ("true" if args.device == "cuda" else "false"), f"log_interval={LOG_EVERY}",
        f"output={out / 'dpl-zoo-runs'}", f"experiment={job['name']}",
    ]


# --- one run, in its own process ------------------------------------------------------------------

def run_usb_job(job: dict, size: dict, args, out: Path) -> dict:
    """USB's run on our split and our network (``usb_runner.train_usb``), on the test images and
    unlabeled diagnostic images our run of the same job evaluates."""
    import torch

    from dpl_zoo.config import load_config
    from dpl_zoo.data import read_split_csv, subsample
    from dpl_zoo.models import build_model
    from dpl_zoo.runtime import seed_everything
    from usb_runner import train_usb
    if not args.cpu_emulate and not torch.cuda.is_available():
        return {**job, "status": "refused", "detail": "USB: 'ONLY GPU TRAINING IS SUPPORTED' (no CUDA device)"}
    task = task_of(size, job)
    ours = load_config("finetune", ours_overrides({**job, "algorithm": "fixmatch"}, size, args, out))

    def build(num_classes: int):   # as our run builds it: the same seed, so the same initial weights
        seed_everything(ours.seed)
        return build_model(ours, num_classes)
    train, test = load_task_data(task, args.data)
    labeled = read_split_csv(job["split"])
    labeled_set = set(labeled)
    unlabeled = [i for i in range(len(train)) if i not in labeled_set]
    test_idx = subsample(range(len(test)), task["test"], job["seed"] + 1)   # our data.val_max subset
    diag = subsample(unlabeled, ours.data.eval_unlabeled_max, job["seed"])   # our pseudo-label diagnostics
    import numpy as np
    result = train_usb(usb_config(job, size, "cuda" if not args.cpu_emulate else "cpu", out), build,
                       train.images, train.targets, labeled, unlabeled, test.images[test_idx],
                       np.asarray(test.targets)[test_idx].tolist(), diag=diag, img_size=task["img_size"],
                       mean=task["mean"], std=task["std"], cpu_emulate=args.cpu_emulate)
    return {**job, "status": "ok", "evaluated": "EMA weights", **result}


def run_ours_job(job: dict, size: dict, args, out: Path) -> dict:
    from dpl_zoo.config import load_config
    from dpl_zoo.train import fit
    cfg = load_config("finetune", ours_overrides(job, size, args, out))
    summary = fit(cfg, quiet=True)
    rows = [json.loads(line) for line in (out / "dpl-zoo-runs" / job["name"] / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    epoch = [r for r in rows if r["kind"] == "epoch"][-1]
    teacher = epoch["eval"].get("teacher", epoch["eval"]["student"])
    pl = epoch["eval"].get("pseudo_labels", {})
    curve = [r["mask_rate"] for r in rows if r["kind"] == "train"]   # LOG_EVERY-step means, as usb_runner bins USB's
    return {**job, "status": "ok", "top1": summary["teacher_top1"],
            "evaluated": "EMA weights" + (" (the EMAN teacher)" if cfg.dpl.ema_teacher else ", evaluated only"),
            "per_class_top1": teacher["per_class_top1"], "student_top1": summary["top1"],
            "pl_hist": pl.get("pl_hist"), "pl_kl_target": pl.get("pl_kl_target"),
            "pl_kl_uniform": pl.get("pl_kl_uniform"), "pl_acc_all": pl.get("pl_acc_all"),
            "seconds": summary["seconds"], "img_per_s": epoch["img_per_s"], "steps": summary["steps"],
            "mask_rate_mean": epoch["mask_rate"], "mask_curve": curve}   # one epoch: its mean is the run's


def run_key(key: str, job: dict) -> str:
    """What one finished run depends on: the call's settings ``key`` and, for our arms, the arm's own
    settings, so a run is made again when its arm's definition changes."""
    arm = OUR_ARMS.get(job["algorithm"]) if job["lib"] == "dpl-zoo" else None
    return key if arm is None else hashlib.sha256(json.dumps([key, arm], sort_keys=True).encode()).hexdigest()[:16]


def worker(jobs_file: Path, name: str) -> int:
    """Run one job in this process and write its result (a failed run is reported; the others still run)."""
    spec = json.loads(jobs_file.read_text())
    args, size, out = argparse.Namespace(**spec["args"]), spec["size"], Path(spec["out"])
    job = next(j for j in spec["jobs"] if j["name"] == name)
    path = out / "runs" / f"{name}.json"
    t = time.perf_counter()
    try:
        result = (run_usb_job if job["lib"] == "usb" else run_ours_job)(job, size, args, out)
    except Exception as e:  # noqa: BLE001 - reported in the table, with the traceback in the log
        import traceback
        traceback.print_exc()
        result = {**job, "status": "failed", "detail": f"{type(e).__name__}: {e}"[:400]}
    result["wall_seconds"] = time.perf_counter() - t
    result["settings_key"] = run_key(spec["key"], job)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    console.print(f"{name}: {result['status']} "
                  + (f"top-1 {result['top1']:.2f}, {result['img_per_s']:.0f} img/s" if result["status"] == "ok"
                     else result.get("detail", "")))
    return 0


def schedule(pending: list[dict], spec: Path, env: dict, parallel: int, end: float | None) -> None:
    """Each job in its own process (USB's import-time stubs and CUDA emulation never meet a dpl-zoo
    run), ``parallel`` at a time, each pinned to its own slice of the cores; after ``end`` (a
    ``time.time()``) the runs still going are stopped and no new one starts."""
    slots = core_slices(parallel)
    running: dict[int, subprocess.Popen] = {}
    queue = list(pending)
    signal.signal(signal.SIGTERM, lambda *a: (_stop(list(running.values())), sys.exit(143)))
    while queue or running:
        if end is not None and time.time() > end:
            console.print("--max-minutes: stopping the runs still going")
            _stop(list(running.values()))
            return
        for slot in [s for s in range(parallel) if s not in running or running[s].poll() is not None]:
            running.pop(slot, None)
            if queue:
                job = queue.pop(0)
                running[slot] = subprocess.Popen(
                    [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec), job["name"]], env=env,
                    cwd=ROOT, preexec_fn=lambda c=slots[slot]: os.sched_setaffinity(0, c))
        time.sleep(0.5)


def _stop(procs: list) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.time() + 5
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()


# --- the comparison --------------------------------------------------------------------------------

def compare(results: list[dict], usb, ours) -> dict:
    """Per task: each arm's top-1 mean +- sd, pseudo-label KL from the target and images/s; the paired
    difference of each of our DebiasPL arms against each USB arm; our images/s over USB's for the
    algorithms both libraries have (the same seed, then their mean)."""
    out = {"rows": [], "paired": [], "speed": []}
    tasks = list(dict.fromkeys(r["task"] for r in results))
    for task in tasks:
        ok = {(lib, a): {r["seed"]: r for r in results if r["task"] == task and r["lib"] == lib
                         and r["algorithm"] == a and r["status"] == "ok"}
              for lib, algs in (("usb", usb), ("dpl-zoo", ours)) for a in algs}
        for (lib, a), by_seed in ok.items():
            rs = [by_seed[s] for s in sorted(by_seed)]
            why = sorted({r.get("detail", r["status"]) for r in results if r["task"] == task and r["lib"] == lib
                          and r["algorithm"] == a and r["status"] != "ok"})
            top1, ips = mean_sd([r["top1"] for r in rs]), mean_sd([r["img_per_s"] for r in rs])
            kl = mean_sd([r.get("pl_kl_target") for r in rs])
            curves = [r["mask_curve"] for r in rs if r.get("mask_curve")]
            out["rows"].append({"task": task, "lib": lib, "algorithm": a, "seeds": len(rs), "top1_mean": top1[0],
                                "top1_sd": top1[1], "top1_per_seed": [r["top1"] for r in rs],
                                "pl_kl_target_mean": kl[0], "pl_kl_target_sd": kl[1], "img_per_s_mean": ips[0],
                                "seconds_mean": mean_sd([r["seconds"] for r in rs])[0],
                                # the share of unlabeled images the unlabeled loss used, over training
                                "mask_rate_mean": mean_sd([r.get("mask_rate_mean") for r in rs])[0],
                                "mask_curve": [sum(c) / len(c) for c in zip(*curves)] if curves else [],
                                "not_ok": why})
        for mine in [a for a in ours if a.startswith("debiaspl")]:
            for theirs in usb:
                pair = paired_difference({s: r["top1"] for s, r in ok[("dpl-zoo", mine)].items()},
                               {s: r["top1"] for s, r in ok[("usb", theirs)].items()})
                if pair["seeds"]:   # arms run on other seeds only are not compared
                    out["paired"].append({"task": task, "ours": mine, "usb": theirs, **pair})
        for a in [a for a in ours if a in usb]:
            mine, theirs = ok[("dpl-zoo", a)], ok[("usb", a)]
            seeds = sorted(set(mine) & set(theirs))
            if not seeds:
                continue
            ratios = [mine[s]["img_per_s"] / theirs[s]["img_per_s"] for s in seeds]
            m, sd = mean_sd(ratios)
            out["speed"].append({"task": task, "algorithm": a, "ratios": ratios, "ratio_mean": m, "ratio_sd": sd,
                                 "ours_img_per_s": mean_sd([mine[s]["img_per_s"] for s in seeds])[0],
                                 "usb_img_per_s": mean_sd([theirs[s]["img_per_s"] for s in seeds])[0]})
    return out


def verdicts(comparison: dict, min_seeds: int = 2) -> dict:
    """The issue's targets, from the comparison: FixMatch parity within the seed spread, our DebiasPL
    against every USB arm (ahead by more than the paired spread somewhere, never behind by more),
    our images/s at least USB's. Only comparisons over at least ``min_seeds`` seeds are judged; the
    others are listed as such."""
    out = {}
    rows = {(r["task"], r["lib"], r["algorithm"]): r for r in comparison["rows"]}
    for task in dict.fromkeys(r["task"] for r in comparison["rows"]):
        a, b = rows.get((task, "dpl-zoo", "fixmatch")), rows.get((task, "usb", "fixmatch"))
        if a and b and min(a["seeds"], b["seeds"]) >= min_seeds:
            gap, spread = a["top1_mean"] - b["top1_mean"], max(a["top1_sd"], b["top1_sd"])
            out[f"{task}: FixMatch ours - USB {gap:+.2f} within the seed spread ({spread:.2f})"] = abs(gap) <= spread
    for mine in dict.fromkeys(p["ours"] for p in comparison["paired"]):
        pairs = [p for p in comparison["paired"] if p["ours"] == mine and len(p["seeds"]) >= min_seeds]
        few = [f"{p['task']}: {p['usb']} ({len(p['seeds'])} seeds)" for p in comparison["paired"]
               if p["ours"] == mine and len(p["seeds"]) < min_seeds]
        ahead = [p for p in pairs if p["mean"] > p["sd"]]
        behind = [p for p in pairs if p["mean"] < -p["sd"]]
        tasks = dict.fromkeys(p["task"] for p in pairs)
        out[f"ours {mine} ahead of every USB arm judged on a task by more than the paired sd"] = any(
            all(p["mean"] > p["sd"] for p in pairs if p["task"] == t) for t in tasks)
        out[f"ours {mine} never behind a judged USB arm by more than the paired sd"] = not behind
        out[f"ours {mine} behind by more than the paired sd"] = [f"{p['task']}: {p['usb']} {p['mean']:+.2f}"
                                                               for p in behind]
        out[f"ours {mine} ahead by more than the paired sd"] = [f"{p['task']}: {p['usb']} {p['mean']:+.2f}"
                                                              for p in ahead]
        if few:
            out[f"ours {mine}: too few paired seeds to judge"] = few
    for s in comparison["speed"]:
        if s["algorithm"] == "fixmatch":
            out[f"{s['task']}: images/s ours / USB (FixMatch) {s['ratio_mean']:.2f} >= 1"] = s["ratio_mean"] >= 1
    return out


def print_tables(comparison: dict, title: str) -> None:
    table = Table(title=title)
    for col in ("task", "library", "arm", "seeds", "top-1, EMA (mean ± sd)", "PL KL(target)", "PL used",
                "train img/s", "note"):
        table.add_column(col)
    for r in comparison["rows"]:
        table.add_row(r["task"], r["lib"], r["algorithm"], str(r["seeds"]),
                      f"{r['top1_mean']:.2f} ± {r['top1_sd']:.2f}", f"{r['pl_kl_target_mean']:.3f}",
                      "-" if r.get("mask_rate_mean") is None else f"{r['mask_rate_mean']:.2f}",
                      f"{r['img_per_s_mean']:.0f}", "; ".join(r["not_ok"])[:60])
    console.print(table)
    paired = Table(title="ours DebiasPL - USB arm, paired by seed (top-1 points)")
    for col in ("task", "ours", "USB arm", "mean ± sd", "seeds won"):
        paired.add_column(col)
    for p in comparison["paired"]:
        paired.add_row(p["task"], p["ours"], p["usb"], f"{p['mean']:+.2f} ± {p['sd']:.2f}",
                       f"{p['won']}/{len(p['seeds'])}")
    console.print(paired)
    for s in comparison["speed"]:
        console.print(f"{s['task']} {s['algorithm']}: ours {s['ours_img_per_s']:.0f} img/s, USB "
                      f"{s['usb_img_per_s']:.0f}: ratio {s['ratio_mean']:.2f} ± {s['ratio_sd']:.2f}")


def figure(comparison: dict, path: Path) -> Path | None:
    """Top-1 per arm and task (mean, sd bars, the seeds as dots), USB's arms beside ours; below, the
    share of unlabeled images each arm's unlabeled loss used over training."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = list(dict.fromkeys(r["task"] for r in comparison["rows"]))
    fig, axes = plt.subplots(2, len(tasks), figsize=(5.5 * len(tasks), 8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [r for r in comparison["rows"] if r["task"] == task]
        xs = range(len(rows))
        ax.bar(xs, [r["top1_mean"] for r in rows], yerr=[r["top1_sd"] for r in rows], capsize=3,
               color=["tab:gray" if r["lib"] == "usb" else "tab:blue" for r in rows])
        for x, r in zip(xs, rows):
            ax.plot([x] * len(r["top1_per_seed"]), r["top1_per_seed"], "k.", ms=4)
        ax.set_xticks(list(xs), [f"{'USB' if r['lib'] == 'usb' else 'ours'}\n{r['algorithm']}" for r in rows],
                      rotation=60, fontsize=7)
        ax.set_title(task)
        ax.set_ylabel("test top-1 (%), EMA weights")
    for ax, task in zip(axes[1], tasks):
        for r in (r for r in comparison["rows"] if r["task"] == task and r.get("mask_curve")):
            ax.plot([LOG_EVERY * (i + 1) for i in range(len(r["mask_curve"]))], r["mask_curve"],
                    "--" if r["lib"] == "usb" else "-", label=f"{'USB' if r['lib'] == 'usb' else 'ours'} {r['algorithm']}")
        ax.set_xlabel("step")
        ax.set_ylabel(f"unlabeled images used (mask rate, {LOG_EVERY}-step means)")
        if ax.get_lines():   # runs shorter than one logged interval draw no curve
            ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size_group = p.add_mutually_exclusive_group()
    size_group.add_argument("--full", action="store_true", help="GPU size (the same as --size full)")
    size_group.add_argument("--toy", action="store_true", help="the tests' size (the same as --size toy)")
    size_group.add_argument("--size", choices=tuple(SIZES), help="full (a GPU), cpu (2 cores) or toy")
    p.add_argument("--prepare", action="store_true", help="download USB's wheels into --wheels (needs network)")
    p.add_argument("--wheels", default=str(WHEELS))
    p.add_argument("--site", help="where USB's environment is installed (default: OUT/usb-site)")
    p.add_argument("--data", help="folder with the four Fashion-MNIST IDX files (default: Debian's)")
    p.add_argument("--weights", help="the efficientnet-lite0 .pth file (default: from its PyPI package)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cpu-emulate", action="store_true", help="run USB's CUDA calls on the CPU")
    p.add_argument("--algorithms", help="USB's algorithms (default: the size's)")
    p.add_argument("--ours", help="this project's arms (default: the size's)")
    p.add_argument("--seeds", type=int)
    p.add_argument("--parallel", type=int)
    p.add_argument("--max-minutes", type=float, help="stop the runs still going after this; report the finished")
    p.add_argument("--report-only", action="store_true", help="report the finished runs, train none")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", help="the report's file name without .json (default: usb_peer_SIZE; an ablation "
                                  "over other arms gets its own, so the size's table stays)")
    p.add_argument("--worker", nargs=2, metavar=("JOBS", "NAME"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(Path(args.worker[0]), args.worker[1])
    if args.prepare:
        prepare(Path(args.wheels))
        return 0
    kind = args.size or ("toy" if args.toy else "full")
    size = dict(SIZES[kind])
    size["seeds"] = args.seeds or size["seeds"]
    usb = [a for a in args.algorithms.split(",") if a] if args.algorithms is not None else size["usb"]
    ours = [a for a in args.ours.split(",") if a] if args.ours is not None else size["ours"]
    unknown = sorted(set(usb) - set(USB_ALGORITHMS)) + sorted(set(ours) - set(OUR_ARMS))
    if unknown:
        p.error(f"unknown arms {', '.join(unknown)}: USB's are {', '.join(USB_ALGORITHMS)}, ours "
                f"{', '.join(OUR_ARMS)}")
    if args.weights is None and any(t["start"] == "imagenet" for t in size["tasks"]):
        from finetune import lite0_weights
        args.weights = lite0_weights()
    out = Path(args.out).resolve()
    work = out / f"usb_peer-{kind}"
    t0 = time.perf_counter()
    splits = write_splits(size, args.data, work)
    jobs = jobs_for(size, splits, usb, ours)
    # what a finished run depends on (not the number of seeds: more seeds add runs, they change none)
    key = hashlib.sha256(json.dumps([{k: v for k, v in size.items() if k != "seeds"}, SHARED, args.device,
                                     args.cpu_emulate], sort_keys=True).encode()).hexdigest()[:16]
    runs = work / "runs"
    for f in runs.glob("*.json") if runs.is_dir() else []:   # finished under other settings: run again
        saved = json.loads(f.read_text())
        if saved.get("settings_key") != run_key(key, saved):
            f.unlink()
    pending = [j for j in jobs if not (runs / f"{j['name']}.json").is_file()]
    if pending and not args.report_only:
        env = dict(os.environ)
        if any(j["lib"] == "usb" for j in pending) and (args.device == "cuda" or args.cpu_emulate):
            site = install(Path(args.wheels), Path(args.site) if args.site else work / "usb-site")
            env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), env.get("PYTHONPATH", "")])
        spec = work / "jobs.json"
        spec.write_text(json.dumps({"jobs": pending, "size": size, "out": str(work), "key": key,
                                    "args": {k: getattr(args, k) for k in ("data", "weights", "device",
                                                                           "cpu_emulate")}}))
        end = time.time() + 60 * args.max_minutes if args.max_minutes is not None else None
        schedule(pending, spec, env, min(args.parallel or size["parallel"], len(pending)), end)
    results = [json.loads((runs / f"{j['name']}.json").read_text()) for j in jobs
               if (runs / f"{j['name']}.json").is_file()]
    comparison = compare(results, usb, ours)
    tasks = "; ".join(f"{t['task']}: {t['dataset']}, {t['labels_per_class']} labels/class, {t['model']} "
                      f"({t['start']}) at {t['img_size']} px, {t['steps']} steps" for t in size["tasks"])
    print_tables(comparison, f"USB vs dpl-zoo ({tasks}; batch {size['batch']} + {size['mu']} x {size['batch']}, "
                             f"{size['seeds']} seeds, {args.device})")
    name = f"{args.name}.json" if args.name else "usb_peer.json" if kind == "full" else f"usb_peer_{kind}.json"
    fig = figure(comparison, out / name.replace(".json", ".png"))
    write_report(Path(args.out), name, "usb_peer",
                 {"size": kind, **size, **{f"shared_{k}": v for k, v in SHARED.items()}, "device": args.device,
                  "cpu_emulate": args.cpu_emulate, "arms_run": {"usb": usb, "ours": ours}, "usb_pins": list(PINS), "stubbed_modules": list(STUBBED),
                  "runs_planned": len(jobs), "runs_done": sum(r["status"] == "ok" for r in results),
                  # runs this call trained (the others were finished runs read back): its seconds are theirs
                  "runs_trained_here": 0 if args.report_only else len(pending)}, t0, console,
                 table=comparison["rows"], paired=comparison["paired"], speed=comparison["speed"],
                 verdicts=verdicts(comparison), figure=fig.name if fig else None, runs=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
