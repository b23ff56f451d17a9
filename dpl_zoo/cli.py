"""``dpl-zoo`` subcommands, thin over the modules that do the work."""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Optional, Sequence

from rich.console import Console

DEFAULT_RECIPE = "mnist_demo"
DEFAULT_METHODS = ("debiaspl", "fixmatch")
DEFAULT_PRETRAIN_RECIPE = "pretrain_moco"

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
    p.add_argument("--resume", help="continue the run of this checkpoint (its last.pth.tar); 'auto': the "
                                    "experiment's last checkpoint if there is one (for torchrun --max-restarts; "
                                    "needs --set experiment=NAME)")
    p.add_argument("--dry-run", action="store_true", help="build everything, run one step on a tiny synthetic batch")
    p.add_argument("--strict", action="store_true", help="fail on unreadable images instead of skipping them")
    p.add_argument("--quiet", action="store_true", help="log lines instead of progress bars")
    p.add_argument("--sequential", action="store_true",
                   help="run the methods one after the other; by default, on a CPU with several cores and no "
                        "GPU, they run side by side, one process each with cores/methods threads")


def _add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="self-supervised pretraining (MoCo v2 with EMAN) of a timm backbone on "
                                        "unlabeled images: a start point for fine-tuning",
                       description="Pretrains the recipe's timm backbone on the unlabeled images of data.root (or a "
                                   "built-in dataset) and exports it to runs/NAME/export, which the fine-tuning "
                                   "recipes take as initial_checkpoint. A kNN monitor reports feature quality per "
                                   "epoch when labels are given (knn.root, or a built-in dataset's).")
    p.add_argument("recipe", nargs="?", help=f"recipe file or shipped recipe name (default: {DEFAULT_PRETRAIN_RECIPE})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set data.root=images (repeatable)")
    p.add_argument("--resume", help="continue the run of this checkpoint (its last.pth.tar); 'auto': the "
                                    "experiment's last checkpoint if there is one (needs --set experiment=NAME)")
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
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="top-k classes of every image in a folder (labels not needed), as a CSV",
                       description="Applies a trained model to new images: every image below --data (class "
                                   "sub-folders or none) gets its top-k classes and confidences in one CSV row; "
                                   "unreadable images are listed and skipped.")
    p.add_argument("model", help="a run's .pth.tar checkpoint, an exported folder (model.safetensors + "
                                 "config.json), or a zoo name")
    p.add_argument("--data", required=True, help="a folder of images, with class sub-folders or without")
    p.add_argument("--out", default="predictions.csv", help="the CSV to write (default: predictions.csv)")
    p.add_argument("--topk", type=int, default=5, help="classes per image (default: 5)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def _add_plot(sub) -> None:
    p = sub.add_parser("plot", help="curves and pseudo-label histograms of runs, in one PNG")
    p.add_argument("runs", nargs="+", help="run folders (runs/NAME)")
    p.add_argument("--out", help="PNG file (default: next to the first run, <name>.png)")
    p.add_argument("--title")


def _add_zoo(sub) -> None:
    p = sub.add_parser("list", help="zoo models (optionally matching a pattern) and where their weights come from")
    p.add_argument("pattern", nargs="?", default="*")
    p = sub.add_parser("info", help="everything the registry knows about a zoo model")
    p.add_argument("name")
    p = sub.add_parser("convert", help="an authors' DebiasPL .pth.tar to a timm folder (safetensors + config.json)")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--teacher", action="store_true", help="take the EMA teacher instead of the student")
    p.add_argument("--arch", help="timm architecture (default: the checkpoint's arch, else resnet50)")
    p = sub.add_parser("publish", help="stage a run or exported folder with a model card and upload it to the Hub")
    p.add_argument("source", help="a run folder, its export/ folder, or a converted folder")
    p.add_argument("--repo", required=True, help="Hub repo id, ORG/NAME")
    p.add_argument("--zoo-name", help="write the card from this zoo entry's registry metadata")
    p.add_argument("--baseline", help="the baseline run folder (e.g. FixMatch) for the card's gain")
    p.add_argument("--dataset-id", help="Hub dataset id the card reports results on (default: the known id of "
                                        "the run's dataset, else the data folder's name)")
    p.add_argument("--private", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="stage and show the folder, upload nothing")
    p.add_argument("--stage-dir", help="where to stage, replaced on every run (default: SOURCE/hub-staging)")
    p = sub.add_parser("publish-zoo", help="maintainers: convert the authors' releases and push them to the Hub",
                       description="For each entry: fetch the authors' release (Drive or DPL_ZOO_MIRROR), convert "
                                   "the student, optionally evaluate it, stage it with its model card, push it to "
                                   "ORG/NAME and print the registry line to paste into dpl_zoo/zoo.py.")
    p.add_argument("names", nargs="*", help="zoo entries (default: every entry with a released checkpoint)")
    p.add_argument("--org", required=True, help="Hub namespace to push to")
    p.add_argument("--data", help="evaluate on this class folder (e.g. imagenet/val) and put the measured "
                                  "numbers on the card")
    p.add_argument("--dry-run", action="store_true", help="fetch, convert and stage; upload nothing")
    p.add_argument("--keep-release", action="store_true", help="keep the downloaded .pth.tar in the dpl-zoo cache")
    p.add_argument("--stage-dir", default="hub-staging", help="staging root, one folder per entry, replaced on "
                                                              "every run (default: ./hub-staging)")
    p.add_argument("--private", action="store_true")


def _add_pseudo_label(sub) -> None:
    p = sub.add_parser("pseudo-label", help="zero-shot teacher predictions (CLIP) for a dataset, once, before training")
    p.add_argument("--teacher", default="clip:RN50/openai", help="clip:ARCH/PRETRAINED (open_clip names)")
    p.add_argument("--data", required=True, help="'mnist' or a folder of class sub-folders (training images)")
    p.add_argument("--classes", help="class names: a file with one per line, or 'imagenet' (default: folder names)")
    p.add_argument("--templates", choices=("imagenet", "simple"), default="imagenet",
                   help="prompt ensemble: CLIP's 80 ImageNet templates, or 'a photo of a {}.'")
    p.add_argument("--out", required=True, help="predictions file (.safetensors)")
    p.add_argument("--eval", action="store_true", help="also report the teacher's zero-shot accuracy")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(prog="dpl-zoo", description="DebiasPL on timm: train, evaluate, share.")
    parser.add_argument("--version", action="version", version=f"dpl-zoo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_pretrain(sub)
    _add_eval(sub)
    _add_predict(sub)
    _add_plot(sub)
    _add_zoo(sub)
    _add_pseudo_label(sub)
    return parser


def cmd_train(args) -> int:
    from . import distributed as dist_utils
    from .config import ConfigError, load_config
    from .datasets import DataError
    from .progress import Reporter, RunBoard, summary_table
    from .dry_run import dry_run
    from .runtime import resolve_device
    from .side_by_side import fit_side_by_side, threads_per_run, use_side_by_side
    from .train import fit, stamped_name

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
        methods = list(DEFAULT_METHODS) if args.recipe is None and args.resume in (None, "auto") else [cfg.dpl.method]
    if args.resume and args.resume != "auto" and len(methods) > 1:
        raise ConfigError("--resume PATH continues one run: pass --methods with a single method "
                          "(--resume auto works with several: each method's run resumes on its own)")
    if args.resume == "auto" and not cfg.experiment:
        raise ConfigError("--resume auto needs a fixed experiment name (--set experiment=NAME): a restarted "
                          "process must find the run folder the failed one wrote")
    if len(set(methods)) < len(methods):
        raise ConfigError(f"--methods lists a method twice ({', '.join(methods)}); each method runs once")
    # every rank must use the same run names: join the process group, then take rank 0's clock
    device_type = resolve_device(cfg).type
    dist_utils.init_from_env(device_type)
    base = cfg.experiment or stamped_name(cfg.output, Path(recipe).stem)
    # every run's recipe is checked before any run starts
    runs = [(method, load_config(recipe, overrides + [f"dpl.method={method}",
                                                      f"experiment={base}-{method}" if len(methods) > 1 else
                                                      f"experiment={base}"]))
            for method in methods]
    t0 = time.perf_counter()
    try:
        if use_side_by_side(device_type, len(runs), args.sequential):
            threads = threads_per_run(len(runs))
            with RunBoard(methods, quiet=args.quiet, console=console) as board:
                board.say(None, f"{len(runs)} methods side by side, one process each with {threads} torch "
                                f"thread{'s' if threads > 1 else ''} (--sequential: one after the other)")
                summaries = fit_side_by_side(runs, args.resume, board, threads,
                                             resume_hint=f"; continue them: the same command with --set "
                                                         f"experiment={base} --resume auto")
        else:
            reporter = Reporter(quiet=args.quiet, console=console)
            summaries = [fit(run_cfg, resume=args.resume, quiet=args.quiet, reporter=reporter)
                         for _, run_cfg in runs]
    except KeyboardInterrupt:
        if dist_utils.is_main() and args.resume in (None, "auto"):
            console.print(f"interrupted: each run keeps its last checkpoint (written at epoch ends); continue: the "
                          f"same command with --set experiment={base} --resume auto", soft_wrap=True)
        raise
    if not dist_utils.is_main():
        return 0
    console.print(summary_table(summaries, title="same data, model and budget" if len(summaries) > 1 else
                                "dpl-zoo summary"))
    if len(summaries) > 1:
        out = Path(cfg.output) / f"{base}-comparison.json"
        out.write_text(json.dumps(summaries, indent=2))
        console.print(f"comparison written to {out}", soft_wrap=True)
        try:
            from .plot import plot_runs
            figure = plot_runs([s["output"] for s in summaries], out.with_suffix(".png"),
                               title=f"{Path(recipe).stem}: {', '.join(methods)}")
            console.print(f"figure written to {figure}", soft_wrap=True)
        except DataError as e:  # matplotlib missing: the runs are done, say how to get the figure
            console.print(f"no figure: {e}")
    console.print(f"wall time {time.perf_counter() - t0:.0f} s")
    return 0


def cmd_pretrain(args) -> int:
    from .config import load_pretrain_config
    from .pretrain import pretrain
    from .progress import Reporter
    overrides = list(args.overrides) + (["data.strict=true"] if args.strict else [])
    cfg = load_pretrain_config(args.recipe or DEFAULT_PRETRAIN_RECIPE, overrides)
    summary = pretrain(cfg, resume=args.resume, quiet=args.quiet, reporter=Reporter(quiet=args.quiet, console=console))
    knn = f", kNN top-1 {summary['knn_top1']:.2f}" if summary.get("knn_top1") is not None else ""
    console.print(f"pretrained {summary['model']} on {summary['images']} images, {summary['steps']} steps in "
                  f"{summary['seconds']:.0f} s{knn}", soft_wrap=True)
    console.print(f"start point: {summary['export']} (fine-tune with --set initial_checkpoint={summary['export']} "
                  f"--set model={summary['model']} --set pretrained=false)", soft_wrap=True)
    return 0


def cmd_plot(args) -> int:
    from .plot import plot_runs
    out = Path(args.out) if args.out else Path(args.runs[0]).with_suffix(".png")
    console.print(f"figure written to {plot_runs(args.runs, out, title=args.title)}", soft_wrap=True)
    return 0


def cmd_eval(args) -> int:
    from .evaluate import evaluate_model
    result = evaluate_model(args.model, args.data, batch_size=args.batch_size, workers=args.workers,
                            device=args.device)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        console.print(f"results written to {args.out}")
    console.print(f"top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}  balanced {result['balanced_top1']:.2f}  "
                  f"on {result['images']} images ({result['data']}, {result['device']})")
    return 0


def cmd_predict(args) -> int:
    from .predict import predict_folder
    result = predict_folder(args.model, args.data, out=args.out, topk=args.topk, batch_size=args.batch_size,
                            workers=args.workers, device=args.device, console=console)
    console.print(f"top-{result['topk']} classes of {result['images']} images written to {result['out']} "
                  f"({result['device']})", soft_wrap=True)
    if not result["label_names"]:
        console.print("the model carries no class names: the label columns hold class indices")
    skipped = result["skipped"]
    if skipped:
        console.print(f"skipped {len(skipped)} unreadable images (listed in {result['skipped_file']}):",
                      soft_wrap=True)
        for name, problem in skipped[:20]:
            console.print(f"  {name}: {problem}", soft_wrap=True, markup=False, highlight=False)
        if len(skipped) > 20:
            console.print(f"  ... and {len(skipped) - 20} more")
    return 0


def cmd_pseudo_label(args) -> int:
    from .datasets import DataError, ImageFolderDataset, load_mnist
    from .teachers import SIMPLE_TEMPLATES, imagenet_templates, predict_zero_shot, zero_shot_accuracy
    dataset = load_mnist(0.2)[0] if args.data == "mnist" else ImageFolderDataset(args.data, setting="--data")
    if args.classes == "imagenet":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
        names = list(IMAGENET_CLASSNAMES)
    elif args.classes:
        names = [line.strip() for line in Path(args.classes).read_text().splitlines() if line.strip()]
    else:
        names = [c.replace("_", " ") for c in dataset.classes]
    if len(names) != len(dataset.classes):
        raise DataError(f"{len(names)} class names for {len(dataset.classes)} classes in {args.data}")
    templates = imagenet_templates() if args.templates == "imagenet" else list(SIMPLE_TEMPLATES)
    preds = predict_zero_shot(args.teacher, dataset, names, args.out, templates=templates,
                              batch_size=args.batch_size, topk=args.topk, workers=args.workers, device=args.device)
    console.print(f"{len(preds.indices)} predictions from {args.teacher} written to {args.out}; "
                  f"confidence >= 0.95: {int((preds.confidence >= 0.95).sum())}, >= 0.4: "
                  f"{int((preds.confidence >= 0.4).sum())}")
    if args.eval:
        result = zero_shot_accuracy(preds, dataset.targets)
        out = Path(args.out).with_suffix(".eval.json")
        out.write_text(json.dumps(result, indent=2))
        console.print(f"zero-shot top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f} ({out})")
    return 0


def cmd_list(args) -> int:
    from rich import box
    from rich.table import Table
    from .zoo import list_models, model_info
    table = Table(title="dpl-zoo models", box=box.SIMPLE_HEAD, padding=(0, 1))
    table.add_column("name", no_wrap=True)
    table.add_column("labels")
    table.add_column("top-1", justify="right")
    table.add_column("gain", justify="right")
    table.add_column("source", no_wrap=True)
    for name in list_models(args.pattern):
        e = model_info(name)
        table.add_row(name, e.label_budget, _num(e.metrics.top1 if e.metrics else None), _num(e.gain, "+.1f"),
                      e.source)
    console.print(table)
    console.print("top-1: of the weights load delivers; gain: over the baseline at the same label budget "
                  "(`dpl-zoo info NAME`: baseline, paper, provenance). source: where dpl_zoo.load takes the "
                  "weights from: hub (a pinned commit), authors' release (downloaded and converted once into "
                  "the dpl-zoo cache), none (no weights to load; info says how to reproduce them)")
    return 0


def _num(value, spec=".1f") -> str:
    return "-" if value is None else format(value, spec)


def cmd_info(args) -> int:
    from rich.table import Table
    from .zoo import model_info
    entry = model_info(args.name)
    table = Table(title=args.name, show_header=False)
    for key, value in entry.to_dict().items():
        table.add_row(key, json.dumps(value) if isinstance(value, (dict, list, tuple)) else str(value))
    console.print(table)
    return 0


def cmd_convert(args) -> int:
    from .convert import convert_checkpoint
    out = convert_checkpoint(args.checkpoint, args.out, teacher=args.teacher, arch=args.arch)
    console.print(f"converted {'teacher' if args.teacher else 'student'} of {args.checkpoint} to {out} "
                  f"(load with dpl_zoo.load('local-dir:{out}') or timm.create_model('local-dir:{out}', "
                  f"pretrained=True))")
    return 0


def cmd_publish(args) -> int:
    from .hub import card_from_entry, card_from_run, publish, stage, staged_files
    from .zoo import model_info
    source = Path(args.source)
    info = card_from_entry(model_info(args.zoo_name)) if args.zoo_name else \
        card_from_run(source, args.repo, Path(args.baseline) if args.baseline else None, args.dataset_id)
    info.repo_id = args.repo
    if args.dataset_id:
        info.dataset_id = args.dataset_id
    staged = stage(source, Path(args.stage_dir) if args.stage_dir else source / "hub-staging", info)
    for path in staged_files(staged):
        console.print(f"  {path.name:<20} {path.stat().st_size:>12,d} bytes")
    if args.dry_run:
        console.print(f"dry run: staged in {staged}, nothing uploaded")
        return 0
    commit = publish(staged, args.repo, private=args.private)
    console.print(f"published to {args.repo}: {commit.commit_url} (commit {commit.oid})")
    return 0


def cmd_publish_zoo(args) -> int:
    from .hub import publish_zoo_entry, staged_files
    from .zoo import list_models, model_info
    names = args.names or [n for n in list_models() if model_info(n).release is not None]
    entries = [model_info(n) for n in names]  # every name checked before anything is downloaded
    lines = []
    for entry in entries:
        console.print(f"[bold]{entry.name}[/]: fetching the authors' release and converting")
        result = publish_zoo_entry(entry, args.org, Path(args.stage_dir) / entry.name, data=args.data,
                                   dry_run=args.dry_run, keep_release=args.keep_release, private=args.private)
        for path in staged_files(result["staged"]):
            console.print(f"  {path.name:<20} {path.stat().st_size:>12,d} bytes")
        if result["measured"]:
            console.print(f"  measured top-1 {result['measured']['top1']:.2f} top-5 {result['measured']['top5']:.2f}")
        if args.dry_run:
            console.print(f"  dry run: staged in {result['staged']}, nothing uploaded; model.safetensors sha256 "
                          f"{result['sha256']}")
        else:
            console.print(f"  published {result['repo_id']} at commit {result['commit']}")
            lines.append(result["registry_line"])
    if lines:
        console.print("paste into PUBLISHED in dpl_zoo/zoo.py:")
        for line in lines:
            console.print(line, soft_wrap=True, markup=False, highlight=False)
    return 0


def configure_logging() -> None:
    """Our own log lines (``--quiet`` progress) at INFO; other libraries' only from WARNING up, so
    their INFO chatter (matplotlib's "generated new fontManager" on its first use) stays out."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("dpl_zoo").setLevel(logging.INFO)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .errors import user_error_line

    configure_logging()
    args = build_parser().parse_args(argv)
    handlers = {"train": cmd_train, "pretrain": cmd_pretrain, "eval": cmd_eval, "predict": cmd_predict,
                "list": cmd_list, "info": cmd_info,
                "convert": cmd_convert,
                "publish": cmd_publish, "publish-zoo": cmd_publish_zoo, "pseudo-label": cmd_pseudo_label,
                "plot": cmd_plot}
    try:
        return handlers[args.command](args)
    except Exception as e:  # noqa: BLE001 - user errors become one line; anything else (a bug) propagates
        line = user_error_line(e)
        if line is None:
            raise
        console.print(f"[bold red]error:[/] {line}", soft_wrap=True)  # unwrapped: paths stay copyable
        return 2
