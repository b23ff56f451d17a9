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


def finetune(report: dict) -> str:
    s = report["settings"]
    lines = [f"Fashion-MNIST, 4 labels per class, EfficientNet-Lite0 at {s['img_size']} px, batch {s['batch']} + "
             f"{s['mu']} x {s['batch']} unlabeled, {s['steps']} steps, {s['seeds']} seeds ({_when(report)}):", "",
             "| start | method | test top-1 (mean ± sd) | per seed | accepted PL acc. | PL KL(uniform) | s / run |",
             "|---|---|---|---|---|---|---|"]
    for r in report["table"]:
        sup = r["method"] == "supervised"
        lines.append(f"| {r['start']} | {r['method']} | {r['top1_mean']:.2f} ± {r['top1_sd']:.2f} | "
                     f"{', '.join(f'{v:.1f}' for v in r['top1_per_seed'])} | {'-' if sup else _f(r['pl_acc_mean'])} | "
                     f"{'-' if sup else _f(r['pl_kl_mean'], '.3f')} | {r['seconds_mean']:.0f} |")
    if "run_seconds_total" in report:   # a resumed benchmark's own time leaves out the runs it read back
        lines += ["", f"Run time of the {s['runs_done']} runs: {report['run_seconds_total'] / 60:.0f} min "
                      f"(single-process minutes, {s.get('parallel', 1)} side by side)."]
    if report.get("linear_probe"):
        lines += ["", "Linear probe of the frozen start points' features on the labeled images: " + ", ".join(
            f"{r['start']} {_pm((r['probe_top1_mean'], r['probe_top1_sd']))}" for r in report["linear_probe"]) + "."]
    return "\n".join(lines)


def imbalanced(report: dict) -> str:
    s = report["settings"]
    lines = [f"Long-tailed Fashion-MNIST (head class {s['head']} images), {s['label_fraction']:.0%} labeled, "
             f"`test_resnet` from scratch, {s['steps']} steps, {s['seeds']} seeds, mean ± sd ({_when(report)}):", "",
             "| IR | arm | LT test top-1 | balanced test top-1 | balanced acc. | tail recall | head recall | "
             "PL KL from p* |", "|---|---|---|---|---|---|---|---|"]
    for r in report["table"]:
        lines.append(f"| {r['ratio']:g} | {r['arm']} | {_pm(r['lt_top1'])} | {_pm(r['balanced_top1'])} | "
                     f"{_pm(r['balanced_acc'])} | {_pm(r['tail_recall'])} | {_pm(r['head_recall'])} | "
                     f"{_pm(r['pl_kl_target'], '.3f')} |")
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


def pretrain(report: dict) -> str:
    s, pre = report["settings"], report.get("pretraining") or {}
    lines = [f"Fashion-MNIST at {s['img_size']} px; pretraining `test_resnet` {s['pre_epochs']} epochs of "
             f"{s['pre_batch']} (queue {s['queue']}); fine-tuning {s['steps']} steps of {s['batch']} + {s['mu']} x "
             f"{s['batch']}, {s['seeds']} seeds ({_when(report)}):", "",
             "| start | labels | method | test top-1 (mean ± sd) | per seed | accepted PL acc. | PL KL(uniform) | "
             "s / run |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["table"]:
        sup = r["method"] == "supervised"
        lines.append(f"| {r['start']} | {r['budget']} | {r['method']} | {r['top1_mean']:.2f} ± {r['top1_sd']:.2f} | "
                     f"{', '.join(f'{v:.1f}' for v in r['top1_per_seed'])} | {'-' if sup else _f(r['pl_acc_mean'])} | "
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


RENDER = {"gain": gain, "speed": speed, "load": load, "finetune": finetune, "imbalanced": imbalanced, "vit": vit,
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
