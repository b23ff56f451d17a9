"""``dpl-zoo`` subcommands, thin over the modules that do the work."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from rich.console import Console

DEFAULT_RECIPE = "mnist_demo"
DEFAULT_METHODS = ("debiaspl", "fixmatch")

console = Console()


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="fine-tune with DebiasPL from a recipe (no recipe: the embedded MNIST demo)",
                       description="Without a recipe, trains DebiasPL and the FixMatch baseline on the embedded "
                                   "real MNIST digits under the same budget and prints one comparison table.")
    p.add_argument("recipe", nargs="?", help="recipe file or shipped recipe name (see recipes/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set dpl.tau=0.5 (repeatable)")
    p.add_argument("--methods", help="comma-separated methods to run under the same budget "
                                     "(debiaspl, fixmatch, supervised); default: the recipe's own")
    p.add_argument("--resume", help="continue the run of this checkpoint (its last.pth.tar)")
    p.add_argument("--dry-run", action="store_true", help="build everything, run one step on a tiny synthetic batch")
    p.add_argument("--strict", action="store_true", help="fail on unreadable images instead of skipping them")
    p.add_argument("--quiet", action="store_true", help="log lines instead of progress bars")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="top-1/top-5 and per-class accuracy of a checkpoint or exported model")
    p.add_argument("model", help="a run's .pth.tar checkpoint, an exported folder (model.safetensors + config.json), "
                                 "or a zoo name")
    p.add_argument("--data", required=True, help="'mnist' (embedded test split) or a folder of class sub-folders")
    p.add_argument("--out", help="results JSON (default: print only)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(prog="dpl-zoo", description="DebiasPL on timm: train, evaluate, share.")
    parser.add_argument("--version", action="version", version=f"dpl-zoo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_eval(sub)
    return parser


def cmd_train(args) -> int:
    from .config import load_config
    from .progress import Reporter, summary_table
    from .train import dry_run, fit

    recipe = args.recipe or DEFAULT_RECIPE
    overrides = list(args.overrides) + (["data.strict=true"] if args.strict else [])
    cfg = load_config(recipe, overrides)
    if args.dry_run:
        result = dry_run(cfg)
        console.print(f"dry run ok: {json.dumps(result)}")
        return 0
    if args.methods:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    else:
        methods = list(DEFAULT_METHODS) if args.recipe is None else [cfg.dpl.method]
    if args.resume and len(methods) > 1:
        raise SystemExit("--resume continues one run: pass --methods with a single method")
    reporter = Reporter(quiet=args.quiet, console=console)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = cfg.experiment or f"{Path(recipe).stem}-{stamp}"
    summaries = []
    for method in methods:
        run_cfg = load_config(recipe, overrides + [f"dpl.method={method}",
                                                    f"experiment={base}-{method}" if len(methods) > 1 else
                                                    f"experiment={base}"])
        summaries.append(fit(run_cfg, resume=args.resume, quiet=args.quiet, reporter=reporter))
    console.print(summary_table(summaries, title="same data, model and budget" if len(summaries) > 1 else
                                "dpl-zoo summary"))
    if len(summaries) > 1:
        out = Path(cfg.output) / f"{base}-comparison.json"
        out.write_text(json.dumps(summaries, indent=2))
        console.print(f"comparison written to {out}")
    return 0


def cmd_eval(args) -> int:
    from .evaluate import evaluate_model
    result = evaluate_model(args.model, args.data, batch_size=args.batch_size, workers=args.workers)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        console.print(f"results written to {args.out}")
    console.print(f"top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}  on {result['images']} images "
                  f"({result['data']})")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .convert import ConversionError
    from .data import DataError
    from .train import TrainingDiverged

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    handlers = {"train": cmd_train, "eval": cmd_eval}
    try:
        return handlers[args.command](args)
    except (ConfigError, DataError, CheckpointError, ConversionError, TrainingDiverged, FileExistsError) as e:
        console.print(f"[bold red]error:[/] {e}")
        return 2
    except ValueError as e:  # bad values raised where they enter (model names, method arguments)
        console.print(f"[bold red]error:[/] {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
