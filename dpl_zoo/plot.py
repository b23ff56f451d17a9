"""``dpl-zoo plot``: the curves and pseudo-label histograms of one or more runs in one PNG.

Reads each run folder's ``metrics.jsonl`` (the evaluated epoch rows) and ``summary.json``
(the final pseudo-label histogram). matplotlib comes with ``dpl-zoo[demo]``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from .datasets import DataError

CURVES = (("top1", "test top-1 (%)"), ("mask_rate", "mask rate"), ("pl_acc", "accepted pseudo-label accuracy (%)"),
          ("pl_kl_uniform", "pseudo-label KL from uniform"))


def read_run(folder: str | Path) -> dict:
    """Label, evaluated curve points and final histogram of a run folder."""
    folder = Path(folder)
    metrics, summary_path = folder / "metrics.jsonl", folder / "summary.json"
    if not metrics.is_file():
        raise DataError(f"{folder} is not a run folder (no metrics.jsonl); pass folders that dpl-zoo train wrote")
    points, estimates = [], []
    for line in metrics.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a half-written last line of a running or killed run
        if row.get("kind") == "train" and row.get("prior_estimate"):
            estimates.append((row["step"], row["prior_estimate"]))
        if row.get("kind") == "epoch" and "eval" in row:
            pl = row["eval"].get("pseudo_labels", {})
            points.append({"step": row["step"], "top1": row["eval"]["student"]["top1"],
                           **{k: pl.get(k) for k in ("mask_rate", "pl_acc", "pl_kl_uniform")}})
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    label = summary.get("method") or folder.name
    if summary.get("top1") is not None:
        label += f" ({summary['top1']:.1f}%)"
    return {"label": label, "name": folder.name, "points": points, "hist": summary.get("pl_hist"),
            "target": summary.get("target_prior"), "estimates": estimates}


def plot_runs(folders: Sequence[str | Path], out: str | Path, title: Optional[str] = None) -> Path:
    """Four curves over steps, then each run's final pseudo-label class histogram against the
    distribution it was debiased towards (uniform unless a target prior was set), then, for runs
    with ``dpl.target_prior: estimated``, each class's estimated share over steps."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise DataError("dpl-zoo plot needs matplotlib: pip install 'dpl-zoo[demo]'") from e
    runs = [read_run(f) for f in folders]
    with_hist = [r for r in runs if r["hist"]]
    with_est = [r for r in runs if r["estimates"]]
    cols = max(len(CURVES), len(with_hist), len(with_est), 1)
    n_rows = 1 + bool(with_hist) + bool(with_est)
    fig, axes = plt.subplots(n_rows, cols, figsize=(3.6 * cols, 3.2 * n_rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, name) in zip(axes[0], CURVES):
        for i, r in enumerate(runs):
            pts = [(p["step"], p[key]) for p in r["points"] if p.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, color=colors[i % len(colors)], label=r["label"])
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[0][len(CURVES):]:
        ax.axis("off")
    axes[0][0].legend(fontsize=8)
    if with_hist:
        top = max(max(r["hist"]) for r in with_hist)
        for ax, r in zip(axes[1], with_hist):
            i = runs.index(r)
            hist, total = r["hist"], sum(r["hist"])
            ax.bar(range(len(hist)), hist, color=colors[i % len(colors)])
            target = r["target"] or [1.0 / len(hist)] * len(hist)
            ax.step([x - 0.5 for x in range(len(hist) + 1)], [total * t for t in target] + [total * target[-1]],
                    where="post", color="black", lw=1.2, label="uniform" if not r["target"] or
                    max(target) - min(target) < 1e-9 else "target prior")
            ax.set_ylim(0, top * 1.05)
            ax.set_title(f"{r['label']}: pseudo-labels per class", fontsize=10)
            ax.set_xlabel("class")
            ax.legend(fontsize=8)
        for ax in axes[1][len(with_hist):]:
            ax.axis("off")
    if with_est:
        for ax, r in zip(axes[-1], with_est):
            steps = [s for s, _ in r["estimates"]]
            for c in range(len(r["estimates"][0][1])):
                ax.plot(steps, [e[c] for _, e in r["estimates"]], lw=1, label=f"class {c}")
            ax.set_title(f"{r['label']}: estimated class prior", fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if len(r["estimates"][0][1]) <= 10:
                ax.legend(fontsize=6, ncol=2)
        for ax in axes[-1][len(with_est):]:
            ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
