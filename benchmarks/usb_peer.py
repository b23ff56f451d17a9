"""The peer a user would pick instead, side by side: USB (PyPI ``semilearn`` 0.3.2, MIT) FixMatch,
FreeMatch, SoftMatch and its DebiasPL beside this project's FixMatch and DebiasPL.

Every run shares the Fashion-MNIST split (the labeled positions our split code writes, one CSV
per seed, read by both libraries; unlabeled: every other training image), the timm backbone
(``tf_efficientnet_lite0`` from the same ImageNet weights, mapped by ``dpl_zoo.layouts``), the
image size, labeled batch, mu, steps, learning rate, weight decay, EMA decay, confidence
threshold, seeds and test images. Each library keeps its own augmentation, optimiser schedule
and algorithm-specific settings (USB's defaults). Reported: test top-1 of the EMA weights (the
model both libraries evaluate) mean +- sd over seeds, and training images/s (labeled + weak +
strong images per second of training, evaluation excluded).

USB trains only on CUDA (``send_model_cuda``: 'ONLY GPU TRAINING IS SUPPORTED'). It runs in its
own environment: wheels prepared here (``--prepare``: semilearn with ``--no-deps`` and the two
small packages it imports at start that the GPU machine lacks, ``progress`` and ``ruamel.yaml``;
about 0.3 MB) are installed with ``pip --target`` into a folder that only the USB processes put
on their path; it is never a dependency of dpl-zoo. Modules USB imports at start but none of
these four algorithms use (NLP/audio models and collators, medmnist's montage, wandb, aim,
tensorboard) are replaced by stubs that fail if ever called, so USB needs neither them nor
their versions (transformers 5 lacks modules USB imports).

    python benchmarks/usb_peer.py --prepare                  # here, with network
    python benchmarks/usb_peer.py --full --device cuda       # on a GPU (the GPU check runs it)
    python benchmarks/usb_peer.py --toy --cpu-emulate        # CPU test: USB's CUDA calls run on the CPU
"""
from __future__ import annotations

import argparse
import json
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
from _common import core_slices, mean_sd, write_report  # noqa: E402

console = Console(width=None if sys.stdout.isatty() else 150)
WHEELS = ROOT / ".gpu" / "usb" / "wheels"
PINS = ("semilearn==0.3.2", "progress==1.6.1", "ruamel.yaml==0.19.1")
# imported by semilearn at start, used by none of the algorithms compared here
STUBBED = ("transformers", "torchaudio", "skimage", "wandb", "aim", "torch.utils.tensorboard")
USB_ALGORITHMS = ("fixmatch", "freematch", "softmatch", "debiaspl")
OURS = ("fixmatch", "debiaspl")
SIZES = {  # img size, labeled batch, mu, steps, labels per class, test images, seeds, runs side by side, loader workers
    "full": dict(img_size=64, batch=16, mu=3, steps=600, labels_per_class=4, test=10000, seeds=3, parallel=6,
                 workers=1),
    "toy": dict(img_size=32, batch=2, mu=2, steps=2, labels_per_class=2, test=20, seeds=1, parallel=2, workers=0),
}
# what both libraries are given alike (each library's algorithm-specific settings keep their defaults)
SHARED = dict(lr=0.01, momentum=0.9, weight_decay=5e-4, ema=0.99, threshold=0.95, tau=0.5, prior_momentum=0.99)
LITE0_MEAN, LITE0_STD = (0.498, 0.498, 0.498), (0.502, 0.502, 0.502)   # the weights' (x - 127) / 128


# --- preparation, here --------------------------------------------------------------------------

def prepare(dest: Path = WHEELS) -> int:
    """Download the wheels USB needs on the offline GPU machine (pure Python, any platform)."""
    dest.mkdir(parents=True, exist_ok=True)
    for pin in PINS:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
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

def write_splits(size: dict, data: str | None, out: Path) -> dict[int, Path]:
    """One CSV of labeled positions per seed, written by our split code; both libraries read it."""
    from dpl_zoo.data import split_labeled, write_split_csv
    from dpl_zoo.datasets import load_fashion_mnist
    train, _ = load_fashion_mnist(data)
    (out / "splits").mkdir(parents=True, exist_ok=True)
    paths = {}
    for seed in range(size["seeds"]):
        split = split_labeled(train.targets, len(train.classes), labels_per_class=size["labels_per_class"], seed=seed)
        paths[seed] = out / "splits" / f"seed{seed}.csv"
        write_split_csv(paths[seed], split.labeled)
    return paths


def jobs_for(size: dict, splits: dict[int, Path], usb=USB_ALGORITHMS, ours=OURS) -> list[dict]:
    """Seed by seed, so a time limit still leaves whole comparisons."""
    jobs = []
    for seed in range(size["seeds"]):
        jobs += [{"lib": "usb", "algorithm": a, "seed": seed, "split": str(splits[seed]), "name": f"usb-{a}-s{seed}"}
                 for a in usb]
        jobs += [{"lib": "dpl-zoo", "algorithm": a, "seed": seed, "split": str(splits[seed]),
                  "name": f"dpl-zoo-{a}-s{seed}"} for a in ours]
    return jobs


def usb_config(job: dict, size: dict, device: str, out: Path) -> dict:
    """USB's argument namespace for one run (``semilearn.lighting.config.get_config`` adds the
    algorithm's own defaults). USB's DebiasPL is an 'imbalanced algorithm' on top of FixMatch."""
    debiaspl = job["algorithm"] == "debiaspl"
    return {
        "algorithm": "fixmatch" if debiaspl else job["algorithm"], "imb_algorithm": "debiaspl" if debiaspl else None,
        "net": "tf_efficientnet_lite0", "use_pretrain": False, "dataset": "fashion_mnist", "num_classes": 10,
        "num_labels": size["labels_per_class"] * 10, "img_size": size["img_size"], "crop_ratio": 0.875,
        "batch_size": size["batch"], "uratio": size["mu"], "eval_batch_size": 256,
        "epoch": 1, "num_train_iter": size["steps"], "num_eval_iter": size["steps"], "num_log_iter": 50,
        "num_warmup_iter": 0, "optim": "SGD", "lr": SHARED["lr"], "momentum": SHARED["momentum"],
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
    """The same run through dpl-zoo's ``finetune`` recipe (as benchmarks/finetune.py builds it)."""
    return [
        "model=tf_efficientnet_lite0", f"initial_checkpoint={args.weights}", "pretrained=false",
        f"img_size={size['img_size']}", "data.dataset=fashion_mnist",
        f"data.root={args.data}" if args.data else "data.root=null", "data.val_root=null",
        "data.label_fraction=null", "data.labels_per_class=null", f"data.labeled_csv={job['split']}",
        "data.hflip=0.5", "data.scale=[0.6, 1.0]", "data.augment_on=device", f"data.val_max={size['test']}",
        f"data.eval_unlabeled_max={min(size['test'], 2000)}",
        f"mean=[{', '.join(map(str, LITE0_MEAN))}]", f"std=[{', '.join(map(str, LITE0_STD))}]", "crop_pct=1.0",
        f"batch_size={size['batch']}", f"dpl.mu={size['mu']}", "epochs=1", f"steps_per_epoch={size['steps']}",
        "eval_interval=1", "warmup_epochs=0", f"lr={SHARED['lr']}", f"momentum={SHARED['momentum']}",
        f"weight_decay={SHARED['weight_decay']}", f"model_ema_decay={SHARED['ema']}",
        f"dpl.qhat_momentum={SHARED['prior_momentum']}", f"dpl.tau={SHARED['tau']}",
        f"dpl.threshold={SHARED['threshold']}", f"dpl.method={job['algorithm']}", f"seed={job['seed']}",
        f"data.split_seed={job['seed']}", f"workers={size['workers']}", f"device={args.device}",
        "amp=" + ("true" if args.device == "cuda" else "false"), "log_interval=50",
        f"output={out / 'dpl-zoo-runs'}", f"experiment={job['name']}",
    ]


# --- USB in its own process -----------------------------------------------------------------------

def install_stubs(names=STUBBED) -> None:
    """Modules named in ``names`` (and their submodules) import as stubs whose every attribute is a
    class that raises ImportError when used."""
    import importlib.abc
    import importlib.machinery
    import types

    class Absent:
        def __new__(cls, *a, **k):
            raise ImportError(f"{cls.__qualname__} is stubbed out by benchmarks/usb_peer.py (not used here)")

    class StubModule(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (Absent,), {"__qualname__": f"{self.__name__}.{name}"})

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
            if any(name == s or name.startswith(s + ".") for s in names):
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
            return None

        def create_module(self, spec):
            module = StubModule(spec.name)
            module.__path__ = []
            return module

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, Finder())


def emulate_cuda_on_cpu() -> None:
    """For the CPU test only: USB's ``.cuda()`` calls, CUDA events and synchronisations run on the
    CPU, so its training loop can be checked end to end without a GPU (it refuses otherwise)."""
    import torch
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.cuda.synchronize = lambda *a, **k: None

    class Event:
        def __init__(self, *a, **k):
            self.t = None

        def record(self, *a, **k):
            self.t = time.perf_counter()

        def elapsed_time(self, other):
            return 1e3 * (other.t - self.t)
    torch.cuda.Event = Event


def _to_rgb(img):
    return img.convert("RGB")


class TimmForUSB:
    """Builds USB's network: a timm model whose forward returns USB's ``{'logits', 'feat'}``."""

    def __init__(self, weights: str):
        self.weights = weights

    def __call__(self, num_classes: int, pretrained: bool = False, pretrained_path=None, **kwargs):
        import timm
        import torch.nn as nn
        from dpl_zoo.layouts import load_start_point
        model = timm.create_model("tf_efficientnet_lite0", num_classes=num_classes)
        load_start_point(model, self.weights)

        class Net(nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, x, only_fc=False, only_feat=False, **kw):
                if only_fc:
                    return self.m.get_classifier()(x)
                feat = self.m.forward_head(self.m.forward_features(x), pre_logits=True)
                if only_feat:
                    return feat
                return {"logits": self.m.get_classifier()(feat), "feat": feat}
        return Net(model)


def run_usb_job(job: dict, size: dict, args, out: Path) -> dict:
    import random

    import numpy as np
    import torch
    from torchvision import transforms

    from dpl_zoo.data import read_split_csv, subsample
    from dpl_zoo.datasets import load_fashion_mnist
    if not args.cpu_emulate and not torch.cuda.is_available():
        return {**job, "status": "refused", "detail": "USB: 'ONLY GPU TRAINING IS SUPPORTED' (no CUDA device)"}
    install_stubs()
    if args.cpu_emulate:
        emulate_cuda_on_cpu()
    from semilearn.algorithms import get_algorithm
    from semilearn.core.utils import get_data_loader
    from semilearn.datasets.augmentation import RandAugment
    from semilearn.datasets.cv_datasets.datasetbase import BasicDataset
    from semilearn.imb_algorithms import get_imb_algorithm
    from semilearn.lighting.config import get_config
    cfg = get_config(usb_config(job, size, "cuda" if not args.cpu_emulate else "cpu", out))
    random.seed(job["seed"])
    np.random.seed(job["seed"])
    torch.manual_seed(job["seed"])
    train, test = load_fashion_mnist(args.data)
    labeled = read_split_csv(job["split"])
    labeled_set = set(labeled)
    unlabeled = [i for i in range(len(train)) if i not in labeled_set]
    test_idx = subsample(range(len(test)), size["test"], job["seed"] + 1)   # our data.val_max subset
    x, y = train.images, np.asarray(train.targets)
    s, pad = size["img_size"], int(size["img_size"] * (1 - cfg.crop_ratio))
    norm = [transforms.ToTensor(), transforms.Normalize(LITE0_MEAN, LITE0_STD)]
    weak = transforms.Compose([transforms.Lambda(_to_rgb), transforms.Resize(s),
                               transforms.RandomCrop(s, padding=pad, padding_mode="reflect"),
                               transforms.RandomHorizontalFlip(), *norm])
    strong = transforms.Compose([transforms.Lambda(_to_rgb), transforms.Resize(s),
                                 transforms.RandomCrop(s, padding=pad, padding_mode="reflect"),
                                 transforms.RandomHorizontalFlip(), RandAugment(3, 5), *norm])
    plain = transforms.Compose([transforms.Lambda(_to_rgb), transforms.Resize(s), *norm])
    alg_name = cfg.algorithm
    sets = {"train_lb": BasicDataset(alg_name, x[labeled], y[labeled].tolist(), 10, weak, False, None),
            "train_ulb": BasicDataset(alg_name, x[unlabeled], y[unlabeled].tolist(), 10, weak, True, strong),
            "eval": BasicDataset(alg_name, test.images[test_idx], np.asarray(test.targets)[test_idx].tolist(), 10,
                                 plain, False, None)}
    net = TimmForUSB(args.weights)
    alg = (get_imb_algorithm if cfg.imb_algorithm else get_algorithm)(cfg, net, None, None)
    cfg.ulb_dest_len, cfg.lb_dest_len = len(unlabeled), len(labeled)
    alg.loader_dict = {
        "train_lb": get_data_loader(cfg, sets["train_lb"], cfg.batch_size, data_sampler=cfg.train_sampler,
                                    num_iters=cfg.num_train_iter, num_epochs=cfg.epoch, num_workers=cfg.num_workers),
        "train_ulb": get_data_loader(cfg, sets["train_ulb"], cfg.batch_size * cfg.uratio,
                                     data_sampler=cfg.train_sampler, num_iters=cfg.num_train_iter,
                                     num_epochs=cfg.epoch, num_workers=2 * cfg.num_workers),
        "eval": get_data_loader(cfg, sets["eval"], cfg.eval_batch_size, data_sampler=None,
                                num_workers=cfg.num_workers, drop_last=False)}
    alg.model, alg.ema_model = alg.model.cuda(cfg.gpu), alg.ema_model.cuda(cfg.gpu)   # as USB's train.py
    # evaluation and checkpoint writing are timed apart, so images/s counts training only
    aside, evals = [0.0], []
    real_eval, real_save = alg.evaluate, alg.save_model

    def timed_eval(*a, **k):
        t = time.perf_counter()
        result = real_eval(*a, **k)
        aside[0] += time.perf_counter() - t
        evals.append(result)
        return result

    def timed_save(*a, **k):
        t = time.perf_counter()
        real_save(*a, **k)
        aside[0] += time.perf_counter() - t
    alg.evaluate, alg.save_model = timed_eval, timed_save
    t0 = time.perf_counter()
    alg.train()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    images = cfg.num_train_iter * cfg.batch_size * (1 + 2 * cfg.uratio)
    result = {**job, "status": "ok", "top1": 100.0 * evals[-1]["eval/top-1-acc"], "evaluated": "EMA weights",
              "seconds": seconds, "train_seconds": seconds - aside[0],
              "img_per_s": images / max(seconds - aside[0], 1e-9), "steps": cfg.num_train_iter}
    if hasattr(alg, "p_hat"):   # USB DebiasPL's class prior after training: its shape and values
        result["usb_p_hat"] = torch.as_tensor(alg.p_hat).detach().float().cpu().flatten().tolist()
    return result


def run_ours_job(job: dict, size: dict, args, out: Path) -> dict:
    from dpl_zoo.config import load_config
    from dpl_zoo.train import fit
    cfg = load_config("finetune", ours_overrides(job, size, args, out))
    summary = fit(cfg, quiet=True)
    rows = [json.loads(line) for line in (out / "dpl-zoo-runs" / job["name"] / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    epoch = [r for r in rows if r["kind"] == "epoch"][-1]
    return {**job, "status": "ok", "top1": summary["teacher_top1"], "evaluated": "EMA weights (the EMAN teacher)",
            "student_top1": summary["top1"], "seconds": summary["seconds"], "img_per_s": epoch["img_per_s"],
            "steps": summary["steps"]}


def assign(jobs: list[dict], count: int) -> list[list[dict]]:
    """Jobs for ``count`` worker processes, each of one library only (USB's import-time stubs and
    CUDA emulation never meet a dpl-zoo run), in proportion to each library's jobs; within a
    library round robin, so seeds finish in order."""
    libs = {lib: [j for j in jobs if j["lib"] == lib] for lib in ("usb", "dpl-zoo")}
    libs = {k: v for k, v in libs.items() if v}
    if not libs:
        return []
    count = max(count, len(libs))
    shares = {k: max(1, round(count * len(v) / len(jobs))) for k, v in libs.items()}
    while sum(shares.values()) > count:
        biggest = max(shares, key=lambda k: shares[k])
        shares[biggest] -= 1
    out = []
    for lib, n in shares.items():
        n = min(n, len(libs[lib]))
        out += [libs[lib][i::n] for i in range(n)]
    return out


def worker(jobs_file: Path, index: int) -> int:
    """Run this worker's jobs one after the other, each result written as it ends."""
    spec = json.loads(jobs_file.read_text())
    args, size, out = argparse.Namespace(**spec["args"]), spec["size"], Path(spec["out"])
    for job in spec["assignments"][index]:
        path = out / "runs" / f"{job['name']}.json"
        if path.is_file():
            continue
        t = time.perf_counter()
        try:
            result = (run_usb_job if job["lib"] == "usb" else run_ours_job)(job, size, args, out)
        except Exception as e:  # noqa: BLE001 - one failed run is reported; the others still run
            import traceback
            traceback.print_exc()
            result = {**job, "status": "failed", "detail": f"{type(e).__name__}: {e}"[:400]}
        result["wall_seconds"] = time.perf_counter() - t
        result["settings_key"] = spec["key"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        console.print(f"{job['name']}: {result['status']} "
                      + (f"top-1 {result['top1']:.2f}, {result['img_per_s']:.0f} img/s" if result["status"] == "ok"
                         else result.get("detail", "")))
    return 0


# --- the whole comparison -------------------------------------------------------------------------

def table_rows(results: list[dict], usb=USB_ALGORITHMS, ours=OURS) -> list[dict]:
    rows = []
    for lib, algs in (("usb", usb), ("dpl-zoo", ours)):
        for a in algs:
            rs = [r for r in results if r["lib"] == lib and r["algorithm"] == a and r["status"] == "ok"]
            why = sorted({r.get("detail", r["status"]) for r in results
                          if r["lib"] == lib and r["algorithm"] == a and r["status"] != "ok"})
            top1, ips = mean_sd([r["top1"] for r in rs]), mean_sd([r["img_per_s"] for r in rs])
            rows.append({"lib": lib, "algorithm": a, "seeds": len(rs), "top1_mean": top1[0], "top1_sd": top1[1],
                         "img_per_s_mean": ips[0], "seconds_mean": mean_sd([r["seconds"] for r in rs])[0],
                         "top1_per_seed": [r["top1"] for r in sorted(rs, key=lambda r: r["seed"])],
                         "not_ok": why})
    return rows


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size_group = p.add_mutually_exclusive_group()
    size_group.add_argument("--full", action="store_true", help="GPU size")
    size_group.add_argument("--toy", action="store_true")
    p.add_argument("--prepare", action="store_true", help="download USB's wheels into --wheels (needs network)")
    p.add_argument("--wheels", default=str(WHEELS))
    p.add_argument("--site", help="where USB's environment is installed (default: OUT/usb-site)")
    p.add_argument("--data", help="folder with the four Fashion-MNIST IDX files (default: Debian's)")
    p.add_argument("--weights", help="the efficientnet-lite0 .pth file (default: from its PyPI package)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cpu-emulate", action="store_true", help="tests only: run USB's CUDA calls on the CPU")
    p.add_argument("--algorithms", default=",".join(USB_ALGORITHMS), help="USB's algorithms")
    p.add_argument("--ours", default=",".join(OURS), help="this project's methods")
    p.add_argument("--seeds", type=int)
    p.add_argument("--parallel", type=int)
    p.add_argument("--max-minutes", type=float, help="stop the runs still going after this; report the finished")
    p.add_argument("--report-only", action="store_true", help="report the finished runs, train none")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--worker", nargs=2, metavar=("JOBS", "INDEX"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(Path(args.worker[0]), int(args.worker[1]))
    if args.prepare:
        prepare(Path(args.wheels))
        return 0
    kind = "full" if args.full else "toy" if args.toy else "full"
    size = dict(SIZES[kind])
    size["seeds"] = args.seeds or size["seeds"]
    if args.weights is None:
        from finetune import lite0_weights
        args.weights = lite0_weights()
    usb = [a for a in args.algorithms.split(",") if a]
    ours = [a for a in args.ours.split(",") if a]
    out = Path(args.out).resolve()
    work = out / f"usb_peer-{kind}"
    t0 = time.perf_counter()
    splits = write_splits(size, args.data, work)
    jobs = jobs_for(size, splits, usb, ours)
    import hashlib
    key = hashlib.sha256(json.dumps([size, SHARED, args.device, args.cpu_emulate], sort_keys=True).encode()) \
        .hexdigest()[:16]
    runs = work / "runs"
    for f in runs.glob("*.json") if runs.is_dir() else []:   # finished under other settings: run again
        if json.loads(f.read_text()).get("settings_key") != key:
            f.unlink()
    pending = [j for j in jobs if not (runs / f"{j['name']}.json").is_file()]
    if pending and not args.report_only:
        env = dict(os.environ)
        if any(j["lib"] == "usb" for j in pending) and (args.device == "cuda" or args.cpu_emulate):
            site = install(Path(args.wheels), Path(args.site) if args.site else work / "usb-site")
            env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), env.get("PYTHONPATH", "")])
        assignments = assign(pending, min(args.parallel or size["parallel"], len(pending)))
        spec = work / "jobs.json"
        spec.write_text(json.dumps({"assignments": assignments, "size": size, "out": str(work), "key": key,
                                    "args": {k: getattr(args, k) for k in ("data", "weights", "device",
                                                                           "cpu_emulate")}}))
        procs = []
        for i, cores in enumerate(core_slices(len(assignments))):
            procs.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec),
                                           str(i)], env=env, cwd=ROOT,
                                          preexec_fn=lambda c=cores: os.sched_setaffinity(0, c)))
        signal.signal(signal.SIGTERM, lambda *a: (_stop(procs), sys.exit(143)))
        end = time.time() + 60 * args.max_minutes if args.max_minutes is not None else None
        while any(pr.poll() is None for pr in procs):
            if end is not None and time.time() > end:
                console.print(f"--max-minutes {args.max_minutes}: stopping the runs still going")
                _stop(procs)
                break
            time.sleep(1)
    results = [json.loads((runs / f"{j['name']}.json").read_text()) for j in jobs
               if (runs / f"{j['name']}.json").is_file()]
    rows = table_rows(results, usb, ours)
    table = Table(title=f"USB vs dpl-zoo: Fashion-MNIST, {size['labels_per_class']} labels per class, "
                        f"EfficientNet-Lite0 (ImageNet) at {size['img_size']} px, batch {size['batch']} + "
                        f"{size['mu']} x {size['batch']}, {size['steps']} steps, {size['seeds']} seeds, {args.device}")
    for col in ("library", "algorithm", "seeds", "top-1, EMA weights (mean ± sd)", "train img/s", "s / run", "note"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["lib"], r["algorithm"], str(r["seeds"]), f"{r['top1_mean']:.2f} ± {r['top1_sd']:.2f}",
                      f"{r['img_per_s_mean']:.0f}", f"{r['seconds_mean']:.0f}", "; ".join(r["not_ok"])[:80])
    console.print(table)
    write_report(Path(args.out), f"usb_peer_{kind}.json" if kind != "full" else "usb_peer.json", "usb_peer",
                 {"size": kind, **size, **{f"shared_{k}": v for k, v in SHARED.items()}, "device": args.device,
                  "cpu_emulate": args.cpu_emulate, "usb_pins": list(PINS), "stubbed_modules": list(STUBBED),
                  "runs_planned": len(jobs), "runs_done": sum(r["status"] == "ok" for r in results)}, t0, console,
                 table=rows, runs=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
