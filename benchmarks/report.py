"""Markdown tables from the benchmark JSON files, for the README's Results section.

    python benchmarks/report.py benchmarks/results/*.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _f(v, spec=".2f"):
    return "-" if v is None or v != v else format(v, spec)


def _pm(pair, spec=".2f", signed=False):
    return f"{_f(pair[0], ('+' if signed else '') + spec)} ± {_f(pair[1], spec)}"


def _when(report: dict) -> str:
    m = report["machine"]
    where = m.get("gpu") or f"{m['cpu_count']} CPU cores"
    return f"{report['date']}, {where}, torch {m['torch']}, {report['seconds'] / 60:.0f} min in all"


def gain(report: dict) -> str:
    s = report["settings"]
    steps = s["overrides"].get("steps_per_epoch", 0) * s["overrides"].get("epochs", 0)
    lines = [f"Embedded MNIST, `mnist_demo` recipe at {steps} steps, {s['seeds']} seeds, "
             f"{s.get('parallel', 1)} single-thread runs side by side ({_when(report)}):", "",
             "| labels/class | method | test top-1 (mean ± sd) | accepted PL acc. | mask | PL KL(uniform) | "
             "PL max/min | gain vs FixMatch (mean ± sd) | seeds won |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["table"]:
        fixmatch = r["method"] == "fixmatch"
        gain_text = "-" if fixmatch else "{:+.2f} ± {:.2f}".format(r["gain_mean"], r["gain_sd"])
        wins = "-" if fixmatch or r.get("wins") is None else "{}/{}".format(r["wins"], len(r["gains"]))
        lines.append(f"| {r['budget']} | {r['method']} | {r['top1_mean']:.2f} ± {r['top1_sd']:.2f} | "
                     f"{_f(r['pl_acc_mean'])} | {_f(r['mask_rate_mean'])} | {_f(r['pl_kl_mean'], '.3f')} | "
                     f"{_f(r['pl_max_min_mean'], '.1f')} | {gain_text} | {wins} |")
    if report.get("ablation"):
        lines += ["", "Ablation, seed 0:", "",
                  "| setting | test top-1 | accepted PL acc. | PL KL(uniform) | PL max/min |", "|---|---|---|---|---|"]
        for r in report["ablation"]:
            lines.append(f"| {r['label']} | {r['top1']:.2f} | {_f(r['pl_acc'])} | {_f(r['pl_kl_uniform'], '.3f')} | "
                         f"{_f(r['pl_max_min_ratio'], '.1f')} |")
    return "\n".join(lines)


def speed(report: dict) -> str:
    s = report["settings"]
    lines = []
    if report["models"]:
        lines += [f"Step cost on {s['device']}: batch {s['batch']} labeled + {s['mu']} x {s['batch']} unlabeled per "
                  f"view pair, {s['img_size']} px, medians of {s['rounds']} interleaved rounds ({_when(report)}):", "",
                  "| model | views | DebiasPL step s | FixMatch step s | hand-written step s | DebiasPL/FixMatch "
                  "(target <= 1.03) | DebiasPL/hand | peak memory DebiasPL/hand | img/s | MFU (bf16 peak) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for m in report["models"]:
            t = m["step_s"]
            lines.append(f"| {m['model']} | {m['views']} | {t['debiaspl']:.4f} | {t['fixmatch']:.4f} | "
                         f"{t['hand']:.4f} | {m['debiaspl_over_fixmatch']:.3f} | {m['debiaspl_over_hand']:.3f} | "
                         f"{m['memory_ratio']:.2f} | {m['img_per_s']:.0f} | "
                         f"{'-' if m['mfu_bf16'] is None else '{:.1f}%'.format(100 * m['mfu_bf16'])} |")
    if report["pipeline"]:
        lines += ["", f"Data pipeline, `mnist_demo`, {s['pipeline_steps']} steps (target: training >= 0.9 x step "
                      f"alone):", "",
                  "| `data.augment_on` | loader workers | loader alone img/s | step alone img/s | training img/s | "
                  "training / step alone |", "|---|---|---|---|---|---|"]
        for p in report["pipeline"]:
            lines.append(f"| {p['augment_on']} | {p['workers']} | {p['loader_img_per_s']:.0f} | "
                         f"{p['step_img_per_s']:.0f} | {p['train_img_per_s']:.0f} | {p['train_over_step']:.2f} |")
    for r in report.get("folder_views") or []:
        lines.append(f"\nFolder of JPEGs at {r['img_size']} px, `augment_on: {r['augment_on']}`, {r['workers']} "
                     f"worker, {r['device']}: {r['img_per_s']:.0f} finished views/s.")
    if report.get("end_to_end"):
        e = report["end_to_end"]
        lines.append(f"\n`dpl-zoo train` end to end: {e['seconds']:.0f} s "
                     f"({', '.join(f'{k} {v:.2f}' for k, v in e['top1'].items())}).")
    return "\n".join(lines)


def load(report: dict) -> str:
    w = report["warm"]
    rows = [f"`{report['arch']}` ({report['bytes'] / 1e6:.0f} MB safetensors), medians of {report['repeats']} "
            f"({report['date']}):", "", "| path | seconds |", "|---|---|",
            f"| `dpl_zoo.load`, cold, `DPL_ZOO_MIRROR` on loopback (download + convert + load) | {report['cold_s']:.3f} |"]
    rows += [f"| {name} | {v['median_s']:.3f} |" for name, v in w.items()]
    rows.append(f"| ratio warm `dpl_zoo.load` / plain, authors' release (target <= {report.get('target', 1.1)}) | "
                f"{report['ratio']:.3f} |")
    if "ratio_hub" in report:
        rows.append(f"| ratio warm `dpl_zoo.load` / plain, pinned Hub commit | {report['ratio_hub']:.3f} |")
    return "\n".join(rows)


def _gain(r: dict) -> str:
    return f"{r['gain_mean']:+.2f} ± {r['gain_sd']:.2f}" if "gain_mean" in r else "-"


def _won(r: dict) -> str:
    return f"{r['wins']}/{r['seeds']}" if "wins" in r else "-"


def finetune_probe(report: dict) -> str:
    s = report["settings"]
    lines = [f"Linear probe of frozen `{s['model']}` features (logistic regression on each draw's labeled images, "
             f"{s['test']} test images, {s['seeds']} label draws; {_when(report)}):", "",
             "| px | labels/class | ImageNet start | random start | lead |", "|---|---|---|---|---|"]
    rows = report["table"]
    for r in [r for r in rows if r["start"] == "pretrained"]:
        o = next(x for x in rows if x["start"] == "scratch" and x["img_size"] == r["img_size"]
                 and x["labels_per_class"] == r["labels_per_class"])
        lines.append(f"| {r['img_size']} | {r['labels_per_class']} | {_pm((r['top1_mean'], r['top1_sd']))} | "
                     f"{_pm((o['top1_mean'], o['top1_sd']))} | {r['top1_mean'] - o['top1_mean']:+.2f} |")
    return "\n".join(lines)


def _head(r: dict) -> str:
    return "linear" if r["head"] is None else f"MLP {r['head']}"


def finetune_frozen_summary(report: dict, tau: float = 2, threshold: float = 0.7) -> str:
    """Per label budget and head: supervised, FixMatch and DebiasPL at one (tau, threshold), the
    FixMatch at the same threshold being the comparison."""
    rows = [r for r in report["table"] if r["freeze"] in (None, "backbone")]
    lines = [f"Frozen backbone, DebiasPL at tau {tau:g}, threshold {threshold:g} (FixMatch at the same threshold; "
             f"mean ± sd over {report['settings']['seeds']} seeds; PL KL: the pseudo-label histogram's KL from "
             f"uniform):", "",
             "| labels/class | head | supervised | FixMatch | DebiasPL | DebiasPL - FixMatch | seeds won | "
             "PL KL FixMatch | PL KL DebiasPL |", "|---|---|---|---|---|---|---|---|---|"]
    for budget in sorted({r["budget"] for r in rows}):
        for head in sorted({r["head"] for r in rows}, key=lambda h: h or 0):
            sel = [r for r in rows if r["budget"] == budget and r["head"] == head]
            sup = next((r for r in sel if r["method"] == "supervised"), None)
            fm = next((r for r in sel if r["method"] == "fixmatch" and r["threshold"] == threshold), None)
            dpl = next((r for r in sel if r["method"] == "debiaspl" and r["threshold"] == threshold
                        and r["tau"] == tau), None)
            if not (sup and fm and dpl):
                continue
            lines.append(f"| {budget} | {_head(dpl)} | {_pm((sup['top1_mean'], sup['top1_sd']))} | "
                         f"{_pm((fm['top1_mean'], fm['top1_sd']))} | {_pm((dpl['top1_mean'], dpl['top1_sd']))} | "
                         f"{_gain(dpl)} | {_won(dpl)} | {_f(fm['pl_kl_mean'], '.3f')} | {_f(dpl['pl_kl_mean'], '.3f')} |")
    return "\n".join(lines)


def finetune_frozen(report: dict) -> str:
    s = report["settings"]
    lines = [finetune_frozen_summary(report), "", "Every arm:", "",
             f"Frozen `{s['model']}` at {s['img_size']} px, {s['cached_views']} weak + {s['cached_views']} strong "
             f"cached views per image, {s['unlabeled'] or 'all'} unlabeled images, {s['steps']} steps of "
             f"{s['batch']} + {s['mu']} x {s['batch']}, all {s['test']} test images; {report['runs_done']} runs, "
             f"caching {report['cache_seconds'] / 60:.1f} min in the invocation that wrote this file "
             f"({_when(report)}):", "",
             "| labels/class | frozen | head | method | tau | threshold | test top-1 | vs FixMatch | seeds won | "
             "accepted PL acc. | mask | PL KL(uniform) | s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(report["table"], key=lambda r: r["budget"]):
        lines.append(f"| {r['budget']} | {r['freeze']} | {_head(r)} | "
                     f"{r['method']} | {'-' if r['tau'] is None else format(r['tau'], 'g')} | "
                     f"{'-' if r['threshold'] is None else format(r['threshold'], 'g')} | "
                     f"{_pm((r['top1_mean'], r['top1_sd']))} | {_gain(r)} | {_won(r)} | {_f(r['pl_acc_mean'], '.1f')} | "
                     f"{_f(r['mask_rate_mean'])} | {_f(r['pl_kl_mean'], '.3f')} | {r['seconds_mean']:.0f} |")
    return "\n".join(lines)


def finetune_full(report: dict) -> str:
    s = report["settings"]
    lines = [f"Full fine-tuning of `{s['model']}` at {s['img_size']} px, {s['labels']} labels per class, "
             f"{s['steps']} steps of {s['batch']} + {s['mu']} x {s['batch']}, {s['test']} test images "
             f"({_when(report)}):", "",
             "| start | method | test top-1 | per seed | vs FixMatch | seeds won | accepted PL acc. | PL KL(uniform) | "
             "s / run |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["table"]:
        lines.append(f"| {r['start']} | {r['method']} | {_pm((r['top1_mean'], r['top1_sd']))} | "
                     f"{', '.join(f'{v:.1f}' for v in r['top1_per_seed'])} | {_gain(r)} | {_won(r)} | "
                     f"{_f(r['pl_acc_mean'], '.1f')} | {_f(r['pl_kl_mean'], '.3f')} | {r['seconds_mean']:.0f} |")
    return "\n".join(lines)


def imbalanced(report: dict) -> str:
    s = report["settings"]
    lines = [f"Long-tailed Fashion-MNIST (head class {s['head']} images), {s['label_fraction']:.0%} labeled, "
             f"`test_resnet` from scratch, {s['steps']} steps, {s['seeds']} seeds, mean ± sd ({_when(report)}):", "",
             "| IR | arm | LT test top-1 | balanced test top-1 | balanced acc. | tail recall | head recall | "
             "PL KL from the training profile |", "|---|---|---|---|---|---|---|---|"]
    for r in report["table"]:
        lines.append(f"| {r['ratio']:g} | {r['arm']} | {_pm(r['lt_top1'])} | {_pm(r['balanced_top1'])} | "
                     f"{_pm(r['balanced_acc'])} | {_pm(r['tail_recall'])} | {_pm(r['head_recall'])} | "
                     f"{_pm(r.get('pl_kl_profile', (float('nan'), float('nan'))), '.3f')} |")
    return "\n".join(lines)


def vit(report: dict) -> str:
    s = report["settings"]
    lines = [f"MNIST, {s['labels_per_class']} labels per class, {s['steps']} steps, {s['seeds']} seeds "
             f"({_when(report)}):", "",
             "| method | test top-1 (mean ± sd) | accepted PL acc. | PL KL(uniform) | gain vs FixMatch | seeds won |",
             "|---|---|---|---|---|---|"]
    for r in report["table"]:
        sup = r["method"] == "supervised"
        lines.append(f"| {r['method']} | {_pm(r['top1'])} | {'-' if sup else _f(r['pl_acc'][0])} | "
                     f"{'-' if sup else _f(r['pl_kl'][0], '.3f')} | {'-' if r['gain'] is None else _pm(r['gain'], signed=True)} | "
                     f"{'-' if r['wins'] is None else '{}/{}'.format(r['wins'], r['seeds'])} |")
    return "\n".join(lines)


def two_class(report: dict) -> str:
    s = report["settings"]
    lines = [f"Two classes at 2:1 (Fashion-MNIST {' and '.join(s['classes'])}), 3% labeled, `{s['model']}` at "
             f"{s['img_size']} px, {s['steps']} steps of {s['batch']} + {s['mu']} x {s['batch']}, {s['seeds']} seeds "
             f"({_when(report)}):", "",
             "| recipe | arm | top-1 | balanced acc. | per seed | mask | accepted PL acc. | seeds below supervised |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["table"]:
        below = "-" if r["below_supervised_seeds"] is None else f"{r['below_supervised_seeds']}/{r['seeds']}"
        lines.append(f"| {r['settings']} | {r['arm']} | {_pm(r['top1'])} | {_pm(r['balanced'])} | "
                     f"{', '.join(f'{v:.1f}' for v in r['top1_per_seed'])} | {_pm(r['mask_rate'])} | "
                     f"{_pm(r['pl_acc'], '.1f')} | {below} |")
    return "\n".join(lines)


def pretrain(report: dict) -> str:
    s, pre = report["settings"], report.get("pretraining") or {}
    lines = [f"Fashion-MNIST at {s['img_size']} px; pretraining `test_resnet` {s['pre_epochs']} epochs of "
             f"{s['pre_batch']} (queue {s['queue']}); fine-tuning {s['steps']} steps of {s['batch']} + {s['mu']} x "
             f"{s['batch']}, {s['seeds']} seeds ({_when(report)}):", "",
             "| start | labels | method | test top-1 (mean ± sd) | per seed | vs FixMatch (paired) | seeds won | "
             "accepted PL acc. | PL KL(uniform) | s / run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["table"]:
        sup = r["method"] == "supervised"
        lines.append(f"| {r['start']} | {r['budget']} | {r['method']} | {r['top1_mean']:.2f} ± {r['top1_sd']:.2f} | "
                     f"{', '.join(f'{v:.1f}' for v in r['top1_per_seed'])} | {_gain(r)} | {_won(r)} | "
                     f"{'-' if sup else _f(r['pl_acc_mean'])} | "
                     f"{'-' if sup else _f(r['pl_kl_mean'], '.3f')} | {r['seconds_mean']:.0f} |")
    if report.get("probes"):
        lines += ["", "| start | labels | kNN top-1 (k 20) | linear probe top-1 |", "|---|---|---|---|"]
        for r in report["probes"]:
            lines.append(f"| {r['start']} | {r['budget']} | {_pm((r['knn_mean'], r['knn_sd']))} | "
                         f"{_pm((r['probe_mean'], r['probe_sd']))} |")
    if pre:
        lines += ["", f"Pretraining: {pre.get('steps')} steps in {pre.get('seconds', 0) / 60:.1f} min, kNN monitor "
                      f"top-1 {_f(pre.get('knn_top1'))}. Whole benchmark: {report.get('wall_seconds', 0) / 60:.0f} min "
                      f"of wall time, {report.get('run_seconds_total', 0) / 60:.0f} min of single-process run time."]
    return "\n".join(lines)


def pretrain_estimate(report: dict) -> str:
    s, c = report["settings"], report["costs"]
    lines = [f"`benchmarks/pretrain.py --estimate`: CPU seconds of {s['estimate_steps']} steps of each kind of run, one "
             f"thread ({report['date']}, {report['machine']['cpu_count']} CPU cores, load average "
             f"{report['machine']['load_average'][0]:.1f}):", "",
             "| run | s / step | steps | evaluation s | s / run |", "|---|---|---|---|---|",
             f"| pretraining (batch {s['pre_batch']}) | {c['pretrain']['step_s']:.3f} | {c['pretrain']['steps']} | "
             f"{c['pretrain']['knn_s']:.1f} (kNN) | {c['pretrain']['total_s']:.0f} |"]
    for key, v in c.items():
        if key != "pretrain" and isinstance(v, dict):
            lines.append(f"| {key} | {v['step_s']:.3f} | {s['steps']} | {v['eval_s']:.1f} | {v['total_s']:.0f} |")
    lines += ["", f"{report['jobs']} runs, {report['process_s'] / 60:.0f} single-process minutes (Lite0 feature cache "
                  f"{c.get('lite0-cache_s', 0):.0f} s, probes {report.get('probes_s', 0):.0f} s): an estimated "
                  f"{report['wall_s'] / 60:.1f} min of wall time on {s['parallel']} processes."]
    return "\n".join(lines)


RENDER = {"two-class": two_class, "gain": gain, "speed": speed, "load": load, "finetune-probe": finetune_probe,
          "finetune-frozen": finetune_frozen, "finetune-full": finetune_full, "imbalanced": imbalanced, "vit": vit,
          "pretrain": pretrain, "pretrain_estimate": pretrain_estimate}


def main(paths) -> int:
    for path in paths:
        report = json.loads(Path(path).read_text())
        if report.get("benchmark") in RENDER:
            print(RENDER[report["benchmark"]](report))
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
