"""Markdown from the benchmark results: each study's tables, the README's headline table and the
fine-tuning page's decision table, all computed from ``benchmarks/results/*.json``.

    python benchmarks/report.py benchmarks/results/*.json     # print the tables of these files
    python benchmarks/docgen.py                               # write them into README.md and docs/

A study (``STUDIES``) is one results page: its title, the result files it shows and the command
that made each. Adding a results file takes a renderer (a function of its JSON, registered in
``RENDER`` under the file's ``benchmark`` name) and a ``Source`` in a study, new or existing:
``docgen`` then writes its page, its line in the results index and its entry in the site's nav.
"""
from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parents[1]


def _f(v, spec=".2f"):
    return "-" if v is None or v != v else format(v, spec)


def _pm(pair, spec=".2f", signed=False):
    return f"{_f(pair[0], ('+' if signed else '') + spec)} ± {_f(pair[1], spec)}"


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def machine(report: dict) -> str:
    """Where a result was measured, as a timing needs it stated."""
    m = report["machine"]
    where = f"{m['gpu']}, {m['cpu_count']} CPU cores" if m.get("gpu") else f"{m['cpu_count']} CPU cores, no GPU"
    return f"{where} ({m.get('processor', '?')}), torch {m['torch']}, timm {m.get('timm', '?')}, Python {m['python']}"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def provenance(report: dict, path: str, command: str) -> str:
    """The line above every rendered result: the command, the file, the date and the machine."""
    parallel = report.get("settings", {}).get("parallel") if isinstance(report.get("settings"), dict) else None
    runs = f"; {parallel} single-thread runs side by side" if parallel and parallel > 1 else ""
    took = f"; {_duration(report['seconds'])} in all" if report.get("seconds") else ""
    return (f"`{report.get('command') or command}` wrote `{path}` on {report['date']}: {machine(report)}"
            f"{runs}{took}.")


def gain(report: dict) -> str:
    s = report["settings"]
    steps = s["overrides"].get("steps_per_epoch", 0) * s["overrides"].get("epochs", 0)
    lines = [f"Embedded MNIST, `mnist_demo` recipe at {steps} steps, {s['seeds']} seeds, "
             f"{s.get('parallel', 1)} single-thread runs side by side:", "",
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
                  f"view pair, {s['img_size']} px, medians of {s['rounds']} interleaved rounds:", "",
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
        lines.append(f"\nFolder of JPEGs at {r['img_size']} px, `data.augment_on: {r['augment_on']}`, {r['workers']} "
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
    if "hub_requests_warm" in report:
        rows.append(f"| requests to the Hub during the warm loads | {report['hub_requests_warm']} |")
    return "\n".join(rows)


def _gain(r: dict) -> str:
    return f"{r['gain_mean']:+.2f} ± {r['gain_sd']:.2f}" if "gain_mean" in r else "-"


def _won(r: dict) -> str:
    return f"{r['wins']}/{r['seeds']}" if "wins" in r else "-"


def finetune_probe(report: dict) -> str:
    s = report["settings"]
    lines = [f"Linear probe of frozen `{s['model']}` features (logistic regression on each draw's labeled images, "
             f"{s['test']} test images, {s['seeds']} label draws):", "",
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
             + (f"caching {report['cache_seconds'] / 60:.1f} min in the invocation that wrote this file"
                if report.get("cache_seconds") is not None else "a report of runs finished earlier, no caching")
             + ":", "",
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
             f"{s['steps']} steps of {s['batch']} + {s['mu']} x {s['batch']}, {s['test']} test images"
             ":", "",
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
             f"`test_resnet` from scratch, {s['steps']} steps, {s['seeds']} seeds, mean ± sd:", "",
             "| IR | arm | profile test top-1 | balanced test top-1 | rarest-class recall | commonest-class recall | "
             "PL KL from the training profile |", "|---|---|---|---|---|---|---|"]
    for r in report["table"]:
        lines.append(f"| {r['ratio']:g} | {_ARMS.get(r['arm'], r['arm'])} | {_pm(r['lt_top1'])} | "
                     f"{_pm(r['balanced_top1'])} | {_pm(r['tail_recall'])} | {_pm(r['head_recall'])} | "
                     f"{_pm(r.get('pl_kl_profile', (float('nan'), float('nan'))), '.3f')} |")
    if report.get("runs"):
        lines += ["", "Paired by seed (mean ± sd of the per-seed differences, seeds won):", "",
                  "| IR | comparison | profile test | balanced test |", "|---|---|---|---|"]
        for ratio in s["ratios"]:
            for arm, against in (("debiaspl-uniform", "fixmatch"), ("debiaspl-labeled", "fixmatch"),
                                 ("debiaspl-labeled", "debiaspl-uniform")):
                cells = []
                for test in ("lt_top1", "balanced_top1"):
                    c = _imbalanced(report, ratio, test, arm=arm, against=against)
                    cells.append(f"{_pm(c.gain, signed=True)} ({c.wins}/{c.seeds})")
                lines.append(f"| {ratio:g} | {_ARMS[arm]} − {_ARMS[against]} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def vit(report: dict) -> str:
    s = report["settings"]
    lines = [f"MNIST, {s['labels_per_class']} labels per class, {s['steps']} steps, {s['seeds']} seeds"
             ":", "",
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
             f"{s['img_size']} px, {s['steps']} steps of {s['batch']} + {s['mu']} x {s['batch']}, {s['seeds']} seeds"
             ":", "",
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
             f"{s['batch']}, {s['seeds']} seeds:", "",
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


_ARMS = {"fixmatch": "FixMatch", "debiaspl-uniform": "DebiasPL, `uniform`", "debiaspl-labeled": "DebiasPL, `labeled`"}


def gpu_check(report: dict) -> str:
    lines = ["| part | status | what it reported | s |", "|---|---|---|---|"]
    for name, part in report["parts"].items():
        detail = str(part.get("detail", "")).replace("|", "\\|")
        lines.append(f"| {name} | {part['status']} | {detail} | {_f(part.get('seconds'), '.0f')} |")
    return "\n".join(lines)


def usb_peer(report: dict) -> str:
    """USB beside dpl-zoo: each arm's top-1, pseudo-label balance and speed per task; our DebiasPL
    against each USB arm paired by seed; our images/s over USB's for the same algorithm."""
    s = report["settings"]
    tasks = s.get("tasks") or [{"task": "fashion-lite0", "dataset": "fashion_mnist", "model": "tf_efficientnet_lite0",
                                "start": "imagenet", **{k: s[k] for k in ("img_size", "labels_per_class", "steps")}}]
    lines = [f"- `{t['task']}`: {t['dataset']}, {t['labels_per_class']} labels per class, `{t['model']}` "
             f"({'from scratch' if t['start'] == 'scratch' else 'from ImageNet weights'}) at {t['img_size']} px, "
             f"{t['steps']} steps" for t in tasks]
    lines += ["", f"Both libraries: labeled batch {s['batch']} + {s['mu']} x {s['batch']} unlabeled, threshold "
                  f"{s['shared_threshold']}, EMA {s['shared_ema']}, weight decay {s['shared_weight_decay']}, "
                  f"{s['seeds']} seeds, {s['device']}" + (" (USB's CUDA calls run on the CPU)" if s.get("cpu_emulate")
                                                          else "") + ".", "",
              "| task | library | arm | seeds | test top-1, EMA weights | per seed | pseudo-label KL from target | "
              "unlabeled images used | training img/s | not ok |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["table"]:
        lines.append(f"| {r.get('task', tasks[0]['task'])} | {r['lib']} | {r['algorithm']} | {r['seeds']} | "
                     f"{_pm((r['top1_mean'], r['top1_sd']))} | "
                     f"{', '.join(_f(v, '.1f') for v in r.get('top1_per_seed', []))} | "
                     f"{_f(r.get('pl_kl_target_mean'), '.3f')} | {_f(r.get('mask_rate_mean'), '.2f')} | "
                     f"{_f(r['img_per_s_mean'], '.0f')} | "
                     f"{'; '.join(r['not_ok']).replace('|', '/') or '-'} |")
    if report.get("paired"):
        lines += ["", "Our DebiasPL minus each USB arm, paired by seed (top-1 points):", "",
                  "| task | ours | USB arm | ours - USB (mean ± sd) | per seed | seeds won |", "|---|---|---|---|---|---|"]
        lines += [f"| {p['task']} | {p['ours']} | {p['usb']} | {_pm((p['mean'], p['sd']), signed=True)} | "
                  f"{', '.join(_f(d, '+.1f') for d in p['diffs'])} | {p['won']}/{len(p['seeds'])} |"
                  for p in report["paired"]]
    if report.get("speed"):
        lines += ["", "Training images/s of the same algorithm, paired by seed:", "",
                  "| task | algorithm | ours | USB | ours / USB |", "|---|---|---|---|---|"]
        lines += [f"| {r['task']} | {r['algorithm']} | {_f(r['ours_img_per_s'], '.0f')} | "
                  f"{_f(r['usb_img_per_s'], '.0f')} | {_pm((r['ratio_mean'], r['ratio_sd']))} |" for r in report["speed"]]
    return "\n".join(lines)


def mismatch(report: dict) -> str:
    s = report["settings"]
    lines = [f"Fashion-MNIST, frozen EfficientNet-Lite0 at {s['img_size']} px (cached views), a linear head, "
             f"imbalance ratio {s['ratio']:g}, {s['steps']} steps, {s['seeds']} seeds, balanced test set "
             f"({s['test']} images), mean ± sd:", "",
             "| unlabeled mix | arm | top-1 | rarest-class recall | estimate TV from the truth | "
             "PL KL from the truth |", "|---|---|---|---|---|---|"]
    for r in report["table"]:
        lines.append(f"| {r['case']} | {r['arm']} | {_pm(r['top1'])} | {_pm(r['tail_recall'])} | "
                     f"{'-' if r['estimate_tv'][0] is None or r['estimate_tv'][0] != r['estimate_tv'][0] else _pm(r['estimate_tv'], '.3f')} | "
                     f"{_pm(r['pl_kl_truth'], '.3f')} |")
    paired = report.get("paired_vs_estimated") or {}
    if paired:
        lines += ["", "`estimated` minus each arm, paired by seed (top-1 points, mean ± sd, seeds won):", "",
                  "| unlabeled mix | " + " | ".join(next(iter(paired.values()))) + " |",
                  "|---|" + "---|" * len(next(iter(paired.values())))]
        for case, arms in paired.items():
            lines.append(f"| {case} | " + " | ".join(f"{_pm((c['mean'], c['sd']), signed=True)} ({c['won']}/{c['seeds']})"
                                                    for c in arms.values()) + " |")
    return "\n".join(lines)


RENDER: dict[str, Callable[[dict], str]] = {
    "two-class": two_class, "gain": gain, "speed": speed, "load": load, "finetune-probe": finetune_probe,
    "finetune-frozen": finetune_frozen, "finetune-full": finetune_full, "imbalanced": imbalanced, "vit": vit,
    "pretrain": pretrain, "pretrain_estimate": pretrain_estimate,
    "gpu_check": gpu_check, "gpu_check (parts rerun after the fixes)": gpu_check, "usb_peer": usb_peer,
    "mismatch": mismatch}


def verdicts(report: dict) -> str:
    """The benchmark's own verdicts on its targets, as it wrote them."""
    items = report.get("verdicts") or {}
    out = []
    for name, value in items.items():
        if isinstance(value, dict):
            value = "; ".join(f"{k}: {_verdict(v)}" for k, v in value.items())
        out.append(f"- {name}: {_verdict(value)}")
    return "\n".join(out)


def _verdict(value) -> str:
    if value is True or value is False:
        return "**met**" if value else "**missed**"
    if isinstance(value, float):
        return f"{value:+.2f}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "none"
    return str(value)


# --- studies: one results page each ------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """A result file (a glob under benchmarks/results/) and the command that wrote it, unless the file
    records its own ``command``."""
    pattern: str
    command: str
    heading: str = ""       # a heading above it when a page shows several files


@dataclass(frozen=True)
class Study:
    slug: str               # the page: docs/results/<slug>.md
    title: str
    summary: str            # what it measures, one sentence, no numbers (those come from the files)
    sources: tuple
    figures: tuple = ()     # figures under benchmarks/results/ not named in a file's "figure" field


STUDIES: tuple = (
    Study("gain", "Accuracy gain and pseudo-label balance (MNIST)",
          "DebiasPL against FixMatch and supervised training on the embedded MNIST digits, at 1 and 2 labels "
          "per class, over 5 seeds.",
          (Source("gain.json", "python benchmarks/gain.py"),), ("embedded_default.png",)),
    Study("finetune", "Fine-tuning a pretrained backbone",
          "ImageNet EfficientNet-Lite0 on Fashion-MNIST: which resolution carries the features over, the frozen "
          "backbone grid that chose the recipe's settings, and full fine-tuning.",
          (Source("finetune_probe.json", "python benchmarks/finetune.py --part probe", "Which resolution"),
           Source("finetune_frozen.json", "python benchmarks/finetune.py --part frozen", "Frozen backbone"),
           Source("finetune_full.json", "python benchmarks/finetune.py --part full", "Full fine-tuning"))),
    Study("pretrain", "In-domain pretraining",
          "MoCo v2 + EMAN pretraining on Fashion-MNIST's own images, then supervised, FixMatch and DebiasPL from "
          "the in-domain, ImageNet and random starts.",
          (Source("pretrain.json", "python benchmarks/pretrain.py", "The benchmark"),
           Source("pretrain_estimate_cpu.json", "python benchmarks/pretrain.py --estimate",
                  "Its cost, estimated before it ran"))),
    Study("imbalanced", "Imbalanced data: which target prior",
          "Long-tailed Fashion-MNIST: FixMatch, and DebiasPL debiasing towards a uniform, the labeled split's, an "
          "estimated or the true class distribution, with the unlabeled mix like the labeled one or not.",
          (Source("imbalanced.json", "python benchmarks/imbalanced.py", "Labeled and unlabeled data share the profile"),
           Source("mismatch.json", "python benchmarks/mismatch.py",
                  "The unlabeled mix differs from the labeled one: estimated against the fixed choices and USB"))),
    Study("two-class", "A two-class case",
          "Two classes at about 2:1 with the shipped fine-tuning recipe: no semi-supervised arm may end below "
          "supervised training.",
          (Source("two_class.json", "python benchmarks/two_class.py"),)),
    Study("vit", "A ViT from scratch",
          "A small timm ViT trained from scratch on the embedded MNIST digits at 10 labels per class.",
          (Source("vit.json", "python benchmarks/vit.py"),)),
    Study("speed", "Step cost and data pipeline",
          "What a DebiasPL step costs against FixMatch and a hand-written step, on CPU and on one GPU, and how "
          "fast the data pipeline feeds it.",
          (Source("speed.json", "python benchmarks/speed.py --end-to-end --folder --rounds 9", "On 2 CPU cores"),
           Source("gpu/speed_cuda_h200.json", "python benchmarks/gpu_check.py", "On one GPU"))),
    Study("load", "Load latency",
          "What `dpl_zoo.load` costs against a plain timm + safetensors load of the same file.",
          (Source("load.json", "python benchmarks/load.py"),)),
    Study("gpu", "The GPU check: what ran on a GPU",
          "The runs of `benchmarks/gpu_check.py` on one GPU so far, part by part.",
          (Source("gpu/gpu_check_h200_first.json", "python benchmarks/gpu_check.py", "First run"),
           Source("gpu/gpu_check_h200_rerun.json", "python benchmarks/gpu_check.py", "The failed parts, after the fixes"),
           Source("gpu/gpu_check.json", "python benchmarks/gpu_check.py", "The latest run"))),
    Study("usb-peer", "The peer: USB",
          "USB's FixMatch, FlexMatch, FreeMatch, SoftMatch and DebiasPL beside this library on the same split, "
          "network, initialisation and budget.",
          (Source("usb_peer_cpu.json", "python benchmarks/usb_peer.py --size cpu --cpu-emulate", "On 2 CPU cores"),
           Source("usb_peer_cpu_ablation.json", "python benchmarks/usb_peer.py --size cpu --cpu-emulate --name "
                  "usb_peer_cpu_ablation", "Ablations: who makes the pseudo-labels, and FreeMatch's threshold"),
           Source("usb_peer.json", "python benchmarks/usb_peer.py --full", "On one GPU"))),
)


def study(slug: str) -> Study:
    return next(s for s in STUDIES if s.slug == slug)


def files(source: Source, results: Path = RESULTS) -> list[Path]:
    """The result files of a source, without the toy runs the tests write."""
    return sorted(p for p in results.glob(source.pattern) if "_toy" not in p.name)


def present(results: Path = RESULTS) -> list[Study]:
    """The studies with at least one result file: the ones that have a page."""
    return [s for s in STUDIES if any(files(src, results) for src in s.sources)]


def load_report(path: Path) -> dict:
    return json.loads(path.read_text())


def rel(path: Path) -> str:
    return path.resolve().relative_to(REPO).as_posix()


def render_file(path: Path, command: str) -> str:
    """One result file: where it comes from, its tables, its figure and its verdicts."""
    report = load_report(path)
    name = report.get("benchmark")
    if name not in RENDER:
        raise KeyError(f"{rel(path)}: no renderer for benchmark {name!r}; add one to RENDER in benchmarks/report.py")
    parts = [provenance(report, rel(path), command), RENDER[name](report)]
    if report.get("figure"):
        parts.append(figure(_figure_path(report["figure"], path)))
    if report.get("verdicts"):
        parts.append("Its verdicts on its targets:\n\n" + verdicts(report))
    return "\n\n".join(parts)


def _figure_path(name: str, report_path: Path) -> Path:
    candidate = REPO / name
    return candidate if candidate.is_file() else report_path.parent / name


def figure(path: Path) -> str:
    """A figure as the results pages show it (``docgen`` serves benchmarks/results/ as figures/)."""
    return f"![{path.stem.replace('_', ' ')}](figures/{path.resolve().relative_to(RESULTS).as_posix()})"


def page_block(s: Study, results: Path = RESULTS) -> str:
    """The generated part of a study's page."""
    out = []
    for source in s.sources:
        for path in files(source, results):
            if source.heading:
                out.append(f"### {source.heading}")
            out.append(render_file(path, source.command))
    out += [figure(results / f) for f in s.figures]
    return "\n\n".join(out)


# --- tables that compare across studies ---------------------------------------------------------------

@dataclass(frozen=True)
class Comparison:
    """DebiasPL against FixMatch on one setting: both means ± sd, the gain paired by seed, seeds won."""
    fixmatch: tuple
    debiaspl: tuple
    gain: tuple
    wins: int
    seeds: int


def _gain_budget(report: dict, budget: int) -> Comparison:
    rows = {r["method"]: r for r in report["table"] if r["budget"] == budget}
    fm, dpl = rows["fixmatch"], rows["debiaspl"]
    return Comparison((fm["top1_mean"], fm["top1_sd"]), (dpl["top1_mean"], dpl["top1_sd"]),
                      (dpl["gain_mean"], dpl["gain_sd"]), dpl["wins"], dpl["seeds"])


def _frozen(report: dict, budget: int, tau: float = 2, threshold: float = 0.7, head=None,
            freeze="backbone") -> Comparison:
    sel = [r for r in report["table"] if r["budget"] == budget and r["head"] == head and r["freeze"] == freeze]
    if freeze == "backbone":
        sel = [r for r in sel if r["threshold"] in (threshold, None)]
    fm = next(r for r in sel if r["method"] == "fixmatch")
    dpl = next(r for r in sel if r["method"] == "debiaspl" and (freeze != "backbone" or r["tau"] == tau))
    return Comparison((fm["top1_mean"], fm["top1_sd"]), (dpl["top1_mean"], dpl["top1_sd"]),
                      (dpl["gain_mean"], dpl["gain_sd"]), dpl["wins"], dpl["seeds"])


def _row(report: dict, **match) -> dict:
    return next(r for r in report["table"] if all(r.get(k) == v for k, v in match.items()))


def _paired(report: dict, **match) -> Comparison:
    fm, dpl = _row(report, method="fixmatch", **match), _row(report, method="debiaspl", **match)
    return Comparison((fm["top1_mean"], fm["top1_sd"]), (dpl["top1_mean"], dpl["top1_sd"]),
                      (dpl["gain_mean"], dpl["gain_sd"]), dpl["wins"], dpl["seeds"])


def _vit(report: dict) -> Comparison:
    fm, dpl = _row(report, method="fixmatch"), _row(report, method="debiaspl")
    return Comparison(tuple(fm["top1"]), tuple(dpl["top1"]), tuple(dpl["gain"]), dpl["wins"], dpl["seeds"])


def _imbalanced(report: dict, ratio: float, test: str, arm: str = "debiaspl-uniform",
                against: str = "fixmatch") -> Comparison:
    """``arm`` against ``against`` on one test set, paired by seed from the file's runs."""
    score = {(r["job"]["ratio"], r["job"]["arm"], r["job"]["seed"]): r["scores"][test] for r in report["runs"]}
    seeds = sorted({k[2] for k in score if k[0] == ratio})
    a = [score[(ratio, against, s)] for s in seeds]
    b = [score[(ratio, arm, s)] for s in seeds]
    diff = [y - x for x, y in zip(a, b)]
    return Comparison(_mean_sd(a), _mean_sd(b), _mean_sd(diff), sum(d > 0 for d in diff), len(seeds))


@dataclass(frozen=True)
class HeadlineRow:
    slug: str               # the study page it links to
    file: str               # the result file it is computed from
    data: str               # data, model and start
    labels: str
    compare: Callable[[dict], Comparison]


HEADLINE: tuple = (
    HeadlineRow("gain", "gain.json", "MNIST digits, `test_resnet` from scratch", "1 per class",
                lambda r: _gain_budget(r, 1)),
    HeadlineRow("gain", "gain.json", "MNIST digits, `test_resnet` from scratch", "2 per class",
                lambda r: _gain_budget(r, 2)),
    HeadlineRow("finetune", "finetune_frozen.json", "Fashion-MNIST, frozen ImageNet EfficientNet-Lite0, linear head",
                "1 per class", lambda r: _frozen(r, 1)),
    HeadlineRow("finetune", "finetune_frozen.json", "Fashion-MNIST, frozen ImageNet EfficientNet-Lite0, linear head",
                "4 per class", lambda r: _frozen(r, 4)),
    HeadlineRow("finetune", "finetune_full.json", "Fashion-MNIST, whole ImageNet EfficientNet-Lite0 fine-tuned",
                "4 per class", lambda r: _paired(r, start="pretrained")),
    HeadlineRow("pretrain", "pretrain.json", "Fashion-MNIST, `test_resnet` from in-domain MoCo pretraining",
                "4 per class", lambda r: _paired(r, start="moco", budget="4/class")),
    HeadlineRow("imbalanced", "imbalanced.json", "long-tailed Fashion-MNIST (ratio 100), balanced test set",
                "1%", lambda r: _imbalanced(r, 100.0, "balanced_top1")),
    HeadlineRow("vit", "vit.json", "MNIST digits, a small ViT from scratch", "10 per class", _vit),
)


def headline(link: Callable[[str], str], results: Path = RESULTS) -> str:
    """The README's table: DebiasPL against FixMatch in every study, computed from the result files."""
    lines = ["| data and model | labels | FixMatch | DebiasPL | DebiasPL − FixMatch, paired by seed | seeds won | "
             "measured |", "|---|---|---|---|---|---|---|"]
    for row in HEADLINE:
        report = load_report(results / row.file)
        c = row.compare(report)
        lines.append(f"| [{row.data}]({link(f'results/{row.slug}.md')}) | {row.labels} | {_pm(c.fixmatch)} | "
                     f"{_pm(c.debiaspl)} | {_pm(c.gain, signed=True)} | {c.wins}/{c.seeds} | {report['date']}, "
                     f"{_short_machine(report)} |")
    return "\n".join(lines)


def _short_machine(report: dict) -> str:
    m = report["machine"]
    return m["gpu"] if m.get("gpu") else f"{m['cpu_count']} CPU cores"


def _seconds(report: dict, **match) -> float:
    return _row(report, **match)["seconds_mean"]


def decision_table(link: Callable[[str], str], results: Path = RESULTS) -> str:
    """The fine-tuning page's table: each decision, what to choose, and the measurement behind it."""
    pre, frozen, full = (load_report(results / f) for f in ("pretrain.json", "finetune_frozen.json",
                                                            "finetune_full.json"))
    imb, speed_cpu, speed_gpu = (load_report(results / f) for f in ("imbalanced.json", "speed.json",
                                                                    "gpu/speed_cuda_h200.json"))
    page = lambda slug: link(f"results/{slug}.md")  # noqa: E731
    probe = {(r["start"], r["budget"]): r for r in pre["probes"]}
    dpl = {r["start"]: r for r in pre["table"] if r["method"] == "debiaspl" and r["budget"] == "4/class"}
    start = (f"4 labels per class, linear probe of the features: in-domain (`test_resnet`) "
             f"{probe[('moco', '4/class')]['probe_mean']:.1f}, ImageNet (EfficientNet-Lite0) "
             f"{probe[('imagenet', '4/class')]['probe_mean']:.1f}, random {probe[('random', '4/class')]['probe_mean']:.1f}; "
             f"DebiasPL from each "
             f"{dpl['moco']['top1_mean']:.1f} / {dpl['imagenet']['top1_mean']:.1f} / {dpl['random']['top1_mean']:.1f} "
             f"([in-domain pretraining]({page('pretrain')}), {pre['date']})")
    f4, p4 = _frozen(frozen, 4), _frozen(frozen, 4, freeze=frozen["settings"]["stage_freeze"])
    w4 = _paired(full, start="pretrained")
    fs, ss = frozen["settings"], full["settings"]
    how_much = (f"4 labels per class, DebiasPL: backbone frozen {f4.debiaspl[0]:.1f} at {fs['img_size']} px "
                f"({_seconds(frozen, budget=4, head=None, freeze='backbone', method='debiaspl', tau=2, threshold=0.7):.0f} "
                f"s a run), last stage trained (`freeze: {fs['stage_freeze']}`) {p4.debiaspl[0]:.1f} "
                f"({_seconds(frozen, budget=4, freeze=fs['stage_freeze'], method='debiaspl'):.0f} s), whole network "
                f"{w4.debiaspl[0]:.1f} at {ss['img_size']} px ({_seconds(full, start='pretrained', method='debiaspl'):.0f} s)"
                f", on {_short_machine(frozen)} ([fine-tuning]({page('finetune')}), {frozen['date']})")
    budgets = ", ".join(f"{b} per class {_frozen(frozen, b).gain[0]:+.1f} ({_frozen(frozen, b).wins}/"
                        f"{_frozen(frozen, b).seeds})" for b in fs["budgets"])
    budget = f"DebiasPL − FixMatch, frozen backbone: {budgets} ([fine-tuning]({page('finetune')}))"
    ratio = max(imb["settings"]["ratios"])
    prof_l = _imbalanced(imb, ratio, "lt_top1", arm="debiaspl-labeled", against="debiaspl-uniform")
    bal_u = _imbalanced(imb, ratio, "balanced_top1", arm="debiaspl-uniform", against="debiaspl-labeled")
    prior = (f"long-tailed Fashion-MNIST, ratio {ratio:g}: on a test set with the training profile `labeled` "
             f"{prof_l.debiaspl[0]:.1f} vs `uniform` {prof_l.fixmatch[0]:.1f}; on a balanced test set `uniform` "
             f"{bal_u.debiaspl[0]:.1f} vs `labeled` {bal_u.fixmatch[0]:.1f} ([imbalanced data]({page('imbalanced')}))")
    if (results / "mismatch.json").is_file():
        mm = load_report(results / "mismatch.json")
        top = {(r["case"], r["arm"]): r["top1"][0] for r in mm["table"]}
        cases = "; ".join(f"{case}: `estimated` {top[(case, 'debiaspl-estimated')]:.1f}, `labeled` "
                          f"{top[(case, 'debiaspl-labeled')]:.1f}, `uniform` {top[(case, 'debiaspl-uniform')]:.1f}, "
                          f"the true mix {top[(case, 'debiaspl-oracle')]:.1f}"
                          for case in ("uniform", "reversed") if (case, "debiaspl-estimated") in top)
        prior += (f". Long-tailed labels, unlabeled mix unlike them (balanced test): {cases} "
                  f"([mismatch]({page('imbalanced')}), {mm['date']})")
    taus = ", ".join(f"tau {t:g} {statistics.fmean(_frozen(frozen, b, tau=t).debiaspl[0] for b in fs['budgets']):.1f}"
                     for t in fs["taus"])
    tau = (f"DebiasPL, frozen backbone, threshold 0.7, mean over {', '.join(map(str, fs['budgets']))} labels per "
           f"class: {taus} ([fine-tuning]({page('finetune')}))")
    peer_report = load_report(results / "usb_peer_cpu.json")
    peer_rows = {(r["task"], r["lib"], r["algorithm"]): r for r in peer_report["table"]}
    ablation = results / "usb_peer_cpu_ablation.json"
    if ablation.is_file():
        peer_rows.update({(r["task"], r["lib"], r["algorithm"]): r for r in load_report(ablation)["table"]})

    def used(task, lib, arm):
        r = peer_rows[(task, lib, arm)]
        return f"{r['top1_mean']:.1f} ({100 * r['mask_rate_mean']:.0f}% used)"
    def threshold_row(t):
        arms = [("0.95", "debiaspl"), ("`self_adaptive`", "debiaspl-sat"),
                ("`self_adaptive` with the student making the pseudo-labels", "debiaspl-sat-student"),
                ("0.7 with tau 2", "debiaspl-recipe")]
        cells = [f"{label} {used(t['task'], 'dpl-zoo', arm)}" for label, arm in arms
                 if (t["task"], "dpl-zoo", arm) in peer_rows]
        return (f"{t['dataset']}, {t['labels_per_class']} labels per class, from scratch: " + ", ".join(cells) +
                f", USB's FreeMatch {used(t['task'], 'usb', 'freematch')}")
    threshold = ("; ".join(threshold_row(t) for t in peer_report["settings"]["tasks"]) +
                 f" ([the peer: USB]({page('usb-peer')}), {peer_report['date']})")
    rn_cpu = next(m for m in speed_cpu["models"] if m["model"] == "resnet50")
    rn_gpu = next(m for m in speed_gpu["models"] if m["model"] == "resnet50")
    hardware = (f"a ResNet-50 DebiasPL step: {rn_cpu['img_per_s']:.0f} images/s at {rn_cpu['img_size']} px on "
                f"{_short_machine(speed_cpu)}, {rn_gpu['img_per_s']:,.0f} images/s at {rn_gpu['img_size']} px on one "
                f"{_short_machine(speed_gpu)} ([step cost]({page('speed')}))")
    rows = [
        ("where the backbone starts", "ImageNet weights (`model=NAME pretrained=true`) for photo-like images; your own "
         "unlabeled images through `dpl-zoo pretrain` when they are far from ImageNet; never random", start),
        ("how much of it trains", "on a CPU: `freeze=backbone` with `data.cached_views`; `freeze=N` to train the last "
         "stages too; the whole network on a GPU", how_much),
        ("how many labels", "DebiasPL's gain over FixMatch is largest with the fewest labels; with many, FixMatch's "
         "pseudo-labels are less biased and there is less to gain", budget),
        ("which target prior (`dpl.target_prior`)", "`labeled` (the recipe's) when the labels were drawn at random "
         "and the data you will predict has the training set's class profile; `uniform` when balanced accuracy is "
         "what you report; `estimated` when the unlabeled images' class mix is unknown or unlike the labels'", prior),
        ("how strongly to debias (`dpl.tau`)", "the recipe's 2 on new data; the paper's 0.4 leaves part of the bias",
         tau),
        ("which confidence threshold (`dpl.threshold`, `dpl.threshold_mode`)", "the recipe's 0.7 from a pretrained "
         "start; FixMatch's 0.95 leaves most unlabeled images unused in a short run from few labels. From scratch "
         "with few labels, `self_adaptive` (FreeMatch's thresholds on the debiased pseudo-labels, which use nearly "
         "every image from the first step) with the student making the pseudo-labels (`dpl.ema_teacher: false`, "
         "`model_ema_eval: true`); with the EMA teacher it gains little over 0.95", threshold),
        ("CPU or GPU", "a CPU trains a head on cached frozen features well; fine-tuning the whole network wants a GPU",
         hardware),
    ]
    lines = ["| decision | choose | measured |", "|---|---|---|"]
    lines += [f"| {d} | {c} | {m} |" for d, c, m in rows]
    return "\n".join(lines)


_PEER_ARMS = {("usb", "fixmatch"): "USB FixMatch", ("usb", "flexmatch"): "USB FlexMatch",
              ("usb", "freematch"): "USB FreeMatch", ("usb", "softmatch"): "USB SoftMatch",
              ("usb", "debiaspl"): "USB DebiasPL (as shipped)", ("dpl-zoo", "fixmatch"): "dpl-zoo FixMatch",
              ("dpl-zoo", "debiaspl"): "dpl-zoo DebiasPL, shared settings (tau 0.5, threshold 0.95)",
              ("dpl-zoo", "debiaspl-sat"): "dpl-zoo DebiasPL, FreeMatch's self-adaptive threshold (tau 0.5)",
              ("dpl-zoo", "debiaspl-recipe"): "dpl-zoo DebiasPL, the recipe's settings (tau 2, threshold 0.7)",
              ("dpl-zoo", "fixmatch-usb-like"): "dpl-zoo FixMatch with USB's optimiser and augmentation (ablation)",
              ("dpl-zoo", "fixmatch-sat"): "dpl-zoo FixMatch with FreeMatch's self-adaptive threshold (ablation)",
              ("dpl-zoo", "debiaspl-sat-student"): "dpl-zoo DebiasPL, self-adaptive threshold, the student makes the "
                                                   "pseudo-labels (ablation)",
              ("dpl-zoo", "supervised"): "labeled images only"}


def peer(link: Callable[[str], str], results: Path = RESULTS) -> str:
    """The README's peer table: each arm of the CPU peer benchmark per task, with the share of
    unlabeled images its loss used."""
    report = load_report(results / "usb_peer_cpu.json")
    tasks = {t["task"]: t for t in report["settings"]["tasks"]}
    cell = {(r["task"], r["lib"], r["algorithm"]): r for r in report["table"]}
    if (results / "usb_peer_cpu_ablation.json").is_file():   # its arms the table has not
        cell = {**{(r["task"], r["lib"], r["algorithm"]): r
                   for r in load_report(results / "usb_peer_cpu_ablation.json")["table"]}, **cell}
    head = " | ".join(f"{t['dataset']}, {t['labels_per_class']} labels per class" for t in tasks.values())
    lines = [f"| arm | {head} |", "|---|" + "---|" * len(tasks)]
    for key, label in _PEER_ARMS.items():
        rows = [cell.get((t, *key)) for t in tasks]
        if not any(rows):
            continue
        lines.append(f"| {label} | " + " | ".join(
            "-" if r is None else f"{_pm((r['top1_mean'], r['top1_sd']))}" +
            ("" if r.get("mask_rate_mean") is None or key[1] == "supervised" else f" ({100 * r['mask_rate_mean']:.0f}% used)")
            for r in rows) + " |")
    trained, minutes = report["settings"].get("runs_trained_here"), report["seconds"] / 60
    when = (f"the whole table in one call of {minutes:.0f} min" if trained == report["settings"]["runs_done"] else
            f"the call that wrote it took {minutes:.0f} min" if trained is None else
            f"made in several calls, the last of {minutes:.0f} min")
    lines += ["", f"Test top-1 of the EMA weights, mean ± sd over {report['settings']['seeds']} seeds; in brackets the "
                  f"share of unlabeled images the unlabeled loss used over training; the ablations come from further "
                  f"calls. {report['date']}, "
                  f"{_short_machine(report)}, {when} ([the peer: USB]({link('results/usb-peer.md')}))."]
    return "\n".join(lines)


def results_index(link: Callable[[str], str], results: Path = RESULTS) -> str:
    """One line per study page: its title, what it measures and when."""
    lines = []
    for s in present(results):
        dates = sorted({load_report(p)["date"] for src in s.sources for p in files(src, results)})
        when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
        lines.append(f"- [{s.title}]({link(f'results/{s.slug}.md')}): {s.summary} ({when})")
    return "\n".join(lines)


def main(paths) -> int:
    for path in paths:
        report = load_report(Path(path))
        if report.get("benchmark") in RENDER:
            print(RENDER[report["benchmark"]](report))
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
