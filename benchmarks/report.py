"""Markdown tables from the benchmark JSON files, for the README's Results section.

    python benchmarks/report.py benchmarks/results/gain.json benchmarks/results/speed.json ...
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _f(v, spec=".2f"):
    return "-" if v is None or v != v else format(v, spec)


def gain(report: dict) -> str:
    s = report["settings"]
    steps = s["overrides"].get("steps_per_epoch", 0) * s["overrides"].get("epochs", 0)
    lines = [f"Embedded MNIST, `mnist_demo` recipe at {steps} steps, {s['seeds']} seeds "
             f"({report['date']}, {report['machine']['cpu_count']} CPU cores, torch {report['machine']['torch']}, "
             f"{report['seconds'] / 60:.0f} min in all):", "",
             "| labels/class | method | test top-1 (mean ± sd) | accepted PL acc. | mask | PL KL(uniform) | "
             "PL max/min | gain vs FixMatch (mean ± sd) |", "|---|---|---|---|---|---|---|---|"]
    for r in report["table"]:
        gain_text = "-" if r["method"] == "fixmatch" else f"{r['gain_mean']:+.2f} ± {r['gain_sd']:.2f}"
        lines.append(f"| {r['budget']} | {r['method']} | {r['top1_mean']:.2f} ± {r['top1_sd']:.2f} | "
                     f"{_f(r['pl_acc_mean'])} | {_f(r['mask_rate_mean'])} | {_f(r['pl_kl_mean'], '.3f')} | "
                     f"{_f(r['pl_max_min_mean'], '.1f')} | {gain_text} |")
    if report.get("ablation"):
        lines += ["", f"Ablation at {2 if 2 in s['budgets'] else s['budgets'][0]} labels per class, seed 0:", "",
                  "| setting | test top-1 | accepted PL acc. | PL KL(uniform) | PL max/min |", "|---|---|---|---|---|"]
        for r in report["ablation"]:
            lines.append(f"| {r['label']} | {r['top1']:.2f} | {_f(r['pl_acc'])} | {_f(r['pl_kl_uniform'], '.3f')} | "
                         f"{_f(r['pl_max_min_ratio'], '.1f')} |")
    return "\n".join(lines)


def speed(report: dict) -> str:
    s = report["settings"]
    lines = [f"Batch {s['batch']} labeled + {s['mu'] * s['batch']} unlabeled (x2 views), {s['img_size']} px, medians "
             f"of {s['rounds']} interleaved rounds ({report['date']}, {report['machine']['cpu_count']} CPU cores):", "",
             "| model | device | DebiasPL step s | FixMatch step s | hand-written step s | DebiasPL/FixMatch "
             "(target <= 1.03) | DebiasPL/hand (target <= 1.10) | peak memory DebiasPL/hand |",
             "|---|---|---|---|---|---|---|---|"]
    for m in report["models"]:
        t = m["step_s"]
        lines.append(f"| {m['model']} | {m['device']} | {t['debiaspl']:.3f} | {t['fixmatch']:.3f} | {t['hand']:.3f} | "
                     f"{m['debiaspl_over_fixmatch']:.3f} | {m['debiaspl_over_hand']:.3f} | {m['memory_ratio']:.2f} |")
    p = report["pipeline"]
    lines += ["", f"Data pipeline (`{p['recipe']}`, {p['workers']} worker): loader alone "
                  f"{p['loader_img_per_s']:.0f} img/s, the training step consumes {p['step_img_per_s']:.0f} img/s: "
                  f"ratio {p['ratio']:.2f} (target >= 1.5)."]
    return "\n".join(lines)


def load(report: dict) -> str:
    w = report["warm"]
    return "\n".join([
        f"`{report['arch']}` ({report['bytes'] / 1e6:.0f} MB safetensors), medians of {report['repeats']} "
        f"({report['date']}):", "",
        "| path | seconds |", "|---|---|",
        f"| `dpl_zoo.load`, cold cache, loopback hub | {report['cold_s']:.3f} |",
        f"| `dpl_zoo.load`, warm cache | {w['dpl_zoo.load']['median_s']:.3f} |",
        f"| `timm.create_model` + `load_file` + `load_state_dict` | {w['timm + safetensors']['median_s']:.3f} |",
        f"| of which the sha256 check in `dpl_zoo.load` | {report['sha256_s']:.3f} |",
        f"| ratio warm `dpl_zoo.load` / plain (target <= 1.2) | {report['ratio']:.3f} |"])


def main(paths) -> int:
    for path in paths:
        report = json.loads(Path(path).read_text())
        print({"gain": gain, "speed": speed, "load": load}[report["benchmark"]](report))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
